//! Backups (VBS) end to end against the daemon's default local store (`file://DATA_DIR/backups`):
//! full and incremental backups restored byte for byte, incrementals that read only the changed
//! chunks (also after snapshot deletes and a restart), dedup across a clone, delete + GC,
//! restore after the volume is gone, restores where O_DIRECT is refused, a corrupted chunk
//! caught by verify and by restore, deltas in packs that live while a manifest needs them, a
//! `kill -9` in the middle of a backup, fio verifying while backups run, evsctl and metrics.
//! tests/tests/backups_s3.rs runs the store-facing cases against a real S3 server.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use evsd_e2e::admin::*;
use evsd_e2e::backups::*;
use evsd_e2e::raw::*;
use evsd_e2e::*;
use serde_json::{json, Value};

fn store_dir(d: &Daemon) -> PathBuf {
    d.data_dir().join("backups")
}

/// The chunk objects in a local store: (path, size). A chunk being written (or whose write a
/// crash cut short) sits in a staging file named `<id>#<n>` and does not count.
fn chunk_files(store: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let Ok(dirs) = fs::read_dir(store.join("chunks")) else {
        return out;
    };
    for dir in dirs.flatten() {
        // A GC running meanwhile removes chunks and the directories it empties.
        let Ok(files) = fs::read_dir(dir.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let Ok(meta) = f.metadata() else { continue };
            if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                out.push((f.path(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

/// Plants a GC's exclusive lock in the store: backup jobs wait for it before they upload.
/// Removing the returned file lets them go on.
fn plant_gc_lock(d: &Daemon) -> PathBuf {
    let gc_lock = store_dir(d).join("locks").join("exclusive-planted.json");
    fs::create_dir_all(gc_lock.parent().unwrap()).unwrap();
    fs::write(&gc_lock, b"{}").unwrap();
    gc_lock
}

fn snapshot_names(d: &Daemon, vol: &str) -> Vec<String> {
    admin_ok(d, "snapshot.list", json!({"volume": vol}))["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------

#[test]
fn full_then_incremental_restore_byte_identical_and_read_only_changes() {
    let d = start();
    let size = 256 * MIB;
    let mut model = half_random(&d, "vol0", size, 1);
    let a = model.clone();

    let b1 = backup_now(&d, "vol0", false);
    assert_eq!(b1["incremental"], false, "{b1:#}");
    assert_eq!(u(&b1, "chunks"), 64, "{b1:#}");
    assert_eq!(u(&b1, "data_chunks"), 32, "{b1:#}");
    assert_eq!(u(&b1, "zero_chunks"), 32, "{b1:#}");
    assert_eq!(u(&b1, "new_chunks"), 32, "{b1:#}");
    // Zero chunks are known from the layer maps: never read.
    assert_eq!(u(&b1, "read_bytes"), 128 * MIB, "{b1:#}");
    let full_stored = u(&b1, "new_stored_bytes");
    assert!(
        full_stored >= 128 * MIB,
        "random data does not shrink: {b1:#}"
    );

    // 1% of the volume (2.5 MiB) rewritten as 4 KiB writes inside one chunk.
    let region = 9 * CHUNK;
    let mut rng = Prng::new(7);
    let (mut raw, _) = Raw::open(d.tcp_addr(), "vol0");
    for i in 0..640u64 {
        let block = rng.next_u64() % (CHUNK / 4096);
        let data = rng.bytes(4096);
        let off = region + block * 4096;
        raw.write(i + 1, 0, off, &data);
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    raw.flush(0xf2);
    raw.disconnect();
    let b = model.clone();

    let b2 = backup_now(&d, "vol0", false);
    assert_eq!(b2["incremental"], true, "{b2:#}");
    assert_eq!(b2["parent"], b1["id"], "{b2:#}");
    assert_eq!(
        u(&b2, "read_bytes"),
        CHUNK,
        "only the changed chunk is read: {b2:#}"
    );
    assert_eq!(u(&b2, "new_chunks"), 1, "{b2:#}");
    let inc_stored = u(&b2, "new_stored_bytes");
    assert!(
        inc_stored * 100 <= full_stored * 4,
        "the incremental stored {inc_stored} bytes against {full_stored} for the full"
    );
    // The volume keeps only the newest backup snapshot as its next base (the older one is
    // released right after the backup completes).
    let b2_snap = b2["snapshot"].as_str().unwrap().to_owned();
    assert!(
        wait_until(Duration::from_secs(10), || snapshot_names(&d, "vol0")
            == vec![b2_snap.clone()]),
        "{:?}",
        snapshot_names(&d, "vol0")
    );

    restore_new(&d, "r1", b1["id"].as_str().unwrap());
    restore_new(&d, "r2", b2["id"].as_str().unwrap());
    assert_same("restore of b1", &read_export(&d, "r1"), &a);
    assert_same("restore of b2", &read_export(&d, "r2"), &b);

    // In place, onto the original volume (no client attached).
    let r = admin_ok(&d, "backup.restore", json!({"id": b1["id"], "to": "vol0"}));
    wait_job_ok(&d, r["job"]["id"].as_str().unwrap());
    assert_same("vol0 restored to b1", &read_export(&d, "vol0"), &a);

    // Progress is visible in job.list and in the metrics.
    let jobs = admin_ok(&d, "job.list", json!({}));
    let done: Vec<&Value> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["state"] == "succeeded")
        .collect();
    assert!(done.len() >= 5, "{jobs:#}");
    for j in done {
        assert_eq!(
            j["progress"]["bytes_done"], j["progress"]["bytes_total"],
            "{j:#}"
        );
    }
    let addr = d.metrics_addr().expect("metrics listener");
    let text = evsd_e2e::metrics::scrape(addr);
    let uploaded_line = text
        .lines()
        .find(|l| l.starts_with("evsd_backup_uploaded_bytes_total "))
        .unwrap_or_else(|| panic!("no upload counter in\n{text}"));
    let uploaded: u64 = uploaded_line.split(' ').nth(1).unwrap().parse().unwrap();
    assert_eq!(uploaded, full_stored + inc_stored, "{uploaded_line}");
    assert!(text.contains("evsd_job_bytes_done{"), "{text}");
}

#[test]
fn incremental_survives_snapshot_deletes_and_restart() {
    let d0 = start();
    let size = 64 * MIB;
    let mut model = half_random(&d0, "vol0", size, 2);
    let mut d = d0;
    let b1 = backup_now(&d, "vol0", false);

    write_at(&d, "vol0", CHUNK + 4096, &random(3, 8192), &mut model);
    admin_ok(
        &d,
        "snapshot.create",
        json!({"volume": "vol0", "name": "s1"}),
    );
    write_at(&d, "vol0", 5 * CHUNK, &random(4, 4096), &mut model);
    admin_ok(
        &d,
        "snapshot.create",
        json!({"volume": "vol0", "name": "s2"}),
    );
    admin_ok_when_idle(
        &d,
        "snapshot.delete",
        json!({"volume": "vol0", "name": "s1"}),
    );
    d.terminate_ok();
    d.restart();
    // A zero chunk that gets data.
    write_at(&d, "vol0", 12 * CHUNK, &random(5, 4096), &mut model);
    admin_ok_when_idle(
        &d,
        "snapshot.delete",
        json!({"volume": "vol0", "name": "s2"}),
    );

    let b2 = backup_now(&d, "vol0", false);
    assert_eq!(b2["parent"], b1["id"], "{b2:#}");
    assert_eq!(b2["incremental"], true, "{b2:#}");
    // Chunks 1, 5 and 12 changed: each is named from b1's cached chunk tree (or zeroes) and
    // its changed blocks alone (8, 4 and 4 KiB, hashed into the tree's 4 KiB leaves), and
    // stored as a delta of b1's chunk. Nothing unchanged is read.
    assert_eq!(
        u(&b2, "read_bytes"),
        16384,
        "the changed blocks of chunks 1, 5 and 12: {b2:#}"
    );
    assert_eq!(u(&b2, "delta_chunks"), 3, "{b2:#}");
    assert!(
        u(&b2, "new_stored_bytes") < 64 * 1024,
        "deltas store about the changed blocks: {b2:#}"
    );
    restore_new(&d, "r2", b2["id"].as_str().unwrap());
    assert_same("restore of b2", &read_export(&d, "r2"), &model);

    // --full reads everything again; it reuses the whole chunks the store has and stores
    // whole the three b2 keeps only as deltas (it depends on no pack).
    let b3 = backup_now(&d, "vol0", true);
    assert_eq!(b3["incremental"], false, "{b3:#}");
    assert_eq!(u(&b3, "new_chunks"), 3, "{b3:#}");
    assert_eq!(u(&b3, "delta_chunks"), 0, "{b3:#}");
    assert_eq!(u(&b3, "read_bytes"), 9 * CHUNK, "chunks 0-7 and 12: {b3:#}");
}

/// The cached chunk trees of the volume backup `b` was taken of.
fn tree_file(d: &Daemon, b: &Value) -> PathBuf {
    let uuid = manifest_of(d, b)["volume_uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    d.data_dir()
        .join("backup-trees")
        .join(format!("{uuid}.trees2"))
}

/// Bytes of one chunk's record in a volume's tree file (`<uuid>.trees2`): the chunk id, the
/// CVs of its 1024 blocks, then those of its spans and the levels above, padded to 48 KiB.
const TREE_RECORD_BYTES: usize = 48 << 10;

#[test]
fn a_stale_chunk_tree_costs_a_whole_read_never_a_wrong_id() {
    let d = start();
    let mut model = half_random(&d, "vol0", 32 * MIB, 7);
    let b1 = backup_now(&d, "vol0", false);
    // In chunk 2's cached tree, the CV of block 1 goes stale: it is the sibling of block 0,
    // which changes next, so naming chunk 2 from the tree would use it.
    let path = tree_file(&d, &b1);
    let mut trees = fs::read(&path).unwrap();
    // Chunks 0-3 hold data; 4-7 are zeroes, which need no record.
    assert_eq!(
        trees.len(),
        4 * TREE_RECORD_BYTES,
        "a record per data chunk"
    );
    trees[2 * TREE_RECORD_BYTES + 32 + 32] ^= 0xff;
    fs::write(&path, &trees).unwrap();
    write_at(&d, "vol0", 2 * CHUNK, &random(8, 4096), &mut model);
    write_at(&d, "vol0", 3 * CHUNK + 8192, &random(9, 4096), &mut model);

    let b2 = backup_now(&d, "vol0", false);
    assert_eq!(b2["incremental"], true, "{b2:#}");
    // Chunk 3's tree proves b1's id: only its changed block is read. Chunk 2's does not: once
    // its changed block is read and the tree refused, the chunk is read whole instead of being
    // named wrongly.
    assert_eq!(
        u(&b2, "read_bytes"),
        4096 + CHUNK + 4096,
        "chunk 2's changed block, then chunk 2 whole; chunk 3's changed block: {b2:#}"
    );
    assert_eq!(u(&b2, "delta_chunks"), 1, "{b2:#}");
    restore_new(&d, "r2", b2["id"].as_str().unwrap());
    assert_same("restore of b2", &read_export(&d, "r2"), &model);
    let v = admin_ok(&d, "backup.verify", json!({"id": b2["id"]}));
    let j = wait_job_ok(&d, v["job"]["id"].as_str().unwrap());
    assert_eq!(j["result"]["bad_chunks"], json!([]), "{j:#}");
}

#[test]
fn delta_chains_restore_verify_and_keep_their_bases_through_gc() {
    let d = start();
    let size = 64 * MIB;
    let mut model = half_random(&d, "vol0", size, 21);
    let mut backups = vec![(backup_now(&d, "vol0", false), model.clone())];
    let mut rng = Prng::new(22);
    for k in 1..=10u64 {
        // Three scattered 4 KiB blocks in a data chunk (1) and in a zero chunk (6).
        for chunk in [1u64, 6] {
            for _ in 0..3 {
                let block = rng.next_u64() % (CHUNK / 4096);
                write_at(
                    &d,
                    "vol0",
                    chunk * CHUNK + block * 4096,
                    &rng.bytes(4096),
                    &mut model,
                );
            }
        }
        let b = backup_now(&d, "vol0", false);
        assert_eq!(b["incremental"], true, "{b:#}");
        // A chain holds at most 8 deltas: the 8th incremental stores both chunks whole again
        // (chunk 6's chain starts with a delta over zeroes, chunk 1's with b0's whole chunk).
        let expected_deltas = if k == 8 { 0 } else { 2 };
        assert_eq!(
            u(&b, "delta_chunks"),
            expected_deltas,
            "incremental {k}: {b:#}"
        );
        if expected_deltas == 2 {
            assert!(
                u(&b, "new_stored_bytes") < 64 * 1024,
                "incremental {k}: {b:#}"
            );
        }
        backups.push((b, model.clone()));
    }
    for (i, (b, expected)) in backups.iter().enumerate() {
        let name = format!("r{i}");
        restore_new(&d, &name, b["id"].as_str().unwrap());
        assert_same(
            &format!("restore of backup {i}"),
            &read_export(&d, &name),
            expected,
        );
        admin_ok(&d, "volume.delete", json!({"name": name}));
    }
    // Restoring over the live volume: chunk 6 (deltas over zeroes) is trimmed, then only the
    // blocks the deltas wrote are written; garbage written there first must not survive.
    write_at(&d, "vol0", 6 * CHUNK, &random(26, CHUNK), &mut model);
    let (last, expected) = &backups[backups.len() - 1];
    let r = admin_ok(
        &d,
        "backup.restore",
        json!({"id": last["id"], "to": "vol0"}),
    );
    wait_job_ok(&d, r["job"]["id"].as_str().unwrap());
    assert_same(
        "vol0 restored over garbage",
        &read_export(&d, "vol0"),
        expected,
    );
    // Only the last two backups stay; their deltas reach down into deleted backups' chunks.
    for (b, _) in &backups[..backups.len() - 2] {
        admin_ok(&d, "backup.delete", json!({"id": b["id"]}));
    }
    let gc = admin_ok(&d, "backup.gc", json!({}));
    assert_eq!(gc["deferred"], false, "{gc:#}");
    for (i, (b, expected)) in backups.iter().enumerate().skip(backups.len() - 2) {
        let v = admin_ok(&d, "backup.verify", json!({"id": b["id"]}));
        let j = wait_job_ok(&d, v["job"]["id"].as_str().unwrap());
        assert_eq!(j["result"]["bad_chunks"], json!([]), "backup {i}: {j:#}");
        let name = format!("after-gc-{i}");
        restore_new(&d, &name, b["id"].as_str().unwrap());
        assert_same(
            &format!("backup {i} after GC"),
            &read_export(&d, &name),
            expected,
        );
    }
    // Removing a delta's base from the store: verify names the delta, restore fails loudly.
    let last = &backups[backups.len() - 1].0;
    let manifest: Value = serde_json::from_slice(
        &fs::read(
            store_dir(&d)
                .join("manifests")
                .join(format!("{}.json", last["id"].as_str().unwrap())),
        )
        .unwrap(),
    )
    .unwrap();
    let listed: Vec<&Value> = manifest["chunks"].as_array().unwrap().iter().collect();
    let bases = manifest["delta_bases"].as_object().unwrap();
    let delta = bases
        .keys()
        .find(|k| listed.contains(&&json!(k)))
        .expect("the last backup lists a delta over another chunk")
        .clone();
    // Down the chain (deltas sit in packs) to the whole chunk at its bottom, an object of its
    // own; the manifest locates every packed chunk it reaches.
    let mut base = delta.clone();
    while let Some(below) = bases.get(&base) {
        base = below.as_str().unwrap().to_owned();
    }
    assert_ne!(base, delta);
    for id in bases.keys() {
        assert!(
            manifest["packed"].get(id).is_some(),
            "delta {id} is located: {manifest:#}"
        );
    }
    let base_file = store_dir(&d).join("chunks").join(&base[..2]).join(&base);
    assert!(base_file.exists(), "the chain's bottom is a whole chunk");
    // Another valid whole chunk under the base's name: every check but the hash passes, and
    // the base is checked through its tree under the delta.
    let (other, _) = chunk_files(&store_dir(&d))
        .into_iter()
        .find(|(p, size)| *p != base_file && *size > MIB)
        .expect("another whole chunk");
    let original = fs::read(&base_file).unwrap();
    fs::copy(&other, &base_file).unwrap();
    let v = admin_ok(&d, "backup.verify", json!({"id": last["id"]}));
    let j = wait_job_ok(&d, v["job"]["id"].as_str().unwrap());
    let bad = j["result"]["bad_chunks"].as_array().unwrap();
    assert!(
        bad.iter()
            .any(|c| c["chunk_id"] == json!(delta)
                && c["error"].as_str().unwrap().contains("hashes to")),
        "verify names the delta over a wrong base: {j:#}"
    );
    fs::write(&base_file, &original).unwrap();
    fs::remove_file(&base_file).unwrap();
    let v = admin_ok(&d, "backup.verify", json!({"id": last["id"]}));
    let j = wait_job_ok(&d, v["job"]["id"].as_str().unwrap());
    let bad = j["result"]["bad_chunks"].as_array().unwrap();
    assert!(
        bad.iter().any(|c| c["chunk_id"] == json!(delta)),
        "verify names the delta whose base is gone: {j:#}"
    );
    let v = admin_ok(
        &d,
        "volume.create",
        json!({"name": "broken", "from_backup": last["id"]}),
    );
    let j = wait_job_end(&d, v["job"]["id"].as_str().unwrap());
    assert_eq!(j["state"], "failed", "{j:#}");
}

#[test]
fn clone_backup_dedups_against_its_source() {
    let d = start();
    let model = half_random(&d, "vol0", 64 * MIB, 6);
    let b1 = backup_now(&d, "vol0", false);
    assert_eq!(u(&b1, "new_chunks"), 8, "{b1:#}");
    admin_ok(
        &d,
        "snapshot.create",
        json!({"volume": "vol0", "name": "gold"}),
    );
    admin_ok(
        &d,
        "volume.create",
        json!({"name": "clone", "from_snapshot": "vol0@gold"}),
    );
    let c = backup_now(&d, "clone", false);
    assert_eq!(
        c["incremental"], false,
        "a clone's first backup is full: {c:#}"
    );
    assert_eq!(u(&c, "data_chunks"), 8, "{c:#}");
    assert_eq!(
        u(&c, "new_chunks"),
        0,
        "every chunk is already stored: {c:#}"
    );
    assert_eq!(u(&c, "new_stored_bytes"), 0, "{c:#}");
    restore_new(&d, "r", c["id"].as_str().unwrap());
    assert_same("restored clone", &read_export(&d, "r"), &model);
}

#[test]
fn delete_and_gc_free_exactly_the_unreferenced_chunks() {
    let d = start();
    let mut model = half_random(&d, "vol0", 64 * MIB, 8);
    let b1 = backup_now(&d, "vol0", false);
    let before = chunk_files(&store_dir(&d));
    assert_eq!(before.len(), 8);
    // Chunks 0 and 1 get new content: b2 references 2 new chunks and 6 of b1's.
    write_at(&d, "vol0", 0, &random(9, 2 * CHUNK), &mut model);
    let b2 = backup_now(&d, "vol0", false);
    assert_eq!(u(&b2, "new_chunks"), 2, "{b2:#}");
    let both = chunk_files(&store_dir(&d));
    assert_eq!(both.len(), 10);
    let only_b1: Vec<&(PathBuf, u64)> = before
        .iter()
        .filter(|(p, _)| {
            let name = p.file_name().unwrap().to_str().unwrap();
            !b2_references(&d, &b2, name)
        })
        .collect();
    assert_eq!(only_b1.len(), 2, "{only_b1:?}");

    let r = admin_ok(&d, "backup.delete", json!({"id": b1["id"]}));
    assert_eq!(r["gc"]["deferred"], false, "{r:#}");
    assert_eq!(r["gc"]["chunks_deleted"], 2, "{r:#}");
    let freed: u64 = only_b1.iter().map(|(_, s)| s).sum();
    assert_eq!(r["gc"]["bytes_freed"], json!(freed), "{r:#}");
    let after = chunk_files(&store_dir(&d));
    assert_eq!(after.len(), 8);
    for (p, _) in &only_b1 {
        assert!(!p.exists(), "{} survived GC", p.display());
    }
    // b2 still complete.
    let v = admin_ok(&d, "backup.verify", json!({"id": b2["id"]}));
    let j = wait_job_ok(&d, v["job"]["id"].as_str().unwrap());
    assert_eq!(j["result"]["bad_chunks"], json!([]), "{j:#}");
    restore_new(&d, "r2", b2["id"].as_str().unwrap());
    assert_same("b2 after GC", &read_export(&d, "r2"), &model);
    let list = admin_ok(&d, "backup.list", json!({}));
    assert_eq!(list["backups"].as_array().unwrap().len(), 1, "{list:#}");
    admin_err(&d, "backup.show", json!({"id": b1["id"]}), "not_found");

    admin_ok(&d, "backup.delete", json!({"id": b2["id"]}));
    assert_eq!(chunk_files(&store_dir(&d)).len(), 0);
    let gc = admin_ok(&d, "backup.gc", json!({}));
    assert_eq!(gc["chunks_deleted"], 0, "{gc:#}");
}

/// The pack objects in a local store, by name.
fn pack_names(store: &Path) -> Vec<String> {
    let Ok(files) = fs::read_dir(store.join("packs")) else {
        return Vec::new();
    };
    let mut names: Vec<String> = files
        .flatten()
        .map(|f| f.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.contains('#'))
        .collect();
    names.sort();
    names
}

fn manifest_of(d: &Daemon, b: &Value) -> Value {
    let path = store_dir(d)
        .join("manifests")
        .join(format!("{}.json", b["id"].as_str().unwrap()));
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

#[test]
fn packs_hold_deltas_and_live_while_a_manifest_needs_them() {
    let d = start();
    let mut model = half_random(&d, "vol0", 64 * MIB, 31);
    let b1 = backup_now(&d, "vol0", false);
    assert_eq!(pack_names(&store_dir(&d)), Vec::<String>::new());
    let mut rng = Prng::new(32);
    let mut scatter = |d: &Daemon, model: &mut Vec<u8>| {
        for chunk in 0..16u64 {
            let block = rng.next_u64() % (CHUNK / 4096);
            write_at(
                d,
                "vol0",
                chunk * CHUNK + block * 4096,
                &rng.bytes(4096),
                model,
            );
        }
    };
    // One block in each of the 16 chunks: 16 deltas, one pack.
    scatter(&d, &mut model);
    let b2 = backup_now(&d, "vol0", false);
    assert_eq!(u(&b2, "delta_chunks"), 16, "{b2:#}");
    let packs_b2 = pack_names(&store_dir(&d));
    assert_eq!(packs_b2.len(), 1, "{packs_b2:?}");
    assert!(packs_b2[0].starts_with(b2["id"].as_str().unwrap()));
    let m2 = manifest_of(&d, &b2);
    let packed = m2["packed"].as_object().unwrap();
    assert_eq!(packed.len(), 16, "{m2:#}");
    assert!(packed.values().all(|at| at["pack"] == json!(packs_b2[0])));
    // Every delta is in the pack, not an object of its own.
    let chunk_count = chunk_files(&store_dir(&d)).len();
    assert_eq!(chunk_count, u(&b1, "new_chunks") as usize);

    // b3's deltas patch b2's: its manifest locates chunks in both packs.
    scatter(&d, &mut model);
    let b3 = backup_now(&d, "vol0", false);
    assert_eq!(u(&b3, "delta_chunks"), 16, "{b3:#}");
    let packs_all = pack_names(&store_dir(&d));
    assert_eq!(packs_all.len(), 2, "{packs_all:?}");
    let m3 = manifest_of(&d, &b3);
    let used: std::collections::BTreeSet<&str> = m3["packed"]
        .as_object()
        .unwrap()
        .values()
        .map(|at| at["pack"].as_str().unwrap())
        .collect();
    assert_eq!(used.len(), 2, "{m3:#}");

    // Deleting b2 keeps its pack (b3 needs it); restores of b3 still come out right.
    let r = admin_ok(&d, "backup.delete", json!({"id": b2["id"]}));
    assert_eq!(r["gc"]["packs_deleted"], 0, "{r:#}");
    assert_eq!(pack_names(&store_dir(&d)), packs_all);
    restore_new(&d, "r3", b3["id"].as_str().unwrap());
    assert_same("b3 after b2 was deleted", &read_export(&d, "r3"), &model);

    // A byte flipped inside a packed delta: verify names a chunk, restore fails loudly.
    let pack_path = store_dir(&d).join("packs").join(&packs_all[1]);
    let original = fs::read(&pack_path).unwrap();
    let mut damaged = original.clone();
    let last = damaged.len() - 10;
    damaged[last] ^= 0x40;
    fs::write(&pack_path, &damaged).unwrap();
    let v = admin_ok(&d, "backup.verify", json!({"id": b3["id"]}));
    let j = wait_job_ok(&d, v["job"]["id"].as_str().unwrap());
    assert_eq!(
        j["result"]["bad_chunks"].as_array().unwrap().len(),
        1,
        "{j:#}"
    );
    let v = admin_ok(
        &d,
        "volume.create",
        json!({"name": "broken", "from_backup": b3["id"]}),
    );
    let j = wait_job_end(&d, v["job"]["id"].as_str().unwrap());
    assert_eq!(j["state"], "failed", "{j:#}");
    fs::write(&pack_path, &original).unwrap();

    // A full backup stores whole the chunks earlier backups keep only in packs (it depends on
    // no pack: a damaged one is not named again).
    let b4 = backup_now(&d, "vol0", true);
    assert_eq!(u(&b4, "new_chunks"), 16, "{b4:#}");
    let m4 = manifest_of(&d, &b4);
    assert!(
        m4.get("packed")
            .is_none_or(|p| p.as_object().unwrap().is_empty()),
        "{m4:#}"
    );
    restore_new(&d, "r4", b4["id"].as_str().unwrap());
    assert_same(
        "full backup over packed chunks",
        &read_export(&d, "r4"),
        &model,
    );

    // Once no manifest needs a pack, GC removes it; b1 (whole chunks only) stays restorable.
    for b in [&b3, &b4] {
        admin_ok(&d, "backup.delete", json!({"id": b["id"]}));
    }
    assert_eq!(pack_names(&store_dir(&d)), Vec::<String>::new());
    let gc = admin_ok(&d, "backup.gc", json!({}));
    assert_eq!(gc["packs_deleted"], 0, "{gc:#}");
    assert_eq!(gc["packs_kept"], 0, "{gc:#}");
}

/// Whether the manifest of `b` (read from the local store) names chunk `hex`.
fn b2_references(d: &Daemon, b: &Value, hex: &str) -> bool {
    let path = store_dir(d)
        .join("manifests")
        .join(format!("{}.json", b["id"].as_str().unwrap()));
    let manifest: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    manifest["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c.as_str() == Some(hex))
}

#[test]
fn deleted_volume_restores_from_its_backup() {
    let d = start();
    let model = half_random(&d, "vol0", 32 * MIB, 10);
    let b = backup_now(&d, "vol0", false);
    let trees = tree_file(&d, &b);
    assert!(trees.exists(), "the backup cached its chunk trees");
    admin_ok_when_idle(&d, "volume.delete", json!({"name": "vol0"}));
    admin_err(&d, "volume.show", json!({"name": "vol0"}), "not_found");
    assert!(!trees.exists(), "the chunk trees go with the volume");
    let list = admin_ok(&d, "backup.list", json!({"volume": "vol0"}));
    assert_eq!(list["backups"][0]["id"], b["id"], "{list:#}");
    restore_new(&d, "vol0", b["id"].as_str().unwrap());
    assert_same("vol0 from its backup", &read_export(&d, "vol0"), &model);
    // A restore refuses a volume of another size and a busy volume.
    create_volume(&d, "small", 16 * MIB);
    admin_err(
        &d,
        "backup.restore",
        json!({"id": b["id"], "to": "small"}),
        "invalid_argument",
    );
    let (_held, _) = Raw::open(d.tcp_addr(), "vol0");
    admin_err(
        &d,
        "backup.restore",
        json!({"id": b["id"], "to": "vol0"}),
        "busy",
    );
    admin_err(
        &d,
        "backup.show",
        json!({"id": "../etc"}),
        "invalid_argument",
    );
    admin_err(&d, "backup.show", json!({"id": "b-nope"}), "not_found");
}

#[test]
fn restores_fall_back_to_the_page_cache_where_o_direct_is_refused() {
    let fs = evsd_e2e::faults::TmpfsMount::ramfs();
    let d = Daemon::start(DaemonOpts::new().no_default_volume().data_dir(fs.path()));
    // Two whole chunks and a short one.
    let size = 2 * CHUNK + 12 * KIB;
    create_volume(&d, "vol0", size);
    let mut model = vec![0u8; size as usize];
    write_at(&d, "vol0", 0, &random(21, size), &mut model);
    let b = backup_now(&d, "vol0", false);
    restore_new(&d, "r", b["id"].as_str().unwrap());
    assert_same("restore on ramfs", &read_export(&d, "r"), &model);
    // On ramfs too an incremental names chunk 1 from its cached tree, reading only the block
    // written.
    let mut changed = model.clone();
    write_at(&d, "vol0", CHUNK + 8192, &random(23, 4096), &mut changed);
    let b2 = backup_now(&d, "vol0", false);
    assert_eq!(b2["parent"], b["id"], "{b2:#}");
    assert_eq!(u(&b2, "read_bytes"), 4096, "{b2:#}");
    assert_eq!(u(&b2, "delta_chunks"), 1, "{b2:#}");
    restore_new(&d, "r2", b2["id"].as_str().unwrap());
    assert_same("incremental on ramfs", &read_export(&d, "r2"), &changed);
    // Over data of its own, just read (so cached): the restore must replace all of it.
    let backed_up = model.clone();
    write_at(&d, "vol0", MIB, &random(22, 5 * MIB), &mut model);
    assert_same("vol0 changed", &read_export(&d, "vol0"), &model);
    let r = admin_ok(&d, "backup.restore", json!({"id": b["id"], "to": "vol0"}));
    wait_job_ok(&d, r["job"]["id"].as_str().unwrap());
    assert_same(
        "vol0 restored on ramfs",
        &read_export(&d, "vol0"),
        &backed_up,
    );
    let log = d.stderr();
    assert_eq!(
        log.matches("O_DIRECT refused").count(),
        1,
        "one warning for the daemon:\n{log}"
    );
}

#[test]
fn corrupted_chunk_is_named_by_verify_and_fails_restore() {
    let d = start();
    let model = half_random(&d, "vol0", 32 * MIB, 11);
    let b = backup_now(&d, "vol0", false);
    let chunks = chunk_files(&store_dir(&d));
    assert_eq!(chunks.len(), 4);
    let (victim, size) = &chunks[2];
    let hex = victim.file_name().unwrap().to_str().unwrap().to_owned();
    let mut bytes = fs::read(victim).unwrap();
    let mid = (*size / 2) as usize;
    bytes[mid] ^= 0x40;
    fs::write(victim, &bytes).unwrap();

    let v = admin_ok(&d, "backup.verify", json!({"id": b["id"]}));
    let j = wait_job_ok(&d, v["job"]["id"].as_str().unwrap());
    let bad = j["result"]["bad_chunks"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{j:#}");
    assert_eq!(bad[0]["chunk_id"], json!(hex), "{j:#}");
    assert_eq!(j["result"]["chunks_checked"], 4, "{j:#}");

    let v = admin_ok(
        &d,
        "volume.create",
        json!({"name": "r", "from_backup": b["id"]}),
    );
    let j = wait_job_end(&d, v["job"]["id"].as_str().unwrap());
    assert_eq!(j["state"], "failed", "{j:#}");
    let error = j["error"].as_str().unwrap();
    assert!(error.contains(&hex), "the error names the chunk: {error}");
    // The half-restored volume is gone rather than served.
    assert!(wait_until(Duration::from_secs(5), || admin(
        &d,
        "volume.show",
        json!({"name": "r"})
    )
    .is_err()));
    // A full backup checks the stored objects it would reuse and writes the damaged one again
    // (the same name: the older backup is repaired too); healthy ones it leaves alone.
    let healthy = chunks[0].0.clone();
    let healthy_written = fs::metadata(&healthy).unwrap().modified().unwrap();
    let full = backup_now(&d, "vol0", true);
    assert_eq!(u(&full, "new_chunks"), 1, "{full:#}");
    assert_eq!(
        fs::metadata(&healthy).unwrap().modified().unwrap(),
        healthy_written
    );
    restore_new(&d, "r2", full["id"].as_str().unwrap());
    assert_same(
        "a full backup after the damage",
        &read_export(&d, "r2"),
        &model,
    );
    restore_new(&d, "r3", b["id"].as_str().unwrap());
    assert_same(
        "the damaged backup, repaired",
        &read_export(&d, "r3"),
        &model,
    );
}

/// A restore stuck retrying a chunk the store can never read (its object is a directory:
/// EISDIR, an error that looks transient) is ended by `job.cancel`, and the volume made for it
/// is removed. Once the chunk is back, the same restore succeeds.
#[test]
fn cancel_ends_a_restore_stuck_on_an_unreadable_chunk() {
    let d = start();
    let model = half_random(&d, "vol0", 32 * MIB, 43);
    let b = backup_now(&d, "vol0", false);
    assert_eq!(chunk_files(&store_dir(&d)).len(), 4);
    let unreadable = UnreadableChunk::make(&d);
    let job_id = restore_held_up(&d, &b);
    let printed = d.evsctl_ok(&["job", "cancel", &job_id]);
    assert!(printed.contains("state:    cancelled\n"), "{printed}");
    assert!(
        printed.contains("volume \"r\" made for it was removed"),
        "{printed}"
    );
    admin_err(&d, "volume.show", json!({"name": "r"}), "not_found");
    // The cancel tells how it ended to whoever waits on the job too.
    assert_eq!(wait_job_end(&d, &job_id)["state"], "cancelled");

    unreadable.undo();
    restore_new(&d, "r", b["id"].as_str().unwrap());
    assert_same(
        "restore after the chunk is back",
        &read_export(&d, "r"),
        &model,
    );
}

/// A backup a restore is reading cannot be deleted (its chunks would go from under the
/// restore): `busy`. Once the restore has ended, the delete goes through, and the restored
/// volume is whole.
#[test]
fn a_backup_being_restored_is_not_deleted_under_the_restore() {
    let d = start();
    let model = half_random(&d, "vol0", 32 * MIB, 46);
    let b = backup_now(&d, "vol0", false);
    let unreadable = UnreadableChunk::make(&d);
    let job_id = restore_held_up(&d, &b);
    let message = admin_err(&d, "backup.delete", json!({"id": b["id"]}), "busy");
    assert!(message.contains("being read by a restore"), "{message}");
    admin_ok(&d, "backup.show", json!({"id": b["id"]}));
    unreadable.undo();
    wait_job_ok(&d, &job_id);
    assert_same("restored", &read_export(&d, "r"), &model);
    admin_ok(&d, "backup.delete", json!({"id": b["id"]}));
    admin_err(&d, "backup.show", json!({"id": b["id"]}), "not_found");
}

/// A backup deleted on another daemon sharing the store while a restore here reads it: the
/// restore's store lock defers that daemon's GC, so the chunks stay and the restore completes
/// byte for byte; the GC runs once the restore has ended.
#[test]
fn a_restore_keeps_its_chunks_from_another_daemons_gc() {
    let a = start();
    let model = half_random(&a, "vol0", 32 * MIB, 47);
    let b_id = backup_now(&a, "vol0", false)["id"].clone();
    let store = store_dir(&a);
    let other = Daemon::start(
        DaemonOpts::new()
            .no_default_volume()
            .arg("--backup-store")
            .arg(&format!("file://{}", store.display())),
    );
    let unreadable = UnreadableChunk::make(&a);
    let job_id = restore_held_up(&a, &json!({"id": b_id}));
    let deleted = admin_ok(&other, "backup.delete", json!({"id": b_id}));
    assert_eq!(deleted["gc"]["deferred"], true, "{deleted:#}");
    unreadable.undo();
    wait_job_ok(&a, &job_id);
    assert_same("restored", &read_export(&a, "r"), &model);
    // The other daemon's GC runs by itself once the restore's lock is gone.
    assert!(
        wait_until(Duration::from_secs(30), || chunk_files(&store).is_empty()),
        "{} chunks left",
        chunk_files(&store).len()
    );
}

/// A chunk object cut short in the store (a power loss, a damaged disk) is not taken for the
/// chunk: the next backup that meets the content stores it again, and restores from that
/// backup are whole.
#[test]
fn a_chunk_object_cut_short_is_stored_again_by_the_next_backup() {
    let d = start();
    let model = half_random(&d, "vol0", 16 * MIB, 49);
    backup_now(&d, "vol0", false);
    let store = store_dir(&d);
    let (cut, _) = chunk_files(&store)[0].clone();
    fs::write(&cut, b"").unwrap();
    let again = backup_now(&d, "vol0", true);
    assert!(
        fs::metadata(&cut).unwrap().len() > 24,
        "the cut object was not stored again: {again:#}"
    );
    restore_new(&d, "r", again["id"].as_str().unwrap());
    assert_same(
        "restored after the cut object",
        &read_export(&d, "r"),
        &model,
    );
}

/// A store on a read-only mount (as a replica of another site's store, or a user without write
/// access): restores and verifies read it without a store lock, with a warning, instead of
/// retrying "locking the store" for ever; a backup into it fails with the refusal.
#[test]
fn a_read_only_local_store_is_restored_from_without_a_lock() {
    require_root("a read-only bind mount");
    let a = start();
    let model = half_random(&a, "vol0", 16 * MIB, 48);
    let b_id = backup_now(&a, "vol0", false)["id"].clone();
    let mount = ReadOnlyMount::of(&store_dir(&a));
    let mut other = Daemon::start(
        DaemonOpts::new()
            .no_default_volume()
            .arg("--backup-store")
            .arg(&format!("file://{}", mount.path.display())),
    );
    restore_new(&other, "r", b_id.as_str().unwrap());
    assert_same(
        "restored from the read-only store",
        &read_export(&other, "r"),
        &model,
    );
    let verify = admin_ok(&other, "backup.verify", json!({"id": b_id}));
    let verified = wait_job_ok(&other, verify["job"]["id"].as_str().unwrap());
    assert_eq!(verified["result"]["bad_chunks"], json!([]), "{verified:#}");
    let stderr = other.all_stderr();
    assert!(
        stderr.contains("reading without one"),
        "no warning about the missing lock:\n{stderr}"
    );
    // A backup into it fails and names the refusal, it does not retry.
    let (job_id, _) = backup_start(&other, &["r"], false).remove(0);
    let failed = wait_job_end(&other, &job_id);
    assert_eq!(failed["state"], "failed", "{failed:#}");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("Read-only file system")),
        "{failed:#}"
    );
    other.terminate_ok();
}

/// A read-only bind mount of a directory, unmounted when dropped.
struct ReadOnlyMount {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ReadOnlyMount {
    fn of(source: &Path) -> ReadOnlyMount {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        fs::create_dir(&path).unwrap();
        run(
            "mount",
            &[
                std::ffi::OsStr::new("--bind"),
                source.as_os_str(),
                path.as_os_str(),
            ],
        );
        let mount = ReadOnlyMount { path, _dir: dir };
        run(
            "mount",
            &[
                std::ffi::OsStr::new("-o"),
                std::ffi::OsStr::new("remount,ro,bind"),
                mount.path.as_os_str(),
            ],
        );
        mount
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// A restore's record that outlives its job (its removal lost in a crash) must not run the
/// restore again at the next start: the volume may hold what clients wrote since. Staged by
/// copying the record while the restore is held up on an unreadable chunk and putting it
/// back after the restore completed and a client wrote.
#[test]
fn a_completed_restore_whose_record_came_back_is_not_run_again() {
    let mut d = start();
    half_random(&d, "vol0", 32 * MIB, 44);
    let b = backup_now(&d, "vol0", false);
    let unreadable = UnreadableChunk::make(&d);
    let job_id = restore_held_up(&d, &b);
    let record = d.data_dir().join("jobs").join(format!("{job_id}.json"));
    let saved_record = fs::read(&record).unwrap();
    unreadable.undo();
    wait_job_ok(&d, &job_id);
    let mut after = read_export(&d, "r");
    write_at(&d, "r", 0, &random(45, 8 * MIB), &mut after);

    d.terminate_ok();
    fs::write(&record, &saved_record).unwrap();
    d.restart();
    assert!(
        wait_until(Duration::from_secs(10), || !record.exists()),
        "the record was kept"
    );
    let show = admin_ok(&d, "volume.show", json!({"name": "r"}));
    assert_eq!(show["incomplete_restore"], json!(null), "{show:#}");
    assert_same("the client's writes", &read_export(&d, "r"), &after);
}

/// The second chunk object of the store replaced by a directory: reading it fails with EISDIR,
/// which a job retries until the object is back.
struct UnreadableChunk {
    path: PathBuf,
    saved: Vec<u8>,
}

impl UnreadableChunk {
    fn make(d: &Daemon) -> UnreadableChunk {
        let path = chunk_files(&store_dir(d))[1].0.clone();
        let saved = fs::read(&path).unwrap();
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        UnreadableChunk { path, saved }
    }

    fn undo(self) {
        fs::remove_dir(&self.path).unwrap();
        fs::write(&self.path, self.saved).unwrap();
    }
}

/// Starts a restore of backup `b` into a new volume `r` and waits until it retries (held up by
/// an [`UnreadableChunk`]); returns its job id.
fn restore_held_up(d: &Daemon, b: &Value) -> String {
    let v = admin_ok(
        d,
        "volume.create",
        json!({"name": "r", "from_backup": b["id"]}),
    );
    let job_id = v["job"]["id"].as_str().unwrap().to_owned();
    wait_retrying(d, &job_id);
    job_id
}

/// Waits until restore job `job_id` reports the store failing and retrying.
fn wait_retrying(d: &Daemon, job_id: &str) {
    assert!(
        wait_until(Duration::from_secs(30), || job(d, job_id)["state"]
            == "retrying"),
        "the restore never retried: {:#}",
        job(d, job_id)
    );
}

/// Cancels `job_id` through the admin socket; its error must say `undone`.
fn cancel_job(d: &Daemon, job_id: &str, undone: &str) {
    let cancelled = admin_ok(d, "job.cancel", json!({"id": job_id}));
    assert_eq!(cancelled["state"], "cancelled", "{cancelled:#}");
    assert!(
        cancelled["error"]
            .as_str()
            .is_some_and(|e| e.contains(undone)),
        "{cancelled:#}"
    );
}

/// The refusal a GO for `export` gets, or None when it is accepted.
fn go_refusal(d: &Daemon, export: &str) -> Option<(u32, String)> {
    let mut c = Raw::handshake(d.tcp_addr(), CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    let last = c.info_or_go(OPT_GO, export, &[]).pop().unwrap();
    last.is_err()
        .then(|| (last.typ, String::from_utf8_lossy(&last.data).into_owned()))
}

/// A restore over an existing volume that does not complete (cancelled here, as one that fails
/// is) leaves the volume marked: it refuses NBD clients with a message naming the backup, from
/// the restore's start and after a restart; `volume.show` says so; a rollback to a snapshot
/// or a restore that completes makes it whole and open again.
#[test]
fn an_incomplete_restore_in_place_keeps_clients_out_until_it_is_whole() {
    let mut d = start();
    let model = half_random(&d, "vol0", 32 * MIB, 44);
    let b = backup_now(&d, "vol0", false);
    let backup_id = b["id"].as_str().unwrap().to_owned();
    let mut changed = model.clone();
    write_at(&d, "vol0", 0, &random(45, 8 * MIB), &mut changed);
    admin_ok(
        &d,
        "snapshot.create",
        json!({"volume": "vol0", "name": "before"}),
    );
    let unreadable = UnreadableChunk::make(&d);

    let v = admin_ok(&d, "backup.restore", json!({"id": backup_id, "to": "vol0"}));
    let job_id = v["job"]["id"].as_str().unwrap().to_owned();
    wait_retrying(&d, &job_id);
    let refused = |d: &Daemon| {
        let (typ, message) = go_refusal(d, "vol0").expect("vol0 accepted a client");
        assert_eq!(typ, REP_ERR_POLICY, "{message}");
        assert!(
            message.contains("incomplete restore") && message.contains(&backup_id),
            "{message}"
        );
    };
    refused(&d);
    // While the restore runs, what would close the volume again says why it cannot.
    let e = admin_err(
        &d,
        "volume.delete",
        json!({"name": "vol0", "force": true}),
        "busy",
    );
    assert!(
        e.contains("is being restored") && e.contains("job cancel"),
        "{e}"
    );
    let e = admin_err(
        &d,
        "snapshot.rollback",
        json!({"volume": "vol0", "name": "before", "force": true}),
        "busy",
    );
    assert!(
        e.contains("is being restored") && e.contains("job cancel"),
        "{e}"
    );
    let e = admin_err(
        &d,
        "volume.resize",
        json!({"name": "vol0", "size": "2G"}),
        "busy",
    );
    assert!(e.contains("is being restored"), "{e}");
    let state_of_vol0 = |d: &Daemon| {
        let listed = d.evsctl_ok(&["volume", "list"]);
        listed
            .lines()
            .find(|l| l.starts_with("vol0 "))
            .unwrap_or_else(|| panic!("{listed}"))
            .to_owned()
    };
    assert!(
        state_of_vol0(&d).contains(" restoring "),
        "{}",
        state_of_vol0(&d)
    );
    let show = admin_ok(&d, "volume.show", json!({"name": "vol0"}));
    assert_eq!(show["closed_for"], json!("restore"), "{show:#}");
    cancel_job(
        &d,
        &job_id,
        "refuses clients until a restore into it succeeds",
    );
    refused(&d);
    // Nothing captures the half-restored data: no snapshot, so no backup either.
    let e = admin_err(
        &d,
        "snapshot.create",
        json!({"volume": "vol0", "name": "half"}),
        "busy",
    );
    assert!(e.contains("incomplete restore"), "{e}");
    admin_err(&d, "backup.create", json!({"volumes": ["vol0"]}), "busy");
    // With another volume named first, the whole call is refused and starts nothing: no job,
    // no snapshot left on the other volume.
    create_volume(&d, "other", 8 * MIB);
    let job_ids = |d: &Daemon| -> Vec<Value> {
        let jobs = admin_ok(d, "job.list", json!({}))["jobs"].clone();
        jobs.as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].clone())
            .collect()
    };
    let jobs_before = job_ids(&d);
    admin_err(
        &d,
        "backup.create",
        json!({"volumes": ["other", "vol0"]}),
        "busy",
    );
    assert_eq!(
        job_ids(&d),
        jobs_before,
        "a job started for the call that failed"
    );
    assert!(snapshot_names(&d, "other").is_empty());
    admin_ok(&d, "volume.delete", json!({"name": "other"}));
    let show = admin_ok(&d, "volume.show", json!({"name": "vol0"}));
    assert_eq!(show["closed_for"], json!(null), "{show:#}");
    assert!(
        state_of_vol0(&d).contains(" incomplete restore "),
        "{}",
        state_of_vol0(&d)
    );
    assert_eq!(
        show["incomplete_restore"]["backup_id"],
        json!(backup_id),
        "{show:#}"
    );
    assert_eq!(
        show["incomplete_restore"]["job_id"],
        json!(job_id),
        "{show:#}"
    );
    let printed = d.evsctl_ok(&["volume", "show", "vol0"]);
    assert!(
        printed.contains("restore:     incomplete: backup"),
        "{printed}"
    );
    // Snapshot exports are frozen before the restore: still served.
    assert!(go_refusal(&d, "vol0@before").is_none());

    d.restart();
    refused(&d);
    // Rolling back to a snapshot makes the volume whole: open again, with the snapshot's data.
    admin_ok(
        &d,
        "snapshot.rollback",
        json!({"volume": "vol0", "name": "before"}),
    );
    assert!(go_refusal(&d, "vol0").is_none());
    assert_eq!(
        admin_ok(&d, "volume.show", json!({"name": "vol0"}))["incomplete_restore"],
        Value::Null
    );
    assert_same("rolled back", &read_export(&d, "vol0"), &changed);

    // A restore that completes leaves no mark behind either.
    unreadable.undo();
    let v = admin_ok(&d, "backup.restore", json!({"id": backup_id, "to": "vol0"}));
    wait_job_ok(&d, v["job"]["id"].as_str().unwrap());
    assert!(go_refusal(&d, "vol0").is_none());
    assert!(!d.data_dir().join("volumes/vol0/restore.json").exists());
    assert_same("restored in place", &read_export(&d, "vol0"), &model);
}

/// A restore over an existing volume cancelled before it wrote a byte (every chunk it needs
/// is unreadable) leaves the volume as it was: unmarked, open, unchanged.
#[test]
fn a_restore_cancelled_before_writing_leaves_the_volume_unchanged() {
    let d = start();
    create_volume(&d, "vol0", 2 * CHUNK);
    let mut model = vec![0u8; (2 * CHUNK) as usize];
    write_at(&d, "vol0", 0, &random(46, 2 * CHUNK), &mut model);
    let b = backup_now(&d, "vol0", false);
    write_at(&d, "vol0", 0, &random(47, MIB), &mut model);
    let chunks = chunk_files(&store_dir(&d));
    assert_eq!(chunks.len(), 2);
    for (path, _) in &chunks {
        fs::remove_file(path).unwrap();
        fs::create_dir(path).unwrap();
    }
    let v = admin_ok(&d, "backup.restore", json!({"id": b["id"], "to": "vol0"}));
    let job_id = v["job"]["id"].as_str().unwrap().to_owned();
    wait_retrying(&d, &job_id);
    cancel_job(&d, &job_id, "was not written to and is unchanged");
    assert!(go_refusal(&d, "vol0").is_none());
    assert_eq!(
        admin_ok(&d, "volume.show", json!({"name": "vol0"}))["incomplete_restore"],
        Value::Null
    );
    assert!(!d.data_dir().join("volumes/vol0/restore.json").exists());
    assert_same("untouched", &read_export(&d, "vol0"), &model);
}

/// A restore's record whose volume lacks the job's mark (a crash between saving the record and
/// marking the volume: staged by removing the mark) or whose volume is gone (a failed restore's
/// new volume discarded, or the volume deleted; staged by removing its directory) is dropped
/// at start: the volume serves what it held, and one made again under the name is not filled.
/// A volume made for a restore whose record is missing (a crash between its creation and the
/// record: staged by removing the record) is removed at start, its name free again.
#[test]
fn restore_records_without_their_marked_volume_are_dropped_at_start() {
    let mut d = start();
    let model = half_random(&d, "vol0", 16 * MIB, 81);
    let b = backup_now(&d, "vol0", false);
    let mut changed = model.clone();
    write_at(&d, "vol0", 0, &random(82, MIB), &mut changed);
    let gc_lock = plant_gc_lock(&d);
    let in_place = admin_ok(&d, "backup.restore", json!({"id": b["id"], "to": "vol0"}));
    let made = admin_ok(
        &d,
        "volume.create",
        json!({"name": "r", "from_backup": b["id"]}),
    );
    let unrecorded = admin_ok(
        &d,
        "volume.create",
        json!({"name": "r2", "from_backup": b["id"]}),
    );
    let jobs = [&in_place, &made, &unrecorded].map(|v| v["job"]["id"].as_str().unwrap().to_owned());
    for id in &jobs {
        assert_eq!(job(&d, id)["state"], "running");
    }
    d.kill9();
    fs::remove_file(&gc_lock).unwrap();
    fs::remove_file(d.data_dir().join("volumes/vol0/restore.json")).unwrap();
    fs::remove_dir_all(d.data_dir().join("volumes/r")).unwrap();
    fs::remove_file(d.data_dir().join("jobs").join(format!("{}.json", jobs[2]))).unwrap();
    d.restart();
    admin_err(&d, "volume.show", json!({"name": "r2"}), "not_found");
    create_volume(&d, "r2", 16 * MIB);
    for id in &jobs {
        admin_err(&d, "job.show", json!({"id": id}), "not_found");
        assert!(!d
            .data_dir()
            .join("jobs")
            .join(format!("{id}.json"))
            .exists());
    }
    assert!(go_refusal(&d, "vol0").is_none());
    assert_same("the volume", &read_export(&d, "vol0"), &changed);
    let mut other = vec![0u8; (16 * MIB) as usize];
    create_volume(&d, "r", 16 * MIB);
    write_at(&d, "r", 0, &random(83, MIB), &mut other);
    thread::sleep(Duration::from_millis(500));
    assert!(go_refusal(&d, "r").is_none());
    assert_same("the new volume r", &read_export(&d, "r"), &other);
}

#[test]
fn kill9_mid_backup_resumes_without_uploading_stored_chunks_again() {
    let opts = DaemonOpts::new()
        .no_default_volume()
        .arg("--backup-rate-limit-mib-per-sec")
        .arg("24");
    let mut d = Daemon::start(opts);
    let size = 256 * MIB;
    let model = half_random(&d, "vol0", size, 12);
    let (job_id, backup_id) = backup_start(&d, &["vol0"], false).remove(0);
    assert!(
        wait_until(Duration::from_secs(60), || {
            let j = job(&d, &job_id);
            u(&j["progress"], "bytes_done") >= 48 * MIB
        }),
        "the backup made no progress"
    );
    thread::sleep(Duration::from_millis(2500)); // past a checkpoint
    let uploaded_before = chunk_files(&store_dir(&d)).len();
    assert!(
        uploaded_before >= 4,
        "{uploaded_before} chunks stored before the kill"
    );
    d.kill9();
    d.restart();
    let j = wait_job_ok(&d, &job_id);
    assert_eq!(j["backup_id"], json!(backup_id), "{j:#}");
    let b = admin_ok(&d, "backup.show", json!({"id": backup_id}));
    assert_eq!(u(&b, "data_chunks"), 32, "{b:#}");
    assert!(
        u(&b, "new_chunks") <= 32 - uploaded_before as u64,
        "the resumed run uploaded chunks that were stored before the kill: {b:#}"
    );
    assert_eq!(chunk_files(&store_dir(&d)).len(), 32);
    restore_new(&d, "r", &backup_id);
    assert_same("restore after resume", &read_export(&d, "r"), &model);
}

/// A job's record is saved before its snapshot is taken and not again until its first
/// checkpoint: killed in between, the job resumes from the snapshot it took, not a new one, so
/// what was written after `backup create` answered stays out of the backup. The job is held
/// before its first checkpoint by a GC lock planted in the store.
#[test]
fn kill9_before_a_backups_first_checkpoint_resumes_from_its_snapshot() {
    let mut d = start();
    let size = 64 * MIB;
    let model = half_random(&d, "vol0", size, 14);
    let gc_lock = plant_gc_lock(&d);
    let (job_id, backup_id) = backup_start(&d, &["vol0"], false).remove(0);
    let mut later = model.clone();
    write_at(&d, "vol0", 0, &random(15, MIB), &mut later);
    let record = d.data_dir().join("jobs").join(format!("{job_id}.json"));
    let saved: Value = serde_json::from_slice(&fs::read(&record).unwrap()).unwrap();
    assert_eq!(saved["snapshot_taken"], json!(false), "{saved:#}");
    assert_eq!(job(&d, &job_id)["state"], "running");
    d.kill9();
    fs::remove_file(&gc_lock).unwrap();
    d.restart();
    let j = wait_job_ok(&d, &job_id);
    assert_eq!(j["backup_id"], json!(backup_id), "{j:#}");
    restore_new(&d, "r", &backup_id);
    assert_same("restore after resume", &read_export(&d, "r"), &model);
    assert_same("the volume", &read_export(&d, "vol0"), &later);
    // Its snapshot is the volume's one backup base; no other was taken.
    assert_eq!(snapshot_names(&d, "vol0"), [format!("vbs-{backup_id}")]);
}

/// A resumed job whose snapshot is not there (never taken, or released by a run whose record
/// outlived it) fails rather than take a snapshot then, which would hold later data under the
/// backup's id. Staged by pointing a held job's record at a snapshot that does not exist.
#[test]
fn a_resumed_backup_without_its_snapshot_fails_instead_of_taking_one() {
    let mut d = start();
    half_random(&d, "vol0", 16 * MIB, 17);
    let gc_lock = plant_gc_lock(&d);
    let (job_id, backup_id) = backup_start(&d, &["vol0"], false).remove(0);
    assert_eq!(job(&d, &job_id)["state"], "running");
    d.kill9();
    fs::remove_file(&gc_lock).unwrap();
    let record = d.data_dir().join("jobs").join(format!("{job_id}.json"));
    let mut saved: Value = serde_json::from_slice(&fs::read(&record).unwrap()).unwrap();
    assert_eq!(saved["snapshot_taken"], json!(false), "{saved:#}");
    let absent = "vbs-b-20000101T000000Z-00000000";
    saved["snapshot"] = json!(absent);
    fs::write(&record, serde_json::to_vec(&saved).unwrap()).unwrap();
    d.restart();
    assert!(
        wait_until(Duration::from_secs(60), || job(&d, &job_id)["state"]
            != "running"),
        "the resumed job did not end"
    );
    let j = job(&d, &job_id);
    assert_eq!(j["state"], "failed", "{j:#}");
    assert!(
        j["error"].as_str().unwrap().contains("before the snapshot"),
        "{j:#}"
    );
    assert!(!snapshot_names(&d, "vol0").iter().any(|s| s == absent));
    assert!(!store_dir(&d)
        .join("manifests")
        .join(format!("{backup_id}.json"))
        .exists());
}

/// An incremental looks for its base while it takes the store lock. A base deleted in between,
/// and its objects swept by a GC on another daemon, must not become the parent: held back by a
/// planted GC lock, the job finds its base, which is then deleted with its packs; released, it
/// finds the base gone and backs up in full.
#[test]
fn a_base_deleted_while_the_store_lock_is_taken_is_not_the_parent() {
    let d = start();
    let mut model = half_random(&d, "vol0", 64 * MIB, 63);
    backup_now(&d, "vol0", false);
    let mut rng = Prng::new(64);
    let mut scatter = |d: &Daemon, model: &mut Vec<u8>| {
        for chunk in 0..16u64 {
            let block = rng.next_u64() % (CHUNK / 4096);
            let data = rng.bytes(4096);
            write_at(d, "vol0", chunk * CHUNK + block * 4096, &data, model);
        }
    };
    scatter(&d, &mut model);
    let b2 = backup_now(&d, "vol0", false);
    let b2_id = b2["id"].as_str().unwrap().to_owned();
    assert!(u(&b2, "delta_chunks") > 0, "{b2:#}");
    scatter(&d, &mut model);
    let store = store_dir(&d);
    let gc_lock = plant_gc_lock(&d);
    let (job_id, backup_id) = backup_start(&d, &["vol0"], false).remove(0);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(job(&d, &job_id)["state"], "running");
    // What a `backup delete` and a GC on another daemon leave of the base.
    fs::remove_file(store.join("manifests").join(format!("{b2_id}.json"))).unwrap();
    let mut removed_packs = 0;
    for pack in fs::read_dir(store.join("packs")).unwrap().flatten() {
        if pack.file_name().to_string_lossy().starts_with(&b2_id) {
            fs::remove_file(pack.path()).unwrap();
            removed_packs += 1;
        }
    }
    assert!(removed_packs > 0, "the base stored no pack");
    fs::remove_file(&gc_lock).unwrap();
    wait_job_ok(&d, &job_id);
    let b3 = admin_ok(&d, "backup.show", json!({"id": backup_id}));
    assert_ne!(b3["parent"], json!(b2_id), "{b3:#}");
    restore_new(&d, "r", &backup_id);
    assert_same(
        "the backup taken after its base was deleted",
        &read_export(&d, "r"),
        &model,
    );
}

/// A backup job whose manifest landed, with the daemon stopped after it ended and the job's
/// record put back as it was while the job ran: at the next start the job is resumed with its
/// manifest stored already (as when the daemon stops between the two). Staged by holding the
/// job back with a garbage collection's lock planted in the store while its record is copied.
struct ManifestLanded {
    d: Daemon,
    job_id: String,
    backup_id: String,
    record: PathBuf,
    saved_record: Vec<u8>,
    model: Vec<u8>,
}

impl ManifestLanded {
    fn stage() -> ManifestLanded {
        let d = start();
        let mut model = half_random(&d, "vol0", 64 * MIB, 61);
        backup_now(&d, "vol0", false);
        let mut rng = Prng::new(62);
        for chunk in 0..16u64 {
            let block = rng.next_u64() % (CHUNK / 4096);
            let data = rng.bytes(4096);
            write_at(&d, "vol0", chunk * CHUNK + block * 4096, &data, &mut model);
        }
        let gc_lock = plant_gc_lock(&d);
        let (job_id, backup_id) = backup_start(&d, &["vol0"], false).remove(0);
        thread::sleep(Duration::from_millis(300));
        assert_eq!(job(&d, &job_id)["state"], "running");
        let record = d.data_dir().join("jobs").join(format!("{job_id}.json"));
        let saved_record = fs::read(&record).unwrap();
        fs::remove_file(&gc_lock).unwrap();
        let b2 = wait_job_ok(&d, &job_id);
        assert_eq!(b2["backup_id"], json!(backup_id), "{b2:#}");
        ManifestLanded {
            d,
            job_id,
            backup_id,
            record,
            saved_record,
            model,
        }
    }

    fn manifest_path(&self) -> PathBuf {
        store_dir(&self.d)
            .join("manifests")
            .join(format!("{}.json", self.backup_id))
    }

    /// Stops the daemon, puts the record back, runs `meanwhile`, and starts it again.
    fn restart_with_the_record(&mut self, meanwhile: impl FnOnce(&Daemon)) {
        self.d.terminate_ok();
        fs::write(&self.record, &self.saved_record).unwrap();
        meanwhile(&self.d);
        self.d.restart();
    }
}

/// The resumed job must find its backup complete and leave it as it is.
#[test]
fn a_resumed_backup_whose_manifest_landed_leaves_it_as_it_is() {
    let mut staged = ManifestLanded::stage();
    let manifest_before = fs::read(staged.manifest_path()).unwrap();
    let packs_before = pack_names(&store_dir(&staged.d));
    assert_eq!(packs_before.len(), 1, "{packs_before:?}");
    staged.restart_with_the_record(|_| {});
    let (d, backup_id) = (&staged.d, staged.backup_id.as_str());
    let resumed = wait_job_ok(d, &staged.job_id);
    assert_eq!(resumed["backup_id"], json!(backup_id), "{resumed:#}");
    assert!(!staged.record.exists(), "the resumed job left its record");
    assert_eq!(
        fs::read(staged.manifest_path()).unwrap(),
        manifest_before,
        "the resumed job wrote the manifest again"
    );
    assert_eq!(pack_names(&store_dir(d)), packs_before);
    let v = admin_ok(d, "backup.verify", json!({"id": backup_id}));
    let j = wait_job_ok(d, v["job"]["id"].as_str().unwrap());
    assert_eq!(j["result"]["bad_chunks"], json!([]), "{j:#}");
    restore_new(d, "r", backup_id);
    assert_same("the resumed backup", &read_export(d, "r"), &staged.model);
}

/// The run that stored the manifest may have been checking it after its store lock lapsed
/// (a GC elsewhere may have removed what it names meanwhile) when the daemon stopped: the
/// resumed job checks the objects again. An object gone (here its pack, removed while the
/// daemon was down) fails the job and removes the manifest, so no backup with a hole is
/// listed as complete.
#[test]
fn a_resumed_backup_whose_manifest_names_a_missing_object_is_not_kept() {
    let mut staged = ManifestLanded::stage();
    staged.restart_with_the_record(|d| {
        let packs = pack_names(&store_dir(d));
        assert_eq!(packs.len(), 1, "{packs:?}");
        fs::remove_file(store_dir(d).join("packs").join(&packs[0])).unwrap();
    });
    let (d, backup_id) = (&staged.d, staged.backup_id.as_str());
    let failed = wait_job_end(d, &staged.job_id);
    assert_eq!(failed["state"], "failed", "{failed:#}");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("not in the store")),
        "{failed:#}"
    );
    assert!(
        !staged.manifest_path().exists(),
        "the manifest with a hole stayed"
    );
    admin_err(d, "backup.show", json!({"id": backup_id}), "not_found");
    // The next backup is whole.
    let next = backup_now(d, "vol0", false);
    restore_new(d, "r", next["id"].as_str().unwrap());
    assert_same("the next backup", &read_export(d, "r"), &staged.model);
}

/// One incremental meets the same new content twice: chunk 1+k becomes it by a one-block change
/// (a delta over its old content) while chunk 9+k is written whole with it (read whole). The
/// content must be stored once, and the manifest must pair its location with its base.
#[test]
fn new_content_met_as_a_delta_and_whole_in_one_backup_restores() {
    let d = start();
    let size = 20 * CHUNK;
    let mut model = half_random(&d, "vol0", size, 71);
    let b1 = backup_now(&d, "vol0", false);
    let mut rng = Prng::new(72);
    for k in 0..8u64 {
        let delta_at = (1 + k) * CHUNK;
        let block = rng.next_u64() % (CHUNK / 4096);
        let new_block = rng.bytes(4096);
        write_at(&d, "vol0", delta_at + block * 4096, &new_block, &mut model);
        let same = model[delta_at as usize..(delta_at + CHUNK) as usize].to_vec();
        write_at(&d, "vol0", (11 + k) * CHUNK, &same, &mut model);
    }
    let b2 = backup_now(&d, "vol0", false);
    assert!(u(&b2, "delta_chunks") >= 1, "{b2:#}");
    // Each new content once: 8 contents, whole or packed, not 16 objects.
    assert_eq!(u(&b2, "new_chunks"), 8, "{b2:#}");
    let v = admin_ok(&d, "backup.verify", json!({"id": b2["id"]}));
    let j = wait_job_ok(&d, v["job"]["id"].as_str().unwrap());
    assert_eq!(j["result"]["bad_chunks"], json!([]), "{j:#}");
    restore_new(&d, "r2", b2["id"].as_str().unwrap());
    assert_same("b2", &read_export(&d, "r2"), &model);
    // Its own manifest must carry every base it needs: with b1 gone and collected too.
    admin_ok(&d, "backup.delete", json!({"id": b1["id"]}));
    restore_new(&d, "r2b", b2["id"].as_str().unwrap());
    assert_same("b2 after b1 was deleted", &read_export(&d, "r2b"), &model);

    // A manifest that loses one of its delta bases fails verify, naming the delta: a
    // collection would remove that base.
    let path = store_dir(&d)
        .join("manifests")
        .join(format!("{}.json", b2["id"].as_str().unwrap()));
    let mut m: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    let bases = m["delta_bases"].as_object_mut().unwrap();
    let delta = bases.keys().next().unwrap().clone();
    bases.remove(&delta);
    fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let v = admin_ok(&d, "backup.verify", json!({"id": b2["id"]}));
    let j = wait_job_ok(&d, v["job"]["id"].as_str().unwrap());
    let bad = j["result"]["bad_chunks"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{j:#}");
    assert!(
        bad[0]["error"]
            .as_str()
            .unwrap()
            .contains("does not record as its base"),
        "{j:#}"
    );
}

#[test]
fn fio_verifies_while_backups_run() {
    let d = start();
    create_volume(&d, "vol0", 256 * MIB);
    let uri = d.tcp_uri("vol0");
    let fio = thread::spawn(move || {
        evsd_e2e::fio::fio(
            &uri,
            &[
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=256M",
                "--time_based",
                "--runtime=12",
                "--verify=crc32c",
                "--verify_backlog=512",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
            ],
        )
    });
    thread::sleep(Duration::from_millis(1500));
    let mut backups = Vec::new();
    for _ in 0..3 {
        backups.push(backup_now(&d, "vol0", false));
        if backups.len() == 1 {
            // fio runs 12 s: the first backup, at least, ran under its writes.
            assert!(!fio.is_finished(), "fio ended before the first backup did");
        }
        thread::sleep(Duration::from_millis(500));
    }
    let report = fio.join().unwrap();
    assert_eq!(report["jobs"][0]["error"], 0, "{report:#}");
    assert!(
        u(&report["jobs"][0]["write"], "total_ios") > 1000,
        "{report:#}"
    );
    // The newest backup restores exactly to its snapshot, which the volume keeps as its base.
    let last = backups.last().unwrap();
    assert_eq!(last["incremental"], true, "{last:#}");
    restore_new(&d, "r", last["id"].as_str().unwrap());
    let snap = format!("vol0@{}", last["snapshot"].as_str().unwrap());
    assert_same(
        "restore vs its snapshot",
        &read_export(&d, "r"),
        &read_export(&d, &snap),
    );
}

#[test]
fn evsctl_backup_commands() {
    let d = start();
    let model = half_random(&d, "vol0", 16 * MIB, 13);
    let out = d.evsctl(&["backup", "create", "vol0", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        format_output("evsctl backup create", &out)
    );
    let list = d.evsctl_json(&["backup", "list", "--volume", "vol0"]);
    let id = list["backups"][0]["id"].as_str().unwrap().to_owned();
    let text = d.evsctl_ok(&["backup", "list"]);
    assert!(text.contains(&id) && text.contains("vol0"), "{text}");
    let text = d.evsctl_ok(&["backup", "show", &id]);
    assert!(text.contains(&id), "{text}");
    let text = d.evsctl_ok(&["job", "list"]);
    assert!(
        text.contains("backup") && text.contains("succeeded"),
        "{text}"
    );
    let text = d.evsctl_ok(&["backup", "verify", &id]);
    assert!(text.contains("0 bad"), "{text}");
    let out = d.evsctl(&["volume", "create", "r", "--from-backup", &id, "--wait"]);
    assert!(out.status.success(), "{}", format_output("evsctl", &out));
    assert_same("evsctl restore", &read_export(&d, "r"), &model);
    // Not found and invalid ids give their exit codes.
    assert_eq!(
        d.evsctl(&["backup", "show", "b-missing"]).status.code(),
        Some(4)
    );
    assert_eq!(d.evsctl(&["backup", "show", "../x"]).status.code(), Some(2));
    let text = d.evsctl_ok(&["backup", "gc"]);
    assert!(text.contains("deleted 0 chunks"), "{text}");
}

/// A GC deferred by a backup of another daemon sharing the store (its lock planted here: no
/// job of this daemon ends to re-run the GC) runs by itself once that lock is gone.
#[test]
fn gc_deferred_by_another_daemons_backup_runs_once_that_ends() {
    let d = Daemon::start(DaemonOpts::new().no_default_volume());
    half_random(&d, "vol0", 16 * MIB, 17);
    let b1 = backup_now(&d, "vol0", false);
    let stored = chunk_files(&store_dir(&d)).len();
    assert!(stored > 0);
    let other = store_dir(&d)
        .join("locks")
        .join("shared-j-other-daemon.json");
    fs::create_dir_all(other.parent().unwrap()).unwrap();
    fs::write(&other, b"{}").unwrap();
    let deleted = admin_ok(&d, "backup.delete", json!({"id": b1["id"]}));
    assert_eq!(deleted["gc"]["deferred"], true, "{deleted:#}");
    thread::sleep(Duration::from_secs(6));
    assert_eq!(
        chunk_files(&store_dir(&d)).len(),
        stored,
        "chunks went while the other daemon's backup held the store"
    );
    fs::remove_file(&other).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || chunk_files(&store_dir(&d))
            .is_empty()),
        "{} chunks left",
        chunk_files(&store_dir(&d)).len()
    );
}

#[test]
fn gc_during_a_running_backup_is_deferred_then_runs() {
    let opts = DaemonOpts::new()
        .no_default_volume()
        .arg("--backup-rate-limit-mib-per-sec")
        .arg("16");
    let d = Daemon::start(opts);
    let mut model = half_random(&d, "vol0", 64 * MIB, 14);
    let b1 = backup_now(&d, "vol0", false);
    // Two chunks only b1 will reference once b2 exists.
    write_at(&d, "vol0", 0, &random(15, 2 * CHUNK), &mut model);
    let b2 = backup_now(&d, "vol0", false);
    admin_ok(&d, "backup.delete", json!({"id": b1["id"]}));
    assert_eq!(chunk_files(&store_dir(&d)).len(), 8);

    // A slow full backup of another volume holds the store while a GC is asked for.
    half_random(&d, "big", 128 * MIB, 16);
    let (job_id, _) = backup_start(&d, &["big"], false).remove(0);
    assert!(wait_until(Duration::from_secs(30), || u(
        &job(&d, &job_id)["progress"],
        "bytes_done"
    ) > 0));
    admin_ok(&d, "backup.delete", json!({"id": b2["id"]}));
    let gc = admin_ok(&d, "backup.gc", json!({}));
    assert_eq!(gc["deferred"], true, "{gc:#}");
    assert!(gc["reason"].as_str().unwrap().contains("backup"), "{gc:#}");
    // b2's chunks are still there while the backup runs...
    assert!(chunk_files(&store_dir(&d)).len() >= 8);
    wait_job_ok(&d, &job_id);
    // ...and go once it has ended (the deferred GC runs then): only big's 16 chunks stay.
    assert!(
        wait_until(Duration::from_secs(30), || chunk_files(&store_dir(&d))
            .len()
            == 16),
        "{} chunks left",
        chunk_files(&store_dir(&d)).len()
    );
}

/// A GC on the daemon running a backup waits for it even when the store shows no lock of it
/// (heartbeats that failed while the store was unreachable make it look stale): the sweep
/// would delete the chunks the backup uploaded and its manifest does not name yet.
#[test]
fn gc_waits_for_this_daemons_running_backup_whatever_the_store_locks_say() {
    let opts = DaemonOpts::new()
        .no_default_volume()
        .arg("--backup-rate-limit-mib-per-sec")
        .arg("16");
    let d = Daemon::start(opts);
    let model = half_random(&d, "big", 128 * MIB, 21);
    let (job_id, backup_id) = backup_start(&d, &["big"], false).remove(0);
    assert!(wait_until(Duration::from_secs(30), || !chunk_files(
        &store_dir(&d)
    )
    .is_empty()));
    let locks = store_dir(&d).join("locks");
    for lock in fs::read_dir(&locks).unwrap() {
        fs::remove_file(lock.unwrap().path()).unwrap();
    }
    let uploaded = chunk_files(&store_dir(&d)).len();
    let gc = admin_ok(&d, "backup.gc", json!({}));
    assert_eq!(gc["deferred"], true, "{gc:#}");
    assert!(
        gc["reason"].as_str().unwrap().contains("this daemon"),
        "{gc:#}"
    );
    assert!(chunk_files(&store_dir(&d)).len() >= uploaded);
    wait_job_ok(&d, &job_id);
    // Everything it uploaded is still there: it restores byte for byte.
    admin_ok(&d, "volume.delete", json!({"name": "big"}));
    restore_new(&d, "big", &backup_id);
    assert_same("big from its backup", &read_export(&d, "big"), &model);
}

/// A local store on a full filesystem: the backup waits ("retrying", naming the error) without
/// failing or storing a partial object, the volume keeps serving, and once space is freed the
/// backup completes and restores byte for byte.
#[test]
fn full_store_filesystem_retries_then_completes_when_space_is_freed() {
    let fs_mount = evsd_e2e::faults::TmpfsMount::new(48);
    let store = fs_mount.path().to_path_buf();
    let filler = store.join("filler");
    // 40 of the 48 MiB: the backup's 8 chunks of 4 MiB cannot all fit.
    fs::write(&filler, vec![0xa5u8; 40 * MIB as usize]).unwrap();
    let opts = DaemonOpts::new()
        .no_default_volume()
        .arg("--backup-store")
        .arg(&format!("file://{}", store.display()));
    let d = Daemon::start(opts);
    let size = 64 * MIB;
    let mut model = half_random(&d, "vol0", size, 31);
    let (job_id, backup_id) = backup_start(&d, &["vol0"], false).remove(0);
    // Chunks are stored by several tasks at once, each retrying on its own: one that got a
    // place freed by another's failed write can succeed in between, so the state is polled
    // until it shows the full filesystem.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let j = job(&d, &job_id);
            j["state"] == "retrying"
                && j["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("No space left on device"))
        }),
        "the job never reported the full filesystem: {:#}",
        job(&d, &job_id)
    );
    // Clients are not held up by the stuck backup: a write lands and reads back.
    write_at(&d, "vol0", 40 * MIB, &random(32, MIB), &mut model);
    assert_same(
        "vol0 while the backup waits for space",
        &read_export(&d, "vol0"),
        &model,
    );
    // The backup is of the snapshot taken when it started, not of the write above.
    let at_backup = {
        let mut m = model.clone();
        m[40 * MIB as usize..41 * MIB as usize].fill(0);
        m
    };
    thread::sleep(Duration::from_secs(1));
    let waiting = job(&d, &job_id);
    assert!(
        waiting["state"] == "retrying" || waiting["state"] == "running",
        "the backup ended while the store was full: {waiting:#}"
    );
    fs::remove_file(&filler).unwrap();
    let j = wait_job_ok(&d, &job_id);
    assert_eq!(j["error"], Value::Null, "{j:#}");
    let b = admin_ok(&d, "backup.show", json!({"id": backup_id}));
    assert_eq!(u(&b, "data_chunks"), 8, "{b:#}");
    let chunks = chunk_files(&store);
    assert_eq!(chunks.len(), 8, "{chunks:?}");
    // Nothing half-written stays behind: no staging file, and each chunk reads back whole
    // (verify downloads and hashes every one).
    let staging: Vec<_> = fs::read_dir(store.join("chunks"))
        .unwrap()
        .flatten()
        .flat_map(|dir| fs::read_dir(dir.path()).unwrap().flatten())
        .filter(|f| f.file_name().to_string_lossy().contains('#'))
        .map(|f| f.path())
        .collect();
    assert!(staging.is_empty(), "staging files left: {staging:?}");
    let v = admin_ok(&d, "backup.verify", json!({"id": backup_id}));
    let verify_job = v["job"]["id"].as_str().unwrap_or_else(|| panic!("{v:#}"));
    let verified = wait_job_ok(&d, verify_job);
    assert_eq!(verified["result"]["bad_chunks"], json!([]), "{verified:#}");
    restore_new(&d, "r", &backup_id);
    assert_same(
        "restore of the backup taken on a full store",
        &read_export(&d, "r"),
        &at_backup,
    );
}

/// When the restore's job record cannot be written (the data dir refuses it), creating a
/// volume from a backup fails with that error and leaves no empty volume under the name; an
/// in-place restore fails and leaves the volume open to clients, unchanged.
#[test]
fn a_restore_whose_job_cannot_be_recorded_leaves_no_volume_behind() {
    let d = start();
    let model = half_random(&d, "vol0", 16 * MIB, 41);
    let b = backup_now(&d, "vol0", false);
    let id = b["id"].as_str().unwrap();
    let jobs = d.data_dir().join("jobs");
    let aside = d.data_dir().join("jobs.aside");
    fs::rename(&jobs, &aside).unwrap();
    // A file where the directory was: every record write fails (ENOTDIR), even for root.
    fs::write(&jobs, b"not a directory").unwrap();
    let err = admin(&d, "volume.create", json!({"name": "r", "from_backup": id})).unwrap_err();
    assert!(err.message.contains("jobs"), "{err:?}");
    let names: Vec<Value> = admin_ok(&d, "volume.list", json!({}))["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("vol0")], "a failed restore left a volume");
    let err = admin(&d, "backup.restore", json!({"id": id, "to": "vol0"})).unwrap_err();
    assert!(err.message.contains("jobs"), "{err:?}");
    assert_same(
        "vol0 after a refused restore",
        &read_export(&d, "vol0"),
        &model,
    );
    fs::remove_file(&jobs).unwrap();
    fs::rename(&aside, &jobs).unwrap();
    // The name is free again and the restore goes through.
    restore_new(&d, "r", id);
    assert_same(
        "restore once records can be written",
        &read_export(&d, "r"),
        &model,
    );
}

/// A pack cut short: verify names every chunk placed past its end instead of retrying the
/// ranged read for ever, and a restore fails loudly and removes the volume it made.
#[test]
fn a_truncated_pack_is_reported_by_verify_and_fails_restore() {
    let d = start();
    let mut model = half_random(&d, "vol0", 32 * MIB, 51);
    backup_now(&d, "vol0", false);
    // One block in each of the 8 chunks: 8 deltas in one pack.
    let mut rng = Prng::new(52);
    for chunk in 0..8u64 {
        let block = rng.next_u64() % (CHUNK / 4096);
        write_at(
            &d,
            "vol0",
            chunk * CHUNK + block * 4096,
            &rng.bytes(4096),
            &mut model,
        );
    }
    let b2 = backup_now(&d, "vol0", false);
    assert_eq!(u(&b2, "delta_chunks"), 8, "{b2:#}");
    let packs = pack_names(&store_dir(&d));
    assert_eq!(packs.len(), 1, "{packs:?}");
    let pack = store_dir(&d).join("packs").join(&packs[0]);
    let len = fs::metadata(&pack).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let v = admin_ok(&d, "backup.verify", json!({"id": b2["id"]}));
    let j = wait_job_end(&d, v["job"]["id"].as_str().unwrap());
    assert_eq!(j["state"], "succeeded", "{j:#}");
    let bad = j["result"]["bad_chunks"].as_array().unwrap();
    assert!(
        !bad.is_empty() && bad.len() < 8,
        "the chunks past the cut, not all: {j:#}"
    );
    assert!(
        bad.iter()
            .all(|b| b["error"].as_str().unwrap().contains("the pack holds")),
        "{j:#}"
    );
    let v = admin_ok(
        &d,
        "volume.create",
        json!({"name": "r", "from_backup": b2["id"]}),
    );
    let j = wait_job_end(&d, v["job"]["id"].as_str().unwrap());
    assert_eq!(j["state"], "failed", "{j:#}");
    assert!(j["error"].as_str().unwrap().contains("missing"), "{j:#}");
    assert!(admin(&d, "volume.show", json!({"name": "r"})).is_err());
    // `--full` is the repair: it names no chunk in the damaged pack, and restores.
    let b3 = backup_now(&d, "vol0", true);
    let v = admin_ok(&d, "backup.verify", json!({"id": b3["id"]}));
    let j = wait_job_end(&d, v["job"]["id"].as_str().unwrap());
    assert_eq!(j["state"], "succeeded", "{j:#}");
    let bad = j["result"]["bad_chunks"].as_array().unwrap();
    assert!(
        bad.is_empty(),
        "the full backup names damaged chunks: {j:#}"
    );
    restore_new(&d, "r3", b3["id"].as_str().unwrap());
    assert_same("the full backup restored", &read_export(&d, "r3"), &model);
}

/// An incremental knows the store's objects from its parent's manifest instead of listing the
/// store (whose size it would otherwise cost), and still writes no whole chunk another backup
/// stored: here a chunk of another volume's content.
#[test]
fn incremental_does_not_list_the_store_and_still_dedups_whole_chunks() {
    let d = start();
    let source = half_random(&d, "vol0", 16 * MIB, 31);
    backup_now(&d, "vol0", false);
    let mut model = half_random(&d, "other", 16 * MIB, 32);
    let b1 = backup_now(&d, "other", false);
    assert_eq!(b1["incremental"], false, "{b1:#}");
    // A whole chunk rewritten (too many blocks for a delta) with vol0's first chunk.
    write_at(
        &d,
        "other",
        3 * CHUNK,
        &source[..CHUNK as usize],
        &mut model,
    );
    let b2 = backup_now(&d, "other", false);
    assert_eq!(b2["incremental"], true, "{b2:#}");
    assert_eq!(
        u(&b2, "new_chunks"),
        0,
        "vol0's chunk is in the store: {b2:#}"
    );
    assert_eq!(u(&b2, "new_stored_bytes"), 0, "{b2:#}");
    let log = d.stderr();
    let uploads: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("uploading backup"))
        .collect();
    assert_eq!(uploads.len(), 3, "{log}");
    for (line, listed) in uploads.iter().zip([true, true, false]) {
        assert!(
            line.contains(&format!("listed_store={listed}")),
            "expected listed_store={listed}: {line}"
        );
    }
    restore_new(&d, "r", b2["id"].as_str().unwrap());
    assert_same("restored incremental", &read_export(&d, "r"), &model);
}

/// Backups taken within one second are listed in the order they were taken (ids sort to the
/// millisecond): each incremental after its parent, the first one full.
#[test]
fn backups_of_one_second_are_listed_in_the_order_taken() {
    let d = start();
    create_volume(&d, "small", 4 * MIB);
    let mut model = vec![0u8; 4 * MIB as usize];
    let mut taken = Vec::new();
    for k in 0..6u64 {
        write_at(&d, "small", k * 4096, &random(k, 4096), &mut model);
        taken.push(
            backup_now(&d, "small", false)["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let list = d.evsctl_json(&["backup", "list", "--volume", "small"]);
    let listed: Vec<&Value> = list["backups"].as_array().unwrap().iter().collect();
    let ids: Vec<&str> = listed.iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(ids, taken, "listed out of order: {list:#}");
    assert_eq!(listed[0]["incremental"], false, "{list:#}");
    for pair in listed.windows(2) {
        assert_eq!(pair[1]["parent"], pair[0]["id"], "{list:#}");
    }
}

/// An incremental killed after naming its chunks, whose cached trees it then overwrote with
/// the new ids, resumes storing them as deltas of the parent, reading only the changed blocks:
/// it knows the records it wrote. (It used to read every such chunk whole, and store it so.)
#[test]
fn kill9_mid_incremental_resumes_with_deltas() {
    let opts = DaemonOpts::new()
        .no_default_volume()
        .arg("--backup-rate-limit-mib-per-sec")
        .arg("2");
    let mut d = Daemon::start(opts);
    let chunks = 32;
    create_volume(&d, "vol0", chunks * CHUNK);
    let mut model = vec![0u8; (chunks * CHUNK) as usize];
    // The full backup stores little: one random block per chunk, the rest zeroes.
    let mut base = vec![0u8; (chunks * CHUNK) as usize];
    for chunk in 0..chunks {
        let at = (chunk * CHUNK) as usize;
        base[at..at + 4096].copy_from_slice(&random(100 + chunk, 4096));
    }
    write_at(&d, "vol0", 0, &base, &mut model);
    backup_now(&d, "vol0", false);
    // 100 changed blocks (400 KiB) in every chunk: 12.5 MiB of deltas, 6 s at 2 MiB/s.
    let changed_bytes = 100 * 4096;
    for chunk in 0..chunks {
        let data = random(200 + chunk, changed_bytes);
        write_at(&d, "vol0", chunk * CHUNK + MIB, &data, &mut model);
    }
    let (job_id, backup_id) = backup_start(&d, &["vol0"], false).remove(0);
    assert!(
        wait_until(Duration::from_secs(30), || {
            u(&job(&d, &job_id)["progress"], "bytes_done") > 0
        }),
        "the incremental made no progress"
    );
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        job(&d, &job_id)["state"],
        "running",
        "ended before the kill"
    );
    d.kill9();
    d.restart();
    wait_job_ok(&d, &job_id);
    let b = admin_ok(&d, "backup.show", json!({"id": backup_id}));
    assert_eq!(b["incremental"], true, "{b:#}");
    assert_eq!(u(&b, "delta_chunks"), chunks, "{b:#}");
    assert_eq!(u(&b, "read_bytes"), chunks * changed_bytes, "{b:#}");
    restore_new(&d, "r", &backup_id);
    assert_same("restore after resume", &read_export(&d, "r"), &model);
}

/// A manifest this evsd cannot read (a newer format) is listed apart by `backup list`. A backup
/// deleted meanwhile is deleted, and says its collection failed and why; `backup gc` fails
/// naming that backup, and collects once it is deleted.
#[test]
fn a_delete_stands_when_an_unreadable_manifest_stops_its_collection() {
    let mut d = start();
    let mut model = half_random(&d, "vol0", 8 * MIB, 31);
    let b0 = backup_now(&d, "vol0", false)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    write_at(&d, "vol0", 0, &random(32, MIB), &mut model);
    let b1 = backup_now(&d, "vol0", true)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let manifests = store_dir(&d).join("manifests");
    let path = manifests.join(format!("{b0}.json"));
    let mut newer: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    newer["format_version"] = json!(4);
    fs::write(&path, serde_json::to_vec(&newer).unwrap()).unwrap();
    // Listed apart, not left out in silence.
    d.restart();
    let text = d.evsctl_ok(&["backup", "list"]);
    assert!(
        text.contains(&format!("unreadable manifest {b0}: "))
            && text.contains("unsupported format version 4")
            && text.contains(&b1),
        "{text}"
    );

    let out = d.evsctl(&["backup", "delete", &b1]);
    let text = format_output("evsctl backup delete", &out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("deleted backup {b1}; gc failed"))
            && text.contains(&b0)
            && text.contains("unsupported format version 4"),
        "{text}"
    );
    assert!(!manifests.join(format!("{b1}.json")).exists());

    let out = d.evsctl(&["backup", "gc"]);
    let text = format_output("evsctl backup gc", &out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(&format!("backup delete {b0}")), "{text}");
    let chunks_before = chunk_files(&store_dir(&d)).len();
    assert!(chunks_before > 0);

    let text = d.evsctl_ok(&["backup", "delete", &b0]);
    assert!(
        text.contains(&format!("deleted backup {b0}; gc deleted")),
        "{text}"
    );
    assert_eq!(
        chunk_files(&store_dir(&d)).len(),
        0,
        "nothing references them now"
    );
}

/// A parent whose manifest cannot be read (damaged, or of a newer format) is no base: the next
/// backup is full and restores byte-identical, before a restart as after one.
#[test]
fn an_unreadable_parent_manifest_makes_the_next_backup_full() {
    let mut d = start();
    let mut model = half_random(&d, "vol0", 8 * MIB, 33);
    let mut parent = backup_now(&d, "vol0", false)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for round in 0..2u64 {
        let path = store_dir(&d)
            .join("manifests")
            .join(format!("{parent}.json"));
        let mut damaged: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        damaged["chunk_list_digest"] = json!("00".repeat(32));
        fs::write(&path, serde_json::to_vec(&damaged).unwrap()).unwrap();
        if round == 1 {
            d.restart();
        }
        write_at(
            &d,
            "vol0",
            round * MIB,
            &random(34 + round, 4096),
            &mut model,
        );
        let b = backup_now(&d, "vol0", false);
        assert_eq!(b["incremental"], false, "round {round}: {b:#}");
        parent = b["id"].as_str().unwrap().to_owned();
        restore_new(&d, &format!("r{round}"), &parent);
        assert_same("restore", &read_export(&d, &format!("r{round}")), &model);
    }
}
