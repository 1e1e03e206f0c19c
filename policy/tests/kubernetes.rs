//! Kubernetes objects as policy input: reading them as kubectl prints them
//! (`kubectl get -o yaml`), and the semantics of `NetworkPolicy`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use policy::Diagnostic;
use policy::kubernetes::netpol::{Connection, Side, judge};
use policy::kubernetes::{Objects, Operator, PolicyPeer, PolicyPort, PortProtocol, PortRef, read_objects};
use policy::model::Protocol;

fn read(text: &str) -> (Objects, Vec<String>) {
    let file: Arc<str> = Arc::from("snap.yaml");
    let (mut objects, mut reports) = (Objects::default(), Vec::new());
    read_objects(&file, text, &mut objects, &mut reports).expect("valid YAML");
    (objects, reports.iter().map(Diagnostic::to_string).collect())
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Shaped as `kubectl get ns,pods,netpol -A -o yaml` prints a cluster:
/// a `List`, with every field the API adds.
const SNAPSHOT: &str = r#"apiVersion: v1
items:
- apiVersion: v1
  kind: Namespace
  metadata:
    creationTimestamp: "2026-12-01T10:00:00Z"
    labels:
      kubernetes.io/metadata.name: shop
      team: web
    managedFields:
    - apiVersion: v1
      fieldsType: FieldsV1
      fieldsV1:
        f:metadata:
          f:labels:
            .: {}
            f:team: {}
      manager: kubectl-create
      operation: Update
      time: "2026-12-01T10:00:00Z"
    name: shop
    resourceVersion: "412"
    uid: 0d5c1c0e-2a39-4e5f-9c1a-3f1f0b6f3a11
  spec:
    finalizers:
    - kubernetes
  status:
    phase: Active
- apiVersion: v1
  kind: Pod
  metadata:
    generateName: frontend-7d9f8c6b5-
    labels:
      app: frontend
      pod-template-hash: 7d9f8c6b5
    name: frontend-7d9f8c6b5-x2k4q
    namespace: shop
    ownerReferences:
    - apiVersion: apps/v1
      blockOwnerDeletion: true
      controller: true
      kind: ReplicaSet
      name: frontend-7d9f8c6b5
      uid: 5b6a1d2e-0000-4000-8000-000000000001
  spec:
    containers:
    - image: registry.example/frontend:1.4
      name: web
      ports:
      - containerPort: 8080
        name: http
        protocol: TCP
      - containerPort: 9125
        name: statsd
        protocol: UDP
    - image: registry.example/sidecar:2
      name: sidecar
      ports:
      - containerPort: 9090
        name: metrics
    nodeName: node-1
  status:
    conditions:
    - lastProbeTime: null
      lastTransitionTime: "2026-12-01T10:00:03Z"
      status: "True"
      type: Ready
    hostIP: 192.168.1.10
    phase: Running
    podIP: 10.244.1.7
    podIPs:
    - ip: 10.244.1.7
    - ip: fd00:10:244:1::7
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata:
    generation: 1
    name: frontend-ingress
    namespace: shop
  spec:
    ingress:
    - from:
      - namespaceSelector:
          matchLabels:
            team: web
        podSelector:
          matchExpressions:
          - key: app
            operator: In
            values:
            - gateway
            - canary
      - ipBlock:
          cidr: 10.0.0.0/8
          except:
          - 10.244.0.0/16
      ports:
      - port: http
        protocol: TCP
      - endPort: 9200
        port: 9100
        protocol: TCP
    podSelector:
      matchLabels:
        app: frontend
    policyTypes:
    - Ingress
kind: List
metadata:
  resourceVersion: ""
"#;

#[test]
fn a_kubectl_snapshot_is_read_with_what_the_api_adds_ignored() {
    let (objects, reports) = read(SNAPSHOT);
    assert_eq!(reports, Vec::<String>::new());
    assert_eq!(objects.namespaces.len(), 1);
    assert_eq!(objects.namespaces[0].name, "shop");
    assert_eq!(objects.namespaces[0].labels, labels(&[("kubernetes.io/metadata.name", "shop"), ("team", "web")]));

    let [pod] = objects.pods.as_slice() else { panic!("one pod: {:?}", objects.pods) };
    assert_eq!((pod.namespace.as_str(), pod.name.as_str()), ("shop", "frontend-7d9f8c6b5-x2k4q"));
    assert_eq!(pod.labels, labels(&[("app", "frontend"), ("pod-template-hash", "7d9f8c6b5")]));
    let addresses: Vec<IpAddr> = vec!["10.244.1.7".parse().unwrap(), "fd00:10:244:1::7".parse().unwrap()];
    assert_eq!(pod.addresses, addresses);
    let ports: Vec<_> = pod.ports.iter().map(|p| (p.name.as_deref(), p.protocol, p.port)).collect();
    assert_eq!(
        ports,
        [
            (Some("http"), PortProtocol::Tcp, 8080),
            (Some("statsd"), PortProtocol::Udp, 9125),
            (Some("metrics"), PortProtocol::Tcp, 9090)
        ]
    );

    let [policy] = objects.network_policies.as_slice() else { panic!("one policy") };
    assert_eq!((policy.namespace.as_str(), policy.name.as_str()), ("shop", "frontend-ingress"));
    assert_eq!(policy.pod_selector.match_labels, labels(&[("app", "frontend")]));
    assert!(policy.ingress_isolating && !policy.egress_isolating);
    assert!(policy.egress.is_empty());
    let [rule] = policy.ingress.as_slice() else { panic!("one rule") };
    let PolicyPeer::Pods { pods: Some(pods), namespaces: Some(namespaces) } = &rule.peers[0] else {
        panic!("{:?}", rule.peers[0])
    };
    assert_eq!(namespaces.match_labels, labels(&[("team", "web")]));
    assert_eq!(pods.match_expressions[0].operator, Operator::In);
    assert_eq!(pods.match_expressions[0].values, ["gateway", "canary"]);
    assert_eq!(
        rule.peers[1],
        PolicyPeer::IpBlock { cidr: "10.0.0.0/8".parse().unwrap(), except: vec!["10.244.0.0/16".parse().unwrap()] }
    );
    assert_eq!(
        rule.ports,
        [
            PolicyPort { protocol: PortProtocol::Tcp, port: Some(PortRef::Name("http".into())), end_port: None },
            PolicyPort { protocol: PortProtocol::Tcp, port: Some(PortRef::Number(9100)), end_port: Some(9200) },
        ]
    );
}

#[test]
fn unknown_kinds_and_broken_objects_are_reported_and_skipped_alone() {
    let text = r"apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
---
apiVersion: extensions/v1beta1
kind: NetworkPolicy
metadata: {name: old, namespace: shop}
spec: {podSelector: {}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: shop}
spec:
  podSelector:
    matchExpressions: [{key: app, operator: Within, values: [a]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: empty-in, namespace: shop}
spec:
  podSelector:
    matchExpressions: [{key: app, operator: In}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: both, namespace: shop}
spec:
  podSelector: {}
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: range, namespace: shop}
spec:
  podSelector: {}
  ingress: [{ports: [{port: http, endPort: 90}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: sctp, namespace: shop}
spec:
  podSelector: {}
  ingress: [{ports: [{port: 80, protocol: SCTP}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: fine, namespace: shop}
spec:
  podSelector: {}
---
apiVersion: bulkhead/v1
kind: SegmentPolicy
metadata: {name: left-to-the-policy-parser}
spec: {}
";
    let (objects, reports) = read(text);
    let kept: Vec<&str> = objects.network_policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(kept, ["sctp", "fine"], "{reports:#?}");
    let expected = [
        "snap.yaml:1:1: Service shop/web skipped: kind `Service` (apiVersion `v1`) is not one Bulkhead reads",
        "snap.yaml:5:1: NetworkPolicy shop/old skipped: apiVersion `extensions/v1beta1` of NetworkPolicy is not supported",
        "snap.yaml:15:25: NetworkPolicy shop/broken skipped: operator `Within` is not In, NotIn, Exists or DoesNotExist",
        "snap.yaml:22:25: NetworkPolicy shop/empty-in skipped: `app` In needs at least one value",
        "snap.yaml:29:22: NetworkPolicy shop/both skipped: a peer has `ipBlock` and a selector",
        "snap.yaml:36:44: NetworkPolicy shop/range skipped: endPort needs a numeric `port`",
        "snap.yaml:43:23: NetworkPolicy shop/sctp: SCTP is not supported; this port entry matches nothing",
    ];
    assert_eq!(reports.len(), expected.len(), "{reports:#?}");
    for (report, expected) in reports.iter().zip(expected) {
        assert!(report.starts_with(expected), "{report}\n  expected to start with\n{expected}");
    }
    // The SCTP entry is kept and matches nothing: the rule is not widened
    // to every port.
    assert_eq!(objects.network_policies[0].ingress[0].ports[0].protocol, PortProtocol::Sctp);
}

/// Pods `ns/name` with labels and one address each, listening on TCP 80
/// (named `http`) or, for `named-81`, on 81 by that name.
fn cluster(policies: &str) -> Objects {
    let mut text = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: a}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: y, labels: {team: b}}\n",
    );
    let pods = [("x", "a", "10.0.0.1", "a", 80), ("x", "b", "10.0.0.2", "b", 80), ("y", "a", "10.0.1.1", "a", 81)];
    for (namespace, name, ip, app, port) in pods {
        let _ = write!(
            text,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{app: {app}}}}}\nspec:\n  containers:\n  - name: c\n    ports: [{{containerPort: {port}, name: http}}]\nstatus: {{podIP: {ip}}}\n"
        );
    }
    text += policies;
    let (objects, reports) = read(&text);
    assert_eq!(reports, Vec::<String>::new());
    objects
}

fn tcp(source: &str, destination: &str, port: u16) -> Connection {
    Connection {
        source: source.parse().unwrap(),
        destination: destination.parse().unwrap(),
        protocol: Protocol::Tcp,
        port,
    }
}

#[test]
fn a_pod_no_policy_selects_is_open_and_a_selected_one_admits_only_what_a_rule_allows() {
    let open = cluster("");
    assert!(judge(&open, &tcp("10.0.0.1", "10.0.0.2", 80)).allowed());
    assert!(judge(&open, &tcp("192.0.2.1", "10.0.0.2", 80)).allowed(), "from outside the cluster too");

    let deny_b = cluster(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {matchLabels: {app: b}}}\n",
    );
    let judged = judge(&deny_b, &tcp("10.0.0.1", "10.0.0.2", 80));
    assert_eq!(judged.ingress, Side::Denied { isolated_by: vec!["x/deny".into()] });
    assert_eq!(judged.egress, Side::Open);
    assert!(!judged.allowed());
    assert!(judge(&deny_b, &tcp("10.0.0.2", "10.0.0.1", 80)).allowed(), "ingress isolation only: b may still go out");
}

#[test]
fn a_connection_needs_the_egress_of_its_source_and_the_ingress_of_its_destination() {
    // x/a may send only to app=b; x/b admits only from namespace y.
    let objects = cluster(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a-out, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  egress: [{to: [{podSelector: {matchLabels: {app: b}}}]}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-in, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}}]}]\n",
    );
    let judged = judge(&objects, &tcp("10.0.0.1", "10.0.0.2", 80));
    assert_eq!(judged.egress, Side::Allowed { policy: "x/a-out".into() });
    assert!(!judged.ingress.admits(), "b admits only namespace y");
    assert!(judge(&objects, &tcp("10.0.1.1", "10.0.0.2", 80)).allowed(), "y/a → x/b: both sides allow");
    assert!(!judge(&objects, &tcp("10.0.0.1", "10.0.1.1", 81)).egress.admits(), "a's egress admits app=b of x only");
}

#[test]
fn named_ports_resolve_on_each_destination_pod() {
    // `http` is 80 on the pods of x and 81 on y/a.
    let objects = cluster(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: out, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  egress: [{ports: [{port: http}]}]\n",
    );
    assert!(judge(&objects, &tcp("10.0.0.2", "10.0.0.1", 80)).allowed());
    assert!(!judge(&objects, &tcp("10.0.0.2", "10.0.0.1", 81)).allowed());
    assert!(judge(&objects, &tcp("10.0.0.2", "10.0.1.1", 81)).allowed());
    assert!(!judge(&objects, &tcp("10.0.0.2", "10.0.1.1", 80)).allowed());
    assert!(!judge(&objects, &tcp("10.0.0.2", "192.0.2.9", 80)).allowed(), "an address that is no pod has no names");
    let udp = Connection { protocol: Protocol::Udp, ..tcp("10.0.0.2", "10.0.0.1", 80) };
    assert!(!judge(&objects, &udp).allowed(), "the name is a TCP port");
}

#[test]
fn ip_blocks_match_addresses_pods_or_not_minus_their_exceptions() {
    let objects = cluster(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: in, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}}], ports: [{port: 80, endPort: 90}]}]\n",
    );
    assert!(judge(&objects, &tcp("10.0.0.2", "10.0.0.1", 80)).allowed());
    assert!(judge(&objects, &tcp("10.0.9.9", "10.0.0.1", 90)).allowed(), "an address that is no pod");
    assert!(!judge(&objects, &tcp("10.0.0.2", "10.0.0.1", 91)).allowed(), "past endPort");
    assert!(!judge(&objects, &tcp("10.0.1.1", "10.0.0.1", 80)).allowed(), "excepted");
    let icmp = Connection { protocol: Protocol::Icmp, port: 0, ..tcp("10.0.0.2", "10.0.0.1", 0) };
    assert!(!judge(&objects, &icmp).allowed(), "ports given: other protocols are not admitted");
}

#[test]
fn selectors_follow_kubernetes_set_semantics() {
    let objects = cluster(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: in, namespace: x}\nspec:\n  podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [b]}, {key: tier, operator: DoesNotExist}, {key: tier, operator: NotIn, values: [db]}]}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [y]}]}, podSelector: {matchExpressions: [{key: app, operator: Exists}]}}]}]\n",
    );
    // x/a is selected (app=a is not in [b]; no tier, so none in [db]); x/b is not.
    assert!(judge(&objects, &tcp("10.0.1.1", "10.0.0.1", 80)).allowed(), "y/a: namespace by its name label");
    assert!(!judge(&objects, &tcp("10.0.0.2", "10.0.0.1", 80)).allowed(), "x/b: not in namespace y");
    assert!(judge(&objects, &tcp("10.0.0.1", "10.0.0.2", 80)).allowed(), "x/b is not selected: open");
}

#[test]
fn policy_types_default_to_ingress_and_to_egress_when_there_are_egress_rules() {
    let (objects, _) = read(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec: {podSelector: {}, egress: [{}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b}\nspec: {podSelector: {}, egress: []}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: c}\nspec: {podSelector: {}, policyTypes: [Egress]}\n",
    );
    let types: Vec<_> = objects
        .network_policies
        .iter()
        .map(|p| (p.namespace.as_str(), p.name.as_str(), p.ingress_isolating, p.egress_isolating))
        .collect();
    assert_eq!(types, [("default", "a", true, true), ("default", "b", true, false), ("default", "c", false, true)]);
}

/// A cluster snapshot is a complete policy file: pods become identities
/// named by namespace, labels and named ports, the policy's rules are named after it, a kind
/// Bulkhead does not read is noted beside the policy, and the verdicts
/// under `default` enforcement are `NetworkPolicy`'s.
#[test]
fn a_snapshot_file_is_a_complete_policy() {
    use policy::model::Enforcement;
    use policy::{Evaluator, Packet, Verdict};
    let service = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n";
    let text = format!("{SNAPSHOT}{service}");
    let parsed = policy::parse_str("snap.yaml", &text).expect("a snapshot is valid policy");
    let names: Vec<&str> = parsed.identities.iter().map(|identity| identity.name.as_str()).collect();
    let frontend = "shop/{app=frontend,pod-template-hash=7d9f8c6b5}[http=8080/tcp,metrics=9090/tcp,statsd=9125/udp]";
    assert_eq!(names, [frontend]);
    let rules: Vec<&str> = parsed.rules.iter().map(|rule| rule.name.as_str()).collect();
    assert_eq!(rules, ["shop/frontend-ingress#ingress-0"]);
    let notes: Vec<String> = parsed.notes.iter().map(ToString::to_string).collect();
    assert_eq!(notes.len(), 1, "{notes:#?}");
    assert!(notes[0].contains("Service shop/web skipped"), "{notes:#?}");

    let evaluator = Evaluator::new(&parsed).with_enforcement(Enforcement::Default);
    let packet =
        |src: &str, port| Packet { src: src.parse().unwrap(), dst: "10.244.1.7".parse().unwrap(), protocol: 6, port };
    // The ipBlock admits 10/8 outside 10.244/16, on the named port and the range.
    let decision = evaluator.evaluate(&packet("10.1.2.3", 8080));
    assert_eq!(decision.verdict, Verdict::Forward);
    assert_eq!(decision.dst_identity, frontend);
    assert_eq!((decision.src_pod, decision.dst_pod.as_deref()), (None, Some("shop/frontend-7d9f8c6b5-x2k4q")));
    assert_eq!(decision.rule.as_deref(), Some("shop/frontend-ingress#ingress-0"));
    assert_eq!(evaluator.evaluate(&packet("10.1.2.3", 9150)).verdict, Verdict::Forward);
    assert!(
        matches!(evaluator.evaluate(&packet("10.1.2.3", 9090)).verdict, Verdict::Drop(_)),
        "9090 is no port of the rule"
    );
    assert!(matches!(evaluator.evaluate(&packet("10.244.9.9", 8080)).verdict, Verdict::Drop(_)), "the exception");
    // The pod is isolated for ingress only: its own connections out pass.
    let out = Packet { src: "10.244.1.7".parse().unwrap(), dst: "192.0.2.1".parse().unwrap(), protocol: 6, port: 443 };
    assert_eq!(evaluator.evaluate(&out).verdict, Verdict::Forward);
    // Under `always`, nothing admits them: every identity is isolated.
    let always = Evaluator::new(&parsed);
    assert!(matches!(always.evaluate(&out).verdict, Verdict::Drop(_)));

    // The engine takes the same text as a file source, and describes alike.
    let mut engine = policy::Engine::with_enforcement(Enforcement::Default);
    let change = policy::SourceChange { source: "snap.yaml".into(), contents: policy::Contents::Text(text) };
    engine.apply(vec![change], std::time::SystemTime::now()).expect("valid");
    for (src, port) in [("10.1.2.3", 8080), ("10.1.2.3", 9150), ("10.1.2.3", 9090), ("10.244.9.9", 8080)] {
        assert_eq!(engine.describe(&packet(src, port), &[]), evaluator.evaluate(&packet(src, port)), "{src}:{port}");
    }
    assert_eq!(engine.describe(&out, &[]), evaluator.evaluate(&out));
    assert_eq!(engine.notes().count(), 1);
}

/// The same namespace given twice is refused with both places named.
#[test]
fn a_namespace_given_twice_is_refused() {
    let namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";
    let error = policy::parse_sources(&[
        policy::Source { name: "a.yaml".into(), text: namespace.into() },
        policy::Source { name: "b.yaml".into(), text: namespace.into() },
    ])
    .unwrap_err();
    assert!(error.to_string().contains("namespace `shop` is given twice (first at a.yaml:1:1)"), "{error}");
}

/// Two objects run together (a `---` left out) repeat their keys: which
/// value counts would be a guess, so the object is reported and skipped.
#[test]
fn an_object_that_repeats_a_key_is_skipped() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nstatus: {podIP: 10.0.0.1}\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {a: b, a: c}}\n";
    let (objects, reports) = read(text);
    assert!(objects.pods.is_empty() && objects.network_policies.is_empty() && objects.namespaces.is_empty());
    assert_eq!(reports.len(), 2, "{reports:#?}");
    assert!(reports[0].starts_with("snap.yaml:5:1: Pod x/a skipped: `apiVersion` is given twice"), "{reports:#?}");
    assert!(reports[1].contains("Namespace x skipped: `a` is given twice"), "{reports:#?}");
}
