//! The fake Kubernetes API server (`lab::fake_api`) against the clients the
//! daemon and operators use: kube-rs (lists, watchers, reflectors), the real
//! `kubectl`, and a raw HTTP/1.1 client that checks the wire protocol itself.
//! Loopback only; no root needed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Config};
use lab::ScratchDir;
use lab::fake_api::{Chaos, FailWith, FakeApiServer, Options};
use serde_json::{Value, json};

/// Only a guard against deadlocks: every wait below ends as soon as its
/// condition holds.
const DEADLINE: Duration = Duration::from_secs(90);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

fn client(server: &FakeApiServer) -> Client {
    let url = server.url().parse().expect("server URL");
    Client::try_from(Config::new(url)).expect("kube client")
}

fn namespace(name: &str) -> Namespace {
    Namespace { metadata: ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() }, ..Namespace::default() }
}

fn pod(ns: &str, name: &str, labels: &[(&str, &str)], node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container { name: "app".into(), image: Some("busybox".into()), ..Container::default() }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

fn name_of(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// (namespace, name) → resourceVersion of every pod, the thing a converged
/// reflector must agree on with the server.
fn pod_versions<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> BTreeMap<(String, String), String> {
    pods.into_iter()
        .map(|p| {
            let m = &p.metadata;
            (
                (m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default()),
                m.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// Waits until the reflector's store holds exactly the server's pods (same
/// names, same resourceVersions).
async fn converged(server: &FakeApiServer, store: &reflector::Store<Pod>, what: &str) {
    let started = Instant::now();
    loop {
        let want = pod_versions(&server.objects::<Pod>().expect("server pods"));
        let state = store.state();
        let have = pod_versions(state.iter().map(Arc::as_ref));
        if want == have {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{what}: the reflector did not converge\nserver: {want:?}\nstore:  {have:?}\n{:?}",
            server.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A short fixed backoff: the watcher's recovery is under test, not its
/// politeness, and the default (0.8 s doubling to 30 s, reset after 2 min idle)
/// would make a run with hundreds of injected errors take minutes.
struct QuickBackoff;

impl Iterator for QuickBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(20))
    }
}

impl kube::runtime::utils::Backoff for QuickBackoff {
    fn reset(&mut self) {}
}

/// Runs a reflector of every pod in the background; the store is its view.
fn pod_reflector(client: &Client, config: watcher::Config) -> (reflector::Store<Pod>, tokio::task::JoinHandle<()>) {
    let (store, writer) = reflector::store();
    let stream = reflector(writer, watcher(Api::<Pod>::all(client.clone()), config)).backoff(QuickBackoff);
    // Errors (injected 500s, 410s, cut streams) are the watcher's to recover from.
    let task = tokio::spawn(stream.for_each(|_| async {}));
    (store, task)
}

/// Creates, relabels and deletes pods in `ns`, `round` keeping names apart.
fn churn(server: &FakeApiServer, ns: &str, round: u32, count: u32) {
    for i in 0..count {
        server
            .create(&pod(ns, &format!("r{round}-{i}"), &[("app", "web"), ("round", "new")], "node-a"))
            .expect("create");
    }
    for i in (0..count).step_by(2) {
        let mut p: Pod = server.get(Some(ns), &format!("r{round}-{i}")).expect("get").expect("exists");
        p.metadata.labels.get_or_insert_default().insert("round".into(), "changed".into());
        server.update(&p).expect("update");
    }
    for i in (0..count).step_by(3) {
        server.delete::<Pod>(Some(ns), &format!("r{round}-{i}")).expect("delete");
    }
}

#[test]
fn kube_list_pages_through_a_consistent_snapshot_with_selectors() {
    let server = FakeApiServer::start().expect("fake API server");
    server.create(&namespace("shop")).expect("namespace");
    for i in 0..25 {
        let (app, node) = if i % 5 == 0 { ("db", "node-b") } else { ("web", "node-a") };
        server.create(&pod("shop", &format!("p{i:02}"), &[("app", app)], node)).expect("pod");
    }
    runtime().block_on(async {
        let client = client(&server);
        let pods = Api::<Pod>::all(client.clone());

        // Pages of 4 through the 20 web pods, the cluster changing between pages:
        // every page comes from the first page's snapshot.
        let mut params = ListParams::default().labels("app=web").limit(4);
        let mut names = Vec::new();
        let mut versions = Vec::new();
        let mut pages = 0;
        loop {
            let page = pods.list(&params).await.expect("list page");
            pages += 1;
            assert!(page.items.len() <= 4);
            names.extend(page.items.iter().map(name_of));
            versions.push(page.metadata.resource_version.clone().expect("list resourceVersion"));
            server.create(&pod("shop", &format!("late{pages}"), &[("app", "web")], "node-a")).expect("late pod");
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        let expected: Vec<String> = (0..25).filter(|i| i % 5 != 0).map(|i| format!("p{i:02}")).collect();
        assert_eq!(names, expected, "pages: {pages}");
        assert_eq!(pages, 5);
        assert!(versions.windows(2).all(|w| w[0] == w[1]), "one snapshot for all pages: {versions:?}");

        // A fresh list sees the late pods; set-based selectors as kube-rs renders them.
        let fresh = pods.list(&ListParams::default().labels("app in (web),app notin (db)")).await.expect("list");
        assert_eq!(fresh.items.len(), 20 + pages);
        let neither = pods.list(&ListParams::default().labels("app!=web,!missing")).await.expect("list");
        assert_eq!(neither.items.len(), 5);
        assert!(
            neither.items.iter().all(|p| p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app"))
                .is_some_and(|a| a == "db"))
        );

        // Field selectors on a namespaced collection.
        let shop = Api::<Pod>::namespaced(client.clone(), "shop");
        let on_b = shop.list(&ListParams::default().fields("spec.nodeName=node-b")).await.expect("list");
        assert_eq!(on_b.items.iter().map(name_of).collect::<Vec<_>>(), ["p00", "p05", "p10", "p15", "p20"]);
        let one = shop.list(&ListParams::default().fields("metadata.name=p07")).await.expect("list");
        assert_eq!(one.items.iter().map(name_of).collect::<Vec<_>>(), ["p07"]);
        let elsewhere = Api::<Pod>::namespaced(client.clone(), "default").list(&ListParams::default()).await;
        assert!(elsewhere.expect("list").items.is_empty());
        let unsupported = pods.list(&ListParams::default().fields("spec.hostname=x")).await;
        assert!(matches!(unsupported, Err(kube::Error::Api(s)) if s.code == 400), "unsupported field");

        // GET of one object, as stored, and 404 as a Status.
        let got = shop.get("p07").await.expect("get");
        assert_eq!(got.metadata.generation, Some(1));
        assert!(got.metadata.uid.is_some() && got.metadata.creation_timestamp.is_some());
        let missing = shop.get("nope").await;
        assert!(matches!(missing, Err(kube::Error::Api(s)) if s.code == 404 && s.reason == "NotFound"));

        // A continue token from before a compaction is expired, as on a real server.
        let first = pods.list(&ListParams::default().limit(2)).await.expect("list");
        server.create(&pod("shop", "after-first-page", &[], "node-a")).expect("pod");
        server.compact();
        let token = first.metadata.continue_.expect("continue token");
        let stale = pods.list(&ListParams::default().limit(2).continue_token(&token)).await;
        assert!(matches!(stale, Err(kube::Error::Api(s)) if s.code == 410 && s.reason == "Expired"));

        // The custom resource, served as JSON.
        server
            .create_value(json!({
                "apiVersion": "bulkhead.dev/v1", "kind": "SegmentPolicy",
                "metadata": {"name": "shop-tiers", "labels": {"team": "shop"}},
                "spec": {"segments": ["web", "db"]},
            }))
            .expect("segment policy");
        let gvk = GroupVersionKind::gvk("bulkhead.dev", "v1", "SegmentPolicy");
        let resource = ApiResource::from_gvk_with_plural(&gvk, "segmentpolicies");
        let segments = Api::<DynamicObject>::all_with(client.clone(), &resource);
        let listed = segments.list(&ListParams::default().labels("team=shop")).await.expect("list");
        assert_eq!(listed.items.len(), 1);
        assert_eq!(listed.items[0].data["spec"]["segments"], json!(["web", "db"]));

        // kube-rs's own discovery finds every served type, with its scope.
        let version = client.apiserver_version().await.expect("/version");
        assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "32"));
        let discovery = kube::Discovery::new(client.clone()).run().await.expect("discovery");
        let (found, capabilities) = discovery.resolve_gvk(&gvk).expect("SegmentPolicy discovered");
        assert_eq!(found.plural, "segmentpolicies");
        assert_eq!(capabilities.scope, kube::discovery::Scope::Cluster);
        let netpol = GroupVersionKind::gvk("networking.k8s.io", "v1", "NetworkPolicy");
        let (_, capabilities) = discovery.resolve_gvk(&netpol).expect("NetworkPolicy discovered");
        assert_eq!(capabilities.scope, kube::discovery::Scope::Namespaced);
        assert!(discovery.resolve_gvk(&GroupVersionKind::gvk("", "v1", "Pod")).is_some());
    });
}

#[test]
fn kube_reflector_converges_through_changes_compaction_and_chaos() {
    let server = FakeApiServer::start().expect("fake API server");
    server.create(&namespace("shop")).expect("namespace");
    for i in 0..10 {
        server.create(&pod("shop", &format!("seed-{i}"), &[("app", "web")], "node-a")).expect("pod");
    }
    runtime().block_on(async {
        let client = client(&server);
        // Pages of 3 so the initial list and every relist take several pages.
        let (store, task) = pod_reflector(&client, watcher::Config::default().page_size(3));
        converged(&server, &store, "initial list").await;

        churn(&server, "shop", 1, 9);
        converged(&server, &store, "plain watch").await;

        // Events held back by a delay, the history compacted under them and
        // the stream cut: the watcher resumes from a forgotten resourceVersion,
        // gets 410 Expired, and relists.
        let before = server.stats();
        server.set_chaos(Chaos { delay: Duration::from_millis(300), ..Chaos::default() });
        churn(&server, "shop", 2, 6);
        server.compact();
        server.disconnect_watches();
        server.set_chaos(Chaos::default());
        converged(&server, &store, "after compaction").await;
        let after = server.stats();
        assert!(after.expired > before.expired, "no 410 was served: {after:?}");
        assert!(after.lists > before.lists, "no relist: {after:?}");

        // Everything at once: delays, watches cut every few events (cleanly
        // and mid-body), 500s and 429s, duplicates, reordering.
        // kube-rs retries a 429 itself after its Retry-After (1 s, as API
        // priority and fairness says), so fewer of those keep the run short.
        let rounds = [(3, false, FailWith::InternalError, 25), (4, true, FailWith::TooManyRequests, 10)];
        for (round, abort, fail_with, fail_percent) in rounds {
            let before = server.stats();
            server.set_chaos(Chaos {
                delay: Duration::from_millis(2),
                watch_event_limit: Some(4),
                abort_cut_watches: abort,
                fail_percent,
                // Two sure failures, whatever the timing draws.
                fail_next: 2,
                fail_with,
                duplicate_percent: 30,
                reorder: true,
                jitter: Duration::from_millis(10),
                seed: u64::from(round),
                ..Chaos::default()
            });
            churn(&server, "shop", round, 15);
            server.delete::<Pod>(Some("shop"), &format!("seed-{round}")).expect("delete seed");
            converged(&server, &store, "hostile").await;
            server.set_chaos(Chaos::default());
            let after = server.stats();
            assert!(after.cut_watches > before.cut_watches, "no watch was cut: {after:?}");
            assert!(after.injected_failures > before.injected_failures, "no failure was injected: {after:?}");
            assert!(after.duplicated_events > before.duplicated_events, "no event was duplicated: {after:?}");
        }
        task.abort();
    });
}

#[test]
fn kube_streaming_list_watcher_converges() {
    let server = FakeApiServer::start().expect("fake API server");
    server.create(&namespace("shop")).expect("namespace");
    churn(&server, "shop", 0, 12);
    runtime().block_on(async {
        let client = client(&server);
        let (store, task) = pod_reflector(&client, watcher::Config::default().streaming_lists());
        converged(&server, &store, "streaming list").await;
        assert_eq!(server.stats().lists, 0, "a streaming list is a watch, not a list");
        churn(&server, "shop", 1, 6);
        converged(&server, &store, "after streaming list").await;
        // A namespace takes its pods along, each a DELETED first.
        server.delete::<Namespace>(None, "shop").expect("delete namespace");
        assert!(server.objects::<Pod>().expect("pods").is_empty());
        converged(&server, &store, "after namespace deletion").await;
        assert!(store.state().is_empty());
        task.abort();
    });
}

#[test]
fn the_handle_checks_what_the_real_server_checks() {
    use lab::fake_api::FakeApiError;
    let server = FakeApiServer::start().expect("fake API server");
    let orphan = server.create(&pod("nowhere", "p", &[], "node-a"));
    assert!(matches!(orphan, Err(FakeApiError::NamespaceNotFound { .. })), "{orphan:?}");
    server.create(&namespace("shop")).expect("namespace");
    let created = server.create(&pod("shop", "p", &[("v", "1")], "node-a")).expect("pod");
    let again = server.create(&pod("shop", "p", &[], "node-a"));
    assert!(matches!(again, Err(FakeApiError::AlreadyExists { .. })), "{again:?}");

    // Labels only: resourceVersion moves, generation does not; a spec change bumps it.
    let mut relabeled = created.clone();
    relabeled.metadata.labels = Some(BTreeMap::from([("v".into(), "2".into())]));
    let relabeled = server.update(&relabeled).expect("update");
    assert_eq!(relabeled.metadata.generation, Some(1));
    assert_eq!(relabeled.metadata.uid, created.metadata.uid);
    let rv = |p: &Pod| p.metadata.resource_version.as_deref().and_then(|v| v.parse::<u64>().ok());
    assert!(rv(&relabeled) > rv(&created), "resourceVersion moves on every change");
    let mut moved = relabeled.clone();
    moved.spec.get_or_insert_default().node_name = Some("node-b".into());
    assert_eq!(server.update(&moved).expect("update").metadata.generation, Some(2));

    // Optimistic concurrency: an update from a stale copy is refused.
    let stale = server.update(&created);
    assert!(matches!(stale, Err(FakeApiError::Conflict { .. })), "{stale:?}");
    let last: Pod = server.delete(Some("shop"), "p").expect("delete");
    assert_eq!(last.metadata.resource_version, Some(server.resource_version().to_string()));
    assert!(matches!(server.delete::<Pod>(Some("shop"), "p"), Err(FakeApiError::NotFound { .. })));
    let unnamed = server.create_value(json!({"apiVersion": "bulkhead.dev/v1", "kind": "SegmentPolicy"}));
    assert!(matches!(unnamed, Err(FakeApiError::MissingName { .. })), "{unnamed:?}");
    let unknown = server.create_value(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}));
    assert!(matches!(unknown, Err(FakeApiError::UnknownKind { .. })), "{unknown:?}");
}

#[test]
fn kube_client_from_the_written_kubeconfig() {
    let server = FakeApiServer::start().expect("fake API server");
    let dir = ScratchDir::new(&lab::netns::unique_stem("fakeapi-kubeconfig")).expect("scratch dir");
    let path = dir.0.join("kubeconfig");
    server.write_kubeconfig(&path).expect("kubeconfig");
    runtime().block_on(async {
        let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
        let config = Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .expect("config from kubeconfig");
        let client = Client::try_from(config).expect("client");
        let namespaces = Api::<Namespace>::all(client).list(&ListParams::default()).await.expect("list");
        let names: Vec<String> = namespaces.items.iter().filter_map(|n| n.metadata.name.clone()).collect();
        assert_eq!(names, ["default", "kube-node-lease", "kube-public", "kube-system"]);
    });
}

/// Runs kubectl with no kubeconfig of the user's and a private discovery cache.
fn kubectl(home: &ScratchDir, args: &[&str]) -> String {
    let output = Command::new("kubectl")
        .args(args)
        .arg("--cache-dir")
        .arg(home.0.join("cache"))
        .env("HOME", &home.0)
        .env_remove("KUBECONFIG")
        .output()
        .expect("kubectl on PATH (cargo xtask setup installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "kubectl {args:?}: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    stdout
}

#[test]
fn kubectl_gets_pods_network_policies_and_segment_policies() {
    let server = FakeApiServer::start().expect("fake API server");
    for ns in ["shop", "ops"] {
        server.create(&namespace(ns)).expect("namespace");
    }
    server.create(&pod("shop", "web-1", &[("app", "web"), ("tier", "front")], "node-a")).expect("pod");
    server.create(&pod("ops", "probe", &[("app", "probe")], "node-b")).expect("pod");
    server
        .create(&NetworkPolicy {
            metadata: ObjectMeta {
                name: Some("deny-all".into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector::default()),
                policy_types: Some(vec!["Ingress".into()]),
                ..NetworkPolicySpec::default()
            }),
        })
        .expect("network policy");
    server
        .create_value(json!({
            "apiVersion": "bulkhead.dev/v1", "kind": "SegmentPolicy",
            "metadata": {"name": "shop-tiers"}, "spec": {"segments": ["web"]},
        }))
        .expect("segment policy");
    let home = ScratchDir::new(&lab::netns::unique_stem("fakeapi-kubectl")).expect("scratch dir");
    let url = server.url();

    let json: Value = serde_json::from_str(&kubectl(&home, &["--server", &url, "get", "pods", "-A", "-o", "json"]))
        .expect("kubectl prints JSON");
    let pods: Vec<(&str, &str, &Value)> = json["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| {
            let m = &p["metadata"];
            (m["namespace"].as_str().unwrap_or(""), m["name"].as_str().unwrap_or(""), &m["labels"])
        })
        .collect();
    assert_eq!(
        pods,
        [("ops", "probe", &json!({"app": "probe"})), ("shop", "web-1", &json!({"app": "web", "tier": "front"}))]
    );

    let selected = kubectl(&home, &["--server", &url, "get", "pods", "-A", "-l", "tier=front", "-o", "name"]);
    assert_eq!(selected.trim(), "pod/web-1");

    let policies = kubectl(&home, &["--server", &url, "get", "networkpolicies", "-A"]);
    let row = policies.lines().find(|l| l.contains("deny-all")).unwrap_or_else(|| panic!("no deny-all in\n{policies}"));
    assert!(row.starts_with("shop "), "{policies}");
    assert!(kubectl(&home, &["--server", &url, "get", "netpol", "-n", "ops"]).trim().is_empty());

    let segments = kubectl(&home, &["--server", &url, "get", "segmentpolicies.bulkhead.dev"]);
    assert!(segments.lines().any(|l| l.starts_with("shop-tiers ")), "{segments}");
    let one = kubectl(&home, &["--server", &url, "get", "segpol", "shop-tiers", "-o", "jsonpath={.spec.segments[0]}"]);
    assert_eq!(one, "web");

    // Through the kubeconfig the server writes, as `--kubeconfig` for the daemon.
    let kubeconfig = home.0.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let kubeconfig = kubeconfig.to_str().expect("UTF-8 path");
    let namespaces = kubectl(&home, &["--kubeconfig", kubeconfig, "get", "namespaces", "-o", "name"]);
    assert!(namespaces.lines().any(|l| l == "namespace/shop"), "{namespaces}");
    let default_ns = kubectl(&home, &["--kubeconfig", kubeconfig, "get", "pods", "-o", "name"]);
    assert!(default_ns.trim().is_empty(), "the kubeconfig's namespace is default: {default_ns}");
}

/// A raw HTTP/1.1 watch on its own connection (closed after the response):
/// request line, headers, then one JSON event per line
/// out of the chunked body.
struct RawWatch {
    reader: BufReader<TcpStream>,
    pending: Vec<u8>,
    ended: bool,
}

impl RawWatch {
    fn open(server: &FakeApiServer, path_and_query: &str) -> Self {
        let mut stream = TcpStream::connect(server.address()).expect("connect");
        stream.set_read_timeout(Some(DEADLINE)).expect("read timeout");
        write!(
            stream,
            "GET {path_and_query} HTTP/1.1\r\nHost: fake\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status).expect("status line");
        assert!(status.starts_with("HTTP/1.1 200"), "{path_and_query}: {status}");
        let mut chunked = false;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).expect("header");
            if header == "\r\n" {
                break;
            }
            chunked |= header.to_ascii_lowercase().starts_with("transfer-encoding: chunked");
        }
        assert!(chunked, "a watch streams with chunked transfer encoding");
        Self { reader, pending: Vec::new(), ended: false }
    }

    /// The next event, or `None` once the server ended the body.
    fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(newline) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=newline).collect();
                return Some(serde_json::from_slice(&line).expect("one JSON event per line"));
            }
            if self.ended {
                assert!(self.pending.is_empty(), "a partial event before the end");
                return None;
            }
            let mut size = String::new();
            self.reader.read_line(&mut size).expect("chunk size");
            let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).expect("chunk");
            chunk.truncate(size);
            self.pending.extend(chunk);
            self.ended = size == 0;
        }
    }
}

impl RawWatch {
    /// Everything left on the connection, raw, until the server closes it.
    fn rest(mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).expect("read to the end");
        rest
    }
}

#[test]
fn raw_watches_cut_after_a_lifetime_cleanly_or_mid_body() {
    let server = FakeApiServer::start().expect("fake API server");
    let lifetime = Some(Duration::from_millis(300));
    let path = format!("/api/v1/pods?watch=true&resourceVersion={}", server.resource_version());
    server.set_chaos(Chaos { watch_lifetime: lifetime, ..Chaos::default() });
    let clean = RawWatch::open(&server, &path);
    // A clean cut ends the chunked body with its last (empty) chunk.
    assert_eq!(clean.rest(), b"0\r\n\r\n");
    server.set_chaos(Chaos { watch_lifetime: lifetime, abort_cut_watches: true, ..Chaos::default() });
    let aborted = RawWatch::open(&server, &path);
    assert!(aborted.rest().is_empty(), "an aborted watch closes the connection without the last chunk");
    assert_eq!(server.stats().cut_watches, 2);
}

fn event_rv(event: &Value) -> u64 {
    event["object"]["metadata"]["resourceVersion"].as_str().and_then(|rv| rv.parse().ok()).expect("resourceVersion")
}

#[test]
fn raw_watch_from_a_compacted_resource_version_gets_one_410() {
    let server = FakeApiServer::start().expect("fake API server");
    let old = server.resource_version();
    server.create(&namespace("shop")).expect("namespace");
    server.compact();
    let mut watch = RawWatch::open(&server, &format!("/api/v1/pods?watch=true&resourceVersion={old}"));
    let event = watch.next().expect("an ERROR event");
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["kind"], "Status");
    assert_eq!(event["object"]["code"], 410);
    assert_eq!(event["object"]["reason"], "Expired");
    assert!(watch.next().is_none(), "the watch ends after the ERROR");

    // From the compaction point on, watching works again.
    let now = server.resource_version();
    let mut watch = RawWatch::open(&server, &format!("/api/v1/namespaces/shop/pods?watch=1&resourceVersion={now}"));
    server.create(&pod("shop", "a", &[], "node-a")).expect("pod");
    let event = watch.next().expect("ADDED");
    assert_eq!((event["type"].as_str(), event["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some("a")));
}

#[test]
fn raw_watch_bookmarks_only_when_asked_for() {
    let server = FakeApiServer::start().expect("fake API server");
    let start = server.resource_version();
    let mut with =
        RawWatch::open(&server, &format!("/api/v1/pods?watch=true&resourceVersion={start}&allowWatchBookmarks=true"));
    let mut without =
        RawWatch::open(&server, &format!("/api/v1/pods?watch=true&resourceVersion={start}&timeoutSeconds=2"));
    // No pod changes: only the global resourceVersion moves.
    server.create(&namespace("elsewhere")).expect("namespace");
    let moved = server.resource_version();
    let bookmark = with.next().expect("a BOOKMARK");
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(
        (bookmark["object"]["kind"].as_str(), bookmark["object"]["apiVersion"].as_str()),
        (Some("Pod"), Some("v1"))
    );
    assert_eq!(event_rv(&bookmark), moved);
    // Not asked for: the stream ends at timeoutSeconds with nothing in it.
    let started = Instant::now();
    assert!(without.next().is_none(), "no bookmark without allowWatchBookmarks");
    assert!(started.elapsed() < Duration::from_secs(10), "timeoutSeconds ends the watch");
}

#[test]
fn raw_watch_resource_versions_strictly_increase_even_reordered() {
    let server = FakeApiServer::start().expect("fake API server");
    server.create(&namespace("shop")).expect("namespace");
    server.set_chaos(Chaos { reorder: true, jitter: Duration::from_millis(5), seed: 3, ..Chaos::default() });
    let start = server.resource_version();
    let mut watch =
        RawWatch::open(&server, &format!("/api/v1/pods?watch=true&resourceVersion={start}&allowWatchBookmarks=true"));
    churn(&server, "shop", 0, 12);
    // The last change is not a pod's: only a BOOKMARK can bring the stream there.
    server.create(&namespace("last")).expect("namespace");
    let last = server.resource_version();
    let mut seen = Vec::new();
    let mut kinds = BTreeMap::<String, u32>::new();
    while seen.last().is_none_or(|&rv| rv < last) {
        let event = watch.next().expect("events until the last change");
        *kinds.entry(event["type"].as_str().unwrap_or("").to_owned()).or_default() += 1;
        seen.push(event_rv(&event));
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "resourceVersions out of order: {seen:?}");
    assert_eq!(kinds.get("ADDED"), Some(&12));
    assert_eq!(kinds.get("MODIFIED"), Some(&6));
    assert_eq!(kinds.get("DELETED"), Some(&4));
    assert!(kinds.contains_key("BOOKMARK"));
}

#[test]
fn raw_streaming_list_ends_its_initial_events_with_a_bookmark() {
    let server = FakeApiServer::start().expect("fake API server");
    server.create(&namespace("shop")).expect("namespace");
    for name in ["a", "b", "c"] {
        server.create(&pod("shop", name, &[("app", "web")], "node-a")).expect("pod");
    }
    server.create(&pod("shop", "other", &[("app", "db")], "node-a")).expect("pod");
    let at = server.resource_version();
    let mut watch = RawWatch::open(
        &server,
        "/api/v1/namespaces/shop/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan\
         &allowWatchBookmarks=true&labelSelector=app%3Dweb",
    );
    let mut names = Vec::new();
    let end = loop {
        let event = watch.next().expect("initial events");
        if event["type"] == "BOOKMARK" {
            break event;
        }
        assert_eq!(event["type"], "ADDED");
        names.push(event["object"]["metadata"]["name"].as_str().unwrap_or("").to_owned());
    };
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
    assert_eq!(event_rv(&end), at);
    // A relabel out of the selection is a DELETED for this watch.
    let mut a: Pod = server.get(Some("shop"), "a").expect("get").expect("a");
    a.metadata.labels = Some(BTreeMap::from([("app".into(), "db".into())]));
    server.update(&a).expect("update");
    let event = watch.next().expect("event");
    assert_eq!((event["type"].as_str(), event["object"]["metadata"]["name"].as_str()), (Some("DELETED"), Some("a")));
}

/// One plain request on its own connection: status code, headers, body.
fn raw_request(server: &FakeApiServer, method: &str, path: &str) -> (u16, String, Value) {
    let mut stream = TcpStream::connect(server.address()).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        .expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("response");
    let text = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers end");
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status code");
    (code, head.to_ascii_lowercase(), serde_json::from_str(body).expect("JSON body"))
}

#[test]
fn raw_failures_are_status_objects() {
    let server = FakeApiServer::start().expect("fake API server");
    server.set_chaos(Chaos { fail_next: 1, fail_with: FailWith::TooManyRequests, ..Chaos::default() });
    let (code, head, body) = raw_request(&server, "GET", "/api/v1/pods");
    assert_eq!((code, body["kind"].as_str(), body["code"].as_u64()), (429, Some("Status"), Some(429)));
    assert!(head.contains("retry-after: 1"), "{head}");
    server.set_chaos(Chaos { fail_next: 1, ..Chaos::default() });
    let (code, _, body) = raw_request(&server, "GET", "/api/v1/pods");
    assert_eq!((code, body["reason"].as_str()), (500, Some("InternalError")));
    // The next one goes through: `fail_next` counts down.
    let (code, head, body) = raw_request(&server, "GET", "/api/v1/pods");
    assert_eq!((code, body["kind"].as_str()), (200, Some("PodList")));
    assert!(head.contains("content-type: application/json"), "{head}");
    assert_eq!(server.stats().injected_failures, 2);

    let (code, _, body) = raw_request(&server, "POST", "/api/v1/namespaces/default/pods");
    assert_eq!((code, body["reason"].as_str()), (405, Some("MethodNotAllowed")));
    let (code, _, body) = raw_request(&server, "GET", "/apis/bulkhead.dev/v1/namespaces/default/segmentpolicies");
    assert_eq!((code, body["reason"].as_str()), (404, Some("NotFound")), "SegmentPolicy is cluster-scoped");
    let (code, _, body) = raw_request(&server, "GET", "/api/v1/pods?labelSelector=a%20in%20(b");
    assert_eq!((code, body["reason"].as_str()), (400, Some("BadRequest")));
    let (code, _, body) = raw_request(&server, "GET", "/apis/bulkhead.dev/v1");
    assert_eq!(code, 200);
    assert_eq!(body["resources"][0]["name"], "segmentpolicies");
    assert_eq!(body["resources"][0]["namespaced"], false);
}

#[test]
fn a_socket_bound_by_the_caller_and_a_short_history() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    let options = Options { history_limit: 5, ..Options::default() };
    let server = FakeApiServer::start_on(listener, options).expect("fake API server");
    assert_eq!(server.address(), address);
    server.create(&namespace("shop")).expect("namespace");
    let start = server.resource_version();
    for i in 0..6 {
        server.create(&pod("shop", &format!("p{i}"), &[], "node-a")).expect("pod");
    }
    // Six events past `start` with five kept: the first is forgotten.
    let mut watch = RawWatch::open(&server, &format!("/api/v1/pods?watch=true&resourceVersion={start}"));
    let event = watch.next().expect("ERROR");
    assert_eq!((event["type"].as_str(), event["object"]["code"].as_u64()), (Some("ERROR"), Some(410)));
    let mut watch = RawWatch::open(&server, &format!("/api/v1/pods?watch=true&resourceVersion={}", start + 1));
    let names: Vec<String> = (0..5)
        .map(|_| watch.next().expect("event")["object"]["metadata"]["name"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(names, ["p1", "p2", "p3", "p4", "p5"]);
}
