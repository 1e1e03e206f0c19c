//! Per-CPU packet and byte counters: no atomics, no contention; the daemon
//! sums the CPUs when Prometheus scrapes.

use enforcer_common::{Direction, DropReason, drop_counter_index};

use crate::maps::{AUDIT_COUNTERS, DROP_COUNTERS, FORWARD_COUNTERS};

#[inline(always)]
pub fn count_drop(reason: DropReason, direction: Direction, bytes: u64) {
    if let Some(counter) = DROP_COUNTERS.get_ptr_mut(drop_counter_index(reason, direction)) {
        // SAFETY: per-CPU slot, so no other writer runs concurrently.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_forward(direction: Direction, bytes: u64) {
    if let Some(counter) = FORWARD_COUNTERS.get_ptr_mut(direction as u32) {
        // SAFETY: per-CPU slot, so no other writer runs concurrently.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_audit(reason: DropReason, direction: Direction, bytes: u64) {
    if let Some(counter) = AUDIT_COUNTERS.get_ptr_mut(drop_counter_index(reason, direction)) {
        // SAFETY: per-CPU slot, so no other writer runs concurrently.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}
