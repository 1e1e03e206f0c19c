//! The policy as written, after parsing: identities and rules with the
//! positions they came from.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use ipnet::IpNet;

use crate::error::Location;
use crate::kubernetes::{LabelSelector, Namespace};

/// Reserved identity of addresses that belong to no declared identity.
pub const WORLD: &str = "world";
/// Reserved identity of the node's own addresses.
pub const HOST: &str = "host";

/// All policy documents of one load, merged.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `metadata.name` of every document, in load order.
    pub documents: Vec<String>,
    pub identities: Vec<Identity>,
    pub rules: Vec<Rule>,
    /// Kubernetes namespaces: their labels are what `namespaceSelector`s
    /// match.
    pub namespaces: Vec<Namespace>,
    /// What was read but is skipped or not enforced, reported beside the
    /// policy (Kubernetes objects of other kinds, SCTP ports).
    pub notes: Vec<crate::error::Diagnostic>,
}

impl Policy {
    /// The namespace of a pod identity, if it was given.
    #[must_use]
    pub fn pod_namespace(&self, identity: &Identity) -> Option<&Namespace> {
        let pod = identity.pod.as_ref()?;
        self.namespaces.iter().find(|namespace| namespace.name == pod.namespace)
    }
}

/// Which identities are isolated: judged by rules, with what no rule
/// admits dropped. The other identities are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Enforcement {
    /// Zero trust: every identity is isolated in both directions, as if
    /// every namespace had a default-deny `NetworkPolicy` for ingress and
    /// egress. A connection passes only where rules admit it.
    #[default]
    Always,
    /// As Kubernetes defines `NetworkPolicy`: a pod is isolated for ingress
    /// (egress) only while an ingress (egress) rule selects it; every other
    /// identity, `world` and `host` included, is open. `SegmentPolicy`
    /// rules isolate nothing: an allow rule admits its connections on both
    /// ends, a deny rule drops them whatever else admits them.
    Default,
}

impl Enforcement {
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "always" => Some(Self::Always),
            "default" => Some(Self::Default),
            _ => None,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::Default => "default",
        }
    }
}

/// Whom a rule speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum Side {
    /// The connection itself (a `SegmentPolicy` rule): an allow admits it
    /// on both ends.
    #[default]
    Both,
    /// Its destination only (a `NetworkPolicy` ingress rule): the
    /// identities its `to` selects are isolated for ingress, and admit
    /// what it allows; the source's egress side must admit it too.
    Ingress,
    /// Its source only (a `NetworkPolicy` egress rule), likewise.
    Egress,
}

/// What a Kubernetes pod adds to its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    /// Container ports that have a name, for named ports in rules, sorted.
    pub ports: Vec<NamedPort>,
    /// The pod's own name. Its identity is shared by every pod of its
    /// namespace with the same labels and named ports (see
    /// [`crate::kubernetes::translate`]), so this is what names the pod.
    pub name: String,
}

/// A container port with a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A port a rule names, looked up among the destination pod's ports.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortName {
    pub protocol: Protocol,
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub addresses: Vec<Address>,
    /// How policy drops of traffic towards this identity are handled.
    pub mode: Mode,
    /// Set for a Kubernetes pod: its namespace and named ports.
    pub pod: Option<PodInfo>,
    pub location: Location,
}

impl Identity {
    /// Whether `self` and `other` are pods alike in all the policy can see
    /// of them (namespace, labels, named ports, mode): two such declarations
    /// of one name are one identity, with the addresses of both.
    #[must_use]
    pub fn is_pod_like(&self, other: &Identity) -> bool {
        PodInfo::alike(self.pod.as_ref(), other.pod.as_ref()) && self.labels == other.labels && self.mode == other.mode
    }
}

impl PodInfo {
    /// Whether both are pods of one namespace with the same named ports
    /// (their own names aside).
    #[must_use]
    pub fn alike(a: Option<&PodInfo>, b: Option<&PodInfo>) -> bool {
        a.zip(b).is_some_and(|(a, b)| a.namespace == b.namespace && a.ports == b.ports)
    }
}

/// Enforcement mode of an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum Mode {
    /// Drop what the policy does not admit.
    #[default]
    Enforce,
    /// Pass it, and count it with the reason it would have been dropped for.
    Audit,
}

/// One entry of an identity's `addresses`.
#[derive(Debug, Clone)]
pub struct Address {
    pub net: IpNet,
    pub location: Location,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    pub from: Vec<Peer>,
    pub to: Vec<Peer>,
    /// `None` when `ports` is omitted: the rule covers every protocol.
    pub ports: Option<Vec<PortSpec>>,
    /// Ports by name, besides `ports` (which is then `Some`): each is the
    /// destination pod's container port of that name and protocol, if it
    /// has one.
    pub named_ports: Vec<PortName>,
    /// When the rule lapses by itself (just-in-time access).
    pub expires: Option<SystemTime>,
    /// Whom the rule speaks for: the connection, or one of its ends.
    pub side: Side,
    pub location: Location,
}

impl Rule {
    /// Whether the rule is in force at `now`.
    #[must_use]
    pub fn is_active_at(&self, now: SystemTime) -> bool {
        self.expires.is_none_or(|expires| now < expires)
    }
}

#[derive(Debug, Clone)]
pub struct Peer {
    pub selector: Selector,
    pub location: Location,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    /// A declared identity, or the reserved `world`.
    Identity(String),
    /// Every declared identity carrying all of these labels.
    Labels(BTreeMap<String, String>),
    /// Every address inside `cidr` and outside all of `except`.
    Cidr { cidr: IpNet, except: Vec<IpNet> },
    /// Kubernetes pods, by namespace and labels.
    Pods(PodPeer),
}

/// Pods a `NetworkPolicy` peer (or its `podSelector`) chooses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodPeer {
    pub namespaces: NamespaceScope,
    /// Empty: every pod of those namespaces.
    pub pods: LabelSelector,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamespaceScope {
    /// The one namespace of this name.
    Named(String),
    /// Every namespace whose labels match (its name is the label
    /// `kubernetes.io/metadata.name`).
    Matching(LabelSelector),
}

/// A protocol a rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl Protocol {
    /// IP protocol number.
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmp => 1,
            Protocol::Icmpv6 => 58,
        }
    }

    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "icmp" => Some(Protocol::Icmp),
            "icmpv6" => Some(Protocol::Icmpv6),
            _ => None,
        }
    }

    /// Whether the protocol has ports a rule can restrict.
    #[must_use]
    pub const fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::Icmpv6 => "icmpv6",
        })
    }
}

/// One entry of a rule's `ports`: a protocol and an inclusive port range
/// (for ICMP, the `type << 8 | code` range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

/// ICMP message type names usable as `icmp/NAME`.
pub const ICMP_TYPES: [(&str, u8); 10] = [
    ("echo-reply", 0),
    ("destination-unreachable", 3),
    ("redirect", 5),
    ("echo-request", 8),
    ("router-advertisement", 9),
    ("router-solicitation", 10),
    ("time-exceeded", 11),
    ("parameter-problem", 12),
    ("timestamp", 13),
    ("timestamp-reply", 14),
];

/// `ICMPv6` message type names usable as `icmpv6/NAME`.
pub const ICMPV6_TYPES: [(&str, u8); 11] = [
    ("destination-unreachable", 1),
    ("packet-too-big", 2),
    ("time-exceeded", 3),
    ("parameter-problem", 4),
    ("echo-request", 128),
    ("echo-reply", 129),
    ("router-solicitation", 133),
    ("router-advertisement", 134),
    ("neighbor-solicitation", 135),
    ("neighbor-advertisement", 136),
    ("redirect", 137),
];

impl Protocol {
    /// The type table of an ICMP protocol.
    #[must_use]
    pub fn icmp_types(self) -> &'static [(&'static str, u8)] {
        match self {
            Protocol::Icmp => &ICMP_TYPES,
            Protocol::Icmpv6 => &ICMPV6_TYPES,
            Protocol::Tcp | Protocol::Udp => &[],
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.protocol.has_ports() && self.first.trailing_zeros() >= 8 && self.last == self.first | 0xff {
            let icmp_type = (self.first >> 8) as u8;
            match self.protocol.icmp_types().iter().find(|(_, t)| *t == icmp_type) {
                Some((name, _)) => write!(f, "{}/{name}", self.protocol),
                None => write!(f, "{}/{icmp_type}", self.protocol),
            }
        } else if self.first == 0 && self.last == u16::MAX {
            write!(f, "{}", self.protocol)
        } else if self.first == self.last {
            write!(f, "{}/{}", self.first, self.protocol)
        } else {
            write!(f, "{}-{}/{}", self.first, self.last, self.protocol)
        }
    }
}
