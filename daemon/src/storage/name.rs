//! Volume names: they become directory names and NBD export names, so they are checked hard.

use crate::error::StorageError;

pub const MAX_NAME_BYTES: usize = 64;

/// 1–64 of `[A-Za-z0-9._-]`, not starting with '.'. That excludes '/', '@' (reserved for
/// `vol@snap` exports), NUL, ".." and every other way out of the data directory.
pub fn validate_volume_name(name: &str) -> Result<(), StorageError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty()
        || name.len() > MAX_NAME_BYTES
        || name.starts_with('.')
        || !name.chars().all(ok_char)
    {
        return Err(StorageError::InvalidName(name.to_owned()));
    }
    Ok(())
}

/// Snapshot names follow the same rules (they become part of `vol@snap` export names and of
/// `qemu:dirty-bitmap:NAME` contexts).
pub fn validate_snapshot_name(name: &str) -> Result<(), StorageError> {
    validate_volume_name(name).map_err(|_| StorageError::InvalidSnapshotName(name.to_owned()))
}

/// Parses `4096`, `512K`, `512M`, `10G`, `1T` (binary units, optional trailing `iB`/`B`).
pub fn parse_size_bytes(text: &str) -> Result<u64, StorageError> {
    let invalid = || StorageError::InvalidSize(text.to_owned());
    let trimmed = text.trim();
    let upper = trimmed.to_ascii_uppercase();
    let digits_end = upper
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(upper.len());
    let (digits, suffix) = upper.split_at(digits_end);
    let value: u64 = digits.parse().map_err(|_| invalid())?;
    // One unit, optionally followed by `B` or `iB` once: K, KB, KiB (any case).
    let shift = match suffix {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        _ => return Err(invalid()),
    };
    value.checked_mul(1u64 << shift).ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["vol0", "a", "data-1.img_x", &"x".repeat(64)] {
            assert!(validate_volume_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "..",
            "a/b",
            "vol@snap",
            "a b",
            "é",
            &"x".repeat(65),
            "a\0b",
        ] {
            assert!(validate_volume_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_size_bytes("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size_bytes("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size_bytes("2k").unwrap(), 2048);
        assert!(parse_size_bytes("").is_err());
        assert!(parse_size_bytes("10X").is_err());
        assert!(parse_size_bytes("-1").is_err());
        assert!(parse_size_bytes("99999999999P").is_err());
        // One unit suffix, once.
        assert_eq!(parse_size_bytes("10GB").unwrap(), 10 << 30);
        assert_eq!(parse_size_bytes("4096b").unwrap(), 4096);
        for junk in ["10GBBB", "1GIBIB", "4096IB", "1KBIB", "2BK"] {
            assert!(parse_size_bytes(junk).is_err(), "{junk}");
        }
    }
}
