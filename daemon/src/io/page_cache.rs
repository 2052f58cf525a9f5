//! Asks the kernel whether a file range sits wholly in the page cache (`cachestat`, Linux 6.5).
//!
//! A read that is all cached can be sent from the cache to the socket (`sendfile`, or `writev`
//! from the file's mapping) on a runtime thread without ever waiting for the disk; anything else
//! takes the engine's read path.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

/// `cachestat` has the same number on every architecture (it was added after the tables were
/// unified); the libc crate does not name it for x86_64 yet.
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct CachestatRange {
    offset_bytes: u64,
    length_bytes: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Inline page-cache I/O on or off (`enabled`), and whether each of the two calls works: each is
/// given up on its first ENOSYS or EPERM (an older kernel, a seccomp filter), logged once, so
/// such setups pay for one try only, and one refused leaves the paths of the other on.
pub(crate) struct Residency {
    enabled: bool,
    cachestat_works: AtomicBool,
    mincore_works: AtomicBool,
}

impl Residency {
    pub(crate) fn new(enabled: bool) -> Residency {
        Residency {
            enabled,
            cachestat_works: AtomicBool::new(true),
            mincore_works: AtomicBool::new(true),
        }
    }

    /// True when every page of `offset_bytes..offset_bytes + length_bytes` is cached. False
    /// when any is not, or when the kernel cannot tell.
    pub(crate) fn all_cached(&self, file: &File, offset_bytes: u64, length_bytes: u64) -> bool {
        if length_bytes == 0 || !self.enabled || !self.cachestat_works.load(Ordering::Relaxed) {
            return false;
        }
        // `nr_cache` counts the system's pages, whatever their size.
        let page_bytes = page_bytes() as u64;
        let first_page = offset_bytes / page_bytes;
        let Some(end_bytes) = offset_bytes.checked_add(length_bytes) else {
            return false;
        };
        let pages = end_bytes.div_ceil(page_bytes) - first_page;
        let range = CachestatRange {
            offset_bytes,
            length_bytes,
        };
        let mut stat = Cachestat::default();
        // SAFETY: `range` and `stat` are live, properly laid out (`repr(C)`, the kernel's
        // struct cachestat_range / struct cachestat) for the whole synchronous call, which
        // reads the first and writes only the second; the fd is kept open by `file`.
        let rc = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                &range as *const CachestatRange,
                &mut stat as *mut Cachestat,
                0u32,
            )
        };
        if rc != 0 {
            refused(
                &self.cachestat_works,
                "cachestat",
                "sendfile from the page cache",
            );
            return false;
        }
        stat.nr_cache >= pages
    }
}

impl Residency {
    /// True when every page under `start..start + length_bytes`, a range of a shared file
    /// mapping, is in the page cache (`mincore`: a walk of the mapping's page tables, looking
    /// in the page cache only for pages not mapped yet), so a copy from it by the kernel does
    /// not wait for the disk. False when any is not, the range is not mapped, or inline
    /// page-cache I/O is off.
    pub(crate) fn all_resident(&self, start: NonNull<u8>, length_bytes: usize) -> bool {
        let Some(pages) = pages_under(start, length_bytes) else {
            return false;
        };
        // A 128 KiB landing that starts mid-page spans 33 pages: room for those on the stack.
        let mut on_stack = [0u8; 64];
        let mut on_heap = Vec::new();
        let vector: &mut [u8] = if pages <= on_stack.len() {
            &mut on_stack[..pages]
        } else {
            on_heap.resize(pages, 0);
            &mut on_heap
        };
        self.resident_pages(start, length_bytes, vector) && vector.iter().all(|&page| page & 1 == 1)
    }

    /// `mincore` of the pages under `start..start + length_bytes`, a range of a shared file
    /// mapping: one byte per page into `vector`, bit 0 set for a page in the page cache. False
    /// (and `vector` unspecified) when the kernel cannot tell, the range is not mapped, inline
    /// page-cache I/O is off, or `vector` does not have exactly one byte per page.
    pub(crate) fn resident_pages(
        &self,
        start: NonNull<u8>,
        length_bytes: usize,
        vector: &mut [u8],
    ) -> bool {
        if !self.enabled
            || !self.mincore_works.load(Ordering::Relaxed)
            || pages_under(start, length_bytes) != Some(vector.len())
        {
            return false;
        }
        let first_page = start.as_ptr() as usize & !(page_bytes() - 1);
        let end = start.as_ptr() as usize + length_bytes;
        // SAFETY: `mincore` reads nothing of the range, only the page tables and page cache
        // behind it, and writes one byte per page of `first_page..end` into `vector`, which has
        // exactly that many (checked above); an address range that is not mapped fails with
        // ENOMEM.
        let rc = unsafe {
            libc::mincore(
                first_page as *mut libc::c_void,
                end - first_page,
                vector.as_mut_ptr(),
            )
        };
        if rc != 0 {
            refused(
                &self.mincore_works,
                "mincore",
                "reads sent from mapped files and in-place writes",
            );
        }
        rc == 0
    }
}

/// After a failed call: gives `call` up for good if the kernel or a seccomp filter refuses it
/// (ENOSYS, EPERM), saying once what that turns off.
fn refused(works: &AtomicBool, call: &str, what: &str) {
    let errno = std::io::Error::last_os_error();
    if matches!(errno.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM))
        && works.swap(false, Ordering::Relaxed)
    {
        tracing::warn!(error = %errno, "{call} is refused here (an older kernel, or a seccomp filter without it): {what} off");
    }
}

/// How many pages `start..start + length_bytes` touches; `None` for an empty range or one that
/// wraps the address space.
fn pages_under(start: NonNull<u8>, length_bytes: usize) -> Option<usize> {
    if length_bytes == 0 {
        return None;
    }
    let page_bytes = page_bytes();
    let address = start.as_ptr() as usize;
    let first_page = address & !(page_bytes - 1);
    let end = address.checked_add(length_bytes)?;
    Some((end - first_page).div_ceil(page_bytes))
}

/// The system's page size (`mincore` wants its address aligned to it and reports per page).
pub fn page_bytes() -> usize {
    static SYSTEM_PAGE_BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SYSTEM_PAGE_BYTES.get_or_init(|| {
        // SAFETY: sysconf reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(page)
            .ok()
            .filter(|page| page.is_power_of_two())
            .unwrap_or(4096)
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn written_pages_are_cached_and_dropped_ones_are_not() {
        // On the crate's own disk: tmpfs pages never leave the cache.
        let mut file = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        file.write_all(&vec![3u8; 64 << 10]).unwrap();
        let residency = Residency::new(true);
        if !residency.all_cached(&file, 0, 64 << 10) {
            // Only a kernel without cachestat may say no here, and then it must have switched
            // itself off rather than keep asking.
            assert!(!residency.cachestat_works.load(Ordering::Relaxed));
            return;
        }
        assert!(residency.all_cached(&file, 4096 + 17, 8192));
        // Past the end of the file nothing is cached.
        assert!(!residency.all_cached(&file, 0, 128 << 10));
        file.sync_all().unwrap();
        // SAFETY: plain advisory call on an open fd, no memory is passed.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        assert!(!residency.all_cached(&file, 0, 64 << 10));
        assert!(!Residency::new(false).all_cached(&file, 0, 4096));
    }
}
