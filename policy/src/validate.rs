//! Checks that need the whole merged policy: unique names and
//! non-overlapping identity addresses (errors), and selectors that match
//! nothing yet (warnings: a rule may be applied before what it names
//! exists, as a Kubernetes network policy may be applied before its pods).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ipnet::IpNet;

use crate::error::Diagnostic;
use crate::model::{HOST, Identity, Policy, Selector, WORLD};

pub fn validate(policy: &Policy, problems: &mut Vec<Diagnostic>) {
    let mut identity_names: HashMap<&str, &Identity> = HashMap::new();
    for identity in &policy.identities {
        if identity.name == WORLD || identity.name == HOST {
            problems.push(Diagnostic::new(
                identity.location.clone(),
                format!("identity name `{}` is reserved; choose another name", identity.name),
            ));
            continue;
        }
        let first = *identity_names.entry(identity.name.as_str()).or_insert(identity);
        // Pods alike are one identity (see `kubernetes::translate`).
        if !std::ptr::eq(first, identity) && !first.is_pod_like(identity) {
            let first = &first.location;
            problems.push(Diagnostic::new(
                identity.location.clone(),
                format!(
                    "duplicate identity name `{}` (first declared at {first}); rename or merge them",
                    identity.name
                ),
            ));
        }
    }
    let mut rule_names = HashMap::new();
    for rule in &policy.rules {
        if let Some(first) = rule_names.insert(rule.name.as_str(), &rule.location) {
            problems.push(Diagnostic::new(
                rule.location.clone(),
                format!("duplicate rule name `{}` (first declared at {first}); rename one of them", rule.name),
            ));
        }
    }
    let mut namespaces = HashMap::new();
    for namespace in &policy.namespaces {
        if let Some(first) = namespaces.insert(namespace.name.as_str(), &namespace.location) {
            problems.push(Diagnostic::new(
                namespace.location.clone(),
                format!(
                    "namespace `{}` is given twice (first at {first}); keep one copy of each namespace",
                    namespace.name
                ),
            ));
        }
    }
    overlapping_addresses(policy, problems);
}

/// Peers that select no identity: a name no identity is declared under, a
/// label selector no identity satisfies. Such a peer matches nothing until
/// the identity appears; the policy is valid.
pub fn warnings(policy: &Policy) -> Vec<Diagnostic> {
    let mut warnings = Vec::new();
    let identity_names: HashSet<&str> = policy.identities.iter().map(|identity| identity.name.as_str()).collect();
    // Each distinct label selector is matched against the identities once,
    // however many rules repeat it.
    let mut label_matches: HashMap<&BTreeMap<String, String>, bool> = HashMap::new();
    for rule in &policy.rules {
        for peer in rule.from.iter().chain(&rule.to) {
            match &peer.selector {
                Selector::Identity(name) => {
                    if name != WORLD && name != HOST && !identity_names.contains(name.as_str()) {
                        warnings.push(Diagnostic::new(
                            peer.location.clone(),
                            format!("rule `{}` names identity `{name}`, which is not declared; the peer matches nothing until it is (or use `world` or `host`)", rule.name),
                        ));
                    }
                }
                Selector::Labels(wanted) => {
                    let matches = *label_matches.entry(wanted).or_insert_with(|| {
                        policy
                            .identities
                            .iter()
                            .any(|identity| wanted.iter().all(|(k, v)| identity.labels.get(k) == Some(v)))
                    });
                    if !matches {
                        let shown: Vec<_> = wanted.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        warnings.push(Diagnostic::new(
                            peer.location.clone(),
                            format!("label selector {{{}}} in rule `{}` matches no identity; the peer matches nothing until an identity carries those labels", shown.join(", "), rule.name),
                        ));
                    }
                }
                Selector::Pods(pods) => {
                    let matches =
                        policy.identities.iter().any(|identity| pods.selects(identity, policy.pod_namespace(identity)));
                    if !matches {
                        warnings.push(Diagnostic::new(
                            peer.location.clone(),
                            format!("rule `{}` selects no pod yet; it matches pods as they appear", rule.name),
                        ));
                    }
                }
                Selector::Cidr { .. } => {}
            }
        }
    }
    warnings.sort_by(|a, b| a.location.cmp(&b.location));
    warnings
}

/// Two identities may not claim the same address: an address must have
/// exactly one identity. Prefixes nest or are disjoint, so checking every
/// shorter prefix length of each address finds every overlap in
/// O(addresses × distinct prefix lengths).
fn overlapping_addresses(policy: &Policy, problems: &mut Vec<Diagnostic>) {
    let mut owners: HashMap<IpNet, (&str, &crate::error::Location)> = HashMap::new();
    let mut lengths: BTreeSet<(bool, u8)> = BTreeSet::new();
    let mut all = Vec::new();
    for identity in &policy.identities {
        for address in &identity.addresses {
            all.push((identity, address));
        }
    }
    // Shorter prefixes first so the report always points at the more specific one.
    all.sort_by(|(_, a), (_, b)| (a.net.prefix_len(), &a.location).cmp(&(b.net.prefix_len(), &b.location)));
    for (identity, address) in all {
        let net = address.net;
        let is_v4 = matches!(net, IpNet::V4(_));
        for &(_, length) in lengths.range((is_v4, 0)..=(is_v4, net.prefix_len())) {
            let Ok(outer) = IpNet::new(net.addr(), length) else {
                continue;
            };
            if let Some((owner, location)) = owners.get(&outer.trunc()) {
                let message = if *owner == identity.name && outer.trunc() == net {
                    format!("address {net} is listed twice in identity `{owner}` (also at {location}); remove one")
                } else {
                    format!(
                        "address {net} of identity `{}` overlaps {} of identity `{owner}` (at {location}); every address must belong to exactly one identity",
                        identity.name,
                        outer.trunc()
                    )
                };
                problems.push(Diagnostic::new(address.location.clone(), message));
                break;
            }
        }
        owners.entry(net).or_insert((identity.name.as_str(), &address.location));
        lengths.insert((is_v4, net.prefix_len()));
    }
}
