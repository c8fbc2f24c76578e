# Enforcement from a container's first instruction (issue 14, "the first second is free"):
# `cargo xtask vm-run --kernel 6.1 tests/vm/enforce-new.sh`; `vm-test` runs it on every kernel.
# Self-checking (exit code).
#
# Runc containers whose entrypoint (their first and only process) is `modprobe dummy`, with
# CAP_SYS_MODULE, created while kmodmon enforces and `[unselected]` allows nothing: under
# /docker/<id> (a container parent), as a systemd-driver scope /system.slice/docker-<id>.scope
# and as LXC's /lxc.payload.<name> (container names), and under a parent the policy names
# (/ci/runners). Each must fail and dummy stay unloaded, also while kmodmon is down (SIGKILL).
# A container nested in a restricted one never gets more than it. The host loads anything.
# A plain `runc run NAME` (cgroup /NAME) is recorded, not judged: nothing in its cgroup says
# "container", so until the registry reads its runtime state it is the host's (README).
. /kmodmon/lib.sh
trap 'enf_stop; vm_finish' EXIT

POLICY=/tmp/policy.toml
INNER_ID=$(ctr_id inner)
cat >"$POLICY" <<EOF
mode = "enforce"
container_parents = ["/ci/runners"]

[unselected]
allow = []

[[rule]]
name = "inner"
container_id = "$INNER_ID"
allow = ["veth"]

[[rule]]
name = "strict"
container_name = "strict"
allow = []
EOF
refused_without_bpf_lsm "$POLICY"

mkdir -p /sys/fs/cgroup/ci
enf_start "$POLICY" 1 || exit 1
kmodmon enforce status >"$OUT/status.txt" 2>&1
cat "$OUT/status.txt"

for i in 1 2 3; do
    ctr_run "entry$i" "/docker/$(ctr_id entry$i)" "SYS_MODULE" modprobe dummy
    loaded dummy "entry$i"
done
ctr_run scope "/system.slice/docker-$(ctr_id scope).scope" "SYS_MODULE" modprobe dummy
loaded dummy scope
ctr_run lxc "/lxc.payload.web" "SYS_MODULE" modprobe dummy
loaded dummy lxc
ctr_run runner "/ci/runners/job-1" "SYS_MODULE" modprobe dummy
loaded dummy runner

# A container inside a restricted one: the outer ("strict") allows nothing; rule "inner"
# would allow the inner one veth; it gets at most what the outer allows.
OUTER=$(ctr_id strict)
ctr_start strict "/docker/$OUTER" "SYS_MODULE" || exit 1
INNER="/docker/$OUTER/docker/$INNER_ID"
mkdir -p "/sys/fs/cgroup$INNER"
sleep 2
step nested in_cgroup "$INNER" modprobe veth
loaded veth nested
ctr_stop strict

# The host loads anything.
step host modprobe dummy
loaded dummy host
step host_unload modprobe -r dummy

# kmodmon down: the pinned programs still restrict a container that appears now.
enf_stop KILL
ctr_run down "/docker/$(ctr_id down)" "SYS_MODULE" modprobe dummy
loaded dummy down

# Plain runc (/NAME): recorded only (not guaranteed, see README).
enf_start "$POLICY" 2 || exit 1
ctr_run plain "/plain" "SYS_MODULE" modprobe dummy
loaded dummy plain
[ "$(grep -c '^dummy ' /proc/modules)" -gt 0 ] && modprobe -r dummy
enf_stop

echo "=== facts"
cat "$OUT/facts.txt"
echo "=== enforce.err"
cat "$OUT/enforce.err"
echo "=== enforce.jsonl (denied)"
grep '"kind":"denied"' "$OUT/enforce.jsonl" | cut -c1-600

echo "=== checks"
for c in entry1 entry2 entry3 scope lxc runner down; do
    want_nonzero "rc.entry.$c"
    want "loaded.dummy.$c" 0
done
want_nonzero rc.nested
want loaded.veth.nested 0
want rc.host 0
want loaded.dummy.host 1
want_line status.txt "container parents: [0-9]+" "status counts the container parents"
# Each entrypoint's denial is in the record, decided in the kernel by its parent or name
# (or by its own entry if kmodmon mapped it first: [unselected] too).
want_line enforce.jsonl '"kind":"denied".*"module":"dummy".*"decided_by":"(container_parent|own_entry)"' \
    "a denied entrypoint load is decided by its container parent (or its own entry)"
want_line enforce.jsonl '"kind":"denied".*"module":"dummy".*"cgroup_path":"/system.slice/docker-[0-9a-f]{64}.scope"' \
    "the systemd-driver scope's entrypoint was denied and reported"
want_line enforce.jsonl '"kind":"denied".*"module":"dummy".*"cgroup_path":"/lxc.payload.web"' \
    "the LXC payload's entrypoint was denied and reported"
want_line enforce.jsonl '"kind":"denied".*"module":"dummy".*"cgroup_path":"/ci/runners/job-1"' \
    "the policy-named parent's container was denied and reported"
want_line enforce.jsonl '"kind":"denied".*"module":"veth".*"cgroup_path":"/docker/[0-9a-f]{64}/docker/[0-9a-f]{64}".*"rule_id":2,.*"decided_by":"own_entry"' \
    "the nested container's veth load was denied by its own entry (rule \"inner\", capped by its container)"
echo "plain runc /plain: entrypoint rc $(sed -n 's/^rc.entry.plain=//p' "$OUT/facts.txt"), dummy loaded: $(sed -n 's/^loaded.dummy.plain=//p' "$OUT/facts.txt") (recorded, not judged)"
checks_done
