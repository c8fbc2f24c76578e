//! The few bpf(2) commands aya 0.14 does not expose and the self-check needs: open and pin
//! objects by raw fd, the full `bpf_link_info` (attach type and target of a tracing link), a
//! program's map ids, and the list of every link in the kernel. The structures are the UAPI's
//! (aya-obj's bindings); nothing here interprets kernel memory.
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info, bpf_map_info, bpf_prog_info};

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, zero-initialised bpf_attr of the kernel's expected size; the
    // kernel reads and writes within it (and within the buffers its pointers name).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a plain-data union; all zeroes is its documented initial state.
    unsafe { std::mem::zeroed() }
}

fn owned(fd: i64) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this new descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Opens the object pinned at `path` (BPF_OBJ_GET).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    owned(sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?)
}

/// Pins the object behind `fd` at `path` (BPF_OBJ_PIN; the path must not exist).
pub fn obj_pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    attr.__bindgen_anon_4.bpf_fd = fd.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Pins `fd` at `path`, replacing whatever is pinned there (pin beside, then rename over: the
/// old object is released only once the new pin is in place).
pub fn pin_over(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push("_new");
    let tmp = std::path::PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    obj_pin(fd, &tmp)?;
    std::fs::rename(&tmp, path)
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info` (of type `T`).
fn info<T>(fd: i32, info: &mut T) -> io::Result<()> {
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = fd as u32;
    attr.info.info_len = std::mem::size_of::<T>() as u32;
    attr.info.info = info as *mut T as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

/// What the kernel says about a link (for a tracing link: its attach type and target).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// Tracing links only (`BPF_LINK_TYPE_TRACING`), else 0.
    pub attach_type: u32,
    pub target_obj_id: u32,
    pub target_btf_id: u32,
}

/// The info of the link behind `fd`. `tracing_type`: the value of BPF_LINK_TYPE_TRACING
/// (from BTF), whose union member is then read.
pub fn link_info(fd: &impl AsRawFd, tracing_type: u32) -> io::Result<LinkInfo> {
    // SAFETY: plain data, zero is valid.
    let mut li: bpf_link_info = unsafe { std::mem::zeroed() };
    // A zeroed info carries no buffer pointers, which is valid for every link type.
    info(fd.as_raw_fd(), &mut li)?;
    let mut out = LinkInfo {
        link_type: li.type_,
        id: li.id,
        prog_id: li.prog_id,
        ..LinkInfo::default()
    };
    if li.type_ == tracing_type {
        // SAFETY: the kernel filled the tracing member for a tracing link.
        let t = unsafe { li.__bindgen_anon_1.tracing };
        out.attach_type = t.attach_type;
        out.target_obj_id = t.target_obj_id;
        out.target_btf_id = t.target_btf_id;
    }
    Ok(out)
}

/// What the kernel says about a program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgInfo {
    pub id: u32,
    pub prog_type: u32,
    pub name: String,
    pub map_ids: Vec<u32>,
}

pub fn prog_info(fd: &impl AsRawFd) -> io::Result<ProgInfo> {
    // SAFETY: plain data, zero is valid.
    let mut pi: bpf_prog_info = unsafe { std::mem::zeroed() };
    info(fd.as_raw_fd(), &mut pi)?;
    let n = pi.nr_map_ids as usize;
    let mut ids = vec![0u32; n];
    if n > 0 {
        // SAFETY: as above.
        let mut again: bpf_prog_info = unsafe { std::mem::zeroed() };
        again.nr_map_ids = n as u32;
        again.map_ids = ids.as_mut_ptr() as u64;
        info(fd.as_raw_fd(), &mut again)?;
        ids.truncate((again.nr_map_ids as usize).min(n));
    }
    let name: Vec<u8> = pi
        .name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    Ok(ProgInfo {
        id: pi.id,
        prog_type: pi.type_,
        name: String::from_utf8_lossy(&name).into_owned(),
        map_ids: ids,
    })
}

/// The id of the map behind `fd`.
pub fn map_id(fd: &impl AsRawFd) -> io::Result<u32> {
    // SAFETY: plain data, zero is valid.
    let mut mi: bpf_map_info = unsafe { std::mem::zeroed() };
    info(fd.as_raw_fd(), &mut mi)?;
    Ok(mi.id)
}

/// The id of the object pinned at `path` (a link, program or map: `what` says which info to
/// read); `None` when nothing is pinned there.
pub fn pinned_id(path: &Path, what: Pinned, tracing_type: u32) -> io::Result<Option<u32>> {
    let fd = match obj_get(path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some(match what {
        Pinned::Link => link_info(&fd, tracing_type)?.id,
        Pinned::Prog => prog_info(&fd)?.id,
        Pinned::Map => map_id(&fd)?,
    }))
}

/// What kind of object a pin holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pinned {
    Link,
    Prog,
    Map,
}

/// Every link in the kernel, by id, with its info.
pub fn all_links(tracing_type: u32) -> io::Result<Vec<LinkInfo>> {
    let mut out = Vec::new();
    let mut id = 0u32;
    loop {
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_6.__bindgen_anon_1.start_id = id;
        match sys_bpf(bpf_cmd::BPF_LINK_GET_NEXT_ID, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        // SAFETY: the kernel wrote next_id.
        id = unsafe { attr.__bindgen_anon_6.next_id };
        let mut by_id = zeroed_attr();
        by_id.__bindgen_anon_6.__bindgen_anon_1.link_id = id;
        let fd = match sys_bpf(bpf_cmd::BPF_LINK_GET_FD_BY_ID, &mut by_id) {
            Ok(fd) => owned(fd)?,
            // Released between the two calls.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        out.push(link_info(&fd, tracing_type)?);
    }
    Ok(out)
}

/// A program's name, by id (for reporting a foreign program).
pub fn prog_name(id: u32) -> Option<String> {
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_6.__bindgen_anon_1.prog_id = id;
    let fd = owned(sys_bpf(bpf_cmd::BPF_PROG_GET_FD_BY_ID, &mut attr).ok()?).ok()?;
    prog_info(&fd).ok().map(|p| p.name)
}
