//! The kernel side as the daemon sees it: loads the programs, attaches them,
//! keeps the maps in step with the compiled policy and the node's addresses,
//! and reads the counters.

use std::collections::{BTreeSet, HashMap as StdHashMap};
use std::net::IpAddr;
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray};
use aya::programs::tc::{self, SchedClassifierLinkId, TcAttachType};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{ProgramError, SchedClassifier, Xdp, XdpMode};
use aya::{Ebpf, EbpfError};
use enforcer_common::{
    CONFIG_FLAG_AUDIT, CONFIG_INDEX, Config, Counter, Direction, DropReason, FlowKey, FlowValue, FragmentKey,
    FragmentValue, IDENTITY_HOST, IdentityValue, PolicyKeyData, PolicyValue, drop_counter_index, maps,
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
    identity_v4_exact: HashMap<MapData, [u8; 4], IdentityValue>,
    identity_v4_prefix: LpmTrie<MapData, [u8; 4], IdentityValue>,
    identity_v6_exact: HashMap<MapData, [u8; 16], IdentityValue>,
    identity_v6_prefix: LpmTrie<MapData, [u8; 16], IdentityValue>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyValue>,
    config: Array<MapData, Config>,
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    fragments: HashMap<MapData, FragmentKey, FragmentValue>,
    drop_counters: PerCpuArray<MapData, Counter>,
    audit_counters: PerCpuArray<MapData, Counter>,
    forward_counters: PerCpuArray<MapData, Counter>,
    /// What the identity maps hold now.
    identities: StdHashMap<IpNet, IdentityValue>,
    /// What the policy trie holds now.
    rules: StdHashMap<(u32, PolicyKeyData), PolicyValue>,
    /// The compiled policy's identity entries, before host addresses overlay them.
    compiled_identities: StdHashMap<IpNet, IdentityValue>,
    host_addresses: BTreeSet<IpAddr>,
    config_value: Config,
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
    /// Loads the object and verifies both programs; attaches nothing.
    pub fn load() -> Result<Self, DatapathError> {
        let mut ebpf = Ebpf::load(PROGRAM).map_err(DatapathError::Load)?;
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
            identity_v4_exact: take(&mut ebpf, maps::IDENTITY_V4_EXACT)?,
            identity_v4_prefix: take(&mut ebpf, maps::IDENTITY_V4_PREFIX)?,
            identity_v6_exact: take(&mut ebpf, maps::IDENTITY_V6_EXACT)?,
            identity_v6_prefix: take(&mut ebpf, maps::IDENTITY_V6_PREFIX)?,
            policy: take(&mut ebpf, maps::POLICY)?,
            config: take(&mut ebpf, maps::CONFIG)?,
            conntrack: take(&mut ebpf, maps::CONNTRACK)?,
            fragments: take(&mut ebpf, maps::FRAGMENTS)?,
            drop_counters: take(&mut ebpf, maps::DROP_COUNTERS)?,
            audit_counters: take(&mut ebpf, maps::AUDIT_COUNTERS)?,
            forward_counters: take(&mut ebpf, maps::FORWARD_COUNTERS)?,
            ebpf,
            xdp_links: Vec::new(),
            tc_links: Vec::new(),
            identities: StdHashMap::new(),
            rules: StdHashMap::new(),
            compiled_identities: StdHashMap::new(),
            host_addresses: BTreeSet::new(),
            config_value: Config::default(),
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

    /// Brings the maps to `compiled` and announces it with `generation`, so
    /// tracked flows are judged again on their next packet. Only entries
    /// that differ are written; stale ones are removed afterwards.
    pub fn apply(&mut self, compiled: &CompiledPolicy, generation: u32, audit_all: bool) -> Result<(), DatapathError> {
        self.compiled_identities =
            compiled.identity_entries.iter().map(|e| (e.net, IdentityValue { id: e.id, flags: e.flags })).collect();
        self.sync_identities()?;

        let wanted: StdHashMap<(u32, PolicyKeyData), PolicyValue> =
            compiled.policy_entries.iter().map(|e| ((e.prefix_len, e.key), e.value)).collect();
        for (&(prefix_len, key), value) in &wanted {
            if self.rules.get(&(prefix_len, key)) != Some(value) {
                self.policy.insert(&Key::new(prefix_len, key), *value, 0).map_err(write_error(maps::POLICY))?;
                self.rules.insert((prefix_len, key), *value);
            }
        }
        let stale: Vec<_> = self.rules.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for (prefix_len, key) in stale {
            ignore_missing(self.policy.remove(&Key::new(prefix_len, key))).map_err(write_error(maps::POLICY))?;
            self.rules.remove(&(prefix_len, key));
        }

        self.config_value =
            Config { policy_generation: generation, flags: if audit_all { CONFIG_FLAG_AUDIT } else { 0 } };
        self.config.set(CONFIG_INDEX, self.config_value, 0).map_err(write_error(maps::CONFIG))
    }

    /// Declares the node's own addresses (identity `host`). They override
    /// any policy identity claiming the same single address.
    pub fn set_host_addresses(&mut self, addresses: &BTreeSet<IpAddr>) -> Result<(), DatapathError> {
        self.host_addresses.clone_from(addresses);
        self.sync_identities()
    }

    /// The node's addresses as last declared.
    #[must_use]
    pub fn host_addresses(&self) -> &BTreeSet<IpAddr> {
        &self.host_addresses
    }

    fn sync_identities(&mut self) -> Result<(), DatapathError> {
        let mut wanted = self.compiled_identities.clone();
        for addr in &self.host_addresses {
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
        match net {
            IpNet::V4(n) if n.prefix_len() == 32 => {
                let key = n.addr().octets();
                let result = match value {
                    Some(v) => self.identity_v4_exact.insert(key, v, 0),
                    None => ignore_missing(self.identity_v4_exact.remove(&key)),
                };
                result.map_err(write_error(maps::IDENTITY_V4_EXACT))
            }
            IpNet::V4(n) => {
                let key = Key::new(u32::from(n.prefix_len()), n.addr().octets());
                let result = match value {
                    Some(v) => self.identity_v4_prefix.insert(&key, v, 0),
                    None => ignore_missing(self.identity_v4_prefix.remove(&key)),
                };
                result.map_err(write_error(maps::IDENTITY_V4_PREFIX))
            }
            IpNet::V6(n) if n.prefix_len() == 128 => {
                let key = n.addr().octets();
                let result = match value {
                    Some(v) => self.identity_v6_exact.insert(key, v, 0),
                    None => ignore_missing(self.identity_v6_exact.remove(&key)),
                };
                result.map_err(write_error(maps::IDENTITY_V6_EXACT))
            }
            IpNet::V6(n) => {
                let key = Key::new(u32::from(n.prefix_len()), n.addr().octets());
                let result = match value {
                    Some(v) => self.identity_v6_prefix.insert(&key, v, 0),
                    None => ignore_missing(self.identity_v6_prefix.remove(&key)),
                };
                result.map_err(write_error(maps::IDENTITY_V6_PREFIX))
            }
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
        let (name, fd) = match hook {
            Hook::Ingress => (XDP_PROGRAM, self.xdp()?.fd().map(|fd| fd.as_fd().as_raw_fd())),
            Hook::Egress => (TC_PROGRAM, self.classifier()?.fd().map(|fd| fd.as_fd().as_raw_fd())),
        };
        let fd = fd.map_err(|source| DatapathError::Verify { name, source })?;
        crate::testrun::run(fd, frame, repeat).map_err(|source| DatapathError::TestRun { name, source })
    }
}
