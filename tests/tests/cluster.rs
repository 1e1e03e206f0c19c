//! Three emulated nodes, each running its own daemon with three pods behind
//! it, all watching one fake API server: the upstream `NetworkPolicy` cases
//! (`policy/tests/netpol/cases`), applied through the API one after the
//! other (labels updated, policies deleted and created), each judged over
//! real packets, most of them crossing from one node to another. Each
//! case is probed once every node's view of the cluster includes its last
//! change (`bulkhead_kubernetes_resource_version`).

#[path = "../../policy/tests/netpol/cases.rs"]
mod cases;
#[path = "support/matrix.rs"]
mod matrix;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lab::cluster::{EmulatedCluster, PodPlace};
use lab::probe::EchoServer;
use policy::kubernetes::{Objects, read_objects};
use serde_json::{Value, json};

use cases::{PODS, address, all_pods, case_files, read_case};

const POD_HOSTS: [&str; 9] = ["x-a", "x-b", "x-c", "y-a", "y-b", "y-c", "z-a", "z-b", "z-c"];

/// Brings the API to `case`'s state: labels first, then the old policies go
/// and the case's come. Returns the resourceVersion of the last change of
/// each resource changed.
fn apply_case(
    cluster: &EmulatedCluster,
    case: &cases::Case,
    labels_now: &mut Objects,
    policies_now: &mut Vec<(String, String)>,
) -> BTreeMap<&'static str, u64> {
    let wanted = objects_of(&case.cluster);
    let mut latest: BTreeMap<&str, u64> = BTreeMap::new();
    for (namespace, before) in wanted.namespaces.iter().zip(&labels_now.namespaces) {
        if namespace.labels != before.labels {
            let object = json!({"apiVersion": "v1", "kind": "Namespace",
                                "metadata": {"name": namespace.name, "labels": namespace.labels}});
            latest.insert("namespaces", resource_version(&cluster.api.update_value(object).unwrap()));
        }
    }
    for (pod, before) in wanted.pods.iter().zip(&labels_now.pods) {
        if pod.labels != before.labels {
            let mut object = serde_json::to_value(
                cluster.api.get::<k8s_openapi::api::core::v1::Pod>(Some(&pod.namespace), &pod.name).unwrap().unwrap(),
            )
            .unwrap();
            object["metadata"]["labels"] = json!(pod.labels);
            latest.insert("pods", resource_version(&cluster.api.update_value(object).unwrap()));
        }
    }
    *labels_now = wanted;
    for (namespace, name) in policies_now.drain(..) {
        let gone = cluster.api.delete_value("networking.k8s.io/v1", "NetworkPolicy", Some(&namespace), &name).unwrap();
        latest.insert("networkpolicies", resource_version(&gone));
    }
    for policy in documents(&case.policies) {
        let created = cluster.api.create_value(policy).unwrap();
        let (namespace, name) = (&created["metadata"]["namespace"], &created["metadata"]["name"]);
        policies_now.push((namespace.as_str().unwrap().to_owned(), name.as_str().unwrap().to_owned()));
        latest.insert("networkpolicies", resource_version(&created));
    }
    latest
}

/// The Kubernetes objects of a case's YAML.
fn objects_of(text: &str) -> Objects {
    let mut objects = Objects::default();
    let mut reports = Vec::new();
    read_objects(&Arc::from("case"), text, &mut objects, &mut reports).unwrap();
    objects
}

/// Each document of a case's YAML, as JSON.
fn documents(text: &str) -> Vec<Value> {
    lab::manifests::objects(text)
}

fn resource_version(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse().ok()).expect("a resourceVersion")
}

#[test]
fn upstream_network_policy_cases_across_three_nodes() {
    let places: Vec<PodPlace> = all_pods()
        .into_iter()
        .map(|(n, p)| {
            let [a, b, c, _] = address(n, p).octets();
            PodPlace { host: POD_HOSTS[n * 3 + p], node: p, subnet: [a, b, c] }
        })
        .collect();
    let mut cluster = EmulatedCluster::new("multi", 3, &places).unwrap();
    let servers: Vec<EchoServer> = all_pods()
        .into_iter()
        .map(|(n, p)| {
            let host = cluster.pod(POD_HOSTS[n * 3 + p]);
            EchoServer::start(&host.ns, &[IpAddr::V4(host.addr)], &[80, 81], &[80, 81]).unwrap()
        })
        .collect();

    // The cluster's namespaces and pods, as the first case has them.
    let files = case_files();
    let first = read_case(&files[0]);
    for object in documents(&first.cluster) {
        let mut object = object;
        if object["kind"] == "Pod" {
            let node = PODS.iter().position(|p| *p == object["metadata"]["name"]).unwrap();
            object["spec"]["nodeName"] = json!(format!("node-{}", node + 1));
        }
        cluster.api.create_value(object).unwrap();
    }
    cluster.start_daemons(&["--policy-enforcement", "default"]).unwrap();

    let mut labels_now = objects_of(&first.cluster);
    let mut policies_now: Vec<(String, String)> = Vec::new();
    let mut report = String::new();
    let mut probes = 0;
    for file in &files {
        let case = read_case(file);
        let latest = apply_case(&cluster, &case, &mut labels_now, &mut policies_now);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !latest.iter().all(|(resource, version)| cluster.all_include(resource, *version)) {
            assert!(
                Instant::now() < deadline,
                "{}: the nodes never caught up with {latest:?}\n{}",
                case.name,
                cluster.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        for expected in &case.probes {
            probes += 1;
            let (_, wrong) = matrix::probe_matrix(
                &case.name,
                expected,
                |(n, p)| &cluster.pod(POD_HOSTS[n * 3 + p]).ns,
                |(_, p)| Some(p),
            );
            report.push_str(&wrong);
        }
    }
    assert!(report.is_empty(), "cells that came out otherwise:\n{report}\n{}", cluster.logs());
    assert!(probes >= files.len());
    drop(servers);
}
