//! kmodmon-vm-tool: what the enforcement VM scripts need that busybox and kmod do not do
//! (std only, static; built by the xtask VM harness and installed as /usr/bin/kmodmon-vm-tool).
//!
//!   kmodmon-vm-tool flood FAMILY N          socket(FAMILY) N times: each asks the kernel to
//!                                           autoload net-pf-FAMILY; prints the counts
//!   kmodmon-vm-tool finit PATH FLAGS [ARGS] finit_module(open(PATH), ARGS, FLAGS); prints the
//!                                           result and exits 0 (1 for a failed call)
//!   kmodmon-vm-tool algbind TYPE NAME       an AF_ALG socket bound to TYPE/NAME (the crypto
//!                                           manager instantiates NAME); prints the result
//!   kmodmon-vm-tool mapset PIN OFFSET VALUE writes the u32 VALUE at byte OFFSET of slot 0 of
//!                                           the pinned array map PIN (tampering, on purpose)
//!   kmodmon-vm-tool patch FILE FROM TO      replaces the first FROM in FILE by TO (same length)
//!   kmodmon-vm-tool detach PIN              BPF_LINK_DETACH on the pinned link PIN (tampering,
//!                                           on purpose); prints the result, exits 1 on failure
use std::{ffi::CString, os::raw::c_long, process::ExitCode};

unsafe extern "C" {
    fn socket(domain: i32, ty: i32, protocol: i32) -> i32;
    fn bind(fd: i32, addr: *const u8, len: u32) -> i32;
    fn close(fd: i32) -> i32;
    fn open(path: *const i8, flags: i32, ...) -> i32;
    fn syscall(nr: c_long, ...) -> c_long;
    fn __errno_location() -> *mut i32;
}

const SYS_BPF: c_long = 321;
const SYS_FINIT_MODULE: c_long = 313;
const AF_ALG: i32 = 38;
const SOCK_SEQPACKET: i32 = 5;

fn errno() -> i32 {
    // SAFETY: libc's thread-local errno.
    unsafe { *__errno_location() }
}

fn err_name(e: i32) -> String {
    match e {
        1 => "EPERM".into(),
        2 => "ENOENT".into(),
        12 => "ENOMEM".into(),
        17 => "EEXIST".into(),
        22 => "EINVAL".into(),
        95 => "EOPNOTSUPP".into(),
        97 => "EAFNOSUPPORT".into(),
        e => format!("E{e}"),
    }
}

fn flood(family: i32, n: u64) -> ExitCode {
    let mut failed = 0u64;
    let mut errors = std::collections::BTreeMap::new();
    for _ in 0..n {
        // SAFETY: plain syscall wrappers.
        let fd = unsafe { socket(family, SOCK_SEQPACKET, 0) };
        if fd < 0 {
            failed += 1;
            *errors.entry(err_name(errno())).or_insert(0u64) += 1;
        } else {
            // SAFETY: our descriptor.
            unsafe { close(fd) };
        }
    }
    println!("flood family={family} attempts={n} failed={failed} errors={errors:?}");
    ExitCode::SUCCESS
}

fn finit(path: &str, flags: i32, args: &str) -> ExitCode {
    let p = CString::new(path).unwrap_or_default();
    let a = CString::new(args).unwrap_or_default();
    // SAFETY: NUL-terminated path, O_RDONLY|O_CLOEXEC.
    let fd = unsafe { open(p.as_ptr(), 0o2000000) };
    if fd < 0 {
        println!("finit {path}: open failed: {}", err_name(errno()));
        return ExitCode::from(2);
    }
    // SAFETY: finit_module(fd, args, flags).
    let r = unsafe { syscall(SYS_FINIT_MODULE, fd as c_long, a.as_ptr(), flags as c_long) };
    if r < 0 {
        println!("finit {path} flags={flags} args={args:?}: {}", err_name(errno()));
        return ExitCode::from(1);
    }
    println!("finit {path} flags={flags} args={args:?}: ok");
    ExitCode::SUCCESS
}

fn algbind(ty: &str, name: &str) -> ExitCode {
    // struct sockaddr_alg { u16 family; u8 type[14]; u32 feat; u32 mask; u8 name[64]; }
    let mut addr = [0u8; 88];
    addr[0..2].copy_from_slice(&(AF_ALG as u16).to_ne_bytes());
    addr[2..2 + ty.len().min(13)].copy_from_slice(&ty.as_bytes()[..ty.len().min(13)]);
    addr[24..24 + name.len().min(63)].copy_from_slice(&name.as_bytes()[..name.len().min(63)]);
    // SAFETY: plain syscall wrappers.
    let fd = unsafe { socket(AF_ALG, SOCK_SEQPACKET, 0) };
    if fd < 0 {
        println!("algbind {ty} {name}: socket: {}", err_name(errno()));
        return ExitCode::from(2);
    }
    // SAFETY: addr is a complete sockaddr_alg.
    let r = unsafe { bind(fd, addr.as_ptr(), addr.len() as u32) };
    let e = errno();
    // SAFETY: our descriptor.
    unsafe { close(fd) };
    if r < 0 {
        println!("algbind {ty} {name}: {}", err_name(e));
        return ExitCode::from(1);
    }
    println!("algbind {ty} {name}: ok");
    ExitCode::SUCCESS
}

fn bpf(cmd: c_long, attr: &mut [u8; 128]) -> c_long {
    // SAFETY: a zeroed bpf_attr of 128 bytes, filled per command below.
    unsafe { syscall(SYS_BPF, cmd, attr.as_mut_ptr(), attr.len() as u32) }
}

fn mapset(pin: &str, offset: usize, value: u32) -> ExitCode {
    let p = CString::new(pin).unwrap_or_default();
    // BPF_OBJ_GET (7): pathname @0.
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(p.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(7, &mut attr);
    if fd < 0 {
        println!("mapset {pin}: open: {}", err_name(errno()));
        return ExitCode::from(2);
    }
    // BPF_OBJ_GET_INFO_BY_FD (15): bpf_fd @0, info_len @4, info @8; value_size @12 of the info.
    let mut info = [0u8; 80];
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(fd as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    if bpf(15, &mut attr) < 0 {
        println!("mapset {pin}: info: {}", err_name(errno()));
        return ExitCode::from(2);
    }
    let value_size = u32::from_ne_bytes([info[12], info[13], info[14], info[15]]) as usize;
    if offset + 4 > value_size {
        println!("mapset {pin}: offset {offset} past the value ({value_size} bytes)");
        return ExitCode::from(2);
    }
    let key = 0u32;
    let mut val = vec![0u8; value_size];
    // BPF_MAP_LOOKUP_ELEM (1) / BPF_MAP_UPDATE_ELEM (2): map_fd @0, key @8, value @16, flags @24.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(fd as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(&key as *const u32 as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(val.as_mut_ptr() as u64).to_ne_bytes());
    if bpf(1, &mut attr) < 0 {
        println!("mapset {pin}: lookup: {}", err_name(errno()));
        return ExitCode::from(2);
    }
    let old = u32::from_ne_bytes([val[offset], val[offset + 1], val[offset + 2], val[offset + 3]]);
    val[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
    if bpf(2, &mut attr) < 0 {
        println!("mapset {pin}: update: {}", err_name(errno()));
        return ExitCode::from(2);
    }
    println!("mapset {pin}: offset {offset}: {old} -> {value}");
    ExitCode::SUCCESS
}

fn detach(pin: &str) -> ExitCode {
    let p = CString::new(pin).unwrap_or_default();
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(p.as_ptr() as u64).to_ne_bytes());
    // BPF_OBJ_GET
    let fd = bpf(7, &mut attr);
    if fd < 0 {
        println!("detach {pin}: open: {}", err_name(errno()));
        return ExitCode::from(2);
    }
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(fd as u32).to_ne_bytes());
    // BPF_LINK_DETACH
    if bpf(34, &mut attr) < 0 {
        println!("detach {pin}: {}", err_name(errno()));
        return ExitCode::from(1);
    }
    println!("detach {pin}: ok");
    ExitCode::SUCCESS
}

fn patch(file: &str, from: &str, to: &str) -> ExitCode {
    let (f, t) = (from.as_bytes(), to.as_bytes());
    if f.len() != t.len() || f.is_empty() {
        println!("patch: FROM and TO must have the same, non-zero length");
        return ExitCode::from(2);
    }
    let Ok(mut data) = std::fs::read(file) else {
        println!("patch: cannot read {file}");
        return ExitCode::from(2);
    };
    let Some(at) = data.windows(f.len()).position(|w| w == f) else {
        println!("patch: {from:?} not in {file}");
        return ExitCode::from(1);
    };
    data[at..at + t.len()].copy_from_slice(t);
    if std::fs::write(file, &data).is_err() {
        println!("patch: cannot write {file}");
        return ExitCode::from(2);
    }
    println!("patch {file}: {from:?} -> {to:?} at byte {at}");
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let num = |i: usize| arg(i).parse::<u64>().unwrap_or(0);
    match arg(1).as_str() {
        "flood" => flood(num(2) as i32, num(3)),
        "finit" => finit(&arg(2), num(3) as i32, &arg(4)),
        "algbind" => algbind(&arg(2), &arg(3)),
        "mapset" => mapset(&arg(2), num(3) as usize, num(4) as u32),
        "patch" => patch(&arg(2), &arg(3), &arg(4)),
        "detach" => detach(&arg(2)),
        _ => {
            eprintln!("usage: kmodmon-vm-tool flood|finit|algbind|mapset|patch|detach ... (see the source)");
            ExitCode::from(2)
        }
    }
}
