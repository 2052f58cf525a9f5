//! evsctl: the operator's command line for evsd. It speaks only the admin protocol over the
//! daemon's admin Unix socket.
//!
//! Adding a noun (snapshot, backup, …): a module with its clap subcommand enum, a `call()`
//! building the admin request and a `render()` for human output, plus one arm in [`Command`].
//! A command that starts jobs and waits for them also says where its result carries them
//! (`waits()`): [`run`] then polls them to the end and renders the result with their final state.

mod access;
mod backup;
mod backup_set;
mod client;
mod error;
mod job;
mod policy;
mod progress;
mod render;
mod server;
mod snapshot;
mod status;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::access::AccessCommand;
use crate::backup::BackupCommand;
use crate::backup_set::BackupSetCommand;
use crate::client::{AdminClient, Call};
use crate::error::CliError;
use crate::job::{JobCommand, JobInfo, JobSlot};
use crate::policy::PolicyCommand;
use crate::progress::Waiter;
use crate::server::ServerCommand;
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

    /// Give up (exit 3) when the daemon has not answered a request within this many seconds
    /// (a hung daemon). Unset: requests may take as long as they need (a delete's merges).
    #[arg(long, global = true, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout_secs: Option<u64>,

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
    /// Group volumes into servers, back them up from one instant and restore them together.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Show or delete a server backup (a backup set).
    #[command(subcommand)]
    BackupSet(BackupSetCommand),
    /// Back volumes or servers up on a schedule, keeping a bounded number of backups.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Control which clients may open a volume over NBD (names, networks, read-only, TLS-only,
    /// connection limit).
    #[command(subcommand)]
    Access(AccessCommand),
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
            Command::Server(command) => command.call(),
            Command::BackupSet(command) => command.call(),
            Command::Policy(command) => command.call(),
            Command::Job(command) => command.call(),
            Command::Access(command) => command.call(),
            Command::Status => status::call(),
        }
    }

    /// Where the first call's result carries the jobs to wait for, when the command waits.
    fn waits(&self) -> Option<JobSlot> {
        match self {
            Command::Volume(command) => command.waits(),
            Command::Backup(command) => command.waits(),
            Command::Server(command) => command.waits(),
            Command::Job(command) => command.waits(),
            Command::Snapshot(_)
            | Command::BackupSet(_)
            | Command::Policy(_)
            | Command::Access(_)
            | Command::Status => None,
        }
    }

    /// Whether the result is a backup set to read again once its jobs have all succeeded.
    fn rereads_set(&self) -> bool {
        matches!(self, Command::Server(command) if command.rereads_set())
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
            Command::Server(command) => command.render(result),
            Command::BackupSet(command) => command.render(result),
            Command::Policy(command) => command.render(result),
            Command::Job(command) => command.render(result),
            Command::Access(command) => command.render(result),
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
            if let Err(e) = print_output(&output) {
                eprintln!("evsctl: writing the output failed: {e}");
                return ExitCode::FAILURE;
            }
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

/// Writes `output` to stdout. A reader that stopped reading (`| head`) is no failure: what it
/// did not want is dropped (print! would panic on the broken pipe).
fn print_output(output: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(output.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn run(cli: &Cli) -> Result<Outcome, CliError> {
    let mut client = AdminClient::connect(&cli.socket)?;
    client.set_reply_timeout(cli.timeout_secs.map(std::time::Duration::from_secs))?;
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
        // A server backup whose members all succeeded: the set as recorded (state complete).
        if failures.is_empty() && cli.command.rereads_set() {
            result = server::settle_set(&mut client, &result)?;
            failures.extend(server::set_failure(&result)?);
        }
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
        let cancel = parse("job cancel j-1").unwrap();
        assert_eq!(cancel.command.call().method, "job.cancel");
        assert_eq!(cancel.command.waits(), None);
        for args in [
            "job wait",
            "job show",
            "job list j-1",
            "job cancel",
            "job stop j-1",
        ] {
            assert!(parse(args).is_err(), "{args}");
        }
    }

    #[test]
    fn server_and_backup_set_commands_parse() {
        for (args, method, waits) in [
            ("server create web1 --volume a", "server.create", None),
            (
                "server create web1 --volume a --volume b",
                "server.create",
                None,
            ),
            ("server add-volume web1 c", "server.add_volume", None),
            ("server remove-volume web1 c", "server.remove_volume", None),
            ("server list", "server.list", None),
            ("server show web1", "server.show", None),
            ("server delete web1", "server.delete", None),
            ("server backup web1", "server.backup", None),
            (
                "server backup web1 --full --wait",
                "server.backup",
                Some(JobSlot::Jobs),
            ),
            ("server backups web1", "server.backups", None),
            ("server restore s-1", "server.restore", None),
            (
                "server restore s-1 --to-new -r --force --wait",
                "server.restore",
                Some(JobSlot::Jobs),
            ),
            ("backup-set show s-1", "backup_set.show", None),
            ("--json backup-set delete s-1", "backup_set.delete", None),
        ] {
            let cli = parse(args).expect(args);
            assert_eq!(cli.command.call().method, method, "{args}");
            assert_eq!(cli.command.waits(), waits, "{args}");
        }
        assert_eq!(
            parse("server create web1 --volume a --volume b")
                .unwrap()
                .command
                .call()
                .params,
            serde_json::json!({"name": "web1", "volumes": ["a", "b"]})
        );
        assert_eq!(
            parse("server restore s-1 --to-new=-r")
                .unwrap()
                .command
                .call()
                .params,
            serde_json::json!({"set_id": "s-1", "force": false, "to_new_suffix": "-r"})
        );
        assert!(parse("server backup web1 --wait")
            .unwrap()
            .command
            .rereads_set());
        assert!(!parse("server backup web1").unwrap().command.rereads_set());
        assert!(!parse("backup create v --wait")
            .unwrap()
            .command
            .rereads_set());
        for args in [
            "server create web1",
            "server create --volume a",
            "server create web1 a b",
            "server add-volume web1",
            "server remove-volume web1",
            "server list web1",
            "server show",
            "server backup",
            "server backups",
            "server backups web1 --wait",
            "server restore",
            "server restore s-1 --to-new",
            "server restore s-1 --to-new --force",
            "server restore s-1 --to-new @x",
            "server delete web1 --force",
            "backup-set show",
            "backup-set delete",
            "backup-set list",
            "backup_set show s-1",
        ] {
            let error = parse(args).expect_err(args);
            assert_eq!(error.exit_code(), 2, "{args}");
        }
    }

    #[test]
    fn policy_commands_parse() {
        for (args, params) in [
            (
                "policy create nightly --daily 02:00 --keep 7 --volume a --volume b",
                serde_json::json!({"name": "nightly", "daily": "02:00", "keep": 7,
                                   "volumes": ["a", "b"]}),
            ),
            (
                "policy create fast --every 30s --server web1",
                serde_json::json!({"name": "fast", "every": "30s", "servers": ["web1"]}),
            ),
            (
                "policy create wk --weekly mon,thu@03:30 --keep-days 30 --keep 4 --server s1 \
                 --server s2",
                serde_json::json!({"name": "wk", "weekly": "MON,THU@03:30", "keep": 4,
                                   "keep_days": 30, "servers": ["s1", "s2"]}),
            ),
        ] {
            let cli = parse(args).expect(args);
            assert_eq!(cli.command.call().method, "policy.create", "{args}");
            assert_eq!(cli.command.call().params, params, "{args}");
            assert_eq!(cli.command.waits(), None, "{args}");
        }
        for (args, method) in [
            ("policy list", "policy.list"),
            ("policy show p", "policy.show"),
            ("policy enable p", "policy.enable"),
            ("policy disable p", "policy.disable"),
            ("policy delete p", "policy.delete"),
            ("policy run p", "policy.run"),
        ] {
            let cli = parse(args).expect(args);
            assert_eq!(cli.command.call().method, method, "{args}");
            let params = if method == "policy.list" {
                serde_json::json!({})
            } else {
                serde_json::json!({"name": "p"})
            };
            assert_eq!(cli.command.call().params, params, "{args}");
            assert_eq!(cli.command.waits(), None, "{args}");
        }
        for (args, kind) in [
            // No schedule, two schedules.
            (
                "policy create p --volume a",
                ErrorKind::MissingRequiredArgument,
            ),
            (
                "policy create p --every 1h --daily 02:00 --volume a",
                ErrorKind::ArgumentConflict,
            ),
            (
                "policy create p --daily 02:00 --weekly MON@02:00 --volume a",
                ErrorKind::ArgumentConflict,
            ),
            // No target, both kinds of target.
            (
                "policy create p --every 1h",
                ErrorKind::MissingRequiredArgument,
            ),
            (
                "policy create p --every 1h --volume a --server web1",
                ErrorKind::ArgumentConflict,
            ),
            // Bad values.
            (
                "policy create p --every 1h --keep 0 --volume a",
                ErrorKind::ValueValidation,
            ),
            (
                "policy create p --every 1h --keep x --volume a",
                ErrorKind::ValueValidation,
            ),
            (
                "policy create p --every 1h --keep -1 --volume a",
                ErrorKind::UnknownArgument,
            ),
            (
                "policy create p --every 1h --keep-days 0 --volume a",
                ErrorKind::ValueValidation,
            ),
            (
                "policy create p --every 1w --volume a",
                ErrorKind::ValueValidation,
            ),
            (
                "policy create p --daily 2am --volume a",
                ErrorKind::ValueValidation,
            ),
            (
                "policy create p --weekly MON --volume a",
                ErrorKind::ValueValidation,
            ),
            (
                "policy create --every 1h --volume a",
                ErrorKind::MissingRequiredArgument,
            ),
            (
                "policy create p --every 1h --volume",
                ErrorKind::InvalidValue,
            ),
            ("policy run", ErrorKind::MissingRequiredArgument),
            ("policy list p", ErrorKind::UnknownArgument),
        ] {
            let error = parse(args).expect_err(args);
            assert_eq!(error.kind(), kind, "{args}");
            assert_eq!(error.exit_code(), 2, "{args}");
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

    #[test]
    fn server_backup_waits_for_every_member_then_reads_the_set_again() {
        use crate::backup_set::tests::set;
        let running = set(
            "s-1",
            vec![
                job::tests::sample("j-1", "running", 0, 8),
                job::tests::sample("j-2", "running", 0, 8),
            ],
        );
        let done = [
            job::tests::sample("j-1", "succeeded", 8, 8),
            job::tests::sample("j-2", "succeeded", 8, 8),
        ];
        // The set is still being recorded at the first re-read, then complete.
        let mut recording = set("s-1", vec![]);
        recording["state"] = serde_json::json!("running");
        // The daemon may retry the record for long on a failing store: evsctl waits for it
        // (it gave up after 25 reads, reporting a failure for a set that completed).
        let mut answers = vec![running.clone(), done[0].clone(), done[1].clone()];
        answers.extend(std::iter::repeat_n(recording, 30));
        answers.push(set("s-1", vec![]));
        let outcome = run_against("server-backup", "--json server backup web1 --wait", answers);
        assert!(outcome.failures.is_empty());
        let printed: serde_json::Value = serde_json::from_str(&outcome.output).unwrap();
        let mut expected = set("s-1", vec![]);
        expected["jobs"] = serde_json::json!(done);
        assert_eq!(printed, expected);

        let outcome = run_against(
            "server-backup-human",
            "server backup web1 --wait",
            vec![
                running.clone(),
                done[0].clone(),
                done[1].clone(),
                set("s-1", vec![]),
            ],
        );
        assert!(
            outcome.output.contains("state:        complete\n"),
            "{}",
            outcome.output
        );
        assert_eq!(outcome.output.matches("succeeded").count(), 2);

        // A failed member: reported (exit 7), and the set is not read again.
        let mut failed = job::tests::sample("j-2", "failed", 2, 8);
        failed["error"] = serde_json::json!("store unreachable");
        let outcome = run_against(
            "server-backup-failed",
            "server backup web1 --wait",
            vec![running, done[0].clone(), failed],
        );
        assert_eq!(outcome.failures.len(), 1);
        assert_eq!(outcome.failures[0].exit_code(), 7);
        assert!(outcome.output.contains("state:        running\n"));
    }

    #[test]
    fn server_restore_waits_for_every_job() {
        let mut jobs = Vec::new();
        let mut finals = Vec::new();
        for id in ["j-1", "j-2", "j-3"] {
            let mut job = job::tests::sample(id, "running", 0, 8);
            job["kind"] = serde_json::json!("restore");
            jobs.push(job.clone());
            job["state"] = serde_json::json!("succeeded");
            finals.push(job);
        }
        let mut results = vec![serde_json::json!({"jobs": jobs})];
        results.extend(finals);
        let outcome = run_against(
            "server-restore",
            "server restore s-1 --to-new -r --wait",
            results,
        );
        assert!(outcome.failures.is_empty());
        assert!(outcome
            .output
            .starts_with("restore of backup set s-1 to new volumes VOLUME-r:\n"));
        assert_eq!(
            outcome.output.matches("restore  vol0").count(),
            3,
            "{}",
            outcome.output
        );
        assert_eq!(outcome.output.matches("succeeded").count(), 3);
    }
}
