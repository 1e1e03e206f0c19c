//! Kubernetes objects as policy input: the parts of `v1` `Namespace`,
//! `v1` `Pod` and `networking.k8s.io/v1` `NetworkPolicy` that decide who
//! may connect to whom, read from YAML exactly as `kubectl get -o yaml`
//! prints them ([`read_objects`]), and `NetworkPolicy`'s semantics
//! ([`netpol`]), written against the API reference.
//!
//! Only what connectivity depends on is kept; every field the API adds
//! (`managedFields`, `status.conditions`, `uid`, container images, …) is
//! ignored rather than refused, since a cluster snapshot carries all of
//! them. A malformed object, or one this version cannot enforce, is
//! reported and skipped on its own: it never makes the rest invalid.

pub mod netpol;
mod parse;
pub mod translate;

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

pub(crate) use parse::read_object;
pub use parse::read_objects;

use crate::error::Location;
use crate::model::Protocol;

/// The Kubernetes objects of one load.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub network_policies: Vec<NetworkPolicy>,
}

/// A `v1` `Namespace`: its labels are what namespace selectors match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub location: Location,
}

/// A `v1` `Pod`: where it is, what it carries, and the names of its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `status.podIPs` (or `status.podIP` where the list is absent): none
    /// until the pod is scheduled and started.
    pub addresses: Vec<IpAddr>,
    /// Container ports, for named ports in `NetworkPolicy`.
    pub ports: Vec<ContainerPort>,
    pub location: Location,
}

/// One `containerPorts` entry of one of the pod's containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub protocol: PortProtocol,
    pub port: u16,
}

/// The protocols a Kubernetes port may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    Tcp,
    Udp,
    /// Read, but not enforced by this version: a policy port entry for it
    /// matches nothing (reported when read), so it never widens a rule.
    Sctp,
}

impl PortProtocol {
    /// Whether a packet of `protocol` is of this protocol.
    #[must_use]
    pub fn matches(self, protocol: Protocol) -> bool {
        matches!((self, protocol), (PortProtocol::Tcp, Protocol::Tcp) | (PortProtocol::Udp, Protocol::Udp))
    }
}

/// A `networking.k8s.io/v1` `NetworkPolicy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    /// The pods of its namespace the policy applies to.
    pub pod_selector: LabelSelector,
    /// Whether the selected pods are isolated for ingress, for egress:
    /// `policyTypes`, or its default when omitted (ingress always, egress
    /// when the spec has egress rules).
    pub ingress_isolating: bool,
    pub egress_isolating: bool,
    /// Each rule admits what one of its peers and one of its ports match.
    pub ingress: Vec<PolicyRule>,
    pub egress: Vec<PolicyRule>,
    pub location: Location,
}

/// One `ingress` (`from`) or `egress` (`to`) rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    /// Empty: every peer, inside the cluster or not.
    pub peers: Vec<PolicyPeer>,
    /// Empty: every port of every protocol.
    pub ports: Vec<PolicyPort>,
}

/// One `from`/`to` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyPeer {
    /// Pods chosen by labels. Only `pods`: in the policy's own namespace.
    /// Only `namespaces`: every pod of the matching namespaces. Both: the
    /// matching pods of the matching namespaces.
    Pods { pods: Option<LabelSelector>, namespaces: Option<LabelSelector> },
    /// Addresses inside `cidr` and outside every `except`, pods or not.
    IpBlock { cidr: IpNet, except: Vec<IpNet> },
}

/// One `ports` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyPort {
    pub protocol: PortProtocol,
    /// `None`: every port of the protocol.
    pub port: Option<PortRef>,
    /// With a numeric `port`: the last port of the range.
    pub end_port: Option<u16>,
}

/// A port by number, or by the name a destination pod gives one of its
/// container ports (resolved per destination pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// A `metav1.LabelSelector`: every `matchLabels` pair and every
/// requirement must hold; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// Whether `labels` satisfy the selector.
    #[must_use]
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matches_by(|key| labels.get(key).map(String::as_str))
    }

    /// Whether the label set that `get` reads (a key's value, if it has
    /// the key) satisfies the selector.
    pub fn matches_by<'l>(&self, get: impl Fn(&str) -> Option<&'l str>) -> bool {
        self.match_labels.iter().all(|(key, value)| get(key) == Some(value.as_str()))
            && self.match_expressions.iter().all(|requirement| requirement.matches_value(get(&requirement.key)))
    }
}

impl Requirement {
    #[must_use]
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matches_value(labels.get(&self.key).map(String::as_str))
    }

    /// Whether a label set whose value for the key is `value` satisfies it.
    #[must_use]
    pub fn matches_value(&self, value: Option<&str>) -> bool {
        let listed = |value: &str| self.values.iter().any(|listed| listed == value);
        match self.operator {
            Operator::In => value.is_some_and(listed),
            // As Kubernetes defines it: a pod without the key is not in
            // the set, so `NotIn` matches it.
            Operator::NotIn => value.is_none_or(|value| !listed(value)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl crate::model::PodPeer {
    /// Whether a pod of namespace `namespace` (labelled
    /// `namespace_labels`, when known) carrying labels that `pod_label`
    /// reads is chosen. A namespace always carries its name as the label
    /// [`netpol::NAMESPACE_NAME_LABEL`], as the API server sets it.
    pub fn matches_by<'l>(
        &self,
        namespace: &'l str,
        namespace_labels: impl Fn(&str) -> Option<&'l str>,
        pod_label: impl Fn(&str) -> Option<&'l str>,
    ) -> bool {
        let in_namespace = match &self.namespaces {
            crate::model::NamespaceScope::Named(name) => name == namespace,
            crate::model::NamespaceScope::Matching(selector) => selector.matches_by(|key| {
                if key == netpol::NAMESPACE_NAME_LABEL { Some(namespace) } else { namespace_labels(key) }
            }),
        };
        in_namespace && self.pods.matches_by(pod_label)
    }

    /// Whether `identity` is a pod this peer chooses; `namespace` is the
    /// pod's namespace, if it was given.
    #[must_use]
    pub fn selects(&self, identity: &crate::model::Identity, namespace: Option<&Namespace>) -> bool {
        identity.pod.as_ref().is_some_and(|pod| {
            self.matches_by(
                &pod.namespace,
                |key| namespace.and_then(|n| n.labels.get(key)).map(String::as_str),
                |key| identity.labels.get(key).map(String::as_str),
            )
        })
    }
}

impl Objects {
    /// The namespace named `name`, if it was given.
    #[must_use]
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.iter().find(|namespace| namespace.name == name)
    }

    /// The pod that has `address`, if any.
    #[must_use]
    pub fn pod_at(&self, address: IpAddr) -> Option<&Pod> {
        self.pods.iter().find(|pod| pod.addresses.contains(&address))
    }
}
