//! evsctl: the operator's command line for evsd. It speaks only the admin protocol over the
//! daemon's admin Unix socket.
//!
//! Adding a noun (snapshot, backup, …): a module with its clap subcommand enum, a `call()`
//! building the admin request and a `render()` for human output, plus one arm in [`Command`].

mod client;
mod error;
mod render;
mod status;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::client::{AdminClient, Call};
use crate::error::CliError;
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
    /// Show the daemon's version, uptime, listeners and volumes.
    Status,
}

impl Command {
    fn call(&self) -> Call {
        match self {
            Command::Volume(command) => command.call(),
            Command::Status => status::call(),
        }
    }

    fn render(&self, result: &Value) -> Result<String, CliError> {
        match self {
            Command::Volume(command) => command.render(result),
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
