//! Drop and audit events, rate-limited per CPU so a flood of drops cannot
//! flood the ring (or whatever reads it), and admits for the
//! lateral-movement detector, from a bucket of their own. Everything not
//! reported is counted.

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use enforcer_common::{
    CONFIG_INDEX, Direction, DropReason, EVENT_ADMIT, EVENT_BUDGET_ADMITS, EVENTS_PER_SECOND, Event,
    IDENTITY_PAIRS_PER_SLOT, IdentityPairKey, NO_PAIR_INDEX, StateError, slot_of,
};

use crate::identity;
use crate::maps::{CONFIG, EVENT_BUDGET, EVENTS, IDENTITY_PAIRS, PAIR_DROPS, PAIRS_ALLOCATED};
use crate::parse::Packet;

const SECOND_NS: u64 = 1_000_000_000;

/// Takes one token from this CPU's bucket `bucket`; false if it is empty.
#[inline(always)]
fn take_token(bucket: u32, now: u64) -> bool {
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(bucket) else { return false };
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

/// [`Pair::cache_entry`] when the verdict did not involve the verdict cache.
pub const NO_CACHE_ENTRY: u32 = u32::MAX;

/// The identity pair a verdict was reached with, and what is known of
/// where its drops are counted.
pub struct Pair {
    pub key: IdentityPairKey,
    /// The index of its drop count, if the verdict cache knew it; else
    /// [`NO_PAIR_INDEX`].
    pub index: u32,
    /// The verdict cache entry the verdict came from or went into, which
    /// remembers an index found now; else [`NO_CACHE_ENTRY`].
    pub cache_entry: u32,
}

impl Pair {
    pub const UNKNOWN: Self = Self {
        key: IdentityPairKey { slot: PAIR_UNKNOWN, src: 0, dst: 0 },
        index: NO_PAIR_INDEX,
        cache_entry: NO_CACHE_ENTRY,
    };
}

/// Counts a drop against its (source, destination) identity pair. Not rate
/// limited: these counters back `bulkhead_identity_drops_total`. A pair the
/// verdict cache knows costs one per-CPU array increment; otherwise the
/// pair's index is looked up (and handed out on its first drop).
#[inline(always)]
fn count_pair(packet: &Packet, pair: &Pair) {
    if pair.index != NO_PAIR_INDEX {
        increment(pair.index);
        return;
    }
    let key = if pair.key.slot == PAIR_UNKNOWN {
        let slot = slot_of(CONFIG.get(CONFIG_INDEX).map_or(0, |c| c.policy_generation));
        let flow = &packet.flow;
        IdentityPairKey {
            slot: slot as u32,
            src: identity::lookup(slot, flow.family, &flow.src_addr, identity::WORLD_ID_ONLY).id,
            dst: identity::lookup(slot, flow.family, &flow.dst_addr, identity::WORLD_ID_ONLY).id,
        }
    } else {
        pair.key
    };
    // SAFETY: indexes are plain integers written whole.
    let index = match unsafe { IDENTITY_PAIRS.get(&key) } {
        Some(index) => *index,
        None => match file_pair(&key) {
            Some(index) => index,
            None => {
                crate::metrics::count_state_error(StateError::IdentityDrops);
                return;
            }
        },
    };
    increment(index);
    if pair.cache_entry != NO_CACHE_ENTRY {
        crate::cache::remember_pair_index(pair.cache_entry, index);
    }
}

/// Hands a pair seen for the first time the next index of its slot. Two
/// CPUs filing the same pair at once each take an index; the first insert
/// wins and both count there (the other index stays unused). `None` when
/// the slot's indexes are used up.
#[inline(always)]
fn file_pair(key: &IdentityPairKey) -> Option<u32> {
    let allocated = PAIRS_ALLOCATED.get_ptr_mut(key.slot)?;
    // SAFETY: an 8-aligned map value, valid for this program run, shared
    // by all CPUs: taken with an atomic add.
    let taken = unsafe { crate::atomic::fetch_add(allocated, 1) };
    if taken >= u64::from(IDENTITY_PAIRS_PER_SLOT) {
        return None;
    }
    let index = key.slot * IDENTITY_PAIRS_PER_SLOT + taken as u32;
    if IDENTITY_PAIRS.insert(key, &index, u64::from(BPF_NOEXIST)).is_ok() {
        return Some(index);
    }
    // SAFETY: as in `count_pair`.
    unsafe { IDENTITY_PAIRS.get(key) }.copied()
}

/// Adds one to this CPU's count at `index`.
#[inline(always)]
fn increment(index: u32) {
    if let Some(count) = PAIR_DROPS.get_ptr_mut(index) {
        // SAFETY: per-CPU value, so no other writer runs concurrently.
        unsafe { *count += 1 };
    }
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
pub struct Judged<I: Fn() -> u32> {
    pub direction: Direction,
    pub reason: DropReason,
    /// An audit (the packet passes) rather than a drop.
    pub audit: bool,
    /// The interface's index: three dependent loads, made only for an
    /// event that is sent.
    pub ifindex: I,
}

/// Counts a drop against its identity pair (`pair`, as the verdict found
/// it, saves looking the addresses up again, and its index the pair
/// lookup) and reports an event within this CPU's budget. The event is
/// built only once a token is taken: in a flood, most drops are over
/// budget and pay for neither the clock, the interface nor the copy.
/// Inlined: a call to a subprogram cost every drop 6–10 ns (measured
/// beside the inlined build at 100k identities), and the inlined programs
/// still pass the verifier with room (tests load all three on every run).
/// `now` is the packet clock, which the budget is kept in.
#[inline(always)]
pub fn report<I: Fn() -> u32>(packet: &Packet, judged: &Judged<I>, pair: &Pair, now: u64) {
    if !judged.audit {
        count_pair(packet, pair);
    }
    if !take_token(0, now) {
        crate::metrics::count_state_error(StateError::EventsRateLimited);
        return;
    }
    let event = describe(packet, judged.direction, judged.reason, judged.audit, (judged.ifindex)());
    if EVENTS.output::<Event>(&event, 0).is_err() {
        crate::metrics::count_state_error(StateError::EventsRingFull);
    }
}

/// Reports a connection the policy admitted at ingress, for the daemon's
/// lateral-movement detector, within this CPU's admits budget. Only new
/// connections pay for it, and only while the detector runs.
#[inline(always)]
pub fn report_admit(packet: &Packet, now: u64) {
    if !take_token(EVENT_BUDGET_ADMITS, now) {
        crate::metrics::count_state_error(StateError::AdmitsRateLimited);
        return;
    }
    let mut event = describe(packet, Direction::Ingress, DropReason::DefaultDeny, false, 0);
    event.verdict = EVENT_ADMIT;
    if EVENTS.output::<Event>(&event, 0).is_err() {
        crate::metrics::count_state_error(StateError::EventsRingFull);
    }
}
