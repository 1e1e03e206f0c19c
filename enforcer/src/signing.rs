//! Signed policy sets. A policy directory is signed as a whole: a manifest
//! lists every policy file with its SHA-256, a version number that only
//! grows, and optionally when the set expires; a detached minisign
//! signature covers the manifest. So a file cannot be changed, added,
//! removed or taken from another signed set without breaking the
//! signature, and an older, looser set cannot be brought back once a newer
//! one was enforced (the daemon keeps the version it enforces).
//!
//! The manifest (`.bulkhead-manifest`, beside its signature
//! `.bulkhead-manifest.minisig`: hidden files, which the loader does not
//! read as policy) is text, so standard tools can write it:
//!
//! ```text
//! bulkhead-policy-manifest v1
//! version: 8
//! expires: 2027-01-31T00:00:00Z
//! 3f5a…(64 hex digits)  base.yaml
//! 9c01…(64 hex digits)  web.yaml
//! ```
//!
//! The first line is exactly `bulkhead-policy-manifest v1`; `version:`
//! (a whole number) is required, `expires:` (RFC 3339) optional; each file
//! is one line as `sha256sum` prints it (`HEX  NAME`, or `HEX *NAME`);
//! blank lines and lines starting with `#` are ignored. Names are the
//! directory's policy files (`*.yaml`, `*.yml`, not hidden), no paths.
//! With minisign's own tool:
//!
//! ```text
//! { echo 'bulkhead-policy-manifest v1'; echo 'version: 8'; sha256sum *.yaml; } > .bulkhead-manifest
//! minisign -S -s KEY -m .bulkhead-manifest
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};

/// The manifest's file name in a signed directory.
pub const MANIFEST: &str = ".bulkhead-manifest";
/// Its detached minisign signature (minisign's default name for it).
pub const SIGNATURE: &str = ".bulkhead-manifest.minisig";
const HEADER: &str = "bulkhead-policy-manifest v1";

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("{path}: no policy manifest; sign the directory with `bulkhead policy sign` (see README, Signed policy)")]
    NoManifest { path: PathBuf },
    #[error(
        "{path}: the policy manifest has no signature beside it; sign it with `bulkhead policy sign` or `minisign -S`"
    )]
    NoSignature { path: PathBuf },
    #[error("{path}: not a minisign signature: {reason}")]
    SignatureUnreadable { path: PathBuf, reason: String },
    #[error(
        "{path}: signed by key {key_id}, which is not among the trusted keys in {keys}; sign with a trusted key or add its public key there"
    )]
    UntrustedKey { path: PathBuf, key_id: String, keys: PathBuf },
    #[error(
        "{path}: the signature does not match the manifest (changed after signing, or a forged signature) for key {key_id} ({key})"
    )]
    BadSignature { path: PathBuf, key_id: String, key: PathBuf },
    #[error("{path}:{line}: {message}")]
    Malformed { path: PathBuf, line: usize, message: String },
    #[error("{path}: the policy file's SHA-256 is not the one the signed manifest lists; it was changed after signing")]
    Tampered { path: PathBuf },
    #[error("{path}: listed in the signed manifest but missing from the directory")]
    Missing { path: PathBuf },
    #[error("{path}: a policy file the signed manifest does not list; remove it or sign the directory again")]
    Extra { path: PathBuf },
    #[error("{path}: the signed policy expired at {expires}; sign it again with a later --expires")]
    Expired { path: PathBuf, expires: String },
    #[error(
        "{path}: version {version} is older than version {enforced}, which this node enforced already; sign with --version {enforced} or higher"
    )]
    Rollback { path: PathBuf, version: u64, enforced: u64 },
    #[error("{path}: no trusted keys (`*.pub`, minisign public keys) in this directory")]
    NoTrustedKeys { path: PathBuf },
    #[error("{path}: not a minisign public key: {reason}")]
    KeyUnreadable { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    SecretKey { path: PathBuf, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signing failed: {0}")]
    Sign(String),
}

impl SigningError {
    /// The `reason` label of `bulkhead_policy_load_errors_total` this
    /// refusal counts under.
    #[must_use]
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::NoManifest { .. } | Self::NoSignature { .. } => "unsigned",
            Self::UntrustedKey { .. } => "untrusted_key",
            Self::BadSignature { .. } | Self::SignatureUnreadable { .. } => "bad_signature",
            Self::Malformed { .. } => "bad_manifest",
            Self::Tampered { .. } | Self::Missing { .. } | Self::Extra { .. } => "files_differ",
            Self::Expired { .. } => "expired",
            Self::Rollback { .. } => "rollback",
            Self::NoTrustedKeys { .. } | Self::KeyUnreadable { .. } => "trusted_keys",
            Self::SecretKey { .. } | Self::Read { .. } | Self::Write { .. } | Self::Sign(_) => "unreadable",
        }
    }
}

/// A policy set's manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub version: u64,
    pub expires: Option<SystemTime>,
    /// File name → SHA-256.
    pub files: BTreeMap<String, [u8; 32]>,
}

impl Manifest {
    /// Reads a manifest; `path` names it in errors.
    ///
    /// # Errors
    /// A first line that is not the header, a line that is none of the
    /// above, a version missing or given twice, a file listed twice or
    /// that is not a plain policy file name.
    pub fn parse(text: &str, path: &Path) -> Result<Self, SigningError> {
        let malformed =
            |line: usize, message: String| SigningError::Malformed { path: path.to_path_buf(), line, message };
        let mut lines = text.lines().enumerate().map(|(n, line)| (n + 1, line.trim_end_matches('\r')));
        match lines.next() {
            Some((_, HEADER)) => {}
            _ => return Err(malformed(1, format!("the first line must be `{HEADER}`"))),
        }
        let (mut version, mut expires, mut files) = (None, None, BTreeMap::new());
        for (n, line) in lines {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(value) = line.strip_prefix("version:") {
                let value = value.trim();
                let parsed = value
                    .parse::<u64>()
                    .map_err(|_| malformed(n, format!("version `{value}` is not a whole number")))?;
                if version.replace(parsed).is_some() {
                    return Err(malformed(n, "the version is given twice".to_owned()));
                }
            } else if let Some(value) = line.strip_prefix("expires:") {
                let value = value.trim();
                let parsed = policy::parse_rfc3339(value)
                    .ok_or_else(|| malformed(n, format!("expires `{value}` is not an RFC 3339 time")))?;
                if expires.replace(parsed).is_some() {
                    return Err(malformed(n, "the expiry is given twice".to_owned()));
                }
            } else {
                let (digest, name) = file_line(line).ok_or_else(|| {
                    malformed(
                        n,
                        "expected `version: N`, `expires: TIME` or `SHA256  FILE` (as sha256sum prints it)".into(),
                    )
                })?;
                if !is_policy_file_name(name) {
                    return Err(malformed(
                        n,
                        format!("`{name}` is not a policy file of the directory (*.yaml or *.yml, no path)"),
                    ));
                }
                if files.insert(name.to_owned(), digest).is_some() {
                    return Err(malformed(n, format!("`{name}` is listed twice")));
                }
            }
        }
        let version = version.ok_or_else(|| malformed(1, "no `version: N` line".to_owned()))?;
        Ok(Self { version, expires, files })
    }

    /// The manifest's text (see the module's documentation).
    #[must_use]
    pub fn render(&self) -> String {
        let mut text = format!("{HEADER}\nversion: {}\n", self.version);
        if let Some(expires) = self.expires {
            let _ = writeln!(text, "expires: {}", crate::events::rfc3339_at(expires));
        }
        for (name, digest) in &self.files {
            let _ = writeln!(text, "{}  {name}", hex(digest));
        }
        text
    }
}

/// `HEX  NAME` or `HEX *NAME`, as `sha256sum` prints a file.
fn file_line(line: &str) -> Option<([u8; 32], &str)> {
    let (hex_digest, rest) = line.split_at_checked(64)?;
    let name = rest.strip_prefix("  ").or_else(|| rest.strip_prefix(" *"))?;
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(hex_digest.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some((digest, name))
}

/// A plain file name (no path) that the loader reads as policy.
fn is_policy_file_name(name: &str) -> bool {
    !name.contains('/') && policy::is_policy_file_name(name)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

/// A key id as minisign prints it.
fn key_id(keynum: &[u8]) -> String {
    let mut bytes = [0u8; 8];
    for (to, from) in bytes.iter_mut().zip(keynum) {
        *to = *from;
    }
    format!("{:016X}", u64::from_le_bytes(bytes))
}

/// The public keys of a trusted-keys directory, read anew for each check:
/// a key removed from it is no longer trusted from the next check on.
pub struct TrustedKeys {
    dir: PathBuf,
    keys: Vec<(PathBuf, minisign::PublicKey)>,
}

impl TrustedKeys {
    /// Reads every `*.pub` file of `dir`.
    ///
    /// # Errors
    /// The directory cannot be read, holds no key, or a key file is not a
    /// minisign public key (refused rather than skipped: a key meant to be
    /// trusted that is not would refuse every policy it signed, later and
    /// more confusingly).
    pub fn load(dir: &Path) -> Result<Self, SigningError> {
        let read_error = |source| SigningError::Read { path: dir.to_path_buf(), source };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_error)? {
            let path = entry.map_err(read_error)?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let is_key = Path::new(&name).extension().is_some_and(|ext| ext.eq_ignore_ascii_case("pub"));
            if is_key && !name.starts_with('.') && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        let mut keys = Vec::new();
        for path in paths {
            let text =
                std::fs::read_to_string(&path).map_err(|source| SigningError::Read { path: path.clone(), source })?;
            let unreadable = |reason: String| SigningError::KeyUnreadable { path: path.clone(), reason };
            let key = if text.lines().count() <= 1 {
                minisign::PublicKey::from_base64(text.trim())
            } else {
                minisign::PublicKeyBox::from_string(&text).and_then(minisign::PublicKeyBox::into_public_key)
            };
            keys.push((path.clone(), key.map_err(|error| unreadable(error.to_string()))?));
        }
        if keys.is_empty() {
            return Err(SigningError::NoTrustedKeys { path: dir.to_path_buf() });
        }
        Ok(Self { dir: dir.to_path_buf(), keys })
    }

    /// Checks `signature_text` (of the file `path`) over `data`; the key
    /// file that signed it.
    fn check(&self, data: &[u8], signature_text: &str, path: &Path) -> Result<&Path, SigningError> {
        let unreadable = |reason: String| SigningError::SignatureUnreadable { path: path.to_path_buf(), reason };
        let signature =
            minisign::SignatureBox::from_string(signature_text).map_err(|error| unreadable(error.to_string()))?;
        if !trusted_comment_signature_is_whole(signature_text) {
            return Err(unreadable("its trusted comment signature (the fourth line) is not 64 bytes".to_owned()));
        }
        let signer = key_id(signature.keynum());
        let Some((key_path, key)) = self.keys.iter().find(|(_, key)| key.keynum() == signature.keynum()) else {
            return Err(SigningError::UntrustedKey {
                path: path.to_path_buf(),
                key_id: signer,
                keys: self.dir.clone(),
            });
        };
        minisign::verify(key, &signature, std::io::Cursor::new(data), true, false, false).map_err(|_| {
            SigningError::BadSignature { path: path.to_path_buf(), key_id: signer, key: key_path.clone() }
        })?;
        Ok(key_path)
    }
}

/// Whether the signature's fourth line, the signature of its trusted
/// comment, is a whole Ed25519 signature. minisign 0.10 reads the line
/// without checking its length and, for a signature that is otherwise
/// good, panics verifying a shorter one (found by fuzzing): anyone holding
/// a signed set could rewrite that unsigned line and stop the daemon.
fn trusted_comment_signature_is_whole(signature_text: &str) -> bool {
    use ct_codecs::{Base64, Decoder as _};
    signature_text
        .lines()
        .nth(3)
        .and_then(|line| Base64::decode_to_vec(line.trim().as_bytes(), None).ok())
        .is_some_and(|bytes| bytes.len() == 64)
}

/// What a verified policy set is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub version: u64,
    pub expires: Option<SystemTime>,
    /// The trusted key file whose key signed it.
    pub key: PathBuf,
}

/// Verifies the policy set of `dir`, whose policy files are `files` (name
/// → SHA-256 of the contents read): the manifest's signature by one of
/// `keys` first (nothing unsigned is parsed further), then its expiry,
/// then that it lists exactly these files with these contents.
///
/// # Errors
/// The first reason the set is not the signed one (see [`SigningError`]).
pub fn verify_set(
    dir: &Path,
    files: &BTreeMap<String, [u8; 32]>,
    keys: &TrustedKeys,
    now: SystemTime,
) -> Result<Verified, SigningError> {
    let (manifest, signature) = read_signed(dir)?;
    verify_texts(dir, &manifest, &signature, files, keys, now)
}

/// The manifest and the signature of `dir`, as they are.
///
/// # Errors
/// Either is missing or cannot be read.
pub fn read_signed(dir: &Path) -> Result<(Vec<u8>, String), SigningError> {
    let (manifest_path, signature_path) = (dir.join(MANIFEST), dir.join(SIGNATURE));
    let manifest = match std::fs::read(&manifest_path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(SigningError::NoManifest { path: manifest_path });
        }
        Err(source) => return Err(SigningError::Read { path: manifest_path, source }),
    };
    let signature = match std::fs::read_to_string(&signature_path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(SigningError::NoSignature { path: signature_path });
        }
        Err(source) => return Err(SigningError::Read { path: signature_path, source }),
    };
    Ok((manifest, signature))
}

/// [`verify_set`] for a manifest and signature given as texts (a push
/// through the API carries them).
///
/// # Errors
/// As [`verify_set`].
pub fn verify_texts(
    dir: &Path,
    manifest_text: &[u8],
    signature_text: &str,
    files: &BTreeMap<String, [u8; 32]>,
    keys: &TrustedKeys,
    now: SystemTime,
) -> Result<Verified, SigningError> {
    let (manifest_path, signature_path) = (dir.join(MANIFEST), dir.join(SIGNATURE));
    let key = keys.check(manifest_text, signature_text, &signature_path)?.to_path_buf();
    let text = std::str::from_utf8(manifest_text).map_err(|_| SigningError::Malformed {
        path: manifest_path.clone(),
        line: 1,
        message: "not UTF-8 text".to_owned(),
    })?;
    let manifest = Manifest::parse(text, &manifest_path)?;
    if let Some(expires) = manifest.expires
        && now >= expires
    {
        return Err(SigningError::Expired { path: manifest_path, expires: crate::events::rfc3339_at(expires) });
    }
    for (name, digest) in files {
        match manifest.files.get(name) {
            None => return Err(SigningError::Extra { path: dir.join(name) }),
            Some(listed) if listed != digest => return Err(SigningError::Tampered { path: dir.join(name) }),
            Some(_) => {}
        }
    }
    if let Some(name) = manifest.files.keys().find(|name| !files.contains_key(*name)) {
        return Err(SigningError::Missing { path: dir.join(name) });
    }
    Ok(Verified { version: manifest.version, expires: manifest.expires, key })
}

/// The SHA-256 of every policy file of `dir` (as the loader lists them),
/// by name.
///
/// # Errors
/// The directory or a file cannot be read.
pub fn digests(dir: &Path) -> Result<BTreeMap<String, [u8; 32]>, SigningError> {
    let paths = match policy::list_files(&[dir.to_path_buf()]) {
        Err(policy::PolicyError::NoFiles { .. }) => Vec::new(),
        Err(policy::PolicyError::Read { path, source }) => return Err(SigningError::Read { path, source }),
        Err(other) => {
            return Err(SigningError::Read {
                path: dir.to_path_buf(),
                source: std::io::Error::other(other.to_string()),
            });
        }
        Ok(paths) => paths,
    };
    let mut files = BTreeMap::new();
    for path in paths {
        let bytes = std::fs::read(&path).map_err(|source| SigningError::Read { path: path.clone(), source })?;
        let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        files.insert(name, Sha256::digest(&bytes).into());
    }
    Ok(files)
}

/// Writes a new unencrypted key pair: `PREFIX.key` (secret, mode 0600)
/// and `PREFIX.pub`, in minisign's formats. Existing files are never
/// overwritten.
///
/// # Errors
/// Either file exists already or cannot be written.
pub fn keygen(prefix: &Path) -> Result<(PathBuf, PathBuf, String), SigningError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let with = |extension: &str| {
        let mut path = prefix.as_os_str().to_owned();
        path.push(extension);
        PathBuf::from(path)
    };
    let (secret_path, public_path) = (with(".key"), with(".pub"));
    let pair =
        minisign::KeyPair::generate_unencrypted_keypair().map_err(|error| SigningError::Sign(error.to_string()))?;
    let id = key_id(pair.pk.keynum());
    let secret = pair
        .sk
        .to_box(Some(&format!("bulkhead policy signing key {id} (unencrypted: keep it secret)")))
        .map_err(|error| SigningError::Sign(error.to_string()))?;
    let public = pair.pk.to_box().map_err(|error| SigningError::Sign(error.to_string()))?;
    for (path, text, mode) in [(&secret_path, secret.to_string(), 0o600), (&public_path, public.to_string(), 0o644)] {
        let write_error = |source| SigningError::Write { path: path.clone(), source };
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(write_error)?;
        file.write_all(text.as_bytes()).map_err(write_error)?;
    }
    Ok((secret_path, public_path, id))
}

/// Signs the policy set of `dir` with the unencrypted secret key at
/// `key`: writes its manifest (`version`, `expires`) and the signature.
///
/// # Errors
/// The key cannot be read or is encrypted; the directory cannot be read
/// or written.
pub fn sign(dir: &Path, key: &Path, version: u64, expires: Option<SystemTime>) -> Result<Manifest, SigningError> {
    let text = std::fs::read_to_string(key).map_err(|source| SigningError::Read { path: key.to_path_buf(), source })?;
    let secret = secret_key(&text).map_err(|reason| SigningError::SecretKey { path: key.to_path_buf(), reason })?;
    let manifest = Manifest { version, expires, files: digests(dir)? };
    let rendered = manifest.render();
    let signature = minisign::sign(
        None,
        &secret,
        std::io::Cursor::new(rendered.as_bytes()),
        Some(&format!("bulkhead policy version {version}")),
        None,
    )
    .map_err(|error| SigningError::Sign(error.to_string()))?;
    // The manifest last: a reader between the two sees the new signature
    // over the old manifest, which it refuses until the manifest arrives.
    write_atomically(&dir.join(SIGNATURE), signature.to_string().as_bytes())?;
    write_atomically(&dir.join(MANIFEST), rendered.as_bytes())?;
    Ok(manifest)
}

/// An unencrypted minisign secret key from its file's text. `minisign -G
/// -W` (0.11) leaves such a key's checksum zero, which the crate takes
/// for corruption; the checksum minisign defines (BLAKE2b-256 of the
/// algorithm, key id and key) is filled in for it, so a really corrupted
/// key still fails the crate's own check.
fn secret_key(text: &str) -> Result<minisign::SecretKey, String> {
    use blake2::Digest as _;
    use ct_codecs::{Base64, Decoder as _};
    const UNENCRYPTED: [u8; 2] = [0, 0];
    let not_a_key = || {
        "not an unencrypted minisign secret key; make one with `bulkhead policy keygen` or `minisign -G -W`".to_owned()
    };
    if let Ok(key) =
        minisign::SecretKeyBox::from_string(text).and_then(minisign::SecretKeyBox::into_unencrypted_secret_key)
    {
        return Ok(key);
    }
    let encoded = text.lines().find(|line| !line.starts_with("untrusted comment:") && !line.trim().is_empty());
    let mut bytes = encoded.and_then(|line| Base64::decode_to_vec(line.trim(), None).ok()).ok_or_else(not_a_key)?;
    // sig_alg 2, kdf_alg 2, chk_alg 2, salt 32, opslimit 8, memlimit 8,
    // key id 8, key 64, checksum 32.
    if bytes.len() != 158 || bytes[2..4] != UNENCRYPTED {
        return Err(not_a_key());
    }
    if bytes[126..].iter().all(|byte| *byte == 0) {
        let mut checksum = blake2::Blake2b::<blake2::digest::consts::U32>::new();
        checksum.update(&bytes[0..2]);
        checksum.update(&bytes[54..126]);
        bytes[126..].copy_from_slice(&checksum.finalize());
    }
    let key = minisign::SecretKey::from_bytes(&bytes).map_err(|_| not_a_key())?;
    let boxed = key.to_box(None).map_err(|_| not_a_key())?;
    boxed
        .into_unencrypted_secret_key()
        .map_err(|_| "the minisign secret key is corrupted (its checksum does not match)".to_owned())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SigningError> {
    crate::state::write_atomically(path, bytes)
        .map_err(|source| SigningError::Write { path: path.to_path_buf(), source })
}

/// A duration as `90s`, `15m`, `12h` or `30d`.
#[must_use]
pub fn parse_duration(text: &str) -> Option<Duration> {
    let units = [("s", 1u64), ("m", 60), ("h", 3600), ("d", 86_400)];
    units.iter().find_map(|(unit, seconds)| {
        let count: u64 = text.strip_suffix(unit)?.parse().ok()?;
        Some(Duration::from_secs(count.checked_mul(*seconds)?))
    })
}

/// A time given as a duration from `now` (`90s`, `15m`, `12h`, `30d`) or
/// as an RFC 3339 time.
///
/// # Errors
/// Neither.
pub fn parse_time(text: &str, now: SystemTime) -> Result<SystemTime, String> {
    if let Some(time) = policy::parse_rfc3339(text) {
        return Ok(time);
    }
    parse_duration(text)
        .and_then(|duration| now.checked_add(duration))
        .ok_or_else(|| format!("`{text}` is neither a duration (such as 90s, 15m, 12h or 30d) nor an RFC 3339 time"))
}

/// What `--trusted-keys` asks of a policy set: a signature by a key in
/// `keys`, and a version no older than `enforced`.
#[derive(Debug)]
pub struct Trust {
    pub keys: PathBuf,
    pub enforced: EnforcedVersion,
}

impl Trust {
    /// Checks a set as a node must, whether it comes from the directory or
    /// a push: the keys read anew, [`verify_texts`], then the version floor.
    ///
    /// # Errors
    /// The first reason the set is refused.
    pub fn check(
        &self,
        dir: &Path,
        (manifest, signature): (&[u8], &str),
        files: &BTreeMap<String, [u8; 32]>,
        now: SystemTime,
    ) -> Result<Verified, SigningError> {
        let keys = TrustedKeys::load(&self.keys)?;
        let verified = verify_texts(dir, manifest, signature, files, &keys, now)?;
        self.enforced.admit(&verified, &dir.join(MANIFEST))?;
        Ok(verified)
    }
}

/// The version of the signed policy set this node enforced last, kept in
/// a file of the state directory so that a restart cannot bring back an
/// older one.
#[derive(Debug)]
pub struct EnforcedVersion {
    path: PathBuf,
}

impl EnforcedVersion {
    #[must_use]
    pub fn new(state_dir: &Path) -> Self {
        Self { path: state_dir.join("policy-version") }
    }

    /// The version enforced last (0 before any).
    ///
    /// # Errors
    /// The file exists but cannot be read or holds no number: refused
    /// rather than taken as 0, which would allow any rollback.
    pub fn get(&self) -> Result<u64, SigningError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => text.trim().parse().map_err(|_| SigningError::Malformed {
                path: self.path.clone(),
                line: 1,
                message: "not a version number; it is the version of the signed policy this node enforced".into(),
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(source) => Err(SigningError::Read { path: self.path.clone(), source }),
        }
    }

    /// Refuses `verified` if it is older than what was enforced.
    ///
    /// # Errors
    /// [`SigningError::Rollback`], or the kept version cannot be read.
    pub fn admit(&self, verified: &Verified, manifest: &Path) -> Result<(), SigningError> {
        let enforced = self.get()?;
        if verified.version < enforced {
            return Err(SigningError::Rollback { path: manifest.to_path_buf(), version: verified.version, enforced });
        }
        Ok(())
    }

    /// Records `version` as enforced (once the policy is in the maps).
    ///
    /// # Errors
    /// The state directory cannot be written.
    pub fn set(&self, version: u64) -> Result<(), SigningError> {
        write_atomically(&self.path, format!("{version}\n").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("bulkhead-signing-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("policy")).unwrap();
            std::fs::create_dir_all(dir.join("keys")).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_hours(500_000)
    }

    /// The input the API fuzz target found: a good signature whose trusted
    /// comment signature is cut short made minisign panic.
    #[test]
    fn a_short_trusted_comment_signature_is_refused_not_a_panic() {
        let scratch = Scratch::new("short-global");
        let (policy, keys) = (scratch.0.join("policy"), scratch.0.join("keys"));
        std::fs::write(policy.join("a.yaml"), "a: 1\n").unwrap();
        let (secret, _, _) = keygen(&keys.join("ops")).unwrap();
        sign(&policy, &secret, 1, None).unwrap();
        let trusted = TrustedKeys::load(&keys).unwrap();
        let (manifest, signature) = read_signed(&policy).unwrap();
        let files = digests(&policy).unwrap();
        assert!(verify_texts(&policy, &manifest, &signature, &files, &trusted, now()).is_ok());
        let mut lines: Vec<String> = signature.lines().map(str::to_owned).collect();
        for cut in [0, 1, 60, 61, 63] {
            use ct_codecs::{Base64, Decoder as _, Encoder as _};
            let whole = Base64::decode_to_vec(lines[3].as_bytes(), None).unwrap();
            let short = Base64::encode_to_string(&whole[..cut]).unwrap();
            let original = std::mem::replace(&mut lines[3], short);
            let cut_short = lines.join("\n") + "\n";
            lines[3] = original;
            let error = verify_texts(&policy, &manifest, &cut_short, &files, &trusted, now()).unwrap_err();
            assert!(
                matches!(error, SigningError::SignatureUnreadable { .. }) && error.to_string().contains("64 bytes"),
                "{cut} bytes: {error}"
            );
        }
    }

    /// A signed directory verifies; every way of changing it afterwards is
    /// refused with its own reason, naming the file.
    #[test]
    fn a_signed_set_verifies_and_every_change_is_refused() {
        let scratch = Scratch::new("changes");
        let (policy, keys) = (scratch.0.join("policy"), scratch.0.join("keys"));
        std::fs::write(policy.join("a.yaml"), "a: 1\n").unwrap();
        std::fs::write(policy.join("b.yaml"), "b: 1\n").unwrap();
        let (secret, _, id) = keygen(&keys.join("ops")).unwrap();
        let manifest = sign(&policy, &secret, 3, Some(now() + Duration::from_mins(1))).unwrap();
        assert_eq!(manifest.files.len(), 2);
        let trusted = TrustedKeys::load(&keys).unwrap();
        let verify = |at: SystemTime| verify_set(&policy, &digests(&policy).unwrap(), &trusted, at);
        let verified = verify(now()).unwrap();
        assert_eq!((verified.version, verified.key.clone()), (3, keys.join("ops.pub")));

        let reason = |result: Result<Verified, SigningError>| {
            let error = result.unwrap_err();
            (error.reason(), error.to_string())
        };
        let (why, message) = reason(verify(now() + Duration::from_secs(61)));
        assert_eq!(why, "expired", "{message}");

        std::fs::write(policy.join("a.yaml"), "a: 2\n").unwrap();
        let (why, message) = reason(verify(now()));
        assert!(
            why == "files_differ" && message.contains("a.yaml") && message.contains("changed after signing"),
            "{message}"
        );
        std::fs::write(policy.join("a.yaml"), "a: 1\n").unwrap();

        std::fs::write(policy.join("c.yml"), "c: 1\n").unwrap();
        let (why, message) = reason(verify(now()));
        assert!(why == "files_differ" && message.contains("c.yml") && message.contains("does not list"), "{message}");
        std::fs::remove_file(policy.join("c.yml")).unwrap();

        std::fs::remove_file(policy.join("b.yaml")).unwrap();
        let (why, message) = reason(verify(now()));
        assert!(why == "files_differ" && message.contains("b.yaml") && message.contains("missing"), "{message}");
        std::fs::write(policy.join("b.yaml"), "b: 1\n").unwrap();
        assert!(verify(now()).is_ok(), "back as signed");

        // The manifest edited (a file's hash, or the version): the
        // signature no longer covers it.
        let text = std::fs::read_to_string(policy.join(MANIFEST)).unwrap();
        std::fs::write(policy.join(MANIFEST), text.replace("version: 3", "version: 4")).unwrap();
        let (why, message) = reason(verify(now()));
        assert!(why == "bad_signature" && message.contains(&id), "{message}");
        std::fs::write(policy.join(MANIFEST), &text).unwrap();

        // Signed by a key that is not trusted.
        let other = scratch.0.join("other");
        std::fs::create_dir_all(&other).unwrap();
        let (other_secret, _, other_id) = keygen(&other.join("k")).unwrap();
        sign(&policy, &other_secret, 3, None).unwrap();
        let (why, message) = reason(verify(now()));
        assert!(why == "untrusted_key" && message.contains(&other_id), "{message}");
        // Trusted once its public key is in the directory (rotation: both
        // keys at once), and not once it is removed again.
        std::fs::copy(other.join("k.pub"), keys.join("next.pub")).unwrap();
        let both = TrustedKeys::load(&keys).unwrap();
        assert_eq!(verify_set(&policy, &digests(&policy).unwrap(), &both, now()).unwrap().key, keys.join("next.pub"));
        std::fs::remove_file(keys.join("next.pub")).unwrap();
        let one = TrustedKeys::load(&keys).unwrap();
        assert_eq!(verify_set(&policy, &digests(&policy).unwrap(), &one, now()).unwrap_err().reason(), "untrusted_key");

        std::fs::remove_file(policy.join(SIGNATURE)).unwrap();
        assert_eq!(reason(verify(now())).0, "unsigned");
        std::fs::remove_file(policy.join(MANIFEST)).unwrap();
        assert_eq!(reason(verify(now())).0, "unsigned");
    }

    #[test]
    fn manifests_read_as_sha256sum_writes_them_and_malformed_ones_name_the_line() {
        let path = Path::new("/p/.bulkhead-manifest");
        let digest = "ab".repeat(32);
        let text = format!("{HEADER}\n# made by hand\nversion: 7\n\n{digest}  a.yaml\n{digest} *b.yml\n");
        let manifest = Manifest::parse(&text, path).unwrap();
        assert_eq!(manifest.version, 7);
        assert_eq!(manifest.files.keys().collect::<Vec<_>>(), ["a.yaml", "b.yml"]);
        assert_eq!(Manifest::parse(&manifest.render(), path).unwrap(), manifest, "render reads back");
        let at = SystemTime::UNIX_EPOCH + Duration::from_hours(500_000);
        let with_expiry = Manifest { expires: Some(at), ..manifest };
        assert_eq!(Manifest::parse(&with_expiry.render(), path).unwrap().expires, Some(at));
        for (bad, line, says) in [
            ("version: 1\n".to_owned(), 1, "first line"),
            (format!("{HEADER}\n"), 1, "no `version"),
            (format!("{HEADER}\nversion: x\n"), 2, "not a whole number"),
            (format!("{HEADER}\nversion: 1\nversion: 2\n"), 3, "twice"),
            (format!("{HEADER}\nversion: 1\nexpires: soon\n"), 3, "RFC 3339"),
            (format!("{HEADER}\nversion: 1\n{digest}  ../etc/x.yaml\n"), 3, "not a policy file"),
            (format!("{HEADER}\nversion: 1\n{digest}  .hidden.yaml\n"), 3, "not a policy file"),
            (format!("{HEADER}\nversion: 1\n{digest}  a.yaml\n{digest}  a.yaml\n"), 4, "listed twice"),
            (format!("{HEADER}\nversion: 1\nzz  a.yaml\n"), 3, "sha256sum"),
        ] {
            let error = Manifest::parse(&bad, path).unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("{}:{line}: ", path.display())) && error.contains(says),
                "{bad:?}: {error}"
            );
        }
    }

    #[test]
    fn the_enforced_version_refuses_older_sets_and_survives_as_a_file() {
        let scratch = Scratch::new("version");
        let state = scratch.0.join("state");
        let kept = EnforcedVersion::new(&state);
        let at = |version| Verified { version, expires: None, key: PathBuf::new() };
        let manifest = Path::new("m");
        assert!(kept.admit(&at(1), manifest).is_ok(), "nothing enforced yet");
        kept.set(5).unwrap();
        assert!(kept.admit(&at(5), manifest).is_ok(), "the same version again (a restart)");
        let error = EnforcedVersion::new(&state).admit(&at(4), manifest).unwrap_err();
        assert_eq!(error.reason(), "rollback");
        assert!(error.to_string().contains("version 4 is older than version 5"), "{error}");
        std::fs::write(state.join("policy-version"), "garbage").unwrap();
        assert!(kept.admit(&at(9), manifest).is_err(), "an unreadable record refuses, never allows");
    }

    /// A key pair `minisign -G -W` (0.11) made, whose secret key has a
    /// zero checksum.
    const STOCK_SECRET: &str = "untrusted comment: minisign encrypted secret key
RWQAAEIyAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAM42/oON6j/P/9IcXSvH3uGL11i98JQMQpeUzbd8fIFDA+FfGHtUilpkiNYkjvz4uj8pJ2td/IXfH74iRBrS3H1yDHEtB1OjlAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=
";
    const STOCK_PUBLIC: &str = "untrusted comment: minisign public key F38F7AE3A0BF8D33
RWQzjb+g43qP85kiNYkjvz4uj8pJ2td/IXfH74iRBrS3H1yDHEtB1Ojl
";

    /// The stock tool's unencrypted key signs, and its public key verifies;
    /// a key of ours with a byte changed is refused by its checksum.
    #[test]
    fn keys_made_by_minisign_without_a_password_sign() {
        let scratch = Scratch::new("stock-key");
        let (policy, keys) = (scratch.0.join("policy"), scratch.0.join("keys"));
        std::fs::write(scratch.0.join("stock.key"), STOCK_SECRET).unwrap();
        std::fs::write(keys.join("stock.pub"), STOCK_PUBLIC).unwrap();
        std::fs::write(policy.join("a.yaml"), "a: 1\n").unwrap();
        sign(&policy, &scratch.0.join("stock.key"), 1, None).unwrap();
        let trusted = TrustedKeys::load(&keys).unwrap();
        assert_eq!(
            verify_set(&policy, &digests(&policy).unwrap(), &trusted, now()).unwrap().key,
            keys.join("stock.pub")
        );

        let (ours, _, _) = keygen(&scratch.0.join("ours")).unwrap();
        let text = std::fs::read_to_string(&ours).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let middle = lines[1].len() / 2;
        let flipped = if &lines[1][middle..=middle] == "A" { "B" } else { "A" };
        lines[1].replace_range(middle..=middle, flipped);
        let error = secret_key(&lines.join("\n")).unwrap_err();
        assert!(error.contains("corrupted") || error.contains("not an unencrypted"), "{error}");
    }

    #[test]
    fn times_are_durations_or_rfc3339() {
        let now = now();
        assert_eq!(parse_time("90s", now), Ok(now + Duration::from_secs(90)));
        assert_eq!(parse_time("10m", now), Ok(now + Duration::from_mins(10)));
        assert_eq!(parse_time("2h", now), Ok(now + Duration::from_hours(2)));
        assert_eq!(parse_time("30d", now), Ok(now + Duration::from_hours(30 * 24)));
        assert_eq!(
            parse_time("2026-11-25T12:30:00Z", now),
            Ok(SystemTime::UNIX_EPOCH + Duration::from_mins(29_926_830))
        );
        for bad in ["", "10", "m", "-5m", "1y", "tomorrow"] {
            assert!(parse_time(bad, now).is_err(), "{bad}");
        }
    }
}
