//! Header parsing. Every read is bounds-checked against the frame, and every
//! inconsistency between headers (lengths that do not fit, truncated L4
//! headers) is reported as [`DropReason::Malformed`] rather than guessed at.

use core::mem::size_of;

use enforcer_common::{DropReason, FAMILY_IPV4, FAMILY_IPV6, FlowKey};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
const ETH_HEADER_LEN: usize = 14;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTIONS: u8 = 60;
/// More extension headers than this is not a packet any stack sends.
const MAX_IPV6_EXTENSION_HEADERS: usize = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What kind of packet this is, as far as the verdict logic cares.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Judged by policy; may open a tracked connection if allowed.
    Trackable,
    /// An ICMP echo reply: passes only as the reply of a tracked request.
    EchoReply,
    /// Judged by policy, never tracked (ICMP errors and other types, other protocols).
    Untracked,
    /// IPv6 neighbour discovery with hop limit 255: link-local plumbing that
    /// must pass for IPv6 to work at all.
    NeighbourDiscovery,
}

pub struct Packet {
    /// The packet's own tuple, used as its conntrack key.
    pub flow: FlowKey,
    /// What the policy matches on: destination port for TCP/UDP, `type << 8 | code` for ICMP.
    pub policy_port: u16,
    pub tcp_flags: u8,
    pub kind: Kind,
}

pub enum Parsed {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): passes untouched.
    NotIp,
    Ip(Packet),
    Drop(DropReason),
}

/// The frame as a bounds-checked byte slice.
#[derive(Clone, Copy)]
pub struct Frame {
    pub start: usize,
    pub end: usize,
}

impl Frame {
    /// Pointer to a `T` at `offset`, if the whole `T` is inside the frame.
    #[inline(always)]
    fn at<T>(&self, offset: usize) -> Option<*const T> {
        if self.start + offset + size_of::<T>() > self.end {
            return None;
        }
        Some((self.start + offset) as *const T)
    }

    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        // SAFETY: `at` checked that the N bytes lie inside the frame.
        self.at::<[u8; N]>(offset)
            .map(|p| unsafe { p.read_unaligned() })
    }

    #[inline(always)]
    fn u16_at(&self, offset: usize) -> Option<u16> {
        self.bytes::<2>(offset).map(u16::from_be_bytes)
    }

    pub fn len(&self) -> u64 {
        (self.end - self.start) as u64
    }
}

#[inline(always)]
pub fn parse(frame: &Frame) -> Parsed {
    let Some(ether_type) = frame.u16_at(12) else {
        // Shorter than an Ethernet header: nothing to classify as IP.
        return Parsed::NotIp;
    };
    match ether_type {
        ETH_P_IPV4 => parse_ipv4(frame, ETH_HEADER_LEN),
        ETH_P_IPV6 => parse_ipv6(frame, ETH_HEADER_LEN),
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_ipv4(frame: &Frame, l3: usize) -> Parsed {
    let Some(header) = frame.bytes::<20>(l3) else {
        return Parsed::Drop(DropReason::Malformed);
    };
    let header_len = ((header[0] & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes([header[2], header[3]]) as usize;
    if header[0] >> 4 != 4
        || header_len < 20
        || total_len < header_len
        || l3 + total_len > frame.end - frame.start
    {
        return Parsed::Drop(DropReason::Malformed);
    }
    let fragment = u16::from_be_bytes([header[6], header[7]]);
    if fragment & 0x1fff != 0 {
        return Parsed::Drop(DropReason::FragmentUnknown);
    }
    let mut flow = FlowKey {
        protocol: header[9],
        family: FAMILY_IPV4,
        ..FlowKey::default()
    };
    flow.src_addr[..4].copy_from_slice(&header[12..16]);
    flow.dst_addr[..4].copy_from_slice(&header[16..20]);
    parse_l4(frame, l3 + header_len, l3 + total_len, flow)
}

#[inline(always)]
fn parse_ipv6(frame: &Frame, l3: usize) -> Parsed {
    let Some(header) = frame.bytes::<40>(l3) else {
        return Parsed::Drop(DropReason::Malformed);
    };
    let payload_len = u16::from_be_bytes([header[4], header[5]]) as usize;
    let l3_end = l3 + 40 + payload_len;
    if header[0] >> 4 != 6 || l3_end > frame.end - frame.start {
        return Parsed::Drop(DropReason::Malformed);
    }
    let hop_limit = header[7];
    let mut flow = FlowKey {
        family: FAMILY_IPV6,
        ..FlowKey::default()
    };
    flow.src_addr.copy_from_slice(&header[8..24]);
    flow.dst_addr.copy_from_slice(&header[24..40]);
    let mut next = header[6];
    let mut offset = l3 + 40;
    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        if !matches!(
            next,
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS | IPV6_AUTH | IPV6_FRAGMENT
        ) {
            flow.protocol = next;
            let mut packet = parse_l4(frame, offset, l3_end, flow);
            if let Parsed::Ip(p) = &mut packet {
                let nd_type = (p.policy_port >> 8) as u8;
                if p.flow.protocol == PROTO_ICMPV6
                    && hop_limit == 255
                    && (133..=137).contains(&nd_type)
                {
                    p.kind = Kind::NeighbourDiscovery;
                }
            }
            return packet;
        }
        // Every extension header starts with (next header, length); the
        // fragment header's offset follows. Reading four bytes at once keeps
        // the bounds check in a form the verifier accepts.
        let Some(ext) = frame.bytes::<4>(offset) else {
            return Parsed::Drop(DropReason::Malformed);
        };
        let length = match next {
            IPV6_AUTH => (ext[1] as usize + 2) * 4,
            IPV6_FRAGMENT => {
                if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                    return Parsed::Drop(DropReason::FragmentUnknown);
                }
                8
            }
            _ => (ext[1] as usize + 1) * 8,
        };
        next = ext[0];
        offset += length;
        if offset > l3_end {
            return Parsed::Drop(DropReason::Malformed);
        }
    }
    Parsed::Drop(DropReason::Malformed)
}

/// Reads the transport header at `l4`; `l3_end` is where the IP packet ends
/// by its own length field, which the transport header must fit inside.
#[inline(always)]
fn parse_l4(frame: &Frame, l4: usize, l3_end: usize, mut flow: FlowKey) -> Parsed {
    let mut packet = Packet {
        flow,
        policy_port: 0,
        tcp_flags: 0,
        kind: Kind::Untracked,
    };
    match flow.protocol {
        PROTO_TCP => {
            let Some(tcp) = frame.bytes::<20>(l4) else {
                return Parsed::Drop(DropReason::Malformed);
            };
            let data_offset = ((tcp[12] >> 4) as usize) * 4;
            if data_offset < 20 || l4 + data_offset > l3_end {
                return Parsed::Drop(DropReason::Malformed);
            }
            flow.src_port = u16::from_be_bytes([tcp[0], tcp[1]]);
            flow.dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
            packet.policy_port = flow.dst_port;
            packet.tcp_flags = tcp[13];
            packet.kind = Kind::Trackable;
        }
        PROTO_UDP => {
            let Some(udp) = frame.bytes::<8>(l4) else {
                return Parsed::Drop(DropReason::Malformed);
            };
            if l4 + 8 > l3_end {
                return Parsed::Drop(DropReason::Malformed);
            }
            flow.src_port = u16::from_be_bytes([udp[0], udp[1]]);
            flow.dst_port = u16::from_be_bytes([udp[2], udp[3]]);
            packet.policy_port = flow.dst_port;
            packet.kind = Kind::Trackable;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let Some(icmp) = frame.bytes::<8>(l4) else {
                return Parsed::Drop(DropReason::Malformed);
            };
            if l4 + 8 > l3_end {
                return Parsed::Drop(DropReason::Malformed);
            }
            let (request, reply) = if flow.protocol == PROTO_ICMP {
                (8, 0)
            } else {
                (128, 129)
            };
            let identifier = u16::from_be_bytes([icmp[4], icmp[5]]);
            packet.policy_port = u16::from_be_bytes([icmp[0], icmp[1]]);
            if icmp[0] == request {
                flow.src_port = identifier;
                packet.kind = Kind::Trackable;
            } else if icmp[0] == reply {
                flow.dst_port = identifier;
                packet.kind = Kind::EchoReply;
            }
        }
        _ => {}
    }
    packet.flow = flow;
    Parsed::Ip(packet)
}
