//! The engine's part of a cluster's initial sync, alone: `PODS` pods and
//! `POLICIES` `NetworkPolicies` as the Kubernetes source hands them over (one
//! JSON source each), applied as one change. For profiling:
//! `cargo run --release -p policy --example k8s_sync -- 10000 1000`
//! (`NSWIDE=1`: every tenth policy also admits a whole namespace by label).

use policy::model::Enforcement;
use policy::{Contents, Engine, SourceChange};
use std::time::Instant;

fn main() {
    let pods: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let policies: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let mut changes = Vec::new();
    changes.push(SourceChange {
        source: "kubernetes:namespaces/bench".into(),
        contents: Contents::Text(
            r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"bench","labels":{"team":"ops"}}}"#.into(),
        ),
    });
    for k in 0..policies {
        let extra = if std::env::var_os("NSWIDE").is_some() && k % 10 == 0 {
            r#",{"namespaceSelector":{"matchLabels":{"team":"ops"}}}"#
        } else {
            ""
        };
        let text = format!(
            r#"{{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{{"name":"svc-{k}","namespace":"bench"}},"spec":{{"podSelector":{{"matchLabels":{{"app":"svc-{k}"}}}},"ingress":[{{"from":[{{"podSelector":{{"matchLabels":{{"app":"svc-{}"}}}}}}{extra}],"ports":[{{"port":8080,"protocol":"TCP"}}]}}]}}}}"#,
            (k + 1) % policies
        );
        changes.push(SourceChange {
            source: format!("kubernetes:networkpolicies/bench/svc-{k}"),
            contents: Contents::Text(text),
        });
    }
    for i in 0..pods {
        let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 64, 0, 0)) + i as u32 + 1);
        let text = format!(
            r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"labels":{{"app":"svc-{}"}},"name":"pod-{i}","namespace":"bench"}},"spec":{{"containers":[{{"name":"app","ports":[{{"containerPort":8080,"name":"http"}}]}}],"hostNetwork":false}},"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#,
            i % policies
        );
        changes.push(SourceChange { source: format!("kubernetes:pods/bench/pod-{i}"), contents: Contents::Text(text) });
    }
    let mut engine = Engine::with_enforcement(Enforcement::Default);
    let started = Instant::now();
    let diff = engine.apply(changes, std::time::SystemTime::now()).unwrap();
    println!("{pods} pods, {policies} policies: {:?}, {} entries", started.elapsed(), diff.entries());
}
