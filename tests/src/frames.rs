//! Crafted frames for driving the kernel programs through
//! `BPF_PROG_TEST_RUN`: every header is written by hand so tests can make
//! exactly the malformed, fragmented, tagged or wrapped packet they need.
//! Checksums are left zero: the programs never read them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;

/// A TCP header (20 bytes, no options).
#[must_use]
pub fn tcp(src_port: u16, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&src_port.to_be_bytes());
    h[2..4].copy_from_slice(&dst_port.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h[14..16].copy_from_slice(&65535u16.to_be_bytes());
    h
}

/// A UDP header and payload.
#[must_use]
pub fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 8];
    h[0..2].copy_from_slice(&src_port.to_be_bytes());
    h[2..4].copy_from_slice(&dst_port.to_be_bytes());
    h[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An ICMP or `ICMPv6` message: type, code, the 4-byte rest of header
/// (identifier and sequence for echoes), then `payload`.
#[must_use]
pub fn icmp(icmp_type: u8, code: u8, rest: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut h = vec![icmp_type, code, 0, 0];
    h.extend_from_slice(&rest);
    h.extend_from_slice(payload);
    h
}

/// An echo request or reply header with identifier `id`.
#[must_use]
pub fn echo(icmp_type: u8, id: u16) -> Vec<u8> {
    let id = id.to_be_bytes();
    icmp(icmp_type, 0, [id[0], id[1], 0, 1], b"ping")
}

/// An IPv4 packet under construction.
#[derive(Debug, Clone)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    /// Options, padded by the caller to a multiple of 4 bytes.
    pub options: Vec<u8>,
    pub id: u16,
    /// Fragment offset in bytes (a multiple of 8).
    pub fragment_offset: usize,
    pub more_fragments: bool,
    pub payload: Vec<u8>,
    /// Overrides the IHL field (in 32-bit words).
    pub ihl_override: Option<u8>,
    /// Overrides the total length field.
    pub total_length_override: Option<u16>,
}

impl Ipv4 {
    #[must_use]
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: Vec<u8>) -> Self {
        Self {
            src,
            dst,
            protocol,
            options: Vec::new(),
            id: 0x1234,
            fragment_offset: 0,
            more_fragments: false,
            payload,
            ihl_override: None,
            total_length_override: None,
        }
    }

    #[must_use]
    pub fn bytes(&self) -> Vec<u8> {
        let header_len = 20 + self.options.len();
        let total = header_len + self.payload.len();
        let mut h = vec![0u8; 20];
        h[0] = 0x40 | self.ihl_override.unwrap_or((header_len / 4) as u8);
        h[2..4].copy_from_slice(&self.total_length_override.unwrap_or(total as u16).to_be_bytes());
        h[4..6].copy_from_slice(&self.id.to_be_bytes());
        let mut fragment = (self.fragment_offset / 8) as u16;
        if self.more_fragments {
            fragment |= 0x2000;
        }
        h[6..8].copy_from_slice(&fragment.to_be_bytes());
        h[8] = 64;
        h[9] = self.protocol;
        h[12..16].copy_from_slice(&self.src.octets());
        h[16..20].copy_from_slice(&self.dst.octets());
        h.extend_from_slice(&self.options);
        h.extend_from_slice(&self.payload);
        h
    }
}

/// An IPv6 extension header: its type and its body after the two-byte
/// (next header, length) prefix, which `Ipv6::bytes` writes.
#[derive(Debug, Clone)]
pub enum Extension {
    HopByHop,
    DestinationOptions,
    Routing,
    /// Fragment header: offset in bytes, more-fragments flag, identification.
    Fragment {
        offset: usize,
        more: bool,
        id: u32,
    },
}

impl Extension {
    fn number(&self) -> u8 {
        match self {
            Extension::HopByHop => 0,
            Extension::Routing => 43,
            Extension::Fragment { .. } => 44,
            Extension::DestinationOptions => 60,
        }
    }

    fn encode(&self, next: u8) -> Vec<u8> {
        match self {
            // 8 bytes: next, length 0, then PadN option filling 6 bytes.
            Extension::HopByHop | Extension::DestinationOptions => vec![next, 0, 1, 4, 0, 0, 0, 0],
            // 8 bytes: routing type 0 with no addresses left (ignored by receivers).
            Extension::Routing => vec![next, 0, 0, 0, 0, 0, 0, 0],
            Extension::Fragment { offset, more, id } => {
                let field = ((*offset / 8) as u16) << 3 | u16::from(*more);
                let mut h = vec![next, 0];
                h.extend_from_slice(&field.to_be_bytes());
                h.extend_from_slice(&id.to_be_bytes());
                h
            }
        }
    }
}

/// An IPv6 packet under construction.
#[derive(Debug, Clone)]
pub struct Ipv6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub protocol: u8,
    pub extensions: Vec<Extension>,
    pub hop_limit: u8,
    pub payload: Vec<u8>,
    pub payload_length_override: Option<u16>,
}

impl Ipv6 {
    #[must_use]
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, protocol: u8, payload: Vec<u8>) -> Self {
        Self { src, dst, protocol, extensions: Vec::new(), hop_limit: 64, payload, payload_length_override: None }
    }

    #[must_use]
    pub fn bytes(&self) -> Vec<u8> {
        let mut chain = Vec::new();
        for (i, extension) in self.extensions.iter().enumerate() {
            let next = self.extensions.get(i + 1).map_or(self.protocol, Extension::number);
            chain.extend(extension.encode(next));
        }
        let first = self.extensions.first().map_or(self.protocol, Extension::number);
        let payload_len = (chain.len() + self.payload.len()) as u16;
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&self.payload_length_override.unwrap_or(payload_len).to_be_bytes());
        h[6] = first;
        h[7] = self.hop_limit;
        h[8..24].copy_from_slice(&self.src.octets());
        h[24..40].copy_from_slice(&self.dst.octets());
        h.extend(chain);
        h.extend_from_slice(&self.payload);
        h
    }
}

/// An Ethernet frame around `payload`, with VLAN tags (outermost first,
/// each given by its tag protocol identifier).
#[must_use]
pub fn ethernet(tags: &[u16], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    for (i, tpid) in tags.iter().enumerate() {
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&(100 + i as u16).to_be_bytes());
    }
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An untagged frame carrying an IPv4 packet.
#[must_use]
pub fn v4(packet: &Ipv4) -> Vec<u8> {
    ethernet(&[], ETH_P_IPV4, &packet.bytes())
}

/// An untagged frame carrying an IPv6 packet.
#[must_use]
pub fn v6(packet: &Ipv6) -> Vec<u8> {
    ethernet(&[], ETH_P_IPV6, &packet.bytes())
}

/// A simple frame from `src` to `dst` (same family) with the given L4 bytes.
///
/// # Panics
/// If the families differ.
#[must_use]
pub fn simple(src: IpAddr, dst: IpAddr, protocol: u8, l4: Vec<u8>) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => v4(&Ipv4::new(s, d, protocol, l4)),
        (IpAddr::V6(s), IpAddr::V6(d)) => v6(&Ipv6::new(s, d, protocol, l4)),
        _ => panic!("mixed address families"),
    }
}

/// An ARP request frame.
#[must_use]
pub fn arp() -> Vec<u8> {
    let mut body = vec![0, 1, 8, 0, 6, 4, 0, 1];
    body.extend_from_slice(&[2, 0, 0, 0, 0, 1, 10, 1, 0, 1, 0, 0, 0, 0, 0, 0, 10, 2, 0, 10]);
    ethernet(&[], ETH_P_ARP, &body)
}
