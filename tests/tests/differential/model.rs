//! The reference datapath: what the kernel programs must do with a frame,
//! written from their specification (the README's *Datapath*, the doc
//! comments of `enforcer-ebpf`) as plain slice-reading Rust, with every
//! policy question put to the policy crate's reference evaluator. It keeps
//! the state the programs keep (connections, first fragments) in hash maps
//! and none of their caches: caches must never change a verdict.
//!
//! Timeouts are left out: a case runs for milliseconds, far below the
//! shortest (10 s), and starts from a clean slate.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enforcer_common::{Direction, DropReason};

use lab::frames::{ACK, ICMP, ICMPV6, SYN, TCP, UDP};

/// What a program does with a frame, and which counter it moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop(DropReason),
    Audit(DropReason),
    /// Passed uncounted: forwarded traffic seen again at egress.
    Ignored,
}

/// A packet's addresses, protocol and ports, as conntrack keys it. ICMP
/// echoes carry their identifier as the requester's port: a request is
/// (id, 0), its reply (0, id), so a reply's tuple is the request's reversed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

impl Tuple {
    fn reversed(self) -> Self {
        Self { src: self.dst, dst: self.src, src_port: self.dst_port, dst_port: self.src_port, ..self }
    }
}

/// What the verdict logic makes of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TCP, UDP, an echo request: judged, and opens a connection if allowed.
    Trackable,
    /// An echo reply: passes as the reply of a tracked request, else by policy.
    EchoReply,
    /// An ICMP error quoting this tuple: passes if it is tracked, else by policy.
    IcmpError(Tuple),
    /// Judged by policy, never tracked.
    Untracked,
    /// IPv6 neighbour discovery with hop limit 255: always passes.
    NeighbourDiscovery,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    Whole,
    /// The first fragment of datagram `id`.
    First(u32),
    /// A later one: no transport header, ports 0.
    Later(u32),
}

/// An IP packet as read from a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub tuple: Tuple,
    /// What the policy matches: the destination port, `type << 8 | code` for ICMP.
    pub policy_port: u16,
    pub tcp_flags: u8,
    pub kind: Kind,
    pub fragment: Fragment,
}

/// How a frame reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// Not IPv4 or IPv6 behind at most two VLAN tags (or shorter than an
    /// Ethernet header): passes.
    NotIp,
    /// Headers that contradict each other or the frame: dropped.
    Malformed,
    Ip(Packet),
}

fn u16_at(frame: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?))
}

fn v4_at(frame: &[u8], at: usize) -> IpAddr {
    let octets: [u8; 4] = frame[at..at + 4].try_into().expect("four bytes");
    IpAddr::V4(Ipv4Addr::from(octets))
}

fn v6_at(frame: &[u8], at: usize) -> IpAddr {
    let octets: [u8; 16] = frame[at..at + 16].try_into().expect("sixteen bytes");
    IpAddr::V6(Ipv6Addr::from(octets))
}

fn is_vlan_tag(ether_type: u16) -> bool {
    matches!(ether_type, 0x8100 | 0x88a8)
}

/// Reads a frame: Ethernet, at most two VLAN tags, IPv4 (options skipped)
/// or IPv6 (at most eight extension headers), the transport header. Every
/// length field must fit inside the frame and inside the one around it.
#[must_use]
pub fn read(frame: &[u8]) -> Reading {
    let Some(mut ether_type) = u16_at(frame, 12) else {
        return Reading::NotIp;
    };
    let mut l3 = 14;
    for _ in 0..2 {
        if !is_vlan_tag(ether_type) {
            break;
        }
        let Some(inner) = u16_at(frame, l3 + 2) else {
            return Reading::Malformed;
        };
        ether_type = inner;
        l3 += 4;
    }
    let read = match ether_type {
        0x0800 => read_ipv4(frame, l3),
        0x86dd => read_ipv6(frame, l3),
        tag if is_vlan_tag(tag) => None,
        _ => return Reading::NotIp,
    };
    read.map_or(Reading::Malformed, Reading::Ip)
}

/// A packet with its addresses and protocol, nothing else known yet.
fn blank(src: IpAddr, dst: IpAddr, protocol: u8) -> Packet {
    Packet {
        tuple: Tuple { src, dst, protocol, src_port: 0, dst_port: 0 },
        policy_port: 0,
        tcp_flags: 0,
        kind: Kind::Untracked,
        fragment: Fragment::Whole,
    }
}

fn read_ipv4(frame: &[u8], l3: usize) -> Option<Packet> {
    let header = frame.get(l3..l3 + 20)?;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if header[0] >> 4 != 4 || header_len < 20 || total_len < header_len || l3 + total_len > frame.len() {
        return None;
    }
    let mut packet = blank(v4_at(frame, l3 + 12), v4_at(frame, l3 + 16), header[9]);
    let fragment_field = u16::from_be_bytes([header[6], header[7]]);
    let id = u32::from(u16::from_be_bytes([header[4], header[5]]));
    let offset = usize::from(fragment_field & 0x1fff) * 8;
    if offset != 0 {
        return later_fragment(packet, id, offset);
    }
    if fragment_field & 0x2000 != 0 {
        packet.fragment = Fragment::First(id);
    }
    read_transport(frame, l3 + header_len, l3 + total_len, packet)
}

/// A later fragment must not start inside a TCP header (RFC 1858).
fn later_fragment(mut packet: Packet, id: u32, offset: usize) -> Option<Packet> {
    if packet.tuple.protocol == TCP && offset < 20 {
        return None;
    }
    packet.fragment = Fragment::Later(id);
    Some(packet)
}

fn read_ipv6(frame: &[u8], l3: usize) -> Option<Packet> {
    let header = frame.get(l3..l3 + 40)?;
    let end = l3 + 40 + usize::from(u16::from_be_bytes([header[4], header[5]]));
    if header[0] >> 4 != 6 || end > frame.len() {
        return None;
    }
    let hop_limit = header[7];
    let mut packet = blank(v6_at(frame, l3 + 8), v6_at(frame, l3 + 24), 0);
    let mut next = header[6];
    let mut at = l3 + 40;
    for _ in 0..8 {
        if !matches!(next, 0 | 43 | 44 | 51 | 60) {
            packet.tuple.protocol = next;
            let mut packet = read_transport(frame, at, end, packet)?;
            if next == ICMPV6 && hop_limit == 255 && (133..=137).contains(&(packet.policy_port >> 8)) {
                packet.kind = Kind::NeighbourDiscovery;
            }
            return Some(packet);
        }
        // Every extension header has (next header, length) first, and is at
        // least eight bytes long.
        let extension = frame.get(at..at + 8)?;
        let length = match next {
            51 => (usize::from(extension[1]) + 2) * 4,
            44 => {
                let field = u16::from_be_bytes([extension[2], extension[3]]);
                let id = u32::from_be_bytes([extension[4], extension[5], extension[6], extension[7]]);
                let offset = usize::from(field >> 3) * 8;
                if offset != 0 {
                    // The fragment header names the protocol of what follows it.
                    packet.tuple.protocol = extension[0];
                    return later_fragment(packet, id, offset);
                }
                if field & 1 != 0 {
                    packet.fragment = Fragment::First(id);
                }
                8
            }
            _ => (usize::from(extension[1]) + 1) * 8,
        };
        next = extension[0];
        at += length;
        if at > end {
            return None;
        }
    }
    None
}

/// The transport header at `at`, which must fit in the frame and before `end`.
fn read_transport(frame: &[u8], at: usize, end: usize, mut packet: Packet) -> Option<Packet> {
    match packet.tuple.protocol {
        TCP => {
            let header = frame.get(at..at + 20)?;
            let data_offset = usize::from(header[12] >> 4) * 4;
            if data_offset < 20 || at + data_offset > end {
                return None;
            }
            packet.tuple.src_port = u16::from_be_bytes([header[0], header[1]]);
            packet.tuple.dst_port = u16::from_be_bytes([header[2], header[3]]);
            packet.policy_port = packet.tuple.dst_port;
            packet.tcp_flags = header[13];
            packet.kind = Kind::Trackable;
        }
        UDP => {
            let header = frame.get(at..at + 8)?;
            if at + 8 > end {
                return None;
            }
            packet.tuple.src_port = u16::from_be_bytes([header[0], header[1]]);
            packet.tuple.dst_port = u16::from_be_bytes([header[2], header[3]]);
            packet.policy_port = packet.tuple.dst_port;
            packet.kind = Kind::Trackable;
        }
        ICMP | ICMPV6 => {
            let header = frame.get(at..at + 8)?;
            if at + 8 > end {
                return None;
            }
            let version_4 = packet.tuple.protocol == ICMP;
            let (icmp_type, id) = (header[0], u16::from_be_bytes([header[4], header[5]]));
            packet.policy_port = u16::from_be_bytes([header[0], header[1]]);
            let (request, reply) = if version_4 { (8, 0) } else { (128, 129) };
            let error = if version_4 { matches!(icmp_type, 3 | 11 | 12) } else { (1..=4).contains(&icmp_type) };
            if icmp_type == request {
                packet.tuple.src_port = id;
                packet.kind = Kind::Trackable;
            } else if icmp_type == reply {
                packet.tuple.dst_port = id;
                packet.kind = Kind::EchoReply;
            } else if error
                && packet.fragment == Fragment::Whole
                && let Some(quoted) = read_quote(frame, at + 8, version_4)
            {
                packet.kind = Kind::IcmpError(quoted);
            }
        }
        _ => {}
    }
    Some(packet)
}

/// The tuple of the packet an ICMP error quotes: an IP header of the
/// error's own version (`ICMPv4` quotes are checked for version and header
/// length; no extension headers are walked), then the first eight bytes
/// of its transport header, which may run past the error's own length.
/// `None` if too short, or not TCP, UDP or an echo.
fn read_quote(frame: &[u8], at: usize, version_4: bool) -> Option<Tuple> {
    let (mut tuple, transport) = if version_4 {
        let header = frame.get(at..at + 20)?;
        let header_len = usize::from(header[0] & 0x0f) * 4;
        if header[0] >> 4 != 4 || header_len < 20 {
            return None;
        }
        (blank(v4_at(frame, at + 12), v4_at(frame, at + 16), header[9]).tuple, at + header_len)
    } else {
        let header = frame.get(at..at + 40)?;
        (blank(v6_at(frame, at + 8), v6_at(frame, at + 24), header[6]).tuple, at + 40)
    };
    let ports = frame.get(transport..transport + 8)?;
    match tuple.protocol {
        TCP | UDP => {
            tuple.src_port = u16::from_be_bytes([ports[0], ports[1]]);
            tuple.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
        }
        ICMP | ICMPV6 => {
            let id = u16::from_be_bytes([ports[4], ports[5]]);
            match ports[0] {
                8 | 128 => tuple.src_port = id,
                0 | 129 => tuple.dst_port = id,
                _ => return None,
            }
        }
        _ => return None,
    }
    Some(tuple)
}

/// A tracked connection's entry for one direction of it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The originator's side: it only stands for the policy generation it
    /// was admitted under. The reply side holds across generations.
    original: bool,
    /// Where the side's packets are judged.
    hook: Direction,
    generation: u32,
    /// Admitted only by audit mode, with the policy's reason (originator side).
    audit: Option<DropReason>,
}

/// What a conntrack lookup says.
enum Hit {
    Pass,
    Audit(DropReason),
    Miss,
    /// An entry for another hook or an older generation: the policy decides,
    /// and a denial forgets the connection.
    Stale,
}

/// Addresses cut off from everything, and the TCP ports on which the node
/// may still open connections to them.
#[derive(Debug, Clone, Default)]
pub struct Quarantine {
    pub nets: Vec<ipnet::IpNet>,
    pub exempt_ports: BTreeSet<u16>,
}

impl Quarantine {
    fn holds(&self, addr: IpAddr) -> bool {
        self.nets.iter().any(|net| net.contains(&addr))
    }

    /// The node's TCP connection on an exempt `port` (not an ICMP error,
    /// not a fragment: a packet with a TCP header).
    fn exempt(&self, packet: &Packet, port: u16) -> bool {
        packet.tuple.protocol == TCP && packet.kind == Kind::Trackable && self.exempt_ports.contains(&port)
    }
}

/// The reference datapath's state and policy.
pub struct Reference {
    policy: policy::Policy,
    audit_all: bool,
    quarantine: Quarantine,
    hosts: BTreeSet<IpAddr>,
    generation: u32,
    connections: HashMap<Tuple, Entry>,
    /// First fragments' verdicts by (source, destination, id, protocol).
    fragments: HashMap<(IpAddr, IpAddr, u32, u8), Verdict>,
}

impl Reference {
    #[must_use]
    pub fn new(
        policy: policy::Policy,
        audit_all: bool,
        quarantine: Quarantine,
        hosts: BTreeSet<IpAddr>,
        generation: u32,
    ) -> Self {
        Self {
            policy,
            audit_all,
            quarantine,
            hosts,
            generation,
            connections: HashMap::new(),
            fragments: HashMap::new(),
        }
    }

    /// What the quarantine says of a packet entering the node: dropped if
    /// its destination is quarantined (the node's own addresses never are,
    /// even inside a quarantined prefix) or its source is, unless the source
    /// answers the node from an exempt port (anything but a bare SYN:
    /// `opening`).
    fn quarantine_ingress(&self, packet: &Packet, opening: bool) -> Option<Verdict> {
        let tuple = packet.tuple;
        if self.quarantine.holds(tuple.dst) && !self.hosts.contains(&tuple.dst) {
            return Some(Verdict::Drop(DropReason::Quarantine));
        }
        if !self.quarantine.holds(tuple.src) {
            return None;
        }
        if !opening && self.quarantine.exempt(packet, tuple.src_port) && self.hosts.contains(&tuple.dst) {
            Some(Verdict::Pass)
        } else {
            Some(Verdict::Drop(DropReason::Quarantine))
        }
    }

    /// What the quarantine says of a packet the node sends.
    fn quarantine_egress(&self, packet: &Packet) -> Option<Verdict> {
        if !self.quarantine.holds(packet.tuple.dst) {
            None
        } else if self.quarantine.exempt(packet, packet.tuple.dst_port) {
            Some(Verdict::Pass)
        } else {
            Some(Verdict::Drop(DropReason::Quarantine))
        }
    }

    /// A new policy, as the kernel has it at `generation`; state is kept.
    pub fn switch(&mut self, policy: policy::Policy, generation: u32) {
        self.policy = policy;
        self.generation = generation;
    }

    fn evaluate(&self, packet: &Packet, orphan: bool) -> Verdict {
        let evaluator = policy::Evaluator::new(&self.policy)
            .with_host_addresses(self.hosts.iter().copied())
            .with_audit(self.audit_all);
        let question = policy::Packet {
            src: packet.tuple.src,
            dst: packet.tuple.dst,
            protocol: packet.tuple.protocol,
            port: packet.policy_port,
        };
        let decision =
            if orphan { evaluator.evaluate_orphan_fragment(&question) } else { evaluator.evaluate(&question) };
        match decision.verdict {
            policy::Verdict::Forward => Verdict::Pass,
            policy::Verdict::Drop(reason) => Verdict::Drop(reason),
            policy::Verdict::Audit(reason) => Verdict::Audit(reason),
        }
    }

    fn lookup(&self, tuple: &Tuple, hook: Direction) -> Hit {
        match self.connections.get(tuple) {
            None => Hit::Miss,
            Some(entry) if entry.hook != hook || (entry.original && entry.generation != self.generation) => Hit::Stale,
            Some(Entry { original: true, audit: Some(reason), .. }) => Hit::Audit(*reason),
            Some(_) => Hit::Pass,
        }
    }

    /// The verdict for `frame` seen at `hook`, with the state it leaves.
    pub fn judge(&mut self, hook: Direction, frame: &[u8]) -> Verdict {
        let packet = match read(frame) {
            Reading::NotIp => return Verdict::Pass,
            Reading::Malformed => return Verdict::Drop(DropReason::Malformed),
            Reading::Ip(packet) => packet,
        };
        if packet.kind == Kind::NeighbourDiscovery {
            return Verdict::Pass;
        }
        let verdict = self.judge_ip(&packet, hook);
        if let Fragment::First(id) = packet.fragment
            && verdict != Verdict::Ignored
        {
            let t = packet.tuple;
            self.fragments.insert((t.src, t.dst, id, t.protocol), verdict);
        }
        verdict
    }

    fn judge_ip(&mut self, packet: &Packet, hook: Direction) -> Verdict {
        let tuple = packet.tuple;
        let tracked_kind = matches!(packet.kind, Kind::Trackable | Kind::EchoReply);
        let ingress = hook == Direction::Ingress;
        let opening =
            ingress && packet.kind == Kind::Trackable && tuple.protocol == TCP && packet.tcp_flags & (SYN | ACK) == SYN;
        let quarantine = !self.quarantine.nets.is_empty();
        if quarantine
            && ingress
            && let Some(verdict) = self.quarantine_ingress(packet, opening)
        {
            return verdict;
        }
        let mut stale = false;
        let tracked = |reference: &Self, stale: &mut bool| match reference.lookup(&tuple, hook) {
            Hit::Pass => Some(Verdict::Pass),
            Hit::Audit(reason) => Some(Verdict::Audit(reason)),
            Hit::Stale => {
                *stale = true;
                None
            }
            Hit::Miss => None,
        };
        if ingress
            && tracked_kind
            && !opening
            && let Some(verdict) = tracked(self, &mut stale)
        {
            return verdict;
        }
        let from_host = self.hosts.contains(&tuple.src);
        if quarantine
            && hook == Direction::Egress
            && from_host
            && let Some(verdict) = self.quarantine_egress(packet)
        {
            return verdict;
        }
        match hook {
            Direction::Ingress if from_host => return Verdict::Drop(DropReason::HostSpoofed),
            Direction::Egress if !from_host => return Verdict::Ignored,
            Direction::Egress if tracked_kind => {
                if let Some(verdict) = tracked(self, &mut stale) {
                    return verdict;
                }
            }
            _ => {}
        }
        if let Fragment::Later(id) = packet.fragment {
            if let Some(verdict) = self.fragments.get(&(tuple.src, tuple.dst, id, tuple.protocol)) {
                return *verdict;
            }
            return self.evaluate(packet, true);
        }
        if let Kind::IcmpError(quoted) = packet.kind
            && self.connections.contains_key(&quoted)
        {
            return Verdict::Pass;
        }
        let verdict = self.evaluate(packet, false);
        if opening
            && !matches!(verdict, Verdict::Drop(_))
            && let Some(verdict) = tracked(self, &mut stale)
        {
            return verdict;
        }
        let trackable = packet.kind == Kind::Trackable;
        // Replies come back at ingress, unless the node itself answers.
        let reply_hook = if self.hosts.contains(&tuple.dst) { Direction::Egress } else { Direction::Ingress };
        let admit = |reference: &mut Self, audit: Option<DropReason>| {
            let generation = reference.generation;
            reference.connections.insert(tuple, Entry { original: true, hook, generation, audit });
            let reply = Entry { original: false, hook: reply_hook, generation, audit: None };
            reference.connections.insert(tuple.reversed(), reply);
        };
        match verdict {
            Verdict::Pass | Verdict::Audit(_) if trackable => {
                let audit = if let Verdict::Audit(reason) = verdict { Some(reason) } else { None };
                admit(self, audit);
            }
            Verdict::Drop(_) if trackable && stale => {
                self.connections.remove(&tuple);
                self.connections.remove(&tuple.reversed());
            }
            _ => {}
        }
        verdict
    }
}
