//! The admin API's TLS files: reading certificates, CA roots and keys from
//! PEM files (for the daemon and its clients alike), and the mutual-TLS
//! client configuration the CLI and the benchmarks connect with.
//!
//! Each error names the command-line flag and the file it is about: the
//! CLI's are `--ca`, `--cert` and `--key`, the daemon's `--tls-cert`,
//! `--tls-key` and `--client-ca`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS file that cannot be used, and what to do about it. The messages
/// are whole: they carry their cause and have no `source`, so an error
/// chain prints each cause once.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {flag} {}: {error}; check the path and that the file is readable", path.display())]
    Read { flag: &'static str, path: PathBuf, error: pem::Error },
    #[error(
        "{flag} {} is not PEM certificates: {error}; pass certificates in PEM (`-----BEGIN CERTIFICATE-----` blocks)",
        path.display()
    )]
    NotPem { flag: &'static str, path: PathBuf, error: pem::Error },
    #[error(
        "{flag} {} is not a usable CA certificate: {error}; pass the certificate of the CA that signs the peer's",
        path.display()
    )]
    UnusableCa { flag: &'static str, path: PathBuf, error: rustls::Error },
    #[error(
        "cannot read a PEM private key from {flag} {}: {error}; pass the key in PEM (`-----BEGIN PRIVATE KEY-----`)",
        path.display()
    )]
    Key { flag: &'static str, path: PathBuf, error: pem::Error },
    #[error(
        "--cert {} and --key {} do not match: {error}; pass the key the certificate was issued for",
        cert.display(),
        key.display()
    )]
    Mismatch { cert: PathBuf, key: PathBuf, error: rustls::Error },
    #[error("no TLS protocol version is available: {0}")]
    Versions(rustls::Error),
}

/// The certificates in the PEM file `path` (given as `flag`), in order;
/// none if it holds none.
pub fn read_certs(path: &Path, flag: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_file_iter(path)
        .map_err(|error| TlsError::Read { flag, path: path.to_owned(), error })?
        .collect::<Result<_, _>>()
        .map_err(|error| TlsError::NotPem { flag, path: path.to_owned(), error })
}

/// The CA certificates in the PEM file `path` (given as `flag`), as trust roots.
pub fn read_roots(path: &Path, flag: &'static str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in
        CertificateDer::pem_file_iter(path).map_err(|error| TlsError::Read { flag, path: path.to_owned(), error })?
    {
        let ca = ca.map_err(|error| TlsError::NotPem { flag, path: path.to_owned(), error })?;
        roots.add(ca).map_err(|error| TlsError::UnusableCa { flag, path: path.to_owned(), error })?;
    }
    Ok(roots)
}

/// The first private key in the PEM file `path` (given as `flag`).
pub fn read_key(path: &Path, flag: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|error| TlsError::Key { flag, path: path.to_owned(), error })
}

/// A mutual-TLS client configuration (ring, the safe default protocol
/// versions): servers are trusted if the CA certificates in `ca` signed
/// theirs, and the client shows the certificate chain in `cert` with the
/// private key in `key`. All three are PEM files, named in errors as the
/// CLI's `--ca`, `--cert` and `--key`.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = read_roots(ca, "--ca")?;
    let chain = read_certs(cert, "--cert")?;
    let private_key = read_key(key, "--key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Versions)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, private_key)
        .map_err(|error| TlsError::Mismatch { cert: cert.to_owned(), key: key.to_owned(), error })?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_flag_and_the_file() {
        let missing = Path::new("/nonexistent/bulkhead-ca.pem");
        let error = client_config(missing, missing, missing).unwrap_err();
        assert!(matches!(error, TlsError::Read { flag: "--ca", .. }), "{error:?}");
        let text = error.to_string();
        assert!(text.starts_with("cannot read --ca /nonexistent/bulkhead-ca.pem: "), "{text}");
        let error = read_key(missing, "--tls-key").unwrap_err();
        assert!(error.to_string().starts_with("cannot read a PEM private key from --tls-key /nonexistent/"), "{error}");
    }
}
