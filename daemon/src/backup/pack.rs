//! Packs: the small objects of one backup (its deltas) stored together in a few store objects.
//!
//! 1% of scattered 4 KiB writes change every 4 MiB chunk a little, so an incremental stores a
//! delta per chunk: thousands of objects of a few KiB, where creating each object (an inode on
//! a local store, a PUT on S3) cost more than its bytes. A pack holds them one after another,
//! each byte for byte the object it would be on its own (header, checksum, payload), and the
//! manifest records where each one lies ([`PackedAt`]). Whole chunks stay objects of their own,
//! named by their id, so dedup across backups and volumes still finds them by listing.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backup::chunk::{ChunkId, HEADER_LEN_BYTES};
use crate::storage::aligned::{AlignedBuf, AlignedPool, ALIGN_BYTES};

/// Packs a backup stores at once. While that many are on their way (a slow or unreachable
/// store), nothing more is packed, so a backup holds at most this many full packs, one filling
/// and what the appends already admitted add: about 16 MiB with the 4 MiB buffers of
/// `Backups::encode_buffers`.
const MAX_PACK_UPLOADS: usize = 3;
/// Pack buffers one backup holds at most: those being stored and the one filling.
pub const BUFFERS_PER_BACKUP: usize = MAX_PACK_UPLOADS + 1;
/// The largest packed object a reader accepts. The writer's objects are bounded by its buffer
/// (4 MiB + 4 KiB), which the largest delta fits (see `upload::MAX_DELTA_BLOCKS`).
pub const MAX_PACKED_OBJECT_BYTES: u64 = crate::backup::chunk::MAX_OBJECT_BYTES;
const PACK_NAME_MAX_LEN: usize = 100;

/// Where a packed object lies: `len_bytes` bytes at `offset_bytes` of object `packs/<pack>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackedAt {
    pub pack: String,
    pub offset_bytes: u64,
    pub len_bytes: u64,
}

impl PackedAt {
    /// Why this location cannot be right, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if !valid_pack_name(&self.pack) {
            return Err(format!("invalid pack name {:?}", self.pack));
        }
        if self.len_bytes < HEADER_LEN_BYTES as u64 || self.len_bytes > MAX_PACKED_OBJECT_BYTES {
            return Err(format!(
                "packed object of {} bytes in pack {} (expected {HEADER_LEN_BYTES} to {MAX_PACKED_OBJECT_BYTES})",
                self.len_bytes, self.pack
            ));
        }
        if self.offset_bytes.checked_add(self.len_bytes).is_none() {
            return Err(format!(
                "packed object at offset {} overflows",
                self.offset_bytes
            ));
        }
        Ok(())
    }
}

/// The name prefix of the packs one run of backup `backup_id` writes: `<backup id>-<8 hex>`.
pub fn run_name(backup_id: &str, now_unix_secs: u64) -> String {
    format!(
        "{backup_id}-{:08x}",
        crate::backup::manifest::random_u32(now_unix_secs)
    )
}

/// Pack names become object keys: [A-Za-z0-9-] only, like backup ids.
pub fn valid_pack_name(name: &str) -> bool {
    (1..=PACK_NAME_MAX_LEN).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

pub fn pack_key(name: &str) -> String {
    format!("packs/{name}")
}

/// The pack name of a listed object key (with any store prefix in front), or `None` for
/// anything [`pack_key`] does not produce, so GC never touches foreign objects.
pub fn parse_pack_key(key: &str) -> Option<String> {
    let (dir, name) = key.rsplit_once('/')?;
    let dir_ok = dir == "packs" || dir.ends_with("/packs");
    (dir_ok && valid_pack_name(name)).then(|| name.to_owned())
}

/// A pack ready to be stored.
pub struct FullPack {
    pub name: String,
    /// The pack's `len` bytes, then zeroes to a whole number of 4 KiB blocks, 4 KiB-aligned
    /// in memory: a local store writes it with O_DIRECT.
    pub padded: Bytes,
    pub len: usize,
    /// The objects in it and where.
    pub entries: Vec<(ChunkId, PackedAt)>,
}

/// The pack a backup is filling. Packs are named `<backup id>-<run>-<sequence>`, `run` random
/// per run of the job: a job resumed after a stop never writes over a pack of an earlier run,
/// which a manifest stored just before the stop may reference.
pub struct PackWriter {
    run_name: String,
    buffers: Arc<AlignedPool>,
    filling: Mutex<Filling>,
    uploads: tokio::sync::Semaphore,
}

#[derive(Default)]
struct Filling {
    sequence: u32,
    /// Taken from the pool at the first append; whatever an earlier pack or chunk encoding
    /// left in it is overwritten or zeroed before the pack is stored.
    buffer: Option<AlignedBuf>,
    used: usize,
    entries: Vec<(ChunkId, u64, u64)>,
}

impl PackWriter {
    /// A writer filling buffers of `buffers`: a pack holds what fits in one (a multiple of
    /// 4 KiB). A backup shares the pool its whole chunks are encoded in (4 MiB buffers), so
    /// after a full backup an incremental packs into memory already faulted in: fresh memory
    /// costs this VM about 1 ms per MiB in page faults, and packs of 32 MiB in buffers of their
    /// own had made faulting them in a third of a first incremental's CPU.
    pub fn new(run_name: &str, buffers: Arc<AlignedPool>) -> PackWriter {
        PackWriter {
            run_name: run_name.to_owned(),
            buffers,
            filling: Mutex::new(Filling::default()),
            uploads: tokio::sync::Semaphore::new(MAX_PACK_UPLOADS),
        }
    }

    /// Waits while the most packs allowed are being stored; call before [`Self::append`].
    pub async fn admit(&self) {
        // Never closed: a permit always comes.
        drop(self.uploads.acquire().await);
    }

    /// Held while a full pack is stored.
    pub async fn upload_slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.uploads.acquire().await.ok()
    }

    /// Adds object `id`; gives back the pack filled so far when the object does not fit in
    /// it (the object starts the next one). Panics on an object over
    /// [`MAX_PACKED_OBJECT_BYTES`], which no reader would accept, or over a buffer.
    pub fn append(&self, id: ChunkId, object: &[u8]) -> Option<FullPack> {
        assert!(
            object.len() as u64 <= MAX_PACKED_OBJECT_BYTES
                && object.len() <= self.buffers.capacity(),
            "a packed object of {} bytes",
            object.len()
        );
        let mut filling = self.filling.lock().unwrap_or_else(|p| p.into_inner());
        let full = (filling.used + object.len() > self.buffers.capacity())
            .then(|| self.take(&mut filling));
        let at = filling.used;
        let buffer = filling
            .buffer
            .get_or_insert_with(|| self.buffers.take(self.buffers.capacity()));
        buffer[at..at + object.len()].copy_from_slice(object);
        filling.used += object.len();
        filling.entries.push((id, at as u64, object.len() as u64));
        full
    }

    /// The last, partly filled pack, if anything was appended since the last full one.
    pub fn finish(&self) -> Option<FullPack> {
        let mut filling = self.filling.lock().unwrap_or_else(|p| p.into_inner());
        (!filling.entries.is_empty()).then(|| self.take(&mut filling))
    }

    fn take(&self, filling: &mut Filling) -> FullPack {
        let name = format!("{}-{:04}", self.run_name, filling.sequence);
        filling.sequence += 1;
        let len = std::mem::take(&mut filling.used);
        let mut buffer = filling
            .buffer
            .take()
            .expect("a pack with entries has a buffer");
        let padded_len = len.next_multiple_of(ALIGN_BYTES);
        buffer.set_len(padded_len);
        buffer[len..padded_len].fill(0);
        let entries = std::mem::take(&mut filling.entries)
            .into_iter()
            .map(|(id, offset_bytes, len_bytes)| {
                (
                    id,
                    PackedAt {
                        pack: name.clone(),
                        offset_bytes,
                        len_bytes,
                    },
                )
            })
            .collect();
        FullPack {
            name,
            padded: self.buffers.freeze(buffer),
            len,
            entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_fill_their_buffer_and_say_where_each_object_is() {
        let writer = PackWriter::new("b-1", AlignedPool::new(4 << 20, 1));
        let object = vec![7u8; 1 << 20];
        let mut full = Vec::new();
        for i in 0..45u8 {
            if let Some(pack) = writer.append(ChunkId::of(&[i]), &object) {
                full.push(pack);
            }
        }
        full.extend(writer.finish());
        assert!(writer.finish().is_none());
        // Four objects of 1 MiB fill a 4 MiB buffer; the fifth starts the next pack.
        let sizes: Vec<usize> = full.iter().map(|p| p.entries.len()).collect();
        assert_eq!(sizes, [[4; 11].as_slice(), &[1]].concat());
        let names: Vec<&str> = full.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names[..3], ["b-1-0000", "b-1-0001", "b-1-0002"]);
        assert_eq!(names[11], "b-1-0011");
        for pack in &full {
            for (k, (_, at)) in pack.entries.iter().enumerate() {
                assert_eq!(at.pack, pack.name);
                assert_eq!(at.offset_bytes, k as u64 * (1 << 20));
                assert_eq!(at.len_bytes, 1 << 20);
                at.check().unwrap();
            }
            assert_eq!(pack.len, pack.entries.len() * (1 << 20));
            assert_eq!(pack.padded.len(), pack.len.next_multiple_of(ALIGN_BYTES));
            assert_eq!(pack.padded.as_ptr() as usize % ALIGN_BYTES, 0);
            assert!(pack.padded[..pack.len].iter().all(|&b| b == 7));
        }
        assert_eq!(full[1].entries[0].0, ChunkId::of(&[4]));
    }

    #[test]
    fn each_run_of_a_backup_names_its_packs_apart() {
        let (a, b) = (run_name("b-1", 7), run_name("b-1", 7));
        assert_ne!(a, b, "two runs share a pack name prefix");
        for name in [&a, &b] {
            assert!(
                name.starts_with("b-1-") && name.len() == "b-1-".len() + 8,
                "{name}"
            );
            assert!(valid_pack_name(&format!("{name}-0000")), "{name}");
        }
        let long_id = "b-20251202T054400Z-0123abcd";
        assert!(valid_pack_name(&format!("{}-9999", run_name(long_id, 0))));
    }

    #[test]
    #[should_panic(expected = "a packed object of")]
    fn an_object_larger_than_a_buffer_is_refused() {
        let writer = PackWriter::new("b-1", AlignedPool::new(1 << 20, 1));
        writer.append(ChunkId::of(b"big"), &vec![1u8; (1 << 20) + 1]);
    }

    #[test]
    fn a_reused_buffer_pads_the_next_pack_with_zeroes() {
        let pool = AlignedPool::new(4 << 20, 1);
        let writer = PackWriter::new("b-1", Arc::clone(&pool));
        let object = vec![0xee; 1 << 20];
        for i in 0..4u8 {
            assert!(writer.append(ChunkId::of(&[i]), &object).is_none());
        }
        let full = writer.finish().expect("a full pack");
        assert_eq!(full.len, 4 << 20);
        let first_buffer = full.padded.as_ptr();
        drop(full);
        writer.append(ChunkId::of(b"b"), &[5u8; 100]);
        let last = writer.finish().expect("a pack");
        // The buffer came back from the pool, its old bytes behind the object zeroed.
        assert_eq!(last.padded.as_ptr(), first_buffer);
        assert_eq!(last.len, 100);
        assert_eq!(last.padded.len(), ALIGN_BYTES);
        assert!(last.padded[..100].iter().all(|&b| b == 5));
        assert!(last.padded[100..].iter().all(|&b| b == 0));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_more_is_packed_while_the_most_packs_are_being_stored() {
        let writer = PackWriter::new("b-1", AlignedPool::new(4 << 20, 1));
        let wait = std::time::Duration::from_secs(3600);
        writer.admit().await;
        let slots: Vec<_> =
            futures_util::future::join_all((0..MAX_PACK_UPLOADS).map(|_| writer.upload_slot()))
                .await;
        assert!(tokio::time::timeout(wait, writer.admit()).await.is_err());
        let mut slots = slots.into_iter();
        drop(slots.next());
        tokio::time::timeout(wait, writer.admit()).await.unwrap();
    }

    #[test]
    fn keys_and_locations_are_checked() {
        assert_eq!(pack_key("b-1-0000"), "packs/b-1-0000");
        assert_eq!(
            parse_pack_key("packs/b-1-0000").as_deref(),
            Some("b-1-0000")
        );
        assert_eq!(
            parse_pack_key("pre/fix/packs/b-1-0000").as_deref(),
            Some("b-1-0000")
        );
        for foreign in ["packs/../x", "other/b-1", "packs/", "packs/a.b", "xpacks/b"] {
            assert_eq!(parse_pack_key(foreign), None, "{foreign}");
        }
        let good = PackedAt {
            pack: "b-1-0000".into(),
            offset_bytes: 0,
            len_bytes: 100,
        };
        good.check().unwrap();
        for bad in [
            PackedAt {
                pack: "../x".into(),
                ..good.clone()
            },
            PackedAt {
                len_bytes: 3,
                ..good.clone()
            },
            PackedAt {
                len_bytes: MAX_PACKED_OBJECT_BYTES + 1,
                ..good.clone()
            },
            PackedAt {
                offset_bytes: u64::MAX,
                ..good.clone()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
