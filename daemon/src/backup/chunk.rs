//! Chunk objects: content id, compression, checksums.
