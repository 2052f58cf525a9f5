//! Fault injection and load: kill -9 loops with flushed data verified after every restart, a
//! data dir on a full filesystem (ENOSPC, recovery once space is freed), and 64 connections of
//! verified mixed I/O followed by connect/disconnect churn that must leak nothing.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use evsd_e2e::faults::*;
use evsd_e2e::metrics::{scrape, value};
use evsd_e2e::raw::*;
use evsd_e2e::*;

// ---------------------------------------------------------------------------
// 1. Crash loop
// ---------------------------------------------------------------------------

const CRASH_CYCLES: u64 = 20;
const CRASH_VOLUME_BLOCKS: usize = 4096; // 16 MiB
/// Concurrent writer connections, each on its own half of the volume.
const CRASH_WRITERS: usize = 2;
const CRASH_REGION_BLOCKS: usize = CRASH_VOLUME_BLOCKS / CRASH_WRITERS;

/// What the blocks of one writer's region may hold: `durable` is guaranteed (flushed or
/// FUA-acked), `pending` lists writes (or trims, token 0) sent since then, any of which may or
/// may not have landed.
struct CrashModel {
    durable: Vec<u64>,
    /// The cycle whose FLUSH or FUA write made `durable[b]` durable.
    durable_cycle: Vec<u64>,
    pending: HashMap<usize, Vec<u64>>,
}

struct CycleStats {
    writes_acked: u64,
    flushes_acked: u64,
    /// Blocks made durable in this cycle (by a FLUSH reply or a FUA write reply).
    durable_this_cycle: u64,
}

/// Writes random runs of blocks in region `w` (some FUA, some trimmed), FLUSHing every 4-32
/// requests, until the connection dies. Any NBD error is a failure; a transport error means the
/// daemon was killed.
fn crash_writer(
    addr: SocketAddr,
    cycle: u64,
    w: usize,
    mut model: CrashModel,
    flushes: Arc<AtomicU64>,
) -> Result<(CrashModel, CycleStats), String> {
    let mut c = Conn::open(addr, "crash");
    assert_eq!(c.size, (CRASH_VOLUME_BLOCKS * BLOCK) as u64);
    let base = w * CRASH_REGION_BLOCKS;
    let mut rng = Prng::new(0xC4A5_0000 + cycle * 16 + w as u64);
    let mut seq = 0u64;
    let mut stats = CycleStats {
        writes_acked: 0,
        flushes_acked: 0,
        durable_this_cycle: 0,
    };
    let mut next_flush = 4 + rng.next_u64() % 29;
    loop {
        let n = 1 + (rng.next_u64() % 16) as usize;
        let start = (rng.next_u64() as usize) % (CRASH_REGION_BLOCKS - n);
        let offset = ((base + start) * BLOCK) as u64;
        let kind = rng.next_u64() % 16;
        let (fua, trim) = (kind == 0, kind == 1);
        let mut data = Vec::with_capacity(n * BLOCK);
        let mut tokens = Vec::with_capacity(n);
        for b in start..start + n {
            seq += 1;
            let token = if trim {
                0
            } else {
                ((cycle + 1) << 40) | ((w as u64) << 32) | seq
            };
            if !trim {
                data.extend_from_slice(&block_content(token));
            }
            tokens.push(token);
            // Before sending: once sent, the write may land even if its reply never comes.
            model.pending.entry(b).or_default().push(token);
        }
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let (what, sent) = if trim {
            ("TRIM", c.trim(offset, (n * BLOCK) as u32))
        } else {
            ("WRITE", c.write(flags, offset, &data))
        };
        match sent {
            Err(_) => return Ok((model, stats)),
            Ok(0) => stats.writes_acked += 1,
            Ok(e) => {
                return Err(format!(
                    "cycle {cycle}: {what} of {n} blocks at block {} failed with NBD error {e}",
                    base + start
                ))
            }
        }
        if fua {
            for (i, b) in (start..start + n).enumerate() {
                model.durable[b] = tokens[i];
                model.durable_cycle[b] = cycle;
                model.pending.remove(&b);
                stats.durable_this_cycle += 1;
            }
        }
        next_flush -= 1;
        if next_flush == 0 {
            next_flush = 4 + rng.next_u64() % 29;
            match c.flush() {
                Err(_) => return Ok((model, stats)),
                Ok(0) => {
                    for (b, tokens) in model.pending.drain() {
                        model.durable[b] = *tokens.last().unwrap();
                        model.durable_cycle[b] = cycle;
                        stats.durable_this_cycle += 1;
                    }
                    stats.flushes_acked += 1;
                    flushes.fetch_add(1, Ordering::SeqCst);
                }
                Ok(e) => return Err(format!("cycle {cycle}: FLUSH failed with NBD error {e}")),
            }
        }
    }
}

#[test]
fn crash_loop_kill9_loses_no_flushed_block() {
    let mut d = Daemon::start(
        DaemonOpts::new()
            .no_default_volume()
            .volume(&format!("crash:{}", CRASH_VOLUME_BLOCKS * BLOCK)),
    );
    let mut models: Vec<CrashModel> = (0..CRASH_WRITERS)
        .map(|_| CrashModel {
            durable: vec![0; CRASH_REGION_BLOCKS],
            durable_cycle: vec![0; CRASH_REGION_BLOCKS],
            pending: HashMap::new(),
        })
        .collect();
    let mut timing = Prng::new(0x7151_7000);
    for cycle in 0..CRASH_CYCLES {
        let flushes: Vec<Arc<AtomicU64>> = (0..CRASH_WRITERS)
            .map(|_| Arc::new(AtomicU64::new(0)))
            .collect();
        let writers: Vec<_> = models
            .drain(..)
            .enumerate()
            .map(|(w, model)| {
                let (addr, f) = (d.tcp_addr(), flushes[w].clone());
                thread::spawn(move || crash_writer(addr, cycle, w, model, f))
            })
            .collect();
        assert!(
            wait_until(Duration::from_secs(20), || flushes
                .iter()
                .all(|f| f.load(Ordering::SeqCst) > 0)
                || writers.iter().any(|w| w.is_finished())),
            "cycle {cycle}: not every writer completed a FLUSH within 20 s"
        );
        // The kill lands at a random moment of the write/flush streams.
        thread::sleep(Duration::from_millis(timing.next_u64() % 1500));
        d.kill9();
        let mut cycle_stats = Vec::new();
        for (w, writer) in writers.into_iter().enumerate() {
            let (m, stats) = writer
                .join()
                .unwrap_or_else(|_| panic!("crash writer {w} panicked"))
                .unwrap_or_else(|e| panic!("{e}\n--- evsd stderr ---\n{}", d.all_stderr()));
            models.push(m);
            cycle_stats.push(stats);
        }
        d.restart();

        // Every block: durable-only blocks must read back exactly; blocks with writes in flight
        // must hold their durable content or one of those writes, never anything else.
        let mut c = Conn::open(d.tcp_addr(), "crash");
        let mut verified = 0u64;
        let mut verified_this_cycle = 0u64;
        let mut in_doubt = 0u64;
        let mut lost = Vec::new();
        let chunk_blocks = 256;
        for first in (0..CRASH_VOLUME_BLOCKS).step_by(chunk_blocks) {
            let data = c
                .read((first * BLOCK) as u64, (chunk_blocks * BLOCK) as u32)
                .expect("read after restart: transport error")
                .unwrap_or_else(|e| panic!("cycle {cycle}: READ at block {first} failed: {e}"));
            for (i, got) in data.chunks(BLOCK).enumerate() {
                let block = first + i;
                let model = &mut models[block / CRASH_REGION_BLOCKS];
                let b = block % CRASH_REGION_BLOCKS;
                let found = block_token(got);
                match model.pending.remove(&b) {
                    None => {
                        if found == Some(model.durable[b]) {
                            if model.durable[b] != 0 {
                                verified += 1;
                                if model.durable_cycle[b] == cycle {
                                    verified_this_cycle += 1;
                                }
                            }
                        } else {
                            lost.push((block, model.durable[b], found));
                        }
                    }
                    Some(candidates) => {
                        in_doubt += 1;
                        match found {
                            Some(t) if t == model.durable[b] || candidates.contains(&t) => {
                                model.durable[b] = t
                            }
                            _ => panic!(
                                "cycle {cycle}: block {block} (written but not yet flushed at the \
                                 kill) reads as {found:?}, which is neither its flushed token \
                                 {:#x} nor one of the writes in flight {candidates:x?}",
                                model.durable[b]
                            ),
                        }
                    }
                }
            }
        }
        assert!(
            lost.is_empty(),
            "cycle {cycle}: {} flushed blocks lost after kill -9 (block, expected token, \
             token read back; None = neither zeroes nor any write): {:x?}",
            lost.len(),
            &lost[..lost.len().min(20)]
        );
        for (w, stats) in cycle_stats.iter().enumerate() {
            assert!(
                stats.flushes_acked > 0 && stats.durable_this_cycle > 0,
                "cycle {cycle}: writer {w} flushed nothing before the kill ({} requests acked)",
                stats.writes_acked
            );
        }
        assert!(
            verified_this_cycle > 0,
            "cycle {cycle}: no block flushed in this cycle was left to verify"
        );
        eprintln!(
            "cycle {cycle}: {} writes/trims, {} flushes acked; {verified} flushed blocks \
             verified ({verified_this_cycle} flushed in this cycle), {in_doubt} in doubt",
            cycle_stats.iter().map(|s| s.writes_acked).sum::<u64>(),
            cycle_stats.iter().map(|s| s.flushes_acked).sum::<u64>()
        );
        c.disconnect();
    }
}

// ---------------------------------------------------------------------------
// 2. Disk full
// ---------------------------------------------------------------------------

const MIB_BLOCKS: usize = (MIB as usize) / BLOCK;

/// 1 MiB of blocks tokened `base + i`.
fn mib_of(base: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(MIB as usize);
    for i in 0..MIB_BLOCKS as u64 {
        v.extend_from_slice(&block_content(base + i));
    }
    v
}

fn token_base(volume: u64, mib: u64) -> u64 {
    (volume << 40) | (mib << 16) | 1
}

/// Read MiB `mib` back and check it holds `mib_of(token_base(volume, mib))`.
fn check_mib(c: &mut Conn, volume: u64, mib: u64, what: &str) {
    let got = c
        .read(mib * MIB, MIB as u32)
        .unwrap_or_else(|e| panic!("{what}: READ of MiB {mib}: transport error {e}"))
        .unwrap_or_else(|e| panic!("{what}: READ of MiB {mib} failed with NBD error {e}"));
    assert!(
        got == mib_of(token_base(volume, mib)),
        "{what}: MiB {mib} does not read back as written (first block holds token {:?})",
        block_token(&got[..BLOCK])
    );
}

/// How a fill ended: MiBs `from..acked` were acknowledged, `from..flushed` also flushed.
struct Filled {
    acked: u64,
    flushed: u64,
    errno: u32,
    op: &'static str,
}

/// Writes whole MiBs from `from` on (flushing every 4) until a write or a flush fails.
fn fill_until_error(c: &mut Conn, volume: u64, from: u64, limit: u64) -> Filled {
    let mut flushed = from;
    for mib in from..limit {
        let e = c
            .write(0, mib * MIB, &mib_of(token_base(volume, mib)))
            .unwrap_or_else(|e| panic!("WRITE of MiB {mib}: transport error {e} (daemon died?)"));
        if e != 0 {
            return Filled {
                acked: mib,
                flushed,
                errno: e,
                op: "write",
            };
        }
        if mib % 4 == 3 {
            let e = c.flush().expect("FLUSH: transport error");
            if e != 0 {
                return Filled {
                    acked: mib + 1,
                    flushed,
                    errno: e,
                    op: "flush",
                };
            }
            flushed = mib + 1;
        }
    }
    panic!("wrote MiB {from}..{limit} onto a 64 MiB filesystem without any error");
}

/// Fills `dir`'s filesystem with one file until the write fails; returns its path.
fn fill_filesystem(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("space-filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0xa5u8; 64 * 1024];
    loop {
        match f.write(&block) {
            Ok(n) if n == block.len() => {}
            Ok(_) | Err(_) => break,
        }
    }
    let _ = f.sync_all();
    path
}

/// A snapshot taken while the data dir is full cannot write its manifest: it fails before the
/// new manifest is put in place, no head swaps, and FLUSH goes on working (the disk names the
/// head the volume writes; it failed until a repair the full disk kept failing). Once there is
/// room again, writes flushed survive kill -9.
#[test]
fn a_snapshot_that_hit_a_full_disk_leaves_flush_working() {
    let fs = TmpfsMount::new(32);
    let mut d = Daemon::start(
        DaemonOpts::new()
            .no_default_volume()
            .volume("v:8M")
            .data_dir(fs.path()),
    );
    let mut c = Conn::open(d.tcp_addr(), "v");
    for mib in 0..2 {
        assert_eq!(
            c.write(0, mib * MIB, &mib_of(token_base(7, mib))).unwrap(),
            0
        );
    }
    assert_eq!(c.flush().unwrap(), 0);
    let filler = fill_filesystem(fs.path());
    let created = d.evsctl(&["snapshot", "create", "v", "s1"]);
    assert!(
        !created.status.success(),
        "snapshot create on a full data dir succeeded: {}",
        String::from_utf8_lossy(&created.stdout)
    );
    assert_eq!(
        c.flush().unwrap(),
        0,
        "FLUSH fails after a snapshot that changed nothing\n{}",
        d.stderr()
    );
    let listed = d.evsctl_ok(&["--json", "snapshot", "list", "v"]);
    assert!(!listed.contains("s1"), "{listed}");
    std::fs::remove_file(&filler).unwrap();
    for mib in 2..4 {
        assert_eq!(
            c.write(0, mib * MIB, &mib_of(token_base(7, mib))).unwrap(),
            0
        );
    }
    assert_eq!(
        c.flush().unwrap(),
        0,
        "FLUSH fails after space was freed\n{}",
        d.stderr()
    );
    drop(c);
    d.kill9();
    d.restart();
    let mut c = Conn::open(d.tcp_addr(), "v");
    for mib in 0..4 {
        check_mib(&mut c, 7, mib, "flushed around a failed snapshot");
    }
}

/// Map files are sparse: the first change to a page of a fresh head's block map needs disk
/// space. On a full disk that is ENOSPC for the one request that needs it, never SIGBUS for the
/// daemon (a store into a mapped page the kernel cannot allocate); a TRIM that cannot be
/// recorded is ignored, as the spec allows. Once space is freed the same request succeeds.
#[test]
fn a_block_map_change_on_a_full_disk_is_an_error_not_a_crash() {
    let fs = TmpfsMount::new(32);
    let mut d = Daemon::start(
        DaemonOpts::new()
            .no_default_volume()
            .volume("v:64M")
            .data_dir(fs.path()),
    );
    let mut c = Conn::open(d.tcp_addr(), "v");
    assert_eq!(c.write(0, 0, &mib_of(token_base(9, 0))).unwrap(), 0);
    assert_eq!(c.flush().unwrap(), 0);
    // A new head, whose map file is all holes.
    let created = d.evsctl(&["snapshot", "create", "v", "s1"]);
    assert!(
        created.status.success(),
        "snapshot create: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let filler = fill_filesystem(fs.path());
    assert_eq!(c.trim(32 * MIB, MIB as u32).unwrap(), 0, "TRIM is ignored");
    let (mut r, _) = Raw::open(d.tcp_addr(), "v");
    r.send_req(0, CMD_WRITE_ZEROES, 1, 40 * MIB, MIB as u32, &[]);
    assert_eq!(
        r.read_simple_reply(),
        (ENOSPC, 1),
        "WRITE_ZEROES on a full disk"
    );
    d.assert_alive();
    check_mib(&mut c, 9, 0, "read on a full disk");
    std::fs::remove_file(&filler).unwrap();
    r.send_req(0, CMD_WRITE_ZEROES, 2, 40 * MIB, MIB as u32, &[]);
    assert_eq!(
        r.read_simple_reply(),
        (0, 2),
        "WRITE_ZEROES with room again"
    );
    assert!(r.read(3, 40 * MIB, MIB as u32).iter().all(|&b| b == 0));
    r.disconnect();
    check_mib(&mut c, 9, 0, "after space was freed");
}

#[test]
fn disk_full_gives_enospc_and_recovers_when_space_is_freed() {
    let fs = TmpfsMount::new(64);
    let mut d = Daemon::start(
        DaemonOpts::new()
            .no_default_volume()
            .volume("filler:24M")
            .volume("big:256M")
            .data_dir(fs.path()),
    );
    // The filler volume takes 24 MiB of the 64.
    {
        let mut f = Conn::open(d.tcp_addr(), "filler");
        for mib in 0..24 {
            let e = f.write(0, mib * MIB, &mib_of(token_base(1, mib))).unwrap();
            assert_eq!(
                e, 0,
                "filling the filler volume: WRITE of MiB {mib} failed with {e}"
            );
        }
        assert_eq!(f.flush().unwrap(), 0, "FLUSH of the filler volume failed");
        f.disconnect();
    }
    let (_, avail_before) = fs.space();

    let mut c = Conn::open(d.tcp_addr(), "big");
    let full = fill_until_error(&mut c, 2, 0, 256);
    eprintln!(
        "first error after {} MiB of big: NBD error {} from {} ({} MiB were free before)",
        full.acked,
        full.errno,
        full.op,
        avail_before / MIB
    );
    assert_eq!(
        full.errno,
        ENOSPC,
        "the {} that hit the full filesystem got NBD error {}, not ENOSPC (28)\n\
         --- evsd stderr ---\n{}",
        full.op,
        full.errno,
        d.stderr()
    );
    assert!(full.flushed >= 4, "ENOSPC after only {} MiB", full.acked);
    d.assert_alive();
    let m = scrape(d.metrics_addr().expect("metrics listener"));
    assert!(
        value(
            &m,
            &format!(
                "evsd_volume_errors_total{{volume=\"big\",kind=\"{}\"}}",
                full.op
            )
        ) >= 1.0,
        "the failed {} is not counted in evsd_volume_errors_total:\n{m}",
        full.op
    );
    // The connection that got ENOSPC keeps working, and a second one can read everything
    // acknowledged.
    let mut c2 = Conn::open(d.tcp_addr(), "big");
    for mib in 0..full.acked {
        check_mib(&mut c2, 2, mib, "after ENOSPC, second client");
    }
    check_mib(&mut c, 2, 0, "after ENOSPC, the client that got it");
    {
        let mut f = Conn::open(d.tcp_addr(), "filler");
        for mib in 0..24 {
            check_mib(&mut f, 1, mib, "filler volume after ENOSPC");
        }
        f.disconnect();
    }

    // kill -9 and restart while the filesystem is still full: the daemon comes back and
    // everything flushed is there.
    drop((c, c2));
    d.kill9();
    d.restart();
    let mut c = Conn::open(d.tcp_addr(), "big");
    let mut c2 = Conn::open(d.tcp_addr(), "big");
    for mib in 0..full.flushed {
        check_mib(
            &mut c2,
            2,
            mib,
            "after kill -9 and restart on the full filesystem",
        );
    }

    // Free space by deleting the filler volume: writes succeed again (rewriting what was
    // not flushed before the kill).
    d.evsctl_ok(&["volume", "delete", "filler"]);
    let (_, avail_after) = fs.space();
    assert!(
        avail_after >= 20 * MIB,
        "deleting the 24 MiB filler volume left only {} KiB free: its space was not \
         released (files still open?)\n{}",
        avail_after / KIB,
        run_stdout("ls", &["-laR", fs.path().to_str().unwrap()])
    );
    let resume = full.flushed;
    for mib in resume..resume + 8 {
        let e = c.write(0, mib * MIB, &mib_of(token_base(2, mib))).unwrap();
        assert_eq!(
            e, 0,
            "WRITE of MiB {mib} after freeing space failed with NBD error {e}"
        );
    }
    assert_eq!(c.flush().unwrap(), 0, "FLUSH after freeing space failed");

    // Fill up again, then free space by trimming: writes succeed again.
    let again = fill_until_error(&mut c, 2, resume + 8, 256);
    assert_eq!(
        again.errno, ENOSPC,
        "second fill: {} got NBD error {}, not ENOSPC",
        again.op, again.errno
    );
    for mib in 0..16 {
        assert_eq!(
            c.trim(mib * MIB, MIB as u32).unwrap(),
            0,
            "TRIM of MiB {mib} failed"
        );
    }
    assert_eq!(c.flush().unwrap(), 0, "FLUSH after TRIM failed");
    let resume2 = again.acked;
    for mib in resume2..resume2 + 8 {
        let e = c.write(0, mib * MIB, &mib_of(token_base(2, mib))).unwrap();
        assert_eq!(
            e, 0,
            "WRITE of MiB {mib} after TRIM freed space failed with NBD error {e}"
        );
    }
    assert_eq!(c.flush().unwrap(), 0, "FLUSH after TRIM freed space failed");

    // Everything acknowledged reads back: zeroes where trimmed, the data elsewhere.
    let zero = vec![0u8; MIB as usize];
    for mib in 0..16 {
        let got = c2.read(mib * MIB, MIB as u32).unwrap().unwrap();
        assert!(got == zero, "trimmed MiB {mib} does not read as zeroes");
    }
    for mib in 16..resume2 + 8 {
        check_mib(&mut c2, 2, mib, "final check");
    }
    d.assert_alive();
    c.disconnect();
    c2.disconnect();
    d.terminate_ok();
}

// ---------------------------------------------------------------------------
// 3. Load and churn
// ---------------------------------------------------------------------------

const LOAD_CONNECTIONS: usize = 64;
const REGION_BLOCKS: usize = 1024; // 4 MiB per connection

fn load_secs() -> u64 {
    match std::env::var("EVSD_LOAD_SECS") {
        Ok(s) if !s.is_empty() => s
            .parse()
            .unwrap_or_else(|e| panic!("EVSD_LOAD_SECS={s:?}: {e}")),
        _ => 20,
    }
}

#[derive(Default, Debug)]
struct LoadStats {
    writes: u64,
    reads: u64,
    flushes: u64,
    trims: u64,
    blocks_verified: u64,
}

/// One connection's random read/write/flush/trim mix on its own region, every read checked
/// against the model of what it wrote.
fn load_worker(addr: SocketAddr, id: usize, deadline: Instant) -> Result<LoadStats, String> {
    let mut c = Conn::open(addr, "load");
    let base = (id * REGION_BLOCKS) as u64;
    let mut model = vec![0u64; REGION_BLOCKS];
    let mut rng = Prng::new(0x10AD_0000 + id as u64);
    let mut st = LoadStats::default();
    let mut seq = 0u64;
    let fail = |what: String, e: &dyn std::fmt::Display| format!("connection {id}: {what}: {e}");
    let verify = |model: &[u64], first: usize, data: &[u8], st: &mut LoadStats| {
        for (i, got) in data.chunks(BLOCK).enumerate() {
            let want = model[first + i];
            if got != block_content(want).as_slice() {
                return Err(format!(
                    "connection {id}: block {} of its region reads as token {:?}, expected {want:#x}",
                    first + i,
                    block_token(got)
                ));
            }
            st.blocks_verified += 1;
        }
        Ok(())
    };
    while Instant::now() < deadline {
        let n = 1 + (rng.next_u64() % 32) as usize;
        let first = (rng.next_u64() as usize) % (REGION_BLOCKS - n);
        let offset = (base + first as u64) * BLOCK as u64;
        let len = (n * BLOCK) as u32;
        match rng.next_u64() % 100 {
            0..=44 => {
                let fua = rng.next_u64().is_multiple_of(10);
                let mut data = Vec::with_capacity(n * BLOCK);
                for token in &mut model[first..first + n] {
                    seq += 1;
                    *token = ((id as u64 + 1) << 40) | seq;
                    data.extend_from_slice(&block_content(*token));
                }
                let flags = if fua { CMD_FLAG_FUA } else { 0 };
                match c.write(flags, offset, &data) {
                    Ok(0) => st.writes += 1,
                    Ok(e) => {
                        return Err(fail(
                            format!("WRITE {offset}+{len}"),
                            &format!("NBD error {e}"),
                        ))
                    }
                    Err(e) => return Err(fail(format!("WRITE {offset}+{len}"), &e)),
                }
            }
            45..=84 => {
                let data = match c.read(offset, len) {
                    Ok(Ok(d)) => d,
                    Ok(Err(e)) => {
                        return Err(fail(
                            format!("READ {offset}+{len}"),
                            &format!("NBD error {e}"),
                        ))
                    }
                    Err(e) => return Err(fail(format!("READ {offset}+{len}"), &e)),
                };
                verify(&model, first, &data, &mut st)?;
                st.reads += 1;
            }
            85..=92 => match c.flush() {
                Ok(0) => st.flushes += 1,
                Ok(e) => return Err(fail("FLUSH".into(), &format!("NBD error {e}"))),
                Err(e) => return Err(fail("FLUSH".into(), &e)),
            },
            _ => {
                match c.trim(offset, len) {
                    Ok(0) => st.trims += 1,
                    Ok(e) => {
                        return Err(fail(
                            format!("TRIM {offset}+{len}"),
                            &format!("NBD error {e}"),
                        ))
                    }
                    Err(e) => return Err(fail(format!("TRIM {offset}+{len}"), &e)),
                }
                // evsd reads trimmed blocks as zeroes (tests/durability.rs relies on it too).
                model[first..first + n].fill(0);
            }
        }
    }
    // The whole region, once more.
    for first in (0..REGION_BLOCKS).step_by(256) {
        let offset = (base + first as u64) * BLOCK as u64;
        match c.read(offset, (256 * BLOCK) as u32) {
            Ok(Ok(d)) => verify(&model, first, &d, &mut st)?,
            Ok(Err(e)) => return Err(fail("final READ".into(), &format!("NBD error {e}"))),
            Err(e) => return Err(fail("final READ".into(), &e)),
        }
    }
    c.disconnect();
    Ok(st)
}

/// One short-lived client, `kind` picks how it ends (clean or aborted at various points).
fn churn_one(addr: SocketAddr, kind: usize) {
    match kind % 7 {
        0 => Conn::open(addr, "load").disconnect(),
        1 => drop(Conn::open(addr, "load")), // attached, vanishes without DISC
        2 => drop(Raw::connect(addr)),       // before the greeting is read
        3 => {
            let mut r = Raw::connect(addr);
            r.read_greeting();
        }
        4 => {
            // Half an option header, then gone.
            let mut r = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
            let _ = r.s.write_all(&IHAVEOPT.to_be_bytes()[..6]);
        }
        5 => {
            let mut r = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
            r.send_opt(OPT_ABORT, &[]);
            // The server may ACK the abort or just close.
            let _ = r.s.shutdown(Shutdown::Write);
        }
        _ => {
            // LIST, then a reset (SO_LINGER 0) instead of a FIN.
            let mut r = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
            assert!(
                r.list().iter().any(|n| n == "load"),
                "LIST lacks the load volume"
            );
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt on our own socket with a correctly sized linger struct.
            let rc = unsafe {
                libc::setsockopt(
                    r.s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    &linger as *const libc::linger as *const libc::c_void,
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "setsockopt SO_LINGER");
        }
    }
}

fn churn(addr: SocketAddr, total: usize, threads: usize) {
    let done = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let done = done.clone();
            thread::spawn(move || {
                for i in (t..total).step_by(threads) {
                    if done.load(Ordering::Relaxed) {
                        return;
                    }
                    churn_one(addr, i);
                }
            })
        })
        .collect();
    for w in workers {
        if let Err(e) = w.join() {
            done.store(true, Ordering::Relaxed);
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn load_64_connections_then_churn_leaks_nothing() {
    let mut d = Daemon::start(DaemonOpts::new().no_default_volume().volume(&format!(
        "load:{}",
        LOAD_CONNECTIONS * REGION_BLOCKS * BLOCK
    )));
    let maddr = d.metrics_addr().expect("metrics listener");
    let gauge = "evsd_volume_connections{volume=\"load\"}";
    let secs = load_secs();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let addr = d.tcp_addr();
    let workers: Vec<_> = (0..LOAD_CONNECTIONS)
        .map(|id| thread::spawn(move || load_worker(addr, id, deadline)))
        .collect();
    // (With a very short EVSD_LOAD_SECS the workers may be gone before the first scrape.)
    assert!(
        secs < 5
            || wait_until(Duration::from_secs(10), || value(&scrape(maddr), gauge)
                == LOAD_CONNECTIONS as f64),
        "the gauge never showed {LOAD_CONNECTIONS} connections:\n{}",
        scrape(maddr)
    );
    let mut total = LoadStats::default();
    let mut errors = Vec::new();
    for (id, w) in workers.into_iter().enumerate() {
        match w.join() {
            Ok(Ok(s)) => {
                assert!(
                    s.writes > 0 && s.reads > 0 && s.blocks_verified > 0,
                    "connection {id} did too little: {s:?}"
                );
                total.writes += s.writes;
                total.reads += s.reads;
                total.flushes += s.flushes;
                total.trims += s.trims;
                total.blocks_verified += s.blocks_verified;
            }
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push(format!("connection {id}: worker panicked")),
        }
    }
    assert!(
        errors.is_empty(),
        "{} of {LOAD_CONNECTIONS} connections failed:\n{}\n--- evsd stderr ---\n{}",
        errors.len(),
        errors.join("\n"),
        d.stderr()
    );
    eprintln!("load: {secs} s, {LOAD_CONNECTIONS} connections: {total:?}");
    d.assert_alive();
    let m = scrape(maddr);
    assert_eq!(
        ["read", "write", "flush", "trim"]
            .iter()
            .map(|k| value(
                &m,
                &format!("evsd_volume_errors_total{{volume=\"load\",kind=\"{k}\"}}")
            ))
            .sum::<f64>(),
        0.0,
        "the daemon counted errors:\n{m}"
    );

    // Churn. Baseline after a warm-up round, so lazily allocated buffers and thread stacks
    // are already counted.
    churn(addr, 300, 4);
    let pid = d.pid();
    let settled = |limit_fds: usize| {
        wait_until(Duration::from_secs(10), || {
            value(&scrape(maddr), gauge) == 0.0 && fd_count(pid) <= limit_fds
        })
    };
    assert!(
        settled(usize::MAX),
        "connections gauge not back to 0 after load and warm-up churn:\n{}",
        scrape(maddr)
    );
    let fds_before = fd_count(pid);
    let rss_before = rss_kib(pid);
    let accepted_before = value(&scrape(maddr), "evsd_connections_accepted_total");
    let churn_n = 3000;
    let t = Instant::now();
    churn(addr, churn_n, 4);
    let churn_time = t.elapsed();
    let fd_slack = 4;
    let ok = settled(fds_before + fd_slack);
    let m = scrape(maddr);
    assert!(
        ok,
        "after {churn_n} connect/disconnects: gauge {} (want 0), {} fds (was {fds_before}, \
         slack {fd_slack})\n{}",
        value(&m, gauge),
        fd_count(pid),
        run_stdout("ls", &["-l", &format!("/proc/{pid}/fd")])
    );
    let accepted = value(&m, "evsd_connections_accepted_total") - accepted_before;
    assert!(
        accepted >= churn_n as f64,
        "only {accepted} connections accepted during {churn_n} connects"
    );
    let rss_after = rss_kib(pid);
    eprintln!(
        "churn: {churn_n} connections in {churn_time:?}; fds {fds_before} -> {}; \
         RSS {rss_before} KiB -> {rss_after} KiB",
        fd_count(pid)
    );
    // A leak of even 4 KiB per connection would be 12 MiB.
    let rss_bound_kib = 8 * 1024;
    assert!(
        rss_after <= rss_before + rss_bound_kib,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over {churn_n} connections \
         (bound {rss_bound_kib} KiB)"
    );
    d.assert_alive();
    // Still serving.
    let mut c = Conn::open(addr, "load");
    assert_eq!(c.flush().unwrap(), 0);
    c.disconnect();
    d.terminate_ok();
}
