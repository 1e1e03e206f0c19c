//! Header parsing. Every read is bounds-checked against the frame, and every
//! inconsistency between headers (lengths that do not fit, truncated or
//! overlapping headers) is reported as [`DropReason::Malformed`] rather than
//! guessed at: a packet is judged by exactly the headers the receiver will see.

use core::arch::asm;
use core::mem::{MaybeUninit, align_of, size_of};

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

#[repr(C, align(8))]
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
    /// Makes `storage` a blank packet for [`parse`] to fill in, in place:
    /// zeroed (flow keys are hashed whole, so unused address bytes must be
    /// zero) by eight-byte stores. A zero initialiser, or building the
    /// packet here and moving it out, compiles to calls to BPF's byte-loop
    /// `memset`, which cost more than the rest of the fast path.
    #[inline(always)]
    pub fn blank(storage: &mut MaybeUninit<Self>) -> &mut Self {
        const WORDS: usize = size_of::<Packet>() / 8;
        const { assert!(size_of::<Packet>() % 8 == 0 && align_of::<Packet>() == 8) };
        let words = storage.as_mut_ptr().cast::<u64>();
        for k in 0..WORDS {
            // SAFETY: `k` words of 8 bytes lie inside the (8-aligned) packet.
            // Volatile, so LLVM cannot merge the stores back into `memset`.
            unsafe { words.add(k).write_volatile(0) };
        }
        let blank = storage.as_mut_ptr();
        // SAFETY: every field is now initialised: the integers and arrays
        // by the zero words, the enums by these writes.
        unsafe {
            (&raw mut (*blank).kind).write(Kind::Untracked);
            (&raw mut (*blank).fragment).write(Fragment::Whole);
            storage.assume_init_mut()
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
    /// The `N` bytes at `offset`, if they are all inside the frame. One
    /// bounds check per header keeps the verifier's view simple; the
    /// fields are then read straight from the packet, never copied whole.
    #[inline(always)]
    fn header<const N: usize>(&self, offset: usize) -> Option<Header<N>> {
        if self.start + offset + N > self.end {
            return None;
        }
        Some(Header { at: (self.start + offset) as *const u8 })
    }
}

/// A bounds-checked header: field offsets are const generics, checked
/// against `N` at compile time.
///
/// Each field is read with one load instruction. LLVM's BPF backend would
/// split a load it cannot prove aligned into byte loads (a sixth of the
/// whole program's instructions, and a fifth of an established flow's
/// cost), and Rust may not claim an alignment the packet lacks, so the
/// loads are written in BPF assembly. They need no alignment on kernels
/// whose CPUs load misaligned words (x86, arm64). Elsewhere the verifier
/// checks alignment assuming the frame starts two bytes past a word
/// (`NET_IP_ALIGN`, as drivers there place it), which word-aligns the IP
/// header behind the Ethernet header and any VLAN tags (which hold only
/// 16-bit fields); every header after it starts a multiple of four bytes
/// further, and every field sits at a multiple of its width within its
/// header (asserted below). That holds by construction; this machine has
/// no strict-alignment CPU to show it.
#[derive(Clone, Copy)]
struct Header<const N: usize> {
    at: *const u8,
}

impl<const N: usize> Header<N> {
    #[inline(always)]
    fn u8<const AT: usize>(self) -> u8 {
        const { assert!(AT < N) };
        // SAFETY: `Frame::header` checked that all N bytes are readable.
        unsafe { self.at.add(AT).read_volatile() }
    }

    /// A big-endian 16-bit field, in host order.
    #[inline(always)]
    fn u16<const AT: usize>(self) -> u16 {
        const { assert!(AT + 1 < N && AT % 2 == 0) };
        let raw: u64;
        // SAFETY: `Frame::header` checked that all N bytes are readable;
        // the instruction only reads two of them.
        unsafe {
            asm!(
                "{raw} = *(u16 *)({at} + {offset})",
                at = in(reg) self.at,
                offset = const AT,
                raw = lateout(reg) raw,
                options(pure, readonly, nostack, preserves_flags),
            );
        }
        u16::from_be(raw as u16)
    }

    /// Four bytes at `AT + 4 * WORD`, as the packet holds them (network order).
    #[inline(always)]
    fn raw_u32<const AT: usize, const WORD: usize>(self) -> u32 {
        const { assert!(AT + 4 * WORD + 3 < N && AT % 4 == 0) };
        let raw: u64;
        // SAFETY: as in `u16`.
        unsafe {
            asm!(
                "{raw} = *(u32 *)({at} + {offset})",
                at = in(reg) self.at,
                offset = const AT + 4 * WORD,
                raw = lateout(reg) raw,
                options(pure, readonly, nostack, preserves_flags),
            );
        }
        raw as u32
    }

    /// A big-endian 32-bit field, in host order.
    #[inline(always)]
    fn u32<const AT: usize>(self) -> u32 {
        u32::from_be(self.raw_u32::<AT, 0>())
    }

    /// Copies the IPv4 address at `AT` to the start of an address field,
    /// in network order like the packet.
    #[inline(always)]
    fn copy_ipv4_address<const AT: usize>(self, to: &mut [u8; 16]) {
        let to = to.as_mut_ptr().cast::<u32>();
        // SAFETY: `to` holds 16 bytes. The write is unaligned to Rust, but
        // address fields are word-aligned in every key, so LLVM emits a
        // word store.
        unsafe { to.write_unaligned(self.raw_u32::<AT, 0>()) };
    }

    /// Copies the IPv6 address at `AT` to an address field, in network order.
    #[inline(always)]
    fn copy_ipv6_address<const AT: usize>(self, to: &mut [u8; 16]) {
        let to = to.as_mut_ptr().cast::<u32>();
        // SAFETY: as in `copy_ipv4_address`; the four words fill the 16 bytes.
        unsafe {
            to.write_unaligned(self.raw_u32::<AT, 0>());
            to.add(1).write_unaligned(self.raw_u32::<AT, 1>());
            to.add(2).write_unaligned(self.raw_u32::<AT, 2>());
            to.add(3).write_unaligned(self.raw_u32::<AT, 3>());
        }
    }
}

#[inline(always)]
pub fn parse(frame: &Frame, packet: &mut Packet) -> Parsed {
    let Some(ethernet) = frame.header::<ETH_HEADER_LEN>(0) else {
        // Shorter than an Ethernet header: nothing to classify as IP.
        return Parsed::NotIp;
    };
    let mut ether_type = ethernet.u16::<12>();
    let mut l3 = ETH_HEADER_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        // Tag control information, then the encapsulated type.
        let Some(tag) = frame.header::<4>(l3) else {
            return Parsed::Drop(DropReason::Malformed);
        };
        ether_type = tag.u16::<2>();
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
    let Some(header) = frame.header::<20>(l3) else {
        return Parsed::Drop(DropReason::Malformed);
    };
    let version_and_length = header.u8::<0>();
    let header_len = ((version_and_length & 0x0f) as usize) * 4;
    let total_len = header.u16::<2>() as usize;
    if version_and_length >> 4 != 4 || header_len < 20 || total_len < header_len || l3 + total_len > frame.wire_len {
        return Parsed::Drop(DropReason::Malformed);
    }
    let flow = &mut packet.flow;
    flow.protocol = header.u8::<9>();
    flow.family = FAMILY_IPV4;
    header.copy_ipv4_address::<12>(&mut flow.src_addr);
    header.copy_ipv4_address::<16>(&mut flow.dst_addr);
    let fragment_field = header.u16::<6>();
    let offset = ((fragment_field & 0x1fff) as usize) * 8;
    let more_fragments = fragment_field & 0x2000 != 0;
    let id = header.u16::<4>() as u32;
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
    let Some(header) = frame.header::<40>(l3) else {
        return Parsed::Drop(DropReason::Malformed);
    };
    let payload_len = header.u16::<4>() as usize;
    let l3_end = l3 + 40 + payload_len;
    if header.u8::<0>() >> 4 != 6 || l3_end > frame.wire_len {
        return Parsed::Drop(DropReason::Malformed);
    }
    let hop_limit = header.u8::<7>();
    packet.flow.family = FAMILY_IPV6;
    header.copy_ipv6_address::<8>(&mut packet.flow.src_addr);
    header.copy_ipv6_address::<24>(&mut packet.flow.dst_addr);
    let mut next = header.u8::<6>();
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
        let Some(ext) = frame.header::<8>(offset) else {
            return Parsed::Drop(DropReason::Malformed);
        };
        let length = match next {
            IPV6_AUTH => (ext.u8::<1>() as usize + 2) * 4,
            IPV6_FRAGMENT => {
                let field = ext.u16::<2>();
                let id = ext.u32::<4>();
                let fragment_offset = ((field >> 3) as usize) * 8;
                if fragment_offset != 0 {
                    packet.flow.protocol = ext.u8::<0>();
                    return later_fragment(packet, id, fragment_offset);
                }
                if field & 1 != 0 {
                    packet.fragment = Fragment::First(id);
                }
                8
            }
            _ => (ext.u8::<1>() as usize + 1) * 8,
        };
        next = ext.u8::<0>();
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
            let Some(tcp) = frame.header::<20>(l4) else {
                return Parsed::Drop(DropReason::Malformed);
            };
            let data_offset = ((tcp.u8::<12>() >> 4) as usize) * 4;
            if data_offset < 20 || l4 + data_offset > l3_end {
                return Parsed::Drop(DropReason::Malformed);
            }
            flow.src_port = tcp.u16::<0>();
            flow.dst_port = tcp.u16::<2>();
            packet.policy_port = flow.dst_port;
            packet.tcp_flags = tcp.u8::<13>();
            packet.kind = Kind::Trackable;
        }
        PROTO_UDP => {
            let Some(udp) = frame.header::<8>(l4) else {
                return Parsed::Drop(DropReason::Malformed);
            };
            if l4 + 8 > l3_end {
                return Parsed::Drop(DropReason::Malformed);
            }
            flow.src_port = udp.u16::<0>();
            flow.dst_port = udp.u16::<2>();
            packet.policy_port = flow.dst_port;
            packet.kind = Kind::Trackable;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let Some(icmp) = frame.header::<8>(l4) else {
                return Parsed::Drop(DropReason::Malformed);
            };
            if l4 + 8 > l3_end {
                return Parsed::Drop(DropReason::Malformed);
            }
            packet.policy_port = icmp.u16::<0>();
            let v4 = flow.protocol == PROTO_ICMP;
            let (request, reply) = if v4 { (8, 0) } else { (128, 129) };
            let identifier = icmp.u16::<4>();
            let icmp_type = icmp.u8::<0>();
            if icmp_type == request {
                flow.src_port = identifier;
                packet.kind = Kind::Trackable;
            } else if icmp_type == reply {
                flow.dst_port = identifier;
                packet.kind = Kind::EchoReply;
            } else if is_icmp_error(v4, icmp_type)
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
        let header = frame.header::<20>(at)?;
        let version_and_length = header.u8::<0>();
        let header_len = ((version_and_length & 0x0f) as usize) * 4;
        if version_and_length >> 4 != 4 || header_len < 20 {
            return None;
        }
        quoted.family = FAMILY_IPV4;
        quoted.protocol = header.u8::<9>();
        header.copy_ipv4_address::<12>(&mut quoted.src_addr);
        header.copy_ipv4_address::<16>(&mut quoted.dst_addr);
        at + header_len
    } else {
        let header = frame.header::<40>(at)?;
        quoted.family = FAMILY_IPV6;
        quoted.protocol = header.u8::<6>();
        header.copy_ipv6_address::<8>(&mut quoted.src_addr);
        header.copy_ipv6_address::<24>(&mut quoted.dst_addr);
        at + 40
    };
    let ports = frame.header::<8>(l4)?;
    match quoted.protocol {
        PROTO_TCP | PROTO_UDP => {
            quoted.src_port = ports.u16::<0>();
            quoted.dst_port = ports.u16::<2>();
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let identifier = ports.u16::<4>();
            match ports.u8::<0>() {
                8 | 128 => quoted.src_port = identifier,
                0 | 129 => quoted.dst_port = identifier,
                _ => return None,
            }
        }
        _ => return None,
    }
    Some(())
}
