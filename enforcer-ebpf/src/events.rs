//! Drop and audit events, rate-limited per CPU so a flood of drops cannot
//! flood the ring (or whatever reads it). Everything not reported is counted.

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use enforcer_common::{
    CONFIG_INDEX, Direction, DropReason, EVENTS_PER_SECOND, Event, IdentityPairKey, StateError, slot_of,
};

use crate::identity;
use crate::maps::{CONFIG, EVENT_BUDGET, EVENTS, IDENTITY_DROPS};
use crate::parse::Packet;

const SECOND_NS: u64 = 1_000_000_000;

/// Takes one token from this CPU's bucket; false if it is empty.
#[inline(always)]
fn take_token(now: u64) -> bool {
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else { return false };
    // SAFETY: per-CPU slot, so no other writer runs concurrently.
    let budget = unsafe { &mut *budget };
    let elapsed = now.saturating_sub(budget.refilled_ns);
    if elapsed >= SECOND_NS / EVENTS_PER_SECOND {
        let earned = elapsed / (SECOND_NS / EVENTS_PER_SECOND);
        budget.tokens =
            if budget.tokens + earned > EVENTS_PER_SECOND { EVENTS_PER_SECOND } else { budget.tokens + earned };
        budget.refilled_ns = now;
    }
    if budget.tokens == 0 {
        return false;
    }
    budget.tokens -= 1;
    true
}

/// [`IdentityPairKey::slot`] of a pair the verdict was reached without:
/// [`report`] looks the identities up itself.
pub const PAIR_UNKNOWN: u32 = u32::MAX;

/// Counts a drop against its (source, destination) identity pair. Not rate
/// limited: these counters back `bulkhead_identity_drops_total`.
#[inline(always)]
fn count_pair(packet: &Packet, known: &IdentityPairKey) {
    let key = if known.slot == PAIR_UNKNOWN {
        let slot = slot_of(CONFIG.get(CONFIG_INDEX).map_or(0, |c| c.policy_generation));
        let flow = &packet.flow;
        IdentityPairKey {
            slot: slot as u32,
            src: identity::lookup(slot, flow.family, &flow.src_addr).id,
            dst: identity::lookup(slot, flow.family, &flow.dst_addr).id,
        }
    } else {
        *known
    };
    if increment(&key) {
        return;
    }
    // Only if the pair is new: another CPU adding it at the same moment
    // makes this insert fail, and the drop is counted on that CPU's entry.
    if IDENTITY_DROPS.insert(&key, &1u64, u64::from(BPF_NOEXIST)).is_err() && !increment(&key) {
        crate::metrics::count_state_error(StateError::IdentityDrops);
    }
}

/// Adds one to this CPU's count for `key`; false if the pair has no entry.
#[inline(always)]
fn increment(key: &IdentityPairKey) -> bool {
    let Some(count) = IDENTITY_DROPS.get_ptr_mut(key) else { return false };
    // SAFETY: per-CPU value, so no other writer runs concurrently.
    unsafe { *count += 1 };
    true
}

/// The event describing a dropped (`audit == false`) or audited packet.
#[inline(always)]
fn describe(packet: &Packet, direction: Direction, reason: DropReason, audit: bool, ifindex: u32) -> Event {
    Event {
        // Events need CLOCK_MONOTONIC, which the daemon turns into wall-clock
        // time; only drops and audits pay for this helper call.
        // SAFETY: a plain helper call with no arguments.
        time_ns: unsafe { bpf_ktime_get_coarse_ns() },
        src_addr: packet.flow.src_addr,
        dst_addr: packet.flow.dst_addr,
        src_port: packet.flow.src_port,
        dst_port: packet.policy_port,
        ifindex,
        reason: reason as u32,
        verdict: if audit { enforcer_common::EVENT_AUDIT } else { enforcer_common::EVENT_DROP },
        direction: direction as u8,
        protocol: packet.flow.protocol,
        family: packet.flow.family,
        padding: 0,
    }
}

/// What a drop or audit event needs besides the packet.
pub struct Judged {
    pub direction: Direction,
    pub reason: DropReason,
    /// An audit (the packet passes) rather than a drop.
    pub audit: bool,
    pub ifindex: u32,
}

/// Counts a drop against its identity pair (`pair`, as the verdict found
/// it, saves looking the addresses up again) and reports an event within
/// this CPU's budget. The event is built only once a token is taken: in a
/// flood, most drops are over budget and pay for neither the clock nor the
/// copy. Inlined: a call to a subprogram cost every drop 6–10 ns (measured
/// beside the inlined build at 100k identities), and the inlined programs
/// still pass the verifier with room (tests load all three on every run).
/// `now` is the packet clock, which the budget is kept in.
#[inline(always)]
pub fn report(packet: &Packet, judged: &Judged, pair: &IdentityPairKey, now: u64) {
    if !judged.audit {
        count_pair(packet, pair);
    }
    if !take_token(now) {
        crate::metrics::count_state_error(StateError::EventsRateLimited);
        return;
    }
    let event = describe(packet, judged.direction, judged.reason, judged.audit, judged.ifindex);
    if EVENTS.output::<Event>(&event, 0).is_err() {
        crate::metrics::count_state_error(StateError::EventsRingFull);
    }
}
