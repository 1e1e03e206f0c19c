//! Real traffic for the stateful datapath: IPv6, fragmented datagrams, path
//! MTU discovery, audit mode, traffic of the node itself, and revocation of
//! a live connection. Needs root; run through `cargo xtask test`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lab::probe::{self, EchoServer, Outcome, TcpSession};
use lab::{Daemon, ScratchDir, ThreeTier};

/// The three-tier example with IPv6 addresses and rules for the node itself.
fn policy() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    text.replace("addresses: [\"10.0.1.0/24\"]", "addresses: [\"10.0.1.0/24\", \"fd00:1::/64\"]")
        .replace("addresses: [\"10.0.2.0/24\"]", "addresses: [\"10.0.2.0/24\", \"fd00:2::/64\"]")
        .replace("addresses: [\"10.0.3.10\"]", "addresses: [\"10.0.3.10\", \"fd00:3::10\"]")
        .replace(
            "  rules:\n",
            "  rules:\n    - name: node-to-db\n      from: [{identity: host}]\n      to: [{identity: db}]\n      ports: [\"5432/tcp\"]\n    - name: gateway-to-node\n      from: [{identity: gateway}]\n      to: [{identity: host}]\n      ports: [\"22/tcp\"]\n",
        )
}

struct Env {
    _servers: Vec<EchoServer>,
    daemon: Daemon,
    lab: ThreeTier,
    policy_dir: PathBuf,
    _scratch: ScratchDir,
}

fn start(lab: ThreeTier, policy: &str, extra: &[&str]) -> Env {
    let scratch = ScratchDir::new(&lab.stem).unwrap();
    let policy_dir = scratch.0.join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("policy.yaml"), policy).unwrap();
    let daemon = Daemon::start_with(&lab, &policy_dir, &scratch.0.join("daemon.log"), extra).expect("start bulkhead");
    let mut servers: Vec<EchoServer> =
        lab.hosts.iter().map(|h| EchoServer::start(&h.ns, &h.addrs(), &[22, 5432, 8080], &[8125]).unwrap()).collect();
    let gateway_link = IpAddr::V4(lab.host("gateway").router_addr);
    servers.push(EchoServer::start(&lab.router, &[gateway_link], &[22, 23], &[]).unwrap());
    Env { _servers: servers, daemon, lab, policy_dir, _scratch: scratch }
}

impl Env {
    fn v4(&self, host: &str, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.lab.host(host).addr), port)
    }

    fn v6(&self, host: &str, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.lab.host(host).addr6.expect("dual-stack lab")), port)
    }

    fn tcp(&self, from: &str, to: SocketAddr) -> Outcome {
        probe::tcp(&self.lab.host(from).ns, to).unwrap()
    }

    fn metrics(&self) -> String {
        let (status, body) = probe::http_get(&self.lab.router, self.daemon.metrics_addr, "/metrics").unwrap();
        assert_eq!(status, 200);
        body
    }

    fn counter(&self, family: &str, direction: &str, reason: &str) -> u64 {
        let sample = format!("{family}{{direction=\"{direction}\",reason=\"{reason}\"}}");
        probe::metric(&self.metrics(), &sample).unwrap_or_else(|| panic!("no {sample}"))
    }

    /// Replaces the policy the way an operator would: write aside, rename over.
    fn push_policy(&self, text: &str) {
        let staging = self.policy_dir.join(".policy.yaml.new");
        std::fs::write(&staging, text).unwrap();
        std::fs::rename(&staging, self.policy_dir.join("policy.yaml")).unwrap();
    }

    fn wait_for_generation(&self, generation: u64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let current = probe::metric(&self.metrics(), "bulkhead_policy_generation").unwrap_or(0);
            if current >= generation {
                return;
            }
            assert!(Instant::now() < deadline, "policy generation stuck at {current}: {}", self.daemon.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn ipv6_is_enforced_like_ipv4() {
    let env = start(ThreeTier::dual_stack("ipv6").unwrap(), &policy(), &[]);
    assert_eq!(env.tcp("gateway", env.v6("logic", 8080)), Outcome::Connected);
    assert_eq!(env.tcp("gateway", env.v6("db", 22)), Outcome::Connected);
    assert_eq!(env.tcp("logic", env.v6("db", 5432)), Outcome::Connected);
    assert_eq!(probe::udp(&env.lab.host("logic").ns, env.v6("db", 8125)).unwrap(), Outcome::Connected);
    let deny_before = env.counter("bulkhead_drop_packets_total", "ingress", "deny_rule");
    assert_eq!(env.tcp("gateway", env.v6("db", 5432)), Outcome::TimedOut, "deny rule over IPv6");
    assert_eq!(env.counter("bulkhead_drop_packets_total", "ingress", "deny_rule"), deny_before + 1);
    assert_eq!(env.tcp("logic", env.v6("gateway", 8080)), Outcome::TimedOut, "reverse direction");
    assert_eq!(env.tcp("outsider", env.v6("db", 5432)), Outcome::TimedOut, "world");
    // IPv4 still works beside it.
    assert_eq!(env.tcp("gateway", env.v4("logic", 8080)), Outcome::Connected);
}

#[test]
fn large_udp_datagrams_are_judged_whole_across_fragments() {
    let env = start(ThreeTier::new("fragments").unwrap(), &policy(), &[]);
    let logic = &env.lab.host("logic").ns;
    let gateway = &env.lab.host("gateway").ns;
    // 6000 bytes leave as five IPv4 fragments each way.
    assert_eq!(probe::udp_sized(logic, env.v4("db", 8125), 6000).unwrap(), Outcome::Connected);
    let before = env.counter("bulkhead_drop_packets_total", "ingress", "default_deny");
    assert_eq!(probe::udp_sized(gateway, env.v4("db", 8125), 6000).unwrap(), Outcome::TimedOut);
    let dropped = env.counter("bulkhead_drop_packets_total", "ingress", "default_deny") - before;
    assert_eq!(dropped, 5, "every fragment of the denied datagram is dropped by the first one's verdict");
    assert_eq!(env.counter("bulkhead_drop_packets_total", "ingress", "fragment_unknown"), 0);

    let env6 = start(ThreeTier::dual_stack("fragments6").unwrap(), &policy(), &[]);
    let logic = &env6.lab.host("logic").ns;
    let gateway = &env6.lab.host("gateway").ns;
    assert_eq!(probe::udp_sized(logic, env6.v6("db", 8125), 6000).unwrap(), Outcome::Connected);
    assert_eq!(probe::udp_sized(gateway, env6.v6("db", 8125), 6000).unwrap(), Outcome::TimedOut);
    assert_eq!(env6.counter("bulkhead_drop_packets_total", "ingress", "fragment_unknown"), 0);
}

/// Sends one UDP datagram with the don't-fragment bit from inside `ns`.
fn send_dont_fragment(ns: &lab::Netns, to: SocketAddr, size: usize) {
    ns.enter(|| {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let value: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: setsockopt with a valid int option on an owned socket.
        let result = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(result, 0, "IP_MTU_DISCOVER");
        socket.send_to(&vec![7u8; size], to).unwrap();
    })
    .unwrap();
}

#[test]
fn path_mtu_discovery_works_through_the_enforcer() {
    let env = start(ThreeTier::new("pmtu").unwrap(), &policy(), &[]);
    // The router's link to db is narrower than logic's: a full-size datagram
    // with DF set makes the router answer "fragmentation needed". That ICMP
    // error is the node's own traffic (TC egress), allowed by no rule, and
    // must pass as related to the tracked logic -> db flow.
    env.lab.router.ip(&["link", "set", "to-db", "mtu", "1280"]).unwrap();
    let logic = &env.lab.host("logic");
    let learned = || {
        let route = logic.ns.ip(&["route", "get", "10.0.3.10"]).unwrap();
        String::from_utf8_lossy(&route.stdout).contains("mtu 1280")
    };
    assert!(!learned(), "nothing learned before the probe");
    let egress_before = probe::metric(&env.metrics(), "bulkhead_forward_packets_total{direction=\"egress\"}").unwrap();
    send_dont_fragment(&logic.ns, env.v4("db", 8125), 1400);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !learned() {
        assert!(Instant::now() < deadline, "logic never learned the path MTU");
        std::thread::sleep(Duration::from_millis(50));
    }
    let egress_after = probe::metric(&env.metrics(), "bulkhead_forward_packets_total{direction=\"egress\"}").unwrap();
    assert!(egress_after > egress_before, "the ICMP error was judged at egress and passed");
    assert_eq!(env.counter("bulkhead_drop_packets_total", "egress", "default_deny"), 0);
}

#[test]
fn the_nodes_own_traffic_is_judged_at_egress_and_ingress() {
    let env = start(ThreeTier::new("node").unwrap(), &policy(), &[]);
    let router = &env.lab.router;
    assert_eq!(probe::tcp(router, env.v4("db", 5432)).unwrap(), Outcome::Connected, "node-to-db");
    let before = env.counter("bulkhead_drop_packets_total", "egress", "default_deny");
    assert_eq!(probe::tcp(router, env.v4("logic", 8080)).unwrap(), Outcome::TimedOut, "no rule from the node");
    assert_eq!(env.counter("bulkhead_drop_packets_total", "egress", "default_deny"), before + 1);
    let node = IpAddr::V4(env.lab.host("gateway").router_addr);
    assert_eq!(env.tcp("gateway", SocketAddr::new(node, 22)), Outcome::Connected, "gateway-to-node");
    assert_eq!(env.tcp("gateway", SocketAddr::new(node, 23)), Outcome::TimedOut);
    assert_eq!(env.tcp("logic", SocketAddr::new(node, 22)), Outcome::TimedOut, "only the gateway may");
}

#[test]
fn audit_mode_passes_and_counts_instead_of_dropping() {
    let env = start(ThreeTier::new("audit").unwrap(), &policy(), &["--audit"]);
    assert_eq!(env.tcp("outsider", env.v4("db", 5432)), Outcome::Connected);
    assert_eq!(env.tcp("gateway", env.v4("db", 5432)), Outcome::Connected, "deny rule audited too");
    assert!(env.counter("bulkhead_audit_packets_total", "ingress", "default_deny") >= 1);
    assert!(env.counter("bulkhead_audit_packets_total", "ingress", "deny_rule") >= 1);
    assert_eq!(env.counter("bulkhead_drop_packets_total", "ingress", "default_deny"), 0);
    assert_eq!(env.counter("bulkhead_drop_packets_total", "ingress", "deny_rule"), 0);
}

#[test]
fn audit_mode_per_identity_covers_traffic_towards_it() {
    let text = policy()
        .replace("      labels: {tier: db, env: prod}\n", "      labels: {tier: db, env: prod}\n      mode: audit\n");
    let env = start(ThreeTier::new("auditid").unwrap(), &text, &[]);
    assert_eq!(env.tcp("outsider", env.v4("db", 5432)), Outcome::Connected, "towards db: audited");
    assert_eq!(env.tcp("outsider", env.v4("logic", 8080)), Outcome::TimedOut, "towards logic: enforced");
    assert!(env.counter("bulkhead_audit_packets_total", "ingress", "default_deny") >= 1);
    assert_eq!(env.counter("bulkhead_drop_packets_total", "ingress", "default_deny"), 1);
}

#[test]
fn revoking_a_rule_stops_a_live_connection() {
    let env = start(ThreeTier::new("revoke").unwrap(), &policy(), &[]);
    let gateway = &env.lab.host("gateway").ns;
    let mut session = TcpSession::connect(gateway, env.v4("logic", 8080)).unwrap().expect("connect");
    assert_eq!(session.exchange("before", Duration::from_secs(3)), Outcome::Connected);

    let without = policy().replace("    - name: gateway-to-logic\n", "    - name: gateway-to-logic-admin\n").replace(
        "      to: [{labels: {tier: logic}}]\n      ports: [\"8080/tcp\"]",
        "      to: [{labels: {tier: logic}}]\n      ports: [\"9999/tcp\"]",
    );
    assert_ne!(without, policy(), "the edit took effect");
    env.push_policy(&without);
    env.wait_for_generation(2);
    assert_eq!(session.exchange("after", Duration::from_secs(2)), Outcome::TimedOut, "live flow stopped");
    assert_eq!(env.tcp("gateway", env.v4("logic", 8080)), Outcome::TimedOut, "new flows too");

    env.push_policy(&policy());
    env.wait_for_generation(3);
    assert_eq!(env.tcp("gateway", env.v4("logic", 8080)), Outcome::Connected, "restored");
}

#[test]
fn an_invalid_policy_change_is_rejected_whole() {
    let env = start(ThreeTier::new("reject").unwrap(), &policy(), &[]);
    env.push_policy(&policy().replace("8080/tcp", "8080/tcpp").replace("5432/tcp\", \"8125/udp", "5432/tcp\""));
    let deadline = Instant::now() + Duration::from_secs(15);
    while probe::metric(&env.metrics(), "bulkhead_policy_load_errors_total{reason=\"invalid\"}") != Some(1) {
        assert!(Instant::now() < deadline, "rejection never counted: {}", env.daemon.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(probe::metric(&env.metrics(), "bulkhead_policy_generation"), Some(1));
    // The old policy is still enforced, all of it.
    assert_eq!(env.tcp("gateway", env.v4("logic", 8080)), Outcome::Connected);
    assert_eq!(probe::udp(&env.lab.host("logic").ns, env.v4("db", 8125)).unwrap(), Outcome::Connected);
    assert!(env.daemon.log_text().contains("policy.yaml:"), "rejection logged with its position");
}
