//! A zstd frame that stores its content uncompressed (raw blocks, RFC 8878 §3.1.1).
//!
//! A delta's payload is a zstd frame. When its new blocks do not compress (random or
//! encrypted data), running the compressor over them costs more CPU than everything else an
//! incremental backup does per chunk, to end up storing raw blocks anyway. Writing those raw
//! blocks directly gives a frame every zstd decoder reads, for the price of a copy.

/// Frame magic number, little-endian on the wire.
const MAGIC: u32 = 0xFD2F_B528;
/// Frame header descriptor: a 4-byte frame content size (flag 2 in bits 7-6) and a single
/// segment (bit 5), so no window descriptor follows and the window is the content size.
const DESCRIPTOR: u8 = (2 << 6) | (1 << 5);
/// A block holds at most this much (the smaller of 128 KiB and the window size).
const MAX_BLOCK_BYTES: usize = 128 << 10;
const BLOCK_HEADER_BYTES: usize = 3;
const FRAME_HEADER_BYTES: usize = 4 + 1 + 4;

/// Bytes [`append`] adds for `content_len` bytes of content.
pub fn frame_len(content_len: usize) -> usize {
    let blocks = content_len.div_ceil(MAX_BLOCK_BYTES).max(1);
    FRAME_HEADER_BYTES + blocks * BLOCK_HEADER_BYTES + content_len
}

/// Appends to `out` a frame holding the concatenation of `parts`, which must total less than
/// 4 GiB (the 4-byte content size). An empty content gets one empty last block.
pub fn append(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let content_len: usize = parts.iter().map(|p| p.len()).sum();
    let content_size = u32::try_from(content_len).expect("a raw frame's content is under 4 GiB");
    out.reserve(frame_len(content_len));
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(DESCRIPTOR);
    out.extend_from_slice(&content_size.to_le_bytes());
    let mut left = content_len;
    let mut pieces = parts.iter().flat_map(|p| p.chunks(MAX_BLOCK_BYTES));
    let mut pending: &[u8] = &[];
    loop {
        let block_len = left.min(MAX_BLOCK_BYTES);
        left -= block_len;
        let last = u32::from(left == 0);
        // Block header: bit 0 last block, bits 1-2 type (0: raw), bits 3-23 size.
        let header = last | ((block_len as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..BLOCK_HEADER_BYTES]);
        let mut need = block_len;
        while need > 0 {
            if pending.is_empty() {
                pending = pieces.next().expect("the parts hold the counted bytes");
            }
            let take = need.min(pending.len());
            out.extend_from_slice(&pending[..take]);
            pending = &pending[take..];
            need -= take;
        }
        if last == 1 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(frame: &[u8], capacity: usize) -> Vec<u8> {
        zstd::bulk::decompress(frame, capacity).expect("zstd reads the frame")
    }

    #[test]
    fn zstd_reads_back_what_was_framed() {
        let big: Vec<u8> = (0..(300 << 10) + 17).map(|i| (i * 7 % 251) as u8).collect();
        for (parts, expected_blocks) in [
            (vec![&b""[..]], 1),
            (vec![&b"abc"[..], &b""[..], &b"defg"[..]], 1),
            (vec![&big[..MAX_BLOCK_BYTES]], 1),
            (vec![&big[..MAX_BLOCK_BYTES + 1]], 2),
            (vec![&big[..5], &big[5..]], 3),
        ] {
            let content: Vec<u8> = parts.concat();
            let mut out = b"prefix".to_vec();
            append(&mut out, &parts);
            let frame = &out[6..];
            assert_eq!(&out[..6], b"prefix");
            assert_eq!(frame.len(), frame_len(content.len()));
            assert_eq!(
                frame.len(),
                FRAME_HEADER_BYTES + expected_blocks * BLOCK_HEADER_BYTES + content.len()
            );
            assert_eq!(
                zstd::zstd_safe::get_frame_content_size(frame).ok(),
                Some(Some(content.len() as u64))
            );
            assert_eq!(decode(frame, content.len()), content);
        }
    }

    #[test]
    fn a_cut_frame_fails_to_decode() {
        let content = vec![9u8; 1000];
        let mut out = Vec::new();
        append(&mut out, &[&content]);
        assert!(zstd::bulk::decompress(&out[..out.len() - 1], 1000).is_err());
    }
}
