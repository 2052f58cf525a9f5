//! Model-based tests of the layered storage: random sequences of write / zero / trim /
//! snapshot / delete / rollback / clone / restart, checked byte by byte against plain vectors.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;

use crate::io::{EngineConfig, EngineKind, IoEngine};
use crate::storage::volume::{StatusQuery, ZeroMode, EXTENT_HOLE};
use crate::storage::Registry;

const VOLUME_BYTES: u64 = 64 * 4096;

#[derive(Debug, Clone)]
enum Op {
    Write {
        vol: usize,
        offset: u64,
        len: u64,
        seed: u8,
    },
    Zero {
        vol: usize,
        offset: u64,
        len: u64,
        may_trim: bool,
    },
    Trim {
        vol: usize,
        offset: u64,
        len: u64,
    },
    Snapshot {
        vol: usize,
    },
    DeleteSnapshot {
        vol: usize,
        pick: usize,
    },
    Rollback {
        vol: usize,
        pick: usize,
    },
    Clone {
        vol: usize,
        pick: usize,
    },
    DeleteVolume {
        vol: usize,
    },
    /// Clean: the shutdown's stop. Otherwise as a `kill -9`: the page cache keeps what was
    /// written, nothing is flushed, and the load walks the heads.
    Restart {
        clean: bool,
    },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        // Whole blocks.
        (0u64..64, 1u64..16).prop_map(|(b, n)| (b * 4096, n * 4096)),
        // Anywhere, any length.
        (0u64..VOLUME_BYTES - 1, 1u64..20_000),
    ]
    .prop_map(|(offset, len)| (offset, len.min(VOLUME_BYTES - offset)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..4, range(), any::<u8>()).prop_map(|(vol, (offset, len), seed)| Op::Write { vol, offset, len, seed }),
        2 => (0usize..4, range(), any::<bool>()).prop_map(|(vol, (offset, len), may_trim)| Op::Zero { vol, offset, len, may_trim }),
        1 => (0usize..4, range()).prop_map(|(vol, (offset, len))| Op::Trim { vol, offset, len }),
        3 => (0usize..4).prop_map(|vol| Op::Snapshot { vol }),
        2 => (0usize..4, 0usize..8).prop_map(|(vol, pick)| Op::DeleteSnapshot { vol, pick }),
        1 => (0usize..4, 0usize..8).prop_map(|(vol, pick)| Op::Rollback { vol, pick }),
        1 => (0usize..4, 0usize..8).prop_map(|(vol, pick)| Op::Clone { vol, pick }),
        1 => (0usize..4).prop_map(|vol| Op::DeleteVolume { vol }),
        1 => any::<bool>().prop_map(|clean| Op::Restart { clean }),
    ]
}

#[derive(Default, Clone)]
struct ModelVolume {
    content: Vec<u8>,
    /// Oldest first.
    snapshots: Vec<(String, Vec<u8>)>,
}

struct Harness {
    dir: tempfile::TempDir,
    engine: IoEngine,
    registry: Arc<Registry>,
    model: BTreeMap<String, ModelVolume>,
    next_name: usize,
}

impl Harness {
    fn new() -> Harness {
        // tmpfs when there is one: this checks logic, not the disk, and this machine's root
        // filesystem discards freed blocks synchronously, which makes every unlink slow.
        let dir = match std::path::Path::new("/dev/shm").is_dir() {
            true => tempfile::tempdir_in("/dev/shm").unwrap(),
            false => tempfile::tempdir().unwrap(),
        };
        let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
        let registry = Arc::new(Registry::open(dir.path(), engine.clone()).unwrap());
        registry.create("v0", VOLUME_BYTES).unwrap();
        let mut model = BTreeMap::new();
        model.insert(
            "v0".to_owned(),
            ModelVolume {
                content: vec![0; VOLUME_BYTES as usize],
                snapshots: Vec::new(),
            },
        );
        Harness {
            dir,
            engine,
            registry,
            model,
            next_name: 0,
        }
    }

    fn pick_volume(&self, vol: usize) -> String {
        let names: Vec<&String> = self.model.keys().collect();
        names[vol % names.len()].clone()
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.next_name += 1;
        format!("{prefix}{}", self.next_name)
    }

    async fn apply(&mut self, op: Op) {
        match op {
            Op::Write {
                vol,
                offset,
                len,
                seed,
            } => {
                let name = self.pick_volume(vol);
                let data: Vec<u8> = (0..len)
                    .map(|i| seed.wrapping_add((i % 251) as u8) | 1)
                    .collect();
                let volume = self.registry.get(&name).unwrap();
                volume
                    .write(offset, Bytes::from(data.clone()), false)
                    .await
                    .unwrap();
                let m = self.model.get_mut(&name).unwrap();
                m.content[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
            Op::Zero {
                vol,
                offset,
                len,
                may_trim,
            } => {
                let name = self.pick_volume(vol);
                let volume = self.registry.get(&name).unwrap();
                let mode = ZeroMode {
                    may_trim,
                    fast_only: false,
                };
                volume.write_zeroes(offset, len, mode, false).await.unwrap();
                let m = self.model.get_mut(&name).unwrap();
                m.content[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Trim { vol, offset, len } => {
                let name = self.pick_volume(vol);
                let volume = self.registry.get(&name).unwrap();
                volume.trim(offset, len, false).await.unwrap();
                // Whole blocks inside the range read as zero afterwards; partial ones are kept.
                let start = offset.div_ceil(4096) * 4096;
                let end = (offset + len) / 4096 * 4096;
                if end > start {
                    let m = self.model.get_mut(&name).unwrap();
                    m.content[start as usize..end as usize].fill(0);
                }
            }
            Op::Snapshot { vol } => {
                let name = self.pick_volume(vol);
                let snap = self.fresh("s");
                let entry = self.registry.entry(&name).unwrap();
                let info = entry.create_snapshot(&snap).await.unwrap();
                assert_eq!(info.size_bytes, VOLUME_BYTES);
                let m = self.model.get_mut(&name).unwrap();
                let content = m.content.clone();
                m.snapshots.push((snap, content));
            }
            Op::DeleteSnapshot { vol, pick } => {
                let name = self.pick_volume(vol);
                let m = self.model.get_mut(&name).unwrap();
                if m.snapshots.is_empty() {
                    return;
                }
                let (snap, _) = m.snapshots.remove(pick % m.snapshots.len());
                let entry = self.registry.entry(&name).unwrap();
                if let Err(e) = entry.delete_snapshot(&snap).await {
                    panic!("delete {name}@{snap}: {e}")
                }
            }
            Op::Rollback { vol, pick } => {
                let name = self.pick_volume(vol);
                let m = self.model.get_mut(&name).unwrap();
                if m.snapshots.is_empty() {
                    return;
                }
                let (snap, content) = m.snapshots[pick % m.snapshots.len()].clone();
                m.content = content;
                let entry = self.registry.entry(&name).unwrap();
                entry.rollback(&snap, false).await.unwrap();
            }
            Op::Clone { vol, pick } => {
                let name = self.pick_volume(vol);
                if self.model.len() >= 4 {
                    return;
                }
                let m = self.model[&name].clone();
                if m.snapshots.is_empty() {
                    return;
                }
                let (snap, content) = m.snapshots[pick % m.snapshots.len()].clone();
                let clone = self.fresh("c");
                self.registry
                    .create_from_snapshot(&clone, &name, &snap)
                    .await
                    .unwrap();
                self.model.insert(
                    clone,
                    ModelVolume {
                        content,
                        snapshots: Vec::new(),
                    },
                );
            }
            Op::DeleteVolume { vol } => {
                if self.model.len() < 2 {
                    return;
                }
                let name = self.pick_volume(vol);
                let hidden = self.registry.remove(&name).unwrap();
                std::fs::remove_dir_all(hidden).unwrap();
                self.model.remove(&name);
            }
            Op::Restart { clean } => {
                if clean {
                    self.registry.stop_all().await.unwrap();
                }
                let registry = Registry::open(self.dir.path(), self.engine.clone()).unwrap();
                assert_eq!(registry.resume_compaction().await, 0);
                self.registry = Arc::new(registry);
            }
        }
    }

    async fn check(&self) {
        for (name, m) in &self.model {
            self.check_export(name, &m.content).await;
            for (snap, content) in &m.snapshots {
                self.check_export(&format!("{name}@{snap}"), content).await;
            }
            let listed: Vec<String> = self
                .registry
                .entry(name)
                .unwrap()
                .snapshots()
                .into_iter()
                .map(|s| s.name)
                .collect();
            let expected: Vec<String> = m.snapshots.iter().map(|(s, _)| s.clone()).collect();
            assert_eq!(listed, expected, "snapshots of {name}");
        }
    }

    async fn check_export(&self, export: &str, expected: &[u8]) {
        let volume = self
            .registry
            .get(export)
            .unwrap_or_else(|| panic!("{export} missing"));
        let got = volume.read(0, expected.len()).await.unwrap();
        if got[..] != expected[..] {
            let first = got.iter().zip(expected).position(|(a, b)| a != b).unwrap();
            panic!(
                "{export}: first difference at byte {first} (block {})",
                first / 4096
            );
        }
        // base:allocation never calls a block with data a hole.
        let mut at = 0u64;
        for (len, flags) in volume
            .block_status(&StatusQuery::Allocation, 0, expected.len() as u64, 10_000)
            .await
            .unwrap()
        {
            if flags & EXTENT_HOLE != 0 {
                let range = &expected[at as usize..(at + len) as usize];
                assert!(
                    range.iter().all(|&b| b == 0),
                    "{export}: hole at {at} over data"
                );
            }
            at += len;
        }
        assert_eq!(
            at,
            expected.len() as u64,
            "{export}: extents cover the export"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn layered_volumes_match_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut harness = Harness::new();
            for op in ops {
                harness.apply(op).await;
                harness.check().await;
            }
            // And once more from disk.
            harness.apply(Op::Restart { clean: true }).await;
            harness.check().await;
        });
    }
}

#[tokio::test]
async fn dirty_bitmap_and_depth_follow_the_layers() {
    let mut h = Harness::new();
    let v = h.registry.get("v0").unwrap();
    v.write(0, Bytes::from(vec![1u8; 8 * 4096]), false)
        .await
        .unwrap();
    h.apply(Op::Snapshot { vol: 0 }).await;
    let snap = h.model["v0"].snapshots[0].0.clone();
    v.write(4 * 4096, Bytes::from(vec![2u8; 4096]), false)
        .await
        .unwrap();
    v.trim(20 * 4096, 2 * 4096, false).await.unwrap();
    let changed = v
        .block_status(&v.changed_since(&snap), 0, VOLUME_BYTES, 100)
        .await
        .unwrap();
    assert_eq!(
        changed,
        [
            (4 * 4096, 0),
            (4096, 1),
            (15 * 4096, 0),
            (2 * 4096, 1),
            (42 * 4096, 0)
        ]
    );
    let depth = v
        .block_status(&StatusQuery::Depth, 0, VOLUME_BYTES, 100)
        .await
        .unwrap();
    assert_eq!(
        depth,
        [
            (4 * 4096, 2),
            (4096, 1),
            (3 * 4096, 2),
            (12 * 4096, 0),
            (2 * 4096, 1),
            (42 * 4096, 0)
        ]
    );
    let view = h.registry.get(&format!("v0@{snap}")).unwrap();
    assert!(view.is_read_only());
    assert!(view
        .write(0, Bytes::from(vec![0u8; 4096]), false)
        .await
        .is_err());
    let depth = view
        .block_status(&StatusQuery::Depth, 0, VOLUME_BYTES, 100)
        .await
        .unwrap();
    assert_eq!(depth, [(8 * 4096, 1), (56 * 4096, 0)]);
    // The cap limits the answer.
    assert_eq!(
        v.block_status(&StatusQuery::Depth, 0, VOLUME_BYTES, 2)
            .await
            .unwrap()
            .len(),
        2
    );
}

/// Descriptors of this process open on files under `dir` (deleted ones included), but those of
/// the spare head layers made ahead (see `spare.rs`), which come and go in the background.
fn open_fds_under(h: &Harness, dir: &std::path::Path) -> usize {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let spares: Vec<String> = h
        .registry
        .entries()
        .iter()
        .filter_map(|entry| entry.spare_head.id())
        .collect();
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| target.starts_with(dir))
        .filter(|target| {
            let name = target.file_name().unwrap_or_default().to_string_lossy();
            !spares.iter().any(|id| name.starts_with(id.as_str()))
        })
        .count()
}

#[tokio::test]
async fn no_descriptor_outlives_its_layer() {
    let mut h = Harness::new();
    let dir = h.dir.path().to_owned();
    for _ in 0..10 {
        h.apply(Op::Write {
            vol: 0,
            offset: 0,
            len: 8192,
            seed: 1,
        })
        .await;
        h.apply(Op::Snapshot { vol: 0 }).await;
    }
    // The last create's manifest fsyncs (which hold the manifest and the folder open) are
    // done once a FLUSH returns.
    h.registry.get("v0").unwrap().flush().await.unwrap();
    // Ten frozen layers and the head, two files each.
    assert_eq!(open_fds_under(&h, &dir), 22);
    for _ in 0..10 {
        h.apply(Op::DeleteSnapshot { vol: 0, pick: 3 }).await;
    }
    h.apply(Op::Restart { clean: true }).await;
    h.check().await;
    // Deleting every snapshot leaves at most the head and the layer below it (background syncs
    // of frozen layers may hold a layer of the old registry a moment longer).
    for _ in 0..100 {
        if open_fds_under(&h, &dir) <= 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        open_fds_under(&h, &dir) <= 4,
        "{} descriptors open",
        open_fds_under(&h, &dir)
    );
    let Harness { registry, .. } = h;
    drop(registry);
    let fds = std::fs::read_dir("/proc/self/fd").unwrap();
    let open = fds
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| target.starts_with(&dir))
        .count();
    assert_eq!(open, 0, "nothing open once the registry is gone");
}

#[tokio::test]
async fn deleting_the_newest_snapshot_frees_what_the_head_shadows() {
    let mut h = Harness::new();
    h.apply(Op::Write {
        vol: 0,
        offset: 0,
        len: 8 * 4096,
        seed: 3,
    })
    .await;
    h.apply(Op::Snapshot { vol: 0 }).await;
    h.apply(Op::Write {
        vol: 0,
        offset: 4096,
        len: 2 * 4096,
        seed: 9,
    })
    .await;
    h.apply(Op::DeleteSnapshot { vol: 0, pick: 0 }).await;
    h.check().await;
    let entry = h.registry.entry("v0").unwrap();
    let state = entry.lock();
    let head = state.manifest.head.clone();
    let below = state.manifest.layer(&head).unwrap().parent.clone().unwrap();
    // The old layer stays (it holds more than the head) but keeps only the 6 unshadowed blocks.
    assert_eq!(state.layers[&below].map().data_blocks(), 6);
    assert_eq!(state.layers[&head].map().data_blocks(), 2);
}

/// BLOCK_STATUS walks at most `MAX_STATUS_STEPS` blocks one by one: over a long allocated
/// range the reply stops short (as the spec allows) and says what it covers truly, while a
/// range no layer holds is one step however long.
#[tokio::test]
async fn block_status_over_a_long_allocated_range_stops_short() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let engine = IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
    let registry = Registry::open(dir.path(), engine).unwrap();
    let vol = registry.create("v", 1024 * MIB).unwrap();
    let keep = ZeroMode {
        may_trim: false,
        fast_only: false,
    };
    // Allocated zeroes: 512 MiB of blocks the head holds, without writing them.
    vol.write_zeroes(0, 512 * MIB, keep, false).await.unwrap();
    let status = vol
        .block_status(&StatusQuery::Allocation, 0, 1024 * MIB, 16)
        .await
        .unwrap();
    assert_eq!(status, vec![(256 * MIB, 0)], "the first 256 MiB, as data");
    let rest = vol
        .block_status(&StatusQuery::Allocation, 384 * MIB, 640 * MIB, 16)
        .await
        .unwrap();
    assert_eq!(
        rest,
        vec![
            (128 * MIB, 0),
            (512 * MIB, EXTENT_HOLE | crate::storage::volume::EXTENT_ZERO)
        ],
        "the last 128 MiB of data, then the unallocated half in one step"
    );
}
