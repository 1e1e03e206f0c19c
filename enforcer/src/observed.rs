//! What audit mode saw, and the policy that would allow exactly it
//! (`bulkhead policy suggest`): the safe path from audit to enforce.
//!
//! The daemon tallies every audit event (a packet the policy would have
//! dropped but audit mode passed) by flow: source and destination identity,
//! protocol and destination port or ICMP type. The tally is bounded
//! ([`MAX_FLOWS`] distinct flows; more are counted, not kept) and is what
//! the kernel reported: events are rate-limited per CPU
//! (`bulkhead_events_lost_total`), so a flow is seen once its packets get
//! through the budget, which a flow seen over a while always does.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::events::EventRecord;

/// Distinct flows kept.
pub const MAX_FLOWS: usize = 10_000;

/// One flow audit mode passed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Flow {
    pub src_identity: String,
    pub dst_identity: String,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, or a protocol number.
    pub protocol: String,
    /// Destination port (TCP, UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// ICMP type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
}

/// How often a flow was seen, and when first and last (RFC 3339).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub events: u64,
    pub first: String,
    pub last: String,
}

/// The daemon's tally of audited flows.
#[derive(Debug, Default)]
pub struct Observed {
    flows: BTreeMap<Flow, Tally>,
    /// Events of flows beyond [`MAX_FLOWS`].
    not_kept: u64,
}

impl Observed {
    /// Tallies `record` if audit mode passed it.
    pub fn record(&mut self, record: &EventRecord) {
        if record.verdict != "audit" {
            return;
        }
        let flow = Flow {
            src_identity: record.src_identity.clone(),
            dst_identity: record.dst_identity.clone(),
            protocol: record.protocol.clone(),
            port: record.dst_port,
            icmp_type: record.icmp_type,
        };
        if let Some(tally) = self.flows.get_mut(&flow) {
            tally.events += 1;
            tally.last.clone_from(&record.time);
        } else if self.flows.len() < MAX_FLOWS {
            self.flows.insert(flow, Tally { events: 1, first: record.time.clone(), last: record.time.clone() });
        } else {
            self.not_kept += 1;
        }
    }

    /// Every flow with its tally, and the events not kept.
    #[must_use]
    pub fn report(&self) -> ObservedReport {
        ObservedReport {
            flows: self
                .flows
                .iter()
                .map(|(flow, tally)| ObservedFlow { flow: flow.clone(), tally: tally.clone(), src: None, dst: None })
                .collect(),
            not_kept: self.not_kept,
        }
    }
}

/// What `GET /v1/observed` answers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ObservedReport {
    pub flows: Vec<ObservedFlow>,
    /// Audit events of flows beyond the [`MAX_FLOWS`] kept.
    pub not_kept: u64,
}

/// A flow, its tally, and each end's pod facts where the end is a pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObservedFlow {
    #[serde(flatten)]
    pub flow: Flow,
    #[serde(flatten)]
    pub tally: Tally,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<PodEnd>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<PodEnd>,
}

/// A pod identity's namespace and labels: what a `NetworkPolicy` selects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodEnd {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// A YAML double-quoted string.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The port entry of a flow in the policy format, if it has one.
fn port_entry(flow: &Flow) -> Option<String> {
    match (flow.protocol.as_str(), flow.port, flow.icmp_type) {
        ("tcp" | "udp", Some(port), _) => Some(format!("{port}/{}", flow.protocol)),
        ("icmp" | "icmpv6", _, Some(icmp_type)) => Some(format!("{}/{icmp_type}", flow.protocol)),
        _ => None,
    }
}

/// A `SegmentPolicy` that allows exactly the flows of `report`, one rule
/// per (source, destination) with its ports, for review before it is
/// applied. Flows it cannot express are listed as comments.
#[must_use]
pub fn segment_policy(report: &ObservedReport) -> String {
    let mut pairs: BTreeMap<(&str, &str), (Vec<String>, u64)> = BTreeMap::new();
    let mut skipped = Vec::new();
    for observed in &report.flows {
        let flow = &observed.flow;
        let Some(port) = port_entry(flow) else {
            skipped.push(format!(
                "# not expressible: protocol {} from {} to {}",
                flow.protocol, flow.src_identity, flow.dst_identity
            ));
            continue;
        };
        let entry = pairs.entry((flow.src_identity.as_str(), flow.dst_identity.as_str())).or_default();
        entry.0.push(port);
        entry.1 += observed.tally.events;
    }
    let mut text = header(report, "SegmentPolicy");
    text.push_str("apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: suggested}\nspec:\n  rules:\n");
    if pairs.is_empty() {
        text.truncate(text.len() - "  rules:\n".len());
        text.push_str("  rules: []\n");
    }
    for (n, ((src, dst), (mut ports, events))) in pairs.into_iter().enumerate() {
        ports.sort();
        ports.dedup();
        let ports: Vec<String> = ports.iter().map(|p| quoted(p)).collect();
        let _ = writeln!(text, "    # {src} -> {dst}: {events} audit event(s)");
        let _ = writeln!(text, "    - name: suggested-{}", n + 1);
        let _ = writeln!(text, "      from: [{{identity: {}}}]", quoted(src));
        let _ = writeln!(text, "      to: [{{identity: {}}}]", quoted(dst));
        let _ = writeln!(text, "      ports: [{}]", ports.join(", "));
    }
    for line in skipped {
        let _ = writeln!(text, "{line}");
    }
    text
}

/// `NetworkPolicies` that allow exactly the flows of `report` between
/// pods: for each kind of pod, one policy with an ingress rule per source
/// kind and an egress rule per destination kind (so the flows pass whether
/// or not each end is isolated). Flows with an end that is not a pod are
/// listed as comments: a `NetworkPolicy` selects pods (and addresses,
/// which the tally does not keep).
#[must_use]
pub fn network_policies(report: &ObservedReport) -> String {
    /// Peer identity → its ports.
    type Rules = BTreeMap<String, Vec<String>>;
    let mut by_pod: BTreeMap<String, (PodEnd, Rules, Rules)> = BTreeMap::new();
    let mut skipped = Vec::new();
    for observed in &report.flows {
        let flow = &observed.flow;
        let (Some(src), Some(dst), Some(port)) = (&observed.src, &observed.dst, port_entry(flow)) else {
            skipped.push(format!(
                "# not expressible as a NetworkPolicy (an end that is not a pod, or protocol {}): {} -> {}",
                flow.protocol, flow.src_identity, flow.dst_identity
            ));
            continue;
        };
        if flow.protocol.starts_with("icmp") {
            skipped.push(format!(
                "# not expressible as a NetworkPolicy (ICMP): {} -> {}",
                flow.src_identity, flow.dst_identity
            ));
            continue;
        }
        let fresh = |end: &PodEnd| (end.clone(), Rules::new(), Rules::new());
        let ingress = &mut by_pod.entry(flow.dst_identity.clone()).or_insert_with(|| fresh(dst)).1;
        ingress.entry(flow.src_identity.clone()).or_default().push(port.clone());
        let egress = &mut by_pod.entry(flow.src_identity.clone()).or_insert_with(|| fresh(src)).2;
        egress.entry(flow.dst_identity.clone()).or_default().push(port);
    }
    // Every end of an expressible flow has its policy above, with its pod facts.
    let peer = |name: &str| {
        let end = &by_pod[name].0;
        format!(
            "{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {}}}}}, podSelector: {{matchLabels: {}}}}}",
            quoted(&end.namespace),
            labels(&end.labels)
        )
    };
    let ports = |ports: &[String]| {
        let mut entries: Vec<String> = ports
            .iter()
            .filter_map(|p| p.split_once('/'))
            .map(|(port, protocol)| format!("{{port: {port}, protocol: {}}}", protocol.to_uppercase()))
            .collect();
        entries.sort();
        entries.dedup();
        entries.join(", ")
    };
    let mut text = header(report, "NetworkPolicy");
    for (n, (name, (end, ingress, egress))) in by_pod.iter().enumerate() {
        let directions = [("Ingress", "ingress", "from", ingress), ("Egress", "egress", "to", egress)];
        let types: Vec<&str> = directions.iter().filter(|d| !d.3.is_empty()).map(|d| d.0).collect();
        let _ = writeln!(text, "---\n# pods of {name}");
        let _ = writeln!(text, "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy");
        let _ = writeln!(text, "metadata: {{name: suggested-{}, namespace: {}}}", n + 1, quoted(&end.namespace));
        let _ = writeln!(text, "spec:\n  podSelector: {{matchLabels: {}}}", labels(&end.labels));
        let _ = writeln!(text, "  policyTypes: [{}]", types.join(", "));
        for (_, section, side, rules) in directions.iter().filter(|d| !d.3.is_empty()) {
            let _ = writeln!(text, "  {section}:");
            for (other, list) in *rules {
                let _ = writeln!(text, "    - {side}: [{}]\n      ports: [{}]", peer(other), ports(list));
            }
        }
    }
    for line in skipped {
        let _ = writeln!(text, "{line}");
    }
    text
}

fn labels(labels: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{}: {}", quoted(k), quoted(v))).collect();
    format!("{{{}}}", pairs.join(", "))
}

fn header(report: &ObservedReport, kind: &str) -> String {
    let mut text = format!(
        "# Suggested by `bulkhead policy suggest` from {} flow(s) audit mode passed: a {kind} that allows\n# exactly them. Review it before applying it.\n",
        report.flows.len()
    );
    if report.not_kept > 0 {
        let _ = writeln!(
            text,
            "# {} audit event(s) of flows beyond the {MAX_FLOWS} kept are not included.",
            report.not_kept
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(src: &str, dst: &str, protocol: &str, port: Option<u16>, verdict: &'static str) -> EventRecord {
        EventRecord {
            time: "2026-12-05T10:00:00.000Z".into(),
            interface: "eth0".into(),
            direction: "ingress",
            src: "10.0.0.1".into(),
            dst: "10.0.0.2".into(),
            protocol: protocol.into(),
            src_port: port.map(|_| 40_000),
            dst_port: port,
            icmp_type: (protocol == "icmp").then_some(8),
            icmp_code: (protocol == "icmp").then_some(0),
            src_identity: src.into(),
            dst_identity: dst.into(),
            src_pod: None,
            dst_pod: None,
            rule: None,
            reason: "default_deny",
            verdict,
        }
    }

    /// The suggestion, read back by the policy parser, allows exactly the
    /// audited flows and nothing else between the same identities.
    #[test]
    fn a_segment_policy_allows_exactly_what_audit_saw() {
        let mut observed = Observed::default();
        for record in [
            event("web", "db", "tcp", Some(5432), "audit"),
            event("web", "db", "tcp", Some(5432), "audit"),
            event("web", "db", "udp", Some(53), "audit"),
            event("world", "web", "icmp", None, "audit"),
            event("web", "db", "tcp", Some(22), "drop"),
            event("web", "db", "47", None, "audit"),
        ] {
            observed.record(&record);
        }
        let report = observed.report();
        assert_eq!(report.flows.len(), 4, "drops are not audit");
        let text = segment_policy(&report);
        assert!(text.contains("# not expressible: protocol 47 from web to db"), "{text}");
        let identities = "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: ids}\nspec:\n  identities:\n    - {name: web, addresses: [10.0.0.1/32]}\n    - {name: db, addresses: [10.0.0.2/32]}\n";
        let sources = [
            policy::Source { name: "s.yaml".into(), text: text.clone() },
            policy::Source { name: "ids.yaml".into(), text: identities.into() },
        ];
        let parsed = policy::parse_sources(&sources).unwrap_or_else(|error| panic!("{error}\n{text}"));
        let evaluator = policy::Evaluator::new(&parsed);
        let verdict = |src: &str, dst: &str, protocol: u8, port: u16| {
            let packet = policy::Packet { src: src.parse().unwrap(), dst: dst.parse().unwrap(), protocol, port };
            evaluator.evaluate(&packet).verdict == policy::Verdict::Forward
        };
        assert!(verdict("10.0.0.1", "10.0.0.2", 6, 5432));
        assert!(verdict("10.0.0.1", "10.0.0.2", 17, 53));
        assert!(verdict("192.0.2.9", "10.0.0.1", 1, 8 << 8));
        assert!(!verdict("10.0.0.1", "10.0.0.2", 6, 22), "dropped, not audited: not allowed");
        assert!(!verdict("10.0.0.2", "10.0.0.1", 6, 5432), "the other way: not allowed");
        assert!(!verdict("10.0.0.1", "10.0.0.2", 17, 5432));
    }

    #[test]
    fn the_tally_is_bounded() {
        let mut observed = Observed::default();
        for port in 0..=u16::try_from(MAX_FLOWS).unwrap() {
            observed.record(&event("a", "b", "tcp", Some(port), "audit"));
        }
        let report = observed.report();
        assert_eq!((report.flows.len(), report.not_kept), (MAX_FLOWS, 1));
        assert!(segment_policy(&report).contains("beyond the 10000 kept"));
    }

    /// Between pods: a policy per kind of pod, ingress from its sources
    /// and egress to its destinations, which the `NetworkPolicy` reader
    /// takes and whose verdicts are the flows.
    #[test]
    fn network_policies_allow_exactly_what_audit_saw_between_pods() {
        let mut report = ObservedReport::default();
        let pod =
            |ns: &str, app: &str| PodEnd { namespace: ns.into(), labels: [("app".to_owned(), app.to_owned())].into() };
        let mut flow = |src: &str, dst: &str, port: u16, ends: (Option<PodEnd>, Option<PodEnd>)| {
            let flow = Flow {
                src_identity: src.into(),
                dst_identity: dst.into(),
                protocol: "tcp".into(),
                port: Some(port),
                icmp_type: None,
            };
            let tally = Tally { events: 1, first: String::new(), last: String::new() };
            report.flows.push(ObservedFlow { flow, tally, src: ends.0, dst: ends.1 });
        };
        flow("shop/{app=web}", "shop/{app=db}", 5432, (Some(pod("shop", "web")), Some(pod("shop", "db"))));
        flow("world", "shop/{app=web}", 80, (None, Some(pod("shop", "web"))));
        let text = network_policies(&report);
        assert!(
            text.contains("not expressible as a NetworkPolicy") && text.contains("world -> shop/{app=web}"),
            "{text}"
        );
        let pods = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: shop, labels: {kubernetes.io/metadata.name: shop}}}\n- {apiVersion: v1, kind: Pod, metadata: {name: web-1, namespace: shop, labels: {app: web}}, status: {podIP: 10.0.0.1}}\n- {apiVersion: v1, kind: Pod, metadata: {name: db-1, namespace: shop, labels: {app: db}}, status: {podIP: 10.0.0.2}}\n";
        let sources = [
            policy::Source { name: "np.yaml".into(), text: text.clone() },
            policy::Source { name: "pods.yaml".into(), text: pods.into() },
        ];
        let parsed = policy::parse_sources(&sources).unwrap_or_else(|error| panic!("{error}\n{text}"));
        assert!(parsed.notes.is_empty(), "{:?}\n{text}", parsed.notes);
        let evaluator = policy::Evaluator::new(&parsed);
        let forward = |src: &str, dst: &str, port: u16| {
            let packet = policy::Packet { src: src.parse().unwrap(), dst: dst.parse().unwrap(), protocol: 6, port };
            evaluator.evaluate(&packet).verdict == policy::Verdict::Forward
        };
        assert!(forward("10.0.0.1", "10.0.0.2", 5432), "{text}");
        assert!(!forward("10.0.0.1", "10.0.0.2", 22));
        assert!(!forward("10.0.0.2", "10.0.0.1", 5432));
    }
}
