//! Records in the reader → enrich queue, packed: a [`RawEvent`] is 1176 bytes, mostly the unused
//! rest of its string buffers (a delete_module attempt names a module of a few bytes and has no
//! parameters or path). Packed, such a record takes about 300 bytes, so the same memory holds
//! four times as many records while the enrich task catches up with a storm.
//!
//! Each record: its fixed fields (everything before `name`), the used part of `name` and
//! `params` (up to the first NUL), the used slots of `path` (`path_len` of them), and the
//! fields after `path`. [`Packed::iter`] gives back the same `RawEvent` with the unused buffer
//! bytes zero (the kernel side clears them too, see kmodmon-ebpf `clear_strings`).
use std::mem::{offset_of, size_of};

use kmodmon_common::{NAME_LEN, PARAMS_LEN, PATH_COMPONENT_LEN, PATH_LEN, PATH_SLOTS, RawEvent};

use crate::event::{DecodeError, raw_from_bytes};

const FIXED: usize = offset_of!(RawEvent, name);
const NAME: usize = offset_of!(RawEvent, name);
const PARAMS: usize = offset_of!(RawEvent, params);
const PATH: usize = offset_of!(RawEvent, path);
const TAIL: usize = PATH + PATH_LEN;
const SIZE: usize = size_of::<RawEvent>();
const PATH_LEN_AT: usize = offset_of!(RawEvent, path_len);

const _: () = assert!(NAME + NAME_LEN == PARAMS && PARAMS + PARAMS_LEN == PATH);

/// A batch of packed records.
#[derive(Debug, Default)]
pub struct Packed {
    bytes: Vec<u8>,
    count: usize,
}

fn used(buf: &[u8]) -> &[u8] {
    match buf.iter().position(|&b| b == 0) {
        Some(n) => &buf[..n],
        None => buf,
    }
}

impl Packed {
    pub fn with_capacity(bytes: usize) -> Packed {
        Packed {
            bytes: Vec::with_capacity(bytes),
            count: 0,
        }
    }

    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the batch holds (what the queue's budget counts).
    pub fn byte_len(&self) -> usize {
        self.bytes.capacity()
    }

    /// Packs one record as the kernel wrote it (at least a RawEvent long).
    pub fn push_bytes(&mut self, rec: &[u8]) -> Result<(), DecodeError> {
        if rec.len() < SIZE {
            return Err(DecodeError::Short(rec.len(), SIZE));
        }
        let name = used(&rec[NAME..NAME + NAME_LEN]);
        let params = used(&rec[PARAMS..PARAMS + PARAMS_LEN]);
        let slots = u32::from_ne_bytes([
            rec[PATH_LEN_AT],
            rec[PATH_LEN_AT + 1],
            rec[PATH_LEN_AT + 2],
            rec[PATH_LEN_AT + 3],
        ]) as usize;
        let path = &rec[PATH..PATH + slots.min(PATH_SLOTS) * PATH_COMPONENT_LEN];
        let b = &mut self.bytes;
        b.extend_from_slice(&rec[..FIXED]);
        b.push(name.len() as u8);
        b.extend_from_slice(name);
        b.extend_from_slice(&(params.len() as u16).to_ne_bytes());
        b.extend_from_slice(params);
        b.extend_from_slice(&(path.len() as u16).to_ne_bytes());
        b.extend_from_slice(path);
        b.extend_from_slice(&rec[TAIL..SIZE]);
        self.count += 1;
        Ok(())
    }

    /// Packs a record kmodmon holds as a RawEvent (repeat summaries).
    pub fn push(&mut self, raw: &RawEvent) {
        // SAFETY: RawEvent is repr(C) plain data without padding (kmodmon-common checks it).
        let bytes =
            unsafe { std::slice::from_raw_parts((raw as *const RawEvent).cast::<u8>(), SIZE) };
        // A whole RawEvent is never short.
        let _ = self.push_bytes(bytes);
    }

    /// The records, unpacked.
    pub fn iter(&self) -> impl Iterator<Item = RawEvent> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let b = &self.bytes;
            if at >= b.len() {
                return None;
            }
            let mut full = [0u8; SIZE];
            full[..FIXED].copy_from_slice(&b[at..at + FIXED]);
            at += FIXED;
            let n = usize::from(b[at]);
            at += 1;
            full[NAME..NAME + n].copy_from_slice(&b[at..at + n]);
            at += n;
            let n = usize::from(u16::from_ne_bytes([b[at], b[at + 1]]));
            at += 2;
            full[PARAMS..PARAMS + n].copy_from_slice(&b[at..at + n]);
            at += n;
            let n = usize::from(u16::from_ne_bytes([b[at], b[at + 1]]));
            at += 2;
            full[PATH..PATH + n].copy_from_slice(&b[at..at + n]);
            at += n;
            full[TAIL..].copy_from_slice(&b[at..at + (SIZE - TAIL)]);
            at += SIZE - TAIL;
            raw_from_bytes(&full).ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmodmon_common::{EventKind, Op, Source};

    fn bytes(raw: &RawEvent) -> Vec<u8> {
        // SAFETY: as in `Packed::push`.
        unsafe { std::slice::from_raw_parts((raw as *const RawEvent).cast::<u8>(), SIZE) }.to_vec()
    }

    #[test]
    fn records_come_back_as_they_went_in_and_small() {
        let mut a = RawEvent::zeroed();
        a.kind = EventKind::UnloadAttempt as u32;
        a.source = Source::SysExit as u32;
        a.op = Op::DeleteModule as u32;
        a.pid = 7;
        a.ret = -38;
        a.name[..5].copy_from_slice(b"ip_vs");
        let mut b = RawEvent::zeroed();
        b.op = Op::FinitModule as u32;
        b.params[..PARAMS_LEN].fill(b'p');
        b.name[..NAME_LEN].fill(b'n');
        b.path_len = 2;
        b.path[..3].copy_from_slice(b"a.k");
        b.path[PATH_COMPONENT_LEN..PATH_COMPONENT_LEN + 3].copy_from_slice(b"lib");
        b.repeat = 99;
        b.repeat_final = 1;
        // A path_len the buffer cannot hold is cut to it.
        let mut c = RawEvent::zeroed();
        c.path_len = 1000;
        c.path.fill(b'x');
        let mut p = Packed::with_capacity(0);
        p.push_bytes(&bytes(&a)).unwrap();
        p.push(&b);
        p.push(&c);
        assert!(p.push_bytes(&[0u8; 10]).is_err());
        assert_eq!(p.len(), 3);
        let back: Vec<RawEvent> = p.iter().collect();
        assert_eq!(back.len(), 3);
        assert_eq!(bytes(&back[0]), bytes(&a));
        assert_eq!(bytes(&back[1]), bytes(&b));
        assert_eq!(bytes(&back[2]), bytes(&c));
        // The delete_module attempt: fixed fields, its name and lengths, the tail.
        let one = {
            let mut q = Packed::with_capacity(0);
            q.push(&a);
            q.bytes.len()
        };
        assert_eq!(one, FIXED + 1 + 5 + 2 + 2 + (SIZE - TAIL));
        assert!(one < 340, "{one}");
    }
}
