//! Volumes on disk as trees of copy-on-write layers. Knows nothing of NBD: the NBD side calls
//! `Volume`'s methods, the admin side the registry's and `VolumeEntry`'s.

pub mod aligned;
pub mod attachments;
pub mod buffers;
pub mod diff;
pub mod entry;
pub mod epoch;
pub mod fence;
pub mod group;
pub mod holes;
pub mod layer;
pub mod manifest;
pub mod name;
pub mod persist;
pub mod registry;
pub mod restore_mark;
pub mod snapshots;
pub mod spare;
pub mod stripes;
pub mod volume;

pub use name::parse_size_bytes;
pub use registry::Registry;
pub use volume::{FileRange, StatusQuery, Volume, ZeroMode};

#[cfg(test)]
mod bulk_tests;
#[cfg(test)]
mod freeze_tests;
#[cfg(test)]
mod model_tests;

/// A new read-write file `name` in `dir`, `len_bytes` long (sparse), for tests.
#[cfg(test)]
pub(crate) fn sized_test_file(dir: &std::path::Path, name: &str, len_bytes: u64) -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join(name))
        .unwrap();
    file.set_len(len_bytes).unwrap();
    file
}
