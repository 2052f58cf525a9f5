//! Helpers for the fault-injection and load tests (`tests/faults.rs`): self-describing 4 KiB
//! blocks, an NBD client that reports I/O failures instead of panicking (the daemon is killed
//! under it), a size-limited tmpfs that is unmounted even when a test panics, and /proc probes.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::raw::{self, Raw};
use crate::{require_root, run, run_unchecked, Prng};

/// The block size the fault tests write and verify in.
pub const BLOCK: usize = 4096;

/// The content of a block written with `token` (never 0; token 0 stands for "all zeroes"):
/// the token in the first 8 bytes, then bytes from a PRNG seeded with it. A block read back thus
/// names the write it came from.
pub fn block_content(token: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    if token == 0 {
        return b;
    }
    b[..8].copy_from_slice(&token.to_le_bytes());
    Prng::new(token).fill(&mut b[8..]);
    b
}

/// Which write a block read back came from: `Some(0)` for all zeroes, `Some(token)` when it is
/// exactly [`block_content`]`(token)`, None for anything else (torn or foreign data).
pub fn block_token(b: &[u8]) -> Option<u64> {
    assert_eq!(b.len(), BLOCK);
    if b.iter().all(|&x| x == 0) {
        return Some(0);
    }
    let token = u64::from_le_bytes(b[..8].try_into().unwrap());
    (token != 0 && block_content(token) == b).then_some(token)
}

/// Simple-reply NBD client on one export whose requests return `io::Result` (the NBD error value
/// on success of the transport), for use while the daemon may be killed or the disk fills up.
pub struct Conn {
    pub raw: Raw,
    pub size: u64,
    cookie: u64,
}

fn proto_err(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Conn {
    /// Handshake (fixed newstyle, GO) on `export`; panics if that fails.
    pub fn open(addr: SocketAddr, export: &str) -> Conn {
        let (raw, info) = Raw::open(addr, export);
        Conn {
            raw,
            size: info.size,
            cookie: 0,
        }
    }

    fn request(
        &mut self,
        flags: u16,
        typ: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u32> {
        self.cookie += 1;
        let mut b = Raw::request_bytes(flags, typ, self.cookie, offset, len);
        b.extend_from_slice(payload);
        self.raw.s.write_all(&b)?;
        let mut h = [0u8; 16];
        self.raw.s.read_exact(&mut h)?;
        if raw::be32(&h[0..4]) != raw::SIMPLE_REPLY_MAGIC {
            return Err(proto_err(format!("bad reply magic in {h:02x?}")));
        }
        if raw::be64(&h[8..16]) != self.cookie {
            return Err(proto_err(format!(
                "reply for cookie {} while waiting for {}",
                raw::be64(&h[8..16]),
                self.cookie
            )));
        }
        Ok(raw::be32(&h[4..8]))
    }

    /// WRITE (flags e.g. [`raw::CMD_FLAG_FUA`]); Ok(NBD error value, 0 = success).
    pub fn write(&mut self, flags: u16, offset: u64, data: &[u8]) -> io::Result<u32> {
        self.request(flags, raw::CMD_WRITE, offset, data.len() as u32, data)
    }

    pub fn flush(&mut self) -> io::Result<u32> {
        self.request(0, raw::CMD_FLUSH, 0, 0, &[])
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<u32> {
        self.request(0, raw::CMD_TRIM, offset, len, &[])
    }

    /// READ; Ok(Err(errno)) when the server answered with an error.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
        let err = self.request(0, raw::CMD_READ, offset, len, &[])?;
        if err != 0 {
            return Ok(Err(err));
        }
        let mut v = vec![0u8; len as usize];
        self.raw.s.read_exact(&mut v)?;
        Ok(Ok(v))
    }

    /// NBD_CMD_DISC, then wait for the server to close.
    pub fn disconnect(self) {
        let Conn { raw, .. } = self;
        raw.disconnect();
    }
}

/// A RAM filesystem (a size-limited tmpfs, or a ramfs) mounted on a fresh temporary directory;
/// unmounted (lazily, so a still-running process cannot keep it busy) and removed on drop, also
/// when a test panics. Declare it before the [`crate::Daemon`] using it so the daemon is dropped
/// (killed) first.
pub struct TmpfsMount {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TmpfsMount {
    pub fn new(size_mib: u64) -> TmpfsMount {
        require_root("mounting a size-limited tmpfs");
        TmpfsMount::mount("tmpfs", &format!("size={size_mib}m,mode=0755"))
    }

    /// A ramfs: no size limit, and open(2) refuses O_DIRECT there with EINVAL (tmpfs accepts
    /// it since Linux 6.6), which is what the fallbacks to the page cache are tested on.
    pub fn ramfs() -> TmpfsMount {
        require_root("mounting a ramfs");
        TmpfsMount::mount("ramfs", "mode=0755")
    }

    fn mount(fs_type: &str, options: &str) -> TmpfsMount {
        let dir = crate::tempdir();
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        run(
            "mount",
            &[
                "-t",
                fs_type,
                "-o",
                options,
                fs_type,
                path.to_str().unwrap(),
            ],
        );
        TmpfsMount {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (total, available) bytes, from statvfs.
    pub fn space(&self) -> (u64, u64) {
        let c = std::ffi::CString::new(self.path.to_str().unwrap()).unwrap();
        // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        assert_eq!(
            r,
            0,
            "statvfs {}: {}",
            self.path.display(),
            io::Error::last_os_error()
        );
        (
            st.f_blocks as u64 * st.f_frsize as u64,
            st.f_bavail as u64 * st.f_frsize as u64,
        )
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let out = run_unchecked("umount", &["-l", self.path.to_str().unwrap()]);
        if !out.status.success() {
            eprintln!(
                "warning: umount -l {} failed: {}",
                self.path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        drop(self.dir.take());
    }
}

/// Number of open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count()
}

/// Resident set size of process `pid` in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{s}"))
}
