//! Turns YAML trees into a [`Policy`], collecting every problem with its
//! position instead of stopping at the first.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;

use crate::error::{Diagnostic, Location};
use crate::kubernetes::Namespace;
use crate::model::{Action, Address, Identity, Mode, Peer, Policy, PortSpec, Protocol, Rule, Selector, Side};
use crate::yaml::{Mark, Node, SpecList, Streamed, Value};

pub const API_VERSION: &str = "bulkhead/v1";
/// The same format as a Kubernetes custom resource
/// (`segmentpolicies.bulkhead.dev`): files accept it too, so an object
/// fetched from a cluster can be checked and explained as it is.
pub const CRD_API_VERSION: &str = "bulkhead.dev/v1";
pub const KIND: &str = "SegmentPolicy";

/// Where a file's documents go as they are read: the parsed model
/// ([`Policy`]), or a compact store that takes each identity and rule as
/// soon as it is read, so a large file is never held whole in the model.
pub(crate) trait Collect {
    /// What an identity becomes once read.
    type Identity;
    /// What a rule becomes once read.
    type Rule;
    fn identity(&mut self, identity: Identity) -> Self::Identity;
    fn rule(&mut self, rule: Rule) -> Self::Rule;
    fn push_document(&mut self, name: String);
    fn push_identity(&mut self, identity: Self::Identity);
    fn push_rule(&mut self, rule: Self::Rule);
    fn push_namespace(&mut self, namespace: Namespace);
    /// What was read but is skipped or not enforced (a Kubernetes object of
    /// a kind Bulkhead does not read, an SCTP port): reported, not refused.
    fn push_note(&mut self, note: Diagnostic);
}

impl Collect for Policy {
    type Identity = Identity;
    type Rule = Rule;

    fn identity(&mut self, identity: Identity) -> Identity {
        identity
    }

    fn rule(&mut self, rule: Rule) -> Rule {
        rule
    }

    fn push_document(&mut self, name: String) {
        self.documents.push(name);
    }

    fn push_identity(&mut self, identity: Identity) {
        self.identities.push(identity);
    }

    fn push_rule(&mut self, rule: Rule) {
        self.rules.push(rule);
    }

    fn push_namespace(&mut self, namespace: Namespace) {
        self.namespaces.push(namespace);
    }

    fn push_note(&mut self, note: Diagnostic) {
        self.notes.push(note);
    }
}

/// What the items of one `spec.identities` or `spec.rules` list became,
/// read while the YAML was still being parsed. Kept aside until the
/// document around them is read: a list the document's reading never
/// reaches (a repeated `identities` key, say) counts for nothing, as if
/// its items had never been read.
struct Staged<C: Collect> {
    identities: Vec<C::Identity>,
    rules: Vec<C::Rule>,
    problems: Vec<Diagnostic>,
}

impl<C: Collect> Default for Staged<C> {
    fn default() -> Self {
        Self { identities: Vec::new(), rules: Vec::new(), problems: Vec::new() }
    }
}

/// Appends the documents of one file to `policy`, recording problems in `problems`.
pub fn parse_file(file: &Arc<str>, text: &str, policy: &mut Policy, problems: &mut Vec<Diagnostic>) {
    parse_file_into(file, text, policy, problems);
}

/// Appends the documents of one file to `out`, recording problems in `problems`.
pub(crate) fn parse_file_into<C: Collect>(file: &Arc<str>, text: &str, out: &mut C, problems: &mut Vec<Diagnostic>) {
    let mut staged: HashMap<Mark, Staged<C>> = HashMap::new();
    let mut read_item = |streamed: Streamed| {
        let (list_mark, list, item) = match streamed {
            Streamed::Item(list_mark, list, item) => (list_mark, list, item),
            Streamed::Restart => {
                staged.clear();
                return;
            }
        };
        let batch = staged.entry(list_mark).or_default();
        let mut parser = Parser::<C> { file, problems: &mut batch.problems, staged: None };
        match list {
            SpecList::Identities => {
                if let Some(identity) = parser.identity(&item) {
                    batch.identities.push(out.identity(identity));
                }
            }
            SpecList::Rules => {
                if let Some(rule) = parser.rule(&item) {
                    batch.rules.push(out.rule(rule));
                }
            }
        }
    };
    let documents = match crate::yaml::parse_documents_streaming(file, text, Some(&mut read_item)) {
        Ok(documents) => documents,
        Err(problem) => {
            problems.push(problem);
            return;
        }
    };
    for document in &documents {
        Parser { file, problems: &mut *problems, staged: Some(&mut staged) }.document(document, out);
    }
}

struct Parser<'a, C: Collect> {
    file: &'a Arc<str>,
    problems: &'a mut Vec<Diagnostic>,
    /// Lists whose items were read as they were parsed, by the list's mark.
    staged: Option<&'a mut HashMap<Mark, Staged<C>>>,
}

/// The fields of one mapping, checked against the fields it may have.
struct Fields<'n> {
    entries: Vec<(&'n str, &'n Node)>,
    mark: Mark,
}

impl<'n> Fields<'n> {
    fn get(&self, name: &str) -> Option<&'n Node> {
        self.entries.iter().find(|(key, _)| *key == name).map(|(_, value)| *value)
    }
}

impl<C: Collect> Parser<'_, C> {
    /// Where `mark` lies, as diagnostics and the model name places.
    fn at(&self, mark: Mark) -> Location {
        mark.location(self.file)
    }

    fn problem(&mut self, mark: Mark, message: impl Into<String>) {
        let location = self.at(mark);
        self.problems.push(Diagnostic::new(location, message));
    }

    /// Reads a mapping, reporting unknown and repeated keys.
    fn fields<'n>(&mut self, node: &'n Node, what: &str, allowed: &[&str]) -> Option<Fields<'n>> {
        let Value::Mapping(entries) = &node.value else {
            self.problem(node.mark, format!("{what} must be a mapping, found {}", node.kind()));
            return None;
        };
        let mut fields = Fields { entries: Vec::new(), mark: node.mark };
        for (key, value) in entries {
            let Value::Scalar { text, .. } = &key.value else {
                self.problem(key.mark, format!("keys in {what} must be plain names"));
                continue;
            };
            if !allowed.contains(&text.as_str()) {
                let hint = match allowed.iter().find(|name| edit_distance(name, text) <= 2) {
                    Some(near) => format!("did you mean `{near}`?"),
                    None => format!("expected one of: {}", allowed.join(", ")),
                };
                self.problem(key.mark, format!("unknown field `{text}` in {what}; {hint}"));
                continue;
            }
            if fields.get(text).is_some() {
                self.problem(key.mark, format!("field `{text}` appears twice in {what}; keep one"));
                continue;
            }
            fields.entries.push((text.as_str(), value));
        }
        Some(fields)
    }

    fn required<'n>(&mut self, fields: &Fields<'n>, name: &str, what: &str) -> Option<&'n Node> {
        let node = fields.get(name);
        if node.is_none() {
            self.problem(fields.mark, format!("{what} is missing required field `{name}`"));
        }
        node
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.value {
            Value::Scalar { text, .. } if !node.is_null() => Some(text.clone()),
            _ => {
                self.problem(node.mark, format!("{what} must be a string, found {}", node.kind()));
                None
            }
        }
    }

    fn sequence<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n [Node]> {
        if let Value::Sequence(items) = &node.value {
            Some(items)
        } else {
            self.problem(node.mark, format!("{what} must be a list, found {}", node.kind()));
            None
        }
    }

    fn name(&mut self, node: &Node, what: &str) -> Option<String> {
        let name = self.string(node, what)?;
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.')
            && name.as_bytes()[0].is_ascii_alphanumeric();
        if valid {
            Some(name)
        } else {
            self.problem(
                node.mark,
                format!("{what} `{name}` is not a valid name; use 1-63 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit"),
            );
            None
        }
    }

    fn document(&mut self, node: &Node, out: &mut C) {
        if !is_segment_policy(node) {
            self.kubernetes_objects(node, out);
            return;
        }
        let Some(fields) = self.fields(node, "a policy document", &["apiVersion", "kind", "metadata", "spec"]) else {
            return;
        };
        if let Some(node) = self.required(&fields, "apiVersion", "the policy document")
            && let Some(text) = self.string(node, "apiVersion")
            && text != API_VERSION
            && text != CRD_API_VERSION
        {
            self.problem(
                node.mark,
                format!("unsupported apiVersion `{text}`; use `{API_VERSION}` or `{CRD_API_VERSION}`"),
            );
        }
        self.expect_value(&fields, "kind", KIND);
        if let Some(metadata) = self.required(&fields, "metadata", "the policy document")
            && let Some(meta) = self.fields(metadata, "metadata", &["name"])
            && let Some(name) = self.required(&meta, "name", "metadata")
            && let Some(name) = self.name(name, "metadata.name")
        {
            out.push_document(name);
        }
        let Some(spec) = self.required(&fields, "spec", "the policy document") else {
            return;
        };
        let Some(spec) = self.fields(spec, "spec", &["identities", "rules"]) else {
            return;
        };
        if let Some(identities) = spec.get("identities").filter(|n| !n.is_null()) {
            for item in self.sequence(identities, "spec.identities").unwrap_or_default() {
                if let Some(identity) = self.identity(item) {
                    let kept = out.identity(identity);
                    out.push_identity(kept);
                }
            }
            if let Some(batch) = self.take_staged(identities) {
                batch.identities.into_iter().for_each(|identity| out.push_identity(identity));
                self.problems.extend(batch.problems);
            }
        }
        if let Some(rules) = spec.get("rules").filter(|n| !n.is_null()) {
            for item in self.sequence(rules, "spec.rules").unwrap_or_default() {
                if let Some(rule) = self.rule(item) {
                    let kept = out.rule(rule);
                    out.push_rule(kept);
                }
            }
            if let Some(batch) = self.take_staged(rules) {
                batch.rules.into_iter().for_each(|rule| out.push_rule(rule));
                self.problems.extend(batch.problems);
            }
        }
    }

    /// A document that is no `SegmentPolicy`: Kubernetes objects, read
    /// leniently (each broken or unknown one reported and skipped alone),
    /// and translated.
    fn kubernetes_objects(&mut self, node: &Node, out: &mut C) {
        let mut objects = crate::kubernetes::Objects::default();
        let mut notes = Vec::new();
        crate::kubernetes::read_object(self.file, node, &mut objects, &mut notes);
        for pod in &objects.pods {
            let identity = out.identity(crate::kubernetes::translate::pod_identity(pod));
            out.push_identity(identity);
        }
        for policy in &objects.network_policies {
            for rule in crate::kubernetes::translate::policy_rules(policy) {
                let rule = out.rule(rule);
                out.push_rule(rule);
            }
        }
        for namespace in objects.namespaces {
            out.push_namespace(namespace);
        }
        for note in notes {
            out.push_note(note);
        }
    }

    /// The items of `list` read while parsing, if it was such a list.
    fn take_staged(&mut self, list: &Node) -> Option<Staged<C>> {
        if !matches!(list.value, Value::Sequence(_)) {
            return None;
        }
        self.staged.as_mut()?.remove(&list.mark)
    }

    /// Checks a required field that must hold exactly `expected`.
    fn expect_value(&mut self, fields: &Fields<'_>, name: &str, expected: &str) {
        if let Some(node) = self.required(fields, name, "the policy document")
            && let Some(text) = self.string(node, name)
            && text != expected
        {
            self.problem(node.mark, format!("unsupported {name} `{text}`; use `{expected}`"));
        }
    }

    fn identity(&mut self, node: &Node) -> Option<Identity> {
        let fields = self.fields(node, "an identity", &["name", "labels", "addresses", "mode"])?;
        let mode = match fields.get("mode") {
            None => Mode::Enforce,
            Some(node) => match self.string(node, "mode")?.as_str() {
                "enforce" => Mode::Enforce,
                "audit" => Mode::Audit,
                other => {
                    self.problem(node.mark, format!("unknown mode `{other}`; use `enforce` or `audit`"));
                    return None;
                }
            },
        };
        let name = self.required(&fields, "name", "the identity").and_then(|n| self.name(n, "identity name"));
        let labels = match fields.get("labels") {
            Some(labels) => self.labels(labels, "labels")?,
            None => BTreeMap::new(),
        };
        let mut addresses = Vec::new();
        if let Some(list) = self.required(&fields, "addresses", "the identity") {
            let items = self.sequence(list, "addresses")?;
            if items.is_empty() {
                self.problem(list.mark, "addresses is empty; list at least one CIDR or address");
            }
            // Sized to the list: the policy keeps it, and a vector grown
            // by pushing has room for four (a 100k policy: 17 MB unused).
            addresses.reserve_exact(items.len());
            for item in items {
                if let Some(net) = self.net(item) {
                    addresses.push(Address { net, location: self.at(item.mark) });
                }
            }
        }
        Some(Identity { name: name?, labels, addresses, mode, pod: None, location: self.at(fields.mark) })
    }

    fn labels(&mut self, node: &Node, what: &str) -> Option<BTreeMap<String, String>> {
        let Value::Mapping(entries) = &node.value else {
            self.problem(
                node.mark,
                format!("{what} must be a mapping of label names to values, found {}", node.kind()),
            );
            return None;
        };
        let mut labels = BTreeMap::new();
        for (key, value) in entries {
            let key_text = self.string(key, "a label name")?;
            let value_text = self.string(value, &format!("label `{key_text}`"))?;
            if labels.insert(key_text.clone(), value_text).is_some() {
                self.problem(key.mark, format!("label `{key_text}` appears twice; keep one"));
            }
        }
        Some(labels)
    }

    /// A CIDR or single address; host bits must be clear.
    fn net(&mut self, node: &Node) -> Option<IpNet> {
        let text = self.string(node, "an address")?;
        let parsed =
            if text.contains('/') { text.parse::<IpNet>().ok() } else { text.parse::<IpAddr>().ok().map(IpNet::from) };
        let Some(net) = parsed else {
            self.problem(
                node.mark,
                format!(
                    "`{text}` is not a valid IPv4/IPv6 address or CIDR; write e.g. 10.0.1.0/24, 10.0.3.10 or fd00::/64"
                ),
            );
            return None;
        };
        if net.trunc() != net {
            self.problem(
                node.mark,
                format!("`{text}` has host bits set beyond its prefix; did you mean {}?", net.trunc()),
            );
            return None;
        }
        Some(net)
    }

    fn rule(&mut self, node: &Node) -> Option<Rule> {
        let fields = self.fields(node, "a rule", &["name", "action", "from", "to", "ports", "expires"])?;
        let expires = match fields.get("expires") {
            None => None,
            Some(node) => {
                let text = self.string(node, "expires")?;
                let Some(time) = rfc3339(&text) else {
                    self.problem(
                        node.mark,
                        format!("`{text}` is not an RFC 3339 time; write e.g. 2026-12-01T18:00:00Z or 2026-12-01T19:00:00+01:00"),
                    );
                    return None;
                };
                Some(time)
            }
        };
        let name = self.required(&fields, "name", "the rule").and_then(|n| self.name(n, "rule name"));
        let action = match fields.get("action") {
            None => Some(Action::Allow),
            Some(node) => match self.string(node, "action")?.as_str() {
                "allow" => Some(Action::Allow),
                "deny" => Some(Action::Deny),
                other => {
                    self.problem(node.mark, format!("unknown action `{other}`; use `allow` or `deny`"));
                    None
                }
            },
        };
        let from = self.required(&fields, "from", "the rule").and_then(|n| self.peers(n, "from"));
        let to = self.required(&fields, "to", "the rule").and_then(|n| self.peers(n, "to"));
        // Bad ports or a bad action are already recorded as problems, so the
        // policy can never be applied; keeping the rule lets validation still
        // report problems in its peers in the same run.
        let ports = fields.get("ports").and_then(|node| {
            let items = self.sequence(node, "ports")?;
            if items.is_empty() {
                self.problem(node.mark, "ports is empty; omit `ports` to cover every protocol, or list at least one");
            }
            Some(items.iter().filter_map(|item| self.port(item)).collect())
        });
        Some(Rule {
            name: name?,
            action: action.unwrap_or(Action::Allow),
            from: from?,
            to: to?,
            ports,
            named_ports: Vec::new(),
            expires,
            side: Side::Both,
            location: self.at(fields.mark),
        })
    }

    fn peers(&mut self, node: &Node, what: &str) -> Option<Vec<Peer>> {
        let items = self.sequence(node, what)?;
        if items.is_empty() {
            self.problem(
                node.mark,
                format!("`{what}` is empty, so the rule could never match; list at least one peer"),
            );
            return None;
        }
        let peers: Vec<_> = items.iter().map(|item| self.peer(item)).collect();
        peers.into_iter().collect()
    }

    fn peer(&mut self, node: &Node) -> Option<Peer> {
        let fields = self.fields(node, "a peer", &["identity", "labels", "cidr", "except"])?;
        let chosen: Vec<&str> =
            ["identity", "labels", "cidr"].into_iter().filter(|key| fields.get(key).is_some()).collect();
        if chosen.len() != 1 {
            self.problem(
                node.mark,
                "a peer needs exactly one of `identity`, `labels` or `cidr`; write one peer per list item",
            );
            return None;
        }
        if fields.get("except").is_some() && chosen[0] != "cidr" {
            self.problem(node.mark, "`except` only goes with `cidr`");
            return None;
        }
        let selector = match chosen[0] {
            "identity" => Selector::Identity(self.string(fields.get("identity")?, "identity")?),
            "labels" => {
                let labels_node = fields.get("labels")?;
                let labels = self.labels(labels_node, "labels")?;
                if labels.is_empty() {
                    self.problem(labels_node.mark, "an empty label selector is ambiguous; name at least one label");
                    return None;
                }
                Selector::Labels(labels)
            }
            _ => {
                let cidr = self.net(fields.get("cidr")?)?;
                let mut except = Vec::new();
                if let Some(list) = fields.get("except") {
                    for item in self.sequence(list, "except")? {
                        let net = self.net(item)?;
                        if !cidr.contains(&net) || net == cidr {
                            self.problem(
                                item.mark,
                                format!(
                                    "except entry {net} is not strictly inside cidr {cidr}; remove it or fix the cidr"
                                ),
                            );
                            return None;
                        }
                        except.push(net);
                    }
                }
                except.sort();
                except.dedup();
                Selector::Cidr { cidr, except }
            }
        };
        Some(Peer { selector, location: self.at(node.mark) })
    }

    fn port(&mut self, node: &Node) -> Option<PortSpec> {
        let text = self.string(node, "a port")?;
        if let Some((head, tail)) = text.split_once('/')
            && let Some(protocol @ (Protocol::Icmp | Protocol::Icmpv6)) = Protocol::from_name(head)
        {
            let known = protocol.icmp_types();
            let icmp_type =
                known.iter().find(|(name, _)| *name == tail).map(|(_, t)| *t).or_else(|| tail.parse::<u8>().ok());
            let Some(icmp_type) = icmp_type else {
                let names: Vec<&str> = known.iter().map(|(name, _)| *name).collect();
                self.problem(
                    node.mark,
                    format!(
                        "unknown {protocol} type `{tail}` in `{text}`; use a number 0-255 or one of: {}",
                        names.join(", ")
                    ),
                );
                return None;
            };
            let first = u16::from(icmp_type) << 8;
            return Some(PortSpec { protocol, first, last: first | 0xff });
        }
        let (range, protocol_name) = match text.split_once('/') {
            Some((range, protocol)) => (Some(range), protocol),
            None => (None, text.as_str()),
        };
        let Some(protocol) = Protocol::from_name(protocol_name) else {
            self.problem(
                node.mark,
                format!("unknown protocol `{protocol_name}` in `{text}`; use tcp, udp, icmp or icmpv6"),
            );
            return None;
        };
        let Some(range) = range else {
            return Some(PortSpec { protocol, first: 0, last: u16::MAX });
        };
        if !protocol.has_ports() {
            self.problem(node.mark, format!("{protocol} has no ports; write just `{protocol}`"));
            return None;
        }
        let parse = |s: &str| s.trim().parse::<u32>().ok();
        let (first, last) = match range.split_once('-') {
            Some((a, b)) => (parse(a), parse(b)),
            None => (parse(range), parse(range)),
        };
        let (Some(first), Some(last)) = (first, last) else {
            self.problem(node.mark, format!("`{text}` is not a port; write N/{protocol} or N-M/{protocol}"));
            return None;
        };
        if first == 0 || first > 65535 || last == 0 || last > 65535 {
            self.problem(node.mark, format!("port in `{text}` is out of range; ports go from 1 to 65535"));
            return None;
        }
        if first > last {
            self.problem(node.mark, format!("port range `{text}` is reversed; write {last}-{first}/{protocol}"));
            return None;
        }
        Some(PortSpec { protocol, first: first as u16, last: last as u16 })
    }
}

/// Levenshtein distance, for "did you mean" hints on short field names.
/// Whether a document is meant as a `SegmentPolicy`: its `apiVersion` is
/// one of Bulkhead's groups (known version or not), or its `kind` is
/// `SegmentPolicy`, or it has neither (a document that says nothing is
/// read, and refused, as a policy). Anything else is read as Kubernetes
/// objects, where a kind Bulkhead does not read is reported and skipped.
fn is_segment_policy(node: &Node) -> bool {
    let Value::Mapping(entries) = &node.value else { return true };
    let field = |name: &str| {
        entries.iter().find_map(|(key, value)| match (&key.value, &value.value) {
            (Value::Scalar { text: key, .. }, Value::Scalar { text, .. }) if key == name => Some(text.as_str()),
            _ => None,
        })
    };
    let ours = |version: &str| version.starts_with("bulkhead/") || version.starts_with("bulkhead.dev/");
    match (field("apiVersion"), field("kind")) {
        (Some(version), _) if ours(version) => true,
        (_, Some(KIND)) | (None, None) => true,
        (_, _) => false,
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

/// Parses an RFC 3339 timestamp (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`).
pub fn rfc3339(text: &str) -> Option<SystemTime> {
    let bytes = text.as_bytes();
    if bytes.len() < 20 || !matches!(bytes[10], b'T' | b't' | b' ') || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if part.bytes().all(|b| b.is_ascii_digit()) { part.parse().ok() } else { None }
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if bytes[13] != b':' || bytes[16] != b':' {
        return None;
    }
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => return None,
    };
    if !(1..=days_in_month).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let kept = &fraction[..digits.min(9)];
        nanos = kept.parse::<u32>().ok()? * 10u32.pow(9 - kept.len() as u32);
        rest = &fraction[digits..];
    }
    let offset_seconds = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) && &rest[3..4] == ":" => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let hours: i64 = rest[1..3].parse().ok()?;
            let minutes: i64 = rest[4..6].parse().ok()?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            sign * (hours * 3600 + minutes * 60)
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * m + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset_seconds;
    let seconds = u64::try_from(seconds).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::new(seconds, nanos))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use super::{Parser, Policy, parse_file, rfc3339};
    use crate::engine::stored::{Fragment, Interner, Names};
    use crate::error::Diagnostic;

    /// The policy and problems as reading the whole tree at once gives them.
    fn read_whole(file: &Arc<str>, text: &str) -> (Policy, Vec<Diagnostic>) {
        let (mut policy, mut problems) = (Policy::default(), Vec::new());
        match crate::yaml::parse_documents(file, text) {
            Ok(documents) => {
                for document in &documents {
                    Parser { file, problems: &mut problems, staged: None }.document(document, &mut policy);
                }
            }
            Err(problem) => problems.push(problem),
        }
        problems.sort_by(|a, b| a.location.cmp(&b.location));
        (policy, problems)
    }

    fn read_streaming(file: &Arc<str>, text: &str) -> (Policy, Vec<Diagnostic>) {
        let (mut policy, mut problems) = (Policy::default(), Vec::new());
        parse_file(file, text, &mut policy, &mut problems);
        problems.sort_by(|a, b| a.location.cmp(&b.location));
        (policy, problems)
    }

    const DOCUMENT: &str = "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: NAME}\nspec:\n";

    #[test]
    fn items_read_while_parsing_give_what_the_whole_tree_gives() {
        let file: Arc<str> = Arc::from("p.yaml");
        let good = "  identities:\n    - {name: a, addresses: [\"10.0.1.0/24\"]}\n    - {name: b, labels: {tier: b}, addresses: [\"10.0.2.1\"]}\n  rules:\n    - {name: r, from: [{identity: a}], to: [{labels: {tier: b}}], ports: [\"80/tcp\"]}\n";
        let bad = "  identities:\n    - {name: Bad!, addresses: []}\n    - nonsense\n    - {name: c, addresses: [\"300.0.0.1\"], extra: 1}\n  rules:\n    - {name: r2, from: [], to: [{identity: c}], ports: [\"99999/tcp\"]}\n    - [1, 2]\n";
        let texts = [
            format!("{}{good}", DOCUMENT.replace("NAME", "one")),
            format!("{}{bad}", DOCUMENT.replace("NAME", "two")),
            format!("{}{good}---\n{}{bad}", DOCUMENT.replace("NAME", "one"), DOCUMENT.replace("NAME", "two")),
            // Lists in flow style, a spec that is not a mapping, lists that are not lists.
            format!(
                "{}  identities: [{{name: a, addresses: [\"10.0.0.1\"]}}]\n  rules: []\n",
                DOCUMENT.replace("NAME", "f")
            ),
            format!("{}  - not a mapping\n", DOCUMENT.replace("NAME", "g")),
            format!("{}  identities: {{name: a}}\n  rules: 7\n", DOCUMENT.replace("NAME", "h")),
            "kind: Other\nspec:\n  identities:\n    - {name: a, addresses: [\"10.0.0.1\"]}\n".to_owned(),
            // The fast reader hands on the items, then gives up at the
            // anchor: the general parser reads it all again, once.
            format!(
                "{}{good}    - {{name: r9, from: [{{identity: &x a}}], to: [{{identity: a}}]}}\n",
                DOCUMENT.replace("NAME", "late")
            ),
        ];
        for text in &texts {
            let (whole, whole_problems) = read_whole(&file, text);
            let (streamed, streamed_problems) = read_streaming(&file, text);
            assert_eq!(format!("{whole:?}"), format!("{streamed:?}"), "{text}");
            assert_eq!(whole_problems, streamed_problems, "{text}");
            // The engine's path: each item stored as soon as it is read.
            let mut problems = Vec::new();
            let (mut labels, mut fresh) = (Interner::default(), std::collections::HashSet::new());
            let mut names = Names { labels: &mut labels, known: &|_| None, known_rule: &|_| None, fresh: &mut fresh };
            let fragment = Fragment::parse(&file, text, &mut names, &mut problems);
            let mut stored = Policy::default();
            fragment.extend_policy(&mut stored);
            problems.sort_by(|a, b| a.location.cmp(&b.location));
            assert_eq!(format!("{whole:?}"), format!("{stored:?}"), "{text}");
            assert_eq!(whole_problems, problems, "{text}");
        }
    }

    #[test]
    fn a_repeated_list_key_counts_once_like_the_whole_tree() {
        let file: Arc<str> = Arc::from("p.yaml");
        let text = format!(
            "{}  identities:\n    - {{name: a, addresses: [\"10.0.0.1\"]}}\n  identities:\n    - {{name: Bad!, addresses: [\"10.0.0.2\"]}}\n",
            DOCUMENT.replace("NAME", "r")
        );
        let (policy, problems) = read_streaming(&file, &text);
        assert_eq!(policy.identities.len(), 1, "only the first list counts");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("appears twice"), "{problems:?}");
        assert_eq!(read_whole(&file, &text).1, problems);
    }

    #[test]
    fn rfc3339_times() {
        let at = |s: u64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(rfc3339("1970-01-01T00:00:00Z"), at(0));
        assert_eq!(rfc3339("2026-11-25T12:30:00Z"), at(1_795_609_800));
        assert_eq!(rfc3339("2026-11-25T13:30:00+01:00"), at(1_795_609_800));
        assert_eq!(
            rfc3339("2026-11-25T12:30:00.5Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_795_609_800, 500_000_000))
        );
        assert_eq!(rfc3339("2024-02-29T00:00:00Z"), at(1_709_164_800));
        for bad in [
            "2026-11-25",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-25T12:30:00",
            "2026-11-25T25:00:00Z",
            "tomorrow",
        ] {
            assert_eq!(rfc3339(bad), None, "{bad}");
        }
    }
}
