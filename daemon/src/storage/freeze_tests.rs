//! Snapshot create while writes are in flight, on a multi-threaded runtime: whole-block writes
//! and single-sector writes (read-modify-writes where the head lacks the block) race with the
//! freeze. Every write is logged with when it started and finished; each snapshot is then
//! checked sector by sector against that log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::io::{EngineConfig, EngineKind, IoEngine};
use crate::storage::Registry;

const BLOCKS: u64 = 4;
const BLOCK_BYTES: u64 = 4096;
const SECTOR_BYTES: u64 = 512;
const SECTORS: u64 = BLOCKS * BLOCK_BYTES / SECTOR_BYTES;
const SNAPSHOTS: usize = 60;
const WRITERS: u64 = 6;

#[derive(Debug, Clone, Copy)]
struct Logged {
    tag: u64,
    first_sector: u64,
    sectors: u64,
    started: Instant,
    finished: Instant,
}

fn sector_data(tag: u64, sectors: u64) -> Bytes {
    let one: Vec<u8> = tag
        .to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(SECTOR_BYTES as usize)
        .collect();
    Bytes::from(one.repeat(sectors as usize))
}

/// The tag each sector holds (0: never written), checking that every sector is whole.
fn tags_of(content: &[u8]) -> Vec<u64> {
    content
        .chunks(SECTOR_BYTES as usize)
        .enumerate()
        .map(|(i, sector)| {
            let tag = u64::from_le_bytes(sector[..8].try_into().unwrap());
            assert!(
                sector == sector_data(tag, 1).as_ref() || sector.iter().all(|&b| b == 0),
                "sector {i} is torn"
            );
            tag
        })
        .collect()
}

/// Small xorshift: the test needs variety, not quality.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn snapshots_taken_under_concurrent_writes_hold_exactly_what_finished_before_them() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = match std::path::Path::new("/dev/shm").is_dir() {
            true => tempfile::tempdir_in("/dev/shm").unwrap(),
            false => tempfile::tempdir().unwrap(),
        };
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let registry = Arc::new(Registry::open(dir.path(), engine).unwrap());
        let volume = registry.create("v", BLOCKS * BLOCK_BYTES).unwrap();
        let entry = registry.entry("v").unwrap();
        let log = Arc::new(Mutex::new(Vec::<Logged>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (volume, log, stop) =
                    (Arc::clone(&volume), Arc::clone(&log), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut rng = 0x9e37_79b9_7f4a_7c15 ^ (w + 1);
                    let mut tag = (w + 1) << 32;
                    while !stop.load(Ordering::Relaxed) {
                        tag += 1;
                        let block = next(&mut rng) % BLOCKS;
                        // Every other write is a single sector: a read-modify-write when the
                        // head does not hold its block yet.
                        let (first_sector, sectors) = if next(&mut rng).is_multiple_of(2) {
                            let sector = next(&mut rng) % (BLOCK_BYTES / SECTOR_BYTES);
                            (block * 8 + sector, 1)
                        } else {
                            (block * 8, 8)
                        };
                        let started = Instant::now();
                        volume
                            .write(
                                first_sector * SECTOR_BYTES,
                                sector_data(tag, sectors),
                                false,
                            )
                            .await
                            .unwrap();
                        let finished = Instant::now();
                        log.lock().unwrap().push(Logged {
                            tag,
                            first_sector,
                            sectors,
                            started,
                            finished,
                        });
                    }
                })
            })
            .collect();

        let mut taken = Vec::new();
        for i in 0..SNAPSHOTS {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let name = format!("s{i}");
            let called = Instant::now();
            entry.create_snapshot(&name).await.unwrap();
            let answered = Instant::now();
            let view = registry.get(&format!("v@{name}")).unwrap();
            let first_read = view.read(0, (BLOCKS * BLOCK_BYTES) as usize).await.unwrap();
            taken.push((name, called, answered, first_read));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        stop.store(true, Ordering::Relaxed);
        for writer in writers {
            writer.await.unwrap();
        }

        let log = log.lock().unwrap().clone();
        assert!(log.len() > 100, "only {} writes", log.len());
        // The live volume: no sector holds a write that another one, started after it had
        // finished, should have replaced (a read-modify-write that read the block below before
        // an older write to its other sectors landed would leave such a sector).
        let live = tags_of(
            &volume
                .read(0, (BLOCKS * BLOCK_BYTES) as usize)
                .await
                .unwrap(),
        );
        for sector in 0..SECTORS {
            let writes: Vec<&Logged> = log
                .iter()
                .filter(|l| (l.first_sector..l.first_sector + l.sectors).contains(&sector))
                .collect();
            let held = live[sector as usize];
            let Some(write) = writes.iter().find(|l| l.tag == held) else {
                assert!(
                    held == 0 && writes.is_empty(),
                    "sector {sector}: tag {held:#x}"
                );
                continue;
            };
            if let Some(newer) = writes.iter().find(|l| l.started > write.finished) {
                panic!(
                    "sector {sector} holds tag {held:#x}, but tag {:#x} started after it finished",
                    newer.tag
                );
            }
        }
        for (name, called, answered, first_read) in &taken {
            let view = registry.get(&format!("v@{name}")).unwrap();
            let later = view.read(0, (BLOCKS * BLOCK_BYTES) as usize).await.unwrap();
            assert!(
                later == *first_read,
                "{name} changed after its create answered"
            );
            let tags = tags_of(first_read);
            for sector in 0..SECTORS {
                let writes: Vec<&Logged> = log
                    .iter()
                    .filter(|l| (l.first_sector..l.first_sector + l.sectors).contains(&sector))
                    .collect();
                let held = tags[sector as usize];
                // The latest write to the sector finished before the create was called: the
                // snapshot holds it, or one that may have overtaken it (started before it
                // finished, so the two were concurrent), but never anything older.
                let floor = writes
                    .iter()
                    .filter(|l| l.finished < *called)
                    .max_by_key(|l| l.finished);
                if held == 0 {
                    assert!(
                        floor.is_none(),
                        "{name} sector {sector}: zeroes, but tag {:#x} finished before the call",
                        floor.unwrap().tag
                    );
                    continue;
                }
                let write = writes
                    .iter()
                    .find(|l| l.tag == held)
                    .unwrap_or_else(|| panic!("{name} sector {sector}: unknown tag {held:#x}"));
                // Its task may see the write finish a moment after the create's task saw the
                // freeze answer, but it must have started before.
                assert!(
                    write.started <= *answered,
                    "{name} sector {sector}: tag {held:#x} started after the create answered"
                );
                if let Some(floor) = floor {
                    assert!(
                        write.tag == floor.tag || write.finished >= floor.started,
                        "{name} sector {sector}: holds tag {held:#x}, older than tag {:#x} \
                         which finished before the call",
                        floor.tag
                    );
                }
            }
        }
    });
}
