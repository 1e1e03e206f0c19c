//! Small changes written into the policy slot the kernel is reading, so
//! that changes coming back to back need not wait for the readers of the
//! other slot to be gone (an RCU grace period, about 30 ms here).
//!
//! A packet reads at most two identity entries (source, destination; one
//! when they are the same address) and then one policy entry (the exact
//! hash, then the trie on a miss; the compiler makes the entries covering a
//! packet disjoint). A change is written in place only if every order in
//! which a packet's reads can meet its writes gives the packet the verdict
//! of the policy before or the policy after, never a mix:
//!
//! - **Policy entries** go first: additions, then updates, then deletions.
//!   A packet's covering entry is then always its old one or its new one:
//!   a more specific new entry is there before the old one it shadows is
//!   changed, and an old entry leaves only once everything new is there.
//! - **At most one identity entry** changes, for one whole address (not the
//!   node's own), and it is written last: before it, the address's packets
//!   are judged under its old identity, whose policy entries the change may
//!   not touch; after it, under its new one, whose entries are complete.
//!   Changing two could let one packet see one new and one old.
//! - **Entries of identities that vanish** are deleted one grace period
//!   later, as are the counters of rules that leave harvested: until then a
//!   packet that read the old identity may still look them up or count
//!   under them. The engine hands none of their numbers out again until
//!   they are released ([`Datapath::take_released_numbers`]), so nothing new can
//!   meet them on the way.
//! - The change ends with the generation moved on by two, which keeps the
//!   slot: tracked flows and cached verdicts are judged again at their next
//!   packet, as after a switch. The other slot receives the change with its
//!   next write.
//!
//! Anything else (more identity entries, a rule that keeps its number but
//! changes, an atom that changes owner, too little room for the entries on
//! their way out) takes the switch of slots. So does a change whose write
//! fails midway: the switch then carries the whole change, and the slot
//! left half-written is read back and brought in step when next written.

use std::collections::HashSet;
use std::thread::JoinHandle;

use enforcer_common::{IdentityId, PolicyKeyData, slot_of};
use policy::engine::Name;
use policy::{Engine, EntryDiff};

use super::map_writer::{SlotWrites, fall_back, quiesce_in_background};
use super::{Datapath, DatapathError};
use crate::quiesce::QuiesceError;

/// What a change written in place leaves to be done one grace period later.
pub(super) struct Retired {
    /// Order in which it was queued.
    seq: u64,
    slot: usize,
    /// Policy entries of vanished identities, to delete.
    policy: Vec<(u32, PolicyKeyData)>,
    /// Rule numbers that left: counters to harvest, table entries to clear.
    rules: Vec<u32>,
    /// Numbers of vanished identities: pair counts to harvest, names to forget.
    atoms: Vec<IdentityId>,
    /// Whether the engine still holds these numbers back for this work
    /// (a switch of slots releases them sooner: see [`Datapath::released_by_switch`]).
    numbers_held: bool,
}

/// Work queued by changes written in place, and the wait that makes it safe.
#[derive(Default)]
pub(super) struct Retiring {
    queued: Vec<Retired>,
    next_seq: u64,
    /// The running wait, and the first sequence number it does not cover.
    waiting: Option<(JoinHandle<Result<(), QuiesceError>>, u64)>,
    /// Everything queued before this sequence number is safe to do.
    safe_before: u64,
    /// Atom and rule numbers the engine may hand out again.
    released: (Vec<IdentityId>, Vec<u32>),
    /// Changes written in place.
    written: u64,
}

/// How a change will be written in place.
pub(super) struct Plan {
    /// Deletions left for later (their keys).
    deferred: HashSet<(u32, PolicyKeyData)>,
    vanished: Vec<IdentityId>,
    rules_leaving: Vec<u32>,
}

fn ids_of(key: &PolicyKeyData) -> (IdentityId, IdentityId) {
    (u32::from_be_bytes(key.src_identity), u32::from_be_bytes(key.dst_identity))
}

impl Datapath {
    /// Whether `diff` can be written into the live slot (see the module
    /// documentation), and how.
    pub(super) fn in_place_plan(&self, diff: &EntryDiff, state: &Engine) -> Option<Plan> {
        let generation = self.config_value.policy_generation;
        let live = &self.slots[slot_of(generation)];
        // Without numbers held, a freed number could come back while its
        // old entries and counters are still in the live slot.
        if generation == 0
            || !state.holds_freed_numbers()
            || !live.in_step
            || !live.behind.is_empty()
            || diff.identities.len() > 1
        {
            return None;
        }
        let mut vanished = Vec::new();
        for delta in &diff.atoms {
            match (&delta.old, &delta.new) {
                (Some(_), None) => vanished.push(delta.key),
                (Some(_), Some(_)) => return None,
                (None, _) => {}
            }
        }
        // A rule number the live slot has not yet harvested the counters of
        // can come back only when the rule map is full (see
        // `Engine::hold_freed_numbers`): then the switch waits instead.
        let live_index = slot_of(generation);
        let harvesting =
            |rule: u32| self.retiring.queued.iter().any(|r| r.slot == live_index && r.rules.contains(&rule));
        if diff.rules.iter().any(|delta| delta.old.is_some() && delta.new.is_some() || harvesting(delta.key)) {
            return None;
        }
        let moved_from = match diff.identities.first() {
            None => None,
            Some(delta) => {
                let net = delta.key;
                if net.prefix_len() != net.max_prefix_len() || self.host_addresses.contains(&net.addr()) {
                    return None;
                }
                Some(delta.old.unwrap_or_else(|| state.enclosing_identity(net)).id)
            }
        };
        let mut deferred = HashSet::new();
        for delta in &diff.policy {
            let (src, dst) = ids_of(&delta.key.1);
            if delta.new.is_none() && (vanished.contains(&src) || vanished.contains(&dst)) {
                deferred.insert(delta.key);
            } else if moved_from.is_some_and(|id| id == src || id == dst) {
                return None;
            }
        }
        // Room for the entries on their way out beside the new ones.
        let lingering: usize = self.retiring.queued.iter().map(|r| r.policy.len()).sum::<usize>()
            + diff.policy.iter().filter(|d| d.new.is_none()).count();
        let mut counts = state.counts();
        counts.policy_exact = counts.policy_exact.saturating_add(u32::try_from(lingering).ok()?);
        counts.identity_v4_exact += 1;
        counts.identity_v6_exact += 1;
        self.check_capacity(counts).ok()?;
        let rules_leaving = diff.rules.iter().filter(|d| d.new.is_none()).map(|d| d.key).collect();
        Some(Plan { deferred, vanished, rules_leaving })
    }

    /// Writes `diff` into the live slot as `plan` says, then moves the
    /// generation on by two. On an error the live slot is left out of step.
    pub(super) fn write_in_place(
        &mut self,
        diff: &EntryDiff,
        plan: Plan,
        state: &Engine,
        audit_all: bool,
    ) -> Result<u32, DatapathError> {
        let generation = self.config_value.policy_generation.wrapping_add(2);
        let index = slot_of(generation);
        self.slots[index].in_step = false;
        // Names first: whatever is counted from now on can be named.
        for delta in &diff.atoms {
            if let Some(owner) = &delta.new {
                self.slots[index].set_atom_name(delta.key, Some(owner));
            }
        }
        for delta in diff.rules.iter().filter(|d| d.new.is_some()) {
            let rule = delta.new.as_ref().map(|r| (Name::clone(&r.name), r.action));
            self.slots[index].set_rule(delta.key, rule);
        }
        let phase = |wanted: fn(bool, bool) -> bool| SlotWrites {
            identities: Vec::new(),
            policy: diff
                .policy
                .iter()
                .filter(|d| wanted(d.old.is_some(), d.new.is_some()) && !plan.deferred.contains(&d.key))
                .map(|d| (d.key, d.new))
                .collect(),
        };
        let additions = phase(|old, new| !old && new);
        let updates = phase(|old, new| old && new);
        let deletions = phase(|old, new| old && !new);
        for writes in [additions, updates, deletions] {
            if !writes.policy.is_empty() {
                self.maps.write_slot(index, &writes, Some(&self.host_addresses))?;
            }
        }
        let identity =
            SlotWrites { identities: diff.identities.iter().map(|d| (d.key, d.new)).collect(), policy: Vec::new() };
        self.maps.write_slot(index, &identity, Some(&self.host_addresses))?;
        self.publish(generation, audit_all, state)?;
        self.slots[index].in_step = true;
        let other = &mut self.slots[1 - index];
        other.behind = std::mem::take(&mut other.behind).then(diff);
        if !plan.deferred.is_empty() || !plan.rules_leaving.is_empty() || !plan.vanished.is_empty() {
            let seq = self.retiring.next_seq;
            self.retiring.next_seq += 1;
            self.retiring.queued.push(Retired {
                seq,
                slot: index,
                policy: plan.deferred.into_iter().collect(),
                rules: plan.rules_leaving,
                atoms: plan.vanished,
                numbers_held: true,
            });
        }
        self.retiring.written += 1;
        self.settle_retired(None);
        Ok(generation)
    }

    /// How many changes were written in place so far.
    #[must_use]
    pub fn changes_in_place(&self) -> u64 {
        self.retiring.written
    }

    /// Does the queued work whose wait is over, and starts a wait for the
    /// rest. With `slot`, first does all of that slot's work regardless:
    /// for a caller that knows no program run reads the slot any more.
    ///
    /// Work that fails leaves its slot out of step: the slot is then read
    /// back and brought in step whole before it is read again (entries
    /// left behind deleted, counters harvested), and until then no change
    /// is written into it in place.
    pub(super) fn settle_retired(&mut self, slot: Option<usize>) {
        if let Some((handle, covers)) = self.retiring.waiting.take_if(|(handle, _)| handle.is_finished()) {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => fall_back(&error.to_string()),
                Err(_) => fall_back("the thread waiting for in-flight BPF programs panicked"),
            }
            self.retiring.safe_before = covers;
        }
        let safe_before = self.retiring.safe_before;
        let (ready, waiting): (Vec<Retired>, Vec<Retired>) = std::mem::take(&mut self.retiring.queued)
            .into_iter()
            .partition(|r| r.seq < safe_before || Some(r.slot) == slot);
        self.retiring.queued = waiting;
        for retired in ready {
            let index = retired.slot;
            if let Err(error) = self.retire(retired) {
                log::warn!(
                    "finishing a change written into policy slot {index} failed ({error}); the slot will be rewritten whole"
                );
                self.slots[index].in_step = false;
            }
        }
        if self.retiring.waiting.is_none() && !self.retiring.queued.is_empty() {
            let covers = self.retiring.next_seq;
            self.retiring.waiting = quiesce_in_background(&self.barrier).map(|handle| (handle, covers));
            if self.retiring.waiting.is_none() {
                // The wait ran here, in the calling thread.
                self.retiring.safe_before = covers;
            }
        }
    }

    /// Does the work changes written in place left, once its wait is over
    /// (call it now and then: the work is otherwise done by the next change).
    pub fn settle_changes_in_place(&mut self) {
        self.settle_retired(None);
    }

    /// The atom and rule numbers freed by earlier changes that nothing in
    /// the maps can refer to any more: the engine may hand them out again
    /// (see `Engine::hold_freed_numbers`).
    pub fn take_released_numbers(&mut self) -> (Vec<IdentityId>, Vec<u32>) {
        std::mem::take(&mut self.retiring.released)
    }

    /// After a switch of slots: the numbers `diff` freed, and those of the
    /// work still queued, are free in the slot now read, which the switch
    /// wrote whole, and no packet reads the other one, which is brought in
    /// step (its queued work done first) before it is read again.
    pub(super) fn released_by_switch(&mut self, diff: &EntryDiff) {
        let released = &mut self.retiring.released;
        released.0.extend(diff.atoms.iter().filter(|d| d.new.is_none()).map(|d| d.key));
        released.1.extend(diff.rules.iter().filter(|d| d.new.is_none()).map(|d| d.key));
        for retired in self.retiring.queued.iter_mut().filter(|r| r.numbers_held) {
            retired.numbers_held = false;
            released.0.extend(&retired.atoms);
            released.1.extend(&retired.rules);
        }
    }

    fn retire(&mut self, retired: Retired) -> Result<(), DatapathError> {
        let Retired { slot, policy, rules, atoms, numbers_held, .. } = retired;
        let writes = SlotWrites { identities: Vec::new(), policy: policy.into_iter().map(|key| (key, None)).collect() };
        self.maps.write_slot(slot, &writes, None)?;
        for (rule, count) in self.slots[slot].take_rule_verdicts(&mut self.maps, rules.iter().copied())? {
            *self.harvested_rules.entry(rule).or_default() += count;
        }
        for &rule in &rules {
            self.slots[slot].set_rule(rule, None);
        }
        let vanished: HashSet<IdentityId> = atoms.iter().copied().collect();
        let taken = self.pairs.harvest_atoms(slot, &vanished)?;
        for (pair, count) in self.named_pairs(slot, taken) {
            *self.harvested_pairs.entry(pair).or_default() += count;
        }
        for atom in &atoms {
            self.slots[slot].set_atom_name(*atom, None);
        }
        if numbers_held {
            self.retiring.released.0.extend(atoms);
            self.retiring.released.1.extend(rules);
        }
        Ok(())
    }
}
