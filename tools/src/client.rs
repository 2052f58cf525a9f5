//! The admin protocol's client side: connect, read the greeting, one request, one response.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::CliError;

/// The protocol version this client speaks.
const PROTOCOL_VERSION: u64 = 1;

/// How long a daemon may take to greet: one that does not (stopped, hung, still starting
/// with its socket bound) is unreachable rather than waited for forever. Requests have no
/// bound of their own: some (a delete's merges, `--wait`) legitimately take long.
const GREETING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
    /// How long a reply may take (`--timeout-secs`); None: as long as it takes.
    reply_timeout: Option<std::time::Duration>,
}

impl AdminClient {
    pub fn connect(socket: &Path) -> Result<AdminClient, CliError> {
        Self::connect_within(socket, GREETING_TIMEOUT)
    }

    fn connect_within(
        socket: &Path,
        greeting_timeout: std::time::Duration,
    ) -> Result<AdminClient, CliError> {
        let unreachable = |source| CliError::Unreachable {
            socket: socket.to_owned(),
            source,
        };
        let stream = UnixStream::connect(socket).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(greeting_timeout))
            .map_err(unreachable)?;
        let writer = stream.try_clone().map_err(|source| CliError::Connection {
            socket: socket.to_owned(),
            source,
        })?;
        let mut client = AdminClient {
            socket: socket.to_owned(),
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            reply_timeout: None,
        };
        let greeting = match client.read_line() {
            Err(CliError::Connection { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(unreachable(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no greeting within {} s: is the daemon stopped, hung or still starting?",
                        greeting_timeout.as_secs_f32()
                    ),
                )));
            }
            other => other?,
        };
        client
            .reader
            .get_ref()
            .set_read_timeout(None)
            .map_err(unreachable)?;
        // A daemon with all its admin places taken answers with a `busy` error instead.
        if let Some(refused) = daemon_error(&greeting) {
            return Err(refused);
        }
        let protocol = greeting["evsd"]["protocol"].as_u64();
        if protocol != Some(PROTOCOL_VERSION) {
            return Err(CliError::Protocol(format!(
                "greeting {greeting} does not offer protocol {PROTOCOL_VERSION}"
            )));
        }
        Ok(client)
    }

    /// Bounds the wait for each reply from now on (None: no bound). A reply that does not come
    /// in time is the daemon being unreachable.
    pub fn set_reply_timeout(
        &mut self,
        timeout: Option<std::time::Duration>,
    ) -> Result<(), CliError> {
        self.reply_timeout = timeout;
        self.reader
            .get_ref()
            .set_read_timeout(timeout)
            .map_err(|source| self.connection_error(source))
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
        let mut response = match self.read_line() {
            Err(CliError::Connection { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                let secs = self.reply_timeout.map_or(0.0, |t| t.as_secs_f32());
                return Err(CliError::Unreachable {
                    socket: self.socket.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "no answer to {} within {secs} s (--timeout-secs)",
                            call.method
                        ),
                    ),
                });
            }
            other => other?,
        };
        // An error answering no request (id null): the daemon ended the connection and said
        // why (an idle client, for one).
        if response["id"].is_null() {
            if let Some(ended) = daemon_error(&response) {
                return Err(ended);
            }
        }
        if response["id"] != id {
            return Err(CliError::Protocol(format!(
                "response {response} does not answer request id {id}"
            )));
        }
        if let Some(result) = response.get_mut("result") {
            return Ok(result.take());
        }
        Err(daemon_error(&response).unwrap_or_else(|| {
            CliError::Protocol(format!("response {response} has neither result nor error"))
        }))
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

/// The daemon's error in a response line (`{"error": {"code", "message"}}`), if it is one.
fn daemon_error(line: &Value) -> Option<CliError> {
    let error = &line["error"];
    match (error["code"].as_str(), error["message"].as_str()) {
        (Some(code), Some(message)) => Some(CliError::Daemon {
            code: code.to_owned(),
            message: message.to_owned(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A daemon stand-in that writes `first` to the first client, then `after_request` once it
    /// has read a request line, and closes.
    fn answering(
        first: &'static str,
        after_request: &'static str,
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let _ = stream.write_all(first.as_bytes());
            let mut request = String::new();
            let _ = BufReader::new(stream.try_clone().unwrap()).read_line(&mut request);
            let _ = stream.write_all(after_request.as_bytes());
        });
        (dir, path)
    }

    #[test]
    fn a_daemon_that_never_greets_is_unreachable_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let started = std::time::Instant::now();
        let Err(silent) = AdminClient::connect_within(&path, std::time::Duration::from_millis(200))
        else {
            panic!("a silent daemon was taken for one that greeted")
        };
        assert!(started.elapsed() >= std::time::Duration::from_millis(200));
        assert_eq!(
            silent.exit_code(),
            crate::error::exit::UNREACHABLE,
            "{silent}"
        );
        assert!(
            silent.to_string().contains("no greeting within"),
            "{silent}"
        );
        drop(listener);
    }

    /// A daemon that greets, then never answers (stopped, hung): with --timeout-secs the call
    /// gives up as unreachable instead of waiting for ever.
    #[test]
    fn a_reply_that_never_comes_is_unreachable_after_the_reply_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let hung = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(b"{\"evsd\":{\"protocol\":1}}\n").unwrap();
            // Holds the connection open, reading, answering nothing.
            let mut request = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let _ = reader.read_line(&mut request);
            let _ = reader.read_line(&mut request);
        });
        let mut client = AdminClient::connect(&path).unwrap();
        client
            .set_reply_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        let started = std::time::Instant::now();
        let call = Call {
            method: "status",
            params: serde_json::json!({}),
        };
        let Err(gave_up) = client.call(&call) else {
            panic!("a hung daemon answered")
        };
        assert!(started.elapsed() >= std::time::Duration::from_millis(300));
        assert_eq!(
            gave_up.exit_code(),
            crate::error::exit::UNREACHABLE,
            "{gave_up}"
        );
        assert!(
            gave_up.to_string().contains("no answer to status"),
            "{gave_up}"
        );
        drop(client);
        hung.join().unwrap();
    }

    #[test]
    fn a_busy_refusal_and_an_idle_disconnect_are_the_daemons_errors() {
        let (_dir, path) = answering(
            "{\"id\":null,\"error\":{\"code\":\"busy\",\"message\":\"too many admin clients (at most 64)\"}}\n",
            "",
        );
        let Err(refused) = AdminClient::connect(&path) else {
            panic!("a busy refusal was taken for a greeting")
        };
        assert_eq!(refused.exit_code(), crate::error::exit::BUSY, "{refused}");
        assert!(refused.to_string().contains("too many admin clients"));

        let (_dir, path) = answering(
            "{\"evsd\":{\"protocol\":1}}\n",
            "{\"id\":null,\"error\":{\"code\":\"busy\",\"message\":\"no request for 60 s: disconnected\"}}\n",
        );
        let mut client = AdminClient::connect(&path).unwrap();
        let call = Call {
            method: "status",
            params: serde_json::json!({}),
        };
        let Err(ended) = client.call(&call) else {
            panic!("an idle disconnect was taken for a result")
        };
        assert!(matches!(ended, CliError::Daemon { .. }), "{ended}");
        assert!(ended.to_string().contains("no request for 60 s"));
    }
}
