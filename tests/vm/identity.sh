# Module identity and the hidden-module cross-view: `cargo xtask vm-run --kernel 6.1
# tests/vm/identity.sh`; `vm-test` runs it on every kernel. Self-checking: prints each check
# and exits 1 naming every one that failed.
#
# Test modules built against this kernel's own headers (xtask/src/vm/testmods.rs) are in
# /usr/lib/kmodmon-test/$(uname -r): kmt_plain (unsigned), kmt_plain.ko.xz, kmt_hide (unlinks
# itself from the module list in its init function), kmt_big (10 MB). kmt-load makes the
# module syscalls. Hashes are compared with sha256sum of the image inside the VM.
. /kmodmon/lib.sh
trap 'daemon_stop; vm_finish' EXIT

D=/usr/lib/kmodmon-test/$KVER
EV=$OUT/events.jsonl
LEDGER=$OUT/modules.json
FAILS=0
ok() { echo "identity: ok: $*"; }
fail() {
    echo "identity: FAIL: $*"
    FAILS=$((FAILS + 1))
}
# check WHAT COMMAND...: the command must succeed.
check() {
    local what=$1
    shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}
# The first event line of KIND for MODULE (optionally also matching PATTERN).
event() { # KIND MODULE [PATTERN]
    grep "\"kind\":\"$1\"" "$EV" | grep "\"module\":\"$2\"" | grep -e "${3:-.}" | head -1
}
field() { # LINE NAME -> the first string value of "NAME":"..."
    printf '%s' "$1" | sed -n "s/.*\"$2\":\"\\([^\"]*\\)\".*/\\1/p"
}
has() { # LINE TEXT
    printf '%s' "$1" | grep -qF -- "$2"
}
sha() { sha256sum "$1" | cut -d' ' -f1; }

DPID=
daemon_start() { # ARGS...
    local before
    # Exists before the wait reads it (see enf_start in lib.sh).
    : >>"$OUT/run.err"
    before=$(grep -c 'started; attached' "$OUT/run.err" 2>/dev/null)
    before=${before:-0}
    kmodmon run --stdout --ledger-file "$LEDGER" "$@" >>"$EV" 2>>"$OUT/run.err" &
    DPID=$!
    local i=0
    while [ "$(grep -c 'started; attached' "$OUT/run.err" 2>/dev/null)" -le "$before" ]; do
        i=$((i + 1))
        if [ "$i" -gt 1200 ] || ! kill -0 "$DPID" 2>/dev/null; then
            cat "$OUT/run.err"
            return 1
        fi
        usleep 100000
    done
    grep 'started; attached' "$OUT/run.err" | tail -1
}
daemon_stop() {
    [ -n "$DPID" ] && kill -INT "$DPID" 2>/dev/null && wait "$DPID"
    DPID=
}
settle() { usleep 700000; }
# Waits (up to 30 s: hashing 10 MB under TCG takes a while) for an event of KIND for MODULE.
wait_event() { # KIND MODULE [PATTERN]
    local i=0
    while [ -z "$(event "$@")" ] && [ "$i" -lt 300 ]; do
        i=$((i + 1))
        usleep 100000
    done
}

# A host package database that owns the in-tree dummy module (origin.owner = dpkg).
DUMMY=$(modinfo -n dummy)
mkdir -p /var/lib/dpkg/info
echo "${DUMMY#/usr}" >"/var/lib/dpkg/info/linux-image-$KVER.list"
printf 'Package: linux-image-%s\nStatus: install ok installed\nVersion: 9.9-test\n' "$KVER" >/var/lib/dpkg/status

cp "$D"/kmt_plain.ko "$D"/kmt_plain.ko.xz "$D"/kmt_hide.ko "$D"/kmt_big.ko /tmp/
# Loaded before kmodmon: `kmodmon modules` must say so.
modprobe veth
daemon_start || exit 1
grep -q 'identity: image capture at load_module' "$OUT/run.err" && ok "identity attached" || fail "identity not attached: $(grep note "$OUT/run.err")"

# 1. Unsigned out-of-tree module, finit_module.
kmt-load finit /tmp/kmt_plain.ko
wait_event load_attempt kmt_plain
WANT=$(sha /tmp/kmt_plain.ko)
L=$(event load kmt_plain)
A=$(event load_attempt kmt_plain '"syscall":"finit_module"')
[ "$(field "$L" sha256)" = "$WANT" ] && ok "load sha256 = sha256sum of the file" || fail "load sha256 '$(field "$L" sha256)' != $WANT"
[ "$(field "$A" sha256)" = "$WANT" ] && ok "finit attempt sha256" || fail "finit attempt sha256 '$(field "$A" sha256)'"
check "unsigned: sig_ok false" has "$A" '"sig_ok":false'
check "unsigned: no signature" has "$A" '"signature":{"signed":false}'
check "unsigned: taint E on the load" has "$L" '"taint_flags":"OE"'
check "modinfo version" has "$A" '"version":"1.2.3"'
check "modinfo license" has "$A" '"license":"GPL"'
[ "$(field "$A" srcversion)" = "$(modinfo -F srcversion /tmp/kmt_plain.ko)" ] && ok "modinfo srcversion" || fail "srcversion $(field "$A" srcversion)"
check "modinfo vermagic names this kernel" has "$A" "\"vermagic\":\"$KVER "
check "size" has "$A" "\"size\":$(stat -c %s /tmp/kmt_plain.ko),"
check "from a file" has "$A" '"loaded_from_memory":false'
check "origin: path" has "$A" '"path":"/tmp/kmt_plain.ko","mount_ns":"host"'
check "origin: unpackaged" has "$A" '"owner":"unpackaged"'
rmmod kmt_plain

# 2. The same bytes by init_module: the same hash, from memory.
kmt-load init /tmp/kmt_plain.ko
settle
I=$(event load_attempt kmt_plain '"syscall":"init_module"')
[ "$(field "$I" sha256)" = "$WANT" ] && ok "init_module: same sha256" || fail "init_module sha256 '$(field "$I" sha256)' line: $I"
check "init_module: loaded_from_memory" has "$I" '"loaded_from_memory":true'
rmmod kmt_plain

# 3. A signed in-tree module: the signer and key the kernel verified.
modprobe dummy
settle
S=$(event load_attempt dummy)
check "in-tree: sig_ok true" has "$S" '"sig_ok":true'
[ "$(field "$S" signer)" = "$(modinfo -F signer dummy)" ] && ok "signer: $(field "$S" signer)" || fail "signer '$(field "$S" signer)' != '$(modinfo -F signer dummy)'"
[ "$(field "$S" key_id)" = "$(modinfo -F sig_key dummy)" ] && ok "key id" || fail "key id '$(field "$S" key_id)' != '$(modinfo -F sig_key dummy)'"
check "in-tree: hash algo" has "$S" '"hash_algo":"sha256"'
if has "$S" '"syscall":"finit_module"'; then
    check "in-tree: dpkg owner" has "$S" "\"owner\":\"dpkg\",\"package\":\"linux-image-$KVER 9.9-test\""
else
    # kmod decompressed the .ko.xz itself and passed the image from memory: no file.
    check "in-tree from memory: origin unknown" has "$S" '"origin":{"mount_ns":"host","mnt_ns_inode":'
    check "in-tree from memory: no owner" has "$S" '"owner":"unknown"'
fi
case $DUMMY in
*.xz) DWANT=$(xz -dc "$DUMMY" | sha256sum | cut -d' ' -f1) ;;
*) DWANT=$(sha "$DUMMY") ;;
esac
[ "$(field "$S" sha256)" = "$DWANT" ] && ok "in-tree: sha256 of the (decompressed) image" || fail "in-tree sha256 $(field "$S" sha256) != $DWANT"
rmmod dummy

# 4. A compressed module: the hash is of the decompressed image, whoever decompresses.
XWANT=$(xz -dc /tmp/kmt_plain.ko.xz | sha256sum | cut -d' ' -f1)
[ "$XWANT" = "$WANT" ] && ok "the .xz holds the same image" || fail "xz -dc differs"
: >"$OUT/xz.rc"
if kmt-load finit /tmp/kmt_plain.ko.xz 4; then
    # The kernel decompresses (6.12: MODULE_INIT_COMPRESSED_FILE).
    settle
    X=$(event load_attempt kmt_plain '"decompressed_by_kernel":true')
    [ "$(field "$X" sha256)" = "$XWANT" ] && ok "kernel-decompressed: sha256 of the decompressed image" || fail "kernel-decompressed sha256 '$(field "$X" sha256)'"
    rmmod kmt_plain
    echo kernel >"$OUT/xz.rc"
else
    echo "(this kernel does not decompress modules itself)"
fi
insmod /tmp/kmt_plain.ko.xz
settle
K=$(grep '"kind":"load_attempt"' "$EV" | grep '"module":"kmt_plain"' | tail -1)
[ "$(field "$K" sha256)" = "$XWANT" ] && ok "kmod insmod .ko.xz: sha256 of the decompressed image" || fail "insmod .ko.xz sha256 '$(field "$K" sha256)'"
rmmod kmt_plain

# 5. 10 MB.
kmt-load finit /tmp/kmt_big.ko
wait_event load_attempt kmt_big
B=$(event load_attempt kmt_big)
[ "$(field "$B" sha256)" = "$(sha /tmp/kmt_big.ko)" ] && ok "10 MB module hashed" || fail "10 MB: $(printf '%s' "$B" | grep -o '"identity":.*' | cut -c1-300)"
rmmod kmt_big

# 6. A module that unlinks itself in its init function.
kmt-load finit /tmp/kmt_hide.ko
grep -q '^kmt_hide ' /proc/modules && fail "kmt_hide still in /proc/modules" || ok "kmt_hide left /proc/modules"
[ -d /sys/module/kmt_hide ] && ok "kmt_hide keeps /sys/module/kmt_hide" || fail "no /sys/module/kmt_hide"
i=0
while [ -z "$(event hidden_module kmt_hide)" ] && [ "$i" -lt 200 ]; do
    i=$((i + 1))
    usleep 100000
done
H=$(event hidden_module kmt_hide)
[ -n "$H" ] && ok "hidden_module reported after $((i / 10)) s" || fail "no hidden_module for kmt_hide"
check "hidden_module: high severity" has "$H" '"severity":"high"'
check "hidden_module: the loader" has "$H" '"comm":"kmt-load"'
check "hidden_module: cross view" has "$H" '"cross_view":{"proc_modules":false,"sys_module":true'
[ "$(field "$H" sha256)" = "$(sha /tmp/kmt_hide.ko)" ] && ok "hidden_module: identity" || fail "hidden_module identity '$(field "$H" sha256)'"
[ "$(grep -c '"kind":"hidden_module"' "$EV")" = 1 ] && ok "reported once, nothing else hidden" || fail "hidden_module events: $(grep -c '"kind":"hidden_module"' "$EV")"
# Nothing else broken: loads are still seen and identified.
modprobe dummy
settle
check "after hiding: dummy loads and is identified" has "$(grep '"kind":"load_attempt"' "$EV" | grep '"module":"dummy"' | tail -1)" '"sig_ok":true'

# 7. kmodmon modules, from the daemon's ledger.
sleep 3
kmodmon modules --json --ledger-file "$LEDGER" >"$OUT/modules.out" 2>"$OUT/modules.err"
M=$(cat "$OUT/modules.out")
check "modules: dummy known from the ledger" has "$(printf '%s' "$M" | grep -o '{"module":"dummy"[^]]*' | head -1)" '"known_from":"ledger","loaded_before_kmodmon":false'
printf '%s' "$M" | grep -o '{"module":"[^"]*"[^{]*"known_from":"none","loaded_before_kmodmon":true' | head -1 | grep -q . && ok "modules: a module of before kmodmon" || fail "modules: no loaded_before_kmodmon entry"
kmodmon modules --ledger-file "$LEDGER" >"$OUT/modules.txt" 2>&1
head -5 "$OUT/modules.txt"
unseen=$(grep -c '"kind":"unseen_load"' "$EV")
[ "$unseen" = 0 ] && ok "no unseen_load (every load was seen)" || fail "$unseen unseen_load events"

daemon_stop
grep '"summary"' "$OUT/run.err" | grep -q '"undecodable":0' && ok "daemon stopped cleanly" || fail "daemon summary: $(grep summary "$OUT/run.err" | cut -c1-300)"

# 8. Identity in the policy (where the BPF LSM runs a policy at all): the host must load
# signed modules only and kmt_hide's image is pinned; the kernel decides by name, kmodmon
# verifies after the load.
if grep -qw bpf /sys/kernel/security/lsm; then
    cat >/tmp/policy.toml <<POL
mode = "audit"
[host]
signed = true
POL
    daemon_start --policy /tmp/policy.toml || exit 1
    kmt-load finit /tmp/kmt_plain.ko
    wait_event identity_mismatch kmt_plain
    X=$(event identity_mismatch kmt_plain)
    check "identity_mismatch for an unsigned host load" has "$X" 'sig_ok false'
    check "identity_mismatch carries the identity" has "$X" "\"sha256\":\"$WANT\""
    rmmod kmt_plain
    rmmod dummy 2>/dev/null
    modprobe dummy
    wait_event load_attempt dummy '"sig_ok":true'
    settle
    [ -z "$(event identity_mismatch dummy)" ] && ok "no mismatch for the signed in-tree module" || fail "identity_mismatch for dummy"
    daemon_stop
    kmodmon enforce off >/dev/null 2>&1
else
    echo "(no BPF LSM: the policy part is skipped on this kernel, as kmodmon run refuses a policy)"
fi
grep -o '"identity_[a-z_]*":[0-9]*' "$OUT/run.err" | tr '\n' ' '
echo
[ "$FAILS" -eq 0 ] || {
    echo "identity: $FAILS checks failed"
    exit 1
}
echo "identity: all checks passed"
