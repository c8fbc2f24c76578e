# Loads on behalf of a container (issue 13): `cargo xtask vm-run --kernel 6.1 tests/vm/hooks.sh`;
# `vm-test` runs it on every kernel. Self-checking: it records what kmodmon printed, checks it
# and exits 1 naming every check that failed.
#
# A prestart hook does what isulad-hooks does: it reads the container's state (id, pid,
# bundle) on its stdin, reads KERNEL_MODULES from the bundle's config.json and runs kmod's
# modprobe for each, on the host, as a child of `runc run` / `crun run` and in its cgroup.
#   A  runc, /isulad/<id>, KERNEL_MODULES=ip_vs,ip_vs_wrr: every load is `expected`,
#      `on_behalf_of` A (dependencies too);
#   B  runc, /docker/<id>, KERNEL_MODULES=ip_vs, its hook also loads dummy: `unexpected`;
#   C  crun, /isulad/<id>, KERNEL_MODULES=veth: `expected`, on behalf of C through crun;
#   D  a running runc container (KERNEL_MODULES=bridge) and `runc exec D modprobe ...`: its
#      own cgroup names it (`container`), bridge is `expected`, ip_vs_sh `unexpected`.
. /kmodmon/lib.sh
trap vm_finish EXIT

FAILS=0
ok() { echo "hooks: ok: $*"; }
fail() {
    echo "hooks: FAIL: $*"
    FAILS=$((FAILS + 1))
}
# event KIND MODULE PATTERN...: a line of events.jsonl of that kind and module holding every
# PATTERN (fixed strings).
event() {
    local lines p
    lines=$(grep -F "\"kind\":\"$1\"" "$OUT/events.jsonl" | grep -F "\"module\":\"$2\"")
    shift 2
    for p in "$@"; do
        lines=$(printf '%s\n' "$lines" | grep -F -- "$p")
    done
    [ -n "$lines" ]
}
want() { # WHAT KIND MODULE PATTERN...
    local what=$1
    shift
    if event "$@"; then ok "$what"; else fail "$what (no $1 event of $2 with: $(shift 2; echo "$*"))"; fi
}
loaded() { grep -q "^$1 " /proc/modules; }

HOOK=/tmp/hooks/load-declared.sh
mkdir -p /tmp/hooks
cat >"$HOOK" <<'EOF_HOOK'
#!/bin/sh
state=$(cat)
bundle=$(printf '%s' "$state" | sed -n 's/.*"bundle": *"\([^"]*\)".*/\1/p')
mods=$(grep -o 'KERNEL_MODULES=[^"]*' "$bundle/config.json" | head -n 1 | cut -d= -f2 | tr ',' ' ')
for m in $mods $EXTRA; do
    /usr/sbin/modprobe "$m" || exit 1
done
EOF_HOOK
chmod +x "$HOOK"

# with_hook NAME [EXTRA]: the prestart hook in /tmp/ctr/NAME/config.json (EXTRA: one more
# module the hook loads).
with_hook() {
    local env=
    [ -n "$2" ] && env=", \"env\": [\"EXTRA=$2\"]"
    sed -i "1a\\  \"hooks\": {\"prestart\": [{\"path\": \"$HOOK\"$env}]}," "/tmp/ctr/$1/config.json"
}

A=$(ctr_id hook-a)
B=$(ctr_id hook-b)
C=$(ctr_id hook-c)
D=$(ctr_id exec-d)
kmodmon_start || exit 1

CTR_ENV="KERNEL_MODULES=ip_vs,ip_vs_wrr" ctr_config hook-a "/isulad/$A" "" sleep 2
with_hook hook-a
step run_a runc run --no-pivot -d -b /tmp/ctr/hook-a hook-a

CTR_ENV="KERNEL_MODULES=ip_vs" ctr_config hook-b "/docker/$B" "" sleep 2
with_hook hook-b dummy
step run_b runc run --no-pivot -d -b /tmp/ctr/hook-b hook-b

CTR_ENV="KERNEL_MODULES=veth" ctr_config hook-c "/isulad/$C" "" sleep 2
with_hook hook-c
step run_c crun run --no-pivot -d -b /tmp/ctr/hook-c hook-c

CTR_ENV="KERNEL_MODULES=bridge" ctr_start exec-d "/docker/$D" "SYS_MODULE" || fail "container exec-d did not start"
step exec_bridge ctr_exec exec-d modprobe bridge
step exec_ip_vs_sh ctr_exec exec-d modprobe ip_vs_sh
snapshot after
kmodmon_stop
for c in hook-a hook-b exec-d; do ctr_stop "$c"; done
crun kill hook-c KILL 2>/dev/null
crun delete -f hook-c 2>/dev/null

for s in run_a run_b run_c exec_bridge exec_ip_vs_sh; do
    if grep -q "^rc.$s=0$" "$OUT/facts.txt"; then ok "step $s"; else fail "step $s: $(grep "^rc.$s=" "$OUT/facts.txt")"; fi
done
for m in ip_vs ip_vs_wrr dummy veth bridge ip_vs_sh; do
    if loaded "$m"; then ok "$m is loaded"; else fail "$m is not loaded"; fi
done

# The hooks' loads: the host's process (modprobe <- the hook's sh <- runc/crun run), on
# behalf of the container, judged against its declaration.
behalf() { # ID
    echo "\"on_behalf_of\":{\"container\":{\"id\":\"$1\""
}
for m in ip_vs_wrr ip_vs; do
    want "A's hook loaded $m, expected, on behalf of A" load "$m" '"container":null' \
        '"verdict":"expected"' "$(behalf "$A")" '"runtime":"isulad","name":"hook-a"' \
        '"how":"runtime_cmdline","program":"runc"' '"command":"run","depth":2' \
        '"bundle":"/tmp/ctr/hook-a"'
done
# Dependencies modprobe loaded along (modules.dep), judged for A too.
for dep in $(sed -n "s|.*/ip_vs.ko[^:]*: *||p" "/lib/modules/$KVER/modules.dep" | head -n 1); do
    m=$(basename "$dep" | sed 's/\.ko.*//; s/-/_/g')
    want "A's hook loaded dependency $m, expected" load "$m" '"verdict":"expected"' "$(behalf "$A")"
done
want "B's hook loaded dummy, unexpected, on behalf of B" load dummy '"verdict":"unexpected"' \
    "$(behalf "$B")" '"runtime":"docker","name":"hook-b"' '"program":"runc"' '"command":"run"'
if event load dummy '"detail":"not in KERNEL_MODULES=ip_vs'; then ok "B: the detail names its declaration"; else fail "B: no detail naming KERNEL_MODULES=ip_vs"; fi
want "C's hook loaded veth through crun, expected" load veth '"verdict":"expected"' \
    "$(behalf "$C")" '"runtime":"isulad","name":"hook-c"' '"program":"crun"' \
    '"command":"run","depth":2'
want "C's load attempt too" load_attempt veth "$(behalf "$C")" '"verdict":"expected"'
# runc exec: the process joined D's cgroup, which names D.
want "runc exec D modprobe bridge: D's, expected" load bridge "\"container\":{\"id\":\"$D\"" '"verdict":"expected"'
want "runc exec D modprobe ip_vs_sh: D's, unexpected" load ip_vs_sh "\"container\":{\"id\":\"$D\"" '"verdict":"unexpected"'
if grep -F '"module":"bridge"' "$OUT/events.jsonl" | grep -qF '"on_behalf_of"'; then
    fail "an exec'd process in its container's cgroup is the container's own, not on behalf of it"
else
    ok "the exec'd loads carry no on_behalf_of"
fi
# Nothing else claims to be on behalf of a container.
n=$(grep -c '"on_behalf_of"' "$OUT/events.jsonl")
m=$(grep -F '"on_behalf_of"' "$OUT/events.jsonl" | grep -cF -e "\"id\":\"$A\"" -e "\"id\":\"$B\"" -e "\"id\":\"$C\"")
if [ "$n" -gt 0 ] && [ "$n" = "$m" ]; then ok "$n events on behalf of A, B or C"; else fail "$n on_behalf_of events, $m for A, B or C"; fi

vm_export "$OUT/facts.txt"
echo "hooks: $FAILS failed"
[ "$FAILS" -eq 0 ]
