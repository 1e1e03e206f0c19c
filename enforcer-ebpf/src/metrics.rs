//! Per-CPU packet and byte counters: no atomics, no contention; the daemon
//! sums the CPUs when Prometheus scrapes.

use aya_ebpf::maps::PerCpuArray;
use enforcer_common::{
    Counter, Direction, DropReason, RULE_INDEX_OPEN, StateError, drop_counter_index, rule_counter_index,
};

use crate::maps::{AUDIT_COUNTERS, DROP_COUNTERS, FORWARD_COUNTERS, RULE_VERDICTS, STATE_ERRORS};

/// Adds one packet of `bytes` to slot `index` of a per-CPU counter array.
#[inline(always)]
fn add(counters: &PerCpuArray<Counter>, index: u32, bytes: u64) {
    if let Some(counter) = counters.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, so no other writer runs concurrently.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_drop(reason: DropReason, direction: Direction, bytes: u64) {
    add(&DROP_COUNTERS, drop_counter_index(reason, direction), bytes);
}

#[inline(always)]
pub fn count_forward(direction: Direction, bytes: u64) {
    add(&FORWARD_COUNTERS, direction as u32, bytes);
}

#[inline(always)]
pub fn count_audit(reason: DropReason, direction: Direction, bytes: u64) {
    add(&AUDIT_COUNTERS, drop_counter_index(reason, direction), bytes);
}

/// Counts one policy decision made by rule `rule_index` of the slot's policy.
#[inline(always)]
pub fn count_rule(slot: usize, rule_index: u32) {
    // No rule decided, or both ends were open (`RULE_INDEX_OPEN`).
    if rule_index >= RULE_INDEX_OPEN {
        return;
    }
    // A rule index beyond the map (the daemon sizes it) finds no counter.
    if let Some(counter) = RULE_VERDICTS.get_ptr_mut(rule_counter_index(slot, rule_index)) {
        // SAFETY: per-CPU slot, so no other writer runs concurrently.
        unsafe { *counter += 1 };
    }
}

/// Counts a failed state-table insert.
#[inline(always)]
pub fn count_state_error(error: StateError) {
    if let Some(counter) = STATE_ERRORS.get_ptr_mut(error as u32) {
        // SAFETY: per-CPU slot, so no other writer runs concurrently.
        unsafe { *counter += 1 };
    }
}
