# kmodmon as the Kubernetes DaemonSet runs it (deploy/kubernetes/kmodmon.yaml), on a real
# kernel: a runc "pod" with the host's PID namespace, a cgroup and mount namespace of its own,
# exactly the DaemonSet's six capabilities (nothing of Docker's default set), its host mounts
# (bpffs read-write, tracefs, securityfs, the host cgroup tree at /host/sys/fs/cgroup with
# KMODMON_CGROUP_ROOT, runc state read-only, the audit directory) and its configuration
# (stdout JSON, metrics with /ready and /healthz, a policy when the BPF LSM is active).
#
# A workload container "lb" (docker layout, KERNEL_MODULES=ip_vs) runs before the pod starts.
# Checked: the pod becomes ready; lb's load of ip_vs is attributed to lb (full ID, name) and
# judged expected; where the BPF LSM is active, lb's load of another module is denied (EPERM,
# a `denied` event naming lb); the pod is killed and the deny holds; a second pod (an upgrade)
# adopts the pins without loading twice and the deny still holds; the audit log written by both
# pods verifies as one chain. Exit 0 only when every check passes.
#
#   cargo xtask vm-run --kernel 6.12 tests/vm/pod.sh     (`cargo xtask test` runs it)
. /kmodmon/lib.sh

FAILS=0
ok() { echo "pod: ok: $*"; }
bad() {
    echo "pod: FAIL: $*"
    FAILS=$((FAILS + 1))
}
finish() {
    runc kill pod KILL 2>/dev/null
    runc delete -f pod 2>/dev/null
    ctr_stop lb
    [ "$LSM" = 1 ] && kmodmon enforce off >/dev/null 2>&1
    vm_finish
}
trap finish EXIT

LSM=0
grep -qw bpf /sys/kernel/security/lsm 2>/dev/null && LSM=1
fact lsm.bpf "$LSM"
log "BPF LSM active: $LSM ($(cat /sys/kernel/security/lsm 2>/dev/null))"

# The pod's configuration, as the DaemonSet's ConfigMap (metrics on loopback: no network
# namespace here, so the VM can ask).
mkdir -p /tmp/pod-etc /tmp/pod-audit
cat >/tmp/pod-etc/kmodmon.toml <<EOF
[audit]
dir = "/var/lib/kmodmon/audit"
fsync = "always"

[metrics]
listen = "127.0.0.1:9464"

[forward]
stdout = true
EOF
if [ "$LSM" = 1 ]; then
    printf '\n[policy]\nfile = "/etc/kmodmon/policy.toml"\n' >>/tmp/pod-etc/kmodmon.toml
fi
cat >/tmp/pod-etc/policy.toml <<EOF
mode = "enforce"

[host]
restrict = false

[unselected]
restrict = true
allow = []

[[rule]]
name = "lb"
container_name = "lb"
trust_kernel_modules = true
EOF

POD_CAPS=$(json_list CAP_BPF CAP_PERFMON CAP_SYS_RESOURCE CAP_SYS_ADMIN CAP_SYS_PTRACE CAP_DAC_READ_SEARCH)
mkdir -p /tmp/ctr/pod
cat >/tmp/ctr/pod/config.json <<EOF
{
  "ociVersion": "1.0.2",
  "process": {
    "terminal": false,
    "user": {"uid": 0, "gid": 0},
    "args": ["kmodmon", "run", "--config", "/etc/kmodmon/kmodmon.toml"],
    "env": ["PATH=/usr/sbin:/usr/bin", "KMODMON_CGROUP_ROOT=/host/sys/fs/cgroup", "RUST_LOG=info"],
    "cwd": "/",
    "capabilities": {"bounding": [$POD_CAPS], "effective": [$POD_CAPS], "permitted": [$POD_CAPS]},
    "noNewPrivileges": true
  },
  "root": {"path": "/containers/rootfs", "readonly": true},
  "hostname": "kmodmon-pod",
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
    {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755"]},
    {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
    {"destination": "/etc/kmodmon", "type": "bind", "source": "/tmp/pod-etc", "options": ["rbind", "ro"]},
    {"destination": "/var/lib/kmodmon", "type": "bind", "source": "/tmp/pod-audit", "options": ["rbind", "rw"]},
    {"destination": "/sys/fs/bpf", "type": "bind", "source": "/sys/fs/bpf", "options": ["rbind", "rw", "rslave"]},
    {"destination": "/sys/kernel/tracing", "type": "bind", "source": "/sys/kernel/tracing", "options": ["rbind", "rw"]},
    {"destination": "/sys/kernel/security", "type": "bind", "source": "/sys/kernel/security", "options": ["rbind", "ro"]},
    {"destination": "/host/sys/fs/cgroup", "type": "bind", "source": "/sys/fs/cgroup", "options": ["rbind", "ro"]},
    {"destination": "/run/runc", "type": "bind", "source": "/run/runc", "options": ["rbind", "ro"]}
  ],
  "linux": {
    "cgroupsPath": "/kubepods/besteffort/pod0d0e0f00-1111-2222-3333-444455556666/kmodmon",
    "namespaces": [{"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
    "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
    "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
  }
}
EOF

http() { # PATH -> body on stdout; fails unless 200
    wget -q -O - "http://127.0.0.1:9464$1" 2>/dev/null
}

# Starts pod number N (output to $OUT/podN.*) and waits for /ready.
pod_start() { # N
    runc run --no-pivot -d -b /tmp/ctr/pod pod >"$OUT/pod$1.jsonl" 2>"$OUT/pod$1.err" || {
        bad "runc run pod $1: $(cat "$OUT/pod$1.err")"
        return 1
    }
    local i=0
    while [ "$(http /ready)" != ready ]; do
        i=$((i + 1))
        if [ "$i" -gt 1200 ] || ! runc state pod >/dev/null 2>&1; then
            bad "pod $1 never became ready: $(cat "$OUT/pod$1.err")"
            return 1
        fi
        usleep 100000
    done
    ok "pod $1 ready (/ready) after $((i / 10)) s"
}

pod_stop() { # SIGNAL
    runc kill pod "$1" 2>/dev/null
    local i=0
    while runc state pod 2>/dev/null | grep -q '"status": "running"'; do
        i=$((i + 1))
        [ "$i" -gt 300 ] && break
        usleep 100000
    done
    runc delete -f pod 2>/dev/null
}

loaded() { grep -q "^$1 " /proc/modules; }

# Events of pod N for the workload: first line matching all the patterns.
event() { # N PATTERN...
    local file="$OUT/pod$1.jsonl" p
    shift
    local lines
    lines=$(cat "$file")
    for p in "$@"; do
        lines=$(printf '%s\n' "$lines" | grep -F -- "$p")
    done
    printf '%s\n' "$lines" | head -1
}

step preload_host modprobe nf_conntrack
ID=$(ctr_id lb)
fact ctr.lb.id "$ID"
CTR_ENV="KERNEL_MODULES=ip_vs" ctr_start lb "/docker/$ID" "SYS_MODULE NET_ADMIN" || exit 1

# --- pod 1 ------------------------------------------------------------------------------
pod_start 1 || exit 1
[ "$(http /healthz)" = alive ] && ok "/healthz says alive" || bad "/healthz: $(http /healthz)"
grep -q "cgroup namespace of its own" "$OUT/pod1.err" &&
    bad "kmodmon warned about its cgroup namespace despite KMODMON_CGROUP_ROOT" ||
    ok "no cgroup-namespace warning (KMODMON_CGROUP_ROOT in effect)"

# 5.10 and 6.1 ship plain .ko files (finit_module, named by the file); 6.12 ships .ko.xz, which
# this VM's kmod 30 decompresses itself and loads with init_module from memory: the LSM names
# it from the image (kernel_post_load_data), so the allowed module loads there too.
ctr_exec lb modprobe ip_vs && ok "lb: modprobe ip_vs ($(modinfo -n ip_vs | sed 's/.*\///')) allowed" ||
    bad "lb: modprobe ip_vs failed"
loaded ip_vs && ok "ip_vs loaded" || bad "ip_vs not loaded"
if [ "$LSM" = 1 ]; then
    if ctr_exec lb modprobe dummy; then bad "lb: modprobe dummy was allowed"; else ok "lb: modprobe dummy refused"; fi
    loaded dummy && bad "dummy loaded despite the policy" || ok "dummy not loaded"
fi
sleep 2

e=$(event 1 '"kind":"load_attempt"' '"module":"ip_vs"' "\"id\":\"$ID\"")
if [ -n "$e" ]; then
    ok "ip_vs attempt attributed to lb ($ID)"
    echo "$e" | grep -q '"name":"lb"' && ok "container name lb from runc state" || bad "no name: $e"
    echo "$e" | grep -q '"verdict":"expected"' && ok "verdict expected" || bad "verdict: $e"
else
    bad "no ip_vs load_attempt attributed to lb in pod 1's stdout: $(grep ip_vs "$OUT/pod1.jsonl")"
fi
if [ "$LSM" = 1 ]; then
    e=$(event 1 '"kind":"denied"' '"module":"dummy"' "\"id\":\"$ID\"")
    [ -n "$e" ] && ok "denied event names dummy and lb: $(echo "$e" | grep -o '"syscall":"[a-z_]*')" ||
        bad "no denied event for dummy from lb: $(grep denied "$OUT/pod1.jsonl")"
    http /metrics | grep -q '^kmodmon_denials_total [1-9]' && ok "kmodmon_denials_total counts it" ||
        bad "denials metric: $(http /metrics | grep denials)"
fi
LINKS1=$(ls /sys/fs/bpf/kmodmon/links 2>/dev/null | wc -l)
fact pins.links.pod1 "$LINKS1"

# --- the pod dies; then an upgrade --------------------------------------------------------
pod_stop KILL
if [ "$LSM" = 1 ]; then
    if ctr_exec lb modprobe dummy; then bad "pod killed: dummy allowed (enforcement lapsed)"; else
        ok "pod killed: dummy still refused (pinned)"
    fi
fi
pod_start 2 || exit 1
LINKS2=$(ls /sys/fs/bpf/kmodmon/links 2>/dev/null | wc -l)
fact pins.links.pod2 "$LINKS2"
if [ "$LSM" = 1 ]; then
    [ "$LINKS1" -gt 0 ] && [ "$LINKS1" = "$LINKS2" ] &&
        ok "pod 2 adopted the pins ($LINKS2 links, none loaded twice)" ||
        bad "pinned links: $LINKS1 under pod 1, $LINKS2 under pod 2"
    if ctr_exec lb modprobe dummy; then bad "pod 2: dummy allowed"; else ok "pod 2: dummy refused"; fi
    sleep 2
    e=$(event 2 '"kind":"denied"' "\"id\":\"$ID\"")
    [ -n "$e" ] && ok "pod 2 reports the denial, naming lb" || bad "pod 2: no denied event: $(cat "$OUT/pod2.jsonl")"
fi
pod_stop TERM
grep -q "stopping: kernel saw" "$OUT/pod2.err" && ok "pod 2 stopped cleanly on SIGTERM" ||
    bad "pod 2 did not report its accounting on SIGTERM: $(tail -3 "$OUT/pod2.err")"

if kmodmon log verify /tmp/pod-audit/audit >"$OUT/verify.txt" 2>&1; then
    ok "the audit log of both pods verifies as one chain: $(tail -1 "$OUT/verify.txt")"
else
    bad "log verify: $(cat "$OUT/verify.txt")"
fi

if [ "$FAILS" -ne 0 ]; then
    echo "pod: $FAILS check(s) failed; pod stderr:"
    cat "$OUT/pod1.err" "$OUT/pod2.err"
    exit 1
fi
echo "pod: all checks passed"
