# cgroup v1 (issue 13): `cargo xtask vm-run --kernel 6.1 tests/vm/cgroup-v1.sh`; `vm-test` runs
# it on every kernel. Self-checking: exits 1 naming every check that failed.
#
# The VM is switched to a v1-only ("legacy") layout: cgroup2's controllers disabled and
# unmounted, a tmpfs on /sys/fs/cgroup with one v1 hierarchy per controller (Debian's 6.12
# has no memory or cpuset v1: those mounts fail there and kmodmon follows the next
# controller). Every task then sits in the cgroup2 root. A runc container under
# /isulad/<id> declaring KERNEL_MODULES=dummy runs `modprobe dummy`; `runc exec` into it
# loads veth. Checked: `kmodmon sources` names the v1 hierarchy; both loads carry the
# container and the v1 cgroup (`dummy` expected, `veth` unexpected); a host load is `host`
# with its v1 cgroup; `kmodmon enforce on` refuses, installing nothing.
. /kmodmon/lib.sh
trap vm_finish EXIT

FAILS=0
ok() { echo "cgroup-v1: ok: $*"; }
fail() {
    echo "cgroup-v1: FAIL: $*"
    FAILS=$((FAILS + 1))
}
event() { # KIND MODULE PATTERN...
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

for c in $(cat /sys/fs/cgroup/cgroup.subtree_control); do
    echo "-$c" >/sys/fs/cgroup/cgroup.subtree_control
done
umount /sys/fs/cgroup || { fail "cannot unmount cgroup2"; exit 1; }
mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
for c in cpu,cpuacct memory pids devices freezer blkio cpuset; do
    mkdir -p "/sys/fs/cgroup/$c"
    if mount -t cgroup -o "$c" cgroup "/sys/fs/cgroup/$c"; then
        fact "v1.$c" mounted
    else
        rmdir "/sys/fs/cgroup/$c"
        fact "v1.$c" unavailable
    fi
done
cat /proc/cgroups
cp /proc/cgroups "$OUT/proc-cgroups.txt"

ID=$(ctr_id v1-ctr)
kmodmon_start || exit 1
# The hierarchy kmodmon follows, as `kmodmon sources` says it.
CTRL=$(sed -n 's/^cgroups: legacy (cgroup v1 only) layout; cgroup v1 hierarchy [0-9]* (\([a-z_]*\)) at .*/\1/p' "$OUT/sources.txt")
HIER=$(sed -n 's/^cgroups: legacy (cgroup v1 only) layout; cgroup v1 hierarchy \([0-9]*\) .*/\1/p' "$OUT/sources.txt")
fact v1.controller "$CTRL"
fact v1.hierarchy "$HIER"
if [ -n "$CTRL" ] && [ "$(awk -v c="$CTRL" '$1 == c {print $2}' /proc/cgroups)" = "$HIER" ]; then
    ok "kmodmon sources follows $CTRL, hierarchy $HIER (as /proc/cgroups says)"
else
    fail "kmodmon sources names no v1 hierarchy matching /proc/cgroups: $(cat "$OUT/sources.txt")"
fi
if head -n 1 "$OUT/sources.txt" | grep -q "+ cgroup v1 hierarchy $HIER ($CTRL)\(;\|$\)"; then
    ok "tail attached the v1 hierarchy"
else
    fail "first line of sources: $(head -n 1 "$OUT/sources.txt")"
fi

CTR_ENV="KERNEL_MODULES=dummy" ctr_config v1-ctr "/isulad/$ID" "SYS_MODULE" \
    /bin/sh -c "/usr/sbin/modprobe dummy; sleep 30"
step run runc run --no-pivot -d -b /tmp/ctr/v1-ctr v1-ctr
usleep 500000
PID=$(runc state v1-ctr | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p')
cat "/proc/$PID/cgroup" >"$OUT/ctr-cgroup.txt"
cat "$OUT/ctr-cgroup.txt"
V1ID=$(stat -c %i "/sys/fs/cgroup/$CTRL/isulad/$ID")
fact v1.ctr_id "$V1ID"
step exec_veth ctr_exec v1-ctr /usr/sbin/modprobe veth
step host_bridge modprobe bridge
usleep 500000
kmodmon_stop

if grep -q "^0::/$" "$OUT/ctr-cgroup.txt" && grep -q ":/isulad/$ID$" "$OUT/ctr-cgroup.txt"; then
    ok "the container is in the cgroup2 root and in /isulad/<id> in v1"
else
    fail "the container's cgroups: $(tr '\n' ' ' <"$OUT/ctr-cgroup.txt")"
fi
for s in run exec_veth host_bridge; do
    if grep -q "^rc.$s=0$" "$OUT/facts.txt"; then ok "step $s"; else fail "step $s: $(grep "^rc.$s=" "$OUT/facts.txt")"; fi
done
V1="\"cgroup_v1\":{\"hierarchy\":$HIER,\"controller\":\"$CTRL\",\"id\":$V1ID,\"path\":\"/isulad/$ID\"}"
CTR="\"container\":{\"id\":\"$ID\",\"runtime\":\"isulad\",\"name\":\"v1-ctr\"}"
want "modprobe dummy in the container: attributed by its v1 cgroup, expected" load dummy \
    '"cgroup_id":1' "$CTR" '"verdict":"expected"' "$V1"
want "its load attempt too" load_attempt dummy "$CTR" '"verdict":"expected"' "$V1"
want "runc exec modprobe veth: the container's, unexpected" load veth "$CTR" '"verdict":"unexpected"' "$V1"
want "the host's modprobe bridge: host, with its v1 cgroup (the root)" load bridge '"container":null' \
    '"verdict":"host"' "\"controller\":\"$CTRL\"" '"path":"/"}'

# Enforcement cannot tell v1 containers apart yet: it refuses and installs nothing.
printf 'mode = "enforce"\n' >/tmp/policy.toml
kmodmon enforce on --policy /tmp/policy.toml >"$OUT/enforce.out" 2>"$OUT/enforce.err"
fact rc.enforce "$?"
cat "$OUT/enforce.err"
if grep -q "^rc.enforce=2$" "$OUT/facts.txt"; then ok "enforce on exits 2"; else fail "enforce on: $(grep '^rc.enforce=' "$OUT/facts.txt")"; fi
if grep -q "only cgroup v1" "$OUT/enforce.err" && grep -q "nothing was installed" "$OUT/enforce.err"; then
    ok "the refusal says why"
else
    fail "the refusal: $(cat "$OUT/enforce.err")"
fi
if [ -e /sys/fs/bpf/kmodmon ]; then fail "pins left under /sys/fs/bpf/kmodmon"; else ok "nothing pinned"; fi

ctr_stop v1-ctr
vm_export "$OUT/facts.txt"
echo "cgroup-v1: $FAILS failed"
[ "$FAILS" -eq 0 ]
