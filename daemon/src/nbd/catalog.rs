//! Presents the volume registry to the handshake as NBD exports.

use evsd_proto::{meta::BASE_ALLOCATION, BlockSize, ExportCatalog, ExportInfo};

use crate::storage::{Registry, StatusQuery, Volume};

/// The export a client gets when it asks for the default name "".
pub const DEFAULT_EXPORT: &str = "vol0";

pub struct RegistryCatalog<'a> {
    pub registry: &'a Registry,
}

impl RegistryCatalog<'_> {
    /// "" means `vol0`, or the only volume when there is exactly one.
    pub fn resolve(&self, name: &str) -> Option<std::sync::Arc<Volume>> {
        if !name.is_empty() {
            return self.registry.get(name);
        }
        if let Some(volume) = self.registry.get(DEFAULT_EXPORT) {
            return Some(volume);
        }
        let all = self.registry.list();
        match all.as_slice() {
            [only] => Some(only.clone()),
            _ => None,
        }
    }
}

/// `qemu:allocation-depth`: which layer of the export holds each block.
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// `qemu:dirty-bitmap:SNAP`: blocks changed since snapshot SNAP.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

pub fn export_info(volume: &Volume) -> ExportInfo {
    let mut meta_contexts = vec![BASE_ALLOCATION.to_owned(), ALLOCATION_DEPTH.to_owned()];
    meta_contexts.extend(
        volume
            .changed_since_names()
            .into_iter()
            .map(|snapshot| format!("{DIRTY_BITMAP_PREFIX}{snapshot}")),
    );
    let description = if volume.is_read_only() {
        format!("evsd snapshot {} (read-only)", volume.name())
    } else {
        format!("evsd volume {}", volume.name())
    };
    ExportInfo {
        name: volume.name().to_owned(),
        description,
        size_bytes: volume.size_bytes(),
        read_only: volume.is_read_only(),
        rotational: false,
        // Zeroing that may deallocate is a map update: always fast on a writable volume.
        fast_zero: !volume.is_read_only(),
        block_size: BlockSize::default(),
        meta_contexts,
    }
}

/// The storage query behind a metadata context name the catalog offers.
pub fn status_query(context: &str) -> Option<StatusQuery> {
    if context == BASE_ALLOCATION {
        Some(StatusQuery::Allocation)
    } else if context == ALLOCATION_DEPTH {
        Some(StatusQuery::Depth)
    } else {
        context
            .strip_prefix(DIRTY_BITMAP_PREFIX)
            .map(|snapshot| StatusQuery::ChangedSince(snapshot.to_owned()))
    }
}

impl ExportCatalog for RegistryCatalog<'_> {
    fn export(&self, name: &str) -> Option<ExportInfo> {
        self.resolve(name).map(|v| export_info(&v))
    }

    fn list(&self) -> Vec<(String, String)> {
        self.registry
            .exports()
            .iter()
            .map(|v| (v.name().to_owned(), export_info(v).description))
            .collect()
    }
}
