//! evsctl: the operator's command line for evsd. It speaks only the admin protocol over the
//! daemon's admin Unix socket; volume, snapshot and backup nouns join this tree as they land.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit codes scripts can rely on.
const EXIT_UNREACHABLE: u8 = 3;

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
    /// Show the daemon's greeting (protocol version) from its admin socket.
    Status,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Status => match greeting(&cli.socket) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "evsctl: daemon unreachable at {}: {e}",
                    cli.socket.display()
                );
                ExitCode::from(EXIT_UNREACHABLE)
            }
        },
    }
}

/// Connects and reads the greeting line the admin protocol sends first.
fn greeting(socket: &PathBuf) -> std::io::Result<String> {
    let stream = UnixStream::connect(socket)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}
