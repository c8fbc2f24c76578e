# `cargo xtask vm-bench`: the cost of module monitoring for an unrelated syscall (getppid),
# paired in one boot: each round measures every mode in turn, so slow phases of the host
# hit all modes alike. Prints `BENCH mode=M round=R ns=N` lines for xtask/src/vm/bench.rs.
#   none         no monitor
#   kmodmon      kmodmon tail --json (its best sources on this kernel)
#   kmodmon-raw  kmodmon tail --json --force-raw-syscalls (the raw_syscalls fallback)
#   auditd       auditd with `-a always,exit -F arch=b64 -S init_module,finit_module,delete_module`
. /kmodmon/lib.sh

CALLS=${KMODMON_BENCH_CALLS:-500000}
ROUNDS=${KMODMON_BENCH_ROUNDS:-5}

measure() { # MODE ROUND
    echo "BENCH mode=$1 round=$2 ns=$(kmodmon-vm-bench "$CALLS")"
}

monitor_kmodmon() { # MODE ROUND [ARGS...]
    local mode=$1 round=$2
    shift 2
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
    measure "$mode" "$round"
    kill -INT "$pid"
    wait "$pid"
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
for round in $(seq 1 "$ROUNDS"); do
    measure none "$round"
    monitor_kmodmon kmodmon "$round"
    monitor_kmodmon kmodmon-raw "$round" --force-raw-syscalls
    if [ "$AUDIT" != no ]; then
        auditctl -a always,exit -F arch=b64 -S init_module,finit_module,delete_module -k modules >/dev/null
        measure auditd "$round"
        auditctl -D >/dev/null
    fi
done
echo "BENCH-INFO calls=$CALLS rounds=$ROUNDS audit=$AUDIT"
