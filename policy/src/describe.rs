//! The indexed describer: the reference evaluator's answer (identities,
//! deciding rule, verdict) without its linear scans, for describing kernel
//! events of policies with 100,000 identities and rules.
//!
//! Built once per policy and host address list in O(n log n) (plus the size
//! of the rule-to-identity expansion below), it answers each packet with:
//!
//! - **Owners** through a hash map per family from (prefix length, masked
//!   address) to the declaring identity, probed once per distinct prefix
//!   length in the policy (at most 33 for IPv4, 129 for IPv6). The node's
//!   addresses win, as in the evaluator; an address nobody declares is `world`.
//! - **Candidate rules** from two sides. Each rule is filed under every owner
//!   its `from` peers can match (`{identity: X}` and `{labels: ...}` resolve
//!   to owners at build time: labels match declared identities only, never
//!   `world` or `host`) and, for CIDR peers, under the CIDR in a prefix map
//!   like the owners'. The same is done for `to`. Per packet the smaller of
//!   the two candidate sets (source side, destination side) is checked in
//!   full with the evaluator's own selector and port matching, so the cost is
//!   the size of that set, not the number of rules. CIDR peers cost nothing
//!   for packets outside them; a policy with many CIDR rules covering the
//!   same addresses (say many `0.0.0.0/0` rules) pays for them on every
//!   packet from or to those addresses, as it pays for a hub identity named
//!   by many rules on both sides.
//!
//! Among the matching rules the first deny by name wins, else the first allow
//! by name, else the zero-trust default: exactly [`Evaluator::evaluate`].
//! Rules are checked for expiry at the moment described, so a describer can
//! be kept while the policy stays the same.
//!
//! [`Evaluator::evaluate`]: crate::eval::Evaluator::evaluate

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::SystemTime;

use enforcer_common::DropReason;
use ipnet::IpNet;

use crate::eval::{Decision, Owner, Packet, Verdict, ports_match, selector_matches};
use crate::model::{Action, HOST, Mode, Peer, Policy, Rule, Selector, WORLD};

/// Values filed under network prefixes of one address family.
#[derive(Debug)]
struct PrefixMap<T> {
    /// Address width in bits: 32 or 128.
    width: u8,
    /// Distinct prefix lengths present, longest first.
    lengths: Vec<u8>,
    entries: HashMap<(u8, u128), T>,
}

impl<T> PrefixMap<T> {
    fn new(width: u8) -> Self {
        Self { width, lengths: Vec::new(), entries: HashMap::new() }
    }

    fn masked(&self, bits: u128, length: u8) -> u128 {
        if length == 0 {
            return 0;
        }
        let full = if self.width == 128 { u128::MAX } else { (1u128 << self.width) - 1 };
        bits & (u128::MAX << (self.width - length.min(self.width))) & full
    }

    /// The value filed under the prefix of `bits` with `length`, created by `make` if absent.
    fn file(&mut self, bits: u128, length: u8, make: impl FnOnce() -> T) -> &mut T {
        let key = (length, self.masked(bits, length));
        if let Err(position) = self.lengths.binary_search_by(|l| length.cmp(l)) {
            self.lengths.insert(position, length);
        }
        self.entries.entry(key).or_insert_with(make)
    }

    /// Every value filed under a prefix containing `bits`, longest prefix first.
    fn containing(&self, bits: u128) -> impl Iterator<Item = &T> + '_ {
        self.lengths.iter().filter_map(move |&length| self.entries.get(&(length, self.masked(bits, length))))
    }
}

/// A [`PrefixMap`] per address family.
#[derive(Debug)]
struct NetMap<T> {
    v4: PrefixMap<T>,
    v6: PrefixMap<T>,
}

impl<T> NetMap<T> {
    fn new() -> Self {
        Self { v4: PrefixMap::new(32), v6: PrefixMap::new(128) }
    }

    fn file(&mut self, net: &IpNet, make: impl FnOnce() -> T) -> &mut T {
        match net {
            IpNet::V4(net) => self.v4.file(u128::from(u32::from(net.network())), net.prefix_len(), make),
            IpNet::V6(net) => self.v6.file(u128::from(net.network()), net.prefix_len(), make),
        }
    }

    fn containing(&self, addr: IpAddr) -> Box<dyn Iterator<Item = &T> + '_> {
        match addr {
            IpAddr::V4(addr) => Box::new(self.v4.containing(u128::from(u32::from(addr)))),
            IpAddr::V6(addr) => Box::new(self.v6.containing(u128::from(addr))),
        }
    }
}

/// Who owns an address, by index: slot 0 is `world`, 1 is `host`, and
/// declared identity `i` is slot `i + 2`.
const WORLD_SLOT: usize = 0;
const HOST_SLOT: usize = 1;
const FIRST_DECLARED_SLOT: usize = 2;

/// Rules filed by what one side of them (`from` or `to`) can match; values
/// are positions in [`Describer::rules`], ascending (so by name).
#[derive(Debug)]
struct SideIndex {
    /// Per owner slot: rules with an `{identity: ...}` or `{labels: ...}`
    /// peer matching that owner.
    by_owner: Vec<Vec<usize>>,
    /// Rules with a CIDR peer, filed under the CIDR (its `except` is checked
    /// per packet).
    by_cidr: NetMap<Vec<usize>>,
}

impl SideIndex {
    fn new(slots: usize) -> Self {
        Self { by_owner: vec![Vec::new(); slots], by_cidr: NetMap::new() }
    }

    fn file<'p>(&mut self, position: usize, peers: &'p [Peer], resolver: &mut Resolver<'p>) {
        for peer in peers {
            match &peer.selector {
                Selector::Cidr { cidr, .. } => {
                    let rules = self.by_cidr.file(cidr, Vec::new);
                    if rules.last() != Some(&position) {
                        rules.push(position);
                    }
                }
                selector => {
                    for &slot in resolver.slots(selector) {
                        let rules = &mut self.by_owner[slot];
                        if rules.last() != Some(&position) {
                            rules.push(position);
                        }
                    }
                }
            }
        }
    }

    /// How many candidates [`SideIndex::candidates`] yields.
    fn count(&self, addr: IpAddr, slot: usize) -> usize {
        self.by_owner[slot].len() + self.cidr_lists(addr, slot).map(Vec::len).sum::<usize>()
    }

    fn cidr_lists(&self, addr: IpAddr, slot: usize) -> impl Iterator<Item = &Vec<usize>> + '_ {
        // CIDR peers never match the node's own addresses.
        (slot != HOST_SLOT).then(|| self.by_cidr.containing(addr)).into_iter().flatten()
    }

    /// Rules one of whose peers on this side may match `addr` owned by
    /// `slot` (a superset of those that do; a rule may come more than once).
    fn candidates(&self, addr: IpAddr, slot: usize) -> impl Iterator<Item = usize> + '_ {
        self.by_owner[slot].iter().chain(self.cidr_lists(addr, slot).flatten()).copied()
    }
}

/// Resolves identity and label selectors to owner slots, each distinct
/// selector once.
struct Resolver<'p> {
    policy: &'p Policy,
    /// Declared identity slots by name (a list: names are unique only in a
    /// validated policy).
    by_name: HashMap<&'p str, Vec<usize>>,
    /// Declared identity slots by one label, ascending.
    by_label: HashMap<(&'p str, &'p str), Vec<usize>>,
    resolved: HashMap<&'p Selector, Vec<usize>>,
    /// The empty slot list (CIDR selectors resolve to no owner).
    none: Vec<usize>,
}

impl<'p> Resolver<'p> {
    fn new(policy: &'p Policy) -> Self {
        let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut by_label: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
        for (index, identity) in policy.identities.iter().enumerate() {
            let slot = index + FIRST_DECLARED_SLOT;
            by_name.entry(identity.name.as_str()).or_default().push(slot);
            for (key, value) in &identity.labels {
                by_label.entry((key.as_str(), value.as_str())).or_default().push(slot);
            }
        }
        Self { policy, by_name, by_label, resolved: HashMap::new(), none: Vec::new() }
    }

    fn slots(&mut self, selector: &'p Selector) -> &[usize] {
        if matches!(selector, Selector::Cidr { .. }) {
            return &self.none;
        }
        if !self.resolved.contains_key(selector) {
            let slots = match selector {
                Selector::Identity(name) => self.identity_slots(name),
                Selector::Labels(wanted) => self.label_slots(wanted),
                Selector::Cidr { .. } => Vec::new(),
            };
            self.resolved.insert(selector, slots);
        }
        self.resolved.get(selector).map_or(&self.none, Vec::as_slice)
    }

    /// `{identity: name}` matches the owner with that name.
    fn identity_slots(&self, name: &str) -> Vec<usize> {
        let mut slots = Vec::new();
        if name == WORLD {
            slots.push(WORLD_SLOT);
        }
        if name == HOST {
            slots.push(HOST_SLOT);
        }
        slots.extend(self.by_name.get(name).into_iter().flatten());
        slots
    }

    /// `{labels: ...}` matches the declared identities carrying all of them:
    /// the rarest label's identities, filtered by the others.
    fn label_slots(&self, wanted: &BTreeMap<String, String>) -> Vec<usize> {
        let rarest = wanted
            .iter()
            .map(|(k, v)| self.by_label.get(&(k.as_str(), v.as_str())).map_or(&[][..], Vec::as_slice))
            .min_by_key(|slots| slots.len());
        let all: Vec<usize>;
        let pool = if let Some(rarest) = rarest {
            rarest
        } else {
            all = (FIRST_DECLARED_SLOT..self.policy.identities.len() + FIRST_DECLARED_SLOT).collect();
            &all
        };
        pool.iter()
            .copied()
            .filter(|&slot| {
                let labels = &self.policy.identities[slot - FIRST_DECLARED_SLOT].labels;
                wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .collect()
    }
}

/// Describes packets against one policy as [`crate::Evaluator`] would, in
/// time independent of the number of identities and rules. `P` is how the
/// policy is held: `&Policy`, or `Arc<Policy>` to keep the describer
/// alongside the policy it describes.
pub struct Describer<P: Deref<Target = Policy> = Arc<Policy>> {
    policy: P,
    /// Indices into `policy.rules`, by name (stable, like the evaluator's).
    rules: Vec<usize>,
    /// Identity index per declared prefix; the first declared wins, as the
    /// evaluator's scan in declaration order does.
    owners: NetMap<usize>,
    host_addresses: Vec<IpAddr>,
    hosts: HashSet<IpAddr>,
    audit_all: bool,
    from: SideIndex,
    to: SideIndex,
}

impl<P: Deref<Target = Policy>> Describer<P> {
    /// Indexes `policy` for a node with `host_addresses` (identity `host`)
    /// and daemon-wide audit mode `audit_all`.
    #[must_use]
    pub fn new(policy: P, host_addresses: impl IntoIterator<Item = IpAddr>, audit_all: bool) -> Self {
        let host_addresses: Vec<IpAddr> = host_addresses.into_iter().collect();
        let hosts = host_addresses.iter().copied().collect();
        let (owners, rules, from, to) = {
            let policy: &Policy = &policy;
            let mut owners = NetMap::new();
            for (index, identity) in policy.identities.iter().enumerate() {
                for address in &identity.addresses {
                    owners.file(&address.net, || index);
                }
            }
            let mut rules: Vec<usize> = (0..policy.rules.len()).collect();
            rules.sort_by(|&a, &b| policy.rules[a].name.cmp(&policy.rules[b].name));
            let slots = policy.identities.len() + FIRST_DECLARED_SLOT;
            let (mut from, mut to) = (SideIndex::new(slots), SideIndex::new(slots));
            let mut resolver = Resolver::new(policy);
            for (position, &index) in rules.iter().enumerate() {
                let rule = &policy.rules[index];
                from.file(position, &rule.from, &mut resolver);
                to.file(position, &rule.to, &mut resolver);
            }
            (owners, rules, from, to)
        };
        Self { policy, rules, owners, host_addresses, hosts, audit_all, from, to }
    }

    /// The policy described.
    #[must_use]
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// The node's addresses the describer was built with.
    #[must_use]
    pub fn host_addresses(&self) -> &[IpAddr] {
        &self.host_addresses
    }

    /// The owner of `addr` and its slot.
    fn owner_of(&self, addr: IpAddr) -> (Owner<'_>, usize) {
        if self.hosts.contains(&addr) {
            return (Owner::Host, HOST_SLOT);
        }
        // Validated policies have at most one containing prefix; otherwise
        // the first declared identity wins, as in the evaluator.
        match self.owners.containing(addr).copied().min() {
            Some(index) => (Owner::Declared(&self.policy.identities[index]), index + FIRST_DECLARED_SLOT),
            None => (Owner::World, WORLD_SLOT),
        }
    }

    /// The name of the identity owning `addr`: a declared one, `host` or `world`.
    #[must_use]
    pub fn identity_name(&self, addr: IpAddr) -> &str {
        match self.owner_of(addr).0 {
            Owner::Host => HOST,
            Owner::World => WORLD,
            Owner::Declared(identity) => &identity.name,
        }
    }

    /// The decision for `packet` now: see [`Describer::describe_at`].
    #[must_use]
    pub fn describe(&self, packet: &Packet) -> Decision {
        self.describe_at(packet, SystemTime::now())
    }

    /// The decision for `packet` as of `now` (rules expired by then do not
    /// apply): what `Evaluator::new(policy).at(now).with_host_addresses(..)
    /// .with_audit(..).evaluate(packet)` answers.
    #[must_use]
    pub fn describe_at(&self, packet: &Packet, now: SystemTime) -> Decision {
        let (src_owner, src_slot) = self.owner_of(packet.src);
        let (dst_owner, dst_slot) = self.owner_of(packet.dst);
        let from_side = self.from.count(packet.src, src_slot) <= self.to.count(packet.dst, dst_slot);
        let candidates: Box<dyn Iterator<Item = usize>> = if from_side {
            Box::new(self.from.candidates(packet.src, src_slot))
        } else {
            Box::new(self.to.candidates(packet.dst, dst_slot))
        };
        let (mut deny, mut allow): (Option<usize>, Option<usize>) = (None, None);
        for position in candidates {
            let rule = &self.policy.rules[self.rules[position]];
            let best = if rule.action == Action::Deny { &mut deny } else { &mut allow };
            if best.is_some_and(|best| best <= position) {
                continue;
            }
            if rule_matches(rule, packet, src_owner, dst_owner, now) {
                *best = Some(position);
            }
        }
        let audited = |reason: DropReason| {
            let audit_dst = matches!(dst_owner, Owner::Declared(identity) if identity.mode == Mode::Audit);
            if reason.is_policy() && (self.audit_all || audit_dst) {
                Verdict::Audit(reason)
            } else {
                Verdict::Drop(reason)
            }
        };
        let (verdict, rule) = match (deny, allow) {
            (Some(position), _) => (audited(DropReason::DenyRule), Some(position)),
            (None, Some(position)) => (Verdict::Forward, Some(position)),
            (None, None) => (audited(DropReason::DefaultDeny), None),
        };
        Decision {
            verdict,
            src_identity: src_owner.name().to_owned(),
            dst_identity: dst_owner.name().to_owned(),
            rule: rule.map(|position| self.policy.rules[self.rules[position]].name.clone()),
        }
    }
}

/// The evaluator's full match, on one candidate.
fn rule_matches(rule: &Rule, packet: &Packet, src: Owner<'_>, dst: Owner<'_>, now: SystemTime) -> bool {
    rule.is_active_at(now)
        && ports_match(rule.ports.as_deref(), packet.protocol, packet.port)
        && rule.from.iter().any(|p| selector_matches(&p.selector, packet.src, src))
        && rule.to.iter().any(|p| selector_matches(&p.selector, packet.dst, dst))
}
