//! `evsctl server …`: servers (named groups of volumes) and their crash-consistent backups:
//! create, add-volume, remove-volume, list, show, delete, backup, backups, restore.

use std::thread::sleep;
use std::time::Duration;

use clap::Subcommand;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::backup_set::BackupSetInfo;
use crate::client::{AdminClient, Call};
use crate::error::CliError;
use crate::job::{job_table, jobs_in, JobSlot};
use crate::render::{fields, table, utc_time};
use crate::volume::missing;

/// A waited server backup's set is read again until the daemon has recorded it or given up (it
/// writes the set right after the last member's manifest, retrying a failing store for up to
/// 30 minutes before it marks the set failed): first this often, then at most once a second.
/// (Unit tests answer at once: they do not wait out the polls.)
const SETTLE_POLL_FIRST: Duration = Duration::from_millis(if cfg!(test) { 1 } else { 200 });
const SETTLE_POLL_MAX: Duration = Duration::from_millis(if cfg!(test) { 1 } else { 1000 });

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Create a server: a named group of volumes backed up together.
    Create {
        name: String,
        /// A member volume (repeat for more); a volume belongs to at most one server.
        #[arg(long = "volume", value_name = "VOL", required = true)]
        volumes: Vec<String>,
    },
    /// Add a volume to a server.
    AddVolume {
        name: String,
        #[arg(value_name = "VOL")]
        volume: String,
    },
    /// Remove a volume from a server (the volume and its backups stay).
    RemoveVolume {
        name: String,
        #[arg(value_name = "VOL")]
        volume: String,
    },
    /// List servers.
    List,
    /// Show one server.
    Show { name: String },
    /// Delete a server; its volumes and backups stay.
    Delete { name: String },
    /// Back up every volume of a server from the same instant, as one backup set.
    Backup {
        name: String,
        /// Read and hash every chunk instead of only those changed since the last backup.
        #[arg(long)]
        full: bool,
        /// Wait for the member jobs, drawing their progress on stderr; exit 7 if one fails.
        #[arg(long)]
        wait: bool,
    },
    /// List a server's backup sets, oldest first.
    Backups { name: String },
    /// Restore every member of a backup set: over the original volumes, or into new ones.
    Restore {
        #[arg(value_name = "SET_ID")]
        set_id: String,
        /// Restore into new volumes named VOLUME + SUFFIX instead of the originals (a suffix
        /// may start with '-': --to-new -restored).
        #[arg(long = "to-new", value_name = "SUFFIX", allow_hyphen_values = true,
              value_parser = parse_suffix)]
        to_new_suffix: Option<String>,
        /// Disconnect the original volumes' clients first instead of refusing.
        #[arg(long)]
        force: bool,
        /// Wait for the restore jobs, drawing their progress on stderr; exit 7 if one fails.
        #[arg(long)]
        wait: bool,
    },
}

impl ServerCommand {
    pub fn call(&self) -> Call {
        let (method, params) = match self {
            ServerCommand::Create { name, volumes } => {
                ("server.create", json!({"name": name, "volumes": volumes}))
            }
            ServerCommand::AddVolume { name, volume } => {
                ("server.add_volume", json!({"name": name, "volume": volume}))
            }
            ServerCommand::RemoveVolume { name, volume } => (
                "server.remove_volume",
                json!({"name": name, "volume": volume}),
            ),
            ServerCommand::List => ("server.list", json!({})),
            ServerCommand::Show { name } => ("server.show", json!({"name": name})),
            ServerCommand::Delete { name } => ("server.delete", json!({"name": name})),
            ServerCommand::Backup { name, full, .. } => {
                ("server.backup", json!({"name": name, "full": full}))
            }
            ServerCommand::Backups { name } => ("server.backups", json!({"name": name})),
            ServerCommand::Restore {
                set_id,
                to_new_suffix,
                force,
                ..
            } => {
                // Only a chosen suffix is sent.
                let mut params = json!({"set_id": set_id, "force": force});
                if let Some(suffix) = to_new_suffix {
                    params["to_new_suffix"] = json!(suffix);
                }
                ("server.restore", params)
            }
        };
        Call { method, params }
    }

    /// Where the result carries the jobs to wait for: a backup set's member jobs, or the
    /// restore's jobs.
    pub fn waits(&self) -> Option<JobSlot> {
        match self {
            ServerCommand::Backup { wait: true, .. }
            | ServerCommand::Restore { wait: true, .. } => Some(JobSlot::Jobs),
            _ => None,
        }
    }

    /// Whether, once its jobs all succeeded, the result is read again (`backup_set.show`) so it
    /// shows the recorded set rather than the running one.
    pub fn rereads_set(&self) -> bool {
        matches!(self, ServerCommand::Backup { wait: true, .. })
    }

    pub fn render(&self, result: &Value) -> Result<String, CliError> {
        Ok(match self {
            ServerCommand::Create { .. } => {
                let server = ServerInfo::parse(result)?;
                format!(
                    "created server {} with volumes {}\n",
                    server.name,
                    server.volumes.join(", ")
                )
            }
            ServerCommand::AddVolume { volume, .. } => {
                let server = ServerInfo::parse(result)?;
                format!(
                    "added volume {volume} to server {}: volumes {}\n",
                    server.name,
                    server.volume_list()
                )
            }
            ServerCommand::RemoveVolume { volume, .. } => {
                let server = ServerInfo::parse(result)?;
                format!(
                    "removed volume {volume} from server {}: volumes {}\n",
                    server.name,
                    server.volume_list()
                )
            }
            ServerCommand::List => {
                let rows = array(result, "servers")?
                    .iter()
                    .map(|s| ServerInfo::parse(s).map(|s| s.row()))
                    .collect::<Result<Vec<_>, CliError>>()?;
                table(&["NAME", "VOLUMES", "CREATED"], &rows)
            }
            ServerCommand::Show { .. } => ServerInfo::parse(result)?.fields(),
            ServerCommand::Delete { .. } => {
                let deleted = result["deleted"]
                    .as_str()
                    .ok_or_else(|| missing(result, "deleted"))?;
                format!("deleted server {deleted} (its volumes and backups stay)\n")
            }
            ServerCommand::Backup { .. } => BackupSetInfo::parse(result)?.details()?,
            ServerCommand::Backups { .. } => {
                let rows = array(result, "backup_sets")?
                    .iter()
                    .map(|s| BackupSetInfo::parse(s).map(|s| s.row()))
                    .collect::<Result<Vec<_>, CliError>>()?;
                table(
                    &["ID", "CREATED", "MEMBERS", "HOLD", "POLICY", "STATE"],
                    &rows,
                )
            }
            ServerCommand::Restore {
                set_id,
                to_new_suffix,
                ..
            } => {
                let target = match to_new_suffix {
                    Some(suffix) => format!("new volumes VOLUME{suffix}"),
                    None => "the original volumes".to_owned(),
                };
                format!(
                    "restore of backup set {set_id} to {target}:\n{}",
                    job_table(jobs_in(result, "jobs")?)?
                )
            }
        })
    }
}

/// `--to-new`: what a volume name may hold. Since the suffix may start with '-', a flag of this
/// command right after `--to-new` would be taken as the suffix: it is refused instead.
pub fn parse_suffix(arg: &str) -> Result<String, String> {
    const FLAGS: [&str; 5] = ["--force", "--wait", "--json", "--socket", "--help"];
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if FLAGS.iter().any(|flag| arg.starts_with(flag)) {
        Err(format!("missing SUFFIX before {arg}"))
    } else if arg.is_empty() || arg.len() > 63 || !arg.chars().all(allowed) {
        Err("expected 1-63 of [A-Za-z0-9._-], e.g. -restored".to_owned())
    } else {
        Ok(arg.to_owned())
    }
}

/// After a waited server backup whose jobs all succeeded: the set as `backup_set.show` describes
/// it once recorded, carrying the jobs' final state (`waited["jobs"]`) as the running set did.
pub fn settle_set(client: &mut AdminClient, waited: &Value) -> Result<Value, CliError> {
    let call = Call {
        method: "backup_set.show",
        params: json!({"id": BackupSetInfo::parse(waited)?.id}),
    };
    let mut poll = SETTLE_POLL_FIRST;
    let mut fresh = client.call(&call)?;
    // No bound of our own: the daemon's record retries end in "complete" or "failed".
    while BackupSetInfo::parse(&fresh)?.state == "running" {
        sleep(poll);
        poll = (poll * 2).min(SETTLE_POLL_MAX);
        fresh = client.call(&call)?;
    }
    // (serde reads a struct from an array too, so `fresh` may still not be an object.)
    match fresh.as_object_mut() {
        Some(set) => {
            set.insert("jobs".to_owned(), waited["jobs"].clone());
            Ok(fresh)
        }
        None => Err(CliError::Protocol(format!(
            "backup set {fresh} is not an object"
        ))),
    }
}

/// The failure of a settled server backup set that is not complete (None when it is).
pub fn set_failure(set: &Value) -> Result<Option<CliError>, CliError> {
    let info = BackupSetInfo::parse(set)?;
    if info.state == "complete" {
        return Ok(None);
    }
    let error = match (set["error"].as_str(), info.state.as_str()) {
        (Some(error), _) => error.to_owned(),
        (None, "running") => "its record was not made in time after its member jobs ended".into(),
        (None, _) => "no error given".into(),
    };
    Ok(Some(CliError::SetFailed {
        set_id: info.id,
        state: info.state,
        error,
    }))
}

/// The array under `key`, or a protocol error.
fn array<'a>(result: &'a Value, key: &str) -> Result<&'a Vec<Value>, CliError> {
    result[key].as_array().ok_or_else(|| missing(result, key))
}

/// A server as the daemon describes it.
#[derive(Debug, Deserialize)]
struct ServerInfo {
    name: String,
    volumes: Vec<String>,
    created_unix_secs: u64,
}

impl ServerInfo {
    fn parse(value: &Value) -> Result<ServerInfo, CliError> {
        ServerInfo::deserialize(value)
            .map_err(|e| CliError::Protocol(format!("server {value} is malformed: {e}")))
    }

    fn volume_list(&self) -> String {
        if self.volumes.is_empty() {
            "-".to_owned()
        } else {
            self.volumes.join(",")
        }
    }

    fn row(self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.volume_list(),
            utc_time(self.created_unix_secs),
        ]
    }

    fn fields(&self) -> String {
        fields(&[
            ("name", self.name.clone()),
            ("volumes", self.volume_list()),
            ("created", utc_time(self.created_unix_secs)),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup_set::tests::set;
    use crate::job::tests::sample;

    fn server(name: &str, volumes: &[&str]) -> Value {
        json!({"name": name, "volumes": volumes, "created_unix_secs": 1_700_000_000})
    }

    #[test]
    fn a_settled_set_that_is_not_complete_is_a_failure() {
        assert!(set_failure(&set("s-1", vec![])).unwrap().is_none());
        let mut failed = set("s-1", vec![]);
        failed["state"] = json!("failed");
        failed["error"] = json!("member manifest b-2 missing");
        let e = set_failure(&failed).unwrap().expect("a failure");
        assert_eq!(e.exit_code(), crate::error::exit::JOB_FAILED);
        assert_eq!(
            e.to_string(),
            "backup set s-1 is failed: member manifest b-2 missing"
        );
        let still_running = set("s-1", vec![json!({})]);
        let e = set_failure(&still_running).unwrap().expect("a failure");
        assert!(e.to_string().contains("not made in time"), "{e}");
        assert!(set_failure(&json!({"id": "s-1"})).is_err());
    }

    #[test]
    fn servers_render() {
        assert_eq!(
            ServerCommand::List
                .render(&json!({"servers": [server("web1", &["a", "b"]),
                                            server("db-primary", &[])]}))
                .unwrap(),
            "NAME        VOLUMES  CREATED\n\
             web1        a,b      2023-11-14 22:13:20 UTC\n\
             db-primary  -        2023-11-14 22:13:20 UTC\n"
        );
        assert!(ServerCommand::List.render(&json!({})).is_err());
        assert!(ServerCommand::List
            .render(&json!({"servers": [{"name": "web1"}]}))
            .is_err());
        let show = ServerCommand::Show {
            name: "web1".into(),
        };
        assert_eq!(
            show.render(&server("web1", &["a", "b"])).unwrap(),
            "name:    web1\nvolumes: a,b\ncreated: 2023-11-14 22:13:20 UTC\n"
        );
        let create = ServerCommand::Create {
            name: "web1".into(),
            volumes: vec!["a".into(), "b".into()],
        };
        assert_eq!(
            create.render(&server("web1", &["a", "b"])).unwrap(),
            "created server web1 with volumes a, b\n"
        );
        let add = ServerCommand::AddVolume {
            name: "web1".into(),
            volume: "c".into(),
        };
        assert_eq!(
            add.render(&server("web1", &["a", "b", "c"])).unwrap(),
            "added volume c to server web1: volumes a,b,c\n"
        );
        let remove = ServerCommand::RemoveVolume {
            name: "web1".into(),
            volume: "a".into(),
        };
        assert_eq!(
            remove.render(&server("web1", &[])).unwrap(),
            "removed volume a from server web1: volumes -\n"
        );
        let delete = ServerCommand::Delete {
            name: "web1".into(),
        };
        assert_eq!(
            delete.render(&json!({"deleted": "web1"})).unwrap(),
            "deleted server web1 (its volumes and backups stay)\n"
        );
        assert!(delete.render(&json!({})).is_err());
    }

    #[test]
    fn backup_sets_render() {
        let backups = ServerCommand::Backups {
            name: "web1".into(),
        };
        let mut nightly = set("s-2", vec![]);
        nightly["policy"] = json!("nightly");
        nightly["barrier_hold_us"] = json!(870);
        assert_eq!(
            backups
                .render(&json!({"backup_sets": [set("s-1", vec![]), nightly]}))
                .unwrap(),
            "ID   CREATED                  MEMBERS  HOLD     POLICY   STATE\n\
             s-1  2023-11-14 22:13:20 UTC  2        1.23 ms  -        complete\n\
             s-2  2023-11-14 22:13:20 UTC  2        0.87 ms  nightly  complete\n"
        );
        assert!(backups.render(&json!({"sets": []})).is_err());
        let backup = ServerCommand::Backup {
            name: "web1".into(),
            full: false,
            wait: false,
        };
        let out = backup
            .render(&set(
                "s-1",
                vec![
                    sample("j-1", "running", 0, 4),
                    sample("j-2", "running", 0, 4),
                ],
            ))
            .unwrap();
        assert!(out.starts_with("id:           s-1\n"), "{out}");
        assert!(out.contains("state:        running\n"));
        assert_eq!(out.matches("  running  ").count(), 2, "{out}");
    }

    #[test]
    fn restore_renders_its_jobs() {
        let mut restore = ServerCommand::Restore {
            set_id: "s-1".into(),
            to_new_suffix: Some("-r".into()),
            force: false,
            wait: false,
        };
        let mut job = sample("j-1", "running", 0, 4);
        job["kind"] = json!("restore");
        let result = json!({"jobs": [job]});
        let out = restore.render(&result).unwrap();
        assert!(
            out.starts_with("restore of backup set s-1 to new volumes VOLUME-r:\nID   KIND"),
            "{out}"
        );
        if let ServerCommand::Restore { to_new_suffix, .. } = &mut restore {
            *to_new_suffix = None;
        }
        assert!(restore
            .render(&result)
            .unwrap()
            .starts_with("restore of backup set s-1 to the original volumes:\n"));
        assert!(restore.render(&json!({})).is_err());
    }

    #[test]
    fn suffixes_are_name_characters_and_not_flags() {
        for ok in ["-r", "-restored", ".copy", "_2", "x"] {
            assert_eq!(parse_suffix(ok).unwrap(), ok);
        }
        for bad in [
            "",
            "--force",
            "--wait",
            "--json",
            "--socket=/x",
            "/x",
            "a@b",
            &"x".repeat(64),
        ] {
            assert!(parse_suffix(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn commands_become_calls_and_say_what_they_wait_for() {
        let restore = ServerCommand::Restore {
            set_id: "s-1".into(),
            to_new_suffix: None,
            force: true,
            wait: true,
        };
        assert_eq!(restore.call().method, "server.restore");
        assert_eq!(
            restore.call().params,
            json!({"set_id": "s-1", "force": true})
        );
        assert_eq!(restore.waits(), Some(JobSlot::Jobs));
        assert!(!restore.rereads_set());
        let restore = ServerCommand::Restore {
            set_id: "s-1".into(),
            to_new_suffix: Some("-copy".into()),
            force: false,
            wait: false,
        };
        assert_eq!(
            restore.call().params,
            json!({"set_id": "s-1", "force": false, "to_new_suffix": "-copy"})
        );
        assert_eq!(restore.waits(), None);
        let backup = ServerCommand::Backup {
            name: "web1".into(),
            full: true,
            wait: true,
        };
        assert_eq!(backup.call().params, json!({"name": "web1", "full": true}));
        assert_eq!(backup.waits(), Some(JobSlot::Jobs));
        assert!(backup.rereads_set());
        assert_eq!(
            JobSlot::Jobs
                .ids(&set("s-1", vec![sample("j-1", "running", 0, 1)]))
                .unwrap(),
            ["j-1"]
        );
        let create = ServerCommand::Create {
            name: "web1".into(),
            volumes: vec!["a".into()],
        };
        assert_eq!(
            create.call().params,
            json!({"name": "web1", "volumes": ["a"]})
        );
        assert_eq!(create.waits(), None);
        assert!(!create.rereads_set());
    }
}
