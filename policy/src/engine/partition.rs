//! The address partition kept between changes (the incremental form of
//! `compile::partition_addresses`): every prefix the policy names (identity
//! addresses, CIDR peers and their exceptions, the two default routes)
//! belongs to an *atom*, its owner plus the CIDR peers containing it, and
//! becomes an identity entry unless its enclosing prefix has the same atom.
//!
//! A prefix's atom depends only on the prefixes containing it, and its entry
//! on its own atom and its parent's. So when a change gives a prefix
//! another role (an owner comes or goes, a CIDR peer starts or stops using
//! it), only that prefix and the prefixes nested in it are derived again:
//! `settle` visits them in address order, where every prefix comes after
//! the prefixes containing it.

use std::collections::{BTreeMap, BTreeSet, HashMap, btree_map};
use std::net::IpAddr;
use std::num::NonZeroU32;

use enforcer_common::{IDENTITY_FLAG_NO_RULES_FROM_WORLD, IDENTITY_WORLD, IdentityId, IdentityValue};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::check::OwnerId;
use super::small::{DenseMap, NumberMap, SmallSet};
use super::{EntryCounts, IdPool, Name, Recorder, SelectorId};

/// What an atom stands for: its owner (`None`: no declared identity) and the
/// CIDR peers its addresses are part of, sorted.
type AtomKey = (Option<OwnerId>, Box<[SelectorId]>);

/// One prefix the policy names, 12 bytes in a B-tree of 100,000: its
/// CIDR roles (most prefixes are an identity's address, with none) are
/// kept beside the tree, and its count and flags share a word. At 24 bytes
/// a tree node of eleven took 512 bytes; at 12 it takes 384.
#[derive(Debug)]
struct PrefixState {
    /// [`NO_OWNER`] for none: four bytes where an `Option` takes eight.
    owner: OwnerId,
    /// 0 until first settled.
    atom: IdentityId,
    /// The [`DECLARED`] count and the [`HAS_ENTRY`], [`PERMANENT`] and
    /// [`HAS_ROLES`] flags.
    bits: u32,
}

/// [`PrefixState::bits`]: identities declaring exactly this prefix (the
/// checks' count of declarations, one in a valid policy), kept here, where
/// the prefix is anyway, rather than in a map of the checks' own. Every
/// declaration is in memory, so the count stays far below this mask.
const DECLARED: u32 = (1 << 29) - 1;
/// The prefix has an identity entry: its atom's number and flags
/// (`set_flags` rewrites every entry of an atom whose flags change, so the
/// atom's flags are always the entry's).
const HAS_ENTRY: u32 = 1 << 31;
/// A default route: it stays whatever the policy says.
const PERMANENT: u32 = 1 << 30;
/// CIDR peers use the prefix: its roles are in [`Partition::roles`].
const HAS_ROLES: u32 = 1 << 29;

/// CIDR peers using a prefix as their CIDR, and as an exception.
#[derive(Debug, Default)]
struct CidrRoles {
    cidr_of: Vec<SelectorId>,
    except_of: Vec<SelectorId>,
}

/// A prefix's owner when it has none.
const NO_OWNER: OwnerId = OwnerId::MAX;

impl PrefixState {
    fn new(permanent: bool) -> Self {
        Self { owner: NO_OWNER, atom: 0, bits: if permanent { PERMANENT } else { 0 } }
    }

    fn owner(&self) -> Option<OwnerId> {
        (self.owner != NO_OWNER).then_some(self.owner)
    }

    fn declared(&self) -> u32 {
        self.bits & DECLARED
    }

    /// Adds `delta` (one more or one fewer) to the declarations.
    fn count_declared(&mut self, delta: i32) {
        let declared = self.declared().saturating_add_signed(delta).min(DECLARED);
        self.bits = (self.bits & !DECLARED) | declared;
    }

    fn flag(&self, flag: u32) -> bool {
        self.bits & flag != 0
    }

    fn set_flag(&mut self, flag: u32, on: bool) {
        if on {
            self.bits |= flag;
        } else {
            self.bits &= !flag;
        }
    }

    fn has_entry(&self) -> bool {
        self.flag(HAS_ENTRY)
    }

    /// Whether the prefix takes part in the partition (a declaration alone
    /// does not: its identity owns it once compiled).
    fn is_used(&self) -> bool {
        self.flag(PERMANENT) || self.owner != NO_OWNER || self.flag(HAS_ROLES)
    }
}

/// One atom, 32 bytes (in a vector of 100,000): its [`AtomKey`] is kept
/// as an owner number and, for the few atoms inside CIDR peers, their list
/// behind a thin pointer, where the key's own form takes 24 bytes. Its
/// first identity entry is inline when it is an IPv4 prefix (an identity's
/// one address, mostly): an inline `IpNet` took the state to 40, a set of
/// them to 48.
#[derive(Debug)]
struct AtomState {
    /// [`NO_OWNER`] for none.
    owner: OwnerId,
    /// Prefixes whose atom this is.
    prefixes: u32,
    flags: u32,
    /// The lowest prefix with an identity entry of this atom, when it is
    /// an IPv4 one (IPv4 prefixes sort before IPv6 ones).
    first_entry: Option<Ipv4Net>,
    /// The CIDR peers and the other entries, when there are any.
    more: Option<Box<AtomMore>>,
}

#[derive(Debug, Default)]
struct AtomMore {
    /// The CIDR peers its addresses are part of, sorted.
    cidrs: Vec<SelectorId>,
    /// Prefixes with an identity entry other than the first, sorted.
    entries: Vec<IpNet>,
}

impl AtomState {
    fn new(key: AtomKey, flags: u32) -> Self {
        let more = (!key.1.is_empty()).then(|| Box::new(AtomMore { cidrs: key.1.into_vec(), entries: Vec::new() }));
        Self { owner: key.0.unwrap_or(NO_OWNER), prefixes: 0, flags, first_entry: None, more }
    }

    fn owner(&self) -> Option<OwnerId> {
        (self.owner != NO_OWNER).then_some(self.owner)
    }

    fn cidrs(&self) -> &[SelectorId] {
        self.more.as_ref().map_or(&[], |more| &more.cidrs)
    }

    fn is(&self, key: &AtomKey) -> bool {
        self.owner() == key.0 && self.cidrs() == &*key.1
    }

    /// The prefixes with an identity entry of this atom, in order.
    fn entries(&self) -> impl Iterator<Item = IpNet> + '_ {
        let more = self.more.as_ref().map_or(&[][..], |more| &more.entries);
        self.first_entry.map(IpNet::V4).into_iter().chain(more.iter().copied())
    }

    fn add_entry(&mut self, net: IpNet) {
        let mut other = net;
        if let IpNet::V4(v4) = net {
            match self.first_entry {
                None => {
                    // No IPv4 entry yet: this is the lowest.
                    self.first_entry = Some(v4);
                    return;
                }
                Some(first) if first == v4 => return,
                Some(first) if v4 < first => {
                    self.first_entry = Some(v4);
                    other = IpNet::V4(first);
                }
                Some(_) => {}
            }
        }
        let more = &mut self.more.get_or_insert_with(Box::default).entries;
        if let Err(at) = more.binary_search(&other) {
            more.insert(at, other);
        }
    }

    fn remove_entry(&mut self, net: &IpNet) {
        if let IpNet::V4(v4) = net
            && self.first_entry == Some(*v4)
        {
            // The next lowest, if it is an IPv4 prefix, comes inline.
            self.first_entry = self.more.as_mut().and_then(|more| match more.entries.first().copied() {
                Some(IpNet::V4(lowest)) => {
                    more.entries.remove(0);
                    Some(lowest)
                }
                _ => None,
            });
        } else if let Some(more) = self.more.as_mut()
            && let Ok(at) = more.entries.binary_search(net)
        {
            more.entries.remove(at);
        } else {
            return;
        }
        if self.more.as_ref().is_some_and(|more| more.cidrs.is_empty() && more.entries.is_empty()) {
            self.more = None;
        }
    }
}

/// What a `settle` changed in the set of atoms.
pub(super) struct Settled {
    /// New atoms: number, owner, CIDR peers.
    pub(super) appeared: Vec<(IdentityId, Option<OwnerId>, Box<[SelectorId]>)>,
    pub(super) vanished: Vec<IdentityId>,
}

#[derive(Debug)]
pub(super) struct Partition {
    prefixes: BTreeMap<IpNet, PrefixState>,
    /// The CIDR roles of the prefixes that have any.
    roles: HashMap<IpNet, CidrRoles>,
    /// Distinct prefix lengths in use per (family is v4, length).
    lengths: BTreeMap<(bool, u8), usize>,
    /// The same for declared prefixes only.
    declared_lengths: BTreeMap<(bool, u8), usize>,
    atoms: DenseMap<AtomState>,
    /// Atoms by owner, and those of no declared identity. An atom is found
    /// by its key among its owner's (a few at most), or among the atoms of
    /// its least-used CIDR peer. An owner of one atom (most: an identity no
    /// CIDR peer splits) has it in `owned`, four bytes, where a set took 16;
    /// owners of more have them all in `owned_more`.
    owned: DenseMap<NonZeroU32>,
    owned_more: HashMap<OwnerId, SmallSet<IdentityId>>,
    unowned: SmallSet<IdentityId>,
    by_selector: NumberMap<SelectorId, SmallSet<IdentityId>>,
    pool: IdPool,
    /// Prefixes whose role changed since the last settle, in the order
    /// they changed (sorted once, at the settle: a load of 100,000
    /// addresses spent 2% of its time keeping a set of them in order).
    dirty: Vec<IpNet>,
}

impl Partition {
    pub(super) fn new(first_dynamic: IdentityId) -> Self {
        let mut partition = Self {
            prefixes: BTreeMap::new(),
            roles: HashMap::new(),
            lengths: BTreeMap::new(),
            declared_lengths: BTreeMap::new(),
            atoms: DenseMap::default(),
            owned: DenseMap::default(),
            owned_more: HashMap::new(),
            unowned: SmallSet::default(),
            by_selector: NumberMap::default(),
            pool: IdPool::starting_at(first_dynamic),
            dirty: Vec::new(),
        };
        let mut world = AtomState::new((None, Box::default()), IDENTITY_FLAG_NO_RULES_FROM_WORLD);
        world.prefixes = 2;
        partition.atoms.insert(IDENTITY_WORLD, world);
        partition.unowned.insert(IDENTITY_WORLD);
        for net in [IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())] {
            let mut state = PrefixState::new(true);
            state.atom = IDENTITY_WORLD;
            partition.prefixes.insert(net, state);
            partition.lengths.insert((net.addr().is_ipv4(), 0), 1);
        }
        partition
    }

    /// The atom standing for `key`, if there is one.
    fn find_atom(&self, key: &AtomKey) -> Option<IdentityId> {
        let is_key = |id: &IdentityId| self.atoms.get(id).is_some_and(|atom| atom.is(key));
        if key.0.is_some() {
            return self.atoms_of(key.0).find(is_key);
        }
        let candidates = key
            .1
            .iter()
            .map(|selector| self.by_selector.get(selector).map_or(&[][..], SmallSet::as_slice))
            .min_by_key(|atoms| atoms.len())
            .unwrap_or(self.unowned.as_slice());
        candidates.iter().copied().find(is_key)
    }

    /// Files atom `id` under `owner`.
    fn add_owned(&mut self, owner: Option<OwnerId>, id: IdentityId) {
        let Some(owner) = owner else {
            self.unowned.insert(id);
            return;
        };
        if let Some(atoms) = self.owned_more.get_mut(&owner) {
            atoms.insert(id);
        } else if let Some(only) = self.owned.get(&owner).map(|only| only.get()) {
            if only != id {
                self.owned.remove(&owner);
                self.owned_more
                    .insert(owner, SmallSet::from_sorted(if only < id { vec![only, id] } else { vec![id, only] }));
            }
        } else if let Some(id) = NonZeroU32::new(id) {
            // Never 0: atoms are numbered from `world` (1) up.
            self.owned.insert(owner, id);
        }
    }

    /// Takes atom `id` off `owner`'s.
    fn remove_owned(&mut self, owner: Option<OwnerId>, id: IdentityId) {
        let Some(owner) = owner else {
            self.unowned.remove(&id);
            return;
        };
        if let Some(atoms) = self.owned_more.get_mut(&owner) {
            atoms.remove(&id);
            if let [only] = atoms.as_slice()
                && let Some(only) = NonZeroU32::new(*only)
            {
                self.owned_more.remove(&owner);
                self.owned.insert(owner, only);
            }
        } else if self.owned.get(&owner).is_some_and(|only| only.get() == id) {
            self.owned.remove(&owner);
        }
    }

    /// The state of `net`, to be derived again at the next settle.
    fn state(&mut self, net: IpNet) -> &mut PrefixState {
        self.dirty.push(net);
        self.state_kept(net)
    }

    /// The state of `net`, made if there is none.
    fn state_kept(&mut self, net: IpNet) -> &mut PrefixState {
        match self.prefixes.entry(net) {
            btree_map::Entry::Occupied(known) => known.into_mut(),
            btree_map::Entry::Vacant(new) => {
                *self.lengths.entry((net.addr().is_ipv4(), net.prefix_len())).or_default() += 1;
                new.insert(PrefixState::new(false))
            }
        }
    }

    /// Rebuilds the prefix table from its entries (see [`super::Engine::compact`]).
    pub(super) fn compact(&mut self) {
        self.prefixes = std::mem::take(&mut self.prefixes).into_iter().collect();
    }

    /// Forgets `net` from the map and its length count.
    fn forget(&mut self, net: IpNet) -> Option<PrefixState> {
        let state = self.prefixes.remove(&net)?;
        count_down(&mut self.lengths, (net.addr().is_ipv4(), net.prefix_len()));
        Some(state)
    }

    pub(super) fn set_owner(&mut self, net: IpNet, owner: Option<OwnerId>) {
        self.state(net).owner = owner.unwrap_or(NO_OWNER);
    }

    /// Counts one more identity declaring exactly `net` (for the checks).
    pub(super) fn declare(&mut self, net: IpNet) -> AddressProblems {
        let state = self.state_kept(net);
        state.count_declared(1);
        if state.declared() > 1 {
            return AddressProblems { duplicate: true, related: 0 };
        }
        let related = self.related(net);
        *self.declared_lengths.entry((net.addr().is_ipv4(), net.prefix_len())).or_default() += 1;
        AddressProblems { duplicate: false, related }
    }

    /// Counts one identity fewer declaring exactly `net`.
    pub(super) fn undeclare(&mut self, net: IpNet) -> AddressProblems {
        let Some(state) = self.prefixes.get_mut(&net).filter(|state| state.declared() > 0) else {
            return AddressProblems::default();
        };
        state.count_declared(-1);
        if state.declared() > 0 {
            return AddressProblems { duplicate: true, related: 0 };
        }
        // A prefix never settled (its declaration was refused) goes now;
        // one settled goes when its owner leaves it.
        if !state.is_used() && state.atom == 0 {
            self.forget(net);
        }
        count_down(&mut self.declared_lengths, (net.addr().is_ipv4(), net.prefix_len()));
        AddressProblems { duplicate: false, related: self.related(net) }
    }

    /// Distinct declared prefixes (other than `net`) that contain `net` or
    /// that `net` contains.
    fn related(&self, net: IpNet) -> usize {
        let v4 = net.addr().is_ipv4();
        let declared = |net: &IpNet| self.prefixes.get(net).is_some_and(|state| state.declared() > 0);
        let covering = self
            .declared_lengths
            .range((v4, 0)..(v4, net.prefix_len()))
            .filter_map(|(&(_, length), _)| IpNet::new(net.addr(), length).ok())
            .filter(|outer| declared(&outer.trunc()))
            .count();
        if net.prefix_len() == net.max_prefix_len() {
            // A single address has nothing nested in it.
            return covering;
        }
        let last = IpNet::new(net.broadcast(), net.max_prefix_len()).unwrap_or(net);
        let nested = self
            .prefixes
            .range(net..=last)
            .filter(|(inner, state)| **inner != net && state.declared() > 0 && net.contains(*inner))
            .count();
        covering + nested
    }

    pub(super) fn add_selector(&mut self, selector: SelectorId, cidr: IpNet, except: &[IpNet]) {
        self.roles_mut(cidr).cidr_of.push(selector);
        for net in except {
            self.roles_mut(*net).except_of.push(selector);
        }
    }

    pub(super) fn remove_selector(&mut self, selector: SelectorId, cidr: IpNet, except: &[IpNet]) {
        self.roles_mut(cidr).cidr_of.retain(|s| *s != selector);
        self.tidy_roles(cidr);
        for net in except {
            self.roles_mut(*net).except_of.retain(|s| *s != selector);
            self.tidy_roles(*net);
        }
    }

    /// The CIDR roles of `net`, made if there are none; its state is
    /// derived again at the next settle.
    fn roles_mut(&mut self, net: IpNet) -> &mut CidrRoles {
        self.state(net).set_flag(HAS_ROLES, true);
        self.roles.entry(net).or_default()
    }

    /// Drops the roles of `net` once no CIDR peer uses it.
    fn tidy_roles(&mut self, net: IpNet) {
        if self.roles.get(&net).is_some_and(|roles| roles.cidr_of.is_empty() && roles.except_of.is_empty()) {
            self.roles.remove(&net);
            self.state(net).set_flag(HAS_ROLES, false);
        }
    }

    /// Prefixes in use containing `net` (itself included), shortest first.
    fn covering(&self, net: IpNet) -> impl Iterator<Item = (IpNet, &PrefixState)> + '_ {
        let v4 = net.addr().is_ipv4();
        self.lengths.range((v4, 0)..=(v4, net.prefix_len())).filter_map(move |(&(_, length), _)| {
            let outer = IpNet::new(net.addr(), length).ok()?.trunc();
            self.prefixes.get(&outer).map(|state| (outer, state))
        })
    }

    /// The prefixes `dirty` and every prefix nested in one of them, in
    /// order, each once.
    fn region(&self, mut dirty: Vec<IpNet>) -> Vec<IpNet> {
        let mut nested = Vec::new();
        for net in &dirty {
            // A single address contains no other prefix (the common case,
            // and a load of 100,000 of them).
            if net.prefix_len() != net.max_prefix_len() {
                let last = IpNet::new(net.broadcast(), net.max_prefix_len()).unwrap_or(*net);
                let inside = self.prefixes.range(*net..=last).map(|(inner, _)| *inner);
                nested.extend(inside.filter(|inner| net.contains(inner)));
            }
        }
        dirty.append(&mut nested);
        dirty.sort_unstable();
        dirty.dedup();
        dirty
    }

    /// Derives again every prefix whose role changed and the prefixes
    /// nested in them; records identity entries and atoms that changed.
    pub(super) fn settle(
        &mut self,
        mode_of: &dyn Fn(Option<OwnerId>) -> u32,
        name_of: &dyn Fn(Option<OwnerId>) -> Name,
        identities: &mut Recorder<IpNet, IdentityValue>,
        atoms: &mut Recorder<IdentityId, Name>,
        counts: &mut EntryCounts,
    ) -> Settled {
        let dirty = std::mem::take(&mut self.dirty);
        let region = self.region(dirty);
        let mut touched_atoms: BTreeSet<IdentityId> = BTreeSet::new();
        let mut created: Vec<IdentityId> = Vec::new();
        // Prefixes no longer used leave first, so none is anyone's parent.
        for net in &region {
            self.retire_if_unused(*net, identities, counts, &mut touched_atoms);
        }
        for net in region {
            if !self.prefixes.get(&net).is_some_and(PrefixState::is_used) {
                continue;
            }
            let mut owner = None;
            let mut inside = BTreeSet::new();
            let mut excluded = BTreeSet::new();
            let mut parent = IDENTITY_WORLD;
            for (outer, state) in self.covering(net) {
                if owner.is_none() {
                    owner = state.owner();
                }
                if let Some(roles) = state.flag(HAS_ROLES).then(|| self.roles.get(&outer)).flatten() {
                    inside.extend(roles.cidr_of.iter().copied());
                    excluded.extend(roles.except_of.iter().copied());
                }
                if outer != net && state.atom != 0 {
                    parent = state.atom;
                }
            }
            let key: AtomKey = (owner, inside.difference(&excluded).copied().collect());
            let id = if let Some(id) = self.find_atom(&key) {
                id
            } else {
                {
                    let id = self.pool.take();
                    let flags = mode_of(key.0) | IDENTITY_FLAG_NO_RULES_FROM_WORLD;
                    self.add_owned(key.0, id);
                    for selector in &key.1 {
                        self.by_selector.entry(*selector).or_default().insert(id);
                    }
                    self.atoms.insert(id, AtomState::new(key, flags));
                    created.push(id);
                    id
                }
            };
            let state = self.prefixes.get_mut(&net).expect("checked above");
            let before = state.atom;
            let old_entry = state.has_entry().then(|| value_of(&self.atoms, before));
            if before != id {
                if let Some(atom) = self.atoms.get_mut(&before) {
                    atom.prefixes -= 1;
                    atom.remove_entry(&net);
                    touched_atoms.insert(before);
                }
                state.atom = id;
                self.atoms.get_mut(&id).expect("inserted above").prefixes += 1;
            }
            let atom = self.atoms.get_mut(&id).expect("inserted above");
            let wanted = (parent != id).then_some(IdentityValue { id, flags: atom.flags });
            if wanted != old_entry {
                identities.record(net, old_entry, wanted);
                counts.identity(net, i64::from(wanted.is_some()) - i64::from(old_entry.is_some()));
                state.set_flag(HAS_ENTRY, wanted.is_some());
            }
            if wanted.is_some() {
                atom.add_entry(net);
            } else {
                atom.remove_entry(&net);
            }
        }
        let mut vanished = Vec::new();
        for id in touched_atoms.iter().chain(&created) {
            if self.atoms.get(id).is_some_and(|atom| atom.prefixes == 0) {
                let atom = self.atoms.remove(id).expect("checked above");
                self.remove_owned(atom.owner(), *id);
                for selector in atom.cidrs() {
                    remove_id(&mut self.by_selector, selector, *id);
                }
                self.pool.give_back(*id);
                // An atom born and gone within this change was never seen.
                if !created.contains(id) {
                    atoms.record(*id, Some(name_of(atom.owner())), None);
                    vanished.push(*id);
                }
            }
        }
        let mut appeared = Vec::new();
        for id in created {
            if let Some(atom) = self.atoms.get(&id) {
                atoms.record(id, None, Some(name_of(atom.owner())));
                appeared.push((id, atom.owner(), atom.cidrs().into()));
            }
        }
        Settled { appeared, vanished }
    }

    /// Removes `net` if nothing uses it any more, with its entry.
    fn retire_if_unused(
        &mut self,
        net: IpNet,
        identities: &mut Recorder<IpNet, IdentityValue>,
        counts: &mut EntryCounts,
        touched_atoms: &mut BTreeSet<IdentityId>,
    ) {
        if self.prefixes.get(&net).is_some_and(|state| !state.is_used() && state.declared() == 0) {
            let state = self.forget(net).expect("checked above");
            if state.has_entry() {
                identities.record(net, Some(value_of(&self.atoms, state.atom)), None);
                counts.identity(net, -1);
            }
            if let Some(atom) = self.atoms.get_mut(&state.atom) {
                atom.prefixes -= 1;
                atom.remove_entry(&net);
                touched_atoms.insert(state.atom);
            }
        }
    }

    /// Sets an atom's flags, rewriting its identity entries if they change.
    pub(super) fn set_flags(&mut self, id: IdentityId, flags: u32, identities: &mut Recorder<IpNet, IdentityValue>) {
        let Some(atom) = self.atoms.get_mut(&id) else { return };
        if atom.flags == flags {
            return;
        }
        let (old, new) = (IdentityValue { id, flags: atom.flags }, IdentityValue { id, flags });
        atom.flags = flags;
        for net in atom.entries() {
            if self.prefixes.get(&net).is_some_and(PrefixState::has_entry) {
                identities.record(net, Some(old), Some(new));
            }
        }
    }

    pub(super) fn atoms_of(&self, owner: Option<OwnerId>) -> impl Iterator<Item = IdentityId> + '_ {
        let (only, atoms) = match owner {
            Some(owner) => (
                self.owned.get(&owner).map(|only| only.get()),
                self.owned_more.get(&owner).map_or(&[][..], SmallSet::as_slice),
            ),
            None => (None, self.unowned.as_slice()),
        };
        only.into_iter().chain(atoms.iter().copied())
    }

    pub(super) fn atoms_of_selector(&self, selector: SelectorId) -> impl Iterator<Item = IdentityId> + '_ {
        self.by_selector.get(&selector).into_iter().flatten().copied()
    }

    /// The flags of atom `id` (0 for none such).
    pub(super) fn flags(&self, id: IdentityId) -> u32 {
        value_of(&self.atoms, id).flags
    }

    /// The owner of atom `id` (inner `None`: no declared identity), if
    /// `id` is an atom.
    #[allow(clippy::option_option, reason = "not an atom, an atom of no identity, an atom of one")]
    pub(super) fn owner_of(&self, id: IdentityId) -> Option<Option<OwnerId>> {
        self.atoms.get(&id).map(AtomState::owner)
    }

    pub(super) fn entry(&self, net: IpNet) -> Option<IdentityValue> {
        self.prefixes.get(&net).filter(|state| state.has_entry()).map(|state| value_of(&self.atoms, state.atom))
    }

    pub(super) fn entries(&self) -> impl Iterator<Item = (IpNet, IdentityValue)> + '_ {
        self.prefixes
            .iter()
            .filter(|(_, state)| state.has_entry())
            .map(|(net, state)| (*net, value_of(&self.atoms, state.atom)))
    }

    pub(super) fn atoms(&self) -> impl Iterator<Item = (IdentityId, Option<OwnerId>, u32)> + '_ {
        self.atoms.iter().map(|(id, atom)| (id, atom.owner(), atom.flags))
    }

    /// The longest identity entry containing `addr`, else `world`.
    pub(super) fn lookup(&self, addr: IpAddr) -> IdentityValue {
        let net = IpNet::from(addr);
        self.longest_entry(addr, 0..=net.prefix_len())
    }

    /// The longest identity entry strictly containing `net`, else `world`.
    pub(super) fn lookup_shorter_than(&self, net: IpNet) -> IdentityValue {
        self.longest_entry(net.addr(), 0..net.prefix_len())
    }

    fn longest_entry(&self, addr: IpAddr, lengths: impl std::ops::RangeBounds<u8>) -> IdentityValue {
        let v4 = addr.is_ipv4();
        let (start, end) = (lengths.start_bound().cloned(), lengths.end_bound().cloned());
        let bound = |b: std::ops::Bound<u8>| b.map(|length| (v4, length));
        self.lengths
            .range((bound(start), bound(end)))
            .rev()
            .find_map(|(&(_, length), _)| {
                let outer = IpNet::new(addr, length).ok()?.trunc();
                self.prefixes
                    .get(&outer)
                    .filter(|state| state.has_entry())
                    .map(|state| value_of(&self.atoms, state.atom))
            })
            .unwrap_or(IdentityValue { id: IDENTITY_WORLD, flags: 0 })
    }

    pub(super) fn hold_freed_numbers(&mut self) {
        self.pool.holding = true;
    }

    pub(super) fn release_numbers(&mut self, atoms: &[IdentityId]) {
        self.pool.release(atoms);
    }

    pub(super) fn end_of_change(&mut self) {
        self.pool.end_of_change();
    }
}

/// The identity entry of a prefix of atom `id`.
fn value_of(atoms: &DenseMap<AtomState>, id: IdentityId) -> IdentityValue {
    IdentityValue { id, flags: atoms.get(&id).map_or(0, |atom| atom.flags) }
}

/// Counts one fewer of `key`, dropping it at zero.
fn count_down(counts: &mut BTreeMap<(bool, u8), usize>, key: (bool, u8)) {
    if let Some(n) = counts.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

/// What one declaration more or fewer of an exact prefix changes in the
/// checks' counts: a duplicate, or a prefix nested with `related` others.
#[derive(Debug, Default)]
pub(super) struct AddressProblems {
    pub(super) duplicate: bool,
    pub(super) related: usize,
}

fn remove_id<K: std::hash::Hash + Eq, S: std::hash::BuildHasher>(
    map: &mut HashMap<K, SmallSet<IdentityId>, S>,
    key: &K,
    id: IdentityId,
) {
    if let Some(set) = map.get_mut(key) {
        set.remove(&id);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    /// One state per atom, 100,000 of them at scale.
    #[test]
    fn atom_states_stay_compact() {
        assert_eq!(size_of::<Option<super::AtomState>>(), 32);
        assert_eq!(size_of::<super::PrefixState>(), 12);
    }

    #[test]
    fn a_prefix_keeps_its_count_and_flags_apart() {
        use super::{HAS_ENTRY, HAS_ROLES, PrefixState};
        let mut state = PrefixState::new(true);
        assert!(state.is_used() && !state.has_entry() && state.declared() == 0);
        state.count_declared(1);
        state.count_declared(1);
        state.set_flag(HAS_ENTRY, true);
        state.count_declared(-1);
        assert_eq!(state.declared(), 1);
        assert!(state.has_entry() && !state.flag(HAS_ROLES));
        state.count_declared(-1);
        state.count_declared(-1);
        assert_eq!(state.declared(), 0);
        assert!(state.has_entry() && state.is_used());
        let mut plain = PrefixState::new(false);
        assert!(!plain.is_used());
        plain.set_flag(HAS_ROLES, true);
        assert!(plain.is_used());
    }

    /// An atom's entries (the first inline, the others boxed) behave as a
    /// sorted set, and the box goes once nothing is left in it.
    #[test]
    fn atom_entries_behave_like_a_sorted_set() {
        use std::collections::BTreeSet;

        use ipnet::IpNet;

        for cidrs in [Vec::new(), vec![7]] {
            let mut atom = super::AtomState::new((Some(1), cidrs.clone().into_boxed_slice()), 0);
            let mut model = BTreeSet::new();
            let mut x: u32 = 11;
            for _ in 0..3000 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let n = (x >> 16) % 8;
                let net = if n < 5 {
                    IpNet::from(std::net::IpAddr::from(std::net::Ipv4Addr::from((10 << 24) | n)))
                } else {
                    IpNet::from(std::net::IpAddr::from(std::net::Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(n))))
                };
                if x & 1 == 0 {
                    atom.add_entry(net);
                    model.insert(net);
                } else {
                    atom.remove_entry(&net);
                    model.remove(&net);
                }
                assert!(atom.entries().eq(model.iter().copied()));
                assert_eq!(atom.cidrs(), cidrs.as_slice());
                let inline = usize::from(model.first().is_some_and(|first| first.addr().is_ipv4()));
                assert_eq!(atom.more.is_some(), model.len() > inline || !cidrs.is_empty());
            }
        }
    }
}
