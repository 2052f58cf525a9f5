//! `Volume::write_bulk` (O_DIRECT restores) against the same model as ordinary writes: the
//! bytes read back, the allocation map, and what a restart finds, over cached and uncached
//! data, with O_DIRECT working and with it refused.

use std::sync::Arc;

use bytes::Bytes;

use crate::io::{EngineConfig, EngineKind, IoEngine};
use crate::storage::aligned::AlignedPool;
use crate::storage::volume::{StatusQuery, EXTENT_HOLE, EXTENT_ZERO};
use crate::storage::{Registry, Volume};

const MIB: u64 = 1 << 20;
/// Four whole 4 MiB chunks and a short last one, as a restore of such a volume writes them.
const SIZE_BYTES: u64 = 16 * MIB + 12288;

fn engines() -> Vec<IoEngine> {
    let config = EngineConfig::default();
    vec![
        IoEngine::new(Some(EngineKind::Uring), &config).unwrap(),
        IoEngine::new(Some(EngineKind::Threads), &config).unwrap(),
    ]
}

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 12) as u8 ^ seed)
        .collect()
}

async fn bulk(
    vol: &Volume,
    pool: &Arc<AlignedPool>,
    model: &mut [u8],
    offset: u64,
    len: u64,
    seed: u8,
) {
    let data = pattern(len, seed);
    let mut buf = pool.take(len as usize);
    buf.copy_from_slice(&data);
    vol.write_bulk(offset, pool.freeze(buf)).await.unwrap();
    model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
}

async fn assert_reads(vol: &Volume, model: &[u8], what: &str) {
    for start in (0..SIZE_BYTES).step_by(4 * MIB as usize) {
        let len = (SIZE_BYTES - start).min(4 * MIB);
        let got = vol.read(start, len as usize).await.unwrap();
        let want = &model[start as usize..(start + len) as usize];
        assert!(
            got[..] == *want,
            "{what}: bytes differ in [{start}, +{len})"
        );
    }
}

/// Restores chunk by chunk over a volume whose old content is in the page cache (and partly
/// dirty), then again over a snapshot (head blocks absent), checking every byte each time.
async fn restore_over_cached_data(engine: IoEngine, refuse_direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(dir.path(), engine.clone()).unwrap();
    let vol = reg.create("v", SIZE_BYTES).unwrap();
    let entry = reg.entry("v").unwrap();
    if refuse_direct {
        vol.chain().top().refuse_direct();
    }
    let pool = AlignedPool::new(4 * MIB as usize, 2);
    let mut model = pattern(SIZE_BYTES, 0x5a);
    vol.write(0, Bytes::from(model.clone()), false)
        .await
        .unwrap();
    vol.flush().await.unwrap();
    // Dirty pages in chunk 1 on top of clean cached ones everywhere.
    vol.write(5 * MIB, Bytes::from(vec![0xee; 8192]), false)
        .await
        .unwrap();
    model[5 * MIB as usize..5 * MIB as usize + 8192].fill(0xee);
    assert_reads(&vol, &model, "before").await;

    for (i, offset) in (0..SIZE_BYTES).step_by(4 * MIB as usize).enumerate() {
        let len = (SIZE_BYTES - offset).min(4 * MIB);
        bulk(&vol, &pool, &mut model, offset, len, i as u8).await;
    }
    assert_eq!(vol.chain().top().direct_in_use(), !refuse_direct);
    assert_reads(&vol, &model, "after a restore over the cached head").await;

    // Head blocks absent, the data below: the locked path that sets the map.
    entry.create_snapshot("s1").await.unwrap();
    if refuse_direct {
        vol.chain().top().refuse_direct();
    }
    bulk(&vol, &pool, &mut model, 4 * MIB, 4 * MIB, 0x77).await;
    // Unaligned in the file: partial blocks merge with the layer below, the middle is
    // misaligned in memory and so goes through the page cache.
    bulk(&vol, &pool, &mut model, 8 * MIB + 1000, 3 * MIB, 0x33).await;
    let status = vol
        .block_status(&StatusQuery::Depth, 4 * MIB, 8 * MIB, 16)
        .await
        .unwrap();
    let head_bytes: u64 = status.iter().filter(|(_, d)| *d == 1).map(|(n, _)| n).sum();
    // 3 MiB starting 1000 bytes into a block touch one block more than 3 MiB.
    assert_eq!(head_bytes, 4 * MIB + 3 * MIB + 4096);
    assert_reads(&vol, &model, "after a restore over a snapshot").await;
    let allocation = vol
        .block_status(&StatusQuery::Allocation, 0, SIZE_BYTES, 16)
        .await
        .unwrap();
    assert!(allocation
        .iter()
        .all(|(_, v)| v & (EXTENT_HOLE | EXTENT_ZERO) == 0));
    vol.flush().await.unwrap();
    drop((vol, entry, reg));

    let reg = Registry::open(dir.path(), engine).unwrap();
    let vol = reg.get("v").unwrap();
    assert_reads(&vol, &model, "after a restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_writes_read_back_over_cached_data() {
    for engine in engines() {
        restore_over_cached_data(engine, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_writes_fall_back_to_the_page_cache_when_refused() {
    for engine in engines() {
        restore_over_cached_data(engine, true).await;
    }
}
