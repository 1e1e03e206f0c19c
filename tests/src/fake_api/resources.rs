//! The resource types the fake server knows, and the discovery documents that
//! describe them to kubectl and kube-rs.

use serde_json::{Value, json};

/// One served resource type, as discovery describes it.
#[derive(Debug)]
pub(crate) struct ResourceType {
    /// Empty for the core (legacy `/api`) group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub short_names: &'static [&'static str],
    pub namespaced: bool,
    /// Field selector labels beyond `metadata.name` and `metadata.namespace`,
    /// as the real server allows them for this type.
    pub fields: &'static [&'static str],
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_owned() } else { format!("{}/{}", self.group, self.version) }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    fn discovery_entry(&self) -> Value {
        json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            // Only what the fake serves: the API is read-only to clients, the
            // test changes the cluster through its handle.
            "verbs": ["get", "list", "watch"],
            "shortNames": self.short_names,
        })
    }
}

pub(crate) const NAMESPACES: usize = 0;

pub(crate) static RESOURCES: [ResourceType; 5] = [
    ResourceType {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        short_names: &["ns"],
        namespaced: false,
        fields: &["status.phase"],
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        singular: "pod",
        short_names: &["po"],
        namespaced: true,
        fields: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
    },
    ResourceType {
        group: "networking.k8s.io",
        version: "v1",
        kind: "NetworkPolicy",
        plural: "networkpolicies",
        singular: "networkpolicy",
        short_names: &["netpol"],
        namespaced: true,
        fields: &[],
    },
    ResourceType {
        group: "bulkhead.dev",
        version: "v1",
        kind: "SegmentPolicy",
        plural: "segmentpolicies",
        singular: "segmentpolicy",
        short_names: &["segpol"],
        namespaced: false,
        fields: &[],
    },
    // The one type clients may create (POST): what a daemon reports on an
    // object it refuses.
    ResourceType {
        group: "events.k8s.io",
        version: "v1",
        kind: "Event",
        plural: "events",
        singular: "event",
        short_names: &["ev"],
        namespaced: true,
        fields: &[],
    },
];

/// The index into [`RESOURCES`] of the type with this apiVersion and kind.
pub(crate) fn by_kind(api_version: &str, kind: &str) -> Option<usize> {
    RESOURCES.iter().position(|r| r.kind == kind && r.api_version() == api_version)
}

/// The index into [`RESOURCES`] of the type served at this group, version and plural.
pub(crate) fn by_path(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES.iter().position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The groups under `/apis`, in the order discovery lists them.
fn named_groups() -> Vec<&'static str> {
    let mut groups: Vec<&'static str> = RESOURCES.iter().map(|r| r.group).filter(|g| !g.is_empty()).collect();
    groups.dedup();
    groups
}

/// `/version`: kubectl prints it and client-go checks that it parses.
pub(crate) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-bulkhead-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `/api`: the legacy core group's versions.
pub(crate) fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn api_group(name: &str) -> Value {
    let group_version = format!("{name}/v1");
    json!({
        "name": name,
        "versions": [{"groupVersion": group_version, "version": "v1"}],
        "preferredVersion": {"groupVersion": group_version, "version": "v1"},
    })
}

/// `/apis`: every named group (one version each).
pub(crate) fn api_group_list() -> Value {
    let groups: Vec<Value> = named_groups().into_iter().map(api_group).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`, or `None` for a group the server does not have.
pub(crate) fn api_group_document(name: &str) -> Option<Value> {
    named_groups().contains(&name).then(|| {
        let mut group = api_group(name);
        group["kind"] = json!("APIGroup");
        group["apiVersion"] = json!("v1");
        group
    })
}

/// `/api/v1` or `/apis/{group}/{version}`, or `None` if nothing is served there.
pub(crate) fn api_resource_list(group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(ResourceType::discovery_entry)
        .collect();
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}))
}
