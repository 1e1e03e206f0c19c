//! The kernel side as the daemon sees it: loads the programs, attaches them,
//! writes compiled policy into the maps, and reads the counters.

use std::collections::HashMap as StdHashMap;

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::{Ebpf, EbpfError};
use enforcer_common::{
    CONFIG_INDEX, Config, Counter, Direction, DropReason, IdentityValue, PolicyKeyData,
    PolicyValue, drop_counter_index, maps,
};
use ipnet::IpNet;
use policy::CompiledPolicy;

static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead"));
const XDP_PROGRAM: &str = "bulkhead_xdp";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "loading the eBPF object failed: {0}; check that the kernel has BTF and that bulkhead runs as root (or with CAP_BPF and CAP_NET_ADMIN)"
    )]
    Load(#[source] EbpfError),
    #[error(
        "the eBPF object has no {what} `{name}`; the binary is corrupt, rebuild it with `cargo xtask build`"
    )]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("map `{name}` has an unexpected type: {source}")]
    MapType {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the kernel verifier rejected the XDP program: {0}")]
    Verify(#[source] ProgramError),
    #[error(
        "attaching XDP to interface `{interface}` failed: {source}; check that the interface exists (`ip link`) and has no other XDP program"
    )]
    Attach {
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
}

/// Loaded programs and the maps the daemon writes or reads.
pub struct Datapath {
    ebpf: Ebpf,
    links: Vec<(String, XdpLinkId)>,
    identity_v4_exact: HashMap<MapData, [u8; 4], IdentityValue>,
    identity_v4_prefix: LpmTrie<MapData, [u8; 4], IdentityValue>,
    identity_v6_exact: HashMap<MapData, [u8; 16], IdentityValue>,
    identity_v6_prefix: LpmTrie<MapData, [u8; 16], IdentityValue>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyValue>,
    config: Array<MapData, Config>,
    drop_counters: PerCpuArray<MapData, Counter>,
    forward_counters: PerCpuArray<MapData, Counter>,
}

/// Counter totals summed over CPUs.
#[derive(Debug, Clone, Default)]
pub struct CounterSnapshot {
    pub drops: StdHashMap<(DropReason, Direction), Counter>,
    pub forwards: StdHashMap<Direction, Counter>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::Missing { what: "map", name })?;
    T::try_from(map).map_err(|source| DatapathError::MapType { name, source })
}

impl Datapath {
    /// Loads the object and verifies the programs; attaches nothing.
    pub fn load() -> Result<Self, DatapathError> {
        let mut ebpf = Ebpf::load(PROGRAM).map_err(DatapathError::Load)?;
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or(DatapathError::Missing {
                what: "program",
                name: XDP_PROGRAM,
            })?
            .try_into()
            .map_err(DatapathError::Verify)?;
        program.load().map_err(DatapathError::Verify)?;
        Ok(Self {
            identity_v4_exact: take(&mut ebpf, maps::IDENTITY_V4_EXACT)?,
            identity_v4_prefix: take(&mut ebpf, maps::IDENTITY_V4_PREFIX)?,
            identity_v6_exact: take(&mut ebpf, maps::IDENTITY_V6_EXACT)?,
            identity_v6_prefix: take(&mut ebpf, maps::IDENTITY_V6_PREFIX)?,
            policy: take(&mut ebpf, maps::POLICY)?,
            config: take(&mut ebpf, maps::CONFIG)?,
            drop_counters: take(&mut ebpf, maps::DROP_COUNTERS)?,
            forward_counters: take(&mut ebpf, maps::FORWARD_COUNTERS)?,
            ebpf,
            links: Vec::new(),
        })
    }

    /// Attaches XDP to `interface`, letting the kernel pick native mode where
    /// the driver has it.
    pub fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or(DatapathError::Missing {
                what: "program",
                name: XDP_PROGRAM,
            })?
            .try_into()
            .map_err(DatapathError::Verify)?;
        let link = program
            .attach(interface, XdpMode::Default)
            .map_err(|source| DatapathError::Attach {
                interface: interface.to_owned(),
                source,
            })?;
        self.links.push((interface.to_owned(), link));
        Ok(())
    }

    /// Interfaces the program is attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.links.iter().map(|(name, _)| name.as_str())
    }

    /// Writes a compiled policy and announces it with `generation`, so that
    /// tracked flows are judged again on their next packet.
    pub fn apply(
        &mut self,
        compiled: &CompiledPolicy,
        generation: u32,
    ) -> Result<(), DatapathError> {
        let write = |name| move |source| DatapathError::Write { name, source };
        for entry in &compiled.identity_entries {
            let value = IdentityValue {
                id: entry.id,
                flags: 0,
            };
            match entry.net {
                IpNet::V4(net) if net.prefix_len() == 32 => self
                    .identity_v4_exact
                    .insert(net.addr().octets(), value, 0)
                    .map_err(write(maps::IDENTITY_V4_EXACT))?,
                IpNet::V4(net) => self
                    .identity_v4_prefix
                    .insert(
                        &Key::new(u32::from(net.prefix_len()), net.addr().octets()),
                        value,
                        0,
                    )
                    .map_err(write(maps::IDENTITY_V4_PREFIX))?,
                IpNet::V6(net) if net.prefix_len() == 128 => self
                    .identity_v6_exact
                    .insert(net.addr().octets(), value, 0)
                    .map_err(write(maps::IDENTITY_V6_EXACT))?,
                IpNet::V6(net) => self
                    .identity_v6_prefix
                    .insert(
                        &Key::new(u32::from(net.prefix_len()), net.addr().octets()),
                        value,
                        0,
                    )
                    .map_err(write(maps::IDENTITY_V6_PREFIX))?,
            }
        }
        for entry in &compiled.policy_entries {
            self.policy
                .insert(&Key::new(entry.prefix_len, entry.key), entry.value, 0)
                .map_err(write(maps::POLICY))?;
        }
        let config = Config {
            policy_generation: generation,
            flags: 0,
        };
        self.config
            .set(CONFIG_INDEX, config, 0)
            .map_err(write(maps::CONFIG))?;
        Ok(())
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<CounterSnapshot, DatapathError> {
        let sum = |map: &PerCpuArray<MapData, Counter>, index: u32, name| {
            let values = map
                .get(&index, 0)
                .map_err(|source| DatapathError::Read { name, source })?;
            Ok::<_, DatapathError>(values.iter().fold(Counter::default(), |total, c| Counter {
                packets: total.packets + c.packets,
                bytes: total.bytes + c.bytes,
            }))
        };
        let mut snapshot = CounterSnapshot::default();
        for direction in Direction::ALL {
            for reason in DropReason::ALL {
                let counter = sum(
                    &self.drop_counters,
                    drop_counter_index(reason, direction),
                    maps::DROP_COUNTERS,
                )?;
                snapshot.drops.insert((reason, direction), counter);
            }
            let counter = sum(
                &self.forward_counters,
                direction as u32,
                maps::FORWARD_COUNTERS,
            )?;
            snapshot.forwards.insert(direction, counter);
        }
        Ok(snapshot)
    }
}
