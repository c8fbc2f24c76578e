# `cargo xtask vm-bench --seccomp`: what reporting seccomp-refused module syscalls costs, per
# syscall, for a task under a seccomp filter and for one without, side by side in one boot.
# Each round starts each monitor once (in a rotating order) and measures under it the getppid
# loop both unconfined and confined (the order alternating by round). The confined loop runs in
# a runc container whose config.json carries a seccomp profile refusing the module syscalls
# with EPERM (Docker's default profile does the same for them), so runc's libseccomp filter is
# what the task runs under. Prints `BENCH mode=M round=R ns=MEAN best=FASTEST_CHUNK` lines:
#   none / none+seccomp                         no monitor
#   kmodmon / kmodmon+seccomp                   kmodmon tail --json (seccomp-refused attempts on)
#   kmodmon-off / kmodmon-off+seccomp           kmodmon tail --json --no-seccomp-attempts
. /kmodmon/lib.sh

CALLS=${KMODMON_BENCH_CALLS:-500000}
ROUNDS=${KMODMON_BENCH_ROUNDS:-7}

PROFILE='{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": [{"names": ["init_module", "finit_module", "delete_module"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}'
CTR_SECCOMP=$PROFILE
ctr_config benchsc "/bench/sc" "" kmodmon-vm-bench "$CALLS" || exit 1
CTR_SECCOMP=

emit() { # MODE ROUND "MEAN BEST"
    case $3 in
    *[0-9]" "[0-9]*) echo "BENCH mode=$1 round=$2 ns=${3% *} best=${3#* }" ;;
    *) echo "BENCH-ERROR mode=$1 round=$2 no result: $3" ;;
    esac
}

measure_plain() { # MODE ROUND
    emit "$1" "$2" "$(kmodmon-vm-bench "$CALLS")"
}

# The same loop in a runc container under the seccomp profile.
measure_confined() { # MODE ROUND
    local r
    r=$(runc run --no-pivot -b /tmp/ctr/benchsc benchsc 2>"$OUT/benchsc.err")
    runc delete -f benchsc >/dev/null 2>&1
    emit "$1+seccomp" "$2" "$r"
}

measure_both() { # MODE ROUND
    if [ $(($2 % 2)) = 1 ]; then
        measure_plain "$1" "$2"
        measure_confined "$1" "$2"
    else
        measure_confined "$1" "$2"
        measure_plain "$1" "$2"
    fi
}

with_kmodmon() { # MODE ROUND [ARGS...]
    local mode=$1 round=$2 i=0
    shift 2
    rm -f "$OUT/bench-tail.err"
    kmodmon tail --json "$@" >/dev/null 2>"$OUT/bench-tail.err" &
    local pid=$!
    while ! grep -q '^kmodmon: attached' "$OUT/bench-tail.err"; do
        i=$((i + 1))
        if ! kill -0 "$pid" 2>/dev/null || [ "$i" -gt 1200 ]; then
            echo "BENCH-ERROR mode=$mode kmodmon did not attach: $(head -c 300 "$OUT/bench-tail.err")"
            kill -INT "$pid" 2>/dev/null
            wait "$pid"
            return 0
        fi
        usleep 100000
    done
    [ "$round" = 1 ] && echo "BENCH-INFO mode=$mode $(grep '^kmodmon: attached' "$OUT/bench-tail.err" | cut -d: -f3-)"
    sleep 1
    measure_both "$mode" "$round"
    kill -INT "$pid"
    wait "$pid"
}

run_monitor() { # MODE ROUND
    case $1 in
    none) measure_both none "$2" ;;
    kmodmon) with_kmodmon kmodmon "$2" ;;
    kmodmon-off) with_kmodmon kmodmon-off "$2" --no-seccomp-attempts ;;
    esac
}

kmodmon-vm-bench 100000 >/dev/null # warm-up
measure_confined warmup 0 >/dev/null
MODES="none kmodmon kmodmon-off"
for round in $(seq 1 "$ROUNDS"); do
    set -- $MODES
    shift $(((round - 1) % 3))
    for mode in "$@" $MODES; do
        case " $done_modes " in *" $mode "*) continue ;; esac
        done_modes="$done_modes $mode"
        run_monitor "$mode" "$round"
    done
    done_modes=
done
echo "BENCH-INFO calls=$CALLS rounds=$ROUNDS"
