//! evsctl: the operator's command line for evsd. It speaks only the admin protocol over the
//! daemon's admin Unix socket.
//!
//! Adding a noun (snapshot, backup, …): a module with its clap subcommand enum, a `call()`
//! building the admin request and a `render()` for human output, plus one arm in [`Command`].

mod client;
mod error;
mod render;
mod snapshot;
mod status;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::client::{AdminClient, Call};
use crate::error::CliError;
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

    /// Print the daemon's JSON result unchanged.
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
    /// Show the daemon's version, uptime, listeners and volumes.
    Status,
}

impl Command {
    fn call(&self) -> Call {
        match self {
            Command::Volume(command) => command.call(),
            Command::Snapshot(command) => command.call(),
            Command::Status => status::call(),
        }
    }

    fn render(&self, result: &Value) -> Result<String, CliError> {
        match self {
            Command::Volume(command) => command.render(result),
            Command::Snapshot(command) => command.render(result),
            Command::Status => status::render(result),
        }
    }
}

fn main() -> ExitCode {
    // Usage errors exit with 2, which is also our "invalid argument" code.
    let cli = Cli::parse();
    match run(&cli) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("evsctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(cli: &Cli) -> Result<String, CliError> {
    let mut client = AdminClient::connect(&cli.socket)?;
    let result = client.call(&cli.command.call())?;
    if cli.json {
        let text = serde_json::to_string_pretty(&result)
            .map_err(|e| CliError::Protocol(format!("re-encoding the result failed: {e}")))?;
        return Ok(format!("{text}\n"));
    }
    cli.command.render(&result)
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
}
