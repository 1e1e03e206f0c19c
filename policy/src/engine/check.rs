//! The declarations of every identity and rule name, and validation kept
//! in step with them: each kind of problem the full validator
//! ([`crate::validate`]) reports is a counter here, updated as declarations
//! come and go, so a change is checked in the time its own declarations
//! take. The counters only say *whether* the policy is valid; the full
//! validator names the problems of a refused change.
//!
//! A name's record also holds what the engine compiled of it (the rules
//! naming the identity, the rule's number; an identity's compiled
//! declaration is its declaration in force, except within a change): one
//! table per kind of name, where separate maps for each question cost a
//! key and a bucket each at 100,000 names.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::Arc;

use super::Name;
use super::labels::{LabelSelectors, Labels, labels_match};
use super::partition::Partition;
use super::small::SmallSet;
use super::stored::{StoredIdentity as Identity, StoredRule as Rule, StoredSelector as Selector};
use crate::model::{HOST, WORLD};

/// The declarations of a name declared more than once (pods alike, one
/// identity, or duplicates), and the one identity pods alike make
/// ([`Checks::merge_pods`]), made again after any of them changes. Kept
/// beside the records, which hold the first declaration alone: a record
/// with room for a list took 8 bytes more for each of 100,000 names.
#[derive(Debug)]
struct Several {
    items: Vec<Arc<Identity>>,
    merged: Option<Arc<Identity>>,
}

/// The declarations of record `id`.
fn declarations<'a>(
    record: &'a IdentityRecord,
    several: &'a HashMap<OwnerId, Several>,
    id: OwnerId,
) -> &'a [Arc<Identity>] {
    match several.get(&id) {
        Some(several) => &several.items,
        None => record.declared.as_slice(),
    }
}

/// Adds a declaration to record `id`; returns how many there are now.
fn declare(
    record: &mut IdentityRecord,
    several: &mut HashMap<OwnerId, Several>,
    id: OwnerId,
    item: Arc<Identity>,
) -> usize {
    let Some(first) = &record.declared else {
        record.declared = Some(item);
        return 1;
    };
    let list = several.entry(id).or_insert_with(|| Several { items: vec![Arc::clone(first)], merged: None });
    list.items.push(item);
    list.merged = None;
    list.items.len()
}

/// Removes a declaration from record `id`; returns how many are left.
fn undeclare(
    record: &mut IdentityRecord,
    several: &mut HashMap<OwnerId, Several>,
    id: OwnerId,
    item: &Arc<Identity>,
) -> usize {
    let Some(list) = several.get_mut(&id) else {
        if record.declared.as_ref().is_some_and(|only| Arc::ptr_eq(only, item)) {
            record.declared = None;
        }
        return usize::from(record.declared.is_some());
    };
    if let Some(at) = list.items.iter().position(|d| Arc::ptr_eq(d, item)) {
        list.items.swap_remove(at);
        list.merged = None;
    }
    record.declared = list.items.first().cloned();
    let left = list.items.len();
    if left <= 1 {
        several.remove(&id);
        if several.is_empty() {
            // A refused change may have filled it: its room goes too.
            *several = HashMap::new();
        }
    }
    left
}

/// The engine's number for an identity name (not a kernel identity): the
/// partition and the atoms refer to owners by it, so they hold four bytes
/// and index a vector where a name would be a pointer pair to hash.
pub(crate) type OwnerId = u32;

/// Everything kept under one identity name.
#[derive(Debug)]
struct IdentityRecord {
    name: Name,
    /// The first declaration; all of them in [`Checks::several`] when
    /// there are more.
    declared: Option<Arc<Identity>>,
    /// Peers naming the identity (`world` and `host` aside).
    refs: u32,
    /// Active rules with a peer naming the identity.
    naming_rules: SmallSet<u32>,
    /// Declarations that are not pods alike the first: each a duplicate.
    strays: u32,
}

impl IdentityRecord {
    /// Unused, once nothing is compiled of it either.
    fn is_unreferenced(&self) -> bool {
        self.declared.is_none() && self.refs == 0 && self.naming_rules.is_empty()
    }
}

/// Identity numbers by name. The name is in the number's record already,
/// so the table holds numbers alone and compares names through the
/// records: 4 bytes a bucket, where a map from a copy of the name took
/// 24 (3.1 MB at 100,000 identities, now 0.5).
#[derive(Debug, Default)]
struct NameIndex {
    numbers: hashbrown::HashTable<OwnerId>,
    hasher: std::hash::RandomState,
}

/// The name of record `id` in `records`; every number in a [`NameIndex`]
/// has one.
fn name_in(records: &[Option<IdentityRecord>], id: OwnerId) -> &str {
    records.get(id as usize).and_then(Option::as_ref).map_or("", |record| &record.name)
}

impl NameIndex {
    fn get(&self, name: &str, records: &[Option<IdentityRecord>]) -> Option<OwnerId> {
        let hash = self.hasher.hash_one(name);
        self.numbers.find(hash, |&id| name_in(records, id) == name).copied()
    }

    /// Indexes `id`, whose record (in `records`) must be there.
    fn insert(&mut self, id: OwnerId, records: &[Option<IdentityRecord>]) {
        let hash = self.hasher.hash_one(name_in(records, id));
        let hasher = &self.hasher;
        self.numbers.insert_unique(hash, id, |&other| hasher.hash_one(name_in(records, other)));
    }

    /// Room for `more` numbers without growing on the way.
    fn reserve(&mut self, more: usize, records: &[Option<IdentityRecord>]) {
        let hasher = &self.hasher;
        self.numbers.reserve(more, |&other| hasher.hash_one(name_in(records, other)));
    }

    /// Forgets `name`: call while its record is still in `records`.
    fn remove(&mut self, name: &str, records: &[Option<IdentityRecord>]) {
        let hash = self.hasher.hash_one(name);
        if let Ok(entry) = self.numbers.find_entry(hash, |&id| name_in(records, id) == name) {
            entry.remove();
        }
    }
}

/// Everything kept under one rule name: 16 bytes, the whole bucket of a
/// table of 100,000 (keyed by a copy of the name, a bucket took 24).
#[derive(Debug)]
struct RuleRecord {
    /// The first declaration while `declared`; any others are duplicates,
    /// kept in [`Checks::duplicate_rules`]. Once none is left (the rule is
    /// still active until the change compiles), the last one: the record's
    /// name is this rule's.
    rule: Arc<Rule>,
    /// The rule's number (`rule_index`) while it is active, else
    /// [`INACTIVE`].
    number: u32,
    declared: bool,
}

/// [`RuleRecord::number`] of a rule that is not active: no `rule_index`
/// comes near it (the maps hold far fewer rules).
const INACTIVE: u32 = u32::MAX;

impl RuleRecord {
    fn number(&self) -> Option<u32> {
        (self.number != INACTIVE).then_some(self.number)
    }

    fn is_named(&self, name: &str) -> bool {
        *self.rule.name == *name
    }
}

/// Rule records by the name of the rule each holds.
#[derive(Debug, Default)]
struct RuleRecords {
    records: hashbrown::HashTable<RuleRecord>,
    hasher: std::hash::RandomState,
}

impl RuleRecords {
    fn get(&self, name: &str) -> Option<&RuleRecord> {
        self.records.find(self.hasher.hash_one(name), |record| record.is_named(name))
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut RuleRecord> {
        self.records.find_mut(self.hasher.hash_one(name), |record| record.is_named(name))
    }

    fn insert(&mut self, record: RuleRecord) {
        let hasher = &self.hasher;
        let hash = hasher.hash_one(&*record.rule.name);
        self.records.insert_unique(hash, record, |other| hasher.hash_one(&*other.rule.name));
    }

    /// Room for `more` records without growing on the way.
    fn reserve(&mut self, more: usize) {
        let hasher = &self.hasher;
        self.records.reserve(more, |other| hasher.hash_one(&*other.rule.name));
    }

    fn remove(&mut self, name: &str) {
        if let Ok(entry) = self.records.find_entry(self.hasher.hash_one(name), |record| record.is_named(name)) {
            entry.remove();
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Checks {
    /// Identity records by name, and by number.
    identity_ids: NameIndex,
    identities: Vec<Option<IdentityRecord>>,
    /// The declarations of identity names declared more than once.
    several: HashMap<OwnerId, Several>,
    /// The declaration compiled now of each identity whose declaration in
    /// force ([`Self::identity`]) is another: those a change has touched
    /// and not compiled yet. Every other identity has its declaration in
    /// force compiled, so a record keeps no pointer of its own for it (8
    /// bytes for each of 100,000), and this is empty between changes.
    compiled_apart: HashMap<OwnerId, Option<Arc<Identity>>>,
    free_ids: Vec<OwnerId>,
    /// Records that may have become unused: freed at the end of a change,
    /// never within one, so a number refers to one name for a whole change.
    untidy: Vec<OwnerId>,
    rules: RuleRecords,
    /// Declarations of a rule name after its first: each a duplicate, so
    /// none in a valid policy.
    duplicate_rules: HashMap<Name, Vec<Arc<Rule>>>,
    /// Identities with a compiled declaration.
    compiled_identities: usize,
    /// Declarations by one of their labels, keyed by allocation.
    by_label: HashMap<(Name, Name), HashMap<usize, Arc<Identity>>>,
    identity_declarations: usize,
    /// Peers using each label selector, and the declarations it matches.
    label_refs: HashMap<Labels, (usize, usize)>,
    /// Used label selectors, found from the labels they select.
    selectors: LabelSelectors,
    problems: Problems,
    unmatched: Unmatched,
}

/// One counter per kind of problem; all zero means valid.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Problems {
    reserved_names: usize,
    duplicate_identities: usize,
    duplicate_rules: usize,
    duplicate_addresses: usize,
    nested_addresses: usize,
}

/// Peers that select no identity now: valid (a rule may come before the
/// identities it names), counted for the warnings.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Unmatched {
    /// Peers naming an identity no declaration has.
    undeclared_references: usize,
    /// Peers with a label selector no declaration satisfies.
    label_selectors: usize,
}

impl Checks {
    pub(super) fn is_clean(&self) -> bool {
        self.problems == Problems::default()
    }

    /// Rule peers that select no identity now.
    pub(super) fn unmatched_peers(&self) -> usize {
        self.unmatched.undeclared_references + self.unmatched.label_selectors
    }

    /// The identity numbered `id` when declared exactly once, or as pods
    /// alike (merged by [`Self::merge_pods`]).
    pub(super) fn identity(&self, id: OwnerId) -> Option<&Arc<Identity>> {
        let record = self.record(id)?;
        match self.several.get(&id) {
            Some(several) if record.strays == 0 => several.merged.as_ref(),
            Some(_) => None,
            None => record.declared.as_ref(),
        }
    }

    /// Makes the one identity of several declarations of pods alike under
    /// `id`, unless it is made already: once per change, however many of
    /// its pods the change touches.
    pub(super) fn merge_pods(&mut self, id: OwnerId) {
        self.keep_compiled(id);
        let Some(record) = self.identities.get(id as usize).and_then(Option::as_ref) else { return };
        if let Some(several) = self.several.get_mut(&id)
            && record.strays == 0
            && several.merged.is_none()
        {
            several.merged = Some(Arc::new(Identity::merged(&several.items)));
        }
    }

    /// The name of the pod declared with `addr` under identity `id`.
    pub(super) fn pod_at(&self, id: OwnerId, addr: std::net::IpAddr) -> Option<&str> {
        let record = self.record(id)?;
        let declared = declarations(record, &self.several, id).iter();
        declared.filter(|d| d.addresses().any(|net| net.contains(&addr))).find_map(|d| d.pod_name())
    }

    /// The number of identity name `name`, while anything refers to it.
    pub(super) fn identity_id(&self, name: &str) -> Option<OwnerId> {
        self.identity_ids.get(name, &self.identities)
    }

    /// The name numbered `id`.
    pub(super) fn identity_name(&self, id: OwnerId) -> Option<&Name> {
        self.record(id).map(|record| &record.name)
    }

    fn record(&self, id: OwnerId) -> Option<&IdentityRecord> {
        self.identities.get(id as usize).and_then(Option::as_ref)
    }

    fn record_mut(&mut self, id: OwnerId) -> Option<&mut IdentityRecord> {
        self.identities.get_mut(id as usize).and_then(Option::as_mut)
    }

    /// The record of `name`, made if there is none; its number.
    fn record_for(&mut self, name: &Name) -> (OwnerId, &mut IdentityRecord) {
        let id = if let Some(id) = self.identity_ids.get(name, &self.identities) {
            id
        } else {
            let record = IdentityRecord {
                name: Name::clone(name),
                declared: None,
                refs: 0,
                naming_rules: SmallSet::default(),
                strays: 0,
            };
            let id = if let Some(id) = self.free_ids.pop() {
                self.identities[id as usize] = Some(record);
                id
            } else {
                if self.identities.len() == self.identities.capacity() {
                    // By an eighth, not double: a doubled vector of
                    // 100,000 records is a third empty.
                    self.identities.reserve_exact((self.identities.len() / 8).max(16));
                }
                self.identities.push(Some(record));
                OwnerId::try_from(self.identities.len() - 1).unwrap_or(OwnerId::MAX)
            };
            self.identity_ids.insert(id, &self.identities);
            id
        };
        (id, self.identities[id as usize].as_mut().expect("numbered records exist"))
    }

    /// The rule `name` (and the name as kept here) when declared exactly
    /// once, and its number while active: one lookup for both.
    pub(super) fn rule(&self, name: &str) -> (Option<(Name, Arc<Rule>)>, Option<u32>) {
        let Some(record) = self.rules.get(name) else { return (None, None) };
        let duplicated = !self.duplicate_rules.is_empty() && self.duplicate_rules.contains_key(name);
        let only = (record.declared && !duplicated).then(|| (Name::clone(&record.rule.name), Arc::clone(&record.rule)));
        (only, record.number())
    }

    /// Rule name `name` as its record holds it, while there is one.
    pub(super) fn rule_name(&self, name: &str) -> Option<&Name> {
        self.rules.get(name).map(|record| &record.rule.name)
    }

    /// The declaration of identity `id` compiled now.
    pub(super) fn compiled_identity(&self, id: OwnerId) -> Option<&Arc<Identity>> {
        match self.compiled_apart.get(&id) {
            Some(apart) => apart.as_ref(),
            None => self.identity(id),
        }
    }

    /// Whether `compiled` (`None`: nothing) is identity `id`'s declaration
    /// in force, the very one.
    fn is_in_force(&self, id: OwnerId, compiled: Option<&Arc<Identity>>) -> bool {
        match (compiled, self.identity(id)) {
            (None, None) => true,
            (Some(compiled), Some(in_force)) => Arc::ptr_eq(compiled, in_force),
            _ => false,
        }
    }

    /// Forgets the compiled declarations kept apart that are in force
    /// again: a refused change puts the declarations back uncompiled.
    pub(super) fn forget_compiled_in_force(&mut self) {
        for (id, compiled) in std::mem::take(&mut self.compiled_apart) {
            if !self.is_in_force(id, compiled.as_ref()) {
                self.compiled_apart.insert(id, compiled);
            }
        }
    }

    /// Identities whose compiled declaration is kept apart now.
    #[cfg(test)]
    pub(super) fn compiled_apart(&self) -> usize {
        self.compiled_apart.len()
    }

    /// Keeps what is compiled of identity `id` before its declaration in
    /// force changes (see [`Self::compiled_apart`]).
    fn keep_compiled(&mut self, id: OwnerId) {
        if !self.compiled_apart.contains_key(&id) {
            let compiled = self.identity(id).cloned();
            self.compiled_apart.insert(id, compiled);
        }
    }

    /// Every identity compiled now, by number.
    pub(super) fn compiled_identities(&self) -> impl Iterator<Item = (OwnerId, &Arc<Identity>)> + '_ {
        let ids = 0..OwnerId::try_from(self.identities.len()).unwrap_or(OwnerId::MAX);
        ids.filter_map(|id| Some((id, self.compiled_identity(id)?)))
    }

    /// Every compiled identity with its declarations (each pod's own, for
    /// identities of pods alike).
    pub(super) fn compiled_declarations(&self) -> impl Iterator<Item = (&Arc<Identity>, &[Arc<Identity>])> + '_ {
        self.compiled_identities().filter_map(|(id, compiled)| {
            let record = self.record(id)?;
            Some((compiled, declarations(record, &self.several, id)))
        })
    }

    pub(super) fn compiled_identity_count(&self) -> usize {
        self.compiled_identities
    }

    /// Records which declaration of identity `id` is compiled now.
    pub(super) fn set_compiled(&mut self, id: OwnerId, identity: Option<Arc<Identity>>) {
        if self.record(id).is_none() {
            return;
        }
        let (was, is) = (self.compiled_identity(id).is_some(), identity.is_some());
        if self.is_in_force(id, identity.as_ref()) {
            self.compiled_apart.remove(&id);
            if self.compiled_apart.is_empty() {
                // A large change fills it: its room goes once it is done.
                self.compiled_apart = HashMap::new();
            }
        } else {
            self.compiled_apart.insert(id, identity);
        }
        self.compiled_identities = self.compiled_identities - usize::from(was) + usize::from(is);
        self.untidy.push(id);
    }

    /// Active rules with a peer naming identity `id`.
    pub(super) fn rules_naming(&self, id: OwnerId) -> &[u32] {
        self.record(id).map_or(&[], |record| record.naming_rules.as_slice())
    }

    /// Files active rule `rule` under the identity `name` it names.
    pub(super) fn name_rule(&mut self, name: &Name, rule: u32) {
        self.record_for(name).1.naming_rules.insert(rule);
    }

    pub(super) fn unname_rule(&mut self, name: &str, rule: u32) {
        if let Some(id) = self.identity_id(name)
            && let Some(record) = self.record_mut(id)
        {
            record.naming_rules.remove(&rule);
            self.untidy.push(id);
        }
    }

    /// Records rule `name`'s number. A rule is numbered only while
    /// declared, and keeps its record until it is numbered no more, so the
    /// record is there.
    pub(super) fn set_rule_number(&mut self, name: &str, number: Option<u32>) {
        let Some(record) = self.rules.get_mut(name) else {
            debug_assert!(number.is_none(), "rule {name} numbered without a declaration");
            return;
        };
        record.number = number.unwrap_or(INACTIVE);
        if number.is_none() && !record.declared {
            self.rules.remove(name);
        }
    }

    /// Frees the records nothing refers to any more (at the end of a change).
    pub(super) fn tidy(&mut self) {
        for id in std::mem::take(&mut self.untidy) {
            if let Some(record) = self.record(id)
                && record.is_unreferenced()
                && self.compiled_identity(id).is_none()
            {
                let name = Name::clone(&record.name);
                self.compiled_apart.remove(&id);
                self.identity_ids.remove(&name, &self.identities);
                self.identities[id as usize] = None;
                self.free_ids.push(id);
            }
        }
    }

    /// Makes room for a fragment of `identities` and `rules` at once: a
    /// large file's records would otherwise grow their tables a step at a
    /// time, each step moving every record made before it. Room for that
    /// many in all, not that many more: a file read again finds its names'
    /// records still here (they stay to the end of the change), and room
    /// for a second set of them would stay empty for good.
    pub(super) fn reserve(&mut self, identities: usize, rules: usize) {
        let numbered = self.identities.len() - self.free_ids.len();
        let more = identities.saturating_sub(numbered);
        self.identities.reserve_exact(more.saturating_sub(self.free_ids.len()));
        self.identity_ids.reserve(more, &self.identities);
        self.rules.reserve(rules.saturating_sub(self.rules.records.len()));
    }

    /// Room in the identity records, their index and the rule records.
    #[cfg(test)]
    pub(super) fn capacities(&self) -> (usize, usize, usize) {
        (self.identities.capacity(), self.identity_ids.numbers.capacity(), self.rules.records.capacity())
    }

    /// Adds a declaration; its addresses are counted in `partition`,
    /// which holds every prefix anyway.
    pub(super) fn add_identity(&mut self, identity: &Arc<Identity>, partition: &mut Partition) {
        let name = &*identity.name;
        if name == WORLD || name == HOST {
            self.problems.reserved_names += 1;
        }
        let (id, _) = self.record_for(&identity.name);
        self.keep_compiled(id);
        let record = self.identities[id as usize].as_mut().expect("made above");
        if declare(record, &mut self.several, id, Arc::clone(identity)) == 1 {
            let refs = record.refs as usize;
            self.unmatched.undeclared_references -= refs;
        } else if !record.declared.as_ref().is_some_and(|first| first.is_pod_like(identity)) {
            record.strays += 1;
            self.problems.duplicate_identities += 1;
        }
        for net in identity.addresses() {
            let found = partition.declare(net);
            if found.duplicate {
                self.problems.duplicate_addresses += 1;
            } else {
                self.problems.nested_addresses += found.related;
            }
        }
        self.identity_declarations += 1;
        for pair in identity.labels() {
            let key = (pair.0.clone(), pair.1.clone());
            self.by_label.entry(key).or_default().insert(Arc::as_ptr(identity) as usize, Arc::clone(identity));
        }
        self.count_matches(identity, 1);
    }

    pub(super) fn remove_identity(&mut self, identity: &Arc<Identity>, partition: &mut Partition) {
        let name = &*identity.name;
        if name == WORLD || name == HOST {
            self.problems.reserved_names -= 1;
        }
        let id = self.identity_id(name);
        if let Some(id) = id {
            self.keep_compiled(id);
        }
        if let Some(id) = id
            && let Some(record) = self.identities.get_mut(id as usize).and_then(Option::as_mut)
        {
            let strays = record.strays;
            let was_first = record.declared.as_ref().is_some_and(|first| Arc::ptr_eq(first, identity));
            let left = undeclare(record, &mut self.several, id, identity);
            let first = record.declared.clone();
            record.strays = match &first {
                // Strays are counted against the first: a new first, a new count.
                Some(first) if was_first => {
                    let others = declarations(record, &self.several, id).iter().skip(1);
                    u32::try_from(others.filter(|d| !first.is_pod_like(d)).count()).unwrap_or(u32::MAX)
                }
                Some(first) if !first.is_pod_like(identity) => strays - 1,
                _ => strays,
            };
            if left == 0 {
                record.strays = 0;
                let refs = record.refs as usize;
                self.unmatched.undeclared_references += refs;
            }
            let now = record.strays;
            self.problems.duplicate_identities = self.problems.duplicate_identities + now as usize - strays as usize;
            self.untidy.push(id);
        }
        for net in identity.addresses() {
            let found = partition.undeclare(net);
            if found.duplicate {
                self.problems.duplicate_addresses -= 1;
            } else {
                self.problems.nested_addresses -= found.related;
            }
        }
        self.identity_declarations -= 1;
        for pair in identity.labels() {
            let key = (pair.0.clone(), pair.1.clone());
            if let Some(found) = self.by_label.get_mut(&key) {
                found.remove(&(Arc::as_ptr(identity) as usize));
                if found.is_empty() {
                    self.by_label.remove(&key);
                }
            }
        }
        self.count_matches(identity, -1);
    }

    /// Adds `delta` to the match count of every used label selector the
    /// identity satisfies.
    fn count_matches(&mut self, identity: &Identity, delta: isize) {
        if self.label_refs.is_empty() {
            return;
        }
        for wanted in self.selectors.satisfied_by(identity.labels()) {
            if let Some((refs, matches)) = self.label_refs.get_mut(wanted) {
                let before = *matches;
                *matches = matches.saturating_add_signed(delta);
                if before == 0 && *matches > 0 {
                    self.unmatched.label_selectors -= *refs;
                } else if before > 0 && *matches == 0 {
                    self.unmatched.label_selectors += *refs;
                }
            }
        }
    }

    /// Declarations matching `wanted`, counted from the label index.
    fn matches(&self, wanted: &Labels) -> usize {
        let smallest = wanted
            .iter()
            .map(|(k, v)| self.by_label.get(&(k.clone(), v.clone())))
            .min_by_key(|found| found.map_or(0, HashMap::len));
        match smallest {
            None => self.identity_declarations,
            Some(None) => 0,
            Some(Some(found)) => found.values().filter(|identity| labels_match(wanted, identity.labels())).count(),
        }
    }

    pub(super) fn add_rule(&mut self, rule: &Arc<Rule>) {
        match self.rules.get_mut(&rule.name) {
            None => self.rules.insert(RuleRecord { rule: Arc::clone(rule), number: INACTIVE, declared: true }),
            Some(record) if !record.declared => {
                record.rule = Arc::clone(rule);
                record.declared = true;
            }
            Some(_) => {
                self.duplicate_rules.entry(Name::clone(&rule.name)).or_default().push(Arc::clone(rule));
                self.problems.duplicate_rules += 1;
            }
        }
        for peer in rule.from.iter().chain(&rule.to) {
            match peer {
                Selector::Identity(name) if &**name == WORLD || &**name == HOST => {}
                Selector::Identity(name) => {
                    let (_, record) = self.record_for(name);
                    record.refs += 1;
                    if record.declared.is_none() {
                        self.unmatched.undeclared_references += 1;
                    }
                }
                Selector::Labels(wanted) => self.add_label_ref(wanted),
                // Pods that are not there yet are the rule in a cluster:
                // `policy check` names such peers, the count does not.
                Selector::Cidr { .. } | Selector::Pods(_) => {}
            }
        }
    }

    pub(super) fn remove_rule(&mut self, rule: &Arc<Rule>) {
        if let Some(record) = self.rules.get_mut(&rule.name) {
            let mut others = self.duplicate_rules.get_mut(&*rule.name);
            if record.declared && Arc::ptr_eq(&record.rule, rule) {
                match others.as_mut().and_then(|others| others.pop()) {
                    Some(next) => record.rule = next,
                    None => record.declared = false,
                }
            } else if let Some(others) = others.as_mut()
                && let Some(at) = others.iter().position(|other| Arc::ptr_eq(other, rule))
            {
                others.swap_remove(at);
            }
            let others_left = others.map_or(0, |others| others.len());
            if others_left == 0 {
                self.duplicate_rules.remove(&*rule.name);
                if self.duplicate_rules.is_empty() {
                    // A refused change may have filled it: its room goes too.
                    self.duplicate_rules = HashMap::new();
                }
            }
            if record.declared {
                // Another declaration of the name is left: one duplicate fewer.
                self.problems.duplicate_rules -= 1;
            } else if record.number().is_none() {
                self.rules.remove(&rule.name);
            }
        }
        for peer in rule.from.iter().chain(&rule.to) {
            match peer {
                Selector::Identity(name) if &**name == WORLD || &**name == HOST => {}
                Selector::Identity(name) => {
                    if let Some(id) = self.identity_id(name)
                        && let Some(record) = self.record_mut(id)
                    {
                        record.refs -= 1;
                        if record.declared.is_none() {
                            self.unmatched.undeclared_references -= 1;
                        }
                        self.untidy.push(id);
                    }
                }
                Selector::Labels(wanted) => self.remove_label_ref(wanted),
                Selector::Cidr { .. } | Selector::Pods(_) => {}
            }
        }
    }

    fn add_label_ref(&mut self, wanted: &Labels) {
        if let Some((refs, matches)) = self.label_refs.get_mut(wanted) {
            *refs += 1;
            if *matches == 0 {
                self.unmatched.label_selectors += 1;
            }
            return;
        }
        let matches = self.matches(wanted);
        self.label_refs.insert(wanted.clone(), (1, matches));
        if matches == 0 {
            self.unmatched.label_selectors += 1;
        }
        self.selectors.insert(wanted);
    }

    fn remove_label_ref(&mut self, wanted: &Labels) {
        let Some((refs, matches)) = self.label_refs.get_mut(wanted) else { return };
        *refs -= 1;
        if *matches == 0 {
            self.unmatched.label_selectors -= 1;
        }
        if *refs > 0 {
            return;
        }
        self.label_refs.remove(wanted);
        self.selectors.remove(wanted);
    }
}

#[cfg(test)]
mod tests {
    use super::IdentityRecord;

    /// A record per identity name, 100,000 of them at scale: what pods
    /// alike share lives behind the pointer of their declarations.
    #[test]
    fn identity_records_stay_compact() {
        assert_eq!(size_of::<Option<IdentityRecord>>(), 40);
    }

    /// A record per rule name, in a table of 100,000: 16 bytes a bucket.
    #[test]
    fn rule_records_stay_compact() {
        assert_eq!(size_of::<super::RuleRecord>(), 16);
    }
}
