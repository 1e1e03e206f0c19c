//! The only code that writes the policy maps: a generation goes into the
//! slot the kernel is not reading, only the entries that differ, and is
//! published with one write; the slot left is rewritten only after the
//! kernel's readers of it are gone.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap as StdHashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use aya::Ebpf;
use aya::maps::IterableMap as _;
use aya::maps::lpm_trie::Key;
use aya::maps::{HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues};
use enforcer_common::{
    CONFIG_FLAG_AUDIT, CONFIG_FLAG_NO_FLOW_CACHE, CONFIG_FLAG_NO_VERDICT_CACHE, CONFIG_FLAG_REPORT_ADMITS,
    CONFIG_FLAG_WORLD_OPEN, CONFIG_INDEX, Config, IdentityId, IdentityKeyV4, IdentityKeyV6, IdentityPrefixV4,
    IdentityPrefixV6, IdentityValue, POLICY_KEY_MAX_PREFIX, PolicyKeyData, PolicyValue, SLOT_BITS, maps,
    rule_counter_index, slot_of,
};
use ipnet::IpNet;
use policy::engine::{Contents, EntryCounts, Name, SourceChange};
use policy::model::{Action, Enforcement};
use policy::{Engine, EntryDiff, Policy};

use crate::batch;
use crate::quiesce::{ProgramBarrier, QuiesceError};

use super::{Datapath, DatapathError, RuleCount, clock_tick_ns, take};

/// How long to wait instead if the exact wait for in-flight programs fails:
/// far longer than any program run.
const FALLBACK_GRACE: Duration = Duration::from_millis(100);

/// Starts `barrier`'s wait on its own thread, or runs it here if no thread
/// can be started.
pub(super) fn quiesce_in_background(barrier: &Arc<ProgramBarrier>) -> Option<JoinHandle<Result<(), QuiesceError>>> {
    let waiter = Arc::clone(barrier);
    match std::thread::Builder::new().name("bh-quiesce".to_owned()).spawn(move || waiter.wait()) {
        Ok(handle) => Some(handle),
        Err(error) => {
            log::warn!("cannot start a thread to wait for in-flight BPF programs ({error}); waiting here");
            if let Err(error) = barrier.wait() {
                fall_back(&error.to_string());
            }
            None
        }
    }
}

pub(super) fn fall_back(failure: &str) {
    log::warn!("{failure}; waiting {FALLBACK_GRACE:?} instead");
    std::thread::sleep(FALLBACK_GRACE);
}

/// The maps a verdict depends on; every key carries its policy slot.
pub(super) struct PolicyMaps {
    pub(super) identity_v4_exact: HashMap<MapData, IdentityKeyV4, IdentityValue>,
    pub(super) identity_v4_prefix: LpmTrie<MapData, IdentityPrefixV4, IdentityValue>,
    pub(super) identity_v6_exact: HashMap<MapData, IdentityKeyV6, IdentityValue>,
    pub(super) identity_v6_prefix: LpmTrie<MapData, IdentityPrefixV6, IdentityValue>,
    pub(super) policy: LpmTrie<MapData, PolicyKeyData, PolicyValue>,
    pub(super) policy_exact: HashMap<MapData, PolicyKeyData, PolicyValue>,
    pub(super) rule_verdicts: PerCpuArray<MapData, u64>,
}

/// Makes `table` long enough to hold index `at`, growing its capacity by
/// an eighth, not double: the two slots each keep two tables as long as
/// the policy, and doubled vectors of 100,000 entries are a third empty.
fn make_room<T: Clone>(table: &mut Vec<Option<T>>, at: usize) {
    if at < table.len() {
        return;
    }
    if at >= table.capacity() {
        table.reserve_exact((at + 1 - table.len()).max(table.len() / 8).max(16));
    }
    table.resize(at + 1, None);
}

/// Numeric identity → owner name: a vector by number, as the engine hands
/// numbers out lowest first (a hash map of 100,000 names cost twice this).
#[derive(Default, Clone, PartialEq, Eq)]
pub(super) struct AtomNames(Vec<Option<Name>>);

impl AtomNames {
    pub(super) fn get(&self, id: IdentityId) -> Option<&Name> {
        self.0.get(id as usize).and_then(Option::as_ref)
    }

    pub(super) fn insert(&mut self, id: IdentityId, name: Name) {
        make_room(&mut self.0, id as usize);
        self.0[id as usize] = Some(name);
    }

    pub(super) fn remove(&mut self, id: IdentityId) {
        if let Some(slot) = self.0.get_mut(id as usize) {
            *slot = None;
        }
    }
}

/// `rule_index` → the rule's name and action, for one slot's generation.
/// The names are the engine's (shared, not copied) and the actions a bit
/// each beside them: 16 bytes a rule where a vector of (name, action)
/// pairs took 24.
#[derive(Default, Clone, PartialEq, Eq)]
pub(super) struct RuleTable {
    names: Vec<Option<Name>>,
    /// Bit `i` set: rule `i` denies.
    denies: Vec<u64>,
}

impl RuleTable {
    /// One past the highest rule number in the table.
    pub(super) fn len(&self) -> usize {
        self.names.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub(super) fn get(&self, index: usize) -> Option<(&Name, Action)> {
        let name = self.names.get(index)?.as_ref()?;
        let denies = self.denies.get(index / 64).is_some_and(|word| word & (1 << (index % 64)) != 0);
        Some((name, if denies { Action::Deny } else { Action::Allow }))
    }

    pub(super) fn set(&mut self, id: u32, rule: Option<(Name, Action)>) {
        let at = id as usize;
        match rule {
            None if at >= self.names.len() => return,
            None => {
                // Its bit too: equal tables are equal field by field.
                self.names[at] = None;
                if let Some(word) = self.denies.get_mut(at / 64) {
                    *word &= !(1 << (at % 64));
                }
            }
            Some((name, action)) => {
                make_room(&mut self.names, at);
                self.names[at] = Some(name);
                if self.denies.len() <= at / 64 {
                    self.denies.resize(at / 64 + 1, 0);
                }
                let bit = 1 << (at % 64);
                if action == Action::Deny {
                    self.denies[at / 64] |= bit;
                } else {
                    self.denies[at / 64] &= !bit;
                }
            }
        }
        while self.names.last().is_some_and(Option::is_none) {
            self.names.pop();
        }
        self.denies.truncate(self.names.len().div_ceil(64));
    }
}

/// What the daemon knows of one policy slot. It keeps no copy of the
/// entries: the engine holds the policy once, and a slot records only the
/// changes it has not received yet.
///
/// The tables are shared between the two slots while they hold the same
/// generation (after a large change, once the standby slot is caught up:
/// see `Datapath::prefill_standby`) and copied by the first change to
/// either: at 100,000 rules each table is 0.8 MB, held once instead of
/// twice while the policy rests, for one copy of each at the next change.
pub(super) struct Slot {
    /// The rule table of the generation in this slot: `rule_index` → rule.
    pub(super) rule_table: Arc<RuleTable>,
    /// Numeric identity → owner name, for the generation in this slot.
    pub(super) atom_names: Arc<AtomNames>,
    /// What the engine changed since this slot was last written.
    pub(super) behind: EntryDiff,
    /// Whether the maps hold exactly the engine's state minus `behind`
    /// under this slot. Not so for maps an earlier daemon wrote, or after a
    /// failed write: such a slot is read back and brought in step whole.
    pub(super) in_step: bool,
    pub(super) index: usize,
}

pub(super) fn write_error(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Write { name, source }
}

/// Writes `entries` to the hash map `name` in batches.
pub(super) fn write_batch<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    name: &'static str,
    entries: &[(K, V)],
) -> Result<(), DatapathError> {
    batch::update(map, entries).1.map_err(write_error(name))
}

/// Deletes `keys` from the hash map `name` in batches.
pub(super) fn delete_batch<K: aya::Pod>(map: &MapData, name: &'static str, keys: &[K]) -> Result<(), DatapathError> {
    batch::delete(map, keys).1.map_err(write_error(name))
}

/// A zero for every possible CPU: what a per-CPU counter is reset to.
pub(super) fn per_cpu_zeroes() -> Result<PerCpuValues<u64>, DatapathError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, source)| DatapathError::Cpus(source))?;
    PerCpuValues::try_from(vec![0u64; cpus]).map_err(DatapathError::Cpus)
}

/// Deleting a key that is already gone is not an error.
pub(super) fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// Identity and policy entries to set (`Some`) or delete (`None`) in one slot.
#[derive(Default)]
pub(super) struct SlotWrites {
    pub(super) identities: Vec<(IpNet, Option<IdentityValue>)>,
    pub(super) policy: Vec<((u32, PolicyKeyData), Option<PolicyValue>)>,
}

impl Datapath {
    /// Applies one change of the policy engine: writes `diff` (with what
    /// the slot missed of the change before) into the slot the kernel is
    /// not reading, then publishes it as the next generation with one
    /// write. Every entry of a change, whatever it belongs to (a rule
    /// revoked with the identities it names, an address moving from one
    /// identity to another), is in that slot before the switch, and the
    /// kernel reads one slot per packet: no packet is judged by half a
    /// change, and tracked flows are judged again on their next packet. A
    /// policy that does not fit the maps is refused before anything is
    /// written. Returns the new generation.
    ///
    /// A small change may instead be written into the slot the kernel is
    /// reading, in an order no packet can see half of (see `in_place`):
    /// changes back to back then need not wait for the old slot's readers.
    pub fn apply(&mut self, diff: &EntryDiff, state: &Engine, audit_all: bool) -> Result<u32, DatapathError> {
        self.check_capacity(state.counts())?;
        if let Some(plan) = self.in_place_plan(diff, state) {
            match self.write_in_place(diff, plan, state, audit_all) {
                Ok(_) => {
                    self.generation = self.generation.wrapping_add(1);
                    self.last_slot_wait = Duration::ZERO;
                    return Ok(self.generation);
                }
                Err(error) => {
                    log::warn!("writing a change into the live policy slot failed ({error}); switching slots instead");
                }
            }
        }
        let generation = self.config_value.policy_generation.wrapping_add(1);
        self.wait_for_old_slot_readers();
        let index = slot_of(generation);
        // No program run reads the slot now: its queued work is safe.
        self.settle_retired(Some(index));
        for (pair, count) in self.take_pairs(index)? {
            *self.harvested_pairs.entry(pair).or_default() += count;
        }
        self.bring_up_to_date(index, Some(diff), state)?;
        self.publish(generation, audit_all, state)?;
        // The other slot gets the change with its next write. Noted after
        // the switch, which need not wait for a copy of a large change; a
        // switch that failed leaves the engine to step back, and both slots
        // then get the change and its undoing (see `missed`).
        let other = &mut self.slots[1 - index];
        other.behind = std::mem::take(&mut other.behind).then(diff);
        self.quiescing = quiesce_in_background(&self.barrier);
        self.released_by_switch(diff);
        self.generation = self.generation.wrapping_add(1);
        Ok(self.generation)
    }

    /// Publishes `generation` to the kernel with one write of the config,
    /// and takes note of what the policy in force (`state`) needs.
    pub(super) fn publish(&mut self, generation: u32, audit_all: bool, state: &Engine) -> Result<(), DatapathError> {
        self.counts = state.counts();
        self.config_value = Config {
            policy_generation: generation,
            flags: if audit_all { CONFIG_FLAG_AUDIT } else { 0 }
                | if state.enforcement() == Enforcement::Default { CONFIG_FLAG_WORLD_OPEN } else { 0 }
                | self.caches_off
                | self.quarantine_flag
                | self.report_admits,
            clock_tick_ns: clock_tick_ns(),
            verdict_epoch: self.config_value.verdict_epoch,
        };
        self.config.set(CONFIG_INDEX, self.config_value, 0).map_err(write_error(maps::CONFIG))
    }

    /// Makes `policy` the whole policy: the one source of `engine`,
    /// replaced, then applied. For tools and tests that hold a whole policy.
    pub fn enforce(&mut self, engine: &mut Engine, policy: &Policy, audit_all: bool) -> Result<u32, DatapathError> {
        let change = SourceChange { source: "policy".to_owned(), contents: Contents::Parsed(policy.clone()) };
        let diff = engine.apply(vec![change], SystemTime::now()).map_err(DatapathError::Policy)?;
        let applied = self.apply(&diff, engine, audit_all);
        let (atoms, rules) = self.take_released_numbers();
        engine.release_numbers(&atoms, &rules);
        let generation = applied?;
        engine.commit();
        Ok(generation)
    }

    /// Brings the slot the kernel is not reading up to the generation in
    /// force (`state`) without switching, once no program run can still
    /// read it: after a start or a large change, the next change then
    /// writes only its own entries instead of also catching that slot up.
    pub fn prefill_standby(&mut self, state: &Engine) -> Result<(), DatapathError> {
        let standby = 1 - slot_of(self.config_value.policy_generation);
        if self.slots[standby].in_step && self.slots[standby].behind.is_empty() {
            return Ok(());
        }
        self.wait_for_old_slot_readers();
        self.settle_retired(Some(standby));
        self.bring_up_to_date(standby, None, state)?;
        self.share_tables(standby);
        Ok(())
    }

    /// Makes slot `index` share the other slot's tables where they are
    /// equal (see [`Slot`]).
    fn share_tables(&mut self, index: usize) {
        let [first, second] = &mut self.slots;
        let (this, other) = if index == 0 { (first, &*second) } else { (second, &*first) };
        if !Arc::ptr_eq(&this.rule_table, &other.rule_table) && this.rule_table == other.rule_table {
            this.rule_table = Arc::clone(&other.rule_table);
        }
        if !Arc::ptr_eq(&this.atom_names, &other.atom_names) && this.atom_names == other.atom_names {
            this.atom_names = Arc::clone(&other.atom_names);
        }
    }

    /// Brings slot `index` (which no program run reads any more) up to the
    /// engine's state: what it missed, then `change`, or, for a slot not in
    /// step, everything read back and synced whole. The slot is out of step
    /// until the write succeeded, so an error midway leads to a resync,
    /// never to a lost change.
    fn bring_up_to_date(
        &mut self,
        index: usize,
        change: Option<&EntryDiff>,
        state: &Engine,
    ) -> Result<(), DatapathError> {
        let in_step = std::mem::replace(&mut self.slots[index].in_step, false);
        if !in_step {
            self.resync_slot(index, state)?;
            self.slots[index].in_step = true;
            return Ok(());
        }
        let slot = &mut self.slots[index];
        let behind = std::mem::take(&mut slot.behind);
        // A slot that missed nothing writes the change as it is: a copy of
        // a 100,000-entry change took milliseconds of a full load.
        let change = match change {
            Some(change) if behind.is_empty() => Cow::Borrowed(change),
            Some(change) => Cow::Owned(behind.then(change)),
            None => Cow::Owned(behind),
        };
        // Rule numbers are stable, so a rule's decision counters carry on
        // from generation to generation; only a number that leaves its rule
        // has its count kept under the rule's name and zeroed.
        let leaving = change.rules.iter().filter(|d| d.old.is_some()).map(|d| d.key);
        for (rule, count) in slot.take_rule_verdicts(&mut self.maps, leaving)? {
            *self.harvested_rules.entry(rule).or_default() += count;
        }
        self.slots[index].take_tables(&change);
        let writes = SlotWrites {
            identities: change.identities.iter().map(|d| (d.key, d.new)).collect(),
            policy: change.policy.iter().map(|d| (d.key, d.new)).collect(),
        };
        self.maps.write_slot(index, &writes, Some(&self.host_addresses))?;
        self.slots[index].in_step = true;
        Ok(())
    }

    /// Records an engine change that no slot received (the engine stepping
    /// back after a refused change renumbered something): both slots get it
    /// with their next write.
    pub fn missed(&mut self, diff: &EntryDiff) {
        for slot in &mut self.slots {
            slot.behind = std::mem::take(&mut slot.behind).then(diff);
        }
    }

    /// Brings slot `index` in step with `state` whole: reads back what the
    /// maps hold under it and writes the difference.
    fn resync_slot(&mut self, index: usize, state: &Engine) -> Result<(), DatapathError> {
        let (mut identities, mut policy) = self.read_slot(index)?;
        let mut writes = SlotWrites::default();
        let mut wanted: StdHashMap<IpNet, IdentityValue> = state.identity_entries().collect();
        for addr in &self.host_addresses {
            wanted.insert(IpNet::from(*addr), state.host_value());
        }
        for (net, value) in &wanted {
            if identities.remove(net).as_ref() != Some(value) {
                writes.identities.push((*net, Some(*value)));
            }
        }
        writes.identities.extend(identities.into_keys().map(|net| (net, None)));
        for entry in state.policy_entries() {
            let key = (entry.prefix_len, entry.key);
            if policy.remove(&key).as_ref() != Some(&entry.value) {
                writes.policy.push((key, Some(entry.value)));
            }
        }
        writes.policy.extend(policy.into_keys().map(|key| (key, None)));
        let every_rule: Vec<u32> = (0..u32::try_from(self.slots[index].rule_table.len()).unwrap_or(u32::MAX)).collect();
        for (rule, count) in self.slots[index].take_rule_verdicts(&mut self.maps, every_rule.into_iter())? {
            *self.harvested_rules.entry(rule).or_default() += count;
        }
        let slot = &mut self.slots[index];
        slot.behind = EntryDiff::default();
        let mut rule_table = RuleTable::default();
        for (id, rule) in state.rule_table() {
            rule_table.set(id, Some((rule.name, rule.action)));
        }
        slot.rule_table = Arc::new(rule_table);
        let mut atom_names = AtomNames::default();
        for (id, owner, _) in state.atoms() {
            atom_names.insert(id, Name::clone(owner));
        }
        slot.atom_names = Arc::new(atom_names);
        self.maps.write_slot(index, &writes, None)
    }

    /// Returns once no program run that read the generation before the last
    /// switch is still running, so the slot it read may be rewritten.
    /// Usually long done: the wait began at the switch.
    fn wait_for_old_slot_readers(&mut self) {
        let started = Instant::now();
        if let Some(waiting) = self.quiescing.take() {
            match waiting.join() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => fall_back(&error.to_string()),
                Err(_) => fall_back("the thread waiting for in-flight BPF programs panicked"),
            }
        }
        self.last_slot_wait = started.elapsed();
    }

    /// How long the last [`Datapath::apply`] waited for program runs still
    /// reading the slot it rewrote: zero unless it came within an RCU grace
    /// period of the change before.
    #[must_use]
    pub fn last_slot_wait(&self) -> Duration {
        self.last_slot_wait
    }

    /// Refuses a policy whose entries exceed a map's capacity.
    pub fn check_capacity(&self, counts: EntryCounts) -> Result<(), DatapathError> {
        if counts.rule_slots > self.sizes.rules {
            return Err(DatapathError::Capacity {
                map: "rules",
                needed: counts.rule_slots,
                capacity: self.sizes.rules,
            });
        }
        let mut hosts = [0u32; 4];
        for addr in &self.host_addresses {
            hosts[map_of(IpNet::from(*addr))] += 1;
        }
        let needs = [
            (maps::IDENTITY_V4_EXACT, counts.identity_v4_exact + hosts[0], self.sizes.identities),
            (maps::IDENTITY_V4_PREFIX, counts.identity_v4_prefix + hosts[1], self.sizes.prefixes),
            (maps::IDENTITY_V6_EXACT, counts.identity_v6_exact + hosts[2], self.sizes.identities),
            (maps::IDENTITY_V6_PREFIX, counts.identity_v6_prefix + hosts[3], self.sizes.prefixes),
            (maps::POLICY, counts.policy_exact + counts.policy_prefix, self.sizes.policy),
        ];
        for (map, needed, capacity) in needs {
            if needed > capacity {
                return Err(DatapathError::Capacity { map, needed, capacity });
            }
        }
        Ok(())
    }

    /// Declares the node's own addresses (identity `host`), in both slots.
    /// They override any policy identity claiming the same single address;
    /// an address the node gives up gets the policy's entry back (as of the
    /// generation each slot holds).
    pub fn set_host_addresses(&mut self, addresses: &BTreeSet<IpAddr>, state: &Engine) -> Result<(), DatapathError> {
        let gone: Vec<IpAddr> = self.host_addresses.difference(addresses).copied().collect();
        let new: Vec<IpAddr> = addresses.difference(&self.host_addresses).copied().collect();
        for index in 0..2 {
            let slot = &self.slots[index];
            let mut writes = SlotWrites::default();
            for addr in &gone {
                let net = IpNet::from(*addr);
                let held = slot
                    .behind
                    .identities
                    .iter()
                    .find(|d| d.key == net)
                    .map_or_else(|| state.identity_entry(net), |d| d.old);
                writes.identities.push((net, held));
            }
            for addr in &new {
                writes.identities.push((IpNet::from(*addr), Some(state.host_value())));
            }
            self.maps.write_slot(index, &writes, None)?;
        }
        self.host_addresses.clone_from(addresses);
        // Verdicts cached with the old addresses must not match any more.
        self.bump_verdict_epoch()
    }

    /// Makes every entry of the kernel's verdict and flow caches stale, after
    /// a write that changes verdicts without a new policy generation.
    pub(super) fn bump_verdict_epoch(&mut self) -> Result<(), DatapathError> {
        self.config_value.verdict_epoch = self.config_value.verdict_epoch.wrapping_add(1);
        self.config.set(CONFIG_INDEX, self.config_value, 0).map_err(write_error(maps::CONFIG))
    }

    /// Turns the kernel's verdict cache on (the default) or off. Off, every
    /// packet no tracked flow covers takes the identity and policy lookups:
    /// what a never-seen tuple costs, for measuring.
    pub fn set_verdict_cache(&mut self, enabled: bool) -> Result<(), DatapathError> {
        self.set_cache(CONFIG_FLAG_NO_VERDICT_CACHE, enabled)
    }

    /// Turns the kernel's flow cache on (the default) or off. Off, every
    /// packet of an established flow takes the conntrack lookup, for
    /// measuring.
    pub fn set_flow_cache(&mut self, enabled: bool) -> Result<(), DatapathError> {
        self.set_cache(CONFIG_FLAG_NO_FLOW_CACHE, enabled)
    }

    /// Has the kernel report every connection the policy admits at ingress,
    /// for the lateral-movement detector (or stop).
    pub fn set_report_admits(&mut self, on: bool) -> Result<(), DatapathError> {
        self.report_admits = if on { CONFIG_FLAG_REPORT_ADMITS } else { 0 };
        self.config_value.flags = self.config_value.flags & !CONFIG_FLAG_REPORT_ADMITS | self.report_admits;
        self.config.set(CONFIG_INDEX, self.config_value, 0).map_err(write_error(maps::CONFIG))
    }

    fn set_cache(&mut self, off_flag: u32, enabled: bool) -> Result<(), DatapathError> {
        if enabled {
            self.caches_off &= !off_flag;
        } else {
            self.caches_off |= off_flag;
        }
        self.config_value.flags = self.config_value.flags & !off_flag | self.caches_off & off_flag;
        self.config.set(CONFIG_INDEX, self.config_value, 0).map_err(write_error(maps::CONFIG))
    }
}

/// Index of the identity map (v4 exact, v4 prefix, v6 exact, v6 prefix) an entry belongs in.
pub(super) fn map_of(net: IpNet) -> usize {
    match net {
        IpNet::V4(n) if n.prefix_len() == 32 => 0,
        IpNet::V4(_) => 1,
        IpNet::V6(n) if n.prefix_len() == 128 => 2,
        IpNet::V6(_) => 3,
    }
}

impl Slot {
    pub(super) fn new(index: usize) -> Self {
        Self {
            rule_table: Arc::default(),
            atom_names: Arc::default(),
            behind: EntryDiff::default(),
            in_step: false,
            index,
        }
    }

    pub(super) fn set_rule(&mut self, id: u32, rule: Option<(Name, Action)>) {
        Arc::make_mut(&mut self.rule_table).set(id, rule);
    }

    pub(super) fn set_atom_name(&mut self, id: IdentityId, owner: Option<&Name>) {
        let names = Arc::make_mut(&mut self.atom_names);
        match owner {
            Some(owner) => names.insert(id, Name::clone(owner)),
            None => names.remove(id),
        }
    }

    /// Takes a change's rule table and identity names into this slot.
    fn take_tables(&mut self, change: &EntryDiff) {
        for delta in &change.rules {
            self.set_rule(delta.key, delta.new.as_ref().map(|r| (Name::clone(&r.name), r.action)));
        }
        for delta in &change.atoms {
            self.set_atom_name(delta.key, delta.new.as_ref());
        }
    }

    pub(super) fn verdict_index(&self, rule: usize) -> u32 {
        rule_counter_index(self.index, u32::try_from(rule).unwrap_or(u32::MAX))
    }

    fn rule_name(&self, index: usize) -> Option<(String, Action)> {
        self.rule_table.get(index).map(|(name, action)| (name.to_string(), action))
    }

    /// The rules of this slot whose decision counters moved: (`rule_index`,
    /// decisions summed over CPUs).
    pub(super) fn moved_rule_counters(&self, maps: &PolicyMaps) -> Result<Vec<(usize, u64)>, DatapathError> {
        if self.rule_table.is_empty() {
            return Ok(Vec::new());
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DatapathError::Cpus(source))?;
        // Slots interleave, so this slot's counters lie among the first
        // twice-as-many keys.
        let span = self.verdict_index(self.rule_table.len() - 1) + 1;
        let sums = batch::per_cpu_sums(maps.rule_verdicts.map(), 0..span, cpus)
            .map_err(|source| DatapathError::Read { name: maps::RULE_VERDICTS, source })?;
        Ok((0..self.rule_table.len())
            .filter_map(|index| {
                let count = sums.get(self.verdict_index(index) as usize).copied().unwrap_or(0);
                (count > 0).then_some((index, count))
            })
            .collect())
    }

    /// Rule decisions counted in this slot, by rule.
    pub(super) fn read_rule_verdicts(&self, maps: &PolicyMaps) -> Result<Vec<RuleCount>, DatapathError> {
        let moved = self.moved_rule_counters(maps)?;
        Ok(moved.into_iter().filter_map(|(index, count)| Some((self.rule_name(index)?, count))).collect())
    }

    /// Reads and zeroes the decision counters of `rules` in this slot,
    /// returning the non-zero ones under the names this slot's table gives.
    pub(super) fn take_rule_verdicts(
        &mut self,
        maps: &mut PolicyMaps,
        rules: impl Iterator<Item = u32>,
    ) -> Result<Vec<RuleCount>, DatapathError> {
        let mut taken = Vec::new();
        for rule in rules {
            let index = self.verdict_index(rule as usize);
            let values = match maps.rule_verdicts.get(&index, 0) {
                Ok(values) => values,
                Err(MapError::OutOfBounds { .. }) => continue,
                Err(source) => return Err(DatapathError::Read { name: maps::RULE_VERDICTS, source }),
            };
            let count: u64 = values.iter().sum();
            if count == 0 {
                continue;
            }
            maps.rule_verdicts.set(index, per_cpu_zeroes()?, 0).map_err(write_error(maps::RULE_VERDICTS))?;
            if let Some(name) = self.rule_name(rule as usize) {
                taken.push((name, count));
            }
        }
        Ok(taken)
    }
}

impl PolicyMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Ok(Self {
            identity_v4_exact: take(ebpf, maps::IDENTITY_V4_EXACT)?,
            identity_v4_prefix: take(ebpf, maps::IDENTITY_V4_PREFIX)?,
            identity_v6_exact: take(ebpf, maps::IDENTITY_V6_EXACT)?,
            identity_v6_prefix: take(ebpf, maps::IDENTITY_V6_PREFIX)?,
            policy: take(ebpf, maps::POLICY)?,
            policy_exact: take(ebpf, maps::POLICY_EXACT)?,
            rule_verdicts: take(ebpf, maps::RULE_VERDICTS)?,
        })
    }

    /// Writes one slot's changes: deletions first (so a slot never holds
    /// more than its share of a map on the way), trie entries one by one,
    /// hash entries in batches. With `hosts`, the node's own addresses are
    /// left alone: their `host` entries override the policy's. A large
    /// change writes its identity and policy entries on two threads: the
    /// kernel updates different maps in parallel.
    pub(super) fn write_slot(
        &mut self,
        slot: usize,
        writes: &SlotWrites,
        hosts: Option<&BTreeSet<IpAddr>>,
    ) -> Result<(), DatapathError> {
        let tag = slot as u8;
        let is_host = |net: &IpNet| {
            hosts.is_some_and(|hosts| net.prefix_len() == net.max_prefix_len() && hosts.contains(&net.addr()))
        };
        let Self {
            identity_v4_exact,
            identity_v4_prefix,
            identity_v6_exact,
            identity_v6_prefix,
            policy,
            policy_exact,
            rule_verdicts: _,
        } = self;
        for deleting in [true, false] {
            let identities: Vec<(IpNet, Option<IdentityValue>)> = writes
                .identities
                .iter()
                .filter(|(net, value)| value.is_none() == deleting && !is_host(net))
                .copied()
                .collect();
            let policy_writes: Vec<((u32, PolicyKeyData), Option<PolicyValue>)> =
                writes.policy.iter().filter(|(_, value)| value.is_none() == deleting).copied().collect();
            let identity_maps = IdentityMaps {
                v4_exact: &*identity_v4_exact,
                v4_prefix: &mut *identity_v4_prefix,
                v6_exact: &*identity_v6_exact,
                v6_prefix: &mut *identity_v6_prefix,
            };
            let write_identities = move || identity_maps.write(tag, &identities);
            let mut write_policy = || write_policy_entries(tag, &mut *policy, &*policy_exact, &policy_writes);
            if writes.identities.len().min(writes.policy.len()) >= PARALLEL_WRITES {
                std::thread::scope(|scope| {
                    let identities = scope.spawn(write_identities);
                    let policy = write_policy();
                    let identities = identities.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                    identities.and(policy)
                })?;
            } else {
                write_identities()?;
                write_policy()?;
            }
        }
        Ok(())
    }
}

/// Entries of each kind a change must have for its identity and policy
/// entries to be written in parallel.
const PARALLEL_WRITES: usize = 4096;

/// The identity maps, borrowed for one write.
struct IdentityMaps<'m> {
    v4_exact: &'m HashMap<MapData, IdentityKeyV4, IdentityValue>,
    v4_prefix: &'m mut LpmTrie<MapData, IdentityPrefixV4, IdentityValue>,
    v6_exact: &'m HashMap<MapData, IdentityKeyV6, IdentityValue>,
    v6_prefix: &'m mut LpmTrie<MapData, IdentityPrefixV6, IdentityValue>,
}

impl IdentityMaps<'_> {
    /// Sets (`Some`) or deletes (`None`) identity entries of slot `tag`.
    fn write(self, tag: u8, entries: &[(IpNet, Option<IdentityValue>)]) -> Result<(), DatapathError> {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        let (mut v4_gone, mut v6_gone) = (Vec::new(), Vec::new());
        for &(net, value) in entries {
            match (net, value) {
                (IpNet::V4(n), Some(value)) if n.prefix_len() == 32 => {
                    v4.push((IdentityKeyV4 { slot: u32::from(tag), addr: n.addr().octets() }, value));
                }
                (IpNet::V4(n), None) if n.prefix_len() == 32 => {
                    v4_gone.push(IdentityKeyV4 { slot: u32::from(tag), addr: n.addr().octets() });
                }
                (IpNet::V6(n), Some(value)) if n.prefix_len() == 128 => {
                    v6.push((IdentityKeyV6 { slot: u32::from(tag), addr: n.addr().octets() }, value));
                }
                (IpNet::V6(n), None) if n.prefix_len() == 128 => {
                    v6_gone.push(IdentityKeyV6 { slot: u32::from(tag), addr: n.addr().octets() });
                }
                (IpNet::V4(n), value) => {
                    let o = n.addr().octets();
                    let data: IdentityPrefixV4 = [tag, o[0], o[1], o[2], o[3]];
                    let key = Key::new(SLOT_BITS + u32::from(n.prefix_len()), data);
                    let result = match value {
                        Some(v) => self.v4_prefix.insert(&key, v, 0),
                        None => ignore_missing(self.v4_prefix.remove(&key)),
                    };
                    result.map_err(write_error(maps::IDENTITY_V4_PREFIX))?;
                }
                (IpNet::V6(n), value) => {
                    let mut data: IdentityPrefixV6 = [0; 17];
                    data[0] = tag;
                    data[1..].copy_from_slice(&n.addr().octets());
                    let key = Key::new(SLOT_BITS + u32::from(n.prefix_len()), data);
                    let result = match value {
                        Some(v) => self.v6_prefix.insert(&key, v, 0),
                        None => ignore_missing(self.v6_prefix.remove(&key)),
                    };
                    result.map_err(write_error(maps::IDENTITY_V6_PREFIX))?;
                }
            }
        }
        delete_batch(self.v4_exact.map(), maps::IDENTITY_V4_EXACT, &v4_gone)?;
        delete_batch(self.v6_exact.map(), maps::IDENTITY_V6_EXACT, &v6_gone)?;
        write_batch(self.v4_exact.map(), maps::IDENTITY_V4_EXACT, &v4)?;
        write_batch(self.v6_exact.map(), maps::IDENTITY_V6_EXACT, &v6)
    }
}

/// Sets (`Some`) or deletes (`None`) policy entries of slot `tag`: ranges
/// and whole protocols one by one in the trie, single ports in batches.
fn write_policy_entries(
    tag: u8,
    trie: &mut LpmTrie<MapData, PolicyKeyData, PolicyValue>,
    exact: &HashMap<MapData, PolicyKeyData, PolicyValue>,
    entries: &[((u32, PolicyKeyData), Option<PolicyValue>)],
) -> Result<(), DatapathError> {
    let (mut set, mut gone) = (Vec::new(), Vec::new());
    for &((prefix_len, key), value) in entries {
        let key = PolicyKeyData { slot: tag, ..key };
        match value {
            Some(value) if prefix_len == POLICY_KEY_MAX_PREFIX => set.push((key, value)),
            None if prefix_len == POLICY_KEY_MAX_PREFIX => gone.push(key),
            value => {
                let key = Key::new(prefix_len, key);
                let result = match value {
                    Some(value) => trie.insert(&key, value, 0),
                    None => ignore_missing(trie.remove(&key)),
                };
                result.map_err(write_error(maps::POLICY))?;
            }
        }
    }
    delete_batch(exact.map(), maps::POLICY_EXACT, &gone)?;
    write_batch(exact.map(), maps::POLICY_EXACT, &set)
}

#[cfg(test)]
mod tests {
    use super::{Action, Name, RuleTable};

    #[test]
    fn a_rule_table_keeps_each_rule_s_name_and_action_and_ends_at_its_last_rule() {
        let mut table = RuleTable::default();
        let mut model: Vec<Option<(String, Action)>> = Vec::new();
        let mut x: u32 = 1;
        for step in 0..5000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let id = (x >> 8) % 200;
            let rule = match x % 3 {
                0 => None,
                1 => Some((format!("r{step}"), Action::Allow)),
                _ => Some((format!("r{step}"), Action::Deny)),
            };
            table.set(id, rule.clone().map(|(name, action)| (Name::from(name), action)));
            if model.len() <= id as usize {
                model.resize(id as usize + 1, None);
            }
            model[id as usize] = rule;
            while model.last().is_some_and(Option::is_none) {
                model.pop();
            }
            assert_eq!(table.len(), model.len());
            for (index, expected) in model.iter().enumerate() {
                let got = table.get(index).map(|(name, action)| (name.to_string(), action));
                assert_eq!(&got, expected, "rule {index} after step {step}");
            }
        }
        // Tables of the same rules are equal, however they were built:
        // slots holding one generation share theirs.
        let mut rebuilt = RuleTable::default();
        for (index, rule) in model.iter().enumerate() {
            let rule = rule.as_ref().map(|(name, action)| (Name::from(name.as_str()), *action));
            rebuilt.set(u32::try_from(index).unwrap(), rule);
        }
        assert!(rebuilt == table);
        rebuilt.set(0, Some((Name::from("other"), Action::Deny)));
        assert!(rebuilt != table);
    }
}
