//! The quarantine tries and exemptions in the kernel: the only writer.
//!
//! The tries are pinned with the other maps, so a quarantine holds while
//! the daemon restarts; the daemon's quarantine list (state dir) says which
//! targets they stand for. The kernel looks them up only while
//! `CONFIG_FLAG_QUARANTINE` is set: set before the first entry is written
//! and cleared after the last one is removed, so no packet misses an entry
//! that is there.

use std::collections::BTreeSet;
use std::net::IpAddr;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, IterableMap as _, MapData};
use enforcer_common::{
    CONFIG_FLAG_QUARANTINE, CONFIG_INDEX, FlowKey, FlowValue, QUARANTINE_ENTRIES, QUARANTINE_EXEMPT_ENTRIES,
    QuarantinePrefixV4, QuarantinePrefixV6, maps, quarantine_exempt_key,
};
use ipnet::IpNet;

use super::map_writer::{ignore_missing, write_error};
use super::{Datapath, DatapathError, take};

/// The maps, taken from the object at load.
pub(super) struct QuarantineMaps {
    v4: LpmTrie<MapData, QuarantinePrefixV4, u32>,
    v6: LpmTrie<MapData, QuarantinePrefixV6, u32>,
    exempt: HashMap<MapData, u32, u32>,
}

impl QuarantineMaps {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, DatapathError> {
        Ok(Self {
            v4: take(ebpf, maps::QUARANTINE_V4)?,
            v6: take(ebpf, maps::QUARANTINE_V6)?,
            exempt: take(ebpf, maps::QUARANTINE_EXEMPT)?,
        })
    }

    /// What the tries hold (an earlier daemon's quarantine, after a restart).
    pub(super) fn nets(&self) -> Result<BTreeSet<IpNet>, DatapathError> {
        let read = |name| move |source| DatapathError::Read { name, source };
        let mut nets = BTreeSet::new();
        for key in self.v4.keys() {
            let key = key.map_err(read(maps::QUARANTINE_V4))?;
            if let Ok(net) = IpNet::new(IpAddr::from(key.data()), key.prefix_len() as u8) {
                nets.insert(net);
            }
        }
        for key in self.v6.keys() {
            let key = key.map_err(read(maps::QUARANTINE_V6))?;
            if let Ok(net) = IpNet::new(IpAddr::from(key.data()), key.prefix_len() as u8) {
                nets.insert(net);
            }
        }
        Ok(nets)
    }

    fn insert(&mut self, net: IpNet) -> Result<(), DatapathError> {
        let prefix = u32::from(net.prefix_len());
        match net.network() {
            IpAddr::V4(addr) => {
                self.v4.insert(&Key::new(prefix, addr.octets()), 1, 0).map_err(write_error(maps::QUARANTINE_V4))
            }
            IpAddr::V6(addr) => {
                self.v6.insert(&Key::new(prefix, addr.octets()), 1, 0).map_err(write_error(maps::QUARANTINE_V6))
            }
        }
    }

    fn remove(&mut self, net: IpNet) -> Result<(), DatapathError> {
        let prefix = u32::from(net.prefix_len());
        match net.network() {
            IpAddr::V4(addr) => ignore_missing(self.v4.remove(&Key::new(prefix, addr.octets())))
                .map_err(write_error(maps::QUARANTINE_V4)),
            IpAddr::V6(addr) => ignore_missing(self.v6.remove(&Key::new(prefix, addr.octets())))
                .map_err(write_error(maps::QUARANTINE_V6)),
        }
    }
}

/// What [`Datapath::set_quarantine`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct QuarantineWrite {
    pub added: Vec<IpNet>,
    pub removed: Vec<IpNet>,
    /// Tracked connection entries forgotten because an end is now quarantined.
    pub flows_cut: usize,
}

/// The most addresses and prefixes of one family the kernel can hold.
pub const MAX_QUARANTINED: usize = QUARANTINE_ENTRIES as usize;

/// The most exempt ports.
pub const MAX_QUARANTINE_EXEMPT: usize = QUARANTINE_EXEMPT_ENTRIES as usize;

impl Datapath {
    /// The addresses and prefixes the kernel isolates now.
    pub fn quarantined_nets(&self) -> Result<BTreeSet<IpNet>, DatapathError> {
        self.quarantine.nets()
    }

    /// Makes the kernel isolate exactly `nets` (normalised to their
    /// networks), and forgets every tracked connection one of whose ends
    /// has just been quarantined: once the quarantine is lifted, such a
    /// connection is judged by the policy in force then, like a new one,
    /// instead of resuming on what was admitted before. Refused whole if
    /// either family would exceed the tries' capacity.
    pub fn set_quarantine(&mut self, nets: &BTreeSet<IpNet>) -> Result<QuarantineWrite, DatapathError> {
        let wanted: BTreeSet<IpNet> = nets.iter().map(IpNet::trunc).collect();
        for v4 in [true, false] {
            let count = wanted.iter().filter(|net| matches!(net, IpNet::V4(_)) == v4).count();
            if count > MAX_QUARANTINED {
                return Err(DatapathError::QuarantineFull { count, capacity: MAX_QUARANTINED });
            }
        }
        let held = self.quarantine.nets()?;
        let added: Vec<IpNet> = wanted.difference(&held).copied().collect();
        let removed: Vec<IpNet> = held.difference(&wanted).copied().collect();
        if !wanted.is_empty() {
            self.set_quarantine_flag(true)?;
        }
        for net in &added {
            self.quarantine.insert(*net)?;
        }
        for net in &removed {
            self.quarantine.remove(*net)?;
        }
        if wanted.is_empty() {
            self.set_quarantine_flag(false)?;
        }
        let flows_cut = if added.is_empty() { 0 } else { self.forget_flows_of(&added)? };
        Ok(QuarantineWrite { added, removed, flows_cut })
    }

    /// Makes the node's connections to quarantined addresses on exactly
    /// these (protocol, port) pairs pass (the kernel honours TCP only).
    pub fn set_quarantine_exempt(&mut self, ports: &[(u8, u16)]) -> Result<(), DatapathError> {
        if ports.len() > MAX_QUARANTINE_EXEMPT {
            return Err(DatapathError::QuarantineFull { count: ports.len(), capacity: MAX_QUARANTINE_EXEMPT });
        }
        let wanted: BTreeSet<u32> =
            ports.iter().map(|&(protocol, port)| quarantine_exempt_key(protocol, port)).collect();
        let held: BTreeSet<u32> = self.quarantine.exempt.keys().filter_map(Result::ok).collect();
        for key in wanted.difference(&held) {
            self.quarantine.exempt.insert(key, 1, 0).map_err(write_error(maps::QUARANTINE_EXEMPT))?;
        }
        for key in held.difference(&wanted) {
            ignore_missing(self.quarantine.exempt.remove(key)).map_err(write_error(maps::QUARANTINE_EXEMPT))?;
        }
        Ok(())
    }

    fn set_quarantine_flag(&mut self, on: bool) -> Result<(), DatapathError> {
        self.quarantine_flag = if on { CONFIG_FLAG_QUARANTINE } else { 0 };
        let flags = self.config_value.flags & !CONFIG_FLAG_QUARANTINE | self.quarantine_flag;
        if flags == self.config_value.flags {
            return Ok(());
        }
        self.config_value.flags = flags;
        self.config.set(CONFIG_INDEX, self.config_value, 0).map_err(write_error(maps::CONFIG))
    }

    /// Removes the conntrack entries with an end in `nets`; returns how many.
    fn forget_flows_of(&mut self, nets: &[IpNet]) -> Result<usize, DatapathError> {
        let covered = |flow: &FlowKey| {
            let (src, dst) = flow_addrs(flow);
            nets.iter().any(|net| net.contains(&src) || net.contains(&dst))
        };
        let flows: Vec<FlowKey> = match crate::batch::hash_entries::<FlowKey, FlowValue>(self.conntrack.map()) {
            Ok(entries) => entries.into_iter().map(|(flow, _)| flow).filter(covered).collect(),
            Err(_) => self.conntrack.keys().filter_map(Result::ok).filter(covered).collect(),
        };
        for flow in &flows {
            ignore_missing(self.conntrack.remove(flow)).map_err(write_error(maps::CONNTRACK))?;
        }
        Ok(flows.len())
    }
}

/// A tracked flow's source and destination addresses.
fn flow_addrs(flow: &FlowKey) -> (IpAddr, IpAddr) {
    if flow.family == enforcer_common::FAMILY_IPV4 {
        let v4 = |a: &[u8; 16]| IpAddr::from([a[0], a[1], a[2], a[3]]);
        (v4(&flow.src_addr), v4(&flow.dst_addr))
    } else {
        (IpAddr::from(flow.src_addr), IpAddr::from(flow.dst_addr))
    }
}
