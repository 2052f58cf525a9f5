//! `evsctl snapshot …`: create, list, delete, rollback.

use clap::Subcommand;
use serde_json::{json, Value};

use crate::client::Call;
use crate::error::CliError;
use crate::render::{iec_size, table, utc_time};
use crate::volume::{missing, number, text};

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a volume's current content (instant; holds every write acknowledged before it).
    Create {
        #[arg(value_name = "VOL")]
        volume: String,
        #[arg(value_name = "SNAP")]
        name: String,
    },
    /// List a volume's snapshots, oldest first.
    List {
        #[arg(value_name = "VOL")]
        volume: String,
    },
    /// Delete a snapshot; returns once its space has been reclaimed. Works online.
    Delete {
        #[arg(value_name = "VOL")]
        volume: String,
        #[arg(value_name = "SNAP")]
        name: String,
    },
    /// Give a volume a snapshot's content and size again; newer snapshots are kept.
    Rollback {
        #[arg(value_name = "VOL")]
        volume: String,
        #[arg(value_name = "SNAP")]
        name: String,
        /// Disconnect the volume's clients first instead of refusing.
        #[arg(long)]
        force: bool,
    },
}

impl SnapshotCommand {
    pub fn call(&self) -> Call {
        let (method, params) = match self {
            SnapshotCommand::Create { volume, name } => {
                ("snapshot.create", json!({"volume": volume, "name": name}))
            }
            SnapshotCommand::List { volume } => ("snapshot.list", json!({"volume": volume})),
            SnapshotCommand::Delete { volume, name } => {
                ("snapshot.delete", json!({"volume": volume, "name": name}))
            }
            SnapshotCommand::Rollback {
                volume,
                name,
                force,
            } => (
                "snapshot.rollback",
                json!({"volume": volume, "name": name, "force": force}),
            ),
        };
        Call { method, params }
    }

    pub fn render(&self, result: &Value) -> Result<String, CliError> {
        Ok(match self {
            SnapshotCommand::Create { .. } => format!(
                "created snapshot {}@{} ({})\n",
                text(result, "volume")?,
                text(result, "name")?,
                iec_size(number(result, "size_bytes")?)
            ),
            SnapshotCommand::List { .. } => {
                let snapshots = result["snapshots"]
                    .as_array()
                    .ok_or_else(|| missing(result, "snapshots"))?;
                table(
                    &["NAME", "CREATED", "SIZE", "OWN DATA"],
                    &snapshot_rows(snapshots)?,
                )
            }
            SnapshotCommand::Delete { .. } => format!(
                "deleted snapshot {}@{}\n",
                text(result, "volume")?,
                text(result, "name")?
            ),
            // The result describes the volume (volume.show's shape), so the snapshot's name
            // comes from the command line.
            SnapshotCommand::Rollback { name, .. } => format!(
                "rolled volume {} back to snapshot {name} ({})\n",
                text(result, "name")?,
                iec_size(number(result, "size_bytes")?)
            ),
        })
    }
}

/// Table rows for snapshots as `snapshot.list` returns them: name, creation time, size, and the
/// data held by the snapshot's own layer.
fn snapshot_rows(snapshots: &[Value]) -> Result<Vec<Vec<String>>, CliError> {
    snapshots
        .iter()
        .map(|s| {
            Ok(vec![
                text(s, "name")?.to_owned(),
                utc_time(number(s, "created_unix_secs")?),
                iec_size(number(s, "size_bytes")?),
                iec_size(number(s, "own_bytes")?),
            ])
        })
        .collect()
}

/// Checks a `--from-snapshot` value has the `VOL@SNAP` form before it goes to the daemon, so
/// a typo is a usage error (exit 2) with a hint rather than a round trip. The daemon still
/// checks the names themselves.
pub fn parse_snapshot_ref(arg: &str) -> Result<String, String> {
    match arg.split_once('@') {
        Some((volume, snapshot))
            if !volume.is_empty() && !snapshot.is_empty() && !snapshot.contains('@') =>
        {
            Ok(arg.to_owned())
        }
        _ => Err("expected VOL@SNAP, e.g. vol0@daily".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, created_unix_secs: u64, own_bytes: u64) -> Value {
        json!({"volume": "vol0", "name": name, "created_unix_secs": created_unix_secs,
               "size_bytes": 1u64 << 30, "own_bytes": own_bytes})
    }

    fn list() -> SnapshotCommand {
        SnapshotCommand::List {
            volume: "vol0".into(),
        }
    }

    #[test]
    fn list_renders_a_table_in_the_given_order() {
        let result = json!({"snapshots": [info("daily", 1_700_000_000, 0),
                                          info("before-upgrade", 1_700_086_400, 12 << 20)]});
        assert_eq!(
            list().render(&result).unwrap(),
            "NAME            CREATED                  SIZE     OWN DATA\n\
             daily           2023-11-14 22:13:20 UTC  1.0 GiB  0 B\n\
             before-upgrade  2023-11-15 22:13:20 UTC  1.0 GiB  12.0 MiB\n"
        );
        assert_eq!(
            list().render(&json!({"snapshots": []})).unwrap(),
            "NAME  CREATED  SIZE  OWN DATA\n"
        );
        assert!(list().render(&json!({})).is_err());
        // A snapshot lacking a field is a protocol error, not a row of blanks.
        let mut partial = info("daily", 0, 0);
        partial.as_object_mut().unwrap().remove("own_bytes");
        assert!(list().render(&json!({"snapshots": [partial]})).is_err());
    }

    #[test]
    fn single_results_render_one_line() {
        let create = SnapshotCommand::Create {
            volume: "vol0".into(),
            name: "daily".into(),
        };
        assert_eq!(
            create.render(&info("daily", 0, 0)).unwrap(),
            "created snapshot vol0@daily (1.0 GiB)\n"
        );
        let delete = SnapshotCommand::Delete {
            volume: "vol0".into(),
            name: "daily".into(),
        };
        assert_eq!(
            delete.render(&info("daily", 0, 0)).unwrap(),
            "deleted snapshot vol0@daily\n"
        );
        let rollback = SnapshotCommand::Rollback {
            volume: "vol0".into(),
            name: "daily".into(),
            force: false,
        };
        let volume = json!({"name": "vol0", "size_bytes": 512u64 << 20, "connections": 0,
                            "uuid": "u-1", "created_unix_secs": 0});
        assert_eq!(
            rollback.render(&volume).unwrap(),
            "rolled volume vol0 back to snapshot daily (512.0 MiB)\n"
        );
    }

    #[test]
    fn commands_become_calls() {
        let call = SnapshotCommand::Rollback {
            volume: "vol0".into(),
            name: "daily".into(),
            force: true,
        }
        .call();
        assert_eq!(call.method, "snapshot.rollback");
        assert_eq!(
            call.params,
            json!({"volume": "vol0", "name": "daily", "force": true})
        );
        let call = list().call();
        assert_eq!(call.method, "snapshot.list");
        assert_eq!(call.params, json!({"volume": "vol0"}));
    }

    #[test]
    fn snapshot_refs_need_one_at_between_two_names() {
        assert_eq!(parse_snapshot_ref("vol0@daily").unwrap(), "vol0@daily");
        for bad in ["vol0", "@daily", "vol0@", "@", "a@b@c", ""] {
            assert!(parse_snapshot_ref(bad).is_err(), "{bad:?} accepted");
        }
    }
}
