//! `evsctl access …`: who may open a volume over NBD: allow-lists of client certificate names
//! and networks, read-only, TLS-only and a connection limit.

use clap::Subcommand;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::Call;
use crate::error::CliError;
use crate::render::{fields, table};

#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Show a volume's access rules.
    Show { name: String },
    /// Replace a volume's access rules (options not given are cleared). Open connections the
    /// new rules no longer allow are closed.
    Set {
        name: String,
        /// A client certificate name (subject CN or DNS SAN) allowed in; repeat for more.
        /// Makes the volume TLS-only.
        #[arg(long = "allow-name", value_name = "NAME")]
        allow_names: Vec<String>,
        /// A source network allowed in: an address, a CIDR (10.0.0.0/8) or "unix" for the NBD
        /// Unix socket; repeat for more. With names too, a client must match both.
        #[arg(long = "allow-network", value_name = "CIDR")]
        allow_networks: Vec<String>,
        /// Serve the volume read-only to every client.
        #[arg(long)]
        read_only: bool,
        /// Serve the volume only over TLS.
        #[arg(long)]
        tls_only: bool,
        /// Most connections to the volume at once.
        #[arg(long, value_name = "N")]
        max_connections: Option<u32>,
    },
    /// Remove a volume's access rules: every client may open it again.
    Clear { name: String },
    /// List the volumes that have access rules.
    List,
}

#[derive(Debug, Deserialize)]
struct AccessView {
    name: String,
    source: String,
    #[serde(default)]
    allow_names: Vec<String>,
    #[serde(default)]
    allow_networks: Vec<String>,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    tls_only: bool,
    #[serde(default)]
    max_connections: Option<u32>,
    #[serde(default)]
    warning: Option<String>,
}

impl AccessView {
    fn parse(value: &Value) -> Result<AccessView, CliError> {
        serde_json::from_value(value.clone())
            .map_err(|e| CliError::Protocol(format!("access rules: {e}")))
    }

    fn list_or_any(items: &[String]) -> String {
        if items.is_empty() {
            "any".to_owned()
        } else {
            items.join(", ")
        }
    }

    fn limit(&self) -> String {
        self.max_connections
            .map_or_else(|| "none".to_owned(), |n| n.to_string())
    }

    fn details(&self) -> String {
        let mut out = fields(&[
            ("volume", self.name.clone()),
            ("rules from", self.source.replace('_', " ")),
            ("client names", Self::list_or_any(&self.allow_names)),
            ("networks", Self::list_or_any(&self.allow_networks)),
            ("read-only", yes_no(self.read_only)),
            (
                "tls-only",
                yes_no(self.tls_only || !self.allow_names.is_empty()),
            ),
            ("max connections", self.limit()),
        ]);
        if let Some(warning) = &self.warning {
            out.push_str(&format!("warning: {warning}\n"));
        }
        out
    }

    fn row(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.source.clone(),
            Self::list_or_any(&self.allow_names),
            Self::list_or_any(&self.allow_networks),
            yes_no(self.read_only),
            yes_no(self.tls_only || !self.allow_names.is_empty()),
            self.limit(),
        ]
    }
}

fn yes_no(flag: bool) -> String {
    if flag { "yes" } else { "no" }.to_owned()
}

impl AccessCommand {
    pub fn call(&self) -> Call {
        let (method, params) = match self {
            AccessCommand::Show { name } => ("access.get", json!({"name": name})),
            AccessCommand::Set {
                name,
                allow_names,
                allow_networks,
                read_only,
                tls_only,
                max_connections,
            } => {
                let mut params = json!({
                    "name": name,
                    "allow_names": allow_names,
                    "allow_networks": allow_networks,
                    "read_only": read_only,
                    "tls_only": tls_only,
                });
                if let Some(max) = max_connections {
                    params["max_connections"] = json!(max);
                }
                ("access.set", params)
            }
            AccessCommand::Clear { name } => ("access.set", json!({"name": name})),
            AccessCommand::List => ("access.list", json!({})),
        };
        Call { method, params }
    }

    pub fn render(&self, result: &Value) -> Result<String, CliError> {
        Ok(match self {
            AccessCommand::Show { .. } | AccessCommand::Set { .. } => {
                AccessView::parse(result)?.details()
            }
            AccessCommand::Clear { name } => {
                let view = AccessView::parse(result)?;
                if view.source == "config" {
                    format!("volume {name}: rules come from the config file\n")
                } else {
                    format!("volume {name}: access rules cleared, every client may open it\n")
                }
            }
            AccessCommand::List => {
                let rows = result
                    .as_array()
                    .ok_or_else(|| CliError::Protocol("access.list: not an array".into()))?
                    .iter()
                    .map(|v| AccessView::parse(v).map(|v| v.row()))
                    .collect::<Result<Vec<_>, CliError>>()?;
                table(
                    &[
                        "VOLUME", "FROM", "NAMES", "NETWORKS", "RO", "TLS", "MAX CONN",
                    ],
                    &rows,
                )
            }
        })
    }
}
