//! A minimal HTTP/1.1 responder for `GET /metrics`: one request per connection, then close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Metrics;
use crate::accept_failures::AcceptFailures;

/// Request heads larger than this are answered 431 and closed.
const MAX_REQUEST_HEAD_BYTES: usize = 8 << 10;
/// A scraper that has not sent its request head by then is disconnected. Scrapers send it as
/// they connect; 16 silent connections could otherwise keep every slot for longer than
/// Prometheus's default 10 s scrape timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Scrapes served at once; more wait in the kernel's accept queue.
const MAX_CONCURRENT_SCRAPES: usize = 16;
/// How long one connection may take from accept to its last reply byte.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(30);

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
#[error("binding metrics listener {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

pub struct MetricsListener {
    listener: TcpListener,
}

impl MetricsListener {
    pub async fn bind(addr: SocketAddr) -> Result<MetricsListener, BindError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| BindError { addr, source })?;
        Ok(MetricsListener { listener })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves scrapes until `shutdown` fires.
    pub async fn run(self, metrics: Arc<Metrics>, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_SCRAPES));
        let mut failures = AcceptFailures::new("metrics");
        loop {
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    let metrics = Arc::clone(&metrics);
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        // The whole exchange, reply included: a client that never reads
                        // its reply would otherwise keep a slot for good.
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = tokio::time::timeout(SCRAPE_TIMEOUT, respond(stream, metrics)) => {}
                        }
                        drop(permit);
                    });
                }
                Err(error) => failures.failed(error).await,
            }
        }
    }
}

/// What the request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics { head_only: bool },
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

fn route(head: &[u8]) -> Route {
    let Ok(head) = std::str::from_utf8(head) else {
        return Route::BadRequest;
    };
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or_default();
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Route::MethodNotAllowed,
    };
    if path == "/metrics" {
        Route::Metrics { head_only }
    } else {
        Route::NotFound
    }
}

/// Why no request head was read.
enum HeadError {
    /// The scraper hung up or the socket failed: nobody to answer.
    Gone,
    /// Answer with this status line and close.
    Reply(&'static str),
}

/// Reads until the blank line ending the request head.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(());
            }
            if head.len() > MAX_REQUEST_HEAD_BYTES {
                return Err(HeadError::Reply("431 Request Header Fields Too Large"));
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err(HeadError::Gone),
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
        Ok(Ok(())) => Ok(head),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(HeadError::Reply("408 Request Timeout")),
    }
}

async fn respond(mut stream: TcpStream, metrics: Arc<Metrics>) {
    let head = match read_head(&mut stream).await {
        Ok(head) => head,
        Err(HeadError::Gone) => return,
        Err(HeadError::Reply(status)) => {
            let _ = write_response(&mut stream, status, "text/plain", b"", false).await;
            return;
        }
    };
    let result = match route(&head) {
        Route::Metrics { head_only } => {
            // Off the runtime: dropping deleted volumes' series asks the registry, whose
            // locks a resize or manifest commit holds across fsyncs.
            let body = match tokio::task::spawn_blocking(move || metrics.encode()).await {
                Ok(body) => body,
                Err(error) => {
                    tracing::warn!(%error, "encoding the metrics failed");
                    let _ = write_response(
                        &mut stream,
                        "500 Internal Server Error",
                        "text/plain",
                        b"encoding the metrics failed\n",
                        false,
                    )
                    .await;
                    return;
                }
            };
            write_response(
                &mut stream,
                "200 OK",
                CONTENT_TYPE,
                body.as_bytes(),
                head_only,
            )
            .await
        }
        Route::NotFound => {
            write_response(
                &mut stream,
                "404 Not Found",
                "text/plain",
                b"try /metrics\n",
                false,
            )
            .await
        }
        Route::MethodNotAllowed => {
            write_response(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                b"GET only\n",
                false,
            )
            .await
        }
        Route::BadRequest => {
            write_response(&mut stream, "400 Bad Request", "text/plain", b"", false).await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "metrics response not delivered");
    }
}

async fn write_response(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            route(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics { head_only: true }
        );
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"\xff\xfe\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics SPDY/3\r\n\r\n"), Route::BadRequest);
    }

    #[tokio::test]
    async fn serves_metrics_and_survives_garbage() {
        let metrics = Arc::new(Metrics::new());
        metrics.connection_accepted();
        let listener = MetricsListener::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(listener.run(Arc::clone(&metrics), shutdown.clone()));

        async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(request).await.unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        }
        let garbage = exchange(addr, &[0xffu8; 20000]).await;
        assert!(garbage.starts_with("HTTP/1.1 431"), "{garbage}");
        let bad = exchange(addr, b"hello\r\n\r\n").await;
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("\nevsd_connections_accepted_total 1\n"), "{ok}");
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{ok}"
        );

        // Silent connections in every slot hold a scrape up for the request timeout only,
        // well inside a scraper's own 10 s.
        let mut silent = Vec::new();
        for _ in 0..MAX_CONCURRENT_SCRAPES {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        let scrape = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let waited = tokio::time::timeout(Duration::from_secs(5), scrape).await;
        assert!(waited.is_ok_and(|ok| ok.starts_with("HTTP/1.1 200 OK")));
        drop(silent);

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
