//! Reads Kubernetes objects from YAML as `kubectl get -o yaml` prints them.
//!
//! Lenient where the API is verbose (unknown fields are ignored: a snapshot
//! carries `managedFields`, `status.conditions` and the like), strict where
//! connectivity is decided (a selector, a port or a CIDR that does not mean
//! exactly one thing skips its object, reported with its position).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::{
    ContainerPort, LabelSelector, Namespace, NetworkPolicy, Objects, Operator, Pod, PolicyPeer, PolicyPort, PolicyRule,
    PortProtocol, PortRef, Requirement,
};
use crate::error::Diagnostic;
use crate::yaml::{Node, Value};

/// Reads the Kubernetes objects of `text` into `objects`. Each object that
/// cannot be read, and each document of a kind this version does not know,
/// is skipped and reported in `reports`, as is what is read but not
/// enforced (SCTP ports); `SegmentPolicy` documents are left to the policy
/// parser. Only a file that is not YAML at all is an error.
pub fn read_objects(
    file: &Arc<str>,
    text: &str,
    objects: &mut Objects,
    reports: &mut Vec<Diagnostic>,
) -> Result<(), Diagnostic> {
    let documents = crate::yaml::parse_documents(file, text)?;
    for document in &documents {
        Reader::new(file).object(document, objects, reports, 0);
    }
    Ok(())
}

/// Reads one YAML document's object (or `List` of them) into `objects`,
/// as [`read_objects`] does for each document of a file.
pub(crate) fn read_object(file: &Arc<str>, document: &Node, objects: &mut Objects, reports: &mut Vec<Diagnostic>) {
    Reader::new(file).object(document, objects, reports, 0);
}

/// How deep `List`s may nest (kubectl prints one level).
const MAX_LIST_DEPTH: usize = 4;

struct Reader<'a> {
    file: &'a Arc<str>,
    /// What makes the object unusable: it is skipped.
    problems: Vec<Diagnostic>,
    /// What is reported while the object is kept.
    notes: Vec<Diagnostic>,
}

impl<'a> Reader<'a> {
    fn new(file: &'a Arc<str>) -> Self {
        Self { file, problems: Vec::new(), notes: Vec::new() }
    }
}

/// A mapping's value under `key`, if the node is a mapping that has it.
fn get<'n>(node: &'n Node, key: &str) -> Option<&'n Node> {
    let Value::Mapping(entries) = &node.value else { return None };
    entries
        .iter()
        .find(|(k, _)| matches!(&k.value, Value::Scalar { text, .. } if text == key))
        .map(|(_, value)| value)
        .filter(|value| !value.is_null())
}

/// The first key, anywhere in `node`, that its mapping repeats.
fn repeated_key(node: &Node) -> Option<&Node> {
    match &node.value {
        Value::Mapping(entries) => {
            for (at, (key, value)) in entries.iter().enumerate() {
                let same = |earlier: &Node| matches!((&earlier.value, &key.value), (Value::Scalar { text: a, .. }, Value::Scalar { text: b, .. }) if a == b);
                if entries[..at].iter().any(|(earlier, _)| same(earlier)) {
                    return Some(key);
                }
                if let Some(repeated) = repeated_key(value) {
                    return Some(repeated);
                }
            }
            None
        }
        Value::Sequence(items) => items.iter().find_map(repeated_key),
        Value::Scalar { .. } => None,
    }
}

fn text(node: &Node) -> Option<&str> {
    match &node.value {
        Value::Scalar { text, .. } if !node.is_null() => Some(text),
        _ => None,
    }
}

impl Reader<'_> {
    fn problem(&mut self, node: &Node, message: impl Into<String>) {
        self.problems.push(Diagnostic::new(node.location(self.file), message));
    }

    /// Reads one object (or a `List` of them), skipping it when it has
    /// problems: they go to `skipped`, worded with what was skipped.
    fn object(&mut self, node: &Node, objects: &mut Objects, reports: &mut Vec<Diagnostic>, depth: usize) {
        let api_version = get(node, "apiVersion").and_then(text).unwrap_or_default();
        let kind = get(node, "kind").and_then(text).unwrap_or_default();
        let what = describe(node, kind);
        // Which of a repeated key's values counts is anyone's guess (a
        // missing `---` between two objects, typically): neither does.
        if let Some(key) = repeated_key(node) {
            let shown = text(key).unwrap_or_default();
            self.problem(
                key,
                format!("`{shown}` is given twice in one mapping; is a `---` between two objects missing?"),
            );
            for problem in self.problems.drain(..) {
                reports.push(Diagnostic::new(problem.location, format!("{what} skipped: {}", problem.message)));
            }
            return;
        }
        match (api_version, kind) {
            (crate::API_VERSION | crate::CRD_API_VERSION, crate::KIND) => return,
            ("v1", "List") if depth < MAX_LIST_DEPTH => {
                match get(node, "items").map(|items| &items.value) {
                    Some(Value::Sequence(items)) => {
                        for item in items {
                            Reader::new(self.file).object(item, objects, reports, depth + 1);
                        }
                    }
                    None => {}
                    Some(_) => self.problem(node, "`items` of a List must be a list"),
                }
            }
            ("v1", "Namespace") => {
                if let Some(namespace) = self.namespace(node) {
                    objects.namespaces.push(namespace);
                }
            }
            ("v1", "Pod") => {
                if let Some(pod) = self.pod(node) {
                    objects.pods.push(pod);
                }
            }
            ("networking.k8s.io/v1", "NetworkPolicy") => {
                if let Some(policy) = self.network_policy(node) {
                    objects.network_policies.push(policy);
                }
            }
            (_, "Namespace" | "Pod" | "NetworkPolicy" | "List") => self.problem(
                node,
                format!("apiVersion `{api_version}` of {kind} is not supported; use v1 (networking.k8s.io/v1 for NetworkPolicy)"),
            ),
            _ => self.problem(
                node,
                format!(
                    "kind `{kind}` (apiVersion `{api_version}`) is not one Bulkhead reads; it reads Namespace, Pod, NetworkPolicy, List and SegmentPolicy"
                ),
            ),
        }
        for problem in self.problems.drain(..) {
            reports.push(Diagnostic::new(problem.location, format!("{what} skipped: {}", problem.message)));
        }
        for note in self.notes.drain(..) {
            reports.push(Diagnostic::new(note.location, format!("{what}: {}", note.message)));
        }
    }

    /// `metadata.name` and `metadata.namespace` (`default` when absent, as
    /// the API server fills it in).
    fn metadata(&mut self, node: &Node, namespaced: bool) -> Option<(String, String, BTreeMap<String, String>)> {
        let Some(metadata) = get(node, "metadata") else {
            self.problem(node, "it has no `metadata`");
            return None;
        };
        let Some(name) = get(metadata, "name").and_then(text).map(str::to_owned) else {
            self.problem(metadata, "it has no `metadata.name`");
            return None;
        };
        let namespace = if namespaced {
            get(metadata, "namespace").and_then(text).unwrap_or("default").to_owned()
        } else {
            String::new()
        };
        let labels = match get(metadata, "labels") {
            Some(labels) => self.string_map(labels, "metadata.labels")?,
            None => BTreeMap::new(),
        };
        Some((name, namespace, labels))
    }

    fn string_map(&mut self, node: &Node, what: &str) -> Option<BTreeMap<String, String>> {
        let Value::Mapping(entries) = &node.value else {
            self.problem(node, format!("`{what}` must be a mapping of strings"));
            return None;
        };
        let mut map = BTreeMap::new();
        for (key, value) in entries {
            // A label's value may be empty; YAML prints that as `''` or as nothing.
            let (Some(key_text), Some(value_text)) = (text(key), text(value).or(value.is_null().then_some(""))) else {
                self.problem(key, format!("`{what}` must map strings to strings"));
                return None;
            };
            if map.insert(key_text.to_owned(), value_text.to_owned()).is_some() {
                self.problem(key, format!("`{what}` has `{key_text}` twice"));
                return None;
            }
        }
        Some(map)
    }

    fn namespace(&mut self, node: &Node) -> Option<Namespace> {
        let (name, _, labels) = self.metadata(node, false)?;
        Some(Namespace { name, labels, location: node.location(self.file) })
    }

    fn pod(&mut self, node: &Node) -> Option<Pod> {
        let (name, namespace, labels) = self.metadata(node, true)?;
        let spec = get(node, "spec");
        let mut ports = Vec::new();
        if let Some(containers) = spec.and_then(|spec| get(spec, "containers")) {
            for container in self.list(containers, "spec.containers")? {
                let Some(list) = get(container, "ports") else { continue };
                for port in self.list(list, "ports")? {
                    ports.push(self.container_port(port)?);
                }
            }
        }
        let host_network = spec.and_then(|spec| get(spec, "hostNetwork")).and_then(text) == Some("true");
        let status = get(node, "status");
        let finished = matches!(status.and_then(|s| get(s, "phase")).and_then(text), Some("Succeeded" | "Failed"));
        let mut addresses = Vec::new();
        // A pod on the host's network has the node's addresses, and one
        // that has finished may have given its address to another pod:
        // neither is told apart by address, as NetworkPolicy does not
        // apply to them.
        if !host_network
            && !finished
            && let Some(status) = status
        {
            if let Some(list) = get(status, "podIPs") {
                for entry in self.list(list, "status.podIPs")? {
                    let Some(ip) = get(entry, "ip") else {
                        self.problem(entry, "an entry of `status.podIPs` has no `ip`");
                        return None;
                    };
                    addresses.push(self.address(ip)?);
                }
            } else if let Some(ip) = get(status, "podIP") {
                addresses.push(self.address(ip)?);
            }
        }
        Some(Pod { namespace, name, labels, addresses, ports, location: node.location(self.file) })
    }

    fn list<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n [Node]> {
        if let Value::Sequence(items) = &node.value {
            Some(items)
        } else {
            self.problem(node, format!("`{what}` must be a list"));
            None
        }
    }

    fn address(&mut self, node: &Node) -> Option<IpAddr> {
        let parsed = text(node).and_then(|text| text.parse().ok());
        if parsed.is_none() {
            self.problem(node, "a pod address must be an IPv4 or IPv6 address");
        }
        parsed
    }

    fn container_port(&mut self, node: &Node) -> Option<ContainerPort> {
        let Some(number) = get(node, "containerPort") else {
            self.problem(node, "a container port has no `containerPort`");
            return None;
        };
        let port = self.port_number(number, "containerPort")?;
        let protocol = self.protocol(node)?;
        let name = get(node, "name").and_then(text).map(str::to_owned);
        Some(ContainerPort { name, protocol, port })
    }

    /// `protocol` (TCP when absent).
    fn protocol(&mut self, node: &Node) -> Option<PortProtocol> {
        match get(node, "protocol").and_then(text) {
            None | Some("TCP") => Some(PortProtocol::Tcp),
            Some("UDP") => Some(PortProtocol::Udp),
            Some("SCTP") => Some(PortProtocol::Sctp),
            Some(other) => {
                self.problem(node, format!("protocol `{other}` is not TCP, UDP or SCTP"));
                None
            }
        }
    }

    fn port_number(&mut self, node: &Node, what: &str) -> Option<u16> {
        let number = match &node.value {
            Value::Scalar { text, quoted: false } => text.parse::<u16>().ok().filter(|n| *n > 0),
            _ => None,
        };
        if number.is_none() {
            self.problem(node, format!("`{what}` must be a port number (1-65535)"));
        }
        number
    }

    fn network_policy(&mut self, node: &Node) -> Option<NetworkPolicy> {
        let (name, namespace, _) = self.metadata(node, true)?;
        let Some(spec) = get(node, "spec") else {
            self.problem(node, "it has no `spec`");
            return None;
        };
        // Required by the API; `{}` (every pod of the namespace) is how
        // kubectl prints the empty selector, and `null` reads as absent.
        let pod_selector = match get(spec, "podSelector") {
            Some(selector) => self.selector(selector, "spec.podSelector")?,
            None => LabelSelector::default(),
        };
        let mut rules = |key: &str, peers_key: &str| -> Option<Vec<PolicyRule>> {
            let Some(list) = get(spec, key) else { return Some(Vec::new()) };
            let mut rules = Vec::new();
            for rule in self.list(list, &format!("spec.{key}"))? {
                let mut peers = Vec::new();
                if let Some(list) = get(rule, peers_key) {
                    for peer in self.list(list, peers_key)? {
                        peers.push(self.peer(peer)?);
                    }
                }
                let mut ports = Vec::new();
                if let Some(list) = get(rule, "ports") {
                    for port in self.list(list, "ports")? {
                        ports.push(self.policy_port(port)?);
                    }
                }
                rules.push(PolicyRule { peers, ports });
            }
            Some(rules)
        };
        let ingress = rules("ingress", "from")?;
        let egress = rules("egress", "to")?;
        let (ingress_isolating, egress_isolating) = match get(spec, "policyTypes") {
            None => (true, !egress.is_empty()),
            Some(list) => {
                let (mut ingress_type, mut egress_type) = (false, false);
                for entry in self.list(list, "spec.policyTypes")? {
                    match text(entry) {
                        Some("Ingress") => ingress_type = true,
                        Some("Egress") => egress_type = true,
                        _ => {
                            self.problem(entry, "an entry of `spec.policyTypes` must be Ingress or Egress");
                            return None;
                        }
                    }
                }
                (ingress_type, egress_type)
            }
        };
        Some(NetworkPolicy {
            namespace,
            name,
            pod_selector,
            ingress_isolating,
            egress_isolating,
            ingress,
            egress,
            location: node.location(self.file),
        })
    }

    fn selector(&mut self, node: &Node, what: &str) -> Option<LabelSelector> {
        if !matches!(node.value, Value::Mapping(_)) {
            self.problem(node, format!("`{what}` must be a label selector (a mapping)"));
            return None;
        }
        let match_labels = match get(node, "matchLabels") {
            Some(labels) => self.string_map(labels, &format!("{what}.matchLabels"))?,
            None => BTreeMap::new(),
        };
        let mut match_expressions = Vec::new();
        if let Some(list) = get(node, "matchExpressions") {
            for expression in self.list(list, &format!("{what}.matchExpressions"))? {
                match_expressions.push(self.requirement(expression)?);
            }
        }
        Some(LabelSelector { match_labels, match_expressions })
    }

    fn requirement(&mut self, node: &Node) -> Option<Requirement> {
        let Some(key) = get(node, "key").and_then(text) else {
            self.problem(node, "a `matchExpressions` entry has no `key`");
            return None;
        };
        let operator = match get(node, "operator").and_then(text) {
            Some("In") => Operator::In,
            Some("NotIn") => Operator::NotIn,
            Some("Exists") => Operator::Exists,
            Some("DoesNotExist") => Operator::DoesNotExist,
            other => {
                self.problem(
                    node,
                    format!("operator `{}` is not In, NotIn, Exists or DoesNotExist", other.unwrap_or("(none)")),
                );
                return None;
            }
        };
        let mut values = Vec::new();
        if let Some(list) = get(node, "values") {
            for value in self.list(list, "values")? {
                let Some(value) = text(value) else {
                    self.problem(value, "`values` must be strings");
                    return None;
                };
                values.push(value.to_owned());
            }
        }
        // As the API server validates it: a set needs values, an
        // existence test must have none.
        let needs_values = matches!(operator, Operator::In | Operator::NotIn);
        if needs_values == values.is_empty() {
            self.problem(
                node,
                if needs_values {
                    format!("`{key}` {operator:?} needs at least one value")
                } else {
                    format!("`{key}` {operator:?} takes no values")
                },
            );
            return None;
        }
        Some(Requirement { key: key.to_owned(), operator, values })
    }

    fn peer(&mut self, node: &Node) -> Option<PolicyPeer> {
        let pods = get(node, "podSelector");
        let namespaces = get(node, "namespaceSelector");
        match (get(node, "ipBlock"), pods.is_some() || namespaces.is_some()) {
            (Some(block), false) => {
                let Some(cidr) = get(block, "cidr") else {
                    self.problem(block, "`ipBlock` has no `cidr`");
                    return None;
                };
                let cidr = self.cidr(cidr)?;
                let mut except = Vec::new();
                if let Some(list) = get(block, "except") {
                    for entry in self.list(list, "ipBlock.except")? {
                        let net = self.cidr(entry)?;
                        if !cidr.contains(&net) || net == cidr {
                            self.problem(entry, format!("except {net} is not strictly inside {cidr}"));
                            return None;
                        }
                        except.push(net);
                    }
                }
                Some(PolicyPeer::IpBlock { cidr, except })
            }
            (None, true) => {
                let pods = match pods {
                    Some(selector) => Some(self.selector(selector, "podSelector")?),
                    None => None,
                };
                let namespaces = match namespaces {
                    Some(selector) => Some(self.selector(selector, "namespaceSelector")?),
                    None => None,
                };
                Some(PolicyPeer::Pods { pods, namespaces })
            }
            (Some(_), true) => {
                self.problem(node, "a peer has `ipBlock` and a selector; give one or the other");
                None
            }
            (None, false) => {
                self.problem(node, "a peer needs `podSelector`, `namespaceSelector` or `ipBlock`");
                None
            }
        }
    }

    /// A CIDR as the API takes it: host bits must be clear.
    fn cidr(&mut self, node: &Node) -> Option<IpNet> {
        let parsed = text(node).and_then(|text| text.parse::<IpNet>().ok());
        match parsed {
            Some(net) if net.trunc() == net => Some(net),
            Some(net) => {
                self.problem(node, format!("{net} has host bits set; did you mean {}?", net.trunc()));
                None
            }
            None => {
                self.problem(node, "not a CIDR such as 10.0.0.0/16 or fd00::/64");
                None
            }
        }
    }

    fn policy_port(&mut self, node: &Node) -> Option<PolicyPort> {
        let protocol = self.protocol(node)?;
        let port = match get(node, "port") {
            None => None,
            Some(port @ Node { value: Value::Scalar { quoted: false, text }, .. })
                if text.bytes().all(|b| b.is_ascii_digit()) =>
            {
                Some(PortRef::Number(self.port_number(port, "port")?))
            }
            Some(port) => {
                let name = text(port).unwrap_or_default();
                // IANA service names, as the API validates named ports.
                let valid = (1..=15).contains(&name.len())
                    && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && name.bytes().any(|b| b.is_ascii_lowercase())
                    && !name.starts_with('-')
                    && !name.ends_with('-')
                    && !name.contains("--");
                if !valid {
                    self.problem(port, format!("`{name}` is neither a port number nor a valid port name"));
                    return None;
                }
                Some(PortRef::Name(name.to_owned()))
            }
        };
        let end_port = match get(node, "endPort") {
            None => None,
            Some(end) => {
                let end_port = self.port_number(end, "endPort")?;
                match port {
                    Some(PortRef::Number(first)) if first <= end_port => Some(end_port),
                    Some(PortRef::Number(first)) => {
                        self.problem(end, format!("endPort {end_port} is below port {first}"));
                        return None;
                    }
                    _ => {
                        self.problem(end, "endPort needs a numeric `port` to start the range");
                        return None;
                    }
                }
            }
        };
        if protocol == PortProtocol::Sctp {
            // Reported, and kept as an entry that matches nothing: dropping
            // it could leave the rule with no ports, which means all ports.
            self.notes.push(Diagnostic::new(
                node.location(self.file),
                "SCTP is not supported; this port entry matches nothing".to_owned(),
            ));
        }
        Some(PolicyPort { protocol, port, end_port })
    }
}

/// `Kind namespace/name` (or `Kind name`) for reports.
fn describe(node: &Node, kind: &str) -> String {
    let metadata = get(node, "metadata");
    let name = metadata.and_then(|m| get(m, "name")).and_then(text).unwrap_or("(unnamed)");
    let kind = if kind.is_empty() { "a document without `kind`" } else { kind };
    match metadata.and_then(|m| get(m, "namespace")).and_then(text) {
        Some(namespace) => format!("{kind} {namespace}/{name}"),
        None => format!("{kind} {name}"),
    }
}
