//! Test certificates made with the openssl CLI, in GnuTLS's directory layout (ca-cert.pem,
//! client-cert.pem, client-key.pem) that nbdinfo's `tls-certificates=DIR` and qemu's
//! tls-creds-x509 read.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::format_output;

const CA_CONFIG: &str = "[req]\ndistinguished_name = dn\nx509_extensions = v3_ca\nprompt = no\n\
    [dn]\nCN = evsd test CA\n\
    [v3_ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
    subjectKeyIdentifier = hash\n";

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl: {e}"));
    assert!(
        out.status.success(),
        "{}",
        format_output(&format!("openssl {args:?}"), &out)
    );
}

/// A CA with a server and a client certificate, in one directory:
/// ca-cert.pem, ca-key.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem.
pub fn make_pki(dir: &Path, ca_name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("ca.cnf"),
        CA_CONFIG.replace("evsd test CA", ca_name),
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-config", "ca.cnf", "-days", "30"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&["-keyout", "ca-key.pem", "-out", "ca-cert.pem"]);
    openssl(dir, &ca);
    for (who, cn, ext) in [
        (
            "server",
            "localhost",
            "subjectAltName = DNS:localhost, IP:127.0.0.1\nbasicConstraints = CA:FALSE\n\
             keyUsage = critical, digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n",
        ),
        (
            "client",
            "evsd-test-client",
            "basicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\n\
             extendedKeyUsage = clientAuth\n",
        ),
    ] {
        let ext_file = format!("{who}.ext");
        std::fs::write(dir.join(&ext_file), ext).unwrap();
        let key = format!("{who}-key.pem");
        let csr = format!("{who}.csr");
        let cert = format!("{who}-cert.pem");
        let subj = format!("/CN={cn}");
        let mut req = vec!["req", "-new", "-subj", &subj];
        req.extend_from_slice(&ec);
        req.extend_from_slice(&["-keyout", &key, "-out", &csr]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509", "-req", "-in", &csr, "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                "-CAcreateserial", "-days", "30", "-extfile", &ext_file, "-out", &cert,
            ],
        );
    }
}

/// A client directory: `ca` to trust the server, and the client certificate of `client`.
pub fn client_dir(root: &Path, name: &str, ca: &Path, client: &Path) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(ca.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(client.join(f), dir.join(f)).unwrap();
    }
    dir
}

/// Another client certificate signed by `pki`'s CA, written as `<who>-cert.pem` and
/// `<who>-key.pem` there: subject CN `cn`, and DNS SAN `dns` when given.
pub fn make_client(pki: &Path, who: &str, cn: &str, dns: Option<&str>) {
    let mut ext = String::from(
        "basicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = clientAuth\n",
    );
    if let Some(dns) = dns {
        ext.push_str(&format!("subjectAltName = DNS:{dns}\n"));
    }
    let ext_file = format!("{who}.ext");
    std::fs::write(pki.join(&ext_file), ext).unwrap();
    let key = format!("{who}-key.pem");
    let csr = format!("{who}.csr");
    let cert = format!("{who}-cert.pem");
    let subj = format!("/CN={cn}");
    openssl(
        pki,
        &[
            "req",
            "-new",
            "-subj",
            &subj,
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    );
    openssl(
        pki,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            &ext_file,
            "-out",
            &cert,
        ],
    );
}

/// A GnuTLS-layout directory trusting `pki`'s CA and holding client `who`'s certificate.
pub fn client_dir_for(root: &Path, pki: &Path, who: &str) -> PathBuf {
    let dir = root.join(format!("client-{who}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(pki.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
    std::fs::copy(
        pki.join(format!("{who}-cert.pem")),
        dir.join("client-cert.pem"),
    )
    .unwrap();
    std::fs::copy(
        pki.join(format!("{who}-key.pem")),
        dir.join("client-key.pem"),
    )
    .unwrap();
    dir
}
