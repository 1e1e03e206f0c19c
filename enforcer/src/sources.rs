//! The policy directory as a source of changes. Each pass lists the
//! directory and looks at each file's size, modification time and inode;
//! only a file whose look changed is read, and only a file whose content
//! changed is handed to the engine, so a change to one small file beside a
//! 100,000-rule file costs the small file.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use policy::PolicyError;
use policy::engine::{Contents, SourceChange};
use sha2::{Digest as _, Sha256};

use crate::signing::{self, SigningError, Trust, Verified};

/// Why the policy directory gave no changes.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// With `--trusted-keys`: the files are not the signed set.
    #[error(transparent)]
    Signing(#[from] SigningError),
}

impl DirError {
    /// The `reason` label of `bulkhead_policy_load_errors_total`.
    #[must_use]
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::Policy(_) => "unreadable",
            Self::Signing(error) => error.reason(),
        }
    }
}

/// A policy file's text as the daemon keeps it for `GET /v1/policy`:
/// deflated, since YAML shrinks about tenfold and the engine holds the
/// parsed policy anyway (a 100,000-rule file: about 2 MB, not 20).
#[derive(Debug)]
pub struct StoredSource {
    pub name: String,
    deflated: Vec<u8>,
}

impl StoredSource {
    #[must_use]
    pub fn new(name: &str, text: &str) -> Self {
        let mut deflated = miniz_oxide::deflate::compress_to_vec(text.as_bytes(), 1);
        deflated.shrink_to_fit();
        Self { name: name.to_owned(), deflated }
    }

    /// The text as it was given.
    #[must_use]
    pub fn text(&self) -> String {
        // Only this code deflates, from valid UTF-8; a failure here would
        // be memory corruption, reported rather than hidden.
        miniz_oxide::inflate::decompress_to_vec(&self.deflated).map_or_else(
            |error| format!("# bulkhead: the kept text of this file is damaged ({error:?})\n"),
            |bytes| String::from_utf8_lossy(&bytes).into_owned(),
        )
    }
}

/// What a file looked like when last read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    device: u64,
}

#[derive(Debug)]
struct Seen {
    stamp: Stamp,
    digest: [u8; 32],
    /// The text, for `GET /v1/policy`.
    source: Arc<StoredSource>,
}

/// The files of one policy directory, as last read.
#[derive(Debug)]
pub struct PolicyDir {
    dir: PathBuf,
    files: BTreeMap<String, Seen>,
    /// A directory without policy files is an empty policy, not an error
    /// (with `--kubernetes`, the cluster may be the whole policy).
    empty_allowed: bool,
    /// With `--trusted-keys`: the keys and the version enforced so far.
    trust: Option<Trust>,
    /// The manifest's and its signature's look when last verified.
    signed_stamps: Option<(Option<Stamp>, Option<Stamp>)>,
    /// The set verified last, until [`PolicyDir::enforced`] records it.
    verified: Option<Verified>,
}

impl PolicyDir {
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            empty_allowed: false,
            trust: None,
            signed_stamps: None,
            verified: None,
        }
    }

    /// The same, enforcing only the set signed by a key `trust` holds
    /// (`--trusted-keys`): each pass in which a file, the manifest or the
    /// signature changed verifies the whole set first, with the keys read
    /// anew, and gives no change unless it is the signed set, unexpired and
    /// no older than the version enforced last.
    #[must_use]
    pub fn trusting(mut self, trust: Option<Trust>) -> Self {
        self.trust = trust;
        self
    }

    /// Forgets the set verified last without recording it: the engine
    /// refused it, so its version was never enforced.
    pub fn refused(&mut self) {
        self.verified = None;
    }

    /// With `--trusted-keys`: what a policy set must be signed by.
    #[must_use]
    pub fn trust(&self) -> Option<&Trust> {
        self.trust.as_ref()
    }

    /// Records the set verified last as enforced (its version is the floor
    /// from now on, across restarts). Call once its changes are applied.
    ///
    /// # Errors
    /// The state directory cannot be written.
    pub fn enforced(&mut self) -> Result<(), SigningError> {
        match (self.verified.take(), &self.trust) {
            (Some(verified), Some(trust)) => trust.enforced.set(verified.version),
            _ => Ok(()),
        }
    }

    /// The same, taking a directory without policy files as an empty
    /// policy when `allowed` (it must still be there: a vanished directory
    /// stays an error).
    #[must_use]
    pub fn allowing_empty(mut self, allowed: bool) -> Self {
        self.empty_allowed = allowed;
        self
    }

    /// The files whose content changed since the last call (all of them
    /// the first time): new and changed files with their text, vanished
    /// ones as removed. A file deleted between the listing and its reading
    /// counts as vanished. A directory that is gone or without policy files
    /// is an error, as is a file that cannot be read; then what was seen stays as it
    /// was, so the next call reports every change since the last good one
    /// (a removal too, which a fresh start would not know of).
    pub fn changes(&mut self) -> Result<Vec<SourceChange>, DirError> {
        // The directory itself must be there: listed as a path, a vanished
        // directory would read as one vanished file, and every file it held
        // would seem removed (an empty policy, enforced).
        let dir_error = |source| PolicyError::Read { path: self.dir.clone(), source };
        let metadata = std::fs::metadata(&self.dir).map_err(dir_error)?;
        if !metadata.is_dir() {
            return Err(dir_error(std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory")).into());
        }
        let paths = match policy::list_files(std::slice::from_ref(&self.dir)) {
            Err(PolicyError::NoFiles { .. }) if self.empty_allowed => Vec::new(),
            listed => listed?,
        };
        let mut changes = Vec::new();
        let mut seen = BTreeMap::new();
        for path in paths {
            let name = path.display().to_string();
            let read_error = |source| PolicyError::Read { path: path.clone(), source };
            let Some(metadata) = unless_gone(std::fs::metadata(&path)).map_err(read_error)? else { continue };
            let stamp = stamp_of(&metadata);
            let known = self.files.get(&name);
            if let Some(known) = known
                && known.stamp == stamp
            {
                seen.insert(name, Seen { stamp, digest: known.digest, source: Arc::clone(&known.source) });
                continue;
            }
            let Some(text) = unless_gone(std::fs::read_to_string(&path)).map_err(read_error)? else { continue };
            let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
            let source = match known {
                Some(known) if known.digest == digest => Arc::clone(&known.source),
                _ => {
                    let source = Arc::new(StoredSource::new(&name, &text));
                    changes.push(SourceChange { source: name.clone(), contents: Contents::Text(text) });
                    source
                }
            };
            seen.insert(name, Seen { stamp, digest, source });
        }
        for gone in self.files.keys().filter(|name| !seen.contains_key(*name)) {
            changes.push(SourceChange { source: gone.clone(), contents: Contents::Removed });
        }
        self.verify(&seen, !changes.is_empty())?;
        self.files = seen;
        Ok(changes)
    }

    /// With trust, verifies the set `seen` when it, the manifest or the
    /// signature changed (`changed`: a policy file did).
    fn verify(&mut self, seen: &BTreeMap<String, Seen>, changed: bool) -> Result<(), SigningError> {
        let Some(trust) = &self.trust else { return Ok(()) };
        let stamp = |name: &str| std::fs::metadata(self.dir.join(name)).ok().map(|metadata| stamp_of(&metadata));
        let stamps = (stamp(signing::MANIFEST), stamp(signing::SIGNATURE));
        if !changed && self.signed_stamps.as_ref() == Some(&stamps) {
            return Ok(());
        }
        let files = seen
            .iter()
            .map(|(name, seen)| {
                let file = Path::new(name).file_name().map(|name| name.to_string_lossy().into_owned());
                (file.unwrap_or_else(|| name.clone()), seen.digest)
            })
            .collect();
        let (manifest, signature) = signing::read_signed(&self.dir)?;
        let verified = trust.check(&self.dir, (&manifest, &signature), &files, SystemTime::now())?;
        log::info!(
            "policy set version {} of {} verified: signed by {}",
            verified.version,
            self.dir.display(),
            verified.key.display()
        );
        self.signed_stamps = Some(stamps);
        self.verified = Some(verified);
        Ok(())
    }

    /// The change that brings source `name` to what was last read of it:
    /// its text again (from the kept copy), or its removal once the file is
    /// gone. What a refused change is tried again as, so the daemon need
    /// not hold a second copy of its text meanwhile (15 MB for a
    /// 100,000-rule file, resident for as long as it was held).
    #[must_use]
    pub fn change_for(&self, name: &str) -> SourceChange {
        let contents = self.files.get(name).map_or(Contents::Removed, |seen| Contents::Text(seen.source.text()));
        SourceChange { source: name.to_owned(), contents }
    }

    /// Every file as last read, by name.
    #[must_use]
    pub fn sources(&self) -> Vec<Arc<StoredSource>> {
        self.files.values().map(|seen| Arc::clone(&seen.source)).collect()
    }

    /// Forgets what was read, so the next [`PolicyDir::changes`] reports
    /// every file (after a push replaced the policy, the directory's files
    /// come back whole).
    pub fn forget(&mut self) {
        self.files.clear();
    }
}

fn stamp_of(metadata: &std::fs::Metadata) -> Stamp {
    Stamp { len: metadata.len(), modified: metadata.modified().ok(), inode: metadata.ino(), device: metadata.dev() }
}

/// `None` for a file deleted since the directory was listed.
fn unless_gone<T>(result: std::io::Result<T>) -> std::io::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(changes: &[SourceChange]) -> Vec<(String, bool)> {
        changes
            .iter()
            .map(|c| {
                let file = Path::new(&c.source).file_name().unwrap().to_string_lossy().into_owned();
                (file, matches!(c.contents, Contents::Removed))
            })
            .collect()
    }

    #[test]
    fn only_changed_files_are_reported() {
        let dir = std::env::temp_dir().join(format!("bulkhead-sources-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "a: 1\n").unwrap();
        std::fs::write(dir.join("b.yaml"), "b: 1\n").unwrap();
        std::fs::write(dir.join("notes.txt"), "not policy\n").unwrap();
        let mut policy_dir = PolicyDir::new(&dir);
        assert_eq!(names(&policy_dir.changes().unwrap()), [("a.yaml".into(), false), ("b.yaml".into(), false)]);
        assert!(policy_dir.changes().unwrap().is_empty(), "nothing changed");
        // Rewritten with the same text: read again, but no change.
        std::fs::write(dir.join("a.yaml"), "a: 1\n").unwrap();
        assert!(policy_dir.changes().unwrap().is_empty());
        std::fs::write(dir.join("b.yaml"), "b: 22\n").unwrap();
        std::fs::write(dir.join("c.yml"), "c: 1\n").unwrap();
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        let mut changed = names(&policy_dir.changes().unwrap());
        changed.sort();
        assert_eq!(changed, [("a.yaml".into(), true), ("b.yaml".into(), false), ("c.yml".into(), false)]);
        let kept = policy_dir.sources();
        assert_eq!(kept.len(), 2);
        assert_eq!(kept.iter().map(|s| s.text()).collect::<Vec<_>>(), ["b: 22\n", "c: 1\n"]);
        policy_dir.forget();
        assert_eq!(policy_dir.changes().unwrap().len(), 2, "after forget, every file again");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A pass that fails on one file forgets nothing: a file removed
    /// meanwhile is reported removed once the directory reads again (it
    /// stayed enforced when a failed pass lost track of it).
    #[test]
    fn a_failed_pass_loses_no_removal() {
        let dir = std::env::temp_dir().join(format!("bulkhead-sources-failed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "a: 1\n").unwrap();
        std::fs::write(dir.join("b.yaml"), "b: 1\n").unwrap();
        let mut policy_dir = PolicyDir::new(&dir);
        assert_eq!(policy_dir.changes().unwrap().len(), 2);
        // b.yaml goes, and a file that cannot be read (not UTF-8) comes.
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        std::fs::write(dir.join("bad.yaml"), [0xff, 0xfe, 0x00]).unwrap();
        let error = policy_dir.changes().unwrap_err();
        assert!(error.to_string().contains("bad.yaml"), "{error}");
        std::fs::remove_file(dir.join("bad.yaml")).unwrap();
        assert_eq!(
            names(&policy_dir.changes().unwrap()),
            [("b.yaml".into(), true)],
            "b.yaml's removal, late but not lost"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A directory that is gone is an error, not a directory whose files
    /// were all removed (which would enforce an empty policy); when it
    /// comes back unchanged, nothing changed.
    #[test]
    fn a_vanished_directory_is_an_error_not_an_empty_policy() {
        let dir = std::env::temp_dir().join(format!("bulkhead-sources-gone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "a: 1\n").unwrap();
        let mut policy_dir = PolicyDir::new(&dir);
        assert_eq!(policy_dir.changes().unwrap().len(), 1);
        let away = dir.with_extension("away");
        std::fs::rename(&dir, &away).unwrap();
        let error = policy_dir.changes().unwrap_err();
        assert!(error.to_string().contains(&*dir.to_string_lossy()), "{error}");
        std::fs::rename(&away, &dir).unwrap();
        assert!(policy_dir.changes().unwrap().is_empty(), "back as it was: no change");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
