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

/// The admin API's certificates as the API tests and the soak use them, in
/// one directory: the server's for 127.0.0.1 (`server.pem`, `server.key`)
/// and the clients' as `dir/WHO.pem` and `dir/WHO.key`:
/// - `operator` (`ops-alice`, role operator),
/// - `viewer` (`viewer-bob`, role viewer),
/// - `norole` (`carol`, trusted, no role),
/// - `expired` (`ops-alice`, expired),
/// - `untrusted` (`ops-alice`, from a CA the daemon does not trust).
pub struct ApiPki {
    /// Issues further server certificates (a rotation).
    pub server_ca: Ca,
    /// The server CA's certificate, for clients.
    pub ca_pem: PathBuf,
    client_ca_pem: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl ApiPki {
    /// Issues every certificate into `dir`.
    ///
    /// # Panics
    /// If key generation or signing fails.
    pub fn issue(dir: &Path) -> std::io::Result<Self> {
        let server_ca = Ca::new("bulkhead test server CA");
        let client_ca = Ca::new("bulkhead test client CA");
        let ca_pem = server_ca.write_pem(dir, "server-ca.pem")?;
        let client_ca_pem = client_ca.write_pem(dir, "client-ca.pem")?;
        let (cert, key) = server_ca.issue(dir, "server", "server", false)?;
        client_ca.issue(dir, "operator", "ops-alice", false)?;
        client_ca.issue(dir, "viewer", "viewer-bob", false)?;
        client_ca.issue(dir, "norole", "carol", false)?;
        client_ca.issue(dir, "expired", "ops-alice", true)?;
        Ca::new("someone else").issue(dir, "untrusted", "ops-alice", false)?;
        Ok(Self { server_ca, ca_pem, client_ca_pem, cert, key })
    }

    /// `bulkhead run`'s flags for this: the server certificate and key,
    /// the client CA, and the operator's and viewer's roles.
    #[must_use]
    pub fn daemon_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, path) in [("--tls-cert", &self.cert), ("--tls-key", &self.key), ("--client-ca", &self.client_ca_pem)]
        {
            args.extend([flag.to_owned(), path.display().to_string()]);
        }
        for role in ["ops-alice=operator", "viewer-bob=viewer"] {
            args.extend(["--api-role".to_owned(), role.to_owned()]);
        }
        args
    }
}
