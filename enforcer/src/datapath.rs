//! The kernel side as the daemon sees it: loads the programs, attaches them,
//! keeps the maps in step with the compiled policy and the node's addresses,
//! and reads the counters.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};
use std::net::IpAddr;
use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::Key;
use aya::maps::{
    Array, HashMap, IterableMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues, RingBuf,
};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{self, SchedClassifierLink, SchedClassifierLinkId, TcAttachType};
use aya::programs::xdp::{XdpLink, XdpLinkId};
use aya::programs::{ProgramError, SchedClassifier, Xdp, XdpMode};
use aya::{Ebpf, EbpfError, EbpfLoader};
use enforcer_common::{
    CONFIG_FLAG_AUDIT, CONFIG_INDEX, Config, Counter, DEFAULT_MAX_RULES, Direction, DropReason, FlowKey, FlowValue,
    FragmentKey, FragmentValue, IDENTITY_HOST, IdentityId, IdentityKeyV4, IdentityKeyV6, IdentityPairKey,
    IdentityPrefixV4, IdentityPrefixV6, IdentityValue, MAX_CLOCK_TICK_NS, POLICY_KEY_MAX_PREFIX, PolicyKeyData,
    PolicyValue, SLOT_BITS, StateError, drop_counter_index, maps, rule_counter_index, slot_of,
};
use ipnet::IpNet;
use policy::CompiledPolicy;
use policy::model::Action;

use crate::batch;
use crate::pins;
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
    identity_drops: PerCpuHashMap<MapData, IdentityPairKey, u64>,
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
}

/// The programs on one interface.
struct Attachment {
    name: String,
    index: u32,
    /// Which program judges incoming packets there.
    ingress: IngressHook,
    /// The ingress link while the program owns it (not pinned).
    owned: Option<OwnedIngress>,
    /// The egress link while the program owns it (not pinned).
    egress: Option<SchedClassifierLinkId>,
}

/// An ingress link owned by its program.
enum OwnedIngress {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

/// The three programs that attach to interfaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProgramSlot {
    Xdp,
    TcIngress,
    TcEgress,
}

impl ProgramSlot {
    fn label(self) -> &'static str {
        match self {
            Self::Xdp => "XDP",
            Self::TcIngress => "TC ingress",
            Self::TcEgress => "TC egress",
        }
    }
}

impl Attachment {
    /// Detaches what the programs own and removes the pins of the rest.
    fn detach(self, datapath: &mut Datapath, root: Option<&Path>) {
        match self.owned {
            Some(OwnedIngress::Xdp(id)) => {
                let _ = datapath.xdp().map(|p| p.detach(id));
            }
            Some(OwnedIngress::Tc(id)) => {
                let _ = datapath.ingress_classifier().map(|p| p.detach(id));
            }
            None => {}
        }
        if let Some(id) = self.egress {
            let _ = datapath.classifier().map(|p| p.detach(id));
        }
        if let Some(root) = root {
            pins::remove_links(root, &self.name);
        }
    }
}

/// How long to wait instead if the exact wait for in-flight programs fails:
/// far longer than any program run.
const FALLBACK_GRACE: Duration = Duration::from_millis(100);

/// Starts `barrier`'s wait on its own thread, or runs it here if no thread
/// can be started.
fn quiesce_in_background(barrier: &Arc<ProgramBarrier>) -> Option<JoinHandle<Result<(), QuiesceError>>> {
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

fn fall_back(failure: &str) {
    log::warn!("{failure}; waiting {FALLBACK_GRACE:?} instead");
    std::thread::sleep(FALLBACK_GRACE);
}

/// How the XDP program is attached to an interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum XdpAttach {
    /// In the driver where it supports XDP, else generic: the kernel's choice.
    #[default]
    Auto,
    /// In the driver only; attaching fails where the driver cannot.
    Native,
    /// After the socket buffer is built (generic XDP). Cheaper than native
    /// on veth, whose native XDP copies every packet the stack sent it.
    Generic,
}

/// Where incoming packets are judged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IngressHook {
    /// XDP: before the kernel builds a socket buffer, where the driver
    /// supports it; the fast choice on physical NICs.
    #[default]
    Xdp,
    /// TC ingress (tcx): after the socket buffer is built, where nftables'
    /// ingress hook also runs; the cheaper choice on veth, whose XDP copies
    /// every packet the sending stack built.
    Tc,
}

/// Capacities of the maps a policy fills and of the state tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// Single-address identity entries per family (the node's addresses included).
    pub identities: u32,
    /// Prefix identity entries per family.
    pub prefixes: u32,
    /// Policy entries: each of the two policy maps (single ports in a hash,
    /// ranges and whole protocols in a trie) can hold this many.
    pub policy: u32,
    /// Tracked connection entries (two per connection).
    pub conntrack: u32,
    /// Remembered first fragments.
    pub fragments: u32,
    /// Rules per policy (per-CPU verdict counters, per slot).
    pub rules: u32,
}

impl Default for MapSizes {
    /// The sizes the kernel object declares.
    fn default() -> Self {
        Self {
            identities: 131_072,
            prefixes: 65_536,
            policy: 524_288,
            conntrack: 262_144,
            fragments: 16_384,
            rules: DEFAULT_MAX_RULES,
        }
    }
}

/// The maps a verdict depends on; every key carries its policy slot.
struct PolicyMaps {
    identity_v4_exact: HashMap<MapData, IdentityKeyV4, IdentityValue>,
    identity_v4_prefix: LpmTrie<MapData, IdentityPrefixV4, IdentityValue>,
    identity_v6_exact: HashMap<MapData, IdentityKeyV6, IdentityValue>,
    identity_v6_prefix: LpmTrie<MapData, IdentityPrefixV6, IdentityValue>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyValue>,
    policy_exact: HashMap<MapData, PolicyKeyData, PolicyValue>,
    rule_verdicts: PerCpuArray<MapData, u64>,
}

/// What the daemon wrote under one policy slot.
struct Slot {
    /// The rule table of the generation in this slot: `rule_index` → rule.
    rule_table: Vec<(String, Action)>,
    /// What the identity maps hold under this slot.
    identities: StdHashMap<IpNet, IdentityValue>,
    /// What the policy maps hold under this slot (keys with slot 0).
    rules: StdHashMap<(u32, PolicyKeyData), PolicyValue>,
    /// The compiled policy's identity entries, before host addresses overlay them.
    compiled_identities: StdHashMap<IpNet, IdentityValue>,
    /// Numeric identity → owner name, for the generation in this slot.
    atom_names: StdHashMap<IdentityId, String>,
    index: usize,
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

fn write_error(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Write { name, source }
}

/// Writes `entries` to the hash map `name` in batches and calls `record`
/// for each one the kernel accepted (a prefix of them, if a write fails),
/// so a slot's bookkeeping stays true to the kernel.
fn write_batch<K: aya::Pod, V: aya::Pod>(
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
fn delete_batch<K: aya::Pod>(
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
        Self::load_pinned(sizes, None)
    }

    /// Loads the object with its maps pinned under `root/maps` (reusing the
    /// maps already pinned there by an earlier daemon, so enforcement state,
    /// policy and counters carry over), or unpinned if `root` is `None`.
    pub fn load_pinned(sizes: MapSizes, root: Option<&Path>) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        let map_dir = root.map(|r| r.join("maps"));
        if let Some(dir) = &map_dir {
            std::fs::create_dir_all(dir).map_err(|source| DatapathError::Pin { path: dir.clone(), source })?;
            adopt_unstamped_maps(dir);
            check_pinned_layout(dir)?;
            for layout in maps::LAYOUT {
                loader.map_pin_path(layout.name, dir.join(map_pin_name(&layout)));
            }
        }
        // Each map holds both slots.
        loader.map_max_entries(maps::IDENTITY_V4_EXACT, 2 * sizes.identities);
        loader.map_max_entries(maps::IDENTITY_V6_EXACT, 2 * sizes.identities);
        loader.map_max_entries(maps::IDENTITY_V4_PREFIX, 2 * sizes.prefixes);
        loader.map_max_entries(maps::IDENTITY_V6_PREFIX, 2 * sizes.prefixes);
        loader.map_max_entries(maps::POLICY, 2 * sizes.policy);
        loader.map_max_entries(maps::POLICY_EXACT, 2 * sizes.policy);
        loader.map_max_entries(maps::CONNTRACK, sizes.conntrack);
        loader.map_max_entries(maps::FRAGMENTS, sizes.fragments);
        loader.map_max_entries(maps::RULE_VERDICTS, 2 * sizes.rules);
        let mut ebpf = loader.load(PROGRAM).map_err(DatapathError::Load)?;
        let barrier = Arc::new(ProgramBarrier::new()?);
        let verify = |name| move |source| DatapathError::Verify { name, source };
        for name in [XDP_PROGRAM, CALIBRATION_PROGRAM] {
            program::<Xdp>(&mut ebpf, name)?.load().map_err(verify(name))?;
        }
        for name in [TC_PROGRAM, TC_INGRESS_PROGRAM] {
            program::<SchedClassifier>(&mut ebpf, name)?.load().map_err(verify(name))?;
        }
        Ok(Self {
            maps: PolicyMaps::take(&mut ebpf)?,
            slots: [Slot::new(0), Slot::new(1)],
            config: take(&mut ebpf, maps::CONFIG)?,
            conntrack: take(&mut ebpf, maps::CONNTRACK)?,
            fragments: take(&mut ebpf, maps::FRAGMENTS)?,
            drop_counters: take(&mut ebpf, maps::DROP_COUNTERS)?,
            audit_counters: take(&mut ebpf, maps::AUDIT_COUNTERS)?,
            forward_counters: take(&mut ebpf, maps::FORWARD_COUNTERS)?,
            state_errors: take(&mut ebpf, maps::STATE_ERRORS)?,
            events: Some(take(&mut ebpf, maps::EVENTS)?),
            identity_drops: take(&mut ebpf, maps::IDENTITY_DROPS)?,
            harvested_pairs: BTreeMap::new(),
            harvested_rules: BTreeMap::new(),
            ebpf,
            attachments: Vec::new(),
            repairs: 0,
            host_addresses: BTreeSet::new(),
            config_value: Config::default(),
            sizes,
            xdp_attach: XdpAttach::Auto,
            ingress_hook: IngressHook::Xdp,
            // An earlier daemon may have switched slots just before it exited.
            quiescing: quiesce_in_background(&barrier),
            barrier,
            last_slot_wait: Duration::ZERO,
        })
    }

    fn xdp(&mut self) -> Result<&mut Xdp, DatapathError> {
        program(&mut self.ebpf, XDP_PROGRAM)
    }

    fn classifier(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, TC_PROGRAM)
    }

    fn ingress_classifier(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, TC_INGRESS_PROGRAM)
    }

    /// Where later [`Datapath::attach`] calls judge incoming packets
    /// (adopted pinned links keep the hook they were made with).
    pub fn set_ingress_hook(&mut self, hook: IngressHook) {
        self.ingress_hook = hook;
    }

    /// How later [`Datapath::attach`] calls attach XDP (adopted pinned
    /// links keep the mode they were made with).
    pub fn set_xdp_attach(&mut self, mode: XdpAttach) {
        self.xdp_attach = mode;
    }

    /// Attaches the ingress program (XDP, or TC ingress as
    /// [`Datapath::set_ingress_hook`] says) and the TC egress program (tcx
    /// where the kernel has it) to `interface`.
    pub fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        self.attach_pinned(interface, None).map(drop)
    }

    /// As [`Datapath::attach`], keeping the links pinned under `root/links`
    /// so they outlive the daemon. Where a link is already pinned there (an
    /// earlier daemon's), its program is replaced atomically instead: the
    /// interface is never unprotected. A pinned link that can no longer be
    /// updated (its interface was deleted and re-created) is replaced by a
    /// fresh one. Returns whether links were adopted; attaching an
    /// interface that is already attached does nothing.
    pub fn attach_pinned(&mut self, interface: &str, root: Option<&Path>) -> Result<bool, DatapathError> {
        let index = pins::interface_index(interface)
            .ok_or_else(|| DatapathError::NoInterface { interface: interface.to_owned() })?;
        if let Some(existing) = self.attachments.iter_mut().find(|a| a.index == index) {
            interface.clone_into(&mut existing.name);
            return Ok(false);
        }
        // Kernels without tcx need a clsact qdisc; an existing one is fine.
        let _ = tc::qdisc_add_clsact(interface);
        let pin = |kind| root.map(|r| pins::link_pin(r, kind, interface));
        let (xdp_pin, tcin_pin, tc_pin) = (pin("xdp"), pin("tcin"), pin("tc"));
        let mut adopted = true;
        let ingress = if self.adopt(ProgramSlot::Xdp, xdp_pin.as_deref(), interface)? {
            (IngressHook::Xdp, None)
        } else if self.adopt(ProgramSlot::TcIngress, tcin_pin.as_deref(), interface)? {
            (IngressHook::Tc, None)
        } else {
            adopted = false;
            (self.ingress_hook, self.attach_fresh_ingress(interface, xdp_pin.as_deref(), tcin_pin.as_deref())?)
        };
        let egress = if self.adopt(ProgramSlot::TcEgress, tc_pin.as_deref(), interface)? {
            None
        } else {
            match self.attach_fresh_egress(interface, tc_pin.as_deref()) {
                Ok(egress) => egress,
                Err(error) => {
                    // Never leave an interface half attached by this call;
                    // an adopted ingress link keeps enforcing as before.
                    if !adopted {
                        let half = Attachment {
                            name: interface.to_owned(),
                            index,
                            ingress: ingress.0,
                            owned: ingress.1,
                            egress: None,
                        };
                        half.detach(self, root);
                    }
                    return Err(error);
                }
            }
        };
        self.attachments.push(Attachment {
            name: interface.to_owned(),
            index,
            ingress: ingress.0,
            owned: ingress.1,
            egress,
        });
        Ok(adopted)
    }

    /// Takes over the link pinned at `pin`, if there is one, by replacing
    /// its program with this daemon's atomically. A pin whose link cannot
    /// be updated (defunct) is removed and `false` returned, so a fresh
    /// link is attached instead.
    fn adopt(&mut self, slot: ProgramSlot, pin: Option<&Path>, interface: &str) -> Result<bool, DatapathError> {
        let Some(pin) = pin.filter(|p| p.exists()) else { return Ok(false) };
        let link = PinnedLink::from_pin(pin).map(FdLink::from);
        let adopted = match (slot, link) {
            (_, Err(error)) => Err(error.to_string()),
            (ProgramSlot::Xdp, Ok(link)) => match XdpLink::try_from(link) {
                Ok(link) => {
                    let program = self.xdp()?;
                    program
                        .attach_to_link(link)
                        .and_then(|id| program.take_link(id).map(drop))
                        .map_err(|e| e.to_string())
                }
                Err(error) => Err(error.to_string()),
            },
            (ProgramSlot::TcIngress | ProgramSlot::TcEgress, Ok(link)) => match SchedClassifierLink::try_from(link) {
                Ok(link) => {
                    let program =
                        if slot == ProgramSlot::TcIngress { self.ingress_classifier()? } else { self.classifier()? };
                    program
                        .attach_to_link(link)
                        .and_then(|id| program.take_link(id).map(drop))
                        .map_err(|e| e.to_string())
                }
                Err(error) => Err(error.to_string()),
            },
        };
        match adopted {
            // The pin keeps the link; this daemon's program now runs in it.
            Ok(()) => Ok(true),
            Err(why) => {
                log::warn!(
                    "the {} link of `{interface}` pinned at {} cannot be taken over ({why}); attaching a fresh one",
                    slot.label(),
                    pin.display()
                );
                let _ = std::fs::remove_file(pin);
                self.repairs += 1;
                Ok(false)
            }
        }
    }

    fn attach_fresh_ingress(
        &mut self,
        interface: &str,
        xdp_pin: Option<&Path>,
        tcin_pin: Option<&Path>,
    ) -> Result<Option<OwnedIngress>, DatapathError> {
        let attach_error = |hook| move |source| DatapathError::Attach { hook, interface: interface.to_owned(), source };
        if self.ingress_hook == IngressHook::Tc {
            let program = self.ingress_classifier()?;
            let id = program.attach(interface, TcAttachType::Ingress).map_err(attach_error("TC ingress"))?;
            let Some(path) = tcin_pin else { return Ok(Some(OwnedIngress::Tc(id))) };
            let link = program.take_link(id).map_err(attach_error("TC ingress"))?;
            pin_link(
                FdLink::try_from(link).map_err(|source| DatapathError::Link { path: path.into(), source })?,
                path,
            )?;
        } else {
            let mode = match self.xdp_attach {
                XdpAttach::Auto => XdpMode::Default,
                XdpAttach::Native => XdpMode::Driver,
                XdpAttach::Generic => XdpMode::Skb,
            };
            let program = self.xdp()?;
            let id = program.attach(interface, mode).map_err(attach_error("XDP"))?;
            let Some(path) = xdp_pin else { return Ok(Some(OwnedIngress::Xdp(id))) };
            let link = program.take_link(id).map_err(attach_error("XDP"))?;
            pin_link(
                FdLink::try_from(link).map_err(|source| DatapathError::Link { path: path.into(), source })?,
                path,
            )?;
        }
        Ok(None)
    }

    fn attach_fresh_egress(
        &mut self,
        interface: &str,
        tc_pin: Option<&Path>,
    ) -> Result<Option<SchedClassifierLinkId>, DatapathError> {
        let attach_error =
            |source| DatapathError::Attach { hook: "TC egress", interface: interface.to_owned(), source };
        let program = self.classifier()?;
        let id = program.attach(interface, TcAttachType::Egress).map_err(attach_error)?;
        let Some(path) = tc_pin else { return Ok(Some(id)) };
        let link = program.take_link(id).map_err(attach_error)?;
        pin_link(FdLink::try_from(link).map_err(|source| DatapathError::Link { path: path.into(), source })?, path)?;
        Ok(None)
    }

    /// Detaches both programs from the interface with index `index` and
    /// removes their pins under `root`; forgetting an interface that is
    /// gone is the same call. Returns its name if it was attached.
    pub fn detach(&mut self, index: u32, root: Option<&Path>) -> Option<String> {
        let position = self.attachments.iter().position(|a| a.index == index)?;
        let attachment = self.attachments.remove(position);
        let name = attachment.name.clone();
        attachment.detach(self, root);
        Some(name)
    }

    /// Records that the interface with index `index` is now called `name`,
    /// moving its pins. Returns the old name if it changed.
    pub fn renamed(&mut self, index: u32, name: &str, root: Option<&Path>) -> Option<String> {
        let attachment = self.attachments.iter_mut().find(|a| a.index == index && a.name != name)?;
        let old = std::mem::replace(&mut attachment.name, name.to_owned());
        if let Some(root) = root
            && let Err(error) = pins::rename_links(root, &old, name)
        {
            log::warn!("moving the pins of `{old}` to `{name}` failed: {error}");
        }
        Some(old)
    }

    /// Interfaces the programs are attached to, in the order attached.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attachments.iter().map(|a| a.name.as_str())
    }

    /// (ifindex, name) of every attached interface.
    pub fn attached_indexes(&self) -> impl Iterator<Item = (u32, &str)> {
        self.attachments.iter().map(|a| (a.index, a.name.as_str()))
    }

    /// How many interfaces each hook is attached to, by metrics label
    /// (`xdp`, `tc_ingress`, `tc_egress`).
    #[must_use]
    pub fn hook_counts(&self) -> [(&'static str, usize); 3] {
        let xdp = self.attachments.iter().filter(|a| a.ingress == IngressHook::Xdp).count();
        let all = self.attachments.len();
        [("xdp", xdp), ("tc_ingress", all - xdp), ("tc_egress", all)]
    }

    /// Pinned links found defunct and replaced while attaching, since load.
    #[must_use]
    pub fn link_repairs(&self) -> u64 {
        self.repairs
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

    /// Takes over the state an earlier daemon left in pinned maps: the
    /// enforced generation and what each slot holds, so the next `apply`
    /// writes only what differs and flips slots as usual. Returns the
    /// adopted generation (0 if the maps were new).
    pub fn adopt_state(&mut self) -> Result<u32, DatapathError> {
        let read = |name| move |source| DatapathError::Read { name, source };
        let config = self.config.get(&CONFIG_INDEX, 0).map_err(read(maps::CONFIG))?;
        if config.policy_generation == 0 {
            return Ok(0);
        }
        self.config_value = config;
        let mut found: [StdHashMap<IpNet, IdentityValue>; 2] = [StdHashMap::new(), StdHashMap::new()];
        for key in self.maps.identity_v4_exact.keys() {
            let key = key.map_err(read(maps::IDENTITY_V4_EXACT))?;
            let value = self.maps.identity_v4_exact.get(&key, 0).map_err(read(maps::IDENTITY_V4_EXACT))?;
            found[key.slot as usize & 1].insert(IpNet::from(IpAddr::from(key.addr)), value);
        }
        for key in self.maps.identity_v6_exact.keys() {
            let key = key.map_err(read(maps::IDENTITY_V6_EXACT))?;
            let value = self.maps.identity_v6_exact.get(&key, 0).map_err(read(maps::IDENTITY_V6_EXACT))?;
            found[key.slot as usize & 1].insert(IpNet::from(IpAddr::from(key.addr)), value);
        }
        for key in self.maps.identity_v4_prefix.keys() {
            let key = key.map_err(read(maps::IDENTITY_V4_PREFIX))?;
            let value = self.maps.identity_v4_prefix.get(&key, 0).map_err(read(maps::IDENTITY_V4_PREFIX))?;
            let data = key.data();
            let addr = IpAddr::from([data[1], data[2], data[3], data[4]]);
            if let Ok(net) = IpNet::new(addr, (key.prefix_len() - SLOT_BITS) as u8) {
                found[data[0] as usize & 1].insert(net, value);
            }
        }
        for key in self.maps.identity_v6_prefix.keys() {
            let key = key.map_err(read(maps::IDENTITY_V6_PREFIX))?;
            let value = self.maps.identity_v6_prefix.get(&key, 0).map_err(read(maps::IDENTITY_V6_PREFIX))?;
            let data = key.data();
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&data[1..]);
            if let Ok(net) = IpNet::new(IpAddr::from(octets), (key.prefix_len() - SLOT_BITS) as u8) {
                found[data[0] as usize & 1].insert(net, value);
            }
        }
        for key in self.maps.policy.keys() {
            let key = key.map_err(read(maps::POLICY))?;
            let value = self.maps.policy.get(&key, 0).map_err(read(maps::POLICY))?;
            let data = key.data();
            let slot = data.slot as usize & 1;
            self.slots[slot].rules.insert((key.prefix_len(), PolicyKeyData { slot: 0, ..data }), value);
        }
        for key in self.maps.policy_exact.keys() {
            let key = key.map_err(read(maps::POLICY_EXACT))?;
            let value = self.maps.policy_exact.get(&key, 0).map_err(read(maps::POLICY_EXACT))?;
            let slot = key.slot as usize & 1;
            self.slots[slot].rules.insert((POLICY_KEY_MAX_PREFIX, PolicyKeyData { slot: 0, ..key }), value);
        }
        let active = slot_of(config.policy_generation);
        self.host_addresses = found[active]
            .iter()
            .filter(|(net, value)| value.id == IDENTITY_HOST && net.prefix_len() == net.max_prefix_len())
            .map(|(net, _)| net.addr())
            .collect();
        for (slot, identities) in found.into_iter().enumerate() {
            self.slots[slot].compiled_identities =
                identities.iter().filter(|(_, v)| v.id != IDENTITY_HOST).map(|(n, v)| (*n, *v)).collect();
            self.slots[slot].identities = identities;
        }
        Ok(config.policy_generation)
    }

    /// Drops per (source, destination) identity name counted under `slot`.
    fn clone_free_pairs(&self, slot: usize) -> Result<Vec<PairCount>, DatapathError> {
        let names = &self.slots[slot].atom_names;
        let name = |id: IdentityId| names.get(&id).cloned().unwrap_or_else(|| "other".to_owned());
        let mut out = Vec::new();
        for key in self.identity_drops.keys().flatten().filter(|k| k.slot as usize == slot) {
            match self.identity_drops.get(&key, 0) {
                Ok(values) => out.push(((name(key.src), name(key.dst)), values.iter().sum())),
                Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(DatapathError::Read { name: maps::IDENTITY_DROPS, source }),
            }
        }
        Ok(out)
    }

    /// Reads, then deletes, the identity-pair drops counted under `slot`,
    /// which is about to number its identities anew.
    fn read_identity_drops(&mut self, slot: usize, remove: bool) -> Result<Vec<PairCount>, DatapathError> {
        let counts = self.clone_free_pairs(slot)?;
        if remove {
            let keys: Vec<IdentityPairKey> =
                self.identity_drops.keys().flatten().filter(|k| k.slot as usize == slot).collect();
            for key in keys {
                ignore_missing(self.identity_drops.remove(&key)).map_err(write_error(maps::IDENTITY_DROPS))?;
            }
        }
        Ok(counts)
    }

    /// The ring of drop and audit events; the first caller gets it.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The generation the kernel enforces (0 before the first `apply`).
    #[must_use]
    pub fn generation(&self) -> u32 {
        self.config_value.policy_generation
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
        snapshot.rules.clone_from(&self.harvested_rules);
        for slot in &self.slots {
            for (rule, count) in slot.read_rule_verdicts(&self.maps)? {
                *snapshot.rules.entry(rule).or_default() += count;
            }
        }
        snapshot.identity_drops.clone_from(&self.harvested_pairs);
        for slot in 0..2 {
            for (pair, count) in self.clone_free_pairs(slot)? {
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

/// The name a map is pinned under: its name stamped with its layout
/// (`CONNTRACK-v1-40x24`). A Bulkhead that lays a map out otherwise pins
/// it under another name, so a daemon never adopts a map it would misread:
/// on an upgrade or downgrade across a layout change, that map is created
/// afresh (and filled before the programs switch to it), every other map
/// is adopted with its state, and the old build's pin is removed once its
/// programs are replaced ([`retire_maps`]).
#[must_use]
pub fn map_pin_name(layout: &maps::Layout) -> String {
    format!("{}-v{}-{}x{}", layout.name, layout.version, layout.key, layout.value)
}

/// Builds before layout stamps pinned maps under their bare names: those
/// whose sizes match this build's are pinned again under their stamped
/// names (adopted with their state); the rest are left for [`retire_maps`].
fn adopt_unstamped_maps(dir: &Path) {
    for layout in maps::LAYOUT {
        let (bare, stamped) = (dir.join(layout.name), dir.join(map_pin_name(&layout)));
        if !bare.exists() || stamped.exists() {
            continue;
        }
        let same = aya::maps::MapInfo::from_pin(&bare)
            .is_ok_and(|info| (info.key_size(), info.value_size()) == (layout.key, layout.value));
        if same && let Err(error) = pins::move_pin(&bare, &stamped) {
            log::warn!("adopting map {} pinned by an earlier Bulkhead failed ({error}); it is rebuilt", bare.display());
        }
    }
}

/// Removes map pins under `root/maps` that this build does not use: maps
/// of a Bulkhead with another layout, whose programs have been replaced by
/// now. Returns the names removed.
pub fn retire_maps(root: &Path) -> std::io::Result<Vec<String>> {
    let dir = root.join("maps");
    let current: BTreeSet<String> = maps::LAYOUT.iter().map(map_pin_name).collect();
    let mut retired = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !current.contains(&name) {
            std::fs::remove_file(entry.path())?;
            retired.push(name);
        }
    }
    retired.sort();
    Ok(retired)
}

/// Refuses maps pinned under `dir` whose key or value size differs from
/// what their stamped name says (something other than Bulkhead pinned
/// them): the programs would reuse them and the verifier would reject the
/// first access past their end, with a message that names neither the map
/// nor the remedy.
fn check_pinned_layout(dir: &Path) -> Result<(), DatapathError> {
    for layout in maps::LAYOUT {
        let path = dir.join(map_pin_name(&layout));
        if !path.exists() {
            continue;
        }
        let name = layout.name;
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|source| DatapathError::Read { name, source })?;
        if (info.key_size(), info.value_size()) != (layout.key, layout.value) {
            return Err(DatapathError::PinnedLayout {
                path,
                found_key: info.key_size(),
                found_value: info.value_size(),
                key: layout.key,
                value: layout.value,
            });
        }
    }
    Ok(())
}

/// Pins a link at `path`; the pin keeps it attached after the daemon exits.
fn pin_link(link: FdLink, path: &Path) -> Result<(), DatapathError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DatapathError::Pin { path: dir.to_path_buf(), source })?;
    }
    link.pin(path).map_err(|error| DatapathError::Pin {
        path: path.to_path_buf(),
        source: std::io::Error::other(error.to_string()),
    })?;
    Ok(())
}

/// Removes everything pinned under `root`: links first (each detached
/// before its pin goes), then the maps. Returns what was removed.
pub fn uninstall(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for dir in ["links", "maps"] {
        let dir = root.join(dir);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            if dir.ends_with("links") {
                pins::detach_and_unpin(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
            removed.push(path);
        }
        std::fs::remove_dir(&dir)?;
    }
    if root.exists() {
        std::fs::remove_dir(root)?;
    }
    Ok(removed)
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

/// Drops counted for one (source, destination) identity-name pair.
type PairCount = ((String, String), u64);

/// Decisions counted for one rule (name, action).
type RuleCount = ((String, Action), u64);

impl Slot {
    fn new(index: usize) -> Self {
        Self {
            rule_table: Vec::new(),
            identities: StdHashMap::new(),
            rules: StdHashMap::new(),
            compiled_identities: StdHashMap::new(),
            atom_names: StdHashMap::new(),
            index,
        }
    }

    fn verdict_index(&self, rule: usize) -> u32 {
        rule_counter_index(self.index, u32::try_from(rule).unwrap_or(u32::MAX))
    }

    /// The rules of this slot whose decision counters moved: (position in
    /// the rule table, decisions summed over CPUs).
    fn moved_rule_counters(&self, maps: &PolicyMaps) -> Result<Vec<(usize, u64)>, DatapathError> {
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
    fn read_rule_verdicts(&self, maps: &PolicyMaps) -> Result<Vec<RuleCount>, DatapathError> {
        let moved = self.moved_rule_counters(maps)?;
        Ok(moved.into_iter().map(|(index, count)| (self.rule_table[index].clone(), count)).collect())
    }

    /// Reads and zeroes this slot's rule decisions. Only counters that
    /// moved are written: a policy of 100k rules mostly has idle ones.
    fn take_rule_verdicts(&mut self, maps: &mut PolicyMaps) -> Result<Vec<RuleCount>, DatapathError> {
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
    fn sync_policy(
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
    fn sync_identities(&mut self, maps: &mut PolicyMaps, hosts: &BTreeSet<IpAddr>) -> Result<(), DatapathError> {
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
    fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
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
    fn write_policy_prefix(
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
    fn write_identity_prefix(
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
