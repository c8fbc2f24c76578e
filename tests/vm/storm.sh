# Self-checking: attempt storms on a kernel with module support, with kmodmon's cheapest
# attempt source (fexit on 6.x, kprobe + tracefs kretprobe on 5.10) and with the kprobe source
# forced (--no-fexit), and exact accounting:
#   4 threads x 50,000 identical delete_module attempts: seen = 200,000 = delivered +
#     aggregated, nothing dropped, every aggregated attempt in a repeat summary, no kretprobe
#     return missed (the default maxactive of a perf kretprobe misses most of them on 5.10);
#   4 threads x 5,000 distinct names: nothing aggregated, every attempt delivered or counted.
# Exit code: the number of failed checks.
. /kmodmon/lib.sh

FAILED=0
ok() { log "ok: $*"; }
bad() {
    log "FAIL: $*"
    FAILED=$((FAILED + 1))
}
# A top-level number of the JSON summary (serde_json sorts keys: nested names never match
# `"key":` first, see the checks below).
num() { # FILE KEY
    grep -o "\"$2\":[0-9]*" "$1" | head -1 | cut -d: -f2
}

# tail with ARGS while `kmodmon-vm-bench storm THREADS N NAME [distinct]` runs; leaves the
# summary line in $OUT/$LABEL.summary.
storm() { # LABEL "TAIL ARGS" STORM ARGS...
    local label=$1 args=$2 pid i=0
    shift 2
    rm -f "$OUT/$label.err"
    # shellcheck disable=SC2086
    kmodmon tail --json $args >"$OUT/$label.jsonl" 2>"$OUT/$label.err" &
    pid=$!
    while ! grep -q '^kmodmon: attached' "$OUT/$label.err" 2>/dev/null; do
        i=$((i + 1))
        if ! kill -0 "$pid" 2>/dev/null || [ "$i" -gt 1200 ]; then
            bad "$label: kmodmon did not attach: $(head -c 400 "$OUT/$label.err")"
            return 1
        fi
        usleep 100000
    done
    log "$label: $(grep '^kmodmon: attached' "$OUT/$label.err")"
    log "$label: $(kmodmon-vm-bench storm "$@")"
    # The last bursts are reported by the sweep (200 ms) once the threads have exited.
    sleep 1
    kill -INT "$pid"
    wait "$pid"
    grep '^{"summary"' "$OUT/$label.err" >"$OUT/$label.summary"
    vm_export "$OUT/$label.err"
    [ -s "$OUT/$label.summary" ] || {
        bad "$label: no JSON summary"
        return 1
    }
}

identical() { # LABEL "TAIL ARGS" SOURCE
    local label=$1 s seen delivered aggregated dropped repeats unreported
    storm "$label" "$2 --module kmodmon_vm_storm" 4 50000 kmodmon_vm_storm || return
    s=$OUT/$label.summary
    grep -q "attempts: $3 " "$OUT/$label.err" && ok "$label: attempts from $3" ||
        bad "$label: attempts not from $3: $(grep '^kmodmon: attached' "$OUT/$label.err")"
    seen=$(num "$s" seen)
    delivered=$(num "$s" delivered)
    aggregated=$(num "$s" aggregated)
    dropped=$(num "$s" dropped)
    repeats=$(num "$s" repeats)
    unreported=$(num "$s" repeats_unreported)
    log "$label: seen=$seen delivered=$delivered aggregated=$aggregated dropped=$dropped repeats=$repeats unreported=$unreported"
    [ "$seen" = 200000 ] && ok "$label: every attempt seen" || bad "$label: seen $seen of 200000"
    [ "$((delivered + aggregated + dropped))" = "$seen" ] && ok "$label: seen = delivered + aggregated + dropped" ||
        bad "$label: $seen != $delivered + $aggregated + $dropped"
    [ "$dropped" = 0 ] && ok "$label: nothing dropped" || bad "$label: $dropped dropped"
    [ "$repeats" = "$aggregated" ] && [ "$unreported" = 0 ] && ok "$label: every aggregated attempt reported" ||
        bad "$label: repeats $repeats of $aggregated reported"
    grep -q kretprobe_missed "$s" && bad "$label: kretprobe returns missed: $(grep -o '"kretprobe_missed":[0-9]*' "$s")" ||
        ok "$label: no kretprobe return missed"
    # What was printed adds up: events plus the repeats of the summaries.
    local events sum
    events=$(grep -vc '"repeat":' "$OUT/$label.jsonl")
    sum=$(grep -o '"repeat":[0-9]*' "$OUT/$label.jsonl" | cut -d: -f2 | awk '{s += $1} END {print s + 0}')
    [ "$((events + sum))" = 200000 ] && ok "$label: printed $events events + $sum repeats" ||
        bad "$label: printed $events events + $sum repeats"
}

distinct() { # LABEL "TAIL ARGS"
    local label=$1 s seen delivered aggregated dropped inflight unread
    storm "$label" "$2" 4 5000 kmodmon_vm_distinct distinct || return
    s=$OUT/$label.summary
    seen=$(num "$s" seen)
    delivered=$(num "$s" delivered)
    aggregated=$(num "$s" aggregated)
    dropped=$(num "$s" dropped)
    inflight=$(num "$s" in_flight)
    unread=$(num "$s" unread)
    log "$label: seen=$seen delivered=$delivered aggregated=$aggregated dropped=$dropped in_flight=$inflight unread=$unread"
    [ "$seen" = 20000 ] && ok "$label: every attempt seen" || bad "$label: seen $seen of 20000"
    [ "$aggregated" = 0 ] && ok "$label: distinct attempts are not aggregated" || bad "$label: $aggregated aggregated"
    [ "$((delivered + dropped + inflight + unread))" = "$seen" ] && ok "$label: every attempt accounted for" ||
        bad "$label: $seen != $delivered + $dropped + $inflight + $unread"
}

kmodmon sources >"$OUT/sources.txt" 2>&1
vm_export "$OUT/sources.txt"
case $KVER in
5.10.*) BEST=kprobe ;;
*) BEST=fexit ;;
esac
identical best "" "$BEST"
distinct best-distinct ""
# The kprobe source everywhere (on 6.x fexit comes first).
identical kprobe "--no-fexit" kprobe
# No kmodmon kretprobe event is left behind.
if grep -q kmodmon "$TRACING/kprobe_events"; then
    bad "kretprobe events left: $(cat "$TRACING/kprobe_events")"
else
    ok "no kretprobe event left"
fi
log "storm.sh: $FAILED failed check(s)"
exit "$FAILED"
