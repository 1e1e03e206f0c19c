//! Certificates for admin-API tests and benchmarks: a throw-away CA that
//! issues server and client certificates into a scratch directory.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, date_time_ymd};

/// A self-signed certificate authority.
pub struct Ca {
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

fn write(dir: &Path, name: &str, text: &str) -> std::io::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

impl Ca {
    /// # Panics
    /// If key generation fails (it does not, short of a broken RNG).
    #[must_use]
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names to parse");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("key generation");
        Self { issuer: CertifiedIssuer::self_signed(params, key).expect("self-signing") }
    }

    /// Writes the CA certificate as `dir/file`.
    pub fn write_pem(&self, dir: &Path, file: &str) -> std::io::Result<PathBuf> {
        write(dir, file, &self.issuer.pem())
    }

    /// A leaf certificate and key for `name` (a client) or for 127.0.0.1
    /// (`name` = "server"), as `dir/file.pem` and `dir/file.key`.
    ///
    /// # Panics
    /// If key generation or signing fails.
    pub fn issue(&self, dir: &Path, file: &str, name: &str, expired: bool) -> std::io::Result<(PathBuf, PathBuf)> {
        let sans = if name == "server" { vec!["127.0.0.1".to_owned()] } else { Vec::new() };
        let mut params = CertificateParams::new(sans).expect("an IP address is a valid name");
        params.distinguished_name.push(DnType::CommonName, name);
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("key generation");
        let cert = params.signed_by(&key, &self.issuer).expect("signing");
        Ok((
            write(dir, &format!("{file}.pem"), &cert.pem())?,
            write(dir, &format!("{file}.key"), &key.serialize_pem())?,
        ))
    }
}
