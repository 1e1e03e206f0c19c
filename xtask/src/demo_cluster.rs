//! `cargo xtask demo --cluster`: three emulated nodes, each running its own
//! daemon with pods behind it, all learning pods, namespaces,
//! `NetworkPolicies` and a `SegmentPolicy` from one fake API server; a table
//! of what the policies say beside what real connections do, most of them
//! crossing nodes, then a pod relabelled through the API and the table
//! again once every node has it.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use lab::cluster::{EmulatedCluster, PodPlace};
use lab::probe::{self, EchoServer};
use policy::model::Enforcement;
use policy::{Packet, Verdict};
use serde_json::{Value, json};

/// The cluster's objects, as `kubectl get -o yaml` would show them: what
/// the API server serves, and (read as a policy file) what the reference
/// evaluator judges by.
const OBJECTS: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: monitoring, labels: {team: ops}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: shop, labels: {app: frontend}}
spec:
  nodeName: node-1
  containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]
status: {phase: Running, podIP: 10.11.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: prometheus, namespace: monitoring, labels: {app: prometheus}}
spec:
  nodeName: node-1
  containers: [{name: prometheus, ports: [{name: web, containerPort: 9090}]}]
status: {phase: Running, podIP: 10.11.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec:
  nodeName: node-2
  containers: [{name: api, ports: [{name: http, containerPort: 8080}]}]
status: {phase: Running, podIP: 10.12.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: shop, labels: {app: batch}}
spec:
  nodeName: node-2
  containers: [{name: batch}]
status: {phase: Running, podIP: 10.12.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec:
  nodeName: node-3
  containers: [{name: postgres, ports: [{name: postgres, containerPort: 5432}]}]
status: {phase: Running, podIP: 10.13.1.10}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-frontend, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{from: [{podSelector: {matchLabels: {app: frontend}}}], ports: [{port: http}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-backends, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchExpressions: [{key: app, operator: In, values: [api, batch]}]}}]
    ports: [{port: 5432, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: scrape-from-ops, namespace: shop}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: ops}}}]}]
---
apiVersion: bulkhead.dev/v1
kind: SegmentPolicy
metadata: {name: tighten}
spec:
  rules:
  - {name: no-batch-to-db, action: deny, from: [{labels: {app: batch}}], to: [{labels: {app: db}}]}
";

/// Pod host, node (0-based), subnet, namespace/name.
const PODS: [(&str, usize, [u8; 3], &str); 5] = [
    ("frontend", 0, [10, 11, 1], "shop/frontend"),
    ("prom", 0, [10, 11, 2], "monitoring/prometheus"),
    ("api", 1, [10, 12, 1], "shop/api"),
    ("batch", 1, [10, 12, 2], "shop/batch"),
    ("db", 2, [10, 13, 1], "shop/db"),
];

const PROBES: [(&str, &str, u16); 9] = [
    ("frontend", "api", 8080),
    ("api", "db", 5432),
    ("batch", "db", 5432),
    ("frontend", "db", 5432),
    ("batch", "api", 8080),
    ("api", "frontend", 8080),
    ("prom", "db", 5432),
    ("prom", "api", 8080),
    ("db", "prom", 9090),
];

pub fn demo(binary: &Path) -> anyhow::Result<()> {
    // SAFETY: set before any thread reads the environment.
    unsafe { std::env::set_var("BULKHEAD_BIN", binary) };
    let places: Vec<PodPlace> = PODS.iter().map(|&(host, node, subnet, _)| PodPlace { host, node, subnet }).collect();
    let mut cluster = EmulatedCluster::new("cluster", 3, &places).context("creating the emulated cluster failed")?;
    let _servers: Vec<EchoServer> = PODS
        .iter()
        .map(|&(host, ..)| {
            let pod = cluster.pod(host);
            EchoServer::start(&pod.ns, &[IpAddr::V4(pod.addr)], &[5432, 8080, 9090], &[])
        })
        .collect::<Result<_, _>>()?;
    let mut objects = lab::manifests::objects(OBJECTS);
    for object in &objects {
        cluster.api.create_value(object.clone()).context("the fake API server refused an object")?;
    }
    println!("demo: 3 nodes, each running bulkhead --kubernetes --policy-enforcement default, joined by a fabric:");
    for &(host, node, _, name) in &PODS {
        println!("demo:   {name:<22} {:<11} on node-{}", cluster.pod(host).addr, node + 1);
    }
    cluster.start_daemons(&["--policy-enforcement", "default"]).context("a daemon did not start")?;
    println!("demo: every node learnt the pods, the NetworkPolicies and the SegmentPolicy from the API\n");

    let mut mismatches = table(&cluster, &objects)?;

    println!("\ndemo: relabelling shop/batch app=batch -> app=api through the API");
    let started = Instant::now();
    let batch = objects
        .iter_mut()
        .find(|object| object["kind"] == "Pod" && object["metadata"]["name"] == "batch")
        .context("the demo has a batch pod")?;
    batch["metadata"]["labels"] = json!({"app": "api"});
    let updated = cluster.api.update_value(batch.clone())?;
    let version = updated["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
    while !cluster.all_include("pods", version) {
        if started.elapsed() > Duration::from_secs(15) {
            bail!("the nodes never took the change:\n{}", cluster.logs());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("demo: enforced on all 3 nodes {} ms after the API took it\n", started.elapsed().as_millis());
    mismatches += table(&cluster, &objects)?;

    drop(cluster);
    println!("\ndemo: cleaned up (daemons stopped, namespaces removed)");
    if mismatches > 0 {
        bail!("{mismatches} probe(s) disagreed with the policies");
    }
    Ok(())
}

/// Probes every pair of [`PROBES`]; prints what the policies (the cluster's
/// `objects` read as a policy file, under `default` enforcement) say beside
/// what happened; returns how many disagreed.
fn table(cluster: &EmulatedCluster, objects: &[Value]) -> anyhow::Result<usize> {
    // JSON is YAML: the objects as a file of documents.
    let text: Vec<String> = objects.iter().map(Value::to_string).collect();
    let parsed =
        policy::parse_str("cluster.yaml", &text.join("\n---\n")).context("the demo's objects do not read as policy")?;
    let evaluator = policy::Evaluator::new(&parsed).with_enforcement(Enforcement::Default);
    let name = |host: &'static str| PODS.iter().find(|p| p.0 == host).map_or(host, |p| p.3);
    let node = |host: &str| PODS.iter().find(|p| p.0 == host).map_or(0, |p| p.1 + 1);
    let targets: Vec<(&lab::Netns, SocketAddr)> = PROBES
        .iter()
        .map(|&(from, to, port)| (&cluster.pod(from).ns, SocketAddr::new(IpAddr::V4(cluster.pod(to).addr), port)))
        .collect();
    let outcomes = probe::all_at_once(&targets, false)?;
    println!("{:<30} {:<30} {:<9} {:<52} OBSERVED", "FROM", "TO", "TRAFFIC", "POLICY SAYS");
    let mut mismatches = 0;
    for (&(from, to, port), outcome) in PROBES.iter().zip(outcomes) {
        let packet = Packet { src: cluster.pod(from).addr.into(), dst: cluster.pod(to).addr.into(), protocol: 6, port };
        let decision = evaluator.evaluate(&packet);
        let allowed = decision.verdict == Verdict::Forward;
        let said = match (decision.verdict, decision.rule) {
            (Verdict::Forward, Some(rule)) => format!("allow ({rule})"),
            (Verdict::Forward, None) => "allow (both ends open)".to_owned(),
            (Verdict::Drop(reason) | Verdict::Audit(reason), Some(rule)) => format!("drop {} ({rule})", reason.label()),
            (Verdict::Drop(reason) | Verdict::Audit(reason), None) => format!("drop {}", reason.label()),
        };
        let (observed, agrees) = crate::demo::observed(outcome, allowed);
        if !agrees {
            mismatches += 1;
        }
        println!(
            "{:<30} {:<30} {:<9} {said:<52} {observed}",
            format!("{} (node-{})", name(from), node(from)),
            format!("{} (node-{})", name(to), node(to)),
            format!("{port}/tcp"),
        );
    }
    Ok(mismatches)
}
