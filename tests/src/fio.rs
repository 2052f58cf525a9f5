//! fio's nbd engine driven with JSON output.

use serde_json::Value;

use crate::{require_tool, run_timeout};

/// Runs fio against the NBD `uri` with `extra` options; returns its JSON report.
pub fn fio(uri: &str, extra: &[&str]) -> Value {
    require_tool("fio");
    let mut args: Vec<String> = vec![
        "--name=e2e".into(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--output-format=json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = run_timeout("fio", &args, std::time::Duration::from_secs(180));
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from fio:\n{text}"));
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| {
        panic!(
            "fio JSON: {e}\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
