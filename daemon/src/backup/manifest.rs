//! Backup manifests: the full chunk list of one volume at one point in time.
//!
//! A manifest is written last, so its presence is what makes a backup exist. Each manifest lists
//! every chunk of the volume, so restore never needs another manifest. Format: docs/backup-format.md.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};

use super::chunk::{ChunkId, CHUNK_SIZE_BYTES};
use super::pack::PackedAt;

/// The version this evsd writes. Versions 1 (no deltas) and 2 (no packs) are read too.
pub const MANIFEST_FORMAT_VERSION: u32 = 3;
const OLDEST_READABLE_FORMAT_VERSION: u32 = 1;

const BACKUP_ID_MAX_LEN: usize = 80;
const VOLUME_ALIGN_BYTES: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupManifest {
    pub format_version: u32,
    pub backup_id: String,
    pub volume_name: String,
    pub volume_uuid: String,
    pub size_bytes: u64,
    pub chunk_size_bytes: u64,
    /// One entry per chunk index; `None` is an all-zero chunk, which is never stored.
    pub chunks: Vec<Option<ChunkId>>,
    /// The backup whose snapshot was the incremental base; informational only.
    pub parent_backup_id: Option<String>,
    pub source_snapshot: String,
    pub source_snapshot_created_unix_secs: u64,
    pub group_id: Option<String>,
    /// The backup policy that took it (its retention may delete it); None for a manual backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub created_unix_secs: u64,
    /// See [`chunk_list_digest`]; catches a chunk list damaged after writing.
    pub chunk_list_digest: String,
    /// For every chunk stored as a delta, among `chunks` or below one of them, the chunk it
    /// patches (deltas over zeroes have none). GC keeps these bases alive; a restore finds them
    /// in the objects themselves. Version 2.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub delta_bases: BTreeMap<ChunkId, ChunkId>,
    /// Where each chunk stored in a pack lies, for every packed chunk among `chunks` or in
    /// `delta_bases`; any other chunk is an object of its own. GC keeps these packs alive.
    /// Version 3.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub packed: BTreeMap<ChunkId, PackedAt>,
    pub stats: BackupStats,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupStats {
    pub full: bool,
    pub data_chunks: u64,
    pub zero_chunks: u64,
    pub read_chunks: u64,
    pub new_chunks: u64,
    pub new_stored_bytes: u64,
    pub read_bytes: u64,
    pub duration_ms: u64,
    /// Changed chunks uploaded as deltas of the parent's chunk (version 2).
    #[serde(default)]
    pub delta_chunks: u64,
    /// Packs it stored, which hold its deltas (version 3).
    #[serde(default)]
    pub packs: u64,
}

/// Why a manifest (or a backup id) was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("invalid backup id {0:?}: use 1-80 of [A-Za-z0-9-]")]
    InvalidBackupId(String),
    #[error("manifest of backup {id:?} is not valid: {reason}")]
    Json { id: String, reason: String },
    #[error(
        "manifest of backup {id:?}: unsupported format version {version} (this evsd reads versions {OLDEST_READABLE_FORMAT_VERSION} to {MANIFEST_FORMAT_VERSION})"
    )]
    UnsupportedFormatVersion { id: String, version: u32 },
    #[error("manifest stored as backup {expected:?} says it is backup {actual:?}")]
    IdMismatch { expected: String, actual: String },
    #[error("manifest of backup {id:?}: chunk size {chunk_size_bytes} bytes, expected {CHUNK_SIZE_BYTES}")]
    ChunkSize { id: String, chunk_size_bytes: u64 },
    #[error("manifest of backup {id:?}: volume size {size_bytes} bytes is not a positive multiple of 4096")]
    BadSize { id: String, size_bytes: u64 },
    #[error("manifest of backup {id:?}: {actual} chunk entries, volume size needs {expected}")]
    ChunkCount {
        id: String,
        expected: u64,
        actual: u64,
    },
    #[error("manifest of backup {id:?}: chunk list digest is {actual}, manifest says {expected}")]
    DigestMismatch {
        id: String,
        expected: String,
        actual: String,
    },
    #[error("manifest of backup {id:?}: invalid parent backup id {parent:?}")]
    InvalidParentId { id: String, parent: String },
    #[error("manifest of backup {id:?}: chunk {chunk}: {reason}")]
    BadPackedChunk {
        id: String,
        chunk: ChunkId,
        reason: String,
    },
}

/// BLAKE3 over the chunk list: per index one 0x00 byte for a zero chunk, or 0x01 and the
/// 32-byte id. The flag byte keeps a zero chunk distinct from any id.
pub fn chunk_list_digest(chunks: &[Option<ChunkId>]) -> String {
    let mut hasher = blake3::Hasher::new();
    for chunk in chunks {
        match chunk {
            None => hasher.update(&[0x00]),
            Some(id) => hasher.update(&[0x01]).update(id.as_bytes()),
        };
    }
    hasher.finalize().to_hex().to_string()
}

pub fn manifest_key(backup_id: &str) -> String {
    format!("manifests/{backup_id}.json")
}

/// The backup id of a listed manifest key (with any store prefix), or `None` for other objects.
pub fn parse_manifest_key(key: &str) -> Option<String> {
    let (dir, file) = key.rsplit_once('/')?;
    let id = file.strip_suffix(".json")?;
    let dir_ok = dir == "manifests" || dir.ends_with("/manifests");
    (dir_ok && validate_backup_id(id).is_ok()).then(|| id.to_owned())
}

/// Ids become object keys, so anything but [A-Za-z0-9-] (like "../x" or "a/b") is refused.
pub fn validate_backup_id(id: &str) -> Result<(), ManifestError> {
    let ok = (1..=BACKUP_ID_MAX_LEN).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ManifestError::InvalidBackupId(id.to_owned()))
    }
}

/// `b-YYYYMMDDTHHMMSSZ-<8 hex>` for `since_epoch` (now): the first 3 hex digits are the
/// millisecond (000 to 3e7), the other 5 random. Ids sort by creation time, to the millisecond
/// (backups a policy or a script takes within one second too); the random part keeps two
/// daemons sharing a store from colliding.
/// Ids made in one millisecond by this process (a server backup's members come in one burst)
/// get distinct random parts: 20 bits alone would let two collide now and then.
pub fn new_backup_id(since_epoch: std::time::Duration) -> String {
    static ISSUER: IdIssuer = IdIssuer::new();
    ISSUER.issue(since_epoch)
}

/// The random parts given out in the last millisecond ids were made for.
struct IdIssuer {
    issued: std::sync::Mutex<(u128, Vec<u32>)>,
}

impl IdIssuer {
    const fn new() -> IdIssuer {
        IdIssuer {
            issued: std::sync::Mutex::new((0, Vec::new())),
        }
    }

    fn issue(&self, since_epoch: std::time::Duration) -> String {
        let secs = since_epoch.as_secs();
        let random = {
            let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
            let (millis, taken) = &mut *issued;
            if *millis != since_epoch.as_millis() {
                *millis = since_epoch.as_millis();
                taken.clear();
            }
            loop {
                let random = random_u32(secs) & 0xf_ffff;
                if !taken.contains(&random) {
                    taken.push(random);
                    break random;
                }
            }
        };
        format!(
            "b-{}-{:03x}{:05x}",
            utc_timestamp(secs),
            since_epoch.subsec_millis(),
            random
        )
    }
}

/// Whether `id` has the exact shape [`new_backup_id`] gives: `b-`, 8 digits, `T`, 6 digits,
/// `Z-`, 8 lowercase hex digits.
pub fn is_generated_backup_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 27
        && b.starts_with(b"b-")
        && b[2..10].iter().all(u8::is_ascii_digit)
        && b[10] == b'T'
        && b[11..17].iter().all(u8::is_ascii_digit)
        && &b[17..19] == b"Z-"
        && b[19..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// `YYYYMMDDTHHMMSSZ` for a unix time, via the days-to-civil algorithm (proleptic Gregorian).
fn utc_timestamp(unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60
    )
}

/// Howard Hinnant's `civil_from_days`, for days since 1970-01-01 (unsigned: no dates before it).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of each 400-year era.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

pub(crate) fn random_u32(now_unix_secs: u64) -> u32 {
    let mut bytes = [0u8; 4];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_ok() {
        return u32::from_le_bytes(bytes);
    }
    // Without /dev/urandom (odd chroots) uniqueness still matters more than unpredictability.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut hasher = blake3::Hasher::new();
    hasher.update(&nanos.to_le_bytes());
    hasher.update(&now_unix_secs.to_le_bytes());
    hasher.update(&std::process::id().to_le_bytes());
    let hash = hasher.finalize();
    let h = hash.as_bytes();
    u32::from_le_bytes([h[0], h[1], h[2], h[3]])
}

fn readable_version(version: u32) -> bool {
    (OLDEST_READABLE_FORMAT_VERSION..=MANIFEST_FORMAT_VERSION).contains(&version)
}

/// Only `format_version` is read first, so a newer manifest (whose new fields
/// `deny_unknown_fields` would reject) reports its version instead of an unknown field.
#[derive(Deserialize)]
struct VersionProbe {
    format_version: u32,
}

impl BackupManifest {
    /// Every chunk the manifest needs read: those it lists, the deltas among their bases and
    /// the chunks those patch (ids may repeat).
    pub fn named_chunks(&self) -> impl Iterator<Item = &ChunkId> {
        self.chunks
            .iter()
            .flatten()
            .chain(self.delta_bases.keys())
            .chain(self.delta_bases.values())
    }

    pub fn to_json_bytes(&self) -> Vec<u8> {
        // Plain structs with string keys cannot fail to serialize.
        let mut bytes = serde_json::to_vec(self).expect("manifest serializes to JSON");
        bytes.push(b'\n');
        bytes
    }

    /// Parses and validates the manifest stored under `expected_id`.
    pub fn from_json_bytes(
        expected_id: &str,
        bytes: &[u8],
    ) -> Result<BackupManifest, ManifestError> {
        validate_backup_id(expected_id)?;
        let json_error = |e: serde_json::Error| ManifestError::Json {
            id: expected_id.to_owned(),
            reason: e.to_string(),
        };
        let probe: VersionProbe = serde_json::from_slice(bytes).map_err(json_error)?;
        if !readable_version(probe.format_version) {
            return Err(ManifestError::UnsupportedFormatVersion {
                id: expected_id.to_owned(),
                version: probe.format_version,
            });
        }
        let manifest: BackupManifest = serde_json::from_slice(bytes).map_err(json_error)?;
        manifest.validate(expected_id)?;
        Ok(manifest)
    }

    /// Every check `from_json_bytes` makes; also lets a writer check a manifest before upload.
    pub fn validate(&self, expected_id: &str) -> Result<(), ManifestError> {
        let id = || self.backup_id.clone();
        if !readable_version(self.format_version) {
            return Err(ManifestError::UnsupportedFormatVersion {
                id: id(),
                version: self.format_version,
            });
        }
        validate_backup_id(&self.backup_id)?;
        if self.backup_id != expected_id {
            return Err(ManifestError::IdMismatch {
                expected: expected_id.to_owned(),
                actual: id(),
            });
        }
        if let Some(parent) = &self.parent_backup_id {
            if validate_backup_id(parent).is_err() {
                return Err(ManifestError::InvalidParentId {
                    id: id(),
                    parent: parent.clone(),
                });
            }
        }
        if self.chunk_size_bytes != CHUNK_SIZE_BYTES {
            return Err(ManifestError::ChunkSize {
                id: id(),
                chunk_size_bytes: self.chunk_size_bytes,
            });
        }
        if self.size_bytes == 0 || !self.size_bytes.is_multiple_of(VOLUME_ALIGN_BYTES) {
            return Err(ManifestError::BadSize {
                id: id(),
                size_bytes: self.size_bytes,
            });
        }
        let expected_chunks = Self::chunk_count_for(self.size_bytes, self.chunk_size_bytes);
        if self.chunks.len() as u64 != expected_chunks {
            return Err(ManifestError::ChunkCount {
                id: id(),
                expected: expected_chunks,
                actual: self.chunks.len() as u64,
            });
        }
        for (chunk, at) in &self.packed {
            at.check().map_err(|reason| ManifestError::BadPackedChunk {
                id: id(),
                chunk: *chunk,
                reason,
            })?;
        }
        let digest = chunk_list_digest(&self.chunks);
        if !self.chunk_list_digest.eq_ignore_ascii_case(&digest) {
            return Err(ManifestError::DigestMismatch {
                id: id(),
                expected: self.chunk_list_digest.clone(),
                actual: digest,
            });
        }
        Ok(())
    }

    /// Number of chunks covering a volume; 0 for a zero chunk size rather than a panic.
    pub fn chunk_count_for(size_bytes: u64, chunk_size_bytes: u64) -> u64 {
        size_bytes.checked_div(chunk_size_bytes).map_or(0, |full| {
            full + u64::from(!size_bytes.is_multiple_of(chunk_size_bytes))
        })
    }

    /// Length of chunk `index`: the chunk size, less for the last chunk, 0 past the end.
    pub fn chunk_len_bytes(&self, index: u64) -> u64 {
        let start_bytes = index.saturating_mul(self.chunk_size_bytes);
        self.size_bytes
            .saturating_sub(start_bytes)
            .min(self.chunk_size_bytes)
    }
}

/// A valid manifest filed under `backup_id`, for tests elsewhere.
#[cfg(test)]
pub(crate) fn sample_for_test(backup_id: &str) -> BackupManifest {
    let mut manifest = tests::sample();
    manifest.backup_id = backup_id.to_owned();
    manifest
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const ID: &str = "b-20261202T054400Z-1a2b3c4d";

    pub(super) fn sample() -> BackupManifest {
        let size_bytes = 2 * CHUNK_SIZE_BYTES + 8192;
        let chunks = vec![
            Some(ChunkId::of(b"first")),
            None,
            Some(ChunkId::of(b"last")),
        ];
        BackupManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            backup_id: ID.to_owned(),
            volume_name: "vol0".to_owned(),
            volume_uuid: "5f0c3a9e-8f7d-4c1b-9a51-0d2f6e7b8c90".to_owned(),
            size_bytes,
            chunk_size_bytes: CHUNK_SIZE_BYTES,
            chunk_list_digest: chunk_list_digest(&chunks),
            delta_bases: chunks
                .iter()
                .flatten()
                .take(1)
                .map(|id| (*id, ChunkId::from_bytes([9; 32])))
                .collect(),
            packed: chunks
                .iter()
                .flatten()
                .take(1)
                .map(|id| {
                    let at = PackedAt {
                        pack: format!("{ID}-0000"),
                        offset_bytes: 4096,
                        len_bytes: 1234,
                    };
                    (*id, at)
                })
                .collect(),
            chunks,
            parent_backup_id: Some("b-20261201T000000Z-00000000".to_owned()),
            source_snapshot: format!("vbs-{ID}"),
            source_snapshot_created_unix_secs: 1_796_190_000,
            group_id: None,
            policy: None,
            created_unix_secs: 1_796_190_240,
            stats: BackupStats {
                full: false,
                data_chunks: 2,
                zero_chunks: 1,
                read_chunks: 1,
                new_chunks: 1,
                new_stored_bytes: 1234,
                read_bytes: 8192,
                duration_ms: 17,
                delta_chunks: 1,
                packs: 1,
            },
        }
    }

    #[test]
    fn version_1_manifests_without_deltas_still_read() {
        let bytes = json_with(|v| {
            v["format_version"] = 1.into();
            let map = v.as_object_mut().unwrap();
            map.remove("delta_bases");
            map.remove("packed");
            map["stats"].as_object_mut().unwrap().remove("delta_chunks");
            map["stats"].as_object_mut().unwrap().remove("packs");
        });
        let m = BackupManifest::from_json_bytes(ID, &bytes).unwrap();
        assert_eq!(m.format_version, 1);
        assert!(m.delta_bases.is_empty());
        assert_eq!(m.stats.delta_chunks, 0);
        // And the sample's delta map survives a round trip.
        let s = sample();
        assert_eq!(s.delta_bases.len(), 1);
        let back = BackupManifest::from_json_bytes(ID, &s.to_json_bytes()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn version_2_manifests_without_packs_still_read_and_bad_locations_are_refused() {
        let bytes = json_with(|v| {
            v["format_version"] = 2.into();
            let map = v.as_object_mut().unwrap();
            map.remove("packed");
            map["stats"].as_object_mut().unwrap().remove("packs");
        });
        let m = BackupManifest::from_json_bytes(ID, &bytes).unwrap();
        assert_eq!(m.format_version, 2);
        assert!(m.packed.is_empty());
        assert_eq!(m.delta_bases.len(), 1);
        let s = sample();
        assert_eq!(s.packed.len(), 1);
        for (field, value) in [
            ("pack", serde_json::json!("../../escape")),
            ("len_bytes", serde_json::json!(3)),
            ("offset_bytes", serde_json::json!(u64::MAX)),
        ] {
            let bytes = json_with(|v| {
                let packed = v["packed"].as_object_mut().unwrap();
                let at = packed.values_mut().next().unwrap();
                at[field] = value.clone();
            });
            let err = BackupManifest::from_json_bytes(ID, &bytes).unwrap_err();
            assert!(
                matches!(err, ManifestError::BadPackedChunk { .. }),
                "{field}: {err}"
            );
        }
    }

    fn json_with(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut value = serde_json::to_value(sample()).unwrap();
        edit(&mut value);
        serde_json::to_vec(&value).unwrap()
    }

    #[test]
    fn json_round_trip() {
        let manifest = sample();
        let bytes = manifest.to_json_bytes();
        assert_eq!(
            BackupManifest::from_json_bytes(ID, &bytes).unwrap(),
            manifest
        );
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["chunks"][1], serde_json::Value::Null);
        assert_eq!(value["chunks"][0], ChunkId::of(b"first").to_hex());
        assert_eq!(value["chunk_size_bytes"], 4_194_304);
        assert_eq!(value["stats"]["new_stored_bytes"], 1234);
    }

    #[test]
    fn newer_format_version_is_reported_as_such() {
        let bytes = json_with(|v| {
            v["format_version"] = 4.into();
            v["some_future_field"] = true.into();
        });
        let err = BackupManifest::from_json_bytes(ID, &bytes).unwrap_err();
        assert!(
            matches!(
                err,
                ManifestError::UnsupportedFormatVersion { version: 4, .. }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("unsupported format version 4"),
            "{err}"
        );
    }

    #[test]
    fn unknown_fields_and_bad_json_are_rejected() {
        for bytes in [
            json_with(|v| v["extra"] = 1.into()),
            json_with(|v| v["stats"]["extra"] = 1.into()),
            json_with(|v| v["chunks"][0] = "abcd".into()),
            b"{not json".to_vec(),
            Vec::new(),
        ] {
            let err = BackupManifest::from_json_bytes(ID, &bytes).unwrap_err();
            assert!(matches!(err, ManifestError::Json { .. }), "{err}");
            assert!(err.to_string().contains(ID), "{err}");
        }
    }

    #[test]
    fn id_mismatch_is_rejected() {
        let other = "b-20261202T054400Z-ffffffff";
        let err = BackupManifest::from_json_bytes(other, &sample().to_json_bytes()).unwrap_err();
        assert!(matches!(err, ManifestError::IdMismatch { .. }), "{err}");
        assert!(err.to_string().contains(other) && err.to_string().contains(ID));
    }

    #[test]
    fn wrong_chunk_size_is_rejected() {
        let bytes = json_with(|v| v["chunk_size_bytes"] = (1u64 << 20).into());
        let err = BackupManifest::from_json_bytes(ID, &bytes).unwrap_err();
        assert!(
            matches!(
                err,
                ManifestError::ChunkSize {
                    chunk_size_bytes: 1_048_576,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn bad_sizes_are_rejected() {
        for size in [0u64, 2 * CHUNK_SIZE_BYTES + 8191] {
            let bytes = json_with(|v| v["size_bytes"] = size.into());
            let err = BackupManifest::from_json_bytes(ID, &bytes).unwrap_err();
            assert!(
                matches!(err, ManifestError::BadSize { size_bytes, .. } if size_bytes == size),
                "{err}"
            );
        }
    }

    #[test]
    fn chunk_count_must_match_size() {
        let bytes = json_with(|v| v["size_bytes"] = (4 * CHUNK_SIZE_BYTES).into());
        let err = BackupManifest::from_json_bytes(ID, &bytes).unwrap_err();
        assert!(
            matches!(
                err,
                ManifestError::ChunkCount {
                    expected: 4,
                    actual: 3,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn digest_mismatch_is_rejected() {
        let bytes = json_with(|v| v["chunks"][1] = ChunkId::of(b"x").to_hex().into());
        let err = BackupManifest::from_json_bytes(ID, &bytes).unwrap_err();
        assert!(matches!(err, ManifestError::DigestMismatch { .. }), "{err}");
    }

    #[test]
    fn hostile_ids_are_rejected() {
        let long = "a".repeat(81);
        for bad in ["", "../x", "a/b", "b-1.json", "a b", "ü", long.as_str()] {
            assert!(validate_backup_id(bad).is_err(), "{bad:?}");
            let err = BackupManifest::from_json_bytes(bad, &sample().to_json_bytes()).unwrap_err();
            assert!(matches!(err, ManifestError::InvalidBackupId(_)), "{err}");
        }
        assert!(validate_backup_id(&"a".repeat(80)).is_ok());
        assert!(validate_backup_id(ID).is_ok());
        let mut hostile = sample();
        hostile.backup_id = "../x".to_owned();
        let err = BackupManifest::from_json_bytes("../x", &hostile.to_json_bytes()).unwrap_err();
        assert!(matches!(err, ManifestError::InvalidBackupId(_)), "{err}");
        let bytes = json_with(|v| v["parent_backup_id"] = "../../etc".into());
        let err = BackupManifest::from_json_bytes(ID, &bytes).unwrap_err();
        assert!(
            matches!(err, ManifestError::InvalidParentId { .. }),
            "{err}"
        );
    }

    #[test]
    fn digest_depends_on_every_entry() {
        let base = sample().chunks;
        let digest = chunk_list_digest(&base);
        assert_eq!(digest.len(), 64);
        assert_eq!(digest, chunk_list_digest(&base));
        let mut changed_id = base.clone();
        changed_id[2] = Some(ChunkId::of(b"other"));
        let mut zero_to_data = base.clone();
        zero_to_data[1] = Some(ChunkId::of(b"first"));
        let mut data_to_zero = base.clone();
        data_to_zero[0] = None;
        let digests = [
            chunk_list_digest(&changed_id),
            chunk_list_digest(&zero_to_data),
            chunk_list_digest(&data_to_zero),
            chunk_list_digest(&base[..2]),
        ];
        for (i, d) in digests.iter().enumerate() {
            assert_ne!(*d, digest, "variant {i}");
        }
        // One zero entry differs from an id whose first byte is zero (the flag byte separates them).
        assert_ne!(
            chunk_list_digest(&[None]),
            chunk_list_digest(&[Some(ChunkId::from_bytes([0; 32]))])
        );
    }

    #[test]
    fn keys() {
        assert_eq!(manifest_key(ID), format!("manifests/{ID}.json"));
        assert_eq!(parse_manifest_key(&manifest_key(ID)), Some(ID.to_owned()));
        assert_eq!(
            parse_manifest_key(&format!("backups/prod/manifests/{ID}.json")),
            Some(ID.to_owned())
        );
        for bad in [
            format!("{ID}.json"),
            format!("manifests/{ID}"),
            format!("manifests/{ID}.json.tmp"),
            format!("xmanifests/{ID}.json"),
            format!("chunks/{ID}.json"),
            "manifests/.json".to_owned(),
            "manifests/a.b.json".to_owned(),
        ] {
            assert_eq!(parse_manifest_key(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn utc_timestamps_match_date() {
        // Values from `date -u -d @N +%Y%m%dT%H%M%SZ`.
        for (secs, expected) in [
            (0, "19700101T000000Z"),
            (68_256, "19700101T185736Z"),
            (951_782_400, "20000229T000000Z"),
            (951_868_799, "20000229T235959Z"),
            (1_709_251_199, "20240229T235959Z"),
            (1_764_654_240, "20251202T054400Z"),
            (4_102_444_800, "21000101T000000Z"),
            (253_402_300_799, "99991231T235959Z"),
        ] {
            assert_eq!(utc_timestamp(secs), expected, "{secs}");
        }
    }

    #[test]
    fn new_ids_have_the_documented_form() {
        let id = new_backup_id(Duration::from_secs(1_764_654_240));
        assert_eq!(id.len(), "b-20251202T054400Z-".len() + 8);
        assert!(id.starts_with("b-20251202T054400Z-"), "{id}");
        let suffix = &id[id.len() - 8..];
        assert!(
            suffix
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{id}"
        );
        assert!(validate_backup_id(&id).is_ok());
        assert!(is_generated_backup_id(&id), "{id}");
        assert_ne!(
            new_backup_id(Duration::ZERO),
            new_backup_id(Duration::ZERO),
            "random suffix repeats"
        );
        // Made in one millisecond, as a server backup's members are, they all differ. (An
        // issuer of its own: tests running beside this one make ids of other milliseconds.)
        let issuer = IdIssuer::new();
        let burst: std::collections::HashSet<String> = (0..20_000)
            .map(|_| issuer.issue(Duration::from_millis(1_764_654_240_123)))
            .collect();
        assert_eq!(burst.len(), 20_000);
        // Within one second, ids sort by the millisecond.
        let mut ids: Vec<String> = [999, 0, 10, 500, 1, 998]
            .iter()
            .map(|ms| new_backup_id(Duration::from_millis(1_764_654_240_000 + ms)))
            .collect();
        let by_time: Vec<String> = {
            let mut order = [999, 0, 10, 500, 1, 998]
                .iter()
                .copied()
                .zip(ids.iter().cloned())
                .collect::<Vec<_>>();
            order.sort();
            order.into_iter().map(|(_, id)| id).collect()
        };
        ids.sort();
        assert_eq!(ids, by_time);
        for other in [
            "b-20251202T054400Z-0123abc",
            "b-20251202T054400Z-0123abcde",
            "b-20251202T054400Z-0123ABCD",
            "b-2025120xT054400Z-0123abcd",
            "c-20251202T054400Z-0123abcd",
            "b-20251202-054400Z-0123abcd",
            "mine",
            "",
        ] {
            assert!(!is_generated_backup_id(other), "{other:?}");
        }
    }

    #[test]
    fn chunk_geometry() {
        assert_eq!(BackupManifest::chunk_count_for(0, CHUNK_SIZE_BYTES), 0);
        assert_eq!(BackupManifest::chunk_count_for(4096, CHUNK_SIZE_BYTES), 1);
        assert_eq!(
            BackupManifest::chunk_count_for(CHUNK_SIZE_BYTES, CHUNK_SIZE_BYTES),
            1
        );
        assert_eq!(
            BackupManifest::chunk_count_for(CHUNK_SIZE_BYTES + 4096, CHUNK_SIZE_BYTES),
            2
        );
        assert_eq!(BackupManifest::chunk_count_for(4096, 0), 0);
        let m = sample();
        assert_eq!(m.chunk_len_bytes(0), CHUNK_SIZE_BYTES);
        assert_eq!(m.chunk_len_bytes(1), CHUNK_SIZE_BYTES);
        assert_eq!(m.chunk_len_bytes(2), 8192);
        assert_eq!(m.chunk_len_bytes(3), 0);
        assert_eq!(m.chunk_len_bytes(u64::MAX), 0);
    }
}
