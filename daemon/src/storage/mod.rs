//! Volumes on disk as trees of copy-on-write layers. Knows nothing of NBD: the NBD side calls
//! `Volume`'s methods, the admin side the registry's and `VolumeEntry`'s.

pub mod aligned;
pub mod attachments;
pub mod buffers;
pub mod clean_stop;
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

/// For tests: a registry in `dir` on `engine` (the threads engine when None), with a volume
/// "v" of `size_bytes` holding 1s throughout.
#[cfg(test)]
pub(crate) async fn volume_of_ones(
    dir: &std::path::Path,
    engine: Option<crate::io::IoEngine>,
    size_bytes: u64,
) -> (std::sync::Arc<Registry>, std::sync::Arc<Volume>) {
    use crate::io::{EngineConfig, EngineKind, IoEngine};
    let engine = engine.unwrap_or_else(|| {
        IoEngine::new(Some(EngineKind::Threads), &EngineConfig::default()).unwrap()
    });
    let registry = std::sync::Arc::new(Registry::open(dir, engine).unwrap());
    let volume = registry.create("v", size_bytes).unwrap();
    let ones = bytes::Bytes::from(vec![1u8; size_bytes as usize]);
    volume.write(0, ones, false).await.unwrap();
    (registry, volume)
}

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
