//! Upgrades and downgrades between two Bulkhead builds whose map layouts
//! differ: the test-only `layout-test` build's FRAGMENTS values are 8 bytes
//! larger. The incoming daemon must adopt every map whose layout it shares
//! (so tracked connections live on), rebuild the one it does not (never
//! misread it), and replace the programs without a moment in which denied
//! traffic passes. Needs root and both builds; run through `cargo xtask test`.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lab::probe::{self, EchoServer, Outcome, TcpSession};
use lab::{Daemon, ScratchDir, ThreeTier};

/// The `layout-test` build, which `cargo xtask test` builds beside the release binary.
fn other_layout_binary() -> PathBuf {
    std::env::var_os("BULKHEAD_BIN_OTHER_LAYOUT").map(PathBuf::from).expect(
        "BULKHEAD_BIN_OTHER_LAYOUT is not set: run this test through `cargo xtask test`, which builds the layout-test binary",
    )
}

fn start(lab: &ThreeTier, binary: &Path, dir: &Path, log: &Path) -> Daemon {
    let args: Vec<String> =
        ["--interface", "to-*", "--policy-dir", dir.to_str().unwrap()].iter().map(|a| (*a).to_owned()).collect();
    let mut daemon = Daemon::spawn_binary(lab, binary, &args, log).unwrap();
    daemon.wait_ready(&lab.router).unwrap();
    daemon
}

fn tcp(lab: &ThreeTier, from: &str, to: &str, port: u16) -> Outcome {
    probe::tcp(&lab.host(from).ns, SocketAddr::new(IpAddr::V4(lab.host(to).addr), port)).unwrap()
}

/// The FRAGMENTS pin under the lab's root: each build stamps its own.
fn fragments_pins(lab: &ThreeTier) -> Vec<String> {
    let mut pins: Vec<String> = std::fs::read_dir(lab.bpffs_root().join("maps"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("FRAGMENTS-"))
        .collect();
    pins.sort();
    pins
}

/// Denied datagrams sent outsider -> db every 200 µs while `running`, and
/// how many of them db received (any is a gap in enforcement).
struct DeniedFlood {
    sent: AtomicU64,
    received: AtomicU64,
    running: AtomicBool,
}

#[test]
fn upgrades_and_downgrades_across_a_layout_change_leave_no_gap() {
    let lab = ThreeTier::new("upgrade").unwrap();
    let scratch = ScratchDir::new(&lab.stem).unwrap();
    let dir = scratch.0.join("policy");
    std::fs::create_dir_all(&dir).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier.yaml");
    std::fs::copy(example, dir.join("three-tier.yaml")).unwrap();
    let _servers: Vec<EchoServer> =
        lab.hosts.iter().map(|h| EchoServer::start(&h.ns, &h.addrs(), &[5432, 8080], &[]).unwrap()).collect();
    let (this, other) = (lab::topology::bulkhead_binary(), other_layout_binary());

    let mut running = start(&lab, &other, &dir, &scratch.0.join("0.log"));
    let older_pins = fragments_pins(&lab);
    assert_eq!(older_pins.len(), 1, "{older_pins:?}");
    let db = SocketAddr::new(IpAddr::V4(lab.host("db").addr), 5432);
    let mut session = TcpSession::connect(&lab.host("logic").ns, db).unwrap().expect("logic -> db is allowed");
    assert_eq!(session.exchange("before", Duration::from_secs(2)), Outcome::Connected);

    let target = SocketAddr::new(IpAddr::V4(lab.host("db").addr), 9999);
    let receiver = lab.host("db").ns.enter(|| UdpSocket::bind(target)).unwrap().unwrap();
    receiver.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let sender = lab.host("outsider").ns.enter(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    let flood = DeniedFlood { sent: AtomicU64::new(0), received: AtomicU64::new(0), running: AtomicBool::new(true) };

    std::thread::scope(|scope| {
        scope.spawn(|| {
            while flood.running.load(Ordering::Relaxed) {
                if sender.send_to(b"must never arrive", target).is_ok() {
                    flood.sent.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        scope.spawn(|| {
            let mut buffer = [0u8; 64];
            while flood.running.load(Ordering::Relaxed) {
                if receiver.recv_from(&mut buffer).is_ok() {
                    flood.received.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        // Upgrade (other layout -> this), then downgrade (this -> other).
        for (step, binary) in [(1, &this), (2, &other)] {
            assert!(running.stop().unwrap().is_some_and(|s| s.success()), "{}", running.log_text());
            std::thread::sleep(Duration::from_millis(200));
            running = start(&lab, binary, &dir, &scratch.0.join(format!("{step}.log")));
            let log = running.log_text();
            assert!(log.contains("removed map FRAGMENTS-"), "step {step}: the other layout's map is retired:\n{log}");
            assert!(!log.contains("removed map CONNTRACK-"), "step {step}: shared layouts are adopted:\n{log}");
            let (_, metrics) = probe::http_get(&lab.router, running.metrics_addr, "/metrics").unwrap();
            assert_eq!(probe::metric(&metrics, "bulkhead_pin_repairs_total{repair=\"map_rebuilt\"}"), Some(1));
            assert_eq!(fragments_pins(&lab).len(), 1, "step {step}: one FRAGMENTS map pinned");
            assert_eq!(
                session.exchange(&format!("after step {step}"), Duration::from_secs(2)),
                Outcome::Connected,
                "step {step}: the tracked connection lives on (conntrack adopted)"
            );
            assert_eq!(tcp(&lab, "gateway", "logic", 8080), Outcome::Connected, "step {step}");
            assert_eq!(tcp(&lab, "gateway", "db", 5432), Outcome::TimedOut, "step {step}: deny rule");
            assert_eq!(tcp(&lab, "outsider", "db", 5432), Outcome::TimedOut, "step {step}: default deny");
        }
        std::thread::sleep(Duration::from_millis(200));
        flood.running.store(false, Ordering::Relaxed);
    });
    let (sent, leaked) = (flood.sent.load(Ordering::Relaxed), flood.received.load(Ordering::Relaxed));
    assert!(sent > 1000, "the flood covered the upgrades: {sent} datagrams");
    assert_eq!(leaked, 0, "{leaked} of {sent} denied datagrams got through during the upgrades");
    assert_eq!(fragments_pins(&lab), older_pins, "back on the older build's layout");

    // The control: with the programs detached, the same datagrams arrive.
    running.stop().unwrap();
    std::fs::remove_dir_all(lab.bpffs_root().join("links")).unwrap();
    let mut buffer = [0u8; 64];
    let arrived = (0..100).any(|_| {
        sender.send_to(b"now it may arrive", target).unwrap();
        receiver.recv_from(&mut buffer).is_ok()
    });
    assert!(arrived, "the receiver never saw a datagram: the flood above proved nothing");
}
