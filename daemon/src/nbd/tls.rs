//! TLS for NBD STARTTLS: loads the X.509 certificate, key and optional client CA into a rustls
//! server config, and swaps in a fresh one on reload (SIGHUP) while open connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Where the TLS material lives; re-read on every reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs.
    pub ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {source}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{what} {path} holds no certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("client CA {path}: {source}")]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("client CA {path}: {source}")]
    Verifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("certificate {cert} with key {key}: {source}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// The server config new TLS handshakes use. Reloading replaces the `Arc`; connections that
/// already finished their handshake hold their own and are not affected.
pub struct TlsContext {
    paths: TlsPaths,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsContext {
    pub fn load(paths: TlsPaths) -> Result<TlsContext, TlsError> {
        let config = build(&paths)?;
        Ok(TlsContext {
            paths,
            current: RwLock::new(config),
        })
    }

    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    /// An acceptor with the current config.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            // A panic while swapping cannot leave a half-written Arc: the value is still whole.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        TlsAcceptor::from(config)
    }

    /// Re-reads the files; on error the previous config stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build(&self.paths)?;
        match self.current.write() {
            Ok(mut guard) => *guard = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
        Ok(())
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |source| TlsError::Pem {
        what,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn build(paths: &TlsPaths) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let chain = read_certs("certificate", &paths.cert)?;
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|source| TlsError::Pem {
        what: "private key",
        path: paths.key.clone(),
        source,
    })?;
    let config_error = |source| TlsError::Config {
        cert: paths.cert.clone(),
        key: paths.key.clone(),
        source,
    };
    // TLS 1.2 and 1.3, the spec's mandatory and recommended versions.
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(config_error)?;
    let builder = match &paths.ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs("client CA", ca)? {
                roots.add(cert).map_err(|source| TlsError::BadCa {
                    path: ca.clone(),
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|source| TlsError::Verifier {
                    path: ca.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(config_error)?;
    if paths.ca.is_some() {
        // A resumed session carries the client certificate of the handshake it resumes,
        // never checked again: a certificate that expired (or a CA replaced since) would go
        // on opening exports by its names. Every connection verifies its certificate anew.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let paths = TlsPaths {
            cert: dir.path().join("server-cert.pem"),
            key: dir.path().join("server-key.pem"),
            ca: None,
        };
        let err = TlsContext::load(paths).err().unwrap().to_string();
        assert!(err.contains("server-cert.pem"), "{err}");
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("server-cert.pem");
        std::fs::write(&cert, "not a pem file\n").unwrap();
        let paths = TlsPaths {
            cert: cert.clone(),
            key: dir.path().join("server-key.pem"),
            ca: None,
        };
        let err = TlsContext::load(paths).err().unwrap();
        assert!(
            matches!(&err, TlsError::NoCertificate { path, .. } if *path == cert),
            "{err}"
        );
    }
}
