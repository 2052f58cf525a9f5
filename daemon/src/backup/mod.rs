//! Backups (VBS): frozen snapshot data streamed to object storage as content-addressed chunks,
//! restored from there. Reads storage's frozen layers; never on the NBD I/O path.

pub mod chunk;
pub mod manifest;
