//! Header parsing. Every read is bounds-checked against the frame, and every
//! inconsistency between headers (lengths that do not fit, truncated or
//! overlapping headers) is reported as [`DropReason::Malformed`] rather than
//! guessed at: a packet is judged by exactly the headers the receiver will see.

use core::mem::size_of;

use enforcer_common::{DropReason, FAMILY_IPV4, FAMILY_IPV6, FlowKey};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const ETH_HEADER_LEN: usize = 14;
/// 802.1ad outer tag plus 802.1Q inner tag (`QinQ`).
const MAX_VLAN_TAGS: usize = 2;

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

/// A later fragment must not start inside the TCP header (RFC 1858): it could
/// rewrite the flags the first fragment was judged by.
const TCP_MIN_HEADER: usize = 20;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What kind of packet this is, as far as the verdict logic cares.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Judged by policy; may open a tracked connection if allowed.
    Trackable,
    /// An ICMP echo reply: passes as the reply of a tracked request, else by policy.
    EchoReply,
    /// An ICMP error quoting another packet (`Packet::quoted`): passes if that
    /// packet's flow is tracked, else by policy.
    IcmpError,
    /// Judged by policy, never tracked (other ICMP types, other protocols).
    Untracked,
    /// IPv6 neighbour discovery with hop limit 255: link-local plumbing that
    /// must pass for IPv6 to work at all.
    NeighbourDiscovery,
}

/// Where the packet stands in IP fragmentation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    Whole,
    /// The first fragment of datagram `id`: carries the transport header.
    First(u32),
    /// A later fragment of datagram `id`: no transport header, ports unknown.
    Later(u32),
}

pub struct Packet {
    /// The packet's own tuple, used as its conntrack key (ports 0 for later fragments).
    pub flow: FlowKey,
    /// For ICMP errors: the tuple of the packet the error quotes.
    pub quoted: FlowKey,
    /// What the policy matches on: destination port for TCP/UDP, `type << 8 | code` for ICMP.
    pub policy_port: u16,
    pub tcp_flags: u8,
    pub kind: Kind,
    pub fragment: Fragment,
}

/// What parsing found; the packet itself is written in place, since BPF's
/// 512-byte stack has no room for copies of it.
pub enum Parsed {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): passes untouched.
    NotIp,
    /// An IP packet, described by the `Packet` passed in.
    Ip,
    Drop(DropReason),
}

impl Packet {
    /// A blank packet for [`parse`] to fill in.
    #[inline(always)]
    pub fn empty() -> Self {
        Self {
            flow: FlowKey::default(),
            quoted: FlowKey::default(),
            policy_port: 0,
            tcp_flags: 0,
            kind: Kind::Untracked,
            fragment: Fragment::Whole,
        }
    }
}

/// The frame: `start..end` is what the program may read directly, `wire_len`
/// the length of the whole packet (larger than the readable part for
/// non-linear socket buffers at TC).
#[derive(Clone, Copy)]
pub struct Frame {
    pub start: usize,
    pub end: usize,
    pub wire_len: usize,
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
        self.at::<[u8; N]>(offset).map(|p| unsafe { p.read_unaligned() })
    }

    #[inline(always)]
    fn u16_at(&self, offset: usize) -> Option<u16> {
        self.bytes::<2>(offset).map(u16::from_be_bytes)
    }
}

#[inline(always)]
pub fn parse(frame: &Frame, packet: &mut Packet) -> Parsed {
    let Some(mut ether_type) = frame.u16_at(12) else {
        // Shorter than an Ethernet header: nothing to classify as IP.
        return Parsed::NotIp;
    };
    let mut l3 = ETH_HEADER_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        // Tag control information, then the encapsulated type.
        let Some(tag) = frame.bytes::<4>(l3) else {
            return Parsed::Drop(DropReason::Malformed);
        };
        ether_type = u16::from_be_bytes([tag[2], tag[3]]);
        l3 += 4;
    }
    match ether_type {
        ETH_P_IPV4 => parse_ipv4(frame, l3, packet),
        ETH_P_IPV6 => parse_ipv6(frame, l3, packet),
        // A third tag, or IP hidden behind one: not something to pass blindly.
        ETH_P_8021Q | ETH_P_8021AD => Parsed::Drop(DropReason::Malformed),
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_ipv4(frame: &Frame, l3: usize, packet: &mut Packet) -> Parsed {
    let Some(header) = frame.bytes::<20>(l3) else {
        return Parsed::Drop(DropReason::Malformed);
    };
    let header_len = ((header[0] & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes([header[2], header[3]]) as usize;
    if header[0] >> 4 != 4 || header_len < 20 || total_len < header_len || l3 + total_len > frame.wire_len {
        return Parsed::Drop(DropReason::Malformed);
    }
    let flow = &mut packet.flow;
    flow.protocol = header[9];
    flow.family = FAMILY_IPV4;
    flow.src_addr[..4].copy_from_slice(&header[12..16]);
    flow.dst_addr[..4].copy_from_slice(&header[16..20]);
    let fragment_field = u16::from_be_bytes([header[6], header[7]]);
    let offset = ((fragment_field & 0x1fff) as usize) * 8;
    let more_fragments = fragment_field & 0x2000 != 0;
    let id = u16::from_be_bytes([header[4], header[5]]) as u32;
    if offset != 0 {
        return later_fragment(packet, id, offset);
    }
    if more_fragments {
        packet.fragment = Fragment::First(id);
    }
    parse_l4(frame, l3 + header_len, l3 + total_len, packet)
}

#[inline(always)]
fn later_fragment(packet: &mut Packet, id: u32, offset: usize) -> Parsed {
    if packet.flow.protocol == PROTO_TCP && offset < TCP_MIN_HEADER {
        return Parsed::Drop(DropReason::Malformed);
    }
    packet.fragment = Fragment::Later(id);
    Parsed::Ip
}

#[inline(always)]
fn parse_ipv6(frame: &Frame, l3: usize, packet: &mut Packet) -> Parsed {
    let Some(header) = frame.bytes::<40>(l3) else {
        return Parsed::Drop(DropReason::Malformed);
    };
    let payload_len = u16::from_be_bytes([header[4], header[5]]) as usize;
    let l3_end = l3 + 40 + payload_len;
    if header[0] >> 4 != 6 || l3_end > frame.wire_len {
        return Parsed::Drop(DropReason::Malformed);
    }
    let hop_limit = header[7];
    packet.flow.family = FAMILY_IPV6;
    packet.flow.src_addr.copy_from_slice(&header[8..24]);
    packet.flow.dst_addr.copy_from_slice(&header[24..40]);
    let mut next = header[6];
    let mut offset = l3 + 40;
    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        if !matches!(next, IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS | IPV6_AUTH | IPV6_FRAGMENT) {
            packet.flow.protocol = next;
            let parsed = parse_l4(frame, offset, l3_end, packet);
            let icmp_type = (packet.policy_port >> 8) as u8;
            if packet.flow.protocol == PROTO_ICMPV6 && hop_limit == 255 && (133..=137).contains(&icmp_type) {
                packet.kind = Kind::NeighbourDiscovery;
            }
            return parsed;
        }
        // Every extension header starts with (next header, length); the
        // fragment header's offset follows. Reading eight bytes at once keeps
        // the bounds check in a form the verifier accepts.
        let Some(ext) = frame.bytes::<8>(offset) else {
            return Parsed::Drop(DropReason::Malformed);
        };
        let length = match next {
            IPV6_AUTH => (ext[1] as usize + 2) * 4,
            IPV6_FRAGMENT => {
                let field = u16::from_be_bytes([ext[2], ext[3]]);
                let id = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
                let fragment_offset = ((field >> 3) as usize) * 8;
                if fragment_offset != 0 {
                    packet.flow.protocol = ext[0];
                    return later_fragment(packet, id, fragment_offset);
                }
                if field & 1 != 0 {
                    packet.fragment = Fragment::First(id);
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
fn parse_l4(frame: &Frame, l4: usize, l3_end: usize, packet: &mut Packet) -> Parsed {
    let fragment = packet.fragment;
    let flow = &mut packet.flow;
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
            packet.policy_port = u16::from_be_bytes([icmp[0], icmp[1]]);
            let v4 = flow.protocol == PROTO_ICMP;
            let (request, reply) = if v4 { (8, 0) } else { (128, 129) };
            let identifier = u16::from_be_bytes([icmp[4], icmp[5]]);
            if icmp[0] == request {
                flow.src_port = identifier;
                packet.kind = Kind::Trackable;
            } else if icmp[0] == reply {
                flow.dst_port = identifier;
                packet.kind = Kind::EchoReply;
            } else if is_icmp_error(v4, icmp[0])
                && fragment == Fragment::Whole
                && parse_quoted(frame, l4 + 8, v4, &mut packet.quoted)
            {
                packet.kind = Kind::IcmpError;
            }
        }
        _ => {}
    }
    Parsed::Ip
}

/// Destination unreachable (incl. fragmentation needed / packet too big),
/// time exceeded and parameter problem.
#[inline(always)]
fn is_icmp_error(v4: bool, icmp_type: u8) -> bool {
    if v4 { matches!(icmp_type, 3 | 11 | 12) } else { matches!(icmp_type, 1..=4) }
}

/// Writes the tuple of the packet an ICMP error quotes, as that packet
/// carried it. False if the quote is too short to tell; the error is then
/// judged by policy like any other ICMP message.
#[inline(always)]
fn parse_quoted(frame: &Frame, at: usize, v4: bool, quoted: &mut FlowKey) -> bool {
    quoted_tuple(frame, at, v4, quoted).is_some()
}

#[inline(always)]
fn quoted_tuple(frame: &Frame, at: usize, v4: bool, quoted: &mut FlowKey) -> Option<()> {
    let l4 = if v4 {
        let header = frame.bytes::<20>(at)?;
        let header_len = ((header[0] & 0x0f) as usize) * 4;
        if header[0] >> 4 != 4 || header_len < 20 {
            return None;
        }
        quoted.family = FAMILY_IPV4;
        quoted.protocol = header[9];
        quoted.src_addr[..4].copy_from_slice(&header[12..16]);
        quoted.dst_addr[..4].copy_from_slice(&header[16..20]);
        at + header_len
    } else {
        let header = frame.bytes::<40>(at)?;
        quoted.family = FAMILY_IPV6;
        quoted.protocol = header[6];
        quoted.src_addr.copy_from_slice(&header[8..24]);
        quoted.dst_addr.copy_from_slice(&header[24..40]);
        at + 40
    };
    let ports = frame.bytes::<8>(l4)?;
    match quoted.protocol {
        PROTO_TCP | PROTO_UDP => {
            quoted.src_port = u16::from_be_bytes([ports[0], ports[1]]);
            quoted.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let identifier = u16::from_be_bytes([ports[4], ports[5]]);
            match ports[0] {
                8 | 128 => quoted.src_port = identifier,
                0 | 129 => quoted.dst_port = identifier,
                _ => return None,
            }
        }
        _ => return None,
    }
    Some(())
}
