//! The bench's own CA and an ECDSA P-256 server certificate for localhost and 127.0.0.1, made
//! once with the openssl CLI under `target/bench-tls/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA the load generator trusts.
    pub ca: PathBuf,
    /// Server certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// Certificate then key in one file (HAProxy's `crt`).
    pub combined: PathBuf,
}

pub fn ensure(root: &Path) -> anyhow::Result<TlsFiles> {
    let dir = root.join("target/bench-tls");
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        combined: dir.join("combined.pem"),
    };
    if [&files.ca, &files.cert, &files.key, &files.combined]
        .iter()
        .all(|p| p.is_file())
    {
        return Ok(files);
    }
    std::fs::create_dir_all(&dir)?;
    let ca_key = dir.join("ca.key");
    let csr = dir.join("cert.csr");
    let ext = dir.join("cert.ext");
    std::fs::write(
        &ext,
        "subjectAltName = DNS:localhost, IP:127.0.0.1\nbasicConstraints = CA:FALSE\n\
         keyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n",
    )?;
    let p = |path: &Path| path.to_string_lossy().into_owned();
    let curve = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &curve[..],
            &["-days", "3650", "-subj", "/CN=wsplice bench CA"],
        ]
        .concat(),
        &[("-keyout", p(&ca_key)), ("-out", p(&files.ca))],
    )?;
    openssl(
        &[&["req"][..], &curve[..], &["-subj", "/CN=localhost"]].concat(),
        &[("-keyout", p(&files.key)), ("-out", p(&csr))],
    )?;
    openssl(
        &["x509", "-req", "-days", "3650", "-set_serial", "1"],
        &[
            ("-in", p(&csr)),
            ("-CA", p(&files.ca)),
            ("-CAkey", p(&ca_key)),
            ("-extfile", p(&ext)),
            ("-out", p(&files.cert)),
        ],
    )?;
    let combined = std::fs::read_to_string(&files.cert)? + &std::fs::read_to_string(&files.key)?;
    std::fs::write(&files.combined, combined)?;
    Ok(files)
}

fn openssl(args: &[&str], paths: &[(&str, String)]) -> anyhow::Result<()> {
    let mut command = Command::new("openssl");
    command.args(args);
    for (flag, path) in paths {
        command.arg(flag).arg(path);
    }
    let output = command.output().context("cannot run openssl")?;
    if !output.status.success() {
        bail!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
