//! READs sent straight from the head's shared mapping (`layer::mapped`): the socket's `writev`
//! copies the bytes from the page cache into the socket, where a read through a buffer costs a
//! `preadv2` (a page-cache lookup and a copy into the buffer) and then the same copy out of the
//! buffer. On 4 KiB random reads of a cached volume over one connection the `preadv2` was two
//! fifths of the connection thread's CPU; `mincore` over the mapped range, which walks page
//! tables the earlier reads filled, replaces it. Unix sockets take it for READs under 64 KiB
//! (larger ones go by `sendfile`); TCP connections that take no `sendfile` (paced from the
//! start) for larger ones only: small ones measured slower over TCP (see `nbd::sendfile`).
//!
//! Only ranges the head holds as data qualify, whole in one run, with every page in the page
//! cache (a page fault on one that is not would read it from the disk on the connection's
//! thread). The bytes are the ones the page cache holds when the reply is sent, as with
//! `sendfile` (`Volume::cached_range`): a write overlapping a READ still in flight may land in
//! either, which NBD allows. The chain the range was found in is held until then, so pruning
//! does not punch the blocks out from under it (see `readers_done`).

use std::ptr::NonNull;
use std::sync::Arc;

use crate::storage::layer::chain::{Chain, Hit};
use crate::storage::layer::mapped::{prefetch_pages, MappedRange};
use crate::storage::layer::BLOCK_BYTES;

use super::Volume;

/// Bytes of a volume in its head's mapping, for the kernel to copy into a socket.
pub struct MappedBytes {
    range: MappedRange,
    /// Where the range starts in the head's data file, for `read_rest`.
    offset_bytes: u64,
    /// How many of the range's bytes went out already.
    sent_bytes: usize,
    length_bytes: usize,
    /// The chain the range was found in, its top the head mapped; held until the bytes are
    /// sent (see `readers_done`).
    resolved_in: Arc<Chain>,
}

impl MappedBytes {
    /// Where the bytes not sent yet start. Only the kernel may read them (see `layer::mapped`).
    pub fn rest_start(&self) -> NonNull<u8> {
        // SAFETY: `sent_bytes < length_bytes` or equal to it (one past the end), and the range
        // is `length_bytes` long inside one mapping.
        unsafe { self.range.start().add(self.sent_bytes) }
    }

    /// Starts fetching the pages not sent yet, at most `max_bytes` of them (see
    /// `mapped::prefetch_pages`): for a caller about to hand them to the kernel's copy.
    /// Returns the bytes asked for.
    pub fn prefetch_rest(&self, max_bytes: usize) -> usize {
        let bytes = self.rest_bytes().min(max_bytes);
        prefetch_pages(self.rest_start(), bytes);
        bytes
    }

    pub fn rest_bytes(&self) -> usize {
        self.length_bytes - self.sent_bytes
    }

    /// Counts `sent_bytes` more as sent.
    pub fn advance(&mut self, sent_bytes: usize) {
        self.sent_bytes = (self.sent_bytes + sent_bytes).min(self.length_bytes);
    }

    /// The bytes not sent yet, read from the file with `pread` (zeroes past its end), for a
    /// `writev` that failed with EFAULT: the kernel could not read some range of its iovecs
    /// (a page that failed to come back in from the disk, a file cut short), and which one is
    /// not told. Blocks the caller's thread on the disk, rarely: only after such a failure.
    pub fn read_rest(&self) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut rest = vec![0u8; self.rest_bytes()];
        let mut filled = 0;
        while filled < rest.len() {
            let at = self.offset_bytes + (self.sent_bytes + filled) as u64;
            match self
                .resolved_in
                .top()
                .data()
                .read_at(&mut rest[filled..], at)
            {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(rest)
    }
}

impl Volume {
    /// Lets the head's mapping go, once ranges handed out of it are dropped (the next use maps
    /// the file again): for a volume no client is attached to.
    pub fn release_head_mapping(&self) {
        if self.writer.is_some() {
            self.chain().top().release_mapping();
        }
    }

    /// `offset_bytes..offset_bytes + length_bytes` in the head's mapping when the head holds
    /// all of it as data and all of it is in the page cache; `None` reads it the ordinary way.
    /// `now`: the caller's clock reading, for how old a residency answer may be.
    pub fn mapped_cached_range(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        now: std::time::Instant,
    ) -> Option<MappedBytes> {
        // Only a writable volume's head: a frozen layer lets its mapping go (`release_mapping`).
        self.writer.as_ref()?;
        let end_bytes = offset_bytes.checked_add(length_bytes)?;
        if length_bytes == 0 || end_bytes > self.size_bytes() {
            return None;
        }
        let chain = self.chain();
        let runs = chain.runs(offset_bytes / BLOCK_BYTES, end_bytes.div_ceil(BLOCK_BYTES));
        let [(_, _, Hit::Data(0))] = runs[..] else {
            return None;
        };
        let head = chain.top();
        let range = head.mapped_range_uncharged(offset_bytes, length_bytes)?;
        let engine = &self.engine;
        if !range.all_resident(length_bytes, now, &|start, length, vector: &mut [u8]| {
            engine.resident_pages(start, length, vector)
        }) {
            return None;
        }
        head.charge_mapped(offset_bytes, length_bytes);
        Some(MappedBytes {
            range,
            offset_bytes,
            sent_bytes: 0,
            length_bytes: length_bytes as usize,
            resolved_in: chain,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use bytes::Bytes;

    use super::*;
    use crate::io::{EngineConfig, EngineKind, IoEngine};
    use crate::storage::Registry;

    const MIB: u64 = 1 << 20;

    /// The bytes of `mapped`, copied out by the kernel as a socket's `writev` does.
    fn sent(mapped: &MappedBytes) -> Vec<u8> {
        let (sender, mut receiver) = std::os::unix::net::UnixStream::pair().unwrap();
        let iov = libc::iovec {
            iov_base: mapped.rest_start().as_ptr().cast(),
            iov_len: mapped.rest_bytes(),
        };
        // SAFETY: the iovec addresses a live range of a mapping the kernel only reads here.
        let written = unsafe { libc::writev(sender.as_raw_fd(), &iov, 1) };
        assert_eq!(written, mapped.rest_bytes() as isize);
        drop(sender);
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut receiver, &mut out).unwrap();
        out
    }

    #[test]
    fn only_cached_data_runs_of_a_writable_head_qualify_and_read_back_exactly() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Not under /tmp, which may be tmpfs, where dropped pages are not dropped. Removed after
        // the runtime: the spare layer made after the snapshot below is written on its blocking
        // pool, and a removal racing it left the directory behind.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        runtime.block_on(async {
            let engine =
                IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap();
            let registry = Arc::new(Registry::open(dir.path(), engine).unwrap());
            let volume = registry.create("v", 4 * MIB).unwrap();
            let data: Vec<u8> = (0..2 * MIB as usize).map(|i| (i % 253) as u8).collect();
            volume
                .write(0, Bytes::from(data.clone()), false)
                .await
                .unwrap();

            let mapped = volume
                .mapped_cached_range(4096 + 17, 9000, std::time::Instant::now())
                .expect("cached data");
            assert_eq!(sent(&mapped)[..], data[4096 + 17..4096 + 17 + 9000]);
            let mut mapped = volume
                .mapped_cached_range(0, MIB, std::time::Instant::now())
                .expect("cached data");
            mapped.advance(MIB as usize - 100);
            assert_eq!(sent(&mapped)[..], data[MIB as usize - 100..MIB as usize]);
            assert_eq!(
                mapped.read_rest().unwrap()[..],
                data[MIB as usize - 100..MIB as usize]
            );

            assert!(
                volume
                    .mapped_cached_range(2 * MIB, 4096, std::time::Instant::now())
                    .is_none(),
                "never written"
            );
            assert!(
                volume
                    .mapped_cached_range(2 * MIB - 4096, 8192, std::time::Instant::now())
                    .is_none(),
                "data, then never written"
            );
            assert!(
                volume
                    .mapped_cached_range(4 * MIB, 1, std::time::Instant::now())
                    .is_none(),
                "past the end"
            );
            assert!(
                volume
                    .mapped_cached_range(0, 0, std::time::Instant::now())
                    .is_none(),
                "empty"
            );

            // Pages dropped from the cache are not sent from the mapping until read back in
            // (pages mapped by the sends above stay: dropping skips mapped pages).
            let far = 3 * MIB / 2;
            volume.flush().await.unwrap();
            let file = volume.chain().top().data().clone();
            // SAFETY: plain advice on an open descriptor.
            let advised =
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(advised, 0);
            assert!(
                volume
                    .mapped_cached_range(far, 8192, std::time::Instant::now())
                    .is_none(),
                "evicted"
            );
            let far = far as usize;
            let back = volume.read(far as u64, 8192).await.unwrap();
            assert_eq!(back[..], data[far..far + 8192]);
            assert!(
                volume
                    .mapped_cached_range(far as u64, 8192, std::time::Instant::now())
                    .is_some(),
                "read back in"
            );

            // Data a snapshot froze is below the head now: read the ordinary way.
            registry
                .entry("v")
                .unwrap()
                .create_snapshot("s")
                .await
                .unwrap();
            assert!(
                volume
                    .mapped_cached_range(0, 8192, std::time::Instant::now())
                    .is_none(),
                "frozen"
            );
            let snapshot = registry.get("v@s").unwrap();
            assert!(
                snapshot
                    .mapped_cached_range(0, 8192, std::time::Instant::now())
                    .is_none(),
                "read-only export"
            );
        });
        drop(runtime);
        drop(dir);
    }
}
