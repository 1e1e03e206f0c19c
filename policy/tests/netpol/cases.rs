//! The upstream `NetworkPolicy` truth-table cases of `cases/` (format and
//! sources: `README.md`), read for the tests that run them: the reference
//! evaluators and the engine (`policy/tests/netpol_cases.rs`), and real
//! packets through the kernel programs (`tests/tests/netpol.rs`). Both take
//! the cluster as the YAML objects written here, so they judge one cluster.

#![allow(dead_code, reason = "each including test uses its part")]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use policy::model::Protocol;
use policy::yaml::{Node, Value};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];

/// Every pod in a /24 of its own: 10.<namespace>.<pod>.10 (x=1, a=1).
#[must_use]
pub fn address(namespace: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, u8::try_from(namespace + 1).unwrap(), u8::try_from(pod + 1).unwrap(), 10)
}

/// The 9 pods as (namespace, pod) indexes, in matrix order.
#[must_use]
pub fn all_pods() -> Vec<(usize, usize)> {
    (0..3).flat_map(|n| (0..3).map(move |p| (n, p))).collect()
}

/// One probed (protocol, port) and its expected 9×9 matrix: row = from,
/// column = to, `.` connects, `X` does not.
pub struct Probe {
    pub protocol: Protocol,
    /// A number, or a container port name.
    pub port: String,
    pub rows: Vec<String>,
}

impl Probe {
    /// The port number probed: a name is the one every pod gives that
    /// number (`serve-<port>-<protocol>`).
    #[must_use]
    pub fn number(&self) -> u16 {
        self.port.parse().unwrap_or_else(|_| {
            let number = self.port.strip_prefix("serve-").and_then(|rest| rest.split('-').next());
            number.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("port name {}", self.port))
        })
    }

    /// Whether `from` may reach `to`, as expected.
    #[must_use]
    pub fn expects(&self, from: (usize, usize), to: (usize, usize)) -> bool {
        let row = &self.rows[from.0 * 3 + from.1];
        row.chars().nth(to.0 * 3 + to.1) == Some('.')
    }
}

pub struct Case {
    pub name: String,
    /// The cluster's namespaces and pods, as `kubectl get -o yaml` would
    /// print them (in the state this case wants their labels).
    pub cluster: String,
    /// The case's `NetworkPolicy` objects.
    pub policies: String,
    pub probes: Vec<Probe>,
}

pub fn case_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/tests/netpol/cases");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

/// Reads one case file.
pub fn read_case(path: &Path) -> Case {
    let whole = std::fs::read_to_string(path).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let file: Arc<str> = Arc::from(name.as_str());
    let (header_text, policies_text) = whole.split_once("\n---\n").unwrap_or((&whole, ""));
    let header = policy::yaml::parse_documents(&file, header_text).unwrap().remove(0);
    let cluster = cluster(&string_maps(get(&header, "namespaceLabels")), &string_maps(get(&header, "podLabels")));
    let probes = items(get(&header, "probes").expect("probes"))
        .iter()
        .map(|probe| {
            let protocol = match text(get(probe, "protocol").expect("protocol")).as_str() {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                other => panic!("{name}: protocol {other}"),
            };
            let rows: Vec<String> = items(get(probe, "matrix").expect("matrix")).iter().map(text).collect();
            assert_eq!(rows.len(), 9, "{name}: 9 rows");
            assert!(rows.iter().all(|row| row.chars().count() == 9), "{name}: rows of 9");
            Probe { protocol, port: text(get(probe, "port").expect("port")), rows }
        })
        .collect();
    Case { name, cluster, policies: substitute(policies_text), probes }
}

/// Replaces `IP(ns/pod)` and `NET(ns/pod,len)` by the pod's address and
/// the network of that length containing it.
#[must_use]
pub fn substitute(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(['I', 'N']) {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        let token = ["IP(", "NET("].into_iter().find(|t| from.starts_with(t));
        let (Some(token), Some(end)) = (token, from.find(')')) else {
            out.push_str(&from[..1]);
            rest = &from[1..];
            continue;
        };
        let inner = &from[token.len()..end];
        if token == "IP(" {
            let (n, p) = pod_index(inner);
            let _ = write!(out, "{}", address(n, p));
        } else {
            let (pod, length) = inner.split_once(',').expect("NET(ns/pod,len)");
            let (n, p) = pod_index(pod.trim());
            let length: u32 = length.trim().parse().unwrap();
            let mask = u32::MAX.checked_shl(32 - length).unwrap_or(0);
            let _ = write!(out, "{}/{length}", Ipv4Addr::from(u32::from(address(n, p)) & mask));
        }
        rest = &from[end + 1..];
    }
    out.push_str(rest);
    out
}

fn pod_index(name: &str) -> (usize, usize) {
    let (namespace, pod) = name.split_once('/').unwrap_or_else(|| panic!("`{name}` is not ns/pod"));
    let n = NAMESPACES.iter().position(|x| *x == namespace).unwrap_or_else(|| panic!("namespace `{namespace}`"));
    let p = PODS.iter().position(|x| *x == pod).unwrap_or_else(|| panic!("pod `{pod}`"));
    (n, p)
}

/// The e2e cluster as objects: every pod serves 80 and 81 over TCP and
/// UDP, under the port names upstream gives them; labels as upstream sets
/// them, with the case's additions.
fn cluster(
    namespace_labels: &BTreeMap<String, BTreeMap<String, String>>,
    pod_labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> String {
    let flow = |labels: &BTreeMap<String, String>| {
        let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: \"{v}\"")).collect();
        format!("{{{}}}", pairs.join(", "))
    };
    let mut text = String::new();
    for (n, namespace) in NAMESPACES.iter().enumerate() {
        let mut labels = BTreeMap::from([
            ("ns".to_owned(), (*namespace).to_owned()),
            ("kubernetes.io/metadata.name".to_owned(), (*namespace).to_owned()),
        ]);
        labels.extend(namespace_labels.get(*namespace).cloned().unwrap_or_default());
        let _ = write!(
            text,
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n  labels: {}\n",
            flow(&labels)
        );
        for (p, pod) in PODS.iter().enumerate() {
            let mut labels = BTreeMap::from([("pod".to_owned(), (*pod).to_owned())]);
            labels.extend(pod_labels.get(&format!("{namespace}/{pod}")).cloned().unwrap_or_default());
            let _ = write!(
                text,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: {namespace}\n  labels: {}\nspec:\n  containers:\n",
                flow(&labels)
            );
            for port in [80u16, 81] {
                for protocol in ["TCP", "UDP"] {
                    let lower = protocol.to_lowercase();
                    let _ = write!(
                        text,
                        "  - name: cont-{port}-{lower}\n    image: agnhost\n    ports:\n    - containerPort: {port}\n      name: serve-{port}-{lower}\n      protocol: {protocol}\n"
                    );
                }
            }
            let _ = write!(text, "status:\n  phase: Running\n  podIP: {}\n", address(n, p));
        }
    }
    text
}

fn get<'n>(node: &'n Node, key: &str) -> Option<&'n Node> {
    let Value::Mapping(entries) = &node.value else { return None };
    entries.iter().find(|(k, _)| matches!(&k.value, Value::Scalar { text, .. } if text == key)).map(|(_, v)| v)
}

fn text(node: &Node) -> String {
    match &node.value {
        Value::Scalar { text, .. } => text.clone(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

fn items(node: &Node) -> &[Node] {
    match &node.value {
        Value::Sequence(items) => items,
        other => panic!("expected a list, found {other:?}"),
    }
}

fn string_maps(node: Option<&Node>) -> BTreeMap<String, BTreeMap<String, String>> {
    let Some(Node { value: Value::Mapping(entries), .. }) = node else { return BTreeMap::new() };
    entries
        .iter()
        .map(|(key, labels)| {
            let Value::Mapping(pairs) = &labels.value else { panic!("labels of {key:?}") };
            (text(key), pairs.iter().map(|(k, v)| (text(k), text(v))).collect())
        })
        .collect()
}
