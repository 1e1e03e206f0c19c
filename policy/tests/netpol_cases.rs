//! Kubernetes' upstream `NetworkPolicy` e2e cases (namespaces x, y, z; pods
//! a, b, c; ports 80 and 81 over TCP and UDP), transcribed as truth tables
//! in `tests/netpol/cases/` (format and sources: `tests/netpol/README.md`).
//! Each case's full 9×9 matrix must come out exactly from the
//! `NetworkPolicy` evaluator, from the reference evaluator and from the
//! engine (what the kernel is written from), under `default` enforcement.
//! `tests/tests/netpol.rs` sends the same cases as real packets.

#[path = "netpol/cases.rs"]
mod cases;

use std::net::IpAddr;
use std::sync::Arc;

use policy::kubernetes::netpol::{Connection, judge};
use policy::kubernetes::translate::{pod_identity, policy_rules, translate};
use policy::kubernetes::{Objects, read_objects};
use policy::model::Enforcement;
use policy::{Contents, Diagnostic, Engine, Evaluator, Packet, Policy, SourceChange, Verdict};

use cases::{NAMESPACES, PODS, address, all_pods, case_files, read_case};

/// Runs one case; returns its mismatches, worded for the failure report.
fn run_case(path: &std::path::Path) -> Vec<String> {
    let case = read_case(path);
    let name = case.name.as_str();
    let file: Arc<str> = Arc::from(name);
    let mut objects = Objects::default();
    let mut reports: Vec<Diagnostic> = Vec::new();
    read_objects(&file, &case.cluster, &mut objects, &mut reports).unwrap();
    read_objects(&file, &case.policies, &mut objects, &mut reports).unwrap();
    let unexpected: Vec<String> =
        reports.iter().map(ToString::to_string).filter(|report| !report.contains("SCTP")).collect();
    assert!(unexpected.is_empty(), "{name}: {unexpected:#?}");
    assert_eq!(objects.pods.len(), 9, "{name}");
    // Each policy document of the file was read (a case may have none:
    // the state after every policy is deleted).
    assert_eq!(objects.network_policies.len(), case.policies.matches("kind: NetworkPolicy").count(), "{name}");

    // The same cluster as the engine and the reference evaluator take it:
    // once as one source, and once object by object, policies first (they
    // select nothing yet), then the namespaces, then the pods, which the
    // rules select as they appear.
    let translated = translate(&objects);
    let evaluator = Evaluator::new(&translated).with_enforcement(Enforcement::Default);
    let now = std::time::SystemTime::now();
    let mut whole = Engine::with_enforcement(Enforcement::Default);
    whole
        .apply(vec![SourceChange { source: "cluster".to_owned(), contents: Contents::Parsed(translated.clone()) }], now)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut piecewise = Engine::with_enforcement(Enforcement::Default);
    let mut pieces: Vec<Policy> = Vec::new();
    for network_policy in &objects.network_policies {
        pieces.push(Policy { rules: policy_rules(network_policy), ..Policy::default() });
    }
    pieces.push(Policy { namespaces: objects.namespaces.clone(), ..Policy::default() });
    for pod in &objects.pods {
        pieces.push(Policy { identities: vec![pod_identity(pod)], ..Policy::default() });
    }
    for (index, piece) in pieces.into_iter().enumerate() {
        let change = SourceChange { source: format!("piece-{index}"), contents: Contents::Parsed(piece) };
        piecewise.apply(vec![change], now).unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    let mut mismatches = Vec::new();
    for probe in &case.probes {
        let port = probe.number();
        for from in all_pods() {
            for to in all_pods() {
                if from == to {
                    continue; // a pod's traffic to itself never leaves it
                }
                let expected = if probe.expects(from, to) { '.' } else { 'X' };
                let connection = Connection {
                    source: IpAddr::V4(address(from.0, from.1)),
                    destination: IpAddr::V4(address(to.0, to.1)),
                    protocol: probe.protocol,
                    port,
                };
                let judged = judge(&objects, &connection);
                let packet = Packet {
                    src: connection.source,
                    dst: connection.destination,
                    protocol: probe.protocol.number(),
                    port,
                };
                let shown = |verdict: Verdict| if verdict == Verdict::Forward { '.' } else { 'X' };
                let answers = [
                    ("the NetworkPolicy evaluator", if judged.allowed() { '.' } else { 'X' }),
                    ("the reference evaluator", shown(evaluator.evaluate(&packet).verdict)),
                    ("the engine (one source)", shown(whole.describe(&packet, &[]).verdict)),
                    ("the engine (object by object)", shown(piecewise.describe(&packet, &[]).verdict)),
                ];
                for (who, got) in answers {
                    if got != expected {
                        mismatches.push(format!(
                            "{name}: {}/{} {}/{} → {}/{}: expected {expected}, {who} says {got} ({judged:?})",
                            probe.protocol, probe.port, NAMESPACES[from.0], PODS[from.1], NAMESPACES[to.0], PODS[to.1]
                        ));
                    }
                }
            }
        }
    }
    mismatches
}

#[test]
fn upstream_network_policy_cases_come_out_exactly() {
    let files = case_files();
    assert!(files.len() >= 40, "{} cases; the issue asks for at least 40", files.len());
    let mismatches: Vec<String> = files.iter().flat_map(|file| run_case(file)).collect();
    assert!(mismatches.is_empty(), "{} mismatches:\n{}", mismatches.len(), mismatches.join("\n"));
}

#[test]
fn tokens_are_replaced_by_pod_addresses() {
    assert_eq!(
        cases::substitute("cidr: \"IP(y/b)/32\", net: NET(z/c,16), Name: INGRESS"),
        "cidr: \"10.2.2.10/32\", net: 10.3.0.0/16, Name: INGRESS"
    );
}
