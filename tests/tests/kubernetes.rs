//! `bulkhead run --kubernetes` against the fake API server, with real
//! packets: pods, namespaces, `NetworkPolicies` and `SegmentPolicies` come
//! from the API (the policy directory is empty), changes reach the kernel
//! as they happen, a lost watch or a compacted history is a relist, an
//! invalid object is refused alone, and an API that is gone leaves the
//! last state enforced and says so.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lab::fake_api::{Chaos, FakeApiServer, Options};
use lab::probe::{self, EchoServer, Outcome};
use lab::{Daemon, ScratchDir, ThreeTier};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(15);

fn metrics(lab: &ThreeTier, daemon: &Daemon) -> String {
    probe::http_get(&lab.router, daemon.metrics_addr, "/metrics").map(|(_, text)| text).unwrap_or_default()
}

fn metric(lab: &ThreeTier, daemon: &Daemon, sample: &str) -> Option<u64> {
    probe::metric(&metrics(lab, daemon), sample)
}

/// Waits until `done` holds, failing with the daemon's log after
/// [`DEADLINE`].
fn wait_until(daemon: &Daemon, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "{what} did not happen: {}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pod(namespace: &str, name: &str, app: &str, ip: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some([("app".to_owned(), app.to_owned())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec { node_name: Some("node-1".into()), ..PodSpec::default() }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            ..PodStatus::default()
        }),
    }
}

fn network_policy(value: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(value).expect("a NetworkPolicy")
}

/// web, db and batch pods, each a namespace behind the node.
struct Cluster {
    lab: ThreeTier,
    api: FakeApiServer,
    scratch: ScratchDir,
    _echo: EchoServer,
}

impl Cluster {
    fn new(label: &str) -> Self {
        let lab =
            ThreeTier::with_hosts(label, &[("web", [10, 1, 1]), ("db", [10, 1, 2]), ("batch", [10, 1, 3])]).unwrap();
        let db = lab.host("db");
        let echo = EchoServer::start(&db.ns, &[IpAddr::V4(db.addr)], &[80], &[]).unwrap();
        // The API server listens on the node's loopback, where the daemon runs.
        let listener = lab.router.enter(|| TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
        let api = FakeApiServer::start_on(listener, Options::default()).unwrap();
        let scratch = ScratchDir::new(&lab.stem).unwrap();
        std::fs::create_dir_all(scratch.0.join("policy")).unwrap();
        api.create(&Namespace {
            metadata: ObjectMeta {
                name: Some("shop".into()),
                labels: Some([("team".to_owned(), "shop".to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        })
        .unwrap();
        for (name, ip) in [("web", "10.1.1.10"), ("db", "10.1.2.10"), ("batch", "10.1.3.10")] {
            api.create(&pod("shop", &format!("{name}-1"), name, ip)).unwrap();
        }
        api.create(&network_policy(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "db-from-web", "namespace": "shop"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                  "ports": [{"port": 80, "protocol": "TCP"}]}]}
        })))
        .unwrap();
        Self { lab, api, scratch, _echo: echo }
    }

    fn start_daemon(&self) -> Daemon {
        let kubeconfig = self.scratch.0.join("kubeconfig");
        self.api.write_kubeconfig(&kubeconfig).unwrap();
        let kubeconfig = kubeconfig.display().to_string();
        let args = [
            "--kubernetes",
            "--kubeconfig",
            kubeconfig.as_str(),
            "--node-name",
            "node-1",
            "--policy-enforcement",
            "default",
        ];
        Daemon::start_with(&self.lab, &self.scratch.0.join("policy"), &self.scratch.0.join("daemon.log"), &args)
            .unwrap()
    }

    fn to_db(&self, from: &str) -> Outcome {
        let db = SocketAddr::new(IpAddr::V4(self.lab.host("db").addr), 80);
        probe::tcp(&self.lab.host(from).ns, db).unwrap()
    }
}

/// What the watchers ask the API server for: list and watch each kind.
fn watched() -> std::collections::BTreeSet<(String, String, String)> {
    enforcer::kubernetes::watch_access()
        .map(|(verb, group, resource)| (verb.to_owned(), group.to_owned(), resource.to_owned()))
        .collect()
}

fn readyz(cluster: &Cluster, daemon: &Daemon) -> (u16, String) {
    probe::http_get(&cluster.lab.router, daemon.metrics_addr, "/readyz").unwrap()
}

#[test]
fn pods_and_policies_from_the_api_are_enforced_and_follow_the_cluster() {
    let cluster = Cluster::new("kube");
    let daemon = cluster.start_daemon();
    assert_eq!(metric(&cluster.lab, &daemon, "bulkhead_source_up{source=\"kubernetes\"}"), Some(1));
    assert_eq!(readyz(&cluster, &daemon).0, 200);
    assert_eq!(cluster.to_db("web"), Outcome::Connected);
    assert_eq!(cluster.to_db("batch"), Outcome::TimedOut, "db is isolated for ingress: only web may reach it");

    // A pod relabelled is another identity from the next packet on.
    cluster.api.update(&pod("shop", "batch-1", "web", "10.1.3.10")).unwrap();
    wait_until(&daemon, "batch relabelled as web reaching db", || cluster.to_db("batch") == Outcome::Connected);

    // batch-1 and web-1 are pods alike now: one identity with both
    // addresses. A replica deleted takes only its own address out of it.
    cluster.api.delete::<Pod>(Some("shop"), "web-1").unwrap();
    wait_until(&daemon, "web-1's address out of the identity", || cluster.to_db("web") == Outcome::TimedOut);
    assert_eq!(cluster.to_db("batch"), Outcome::Connected, "the pod left keeps the identity's access");
    cluster.api.create(&pod("shop", "web-1", "web", "10.1.1.10")).unwrap();
    wait_until(&daemon, "web-1 back in the identity", || cluster.to_db("web") == Outcome::Connected);

    // A lost watch and a compacted history: the watchers list again, and
    // what changed meanwhile (batch back to batch) is taken.
    cluster.api.compact();
    cluster.api.update(&pod("shop", "batch-1", "batch", "10.1.3.10")).unwrap();
    cluster.api.compact();
    cluster.api.disconnect_watches();
    wait_until(&daemon, "batch refused again after the relist", || cluster.to_db("batch") == Outcome::TimedOut);
    assert_eq!(cluster.to_db("web"), Outcome::Connected);

    // The policy goes: db is open to everyone.
    cluster.api.delete::<NetworkPolicy>(Some("shop"), "db-from-web").unwrap();
    wait_until(&daemon, "db open once its policy is deleted", || cluster.to_db("batch") == Outcome::Connected);
}

/// A `SegmentPolicy` the policy refuses is refused alone: counted, named in
/// the log; the other objects, and a valid `SegmentPolicy`'s deny rule, are
/// enforced.
#[test]
fn an_invalid_segment_policy_is_refused_alone() {
    let cluster = Cluster::new("kubecr");
    let broken = cluster
        .api
        .create_value(json!({
            "apiVersion": "bulkhead.dev/v1", "kind": "SegmentPolicy", "metadata": {"name": "broken"},
            "spec": {"identities": [{"name": "printer", "addresses": ["10.9.9.300"]}]}
        }))
        .unwrap();
    let daemon = cluster.start_daemon();
    assert_eq!(metric(&cluster.lab, &daemon, "bulkhead_kubernetes_objects_rejected"), Some(1));
    let log = daemon.log_text();
    assert!(log.contains("kubernetes:segmentpolicies/broken is refused") && log.contains("10.9.9.300"), "{log}");
    // Reported on the object too: a Warning event, written by this node.
    let event_on_broken = || {
        cluster.api.objects::<k8s_openapi::api::events::v1::Event>().unwrap().into_iter().find(|event| {
            event
                .regarding
                .as_ref()
                .is_some_and(|r| r.kind.as_deref() == Some("SegmentPolicy") && r.name.as_deref() == Some("broken"))
        })
    };
    wait_until(&daemon, "an event on the refused SegmentPolicy", || event_on_broken().is_some());
    let event = event_on_broken().unwrap();
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.reason.as_deref(), Some("PolicyRefused"));
    assert_eq!(event.reporting_instance.as_deref(), Some("node-1"));
    // By uid, as `kubectl describe` finds an object's events.
    let regarding = event.regarding.as_ref().unwrap();
    assert_eq!(regarding.uid.as_deref(), broken["metadata"]["uid"].as_str());
    assert_eq!(regarding.resource_version.as_deref(), broken["metadata"]["resourceVersion"].as_str());
    assert!(event.note.as_deref().is_some_and(|note| note.contains("10.9.9.300")), "{event:?}");
    assert_eq!(event.metadata.namespace.as_deref(), Some("default"), "cluster-scoped: events go to default");
    let (verb, group, resource) = enforcer::kubernetes::EVENT_ACCESS;
    let mut expected = watched();
    expected.insert((verb.to_owned(), group.to_owned(), resource.to_owned()));
    assert_eq!(cluster.api.access(), expected, "what the daemon asked of the API server");
    assert_eq!(cluster.to_db("web"), Outcome::Connected, "the rest of the cluster is enforced");
    assert_eq!(cluster.to_db("batch"), Outcome::TimedOut);

    // A valid one beside it: its deny rule wins over the NetworkPolicy.
    cluster
        .api
        .create_value(json!({
            "apiVersion": "bulkhead.dev/v1", "kind": "SegmentPolicy", "metadata": {"name": "tighten"},
            "spec": {"rules": [{"name": "no-web-to-db", "action": "deny",
                                "from": [{"labels": {"app": "web"}}], "to": [{"labels": {"app": "db"}}]}]}
        }))
        .unwrap();
    wait_until(&daemon, "the deny rule enforced", || cluster.to_db("web") == Outcome::TimedOut);
    // The broken one fixed: accepted, and no longer counted.
    cluster
        .api
        .update_value(json!({
            "apiVersion": "bulkhead.dev/v1", "kind": "SegmentPolicy", "metadata": {"name": "broken"},
            "spec": {"identities": [{"name": "printer", "addresses": ["10.9.9.30"]}]}
        }))
        .unwrap();
    wait_until(&daemon, "the fixed SegmentPolicy accepted", || {
        metric(&cluster.lab, &daemon, "bulkhead_kubernetes_objects_rejected") == Some(0)
    });
}

/// The API gone: the last state stays enforced, `bulkhead_source_up` says
/// 0 and `/readyz` why; a hostile API (errors, duplicates, reordering)
/// changes nothing of what is enforced.
#[test]
fn an_unreachable_api_leaves_the_last_state_enforced() {
    let cluster = Cluster::new("kubedown");
    let daemon = cluster.start_daemon();
    cluster.api.set_chaos(Chaos {
        duplicate_percent: 50,
        reorder: true,
        jitter: Duration::from_millis(20),
        seed: 7,
        ..Chaos::default()
    });
    cluster.api.update(&pod("shop", "batch-1", "web", "10.1.3.10")).unwrap();
    wait_until(&daemon, "batch as web reaching db", || cluster.to_db("batch") == Outcome::Connected);

    cluster.api.set_chaos(Chaos { fail_percent: 100, ..Chaos::default() });
    cluster.api.disconnect_watches();
    wait_until(&daemon, "the source reported down", || {
        metric(&cluster.lab, &daemon, "bulkhead_source_up{source=\"kubernetes\"}") == Some(0)
    });
    let (status, why) = readyz(&cluster, &daemon);
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("kubernetes: watching") && why.contains("stays enforced"), "{why}");
    assert_eq!(cluster.to_db("batch"), Outcome::Connected, "the last state stays enforced");
    assert_eq!(cluster.to_db("web"), Outcome::Connected);

    cluster.api.set_chaos(Chaos::default());
    wait_until(&daemon, "the source back up", || {
        metric(&cluster.lab, &daemon, "bulkhead_source_up{source=\"kubernetes\"}") == Some(1)
    });
    assert_eq!(readyz(&cluster, &daemon).0, 200);

    // Through all of it (lists, watches, relists, the probes of a failing
    // kind) the daemon asked for exactly what the code says it watches
    // (tests/tests/manifests.rs holds the ClusterRole to the same).
    assert_eq!(cluster.api.access(), watched());
}

/// A pod given an address another pod still holds (the old pod's deletion
/// not seen yet, as happens when an address is reused quickly) is refused,
/// reported on the pod, and taken once the old pod is gone.
#[test]
fn a_pod_whose_address_is_still_held_is_taken_once_the_holder_goes() {
    let cluster = Cluster::new("kubereuse");
    let daemon = cluster.start_daemon();
    assert_eq!(cluster.to_db("batch"), Outcome::TimedOut);
    cluster.api.create(&pod("shop", "web-2", "web", "10.1.3.10")).unwrap();
    wait_until(&daemon, "the pod refused", || {
        metric(&cluster.lab, &daemon, "bulkhead_kubernetes_objects_rejected") == Some(1)
    });
    let log = daemon.log_text();
    assert!(log.contains("kubernetes:pods/shop/web-2 is refused"), "{log}");
    assert_eq!(cluster.to_db("batch"), Outcome::TimedOut, "the address is still batch-1's");

    cluster.api.delete::<Pod>(Some("shop"), "batch-1").unwrap();
    wait_until(&daemon, "the new pod taken", || {
        metric(&cluster.lab, &daemon, "bulkhead_kubernetes_objects_rejected") == Some(0)
    });
    wait_until(&daemon, "the address enforced as web-2", || cluster.to_db("batch") == Outcome::Connected);
}
