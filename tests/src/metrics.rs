//! The daemon's Prometheus endpoint, read as a scraper would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// GET /metrics over plain TCP; returns the body after checking the status line.
pub fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect metrics {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: evsd\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header/body split in {response:?}"));
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    body.to_owned()
}

/// The value of the series named exactly `series` (name plus label set, e.g.
/// `evsd_volume_connections{volume="vol0"}`) in a scrape, 0 when absent.
pub fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|rest| rest.strip_prefix(' '))
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("{series} value {v:?}: {e}"))
        })
        .next()
        .unwrap_or(0.0)
}

/// Client connections the daemon still serves: `evsd_connection_thread_connections` summed over
/// its connection threads.
pub fn open_connections(addr: SocketAddr) -> f64 {
    scrape(addr)
        .lines()
        .filter(|l| l.starts_with("evsd_connection_thread_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
