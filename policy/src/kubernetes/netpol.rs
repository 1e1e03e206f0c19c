//! `NetworkPolicy` v1 as the API reference defines it: the specification the
//! compiled entries, and the kernel, are tested against.
//!
//! - A pod is isolated for ingress (egress) when some `NetworkPolicy` of its
//!   namespace selects it with that policy type; a pod no policy selects
//!   for a direction is open in that direction.
//! - An isolated pod admits, in that direction, what any rule of any
//!   policy selecting it admits: policies add up, none takes away.
//! - A connection needs both sides: the egress side of its source and the
//!   ingress side of its destination (an address that is no pod has no
//!   side to ask).
//! - A rule admits a peer when one of its `from`/`to` entries matches it
//!   (none given: every peer) on one of its ports (none given: every port
//!   of every protocol). A named port is looked up among the destination
//!   pod's container ports, for ingress and egress alike.
//! - A namespace that was not given is known by the label the API server
//!   puts on every namespace, `kubernetes.io/metadata.name`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::{LabelSelector, NetworkPolicy, Objects, Pod, PolicyPeer, PolicyPort, PolicyRule, PortRef};
use crate::model::Protocol;

/// The label every namespace carries with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// One direction's judgement of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
    /// The address is no pod, or no policy selects the pod for this
    /// direction: open.
    Open,
    /// Isolated, and a rule of this policy (`namespace/name`; the first in
    /// name order) admits the connection.
    Allowed { policy: String },
    /// Isolated by these policies (`namespace/name`), and no rule of
    /// theirs admits the connection.
    Denied { isolated_by: Vec<String> },
}

impl Side {
    #[must_use]
    pub fn admits(&self) -> bool {
        !matches!(self, Side::Denied { .. })
    }
}

/// How `NetworkPolicy` judges a connection: both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    /// The source pod's egress side.
    pub egress: Side,
    /// The destination pod's ingress side.
    pub ingress: Side,
}

impl Judgement {
    /// Whether the connection may be opened.
    #[must_use]
    pub fn allowed(&self) -> bool {
        self.egress.admits() && self.ingress.admits()
    }
}

/// What a connection is judged by: its two addresses, its protocol and
/// its destination port (0 for protocols without ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    pub source: IpAddr,
    pub destination: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Copy)]
enum Direction {
    Ingress,
    Egress,
}

/// Judges `connection` by the `NetworkPolicies` of `objects`.
#[must_use]
pub fn judge(objects: &Objects, connection: &Connection) -> Judgement {
    let source = objects.pod_at(connection.source);
    let destination = objects.pod_at(connection.destination);
    Judgement {
        egress: source.map_or(Side::Open, |pod| side(objects, pod, Direction::Egress, connection, destination)),
        ingress: destination.map_or(Side::Open, |pod| side(objects, pod, Direction::Ingress, connection, destination)),
    }
}

/// The side of `pod` (the source for egress, the destination for ingress).
fn side(
    objects: &Objects,
    pod: &Pod,
    direction: Direction,
    connection: &Connection,
    destination: Option<&Pod>,
) -> Side {
    let mut isolating: Vec<&NetworkPolicy> = objects
        .network_policies
        .iter()
        .filter(|policy| policy.namespace == pod.namespace && policy.pod_selector.matches(&pod.labels))
        .filter(|policy| match direction {
            Direction::Ingress => policy.ingress_isolating,
            Direction::Egress => policy.egress_isolating,
        })
        .collect();
    if isolating.is_empty() {
        return Side::Open;
    }
    isolating.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    // The other end: its address, and the pod there if it is one.
    let (peer_address, peer_pod) = match direction {
        Direction::Ingress => (connection.source, objects.pod_at(connection.source)),
        Direction::Egress => (connection.destination, destination),
    };
    for policy in &isolating {
        let rules = match direction {
            Direction::Ingress => &policy.ingress,
            Direction::Egress => &policy.egress,
        };
        let admits = |rule: &PolicyRule| {
            (rule.peers.is_empty()
                || rule.peers.iter().any(|peer| peer_matches(objects, policy, peer, peer_address, peer_pod)))
                && (rule.ports.is_empty() || rule.ports.iter().any(|port| port_matches(port, connection, destination)))
        };
        if rules.iter().any(admits) {
            return Side::Allowed { policy: format!("{}/{}", policy.namespace, policy.name) };
        }
    }
    Side::Denied { isolated_by: isolating.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect() }
}

fn peer_matches(
    objects: &Objects,
    policy: &NetworkPolicy,
    peer: &PolicyPeer,
    address: IpAddr,
    pod: Option<&Pod>,
) -> bool {
    match peer {
        PolicyPeer::IpBlock { cidr, except } => {
            cidr.contains(&address) && !except.iter().any(|excepted| excepted.contains(&address))
        }
        PolicyPeer::Pods { pods, namespaces } => {
            let Some(pod) = pod else { return false };
            let in_namespace = match namespaces {
                None => pod.namespace == policy.namespace,
                Some(selector) => namespace_matches(objects, &pod.namespace, selector),
            };
            in_namespace && pods.as_ref().is_none_or(|selector| selector.matches(&pod.labels))
        }
    }
}

fn namespace_matches(objects: &Objects, name: &str, selector: &LabelSelector) -> bool {
    match objects.namespace(name) {
        Some(namespace) => {
            // The API server adds the name label to every namespace; a
            // snapshot may predate it, so it is assumed either way.
            let mut labels = namespace.labels.clone();
            labels.entry(NAMESPACE_NAME_LABEL.to_owned()).or_insert_with(|| name.to_owned());
            selector.matches(&labels)
        }
        None => selector.matches(&BTreeMap::from([(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned())])),
    }
}

fn port_matches(port: &PolicyPort, connection: &Connection, destination: Option<&Pod>) -> bool {
    if !port.protocol.matches(connection.protocol) {
        return false;
    }
    match &port.port {
        None => true,
        Some(PortRef::Number(first)) => (*first..=port.end_port.unwrap_or(*first)).contains(&connection.port),
        Some(PortRef::Name(name)) => destination.is_some_and(|pod| {
            pod.ports.iter().any(|container| {
                container.name.as_deref() == Some(name.as_str())
                    && container.protocol.matches(connection.protocol)
                    && container.port == connection.port
            })
        }),
    }
}
