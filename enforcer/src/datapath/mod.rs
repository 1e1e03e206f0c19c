//! The kernel side as the daemon sees it: loads the programs, attaches them,
//! keeps the maps in step with the compiled policy and the node's addresses,
//! and reads the counters. One concern per file: [`loader`] (the object, map
//! sizes, pinned maps and their layout stamps), [`attach`] (links on
//! interfaces, adopting and detaching), [`map_writer`] (the only writer of
//! the policy maps); this file holds the state they share and the readers
//! (counters, conntrack, usage, adoption of what an earlier daemon wrote).

mod attach;
mod in_place;
mod loader;
mod map_writer;
mod pairs;
mod quarantine;

pub use crate::testrun::TestRun;
pub use attach::{IngressHook, XdpAttach, uninstall};
pub use loader::{MapSizes, map_pin_name, retire_maps};
pub use quarantine::{MAX_QUARANTINE_EXEMPT, MAX_QUARANTINED, QuarantineWrite};

use attach::Attachment;
use map_writer::{PolicyMaps, Slot, ignore_missing, map_of, write_error};

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};
use std::net::IpAddr;
use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use aya::maps::IterableMap as _;
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::links::LinkError;
use aya::programs::{ProgramError, SchedClassifier, Xdp};
use aya::{Ebpf, EbpfError};
use enforcer_common::{
    CONFIG_INDEX, Config, Counter, Direction, DropReason, FlowKey, FlowValue, FragmentKey, FragmentValue,
    IDENTITY_HOST, IdentityId, IdentityPairKey, IdentityValue, MAX_CLOCK_TICK_NS, POLICY_KEY_MAX_PREFIX, PolicyKeyData,
    SLOT_BITS, StateError, drop_counter_index, maps, slot_of,
};
use ipnet::IpNet;
use policy::engine::EntryCounts;
use policy::model::Action;

use crate::quiesce::{ProgramBarrier, QuiesceError};

static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead"));
const XDP_PROGRAM: &str = "bulkhead_xdp";
const TC_PROGRAM: &str = "bulkhead_tc_egress";
const TC_INGRESS_PROGRAM: &str = "bulkhead_tc_ingress";
const CALIBRATION_PROGRAM: &str = "bulkhead_calibration";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "loading the eBPF object failed: {0}; check that the kernel has BTF and that bulkhead runs as root (or with CAP_BPF and CAP_NET_ADMIN)"
    )]
    Load(#[source] EbpfError),
    #[error("the eBPF object has no {what} `{name}`; the binary is corrupt, rebuild it with `cargo xtask build`")]
    Missing { what: &'static str, name: &'static str },
    #[error("map `{name}` has an unexpected type: {source}")]
    MapType {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "map {} does not have the layout its name says (key {found_key} and value {found_value} bytes, not {key} and {value}); something other than Bulkhead pinned it there: run `bulkhead uninstall` and start again",
        path.display()
    )]
    PinnedLayout { path: PathBuf, found_key: u32, found_value: u32, key: u32, value: u32 },
    #[error("the kernel verifier rejected program `{name}`: {source}")]
    Verify {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "attaching {hook} to interface `{interface}` failed: {source}; check that the interface exists (`ip link`) and has no other XDP program"
    )]
    Attach {
        hook: &'static str,
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("interface `{interface}` does not exist in this network namespace; check `ip link` and --interface")]
    NoInterface { interface: String },
    #[error("writing map `{name}` failed: {source}; the policy may exceed the map's capacity")]
    Write {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("reading map `{name}` failed: {source}")]
    Read {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot count the CPUs to size per-CPU values: {0}")]
    Cpus(#[source] std::io::Error),
    #[error(transparent)]
    Quiesce(#[from] QuiesceError),
    #[error(
        "the policy needs {needed} entries in map `{map}`, which holds {capacity}; raise its size or shrink the policy"
    )]
    Capacity { map: &'static str, needed: u32, capacity: u32 },
    #[error("pinning under {path} failed: {source}; is bpffs mounted (`mount -t bpf bpf /sys/fs/bpf`)?")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pinned link {path} cannot be used: {source}; run `bulkhead uninstall` and start again")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("the policy is invalid: {0}")]
    Policy(#[source] policy::PolicyError),
    #[error(
        "the quarantine would need {count} entries of one address family, and the kernel holds {capacity}; quarantine whole prefixes instead of single addresses"
    )]
    QuarantineFull { count: usize, capacity: usize },
    #[error("BPF_PROG_TEST_RUN of `{name}` failed: {source}")]
    TestRun {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Which program a test run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// The XDP ingress program.
    Ingress,
    /// The TC ingress program (`--ingress-hook tc`).
    TcIngress,
    /// The TC egress program.
    Egress,
    /// An empty XDP program: the floor benchmarks compare against.
    Calibration,
}

impl Hook {
    fn program_name(self) -> &'static str {
        match self {
            Hook::Ingress => XDP_PROGRAM,
            Hook::TcIngress => TC_INGRESS_PROGRAM,
            Hook::Egress => TC_PROGRAM,
            Hook::Calibration => CALIBRATION_PROGRAM,
        }
    }
}

/// A loaded object's program `name`, as its concrete type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing { what: "program", name })?
        .try_into()
        .map_err(|source| DatapathError::Verify { name, source })
}

/// Loaded programs and the maps the daemon writes or reads.
pub struct Datapath {
    ebpf: Ebpf,
    /// Interfaces both programs are attached to, in the order attached.
    attachments: Vec<Attachment>,
    /// Pinned links found defunct while attaching, and replaced.
    repairs: u64,
    maps: PolicyMaps,
    /// The two policy slots; the kernel reads `slots[slot_of(generation)]`.
    slots: [Slot; 2],
    config: Array<MapData, Config>,
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    fragments: HashMap<MapData, FragmentKey, FragmentValue>,
    drop_counters: PerCpuArray<MapData, Counter>,
    audit_counters: PerCpuArray<MapData, Counter>,
    forward_counters: PerCpuArray<MapData, Counter>,
    state_errors: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    pairs: pairs::PairCounters,
    /// Drops per identity pair from generations whose slot has since been reused.
    harvested_pairs: BTreeMap<(String, String), u64>,
    /// Rule decisions of generations whose slot has since been reused.
    harvested_rules: BTreeMap<(String, Action), u64>,
    host_addresses: BTreeSet<IpAddr>,
    config_value: Config,
    sizes: MapSizes,
    xdp_attach: XdpAttach,
    ingress_hook: IngressHook,
    /// Waits out program runs that may still read the slot the kernel left.
    barrier: Arc<ProgramBarrier>,
    /// The wait started at the last slot switch, in the background: the
    /// next `apply` rewrites that slot only once it has returned.
    quiescing: Option<JoinHandle<Result<(), QuiesceError>>>,
    /// How long the last `apply` waited for that, for the metrics.
    last_slot_wait: Duration,
    /// Work left by changes written into the live slot.
    retiring: in_place::Retiring,
    /// The policy generation as reported: one more with every change
    /// applied. The kernel's moves on by two for a change written in place.
    generation: u32,
    /// Entries the policy in force needs, as of the last `apply`.
    counts: EntryCounts,
    /// `CONFIG_FLAG_NO_*_CACHE` bits of the caches turned off (see
    /// `set_verdict_cache`, `set_flow_cache`): every config write keeps them.
    caches_off: u32,
    quarantine: quarantine::QuarantineMaps,
    /// `CONFIG_FLAG_REPORT_ADMITS` while the lateral-movement detector
    /// runs: every config write keeps it.
    report_admits: u32,
    /// `CONFIG_FLAG_QUARANTINE` while the tries hold anything: every config
    /// write keeps it.
    quarantine_flag: u32,
}

/// Counter totals summed over CPUs.
#[derive(Debug, Clone, Default)]
pub struct CounterSnapshot {
    pub drops: StdHashMap<(DropReason, Direction), Counter>,
    pub audits: StdHashMap<(DropReason, Direction), Counter>,
    pub forwards: StdHashMap<Direction, Counter>,
    /// Policy decisions per rule (allow or deny), since start.
    pub rules: BTreeMap<(String, Action), u64>,
    /// Failed state-table inserts.
    pub state_errors: StdHashMap<StateError, u64>,
    /// Drops per (source identity, destination identity) name.
    pub identity_drops: BTreeMap<(String, String), u64>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::Missing { what: "map", name })?;
    T::try_from(map).map_err(|source| DatapathError::MapType { name, source })
}

impl Datapath {
    fn xdp(&mut self) -> Result<&mut Xdp, DatapathError> {
        program(&mut self.ebpf, XDP_PROGRAM)
    }

    fn classifier(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, TC_PROGRAM)
    }

    fn ingress_classifier(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, TC_INGRESS_PROGRAM)
    }

    /// Takes over the state an earlier daemon left in pinned maps: the
    /// enforced generation and the node's addresses. The slots stay out of
    /// step (this daemon numbers identities afresh), so each is read back
    /// and brought in step whole the first time it is written; the kernel
    /// keeps enforcing the adopted generation until the first switch.
    /// Returns the adopted generation (0 if the maps were new).
    pub fn adopt_state(&mut self) -> Result<u32, DatapathError> {
        let config =
            self.config.get(&CONFIG_INDEX, 0).map_err(|source| DatapathError::Read { name: maps::CONFIG, source })?;
        if config.policy_generation == 0 {
            return Ok(0);
        }
        self.config_value = config;
        self.generation = config.policy_generation;
        let (identities, _) = self.read_slot(slot_of(config.policy_generation))?;
        self.host_addresses = identities
            .iter()
            .filter(|(net, value)| value.id == IDENTITY_HOST && net.prefix_len() == net.max_prefix_len())
            .map(|(net, _)| net.addr())
            .collect();
        Ok(config.policy_generation)
    }

    /// What the identity and policy maps hold under `slot` (keys with slot 0).
    fn read_slot(&self, slot: usize) -> Result<(SlotIdentities, SlotPolicy), DatapathError> {
        let read = |name| move |source| DatapathError::Read { name, source };
        let mut identities = StdHashMap::new();
        let mut policy = StdHashMap::new();
        for key in self.maps.identity_v4_exact.keys() {
            let key = key.map_err(read(maps::IDENTITY_V4_EXACT))?;
            if key.slot as usize == slot {
                let value = self.maps.identity_v4_exact.get(&key, 0).map_err(read(maps::IDENTITY_V4_EXACT))?;
                identities.insert(IpNet::from(IpAddr::from(key.addr)), value);
            }
        }
        for key in self.maps.identity_v6_exact.keys() {
            let key = key.map_err(read(maps::IDENTITY_V6_EXACT))?;
            if key.slot as usize == slot {
                let value = self.maps.identity_v6_exact.get(&key, 0).map_err(read(maps::IDENTITY_V6_EXACT))?;
                identities.insert(IpNet::from(IpAddr::from(key.addr)), value);
            }
        }
        for key in self.maps.identity_v4_prefix.keys() {
            let key = key.map_err(read(maps::IDENTITY_V4_PREFIX))?;
            let data = key.data();
            if data[0] as usize == slot {
                let value = self.maps.identity_v4_prefix.get(&key, 0).map_err(read(maps::IDENTITY_V4_PREFIX))?;
                let addr = IpAddr::from([data[1], data[2], data[3], data[4]]);
                if let Ok(net) = IpNet::new(addr, (key.prefix_len() - SLOT_BITS) as u8) {
                    identities.insert(net, value);
                }
            }
        }
        for key in self.maps.identity_v6_prefix.keys() {
            let key = key.map_err(read(maps::IDENTITY_V6_PREFIX))?;
            let data = key.data();
            if data[0] as usize == slot {
                let value = self.maps.identity_v6_prefix.get(&key, 0).map_err(read(maps::IDENTITY_V6_PREFIX))?;
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&data[1..]);
                if let Ok(net) = IpNet::new(IpAddr::from(octets), (key.prefix_len() - SLOT_BITS) as u8) {
                    identities.insert(net, value);
                }
            }
        }
        for key in self.maps.policy.keys() {
            let key = key.map_err(read(maps::POLICY))?;
            let data = key.data();
            if data.slot as usize == slot {
                let value = self.maps.policy.get(&key, 0).map_err(read(maps::POLICY))?;
                policy.insert((key.prefix_len(), PolicyKeyData { slot: 0, ..data }), value);
            }
        }
        for key in self.maps.policy_exact.keys() {
            let key = key.map_err(read(maps::POLICY_EXACT))?;
            if key.slot as usize == slot {
                let value = self.maps.policy_exact.get(&key, 0).map_err(read(maps::POLICY_EXACT))?;
                policy.insert((POLICY_KEY_MAX_PREFIX, PolicyKeyData { slot: 0, ..key }), value);
            }
        }
        Ok((identities, policy))
    }

    /// Drops per (source, destination) identity name counted under `slot`.
    fn read_pairs(&self, slot: usize) -> Result<Vec<PairCount>, DatapathError> {
        Ok(self.named_pairs(slot, self.pairs.read(slot)?))
    }

    /// Counts by pair under the names `slot`'s atoms have.
    fn named_pairs(&self, slot: usize, counts: Vec<(IdentityPairKey, u64)>) -> Vec<PairCount> {
        let names = &self.slots[slot].atom_names;
        let name = |id: IdentityId| names.get(id).map_or_else(|| "other".to_owned(), ToString::to_string);
        counts.into_iter().map(|(key, count)| ((name(key.src), name(key.dst)), count)).collect()
    }

    /// Reads, then forgets, the identity-pair drops counted under `slot`,
    /// which is about to number its identities anew.
    fn take_pairs(&mut self, slot: usize) -> Result<Vec<PairCount>, DatapathError> {
        let taken = self.pairs.harvest(slot)?;
        Ok(self.named_pairs(slot, taken))
    }

    /// The ring of drop and audit events; the first caller gets it.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The generation the kernel enforces (0 before the first `apply`).
    #[must_use]
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The node's addresses as last declared.
    #[must_use]
    pub fn host_addresses(&self) -> &BTreeSet<IpAddr> {
        &self.host_addresses
    }

    /// Entries the policy in force needs in each map (the node's
    /// addresses included), and the map's capacity: for capacity metrics.
    #[must_use]
    pub fn map_usage(&self) -> Vec<(&'static str, u64, u32)> {
        let counts = self.counts;
        let mut hosts = [0u64; 4];
        for addr in &self.host_addresses {
            hosts[map_of(IpNet::from(*addr))] += 1;
        }
        vec![
            ("identity_v4_exact", u64::from(counts.identity_v4_exact) + hosts[0], self.sizes.identities),
            ("identity_v4_prefix", u64::from(counts.identity_v4_prefix) + hosts[1], self.sizes.prefixes),
            ("identity_v6_exact", u64::from(counts.identity_v6_exact) + hosts[2], self.sizes.identities),
            ("identity_v6_prefix", u64::from(counts.identity_v6_prefix) + hosts[3], self.sizes.prefixes),
            ("policy", u64::from(counts.policy_exact + counts.policy_prefix), self.sizes.policy),
        ]
    }

    /// Tracked connection entries (two per connection) and the table's capacity.
    #[must_use]
    pub fn conntrack_usage(&self) -> (u64, u32) {
        let entries = crate::batch::hash_len::<FlowKey, FlowValue>(self.conntrack.map())
            .unwrap_or_else(|_| self.conntrack.keys().flatten().count());
        (entries as u64, self.sizes.conntrack)
    }

    /// The tracked connection entry for one direction of a connection.
    pub fn conntrack_entry(&self, flow: &FlowKey) -> Result<Option<FlowValue>, DatapathError> {
        match self.conntrack.get(flow, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Read { name: maps::CONNTRACK, source }),
        }
    }

    /// The raw fd of a program, for `BPF_PROG_TEST_RUN` from other threads.
    pub fn program_fd(&mut self, hook: Hook) -> Result<RawFd, DatapathError> {
        let name = hook.program_name();
        let program = self.ebpf.program(name).ok_or(DatapathError::Missing { what: "program", name })?;
        program.fd().map(|fd| fd.as_fd().as_raw_fd()).map_err(|source| DatapathError::Verify { name, source })
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<CounterSnapshot, DatapathError> {
        let mut snapshot = self.verdict_counters()?;
        snapshot.rules.clone_from(&self.harvested_rules);
        for slot in &self.slots {
            for (rule, count) in slot.read_rule_verdicts(&self.maps)? {
                *snapshot.rules.entry(rule).or_default() += count;
            }
        }
        snapshot.identity_drops.clone_from(&self.harvested_pairs);
        for slot in 0..2 {
            for (pair, count) in self.read_pairs(slot)? {
                *snapshot.identity_drops.entry(pair).or_default() += count;
            }
        }
        for error in StateError::ALL {
            let values = self
                .state_errors
                .get(&(error as u32), 0)
                .map_err(|source| DatapathError::Read { name: maps::STATE_ERRORS, source })?;
            snapshot.state_errors.insert(error, values.iter().sum());
        }
        Ok(snapshot)
    }

    /// Only the verdict counters (forwarded, dropped and audited, per
    /// reason and direction) of [`Self::counters`]: a tenth of its map
    /// reads, for the differential test's check after every case.
    pub fn verdict_counters(&self) -> Result<CounterSnapshot, DatapathError> {
        let sum = |map: &PerCpuArray<MapData, Counter>, index: u32, name| {
            let values = map.get(&index, 0).map_err(|source| DatapathError::Read { name, source })?;
            Ok::<_, DatapathError>(values.iter().fold(Counter::default(), |total, c| Counter {
                packets: total.packets + c.packets,
                bytes: total.bytes + c.bytes,
            }))
        };
        let mut snapshot = CounterSnapshot::default();
        for direction in Direction::ALL {
            for reason in DropReason::ALL {
                let index = drop_counter_index(reason, direction);
                snapshot.drops.insert((reason, direction), sum(&self.drop_counters, index, maps::DROP_COUNTERS)?);
                snapshot.audits.insert((reason, direction), sum(&self.audit_counters, index, maps::AUDIT_COUNTERS)?);
            }
            let counter = sum(&self.forward_counters, direction as u32, maps::FORWARD_COUNTERS)?;
            snapshot.forwards.insert(direction, counter);
        }
        Ok(snapshot)
    }

    /// Forgets every tracked connection and remembered fragment, so test
    /// cases start from a clean slate.
    pub fn clear_state(&mut self) -> Result<(), DatapathError> {
        let flows: Vec<FlowKey> = self.conntrack.keys().filter_map(Result::ok).collect();
        for flow in flows {
            ignore_missing(self.conntrack.remove(&flow)).map_err(write_error(maps::CONNTRACK))?;
        }
        let fragments: Vec<FragmentKey> = self.fragments.keys().filter_map(Result::ok).collect();
        for fragment in fragments {
            ignore_missing(self.fragments.remove(&fragment)).map_err(write_error(maps::FRAGMENTS))?;
        }
        // Flows the kernel's flow cache holds are gone now.
        self.bump_verdict_epoch()
    }

    /// Runs a program on `frame` in the kernel (`BPF_PROG_TEST_RUN`),
    /// `repeat` times, with the maps as they are.
    pub fn test_run(&mut self, hook: Hook, frame: &[u8], repeat: u32) -> Result<TestRun, DatapathError> {
        let name = hook.program_name();
        let fd = self.program_fd(hook)?;
        crate::testrun::run(fd, frame, repeat).map_err(|source| DatapathError::TestRun { name, source })
    }
}

/// The kernel's timer tick, which the programs' packet clock counts in:
/// `CLOCK_MONOTONIC_COARSE` advances by exactly one tick, so its resolution
/// is the tick's length. Falls back to the longest tick Linux allows, on
/// which the clock can only run fast (state then expires early, never late).
#[must_use]
pub fn clock_tick_ns() -> u32 {
    let mut resolution = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer for the duration of the call.
    let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &raw mut resolution) } == 0;
    match u32::try_from(resolution.tv_nsec) {
        Ok(tick) if ok && resolution.tv_sec == 0 && (1..=MAX_CLOCK_TICK_NS).contains(&tick) => tick,
        _ => MAX_CLOCK_TICK_NS,
    }
}

/// Identity entries of one slot, by prefix.
type SlotIdentities = StdHashMap<IpNet, IdentityValue>;
/// Policy entries of one slot, by (prefix length, key with slot 0).
type SlotPolicy = StdHashMap<(u32, PolicyKeyData), enforcer_common::PolicyValue>;

/// Drops counted for one (source, destination) identity-name pair.
type PairCount = ((String, String), u64);

/// Decisions counted for one rule (name, action).
type RuleCount = ((String, Action), u64);
