//! The admin API's request and response bodies: what the daemon's API
//! accepts and the CLI sends. In the library, apart from the server, so
//! that the fuzz targets can feed the daemon's own decoding any bytes.

use serde::{Deserialize, Serialize};

/// What a client certificate may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
}

impl Role {
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

/// Policy files as the API carries them.
#[derive(Serialize, Deserialize)]
pub struct PolicyFiles {
    pub files: Vec<PolicyFile>,
    /// On a push: change only these files and keep the enforced policy's
    /// other files (one change, validated with them), instead of replacing
    /// the whole policy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_others: bool,
    /// The set's signed manifest: required by a daemon that runs with
    /// `--trusted-keys` (see `signing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<SignedSet>,
}

/// A signed manifest and its minisign signature, as the files
/// `.bulkhead-manifest` and `.bulkhead-manifest.minisig` hold them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedSet {
    pub manifest: String,
    pub signature: String,
}

#[derive(Serialize, Deserialize)]
pub struct PolicyFile {
    pub name: String,
    pub text: String,
}

/// `POST /v1/quarantine`.
#[derive(Debug, Serialize, Deserialize)]
pub struct QuarantineRequest {
    pub target: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// A duration from now (`90s`, `15m`, `12h`, `30d`) or an RFC 3339 time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// `GET /v1/quarantine`: what is quarantined, with the addresses each
/// target stands for now.
#[derive(Debug, Serialize, Deserialize)]
pub struct QuarantineList {
    pub quarantined: Vec<crate::quarantine::Entry>,
}

/// `DELETE /v1/quarantine?target=…`.
#[derive(Debug, Deserialize)]
pub struct QuarantineTarget {
    pub target: String,
}

/// `GET /v1/flows?follow=…`.
#[derive(Debug, Deserialize)]
pub struct FlowsQuery {
    #[serde(default)]
    pub follow: bool,
}
