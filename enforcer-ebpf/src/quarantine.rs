//! Quarantine: addresses cut off from everything, at the next packet,
//! whatever the policy, the verdict cache or a tracked connection says.
//!
//! Asked before any of those, and only while the daemon's config says some
//! address is quarantined, so a node without a quarantine pays one flag
//! test. Connections are forgotten by the daemon when it quarantines an
//! address, not here: a flood from a quarantined address must not take
//! conntrack's bucket locks packet after packet.
//!
//! The one way through is the exemption the operator configures: the node
//! itself (identity `host`) may open TCP connections to a quarantined
//! address on chosen ports, and hear its replies, so a person can still
//! look inside. Those pass whatever the policy says; the quarantined side
//! cannot open anything, not even from an exempt port.

use aya_ebpf::maps::lpm_trie::Key;
use enforcer_common::{
    Config, FAMILY_IPV4, IDENTITY_HOST, QuarantinePrefixV4, QuarantinePrefixV6, quarantine_exempt_key, slot_of,
};

use crate::maps::{QUARANTINE_EXEMPT, QUARANTINE_V4, QUARANTINE_V6};
use crate::parse::{Kind, PROTO_TCP, Packet, TCP_ACK, TCP_SYN};

#[inline(always)]
fn quarantined(family: u8, addr: &[u8; 16]) -> bool {
    if family == FAMILY_IPV4 {
        let data: QuarantinePrefixV4 = [addr[0], addr[1], addr[2], addr[3]];
        QUARANTINE_V4.get(Key::new(32, data)).is_some()
    } else {
        let data: QuarantinePrefixV6 = *addr;
        QUARANTINE_V6.get(Key::new(128, data)).is_some()
    }
}

/// What the quarantine says of a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Neither end is quarantined: the rest of the verdict decides.
    Clear,
    /// Dropped, reason `quarantine`.
    Isolate,
    /// Management traffic of the node's with a quarantined address on an
    /// exempt port: passes, whatever the policy says.
    Exempt,
}

/// Whether the node may use TCP `port` with a quarantined address.
#[inline(always)]
fn exempt(packet: &Packet, port: u16) -> bool {
    packet.flow.protocol == PROTO_TCP
        && packet.kind == Kind::Trackable
        // SAFETY: plain integers written whole by the daemon.
        && unsafe { QUARANTINE_EXEMPT.get(&quarantine_exempt_key(PROTO_TCP, port)) }.is_some()
}

/// Whether `addr` is one of the node's own addresses.
#[inline(always)]
fn is_node(config: &Config, family: u8, addr: &[u8; 16]) -> bool {
    let slot = slot_of(config.policy_generation);
    crate::identity::lookup(slot, family, addr, crate::identity::WORLD_ID_ONLY).id == IDENTITY_HOST
}

/// A packet entering the node: isolated if its source or destination is
/// quarantined, unless it is a quarantined address answering the node from
/// an exempt port. Answering only: a SYN opening a connection from the
/// quarantined side is isolated, whatever its source port. The node's own
/// addresses are never quarantined, even inside a quarantined prefix (its
/// own address in a pod subnet): asked only of quarantined packets.
#[inline(always)]
pub fn check_ingress(packet: &Packet, config: &Config) -> Check {
    let flow = &packet.flow;
    let src = quarantined(flow.family, &flow.src_addr);
    if quarantined(flow.family, &flow.dst_addr) && !is_node(config, flow.family, &flow.dst_addr) {
        return Check::Isolate;
    }
    if !src {
        return Check::Clear;
    }
    // The node's address is asked last: only a quarantined packet from an
    // exempt port, not the flood a quarantined address may send, pays it.
    let opening = packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if !opening && exempt(packet, flow.src_port) && is_node(config, flow.family, &flow.dst_addr) {
        Check::Exempt
    } else {
        Check::Isolate
    }
}

/// A packet the node itself sends: isolated if its destination is
/// quarantined, unless to an exempt port.
#[inline(always)]
pub fn check_egress(packet: &Packet) -> Check {
    let flow = &packet.flow;
    if !quarantined(flow.family, &flow.dst_addr) {
        Check::Clear
    } else if exempt(packet, flow.dst_port) {
        Check::Exempt
    } else {
        Check::Isolate
    }
}
