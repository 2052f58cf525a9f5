//! Volumes on disk. Knows nothing of NBD: the NBD side calls `Volume`'s methods.

pub mod attachments;
pub mod buffers;
pub mod manifest;
pub mod name;
pub mod registry;
pub mod volume;

pub use name::parse_size_bytes;
pub use registry::Registry;
pub use volume::{Extent, Volume, ZeroMode};
