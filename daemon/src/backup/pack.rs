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

/// A pack is written once it holds this much.
pub const PACK_TARGET_BYTES: usize = 32 << 20;
/// Packs a backup stores at once. While that many are on their way (a slow or unreachable
/// store), nothing more is packed, so a backup holds at most this many full packs, one filling
/// and what the appends already under way add: about 160 MiB.
const MAX_PACK_UPLOADS: usize = 2;
/// Bytes of a pack buffer: below the target before every append, so the largest object fits.
pub const PACK_BUFFER_BYTES: usize = PACK_TARGET_BYTES + MAX_PACKED_OBJECT_BYTES as usize;
/// Pack buffers kept for the next pack once stored. Memory touched for the first time costs
/// this VM about 1 ms per MiB in page faults: with a fresh buffer per pack, faulting in the
/// pack was a quarter of an incremental backup's CPU.
pub const IDLE_PACK_BUFFERS: usize = 1;
/// The largest object a pack entry can be: a delta of every block of a chunk is smaller.
pub const MAX_PACKED_OBJECT_BYTES: u64 = 8 << 20;
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

/// The pack a backup is filling. Packs are named `<backup id>-<sequence>`: a backup resumed
/// after a crash writes the same names again, over packs no manifest references.
pub struct PackWriter {
    backup_id: String,
    buffers: Arc<AlignedPool>,
    filling: Mutex<Filling>,
    uploads: tokio::sync::Semaphore,
}

#[derive(Default)]
struct Filling {
    sequence: u32,
    /// Taken from the pool at the first append; whatever an earlier pack left in it is
    /// overwritten or zeroed before the pack is stored.
    buffer: Option<AlignedBuf>,
    used: usize,
    entries: Vec<(ChunkId, u64, u64)>,
}

impl PackWriter {
    /// A writer filling buffers of `buffers` ([`PACK_BUFFER_BYTES`] each).
    pub fn new(backup_id: &str, buffers: Arc<AlignedPool>) -> PackWriter {
        assert!(buffers.capacity() >= PACK_BUFFER_BYTES);
        PackWriter {
            backup_id: backup_id.to_owned(),
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

    /// Adds object `id`; gives back the pack to store once it has reached the target size.
    /// Panics on an object over [`MAX_PACKED_OBJECT_BYTES`], which no reader would accept.
    pub fn append(&self, id: ChunkId, object: &[u8]) -> Option<FullPack> {
        assert!(
            object.len() as u64 <= MAX_PACKED_OBJECT_BYTES,
            "a packed object of {} bytes",
            object.len()
        );
        let mut filling = self.filling.lock().unwrap_or_else(|p| p.into_inner());
        let at = filling.used;
        let buffer = filling
            .buffer
            .get_or_insert_with(|| self.buffers.take(PACK_BUFFER_BYTES));
        buffer[at..at + object.len()].copy_from_slice(object);
        filling.used += object.len();
        filling.entries.push((id, at as u64, object.len() as u64));
        (filling.used >= PACK_TARGET_BYTES).then(|| self.take(&mut filling))
    }

    /// The last, partly filled pack, if anything was appended since the last full one.
    pub fn finish(&self) -> Option<FullPack> {
        let mut filling = self.filling.lock().unwrap_or_else(|p| p.into_inner());
        (!filling.entries.is_empty()).then(|| self.take(&mut filling))
    }

    fn take(&self, filling: &mut Filling) -> FullPack {
        let name = format!("{}-{:04}", self.backup_id, filling.sequence);
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
    fn packs_fill_to_the_target_and_say_where_each_object_is() {
        let writer = PackWriter::new("b-1", AlignedPool::new(PACK_BUFFER_BYTES, 1));
        let object = vec![7u8; 3 << 20];
        let mut full = Vec::new();
        for i in 0..45u8 {
            if let Some(pack) = writer.append(ChunkId::of(&[i]), &object) {
                full.push(pack);
            }
        }
        full.extend(writer.finish());
        assert!(writer.finish().is_none());
        // 11 objects of 3 MiB pass 32 MiB; 45 objects make four full packs and one of one.
        let sizes: Vec<usize> = full.iter().map(|p| p.entries.len()).collect();
        assert_eq!(sizes, [11, 11, 11, 11, 1]);
        let names: Vec<&str> = full.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["b-1-0000", "b-1-0001", "b-1-0002", "b-1-0003", "b-1-0004"]
        );
        for pack in &full {
            for (k, (_, at)) in pack.entries.iter().enumerate() {
                assert_eq!(at.pack, pack.name);
                assert_eq!(at.offset_bytes, k as u64 * (3 << 20));
                assert_eq!(at.len_bytes, 3 << 20);
                at.check().unwrap();
            }
            assert_eq!(pack.len, pack.entries.len() * (3 << 20));
            assert_eq!(pack.padded.len(), pack.len.next_multiple_of(ALIGN_BYTES));
            assert_eq!(pack.padded.as_ptr() as usize % ALIGN_BYTES, 0);
            assert!(pack.padded[..pack.len].iter().all(|&b| b == 7));
        }
        assert_eq!(full[1].entries[0].0, ChunkId::of(&[11]));
    }

    #[test]
    fn a_reused_buffer_pads_the_next_pack_with_zeroes() {
        let pool = AlignedPool::new(PACK_BUFFER_BYTES, 1);
        let writer = PackWriter::new("b-1", Arc::clone(&pool));
        let object = vec![0xee; MAX_PACKED_OBJECT_BYTES as usize];
        let objects = PACK_TARGET_BYTES / object.len();
        for i in 1..objects {
            assert!(writer.append(ChunkId::of(&[i as u8]), &object).is_none());
        }
        let full = writer
            .append(ChunkId::of(b"a"), &object)
            .expect("a full pack");
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
        let writer = PackWriter::new("b-1", AlignedPool::new(PACK_BUFFER_BYTES, 1));
        let wait = std::time::Duration::from_secs(3600);
        writer.admit().await;
        let first = writer.upload_slot().await.unwrap();
        let second = writer.upload_slot().await.unwrap();
        assert!(tokio::time::timeout(wait, writer.admit()).await.is_err());
        drop(first);
        tokio::time::timeout(wait, writer.admit()).await.unwrap();
        drop(second);
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
