//! The admin protocol's client side: connect, read the greeting, one request, one response.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::CliError;

/// The protocol version this client speaks.
const PROTOCOL_VERSION: u64 = 1;

/// One admin request: a method and its params.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: &'static str,
    pub params: Value,
}

pub struct AdminClient {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl AdminClient {
    pub fn connect(socket: &Path) -> Result<AdminClient, CliError> {
        let stream = UnixStream::connect(socket).map_err(|source| CliError::Unreachable {
            socket: socket.to_owned(),
            source,
        })?;
        let writer = stream.try_clone().map_err(|source| CliError::Connection {
            socket: socket.to_owned(),
            source,
        })?;
        let mut client = AdminClient {
            socket: socket.to_owned(),
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
        };
        let greeting = client.read_line()?;
        let protocol = greeting["evsd"]["protocol"].as_u64();
        if protocol != Some(PROTOCOL_VERSION) {
            return Err(CliError::Protocol(format!(
                "greeting {greeting} does not offer protocol {PROTOCOL_VERSION}"
            )));
        }
        Ok(client)
    }

    /// Sends `call` and returns its result, or the daemon's error as [`CliError::Daemon`].
    pub fn call(&mut self, call: &Call) -> Result<Value, CliError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = serde_json::json!({"id": id, "method": call.method, "params": call.params});
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| self.connection_error(source))?;
        let mut response = self.read_line()?;
        if response["id"] != id {
            return Err(CliError::Protocol(format!(
                "response {response} does not answer request id {id}"
            )));
        }
        if let Some(result) = response.get_mut("result") {
            return Ok(result.take());
        }
        let error = &response["error"];
        match (error["code"].as_str(), error["message"].as_str()) {
            (Some(code), Some(message)) => Err(CliError::Daemon {
                code: code.to_owned(),
                message: message.to_owned(),
            }),
            _ => Err(CliError::Protocol(format!(
                "response {response} has neither result nor error"
            ))),
        }
    }

    fn read_line(&mut self) -> Result<Value, CliError> {
        let mut line = String::new();
        let read = self
            .reader
            .read_line(&mut line)
            .map_err(|source| self.connection_error(source))?;
        if read == 0 {
            return Err(CliError::Protocol(
                "the daemon closed the connection".into(),
            ));
        }
        serde_json::from_str(&line)
            .map_err(|e| CliError::Protocol(format!("line {:?} is not JSON: {e}", line.trim_end())))
    }

    fn connection_error(&self, source: std::io::Error) -> CliError {
        CliError::Connection {
            socket: self.socket.clone(),
            source,
        }
    }
}
