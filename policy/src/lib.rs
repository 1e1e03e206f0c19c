//! Bulkhead segment policy: parse, validate, compile, and evaluate.
//!
//! Pure Rust with no knowledge of aya or the kernel: it turns policy files
//! into plain map entries ([`compile::CompiledPolicy`]) that the daemon
//! writes, and its reference evaluator ([`eval::Evaluator`]) is the
//! specification the kernel program is tested against.

pub mod compile;
pub mod diff;
pub mod engine;
pub mod error;
pub mod eval;
pub mod kubernetes;
pub mod model;
mod parse;
pub mod target;
mod validate;
pub mod yaml;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use compile::{CompiledPolicy, IdAssigner, compile, compile_at, compile_enforcing, compile_stable};
pub use engine::{Contents, Engine, EntryDiff, SourceChange};
pub use error::{Diagnostic, Location, PolicyError};
pub use eval::{Decision, Evaluator, Packet, Verdict};
pub use model::Policy;
pub use parse::{API_VERSION, CRD_API_VERSION, KIND, rfc3339 as parse_rfc3339};

/// One policy file's name and contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub text: String,
}

/// Parses and validates policy sources as one merged policy.
pub fn parse_sources(sources: &[Source]) -> Result<Policy, PolicyError> {
    let mut policy = Policy::default();
    let mut problems = Vec::new();
    for source in sources {
        let file: Arc<str> = Arc::from(source.name.as_str());
        parse::parse_file(&file, &source.text, &mut policy, &mut problems);
    }
    validate::validate(&policy, &mut problems);
    if problems.is_empty() {
        Ok(policy)
    } else {
        problems.sort_by(|a, b| a.location.cmp(&b.location));
        problems.dedup();
        Err(PolicyError::Invalid { diagnostics: problems })
    }
}

/// Validates an already parsed policy (as [`parse_sources`] does after
/// parsing).
pub fn validate(policy: &Policy) -> Result<(), PolicyError> {
    let mut problems = Vec::new();
    validate::validate(policy, &mut problems);
    if problems.is_empty() {
        Ok(())
    } else {
        problems.sort_by(|a, b| a.location.cmp(&b.location));
        problems.dedup();
        Err(PolicyError::Invalid { diagnostics: problems })
    }
}

/// What is valid but likely unintended in a policy that validates: peers
/// that select no identity yet (see [`Engine::unmatched_peers`]), in
/// position order.
#[must_use]
pub fn warnings(policy: &Policy) -> Vec<Diagnostic> {
    validate::warnings(policy)
}

/// Parses and validates one policy text; `name` is used in positions.
pub fn parse_str(name: &str, text: &str) -> Result<Policy, PolicyError> {
    parse_sources(&[Source { name: name.to_owned(), text: text.to_owned() }])
}

/// Whether a directory entry named `name` is a policy file: `*.yaml` or
/// `*.yml`, not hidden (hidden files beside the policy, such as a signed
/// set's manifest, are never read as policy).
#[must_use]
pub fn is_policy_file_name(name: &str) -> bool {
    !name.starts_with('.') && Path::new(name).extension().is_some_and(|ext| ext == "yaml" || ext == "yml")
}

/// The policy files at `paths`: each path is a file, or a directory whose
/// `*.yaml` and `*.yml` files (not hidden, not recursive) are taken in name
/// order. A Kubernetes `ConfigMap` mount works as is: its files are
/// symlinks into a hidden `..data` directory.
pub fn list_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, PolicyError> {
    let mut files = Vec::new();
    for path in paths {
        let read_error = |source| PolicyError::Read { path: path.clone(), source };
        if path.is_dir() {
            let mut found = Vec::new();
            for entry in std::fs::read_dir(path).map_err(read_error)? {
                let entry = entry.map_err(read_error)?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if is_policy_file_name(&name) && entry.path().is_file() {
                    found.push(entry.path());
                }
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    if files.is_empty() {
        return Err(PolicyError::NoFiles { paths: paths.to_vec() });
    }
    Ok(files)
}

/// Reads the policy files at `paths` (see [`list_files`]).
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<Source>, PolicyError> {
    list_files(paths)?
        .into_iter()
        .map(|file| {
            let text =
                std::fs::read_to_string(&file).map_err(|source| PolicyError::Read { path: file.clone(), source })?;
            Ok(Source { name: file.display().to_string(), text })
        })
        .collect()
}

/// Reads, parses and validates the policy at `paths`.
pub fn load(paths: &[PathBuf]) -> Result<Policy, PolicyError> {
    parse_sources(&read_sources(paths)?)
}
