//! The packet table: hundreds of crafted frames through the real XDP and TC
//! programs (`BPF_PROG_TEST_RUN`), each with its expected verdict and
//! reason, plus truncations of each at every byte boundary, stateful
//! sequences (conntrack, fragments, ICMP errors, audit). Random and
//! mutated frames against the reference are `differential.rs`'s. Needs
//! root; run through `cargo xtask test`.

mod kernel;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use Observed::{Audit, Drop, Ignored, Pass};
use enforcer::datapath::{Hook, clock_tick_ns};
use enforcer_common::DropReason::{self, DefaultDeny, DenyRule, FragmentUnknown, HostSpoofed, Malformed, Quarantine};
use enforcer_common::{FAMILY_IPV4, FAMILY_IPV6, FlowKey, timeouts};
use kernel::{Kernel, Observed};
use lab::frames::{
    self, ACK, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, Extension, FIN, ICMP, ICMPV6, Ipv4, Ipv6, SYN, TCP,
    UDP, echo, icmp, tcp, udp,
};

const POLICY: &str = r#"
apiVersion: bulkhead/v1
kind: SegmentPolicy
metadata: {name: table}
spec:
  identities:
    - name: web
      labels: {tier: web}
      addresses: ["10.1.0.0/24", "fd00:1::/64"]
    - name: db
      labels: {tier: db}
      addresses: ["10.2.0.10", "fd00:2::10"]
    - name: bulk
      addresses: ["10.4.0.10", "fd00:4::10"]
    - name: sandbox
      mode: audit
      addresses: ["10.3.0.0/24", "fd00:3::/64"]
  rules:
    - name: web-to-db
      from: [{identity: web}]
      to: [{identity: db}]
      ports: ["tcp", "53/udp", "icmp/echo-request", "icmpv6/echo-request"]
    - name: no-ssh-to-db
      action: deny
      from: [{identity: web}]
      to: [{identity: db}]
      ports: ["22/tcp"]
    - name: web-to-bulk
      from: [{identity: web}]
      to: [{identity: bulk}]
      ports: ["udp"]
    - name: host-to-db
      from: [{identity: host}]
      to: [{identity: db}]
      ports: ["5432/tcp"]
    - name: web-to-host
      from: [{identity: web}]
      to: [{identity: host}]
      ports: ["22/tcp"]
"#;

/// Addresses by role, per family.
#[derive(Clone, Copy)]
struct Hosts {
    web: IpAddr,
    db: IpAddr,
    bulk: IpAddr,
    sandbox: IpAddr,
    world: IpAddr,
    host: IpAddr,
}

const V4: Hosts = Hosts {
    web: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 5)),
    db: IpAddr::V4(Ipv4Addr::new(10, 2, 0, 10)),
    bulk: IpAddr::V4(Ipv4Addr::new(10, 4, 0, 10)),
    sandbox: IpAddr::V4(Ipv4Addr::new(10, 3, 0, 7)),
    world: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
    host: IpAddr::V4(Ipv4Addr::new(10, 9, 0, 1)),
};

const V6: Hosts = Hosts {
    web: IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 5)),
    db: IpAddr::V6(Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0x10)),
    bulk: IpAddr::V6(Ipv6Addr::new(0xfd00, 4, 0, 0, 0, 0, 0, 0x10)),
    sandbox: IpAddr::V6(Ipv6Addr::new(0xfd00, 3, 0, 0, 0, 0, 0, 7)),
    world: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    host: IpAddr::V6(Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 1)),
};

fn kernel(audit_all: bool) -> Kernel {
    let mut kernel = Kernel::load(POLICY, audit_all);
    let hosts: BTreeSet<IpAddr> = [V4.host, V6.host].into_iter().collect();
    kernel.datapath.set_host_addresses(&hosts, &kernel.engine).unwrap();
    kernel
}

fn is_v4(hosts: &Hosts) -> bool {
    hosts.web.is_ipv4()
}

fn echo_request(hosts: &Hosts) -> (u8, u8) {
    if is_v4(hosts) { (ICMP, 8) } else { (ICMPV6, 128) }
}

/// How a base packet is wrapped on the wire.
#[derive(Clone, Copy, Debug)]
enum Wrapping {
    Plain,
    Vlan,
    QinQ,
    /// IPv4 options (a 40-byte maximum) or a chain of IPv6 extension headers.
    Options,
}

/// Builds a frame from `src` to `dst` with the L4 bytes, wrapped as asked.
fn frame(src: IpAddr, dst: IpAddr, protocol: u8, l4: Vec<u8>, wrapping: Wrapping) -> Vec<u8> {
    let (ether_type, l3) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut packet = Ipv4::new(s, d, protocol, l4);
            if let Wrapping::Options = wrapping {
                // Record Route with room for nine addresses, then end of options.
                let mut options = vec![7, 39, 4];
                options.resize(39, 0);
                options.push(0);
                packet.options = options;
            }
            (ETH_P_IPV4, packet.bytes())
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut packet = Ipv6::new(s, d, protocol, l4);
            if let Wrapping::Options = wrapping {
                packet.extensions = vec![
                    Extension::HopByHop,
                    Extension::DestinationOptions,
                    Extension::Routing,
                    Extension::DestinationOptions,
                ];
            }
            (ETH_P_IPV6, packet.bytes())
        }
        _ => panic!("mixed families"),
    };
    let tags: &[u16] = match wrapping {
        Wrapping::Vlan => &[ETH_P_8021Q],
        Wrapping::QinQ => &[ETH_P_8021AD, ETH_P_8021Q],
        Wrapping::Plain | Wrapping::Options => &[],
    };
    frames::ethernet(tags, ether_type, &l3)
}

/// A named base case: (what, src, dst, protocol, L4 bytes, expected at ingress).
type Case = (&'static str, IpAddr, IpAddr, u8, Vec<u8>, Observed);

fn base_cases(h: &Hosts) -> Vec<Case> {
    let (icmp_proto, request) = echo_request(h);
    let timestamp = if is_v4(h) { 13 } else { 130 };
    vec![
        ("allowed tcp", h.web, h.db, TCP, tcp(40000, 5432, SYN), Pass),
        ("allowed tcp, any port", h.web, h.db, TCP, tcp(40000, 8443, SYN), Pass),
        ("deny rule beats allow", h.web, h.db, TCP, tcp(40000, 22, SYN), Drop(DenyRule)),
        ("no rule, reverse direction", h.db, h.web, TCP, tcp(40000, 80, SYN), Drop(DefaultDeny)),
        ("world to db", h.world, h.db, TCP, tcp(40000, 5432, SYN), Drop(DefaultDeny)),
        ("allowed udp", h.web, h.db, UDP, udp(40000, 53, b"q"), Pass),
        ("udp port not allowed", h.web, h.db, UDP, udp(40000, 54, b"q"), Drop(DefaultDeny)),
        ("udp any port to bulk", h.web, h.bulk, UDP, udp(40000, 9999, b"q"), Pass),
        ("tcp to bulk not allowed", h.web, h.bulk, TCP, tcp(40000, 9999, SYN), Drop(DefaultDeny)),
        ("allowed echo request", h.web, h.db, icmp_proto, echo(request, 7), Pass),
        ("icmp type not allowed", h.web, h.db, icmp_proto, icmp(timestamp, 0, [0; 4], &[0; 12]), Drop(DefaultDeny)),
        ("audited identity", h.web, h.sandbox, TCP, tcp(40000, 80, SYN), Audit(DefaultDeny)),
        ("host source at ingress", h.host, h.db, TCP, tcp(40000, 5432, SYN), Drop(HostSpoofed)),
        ("to the node, allowed", h.web, h.host, TCP, tcp(40000, 22, SYN), Pass),
        ("to the node, not allowed", h.web, h.host, TCP, tcp(40000, 23, SYN), Drop(DefaultDeny)),
        ("other protocol", h.web, h.db, 47, vec![0; 8], Drop(DefaultDeny)),
    ]
}

/// Bytes of the transport header a verdict needs, for consistent truncations.
fn l4_header_len(protocol: u8) -> usize {
    match protocol {
        TCP => 20,
        UDP | ICMP | ICMPV6 => 8,
        _ => 0,
    }
}

#[test]
fn packet_table_every_shape_and_wrapping() {
    let mut kernel = kernel(false);
    let mut checked = 0;
    for hosts in [V4, V6] {
        for wrapping in [Wrapping::Plain, Wrapping::Vlan, Wrapping::QinQ, Wrapping::Options] {
            for (what, src, dst, protocol, l4, expected) in base_cases(&hosts) {
                kernel.datapath.clear_state().unwrap();
                let frame = frame(src, dst, protocol, l4, wrapping);
                assert_eq!(kernel.ingress(&frame), expected, "{what} ({src} -> {dst}, {wrapping:?})");
                checked += 1;
            }
        }
    }
    assert!(checked >= 128, "{checked} cases");
}

#[test]
fn tc_ingress_judges_exactly_like_xdp() {
    // `--ingress-hook tc` runs the same verdict logic on a socket buffer:
    // every shape, wrapping and truncation must get the XDP program's verdict
    // and move the same counter.
    let mut kernel = kernel(false);
    let mut checked = 0;
    for hosts in [V4, V6] {
        for wrapping in [Wrapping::Plain, Wrapping::Vlan, Wrapping::QinQ, Wrapping::Options] {
            for (what, src, dst, protocol, l4, expected) in base_cases(&hosts) {
                let full = frame(src, dst, protocol, l4, wrapping);
                kernel.datapath.clear_state().unwrap();
                assert_eq!(kernel.run(Hook::TcIngress, &full), expected, "{what} ({src} -> {dst}, {wrapping:?})");
                let cut = full.len() - 1;
                kernel.datapath.clear_state().unwrap();
                assert_eq!(kernel.run(Hook::TcIngress, &full[..cut]), Drop(Malformed), "{what} cut at {cut}");
                checked += 2;
            }
        }
    }
    assert!(checked >= 256, "{checked} cases");
}

#[test]
fn every_truncation_is_malformed_never_aborted() {
    // A frame cut short anywhere past the Ethernet header contradicts its own
    // IP length field: always `malformed`, whatever the policy would say.
    let mut kernel = kernel(false);
    let mut checked = 0;
    for hosts in [V4, V6] {
        for wrapping in [Wrapping::Plain, Wrapping::QinQ, Wrapping::Options] {
            for (what, src, dst, protocol, l4, _) in base_cases(&hosts) {
                let full = frame(src, dst, protocol, l4, wrapping);
                for cut in 14..full.len() {
                    kernel.datapath.clear_state().unwrap();
                    assert_eq!(kernel.ingress(&full[..cut]), Drop(Malformed), "{what}, {wrapping:?}, cut at {cut}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 1000, "{checked} truncations");
}

#[test]
fn consistent_truncations_need_the_whole_transport_header() {
    // Length fields rewritten to match: the verdict stands once the
    // transport header is complete, and is `malformed` before that.
    let mut kernel = kernel(false);
    for hosts in [V4, V6] {
        for (what, src, dst, protocol, l4, expected) in base_cases(&hosts) {
            for keep in 0..=l4.len() {
                kernel.datapath.clear_state().unwrap();
                let frame = frames::simple(src, dst, protocol, l4[..keep].to_vec());
                let want = if keep < l4_header_len(protocol) { Drop(Malformed) } else { expected };
                assert_eq!(kernel.ingress(&frame), want, "{what}, transport cut to {keep} bytes");
            }
        }
    }
}

#[test]
fn malformed_headers() {
    let mut kernel = kernel(false);
    let (IpAddr::V4(web), IpAddr::V4(db)) = (V4.web, V4.db) else { unreachable!() };
    let base = Ipv4::new(web, db, TCP, tcp(1, 5432, SYN));
    let cases = [
        ("IHL below 5", Ipv4 { ihl_override: Some(4), ..base.clone() }),
        ("IHL beyond the packet", Ipv4 { ihl_override: Some(15), ..base.clone() }),
        ("total length beyond the frame", Ipv4 { total_length_override: Some(200), ..base.clone() }),
        ("total length shorter than the header", Ipv4 { total_length_override: Some(10), ..base.clone() }),
    ];
    for (what, packet) in cases {
        assert_eq!(kernel.ingress(&frames::v4(&packet)), Drop(Malformed), "{what}");
    }
    let mut bad_offset = tcp(1, 5432, SYN);
    bad_offset[12] = 4 << 4;
    assert_eq!(kernel.ingress(&frames::simple(V4.web, V4.db, TCP, bad_offset)), Drop(Malformed), "TCP data offset 4");

    let mut version = frames::v4(&base);
    version[14] = 0x55;
    assert_eq!(kernel.ingress(&version), Drop(Malformed), "IP version 5");

    let (IpAddr::V6(web6), IpAddr::V6(db6)) = (V6.web, V6.db) else { unreachable!() };
    let long = Ipv6 { payload_length_override: Some(500), ..Ipv6::new(web6, db6, TCP, tcp(1, 5432, SYN)) };
    assert_eq!(kernel.ingress(&frames::v6(&long)), Drop(Malformed), "IPv6 payload length beyond the frame");
    let mut chain = Ipv6::new(web6, db6, TCP, tcp(1, 5432, SYN));
    chain.extensions = vec![Extension::DestinationOptions; 9];
    assert_eq!(kernel.ingress(&frames::v6(&chain)), Drop(Malformed), "nine extension headers");

    let tagged = frames::ethernet(&[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q], ETH_P_IPV4, &base.bytes());
    assert_eq!(kernel.ingress(&tagged), Drop(Malformed), "three VLAN tags");
    assert_eq!(kernel.ingress(&frames::arp()), Pass, "ARP passes");
    let tagged_arp = frames::ethernet(&[ETH_P_8021Q], 0x0806, &frames::arp()[14..]);
    assert_eq!(kernel.ingress(&tagged_arp), Pass, "tagged ARP passes");
}

#[test]
fn tcp_connection_replies_pass_and_reverse_opens_do_not() {
    let mut kernel = kernel(false);
    for h in [V4, V6] {
        kernel.datapath.clear_state().unwrap();
        let f = |src, dst, l4| frames::simple(src, dst, TCP, l4);
        assert_eq!(kernel.ingress(&f(h.web, h.db, tcp(40000, 5432, SYN))), Pass);
        // Both directions are tracked.
        for key in [flow_key(h.web, h.db, 40000, 5432, TCP), flow_key(h.db, h.web, 5432, 40000, TCP)] {
            assert!(kernel.datapath.conntrack_entry(&key).unwrap().is_some(), "{key:?} tracked");
        }
        assert_eq!(kernel.ingress(&f(h.db, h.web, tcp(5432, 40000, SYN | ACK))), Pass, "SYN-ACK reply");
        assert_eq!(kernel.ingress(&f(h.web, h.db, tcp(40000, 5432, ACK))), Pass);
        assert_eq!(kernel.ingress(&f(h.db, h.web, tcp(5432, 40000, ACK))), Pass, "data reply");
        // A bare SYN opens a connection, so the policy judges it before
        // conntrack is asked, even on the tuple of a tracked reply; the
        // connection it would have joined is left as it was.
        let reply_open = f(h.db, h.web, tcp(5432, 40000, SYN));
        assert_eq!(kernel.ingress(&reply_open), Drop(DefaultDeny), "SYN on a reply tuple");
        assert_eq!(kernel.ingress(&f(h.db, h.web, tcp(5432, 40000, ACK))), Pass, "the reply still passes");
        assert_eq!(kernel.ingress(&f(h.db, h.web, tcp(5432, 40001, SYN))), Drop(DefaultDeny), "other port");
        assert_eq!(kernel.ingress(&f(h.db, h.web, tcp(80, 40000, SYN))), Drop(DefaultDeny), "new connection back");
    }
}

/// The conntrack key of a packet (IPv4 addresses fill the first four bytes).
fn flow_key(src: IpAddr, dst: IpAddr, src_port: u16, dst_port: u16, protocol: u8) -> FlowKey {
    let octets = |addr: IpAddr| match addr {
        IpAddr::V4(v4) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            bytes
        }
        IpAddr::V6(v6) => v6.octets(),
    };
    let family = if src.is_ipv4() { FAMILY_IPV4 } else { FAMILY_IPV6 };
    FlowKey { src_addr: octets(src), dst_addr: octets(dst), src_port, dst_port, protocol, family, padding: [0; 2] }
}

/// The programs' clock is jiffies times the tick the daemon measured: it
/// must keep real time, or state would expire early or, worse, late.
#[test]
fn idle_flows_expire_on_a_clock_that_keeps_real_time() {
    let mut kernel = kernel(false);
    let h = V4;
    let f = |src, dst, l4| frames::simple(src, dst, TCP, l4);
    let reply_key = flow_key(h.db, h.web, 5432, 40000, TCP);
    let last_seen =
        |kernel: &Kernel| kernel.datapath.conntrack_entry(&reply_key).unwrap().expect("tracked").last_seen_ns;
    let reply = f(h.db, h.web, tcp(5432, 40000, ACK));
    assert_eq!(kernel.ingress(&f(h.web, h.db, tcp(40000, 5432, SYN))), Pass);
    assert_eq!(kernel.ingress(&f(h.db, h.web, tcp(5432, 40000, SYN | ACK))), Pass);
    let (first, since) = (last_seen(&kernel), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let real = since.elapsed();
    assert_eq!(kernel.ingress(&reply), Pass);
    let measured = Duration::from_nanos(last_seen(&kernel) - first);
    let tick = Duration::from_nanos(u64::from(clock_tick_ns()));
    assert!(
        measured.abs_diff(real) <= 2 * tick + Duration::from_millis(100),
        "the packet clock measured {measured:?} where {real:?} passed (tick {tick:?})"
    );
    // Closing: the reply entry now lives 10 s after its last packet.
    assert_eq!(kernel.ingress(&f(h.web, h.db, tcp(40000, 5432, FIN | ACK))), Pass);
    assert_eq!(kernel.ingress(&reply), Pass);
    std::thread::sleep(Duration::from_nanos(timeouts::TCP_CLOSING_NS) + 2 * tick + Duration::from_millis(100));
    assert_eq!(kernel.ingress(&reply), Drop(DefaultDeny), "an expired reply entry admits nothing");
}

/// The conntrack table is read in batches of buckets; over several of
/// them every entry is counted once (two per connection).
#[test]
fn tracked_connections_are_counted_exactly() {
    let mut kernel = kernel(false);
    kernel.datapath.clear_state().unwrap();
    let h = V4;
    let connections = 5_000u16;
    let fd = kernel.datapath.program_fd(Hook::Ingress).unwrap();
    for port in 0..connections {
        let syn = frames::simple(h.web, h.db, TCP, tcp(20_000 + port, 5432, SYN));
        assert_eq!(enforcer::testrun::run(fd, &syn, 1).unwrap().retval, 2, "connection {port} opens (XDP_PASS)");
    }
    assert_eq!(kernel.datapath.conntrack_usage().0, 2 * u64::from(connections));
    kernel.datapath.clear_state().unwrap();
    assert_eq!(kernel.datapath.conntrack_usage().0, 0);
}

#[test]
fn udp_and_echo_replies_pass_only_for_tracked_flows() {
    let mut kernel = kernel(false);
    for h in [V4, V6] {
        kernel.datapath.clear_state().unwrap();
        let (proto, request) = echo_request(&h);
        let reply = if is_v4(&h) { 0 } else { 129 };
        assert_eq!(kernel.ingress(&frames::simple(h.web, h.db, UDP, udp(40000, 53, b"q"))), Pass);
        assert_eq!(kernel.ingress(&frames::simple(h.db, h.web, UDP, udp(53, 40000, b"a"))), Pass);
        assert_eq!(kernel.ingress(&frames::simple(h.db, h.web, UDP, udp(53, 40001, b"a"))), Drop(DefaultDeny));
        assert_eq!(kernel.ingress(&frames::simple(h.web, h.db, proto, echo(request, 99))), Pass);
        assert_eq!(kernel.ingress(&frames::simple(h.db, h.web, proto, echo(reply, 99))), Pass);
        assert_eq!(kernel.ingress(&frames::simple(h.db, h.web, proto, echo(reply, 98))), Drop(DefaultDeny));
        // An echo request the other way is not a reply, even with the same identifier.
        assert_eq!(kernel.ingress(&frames::simple(h.db, h.web, proto, echo(request, 99))), Drop(DefaultDeny));
    }
}

/// The first bytes of `packet` as an ICMP error quotes them.
fn quote(src: IpAddr, dst: IpAddr, protocol: u8, l4: Vec<u8>) -> Vec<u8> {
    let full = frames::simple(src, dst, protocol, l4);
    full[14..].to_vec()
}

#[test]
fn icmp_errors_quoting_tracked_flows_pass_as_related() {
    let mut kernel = kernel(false);
    for h in [V4, V6] {
        kernel.datapath.clear_state().unwrap();
        let (proto, unreachable, too_big) = if is_v4(&h) { (ICMP, 3, 3) } else { (ICMPV6, 1, 2) };
        let code = if is_v4(&h) { 4 } else { 0 };
        assert_eq!(kernel.ingress(&frames::simple(h.web, h.db, UDP, udp(40000, 53, b"q"))), Pass);
        let quoted = quote(h.web, h.db, UDP, udp(40000, 53, b"q"));
        let error = icmp(unreachable, 3, [0; 4], &quoted);
        assert_eq!(kernel.ingress(&frames::simple(h.db, h.web, proto, error)), Pass, "port unreachable");
        // A router on the path (world) reporting the MTU: PMTU discovery must work.
        let error = icmp(too_big, code, [0, 0, 5, 0], &quoted);
        assert_eq!(kernel.ingress(&frames::simple(h.world, h.web, proto, error)), Pass, "packet too big");
        let untracked = quote(h.web, h.db, UDP, udp(40000, 54, b"q"));
        let error = icmp(unreachable, 3, [0; 4], &untracked);
        assert_eq!(kernel.ingress(&frames::simple(h.db, h.web, proto, error)), Drop(DefaultDeny), "untracked quote");
        let error = icmp(unreachable, 3, [0; 4], &quoted[..10]);
        assert_eq!(kernel.ingress(&frames::simple(h.db, h.web, proto, error)), Drop(DefaultDeny), "short quote");
    }
}

fn fragment_v4(h: &Hosts, id: u16, offset: usize, more: bool, protocol: u8, payload: Vec<u8>) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (h.web, h.db) else { unreachable!() };
    let mut packet = Ipv4::new(s, d, protocol, payload);
    packet.id = id;
    packet.fragment_offset = offset;
    packet.more_fragments = more;
    frames::v4(&packet)
}

fn fragment_v6(
    src: IpAddr,
    dst: IpAddr,
    id: u32,
    offset: usize,
    more: bool,
    protocol: u8,
    payload: Vec<u8>,
) -> Vec<u8> {
    let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else { unreachable!() };
    let mut packet = Ipv6::new(s, d, protocol, payload);
    packet.extensions = vec![Extension::HopByHop, Extension::Fragment { offset, more, id }];
    frames::v6(&packet)
}

#[test]
fn later_fragments_share_the_first_fragments_verdict() {
    let mut kernel = kernel(false);
    let with_data = |l4: Vec<u8>| {
        let mut l4 = l4;
        l4.extend_from_slice(&[0xab; 36]);
        l4
    };
    let h = V4;
    // Denied datagram: every fragment dropped for the same reason.
    assert_eq!(kernel.ingress(&fragment_v4(&h, 1, 0, true, TCP, with_data(tcp(1, 22, SYN)))), Drop(DenyRule));
    assert_eq!(kernel.ingress(&fragment_v4(&h, 1, 56, true, TCP, vec![0; 48])), Drop(DenyRule));
    assert_eq!(kernel.ingress(&fragment_v4(&h, 1, 104, false, TCP, vec![0; 8])), Drop(DenyRule));
    // Allowed datagram: every fragment passes.
    assert_eq!(kernel.ingress(&fragment_v4(&h, 2, 0, true, TCP, with_data(tcp(1, 5432, SYN)))), Pass);
    assert_eq!(kernel.ingress(&fragment_v4(&h, 2, 56, false, TCP, vec![0; 48])), Pass);
    // The fragmented reply: its first fragment passes by conntrack, and so must the rest.
    let reply = |offset, more, payload| {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (h.db, h.web) else { unreachable!() };
        let mut packet = Ipv4::new(s, d, TCP, payload);
        packet.id = 9;
        packet.fragment_offset = offset;
        packet.more_fragments = more;
        frames::v4(&packet)
    };
    assert_eq!(kernel.ingress(&reply(0, true, with_data(tcp(5432, 1, SYN | ACK)))), Pass);
    assert_eq!(kernel.ingress(&reply(56, false, vec![0; 48])), Pass, "reply's later fragment");
    // A later fragment whose first never came: unknown, unless every port is allowed.
    assert_eq!(kernel.ingress(&fragment_v4(&h, 3, 56, false, TCP, vec![0; 48])), Drop(FragmentUnknown));
    let to_bulk = |offset| {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (h.web, h.bulk) else { unreachable!() };
        let mut packet = Ipv4::new(s, d, UDP, vec![0; 48]);
        packet.id = 4;
        packet.fragment_offset = offset;
        frames::v4(&packet)
    };
    assert_eq!(kernel.ingress(&to_bulk(56)), Pass, "all UDP ports allowed to bulk");
    // RFC 1858: a fragment overlapping the TCP header, and a first fragment
    // too small to hold it.
    assert_eq!(kernel.ingress(&fragment_v4(&h, 2, 8, false, TCP, vec![0; 48])), Drop(Malformed));
    assert_eq!(kernel.ingress(&fragment_v4(&h, 5, 0, true, TCP, tcp(1, 5432, SYN)[..16].to_vec())), Drop(Malformed));

    let h = V6;
    let first = |id, port| fragment_v6(h.web, h.db, id, 0, true, TCP, with_data(tcp(1, port, SYN)));
    let later = |id, offset, more| fragment_v6(h.web, h.db, id, offset, more, TCP, vec![0; 48]);
    assert_eq!(kernel.ingress(&first(11, 22)), Drop(DenyRule));
    assert_eq!(kernel.ingress(&later(11, 56, false)), Drop(DenyRule));
    assert_eq!(kernel.ingress(&first(12, 5432)), Pass);
    assert_eq!(kernel.ingress(&later(12, 56, false)), Pass);
    assert_eq!(kernel.ingress(&later(13, 56, false)), Drop(FragmentUnknown));
    assert_eq!(kernel.ingress(&fragment_v6(h.web, h.bulk, 14, 56, false, UDP, vec![0; 48])), Pass);
    assert_eq!(kernel.ingress(&later(12, 8, false)), Drop(Malformed), "overlaps the TCP header");
}

#[test]
fn egress_judges_only_what_the_node_originates() {
    let mut kernel = kernel(false);
    for h in [V4, V6] {
        kernel.datapath.clear_state().unwrap();
        let f = |src, dst, port| frames::simple(src, dst, TCP, tcp(40000, port, SYN));
        assert_eq!(kernel.egress(&f(h.host, h.db, 5432)), Pass, "host-to-db");
        assert_eq!(kernel.egress(&f(h.host, h.web, 80)), Drop(DefaultDeny), "no rule from host to web");
        assert_eq!(kernel.egress(&f(h.web, h.db, 22)), Ignored, "forwarded: judged at ingress");
        // The node answering a connection it accepted at ingress.
        assert_eq!(kernel.ingress(&f(h.web, h.host, 22)), Pass);
        let reply = frames::simple(h.host, h.web, TCP, tcp(22, 40000, SYN | ACK));
        assert_eq!(kernel.egress(&reply), Pass, "the node's reply");
        // The reply of the node's own connection comes back in at ingress.
        let back = frames::simple(h.db, h.host, TCP, tcp(5432, 40000, SYN | ACK));
        assert_eq!(kernel.ingress(&back), Pass, "reply to the node");
        // A packet entering with the node's connection tuple is not the node's.
        let spoofed = frames::simple(h.host, h.db, TCP, tcp(40000, 5432, ACK));
        assert_eq!(kernel.ingress(&spoofed), Drop(HostSpoofed));
    }
    assert_eq!(kernel.egress(&frames::arp()), Pass, "the node's ARP");
}

#[test]
fn neighbour_discovery_passes_only_as_link_local_plumbing() {
    let mut kernel = kernel(false);
    let (IpAddr::V6(world), IpAddr::V6(db)) = (V6.world, V6.db) else { unreachable!() };
    for nd_type in 133..=137 {
        let mut packet = Ipv6::new(world, db, ICMPV6, icmp(nd_type, 0, [0; 4], &[0; 16]));
        packet.hop_limit = 255;
        assert_eq!(kernel.ingress(&frames::v6(&packet)), Pass, "ND type {nd_type}");
        packet.hop_limit = 64;
        assert_eq!(kernel.ingress(&frames::v6(&packet)), Drop(DefaultDeny), "ND type {nd_type} routed");
    }
}

#[test]
fn audit_mode_passes_and_counts_what_would_drop() {
    let mut kernel = kernel(false);
    for h in [V4, V6] {
        kernel.datapath.clear_state().unwrap();
        let f = |src, dst, l4| frames::simple(src, dst, TCP, l4);
        assert_eq!(kernel.ingress(&f(h.web, h.sandbox, tcp(40000, 80, SYN))), Audit(DefaultDeny));
        assert_eq!(kernel.ingress(&f(h.sandbox, h.web, tcp(80, 40000, SYN | ACK))), Pass, "reply of an audited flow");
        assert_eq!(
            kernel.ingress(&f(h.web, h.sandbox, tcp(40000, 80, ACK))),
            Audit(DefaultDeny),
            "every packet counted"
        );
        assert_eq!(
            kernel.ingress(&f(h.sandbox, h.web, tcp(80, 40001, SYN))),
            Drop(DefaultDeny),
            "audit is towards sandbox only"
        );
    }
    let mut audit_all = self::kernel(true);
    let f = |src, dst, port| frames::simple(src, dst, TCP, tcp(40000, port, SYN));
    assert_eq!(audit_all.ingress(&f(V4.db, V4.web, 80)), Audit(DefaultDeny));
    assert_eq!(audit_all.ingress(&f(V4.web, V4.db, 22)), Audit(DenyRule));
    assert_eq!(audit_all.ingress(&f(V4.web, V4.db, 5432)), Pass);
    assert_eq!(audit_all.ingress(&f(V4.host, V4.db, 5432)), Drop(HostSpoofed), "spoofing is never audited");
    let mut short = f(V4.web, V4.db, 5432);
    short.truncate(40);
    assert_eq!(audit_all.ingress(&short), Drop(Malformed), "malformed is never audited");
}

#[test]
fn a_new_policy_generation_reaches_live_flows() {
    let mut kernel = kernel(false);
    let h = V4;
    let f = |src, dst, l4| frames::simple(src, dst, TCP, l4);
    assert_eq!(kernel.ingress(&f(h.web, h.db, tcp(40000, 5432, SYN))), Pass);
    assert_eq!(kernel.ingress(&f(h.db, h.web, tcp(5432, 40000, SYN | ACK))), Pass);
    // Revoke web-to-db (generation 2): the next originator packet is judged again.
    let revoked = POLICY.replace("ports: [\"tcp\", \"53/udp\"", "ports: [\"8443/tcp\", \"53/udp\"");
    let parsed = policy::parse_str("revoked.yaml", &revoked).unwrap();
    assert_eq!(kernel.enforce(&parsed, false), 2);
    assert_eq!(kernel.ingress(&f(h.web, h.db, tcp(40000, 5432, ACK))), Drop(DefaultDeny));
    assert_eq!(kernel.ingress(&f(h.db, h.web, tcp(5432, 40000, ACK))), Drop(DefaultDeny), "replies stop too");
}

/// Keeps the calling thread on one CPU, so that packets judged one after
/// the other meet the same per-CPU caches.
fn stay_on_one_cpu() {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, and the call only
    // reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(usize::try_from(libc::sched_getcpu()).unwrap_or(0), &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set),
            0,
            "pinning the test thread"
        );
    }
}

/// The flow cache passes an established flow's packets exactly as the
/// conntrack lookup would. The case it must not miss: a reply entry
/// outlives policy generations (until the originator is denied), so the
/// replies are cached under the new generation too; when the originator's
/// next packet is denied and the kernel forgets the connection, the very
/// next reply must be judged by the policy, not passed from the cache.
#[test]
fn cached_flows_never_outlive_their_connection() {
    stay_on_one_cpu();
    let mut kernel = kernel(false);
    for h in [V4, V6] {
        kernel.datapath.clear_state().unwrap();
        let f = |src, dst, l4| frames::simple(src, dst, TCP, l4);
        let (request, reply) = (f(h.web, h.db, tcp(40000, 5432, ACK)), f(h.db, h.web, tcp(5432, 40000, ACK)));
        assert_eq!(kernel.ingress(&f(h.web, h.db, tcp(40000, 5432, SYN))), Pass);
        assert_eq!(kernel.ingress(&f(h.db, h.web, tcp(5432, 40000, SYN | ACK))), Pass);
        // Established, then passed over and over (from the cache after the first).
        for _ in 0..20 {
            assert_eq!(kernel.ingress(&request), Pass);
            assert_eq!(kernel.ingress(&reply), Pass);
        }
        let revoked = POLICY.replace("ports: [\"tcp\", \"53/udp\"", "ports: [\"8443/tcp\", \"53/udp\"");
        kernel.enforce(&policy::parse_str("revoked.yaml", &revoked).unwrap(), false);
        for _ in 0..20 {
            assert_eq!(kernel.ingress(&reply), Pass, "a reply entry passes under any generation");
        }
        assert_eq!(kernel.ingress(&request), Drop(DefaultDeny), "the originator is judged again");
        assert_eq!(kernel.ingress(&reply), Drop(DefaultDeny), "the next reply after the connection is forgotten");
        for key in [flow_key(h.web, h.db, 40000, 5432, TCP), flow_key(h.db, h.web, 5432, 40000, TCP)] {
            assert!(kernel.datapath.conntrack_entry(&key).unwrap().is_none(), "{key:?} forgotten");
        }
        // Open again for the other family.
        kernel.enforce(&policy::parse_str("policy.yaml", POLICY).unwrap(), false);
    }
    // A flow the daemon forgets (here: every flow) passes no more either.
    let h = V4;
    let f = |src, dst, l4| frames::simple(src, dst, TCP, l4);
    let reply = f(h.db, h.web, tcp(5432, 40001, ACK));
    assert_eq!(kernel.ingress(&f(h.web, h.db, tcp(40001, 5432, SYN))), Pass);
    assert_eq!(kernel.ingress(&f(h.db, h.web, tcp(5432, 40001, SYN | ACK))), Pass);
    assert_eq!(kernel.ingress(&f(h.web, h.db, tcp(40001, 5432, ACK))), Pass);
    for _ in 0..20 {
        assert_eq!(kernel.ingress(&reply), Pass);
    }
    kernel.datapath.clear_state().unwrap();
    assert_eq!(kernel.ingress(&reply), Drop(DefaultDeny), "forgotten by the daemon");
}

/// Drops per identity pair add up exactly: counted by the array index the
/// verdict cache remembers for the pair, or found through the pair's hash
/// entry (and handed out on its first drop), across policy generations
/// whose slots, reused, start their pairs afresh.
#[test]
fn identity_pair_drops_add_up_across_generations() {
    stay_on_one_cpu();
    let mut kernel = kernel(false);
    let h = V4;
    let syn = |src, dst, source_port| frames::simple(src, dst, TCP, tcp(source_port, 8080, SYN));
    let drops = |kernel: &Kernel, src: &str, dst: &str| {
        let counters = kernel.datapath.counters().unwrap();
        counters.identity_drops.get(&(src.to_owned(), dst.to_owned())).copied().unwrap_or(0)
    };
    let widened = POLICY.replace(
        "  rules:\n",
        "  rules:\n    - {name: extra, from: [{identity: web}], to: [{identity: db}], ports: [\"9/udp\"]}\n",
    );
    let (mut db_web, mut sandbox_web) = (0, 0);
    for generation in 0..5u16 {
        // One tuple (whatever its source port): cache hits after the first.
        for source_port in 0..30 {
            assert_eq!(kernel.ingress(&syn(h.db, h.web, 42_000 + source_port)), Drop(DefaultDeny));
        }
        db_web += 30;
        // A pair new to this generation, on every other one.
        if generation % 2 == 1 {
            for source_port in 0..7 {
                assert_eq!(kernel.ingress(&syn(h.sandbox, h.web, 43_000 + source_port)), Drop(DefaultDeny));
            }
            sandbox_web += 7;
        }
        assert_eq!(drops(&kernel, "db", "web"), db_web, "generation {generation}");
        assert_eq!(drops(&kernel, "sandbox", "web"), sandbox_web, "generation {generation}");
        let next = if generation % 2 == 0 { widened.as_str() } else { POLICY };
        kernel.enforce(&policy::parse_str("next.yaml", next).unwrap(), false);
    }
    kernel.datapath.set_verdict_cache(false).unwrap();
    for source_port in 0..11 {
        assert_eq!(kernel.ingress(&syn(h.db, h.web, 44_000 + source_port)), Drop(DefaultDeny));
    }
    assert_eq!(drops(&kernel, "db", "web"), db_web + 11, "without the cache");
    assert_eq!(drops(&kernel, "other", "other"), 0, "every drop named");
}

/// The verdict cache answers a repeated tuple, whatever its source port,
/// exactly as the lookups would, and never past a change: a new policy
/// generation or new node addresses make every entry miss at once.
#[test]
fn cached_verdicts_never_outlive_a_change() {
    let mut kernel = kernel(false);
    let h = V4;
    let syn = |src, dst, source_port, port| frames::simple(src, dst, TCP, tcp(source_port, port, SYN));
    // Denied many times over (each run after the first is a cache hit),
    // then allowed by the next generation: the first packet after it passes.
    for source_port in 41_000..41_050 {
        assert_eq!(kernel.ingress(&syn(h.db, h.web, source_port, 8080)), Drop(DefaultDeny));
    }
    let opened = POLICY.replace(
        "  rules:\n",
        "  rules:\n    - {name: db-to-web, from: [{identity: db}], to: [{identity: web}], ports: [\"8080/tcp\"]}\n",
    );
    kernel.enforce(&policy::parse_str("opened.yaml", &opened).unwrap(), false);
    assert_eq!(kernel.ingress(&syn(h.db, h.web, 41_050, 8080)), Pass, "the new generation's verdict");
    // Allowed and untracked many times over (an echo request to bulk is
    // never opened; UDP is), then the source becomes the node's own
    // address: the next packet is spoofed.
    let datagram = frames::simple(h.web, h.bulk, UDP, udp(5000, 6000, b"x"));
    for _ in 0..50 {
        assert_eq!(kernel.ingress(&datagram), Pass);
        kernel.datapath.clear_state().unwrap();
    }
    let hosts: BTreeSet<IpAddr> = [V4.host, V6.host, h.web].into_iter().collect();
    kernel.datapath.set_host_addresses(&hosts, &kernel.engine).unwrap();
    assert_eq!(kernel.ingress(&datagram), Drop(HostSpoofed), "new node addresses reach cached verdicts");
    // 10.1.0.5 is the node's now: db may not reach it on 8080 (db-to-web
    // names web, not host), while the rest of web still may be reached.
    assert_eq!(kernel.ingress(&syn(h.db, h.web, 41_051, 8080)), Drop(DefaultDeny));
    let other_web = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 6));
    assert_eq!(kernel.ingress(&syn(h.db, other_web, 41_052, 8080)), Pass);
    // With the cache off, the same verdicts.
    kernel.datapath.set_verdict_cache(false).unwrap();
    assert_eq!(kernel.ingress(&datagram), Drop(HostSpoofed));
    assert_eq!(kernel.ingress(&syn(h.db, h.web, 41_053, 8080)), Drop(DefaultDeny));
    assert_eq!(kernel.ingress(&syn(h.db, other_web, 41_054, 8080)), Pass);
}

/// Rule decisions are counted per slot and carried over when a slot is
/// reused: the total per rule survives any number of policy changes.
#[test]
fn rule_decisions_add_up_across_policy_generations() {
    let mut kernel = kernel(false);
    let h = V4;
    let parsed = policy::parse_str("table.yaml", POLICY).unwrap();
    let web_to_db = ("web-to-db".to_owned(), policy::model::Action::Allow);
    let no_ssh = ("no-ssh-to-db".to_owned(), policy::model::Action::Deny);
    let counted = |kernel: &Kernel, rule: &(String, policy::model::Action)| {
        kernel.datapath.counters().unwrap().rules.get(rule).copied().unwrap_or(0)
    };
    // Generations 1 to 4 use both slots twice; every generation decides
    // two new web-to-db connections and one ssh attempt.
    for generation in 1..=4u16 {
        if generation > 1 {
            kernel.enforce(&parsed, false);
        }
        kernel.datapath.clear_state().unwrap();
        for source_port in [40_000, 40_001] {
            let syn = frames::simple(h.web, h.db, TCP, tcp(source_port + generation * 10, 5432, SYN));
            assert_eq!(kernel.ingress(&syn), Pass);
        }
        assert_eq!(kernel.ingress(&frames::simple(h.web, h.db, TCP, tcp(40_100, 22, SYN))), Drop(DenyRule));
        assert_eq!(counted(&kernel, &web_to_db), 2 * u64::from(generation), "generation {generation}");
        assert_eq!(counted(&kernel, &no_ssh), u64::from(generation), "generation {generation}");
    }
}

#[test]
fn drop_reason_labels_are_stable() {
    // Reasons are compared by value (tests/tests/differential.rs); their
    // labels are a public contract too.
    let labels: Vec<&str> = DropReason::ALL.iter().map(|r| r.label()).collect();
    assert_eq!(labels, ["default_deny", "deny_rule", "malformed", "fragment_unknown", "host_spoofed", "quarantine"]);
}

#[test]
fn events_are_rate_limited_per_cpu_and_the_excess_counted() {
    let mut kernel = kernel(false);
    let frame = frames::simple(V4.world, V4.db, TCP, tcp(40000, 5432, SYN));
    let limited =
        |k: &Kernel| k.datapath.counters().unwrap().state_errors[&enforcer_common::StateError::EventsRateLimited];
    let before = limited(&kernel);
    // 3000 drops within microseconds, in the kernel: a burst is one second's
    // worth (1000), so about 2000 must be refused by the bucket (the ring
    // itself holds more than 3000).
    let run = kernel.datapath.test_run(Hook::Ingress, &frame, 3000).unwrap();
    assert_eq!(run.retval, 1, "XDP_DROP");
    let refused = limited(&kernel) - before;
    assert!((1900..=2000).contains(&refused), "{refused} events refused");
}

/// A quarantined address is cut off before anything else is asked: its
/// established connection (both directions, the flow cache warm), new
/// connections allowed by rules, audit-mode identities. The node's own TCP
/// connections to an exempt port pass, whatever the policy says, but the
/// quarantined side opens nothing, from any port. Lifted, the policy judges
/// again, and the connection the quarantine cut is not resumed from state.
#[test]
fn quarantine_cuts_everything_but_the_nodes_exempt_connections() {
    let mut kernel = kernel(false);
    for h in [V4, V6] {
        kernel.datapath.clear_state().unwrap();
        let f = |src, dst, sport, dport, flags| frames::simple(src, dst, TCP, tcp(sport, dport, flags));
        assert_eq!(kernel.ingress(&f(h.web, h.db, 40000, 5432, SYN)), Pass);
        for _ in 0..3 {
            assert_eq!(kernel.ingress(&f(h.web, h.db, 40000, 5432, ACK)), Pass, "established, cached");
        }
        let web = ipnet::IpNet::from(h.web);
        let written = kernel.datapath.set_quarantine(&[web].into_iter().collect()).unwrap();
        assert_eq!(written.added, [web]);
        assert!(written.flows_cut >= 2, "both directions of the connection are forgotten: {written:?}");
        kernel.datapath.set_quarantine_exempt(&[(TCP, 22)]).unwrap();
        assert_eq!(kernel.ingress(&f(h.web, h.db, 40000, 5432, ACK)), Drop(Quarantine), "established, from it");
        assert_eq!(kernel.ingress(&f(h.db, h.web, 5432, 40000, ACK)), Drop(Quarantine), "established, to it");
        assert_eq!(kernel.ingress(&f(h.web, h.db, 40001, 5432, SYN)), Drop(Quarantine), "new, allowed by a rule");
        let ping = frames::simple(h.web, h.db, echo_request(&h).0, echo(echo_request(&h).1, 7));
        assert_eq!(kernel.ingress(&ping), Drop(Quarantine), "any protocol");
        assert_eq!(kernel.ingress(&f(h.sandbox, h.web, 40000, 80, SYN)), Drop(Quarantine), "audit mode too");
        // The node's management connection on the exempt port, both ways.
        assert_eq!(kernel.egress(&f(h.host, h.web, 40000, 22, SYN)), Pass, "the node opens to the exempt port");
        assert_eq!(kernel.ingress(&f(h.web, h.host, 22, 40000, SYN | ACK)), Pass, "and hears the reply");
        assert_eq!(kernel.ingress(&f(h.web, h.host, 22, 40000, ACK)), Pass);
        assert_eq!(kernel.egress(&f(h.host, h.web, 40000, 80, SYN)), Drop(Quarantine), "another port");
        // The quarantined side opens nothing, not even from the exempt port,
        // and its exempt-port packets reach only the node.
        assert_eq!(kernel.ingress(&f(h.web, h.host, 22, 10250, SYN)), Drop(Quarantine), "an open from port 22");
        assert_eq!(kernel.ingress(&f(h.web, h.db, 22, 40000, ACK)), Drop(Quarantine), "port 22 to another");
        let udp_22 = frames::simple(h.web, h.host, UDP, udp(22, 40000, b"x"));
        assert_eq!(kernel.ingress(&udp_22), Drop(Quarantine), "exemptions are TCP only");
        // Unrelated traffic is untouched.
        assert_eq!(kernel.ingress(&f(h.world, h.db, 40000, 5432, SYN)), Drop(DefaultDeny));
        assert_eq!(kernel.egress(&f(h.host, h.db, 40000, 5432, SYN)), Pass);

        let lifted = kernel.datapath.set_quarantine(&BTreeSet::new()).unwrap();
        assert_eq!(lifted.removed, [web]);
        assert!(kernel.datapath.quarantined_nets().unwrap().is_empty());
        assert_eq!(kernel.ingress(&f(h.db, h.web, 5432, 40000, ACK)), Drop(DefaultDeny), "not resumed from state");
        assert_eq!(kernel.ingress(&f(h.web, h.db, 40002, 5432, SYN)), Pass, "the policy judges again");
    }
}

/// A prefix quarantines every address in it, and the counters say so.
#[test]
fn a_quarantined_prefix_covers_its_addresses_and_is_counted() {
    let mut kernel = kernel(false);
    let prefix: ipnet::IpNet = "10.1.0.0/24".parse().unwrap();
    kernel.datapath.set_quarantine(&[prefix].into_iter().collect()).unwrap();
    let before = kernel.datapath.counters().unwrap().drops[&(Quarantine, enforcer_common::Direction::Ingress)].packets;
    for last in [1, 5, 254] {
        let from = IpAddr::V4(Ipv4Addr::new(10, 1, 0, last));
        assert_eq!(kernel.ingress(&frames::simple(from, V4.db, TCP, tcp(40000, 5432, SYN))), Drop(Quarantine));
    }
    let outside = IpAddr::V4(Ipv4Addr::new(10, 1, 1, 5));
    assert_eq!(kernel.ingress(&frames::simple(outside, V4.db, TCP, tcp(40000, 5432, SYN))), Drop(DefaultDeny));
    let after = kernel.datapath.counters().unwrap().drops[&(Quarantine, enforcer_common::Direction::Ingress)].packets;
    assert_eq!(after - before, 3);
    // The node's own address inside a quarantined prefix is not quarantined:
    // the policy judges what reaches it.
    let around_node: ipnet::IpNet = "10.9.0.0/24".parse().unwrap();
    kernel.datapath.set_quarantine(&[prefix, around_node].into_iter().collect()).unwrap();
    let web = IpAddr::V4(Ipv4Addr::new(10, 1, 1, 5));
    assert_eq!(kernel.ingress(&frames::simple(V4.world, V4.host, TCP, tcp(40000, 22, SYN))), Drop(DefaultDeny));
    assert_eq!(kernel.ingress(&frames::simple(V4.web, V4.host, TCP, tcp(40000, 22, SYN))), Drop(Quarantine));
    assert_eq!(kernel.ingress(&frames::simple(web, V4.host, TCP, tcp(40000, 22, SYN))), Drop(DefaultDeny));
    let neighbour = IpAddr::V4(Ipv4Addr::new(10, 9, 0, 7));
    assert_eq!(kernel.ingress(&frames::simple(V4.world, neighbour, TCP, tcp(40000, 22, SYN))), Drop(Quarantine));
    kernel.datapath.set_quarantine(&BTreeSet::new()).unwrap();
}

/// Events in the ring, oldest first.
fn ring_events(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<enforcer_common::Event> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        assert!(item.len() >= std::mem::size_of::<enforcer_common::Event>());
        // SAFETY: the kernel wrote a whole `Event` (size checked above).
        events.push(unsafe { item.as_ptr().cast::<enforcer_common::Event>().read_unaligned() });
    }
    events
}

/// While the lateral-movement detector runs, every connection the policy
/// admits at ingress is reported once (an allowed first contact), beside
/// the drops; established packets, the node's own connections and replies
/// report nothing. Off, admits are not reported at all.
#[test]
fn admitted_connections_are_reported_only_for_the_detector() {
    let mut kernel = kernel(false);
    let mut ring = kernel.datapath.take_events().unwrap();
    let _ = ring_events(&mut ring);
    let f = |src, dst, sport, dport, flags| frames::simple(src, dst, TCP, tcp(sport, dport, flags));
    let verdicts = |ring: &mut aya::maps::RingBuf<aya::maps::MapData>| -> Vec<(u8, u16)> {
        ring_events(ring).iter().map(|e| (e.verdict, e.dst_port)).collect()
    };
    assert_eq!(kernel.ingress(&f(V4.web, V4.db, 40000, 5432, SYN)), Pass);
    assert_eq!(verdicts(&mut ring), [], "off: no admit event");

    kernel.datapath.set_report_admits(true).unwrap();
    kernel.datapath.clear_state().unwrap();
    assert_eq!(kernel.ingress(&f(V4.web, V4.db, 40001, 5432, SYN)), Pass);
    assert_eq!(kernel.ingress(&f(V4.web, V4.db, 40001, 5432, ACK)), Pass, "established");
    assert_eq!(kernel.ingress(&f(V4.db, V4.web, 5432, 40001, ACK)), Pass, "reply");
    assert_eq!(kernel.ingress(&f(V4.world, V4.db, 40002, 5433, SYN)), Drop(DefaultDeny));
    assert_eq!(kernel.egress(&f(V4.host, V4.db, 40003, 5432, SYN)), Pass, "the node's own");
    let (admit, drop) = (enforcer_common::EVENT_ADMIT, enforcer_common::EVENT_DROP);
    assert_eq!(verdicts(&mut ring), [(admit, 5432), (drop, 5433)]);
    kernel.datapath.set_report_admits(false).unwrap();
    assert_eq!(kernel.ingress(&f(V4.web, V4.db, 40004, 5432, SYN)), Pass);
    assert_eq!(verdicts(&mut ring), []);
}
