//! Hostile input for the differential test: random policies over a small
//! address plan, and conversations of frames between those addresses that
//! are then wrapped, fragmented, quoted in ICMP errors, mutated and cut.
//! Everything comes from one seeded generator, so a seed replays a run.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enforcer_common::Direction;

use lab::frames::{ICMP, ICMPV6, TCP, UDP};
pub use lab::rng::Rng;

/// The identities every generated policy declares (name, addresses); the
/// rules between them vary.
const IDENTITIES: [(&str, &str); 4] = [
    ("a", "[\"10.10.0.0/16\", \"fd10::/32\"]"),
    ("b", "[\"10.20.0.5\", \"fd20::5\"]"),
    ("c", "[\"10.30.1.0/24\", \"fd30::/64\"]"),
    ("d", "[\"10.40.0.0/24\", \"10.40.1.7\", \"fd40::7\"]"),
];

/// The node's own addresses (identity `host`).
pub const HOST: [&str; 2] = ["10.9.0.1", "fd09::1"];

/// Addresses frames use: some in each identity, the node, the world.
const V4: [&str; 9] =
    ["10.10.3.4", "10.10.200.1", "10.20.0.5", "10.20.0.6", "10.30.1.9", "10.40.0.1", "10.40.1.7", "192.0.2.9", HOST[0]];
const V6: [&str; 7] = ["fd10::1", "fd10:0:1::2", "fd20::5", "fd30::9", "fd40::7", "2001:db8::1", HOST[1]];

const PEERS: [&str; 9] = [
    "{identity: a}",
    "{identity: b}",
    "{identity: c}",
    "{identity: d}",
    "{identity: world}",
    "{identity: host}",
    "{labels: {tier: front}}",
    "{cidr: \"10.0.0.0/8\", except: [\"10.20.0.0/16\"]}",
    "{cidr: \"fd00::/8\"}",
];

const PORTS: [&str; 12] = [
    "\"tcp\"",
    "\"udp\"",
    "\"80/tcp\"",
    "\"1-1024/tcp\"",
    "\"53/udp\"",
    "\"icmp\"",
    "\"icmpv6\"",
    "\"icmpv6/echo-request\"",
    "\"icmp/echo-request\"",
    "\"1000-2000/udp\"",
    "\"8080/tcp\"",
    "\"icmp/destination-unreachable\"",
];

/// Ports frames use: the ones rules name, their edges, and others.
const FRAME_PORTS: [u16; 10] = [53, 80, 443, 1000, 1024, 1025, 2000, 2001, 8080, 40000];

/// A random valid policy: the four identities (one perhaps in audit mode,
/// half labelled `tier: front`), and up to eight allow or deny rules.
pub fn policy_text(rng: &mut Rng) -> String {
    let mut text = String::from(
        "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: generated}\nspec:\n  identities:\n",
    );
    let audited = rng.chance(25).then(|| rng.below(IDENTITIES.len()));
    for (i, (name, addresses)) in IDENTITIES.iter().enumerate() {
        let mode = if audited == Some(i) { ", mode: audit" } else { "" };
        let tier = if rng.chance(50) { "front" } else { "back" };
        writeln!(text, "    - {{name: {name}, labels: {{tier: {tier}}}, addresses: {addresses}{mode}}}").unwrap();
    }
    text += "  rules:\n";
    for i in 0..rng.below(9) {
        let action = if rng.chance(30) { "deny" } else { "allow" };
        let ports = if rng.chance(25) {
            String::new()
        } else {
            let count = 1 + rng.below(3);
            let ports: Vec<&str> = (0..count).map(|_| *rng.pick(&PORTS)).collect();
            format!(", ports: [{}]", ports.join(", "))
        };
        let (from, to) = (rng.pick(&PEERS), rng.pick(&PEERS));
        writeln!(text, "    - {{name: r{i}, action: {action}, from: [{from}], to: [{to}]{ports}}}").unwrap();
    }
    text
}

/// Prefixes a case may quarantine.
const QUARANTINED: [&str; 7] =
    ["10.10.3.4/32", "10.10.0.0/16", "10.20.0.5/32", "10.9.0.0/24", "192.0.2.0/24", "fd10::/32", "fd20::5/128"];

/// What a case quarantines: usually nothing; else one to three of a
/// single address, an identity's prefix, a prefix holding the node's own
/// address, and an IPv6 prefix, with TCP ports exempt for the node.
pub fn quarantine(rng: &mut Rng) -> (Vec<String>, Vec<u16>) {
    if !rng.chance(25) {
        return (Vec::new(), Vec::new());
    }
    let nets = (0..=rng.below(3)).map(|_| (*rng.pick(&QUARANTINED)).to_owned()).collect();
    let ports = (0..rng.below(3)).map(|_| *rng.pick(&FRAME_PORTS)).collect();
    (nets, ports)
}

/// One frame and the program it goes through.
#[derive(Debug, Clone)]
pub struct Step {
    pub hook: Hook,
    pub frame: Vec<u8>,
}

/// The three programs: XDP and TC at ingress judge alike; TC at egress
/// judges what the node sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    TcIngress,
    TcEgress,
}

impl Hook {
    #[must_use]
    pub fn direction(self) -> Direction {
        if self == Hook::TcEgress { Direction::Egress } else { Direction::Ingress }
    }

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::TcIngress => "tc-ingress",
            Hook::TcEgress => "tc-egress",
        }
    }

    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        [Hook::Xdp, Hook::TcIngress, Hook::TcEgress].into_iter().find(|hook| hook.name() == name)
    }
}

/// A conversation's two ends and what they speak.
#[derive(Debug, Clone, Copy)]
struct Flow {
    client: IpAddr,
    server: IpAddr,
    protocol: u8,
    client_port: u16,
    server_port: u16,
}

fn address(text: &str) -> IpAddr {
    text.parse().expect("a literal address")
}

impl Flow {
    fn random(rng: &mut Rng) -> Self {
        let v4 = rng.chance(55);
        let pool: &[&str] = if v4 { &V4 } else { &V6 };
        let (client, server) = (address(rng.pick::<&str>(pool)), address(rng.pick::<&str>(pool)));
        let protocol = match rng.below(10) {
            0..=3 => TCP,
            4..=5 => UDP,
            6..=7 => {
                if v4 {
                    ICMP
                } else {
                    ICMPV6
                }
            }
            // The other ICMP in the wrong family, or something else.
            8 => *rng.pick(&[ICMP, ICMPV6]),
            _ => *rng.pick(&[47, 132, 0, 255]),
        };
        let port = |rng: &mut Rng| if rng.chance(70) { *rng.pick(&FRAME_PORTS) } else { rng.u16() };
        Self { client, server, protocol, client_port: port(rng), server_port: port(rng) }
    }

    fn v4(&self) -> bool {
        self.client.is_ipv4()
    }

    /// The transport bytes of one packet of the flow, from the client if
    /// `forward`, with a little payload.
    fn transport(&self, rng: &mut Rng, forward: bool) -> Vec<u8> {
        let (src_port, dst_port) =
            if forward { (self.client_port, self.server_port) } else { (self.server_port, self.client_port) };
        let payload_len = rng.below(24);
        let payload = rng.bytes(payload_len);
        match self.protocol {
            TCP => {
                let any = rng.byte();
                let flags = if forward {
                    *rng.pick(&[0x02, 0x02, 0x10, 0x18, 0x11, 0x04, 0x12, any])
                } else {
                    *rng.pick(&[0x12, 0x10, 0x18, 0x11, 0x14, 0x02, any])
                };
                let mut header = vec![0u8; 20];
                header[0..2].copy_from_slice(&src_port.to_be_bytes());
                header[2..4].copy_from_slice(&dst_port.to_be_bytes());
                header[12] = 5 << 4;
                header[13] = flags;
                if rng.chance(10) {
                    // TCP options: a larger data offset.
                    let words = 1 + rng.below(10);
                    header[12] = ((5 + words) as u8) << 4;
                    header.extend(rng.bytes(words * 4));
                }
                header.extend(payload);
                header
            }
            UDP => {
                let mut header = vec![0u8; 8];
                header[0..2].copy_from_slice(&src_port.to_be_bytes());
                header[2..4].copy_from_slice(&dst_port.to_be_bytes());
                header[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                header.extend(payload);
                header
            }
            ICMP | ICMPV6 => {
                let v4_numbers = self.protocol == ICMP;
                let (request, reply) = if v4_numbers { (8, 0) } else { (128, 129) };
                let icmp_type = match rng.below(10) {
                    0..=6 => {
                        if forward {
                            request
                        } else {
                            reply
                        }
                    }
                    7 => {
                        if forward {
                            reply
                        } else {
                            request
                        }
                    }
                    // Neighbour discovery, redirects, router adverts, anything.
                    8 => *rng.pick(&[133, 134, 135, 136, 137, 5, 9, 13]),
                    _ => rng.byte(),
                };
                let id = self.client_port.to_be_bytes();
                let code = if rng.chance(90) { 0 } else { rng.byte() };
                let mut header = vec![icmp_type, code, 0, 0, id[0], id[1], 0, 1];
                header.extend(payload);
                header
            }
            _ => payload,
        }
    }
}

/// An IP packet before it is framed: its addresses, protocol, and the
/// bytes after the IP header.
#[derive(Debug, Clone)]
struct Datagram {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    body: Vec<u8>,
}

/// How an IP header is dressed.
#[derive(Debug, Clone, Default)]
struct Dress {
    /// IPv4 options (a multiple of four bytes, at most 40).
    options: Vec<u8>,
    /// IPv6 extension headers before the fragment header: (type, body length in bytes).
    extensions: Vec<(u8, Vec<u8>)>,
    /// Where among them a fragment header goes: usually last, as stacks
    /// place it; sometimes before options of the fragmentable part.
    fragment_header_at: usize,
    hop_limit: u8,
}

fn random_dress(rng: &mut Rng) -> Dress {
    let mut dress = Dress {
        hop_limit: if rng.chance(20) { 255 } else { 64 },
        fragment_header_at: if rng.chance(80) { usize::MAX } else { rng.below(4) },
        ..Dress::default()
    };
    if rng.chance(20) {
        let words = 1 + rng.below(10);
        dress.options = match rng.below(3) {
            // End of options, then anything.
            0 => {
                let mut options = vec![0];
                options.extend(rng.bytes(words * 4 - 1));
                options
            }
            // No-operations.
            1 => vec![1; words * 4],
            _ => rng.bytes(words * 4),
        };
    }
    if rng.chance(25) {
        for _ in 0..=rng.below(9) {
            let kind = *rng.pick(&[0, 43, 60, 60, 51]);
            // Hop-by-hop, routing and destination options are (len + 1) * 8
            // bytes; the authentication header (len + 2) * 4.
            let length = if kind == 51 { (rng.below(4) + 2) * 4 } else { (rng.below(3) + 1) * 8 };
            dress.extensions.push((kind, rng.bytes(length - 2)));
        }
    }
    dress
}

/// The IP header bytes of a datagram (or a fragment of it: `fragment` is
/// (offset in bytes, more fragments, id)), with `payload` after it.
fn ip_packet(datagram: &Datagram, dress: &Dress, fragment: Option<(usize, bool, u32)>, payload: &[u8]) -> Vec<u8> {
    match (datagram.src, datagram.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => ipv4(src, dst, datagram.protocol, dress, fragment, payload),
        (IpAddr::V6(src), IpAddr::V6(dst)) => ipv6(src, dst, datagram.protocol, dress, fragment, payload),
        _ => unreachable!("flows stay in one family"),
    }
}

fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    dress: &Dress,
    fragment: Option<(usize, bool, u32)>,
    payload: &[u8],
) -> Vec<u8> {
    let header_len = 20 + dress.options.len();
    let mut h = vec![0u8; 20];
    h[0] = 0x40 | (header_len / 4) as u8;
    h[2..4].copy_from_slice(&((header_len + payload.len()) as u16).to_be_bytes());
    if let Some((offset, more, id)) = fragment {
        h[4..6].copy_from_slice(&(id as u16).to_be_bytes());
        let field = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&field.to_be_bytes());
    }
    h[8] = 64;
    h[9] = protocol;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    h.extend(&dress.options);
    h.extend(payload);
    h
}

fn ipv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    protocol: u8,
    dress: &Dress,
    fragment: Option<(usize, bool, u32)>,
    payload: &[u8],
) -> Vec<u8> {
    let mut chain: Vec<(u8, Vec<u8>)> = dress.extensions.clone();
    if let Some((offset, more, id)) = fragment {
        let field = ((offset / 8) as u16) << 3 | u16::from(more);
        let mut body = field.to_be_bytes().to_vec();
        body.extend(id.to_be_bytes());
        chain.insert(dress.fragment_header_at.min(chain.len()), (44, body));
    }
    let mut headers = Vec::new();
    for (i, (kind, body)) in chain.iter().enumerate() {
        let next = chain.get(i + 1).map_or(protocol, |(k, _)| *k);
        let total = body.len() + 2;
        let length = match kind {
            51 => total / 4 - 2,
            44 => 0,
            _ => total / 8 - 1,
        };
        headers.push(next);
        headers.push(length as u8);
        headers.extend(body);
    }
    let first = chain.first().map_or(protocol, |(k, _)| *k);
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&((headers.len() + payload.len()) as u16).to_be_bytes());
    h[6] = first;
    h[7] = dress.hop_limit;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h.extend(headers);
    h.extend(payload);
    h
}

/// An Ethernet frame: usually untagged, sometimes behind one or two VLAN
/// tags, rarely three (which the programs must refuse).
fn ethernet(rng: &mut Rng, ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    let tags = match rng.below(20) {
        0..=13 => 0,
        14..=16 => 1,
        17..=18 => 2,
        _ => 3,
    };
    for _ in 0..tags {
        frame.extend(rng.pick(&[0x8100u16, 0x88a8]).to_be_bytes());
        frame.extend(rng.u16().to_be_bytes());
    }
    frame.extend(ether_type.to_be_bytes());
    frame.extend(payload);
    frame
}

fn ether_type(datagram: &Datagram) -> u16 {
    if datagram.src.is_ipv4() { 0x0800 } else { 0x86dd }
}

/// The frames of one datagram: whole, or fragmented into pieces sent in
/// a random order, some perhaps twice or not at all.
fn frames_of(rng: &mut Rng, datagram: &Datagram, out: &mut Vec<Vec<u8>>) {
    let dress = random_dress(rng);
    if datagram.body.len() < 9 || !rng.chance(15) {
        let frame = ethernet(rng, ether_type(datagram), &ip_packet(datagram, &dress, None, &datagram.body));
        out.push(frame);
        return;
    }
    let id = rng.next_u64() as u32 & if datagram.src.is_ipv4() { 0xffff } else { u32::MAX };
    // Cut points at multiples of eight; sometimes a tiny first piece.
    let mut cuts = vec![0];
    let mut at = 0;
    while at + 8 < datagram.body.len() {
        at += 8 * (1 + rng.below(3));
        if at < datagram.body.len() {
            cuts.push(at);
        }
    }
    let mut pieces: Vec<Vec<u8>> = cuts
        .iter()
        .enumerate()
        .map(|(i, &start)| {
            let end = cuts.get(i + 1).copied().unwrap_or(datagram.body.len());
            let more = end < datagram.body.len();
            let piece = ip_packet(datagram, &dress, Some((start, more, id)), &datagram.body[start..end]);
            ethernet(rng, ether_type(datagram), &piece)
        })
        .collect();
    // A random order: every order of two or three pieces turns up often.
    for i in (1..pieces.len()).rev() {
        let j = rng.below(i + 1);
        pieces.swap(i, j);
    }
    for piece in pieces {
        if rng.chance(8) {
            continue;
        }
        if rng.chance(8) {
            out.push(piece.clone());
        }
        out.push(piece);
    }
}

/// An ICMP error quoting `quoted` (an IP packet as sent), from `from` to
/// the quoted packet's source, the quote perhaps cut short.
fn icmp_error(rng: &mut Rng, from: IpAddr, quoted: &[u8], v4: bool) -> Datagram {
    let (protocol, icmp_type) =
        if v4 { (ICMP, *rng.pick(&[3u8, 11, 12, 3, 5])) } else { (ICMPV6, *rng.pick(&[1u8, 2, 3, 4, 1, 135])) };
    let keep = if rng.chance(70) { quoted.len().min(64) } else { rng.below(quoted.len() + 1) };
    let mut body = vec![icmp_type, rng.below(4) as u8, 0, 0, 0, 0, 0, 0];
    body.extend(&quoted[..keep]);
    let dst = if v4 {
        IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&quoted[12..16]).unwrap_or([0; 4])))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&quoted[8..24]).unwrap_or([0; 16])))
    };
    Datagram { src: from, dst, protocol, body }
}

/// Damages a frame: a flipped byte in its headers, a length field
/// rewritten, a cut, trailing bytes. Never below an Ethernet header:
/// `BPF_PROG_TEST_RUN` refuses shorter frames.
fn mutate(rng: &mut Rng, frame: &mut Vec<u8>) {
    for _ in 0..=rng.below(3) {
        match rng.below(5) {
            0 | 1 => {
                let at = 12 + rng.below((frame.len() - 12).min(90));
                frame[at] ^= 1 << rng.below(8);
            }
            2 => {
                let at = 14 + rng.below((frame.len() - 14).min(90));
                frame[at] = rng.byte();
            }
            3 => {
                let keep = 14 + rng.below(frame.len() - 13);
                frame.truncate(keep);
            }
            _ => {
                let extra = 1 + rng.below(16);
                frame.extend(rng.bytes(extra));
            }
        }
        if frame.len() <= 14 {
            break;
        }
    }
}

/// A case: a conversation of about `length` frames among a few flows.
pub fn conversation(rng: &mut Rng, length: usize) -> Vec<Step> {
    let flows: Vec<Flow> = (0..=rng.below(5)).map(|_| Flow::random(rng)).collect();
    // IP packets sent so far, for ICMP errors to quote.
    let mut sent: Vec<(Vec<u8>, bool)> = Vec::new();
    let mut steps = Vec::new();
    while steps.len() < length {
        let flow = *rng.pick(&flows);
        let mut frames = Vec::new();
        match rng.below(20) {
            0..=12 => {
                let forward = rng.chance(60);
                let (src, dst) = if forward { (flow.client, flow.server) } else { (flow.server, flow.client) };
                let datagram = Datagram { src, dst, protocol: flow.protocol, body: flow.transport(rng, forward) };
                sent.push((ip_packet(&datagram, &Dress::default(), None, &datagram.body), flow.v4()));
                frames_of(rng, &datagram, &mut frames);
            }
            13..=15 if !sent.is_empty() => {
                let (quoted, v4) = sent[rng.below(sent.len())].clone();
                let pool: &[&str] = if v4 { &V4 } else { &V6 };
                let from = address(rng.pick::<&str>(pool));
                let datagram = icmp_error(rng, from, &quoted, v4);
                frames_of(rng, &datagram, &mut frames);
            }
            16 => {
                // Not IP: ARP, LLDP, anything.
                let any = rng.u16();
                let ether_type = *rng.pick(&[0x0806u16, 0x88cc, 0x86dd, 0x0800, any]);
                let length = rng.below(60);
                let payload = rng.bytes(length);
                frames.push(ethernet(rng, ether_type, &payload));
            }
            _ => {
                let forward = rng.chance(60);
                let (src, dst) = if forward { (flow.client, flow.server) } else { (flow.server, flow.client) };
                let datagram = Datagram { src, dst, protocol: flow.protocol, body: flow.transport(rng, forward) };
                frames_of(rng, &datagram, &mut frames);
                for frame in &mut frames {
                    mutate(rng, frame);
                }
            }
        }
        for frame in frames {
            let from_host = frame_from_host(&frame);
            let hook = match rng.below(10) {
                _ if skb_test_run_refuses(&frame) => Hook::Xdp,
                0..=5 => Hook::Xdp,
                6..=7 => Hook::TcIngress,
                // The node's own packets go out at egress; now and then another's.
                _ if from_host || rng.chance(20) => Hook::TcEgress,
                _ => Hook::Xdp,
            };
            steps.push(Step { hook, frame });
        }
    }
    steps
}

/// `BPF_PROG_TEST_RUN` refuses (`EINVAL`) a frame for a TC program when
/// its Ethernet type is IPv4 or IPv6 and the IP header is incomplete: the
/// kernel reads it to build the socket buffer. Such frames go through XDP.
#[must_use]
pub fn skb_test_run_refuses(frame: &[u8]) -> bool {
    let after_ethernet = frame.len().saturating_sub(14);
    match frame.get(12..14) {
        Some([0x08, 0x00]) => after_ethernet < 20,
        Some([0x86, 0xdd]) => after_ethernet < 40,
        _ => false,
    }
}

/// Whether an untagged frame's source is one of the node's addresses.
fn frame_from_host(frame: &[u8]) -> bool {
    let source = match frame.get(12..14) {
        Some([0x08, 0x00]) => frame.get(26..30).map(|b| IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).unwrap()))),
        Some([0x86, 0xdd]) => frame.get(22..38).map(|b| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap()))),
        _ => None,
    };
    source.is_some_and(|source| HOST.iter().any(|host| address(host) == source))
}
