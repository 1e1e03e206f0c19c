//! Drops per identity pair, as the kernel counts them: a hash from pair to
//! index and a per-CPU array of counts at those indexes, one index range
//! per policy slot (see `enforcer_common::IDENTITY_PAIRS_PER_SLOT`).

use std::collections::HashSet;

use aya::Ebpf;
use aya::maps::IterableMap as _;
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use enforcer_common::{IDENTITY_PAIRS_PER_SLOT, IdentityId, IdentityPairKey, maps};

use super::map_writer::{ignore_missing, per_cpu_zeroes, write_error};
use super::{DatapathError, take};
use crate::batch;

pub(super) struct PairCounters {
    index: HashMap<MapData, IdentityPairKey, u32>,
    drops: PerCpuArray<MapData, u64>,
    allocated: Array<MapData, u64>,
}

impl PairCounters {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Ok(Self {
            index: take(ebpf, maps::IDENTITY_PAIRS)?,
            drops: take(ebpf, maps::PAIR_DROPS)?,
            allocated: take(ebpf, maps::PAIRS_ALLOCATED)?,
        })
    }

    /// The indexes of `slot` handed out so far.
    fn used(&self, slot: usize) -> Result<std::ops::Range<u32>, DatapathError> {
        let taken = match self.allocated.get(&(slot as u32), 0) {
            Ok(taken) => taken,
            Err(source) => return Err(DatapathError::Read { name: maps::PAIRS_ALLOCATED, source }),
        };
        let first = slot as u32 * IDENTITY_PAIRS_PER_SLOT;
        Ok(first..first + u32::try_from(taken).unwrap_or(u32::MAX).min(IDENTITY_PAIRS_PER_SLOT))
    }

    /// The pairs filed under `slot`, with their indexes.
    fn filed(&self, slot: usize) -> Result<Vec<(IdentityPairKey, u32)>, DatapathError> {
        let mut filed = batch::hash_entries::<IdentityPairKey, u32>(self.index.map())
            .map_err(|source| DatapathError::Read { name: maps::IDENTITY_PAIRS, source })?;
        filed.retain(|(key, _)| key.slot as usize == slot);
        Ok(filed)
    }

    /// The drops counted for `filed` pairs of a slot whose handed-out
    /// indexes are `used`.
    fn counts(
        &self,
        filed: Vec<(IdentityPairKey, u32)>,
        used: std::ops::Range<u32>,
    ) -> Result<Vec<(IdentityPairKey, u64)>, DatapathError> {
        if used.is_empty() {
            return Ok(Vec::new());
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DatapathError::Cpus(source))?;
        let sums = batch::per_cpu_sums(self.drops.map(), used.clone(), cpus)
            .map_err(|source| DatapathError::Read { name: maps::PAIR_DROPS, source })?;
        Ok(filed
            .into_iter()
            .filter_map(|(key, index)| Some((key, *sums.get(index.checked_sub(used.start)? as usize)?)))
            .collect())
    }

    /// Drops counted under `slot`, by identity pair (numbers of that slot).
    pub(super) fn read(&self, slot: usize) -> Result<Vec<(IdentityPairKey, u64)>, DatapathError> {
        self.counts(self.filed(slot)?, self.used(slot)?)
    }

    /// Reads, then forgets, the pairs of `slot` with a source or destination
    /// in `atoms` (identities gone from the slot, whose numbers are about to
    /// be free). Their indexes stay handed out, counted by no pair, until the
    /// slot is next harvested whole.
    pub(super) fn harvest_atoms(
        &mut self,
        slot: usize,
        atoms: &HashSet<IdentityId>,
    ) -> Result<Vec<(IdentityPairKey, u64)>, DatapathError> {
        if atoms.is_empty() {
            return Ok(Vec::new());
        }
        let filed: Vec<(IdentityPairKey, u32)> = self
            .filed(slot)?
            .into_iter()
            .filter(|(key, _)| atoms.contains(&key.src) || atoms.contains(&key.dst))
            .collect();
        if filed.is_empty() {
            return Ok(Vec::new());
        }
        self.forget(filed, self.used(slot)?)
    }

    /// The drops counted for `filed` pairs (as [`PairCounters::counts`]),
    /// then the pairs themselves forgotten.
    fn forget(
        &mut self,
        filed: Vec<(IdentityPairKey, u32)>,
        used: std::ops::Range<u32>,
    ) -> Result<Vec<(IdentityPairKey, u64)>, DatapathError> {
        let keys: Vec<IdentityPairKey> = filed.iter().map(|(key, _)| *key).collect();
        let counts = self.counts(filed, used)?;
        for key in keys {
            ignore_missing(self.index.remove(&key)).map_err(write_error(maps::IDENTITY_PAIRS))?;
        }
        Ok(counts)
    }

    /// Reads, then forgets, `slot`'s pairs and zeroes their counts, for a
    /// slot about to number its identities anew. Only while no program
    /// reads the slot: its old readers are gone, its new ones not yet
    /// switched to it, so one walk of the pairs serves both.
    pub(super) fn harvest(&mut self, slot: usize) -> Result<Vec<(IdentityPairKey, u64)>, DatapathError> {
        let (filed, used) = (self.filed(slot)?, self.used(slot)?);
        let counts = self.forget(filed, used.clone())?;
        for index in used {
            self.drops.set(index, per_cpu_zeroes()?, 0).map_err(write_error(maps::PAIR_DROPS))?;
        }
        self.allocated.set(slot as u32, 0, 0).map_err(write_error(maps::PAIRS_ALLOCATED))?;
        Ok(counts)
    }
}
