# Module syscalls refused by seccomp before they ran, on a real kernel with modules:
# `cargo xtask vm-run --kernel 6.1 tests/vm/seccomp.sh`; `vm-test` runs it on every kernel.
# Self-checking: it records facts, checks them and exits 1 naming every check that failed.
#
# runc containers under /docker/<id> with a seccomp profile in their config.json, as Docker's
# default profile has it for the module syscalls (and CAP_SYS_MODULE, so the refusal is
# seccomp's and nothing else's):
#   sce  init_module, finit_module, delete_module → SCMP_ACT_ERRNO (EPERM)
#   sck  the same → SCMP_ACT_KILL_PROCESS
# Four kmodmon tails watch at once: the default sources (fexit on __seccomp_filter, with
# fexit or, where fexit on the syscall functions is refused (5.10), kprobes for attempts),
# `--no-fexit` (kprobes and fexit on __seccomp_filter), `--force-raw-syscalls` (the
# raw sys_exit tracepoint alone: the exit record, arguments from the task's registers; an
# errno refusal is the failed attempt the caller saw, a SIGSYS one is told by the rolled-back
# registers), and
# `--no-seccomp-attempts` (nothing).
. /kmodmon/lib.sh

T2= T3= T4=
finish() {
    [ -n "$T2" ] && kill -INT "$T2" 2>/dev/null && wait "$T2"
    [ -n "$T3" ] && kill -INT "$T3" 2>/dev/null && wait "$T3"
    [ -n "$T4" ] && kill -INT "$T4" 2>/dev/null && wait "$T4"
    ctr_stop sce
    ctr_stop sck
    vm_finish
}
trap finish EXIT

FAILS=0
ok() { echo "seccomp: ok: $*"; }
bad() {
    echo "seccomp: FAIL: $*"
    FAILS=$((FAILS + 1))
}
# The lines of FILE (in $OUT) about MODULE.
lines_for() { # FILE MODULE
    grep "\"module\":\"$2\"" "$OUT/$1"
}
want_count() { # FILE MODULE N
    local n
    n=$(lines_for "$1" "$2" | wc -l)
    if [ "$n" -eq "$3" ]; then ok "$1: $3 event(s) for $2"; else bad "$1: $n events for $2, want $3"; fi
}
want_has() { # FILE MODULE TEXT
    if lines_for "$1" "$2" | grep -qF -- "$3"; then ok "$1: $2 has $3"; else
        bad "$1: $2 lacks $3: $(lines_for "$1" "$2")"
    fi
}
want_lacks() { # FILE MODULE TEXT
    if lines_for "$1" "$2" | grep -qF -- "$3"; then bad "$1: $2 has $3: $(lines_for "$1" "$2")"; else
        ok "$1: $2 has no $3"
    fi
}
tail_start() { # OUTFILE ARGS... -> pid in $TAILPID
    local out=$1 i=0
    shift
    kmodmon tail --json "$@" >"$OUT/$out.jsonl" 2>"$OUT/$out.err" &
    TAILPID=$!
    while ! grep -q '^kmodmon: attached' "$OUT/$out.err" 2>/dev/null; do
        i=$((i + 1))
        if [ "$i" -gt 1200 ] || ! kill -0 "$TAILPID" 2>/dev/null; then
            bad "kmodmon tail $* did not attach: $(cat "$OUT/$out.err")"
            return 1
        fi
        usleep 100000
    done
    log "$out: $(grep '^kmodmon: attached' "$OUT/$out.err")"
}

profile() { # ACTION
    cat <<EOF
{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": [{"names": ["init_module", "finit_module", "delete_module"], "action": "$1", "errnoRet": 1}]}
EOF
}

kmodmon_start || exit 1
tail_start nofexit --no-fexit || exit 1
T2=$TAILPID
tail_start off --no-seccomp-attempts || exit 1
T3=$TAILPID
tail_start raw --force-raw-syscalls || exit 1
T4=$TAILPID
ATTACHED=$(grep '^kmodmon: attached' "$OUT/tail.err")

ID_E=$(ctr_id sce)
ID_K=$(ctr_id sck)
CTR_SECCOMP=$(profile SCMP_ACT_ERRNO)
ctr_start sce "/docker/$ID_E" "SYS_MODULE" || exit 1
CTR_SECCOMP=$(profile SCMP_ACT_KILL_PROCESS)
ctr_start sck "/docker/$ID_K" "SYS_MODULE" || exit 1
CTR_SECCOMP=
grep -q '^Seccomp:[[:space:]]*2' "/proc/$(sed -n 's/^ctr.sce.pid=//p' "$OUT/facts.txt")/status" &&
    ok "the container runs under a seccomp filter" || bad "the container is not under seccomp"

# busybox's rmmod calls delete_module directly (kmod's first looks in /sys/module).
step rm_errno ctr_exec sce busybox rmmod kmsc_errno
step modprobe_errno ctr_exec sce modprobe dummy
step rm_kill ctr_exec sck busybox rmmod kmsc_kill
step rm_host busybox rmmod kmsc_none
grep -q '^dummy ' /proc/modules && fact dummy.loaded 1 || fact dummy.loaded 0
usleep 1500000
kmodmon_stop
kill -INT "$T2" && wait "$T2"
kill -INT "$T3" && wait "$T3"
kill -INT "$T4" && wait "$T4"
T2= T3= T4=

rc() { sed -n "s/^rc.$1=//p" "$OUT/facts.txt" | tail -1; }
[ "$(rc rm_errno)" != 0 ] && ok "rmmod under ERRNO failed" || bad "rmmod under ERRNO succeeded"
[ "$(rc modprobe_errno)" != 0 ] && ok "modprobe under ERRNO failed" || bad "modprobe under ERRNO succeeded"
[ "$(sed -n 's/^dummy.loaded=//p' "$OUT/facts.txt")" = 0 ] && ok "dummy not loaded" || bad "dummy got loaded"
# SIGSYS (31), with or without the core-dump bit, as the shell reports it.
case "$(rc rm_kill)" in 159 | 223) ok "rmmod under KILL_PROCESS died of SIGSYS ($(rc rm_kill))" ;;
*) bad "rmmod under KILL_PROCESS exited $(rc rm_kill)" ;; esac

# Which mechanism the default tail used: fexit kernels need the seccomp filter hook.
case "$ATTACHED" in
*"attempts: fexit"* | *"attempts: kprobe"*)
    WANT_SRC=seccomp
    case "$ATTACHED" in *"seccomp-refused attempts: fexit __seccomp_filter + task exit"*) ok "fexit __seccomp_filter" ;;
    *) bad "fexit or kprobe kernel without the filter hook: $ATTACHED" ;; esac
    ;;
*)
    WANT_SRC=syscall_tracepoint
    case "$ATTACHED" in *"seccomp-refused attempts: syscall exit records + task exit"*) ok "exit records" ;;
    *) bad "unexpected seccomp source: $ATTACHED" ;; esac
    ;;
esac
grep -q "seccomp-refused attempts: fexit __seccomp_filter" "$OUT/nofexit.err" &&
    ok "--no-fexit: the filter hook" || bad "--no-fexit: $(grep attached "$OUT/nofexit.err")"
grep -q "seccomp-refused attempts: syscall exit records" "$OUT/raw.err" && ok "--force-raw-syscalls: exit records" ||
    bad "--force-raw-syscalls: $(grep attached "$OUT/raw.err")"
grep -q "seccomp-refused attempts: off" "$OUT/off.err" && ok "--no-seccomp-attempts: off" ||
    bad "--no-seccomp-attempts: $(grep attached "$OUT/off.err")"

for f in events nofexit raw; do
    want_count $f.jsonl kmsc_errno 1
    want_has $f.jsonl kmsc_errno '"kind":"unload_attempt"'
    want_has $f.jsonl kmsc_errno '"result":-1,"errno":"EPERM"'
    want_has $f.jsonl kmsc_errno "\"id\":\"$ID_E\""
    want_has $f.jsonl kmsc_errno '"runtime":"docker"'
    want_count $f.jsonl kmsc_kill 1
    want_has $f.jsonl kmsc_kill '"blocked_by":"seccomp","signal":"SIGSYS"'
    want_lacks $f.jsonl kmsc_kill '"result"'
    want_has $f.jsonl kmsc_kill "\"id\":\"$ID_K\""
    want_count $f.jsonl kmsc_none 1
    want_lacks $f.jsonl kmsc_none blocked_by
    want_has $f.jsonl kmsc_none '"errno":"ENOENT"'
    n=$(grep '"comm":"modprobe"' "$OUT/$f.jsonl" | grep '"kind":"load_attempt"' | grep -c '"blocked_by":"seccomp","pid"')
    m=$(grep '"comm":"modprobe"' "$OUT/$f.jsonl" | grep '"kind":"load_attempt"' | grep -c '"errno":"EPERM"')
    if [ $f = raw ]; then
        # The exit-only source: an errno refusal cannot be told from the call failing, so it
        # is the failed attempt the caller saw, not called seccomp's (README).
        want_lacks $f.jsonl kmsc_errno blocked_by
        [ "$n" = 0 ] && [ "$m" -ge 1 ] && ok "$f: modprobe's refused loads ($m) reported with EPERM, unclassified" ||
            bad "$f: modprobe's loads: $n refused, $m EPERM: $(grep '"comm":"modprobe"' "$OUT/$f.jsonl")"
        continue
    fi
    want_has $f.jsonl kmsc_errno '"blocked_by":"seccomp"'
    [ "$n" -ge 1 ] && [ "$n" = "$m" ] && ok "$f: modprobe's refused loads ($n) reported with EPERM" ||
        bad "$f: modprobe's loads: $n refused, $m EPERM: $(grep '"comm":"modprobe"' "$OUT/$f.jsonl")"
done
want_has events.jsonl kmsc_errno "\"source\":\"$WANT_SRC\""
want_has nofexit.jsonl kmsc_errno '"source":"seccomp"'
want_has raw.jsonl kmsc_errno '"source":"sys_exit"'
# 6.x: the killed call returns from the filter (rolled back) and is reported there; 5.10
# kills inside the filter: only the task's exit shows it.
grep "\"module\":\"kmsc_kill\"" "$OUT/events.jsonl" | sed -n 's/.*"source":"\([a-z_]*\)".*/kill source: \1/p'
want_count off.jsonl kmsc_errno 0
want_count off.jsonl kmsc_kill 0
want_count off.jsonl kmsc_none 1

echo "seccomp: $FAILS failed check(s)"
[ "$FAILS" = 0 ]
