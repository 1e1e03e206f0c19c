//! Kubernetes objects as the identities and rules the engine compiles.
//!
//! - A pod's identity is derived from its namespace, its labels and its
//!   named container ports, which is all a policy can select it by: every
//!   pod alike in these is one identity holding all their addresses, as
//!   Cilium has it. The replicas of a Deployment are one identity, so a
//!   rule between two sets of pods costs an entry per pair of *kinds* of
//!   pod, not per pair of pods, and metrics are labelled by kind. The name
//!   is `namespace/{key=value,…}` with the labels sorted by key, followed
//!   by `[port-name=port/protocol,…]` when the pod has named ports, e.g.
//!   `shop/{app=web,pod-template-hash=7c9d}[http=8080/tcp]` (no policy file
//!   can declare such a name: file names have no `/`). The pod's own name
//!   goes along ([`PodInfo::name`]) for events and `policy explain`, with
//!   its namespace and named ports, for `namespaceSelector`s and named
//!   ports.
//! - A `NetworkPolicy` rule is a rule that speaks for one end
//!   ([`Side::Ingress`] or [`Side::Egress`]): its `to` (`from`) is the
//!   policy's `podSelector` in its namespace, which it isolates for that
//!   direction. A policy that isolates a direction without rules for it
//!   becomes one rule that selects no peer: it isolates, and admits nothing.
//! - Rules are named `namespace/policy#ingress-N` (`#egress-N`), N counting
//!   from 0 in the order written; a rule that only isolates is
//!   `namespace/policy#ingress` (`#egress`).
//!
//! Each object is translated alone: a namespace's labels are matched by the
//! engine when it selects, so a namespace relabelled changes no pod.

use ipnet::IpNet;

use super::{NetworkPolicy, Objects, Pod, PolicyPeer, PolicyPort, PolicyRule, PortProtocol, PortRef};
use crate::error::Location;
use crate::model::{
    Action, Address, Identity, Mode, NamedPort, NamespaceScope, Peer, PodInfo, PodPeer, Policy, PortName, PortSpec,
    Protocol, Rule, Selector, Side,
};

/// The identity name of the pods of `namespace` with these labels and
/// named ports (sorted): see the module's documentation.
#[must_use]
pub fn pod_identity_name<'a>(
    namespace: &str,
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    ports: &[NamedPort],
) -> String {
    use std::fmt::Write as _;
    let mut name = format!("{namespace}/{{");
    for (n, (key, value)) in labels.into_iter().enumerate() {
        let comma = if n == 0 { "" } else { "," };
        let _ = write!(name, "{comma}{key}={value}");
    }
    name.push('}');
    for (n, port) in ports.iter().enumerate() {
        let open = if n == 0 { "[" } else { "," };
        let _ = write!(name, "{open}{}={}/{}", port.name, port.port, port.protocol);
    }
    if !ports.is_empty() {
        name.push(']');
    }
    name
}

/// The identity of one pod.
#[must_use]
pub fn pod_identity(pod: &Pod) -> Identity {
    let addresses = pod
        .addresses
        .iter()
        .map(|address| Address { net: IpNet::from(*address), location: pod.location.clone() })
        .collect();
    let mut ports: Vec<NamedPort> = pod
        .ports
        .iter()
        .filter_map(|port| {
            let name = port.name.clone()?;
            let protocol = protocol(port.protocol)?;
            Some(NamedPort { name, protocol, port: port.port })
        })
        .collect();
    ports.sort();
    ports.dedup();
    Identity {
        name: pod_identity_name(&pod.namespace, &pod.labels, &ports),
        labels: pod.labels.clone(),
        addresses,
        mode: Mode::Enforce,
        pod: Some(PodInfo { namespace: pod.namespace.clone(), ports, name: pod.name.clone() }),
        location: pod.location.clone(),
    }
}

/// The rules of one `NetworkPolicy`.
#[must_use]
pub fn policy_rules(policy: &NetworkPolicy) -> Vec<Rule> {
    let selected = Peer {
        selector: Selector::Pods(PodPeer {
            namespaces: NamespaceScope::Named(policy.namespace.clone()),
            pods: policy.pod_selector.clone(),
        }),
        location: policy.location.clone(),
    };
    let base = format!("{}/{}", policy.namespace, policy.name);
    let mut rules = Vec::new();
    for (side, isolating, written) in [
        (Side::Ingress, policy.ingress_isolating, &policy.ingress),
        (Side::Egress, policy.egress_isolating, &policy.egress),
    ] {
        // A policy type the policy does not isolate for: its rules, if it
        // has any, are ignored, as Kubernetes ignores them.
        if !isolating {
            continue;
        }
        let direction = if side == Side::Ingress { "ingress" } else { "egress" };
        let one_end = |name: String, peers: Vec<Peer>, ports: Option<Vec<PortSpec>>, named_ports: Vec<PortName>| {
            let (from, to) =
                if side == Side::Ingress { (peers, vec![selected.clone()]) } else { (vec![selected.clone()], peers) };
            Rule {
                name,
                action: Action::Allow,
                from,
                to,
                ports,
                named_ports,
                expires: None,
                side,
                location: policy.location.clone(),
            }
        };
        if written.is_empty() {
            rules.push(one_end(format!("{base}#{direction}"), Vec::new(), None, Vec::new()));
        }
        for (index, rule) in written.iter().enumerate() {
            let (ports, named_ports) = rule_ports(rule);
            rules.push(one_end(
                format!("{base}#{direction}-{index}"),
                peers(policy, rule, &policy.location),
                ports,
                named_ports,
            ));
        }
    }
    rules
}

/// The peers of one rule: none written is every address.
fn peers(policy: &NetworkPolicy, rule: &PolicyRule, location: &Location) -> Vec<Peer> {
    let peer = |selector| Peer { selector, location: location.clone() };
    if rule.peers.is_empty() {
        return ["0.0.0.0/0", "::/0"]
            .into_iter()
            .filter_map(|net| net.parse().ok())
            .map(|cidr| peer(Selector::Cidr { cidr, except: Vec::new() }))
            .collect();
    }
    rule.peers
        .iter()
        .map(|written| match written {
            PolicyPeer::IpBlock { cidr, except } => peer(Selector::Cidr { cidr: *cidr, except: except.clone() }),
            PolicyPeer::Pods { pods, namespaces } => peer(Selector::Pods(PodPeer {
                namespaces: namespaces
                    .clone()
                    .map_or_else(|| NamespaceScope::Named(policy.namespace.clone()), NamespaceScope::Matching),
                pods: pods.clone().unwrap_or_default(),
            })),
        })
        .collect()
}

/// The ports of one rule: none written is every port of every protocol
/// (`None`); an SCTP entry adds nothing.
fn rule_ports(rule: &PolicyRule) -> (Option<Vec<PortSpec>>, Vec<PortName>) {
    if rule.ports.is_empty() {
        return (None, Vec::new());
    }
    let mut numbered = Vec::new();
    let mut named = Vec::new();
    for PolicyPort { protocol: written, port, end_port } in &rule.ports {
        let Some(protocol) = protocol(*written) else { continue };
        match port {
            None => numbered.push(PortSpec { protocol, first: 0, last: u16::MAX }),
            Some(PortRef::Number(first)) => {
                numbered.push(PortSpec { protocol, first: *first, last: end_port.unwrap_or(*first) });
            }
            Some(PortRef::Name(name)) => named.push(PortName { protocol, name: name.clone() }),
        }
    }
    (Some(numbered), named)
}

fn protocol(protocol: PortProtocol) -> Option<Protocol> {
    match protocol {
        PortProtocol::Tcp => Some(Protocol::Tcp),
        PortProtocol::Udp => Some(Protocol::Udp),
        PortProtocol::Sctp => None,
    }
}

/// Every object of `objects` as policy.
#[must_use]
pub fn translate(objects: &Objects) -> Policy {
    let mut policy = Policy::default();
    policy.identities.extend(objects.pods.iter().map(pod_identity));
    for network_policy in &objects.network_policies {
        policy.rules.extend(policy_rules(network_policy));
    }
    policy.namespaces.extend(objects.namespaces.iter().cloned());
    policy
}
