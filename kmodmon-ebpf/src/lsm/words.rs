//! Name buffers handled a 32-bit word at a time, without a branch per byte and without the
//! memset/memcpy calls the compiler would emit for whole arrays: byte loops inside the
//! programs' cgroup walk multiply the paths the verifier explores past its limit.
//!
//! Strings read with `bpf_probe_read_kernel_str` end in a NUL and leave whatever was in the
//! buffer after it; [`cut`] clears everything from the first NUL (or '.') on, so buffers never
//! need zeroing first.

/// A buffer of `N` 32-bit words (its address must be 4-byte aligned).
#[inline(always)]
fn word_ptr<const B: usize>(buf: &mut [u8; B]) -> *mut u32 {
    buf.as_mut_ptr().cast()
}

/// The high bit of every byte of `w` that is zero (exact: no false positives).
#[inline(always)]
fn zero_bytes(w: u32) -> u32 {
    !(((w & 0x7f7f_7f7f).wrapping_add(0x7f7f_7f7f)) | w | 0x7f7f_7f7f)
}

/// '-' → '_' in every byte.
#[inline(always)]
fn normalize_word(w: u32) -> u32 {
    // '-' ^ 0x72 == '_'.
    w ^ ((zero_bytes(w ^ 0x2d2d_2d2d) >> 7).wrapping_mul(0x72))
}

/// Zeroes `buf` (`B` a multiple of 4).
#[inline(always)]
pub fn zero<const B: usize>(buf: &mut [u8; B]) {
    let p = word_ptr(buf);
    for i in 0..B / 4 {
        // SAFETY: i < B / 4 words lie inside `buf`; volatile keeps it from becoming a memset.
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
    }
}

/// Copies `src` into `dst` (`B` a multiple of 4).
#[inline(always)]
pub fn copy<const B: usize>(dst: &mut [u8; B], src: &[u8; B]) {
    let d = word_ptr(dst);
    let s: *const u32 = src.as_ptr().cast();
    for i in 0..B / 4 {
        // SAFETY: both buffers hold B / 4 words; volatile keeps it from becoming a memcpy.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
    }
}

/// Clears everything from the first NUL on (and from the first '.' on, with `at_dot`), and
/// with `normalize` turns '-' into '_' in what is kept.
#[inline(always)]
pub fn cut<const B: usize>(buf: &mut [u8; B], at_dot: bool, normalize: bool) {
    let p = word_ptr(buf);
    // All ones once the end was seen: every later word is cleared.
    let mut ended = 0u32;
    for i in 0..B / 4 {
        // SAFETY: as in `zero`.
        let mut w = unsafe { core::ptr::read_volatile(p.add(i)) } & !ended;
        let mut z = zero_bytes(w);
        if at_dot {
            z |= zero_bytes(w ^ 0x2e2e_2e2e);
        }
        // Keep the bytes below the first marker: the lowest set bit of z is bit 8k+7.
        let low = z & z.wrapping_neg();
        let keep = if z == 0 {
            u32::MAX
        } else {
            (low >> 7).wrapping_sub(1)
        };
        ended |= 0u32.wrapping_sub((z != 0) as u32);
        w &= keep;
        if normalize {
            w = normalize_word(w);
        }
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(p.add(i), w) };
    }
}

/// Whether two buffers hold the same bytes.
#[inline(always)]
pub fn same<const B: usize>(a: &[u8; B], b: &[u8; B]) -> bool {
    let (pa, pb): (*const u32, *const u32) = (a.as_ptr().cast(), b.as_ptr().cast());
    let mut diff = 0u32;
    for i in 0..B / 4 {
        // SAFETY: both buffers hold B / 4 words.
        diff |=
            unsafe { core::ptr::read_volatile(pa.add(i)) ^ core::ptr::read_volatile(pb.add(i)) };
    }
    diff == 0
}

/// The little-endian u64 at byte `at` of `buf` (aligned or not), 0 when it does not fit.
#[inline(always)]
pub fn u64_at<const B: usize>(buf: &[u8; B], at: usize) -> u64 {
    if at > B - 8 {
        return 0;
    }
    // SAFETY: at + 8 <= B.
    unsafe { core::ptr::read_unaligned(buf.as_ptr().add(at).cast::<u64>()) }
}
