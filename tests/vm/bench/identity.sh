# Load latency with and without module identity, side by side:
#   cargo xtask vm-run --kernel 6.1 tests/vm/bench/identity.sh
# Configurations, interleaved round by round: no kmodmon; `kmodmon run --no-identity`;
# `kmodmon run` (identity on). Each round loads and unloads kmt_plain (small) and kmt_big
# (10 MB) with finit_module (kmt-load bench: the syscall's own duration, CLOCK_MONOTONIC).
# Prints, per configuration and module, the median with min-max over every load.
. /kmodmon/lib.sh
D=/usr/lib/kmodmon-test/$KVER
ROUNDS=${ROUNDS:-5}
SMALL=${SMALL:-10}
BIG=${BIG:-3}
R=/tmp/bench
mkdir -p $R
cp "$D"/kmt_plain.ko "$D"/kmt_big.ko /tmp/
PID=
start() { # ARGS...
    : >$R/run.err
    kmodmon run "$@" >/dev/null 2>$R/run.err &
    PID=$!
    while ! grep -q 'started; attached' $R/run.err; do
        kill -0 $PID 2>/dev/null || { cat $R/run.err; exit 1; }
        usleep 100000
    done
}
stop() { [ -n "$PID" ] && kill -INT $PID && wait $PID; PID=; }
for r in $(seq 1 $ROUNDS); do
    for cfg in none noid id; do
        case $cfg in
        noid) start --no-identity ;;
        id) start ;;
        esac
        kmt-load bench finit /tmp/kmt_plain.ko kmt_plain $SMALL >>$R/$cfg.small || exit 1
        kmt-load bench finit /tmp/kmt_big.ko kmt_big $BIG >>$R/$cfg.big || exit 1
        stop
    done
    echo "round $r done"
done
stat() { # FILE -> median min max (ms)
    sort -n "$1" | awk '{v[NR]=$1} END {m=(NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2; printf "%.2f ms (%.2f-%.2f, n=%d)", m/1e6, v[1]/1e6, v[NR]/1e6, NR}'
}
echo "kernel $KVER, $(nproc) CPU, QEMU TCG; finit_module latency, median (min-max)"
for m in small big; do
    for cfg in none noid id; do
        echo "RESULT $m $cfg $(stat $R/$cfg.$m)"
    done
done
