//! The kernel side as the daemon sees it: loads the programs, attaches them,
//! keeps the maps in step with the compiled policy and the node's addresses,
//! and reads the counters.

use std::collections::{BTreeSet, HashMap as StdHashMap};
use std::net::IpAddr;
use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray};
use aya::programs::tc::{self, SchedClassifierLinkId, TcAttachType};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{ProgramError, SchedClassifier, Xdp, XdpMode};
use aya::{Ebpf, EbpfError, EbpfLoader};
use enforcer_common::{
    CONFIG_FLAG_AUDIT, CONFIG_INDEX, Config, Counter, Direction, DropReason, FlowKey, FlowValue, FragmentKey,
    FragmentValue, IDENTITY_HOST, IdentityValue, PolicyKeyData, PolicyValue, drop_counter_index, maps, slot_of,
};
use ipnet::IpNet;
use policy::CompiledPolicy;

static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead"));
const XDP_PROGRAM: &str = "bulkhead_xdp";
const TC_PROGRAM: &str = "bulkhead_tc_egress";

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
    #[error(
        "the policy needs {needed} entries in map `{map}`, which holds {capacity}; raise its size or shrink the policy"
    )]
    Capacity { map: &'static str, needed: u32, capacity: u32 },
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
    /// The TC egress program.
    Egress,
}

/// Result of one `BPF_PROG_TEST_RUN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (`XDP_*` or `TC_ACT_*`).
    pub retval: u32,
    /// Mean nanoseconds per repetition, as the kernel measured it.
    pub duration_ns: u32,
}

/// Loaded programs and the maps the daemon writes or reads.
pub struct Datapath {
    ebpf: Ebpf,
    xdp_links: Vec<(String, XdpLinkId)>,
    tc_links: Vec<(String, SchedClassifierLinkId)>,
    /// The two policy slots; the kernel reads `slots[slot_of(generation)]`.
    slots: [Slot; 2],
    config: Array<MapData, Config>,
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    fragments: HashMap<MapData, FragmentKey, FragmentValue>,
    drop_counters: PerCpuArray<MapData, Counter>,
    audit_counters: PerCpuArray<MapData, Counter>,
    forward_counters: PerCpuArray<MapData, Counter>,
    host_addresses: BTreeSet<IpAddr>,
    config_value: Config,
    sizes: MapSizes,
    /// When the kernel last switched slots: the slot it left may still be
    /// read by programs that started before the switch, so it is not
    /// rewritten until [`SLOT_GRACE`] has passed.
    last_flip: Instant,
}

/// How long a program run can take at most, generously: BPF programs run to
/// completion in microseconds.
const SLOT_GRACE: Duration = Duration::from_millis(2);

/// Capacities of the maps a policy fills and of the state tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// Single-address identity entries per family (the node's addresses included).
    pub identities: u32,
    /// Prefix identity entries per family.
    pub prefixes: u32,
    /// Policy trie entries.
    pub policy: u32,
    /// Tracked connection entries (two per connection).
    pub conntrack: u32,
    /// Remembered first fragments.
    pub fragments: u32,
}

impl Default for MapSizes {
    /// The sizes the kernel object declares.
    fn default() -> Self {
        Self { identities: 131_072, prefixes: 65_536, policy: 524_288, conntrack: 262_144, fragments: 16_384 }
    }
}

/// One slot's maps and what the daemon wrote into them.
struct Slot {
    identity_v4_exact: HashMap<MapData, [u8; 4], IdentityValue>,
    identity_v4_prefix: LpmTrie<MapData, [u8; 4], IdentityValue>,
    identity_v6_exact: HashMap<MapData, [u8; 16], IdentityValue>,
    identity_v6_prefix: LpmTrie<MapData, [u8; 16], IdentityValue>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyValue>,
    /// What the identity maps hold now.
    identities: StdHashMap<IpNet, IdentityValue>,
    /// What the policy trie holds now.
    rules: StdHashMap<(u32, PolicyKeyData), PolicyValue>,
    /// The compiled policy's identity entries, before host addresses overlay them.
    compiled_identities: StdHashMap<IpNet, IdentityValue>,
    index: usize,
}

/// Counter totals summed over CPUs.
#[derive(Debug, Clone, Default)]
pub struct CounterSnapshot {
    pub drops: StdHashMap<(DropReason, Direction), Counter>,
    pub audits: StdHashMap<(DropReason, Direction), Counter>,
    pub forwards: StdHashMap<Direction, Counter>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::Missing { what: "map", name })?;
    T::try_from(map).map_err(|source| DatapathError::MapType { name, source })
}

fn write_error(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Write { name, source }
}

/// Deleting a key that is already gone is not an error.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl Datapath {
    /// Loads the object with default map sizes and verifies both programs;
    /// attaches nothing.
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_with(MapSizes::default())
    }

    /// Loads the object with the given map sizes.
    pub fn load_with(sizes: MapSizes) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        for slot in 0..2 {
            loader.map_max_entries(maps::IDENTITY_V4_EXACT[slot], sizes.identities);
            loader.map_max_entries(maps::IDENTITY_V6_EXACT[slot], sizes.identities);
            loader.map_max_entries(maps::IDENTITY_V4_PREFIX[slot], sizes.prefixes);
            loader.map_max_entries(maps::IDENTITY_V6_PREFIX[slot], sizes.prefixes);
            loader.map_max_entries(maps::POLICY[slot], sizes.policy);
        }
        loader.map_max_entries(maps::CONNTRACK, sizes.conntrack);
        loader.map_max_entries(maps::FRAGMENTS, sizes.fragments);
        let mut ebpf = loader.load(PROGRAM).map_err(DatapathError::Load)?;
        let verify = |name| move |source| DatapathError::Verify { name, source };
        let xdp: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or(DatapathError::Missing { what: "program", name: XDP_PROGRAM })?
            .try_into()
            .map_err(verify(XDP_PROGRAM))?;
        xdp.load().map_err(verify(XDP_PROGRAM))?;
        let classifier: &mut SchedClassifier = ebpf
            .program_mut(TC_PROGRAM)
            .ok_or(DatapathError::Missing { what: "program", name: TC_PROGRAM })?
            .try_into()
            .map_err(verify(TC_PROGRAM))?;
        classifier.load().map_err(verify(TC_PROGRAM))?;
        Ok(Self {
            slots: [Slot::take(&mut ebpf, 0)?, Slot::take(&mut ebpf, 1)?],
            config: take(&mut ebpf, maps::CONFIG)?,
            conntrack: take(&mut ebpf, maps::CONNTRACK)?,
            fragments: take(&mut ebpf, maps::FRAGMENTS)?,
            drop_counters: take(&mut ebpf, maps::DROP_COUNTERS)?,
            audit_counters: take(&mut ebpf, maps::AUDIT_COUNTERS)?,
            forward_counters: take(&mut ebpf, maps::FORWARD_COUNTERS)?,
            ebpf,
            xdp_links: Vec::new(),
            tc_links: Vec::new(),
            host_addresses: BTreeSet::new(),
            config_value: Config::default(),
            sizes,
            last_flip: Instant::now(),
        })
    }

    fn xdp(&mut self) -> Result<&mut Xdp, DatapathError> {
        self.ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or(DatapathError::Missing { what: "program", name: XDP_PROGRAM })?
            .try_into()
            .map_err(|source| DatapathError::Verify { name: XDP_PROGRAM, source })
    }

    fn classifier(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        self.ebpf
            .program_mut(TC_PROGRAM)
            .ok_or(DatapathError::Missing { what: "program", name: TC_PROGRAM })?
            .try_into()
            .map_err(|source| DatapathError::Verify { name: TC_PROGRAM, source })
    }

    /// Attaches XDP (ingress; native mode where the driver has it) and the
    /// TC egress program (tcx where the kernel has it) to `interface`.
    pub fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        let link = self.xdp()?.attach(interface, XdpMode::Default).map_err(|source| DatapathError::Attach {
            hook: "XDP",
            interface: interface.to_owned(),
            source,
        })?;
        self.xdp_links.push((interface.to_owned(), link));
        // Kernels without tcx need a clsact qdisc; an existing one is fine.
        let _ = tc::qdisc_add_clsact(interface);
        let link = self
            .classifier()?
            .attach(interface, TcAttachType::Egress)
            .map_err(|source| DatapathError::Attach { hook: "TC egress", interface: interface.to_owned(), source })?;
        self.tc_links.push((interface.to_owned(), link));
        Ok(())
    }

    /// Interfaces the programs are attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.xdp_links.iter().map(|(name, _)| name.as_str())
    }

    /// Writes `compiled` into the slot the kernel is not reading (only the
    /// entries that differ from what that slot holds), then publishes it as
    /// the next generation with one write: identities and policy switch
    /// together, and tracked flows are judged again on their next packet.
    /// A policy that does not fit the maps is refused before anything is
    /// written. Returns the new generation.
    pub fn apply(&mut self, compiled: &CompiledPolicy, audit_all: bool) -> Result<u32, DatapathError> {
        self.check_capacity(compiled)?;
        let generation = self.config_value.policy_generation.wrapping_add(1);
        if let Some(wait) = SLOT_GRACE.checked_sub(self.last_flip.elapsed()) {
            std::thread::sleep(wait);
        }
        let slot = &mut self.slots[slot_of(generation)];
        slot.compiled_identities =
            compiled.identity_entries.iter().map(|e| (e.net, IdentityValue { id: e.id, flags: e.flags })).collect();
        slot.sync_identities(&self.host_addresses)?;
        let wanted: StdHashMap<(u32, PolicyKeyData), PolicyValue> =
            compiled.policy_entries.iter().map(|e| ((e.prefix_len, e.key), e.value)).collect();
        slot.sync_policy(&wanted)?;
        self.config_value =
            Config { policy_generation: generation, flags: if audit_all { CONFIG_FLAG_AUDIT } else { 0 } };
        self.config.set(CONFIG_INDEX, self.config_value, 0).map_err(write_error(maps::CONFIG))?;
        self.last_flip = Instant::now();
        Ok(generation)
    }

    /// The generation the kernel enforces (0 before the first `apply`).
    #[must_use]
    pub fn generation(&self) -> u32 {
        self.config_value.policy_generation
    }

    /// Refuses a policy whose entries exceed a map's capacity.
    fn check_capacity(&self, compiled: &CompiledPolicy) -> Result<(), DatapathError> {
        let mut counts = [0u32; 4];
        for entry in &compiled.identity_entries {
            counts[map_of(entry.net)] += 1;
        }
        for addr in &self.host_addresses {
            counts[map_of(IpNet::from(*addr))] += 1;
        }
        let needs = [
            (maps::IDENTITY_V4_EXACT[0], counts[0], self.sizes.identities),
            (maps::IDENTITY_V4_PREFIX[0], counts[1], self.sizes.prefixes),
            (maps::IDENTITY_V6_EXACT[0], counts[2], self.sizes.identities),
            (maps::IDENTITY_V6_PREFIX[0], counts[3], self.sizes.prefixes),
            (maps::POLICY[0], u32::try_from(compiled.policy_entries.len()).unwrap_or(u32::MAX), self.sizes.policy),
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
            slot.sync_identities(addresses)?;
        }
        Ok(())
    }

    /// The node's addresses as last declared.
    #[must_use]
    pub fn host_addresses(&self) -> &BTreeSet<IpAddr> {
        &self.host_addresses
    }

    /// Entries the daemon keeps in each slot-less view: for capacity metrics.
    #[must_use]
    pub fn map_usage(&self) -> Vec<(&'static str, u64, u32)> {
        let slot = &self.slots[slot_of(self.config_value.policy_generation)];
        let mut counts = [0u64; 4];
        for net in slot.identities.keys() {
            counts[map_of(*net)] += 1;
        }
        vec![
            ("identity_v4_exact", counts[0], self.sizes.identities),
            ("identity_v4_prefix", counts[1], self.sizes.prefixes),
            ("identity_v6_exact", counts[2], self.sizes.identities),
            ("identity_v6_prefix", counts[3], self.sizes.prefixes),
            ("policy", slot.rules.len() as u64, self.sizes.policy),
        ]
    }

    /// Tracked connection entries (two per connection) and the table's capacity.
    #[must_use]
    pub fn conntrack_usage(&self) -> (u64, u32) {
        (self.conntrack.keys().flatten().count() as u64, self.sizes.conntrack)
    }

    /// The raw fd of a program, for `BPF_PROG_TEST_RUN` from other threads.
    pub fn program_fd(&mut self, hook: Hook) -> Result<RawFd, DatapathError> {
        match hook {
            Hook::Ingress => self
                .xdp()?
                .fd()
                .map(|fd| fd.as_fd().as_raw_fd())
                .map_err(|source| DatapathError::Verify { name: XDP_PROGRAM, source }),
            Hook::Egress => self
                .classifier()?
                .fd()
                .map(|fd| fd.as_fd().as_raw_fd())
                .map_err(|source| DatapathError::Verify { name: TC_PROGRAM, source }),
        }
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<CounterSnapshot, DatapathError> {
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
        Ok(())
    }

    /// Runs a program on `frame` in the kernel (`BPF_PROG_TEST_RUN`),
    /// `repeat` times, with the maps as they are.
    pub fn test_run(&mut self, hook: Hook, frame: &[u8], repeat: u32) -> Result<TestRun, DatapathError> {
        let name = if hook == Hook::Ingress { XDP_PROGRAM } else { TC_PROGRAM };
        let fd = self.program_fd(hook)?;
        crate::testrun::run(fd, frame, repeat).map_err(|source| DatapathError::TestRun { name, source })
    }
}

/// Index of the identity map (v4 exact, v4 prefix, v6 exact, v6 prefix) an entry belongs in.
fn map_of(net: IpNet) -> usize {
    match net {
        IpNet::V4(n) if n.prefix_len() == 32 => 0,
        IpNet::V4(_) => 1,
        IpNet::V6(n) if n.prefix_len() == 128 => 2,
        IpNet::V6(_) => 3,
    }
}

impl Slot {
    fn take(ebpf: &mut Ebpf, index: usize) -> Result<Self, DatapathError> {
        Ok(Self {
            identity_v4_exact: take(ebpf, maps::IDENTITY_V4_EXACT[index])?,
            identity_v4_prefix: take(ebpf, maps::IDENTITY_V4_PREFIX[index])?,
            identity_v6_exact: take(ebpf, maps::IDENTITY_V6_EXACT[index])?,
            identity_v6_prefix: take(ebpf, maps::IDENTITY_V6_PREFIX[index])?,
            policy: take(ebpf, maps::POLICY[index])?,
            identities: StdHashMap::new(),
            rules: StdHashMap::new(),
            compiled_identities: StdHashMap::new(),
            index,
        })
    }

    fn sync_policy(&mut self, wanted: &StdHashMap<(u32, PolicyKeyData), PolicyValue>) -> Result<(), DatapathError> {
        let name = maps::POLICY[self.index];
        for (&(prefix_len, key), value) in wanted {
            if self.rules.get(&(prefix_len, key)) != Some(value) {
                self.policy.insert(&Key::new(prefix_len, key), *value, 0).map_err(write_error(name))?;
                self.rules.insert((prefix_len, key), *value);
            }
        }
        let stale: Vec<_> = self.rules.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for (prefix_len, key) in stale {
            ignore_missing(self.policy.remove(&Key::new(prefix_len, key))).map_err(write_error(name))?;
            self.rules.remove(&(prefix_len, key));
        }
        Ok(())
    }

    fn sync_identities(&mut self, hosts: &BTreeSet<IpAddr>) -> Result<(), DatapathError> {
        let mut wanted = self.compiled_identities.clone();
        for addr in hosts {
            wanted.insert(IpNet::from(*addr), IdentityValue { id: IDENTITY_HOST, flags: 0 });
        }
        for (net, value) in &wanted {
            if self.identities.get(net) != Some(value) {
                self.write_identity(*net, Some(*value))?;
                self.identities.insert(*net, *value);
            }
        }
        let stale: Vec<IpNet> = self.identities.keys().filter(|n| !wanted.contains_key(n)).copied().collect();
        for net in stale {
            self.write_identity(net, None)?;
            self.identities.remove(&net);
        }
        Ok(())
    }

    /// Inserts (`Some`) or removes (`None`) one identity entry in the map
    /// its family and prefix length belong to.
    fn write_identity(&mut self, net: IpNet, value: Option<IdentityValue>) -> Result<(), DatapathError> {
        let i = self.index;
        match net {
            IpNet::V4(n) if n.prefix_len() == 32 => {
                let key = n.addr().octets();
                let result = match value {
                    Some(v) => self.identity_v4_exact.insert(key, v, 0),
                    None => ignore_missing(self.identity_v4_exact.remove(&key)),
                };
                result.map_err(write_error(maps::IDENTITY_V4_EXACT[i]))
            }
            IpNet::V4(n) => {
                let key = Key::new(u32::from(n.prefix_len()), n.addr().octets());
                let result = match value {
                    Some(v) => self.identity_v4_prefix.insert(&key, v, 0),
                    None => ignore_missing(self.identity_v4_prefix.remove(&key)),
                };
                result.map_err(write_error(maps::IDENTITY_V4_PREFIX[i]))
            }
            IpNet::V6(n) if n.prefix_len() == 128 => {
                let key = n.addr().octets();
                let result = match value {
                    Some(v) => self.identity_v6_exact.insert(key, v, 0),
                    None => ignore_missing(self.identity_v6_exact.remove(&key)),
                };
                result.map_err(write_error(maps::IDENTITY_V6_EXACT[i]))
            }
            IpNet::V6(n) => {
                let key = Key::new(u32::from(n.prefix_len()), n.addr().octets());
                let result = match value {
                    Some(v) => self.identity_v6_prefix.insert(&key, v, 0),
                    None => ignore_missing(self.identity_v6_prefix.remove(&key)),
                };
                result.map_err(write_error(maps::IDENTITY_V6_PREFIX[i]))
            }
        }
    }
}
