//! Naming a module from the bytes the kernel is about to load (an init_module image, or a
//! finit_module file as read): the `struct module` in `.gnu.linkonce.this_module` gives the name
//! the kernel will use; `.modinfo`'s `name=` (modpost writes it near the end) is the cross-check.
use aya_ebpf::helpers::{bpf_probe_read_kernel, generated};
use kmodmon_common::{
    OFFSET_UNKNOWN,
    policy::{MAX_IMAGE_SECTIONS, MODINFO_TAIL, NAME_KEY_LEN, THIS_MODULE_SECTION},
};

use super::{Scratch, read_name};

/// Elf64_Ehdr and Elf64_Shdr field offsets.
const E_SHOFF: u64 = 0x28;
const E_SHNUM: u64 = 0x3c;
const E_SHSTRNDX: u64 = 0x3e;
const SHDR_SIZE: u64 = 64;
const SH_OFFSET: u64 = 0x18;
const SH_SIZE: u64 = 0x20;
/// "\x7fELF", read as a little-endian u32.
pub const ELF_MAGIC: u32 = 0x464c_457f;

#[inline(always)]
pub fn read_at<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel validates the address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

const fn words(s: &[u8]) -> [u64; 4] {
    let mut out = [0u64; 4];
    let mut i = 0;
    while i < 32 {
        if i < s.len() {
            out[i / 8] |= (s[i] as u64) << ((i % 8) * 8);
        }
        i += 1;
    }
    out
}
const THIS_MODULE: [u64; 4] = words(THIS_MODULE_SECTION);
/// ".modinfo\0" (the second word's low byte is its NUL).
const MODINFO: [u64; 4] = words(b".modinfo\0");
/// "\0name=" in the low six bytes of a word.
const NAME_PATTERN: u64 = words(b"\0name=")[0];

/// An image's section headers.
///
/// The loops below never leave early: what they find goes into map memory (`Scratch::found`,
/// `Scratch::pos`), which the verifier does not track, and the loop runs to its bound. A
/// loop that left at its k-th header would reach the rest of the program in a state of its
/// own for every k, and the verifier would check the rest once per k.
struct Sections {
    buf: u64,
    /// The image's size, in map memory (as `shnum`).
    size: *const u64,
    shoff: u64,
    /// The number of headers, in map memory (read afresh each iteration, so its range does
    /// not narrow with the loop counter's).
    shnum: *const u64,
    strtab: u64,
}

impl Sections {
    /// Writes to `out` the header address of the first section named `name` (its 32-byte
    /// words; of the fourth word only the bytes `last_mask` keeps are compared; for a name
    /// shorter than 16 bytes, of the second), 0 when there is none.
    #[inline(always)]
    fn find(&self, name: &[u64; 4], last_mask: u64, out: *mut u64) {
        let short = name[2] == 0;
        // SAFETY: `out` and `shnum` point into the scratch map, valid for the program's run.
        unsafe { core::ptr::write_volatile(out, 0) };
        for i in 1..MAX_IMAGE_SECTIONS as u64 {
            // SAFETY: as above.
            if i >= unsafe { core::ptr::read_volatile(self.shnum) } {
                continue;
            }
            let sh = self.buf + self.shoff + i * SHDR_SIZE;
            let Some(sh_name) = read_at::<u32>(sh) else {
                continue;
            };
            let at = self.strtab + sh_name as u64;
            // SAFETY: as above.
            if at + 32 > unsafe { core::ptr::read_volatile(self.size) } {
                continue;
            }
            let Some(w) = read_at::<[u64; 4]>(self.buf + at) else {
                continue;
            };
            let hit = if short {
                w[0] == name[0] && w[1] & last_mask == name[1]
            } else {
                w[0] == name[0] && w[1] == name[1] && w[2] == name[2] && w[3] & last_mask == name[3]
            };
            // SAFETY: as above.
            if hit && unsafe { core::ptr::read_volatile(out) } == 0 {
                // SAFETY: as above.
                unsafe { core::ptr::write_volatile(out, sh) };
            }
        }
    }
}

/// What the image says.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// Not an ELF image (a compressed file the kernel decompresses itself).
    NotElf,
    /// ELF, but no name could be read: the kernel cannot load it either.
    Unnamed,
    /// `s.key.name` holds the `struct module` name; `modinfo` is true when `.modinfo`'s
    /// `name=` was found (in `s.alt`).
    Named { modinfo: bool },
}

/// Names the image of `size` bytes at `buf` (kernel memory); `name_off` is `name`'s offset in
/// `struct module` (BTF). Every offset is checked against `size`.
#[inline(always)]
pub fn name_image(s: &mut Scratch, buf: u64, size: u64, name_off: u32) -> Image {
    if buf == 0 || size < SHDR_SIZE || read_at::<u32>(buf) != Some(ELF_MAGIC) {
        return Image::NotElf;
    }
    if name_off == OFFSET_UNKNOWN {
        return Image::Unnamed;
    }
    let (Some(shoff), Some(shnum), Some(shstrndx)) = (
        read_at::<u64>(buf + E_SHOFF),
        read_at::<u16>(buf + E_SHNUM),
        read_at::<u16>(buf + E_SHSTRNDX),
    ) else {
        return Image::Unnamed;
    };
    let (shnum, shstrndx) = (shnum as u64, shstrndx as u64);
    if shoff > size || shnum * SHDR_SIZE > size - shoff || shstrndx >= shnum {
        return Image::Unnamed;
    }
    let Some(strtab) = read_at::<u64>(buf + shoff + shstrndx * SHDR_SIZE + SH_OFFSET) else {
        return Image::Unnamed;
    };
    if strtab >= size {
        return Image::Unnamed;
    }
    // SAFETY: valid, exclusive fields of the scratch map.
    unsafe {
        core::ptr::write_volatile(&mut s.pos, shnum);
        core::ptr::write_volatile(&mut s.depth_size, size);
    }
    let sections = Sections {
        buf,
        size: &s.depth_size,
        shoff,
        shnum: &s.pos,
        strtab,
    };
    sections.find(&THIS_MODULE, 0xffff, &mut s.found[0]);
    sections.find(&MODINFO, 0xff, &mut s.found[1]);
    // SAFETY: valid fields of the scratch map.
    let (tm, mi) = unsafe {
        (
            core::ptr::read_volatile(&s.found[0]),
            core::ptr::read_volatile(&s.found[1]),
        )
    };
    if tm == 0 {
        return Image::Unnamed;
    }
    let Some(tm_off) = read_at::<u64>(tm + SH_OFFSET) else {
        return Image::Unnamed;
    };
    let (mi_off, mi_size) = if mi == 0 {
        (0, 0)
    } else {
        (
            read_at::<u64>(mi + SH_OFFSET).unwrap_or(0),
            read_at::<u64>(mi + SH_SIZE).unwrap_or(0),
        )
    };
    let name_at = tm_off.saturating_add(name_off as u64);
    if name_at.saturating_add(NAME_KEY_LEN as u64) > size {
        return Image::Unnamed;
    }
    let (named, cut) = read_name(buf + name_at, &mut s.key.name, true);
    if !named || cut {
        return Image::Unnamed;
    }
    let modinfo = mi_off != 0
        && mi_size >= 8
        && mi_off.saturating_add(mi_size) <= size
        && modinfo_name(s, buf, buf + mi_off, mi_size);
    Image::Named { modinfo }
}

/// Looks for `name=` in the last [`MODINFO_TAIL`] bytes of `.modinfo` (at `start`, `len`
/// bytes; the image holds at least `MODINFO_TAIL` bytes before its end) and copies the name
/// into `s.alt`.
#[inline(always)]
fn modinfo_name(s: &mut Scratch, image: u64, start: u64, len: u64) -> bool {
    let end = start + len;
    if end < image + MODINFO_TAIL as u64 {
        return false;
    }
    // A constant size for the verifier: the window may begin before `.modinfo` (when it is
    // shorter); matches there are ignored.
    let from = end - MODINFO_TAIL as u64;
    let first = (MODINFO_TAIL as u64).saturating_sub(len);
    // SAFETY: the size is the buffer's; the helper validates the source.
    let r = unsafe {
        generated::bpf_probe_read_kernel(s.tail.as_mut_ptr().cast(), MODINFO_TAIL, from as *const _)
    };
    if r < 0 {
        return false;
    }
    // A rolling window of the last eight bytes; the name is read after the loop, once.
    let mut window = 0u64;
    // SAFETY: a valid, exclusive field of the scratch map.
    unsafe { core::ptr::write_volatile(&mut s.pos, 0) };
    // Where `.modinfo` begins in the window: in map memory, read afresh at each byte (compared
    // with the loop counter in a register, its range would split at every byte, and each
    // part be verified on its own through the rest of the loop).
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&mut s.found[0], first + 5) };
    for j in 0..MODINFO_TAIL as usize {
        window = (window >> 8) | ((s.tail[j] as u64) << 56);
        // The first match in the window counts; the loop runs on (see `Sections`).
        // SAFETY: as above.
        if window >> 16 == NAME_PATTERN
            && j as u64 >= unsafe { core::ptr::read_volatile(&s.found[0]) }
            && unsafe { core::ptr::read_volatile(&s.pos) } == 0
        {
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(&mut s.pos, j as u64 + 1) };
        }
    }
    // SAFETY: as above.
    let hit = unsafe { core::ptr::read_volatile(&s.pos) };
    hit != 0 && hit <= MODINFO_TAIL as u64 && read_name(from + hit, &mut s.alt, true).0
}
