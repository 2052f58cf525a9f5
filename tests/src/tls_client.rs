//! A raw NBD client over TLS (rustls), for byte-level tests libnbd cannot express: STARTTLS in
//! plaintext, then the rest of the handshake and the transmission through the TLS stream.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::raw::*;

pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A client that trusts the CA in `ca_cert` (PEM) and presents no certificate.
fn client_config(ca_cert: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_cert)
        .unwrap_or_else(|e| panic!("reading {}: {e}", ca_cert.display()))
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A client that trusts `pki`'s CA and presents its client certificate (`make_pki`'s layout).
/// One config shared by several connections lets the client resume its sessions.
pub fn client_config_with_cert(pki: &Path) -> Arc<ClientConfig> {
    use rustls::pki_types::PrivateKeyDer;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.join("ca-cert.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(pki.join("client-cert.pem"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_file(pki.join("client-key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    Arc::new(config)
}

/// As [`open_tls`] with a given client config; returns the stream once GO is ACKed.
pub fn open_tls_with(addr: SocketAddr, config: Arc<ClientConfig>, export: &str) -> TlsStream {
    let mut raw = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    raw.send_opt(OPT_STARTTLS, &[]);
    until_ack(&mut raw.s, OPT_STARTTLS);
    let name = ServerName::try_from("localhost").unwrap();
    let connection = ClientConnection::new(config, name).unwrap();
    let mut tls = StreamOwned::new(connection, raw.s);
    send_option(&mut tls, OPT_GO, &Raw::go_payload(export, &[]));
    until_ack(&mut tls, OPT_GO);
    tls
}

/// Connects, upgrades with STARTTLS (server name `localhost`) and opens `export` with GO, no
/// structured replies: every reply to a WRITE is a simple one.
pub fn open_tls(addr: SocketAddr, ca_cert: &Path, export: &str) -> TlsStream {
    let mut raw = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
    raw.send_opt(OPT_STARTTLS, &[]);
    until_ack(&mut raw.s, OPT_STARTTLS);
    let name = ServerName::try_from("localhost").unwrap();
    let connection = ClientConnection::new(client_config(ca_cert), name).unwrap();
    let mut tls = StreamOwned::new(connection, raw.s);
    send_option(&mut tls, OPT_GO, &Raw::go_payload(export, &[]));
    until_ack(&mut tls, OPT_GO);
    tls
}

/// A simple reply: (error, cookie).
pub fn read_simple_reply(tls: &mut TlsStream) -> (u32, u64) {
    let reply = recv_exact(tls, 16);
    assert_eq!(be32(&reply[0..4]), SIMPLE_REPLY_MAGIC, "{reply:02x?}");
    (be32(&reply[4..8]), be64(&reply[8..16]))
}
