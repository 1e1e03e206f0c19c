//! Compiles a validated policy into plain map entries.
//!
//! Addresses are partitioned into *atoms*: sets of addresses that every
//! selector treats alike (same owning identity, inside the same CIDR peers).
//! Each atom gets a numeric identity, so the kernel needs one identity lookup
//! per address and one policy lookup per packet however many rules exist.
//! Per pair of atoms, the rules are resolved (deny beats allow) into disjoint
//! (protocol, port) intervals, each stored as aligned prefixes of a 24-bit
//! space in the policy trie.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::time::SystemTime;

use enforcer_common::{
    ACTION_ALLOW, ACTION_DENY, IDENTITY_FIRST_DYNAMIC, IDENTITY_FLAG_AUDIT, IDENTITY_FLAG_NO_RULES_FROM_WORLD,
    IDENTITY_FLAG_NODE, IDENTITY_FLAG_OPEN_EGRESS, IDENTITY_FLAG_OPEN_INGRESS, IDENTITY_HOST, IDENTITY_WORLD,
    IdentityId, IdentityValue, POLICY_FLAG_WHOLE_PROTOCOL, POLICY_KEY_IDENTITY_BITS, PolicyKeyData, PolicyValue,
    RULE_INDEX_OPEN,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::model::{
    Action, Enforcement, HOST, Identity, Mode, NamedPort, Peer, Policy, PortName, PortSpec, Selector, Side, WORLD,
};

/// One entry of the identity maps: addresses in `net` (unless a longer entry
/// covers them) have identity `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityEntry {
    pub net: IpNet,
    pub id: IdentityId,
    /// `IDENTITY_FLAG_*` bits of the atom.
    pub flags: u32,
}

/// One entry of the policy trie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyEntry {
    pub prefix_len: u32,
    pub key: PolicyKeyData,
    pub value: PolicyValue,
}

/// A rule as the kernel's `rule_index` refers to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledRule {
    pub name: String,
    pub action: Action,
}

/// A numeric identity and what it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Atom {
    pub id: IdentityId,
    /// Owning identity, `world` or `host`.
    pub owner: String,
    /// `IDENTITY_FLAG_*` bits.
    pub flags: u32,
}

/// Everything the daemon writes to the maps for one policy.
#[derive(Debug, Clone, Default)]
pub struct CompiledPolicy {
    /// Ordered by name; a rule's position is its `rule_index`.
    pub rules: Vec<CompiledRule>,
    pub atoms: Vec<Atom>,
    pub identity_entries: Vec<IdentityEntry>,
    pub policy_entries: Vec<PolicyEntry>,
    /// The earliest expiry among the rules compiled in, if any.
    pub next_expiry: Option<SystemTime>,
}

/// Width of the (protocol, port) space resolved per identity pair.
const PROTO_PORT_BITS: u32 = 24;
const PROTO_PORT_MAX: u32 = (1 << PROTO_PORT_BITS) - 1;

/// A rule's claim on part of one identity pair's (protocol, port) space.
/// `order` breaks ties among claims of the winning action: the lowest wins
/// (the rule first by name, whatever numbers the rules carry).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claim<O> {
    pub(crate) action: Action,
    pub(crate) order: O,
    pub(crate) rule_index: u32,
    pub(crate) first: u32,
    pub(crate) last: u32,
    /// Whom the claiming rule speaks for.
    pub(crate) side: Side,
}

/// Which ends of an identity pair are open: its source for egress, its
/// destination for ingress (the node counts as open towards any
/// destination under `default` enforcement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ends {
    pub(crate) src_open: bool,
    pub(crate) dst_open: bool,
}

impl Ends {
    /// The ends of a pair whose atoms carry flags `src` and `dst`.
    pub(crate) const fn of(src: u32, dst: u32) -> Self {
        Self {
            src_open: src & IDENTITY_FLAG_OPEN_EGRESS != 0,
            dst_open: dst & IDENTITY_FLAG_OPEN_INGRESS != 0 || src & IDENTITY_FLAG_NODE != 0,
        }
    }
}

/// The isolation flags of an atom: open for each direction no rule of
/// that side isolates it in, under `default` enforcement; the node also
/// passes ingress isolation.
pub(crate) fn isolation_flags(
    enforcement: Enforcement,
    host: bool,
    ingress_isolated: bool,
    egress_isolated: bool,
) -> u32 {
    if enforcement == Enforcement::Always {
        return 0;
    }
    let mut flags = 0;
    if !ingress_isolated {
        flags |= IDENTITY_FLAG_OPEN_INGRESS;
    }
    if !egress_isolated {
        flags |= IDENTITY_FLAG_OPEN_EGRESS;
    }
    if host {
        flags |= IDENTITY_FLAG_NODE;
    }
    flags
}

/// The flag that lets the kernel deny `world`'s packets to an atom without
/// a lookup: no entry for the pair, and the atom is isolated for ingress.
pub(crate) fn unreachable_from_world(flags: u32, has_world_pair: bool) -> u32 {
    if has_world_pair || flags & IDENTITY_FLAG_OPEN_INGRESS != 0 { 0 } else { IDENTITY_FLAG_NO_RULES_FROM_WORLD }
}

/// The (protocol number, port) of each name of `names` among `ports` (a
/// destination pod's named ports).
pub(crate) fn named_port_ranges<'a>(
    names: &'a [PortName],
    ports: &'a [NamedPort],
) -> impl Iterator<Item = (u32, u32)> + 'a {
    ports.iter().filter(|port| names.iter().any(|name| name.name == port.name && name.protocol == port.protocol)).map(
        |port| {
            let at = u32::from(port.protocol.number()) << 16 | u32::from(port.port);
            (at, at)
        },
    )
}

/// A CIDR peer: addresses inside `.0` and outside all of `.1`.
type CidrSelector = (IpNet, Vec<IpNet>);

/// The address partition: numeric identities and how selectors map to them.
struct Partition {
    atoms: Vec<Atom>,
    identity_entries: Vec<IdentityEntry>,
    /// Atoms by owning identity index (`None` for world).
    by_owner: HashMap<Option<usize>, Vec<IdentityId>>,
    /// Atoms by CIDR selector index.
    by_cidr: HashMap<usize, Vec<IdentityId>>,
}

/// Compiles a policy that passed validation, as it stands now.
#[must_use]
pub fn compile(policy: &Policy) -> CompiledPolicy {
    compile_at(policy, SystemTime::now())
}

/// Compiles a policy as it stands at `now`: rules that expired by then are
/// left out, and `next_expiry` says when the result must be compiled again.
#[must_use]
pub fn compile_at(policy: &Policy, now: SystemTime) -> CompiledPolicy {
    compile_stable(policy, now, &mut IdAssigner::default())
}

/// Numbers the atoms of successive compiles so that an atom that stays keeps
/// its number: adding an identity or an address renumbers nothing else, so
/// the entries written for a change are the entries the change touches.
///
/// An atom is known by what it stands for: its owner's name and the CIDR
/// peers (with their exceptions) whose addresses it is part of. A number
/// freed by a compile goes back to a pool only after that compile, so it is
/// never given to another atom in the very generation that stopped using it;
/// the two policy slots make reuse in any later generation safe, since each
/// generation is written whole into the slot the kernel is not reading (and
/// connection tracking refers to rules and generations, never to atoms).
#[derive(Debug, Clone)]
pub struct IdAssigner {
    by_signature: HashMap<AtomSignature, IdentityId>,
    /// Numbers free for reuse, lowest first.
    free: BTreeSet<IdentityId>,
    next: IdentityId,
}

/// What an atom stands for, independent of positions in one policy.
type AtomSignature = (Option<String>, Vec<CidrSelector>);

impl Default for IdAssigner {
    fn default() -> Self {
        Self { by_signature: HashMap::new(), free: BTreeSet::new(), next: IDENTITY_FIRST_DYNAMIC }
    }
}

impl IdAssigner {
    /// The number of the atom `signature`: its old one, else a free one.
    fn id_for(&mut self, signature: AtomSignature) -> IdentityId {
        if let Some(&id) = self.by_signature.get(&signature) {
            return id;
        }
        let id = self.free.pop_first().unwrap_or_else(|| {
            let id = self.next;
            self.next += 1;
            id
        });
        self.by_signature.insert(signature, id);
        id
    }

    /// Frees the numbers of atoms the last compile did not use.
    fn release_unused(&mut self, used: &HashSet<IdentityId>) {
        let free = &mut self.free;
        self.by_signature.retain(|_, id| {
            let keep = used.contains(id);
            if !keep {
                free.insert(*id);
            }
            keep
        });
    }

    /// Atoms numbered now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_signature.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_signature.is_empty()
    }
}

/// As [`compile_at`], numbering atoms with `ids` so that atoms that stay
/// keep their numbers across compiles (see [`IdAssigner`]).
pub fn compile_stable(policy: &Policy, now: SystemTime, ids: &mut IdAssigner) -> CompiledPolicy {
    compile_enforcing(policy, now, ids, Enforcement::Always)
}

/// As [`compile_stable`], isolating identities as `enforcement` says.
pub fn compile_enforcing(
    policy: &Policy,
    now: SystemTime,
    ids: &mut IdAssigner,
    enforcement: Enforcement,
) -> CompiledPolicy {
    let mut rules: Vec<_> = policy.rules.iter().filter(|r| r.is_active_at(now)).collect();
    rules.sort_by(|a, b| a.name.cmp(&b.name));
    let next_expiry = rules.iter().filter_map(|r| r.expires).min();

    let mut cidr_selectors: Vec<CidrSelector> = Vec::new();
    for rule in &rules {
        for peer in rule.from.iter().chain(&rule.to) {
            if let Selector::Cidr { cidr, except } = &peer.selector
                && !cidr_selectors.iter().any(|(c, e)| c == cidr && e == except)
            {
                cidr_selectors.push((*cidr, except.clone()));
            }
        }
    }
    let mut atoms = partition_addresses(policy, &cidr_selectors, ids);

    let identity_index = first_declarations(policy);
    // Large policies repeat selectors across many rules; each is resolved once.
    let mut selected: HashMap<Selector, Vec<IdentityId>> = HashMap::new();
    let mut pairs: BTreeMap<(IdentityId, IdentityId), Vec<Claim<u32>>> = BTreeMap::new();
    let mut ingress_isolated: HashSet<IdentityId> = HashSet::new();
    let mut egress_isolated: HashSet<IdentityId> = HashSet::new();
    let owner_of: HashMap<IdentityId, &Identity> = atoms
        .by_owner
        .iter()
        .filter_map(|(owner, ids)| owner.map(|i| (&policy.identities[i], ids)))
        .flat_map(|(identity, ids)| ids.iter().map(move |id| (*id, identity)))
        .collect();
    for (rule_index, rule) in rules.iter().enumerate() {
        let mut select = |peers: &[Peer]| {
            let mut ids = BTreeSet::new();
            for peer in peers {
                if let Some(known) = selected.get(&peer.selector) {
                    ids.extend(known.iter().copied());
                } else {
                    let found = select_atoms(policy, &identity_index, &atoms, &cidr_selectors, &peer.selector);
                    ids.extend(found.iter().copied());
                    selected.insert(peer.selector.clone(), found);
                }
            }
            ids
        };
        let sources = select(&rule.from);
        let destinations = select(&rule.to);
        match rule.side {
            Side::Both => {}
            Side::Ingress => ingress_isolated.extend(destinations.iter().copied()),
            Side::Egress => egress_isolated.extend(sources.iter().copied()),
        }
        let ranges: Vec<(u32, u32)> = rule_ranges(rule.ports.as_deref()).collect();
        for &src in &sources {
            for &dst in &destinations {
                let named =
                    owner_of.get(&dst).and_then(|identity| identity.pod.as_ref()).filter(|_| rule.ports.is_some());
                let named = named.into_iter().flat_map(|pod| named_port_ranges(&rule.named_ports, &pod.ports));
                pairs.entry((src, dst)).or_default().extend(ranges.iter().copied().chain(named).map(
                    |(first, last)| Claim {
                        action: rule.action,
                        order: rule_index as u32,
                        rule_index: rule_index as u32,
                        first,
                        last,
                        side: rule.side,
                    },
                ));
            }
        }
    }

    for atom in &mut atoms.atoms {
        atom.flags |= isolation_flags(
            enforcement,
            atom.id == IDENTITY_HOST,
            ingress_isolated.contains(&atom.id),
            egress_isolated.contains(&atom.id),
        );
    }
    let flags: HashMap<IdentityId, u32> = atoms.atoms.iter().map(|atom| (atom.id, atom.flags)).collect();
    for entry in &mut atoms.identity_entries {
        entry.flags = flags.get(&entry.id).copied().unwrap_or(entry.flags);
    }

    let mut policy_entries = Vec::new();
    for (&(src, dst), claims) in &pairs {
        let ends = Ends::of(flags.get(&src).copied().unwrap_or(0), flags.get(&dst).copied().unwrap_or(0));
        pair_entries(src, dst, claims, ends, u32::MAX, &mut policy_entries);
    }

    mark_unreachable_from_world(&mut atoms, &policy_entries);

    CompiledPolicy {
        rules: rules.iter().map(|r| CompiledRule { name: r.name.clone(), action: r.action }).collect(),
        atoms: atoms.atoms,
        identity_entries: atoms.identity_entries,
        policy_entries,
        next_expiry,
    }
}

/// Flags every atom isolated for ingress that `world` has no entry
/// towards (see [`IDENTITY_FLAG_NO_RULES_FROM_WORLD`]): the kernel may
/// deny those packets without a lookup.
fn mark_unreachable_from_world(atoms: &mut Partition, entries: &[PolicyEntry]) {
    let reached: BTreeSet<IdentityId> = entries
        .iter()
        .filter(|entry| u32::from_be_bytes(entry.key.src_identity) == IDENTITY_WORLD)
        .map(|entry| u32::from_be_bytes(entry.key.dst_identity))
        .collect();
    for atom in &mut atoms.atoms {
        atom.flags |= unreachable_from_world(atom.flags, reached.contains(&atom.id));
    }
    for entry in &mut atoms.identity_entries {
        entry.flags |= unreachable_from_world(entry.flags, reached.contains(&entry.id));
    }
}

/// The atoms a selector matches.
fn select_atoms(
    policy: &Policy,
    identity_index: &HashMap<&str, usize>,
    atoms: &Partition,
    cidr_selectors: &[CidrSelector],
    selector: &Selector,
) -> Vec<IdentityId> {
    let owned_by = |owner: Option<usize>| atoms.by_owner.get(&owner).into_iter().flatten().copied();
    match selector {
        Selector::Identity(name) if name == WORLD => owned_by(None).collect(),
        Selector::Identity(name) if name == HOST => vec![IDENTITY_HOST],
        Selector::Identity(name) => {
            identity_index.get(name.as_str()).map_or_else(Vec::new, |&i| owned_by(Some(i)).collect())
        }
        Selector::Labels(wanted) => policy
            .identities
            .iter()
            .enumerate()
            .filter(|(_, identity)| wanted.iter().all(|(k, v)| identity.labels.get(k) == Some(v)))
            .flat_map(|(i, _)| owned_by(Some(i)))
            .collect(),
        Selector::Pods(peer) => policy
            .identities
            .iter()
            .enumerate()
            .filter(|(_, identity)| peer.selects(identity, policy.pod_namespace(identity)))
            .flat_map(|(i, _)| owned_by(Some(i)))
            .collect(),
        Selector::Cidr { cidr, except } => cidr_selectors
            .iter()
            .position(|(c, e)| c == cidr && e == except)
            .and_then(|k| atoms.by_cidr.get(&k))
            .into_iter()
            .flatten()
            .copied()
            .collect(),
    }
}

/// Each identity name's first declaration, by index: the one that stands
/// for all of a name's declarations (pods alike, see
/// `kubernetes::translate`; a valid policy has no other repeated names).
fn first_declarations(policy: &Policy) -> HashMap<&str, usize> {
    let mut first = HashMap::new();
    for (i, identity) in policy.identities.iter().enumerate() {
        first.entry(identity.name.as_str()).or_insert(i);
    }
    first
}

/// Partitions the address space into atoms. Every prefix that appears in the
/// policy (identity addresses, CIDR peers and their exceptions, and the two
/// default routes) is an entry whose atom is its owner plus the set of CIDR
/// peers containing it; prefixes nest or are disjoint, so that set is the
/// same for every address the entry covers.
fn partition_addresses(policy: &Policy, cidr_selectors: &[CidrSelector], ids: &mut IdAssigner) -> Partition {
    type AtomKey = (Option<usize>, Vec<usize>);
    // Pods alike are declared once each, as one identity: its first declaration owns them all.
    let first = first_declarations(policy);
    let identity_owner: HashMap<IpNet, usize> = policy
        .identities
        .iter()
        .flat_map(|identity| identity.addresses.iter().map(|a| (a.net, first[identity.name.as_str()])))
        .collect();
    let owner_index = PrefixIndex::new(identity_owner.keys().copied());
    let mut cidr_members: HashMap<IpNet, Vec<usize>> = HashMap::new();
    let mut except_members: HashMap<IpNet, Vec<usize>> = HashMap::new();
    for (k, (cidr, except)) in cidr_selectors.iter().enumerate() {
        cidr_members.entry(*cidr).or_default().push(k);
        for e in except {
            except_members.entry(*e).or_default().push(k);
        }
    }
    let cidr_index = PrefixIndex::new(cidr_members.keys().chain(except_members.keys()).copied());

    let mut prefixes: BTreeSet<IpNet> = identity_owner.keys().copied().collect();
    prefixes.extend(cidr_members.keys().copied());
    prefixes.extend(except_members.keys().copied());
    prefixes.insert(IpNet::V4(Ipv4Net::default()));
    prefixes.insert(IpNet::V6(Ipv6Net::default()));
    let all_index = PrefixIndex::new(prefixes.iter().copied());

    let mut atom_ids: HashMap<AtomKey, IdentityId> = HashMap::from([((None, Vec::new()), IDENTITY_WORLD)]);
    let mut used: HashSet<IdentityId> = HashSet::new();
    let mut atom_of_prefix: HashMap<IpNet, IdentityId> = HashMap::new();
    let mut out = Partition {
        atoms: vec![
            Atom { id: IDENTITY_WORLD, owner: WORLD.to_owned(), flags: 0 },
            // The node's addresses are found at run time; only the daemon writes them.
            Atom { id: IDENTITY_HOST, owner: HOST.to_owned(), flags: 0 },
        ],
        identity_entries: Vec::new(),
        by_owner: HashMap::from([(None, vec![IDENTITY_WORLD])]),
        by_cidr: HashMap::new(),
    };
    // BTreeSet order puts every prefix after the prefixes containing it.
    for net in &prefixes {
        let owner = owner_index.covering(net).find_map(|outer| identity_owner.get(&outer).copied());
        let mut inside: BTreeSet<usize> = BTreeSet::new();
        let mut excluded: BTreeSet<usize> = BTreeSet::new();
        for outer in cidr_index.covering(net) {
            inside.extend(cidr_members.get(&outer).into_iter().flatten());
            excluded.extend(except_members.get(&outer).into_iter().flatten());
        }
        let key: AtomKey = (owner, inside.difference(&excluded).copied().collect());
        let flags = match owner.map(|i| policy.identities[i].mode) {
            Some(Mode::Audit) => IDENTITY_FLAG_AUDIT,
            _ => 0,
        };
        let id = *atom_ids.entry(key.clone()).or_insert_with(|| {
            let signature = (
                owner.map(|i| policy.identities[i].name.clone()),
                key.1.iter().map(|&k| cidr_selectors[k].clone()).collect(),
            );
            let id = ids.id_for(signature);
            used.insert(id);
            out.atoms.push(Atom {
                id,
                owner: owner.map_or(WORLD, |i| policy.identities[i].name.as_str()).to_owned(),
                flags,
            });
            out.by_owner.entry(key.0).or_default().push(id);
            for k in &key.1 {
                out.by_cidr.entry(*k).or_default().push(id);
            }
            id
        });
        atom_of_prefix.insert(*net, id);
        // An entry that repeats its enclosing entry's atom is redundant.
        let parent = all_index
            .covering(net)
            .filter(|outer| outer != net)
            .filter_map(|outer| atom_of_prefix.get(&outer).copied())
            .last()
            .unwrap_or(IDENTITY_WORLD);
        if parent != id {
            out.identity_entries.push(IdentityEntry { net: *net, id, flags });
        }
    }
    ids.release_unused(&used);
    out
}

/// The (protocol, port) intervals a rule claims, in the 24-bit space.
pub(crate) fn rule_ranges(ports: Option<&[PortSpec]>) -> impl Iterator<Item = (u32, u32)> + '_ {
    let every = ports.is_none().then_some((0, PROTO_PORT_MAX));
    let listed = ports.into_iter().flatten().map(|s| {
        let base = u32::from(s.protocol.number()) << 16;
        (base | u32::from(s.first), base | u32::from(s.last))
    });
    every.into_iter().chain(listed)
}

/// Appends the policy entries of one identity pair, given every claim on
/// it and which of its ends are open; `open_order` sorts after every rule.
pub(crate) fn pair_entries<O: Ord + Copy>(
    src: IdentityId,
    dst: IdentityId,
    claims: &[Claim<O>],
    ends: Ends,
    open_order: O,
    out: &mut Vec<PolicyEntry>,
) {
    let counted = counted_claims(claims, ends, open_order);
    let segments = resolve(counted.as_deref().unwrap_or(claims));
    for &(first, last, value) in &segments {
        for (start, bits) in aligned_blocks(first, last) {
            let whole_protocol = value.action == ACTION_ALLOW && allows_whole_protocol(&segments, start >> 16);
            let flags = if whole_protocol { POLICY_FLAG_WHOLE_PROTOCOL } else { 0 };
            out.push(PolicyEntry {
                prefix_len: POLICY_KEY_IDENTITY_BITS + bits,
                // Slot 0: the daemon sets the slot it writes the entry into.
                key: PolicyKeyData::new(0, src, dst, (start >> 16) as u8, start as u16),
                value: PolicyValue { flags, ..value },
            });
        }
    }
}

/// The claims that count on a pair whose ends are `ends`, as claims for
/// the connection; `None` when they are `claims` as they are (the usual
/// case: rules that speak for the connection, an end isolated).
///
/// Deny claims always count. Rules for the connection always count. A
/// rule for one end counts as it is where the other end is open; where
/// both ends are isolated, an ingress claim counts where an egress claim
/// admits too. A pair both of whose ends are open passes whatever no claim
/// decides; where a deny claim carves a protocol, one more claim below
/// every rule says so for that protocol, so that a fragment whose port is
/// unknown finds the protocol not passed whole.
fn counted_claims<O: Ord + Copy>(claims: &[Claim<O>], ends: Ends, open_order: O) -> Option<Vec<Claim<O>>> {
    let one_sided = claims.iter().any(|claim| claim.side != Side::Both);
    let both_open = ends.src_open && ends.dst_open;
    if !one_sided && !both_open {
        return None;
    }
    let mut counted: Vec<Claim<O>> = Vec::new();
    for claim in claims {
        let counts = match (claim.action, claim.side) {
            (Action::Deny, _) | (Action::Allow, Side::Both) => true,
            (Action::Allow, Side::Egress) => !ends.src_open && ends.dst_open,
            (Action::Allow, Side::Ingress) => ends.src_open && !ends.dst_open,
        };
        if counts {
            counted.push(Claim { side: Side::Both, ..*claim });
        }
    }
    if !ends.src_open && !ends.dst_open {
        let allows = |side: Side| claims.iter().filter(move |c| c.action == Action::Allow && c.side == side);
        for ingress in allows(Side::Ingress) {
            for egress in allows(Side::Egress) {
                let (first, last) = (ingress.first.max(egress.first), ingress.last.min(egress.last));
                if first <= last {
                    counted.push(Claim { first, last, side: Side::Both, ..*ingress });
                }
            }
        }
    }
    if both_open {
        // Only a protocol a deny rule carves needs its open ports written:
        // elsewhere a lookup that misses passes, fragments included.
        let mut carved: Vec<u32> =
            claims.iter().filter(|c| c.action == Action::Deny).flat_map(|c| (c.first >> 16)..=(c.last >> 16)).collect();
        carved.sort_unstable();
        carved.dedup();
        counted.extend(carved.into_iter().map(|protocol| Claim {
            action: Action::Allow,
            order: open_order,
            rule_index: RULE_INDEX_OPEN,
            first: protocol << 16,
            last: protocol << 16 | 0xffff,
            side: Side::Both,
        }));
    }
    Some(counted)
}

/// Resolves overlapping claims on the (protocol, port) space of one identity
/// pair into disjoint intervals: any deny beats every allow, and among claims
/// of the winning action the lowest `order` (first by name) is reported.
fn resolve<O: Ord + Copy>(claims: &[Claim<O>]) -> Vec<(u32, u32, PolicyValue)> {
    let value = |action: Action, rule_index: u32| PolicyValue {
        action: if action == Action::Deny { ACTION_DENY } else { ACTION_ALLOW },
        rule_index,
        flags: 0,
    };
    // Most pairs have one claim, which is its own resolution.
    if let [only] = claims {
        return vec![(only.first, only.last, value(only.action, only.rule_index))];
    }
    let mut cuts: BTreeSet<u32> = BTreeSet::new();
    for &Claim { first, last, .. } in claims {
        cuts.insert(first);
        if last < PROTO_PORT_MAX {
            cuts.insert(last + 1);
        }
    }
    let cuts: Vec<u32> = cuts.into_iter().collect();
    let mut out: Vec<(u32, u32, PolicyValue)> = Vec::new();
    for (i, &start) in cuts.iter().enumerate() {
        let end = cuts.get(i + 1).map_or(PROTO_PORT_MAX, |next| next - 1);
        let covering = claims.iter().filter(|c| c.first <= start && end <= c.last);
        let winner = covering.min_by_key(|c| (c.action != Action::Deny, c.order));
        let Some(&Claim { action, rule_index, .. }) = winner else {
            continue;
        };
        let value = value(action, rule_index);
        match out.last_mut() {
            Some(last) if last.2 == value && last.1 + 1 == start => last.1 = end,
            _ => out.push((start, end, value)),
        }
    }
    out
}

/// Whether the resolved segments allow every port of `protocol` (so a later
/// fragment, whose port is unknown, may pass).
fn allows_whole_protocol(segments: &[(u32, u32, PolicyValue)], protocol: u32) -> bool {
    let (start, end) = (protocol << 16, (protocol << 16) | 0xffff);
    let mut next = start;
    for &(first, last, value) in segments {
        if last < next || first > end {
            continue;
        }
        if first > next || value.action != ACTION_ALLOW {
            return false;
        }
        if last >= end {
            return true;
        }
        next = last + 1;
    }
    false
}

/// Splits `[first, last]` of the 24-bit space into the fewest aligned blocks,
/// each as (start, prefix bits within the 24).
fn aligned_blocks(mut first: u32, last: u32) -> impl Iterator<Item = (u32, u32)> {
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut size_log = if first == 0 { PROTO_PORT_BITS } else { first.trailing_zeros().min(PROTO_PORT_BITS) };
        while first + (1 << size_log) - 1 > last {
            size_log -= 1;
        }
        let block = (first, PROTO_PORT_BITS - size_log);
        let next = first + (1 << size_log);
        done = next > last;
        first = next;
        Some(block)
    })
}

/// The distinct prefix lengths of a set of prefixes, per family, to find the
/// prefixes of the set that contain a given prefix without scanning the set.
struct PrefixIndex {
    v4: Vec<u8>,
    v6: Vec<u8>,
}

impl PrefixIndex {
    fn new(nets: impl Iterator<Item = IpNet>) -> Self {
        let mut v4 = BTreeSet::new();
        let mut v6 = BTreeSet::new();
        for net in nets {
            match net {
                IpNet::V4(n) => v4.insert(n.prefix_len()),
                IpNet::V6(n) => v6.insert(n.prefix_len()),
            };
        }
        Self { v4: v4.into_iter().collect(), v6: v6.into_iter().collect() }
    }

    /// Candidate prefixes containing `net` (itself included), shortest first;
    /// the caller checks which of them are actually in its set.
    fn covering(&self, net: &IpNet) -> impl Iterator<Item = IpNet> + '_ {
        let lengths = if net.addr().is_ipv4() { &self.v4 } else { &self.v6 };
        let net = *net;
        lengths
            .iter()
            .take_while(move |&&len| len <= net.prefix_len())
            .filter_map(move |&len| IpNet::new(net.addr(), len).ok().map(|n| n.trunc()))
    }
}

impl CompiledPolicy {
    /// What the kernel's identity lookup answers for `addr` (before the
    /// daemon adds the node's own addresses): the exact address first, then
    /// the longest prefix, else `world`.
    #[must_use]
    pub fn lookup_identity(&self, addr: IpAddr) -> IdentityValue {
        self.identity_entries
            .iter()
            .filter(|e| e.net.contains(&addr))
            .max_by_key(|e| e.net.prefix_len())
            .map_or(IdentityValue { id: IDENTITY_WORLD, flags: 0 }, |e| IdentityValue { id: e.id, flags: e.flags })
    }

    /// What the kernel's policy trie answers: the longest matching prefix.
    #[must_use]
    pub fn lookup_policy(&self, src: IdentityId, dst: IdentityId, protocol: u8, port: u16) -> Option<PolicyValue> {
        let wanted = u128::from_be_bytes(key_bytes(&PolicyKeyData::new(0, src, dst, protocol, port)));
        self.policy_entries
            .iter()
            .filter(|e| {
                let mask = if e.prefix_len == 0 { 0 } else { u128::MAX << (128 - e.prefix_len) };
                u128::from_be_bytes(key_bytes(&e.key)) & mask == wanted & mask
            })
            .max_by_key(|e| e.prefix_len)
            .map(|e| e.value)
    }

    /// The owner name of a numeric identity.
    #[must_use]
    pub fn atom_owner(&self, id: IdentityId) -> Option<&str> {
        self.atoms.iter().find(|a| a.id == id).map(|a| a.owner.as_str())
    }
}

fn key_bytes(key: &PolicyKeyData) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[0] = key.slot;
    bytes[1..5].copy_from_slice(&key.src_identity);
    bytes[5..9].copy_from_slice(&key.dst_identity);
    bytes[9] = key.protocol;
    bytes[10..12].copy_from_slice(&key.port);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_blocks_cover_exactly() {
        for (first, last) in [(0, PROTO_PORT_MAX), (5, 5), (1, 1023), (80, 443), (6 << 16, (6 << 16) | 0xffff)] {
            let blocks: Vec<(u32, u32)> = aligned_blocks(first, last).collect();
            let mut next = first;
            for (start, bits) in &blocks {
                assert_eq!(*start, next);
                let size = 1u32 << (PROTO_PORT_BITS - bits);
                assert_eq!(start % size, 0, "block not aligned");
                next = start + size;
            }
            assert_eq!(next, last + 1);
        }
        assert_eq!(aligned_blocks(6 << 16, (6 << 16) | 0xffff).collect::<Vec<_>>(), vec![(6 << 16, 8)]);
        assert_eq!(aligned_blocks(0, PROTO_PORT_MAX).collect::<Vec<_>>(), vec![(0, 0)]);
    }

    #[test]
    fn deny_beats_allow_and_splits_ranges() {
        let claims = [
            Claim { action: Action::Allow, order: 0, rule_index: 0, first: 100, last: 200, side: Side::Both },
            Claim { action: Action::Deny, order: 1, rule_index: 1, first: 150, last: 150, side: Side::Both },
        ];
        let resolved = resolve(&claims);
        let allow = PolicyValue { action: ACTION_ALLOW, rule_index: 0, flags: 0 };
        let deny = PolicyValue { action: ACTION_DENY, rule_index: 1, flags: 0 };
        assert_eq!(resolved, vec![(100, 149, allow), (150, 150, deny), (151, 200, allow)]);
    }

    /// Rules for one end count as the other end's openness says; where
    /// both are isolated an ingress claim counts only where an egress
    /// claim admits too; both open, a deny rule's protocol is written whole.
    #[test]
    fn claims_for_one_end_count_by_the_other_ends_isolation() {
        let claim = |side, action, order, first, last| Claim { action, order, rule_index: order, first, last, side };
        let ingress = claim(Side::Ingress, Action::Allow, 0, 100, 200);
        let egress = claim(Side::Egress, Action::Allow, 1, 150, 300);
        let both = [ingress, egress];
        let ranges = |ends: Ends| {
            let counted = counted_claims(&both, ends, u32::MAX).expect("one-sided claims");
            resolve(&counted)
                .into_iter()
                .map(|(first, last, value)| (first, last, value.rule_index))
                .collect::<Vec<_>>()
        };
        let isolated = Ends { src_open: false, dst_open: false };
        assert_eq!(ranges(isolated), vec![(150, 200, 0)]);
        assert_eq!(ranges(Ends { src_open: true, dst_open: false }), vec![(100, 200, 0)]);
        assert_eq!(ranges(Ends { src_open: false, dst_open: true }), vec![(150, 300, 1)]);
        let deny = [claim(Side::Both, Action::Deny, 0, (6 << 16) | 0x16, (6 << 16) | 0x16)];
        let counted = counted_claims(&deny, Ends { src_open: true, dst_open: true }, u32::MAX).expect("open pair");
        let resolved = resolve(&counted);
        assert_eq!(
            resolved.first().map(|r| (r.0, r.1, r.2.rule_index)),
            Some((6 << 16, (6 << 16) | 0x15, RULE_INDEX_OPEN))
        );
        assert_eq!(
            resolved.last().map(|r| (r.0, r.1, r.2.rule_index)),
            Some(((6 << 16) | 0x17, (6 << 16) | 0xffff, RULE_INDEX_OPEN))
        );
        assert_eq!(
            counted_claims(&deny, isolated, u32::MAX).map(|c| c.len()),
            None,
            "isolated: the claims as they are"
        );
    }
}
