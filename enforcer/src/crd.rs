//! `SegmentPolicy` as a Kubernetes custom resource: group `bulkhead.dev`,
//! version `v1`, plural `segmentpolicies`, cluster-scoped (its identities
//! and rules span namespaces, as a policy file's do).
//!
//! The resource is the policy file format itself: `spec` holds the same
//! `identities` and `rules`, and a file may say `apiVersion: bulkhead.dev/v1`
//! (README, *Policy format v1*). These types describe that format to the
//! API server; the manifest `deploy/crd/segmentpolicies.bulkhead.dev.yaml`
//! is generated from them ([`manifest`]), and a test fails when the two
//! drift. The schema checks shapes (which fields, of which types); what the
//! policy parser checks beyond that (CIDRs, port specs, names, times, one
//! selector per peer) it still checks, with the same messages, whichever
//! way a policy arrives.

use std::collections::BTreeMap;

use kube::CustomResource;
use kube::core::crd::CustomResourceExt as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `spec` of a `SegmentPolicy`: a policy document's identities and rules.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "bulkhead.dev",
    version = "v1",
    kind = "SegmentPolicy",
    plural = "segmentpolicies",
    shortname = "segpol",
    category = "bulkhead",
    doc = "Identity-labelled segment policy, enforced by Bulkhead on every node: the same document as a policy file."
)]
#[serde(deny_unknown_fields)]
pub struct SegmentPolicySpec {
    /// Named groups of addresses, with labels for selectors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<IdentitySpec>,
    /// Who may reach whom, on which ports; deny rules always win.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
}

/// One identity: a name, labels, and the addresses that carry it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentitySpec {
    /// 1-63 lowercase letters, digits, `-`, `_` or `.`; `world` and `host` are reserved.
    pub name: String,
    /// What label selectors match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// IPv4/IPv6 CIDRs or single addresses, host bits clear; no address may belong to two identities.
    pub addresses: Vec<String>,
    /// `enforce` (the default) or `audit`: traffic towards the identity that
    /// the policy would drop is passed and counted instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ModeSpec>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModeSpec {
    Enforce,
    Audit,
}

/// One rule: from which peers to which, on which ports, allowed or denied.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique across the whole policy.
    pub name: String,
    /// `allow` (the default) or `deny`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<ActionSpec>,
    /// The rule matches when the source matches any of these.
    pub from: Vec<PeerSpec>,
    /// … and the destination any of these.
    pub to: Vec<PeerSpec>,
    /// `N/proto`, `N-M/proto` (tcp, udp), `tcp`, `udp`, `icmp`, `icmpv6`,
    /// `icmp/TYPE`, `icmpv6/TYPE`; omitted: every protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<String>>,
    /// An RFC 3339 time after which the rule lapses by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ActionSpec {
    Allow,
    Deny,
}

/// One peer: an identity by name (or `world`, `host`), identities by
/// labels, or addresses by CIDR with exceptions. One kind per peer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// With `cidr`: addresses inside it that the peer leaves out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<Vec<String>>,
}

/// Where the generated manifest lives in the repository.
pub const MANIFEST_PATH: &str = "deploy/crd/segmentpolicies.bulkhead.dev.yaml";

/// The `CustomResourceDefinition` of [`SegmentPolicy`], as the JSON the API
/// server takes.
#[must_use]
pub fn definition() -> serde_json::Value {
    serde_json::to_value(SegmentPolicy::crd()).unwrap_or_default()
}

/// The manifest as it is kept in the repository: a header saying where it
/// comes from, then the definition as YAML.
#[must_use]
pub fn manifest() -> String {
    let mut out = String::from(
        "# Generated from enforcer/src/crd.rs; do not edit. To regenerate after\n# changing the types: BULKHEAD_WRITE_CRD=1 cargo test -p enforcer crd\n",
    );
    let mut yaml = String::new();
    // Emitting into a String cannot fail.
    let _ = yaml_rust2::YamlEmitter::new(&mut yaml).dump(&to_yaml(&definition()));
    out.push_str(&yaml);
    out.push('\n');
    out
}

/// The same tree for yaml-rust2's emitter (keys stay in `serde_json`'s order,
/// which is sorted: the manifest is the same on every run).
fn to_yaml(value: &serde_json::Value) -> yaml_rust2::Yaml {
    use serde_json::Value;
    use yaml_rust2::Yaml;
    match value {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(*b),
        Value::Number(n) => n.as_i64().map_or_else(|| Yaml::Real(n.to_string()), Yaml::Integer),
        Value::String(s) => Yaml::String(s.clone()),
        Value::Array(items) => Yaml::Array(items.iter().map(to_yaml).collect()),
        Value::Object(map) => Yaml::Hash(map.iter().map(|(k, v)| (Yaml::String(k.clone()), to_yaml(v))).collect()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{MANIFEST_PATH, definition, manifest};

    /// The manifest in deploy/ is exactly what the types generate: change
    /// one, and this fails until the other follows.
    #[test]
    fn crd_manifest_matches_the_types() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(MANIFEST_PATH);
        let generated = manifest();
        if std::env::var_os("BULKHEAD_WRITE_CRD").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &generated).unwrap();
        }
        let kept = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            kept == generated,
            "{MANIFEST_PATH} differs from what enforcer/src/crd.rs generates; regenerate it with BULKHEAD_WRITE_CRD=1 cargo test -p enforcer crd"
        );
    }

    #[test]
    fn crd_names_the_resource_as_the_contract_says() {
        let crd = definition();
        assert_eq!(crd["metadata"]["name"], "segmentpolicies.bulkhead.dev");
        assert_eq!(crd["spec"]["group"], "bulkhead.dev");
        assert_eq!(crd["spec"]["scope"], "Cluster");
        assert_eq!(crd["spec"]["names"]["kind"], "SegmentPolicy");
        let version = &crd["spec"]["versions"][0];
        assert_eq!((version["name"].as_str(), version["served"].as_bool()), (Some("v1"), Some(true)));
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        let peer = &spec["rules"]["items"]["properties"]["from"]["items"]["properties"];
        for field in ["identity", "labels", "cidr", "except"] {
            assert!(peer.get(field).is_some(), "peer field {field}: {peer}");
        }
        assert_eq!(spec["identities"]["items"]["required"], serde_json::json!(["addresses", "name"]));
    }
}
