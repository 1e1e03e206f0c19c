//! The policy as written, after parsing: identities and rules with the
//! positions they came from.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use ipnet::IpNet;

use crate::error::Location;

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
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub addresses: Vec<Address>,
    /// How policy drops of traffic towards this identity are handled.
    pub mode: Mode,
    pub location: Location,
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
    /// When the rule lapses by itself (just-in-time access).
    pub expires: Option<SystemTime>,
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
