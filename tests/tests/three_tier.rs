//! The three-tier scenario of `cargo xtask demo`, with real TCP, UDP and
//! ICMP traffic through the real XDP program between network namespaces.
//! Needs root; run through `cargo xtask test`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use lab::probe::{self, EchoServer, Outcome};
use lab::{Daemon, ScratchDir, ThreeTier};

const TCP_PORTS: [u16; 3] = [22, 5432, 8080];
const UDP_PORTS: [u16; 1] = [8125];

fn three_tier_policy() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A lab with echo servers on every host and the daemon enforcing `policy`.
/// Fields drop in order: servers, daemon, namespaces, scratch files.
struct Enforced {
    _servers: Vec<EchoServer>,
    daemon: Daemon,
    lab: ThreeTier,
    _scratch: ScratchDir,
}

fn servers(lab: &ThreeTier) -> Vec<EchoServer> {
    lab.hosts
        .iter()
        .map(|host| EchoServer::start(&host.ns, &host.addrs(), &TCP_PORTS, &UDP_PORTS).expect("echo server"))
        .collect()
}

fn enforced(label: &str, policy: &str) -> Enforced {
    enforced_with(label, policy, &[])
}

/// As [`enforced`], with extra `bulkhead run` flags.
fn enforced_with(label: &str, policy: &str, flags: &[&str]) -> Enforced {
    let lab = ThreeTier::new(label).expect("create lab namespaces");
    let scratch = ScratchDir::new(&lab.stem).expect("scratch dir");
    let policy_dir = scratch.0.join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("three-tier.yaml"), policy).unwrap();
    let daemon = Daemon::start_with(&lab, &policy_dir, &scratch.0.join("daemon.log"), flags).expect("start bulkhead");
    Enforced { _servers: servers(&lab), daemon, lab, _scratch: scratch }
}

impl Enforced {
    fn tcp(&self, from: &str, to: &str, port: u16) -> Outcome {
        let target = SocketAddr::new(IpAddr::V4(self.lab.host(to).addr), port);
        probe::tcp(&self.lab.host(from).ns, target).expect("tcp probe")
    }

    fn udp(&self, from: &str, to: &str, port: u16) -> Outcome {
        let target = SocketAddr::new(IpAddr::V4(self.lab.host(to).addr), port);
        probe::udp(&self.lab.host(from).ns, target).expect("udp probe")
    }

    fn metrics(&self) -> String {
        let (status, body) = probe::http_get(&self.lab.router, self.daemon.metrics_addr, "/metrics").expect("scrape");
        assert_eq!(status, 200, "{body}");
        body
    }

    fn drops(&self, reason: &str) -> u64 {
        let sample = format!("bulkhead_drop_packets_total{{direction=\"ingress\",reason=\"{reason}\"}}");
        probe::metric(&self.metrics(), &sample).unwrap_or_else(|| panic!("no sample {sample}"))
    }
}

#[test]
fn without_bulkhead_every_pair_connects() {
    // The control experiment: the probes see traffic when nothing enforces,
    // so every blocked outcome in the other tests is Bulkhead's doing.
    let lab = ThreeTier::new("control").expect("create lab namespaces");
    let _servers = servers(&lab);
    for (from, to, port) in [("logic", "gateway", 8080), ("outsider", "db", 5432), ("gateway", "db", 5432)] {
        let target = SocketAddr::new(IpAddr::V4(lab.host(to).addr), port);
        assert_eq!(probe::tcp(&lab.host(from).ns, target).unwrap(), Outcome::Connected, "{from} -> {to}:{port}");
    }
    let target = SocketAddr::new(IpAddr::V4(lab.host("db").addr), 8125);
    assert_eq!(probe::udp(&lab.host("gateway").ns, target).unwrap(), Outcome::Connected);
    assert_eq!(probe::ping(&lab.host("outsider").ns, lab.host("db").addr).unwrap(), Outcome::Connected);
}

#[test]
fn allowed_pairs_exchange_data_both_ways() {
    let env = enforced("allowed", &three_tier_policy());
    assert_eq!(env.tcp("gateway", "logic", 8080), Outcome::Connected);
    assert_eq!(env.tcp("logic", "db", 5432), Outcome::Connected);
    assert_eq!(env.tcp("gateway", "db", 22), Outcome::Connected);
    assert_eq!(env.udp("logic", "db", 8125), Outcome::Connected);
    // Repeated connections reuse conntrack state without trouble.
    for _ in 0..5 {
        assert_eq!(env.tcp("gateway", "logic", 8080), Outcome::Connected);
    }
    assert_eq!(env.drops("default_deny"), 0, "allowed traffic and its replies must never be dropped");
    assert_eq!(env.drops("deny_rule"), 0);
    let forwarded = probe::metric(&env.metrics(), "bulkhead_forward_packets_total{direction=\"ingress\"}").unwrap();
    assert!(forwarded >= 20, "forwarded {forwarded}");
}

#[test]
fn denied_pairs_time_out_and_every_drop_is_counted() {
    let env = enforced("denied", &three_tier_policy());
    let before = env.drops("default_deny");
    let mut blocked = 0;
    // Replies pass, but the reverse direction may not open connections.
    for (from, to, port) in
        [("logic", "gateway", 8080), ("db", "logic", 8080), ("db", "gateway", 22), ("logic", "db", 22)]
    {
        assert_eq!(env.tcp(from, to, port), Outcome::TimedOut, "{from} -> {to}:{port}/tcp");
        blocked += 1;
    }
    for (from, to, port) in [("gateway", "db", 8125), ("db", "logic", 8125)] {
        assert_eq!(env.udp(from, to, port), Outcome::TimedOut, "{from} -> {to}:{port}/udp");
        blocked += 1;
    }
    // Each blocked TCP probe sent exactly one SYN, each UDP probe one datagram.
    assert_eq!(env.drops("default_deny") - before, blocked);
    // An allowed path still works right after.
    assert_eq!(env.tcp("logic", "db", 5432), Outcome::Connected);
}

#[test]
fn generic_xdp_mode_enforces_the_same_policy() {
    let env = enforced_with("generic", &three_tier_policy(), &["--xdp-mode", "generic"]);
    for interface in env.lab.router_interfaces() {
        let shown = env.lab.router.ip(&["-d", "link", "show", "dev", &interface]).unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
        assert!(shown.contains("xdpgeneric"), "{interface} is not in generic mode: {shown}");
    }
    let before = env.drops("default_deny");
    assert_eq!(env.tcp("gateway", "logic", 8080), Outcome::Connected);
    assert_eq!(env.tcp("logic", "gateway", 8080), Outcome::TimedOut);
    assert_eq!(env.udp("gateway", "db", 8125), Outcome::TimedOut);
    assert_eq!(env.drops("default_deny") - before, 2);
}

#[test]
fn tc_ingress_hook_enforces_the_same_policy() {
    let env = enforced_with("tcingress", &three_tier_policy(), &["--ingress-hook", "tc"]);
    // No XDP anywhere: the ingress drops counted below are the TC program's.
    for interface in env.lab.router_interfaces() {
        let shown = env.lab.router.ip(&["-d", "link", "show", "dev", &interface]).unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
        assert!(!shown.contains("xdp"), "{interface} has an XDP program: {shown}");
    }
    let before = env.drops("default_deny");
    assert_eq!(env.tcp("gateway", "logic", 8080), Outcome::Connected);
    assert_eq!(env.tcp("logic", "db", 5432), Outcome::Connected);
    assert_eq!(env.tcp("logic", "gateway", 8080), Outcome::TimedOut);
    assert_eq!(env.udp("gateway", "db", 8125), Outcome::TimedOut);
    assert_eq!(env.drops("default_deny") - before, 2);
}

#[test]
fn deny_rule_beats_allow_rule() {
    let env = enforced("deny", &three_tier_policy());
    // gateway-admin-to-db allows all TCP, gateway-never-touches-data denies 5432.
    assert_eq!(env.tcp("gateway", "db", 22), Outcome::Connected);
    assert_eq!(env.tcp("gateway", "db", 5432), Outcome::TimedOut);
    assert_eq!(env.tcp("gateway", "db", 5432), Outcome::TimedOut);
    assert_eq!(env.drops("deny_rule"), 2);
    assert_eq!(env.drops("default_deny"), 0);
}

#[test]
fn outsider_in_world_is_blocked() {
    let env = enforced("world", &three_tier_policy());
    for (to, port) in [("gateway", 8080), ("logic", 8080), ("db", 5432), ("db", 22)] {
        assert_eq!(env.tcp("outsider", to, port), Outcome::TimedOut, "outsider -> {to}:{port}");
    }
    assert_eq!(probe::ping(&env.lab.host("outsider").ns, env.lab.host("db").addr).unwrap(), Outcome::TimedOut);
    assert_eq!(env.drops("default_deny"), 5);
}

#[test]
fn icmp_echo_follows_policy() {
    let env = enforced("icmp", &three_tier_policy());
    // prod-ping admits ICMP between prod identities; the reply passes as tracked.
    assert_eq!(probe::ping(&env.lab.host("gateway").ns, env.lab.host("db").addr).unwrap(), Outcome::Connected);
    assert_eq!(probe::ping(&env.lab.host("db").ns, env.lab.host("logic").addr).unwrap(), Outcome::Connected);
    // db answers the outsider's ping only if the request gets through: it must not.
    assert_eq!(probe::ping(&env.lab.host("outsider").ns, env.lab.host("gateway").addr).unwrap(), Outcome::TimedOut);
}

#[test]
fn a_rule_for_world_admits_the_outsider() {
    let policy = three_tier_policy().replace(
        "  rules:\n",
        "  rules:\n    - name: public-gateway\n      from: [{identity: world}]\n      to: [{identity: gateway}]\n      ports: [\"8080/tcp\"]\n",
    );
    let env = enforced("worldrule", &policy);
    assert_eq!(env.tcp("outsider", "gateway", 8080), Outcome::Connected);
    assert_eq!(env.tcp("outsider", "logic", 8080), Outcome::TimedOut);
}

#[test]
fn cidr_peer_with_except() {
    let policy = three_tier_policy().replace(
        "  rules:\n",
        "  rules:\n    - name: lab-nets-to-logic\n      from: [{cidr: \"10.0.0.0/16\", except: [\"10.0.9.0/24\"]}]\n      to: [{identity: logic}]\n      ports: [\"22/tcp\"]\n",
    );
    let env = enforced("cidr", &policy);
    assert_eq!(env.tcp("db", "logic", 22), Outcome::Connected);
    assert_eq!(env.tcp("gateway", "logic", 22), Outcome::Connected);
    assert_eq!(env.tcp("outsider", "logic", 22), Outcome::TimedOut);
}

#[test]
fn health_ready_and_policy_gauges() {
    let env = enforced("health", &three_tier_policy());
    let (status, _) = probe::http_get(&env.lab.router, env.daemon.metrics_addr, "/healthz").unwrap();
    assert_eq!(status, 200);
    let (status, _) = probe::http_get(&env.lab.router, env.daemon.metrics_addr, "/readyz").unwrap();
    assert_eq!(status, 200);
    let metrics = env.metrics();
    assert_eq!(probe::metric(&metrics, "bulkhead_identities"), Some(3));
    assert_eq!(probe::metric(&metrics, "bulkhead_policy_rules"), Some(5));
    for reason in ["default_deny", "deny_rule", "malformed", "fragment_unknown"] {
        for direction in ["ingress", "egress"] {
            for family in ["bulkhead_drop_packets_total", "bulkhead_drop_bytes_total"] {
                let sample = format!("{family}{{direction=\"{direction}\",reason=\"{reason}\"}}");
                assert!(probe::metric(&metrics, &sample).is_some(), "missing {sample}");
            }
        }
    }
    assert!(env.lab.any_xdp_attached().unwrap());
}

#[test]
fn sigterm_detaches_everything() {
    let mut env = enforced("sigterm", &three_tier_policy());
    assert!(env.lab.any_xdp_attached().unwrap());
    // The node's own traffic to logic is denied at TC egress while enforcing.
    let node_to_logic = SocketAddr::new(IpAddr::V4(env.lab.host("logic").addr), 8080);
    assert_eq!(probe::tcp(&env.lab.router, node_to_logic).unwrap(), Outcome::TimedOut);
    let status = env.daemon.stop().unwrap().expect("daemon exits on SIGTERM");
    assert!(status.success(), "exit status {status}: {}", env.daemon.log_text());
    assert!(!env.lab.any_xdp_attached().unwrap(), "XDP still attached after exit");
    assert!(!env.lab.anything_pinned(), "--detach-on-exit removes the pins");
    // With nothing enforcing, the formerly denied paths are open again:
    // through XDP, and from the node itself through TC egress.
    assert_eq!(env.tcp("outsider", "db", 5432), Outcome::Connected);
    assert_eq!(probe::tcp(&env.lab.router, node_to_logic).unwrap(), Outcome::Connected);
}

fn run_once(lab: &ThreeTier, scratch: &ScratchDir, args: &[String]) -> (std::process::ExitStatus, String) {
    let mut daemon = Daemon::spawn(lab, args, &scratch.0.join("daemon.log")).unwrap();
    let status = daemon.wait_exit(std::time::Duration::from_secs(20)).unwrap().expect("bulkhead should exit by itself");
    (status, daemon.log_text())
}

#[test]
fn invalid_policy_exits_non_zero_and_attaches_nothing() {
    let lab = ThreeTier::new("invalid").unwrap();
    let scratch = ScratchDir::new(&lab.stem).unwrap();
    let policy_dir = scratch.0.join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    let broken = three_tier_policy().replace("5432/tcp\", \"8125/udp", "5432/tcp\", \"8125/udpx");
    std::fs::write(policy_dir.join("three-tier.yaml"), broken).unwrap();
    let mut args = vec!["--policy-dir".to_owned(), policy_dir.display().to_string()];
    for interface in lab.router_interfaces() {
        args.extend(["--interface".to_owned(), interface]);
    }
    let (status, log) = run_once(&lab, &scratch, &args);
    assert!(!status.success());
    assert!(log.contains("three-tier.yaml:27:27:"), "error names file and line: {log}");
    assert!(log.contains("unknown protocol `udpx`"), "{log}");
    assert_eq!(log.trim().lines().count(), 1, "one-line error: {log}");
    assert!(!lab.any_xdp_attached().unwrap());
    assert!(!lab.anything_pinned());
}

#[test]
fn missing_interface_exits_non_zero_and_attaches_nothing() {
    let lab = ThreeTier::new("noif").unwrap();
    let scratch = ScratchDir::new(&lab.stem).unwrap();
    let policy_dir = scratch.0.join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("three-tier.yaml"), three_tier_policy()).unwrap();
    let args: Vec<String> =
        ["--policy-dir", &policy_dir.display().to_string(), "--interface", "to-gateway", "--interface", "no-such-if"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
    let (status, log) = run_once(&lab, &scratch, &args);
    assert!(!status.success());
    assert!(log.contains("no-such-if"), "{log}");
    assert!(!lab.any_xdp_attached().unwrap());
    assert!(!lab.anything_pinned());
}
