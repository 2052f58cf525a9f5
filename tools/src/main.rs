//! evsctl: the operator's command line for evsd. It speaks only the admin protocol over the
//! daemon's admin Unix socket.
//!
//! Adding a noun (snapshot, backup, …): a module with its clap subcommand enum, a `call()`
//! building the admin request and a `render()` for human output, plus one arm in [`Command`].
//! A command that starts jobs and waits for them also says where its result carries them
//! (`waits()`): [`run`] then polls them to the end and renders the result with their final state.

mod backup;
mod client;
mod error;
mod job;
mod progress;
mod render;
mod snapshot;
mod status;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::backup::BackupCommand;
use crate::client::{AdminClient, Call};
use crate::error::CliError;
use crate::job::{JobCommand, JobInfo, JobSlot};
use crate::progress::Waiter;
use crate::snapshot::SnapshotCommand;
use crate::volume::VolumeCommand;

#[derive(Debug, Parser)]
#[command(
    name = "evsctl",
    version,
    about = "Manage an evsd daemon through its admin socket"
)]
struct Cli {
    /// The daemon's admin socket.
    #[arg(long, default_value = "./evs-data/admin.sock", global = true)]
    socket: PathBuf,

    /// Print the daemon's JSON result unchanged (after --wait: with the jobs' final state).
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Manage a volume's snapshots (exported read-only as VOL@SNAP).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Back volumes up to the backup store, list, verify and restore backups.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Follow the daemon's background jobs (backups, restores, verifies).
    #[command(subcommand)]
    Job(JobCommand),
    /// Show the daemon's version, uptime, listeners and volumes.
    Status,
}

impl Command {
    fn call(&self) -> Call {
        match self {
            Command::Volume(command) => command.call(),
            Command::Snapshot(command) => command.call(),
            Command::Backup(command) => command.call(),
            Command::Job(command) => command.call(),
            Command::Status => status::call(),
        }
    }

    /// Where the first call's result carries the jobs to wait for, when the command waits.
    fn waits(&self) -> Option<JobSlot> {
        match self {
            Command::Volume(command) => command.waits(),
            Command::Backup(command) => command.waits(),
            Command::Job(command) => command.waits(),
            Command::Snapshot(_) | Command::Status => None,
        }
    }

    /// Failures a successful call can still carry (a verify's bad chunks).
    fn problems(&self, result: &Value) -> Result<Vec<CliError>, CliError> {
        match self {
            Command::Backup(command) => command.problems(result),
            _ => Ok(Vec::new()),
        }
    }

    fn render(&self, result: &Value) -> Result<String, CliError> {
        match self {
            Command::Volume(command) => command.render(result),
            Command::Snapshot(command) => command.render(result),
            Command::Backup(command) => command.render(result),
            Command::Job(command) => command.render(result),
            Command::Status => status::render(result),
        }
    }
}

/// What a command printed, and the failures (waited jobs that failed, bad chunks) it still
/// exits non-zero for.
struct Outcome {
    output: String,
    failures: Vec<CliError>,
}

fn main() -> ExitCode {
    // Usage errors exit with 2, which is also our "invalid argument" code.
    let cli = Cli::parse();
    match run(&cli) {
        Ok(Outcome { output, failures }) => {
            print!("{output}");
            for failure in &failures {
                eprintln!("evsctl: {failure}");
            }
            failures
                .first()
                .map_or(ExitCode::SUCCESS, |f| ExitCode::from(f.exit_code()))
        }
        Err(e) => {
            eprintln!("evsctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(cli: &Cli) -> Result<Outcome, CliError> {
    let mut client = AdminClient::connect(&cli.socket)?;
    let mut result = client.call(&cli.command.call())?;
    let mut failures = Vec::new();
    if let Some(slot) = cli.command.waits() {
        let ids = slot.ids(&result)?;
        let finals = Waiter::for_stderr().wait(&mut client, &ids, &mut std::io::stderr())?;
        for job in &finals {
            failures.extend(JobInfo::parse(job)?.failure());
        }
        // The output has the shape it has without waiting, with the jobs' final state.
        slot.replace(&mut result, finals)?;
    }
    failures.extend(cli.command.problems(&result)?);
    let output = if cli.json {
        let text = serde_json::to_string_pretty(&result)
            .map_err(|e| CliError::Protocol(format!("re-encoding the result failed: {e}")))?;
        format!("{text}\n")
    } else {
        cli.command.render(&result)?
    };
    Ok(Outcome { output, failures })
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;

    use super::*;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("evsctl").chain(args.split_whitespace()))
    }

    #[test]
    fn volume_create_takes_exactly_one_source() {
        assert!(parse("volume create v --size 1G").is_ok());
        assert!(parse("volume create v --from-snapshot vol0@daily").is_ok());
        for (args, kind) in [
            ("volume create v", ErrorKind::MissingRequiredArgument),
            (
                "volume create v --size 1G --from-snapshot vol0@daily",
                ErrorKind::ArgumentConflict,
            ),
            (
                "volume create v --from-snapshot vol0",
                ErrorKind::ValueValidation,
            ),
        ] {
            let error = parse(args).expect_err(args);
            assert_eq!(error.kind(), kind, "{args}");
            assert_eq!(error.exit_code(), 2, "{args}");
        }
    }

    #[test]
    fn snapshot_commands_parse() {
        let cli = parse("--json snapshot rollback vol0 daily --force").unwrap();
        assert!(cli.json);
        assert_eq!(cli.command.call().method, "snapshot.rollback");
        assert_eq!(cli.command.call().params["force"], true);
        assert!(parse("snapshot create vol0").is_err());
        assert!(parse("snapshot list").is_err());
    }

    #[test]
    fn volume_create_from_a_backup() {
        let cli = parse("volume create v --from-backup b-1 --wait").unwrap();
        assert_eq!(
            cli.command.call().params,
            serde_json::json!({"name": "v", "from_backup": "b-1"})
        );
        assert_eq!(cli.command.waits(), Some(JobSlot::Job));
        assert_eq!(
            parse("volume create v --from-backup b-1")
                .unwrap()
                .command
                .waits(),
            None
        );
        for (args, kind) in [
            (
                "volume create v --size 1G --from-backup b-1",
                ErrorKind::ArgumentConflict,
            ),
            (
                "volume create v --from-snapshot vol0@daily --from-backup b-1",
                ErrorKind::ArgumentConflict,
            ),
            (
                "volume create v --size 1G --wait",
                ErrorKind::ArgumentConflict,
            ),
            (
                "volume create v --from-snapshot vol0@daily --wait",
                ErrorKind::ArgumentConflict,
            ),
            ("volume create v --wait", ErrorKind::MissingRequiredArgument),
            ("volume create v --from-backup", ErrorKind::InvalidValue),
        ] {
            let error = parse(args).expect_err(args);
            assert_eq!(error.kind(), kind, "{args}");
            assert_eq!(error.exit_code(), 2, "{args}");
        }
    }

    #[test]
    fn backup_commands_parse() {
        for (args, method, waits) in [
            ("backup create vol0", "backup.create", None),
            (
                "backup create vol0 vol1 --full --wait",
                "backup.create",
                Some(JobSlot::Jobs),
            ),
            ("backup list", "backup.list", None),
            ("backup list --volume vol0", "backup.list", None),
            ("backup show b-1", "backup.show", None),
            ("backup delete b-1", "backup.delete", None),
            ("backup gc", "backup.gc", None),
            ("backup verify b-1", "backup.verify", Some(JobSlot::Job)),
            ("backup restore b-1 --to vol1", "backup.restore", None),
            (
                "--json backup restore b-1 --to vol1 --force --wait",
                "backup.restore",
                Some(JobSlot::Job),
            ),
        ] {
            let cli = parse(args).expect(args);
            assert_eq!(cli.command.call().method, method, "{args}");
            assert_eq!(cli.command.waits(), waits, "{args}");
        }
        let cli = parse("backup create vol0 vol1 --full").unwrap();
        assert_eq!(
            cli.command.call().params,
            serde_json::json!({"volumes": ["vol0", "vol1"], "full": true})
        );
        for args in [
            "backup create",
            "backup create --full",
            "backup show",
            "backup delete",
            "backup gc b-1",
            "backup verify",
            "backup verify b-1 --wait",
            "backup restore b-1",
            "backup restore --to vol1",
            "backup list vol0",
            "backup show b-1 --wait",
        ] {
            let error = parse(args).expect_err(args);
            assert_eq!(error.exit_code(), 2, "{args}");
        }
    }

    #[test]
    fn job_commands_parse() {
        assert_eq!(parse("job list").unwrap().command.call().method, "job.list");
        let show = parse("job show j-1").unwrap();
        assert_eq!(show.command.call().method, "job.show");
        assert_eq!(show.command.waits(), None);
        let wait = parse("job wait j-1").unwrap();
        assert_eq!(wait.command.call().params, serde_json::json!({"id": "j-1"}));
        assert_eq!(wait.command.waits(), Some(JobSlot::Whole));
        for args in ["job wait", "job show", "job list j-1", "job cancel j-1"] {
            assert!(parse(args).is_err(), "{args}");
        }
    }

    /// A one-connection fake daemon answering each request with the next of `results`.
    fn fake_daemon(name: &str, results: Vec<serde_json::Value>) -> PathBuf {
        use std::io::{BufRead, BufReader, Write};
        let socket =
            std::env::temp_dir().join(format!("evsctl-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            writer
                .write_all(b"{\"evsd\":{\"version\":\"0.1.0\",\"protocol\":1}}\n")
                .unwrap();
            let mut lines = BufReader::new(stream).lines();
            for result in results {
                let request: serde_json::Value =
                    serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
                let response = serde_json::json!({"id": request["id"], "result": result});
                writer
                    .write_all(format!("{response}\n").as_bytes())
                    .unwrap();
            }
        });
        socket
    }

    fn run_against(name: &str, args: &str, results: Vec<serde_json::Value>) -> Outcome {
        let socket = fake_daemon(name, results);
        let mut cli = parse(args).unwrap();
        cli.socket = socket.clone();
        let outcome = run(&cli).unwrap();
        let _ = std::fs::remove_file(socket);
        outcome
    }

    #[test]
    fn verify_waits_and_fails_on_bad_chunks() {
        let mut running = job::tests::sample("j-1", "running", 0, 8);
        running["kind"] = serde_json::json!("verify");
        let mut done = job::tests::sample("j-1", "succeeded", 8, 8);
        done["kind"] = serde_json::json!("verify");
        done["result"] = serde_json::json!({"chunks_checked": 2, "bad_chunks": [
            {"index": 1, "chunk_id": "ab12", "error": "crc32c mismatch"}]});
        let outcome = run_against(
            "verify",
            "backup verify b-1",
            vec![serde_json::json!({"job": running}), done.clone()],
        );
        assert_eq!(
            outcome.output,
            "verified backup b-1: 2 chunks checked, 1 bad\nchunk 1 ab12: crc32c mismatch\n"
        );
        assert_eq!(outcome.failures.len(), 1);
        assert_eq!(outcome.failures[0].exit_code(), 7);

        let outcome = run_against(
            "verify-json",
            "--json backup verify b-1",
            vec![serde_json::json!({"job": running}), done.clone()],
        );
        let printed: serde_json::Value = serde_json::from_str(&outcome.output).unwrap();
        assert_eq!(printed, serde_json::json!({"job": done}));
        assert_eq!(outcome.failures[0].exit_code(), 7);
    }

    #[test]
    fn waited_failures_exit_7_and_others_do_not_wait() {
        let running = job::tests::sample("j-1", "running", 0, 8);
        let mut failed = job::tests::sample("j-1", "failed", 2, 8);
        failed["error"] = serde_json::json!("store unreachable");
        let outcome = run_against(
            "wait",
            "job wait j-1",
            vec![running.clone(), running.clone(), failed],
        );
        assert!(outcome.output.contains("state:    failed\n"));
        assert_eq!(
            outcome.failures[0].to_string(),
            "job j-1 failed: store unreachable"
        );
        let outcome = run_against(
            "create",
            "backup create vol0",
            vec![serde_json::json!({"jobs": [running]})],
        );
        assert!(outcome.output.starts_with("ID   KIND    VOLUME"));
        assert!(outcome.failures.is_empty());
    }
}
