//! Presents the volume registry to the handshake as NBD exports.

use evsd_proto::{meta::BASE_ALLOCATION, BlockSize, ExportCatalog, ExportInfo};

use crate::storage::{Registry, Volume};

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

pub fn export_info(volume: &Volume) -> ExportInfo {
    ExportInfo {
        name: volume.name().to_owned(),
        description: format!("evsd volume {}", volume.name()),
        size_bytes: volume.size_bytes(),
        read_only: false,
        rotational: false,
        fast_zero: volume.can_fast_zero(),
        block_size: BlockSize::default(),
        meta_contexts: vec![BASE_ALLOCATION.to_owned()],
    }
}

impl ExportCatalog for RegistryCatalog<'_> {
    fn export(&self, name: &str) -> Option<ExportInfo> {
        self.resolve(name).map(|v| export_info(&v))
    }

    fn list(&self) -> Vec<(String, String)> {
        self.registry
            .list()
            .iter()
            .map(|v| (v.name().to_owned(), export_info(v).description))
            .collect()
    }
}
