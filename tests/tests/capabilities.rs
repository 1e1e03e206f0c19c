//! The capability set of `deploy/overlays/capabilities`, shown to be enough
//! and each member necessary, with the real daemon and real packets: the set
//! is read from the rendered overlay, and the daemon runs as root with
//! exactly that set (`setpriv`: bounding, inheritable and ambient sets all
//! limited to it), as a container with `drop: [ALL]` and `add: [...]` does.
//! The daemon also reads the config file and policy from the rendered
//! config maps. Needs root and kubectl; run through `cargo xtask test`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use lab::fake_api::{FakeApiServer, Options};
use lab::manifests::{added_capabilities, container, find, objects, render, workspace_root};
use lab::pki::Ca;
use lab::probe::{self, EchoServer, Outcome};
use lab::topology::bulkhead_binary;
use lab::{Daemon, ScratchDir, ThreeTier};
use serde_json::Value;

/// Capability numbers from `linux/capability.h`, for reading /proc masks.
const CAPABILITY_NUMBERS: [(&str, u32); 6] = [
    ("CAP_NET_ADMIN", 12),
    ("CAP_NET_RAW", 13),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_SYS_RESOURCE", 24),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
];

fn mask(caps: &[String]) -> u64 {
    caps.iter()
        .map(|cap| {
            let (_, bit) = CAPABILITY_NUMBERS
                .iter()
                .find(|(name, _)| name == cap)
                .unwrap_or_else(|| panic!("{cap} is not a capability this test knows"));
            1u64 << bit
        })
        .fold(0, |all, bit| all | bit)
}

/// `setpriv` limiting every capability set to `caps` before it execs.
fn setpriv(caps: &[String]) -> Vec<String> {
    let mut list = String::from("-all");
    for cap in caps {
        list.push_str(",+");
        list.push_str(&cap.trim_start_matches("CAP_").to_ascii_lowercase());
    }
    vec![
        "setpriv".to_owned(),
        format!("--inh-caps={list}"),
        format!("--ambient-caps={list}"),
        format!("--bounding-set={list}"),
        "--".to_owned(),
    ]
}

/// What the capabilities overlay renders to.
struct Rendered {
    caps: Vec<String>,
    /// The config file the daemon set passes with `--config`.
    config: String,
    /// The policy config map's files.
    policy: Vec<(String, String)>,
}

fn rendered() -> Rendered {
    let objects = objects(&render("deploy/overlays/capabilities"));
    let ds = find(&objects, "DaemonSet", "bulkhead");
    let c = container(ds, "bulkhead");
    assert_eq!(c["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_ne!(c["securityContext"]["privileged"], true);
    let caps = added_capabilities(c);
    assert!(!caps.is_empty(), "the overlay adds no capability");
    let files = |config_map: &Value| -> Vec<(String, String)> {
        config_map["data"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(name, text)| (name.clone(), text.as_str().unwrap().to_owned()))
            .collect()
    };
    let config = files(find(&objects, "ConfigMap", "bulkhead-config"));
    assert_eq!(config.len(), 1);
    Rendered { caps, config: config[0].1.clone(), policy: files(find(&objects, "ConfigMap", "bulkhead-policy")) }
}

/// A lab with echo servers, the rendered policy and config, and TLS
/// material for the API the config turns on.
struct Setup {
    _servers: Vec<EchoServer>,
    /// The API the config's Kubernetes source watches (an empty cluster).
    _api: FakeApiServer,
    lab: ThreeTier,
    scratch: ScratchDir,
    args: Vec<String>,
    ca: PathBuf,
    client: (PathBuf, PathBuf),
}

fn setup(label: &str, rendered: &Rendered) -> Setup {
    let lab = ThreeTier::new(label).expect("create lab namespaces");
    let scratch = ScratchDir::new(&lab.stem).expect("scratch dir");
    let policy_dir = scratch.0.join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    for (name, text) in &rendered.policy {
        std::fs::write(policy_dir.join(name), text).unwrap();
    }
    // The base ships in audit mode, enforcing NetworkPolicy's way (see
    // deploy/base/config.yaml); this test needs drops to see enforcement,
    // and its hosts are the example policy's SegmentPolicy identities,
    // which only zero trust isolates: it switches to enforcing, always.
    for line in ["\naudit: true\n", "\npolicy-enforcement: default\n", "\nkubernetes: true\n"] {
        assert_eq!(rendered.config.matches(line).count(), 1, "{line}: {}", rendered.config);
    }
    let enforcing = rendered.config.replacen("\naudit: true\n", "\naudit: false\n", 1).replacen(
        "\npolicy-enforcement: default\n",
        "\npolicy-enforcement: always\n",
        1,
    );
    // The config's Kubernetes source watches a fake API server on the
    // node's loopback, where the daemon runs.
    let listener = lab.router.enter(|| std::net::TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
    let api = FakeApiServer::start_on(listener, Options::default()).expect("fake API server");
    let kubeconfig = scratch.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let config = scratch.0.join("config.yaml");
    std::fs::write(&config, enforcing).unwrap();
    let pki = Ca::new("bulkhead test CA");
    let ca = pki.write_pem(&scratch.0, "ca.crt").unwrap();
    let (cert, key) = pki.issue(&scratch.0, "server", "server", false).unwrap();
    // A client named as the rendered config's `api-roles` names its viewer.
    let client = pki.issue(&scratch.0, "client", "bulkhead-viewer", false).unwrap();
    // The config file supplies everything else (the interface pattern, the
    // API address and roles, events); these flags point at the lab's
    // interfaces and files instead of the node's.
    let mut args = vec!["--config".to_owned(), config.display().to_string()];
    args.extend([
        "--kubeconfig".to_owned(),
        kubeconfig.display().to_string(),
        "--node-name".to_owned(),
        "node-1".to_owned(),
    ]);
    args.extend(["--policy-dir".to_owned(), policy_dir.display().to_string()]);
    args.extend(["--metrics-addr".to_owned(), "127.0.0.1:9090".to_owned()]);
    for (flag, path) in [("--tls-cert", &cert), ("--tls-key", &key), ("--client-ca", &ca)] {
        args.extend([flag.to_owned(), path.display().to_string()]);
    }
    for interface in lab.router_interfaces() {
        args.extend(["--interface".to_owned(), interface]);
    }
    let servers = lab
        .hosts
        .iter()
        .map(|host| EchoServer::start(&host.ns, &host.addrs(), &[5432, 8080], &[]).expect("echo server"))
        .collect();
    Setup { _servers: servers, _api: api, lab, scratch, args, ca, client }
}

impl Setup {
    fn spawn(&self, caps: &[String], log: &str) -> Daemon {
        Daemon::spawn_wrapped(
            &self.lab,
            &setpriv(caps),
            &lab::topology::bulkhead_binary(),
            &self.args,
            &self.scratch.0.join(log),
        )
        .expect("spawn bulkhead")
    }

    fn tcp(&self, from: &str, to: &str, port: u16) -> Outcome {
        let target = SocketAddr::new(IpAddr::V4(self.lab.host(to).addr), port);
        probe::tcp(&self.lab.host(from).ns, target).expect("tcp probe")
    }

    /// `bulkhead uninstall` for the lab's root, with only `caps`.
    fn uninstall(&self, caps: &[String]) -> std::process::Output {
        let mut wrapper = setpriv(caps);
        let program = wrapper.remove(0);
        self.lab
            .router
            .command(&program)
            .args(&wrapper)
            .arg(bulkhead_binary())
            .args(["uninstall", "--bpffs-root"])
            .arg(self.lab.bpffs_root())
            .output()
            .expect("run bulkhead uninstall")
    }
}

/// The capabilities deploy/uninstall-job.yaml adds (it drops all).
fn uninstall_job_capabilities() -> Vec<String> {
    let yaml = std::fs::read_to_string(workspace_root().join("deploy/uninstall-job.yaml")).unwrap();
    let job = &objects(&yaml)[0];
    let c = container(job, "uninstall");
    assert_eq!(c["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    added_capabilities(c)
}

/// The effective and bounding capability masks of a running process.
fn capability_masks(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let hex = status.lines().find_map(|line| line.strip_prefix(name)).unwrap_or_else(|| panic!("no {name}"));
        u64::from_str_radix(hex.trim(), 16).unwrap()
    };
    (field("CapEff:"), field("CapBnd:"))
}

#[test]
fn the_overlays_capabilities_are_enough_to_enforce_and_uninstall() {
    let rendered = rendered();
    let env = setup("caps", &rendered);
    let mut daemon = env.spawn(&rendered.caps, "daemon.log");
    daemon.wait_ready(&env.lab.router).expect("bulkhead becomes ready with the overlay's capabilities");

    // The daemon really holds exactly the overlay's set, and no more.
    let (effective, bounding) = capability_masks(daemon.pid());
    assert_eq!(effective, mask(&rendered.caps), "effective {effective:#x}, log: {}", daemon.log_text());
    assert_eq!(bounding, mask(&rendered.caps), "bounding {bounding:#x}");

    // Enforcement with real packets, as the example policy says.
    assert_eq!(env.tcp("gateway", "logic", 8080), Outcome::Connected);
    assert_eq!(env.tcp("logic", "db", 5432), Outcome::Connected);
    assert_eq!(env.tcp("logic", "gateway", 8080), Outcome::TimedOut, "not allowed by any rule");
    assert_eq!(env.tcp("gateway", "db", 5432), Outcome::TimedOut, "denied by gateway-never-touches-data");
    let (status, metrics) = probe::http_get(&env.lab.router, daemon.metrics_addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    let dropped = probe::metric(&metrics, "bulkhead_drop_packets_total{direction=\"ingress\",reason=\"default_deny\"}");
    assert!(dropped.is_some_and(|n| n > 0), "{metrics}");

    // The admin API the rendered config turns on serves the role it grants.
    let mut status = env.lab.router.command(bulkhead_binary().to_str().unwrap());
    status.args(["status", "--server", "https://127.0.0.1:9443", "--ca"]).arg(&env.ca);
    status.arg("--cert").arg(&env.client.0).arg("--key").arg(&env.client.1);
    let output = status.output().unwrap();
    assert!(output.status.success(), "bulkhead status: {}", String::from_utf8_lossy(&output.stderr));

    // Stopped, as when its pod goes away: the programs stay and enforce.
    assert!(matches!(daemon.stop(), Ok(Some(status)) if status.success()), "{}", daemon.log_text());
    assert!(env.lab.anything_pinned());
    assert!(env.lab.any_xdp_attached().unwrap());
    assert_eq!(env.tcp("logic", "gateway", 8080), Outcome::TimedOut, "still enforced with the daemon gone");

    // What the uninstall Job runs, with the Job's capabilities, removes it all.
    let output = env.uninstall(&uninstall_job_capabilities());
    assert!(output.status.success(), "bulkhead uninstall: {}", String::from_utf8_lossy(&output.stderr));
    assert!(!env.lab.anything_pinned(), "uninstall left pins behind");
    assert!(!env.lab.any_xdp_attached().unwrap(), "uninstall left XDP attached");
    assert_eq!(env.tcp("logic", "gateway", 8080), Outcome::Connected, "nothing enforces after uninstall");
}

/// Waits for a daemon expected to refuse to start; returns its log.
fn refused(env: &Setup, caps: &[String], log: &str) -> String {
    let mut daemon = env.spawn(caps, log);
    let status = daemon.wait_exit(Duration::from_secs(30)).unwrap();
    let text = daemon.log_text();
    let status = status.unwrap_or_else(|| panic!("bulkhead with {caps:?} kept running: {text}"));
    assert!(!status.success(), "bulkhead with {caps:?} exited successfully: {text}");
    assert!(!env.lab.anything_pinned(), "a refused start with {caps:?} left pins: {text}");
    assert!(!env.lab.any_xdp_attached().unwrap(), "a refused start with {caps:?} left XDP attached: {text}");
    assert_eq!(env.tcp("logic", "gateway", 8080), Outcome::Connected, "nothing enforces after a refused start");
    text
}

#[test]
fn every_capability_of_the_overlay_is_needed() {
    let rendered = rendered();
    let env = setup("capsless", &rendered);
    for missing in &rendered.caps {
        let fewer: Vec<String> = rendered.caps.iter().filter(|c| *c != missing).cloned().collect();
        let text = refused(&env, &fewer, &format!("without-{missing}.log"));
        let expected = match missing.as_str() {
            // The daemon checks all three itself before touching the kernel.
            // (Without CAP_PERFMON the verifier would refuse the XDP
            // program: it allows `pkt_end - data` only with it.)
            "CAP_BPF" | "CAP_NET_ADMIN" | "CAP_PERFMON" => {
                "bulkhead run needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (CAP_SYS_ADMIN stands in for the first two); run it as root or grant those capabilities"
            }
            other => panic!("no expectation for a start without {other}: {text}"),
        };
        assert!(text.contains(expected), "without {missing}, expected `{expected}` in: {text}");
    }
}
