//! The Kubernetes API as a policy source (`bulkhead run --kubernetes`).
//!
//! One kube-rs watcher per kind: `Namespaces`, `Pods`, `NetworkPolicies`
//! and the `SegmentPolicy` custom resource. Each object is a source of its
//! own in the engine, named `kubernetes:<plural>/[<namespace>/]<name>`
//! ([`source_name`]), holding the object as JSON: the engine reads it
//! exactly as it reads a policy file of Kubernetes objects (`policy`'s
//! `kubernetes` module), so a file snapshot and the live cluster mean the
//! same, and a pod that starts costs one identity added, never a recompile.
//!
//! Only what connectivity depends on is kept of an object (a pod's labels,
//! addresses and named ports; a namespace's labels; a policy's spec), and
//! the engine holds it. Each watcher also feeds a kube-rs reflector whose
//! store keeps what names each object (name, namespace, uid,
//! resourceVersion; [`Stores`]): a refusal is reported on the object by
//! its uid, which `kubectl describe` finds events by, and a store of whole
//! objects would hold every pod a second time. What each source last gave
//! is remembered by digest, so an object the API repeats unchanged (a
//! resync, a duplicate event, a status change that moves no address)
//! changes nothing.
//!
//! A watcher's list (its first, and each after a lost watch or a
//! `410 Gone`) arrives as one batch, ending with the objects it no longer
//! lists removed. While a watcher fails it retries with backoff and the
//! daemon keeps enforcing what it gave last.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{Hash as _, Hasher as _};
use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt as _};
use policy::engine::{Contents, SourceChange};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::crd::SegmentPolicy;

/// Where the client finds the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterConfig {
    /// In the cluster: the pod's service account; outside it, the
    /// kubeconfig `KUBECONFIG` or `~/.kube/config` names.
    Infer,
    /// This kubeconfig file (its current context).
    Kubeconfig(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("cannot read the kubeconfig {path}: {source}; check the path and that it is a kubeconfig")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "cannot find the Kubernetes API: {0}; inside a cluster, run in a pod with a service account, outside one, pass --kubeconfig FILE"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A client for `config`.
///
/// # Errors
/// If the kubeconfig cannot be read, or no configuration is found.
pub async fn client(config: &ClusterConfig) -> Result<Client, KubernetesError> {
    let config = match config {
        ClusterConfig::Infer => kube::Config::infer().await.map_err(KubernetesError::Infer)?,
        ClusterConfig::Kubeconfig(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|source| KubernetesError::Kubeconfig { path: path.clone(), source })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| KubernetesError::Kubeconfig { path: path.clone(), source })?
        }
    };
    Client::try_from(config).map_err(KubernetesError::Client)
}

/// The kinds watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
    SegmentPolicy,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy, Kind::SegmentPolicy];

    /// The resource's plural, as the API and RBAC name it.
    #[must_use]
    pub const fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Pod => "pods",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::SegmentPolicy => "segmentpolicies",
        }
    }

    /// The resource's API group (`""` for the core group).
    #[must_use]
    pub const fn group(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::Pod => "",
            Kind::NetworkPolicy => "networking.k8s.io",
            Kind::SegmentPolicy => "bulkhead.dev",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.plural())
    }
}

/// What the watchers ask of the API server for each kind, as RBAC names
/// it: a list (the first, each relist, and a failing kind's probe) and a
/// watch. Nothing is read one object at a time, and nothing is written.
pub const VERBS: [&str; 2] = ["list", "watch"];

/// Every (verb, API group, resource) the watchers call, as RBAC names them:
/// [`VERBS`] on each [`Kind`].
pub fn watch_access() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    Kind::ALL.into_iter().flat_map(|kind| VERBS.into_iter().map(move |verb| (verb, kind.group(), kind.plural())))
}

/// What the daemon writes: an `events.k8s.io` `Event` on each object it
/// refuses (as RBAC names it). Each node writes its own events, so no two
/// nodes ever write one object.
pub const EVENT_ACCESS: (&str, &str, &str) = ("create", "events.k8s.io", "events");

/// What every engine source of this module's is named with.
pub const SOURCE_PREFIX: &str = "kubernetes:";

/// The engine source name of one object.
#[must_use]
pub fn source_name(kind: Kind, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(namespace) => format!("{SOURCE_PREFIX}{}/{namespace}/{name}", kind.plural()),
        None => format!("{SOURCE_PREFIX}{}/{name}", kind.plural()),
    }
}

/// Whether an engine source is an object of the cluster's.
#[must_use]
pub fn is_cluster_source(name: &str) -> bool {
    name.starts_with(SOURCE_PREFIX)
}

/// What the watchers tell the daemon.
#[derive(Debug)]
pub enum Report {
    /// Objects changed: each one's source, with its new text or removed.
    Changes(Vec<SourceChange>),
    /// A kind's watcher listed every object (its first list, or a relist);
    /// the changes of that list came just before.
    Listed(Kind),
    /// A kind's watcher failed. It retries with backoff; what it gave last
    /// stays enforced.
    Down { kind: Kind, reason: String },
    /// A kind's watcher works again after being down.
    Up(Kind),
    /// A kind's watcher has given everything up to this resourceVersion
    /// (the changes it implies came before).
    Version { kind: Kind, version: u64 },
}

/// An object the policy refused, to be reported on the object.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The engine source: `kubernetes:<plural>/[<namespace>/]<name>`.
    pub source: String,
    pub problems: Vec<String>,
}

/// The object a source name stands for: (kind, apiVersion, kind's name,
/// namespace, name).
fn object_of(source: &str) -> Option<(Kind, String, &'static str, Option<String>, String)> {
    let rest = source.strip_prefix(SOURCE_PREFIX)?;
    let (plural, rest) = rest.split_once('/')?;
    let kind = Kind::ALL.into_iter().find(|kind| kind.plural() == plural)?;
    let (namespace, name) = match rest.split_once('/') {
        Some((namespace, name)) => (Some(namespace.to_owned()), name.to_owned()),
        None => (None, rest.to_owned()),
    };
    let (api_version, kind_name) = match kind {
        Kind::Namespace => ("v1".to_owned(), "Namespace"),
        Kind::Pod => ("v1".to_owned(), "Pod"),
        Kind::NetworkPolicy => ("networking.k8s.io/v1".to_owned(), "NetworkPolicy"),
        Kind::SegmentPolicy => (policy::CRD_API_VERSION.to_owned(), policy::KIND),
    };
    Some((kind, api_version, kind_name, namespace, name))
}

/// The reflectors' stores: every object the watchers have seen, cut down
/// to what names it (name, namespace, uid, resourceVersion).
#[derive(Clone)]
pub struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    network_policies: Store<NetworkPolicy>,
    segment_policies: Store<DynamicObject>,
}

/// The watchers' ends of the [`Stores`].
pub struct Writers {
    namespaces: Writer<Namespace>,
    pods: Writer<Pod>,
    network_policies: Writer<NetworkPolicy>,
    segment_policies: Writer<DynamicObject>,
}

/// Empty stores, and the writers [`watch_all`] fills them with.
#[must_use]
pub fn reflectors() -> (Stores, Writers) {
    let writers = Writers {
        namespaces: Writer::default(),
        pods: Writer::default(),
        network_policies: Writer::default(),
        segment_policies: Writer::new(ApiResource::erase::<SegmentPolicy>(&())),
    };
    let stores = Stores {
        namespaces: writers.namespaces.as_reader(),
        pods: writers.pods.as_reader(),
        network_policies: writers.network_policies.as_reader(),
        segment_policies: writers.segment_policies.as_reader(),
    };
    (stores, writers)
}

impl Stores {
    /// The uid and resourceVersion of the object `kind` `namespace/name`,
    /// as last seen.
    #[must_use]
    pub fn identify(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Option<(String, Option<String>)> {
        fn meta<K: Resource>(object: &K) -> Option<(String, Option<String>)> {
            Some((object.meta().uid.clone()?, object.meta().resource_version.clone()))
        }
        fn key<K: kube::runtime::reflector::Lookup>(mut key: ObjectRef<K>, namespace: Option<&str>) -> ObjectRef<K>
        where
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            key.namespace = namespace.map(str::to_owned);
            key
        }
        match kind {
            Kind::Namespace => meta(&*self.namespaces.get(&key(ObjectRef::new(name), namespace))?),
            Kind::Pod => meta(&*self.pods.get(&key(ObjectRef::new(name), namespace))?),
            Kind::NetworkPolicy => meta(&*self.network_policies.get(&key(ObjectRef::new(name), namespace))?),
            Kind::SegmentPolicy => {
                let resource = ApiResource::erase::<SegmentPolicy>(&());
                meta(&*self.segment_policies.get(&key(ObjectRef::new_with(name, resource), namespace))?)
            }
        }
    }
}

/// What a reflector keeps of an object: what names it.
fn naming<K: Resource>(object: &K, mut empty: K) -> K {
    let meta = object.meta();
    *empty.meta_mut() = kube::api::ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..kube::api::ObjectMeta::default()
    };
    empty
}

fn naming_typed<K: Resource + Default>(object: &K) -> K {
    naming(object, K::default())
}

fn naming_dynamic(object: &DynamicObject) -> DynamicObject {
    naming(
        object,
        DynamicObject { types: object.types.clone(), metadata: kube::api::ObjectMeta::default(), data: Value::Null },
    )
}

/// The longest note an event carries (the API server's limit is 1 kB).
const NOTE_LIMIT: usize = 1000;

/// Reports each refusal as a `Warning` event on the object (for a
/// cluster-scoped one, in namespace `default`, as Kubernetes does),
/// written by this node (`reportingInstance`), until `refusals` closes.
/// An event the API does not take is logged, not retried: the log and
/// `bulkhead_kubernetes_objects_rejected` still say it.
pub async fn report_refusals(
    client: Client,
    node: String,
    stores: Stores,
    mut refusals: tokio::sync::mpsc::UnboundedReceiver<Refusal>,
) {
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::events::v1::Event as ApiEvent;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    while let Some(refusal) = refusals.recv().await {
        let Some((kind, api_version, kind_name, namespace, name)) = object_of(&refusal.source) else { continue };
        // `kubectl describe` finds an object's events by its uid.
        let (uid, resource_version) = stores.identify(kind, namespace.as_deref(), &name).unzip();
        let mut message = format!("refused by {node}, not enforced: {}", refusal.problems.join("; "));
        if message.len() > NOTE_LIMIT {
            let mut end = NOTE_LIMIT;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let now = k8s_openapi::jiff::Timestamp::now();
        let events_namespace = namespace.clone().unwrap_or_else(|| "default".to_owned());
        let event = ApiEvent {
            metadata: ObjectMeta {
                name: Some(format!("{name}.{node}.{:x}", now.as_nanosecond())),
                namespace: Some(events_namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some("Warning".to_owned()),
            reason: Some("PolicyRefused".to_owned()),
            action: Some("Enforce".to_owned()),
            note: Some(message),
            regarding: Some(ObjectReference {
                api_version: Some(api_version),
                kind: Some(kind_name.to_owned()),
                namespace,
                name: Some(name),
                uid,
                resource_version: resource_version.flatten(),
                ..ObjectReference::default()
            }),
            reporting_controller: Some("bulkhead.dev/enforcer".to_owned()),
            reporting_instance: Some(node.clone()),
            ..ApiEvent::default()
        };
        let events: Api<ApiEvent> = Api::namespaced(client.clone(), &events_namespace);
        if let Err(error) = events.create(&kube::api::PostParams::default(), &event).await {
            log::warn!("kubernetes: reporting the refusal of {} on it failed: {error}", refusal.source);
        }
    }
}

/// Watches every kind until `report` says the receiver is gone.
pub async fn watch_all(
    client: Client,
    writers: Writers,
    report: impl Fn(Report) -> bool + Clone + Send + Sync + 'static,
) {
    let Writers { namespaces, pods, network_policies, segment_policies } = writers;
    let tasks = [
        tokio::spawn(watch(
            Api::<Namespace>::all(client.clone()),
            Kind::Namespace,
            (namespace_json, naming_typed, namespaces),
            report.clone(),
        )),
        tokio::spawn(watch(Api::<Pod>::all(client.clone()), Kind::Pod, (pod_json, naming_typed, pods), report.clone())),
        tokio::spawn(watch(
            Api::<NetworkPolicy>::all(client.clone()),
            Kind::NetworkPolicy,
            (network_policy_json, naming_typed, network_policies),
            report.clone(),
        )),
        // Untyped: a custom resource the API server holds may still be one
        // the policy parser refuses, and that refusal, with its positions,
        // is what the object's owner needs (a typed watcher would fail the
        // whole list on it instead).
        tokio::spawn(watch(
            Api::<DynamicObject>::all_with(client, &ApiResource::erase::<SegmentPolicy>(&())),
            Kind::SegmentPolicy,
            (segment_policy_json, naming_dynamic, segment_policies),
            report,
        )),
    ];
    for task in tasks {
        let _ = task.await;
    }
}

/// How often a failing kind is asked whether it answers again.
const PROBE_WHILE_DOWN: Duration = Duration::from_secs(1);

/// The longest a watch stays open before it is renewed (the API server
/// ends it by then anyway); a renewal resumes from the last version seen.
const WATCH_TIMEOUT: Duration = Duration::from_secs(290);

/// How a watcher keeps one kind: its JSON for the engine, what the
/// reflector keeps of it, and the reflector's writer.
type Keeping<K> = (fn(&K) -> Value, fn(&K) -> K, Writer<K>);

/// One kind's watcher: its events as engine sources, and its reflector's
/// store kept, until `report` says the receiver is gone.
async fn watch<K>(api: Api<K>, kind: Kind, keeping: Keeping<K>, report: impl Fn(Report) -> bool)
where
    K: Resource + kube::runtime::reflector::Lookup + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
    <K as kube::runtime::reflector::Lookup>::DynamicType: Eq + std::hash::Hash + Clone,
{
    let (to_json, naming, mut writer) = keeping;
    let config = watcher::Config::default().timeout(u32::try_from(WATCH_TIMEOUT.as_secs()).unwrap_or(290));
    let probe = api.clone();
    let stream = watcher::watcher(api, config).default_backoff();
    futures_util::pin_mut!(stream);
    let mut given = Given::default();
    let mut relisted: Option<(HashSet<String>, Vec<SourceChange>)> = None;
    let mut listed_version: Option<u64> = None;
    let mut down = false;
    loop {
        // A watch that resumes after a failure says nothing until the
        // cluster changes: while down, the kind is also listed (one item)
        // now and then, and its answering is what says the source is back.
        let next = if down {
            tokio::select! {
                next = stream.next() => next,
                () = tokio::time::sleep(PROBE_WHILE_DOWN) => {
                    if probe.list(&ListParams::default().limit(1)).await.is_ok() {
                        down = false;
                        if !report(Report::Up(kind)) {
                            return;
                        }
                    }
                    continue;
                }
            }
        } else {
            stream.next().await
        };
        let Some(event) = next else { return };
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                down = true;
                if !report(Report::Down { kind, reason: error.to_string() }) {
                    return;
                }
                continue;
            }
        };
        if std::mem::take(&mut down) && !report(Report::Up(kind)) {
            return;
        }
        writer.apply_watcher_event(&match &event {
            Event::Init => Event::Init,
            Event::InitApply(object) => Event::InitApply(naming(object)),
            Event::InitDone => Event::InitDone,
            Event::Apply(object) => Event::Apply(naming(object)),
            Event::Delete(object) => Event::Delete(naming(object)),
        });
        let sent = match event {
            Event::Init => {
                relisted = Some((HashSet::new(), Vec::new()));
                listed_version = None;
                true
            }
            Event::InitApply(object) => {
                listed_version = listed_version.max(version_of(&object));
                let (source, text) = describe(kind, &object, to_json);
                let (seen, changes) = relisted.get_or_insert_with(Default::default);
                seen.insert(source.clone());
                changes.extend(given.give(source, Some(text)));
                true
            }
            Event::InitDone => {
                let (seen, mut changes) = relisted.take().unwrap_or_default();
                changes.extend(given.keep_only(&seen));
                (changes.is_empty() || report(Report::Changes(changes)))
                    && listed_version.take().is_none_or(|version| report(Report::Version { kind, version }))
                    && report(Report::Listed(kind))
            }
            Event::Apply(object) => {
                let (source, text) = describe(kind, &object, to_json);
                let change = given.give(source, Some(text));
                (change.is_none() || report(Report::Changes(change.into_iter().collect())))
                    && version_of(&object).is_none_or(|version| report(Report::Version { kind, version }))
            }
            Event::Delete(object) => {
                let (source, _) = describe(kind, &object, to_json);
                let change = given.give(source, None);
                (change.is_none() || report(Report::Changes(change.into_iter().collect())))
                    && version_of(&object).is_none_or(|version| report(Report::Version { kind, version }))
            }
        };
        if !sent {
            return;
        }
    }
}

/// An object's resourceVersion, where it is a number (etcd's revision, as
/// every API server built on etcd gives it).
fn version_of<K: Resource>(object: &K) -> Option<u64> {
    object.meta().resource_version.as_deref()?.parse().ok()
}

/// What this watcher gave each source last, by digest.
#[derive(Default)]
struct Given {
    digests: HashMap<String, u64>,
}

impl Given {
    /// The change that gives `source` the text `text` (`None`: removed),
    /// or nothing if it has it already.
    fn give(&mut self, source: String, text: Option<String>) -> Option<SourceChange> {
        let Some(text) = text else {
            self.digests.remove(&source)?;
            return Some(SourceChange { source, contents: Contents::Removed });
        };
        let digest = digest(&text);
        if self.digests.insert(source.clone(), digest) == Some(digest) {
            return None;
        }
        Some(SourceChange { source, contents: Contents::Text(text) })
    }

    /// Removes every source a list did not name again.
    fn keep_only(&mut self, listed: &HashSet<String>) -> Vec<SourceChange> {
        let gone: Vec<String> = self.digests.keys().filter(|source| !listed.contains(*source)).cloned().collect();
        gone.into_iter().filter_map(|source| self.give(source, None)).collect()
    }
}

fn digest(text: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// An object's source name and the JSON text the engine reads.
fn describe<K: Resource>(kind: Kind, object: &K, to_json: fn(&K) -> Value) -> (String, String) {
    let meta = object.meta();
    let name = meta.name.as_deref().unwrap_or_default();
    let source = source_name(kind, meta.namespace.as_deref(), name);
    (source, to_json(object).to_string())
}

/// `value` as JSON, or null for what cannot be (no k8s-openapi type fails).
fn json_of(value: &impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// `metadata` cut to what policy reads: name, namespace, labels.
fn metadata<K: Resource>(object: &K) -> Value {
    let meta = object.meta();
    let mut kept = Map::new();
    kept.insert("name".to_owned(), json!(object.name_any()));
    if let Some(namespace) = &meta.namespace {
        kept.insert("namespace".to_owned(), json!(namespace));
    }
    if let Some(labels) = meta.labels.as_ref().filter(|labels| !labels.is_empty()) {
        kept.insert("labels".to_owned(), json_of(labels));
    }
    Value::Object(kept)
}

fn namespace_json(namespace: &Namespace) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata(namespace)})
}

/// A pod cut to its labels, addresses, phase, host networking and the
/// containers' ports.
fn pod_json(pod: &Pod) -> Value {
    let spec = pod.spec.as_ref();
    let containers: Vec<Value> = spec
        .map(|spec| &spec.containers)
        .into_iter()
        .flatten()
        .map(|container| json!({"name": container.name, "ports": json_of(&container.ports)}))
        .collect();
    let status = pod.status.as_ref();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata(pod),
        "spec": {
            "hostNetwork": spec.and_then(|spec| spec.host_network).unwrap_or(false),
            "containers": containers,
        },
        "status": {
            "phase": status.and_then(|status| status.phase.clone()),
            "podIP": status.and_then(|status| status.pod_ip.clone()),
            "podIPs": json_of(&status.and_then(|status| status.pod_ips.clone())),
        },
    })
}

fn network_policy_json(policy: &NetworkPolicy) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(policy),
        "spec": json_of(&policy.spec),
    })
}

/// The custom resource as the policy file it is: its metadata cut to the
/// name, which the policy format takes as the document's name.
fn segment_policy_json(policy: &DynamicObject) -> Value {
    json!({
        "apiVersion": policy::CRD_API_VERSION,
        "kind": policy::KIND,
        "metadata": {"name": policy.name_any()},
        "spec": policy.data.get("spec").cloned().unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_names_its_object() {
        assert_eq!(
            object_of("kubernetes:pods/shop/web-1"),
            Some((Kind::Pod, "v1".into(), "Pod", Some("shop".into()), "web-1".into()))
        );
        assert_eq!(
            object_of("kubernetes:segmentpolicies/base"),
            Some((Kind::SegmentPolicy, "bulkhead.dev/v1".into(), "SegmentPolicy", None, "base".into()))
        );
        assert_eq!(object_of("/etc/bulkhead/policy/a.yaml"), None);
    }

    #[test]
    fn sources_are_named_by_kind_namespace_and_name() {
        assert_eq!(source_name(Kind::Pod, Some("shop"), "web-1"), "kubernetes:pods/shop/web-1");
        assert_eq!(source_name(Kind::Namespace, None, "shop"), "kubernetes:namespaces/shop");
        assert!(is_cluster_source("kubernetes:segmentpolicies/base"));
        assert!(!is_cluster_source("/etc/bulkhead/policy/base.yaml"));
    }

    #[test]
    fn an_object_given_again_unchanged_changes_nothing() {
        let mut given = Given::default();
        assert!(given.give("a".into(), Some("{}".into())).is_some());
        assert!(given.give("a".into(), Some("{}".into())).is_none());
        assert!(given.give("a".into(), Some("{\"x\":1}".into())).is_some());
        assert!(given.give("b".into(), None).is_none(), "never given: nothing to remove");
        assert!(given.give("c".into(), Some("{}".into())).is_some());
        let gone = given.keep_only(&HashSet::from(["a".to_owned()]));
        assert_eq!(gone.len(), 1);
        assert!(matches!(&gone[0], SourceChange { source, contents: Contents::Removed } if source == "c"));
    }

    /// A pod as the API serves it reads, through the engine's file path, as
    /// the identity of its labels, addresses and named ports; everything
    /// else it carries is cut before.
    #[test]
    fn a_pod_reads_as_its_identity() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"},
                         "managedFields": [{"manager": "kubelet"}], "annotations": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "web:1",
                                      "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.7", "podIPs": [{"ip": "10.0.0.7"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let (source, text) = describe(Kind::Pod, &pod, pod_json);
        assert_eq!(source, "kubernetes:pods/shop/web-1");
        assert!(!text.contains("managedFields") && !text.contains("annotations") && !text.contains("web:1"), "{text}");
        let parsed = policy::parse_str(&source, &text).unwrap();
        assert_eq!(parsed.identities.len(), 1);
        let identity = &parsed.identities[0];
        assert_eq!(identity.name, "shop/{app=web}[http=8080/tcp]");
        assert_eq!(identity.pod.as_ref().unwrap().name, "web-1");
        assert_eq!(identity.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(identity.addresses[0].net.to_string(), "10.0.0.7/32");
        assert_eq!(identity.pod.as_ref().unwrap().ports[0].name, "http");
        assert!(parsed.notes.is_empty(), "{:?}", parsed.notes);
    }

    /// The watcher against kube-rs's mock service: a list, a watch that
    /// changes and deletes, a `410 Gone` and the relist after it. Each
    /// step's reports are what the engine must be told, no more.
    #[tokio::test]
    async fn the_watcher_turns_lists_watches_and_relists_into_changes() {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let (sender, mut reports) = tokio::sync::mpsc::unbounded_channel();
        let (stores, writers) = reflectors();
        let keeping = (pod_json as fn(&Pod) -> Value, naming_typed as fn(&Pod) -> Pod, writers.pods);
        let watcher =
            tokio::spawn(watch(Api::<Pod>::all(client), Kind::Pod, keeping, move |report| sender.send(report).is_ok()));
        // What the reflector's store names an object by.
        let known = |name: &str| stores.identify(Kind::Pod, Some("shop"), name);
        let pod = |name: &str, version: &str, app: &str, ip: &str| {
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": "shop", "resourceVersion": version, "labels": {"app": app},
                                "uid": format!("uid-{name}")},
                   "status": {"phase": "Running", "podIP": ip}})
        };
        let list = |version: &str, items: Vec<Value>| json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": version}, "items": items});
        let mut answer = async |expect: &str, body: String| {
            let (request, respond) = tokio::time::timeout(Duration::from_secs(10), server.next_request())
                .await
                .expect("the watcher asks")
                .expect("a request");
            let query = request.uri().query().unwrap_or_default().to_owned();
            assert_eq!(query.contains("watch=true"), expect == "watch", "{expect}: {}", request.uri());
            respond.send_response(Response::builder().body(Body::from(body.into_bytes())).unwrap());
        };
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(10), reports.recv()).await.expect("a report").expect("open")
        };
        let sources = |report: Report| match report {
            Report::Changes(changes) => {
                changes.into_iter().map(|c| (c.source, matches!(c.contents, Contents::Removed))).collect::<Vec<_>>()
            }
            other => panic!("expected changes, got {other:?}"),
        };

        // The first list: both pods, their version, listed.
        let first = list("5", vec![pod("a", "3", "web", "10.0.0.1"), pod("b", "4", "db", "10.0.0.2")]);
        answer("list", first.to_string()).await;
        let listed = sources(next().await);
        assert_eq!(listed, [("kubernetes:pods/shop/a".into(), false), ("kubernetes:pods/shop/b".into(), false)]);
        assert!(matches!(next().await, Report::Version { kind: Kind::Pod, version: 4 }));
        assert!(matches!(next().await, Report::Listed(Kind::Pod)));
        assert_eq!(known("a"), Some(("uid-a".into(), Some("3".into()))));
        assert_eq!(known("b"), Some(("uid-b".into(), Some("4".into()))));

        // A watch: a relabel, a deletion, and a repeat that changes nothing.
        let events = [
            json!({"type": "MODIFIED", "object": pod("a", "6", "api", "10.0.0.1")}),
            json!({"type": "MODIFIED", "object": pod("a", "6", "api", "10.0.0.1")}),
            json!({"type": "DELETED", "object": pod("b", "7", "db", "10.0.0.2")}),
        ];
        answer("watch", events.iter().map(|e| e.to_string() + "\n").collect()).await;
        assert_eq!(sources(next().await), [("kubernetes:pods/shop/a".into(), false)]);
        assert!(matches!(next().await, Report::Version { version: 6, .. }));
        assert!(matches!(next().await, Report::Version { version: 6, .. }), "the repeat: no change, its version");
        assert_eq!(sources(next().await), [("kubernetes:pods/shop/b".into(), true)]);
        assert!(matches!(next().await, Report::Version { version: 7, .. }));
        assert_eq!((known("a"), known("b")), (Some(("uid-a".into(), Some("6".into()))), None));

        // The history is gone: 410, then a relist that no longer has `a`
        // and has a new `c`.
        let gone = json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "status": "Failure",
                          "code": 410, "reason": "Expired", "message": "too old resource version: 7 (9)"}});
        answer("watch", format!("{gone}\n")).await;
        assert!(matches!(next().await, Report::Down { kind: Kind::Pod, .. }));
        // From here every list gets the new state (the relist, and the
        // probe a failing kind makes), and watches wait.
        let serving = tokio::spawn(async move {
            let mut waiting = Vec::new();
            while let Some((request, respond)) = server.next_request().await {
                if request.uri().query().unwrap_or_default().contains("watch=true") {
                    waiting.push(respond);
                } else {
                    let body = list("9", vec![pod("c", "8", "web", "10.0.0.3")]).to_string();
                    respond.send_response(Response::builder().body(Body::from(body.into_bytes())).unwrap());
                }
            }
        });
        assert!(matches!(next().await, Report::Up(Kind::Pod)));
        let relisted = sources(next().await);
        assert_eq!(relisted, [("kubernetes:pods/shop/c".into(), false), ("kubernetes:pods/shop/a".into(), true)]);
        assert!(matches!(next().await, Report::Version { version: 8, .. }));
        assert!(matches!(next().await, Report::Listed(Kind::Pod)));
        assert_eq!((known("a"), known("c")), (None, Some(("uid-c".into(), Some("8".into())))));
        watcher.abort();
        serving.abort();
    }

    #[test]
    fn a_segment_policy_reads_as_its_file() {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "bulkhead.dev/v1", "kind": "SegmentPolicy",
            "metadata": {"name": "base", "uid": "1", "resourceVersion": "7"},
            "spec": {"identities": [{"name": "db", "addresses": ["10.0.3.10"]}],
                     "rules": [{"name": "to-db", "from": [{"identity": "world"}], "to": [{"identity": "db"}]}]}
        }))
        .unwrap();
        let (_, text) = describe(Kind::SegmentPolicy, &object, segment_policy_json);
        let parsed = policy::parse_str("cr", &text).unwrap();
        assert_eq!(parsed.documents, ["base"]);
        assert_eq!(parsed.rules[0].name, "to-db");
        // What the schema would let through but the policy refuses is
        // refused with its position, as a file would be.
        let mut bad = object.clone();
        bad.data["spec"]["identities"][0]["addresses"] = json!(["10.0.3.300"]);
        let (_, text) = describe(Kind::SegmentPolicy, &bad, segment_policy_json);
        let error = policy::parse_str("cr", &text).unwrap_err().to_string();
        assert!(error.contains("10.0.3.300"), "{error}");
    }
}
