//! The only code that writes the policy maps: a generation goes into the
//! slot the kernel is not reading, only the entries that differ, and is
//! published with one write; the slot left is rewritten only after the
//! kernel's readers of it are gone.

use std::collections::{BTreeSet, HashMap as StdHashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::IterableMap as _;
use aya::maps::lpm_trie::Key;
use aya::maps::{HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues};
use enforcer_common::{
    CONFIG_FLAG_AUDIT, CONFIG_INDEX, Config, IDENTITY_HOST, IdentityId, IdentityKeyV4, IdentityKeyV6, IdentityPrefixV4,
    IdentityPrefixV6, IdentityValue, POLICY_KEY_MAX_PREFIX, PolicyKeyData, PolicyValue, SLOT_BITS, maps,
    rule_counter_index, slot_of,
};
use ipnet::IpNet;
use policy::CompiledPolicy;
use policy::model::Action;

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

/// What the daemon wrote under one policy slot.
pub(super) struct Slot {
    /// The rule table of the generation in this slot: `rule_index` → rule.
    pub(super) rule_table: Vec<(String, Action)>,
    /// What the identity maps hold under this slot.
    pub(super) identities: StdHashMap<IpNet, IdentityValue>,
    /// What the policy maps hold under this slot (keys with slot 0).
    pub(super) rules: StdHashMap<(u32, PolicyKeyData), PolicyValue>,
    /// The compiled policy's identity entries, before host addresses overlay them.
    pub(super) compiled_identities: StdHashMap<IpNet, IdentityValue>,
    /// Numeric identity → owner name, for the generation in this slot.
    pub(super) atom_names: StdHashMap<IdentityId, String>,
    pub(super) index: usize,
}

pub(super) fn write_error(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Write { name, source }
}

/// Writes `entries` to the hash map `name` in batches and calls `record`
/// for each one the kernel accepted (a prefix of them, if a write fails),
/// so a slot's bookkeeping stays true to the kernel.
pub(super) fn write_batch<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    name: &'static str,
    entries: &[(K, V)],
    record: impl FnMut(&(K, V)),
) -> Result<(), DatapathError> {
    let (written, result) = batch::update(map, entries);
    entries[..written].iter().for_each(record);
    result.map_err(write_error(name))
}

/// Deletes `keys` from the hash map `name` in batches, like [`write_batch`].
pub(super) fn delete_batch<K: aya::Pod>(
    map: &MapData,
    name: &'static str,
    keys: &[K],
    record: impl FnMut(&K),
) -> Result<(), DatapathError> {
    let (removed, result) = batch::delete(map, keys);
    keys[..removed].iter().for_each(record);
    result.map_err(write_error(name))
}

/// Deleting a key that is already gone is not an error.
pub(super) fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl Datapath {
    /// Writes `compiled` into the slot the kernel is not reading (only the
    /// entries that differ from what that slot holds), then publishes it as
    /// the next generation with one write: identities and policy switch
    /// together, and tracked flows are judged again on their next packet.
    /// A policy that does not fit the maps is refused before anything is
    /// written. Returns the new generation.
    pub fn apply(&mut self, compiled: &CompiledPolicy, audit_all: bool) -> Result<u32, DatapathError> {
        self.check_capacity(compiled)?;
        let generation = self.config_value.policy_generation.wrapping_add(1);
        self.wait_for_old_slot_readers();
        let slot = &mut self.slots[slot_of(generation)];
        // The slot's counters belong to the generation before last: keep
        // their totals under the rules' names, then start the slot afresh.
        for (rule, count) in slot.take_rule_verdicts(&mut self.maps)? {
            *self.harvested_rules.entry(rule).or_default() += count;
        }
        slot.rule_table = compiled.rules.iter().map(|r| (r.name.clone(), r.action)).collect();
        let index = slot.index;
        for (pair, count) in self.read_identity_drops(index, true)? {
            *self.harvested_pairs.entry(pair).or_default() += count;
        }
        let slot = &mut self.slots[index];
        slot.atom_names = compiled.atoms.iter().map(|a| (a.id, a.owner.clone())).collect();
        slot.compiled_identities =
            compiled.identity_entries.iter().map(|e| (e.net, IdentityValue { id: e.id, flags: e.flags })).collect();
        slot.sync_identities(&mut self.maps, &self.host_addresses)?;
        let wanted: StdHashMap<(u32, PolicyKeyData), PolicyValue> =
            compiled.policy_entries.iter().map(|e| ((e.prefix_len, e.key), e.value)).collect();
        slot.sync_policy(&mut self.maps, &wanted)?;
        self.config_value = Config {
            policy_generation: generation,
            flags: if audit_all { CONFIG_FLAG_AUDIT } else { 0 },
            clock_tick_ns: clock_tick_ns(),
            padding: 0,
        };
        self.config.set(CONFIG_INDEX, self.config_value, 0).map_err(write_error(maps::CONFIG))?;
        self.quiescing = quiesce_in_background(&self.barrier);
        Ok(generation)
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
    fn check_capacity(&self, compiled: &CompiledPolicy) -> Result<(), DatapathError> {
        let rules = u32::try_from(compiled.rules.len()).unwrap_or(u32::MAX);
        if rules > self.sizes.rules {
            return Err(DatapathError::Capacity { map: "rules", needed: rules, capacity: self.sizes.rules });
        }
        let mut counts = [0u32; 4];
        for entry in &compiled.identity_entries {
            counts[map_of(entry.net)] += 1;
        }
        for addr in &self.host_addresses {
            counts[map_of(IpNet::from(*addr))] += 1;
        }
        let needs = [
            (maps::IDENTITY_V4_EXACT, counts[0], self.sizes.identities),
            (maps::IDENTITY_V4_PREFIX, counts[1], self.sizes.prefixes),
            (maps::IDENTITY_V6_EXACT, counts[2], self.sizes.identities),
            (maps::IDENTITY_V6_PREFIX, counts[3], self.sizes.prefixes),
            (maps::POLICY, u32::try_from(compiled.policy_entries.len()).unwrap_or(u32::MAX), self.sizes.policy),
        ];
        for (map, needed, capacity) in needs {
            if needed > capacity {
                return Err(DatapathError::Capacity { map, needed, capacity });
            }
        }
        Ok(())
    }

    /// Declares the node's own addresses (identity `host`), in both slots.
    /// They override any policy identity claiming the same single address.
    pub fn set_host_addresses(&mut self, addresses: &BTreeSet<IpAddr>) -> Result<(), DatapathError> {
        self.host_addresses.clone_from(addresses);
        for slot in &mut self.slots {
            slot.sync_identities(&mut self.maps, addresses)?;
        }
        Ok(())
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
            rule_table: Vec::new(),
            identities: StdHashMap::new(),
            rules: StdHashMap::new(),
            compiled_identities: StdHashMap::new(),
            atom_names: StdHashMap::new(),
            index,
        }
    }

    pub(super) fn verdict_index(&self, rule: usize) -> u32 {
        rule_counter_index(self.index, u32::try_from(rule).unwrap_or(u32::MAX))
    }

    /// The rules of this slot whose decision counters moved: (position in
    /// the rule table, decisions summed over CPUs).
    pub(super) fn moved_rule_counters(&self, maps: &PolicyMaps) -> Result<Vec<(usize, u64)>, DatapathError> {
        if self.rule_table.is_empty() {
            return Ok(Vec::new());
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DatapathError::Cpus(source))?;
        // Slots interleave, so this slot's counters lie among the first
        // twice-as-many keys.
        let span = self.verdict_index(self.rule_table.len() - 1) + 1;
        let sums = batch::per_cpu_sums(maps.rule_verdicts.map(), span, cpus)
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
        Ok(moved.into_iter().map(|(index, count)| (self.rule_table[index].clone(), count)).collect())
    }

    /// Reads and zeroes this slot's rule decisions. Only counters that
    /// moved are written: a policy of 100k rules mostly has idle ones.
    pub(super) fn take_rule_verdicts(&mut self, maps: &mut PolicyMaps) -> Result<Vec<RuleCount>, DatapathError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DatapathError::Cpus(source))?;
        let moved = self.moved_rule_counters(maps)?;
        for &(index, _) in &moved {
            let zeros = PerCpuValues::try_from(vec![0u64; cpus]).map_err(DatapathError::Cpus)?;
            maps.rule_verdicts.set(self.verdict_index(index), zeros, 0).map_err(write_error(maps::RULE_VERDICTS))?;
        }
        Ok(moved.into_iter().map(|(index, count)| (self.rule_table[index].clone(), count)).collect())
    }

    /// Brings this slot's policy entries to `wanted`: trie entries one by
    /// one, hash entries in batches. What the slot records as written is
    /// exactly what the kernel accepted, even when a write fails midway.
    pub(super) fn sync_policy(
        &mut self,
        maps: &mut PolicyMaps,
        wanted: &StdHashMap<(u32, PolicyKeyData), PolicyValue>,
    ) -> Result<(), DatapathError> {
        let slot = self.index as u8;
        let mut exact = Vec::new();
        for (&(prefix_len, key), value) in wanted {
            if self.rules.get(&(prefix_len, key)) == Some(value) {
                continue;
            }
            if prefix_len == POLICY_KEY_MAX_PREFIX {
                exact.push((PolicyKeyData { slot, ..key }, *value));
            } else {
                maps.write_policy_prefix(prefix_len, PolicyKeyData { slot, ..key }, Some(*value))?;
                self.rules.insert((prefix_len, key), *value);
            }
        }
        write_batch(maps.policy_exact.map(), maps::POLICY_EXACT, &exact, |(key, value)| {
            self.rules.insert((POLICY_KEY_MAX_PREFIX, PolicyKeyData { slot: 0, ..*key }), *value);
        })?;

        let stale: Vec<_> = self.rules.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        let mut exact = Vec::new();
        for (prefix_len, key) in stale {
            if prefix_len == POLICY_KEY_MAX_PREFIX {
                exact.push(PolicyKeyData { slot, ..key });
            } else {
                maps.write_policy_prefix(prefix_len, PolicyKeyData { slot, ..key }, None)?;
                self.rules.remove(&(prefix_len, key));
            }
        }
        delete_batch(maps.policy_exact.map(), maps::POLICY_EXACT, &exact, |key| {
            self.rules.remove(&(POLICY_KEY_MAX_PREFIX, PolicyKeyData { slot: 0, ..*key }));
        })
    }

    /// Brings this slot's identity entries to the compiled ones plus the
    /// node's addresses, like [`Slot::sync_policy`]: prefixes one by one,
    /// single addresses in batches.
    pub(super) fn sync_identities(
        &mut self,
        maps: &mut PolicyMaps,
        hosts: &BTreeSet<IpAddr>,
    ) -> Result<(), DatapathError> {
        let mut wanted = self.compiled_identities.clone();
        for addr in hosts {
            wanted.insert(IpNet::from(*addr), IdentityValue { id: IDENTITY_HOST, flags: 0 });
        }
        let tag = self.index as u32;
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (net, value) in &wanted {
            if self.identities.get(net) == Some(value) {
                continue;
            }
            match net {
                IpNet::V4(n) if n.prefix_len() == 32 => {
                    v4.push((IdentityKeyV4 { slot: tag, addr: n.addr().octets() }, *value));
                }
                IpNet::V6(n) if n.prefix_len() == 128 => {
                    v6.push((IdentityKeyV6 { slot: tag, addr: n.addr().octets() }, *value));
                }
                _ => {
                    maps.write_identity_prefix(self.index, *net, Some(*value))?;
                    self.identities.insert(*net, *value);
                }
            }
        }
        write_batch(maps.identity_v4_exact.map(), maps::IDENTITY_V4_EXACT, &v4, |(key, value)| {
            self.identities.insert(IpNet::from(IpAddr::from(key.addr)), *value);
        })?;
        write_batch(maps.identity_v6_exact.map(), maps::IDENTITY_V6_EXACT, &v6, |(key, value)| {
            self.identities.insert(IpNet::from(IpAddr::from(key.addr)), *value);
        })?;

        let stale: Vec<IpNet> = self.identities.keys().filter(|n| !wanted.contains_key(n)).copied().collect();
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for net in stale {
            match net {
                IpNet::V4(n) if n.prefix_len() == 32 => v4.push(IdentityKeyV4 { slot: tag, addr: n.addr().octets() }),
                IpNet::V6(n) if n.prefix_len() == 128 => v6.push(IdentityKeyV6 { slot: tag, addr: n.addr().octets() }),
                _ => {
                    maps.write_identity_prefix(self.index, net, None)?;
                    self.identities.remove(&net);
                }
            }
        }
        delete_batch(maps.identity_v4_exact.map(), maps::IDENTITY_V4_EXACT, &v4, |key| {
            self.identities.remove(&IpNet::from(IpAddr::from(key.addr)));
        })?;
        delete_batch(maps.identity_v6_exact.map(), maps::IDENTITY_V6_EXACT, &v6, |key| {
            self.identities.remove(&IpNet::from(IpAddr::from(key.addr)));
        })
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

    /// Inserts (`Some`) or removes (`None`) one policy entry shorter than
    /// the whole key (a port range or whole protocol) in the trie.
    pub(super) fn write_policy_prefix(
        &mut self,
        prefix_len: u32,
        key: PolicyKeyData,
        value: Option<PolicyValue>,
    ) -> Result<(), DatapathError> {
        let key = Key::new(prefix_len, key);
        let result = match value {
            Some(value) => self.policy.insert(&key, value, 0),
            None => ignore_missing(self.policy.remove(&key)),
        };
        result.map_err(write_error(maps::POLICY))
    }

    /// Inserts (`Some`) or removes (`None`) one prefix identity entry of
    /// `slot` in its family's trie. (Single addresses are written in
    /// batches by [`Slot::sync_identities`].)
    pub(super) fn write_identity_prefix(
        &mut self,
        slot: usize,
        net: IpNet,
        value: Option<IdentityValue>,
    ) -> Result<(), DatapathError> {
        let tag = slot as u8;
        match net {
            IpNet::V4(n) => {
                let o = n.addr().octets();
                let data: IdentityPrefixV4 = [tag, o[0], o[1], o[2], o[3]];
                let key = Key::new(SLOT_BITS + u32::from(n.prefix_len()), data);
                let result = match value {
                    Some(v) => self.identity_v4_prefix.insert(&key, v, 0),
                    None => ignore_missing(self.identity_v4_prefix.remove(&key)),
                };
                result.map_err(write_error(maps::IDENTITY_V4_PREFIX))
            }
            IpNet::V6(n) => {
                let mut data: IdentityPrefixV6 = [0; 17];
                data[0] = tag;
                data[1..].copy_from_slice(&n.addr().octets());
                let key = Key::new(SLOT_BITS + u32::from(n.prefix_len()), data);
                let result = match value {
                    Some(v) => self.identity_v6_prefix.insert(&key, v, 0),
                    None => ignore_missing(self.identity_v6_prefix.remove(&key)),
                };
                result.map_err(write_error(maps::IDENTITY_V6_PREFIX))
            }
        }
    }
}
