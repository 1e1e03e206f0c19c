//! What a node does to the daemon: veths deleted and re-created while it is
//! down (pod churn, a rebuilt namespace), interfaces renamed, interfaces
//! that come and go while it runs, no bpffs where it expects one. The
//! daemon must keep or restore enforcement, never exit over state it can
//! rebuild. Real packets through the real programs in every case. Needs
//! root; run through `cargo xtask test`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lab::probe::{self, EchoServer, Outcome, TcpSession};
use lab::{Daemon, ScratchDir, ThreeTier};

/// Every router interface of the lab, by pattern, as a `DaemonSet` passes them.
const ALL_ROUTER_INTERFACES: &str = "to-*";

fn policy_dir(scratch: &ScratchDir) -> std::path::PathBuf {
    let dir = scratch.0.join("policy");
    std::fs::create_dir_all(&dir).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier.yaml");
    std::fs::copy(example, dir.join("three-tier.yaml")).unwrap();
    dir
}

fn servers(lab: &ThreeTier) -> Vec<EchoServer> {
    lab.hosts.iter().map(|h| EchoServer::start(&h.ns, &h.addrs(), &[22, 5432, 8080], &[8125]).unwrap()).collect()
}

fn tcp(lab: &ThreeTier, from: &str, to: &str, port: u16) -> Outcome {
    probe::tcp(&lab.host(from).ns, SocketAddr::new(IpAddr::V4(lab.host(to).addr), port)).unwrap()
}

/// The daemon's flags: pinned (production), interfaces by pattern.
fn flags(hook: &str) -> Vec<String> {
    ["--ingress-hook", hook, "--interface", ALL_ROUTER_INTERFACES].iter().map(|s| (*s).to_owned()).collect()
}

fn start(lab: &ThreeTier, dir: &Path, log: &Path, hook: &str) -> Daemon {
    let mut args = flags(hook);
    args.extend(["--policy-dir".to_owned(), dir.display().to_string()]);
    let mut daemon = Daemon::spawn(lab, &args, log).unwrap();
    daemon.wait_ready(&lab.router).unwrap();
    daemon
}

fn metrics(lab: &ThreeTier, daemon: &Daemon) -> String {
    probe::http_get(&lab.router, daemon.metrics_addr, "/metrics").unwrap().1
}

fn metric(lab: &ThreeTier, daemon: &Daemon, sample: &str) -> u64 {
    let text = metrics(lab, daemon);
    probe::metric(&text, sample).unwrap_or_else(|| panic!("{sample} missing from\n{text}"))
}

/// Checks the policy on every host's link: what is allowed connects, what
/// is not times out, through interfaces that were each churned.
fn assert_enforced(lab: &ThreeTier, context: &str) {
    let expectations = [
        ("gateway", "logic", 8080, Outcome::Connected),
        ("logic", "db", 5432, Outcome::Connected),
        ("gateway", "db", 22, Outcome::Connected),
        ("gateway", "db", 5432, Outcome::TimedOut),
        ("logic", "gateway", 8080, Outcome::TimedOut),
        ("outsider", "db", 5432, Outcome::TimedOut),
        ("outsider", "gateway", 8080, Outcome::TimedOut),
    ];
    for (from, to, port, expected) in expectations {
        assert_eq!(tcp(lab, from, to, port), expected, "{from} -> {to}:{port} {context}");
    }
}

/// Stops the daemon (programs stay attached and pinned), churns the node,
/// and starts a daemon with the same flags again.
fn stale_pins_are_repaired(hook: &str) {
    let mut lab = ThreeTier::new(&format!("churn-{hook}")).unwrap();
    let scratch = ScratchDir::new(&lab.stem).unwrap();
    let dir = policy_dir(&scratch);
    let _servers = servers(&lab);
    let mut first = start(&lab, &dir, &scratch.0.join("first.log"), hook);
    assert_enforced(&lab, "with the first daemon");
    assert!(first.stop().unwrap().is_some_and(|s| s.success()), "{}", first.log_text());
    // SIGTERM leaves the node protected: programs attached, last policy enforced.
    assert_enforced(&lab, "after SIGTERM, with no daemon running");

    // While no daemon watches: two veths deleted and re-created (new
    // ifindexes, defunct links under the old pins), one renamed.
    lab.rewire("gateway").unwrap();
    lab.rewire("outsider").unwrap();
    lab.rename_router_interface("logic", "to-logic-2").unwrap();
    // The re-created interfaces are unprotected now: between them, the
    // outsider reaches the gateway.
    assert_eq!(tcp(&lab, "outsider", "gateway", 8080), Outcome::Connected, "re-created veths carry no program");

    let second = start(&lab, &dir, &scratch.0.join("second.log"), hook);
    let log = second.log_text();
    assert!(log.contains("no longer exists"), "defunct pins are logged:\n{log}");
    assert!(log.contains("renamed"), "the renamed pin is logged:\n{log}");
    assert_enforced(&lab, "after the churn, with the second daemon");
    // Two pins (ingress and egress) per re-created interface, two moved.
    assert_eq!(metric(&lab, &second, "bulkhead_pin_repairs_total{repair=\"defunct\"}"), 4, "{log}");
    assert_eq!(metric(&lab, &second, "bulkhead_pin_repairs_total{repair=\"renamed\"}"), 2, "{log}");
    let ingress = if hook == "tc" { "tc_ingress" } else { "xdp" };
    assert_eq!(metric(&lab, &second, &format!("bulkhead_interfaces{{hook=\"{ingress}\"}}")), 4);
    assert_eq!(metric(&lab, &second, "bulkhead_interfaces{hook=\"tc_egress\"}"), 4);
    let links: Vec<String> = std::fs::read_dir(lab.bpffs_root().join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for interface in ["to-gateway", "to-logic-2", "to-db", "to-outsider"] {
        assert!(links.iter().any(|l| l.ends_with(&format!("-{interface}"))), "{interface} pinned: {links:?}");
    }
    assert!(!links.iter().any(|l| l.ends_with("-to-logic")), "the old name's pins are gone: {links:?}");
}

#[test]
fn stale_xdp_pins_from_node_churn_are_repaired() {
    stale_pins_are_repaired("xdp");
}

#[test]
fn stale_tc_pins_from_node_churn_are_repaired() {
    stale_pins_are_repaired("tc");
}

/// Polls `/metrics` until `sample` reads `value`.
fn wait_for_metric(lab: &ThreeTier, daemon: &Daemon, sample: &str, value: u64) -> Duration {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if probe::metric(&metrics(lab, daemon), sample) == Some(value) {
            return started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{sample} never read {value}:\n{}\n{}", metrics(lab, daemon), daemon.log_text());
}

#[test]
fn interfaces_that_come_and_go_are_attached_and_forgotten_while_traffic_flows() {
    let lab = ThreeTier::new("hotplug").unwrap();
    let scratch = ScratchDir::new(&lab.stem).unwrap();
    let dir = policy_dir(&scratch);
    let _servers = servers(&lab);
    let daemon = start(&lab, &dir, &scratch.0.join("daemon.log"), "xdp");
    let xdp = "bulkhead_interfaces{hook=\"xdp\"}";
    assert_eq!(metric(&lab, &daemon, xdp), 4);
    // A connection that lives through all of it.
    let db = SocketAddr::new(IpAddr::V4(lab.host("db").addr), 5432);
    let mut session = TcpSession::connect(&lab.host("logic").ns, db).unwrap().expect("logic -> db is allowed");
    assert_eq!(session.exchange("before", Duration::from_secs(2)), Outcome::Connected);

    // Gone: forgotten and counted.
    lab.router.ip(&["link", "del", "to-gateway"]).unwrap();
    let forgotten_in = wait_for_metric(&lab, &daemon, xdp, 3);
    assert!(metric(&lab, &daemon, "bulkhead_interface_changes_total{change=\"removed\"}") >= 1);
    // Back (a new ifindex): attached and enforcing.
    lab.rewire("gateway").unwrap();
    let attached_in = wait_for_metric(&lab, &daemon, xdp, 4);
    assert!(metric(&lab, &daemon, "bulkhead_interface_changes_total{change=\"attached\"}") >= 1);
    assert_eq!(tcp(&lab, "gateway", "logic", 8080), Outcome::Connected);
    assert_eq!(tcp(&lab, "gateway", "db", 5432), Outcome::TimedOut, "the new veth is enforced");
    // A new interface that does not match the pattern is left alone.
    lab.router.ip(&["link", "add", "other0", "type", "veth", "peer", "name", "other1"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(metric(&lab, &daemon, xdp), 4);
    assert_eq!(session.exchange("after", Duration::from_secs(2)), Outcome::Connected, "established flows survive");
    let log = daemon.log_text();
    assert!(log.contains("interface to-gateway") && log.contains("appeared: attached"), "{log}");
    assert!(log.contains("forgotten"), "{log}");
    eprintln!("forgotten after {forgotten_in:?}, attached after {attached_in:?} (as polled through /metrics)");
}

#[test]
fn without_a_bpffs_under_ip_netns_exec_the_daemon_mounts_one() {
    let lab = ThreeTier::new("netnsexec").unwrap();
    let scratch = ScratchDir::new(&lab.stem).unwrap();
    let dir = policy_dir(&scratch);
    let _servers = servers(&lab);
    assert_eq!(tcp(&lab, "outsider", "db", 5432), Outcome::Connected, "open before the daemon starts");
    let log_path = scratch.0.join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // `ip netns exec` gives the daemon a fresh sysfs, with no bpffs at
    // /sys/fs/bpf: before, it failed with "pinning failed".
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", lab.router.name()])
        .arg(lab::topology::bulkhead_binary())
        .args(["run", "--detach-on-exit", "--policy-dir"])
        .arg(&dir)
        .args(["--bpffs-root", &format!("/sys/fs/bpf/{}", lab.stem), "--interface", ALL_ROUTER_INTERFACES])
        .arg("--state-dir")
        .arg(lab.state_dir())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics_addr: SocketAddr = "127.0.0.1:9090".parse().unwrap();
    let ready = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Err(format!("exited with {status}"));
        }
        if matches!(probe::http_get(&lab.router, metrics_addr, "/readyz"), Ok((200, _))) {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err("not ready within 30 s".to_owned());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log_path).unwrap();
    if let Err(why) = ready {
        let _ = child.kill();
        panic!("{why}:\n{text}");
    }
    assert!(text.contains("mounted a bpffs at /sys/fs/bpf"), "{text}");
    assert_eq!(tcp(&lab, "gateway", "logic", 8080), Outcome::Connected);
    assert_eq!(tcp(&lab, "outsider", "db", 5432), Outcome::TimedOut);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {}", std::fs::read_to_string(&log_path).unwrap());
    // Detached before the daemon exits, not an RCU grace period later.
    assert_eq!(tcp(&lab, "outsider", "db", 5432), Outcome::Connected, "--detach-on-exit detached");
}

#[test]
fn an_interface_another_program_holds_is_reported_then_taken_once_free() {
    let lab = ThreeTier::new("busy").unwrap();
    let scratch = ScratchDir::new(&lab.stem).unwrap();
    let dir = policy_dir(&scratch);
    let _servers = servers(&lab);
    // Another XDP owner of to-gateway: a second Bulkhead with its own pins.
    let other_metrics: SocketAddr = "127.0.0.1:9091".parse().unwrap();
    let other_log = std::fs::File::create(scratch.0.join("other.log")).unwrap();
    let other_root = format!("{}-other", lab.bpffs_root().display());
    let mut other = lab
        .router
        .command(lab::topology::bulkhead_binary().to_str().unwrap())
        .args(["run", "--detach-on-exit", "--interface", "to-gateway", "--metrics-addr", "127.0.0.1:9091"])
        .arg("--policy-dir")
        .arg(&dir)
        .arg("--bpffs-root")
        .arg(&other_root)
        .arg("--state-dir")
        .arg(lab.state_dir())
        .stdin(Stdio::null())
        .stdout(other_log.try_clone().unwrap())
        .stderr(other_log)
        .spawn()
        .unwrap();
    let _cleanup = Cleanup(other.id(), other_root.clone().into());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(probe::http_get(&lab.router, other_metrics, "/readyz"), Ok((200, _))) {
        let log = std::fs::read_to_string(scratch.0.join("other.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "the other daemon never became ready: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut args = flags("xdp");
    args.extend(["--policy-dir".to_owned(), dir.display().to_string()]);
    let daemon = Daemon::spawn(&lab, &args, &scratch.0.join("daemon.log")).unwrap();
    // Up, enforcing on the three free interfaces, and not ready: it says why.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, body) = loop {
        if let Ok((status, body)) = probe::http_get(&lab.router, daemon.metrics_addr, "/readyz") {
            break (status, body);
        }
        assert!(Instant::now() < deadline, "no /readyz: {}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not enforcing on to-gateway"), "{body}");
    assert_eq!(metric(&lab, &daemon, "bulkhead_interfaces_unenforced"), 1);
    assert_eq!(metric(&lab, &daemon, "bulkhead_interfaces{hook=\"xdp\"}"), 3);
    assert_eq!(metric(&lab, &daemon, "bulkhead_interface_changes_total{change=\"attach_failed\"}"), 1);
    assert_eq!(tcp(&lab, "outsider", "db", 5432), Outcome::TimedOut, "the free interfaces are enforced");

    // The other program goes: the daemon takes the interface by itself.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(i32::try_from(other.id()).unwrap(), libc::SIGTERM) };
    assert!(other.wait().unwrap().success());
    wait_for_metric(&lab, &daemon, "bulkhead_interfaces{hook=\"xdp\"}", 4);
    assert_eq!(metric(&lab, &daemon, "bulkhead_interfaces_unenforced"), 0);
    assert_eq!(probe::http_get(&lab.router, daemon.metrics_addr, "/readyz").unwrap().0, 200);
    assert_eq!(tcp(&lab, "gateway", "db", 5432), Outcome::TimedOut, "to-gateway is enforced now");
    assert_eq!(tcp(&lab, "gateway", "logic", 8080), Outcome::Connected);
}

/// Kills a daemon the test started by hand and removes its bpffs root, if
/// the test ends before it does.
struct Cleanup(u32, std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.1.exists()
            && let Ok(pid) = i32::try_from(self.0)
        {
            // SAFETY: signalling a process this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
}
