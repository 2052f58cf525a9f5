//! `evsctl status`: the daemon's version, uptime, listeners, I/O engine and volumes.

use serde_json::{json, Value};

use crate::client::Call;
use crate::error::CliError;
use crate::render::{fields, table};
use crate::volume::{number, text, volume_rows};

pub fn call() -> Call {
    Call {
        method: "status",
        params: json!({}),
    }
}

pub fn render(result: &Value) -> Result<String, CliError> {
    let listener = |key: &str| result["listeners"][key].as_str().unwrap_or("-").to_owned();
    let mut out = fields(&[
        ("version", text(result, "version")?.to_owned()),
        ("uptime", format!("{} s", number(result, "uptime_secs")?)),
        ("io engine", text(result, "io_engine")?.to_owned()),
        ("tcp", listener("tcp")),
        ("unix", listener("unix")),
        ("admin", listener("admin")),
    ]);
    let volumes = result["volumes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let rows = volume_rows(volumes, &[])?;
    out.push('\n');
    out.push_str(&table(&["VOLUME", "SIZE", "CONNECTIONS"], &rows));
    Ok(out)
}
