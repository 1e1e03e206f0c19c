//! Connection tracking. Each connection has two entries, one per direction,
//! keyed by the tuple the packet itself carries, so every packet costs one
//! lookup. A reply entry admits the responder's packets; an original entry
//! only caches the policy's answer for the originator until the policy
//! generation changes, which is how a revoked rule reaches live flows.

use enforcer_common::{
    Direction, DropReason, FLOW_ORIGINAL, FLOW_REPLY, FlowKey, FlowValue, NO_AUDIT, StateError, TCP_STATE_CLOSING,
    TCP_STATE_ESTABLISHED, TCP_STATE_OPENING, timeouts,
};

use crate::maps::CONNTRACK;
use crate::parse::{PROTO_TCP, PROTO_UDP, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

pub enum Hit {
    /// The packet belongs to a live connection and passes. `settled`: the
    /// lookup changed nothing but the entry's clock (an established TCP
    /// connection, or another protocol), so the flow cache may stand for it.
    Pass { settled: bool },
    /// The packet belongs to a connection only audit mode let through: it
    /// passes and is counted as audited with the policy's reason.
    Audit(DropReason),
    /// No entry: the policy decides, and a denial has nothing to forget.
    Miss,
    /// An entry too old, from another policy generation or for the other
    /// hook: the policy decides, and a denial forgets the connection.
    Stale,
}

#[inline(always)]
fn timeout(protocol: u8, tcp_state: u32) -> u64 {
    match protocol {
        PROTO_TCP => match tcp_state {
            TCP_STATE_ESTABLISHED => timeouts::TCP_ESTABLISHED_NS,
            TCP_STATE_CLOSING => timeouts::TCP_CLOSING_NS,
            _ => timeouts::TCP_OPENING_NS,
        },
        PROTO_UDP => timeouts::UDP_NS,
        _ => timeouts::ICMP_NS,
    }
}

#[inline(always)]
fn tcp_state_after(current: u32, flags: u8) -> u32 {
    if flags & (TCP_FIN | TCP_RST) != 0 {
        TCP_STATE_CLOSING
    } else if current == TCP_STATE_OPENING && flags & TCP_ACK != 0 && flags & TCP_SYN == 0 {
        TCP_STATE_ESTABLISHED
    } else {
        current
    }
}

/// Looks the packet's tuple up and, on a hit, refreshes the entry.
#[inline(always)]
pub fn lookup(packet: &Packet, direction: Direction, generation: u32, now: u64) -> Hit {
    let Some(entry) = CONNTRACK.get_ptr_mut(&packet.flow) else {
        return Hit::Miss;
    };
    // SAFETY: the entry pointer is valid for this program run; concurrent
    // updates of these plain integers can at worst lose a refresh.
    let entry = unsafe { &mut *entry };
    if now.saturating_sub(entry.last_seen_ns) > timeout(packet.flow.protocol, entry.tcp_state) {
        return Hit::Stale;
    }
    if entry.hook != direction as u32 || (entry.direction == FLOW_ORIGINAL && entry.policy_generation != generation) {
        return Hit::Stale;
    }
    entry.last_seen_ns = now;
    let tcp = packet.flow.protocol == PROTO_TCP;
    let hit = match DropReason::from_u32(entry.audit_reason) {
        Some(reason) if entry.direction == FLOW_ORIGINAL => Hit::Audit(reason),
        _ => Hit::Pass { settled: !tcp || entry.tcp_state == TCP_STATE_ESTABLISHED },
    };
    if tcp {
        let state = tcp_state_after(entry.tcp_state, packet.tcp_flags);
        if state != entry.tcp_state {
            entry.tcp_state = state;
            update_peer(&packet.flow, now, Some(state));
            entry.peer_refreshed_ns = now;
            return match hit {
                Hit::Pass { .. } => Hit::Pass { settled: false },
                other => other,
            };
        }
    }
    if now.saturating_sub(entry.peer_refreshed_ns) > timeouts::PEER_REFRESH_NS {
        update_peer(&packet.flow, now, None);
        entry.peer_refreshed_ns = now;
    }
    hit
}

/// Whether `flow` (either direction of it) is a live tracked connection:
/// ICMP errors quoting it pass as related.
#[inline(always)]
pub fn is_tracked(flow: &FlowKey, now: u64) -> bool {
    // SAFETY: values are plain integers; a torn read can only misjudge age.
    match unsafe { CONNTRACK.get(flow) } {
        Some(entry) => now.saturating_sub(entry.last_seen_ns) <= timeout(flow.protocol, entry.tcp_state),
        None => false,
    }
}

#[inline(always)]
fn update_peer(flow: &FlowKey, now: u64, tcp_state: Option<u32>) {
    if let Some(peer) = CONNTRACK.get_ptr_mut(flow.reversed()) {
        // SAFETY: as in `lookup`.
        unsafe {
            (*peer).last_seen_ns = now;
            if let Some(state) = tcp_state {
                (*peer).tcp_state = state;
            }
        }
    }
}

/// Records an allowed connection (or re-admits one under a new generation).
/// `audit_reason` is the policy's drop reason when only audit mode admits it.
/// `hooks` are where the originator's and the replies' packets are seen:
/// replies are seen at egress when the node itself answers.
#[inline(always)]
pub fn admit(
    packet: &Packet,
    hooks: (Direction, Direction),
    generation: u32,
    rule_index: u32,
    audit_reason: Option<DropReason>,
    now: u64,
) {
    let state =
        if packet.flow.protocol == PROTO_TCP { tcp_state_after(TCP_STATE_OPENING, packet.tcp_flags) } else { 0 };
    let original = FlowValue {
        last_seen_ns: now,
        peer_refreshed_ns: now,
        policy_generation: generation,
        direction: FLOW_ORIGINAL,
        tcp_state: state,
        rule_index,
        audit_reason: audit_reason.map_or(NO_AUDIT, |r| r as u32),
        hook: hooks.0 as u32,
    };
    let reply = FlowValue { direction: FLOW_REPLY, audit_reason: NO_AUDIT, hook: hooks.1 as u32, ..original };
    // An LRU map evicts instead of failing when full; an insert can still
    // fail under memory pressure, and then the packet itself still passes
    // (the policy allowed it) but its replies will be judged by policy:
    // counted, so it is never silent.
    if CONNTRACK.insert(&packet.flow, original, 0).is_err()
        || CONNTRACK.insert(packet.flow.reversed(), reply, 0).is_err()
    {
        crate::metrics::count_state_error(StateError::Conntrack);
    }
}

/// Forgets a connection whose originator the policy no longer allows. Only
/// called when the lookup found an entry: deleting takes a bucket lock,
/// which a flood of denied packets with no state must not pay for. (If LRU
/// eviction left only the reply entry, it ages out by its timeout.)
#[inline(always)]
pub fn revoke(packet: &Packet) {
    let _ = CONNTRACK.remove(&packet.flow);
    let _ = CONNTRACK.remove(packet.flow.reversed());
    // After the removal: a CPU that read the old epoch and then still found
    // the entry caches it under the old epoch, which no longer matches.
    crate::flow_cache::invalidate_all();
}
