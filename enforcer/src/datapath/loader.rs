//! Loading the object: map sizes, pinned maps and their layout stamps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aya::EbpfLoader;
use aya::programs::{ProgramError, SchedClassifier, Xdp};
use enforcer_common::{Config, DEFAULT_MAX_RULES, maps};

use crate::pins;
use crate::quiesce::ProgramBarrier;

use super::attach::{IngressHook, XdpAttach};
use super::map_writer::{PolicyMaps, Slot, quiesce_in_background};
use super::{
    CALIBRATION_PROGRAM, Datapath, DatapathError, PROGRAM, TC_INGRESS_PROGRAM, TC_PROGRAM, XDP_PROGRAM, program, take,
};

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
            let xdp = program::<Xdp>(&mut ebpf, name)?;
            load_retrying(|| xdp.load()).map_err(verify(name))?;
        }
        for name in [TC_PROGRAM, TC_INGRESS_PROGRAM] {
            let tc = program::<SchedClassifier>(&mut ebpf, name)?;
            load_retrying(|| tc.load()).map_err(verify(name))?;
        }
        let quarantine = super::quarantine::QuarantineMaps::take(&mut ebpf)?;
        // An earlier daemon's quarantine, pinned, holds from the first write.
        let quarantine_flag = if quarantine.nets()?.is_empty() { 0 } else { enforcer_common::CONFIG_FLAG_QUARANTINE };
        Ok(Self {
            quarantine,
            quarantine_flag,
            report_admits: 0,
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
            pairs: super::pairs::PairCounters::take(&mut ebpf)?,
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
            retiring: super::in_place::Retiring::default(),
            generation: 0,
            counts: policy::engine::EntryCounts::default(),
            caches_off: 0,
        })
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

/// Loads a program, again when the kernel gave up with `EAGAIN`: the
/// verifier stops when a signal is pending for the loading thread (a child
/// process exiting, with a `SIGCHLD` handler installed, is enough), and the
/// same program loads on the next attempt. libbpf retries five times too.
fn load_retrying(mut load: impl FnMut() -> Result<(), ProgramError>) -> Result<(), ProgramError> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}
