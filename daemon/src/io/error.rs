//! Errors raised while constructing an I/O engine. Per-operation failures are plain
//! `std::io::Error`s so callers can map them straight onto NBD error codes.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("io_uring setup failed: {0}")]
    RingSetup(#[source] io::Error),
    #[error("io_uring opcode probe failed (kernel too old?): {0}")]
    Probe(#[source] io::Error),
    #[error("io_uring opcode {0} is not supported by this kernel")]
    Unsupported(String),
    #[error("creating the ring wake-up eventfd failed: {0}")]
    EventFd(#[source] io::Error),
    #[error("spawning an io_uring thread failed: {0}")]
    ThreadSpawn(#[source] io::Error),
    #[error("invalid I/O engine configuration: {0}")]
    InvalidConfig(String),
}
