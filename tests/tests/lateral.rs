//! The lateral-movement detector with real packets: a host with ordinary
//! allowed traffic and a few denied attempts is never flagged; a host that
//! probes 20 closed ports is quarantined within a second of its 20th
//! attempt (in practice at its seventh), and its allowed connection is cut.
//! Needs root; run through `cargo xtask test`.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use lab::probe::{self, EchoServer, Outcome, TcpSession};
use lab::{Daemon, ScratchDir, ThreeTier};

fn metric(lab: &ThreeTier, daemon: &Daemon, sample: &str) -> u64 {
    let (_, body) = probe::http_get(&lab.router, daemon.metrics_addr, "/metrics").unwrap();
    probe::metric(&body, sample).unwrap_or(0)
}

#[test]
fn a_scanner_is_quarantined_within_a_second_and_a_benign_host_never() {
    let lab = ThreeTier::new("lateral").unwrap();
    let scratch = ScratchDir::new(&lab.stem).unwrap();
    let policy = scratch.0.join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier.yaml");
    std::fs::copy(example, policy.join("p.yaml")).unwrap();
    let args = ["--lateral-movement", "quarantine", "--lateral-movement-quarantine-for", "5m"];
    let daemon = Daemon::start_with(&lab, &policy, &scratch.0.join("log"), &args).unwrap();
    let _servers: Vec<EchoServer> =
        lab.hosts.iter().map(|h| EchoServer::start(&h.ns, &h.addrs(), &[22, 5432, 8080], &[]).unwrap()).collect();
    let at = |name: &str, port| SocketAddr::new(IpAddr::V4(lab.host(name).addr), port);
    let (gateway, logic) = (&lab.host("gateway").ns, &lab.host("logic").ns);

    // Benign: logic's allowed traffic and three denied attempts, spread out.
    for round in 0..3u16 {
        assert_eq!(probe::tcp(logic, at("db", 5432)).unwrap(), Outcome::Connected);
        assert_eq!(probe::tcp(logic, at("db", 22 + round)).unwrap(), Outcome::TimedOut, "denied attempt {round}");
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(metric(&lab, &daemon, "bulkhead_lateral_movement_suspects_total"), 0);
    assert_eq!(metric(&lab, &daemon, "bulkhead_quarantined"), 0);
    assert!(metric(&lab, &daemon, "bulkhead_lateral_movement_tracked_sources") >= 1, "logic's denials were seen");

    // The scanner: an allowed connection, then 20 closed ports in a burst.
    let mut session = TcpSession::connect(gateway, at("logic", 8080)).unwrap().unwrap();
    assert_eq!(session.exchange("before", Duration::from_secs(3)), Outcome::Connected);
    let first = Instant::now();
    let mut last = first;
    let probes: Vec<_> = (1..=20u16)
        .map(|port| {
            let target = at("logic", 9000 + port);
            let probe = gateway
                .enter(|| std::thread::spawn(move || TcpStream::connect_timeout(&target, Duration::from_secs(2))));
            last = Instant::now();
            std::thread::sleep(Duration::from_millis(20));
            probe.unwrap()
        })
        .collect();
    let deadline = last + Duration::from_secs(1);
    let quarantined_at = loop {
        if metric(&lab, &daemon, "bulkhead_quarantined") == 1 {
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "not quarantined within 1 s of the 20th attempt:\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(10));
    };
    for probe in probes {
        assert!(probe.join().unwrap().is_err(), "a closed port answered");
    }
    assert_eq!(
        session.exchange("after", Duration::from_millis(700)),
        Outcome::TimedOut,
        "its allowed connection is cut"
    );
    assert_eq!(probe::tcp(logic, at("db", 5432)).unwrap(), Outcome::Connected, "the benign host is not");
    assert_eq!(metric(&lab, &daemon, "bulkhead_lateral_movement_suspects_total"), 1);

    let log = daemon.log_text();
    let event = log.lines().find(|line| line.contains("\"event\":\"lateral_movement\"")).expect("a suspect event");
    let event: serde_json::Value = serde_json::from_str(event).unwrap();
    assert_eq!(event["source"], lab.host("gateway").addr.to_string());
    assert_eq!((event["identity"].as_str(), event["action"].as_str()), (Some("gateway"), Some("quarantine")));
    let attempts = event["denied_targets"].as_array().unwrap().len();
    // Seven denied first contacts decide; its allowed connection, an
    // allowed first contact in the window, takes one more.
    assert_eq!(attempts, 8, "the default test decides at the eighth distinct denied target");
    assert_eq!(event["allowed_targets"], 1, "the admitted connection is benign evidence");
    let started =
        log.lines().find(|line| line.contains("\"event\":\"quarantine\"")).expect("the quarantine's start event");
    assert!(started.contains("\"by\":\"lateral-movement\"") && started.contains("\"expires\""), "{started}");
    // The measurements BENCHMARKS.md quotes.
    println!(
        "detected after {attempts} denied first contacts, {} ms after the first; quarantined {} ms after the first attempt",
        event["after_ms"],
        quarantined_at.duration_since(first).as_millis()
    );
}
