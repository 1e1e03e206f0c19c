//! The cluster part: three emulated nodes (`lab::cluster`), each running its
//! own daemon with `--kubernetes`, against one fake API server preloaded
//! with a cluster of `pods` pods and `policies` `NetworkPolicies`. Measured:
//! each node's time from start to ready (the initial sync) and its RSS; a
//! pod created or deleted until all three nodes enforce it; and pod label
//! changes at 100 per second, the lag until all three nodes enforce each.
//!
//! "Enforced on a node" is read from the node's
//! `bulkhead_kubernetes_resource_version{resource="pods"}`, which a daemon
//! publishes once the maps hold the change of that resourceVersion.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lab::cluster::{EmulatedCluster, PodPlace};
use serde_json::{Value, json};

use crate::Error;
use crate::footprint::rss_kib;
use crate::results::{ms, percentile};

pub struct ClusterFigures {
    pods: usize,
    policies: usize,
    /// Per node: spawn → `/readyz` 200.
    ready: Vec<Duration>,
    rss_kib: Vec<u64>,
    /// Pod created → enforced on all nodes, and deleted → the same.
    created: Vec<f64>,
    deleted: Vec<f64>,
    /// Label changes at `churn_rate` per second: change → all nodes.
    churn: Vec<f64>,
    churn_rate: u32,
}

/// The preloaded cluster: pod `i` is `bench/pod-i`, labelled `app: svc-(i %
/// policies)`, at 10.64.0.0/10 + i, except the first ten, which are
/// `monitoring/pod-i`; policy `k` admits `svc-(k+1)` to `svc-k` on TCP 8080
/// (and, every tenth, the `monitoring` namespace, by its label).
fn pod(i: usize, app: &str) -> Value {
    let namespace = if i < 10 { "monitoring" } else { "bench" };
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 64, 0, 0)) + i + 1);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("pod-{i}"), "namespace": namespace, "labels": {"app": app}},
        "spec": {"nodeName": format!("node-{}", i % 3 + 1), "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}
    })
}

fn policy(k: usize, policies: usize) -> Value {
    let mut from = vec![json!({"podSelector": {"matchLabels": {"app": format!("svc-{}", (k + 1) % policies)}}})];
    if k.is_multiple_of(10) {
        from.push(json!({"namespaceSelector": {"matchLabels": {"team": "ops"}}}));
    }
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("svc-{k}"), "namespace": "bench"},
        "spec": {"podSelector": {"matchLabels": {"app": format!("svc-{k}")}},
                 "ingress": [{"from": from, "ports": [{"port": 8080, "protocol": "TCP"}]}]}
    })
}

fn version(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX)
}

const PODS_SAMPLE: &str = "bulkhead_kubernetes_resource_version{resource=\"pods\"}";

/// The oldest view of pods among the nodes.
fn slowest_view(cluster: &EmulatedCluster) -> u64 {
    (0..cluster.nodes.len()).map(|node| cluster.metric(node, PODS_SAMPLE).unwrap_or(0)).min().unwrap_or(0)
}

fn until_all_include(cluster: &EmulatedCluster, version: u64, started: Instant) -> Result<f64, Error> {
    while slowest_view(cluster) < version {
        if started.elapsed() > Duration::from_secs(30) {
            return Err(format!("the nodes never took resourceVersion {version}:\n{}", cluster.logs()).into());
        }
    }
    Ok(ms(started.elapsed()))
}

pub fn figures(pods: usize, policies: usize, changes: usize, churn_seconds: u64) -> Result<ClusterFigures, Error> {
    let places = [
        PodPlace { host: "p1", node: 0, subnet: [10, 31, 1] },
        PodPlace { host: "p2", node: 1, subnet: [10, 32, 1] },
        PodPlace { host: "p3", node: 2, subnet: [10, 33, 1] },
    ];
    let mut cluster = EmulatedCluster::new("bench-cluster", 3, &places)?;
    for (name, labels) in [("bench", json!({})), ("monitoring", json!({"team": "ops"}))] {
        cluster.api.create_value(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}),
        )?;
    }
    for k in 0..policies {
        cluster.api.create_value(policy(k, policies))?;
    }
    for i in 0..pods {
        cluster.api.create_value(pod(i, &format!("svc-{}", i % policies.max(1))))?;
    }
    // Each node's daemon, one after the other, from spawn to ready.
    let mut ready = Vec::new();
    for node in 0..3 {
        let started = Instant::now();
        cluster.start_node(node, &["--policy-enforcement", "default"])?;
        ready.push(started.elapsed());
    }
    let rss_kib: Vec<u64> =
        cluster.nodes.iter().filter_map(|node| node.daemon.as_ref()).map(|daemon| rss_kib(daemon.pid())).collect();

    let (mut created, mut deleted) = (Vec::new(), Vec::new());
    for n in 0..changes {
        let started = Instant::now();
        let made = cluster.api.create_value(pod(pods + n, "svc-0"))?;
        created.push(until_all_include(&cluster, version(&made), started)?);
        let started = Instant::now();
        let gone = cluster.api.delete_value("v1", "Pod", Some("bench"), &format!("pod-{}", pods + n))?;
        deleted.push(until_all_include(&cluster, version(&gone), started)?);
    }

    // Churn: a relabel every 1/rate s, on a schedule; a poller notes when
    // the slowest node's view passes each change's version.
    let churn_rate = 100;
    let sent: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let views: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<(), Error> {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let view = slowest_view(&cluster);
                views.lock().unwrap().push((Instant::now(), view));
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let period = Duration::from_secs(1) / churn_rate;
        let start = Instant::now();
        let total = usize::try_from(churn_seconds * u64::from(churn_rate)).unwrap_or(usize::MAX);
        for n in 0..total {
            let due = start + period * u32::try_from(n).unwrap_or(u32::MAX);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let i = n % pods.max(1);
            let app = if (n / pods.max(1)).is_multiple_of(2) { "churned" } else { "svc-0" };
            let at = Instant::now();
            let relabelled = cluster.api.update_value(pod(i, app))?;
            sent.lock().unwrap().push((version(&relabelled), at));
        }
        let last = sent.lock().unwrap().last().map_or(0, |(v, _)| *v);
        let deadline = Instant::now() + Duration::from_secs(30);
        while slowest_view(&cluster) < last && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        done.store(true, Ordering::Relaxed);
        Ok(())
    })?;
    let views = views.lock().unwrap();
    let churn: Vec<f64> = sent
        .lock()
        .unwrap()
        .iter()
        .filter_map(|&(v, at)| {
            views.iter().find(|(when, view)| *when >= at && *view >= v).map(|(when, _)| ms(*when - at))
        })
        .collect();
    Ok(ClusterFigures { pods, policies, ready, rss_kib, created, deleted, churn, churn_rate })
}

pub fn markdown(md: &mut String, figures: &ClusterFigures) {
    let _ = writeln!(
        md,
        "\n### Cluster: 3 emulated nodes, {} pods and {} NetworkPolicies from one fake API\n",
        figures.pods, figures.policies
    );
    let _ = writeln!(md, "| node | start → ready (initial sync) | RSS |\n|---|---:|---:|");
    for (node, (ready, rss)) in figures.ready.iter().zip(&figures.rss_kib).enumerate() {
        let _ = writeln!(md, "| node-{} | {:.2} s | {} MiB |", node + 1, ready.as_secs_f64(), rss / 1024);
    }
    let _ = writeln!(md, "\n| change | n | p50 | p99 | max |\n|---|---:|---:|---:|---:|");
    let row = |md: &mut String, what: &str, values: &[f64]| {
        if values.is_empty() {
            return;
        }
        let max = values.iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            md,
            "| {what} | {} | {:.1} ms | {:.1} ms | {max:.1} ms |",
            values.len(),
            percentile(values, 0.5),
            percentile(values, 0.99)
        );
    };
    row(md, "pod created → enforced on all 3 nodes", &figures.created);
    row(md, "pod deleted → enforced on all 3 nodes", &figures.deleted);
    row(md, &format!("pod relabelled, {} per second → all 3 nodes (lag)", figures.churn_rate), &figures.churn);
}

pub fn json(figures: &ClusterFigures) -> Value {
    json!({
        "pods": figures.pods,
        "network_policies": figures.policies,
        "ready_s": figures.ready.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        "rss_kib": figures.rss_kib,
        "created_ms": {"p50": percentile_or_zero(&figures.created, 0.5), "p99": percentile_or_zero(&figures.created, 0.99)},
        "deleted_ms": {"p50": percentile_or_zero(&figures.deleted, 0.5), "p99": percentile_or_zero(&figures.deleted, 0.99)},
        "churn": {"per_second": figures.churn_rate, "lag_p50_ms": percentile_or_zero(&figures.churn, 0.5), "lag_p99_ms": percentile_or_zero(&figures.churn, 0.99)},
    })
}

fn percentile_or_zero(values: &[f64], p: f64) -> f64 {
    if values.is_empty() { 0.0 } else { percentile(values, p) }
}
