//! IP fragments: the first fragment carries the ports and is judged like any
//! packet; its verdict is remembered so the datagram's later fragments,
//! which carry no ports, get the same one.

use enforcer_common::{
    DropReason, FRAGMENT_AUDIT, FRAGMENT_DROP, FRAGMENT_PASS, FragmentKey, FragmentValue, StateError, timeouts,
};

use crate::maps::FRAGMENTS;
use crate::parse::Packet;
use crate::{Action, Verdict};

#[inline(always)]
fn key(packet: &Packet, id: u32) -> FragmentKey {
    FragmentKey {
        src_addr: packet.flow.src_addr,
        dst_addr: packet.flow.dst_addr,
        id,
        protocol: packet.flow.protocol,
        family: packet.flow.family,
        padding: [0; 2],
    }
}

/// Remembers the first fragment's verdict.
#[inline(always)]
pub fn remember(packet: &Packet, id: u32, verdict: Verdict, now: u64) {
    let code = match verdict.action {
        Action::Drop => FRAGMENT_DROP,
        Action::Audit => FRAGMENT_AUDIT,
        Action::Pass | Action::Ignore => FRAGMENT_PASS,
    };
    let value =
        FragmentValue { seen_ns: now, verdict: code, reason: verdict.reason as u32, ..FragmentValue::default() };
    if FRAGMENTS.insert(key(packet, id), value, 0).is_err() {
        crate::metrics::count_state_error(StateError::Fragments);
    }
}

/// The verdict of a later fragment's first fragment, if it was seen recently.
#[inline(always)]
pub fn recall(packet: &Packet, id: u32, now: u64) -> Option<Verdict> {
    // SAFETY: values are plain integers written whole.
    let value = unsafe { FRAGMENTS.get(key(packet, id)) }?;
    if now.saturating_sub(value.seen_ns) > timeouts::FRAGMENT_NS {
        return None;
    }
    let reason = DropReason::from_u32(value.reason).unwrap_or(DropReason::Malformed);
    Some(match value.verdict {
        FRAGMENT_PASS => Verdict::PASS,
        FRAGMENT_AUDIT => Verdict::audit(reason),
        _ => Verdict::drop(reason),
    })
}
