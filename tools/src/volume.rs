//! `evsctl volume …`: create (empty, from a snapshot or from a backup), list, show, resize,
//! delete.

use clap::{ArgGroup, Subcommand};
use serde_json::{json, Value};

use crate::backup::job_in;
use crate::client::Call;
use crate::error::CliError;
use crate::job::{JobSlot, JobState};
use crate::render::{fields, iec_size, table, utc_time};
use crate::snapshot::parse_snapshot_ref;

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a sparse volume, a clone of a snapshot, or a volume restored from a backup,
    /// exported at once.
    // Exactly one of --size / --from-snapshot / --from-backup: clap turns any other mix into a
    // usage error naming them.
    #[command(group = ArgGroup::new("source").required(true).args(["size", "from_snapshot", "from_backup"]))]
    Create {
        name: String,
        /// Size: bytes, or with a K/M/G/T suffix (e.g. 10G); a multiple of 4096.
        #[arg(long)]
        size: Option<String>,
        /// Clone snapshot SNAP of volume VOL: an independent volume of the snapshot's size.
        #[arg(long, value_name = "VOL@SNAP", value_parser = parse_snapshot_ref)]
        from_snapshot: Option<String>,
        /// Restore backup ID into the new volume (a restore job; see --wait).
        #[arg(long, value_name = "ID")]
        from_backup: Option<String>,
        /// Wait for the restore job, drawing its progress on stderr; exit 7 if it fails.
        // `requires` alone lets `--size 1G --wait` through (clap deems --from-backup's absence
        // fine since the group conflicts with --size), hence the explicit conflicts.
        #[arg(long, requires = "from_backup", conflicts_with_all = ["size", "from_snapshot"])]
        wait: bool,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show { name: String },
    /// Change a volume's size; clients see it when they reconnect.
    Resize {
        name: String,
        #[arg(long)]
        size: String,
        /// Allow a smaller size (discards the data past it; refused while clients are connected).
        #[arg(long)]
        allow_shrink: bool,
    },
    /// Delete a volume and its data.
    Delete {
        name: String,
        /// Disconnect connected clients first instead of refusing.
        #[arg(long)]
        force: bool,
    },
}

impl VolumeCommand {
    pub fn call(&self) -> Call {
        let (method, params) = match self {
            // Only the chosen key is sent: the daemon refuses a null `size`.
            VolumeCommand::Create {
                name,
                size,
                from_snapshot,
                from_backup,
                ..
            } => match (size, from_snapshot, from_backup) {
                (Some(size), _, _) => ("volume.create", json!({"name": name, "size": size})),
                (None, Some(from_snapshot), _) => (
                    "volume.create",
                    json!({"name": name, "from_snapshot": from_snapshot}),
                ),
                (None, None, from_backup) => (
                    "volume.create",
                    json!({"name": name, "from_backup": from_backup}),
                ),
            },
            VolumeCommand::List => ("volume.list", json!({})),
            VolumeCommand::Show { name } => ("volume.show", json!({"name": name})),
            VolumeCommand::Resize {
                name,
                size,
                allow_shrink,
            } => (
                "volume.resize",
                json!({"name": name, "size": size, "allow_shrink": allow_shrink}),
            ),
            VolumeCommand::Delete { name, force } => {
                ("volume.delete", json!({"name": name, "force": force}))
            }
        };
        Call { method, params }
    }

    /// Where the result carries the job to wait for, when this command waits.
    pub fn waits(&self) -> Option<JobSlot> {
        matches!(self, VolumeCommand::Create { wait: true, .. }).then_some(JobSlot::Job)
    }

    pub fn render(&self, result: &Value) -> Result<String, CliError> {
        Ok(match self {
            VolumeCommand::Create {
                from_snapshot,
                from_backup,
                ..
            } => {
                let created = format!(
                    "created volume {} ({})",
                    text(result, "name")?,
                    iec_size(number(result, "size_bytes")?)
                );
                match (from_snapshot, from_backup) {
                    (Some(source), _) => format!("{created} from snapshot {source}\n"),
                    (None, Some(backup)) => {
                        let job = job_in(result)?;
                        match job.state {
                            // The daemon deletes a volume whose restore did not succeed.
                            JobState::Failed | JobState::Cancelled => format!(
                                "volume {} not created: restore job {} from backup {backup} {}; the volume was deleted\n",
                                text(result, "name")?,
                                job.id,
                                job.state.as_str()
                            ),
                            _ => format!(
                                "{created} from backup {backup}: restore job {} {}\n",
                                job.id,
                                job.state.as_str()
                            ),
                        }
                    }
                    (None, None) => format!("{created}\n"),
                }
            }
            VolumeCommand::List => {
                let volumes = result["volumes"]
                    .as_array()
                    .ok_or_else(|| missing(result, "volumes"))?;
                let mut rows = volume_rows(volumes, &[])?;
                for (row, volume) in rows.iter_mut().zip(volumes) {
                    row.push(volume_state(volume).to_owned());
                    row.push(text(volume, "uuid")?.to_owned());
                }
                table(&["NAME", "SIZE", "CONNECTIONS", "STATE", "UUID"], &rows)
            }
            VolumeCommand::Show { .. } => {
                let size_bytes = number(result, "size_bytes")?;
                let mut pairs = vec![
                    ("name", text(result, "name")?.to_owned()),
                    (
                        "size",
                        format!("{} ({size_bytes} bytes)", iec_size(size_bytes)),
                    ),
                    ("connections", number(result, "connections")?.to_string()),
                    ("uuid", text(result, "uuid")?.to_owned()),
                    ("created", utc_time(number(result, "created_unix_secs")?)),
                ];
                let mark = &result["incomplete_restore"];
                if !mark.is_null() {
                    pairs.push((
                        "restore",
                        format!(
                            "incomplete: backup {} (job {}); refuses clients until a restore \
                             into it succeeds",
                            text(mark, "backup_id")?,
                            text(mark, "job_id")?
                        ),
                    ));
                }
                fields(&pairs)
            }
            VolumeCommand::Resize { .. } => format!(
                "resized volume {}: {} -> {}\n",
                text(result, "name")?,
                iec_size(number(result, "old_size_bytes")?),
                iec_size(number(result, "size_bytes")?)
            ),
            VolumeCommand::Delete { .. } => {
                let name = text(result, "name")?;
                match number(result, "disconnected")? {
                    0 => format!("deleted volume {name}\n"),
                    n => format!("deleted volume {name} (disconnected {n} client(s))\n"),
                }
            }
        })
    }
}

pub fn missing(result: &Value, key: &str) -> CliError {
    CliError::Protocol(format!("result {result} lacks {key:?}"))
}

pub fn text<'a>(result: &'a Value, key: &str) -> Result<&'a str, CliError> {
    result[key].as_str().ok_or_else(|| missing(result, key))
}

pub fn number(result: &Value, key: &str) -> Result<u64, CliError> {
    result[key].as_u64().ok_or_else(|| missing(result, key))
}

/// A volume's state in one word or two, from `volume.list`'s `closed_for` and
/// `incomplete_restore` (absent from older daemons: ready).
fn volume_state(volume: &Value) -> &'static str {
    match volume["closed_for"].as_str() {
        Some("restore") => "restoring",
        Some("rollback") => "rolling back",
        Some("shrink") => "shrinking",
        Some("deletion") => "deleting",
        _ if !volume["incomplete_restore"].is_null() => "incomplete restore",
        _ => "ready",
    }
}

/// Table rows for volumes as `volume.list` and `status` return them: name, size, connections,
/// then the text fields named in `extra`.
pub fn volume_rows(volumes: &[Value], extra: &[&str]) -> Result<Vec<Vec<String>>, CliError> {
    volumes
        .iter()
        .map(|v| {
            let mut row = vec![
                text(v, "name")?.to_owned(),
                iec_size(number(v, "size_bytes")?),
                number(v, "connections")?.to_string(),
            ];
            for key in extra {
                row.push(text(v, key)?.to_owned());
            }
            Ok(row)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_renders_a_table() {
        let mark = json!({"backup_id": "b-1", "job_id": "j-1", "started_unix_secs": 5});
        let result = json!({"volumes": [
            {"name": "vol0", "size_bytes": 1u64 << 30, "connections": 2, "uuid": "u-1", "created_unix_secs": 0,
             "incomplete_restore": null, "closed_for": null},
            {"name": "big-volume", "size_bytes": 4096, "connections": 0, "uuid": "u-2", "created_unix_secs": 0},
            {"name": "half", "size_bytes": 4096, "connections": 0, "uuid": "u-3", "created_unix_secs": 0,
             "incomplete_restore": mark, "closed_for": null},
            {"name": "filling", "size_bytes": 4096, "connections": 0, "uuid": "u-4", "created_unix_secs": 0,
             "incomplete_restore": mark, "closed_for": "restore"},
            {"name": "back", "size_bytes": 4096, "connections": 0, "uuid": "u-5", "created_unix_secs": 0,
             "incomplete_restore": null, "closed_for": "rollback"},
        ]});
        assert_eq!(
            VolumeCommand::List.render(&result).unwrap(),
            "NAME        SIZE     CONNECTIONS  STATE               UUID\n\
             vol0        1.0 GiB  2            ready               u-1\n\
             big-volume  4.0 KiB  0            ready               u-2\n\
             half        4.0 KiB  0            incomplete restore  u-3\n\
             filling     4.0 KiB  0            restoring           u-4\n\
             back        4.0 KiB  0            rolling back        u-5\n"
        );
        assert!(VolumeCommand::List.render(&json!({})).is_err());
    }

    #[test]
    fn show_names_an_incomplete_restore() {
        let show = VolumeCommand::Show { name: "v".into() };
        let mut result = json!({"name": "v", "size_bytes": 4096, "connections": 0,
                                "uuid": "u-1", "created_unix_secs": 0, "incomplete_restore": null});
        assert!(!show.render(&result).unwrap().contains("restore"));
        result["incomplete_restore"] =
            json!({"backup_id": "b-1", "job_id": "j-1", "started_unix_secs": 5});
        assert!(show.render(&result).unwrap().ends_with(
            "restore:     incomplete: backup b-1 (job j-1); refuses clients until a restore into it succeeds\n"
        ), "{}", show.render(&result).unwrap());
    }

    #[test]
    fn commands_become_calls() {
        let call = VolumeCommand::Resize {
            name: "v".into(),
            size: "2G".into(),
            allow_shrink: true,
        }
        .call();
        assert_eq!(call.method, "volume.resize");
        assert_eq!(
            call.params,
            json!({"name": "v", "size": "2G", "allow_shrink": true})
        );
    }

    #[test]
    fn create_sends_only_the_chosen_source() {
        let sized = VolumeCommand::Create {
            name: "v".into(),
            size: Some("1G".into()),
            from_snapshot: None,
            from_backup: None,
            wait: false,
        };
        assert_eq!(sized.call().params, json!({"name": "v", "size": "1G"}));
        let clone = VolumeCommand::Create {
            name: "v".into(),
            size: None,
            from_snapshot: Some("vol0@daily".into()),
            from_backup: None,
            wait: false,
        };
        assert_eq!(clone.call().method, "volume.create");
        assert_eq!(
            clone.call().params,
            json!({"name": "v", "from_snapshot": "vol0@daily"})
        );
        let result = json!({"name": "v", "size_bytes": 1u64 << 30, "connections": 0,
                            "uuid": "u-1", "created_unix_secs": 0});
        assert_eq!(
            clone.render(&result).unwrap(),
            "created volume v (1.0 GiB) from snapshot vol0@daily\n"
        );
        assert_eq!(
            sized.render(&result).unwrap(),
            "created volume v (1.0 GiB)\n"
        );
    }

    #[test]
    fn create_from_a_backup_carries_a_job() {
        let restore = VolumeCommand::Create {
            name: "v".into(),
            size: None,
            from_snapshot: None,
            from_backup: Some("b-1".into()),
            wait: true,
        };
        assert_eq!(
            restore.call().params,
            json!({"name": "v", "from_backup": "b-1"})
        );
        assert_eq!(restore.waits(), Some(JobSlot::Job));
        let mut result = json!({"name": "v", "size_bytes": 1u64 << 30, "connections": 0,
                                "uuid": "u-1", "created_unix_secs": 0,
                                "job": crate::job::tests::sample("j-1", "succeeded", 1, 1)});
        assert_eq!(
            restore.render(&result).unwrap(),
            "created volume v (1.0 GiB) from backup b-1: restore job j-1 succeeded\n"
        );
        // A failed restore's volume is gone: not reported as created.
        result["job"] = crate::job::tests::sample("j-1", "failed", 0, 1);
        assert_eq!(
            restore.render(&result).unwrap(),
            "volume v not created: restore job j-1 from backup b-1 failed; the volume was deleted\n"
        );
        result.as_object_mut().unwrap().remove("job");
        assert!(restore.render(&result).is_err());
    }
}
