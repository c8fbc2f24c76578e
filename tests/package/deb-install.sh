#!/bin/sh
# The Debian package, installed for real: `dpkg -i` on this machine, maintainer scripts and all,
# inside a private mount namespace whose /etc, /usr and /var are overlays on a tmpfs, so nothing
# is left behind. Then what a user would do: run it, read its man page, verify its unit, use its
# completions and config; upgrade it with a locally edited config; remove it; purge it.
#
#   sh tests/package/deb-install.sh target/debian/kmodmon_0.1.0-1_amd64.deb 0.1.0
#
# Needs root (mounts, dpkg). Called by `cargo xtask test`.
set -eu

deb=$(realpath "$1")
version=$2

if [ -z "${KMODMON_DEB_SANDBOX:-}" ]; then
    exec unshare --mount --propagation private \
        env KMODMON_DEB_SANDBOX=1 sh "$0" "$deb" "$version"
fi

scratch=$(mktemp -d /tmp/kmodmon-deb.XXXXXX)
mount -t tmpfs tmpfs "$scratch"
for d in etc usr var; do
    mkdir -p "$scratch/$d/upper" "$scratch/$d/work"
    mount -t overlay overlay \
        -o "lowerdir=/$d,upperdir=$scratch/$d/upper,workdir=$scratch/$d/work" "/$d"
done

failures=0
ok() { echo "deb-install: ok: $*"; }
fail() { echo "deb-install: FAIL: $*" >&2; failures=$((failures + 1)); }
check() { # check DESCRIPTION COMMAND...
    what=$1
    shift
    if out=$("$@" 2>&1); then ok "$what"; else fail "$what: $out"; fi
}

echo "deb-install: $(dpkg-deb --field "$deb" Package Version Architecture Depends | tr '\n' ' ')"
if dpkg-query -W kmodmon >/dev/null 2>&1; then
    echo "deb-install: (kmodmon is installed on this machine; the sandbox upgrades it)"
fi

# --- install -------------------------------------------------------------------------------
if ! out=$(dpkg -i "$deb" 2>&1); then
    echo "$out" >&2
    echo "deb-install: FAIL: dpkg -i" >&2
    exit 1
fi
ok "dpkg -i"
check "package state is installed" sh -c \
    'dpkg-query -W -f="\${Status}" kmodmon | grep -qx "install ok installed"'

got=$(kmodmon --version 2>&1 || true)
[ "$got" = "kmodmon $version" ] && ok "kmodmon --version = $got" ||
    fail "kmodmon --version printed '$got', expected 'kmodmon $version'"
[ "$(command -v kmodmon)" = /usr/bin/kmodmon ] && ok "on PATH as /usr/bin/kmodmon" ||
    fail "kmodmon resolves to $(command -v kmodmon)"

# Man pages: rendered by man(1) from the installed, compressed files.
page=/usr/share/man/man1/kmodmon.1.gz
check "man -l $page renders the subcommands and FILES" sh -c \
    "MANWIDTH=100 MANPAGER=cat man -l $page | grep -q 'kmodmon-tail(1)' &&
     MANWIDTH=100 MANPAGER=cat man -l $page | grep -q '^FILES'"
for sub in tail run check policy-check enforce-on log-verify export completions; do
    [ -f "/usr/share/man/man1/kmodmon-$sub.1.gz" ] || fail "no man page kmodmon-$sub(1)"
done
check "man -w finds kmodmon-run(1) by name" sh -c 'man -w kmodmon-run | grep -q kmodmon-run.1'

# The unit: systemd's own offline verification (ExecStart binary, Documentation= man pages).
unit=/lib/systemd/system/kmodmon.service
check "$unit installed" test -f "$unit"
if out=$(systemd-analyze verify "$unit" 2>&1) && [ -z "$out" ]; then
    ok "systemd-analyze verify $unit (no findings)"
else
    fail "systemd-analyze verify $unit: $out"
fi
check "enabled on install (multi-user.target.wants)" \
    test -L /etc/systemd/system/multi-user.target.wants/kmodmon.service
exposure=$(systemd-analyze security --offline=true "$unit" 2>/dev/null | tail -1 || true)
echo "deb-install: systemd-analyze security: ${exposure#→ }"

# Configuration: conffiles, valid as shipped; the audit log directory.
conffiles=$(dpkg-query -W -f='${Conffiles}' kmodmon)
for f in /etc/kmodmon/kmodmon.toml /etc/kmodmon/policy.toml; do
    echo "$conffiles" | grep -q " $f " && ok "$f is a conffile" || fail "$f is not a conffile"
done
check "shipped config is valid (kmodmon run --check-config)" \
    kmodmon run --check-config --config /etc/kmodmon/kmodmon.toml
check "shipped policy is valid (kmodmon policy check)" \
    kmodmon policy check /etc/kmodmon/policy.toml
check "config + policy together" \
    kmodmon run --check-config --config /etc/kmodmon/kmodmon.toml \
    --policy /etc/kmodmon/policy.toml
check "audit log directory /var/lib/kmodmon/audit is 0700" sh -c \
    '[ "$(stat -c %a /var/lib/kmodmon/audit)" = 700 ]'

# The service's own command line, as systemd would run it (no systemd here): ready on /ready,
# writing the audit log, stopping cleanly on SIGTERM.
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
exec_pre=$(sed -n 's/^ExecStartPre=//p' "$unit")
check "ExecStartPre: $exec_pre" sh -c "$exec_pre"
$exec_start >"$scratch/daemon.out" 2>"$scratch/daemon.err" &
daemon=$!
ready=""
for _ in $(seq 1 60); do
    if ready=$(curl -fsS http://127.0.0.1:9464/ready 2>/dev/null); then break; fi
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.5
done
[ "$ready" = ready ] && ok "ExecStart: $exec_start: /ready says ready" ||
    fail "ExecStart: $exec_start never became ready: $(cat "$scratch/daemon.err")"
check "/healthz says alive" sh -c 'curl -fsS http://127.0.0.1:9464/healthz | grep -qx alive'
check "/metrics serves Prometheus text" sh -c \
    'curl -fsS http://127.0.0.1:9464/metrics | grep -q "^# TYPE kmodmon_events_total counter"'
kill -TERM "$daemon" 2>/dev/null || true
wait "$daemon" && ok "SIGTERM: the daemon exits 0" || fail "SIGTERM: the daemon exited $?"
check "the daemon wrote a verifiable audit log" kmodmon log verify /var/lib/kmodmon/audit
rm -f /var/lib/kmodmon/audit/*

# Completions, as the shells load them.
check "bash completion registers and completes subcommands" bash -c '
    . /usr/share/bash-completion/completions/kmodmon &&
    complete -p kmodmon >/dev/null &&
    COMP_WORDS=(kmodmon ta) COMP_CWORD=1 COMP_LINE="kmodmon ta" COMP_POINT=10 &&
    _kmodmon kmodmon ta kmodmon && [ "${COMPREPLY[*]}" = tail ]'
check "zsh completion installed" grep -q '^#compdef kmodmon' /usr/share/zsh/vendor-completions/_kmodmon
check "fish completion installed" grep -q 'complete -c kmodmon' \
    /usr/share/fish/vendor_completions.d/kmodmon.fish

# Documentation.
check "README and the example DaemonSet in /usr/share/doc/kmodmon" test -f \
    /usr/share/doc/kmodmon/examples/kubernetes/kmodmon.yaml -a -f /usr/share/doc/kmodmon/README.md
check "copyright file" test -f /usr/share/doc/kmodmon/copyright

# --- upgrade (same version re-installed: the upgrade path of the maintainer scripts) ---------
echo "# edited by the admin" >>/etc/kmodmon/kmodmon.toml
mkdir -p /var/lib/kmodmon/audit
echo '{"seq":1}' >/var/lib/kmodmon/audit/audit-00000000000000000001.jsonl
if out=$(dpkg -i "$deb" 2>&1); then ok "upgrade (dpkg -i over the installed package)"; else
    fail "upgrade: $out"
fi
check "the admin's config edit survives the upgrade" \
    grep -q '^# edited by the admin' /etc/kmodmon/kmodmon.toml
check "audit records survive the upgrade" \
    test -f /var/lib/kmodmon/audit/audit-00000000000000000001.jsonl

# --- remove, purge -------------------------------------------------------------------------
if out=$(dpkg -r kmodmon 2>&1); then ok "dpkg -r"; else fail "dpkg -r: $out"; fi
check "binary removed" test ! -e /usr/bin/kmodmon
check "config kept after remove" test -f /etc/kmodmon/kmodmon.toml
if purged=$(dpkg -P kmodmon 2>&1); then ok "dpkg -P"; else fail "dpkg -P: $purged"; fi
check "config removed on purge" test ! -e /etc/kmodmon/kmodmon.toml
check "unit no longer enabled after purge" \
    test ! -e /etc/systemd/system/multi-user.target.wants/kmodmon.service
check "audit records kept even on purge (evidence)" \
    test -f /var/lib/kmodmon/audit/audit-00000000000000000001.jsonl
echo "$purged" | grep -q "audit log in /var/lib/kmodmon/audit was kept" &&
    ok "purge says the audit log was kept" ||
    fail "purge did not say the audit log was kept: $purged"

if [ "$failures" -ne 0 ]; then
    echo "deb-install: $failures check(s) failed" >&2
    exit 1
fi
echo "deb-install: all checks passed (the sandbox and everything installed in it are gone)"
