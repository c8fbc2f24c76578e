# Enforcement (BPF LSM): `cargo xtask vm-run --kernel 6.1 tests/vm/enforce.sh`; `vm-test` runs
# it on every kernel. Self-checking: it records facts, prints a summary, checks the facts and
# exits 1 naming every check that failed. Where the BPF LSM is not active, `enforce on` must
# refuse with the boot parameter to add and leave nothing pinned.
#
# A runc container "lb" (cgroup /docker/<id>) declares KERNEL_MODULES=ip_vs,ip_vs_wrr under a
# rule that trusts it. The host preloads the shared dependencies (nf_conntrack ...), so the
# container's modprobe needs exactly ip_vs and ip_vs_wrr. Recorded: allowed loads, a denied
# load and a denied autoload from the container, the host loading anything, audit mode,
# SIGHUP with a malformed policy, SIGKILL of kmodmon, adoption, `enforce off`.
. /kmodmon/lib.sh
trap 'enf_stop; vm_finish' EXIT

POLICY=/tmp/policy.toml
write_policy() { # MODE
    cat >"$POLICY" <<EOF
mode = "$1"

[[rule]]
name = "lb"
container_name = "lb"
trust_kernel_modules = true
EOF
}

EPID=
enf_start() { # NAME
    kmodmon enforce on --policy "$POLICY" --foreground >>"$OUT/enforce.jsonl" 2>>"$OUT/enforce.err" &
    EPID=$!
    local i=0
    while ! grep -q '^enforcement on' "$OUT/enforce.jsonl" 2>/dev/null || [ "$(grep -c '^enforcement on' "$OUT/enforce.jsonl")" -lt "$1" ]; do
        i=$((i + 1))
        if [ "$i" -gt 600 ] || ! kill -0 "$EPID" 2>/dev/null; then
            log "kmodmon enforce on did not start:"
            cat "$OUT/enforce.err"
            return 1
        fi
        usleep 100000
    done
    grep '^enforcement on' "$OUT/enforce.jsonl" | tail -1
}
enf_stop() {
    [ -n "$EPID" ] && kill -INT "$EPID" 2>/dev/null && wait "$EPID"
    EPID=
}
loaded() { # MODULE -> fact loaded.NAME.TAG
    if grep -q "^$1 " /proc/modules; then fact "loaded.$1.$2" 1; else fact "loaded.$1.$2" 0; fi
}

FAILS=0
want() { # FACT VALUE: the recorded fact must have this value
    local got
    got=$(sed -n "s/^$1=//p" "$OUT/facts.txt" | tail -1)
    if [ "$got" = "$2" ]; then echo "enforce: ok: $1=$2"; else
        echo "enforce: FAIL: $1 is '$got', want '$2'"
        FAILS=$((FAILS + 1))
    fi
}
want_nonzero() { # FACT
    local got
    got=$(sed -n "s/^$1=//p" "$OUT/facts.txt" | tail -1)
    if [ -n "$got" ] && [ "$got" != 0 ]; then echo "enforce: ok: $1=$got (failed, as it must)"; else
        echo "enforce: FAIL: $1 is '$got', want a failure"
        FAILS=$((FAILS + 1))
    fi
}
want_line() { # FILE PATTERN WHAT
    if grep -q -- "$2" "$OUT/$1"; then echo "enforce: ok: $3"; else
        echo "enforce: FAIL: $3 (no '$2' in $1)"
        FAILS=$((FAILS + 1))
    fi
}

if ! grep -qw bpf /sys/kernel/security/lsm; then
    write_policy enforce
    kmodmon enforce on --policy "$POLICY" >"$OUT/refused.out" 2>"$OUT/refused.err"
    fact rc.refused "$?"
    cat "$OUT/refused.err"
    want rc.refused 2
    want_line refused.err "lsm=" "the refusal names the boot parameter to add"
    [ ! -e /sys/fs/bpf/kmodmon/links ] && echo "enforce: ok: nothing pinned" || {
        echo "enforce: FAIL: pins left behind"
        FAILS=$((FAILS + 1))
    }
    [ "$FAILS" -eq 0 ] || exit 1
    echo "enforce: BPF LSM not active: refused as it must be"
    exit 0
fi

step preload_host modprobe nf_conntrack
step preload_iptables modprobe ip_tables
ID=$(ctr_id lb)
fact ctr.lb.id "$ID"
CTR_ENV="KERNEL_MODULES=ip_vs,ip_vs_wrr" ctr_start lb "/docker/$ID" "SYS_MODULE NET_ADMIN" || exit 1

write_policy enforce
step policy_check kmodmon policy check "$POLICY"
kmodmon policy show "$POLICY" >"$OUT/policy_show.txt" 2>&1
cat "$OUT/policy_show.txt"
enf_start 1 || exit 1
kmodmon enforce status >"$OUT/status.1.txt" 2>&1

# Allowed by the trusted declaration.
step ctr_allowed ctr_exec lb modprobe ip_vs_wrr
loaded ip_vs_wrr after_allowed
# Not declared: denied.
step ctr_denied ctr_exec lb modprobe dummy
loaded dummy after_denied
# An autoload the container triggers (nat table → iptable_nat) is denied too.
step ctr_autoload ctr_exec lb iptables-legacy -t nat -L -n
loaded iptable_nat after_autoload
# The host loads anything.
step host_load modprobe veth
loaded veth after_host

# Audit mode through SIGHUP: the same load is reported as would_deny and succeeds.
write_policy audit
kill -HUP "$EPID"
sleep 1
step ctr_audit ctr_exec lb modprobe dummy
loaded dummy after_audit
step ctr_audit_unload modprobe -r dummy

# Back to enforce, then a malformed policy on SIGHUP: rejected, enforce stays in force.
write_policy enforce
kill -HUP "$EPID"
sleep 1
echo 'mode = "enforce"
[[rule]]
nme = "broken"' >"$POLICY"
kill -HUP "$EPID"
sleep 1
step ctr_after_bad_reload ctr_exec lb modprobe dummy
loaded dummy after_bad_reload

# SIGKILL: the pins keep denying.
kill -KILL "$EPID"
wait "$EPID" 2>/dev/null
EPID=
kmodmon enforce status >"$OUT/status.killed.txt" 2>&1
step ctr_after_kill ctr_exec lb modprobe dummy
loaded dummy after_kill

# Restart: adopted, no duplicate programs.
write_policy enforce
enf_start 2 || exit 1
kmodmon enforce status >"$OUT/status.adopted.txt" 2>&1
enf_stop

# Upgrade: --replace swaps in this binary's programs; the old ones go with their links.
step enforce_replace kmodmon enforce on --policy "$POLICY" --replace
kmodmon enforce status >"$OUT/status.replaced.txt" 2>&1
step ctr_after_replace ctr_exec lb modprobe dummy
loaded dummy after_replace

# Off: pins removed, the load succeeds.
step enforce_off kmodmon enforce off
kmodmon enforce status >"$OUT/status.off.txt" 2>&1
step ctr_after_off ctr_exec lb modprobe dummy
loaded dummy after_off
ctr_stop lb

echo "=== facts"
cat "$OUT/facts.txt"
for f in status.1 status.killed status.adopted status.replaced status.off; do
    echo "=== $f"
    cat "$OUT/$f.txt"
done
echo "=== enforce.err"
cat "$OUT/enforce.err"
echo "=== enforce.jsonl"
cat "$OUT/enforce.jsonl"

echo "=== checks"
want rc.policy_check 0
want rc.ctr_allowed 0
want loaded.ip_vs_wrr.after_allowed 1
want_nonzero rc.ctr_denied
want loaded.dummy.after_denied 0
want_nonzero rc.ctr_autoload
want loaded.iptable_nat.after_autoload 0
want loaded.veth.after_host 1
want rc.ctr_audit 0
want loaded.dummy.after_audit 1
want loaded.dummy.after_bad_reload 0
want loaded.dummy.after_kill 0
want rc.enforce_replace 0
want loaded.dummy.after_replace 0
want rc.enforce_off 0
want rc.ctr_after_off 0
want loaded.dummy.after_off 1
want_line enforce.jsonl '"kind":"denied".*"module":"dummy"' "a denied event names dummy"
want_line enforce.jsonl '"kind":"would_deny".*"module":"dummy"' "audit mode reports would_deny for dummy"
# The record carries the deciding rule (rule "lb" is id 2) and the policy generation; the
# event names the rule from that id.
want_line enforce.jsonl '"kind":"denied".*"module":"dummy".*"rule_id":2,"policy_generation":[0-9]' \
    "the denied record carries rule_id 2 and the policy generation"
want_line enforce.jsonl '"kind":"denied".*"module":"dummy".*"detail":"policy: rule \\"lb\\"' \
    "the denied event names rule \"lb\""
gen_of() { # KIND -> policy_generation of the first KIND event for dummy
    grep "\"kind\":\"$1\".*\"module\":\"dummy\"" "$OUT/enforce.jsonl" | head -1 |
        sed -n 's/.*"policy_generation":\([0-9]*\).*/\1/p'
}
g_denied=$(gen_of denied)
g_audit=$(gen_of would_deny)
if [ -n "$g_denied" ] && [ -n "$g_audit" ] && [ "$g_audit" -gt "$g_denied" ]; then
    echo "enforce: ok: policy generation $g_denied, then $g_audit after the SIGHUP reload"
else
    echo "enforce: FAIL: policy generations '$g_denied' (denied), '$g_audit' (would_deny after reload)"
    FAILS=$((FAILS + 1))
fi
want_line status.1.txt "contract version of the pins: [0-9]* (this kmodmon's)" \
    "the pins are of this kmodmon's contract version"
want_line enforce.err "rejected" "the malformed policy was rejected on SIGHUP"
# Adoption loads nothing twice: as many programs in the kernel as links pinned.
links=$(sed -n 's/^pinned links: \([0-9]*\)\/.*/\1/p' "$OUT/status.adopted.txt")
progs=$(sed -n 's/^kmodmon LSM programs loaded in the kernel: //p' "$OUT/status.adopted.txt")
if [ -n "$links" ] && [ "$links" -gt 0 ] && [ "$links" = "$progs" ]; then
    echo "enforce: ok: adopted, $links links and $progs programs (none twice)"
else
    echo "enforce: FAIL: after adoption $links links but $progs programs"
    FAILS=$((FAILS + 1))
fi
[ "$FAILS" -eq 0 ] || { echo "enforce: $FAILS check(s) failed"; exit 1; }
echo "enforce: all checks passed"
