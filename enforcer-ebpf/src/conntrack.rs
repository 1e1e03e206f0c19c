//! Connection tracking. Each connection has two entries, one per direction,
//! keyed by the tuple the packet itself carries, so every packet costs one
//! lookup. A reply entry admits the responder's packets; an original entry
//! only caches the policy's answer for the originator until the policy
//! generation changes, which is how a revoked rule reaches live flows.

use enforcer_common::{
    FLOW_ORIGINAL, FLOW_REPLY, FlowKey, FlowValue, TCP_STATE_CLOSING, TCP_STATE_ESTABLISHED,
    TCP_STATE_OPENING, timeouts,
};

use crate::maps::CONNTRACK;
use crate::parse::{PROTO_TCP, PROTO_UDP, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

pub enum Hit {
    /// The packet belongs to a live connection and passes.
    Pass,
    /// No usable entry: the policy decides.
    Miss,
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
pub fn lookup(packet: &Packet, generation: u32, now: u64) -> Hit {
    let Some(entry) = CONNTRACK.get_ptr_mut(packet.flow) else {
        return Hit::Miss;
    };
    // SAFETY: the entry pointer is valid for this program run; concurrent
    // updates of these plain integers can at worst lose a refresh.
    let entry = unsafe { &mut *entry };
    if now.saturating_sub(entry.last_seen_ns) > timeout(packet.flow.protocol, entry.tcp_state) {
        return Hit::Miss;
    }
    if entry.direction == FLOW_ORIGINAL && entry.policy_generation != generation {
        return Hit::Miss;
    }
    entry.last_seen_ns = now;
    if packet.flow.protocol == PROTO_TCP {
        let state = tcp_state_after(entry.tcp_state, packet.tcp_flags);
        if state != entry.tcp_state {
            entry.tcp_state = state;
            update_peer(&packet.flow, now, Some(state));
            entry.peer_refreshed_ns = now;
            return Hit::Pass;
        }
    }
    if now.saturating_sub(entry.peer_refreshed_ns) > timeouts::PEER_REFRESH_NS {
        update_peer(&packet.flow, now, None);
        entry.peer_refreshed_ns = now;
    }
    Hit::Pass
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
#[inline(always)]
pub fn admit(packet: &Packet, generation: u32, rule_index: u32, now: u64) {
    let state = if packet.flow.protocol == PROTO_TCP {
        tcp_state_after(TCP_STATE_OPENING, packet.tcp_flags)
    } else {
        0
    };
    let original = FlowValue {
        last_seen_ns: now,
        peer_refreshed_ns: now,
        policy_generation: generation,
        direction: FLOW_ORIGINAL,
        tcp_state: state,
        rule_index,
    };
    let reply = FlowValue {
        direction: FLOW_REPLY,
        ..original
    };
    // An LRU map evicts instead of failing when full; an insert can still
    // fail under memory pressure, and then the packet itself still passes
    // (the policy allowed it) but its replies will be judged by policy.
    let _ = CONNTRACK.insert(packet.flow, original, 0);
    let _ = CONNTRACK.insert(packet.flow.reversed(), reply, 0);
}

/// Forgets a connection whose originator the policy no longer allows.
#[inline(always)]
pub fn revoke(packet: &Packet) {
    let _ = CONNTRACK.remove(packet.flow);
    let _ = CONNTRACK.remove(packet.flow.reversed());
}
