//! `evsctl policy …`: scheduled backups of volumes or servers with retention: create, list,
//! show, enable, disable, delete, run.

use clap::{ArgGroup, Subcommand};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::client::Call;
use crate::error::CliError;
use crate::render::{fields, table, utc_time};
use crate::volume::missing;

/// `LAST ERROR` cells are cut to this many characters (`policy show` prints the whole error).
const ERROR_COLUMN: usize = 40;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create a policy backing up volumes (or servers) on a schedule, keeping a bounded number
    /// of its backups. Times are UTC.
    // Exactly one schedule and exactly one kind of target: clap turns any other mix into a usage
    // error naming the flags.
    #[command(
        group = ArgGroup::new("schedule").required(true).multiple(false)
            .args(["every", "daily", "weekly"]),
        group = ArgGroup::new("target").required(true).multiple(false)
            .args(["volumes", "servers"]),
    )]
    Create {
        name: String,
        /// Run every DURATION: a number and s, m, h or d (30s, 15m, 6h, 1d).
        #[arg(long, value_name = "DURATION", value_parser = parse_every)]
        every: Option<String>,
        /// Run every day at HH:MM UTC.
        #[arg(long, value_name = "HH:MM", value_parser = parse_daily)]
        daily: Option<String>,
        /// Run on these days at HH:MM UTC, e.g. MON,THU@03:30.
        #[arg(long, value_name = "DAYS@HH:MM", value_parser = parse_weekly)]
        weekly: Option<String>,
        /// Keep at most N of this policy's backups (the newest always stays).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        keep: Option<u64>,
        /// Delete this policy's backups older than D days (the newest always stays).
        #[arg(long, value_name = "D", value_parser = clap::value_parser!(u64).range(1..))]
        keep_days: Option<u64>,
        /// Back up this volume (repeat for more).
        #[arg(long = "volume", value_name = "VOL")]
        volumes: Vec<String>,
        /// Back up this server as one backup set (repeat for more).
        #[arg(long = "server", value_name = "SERVER")]
        servers: Vec<String>,
    },
    /// List policies.
    List,
    /// Show one policy, with its last runs.
    Show { name: String },
    /// Let a policy run on its schedule again.
    Enable { name: String },
    /// Stop a policy's scheduled runs (`policy run` still works).
    Disable { name: String },
    /// Delete a policy; the backups it made stay.
    Delete { name: String },
    /// Run a policy now (in the background; `policy show` follows it).
    Run { name: String },
}

impl PolicyCommand {
    pub fn call(&self) -> Call {
        let (method, params) = match self {
            PolicyCommand::Create {
                name,
                every,
                daily,
                weekly,
                keep,
                keep_days,
                volumes,
                servers,
            } => {
                // Only the chosen keys are sent.
                let mut params = Map::new();
                params.insert("name".into(), json!(name));
                let schedules = [("every", every), ("daily", daily), ("weekly", weekly)];
                for (key, value) in schedules {
                    if let Some(value) = value {
                        params.insert(key.into(), json!(value));
                    }
                }
                if let Some(keep) = keep {
                    params.insert("keep".into(), json!(keep));
                }
                if let Some(keep_days) = keep_days {
                    params.insert("keep_days".into(), json!(keep_days));
                }
                if servers.is_empty() {
                    params.insert("volumes".into(), json!(volumes));
                } else {
                    params.insert("servers".into(), json!(servers));
                }
                ("policy.create", Value::Object(params))
            }
            PolicyCommand::List => ("policy.list", json!({})),
            PolicyCommand::Show { name } => ("policy.show", json!({"name": name})),
            PolicyCommand::Enable { name } => ("policy.enable", json!({"name": name})),
            PolicyCommand::Disable { name } => ("policy.disable", json!({"name": name})),
            PolicyCommand::Delete { name } => ("policy.delete", json!({"name": name})),
            PolicyCommand::Run { name } => ("policy.run", json!({"name": name})),
        };
        Call { method, params }
    }

    pub fn render(&self, result: &Value) -> Result<String, CliError> {
        Ok(match self {
            PolicyCommand::Create { .. } => {
                let policy = PolicyInfo::parse(result)?;
                format!(
                    "created policy {}: {}, {}; next run {}\n",
                    policy.name,
                    policy.schedule,
                    policy.targets(),
                    policy.next_run()
                )
            }
            PolicyCommand::List => {
                let policies = result["policies"]
                    .as_array()
                    .ok_or_else(|| missing(result, "policies"))?;
                let rows = policies
                    .iter()
                    .map(|p| PolicyInfo::parse(p).map(|p| p.row()))
                    .collect::<Result<Vec<_>, CliError>>()?;
                table(
                    &[
                        "NAME",
                        "SCHEDULE",
                        "TARGETS",
                        "KEEP",
                        "ENABLED",
                        "NEXT RUN",
                        "LAST SUCCESS",
                        "LAST ERROR",
                    ],
                    &rows,
                )
            }
            PolicyCommand::Show { .. } => PolicyInfo::parse(result)?.fields(),
            PolicyCommand::Enable { .. } => {
                let policy = PolicyInfo::parse(result)?;
                format!(
                    "enabled policy {}; next run {}\n",
                    policy.name,
                    policy.next_run()
                )
            }
            PolicyCommand::Disable { .. } => {
                format!("disabled policy {}\n", PolicyInfo::parse(result)?.name)
            }
            PolicyCommand::Delete { .. } => {
                let deleted = result["deleted"]
                    .as_str()
                    .ok_or_else(|| missing(result, "deleted"))?;
                format!("deleted policy {deleted} (its backups stay)\n")
            }
            PolicyCommand::Run { .. } => format!(
                "started a run of policy {} (see policy show)\n",
                PolicyInfo::parse(result)?.name
            ),
        })
    }
}

/// `--every`: a positive number followed by s, m, h or d.
pub fn parse_every(arg: &str) -> Result<String, String> {
    let digits = arg.strip_suffix(['s', 'm', 'h', 'd']).unwrap_or("");
    match digits.parse::<u64>() {
        Ok(n) if n > 0 && digits.bytes().all(|b| b.is_ascii_digit()) => Ok(arg.to_owned()),
        _ => Err("expected a positive number and s, m, h or d, e.g. 30s, 15m, 6h, 1d".to_owned()),
    }
}

/// `--daily`: `HH:MM`, 00:00 to 23:59.
pub fn parse_daily(arg: &str) -> Result<String, String> {
    if is_time_of_day(arg) {
        Ok(arg.to_owned())
    } else {
        Err("expected HH:MM (UTC), e.g. 02:00".to_owned())
    }
}

/// `--weekly`: `DAYS@HH:MM`, the days three-letter names (any case, sent upper case) without
/// repeats.
pub fn parse_weekly(arg: &str) -> Result<String, String> {
    const DAYS: [&str; 7] = ["MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];
    let hint = || "expected DAYS@HH:MM (UTC), e.g. MON,THU@03:30".to_owned();
    let (days, time) = arg.split_once('@').ok_or_else(hint)?;
    let days: Vec<String> = days.split(',').map(str::to_ascii_uppercase).collect();
    let known = days.iter().all(|d| DAYS.contains(&d.as_str()));
    let distinct = days.iter().enumerate().all(|(i, d)| !days[..i].contains(d));
    if known && distinct && is_time_of_day(time) {
        Ok(format!("{}@{time}", days.join(",")))
    } else {
        Err(hint())
    }
}

fn is_time_of_day(text: &str) -> bool {
    let two_digits = |s: &str, max: u32| {
        s.len() == 2
            && s.bytes().all(|b| b.is_ascii_digit())
            && s.parse().is_ok_and(|n: u32| n <= max)
    };
    matches!(text.split_once(':'), Some((h, m)) if two_digits(h, 23) && two_digits(m, 59))
}

/// A policy as the daemon describes it.
#[derive(Debug, Deserialize)]
struct PolicyInfo {
    name: String,
    schedule: String,
    #[serde(default)]
    keep: Option<u64>,
    #[serde(default)]
    keep_days: Option<u64>,
    volumes: Vec<String>,
    servers: Vec<String>,
    enabled: bool,
    created_unix_secs: u64,
    #[serde(default)]
    next_run_unix_secs: Option<u64>,
    running: bool,
    #[serde(default)]
    last_run_unix_secs: Option<u64>,
    #[serde(default)]
    last_success_unix_secs: Option<u64>,
    #[serde(default)]
    last_failure_unix_secs: Option<u64>,
    #[serde(default)]
    last_error: Option<String>,
    backups_kept: u64,
}

impl PolicyInfo {
    fn parse(value: &Value) -> Result<PolicyInfo, CliError> {
        PolicyInfo::deserialize(value)
            .map_err(|e| CliError::Protocol(format!("policy {value} is malformed: {e}")))
    }

    /// `volumes a,b` or `server web1`.
    fn targets(&self) -> String {
        let (kind, names) = if self.servers.is_empty() {
            ("volume", &self.volumes)
        } else {
            ("server", &self.servers)
        };
        let plural = if names.len() == 1 { "" } else { "s" };
        format!("{kind}{plural} {}", names.join(","))
    }

    /// `3`, `7d`, `3, 7d`, or `all` without retention.
    fn keep(&self) -> String {
        match (self.keep, self.keep_days) {
            (Some(n), Some(d)) => format!("{n}, {d}d"),
            (Some(n), None) => n.to_string(),
            (None, Some(d)) => format!("{d}d"),
            (None, None) => "all".to_owned(),
        }
    }

    fn next_run(&self) -> String {
        if self.running {
            "running now".to_owned()
        } else {
            time_or_dash(self.next_run_unix_secs)
        }
    }

    fn row(self) -> Vec<String> {
        let error = self.last_error.as_deref().map_or("-".to_owned(), truncate);
        vec![
            self.name.clone(),
            self.schedule.clone(),
            self.targets(),
            self.keep(),
            yes_no(self.enabled),
            self.next_run(),
            time_or_dash(self.last_success_unix_secs),
            error,
        ]
    }

    fn fields(&self) -> String {
        fields(&[
            ("name", self.name.clone()),
            ("schedule", self.schedule.clone()),
            ("targets", self.targets()),
            ("keep", self.keep.map_or("-".to_owned(), |n| n.to_string())),
            (
                "keep days",
                self.keep_days.map_or("-".to_owned(), |d| d.to_string()),
            ),
            ("enabled", yes_no(self.enabled)),
            ("running", yes_no(self.running)),
            ("created", utc_time(self.created_unix_secs)),
            ("next run", time_or_dash(self.next_run_unix_secs)),
            ("last run", time_or_dash(self.last_run_unix_secs)),
            ("last success", time_or_dash(self.last_success_unix_secs)),
            ("last failure", time_or_dash(self.last_failure_unix_secs)),
            (
                "last error",
                self.last_error.clone().unwrap_or_else(|| "-".to_owned()),
            ),
            ("backups kept", self.backups_kept.to_string()),
        ])
    }
}

fn time_or_dash(unix_secs: Option<u64>) -> String {
    unix_secs.map_or("-".to_owned(), utc_time)
}

fn yes_no(flag: bool) -> String {
    if flag { "yes" } else { "no" }.to_owned()
}

/// At most [`ERROR_COLUMN`] characters, the last one `…` when cut; on one line.
fn truncate(text: &str) -> String {
    let text = text.replace('\n', " ");
    if text.chars().count() <= ERROR_COLUMN {
        return text;
    }
    let mut cut: String = text.chars().take(ERROR_COLUMN - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str) -> Value {
        json!({"name": name, "schedule": "daily 02:00", "keep": 7, "keep_days": null,
               "volumes": ["vol0", "vol1"], "servers": [], "enabled": true,
               "created_unix_secs": 1_700_000_000, "next_run_unix_secs": 1_700_086_400,
               "running": false, "last_run_unix_secs": null, "last_success_unix_secs": null,
               "last_failure_unix_secs": null, "last_error": null, "backups_kept": 0})
    }

    #[test]
    fn list_renders_a_table() {
        let mut failing = policy("web");
        failing["schedule"] = json!("every 30s");
        failing["volumes"] = json!([]);
        failing["servers"] = json!(["web1"]);
        failing["keep"] = json!(3);
        failing["keep_days"] = json!(14);
        failing["enabled"] = json!(false);
        failing["next_run_unix_secs"] = json!(null);
        failing["last_success_unix_secs"] = json!(1_700_000_000);
        failing["last_error"] =
            json!("backup store unreachable: connection refused (os error 111)");
        let mut running = policy("now");
        running["running"] = json!(true);
        running["keep"] = json!(null);
        running["volumes"] = json!(["vol2"]);
        let result = json!({"policies": [policy("nightly"), failing, running]});
        assert_eq!(
            PolicyCommand::List.render(&result).unwrap(),
            "NAME     SCHEDULE     TARGETS            KEEP    ENABLED  NEXT RUN                 \
             LAST SUCCESS             LAST ERROR\n\
             nightly  daily 02:00  volumes vol0,vol1  7       yes      2023-11-15 22:13:20 UTC  \
             -                        -\n\
             web      every 30s    server web1        3, 14d  no       -                        \
             2023-11-14 22:13:20 UTC  backup store unreachable: connection re…\n\
             now      daily 02:00  volume vol2        all     yes      running now              \
             -                        -\n"
        );
        assert!(PolicyCommand::List.render(&json!({})).is_err());
        let mut partial = policy("p");
        partial.as_object_mut().unwrap().remove("enabled");
        assert!(matches!(
            PolicyCommand::List.render(&json!({"policies": [partial]})),
            Err(CliError::Protocol(_))
        ));
    }

    #[test]
    fn show_and_single_results() {
        let mut failed = policy("nightly");
        failed["last_failure_unix_secs"] = json!(1_700_000_000);
        failed["last_error"] = json!("volume \"vol1\" not found");
        failed["backups_kept"] = json!(5);
        let show = PolicyCommand::Show {
            name: "nightly".into(),
        }
        .render(&failed)
        .unwrap();
        assert!(show.starts_with("name:         nightly\nschedule:     daily 02:00\n"));
        assert!(show.contains("targets:      volumes vol0,vol1\n"), "{show}");
        assert!(
            show.contains("keep:         7\nkeep days:    -\n"),
            "{show}"
        );
        assert!(show.contains("last failure: 2023-11-14 22:13:20 UTC\n"));
        assert!(show.contains("last error:   volume \"vol1\" not found\n"));
        assert!(show.ends_with("backups kept: 5\n"));
        let name = || "nightly".to_owned();
        assert_eq!(
            PolicyCommand::Enable { name: name() }
                .render(&policy("nightly"))
                .unwrap(),
            "enabled policy nightly; next run 2023-11-15 22:13:20 UTC\n"
        );
        assert_eq!(
            PolicyCommand::Disable { name: name() }
                .render(&policy("nightly"))
                .unwrap(),
            "disabled policy nightly\n"
        );
        assert_eq!(
            PolicyCommand::Delete { name: name() }
                .render(&json!({"deleted": "nightly"}))
                .unwrap(),
            "deleted policy nightly (its backups stay)\n"
        );
        assert_eq!(
            PolicyCommand::Run { name: name() }
                .render(&policy("nightly"))
                .unwrap(),
            "started a run of policy nightly (see policy show)\n"
        );
        assert!(PolicyCommand::Run { name: name() }
            .render(&json!({"name": "nightly"}))
            .is_err());
    }

    #[test]
    fn schedules_are_checked_before_sending() {
        for ok in ["30s", "15m", "6h", "1d", "90s"] {
            assert_eq!(parse_every(ok).unwrap(), ok);
        }
        for bad in ["", "s", "0s", "30", "1w", "-5m", "+5m", "1.5h", "30 s"] {
            assert!(parse_every(bad).is_err(), "{bad:?} accepted");
        }
        for ok in ["00:00", "02:00", "23:59"] {
            assert_eq!(parse_daily(ok).unwrap(), ok);
        }
        for bad in ["2:00", "24:00", "12:60", "12", "12:00:00", "ab:cd", ""] {
            assert!(parse_daily(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_weekly("MON,THU@03:30").unwrap(), "MON,THU@03:30");
        assert_eq!(parse_weekly("sun@23:59").unwrap(), "SUN@23:59");
        for bad in [
            "MON",
            "@03:30",
            "MON,@03:30",
            "MON,MON@03:30",
            "MONDAY@03:30",
            "MON@3:30",
        ] {
            assert!(parse_weekly(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(truncate("short"), "short");
        assert_eq!(truncate(&"x".repeat(50)).chars().count(), ERROR_COLUMN);
    }
}
