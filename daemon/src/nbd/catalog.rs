//! Presents the volume registry to the handshake as NBD exports.

use evsd_proto::{meta::BASE_ALLOCATION, BlockSize, ExportCatalog, ExportInfo, ExportRefusal};

use crate::access::{AccessStore, ClientIdentity, Decision};
use crate::metrics::{Limit, Metrics};
use crate::storage::attachments::Closure;
use crate::storage::{Registry, StatusQuery, Volume};

/// The export a client gets when it asks for the default name "".
pub const DEFAULT_EXPORT: &str = "vol0";

/// The exports as one client sees them: only those its access rules let it open.
pub struct RegistryCatalog<'a> {
    pub registry: &'a Registry,
    pub access: &'a AccessStore,
    pub client: &'a ClientIdentity,
    pub metrics: &'a Metrics,
    pub peer: &'a str,
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
    ExportInfo {
        name: volume.name().to_owned(),
        description: description(volume),
        size_bytes: volume.size_bytes(),
        read_only: volume.is_read_only(),
        rotational: false,
        // Zeroing that may deallocate is a map update: always fast on a writable volume.
        fast_zero: !volume.is_read_only(),
        block_size: BlockSize::default(),
        meta_contexts,
    }
}

/// The export's description (NBD_INFO_DESCRIPTION, and LIST's, which needs nothing else).
fn description(volume: &Volume) -> String {
    if volume.is_read_only() {
        format!("evsd snapshot {} (read-only)", volume.name())
    } else {
        format!("evsd volume {}", volume.name())
    }
}

/// The storage query behind a metadata context name the catalog offers, on `volume` as it is
/// now: a dirty bitmap means the snapshot of that name the volume has now, for as long as the
/// connection lasts.
pub fn status_query(context: &str, volume: &Volume) -> Option<StatusQuery> {
    if context == BASE_ALLOCATION {
        Some(StatusQuery::Allocation)
    } else if context == ALLOCATION_DEPTH {
        Some(StatusQuery::Depth)
    } else {
        context
            .strip_prefix(DIRTY_BITMAP_PREFIX)
            .map(|snapshot| volume.changed_since(snapshot))
    }
}

/// The refusal for a client asking for an export closed for `closure`: a deleted one is
/// unknown; one a restore, rollback or shrink has closed is refused for now, with the reason.
pub fn closed_refusal(name: &str, closure: Closure) -> ExportRefusal {
    match closure {
        Closure::Deletion => ExportRefusal::Unknown,
        closure => ExportRefusal::Policy(format!(
            "volume {name:?} is being {}: {}",
            closure.doing(),
            closure.advice()
        )),
    }
}

impl RegistryCatalog<'_> {
    /// The export as this client may open it, or why not.
    fn admit(&self, volume: &Volume) -> Result<ExportInfo, ExportRefusal> {
        let (policy, _) = self.access.policy(volume.name());
        let read_only = match policy.decide(self.client) {
            Decision::Allow { read_only } => read_only,
            Decision::NeedsTls => return Err(ExportRefusal::TlsRequired),
            Decision::Deny => return Err(ExportRefusal::Unknown),
        };
        if let Some(mark) = volume.restore_mark() {
            return Err(ExportRefusal::Policy(mark.refusal(volume.name())));
        }
        // Checked again when the connection attaches; here for a clear refusal.
        if let Some(closure) = volume.attachments().closure() {
            return Err(closed_refusal(volume.name(), closure));
        }
        if let Some(max) = policy.max_connections {
            // Checked again, atomically, when the connection attaches; this check only gives
            // the client a clear refusal instead of a dropped connection.
            if volume.attachments().count() >= max as usize {
                self.metrics.limit_hit(Limit::VolumeConnections, self.peer);
                return Err(ExportRefusal::Policy(format!(
                    "connection limit of {max} reached"
                )));
            }
        }
        let mut info = export_info(volume);
        if read_only && !info.read_only {
            info.read_only = true;
            info.fast_zero = false;
            info.description.push_str(" (read-only for you)");
        }
        Ok(info)
    }
}

impl ExportCatalog for RegistryCatalog<'_> {
    fn export(&self, name: &str) -> Result<ExportInfo, ExportRefusal> {
        let volume = self.resolve(name).ok_or(ExportRefusal::Unknown)?;
        self.admit(&volume)
    }

    fn list(&self) -> Vec<(String, String)> {
        self.registry
            .exports()
            .iter()
            .filter(|v| {
                matches!(
                    self.access.decide(v.name(), self.client),
                    Decision::Allow { .. }
                )
            })
            .map(|v| (v.name().to_owned(), description(v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_export_is_unknown_only_when_deleted() {
        assert_eq!(
            closed_refusal("v", Closure::Deletion),
            ExportRefusal::Unknown
        );
        for (closure, says) in [
            (Closure::Restore, "being restored: wait for its restore job"),
            (
                Closure::Rollback,
                "being rolled back to a snapshot: try again",
            ),
            (Closure::Shrink, "being shrunk: try again"),
        ] {
            match closed_refusal("v", closure) {
                ExportRefusal::Policy(message) => {
                    assert!(message.contains(says), "{closure:?}: {message}")
                }
                other => panic!("{closure:?}: {other:?}"),
            }
        }
    }
}
