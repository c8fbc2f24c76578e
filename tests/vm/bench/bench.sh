# `cargo xtask vm-bench`: the cost of module monitoring for an unrelated syscall (getppid),
# paired in one boot: each round measures every mode in turn (in a rotating order), so slow
# phases of the host hit all modes alike. Prints `BENCH mode=M round=R ns=MEAN best=FASTEST_CHUNK`
# lines for xtask/src/vm/bench.rs; then the latency from a module syscall to its JSON line,
# for attempts from a VM process and from a runc container (`BENCH-LAT source=S round=R
# p50=µs p99=µs n=N`).
#   none         no monitor
#   kmodmon      kmodmon tail --json (its best sources on this kernel)
#   kmodmon-raw  kmodmon tail --json --force-raw-syscalls (the raw_syscalls fallback)
#   auditd       auditd with `-a always,exit -F arch=b64 -S init_module,finit_module,delete_module`
. /kmodmon/lib.sh

CALLS=${KMODMON_BENCH_CALLS:-500000}
ROUNDS=${KMODMON_BENCH_ROUNDS:-7}

measure() { # MODE ROUND
    local r
    r=$(kmodmon-vm-bench "$CALLS")
    echo "BENCH mode=$1 round=$2 ns=${r% *} best=${r#* }"
}

monitor_kmodmon() { # MODE ROUND [ARGS...]
    local mode=$1 round=$2
    shift 2
    rm -f "$OUT/bench-tail.err"
    kmodmon tail --json "$@" >/dev/null 2>"$OUT/bench-tail.err" &
    local pid=$! i=0
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
    # Steady state: let kmodmon finish its start-up work (module and container scans).
    sleep 1
    local before after
    before=$(cpu_ticks "$pid")
    measure "$mode" "$round"
    after=$(cpu_ticks "$pid")
    echo "BENCH-CPU mode=$mode round=$round ticks=$((after - before))"
    kill -INT "$pid"
    wait "$pid"
}

# utime + stime of a process, in clock ticks (/proc/PID/stat fields 14 and 15).
cpu_ticks() { # PID
    sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}

audit_rule() { # ROUND
    auditctl -a always,exit -F arch=b64 -S init_module,finit_module,delete_module -k modules >/dev/null
    measure auditd "$1"
    auditctl -D >/dev/null
}

run_mode() { # MODE ROUND
    case $1 in
    none) measure none "$2" ;;
    kmodmon) monitor_kmodmon kmodmon "$2" ;;
    kmodmon-raw) monitor_kmodmon kmodmon-raw "$2" --force-raw-syscalls ;;
    auditd) [ "$AUDIT" != no ] && audit_rule "$2" ;;
    esac
}

AUDIT=no
mkdir -p /var/log/audit /etc/audit/plugins.d
if auditd 2>"$OUT/auditd.err"; then
    usleep 500000
    AUDIT=auditd
elif auditctl -e 1 >/dev/null 2>&1; then
    AUDIT=auditctl
    echo "BENCH-INFO mode=auditd auditd did not start ($(head -c 200 "$OUT/auditd.err")); rule loaded with auditctl alone, records go to the kernel log"
fi

kmodmon-vm-bench 100000 >/dev/null # warm-up
MODES="none kmodmon kmodmon-raw auditd"
for round in $(seq 1 "$ROUNDS"); do
    # Rotate the order each round so no mode always follows the same one.
    set -- $MODES
    shift $(((round - 1) % 4))
    for mode in "$@" $MODES; do
        case " $done_modes " in *" $mode "*) continue ;; esac
        done_modes="$done_modes $mode"
        run_mode "$mode" "$round"
    done
    done_modes=
done
echo "BENCH-INFO calls=$CALLS rounds=$ROUNDS audit=$AUDIT"

# Latency: paced delete_module attempts (a name each) while `tail --json` runs, read by
# `kmodmon-vm-bench latency`, which timestamps each line as it arrives.
LAT_N=${KMODMON_BENCH_LAT_N:-400}
latency_round() { # SOURCE ROUND
    local prefix="kmodmon_lat_$1_$2" i=0 pid
    rm -f "$OUT/lat.err" "$OUT/lat.out"
    (kmodmon tail --json 2>"$OUT/lat.err" | kmodmon-vm-bench latency "$prefix" >"$OUT/lat.out") &
    while ! grep -q '^kmodmon: attached' "$OUT/lat.err" 2>/dev/null; do
        i=$((i + 1))
        if [ "$i" -gt 1200 ]; then
            echo "BENCH-ERROR latency: kmodmon did not attach: $(head -c 300 "$OUT/lat.err")"
            return 0
        fi
        usleep 100000
    done
    case $1 in
    host) kmodmon-vm-bench paced "$LAT_N" 2000 "$prefix" >/dev/null ;;
    runc) runc exec latbench kmodmon-vm-bench paced "$LAT_N" 2000 "$prefix" >/dev/null ;;
    esac
    sleep 1
    pid=$(pidof kmodmon)
    [ -n "$pid" ] && kill -INT $pid
    wait
    echo "BENCH-LAT source=$1 round=$2 $(cat "$OUT/lat.out")"
}
LAT_CTR=no
if ctr_start latbench "/docker/$(printf 'b%.0s' $(seq 64))" "" >/dev/null 2>&1; then
    LAT_CTR=yes
else
    echo "BENCH-ERROR latency: runc container did not start: $(head -c 300 "$OUT/ctr.latbench.log")"
fi
for round in $(seq 1 "${KMODMON_BENCH_LAT_ROUNDS:-3}"); do
    latency_round host "$round"
    [ "$LAT_CTR" = yes ] && latency_round runc "$round"
done
[ "$LAT_CTR" = yes ] && runc delete -f latbench >/dev/null 2>&1
