//! Kubernetes' upstream `NetworkPolicy` e2e cases over real packets: the
//! nine pods (x/a … z/c) are namespaces behind one node running the daemon
//! with `--policy-enforcement default`, the cluster and each case's
//! policies are a file of Kubernetes objects in its policy directory, and
//! every cell of every case's 9×9 matrix is a real TCP or UDP exchange
//! with an echo server in the destination pod. The same cases are checked
//! against the evaluators and the engine in `policy/tests/netpol_cases.rs`.

#[path = "../../policy/tests/netpol/cases.rs"]
mod cases;
#[path = "support/matrix.rs"]
mod matrix;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use lab::probe::{self, EchoServer, Outcome};
use lab::{Daemon, ScratchDir, ThreeTier};

use cases::{address, all_pods, case_files, read_case};

/// The pods' hosts in the lab, in matrix order.
const POD_HOSTS: [&str; 9] = ["x-a", "x-b", "x-c", "y-a", "y-b", "y-c", "z-a", "z-b", "z-c"];

fn metric(lab: &ThreeTier, daemon: &Daemon, sample: &str) -> Option<u64> {
    let (_, text) = probe::http_get(&lab.router, daemon.metrics_addr, "/metrics").ok()?;
    probe::metric(&text, sample)
}

/// Replaces the policy directory's one file, whole, in one rename.
fn write_policy(dir: &Path, text: &str) {
    let staged = dir.join(".cluster.tmp");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, dir.join("cluster.yaml")).unwrap();
}

/// Waits until the daemon enforces a generation after `previous`.
fn wait_for_generation_after(lab: &ThreeTier, daemon: &Daemon, previous: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(generation) = metric(lab, daemon, "bulkhead_policy_generation").filter(|g| *g > previous) {
            return generation;
        }
        assert!(Instant::now() < deadline, "no generation after {previous}: {}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn upstream_network_policy_cases_over_real_packets() {
    let hosts: Vec<(&'static str, [u8; 3])> = all_pods()
        .into_iter()
        .map(|(n, p)| {
            let [a, b, c, _] = address(n, p).octets();
            (POD_HOSTS[n * 3 + p], [a, b, c])
        })
        .collect();
    let lab = ThreeTier::with_hosts("netpol", &hosts).unwrap();
    let servers: Vec<EchoServer> = lab
        .hosts
        .iter()
        .map(|host| EchoServer::start(&host.ns, &[IpAddr::V4(host.addr)], &[80, 81], &[80, 81]).unwrap())
        .collect();
    let scratch = ScratchDir::new(&lab.stem).unwrap();
    let dir = scratch.0.join("policy");
    std::fs::create_dir_all(&dir).unwrap();
    let files = case_files();
    assert!(files.len() >= 40, "{} cases; the issue asks for at least 40", files.len());
    let first = read_case(&files[0]);
    write_policy(&dir, &format!("{}---\n{}", first.cluster, first.policies));
    let log = scratch.0.join("daemon.log");
    let daemon = Daemon::start_with(&lab, &dir, &log, &["--policy-enforcement", "default"]).unwrap();
    let mut generation = metric(&lab, &daemon, "bulkhead_policy_generation").unwrap_or(0);

    let mut report = String::new();
    let (mut cells, mut probes) = (0, 0);
    for (index, file) in files.iter().enumerate() {
        let case = read_case(file);
        if index > 0 {
            // The case's name first: the text differs from the last case's
            // even where their objects do not, so every case is a change.
            write_policy(&dir, &format!("# {}\n{}---\n{}", case.name, case.cluster, case.policies));
            generation = wait_for_generation_after(&lab, &daemon, generation);
        }
        for expected in &case.probes {
            probes += 1;
            let (cells_probed, wrong) =
                matrix::probe_matrix(&case.name, expected, |(n, p)| &lab.hosts[n * 3 + p].ns, |_| None);
            cells += cells_probed;
            report.push_str(&wrong);
        }
    }
    assert!(report.is_empty(), "cells that came out otherwise:\n{report}\ndaemon log:\n{}", daemon.log_text());
    assert_eq!(cells, probes * 72, "every probe's 72 cells between distinct pods");
    assert!(probes >= files.len(), "every case probes");
    drop(servers);
}

/// A pod deleted and its address given to a pod with other labels: the
/// old pod's open connection is cut at its next packet, and the new pod
/// gets only what its own labels allow.
#[test]
fn an_address_given_to_another_pod_carries_none_of_the_old_pods_access() {
    let lab = ThreeTier::with_hosts("reuse", &[("client", [10, 1, 1]), ("server", [10, 1, 2])]).unwrap();
    let server = lab.host("server");
    let _echo = EchoServer::start(&server.ns, &[IpAddr::V4(server.addr)], &[80], &[]).unwrap();
    let scratch = ScratchDir::new(&lab.stem).unwrap();
    let dir = scratch.0.join("policy");
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = |client_pod: &str, app: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {client_pod}, namespace: shop, labels: {{app: {app}}}}}\nstatus: {{podIP: 10.1.1.10}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: db, namespace: shop, labels: {{app: db}}}}\nstatus: {{podIP: 10.1.2.10}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: db-from-web, namespace: shop}}\nspec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: web}}}}}}]}}]\n"
        )
    };
    write_policy(&dir, &cluster("web-1", "web"));
    let log = scratch.0.join("daemon.log");
    let daemon = Daemon::start_with(&lab, &dir, &log, &["--policy-enforcement", "default"]).unwrap();
    let generation = metric(&lab, &daemon, "bulkhead_policy_generation").unwrap_or(0);
    let client = &lab.host("client").ns;
    let to_db = SocketAddr::new(IpAddr::V4(server.addr), 80);
    let mut session = probe::TcpSession::connect(client, to_db).unwrap().expect("web may reach db");
    assert_eq!(session.exchange("as web", Duration::from_secs(3)), Outcome::Connected);

    // web-1 is deleted; its address goes to a batch pod.
    write_policy(&dir, &cluster("batch-7", "batch"));
    wait_for_generation_after(&lab, &daemon, generation);
    assert_eq!(
        session.exchange("as batch", Duration::from_millis(700)),
        Outcome::TimedOut,
        "the old pod's connection is cut at its next packet"
    );
    assert_eq!(probe::tcp(client, to_db).unwrap(), Outcome::TimedOut, "the new pod is not admitted");
    let log_text = daemon.log_text();
    let drop = log_text.lines().find(|line| line.contains("\"src_pod\":\"shop/batch-7\""));
    assert!(
        drop.is_some_and(|line| line.contains("\"src_identity\":\"shop/{app=batch}\"")
            && line.contains("\"dst_identity\":\"shop/{app=db}\"")
            && line.contains("\"dst_pod\":\"shop/db\"")),
        "drop events name the pods and their identities: {log_text}"
    );
}

/// A cluster snapshot checked and explained offline, as `kubectl get
/// ns,pods,netpol -A -o yaml > snap.yaml` would give it: the pods and the
/// policies are named, and the verdict is `NetworkPolicy`'s.
#[test]
fn a_cluster_snapshot_is_checked_and_explained_offline() {
    let scratch = ScratchDir::new(&format!("bh-snapshot-{}", std::process::id())).unwrap();
    let snapshot = scratch.0.join("snap.yaml");
    std::fs::write(
        &snapshot,
        r"apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: shop, labels: {kubernetes.io/metadata.name: shop}}
- apiVersion: v1
  kind: Pod
  metadata: {name: web-7c9d, namespace: shop, labels: {app: web}, managedFields: [{manager: kubelet}]}
  spec: {containers: [{name: web, image: web:1}]}
  status: {phase: Running, podIP: 10.0.0.5, conditions: [{type: Ready, status: 'True'}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: web-4f1a, namespace: shop, labels: {app: web}}
  spec: {containers: [{name: web, image: web:1}]}
  status: {phase: Running, podIP: 10.0.0.6}
- apiVersion: v1
  kind: Pod
  metadata: {name: db-0, namespace: shop, labels: {app: db}}
  spec: {containers: [{name: db, ports: [{name: sql, containerPort: 5432}]}]}
  status: {phase: Running, podIP: 10.0.1.7}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: db-from-web, namespace: shop}
  spec:
    podSelector: {matchLabels: {app: db}}
    ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: sql}]}]
- apiVersion: v1
  kind: Service
  metadata: {name: db, namespace: shop}
",
    )
    .unwrap();
    let bulkhead = |args: &[&str]| {
        let output = std::process::Command::new(lab::topology::bulkhead_binary()).args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "{args:?}: {stdout}{}", String::from_utf8_lossy(&output.stderr));
        stdout
    };
    let path = snapshot.display().to_string();
    let checked = bulkhead(&["policy", "check", &path]);
    // The two web pods are alike: one identity.
    assert!(checked.contains("2 identities, 1 rules"), "{checked}");
    assert!(checked.contains("; 3 pods"), "{checked}");
    assert!(checked.contains(": note: Service shop/db skipped"), "{checked}");

    let explain = |from: &str, to: &str| {
        bulkhead(&[
            "policy",
            "explain",
            "--policy-dir",
            &path,
            "--policy-enforcement",
            "default",
            "--from",
            from,
            "--to",
            to,
        ])
    };
    let allowed = explain("10.0.0.5", "10.0.1.7:5432/tcp");
    for line in [
        "source:      10.0.0.5 (pod shop/web-7c9d, identity shop/{app=web})",
        "destination: 10.0.1.7 (pod shop/db-0, identity shop/{app=db}[sql=5432/tcp])",
        "egress:      open (no policy selects this end for the direction)",
        "ingress:     isolated by shop/db-from-web",
        "verdict:     allow (rule shop/db-from-web#ingress-0)",
    ] {
        assert!(allowed.lines().any(|l| l == line), "`{line}` missing:\n{allowed}");
    }
    // The other web pod is the same identity, named as itself.
    let replica = explain("10.0.0.6", "10.0.1.7:5432/tcp");
    for line in [
        "source:      10.0.0.6 (pod shop/web-4f1a, identity shop/{app=web})",
        "verdict:     allow (rule shop/db-from-web#ingress-0)",
    ] {
        assert!(replica.lines().any(|l| l == line), "`{line}` missing:\n{replica}");
    }
    let other_port = explain("10.0.0.5", "10.0.1.7:22/tcp");
    assert!(other_port.contains("verdict:     drop, reason default_deny"), "{other_port}");
    let reverse = explain("10.0.1.7", "10.0.0.5:80/tcp");
    assert!(reverse.contains("verdict:     allow (both ends open, no deny rule)"), "{reverse}");
}
