# Helpers for scripts run in the kmodmon test VM (`cargo xtask vm-run`, `cargo xtask vm-test`).
# Source it: `. /kmodmon/lib.sh`. Busybox sh; runs as root on a Debian cloud kernel.
#
# A scenario records what happened into $OUT and sends it back to the host, where
# xtask/src/vm/scenarios.rs checks it:
#   $OUT/events.jsonl  kmodmon tail --json (stdout)     $OUT/tail.err  its stderr
#   $OUT/oracle.txt    the kernel's own module tracepoints (tracefs), same time window
#   $OUT/facts.txt     key=value lines (step exit codes, container cgroups, pids)
#   $OUT/sources.txt   `kmodmon sources`

KVER=$(uname -r)
TRACING=/sys/kernel/tracing
OUT=/tmp/out
mkdir -p "$OUT"
: >"$OUT/facts.txt"

# Sends a file to the host (saved as target/vm/runs/<series>/<script>/files/NAME).
vm_export() { # FILE [NAME]
    [ -f "$1" ] || return 0
    echo "KMODMON-VM-FILE-BEGIN ${2:-$(basename "$1")}"
    base64 "$1"
    echo "KMODMON-VM-FILE-END ${2:-$(basename "$1")}"
}

fact() { # KEY VALUE
    echo "$1=$2" >>"$OUT/facts.txt"
}

# Saves /proc/modules as $OUT/modules.NAME.
snapshot() { # NAME
    cp /proc/modules "$OUT/modules.$1"
}

log() {
    echo "[$(cut -d' ' -f1 /proc/uptime)] $*"
}

# Runs a command, echoes it and records its exit code as fact "rc.NAME".
# (Functions use `local`: busybox sh shares every other variable with the caller.)
step() { # NAME CMD...
    local step_name=$1 rc
    shift
    log "+ $*"
    "$@"
    rc=$?
    fact "rc.$step_name" "$rc"
    return 0
}

# The oracle: the kernel's module tracepoints, recorded while kmodmon runs.
trace_start() {
    local e
    echo 0 >"$TRACING/tracing_on"
    : >"$TRACING/trace"
    for e in module_load module_free module_request; do
        if [ -e "$TRACING/events/module/$e/enable" ]; then
            echo 1 >"$TRACING/events/module/$e/enable"
        else
            fact "oracle.missing" "$e"
        fi
    done
    echo 1 >"$TRACING/tracing_on"
}

trace_stop() {
    local e
    echo 0 >"$TRACING/tracing_on"
    cat "$TRACING/trace" >"$OUT/oracle.txt"
    for e in module_load module_free module_request; do
        [ -e "$TRACING/events/module/$e/enable" ] && echo 0 >"$TRACING/events/module/$e/enable"
    done
}

# Starts `kmodmon tail --json ARGS` and waits until its probes are attached.
kmodmon_start() { # [ARGS...]
    kmodmon sources >"$OUT/sources.txt" 2>&1
    rm -f "$OUT/tail.err"
    kmodmon tail --json "$@" >"$OUT/events.jsonl" 2>"$OUT/tail.err" &
    KMODMON_PID=$!
    fact kmodmon.pid "$KMODMON_PID"
    local i=0
    while ! grep -q '^kmodmon: attached' "$OUT/tail.err" 2>/dev/null; do
        if ! kill -0 "$KMODMON_PID" 2>/dev/null; then
            wait "$KMODMON_PID"
            fact kmodmon.start_rc "$?"
            log "kmodmon exited before attaching:"
            cat "$OUT/tail.err"
            return 1
        fi
        i=$((i + 1))
        if [ "$i" -gt 1200 ]; then
            log "kmodmon did not attach within 120 s:"
            cat "$OUT/tail.err"
            return 1
        fi
        usleep 100000
    done
    log "$(grep '^kmodmon: attached' "$OUT/tail.err")"
    trace_start
}

# Stops the oracle, then kmodmon (SIGINT, as Ctrl-C), and records its exit code.
kmodmon_stop() {
    # Events of the last step may still be on their way through the ring buffer.
    usleep 500000
    trace_stop
    [ -n "$KMODMON_PID" ] || return 0
    kill -INT "$KMODMON_PID" 2>/dev/null
    wait "$KMODMON_PID"
    fact kmodmon.rc "$?"
    KMODMON_PID=
}

# Sends every file of $OUT to the host. Scenario scripts call it last (or via `trap`).
vm_finish() {
    local f
    [ -n "$KMODMON_PID" ] && kmodmon_stop
    fact kmod.version "$(/usr/sbin/modprobe --version | sed -n 's/^kmod version //p')"
    for f in "$OUT"/*; do
        vm_export "$f"
    done
}

# --- runc containers --------------------------------------------------------------------
# Containers share the read-only root /containers/rootfs, with the VM's /usr (busybox, kmod,
# iptables-legacy, the module tree) bind-mounted read-only. Default capabilities are
# Docker's; CAPS adds more. Environment: $CTR_ENV (space-separated K=V words).

DOCKER_CAPS="CHOWN DAC_OVERRIDE FSETID FOWNER MKNOD NET_RAW SETGID SETUID SETFCAP SETPCAP NET_BIND_SERVICE SYS_CHROOT KILL AUDIT_WRITE"

json_list() { # WORDS... -> "a","b"
    local sep= w
    for w in "$@"; do
        printf '%s"%s"' "$sep" "$(printf '%s' "$w" | sed 's/\\/\\\\/g; s/"/\\"/g')"
        sep=,
    done
}

# Writes bundle /tmp/ctr/NAME/config.json for a container running CMD. $CTR_SECCOMP, when
# set, is the bundle's `linux.seccomp` object (a JSON profile, as runtimes write it).
ctr_config() { # NAME CGROUPS_PATH "CAPS" CMD...
    local name=$1 cgpath=$2 extra=$3 caps= c seccomp=
    shift 3
    [ -n "$CTR_SECCOMP" ] && seccomp="\"seccomp\": $CTR_SECCOMP,"
    for c in $DOCKER_CAPS $extra; do caps="$caps CAP_$c"; done
    caps=$(json_list $caps)
    mkdir -p "/tmp/ctr/$name"
    cat >"/tmp/ctr/$name/config.json" <<EOF
{
  "ociVersion": "1.0.2",
  "process": {
    "terminal": false,
    "user": {"uid": 0, "gid": 0},
    "args": [$(json_list "$@")],
    "env": [$(json_list PATH=/usr/sbin:/usr/bin TERM=dumb $CTR_ENV)],
    "cwd": "/",
    "capabilities": {"bounding": [$caps], "effective": [$caps], "permitted": [$caps]},
    "noNewPrivileges": true
  },
  "root": {"path": "/containers/rootfs", "readonly": true},
  "hostname": "$name",
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
    {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755"]},
    {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]}
  ],
  "linux": {
    $seccomp
    "cgroupsPath": "$cgpath",
    "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
    "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
    "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
  }
}
EOF
}

# Starts a detached container (its process: sleep) and records its cgroup as facts
# ctr.NAME.cgroup_path and ctr.NAME.cgroup_id. Run commands in it with ctr_exec.
ctr_start() { # NAME CGROUPS_PATH "CAPS"
    ctr_config "$1" "$2" "$3" sleep 3600 || return 1
    # The VM's root is an initramfs, where pivot_root cannot work.
    runc run --no-pivot -d -b "/tmp/ctr/$1" "$1" >"$OUT/ctr.$1.log" 2>&1 || {
        log "runc run $1 failed:"
        cat "$OUT/ctr.$1.log"
        return 1
    }
    fact "ctr.$1.cgroup_path" "$2"
    fact "ctr.$1.cgroup_id" "$(stat -c %i "/sys/fs/cgroup$2")"
    fact "ctr.$1.pid" "$(runc state "$1" | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p')"
}

ctr_exec() { # NAME CMD...
    local ctr=$1
    shift
    log "+ [$ctr] $*"
    runc exec "$ctr" "$@"
}

ctr_stop() { # NAME
    runc kill "$1" KILL 2>/dev/null
    runc delete -f "$1" 2>/dev/null
}

# A Docker-style 64-hex container ID derived from a name (stable across runs).
ctr_id() { # NAME
    printf '%s' "$1" | sha256sum | cut -d' ' -f1
}

# Path of a module's file in the module tree.
modpath() { # MODULE
    modinfo -n "$1"
}

# --- enforcement scripts (enforce*.sh) ---------------------------------------------------
# Self-checking: record facts, then `want ...` checks; `checks_done` exits 1 naming every
# failed check. NAME in messages is the script's ($KMODMON_VM_SCENARIO).

FAILS=0
_me() { echo "${KMODMON_VM_SCENARIO:-check}"; }
want() { # FACT VALUE: the recorded fact must have this value
    local got
    got=$(sed -n "s/^$1=//p" "$OUT/facts.txt" | tail -1)
    if [ "$got" = "$2" ]; then echo "$(_me): ok: $1=$2"; else
        echo "$(_me): FAIL: $1 is '$got', want '$2'"
        FAILS=$((FAILS + 1))
    fi
}
want_nonzero() { # FACT
    local got
    got=$(sed -n "s/^$1=//p" "$OUT/facts.txt" | tail -1)
    if [ -n "$got" ] && [ "$got" != 0 ]; then echo "$(_me): ok: $1=$got (not 0, as it must)"; else
        echo "$(_me): FAIL: $1 is '$got', want a failure"
        FAILS=$((FAILS + 1))
    fi
}
want_line() { # FILE PATTERN WHAT: a line of $OUT/FILE matches PATTERN (grep -E)
    if grep -Eq -- "$2" "$OUT/$1"; then echo "$(_me): ok: $3"; else
        echo "$(_me): FAIL: $3 (no line matching '$2' in $1)"
        FAILS=$((FAILS + 1))
    fi
}
want_no_line() { # FILE PATTERN WHAT
    if grep -Eq -- "$2" "$OUT/$1"; then
        echo "$(_me): FAIL: $3 (a line matches '$2' in $1:)"
        grep -E -- "$2" "$OUT/$1" | head -3
        FAILS=$((FAILS + 1))
    else echo "$(_me): ok: $3"; fi
}
checks_done() {
    [ "$FAILS" -eq 0 ] || { echo "$(_me): $FAILS check(s) failed"; exit 1; }
    echo "$(_me): all checks passed"
}

# Records loaded.MODULE.TAG = 1 when MODULE is in /proc/modules, else 0.
loaded() { # MODULE TAG
    if grep -q "^$1 " /proc/modules; then fact "loaded.$1.$2" 1; else fact "loaded.$1.$2" 0; fi
}

# Where the BPF LSM is not active (5.10's Debian kernel), enforcement must refuse with the
# boot parameter to add and pin nothing: checks that and exits.
refused_without_bpf_lsm() { # POLICY
    grep -qw bpf /sys/kernel/security/lsm && return 0
    kmodmon enforce on --policy "$1" >"$OUT/refused.out" 2>"$OUT/refused.err"
    fact rc.refused "$?"
    cat "$OUT/refused.err"
    want rc.refused 2
    want_line refused.err "lsm=" "the refusal names the boot parameter to add"
    if [ -e /sys/fs/bpf/kmodmon/links ]; then
        echo "$(_me): FAIL: pins left behind"
        FAILS=$((FAILS + 1))
    else echo "$(_me): ok: nothing pinned"; fi
    checks_done
    echo "$(_me): BPF LSM not active: refused as it must be"
    exit 0
}

# `kmodmon enforce on --foreground`, its events in $OUT/enforce.jsonl; waits for the Nth
# start line.
EPID=
enf_start() { # POLICY N
    # The files exist before the wait reads them: the background job opens them only once it
    # runs, and `grep -c` on a missing file prints nothing ("bad number"), which ended the wait
    # at once and let a scenario act before enforcement was on (seen on 6.1, enforce-names).
    : >>"$OUT/enforce.jsonl"
    : >>"$OUT/enforce.err"
    kmodmon enforce on --policy "$1" --foreground >>"$OUT/enforce.jsonl" 2>>"$OUT/enforce.err" &
    EPID=$!
    local i=0
    while [ "$(grep -c '^enforcement on' "$OUT/enforce.jsonl" 2>/dev/null)" -lt "$2" ]; do
        i=$((i + 1))
        if [ "$i" -gt 900 ] || ! kill -0 "$EPID" 2>/dev/null; then
            log "kmodmon enforce on did not start:"
            cat "$OUT/enforce.err"
            return 1
        fi
        usleep 100000
    done
    grep '^enforcement on' "$OUT/enforce.jsonl" | tail -1
}
enf_stop() { # [SIGNAL]
    [ -n "$EPID" ] && kill "-${1:-INT}" "$EPID" 2>/dev/null && wait "$EPID"
    EPID=
}

# A cgroup that looks like a docker container's (/docker/<64 hex of NAME>) with no runtime
# behind it; `in_cgroup NAME CMD...` runs CMD in it (the LSM decides by cgroup alone).
cg_make() { # NAME -> prints the cgroup path
    local p="/docker/$(ctr_id "$1")"
    mkdir -p "/sys/fs/cgroup$p"
    echo "$p"
}
in_cgroup() { # PATH CMD...
    local p=$1
    shift
    sh -c 'echo $$ >"/sys/fs/cgroup$0/cgroup.procs" && exec "$@"' "$p" "$@"
}

# Runs a container to completion: its entrypoint is CMD (its first process). Records
# rc.entry.NAME.
ctr_run() { # NAME CGROUPS_PATH "CAPS" CMD...
    local name=$1 rc
    ctr_config "$@" || return 1
    runc run --no-pivot -b "/tmp/ctr/$name" "$name" >"$OUT/ctr.$name.log" 2>&1
    rc=$?
    fact "rc.entry.$name" "$rc"
    runc delete -f "$name" >/dev/null 2>&1
    return 0
}

# Events of KIND for MODULE in $OUT/enforce.jsonl (JSON lines).
events_of() { # KIND MODULE
    grep "\"kind\":\"$1\"" "$OUT/enforce.jsonl" | grep "\"module\":\"$2\""
}
