//! Where a sparse file holds bytes, asked of the filesystem (SEEK_DATA / SEEK_HOLE): a
//! format-1 volume's map is built from it once, and an open after a crash checks the blocks
//! whose bytes may have been lost (see `layer/written.rs`).

use std::fs::File;
use std::os::fd::AsRawFd;

/// Whether `file`'s filesystem punches holes: a punch of a block past its end, which changes
/// nothing where it works. False only when the filesystem says it cannot (EOPNOTSUPP, ENOSYS):
/// a FAST_ZERO must then not take the deallocating path (see `Volume::zero_blocks`), and the
/// first one would otherwise find out by writing zeroes over its whole range.
pub fn punches_holes(file: &File) -> bool {
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return true;
    };
    let past_end = len.next_multiple_of(4096);
    let Ok(offset) = libc::off64_t::try_from(past_end) else {
        return true;
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate takes the fd by value and touches no memory of ours; `file` keeps it
    // open for the call. KEEP_SIZE past the end: no byte of the file changes.
    let punched = unsafe { libc::fallocate64(file.as_raw_fd(), mode, offset, 4096) };
    if punched == 0 {
        return true;
    }
    let errno = std::io::Error::last_os_error().raw_os_error();
    !matches!(errno, Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS))
}

fn seek(file: &File, pos: u64, whence: i32) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek64 takes the fd by value and touches no memory of ours; `file` keeps it
    // open for the call. Only the file offset moves, which positioned I/O ignores.
    let at = unsafe { libc::lseek64(file.as_raw_fd(), pos as libc::off64_t, whence) };
    if at < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(at as u64))
}

/// The first byte range of `file` at or after `pos` (and before `end`) that holds data, if
/// any. A filesystem that cannot tell reports everything as data, and so does this.
pub fn next_data(file: &File, pos: u64, end: u64) -> std::io::Result<Option<(u64, u64)>> {
    if pos >= end {
        return Ok(None);
    }
    let data = match seek(file, pos, libc::SEEK_DATA) {
        Err(e) if cannot_tell(&e) => return Ok(Some((pos, end))),
        other => other?,
    };
    let Some(data) = data.filter(|&data| data < end) else {
        return Ok(None);
    };
    let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
    Ok(Some((data, hole.max(data + 1))))
}

/// Byte ranges of `file` within `[start, end)` that hold data, in order.
pub fn data_ranges(file: &File, start: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    let mut pos = start;
    while let Some((data, hole)) = next_data(file, pos, end)? {
        ranges.push((data, hole));
        pos = hole;
    }
    Ok(ranges)
}

fn cannot_tell(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

/// ZFS (`f_type` from statfs).
const ZFS_SUPER_MAGIC: i64 = 0x2fc1_2fc1;

/// Whether a hole in `file` means bytes were never written there. Not on ZFS: with
/// compression on it stores a record of zeroes written by a client as a hole.
pub fn hole_means_unwritten(file: &File) -> bool {
    // One that cannot be told keeps every marked block as data.
    matches!(filesystem_magic(file), Some(magic) if magic != ZFS_SUPER_MAGIC)
}

/// btrfs (`f_type` from statfs).
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;

/// Makes a new, still empty file no-copy-on-write on btrfs; elsewhere nothing. Block maps are
/// rewritten in place through a shared mapping: on a copy-on-write filesystem each rewrite of
/// a page needs new space, and on a full disk that write fault is a SIGBUS for the daemon.
/// Best effort: the flag only takes on an empty file, and a refusal is logged.
pub fn no_copy_on_write(file: &File, path: &std::path::Path) {
    /// `FS_NOCOW_FL` from linux/fs.h.
    const FS_NOCOW_FL: libc::c_int = 0x0080_0000;
    if filesystem_magic(file) != Some(BTRFS_SUPER_MAGIC) {
        return;
    }
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int (the kernel's inode flags) into `flags`, which
    // outlives the call; `file` keeps the fd open.
    let got = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    let set = got == 0 && {
        flags |= FS_NOCOW_FL;
        // SAFETY: FS_IOC_SETFLAGS reads one int from `flags`, which outlives the call.
        unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) == 0 }
    };
    if !set {
        let error = std::io::Error::last_os_error();
        tracing::warn!(path = %path.display(), %error, "could not make a block map no-copy-on-write on btrfs: a full disk may then stop the daemon");
    }
}

/// The filesystem's `f_type`, None when fstatfs fails.
fn filesystem_magic(file: &File) -> Option<i64> {
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes a whole `statfs` into the buffer on success and nothing else;
    // it is read only then. `file` keeps the fd open for the call.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: fstatfs succeeded, so the buffer is initialised.
    let stat = unsafe { stat.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets.
    let f_type = stat.f_type as i64;
    Some(f_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_data_between_holes_within_the_range() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let block = 64 << 10;
        let file = crate::storage::sized_test_file(dir.path(), "f", 16 * block);
        file.write_all_at(&vec![1u8; block as usize], 2 * block)
            .unwrap();
        file.write_all_at(&vec![1u8; 2 * block as usize], 8 * block)
            .unwrap();
        assert_eq!(
            data_ranges(&file, 0, 16 * block).unwrap(),
            [(2 * block, 3 * block), (8 * block, 10 * block)]
        );
        // Clipped to the range asked.
        assert_eq!(
            data_ranges(&file, 9 * block, 16 * block).unwrap(),
            [(9 * block, 10 * block)]
        );
        assert!(data_ranges(&file, 3 * block, 8 * block).unwrap().is_empty());
        assert!(hole_means_unwritten(&file));
    }

    /// The probe says yes where holes can be punched, and changes no byte of the file.
    #[test]
    fn the_punch_probe_changes_nothing() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let file = crate::storage::sized_test_file(dir.path(), "f", 10_000);
        file.write_all_at(&[7u8; 10_000], 0).unwrap();
        let blocks_before = allocated_blocks(&file);
        assert!(punches_holes(&file));
        let mut back = vec![0u8; 10_000];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 7));
        assert_eq!(file.metadata().unwrap().len(), 10_000);
        assert_eq!(allocated_blocks(&file), blocks_before);
    }

    fn allocated_blocks(file: &File) -> u64 {
        std::os::unix::fs::MetadataExt::blocks(&file.metadata().unwrap())
    }
}
