//! A layer's data file mapped shared, so a large write's bytes can be received from the client's
//! socket straight into the page cache (see `storage::in_place`).
//!
//! Only the kernel ever copies into this mapping (`recv` into a range of it), never our own
//! code: a page the kernel cannot make writable (an I/O error reading it, a full disk, a file
//! cut short by a shrink) then fails that system call with EFAULT. A copy by our own code would
//! take SIGBUS instead and end the daemon.

use std::fs::File;
use std::ptr::NonNull;
use std::sync::OnceLock;

use memmap2::{MmapOptions, MmapRaw};

/// The mapping of one layer's data file, made on first use. A layer whose file cannot be mapped
/// (no address space left for a huge volume, a filesystem without shared mappings) takes the
/// ordinary write path for good.
#[derive(Default)]
pub struct MappedData {
    map: OnceLock<Option<MmapRaw>>,
}

impl MappedData {
    /// The start of `offset_bytes..offset_bytes + length_bytes` in the mapping of `data`
    /// (`size_bytes` long), or `None` when the file is not mapped or the range leaves it.
    pub fn range(
        &self,
        data: &File,
        size_bytes: u64,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Option<NonNull<u8>> {
        let map = self
            .map
            .get_or_init(|| map_shared(data, size_bytes))
            .as_ref()?;
        let end_bytes = offset_bytes.checked_add(length_bytes)?;
        if end_bytes > map.len() as u64 {
            return None;
        }
        // SAFETY: `offset_bytes` lies within the mapping (checked just above), so the pointer
        // stays inside the one allocation `as_mut_ptr` points into.
        let start = unsafe { map.as_mut_ptr().add(offset_bytes as usize) };
        NonNull::new(start)
    }
}

fn map_shared(data: &File, size_bytes: u64) -> Option<MmapRaw> {
    let len = usize::try_from(size_bytes).ok().filter(|&len| len > 0)?;
    match MmapOptions::new().len(len).map_raw(data) {
        Ok(map) => Some(map),
        Err(error) => {
            tracing::info!(%error, size_bytes, "a layer's data file could not be mapped; its large writes take the ordinary path");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    /// One `recv` of up to `length` bytes from `receiver` into `at`, as the daemon does.
    fn recv_into(
        receiver: &std::os::unix::net::UnixStream,
        at: NonNull<u8>,
        length: usize,
    ) -> isize {
        // SAFETY: the callers pass the start of a live `length`-byte range of a mapping that
        // only the kernel writes.
        unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(receiver),
                at.as_ptr().cast(),
                length,
                0,
            )
        }
    }

    #[test]
    fn a_range_points_into_the_file_and_ranges_past_its_end_are_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let mapped = MappedData::default();
        let at = mapped.range(&file, 1 << 20, 8192, 4096).expect("mapped");
        // The kernel copies into the range, as `recv` does in the daemon.
        let (mut sender, receiver) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut sender, &[9u8; 4096]).unwrap();
        assert_eq!(recv_into(&receiver, at, 4096), 4096);
        let mut back = [0u8; 4096];
        file.read_exact_at(&mut back, 8192).unwrap();
        assert!(back.iter().all(|&b| b == 9), "the bytes landed in the file");
        assert!(mapped
            .range(&file, 1 << 20, (1 << 20) - 4096, 8192)
            .is_none());
        assert!(mapped.range(&file, 1 << 20, u64::MAX, 1).is_none());
    }

    #[test]
    fn a_fault_the_kernel_cannot_serve_fails_the_receive_instead_of_raising_sigbus() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let mapped = MappedData::default();
        let at = mapped
            .range(&file, 1 << 20, 512 << 10, 4096)
            .expect("mapped");
        // Cut the file short under the mapping: a page past the end cannot be faulted in.
        file.set_len(4096).unwrap();
        let (mut sender, receiver) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut sender, &[1u8; 4096]).unwrap();
        // The range is still mapped; only the file behind it is gone.
        assert_eq!(recv_into(&receiver, at, 4096), -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EFAULT)
        );
        // The bytes stay in the socket for the ordinary path.
        let mut back = [0u8; 4096];
        std::io::Read::read_exact(&mut &receiver, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 1));
    }
}
