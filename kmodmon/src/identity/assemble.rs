//! Puts the IMAGES ring's records back together into images, on the ring-buffer reader (copy
//! only: hashing and parsing happen on the enrich task).
//!
//! A capture's header is reserved before its chunks and submitted after them, so it is read
//! first and already says how many chunks follow (see kmodmon_common::identity).
use std::collections::HashMap;

use kmodmon_common::identity::{
    IMAGE_CHUNK_LEN, ImageChunk, ImageHeader, ImageVerdict, image_kind, image_status,
};

/// A finished capture: the header and the bytes that arrived.
#[derive(Debug)]
pub struct Image {
    pub header: ImageHeader,
    /// The image when `complete`; else what arrived (not to be hashed).
    pub data: Vec<u8>,
    /// Every byte of the image is here.
    pub complete: bool,
    /// Why not, in words (kernel status bits, or chunks missing here).
    pub problem: Option<String>,
}

/// What one record of the IMAGES ring amounts to.
#[derive(Debug)]
pub enum Record {
    /// Nothing yet (a header waiting for chunks, or a chunk of it).
    Pending,
    Image(Box<Image>),
    Verdict(ImageVerdict),
    /// A record that fits no capture (counted by the caller).
    Stray(String),
}

struct Capture {
    image: Image,
    expected: u32,
    received: u32,
}

/// Captures in progress, by (id, tid).
#[derive(Default)]
pub struct Assembler {
    open: HashMap<(u64, u32), Capture>,
}

/// Most captures in progress at once (a capture finishes within one reader drain, since its
/// header is submitted after its chunks; more means records were lost).
const MAX_OPEN: usize = 64;

fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= std::mem::size_of::<T>())
        // SAFETY: T is a plain-data repr(C) type of the contract; the length was checked.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

impl Assembler {
    /// Takes one record off the IMAGES ring.
    pub fn record(&mut self, bytes: &[u8]) -> Record {
        let Some(kind) = read::<u32>(bytes) else {
            return Record::Stray(format!("image record of {} bytes", bytes.len()));
        };
        match kind {
            image_kind::HEADER => match read::<ImageHeader>(bytes) {
                Some(h) => self.header(h),
                None => Record::Stray("short image header".into()),
            },
            image_kind::CHUNK => self.chunk(bytes),
            image_kind::VERDICT => match read::<ImageVerdict>(bytes) {
                Some(v) => Record::Verdict(v),
                None => Record::Stray("short verdict record".into()),
            },
            k => Record::Stray(format!("image record of unknown kind {k}")),
        }
    }

    fn header(&mut self, h: ImageHeader) -> Record {
        let mut problem = status_words(h.status);
        let sent = u64::from(h.chunks) * IMAGE_CHUNK_LEN as u64;
        let whole = h.status == 0 && sent >= h.len && sent < h.len + IMAGE_CHUNK_LEN as u64;
        if h.status == 0 && !whole && h.len > 0 {
            problem = Some(format!(
                "the kernel sent {} chunks for {} bytes",
                h.chunks, h.len
            ));
        }
        let cap = if whole {
            usize::try_from(h.len).unwrap_or(0)
        } else {
            0
        };
        let image = Image {
            header: h,
            data: vec![0; cap],
            complete: whole,
            problem,
        };
        if h.chunks == 0 {
            return Record::Image(Box::new(image));
        }
        if self.open.len() >= MAX_OPEN {
            // Captures whose chunks never came: give them up (their events say so).
            self.open.clear();
        }
        self.open.insert(
            (h.id, h.tid),
            Capture {
                image,
                expected: h.chunks,
                received: 0,
            },
        );
        Record::Pending
    }

    fn chunk(&mut self, bytes: &[u8]) -> Record {
        const DATA: usize = std::mem::offset_of!(ImageChunk, data);
        let (Some(kind_len), Some(id), Some(tid_index)) = (
            read::<[u32; 2]>(bytes),
            bytes.get(8..).and_then(read::<u64>),
            bytes.get(16..).and_then(read::<[u32; 2]>),
        ) else {
            return Record::Stray("short image chunk".into());
        };
        let (len, tid, index) = (kind_len[1] as usize, tid_index[0], tid_index[1]);
        let Some(cap) = self.open.get_mut(&(id, tid)) else {
            return Record::Stray(format!("image chunk {index} of tid {tid} without a header"));
        };
        let Some(src) = bytes.get(DATA..DATA + len.min(IMAGE_CHUNK_LEN)) else {
            return Record::Stray("image chunk shorter than its length".into());
        };
        if cap.image.complete {
            let at = index as usize * IMAGE_CHUNK_LEN;
            match cap.image.data.get_mut(at..at + src.len()) {
                Some(dst) => dst.copy_from_slice(src),
                None => {
                    cap.image.complete = false;
                    cap.image.problem = Some(format!("chunk {index} lies beyond the image"));
                }
            }
        }
        cap.received += 1;
        if cap.received < cap.expected {
            return Record::Pending;
        }
        match self.open.remove(&(id, tid)) {
            Some(done) => Record::Image(Box::new(done.image)),
            None => Record::Pending,
        }
    }

    /// Captures still waiting for chunks (given up at shutdown).
    pub fn open(&self) -> usize {
        self.open.len()
    }
}

/// The kernel's reasons, in words.
pub fn status_words(status: u32) -> Option<String> {
    let mut w = Vec::new();
    if status & image_status::TOO_LARGE != 0 {
        w.push("the image is larger than the capture limit");
    }
    if status & image_status::RING_FULL != 0 {
        w.push("the image ring buffer was full");
    }
    if status & image_status::READ_FAILED != 0 {
        w.push("reading the image out of kernel memory failed");
    }
    if status & image_status::NO_IMAGE != 0 {
        w.push("the kernel handed over no image (or it could not be located)");
    }
    (!w.is_empty()).then(|| w.join(", "))
}

#[cfg(test)]
mod tests {
    use kmodmon_common::identity::image_via;

    use super::*;

    fn header(id: u64, tid: u32, len: u64, chunks: u32, status: u32) -> Vec<u8> {
        let h = ImageHeader {
            kind: image_kind::HEADER,
            status,
            pid: tid,
            tid,
            id,
            len,
            chunks,
            load_flags: 0,
            cgroup_id: 1,
            mnt_ns: 7,
            via: image_via::LOAD_MODULE,
        };
        // SAFETY: plain data.
        unsafe {
            std::slice::from_raw_parts((&h as *const ImageHeader).cast::<u8>(), size_of_val(&h))
        }
        .to_vec()
    }

    fn chunk(id: u64, tid: u32, index: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&image_kind::CHUNK.to_ne_bytes());
        v.extend_from_slice(&(data.len() as u32).to_ne_bytes());
        v.extend_from_slice(&id.to_ne_bytes());
        v.extend_from_slice(&tid.to_ne_bytes());
        v.extend_from_slice(&index.to_ne_bytes());
        v.extend_from_slice(data);
        v.resize(std::mem::size_of::<ImageChunk>(), 0xee);
        v
    }

    #[test]
    fn chunks_rebuild_the_image_even_interleaved() {
        let mut a = Assembler::default();
        let len = IMAGE_CHUNK_LEN + 10;
        let img: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        assert!(matches!(
            a.record(&header(5, 1, len as u64, 2, 0)),
            Record::Pending
        ));
        assert!(matches!(a.record(&header(6, 2, 3, 1, 0)), Record::Pending));
        assert!(matches!(
            a.record(&chunk(5, 1, 0, &img[..IMAGE_CHUNK_LEN])),
            Record::Pending
        ));
        let Record::Image(small) = a.record(&chunk(6, 2, 0, b"abc")) else {
            panic!("the small image is done");
        };
        assert_eq!(small.data, b"abc");
        let Record::Image(big) = a.record(&chunk(5, 1, 1, &img[IMAGE_CHUNK_LEN..])) else {
            panic!("the big image is done");
        };
        assert!(big.complete && big.problem.is_none());
        assert_eq!(big.data, img);
        assert_eq!(a.open(), 0);
    }

    #[test]
    fn an_incomplete_capture_says_why() {
        let mut a = Assembler::default();
        let Record::Image(i) = a.record(&header(1, 1, 20 << 20, 0, image_status::TOO_LARGE)) else {
            panic!("a header without chunks is done at once");
        };
        assert!(!i.complete);
        assert!(i.problem.unwrap().contains("larger"));
        assert!(matches!(
            a.record(&header(
                2,
                1,
                3 * IMAGE_CHUNK_LEN as u64,
                1,
                image_status::RING_FULL
            )),
            Record::Pending
        ));
        let Record::Image(i) = a.record(&chunk(2, 1, 0, &[1; 10])) else {
            panic!("done after the chunks that were sent");
        };
        assert!(!i.complete && i.problem.unwrap().contains("ring buffer was full"));
        assert!(matches!(a.record(&chunk(9, 9, 0, b"x")), Record::Stray(_)));
        assert!(matches!(a.record(&[1, 2]), Record::Stray(_)));
    }
}
