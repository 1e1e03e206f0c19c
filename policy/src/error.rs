//! Policy errors. Every problem in a policy file becomes a [`Diagnostic`]
//! with its position, so an operator can jump straight to it.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// A position in a policy file; line and column start at 1.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    pub file: Arc<str>,
    /// 1-based; `u32`, not `usize`: a policy keeps a location for every
    /// identity, address, rule and peer.
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// One problem in a policy, printed as `file:line:col: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub location: Location,
    pub message: String,
}

impl Diagnostic {
    pub fn new(location: Location, message: impl Into<String>) -> Self {
        Self { location, message: message.into() }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy path {path}: {source}; check that it exists and is readable")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no policy files (*.yaml, *.yml) found in {}; add at least one SegmentPolicy file", .paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    NoFiles { paths: Vec<PathBuf> },
    #[error("policy has {} problem(s):\n{}", .diagnostics.len(), .diagnostics.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid { diagnostics: Vec<Diagnostic> },
}

impl PolicyError {
    /// The positioned problems, if this is a validation failure.
    #[must_use]
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            PolicyError::Invalid { diagnostics } => diagnostics,
            _ => &[],
        }
    }
}
