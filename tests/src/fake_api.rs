//! A fake Kubernetes API server for tests: plain HTTP on a loopback (or any
//! already-bound) socket, speaking the real wire protocol for the few
//! resources Bulkhead watches, so that kube-rs watchers, reflectors and the
//! real `kubectl` can run against it where no real API server can be installed.
//!
//! What it serves (read-only to clients; the test changes the cluster through
//! [`FakeApiServer`]'s methods):
//! - `v1` `Namespaces` (cluster-scoped) and `Pods`, `networking.k8s.io/v1`
//!   `NetworkPolicies`, and the custom resource `bulkhead.dev/v1` `SegmentPolicy`
//!   (`segmentpolicies`, cluster-scoped, stored as JSON);
//! - discovery (`/version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}[/{version}]`)
//!   in the plain (non-aggregated) form, which kubectl falls back to when the
//!   response's `Content-Type` is plain JSON;
//! - GET of one object, and lists cluster-wide or per namespace with
//!   `labelSelector`, `fieldSelector`, `limit`/`continue` pages served from
//!   one snapshot, and `resourceVersion`/`resourceVersionMatch`;
//! - watches (`watch=true`): newline-delimited JSON events in a chunked body,
//!   starting after the given resourceVersion, with BOOKMARKs when asked for,
//!   `410 Expired` ERROR events for a resourceVersion older than the kept
//!   history, streaming lists (`sendInitialEvents=true`), and `timeoutSeconds`.
//!
//! In a test: `FakeApiServer::start()` (or `start_on` with a listener bound
//! inside a network namespace), then point clients at `url()` or at the file
//! `write_kubeconfig` writes, and change the cluster with `create`, `update`
//! and `delete` (typed, for k8s-openapi types) or their `_value` forms (JSON,
//! for the custom resource). `compact()` and `disconnect_watches()` force a
//! watcher through 410 and a relist; `stats()` tells whether a mode bit.
//!
//! Every change takes the next value of one global resourceVersion counter, as
//! etcd's revision does. Deleting a namespace deletes what is in it first.
//!
//! [`Chaos`] makes the server hostile at run time: delays, cut watches,
//! injected 500/429 answers, duplicate events, and reordering. Reordering never
//! breaks what the real server guarantees (resourceVersions strictly increase
//! within one watch stream); it changes only what the protocol leaves open:
//! the order of a list's items and of a watch's initial (synthetic) ADDED
//! events, and, through a random extra delay per event, the relative order in
//! which separate watch streams (say Pods and `NetworkPolicies`) deliver changes.

mod resources;
mod selector;
mod serve;
mod store;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use self::store::Store;

/// Everything the fake server or its handle can refuse.
#[derive(Debug, thiserror::Error)]
pub enum FakeApiError {
    #[error("cannot bind the fake API server's socket: {0}")]
    Bind(#[source] std::io::Error),
    #[error("cannot start the fake API server's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot convert an object to or from JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the fake API server serves no {kind} of apiVersion {api_version:?}")]
    UnknownKind { api_version: String, kind: String },
    #[error("a {kind} needs metadata.name (the fake does not generate names)")]
    MissingName { kind: String },
    #[error("{kind} {name} is namespaced: set metadata.namespace")]
    NamespaceRequired { kind: String, name: String },
    #[error("{kind} {name} is cluster-scoped: metadata.namespace must be empty")]
    ClusterScoped { kind: String, name: String },
    #[error("namespace {namespace:?} does not exist: create it first, as the real server requires")]
    NamespaceNotFound { namespace: String },
    #[error("{kind} {namespace}/{name} already exists")]
    AlreadyExists { kind: &'static str, namespace: String, name: String },
    #[error("{kind} {namespace}/{name} does not exist")]
    NotFound { kind: &'static str, namespace: String, name: String },
    #[error("{kind} {name} was changed since resourceVersion {given} (now {stored})")]
    Conflict { kind: &'static str, name: String, given: String, stored: String },
    #[error("cannot write the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The status code an injected failure answers with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FailWith {
    /// `500 InternalError`, as a failing etcd or webhook gives.
    #[default]
    InternalError,
    /// `429 TooManyRequests` with `Retry-After: 1`, as API priority and fairness gives.
    TooManyRequests,
}

/// How hostile the server is; all off by default. Read afresh by every
/// request and every watch event, so a test can switch it while clients run.
#[derive(Debug, Clone, Default)]
pub struct Chaos {
    /// Waited before every response and before every watch event.
    pub delay: Duration,
    /// Each watch stream ends after sending this many events (bookmarks included).
    pub watch_event_limit: Option<u32>,
    /// Each watch stream ends this long after it started.
    pub watch_lifetime: Option<Duration>,
    /// A cut watch breaks the connection mid-body instead of ending the
    /// chunked body cleanly (as the real server does at `timeoutSeconds`).
    pub abort_cut_watches: bool,
    /// This percentage (0–100) of requests is answered with `fail_with`.
    pub fail_percent: u8,
    /// The next this many requests are answered with `fail_with`.
    pub fail_next: u32,
    pub fail_with: FailWith,
    /// This percentage (0–100) of watch events is sent twice.
    pub duplicate_percent: u8,
    /// Shuffle list items and initial watch events, and delay each watch event
    /// by a random extra up to `jitter`, so streams interleave differently.
    pub reorder: bool,
    pub jitter: Duration,
    /// Seeds the choices above, so a failing run can be repeated.
    pub seed: u64,
}

/// What the server has done, so tests can check that a hostile mode bit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub lists: u64,
    pub watches: u64,
    /// Watches answered with a `410 Expired` ERROR event.
    pub expired: u64,
    pub injected_failures: u64,
    /// Watches ended by `Chaos` or by [`FakeApiServer::disconnect_watches`].
    pub cut_watches: u64,
    pub duplicated_events: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    lists: AtomicU64,
    watches: AtomicU64,
    expired: AtomicU64,
    injected_failures: AtomicU64,
    cut_watches: AtomicU64,
    duplicated_events: AtomicU64,
}

/// Chaos settings and the random state its choices draw from.
#[derive(Debug)]
struct ChaosState {
    chaos: Chaos,
    rng: u64,
}

impl ChaosState {
    fn next(&mut self) -> u64 {
        // xorshift64*: deterministic from the seed, good enough to pick faults.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn chance(&mut self, percent: u8) -> bool {
        percent > 0 && self.next() % 100 < u64::from(percent)
    }

    fn jitter(&mut self) -> Duration {
        let max = self.chaos.jitter.as_micros();
        if !self.chaos.reorder || max == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros((u128::from(self.next()) % max) as u64)
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        if !self.chaos.reorder {
            return;
        }
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// State shared by the handle and the server's runtime.
#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    chaos: Mutex<ChaosState>,
    counters: Counters,
    /// Every (verb, API group, resource) a client asked for, as RBAC names
    /// them: what a `ClusterRole` must grant, and all it needs to.
    access: Mutex<std::collections::BTreeSet<(String, String, String)>>,
    /// The store's resourceVersion after every change: wakes watches.
    changed: tokio::sync::watch::Sender<u64>,
    /// Bumped by `disconnect_watches`: every open watch ends.
    cut: tokio::sync::watch::Sender<u64>,
    bookmark_interval: Duration,
    address: SocketAddr,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not hide the state from the others.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    fn chaos(&self) -> MutexGuard<'_, ChaosState> {
        lock(&self.chaos)
    }

    fn note_access(&self, verb: &str, group: &str, resource: &str) {
        lock(&self.access).insert((verb.to_owned(), group.to_owned(), resource.to_owned()));
    }
}

/// Settings fixed at start.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// How often a watch that asked for bookmarks gets one (when its
    /// resourceVersion moved since the last). The real server's is about a
    /// minute; tests want it short.
    pub bookmark_interval: Duration,
    /// How many past events are kept for watches to resume from; older
    /// resourceVersions get `410 Expired`.
    pub history_limit: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { bookmark_interval: Duration::from_millis(500), history_limit: 10_000 }
    }
}

/// A running fake API server; stops (closing every connection) on drop.
#[derive(Debug)]
pub struct FakeApiServer {
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The namespaces every real cluster has.
const BUILTIN_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];

impl FakeApiServer {
    /// Starts on `127.0.0.1` at a free port.
    pub fn start() -> Result<Self, FakeApiError> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(FakeApiError::Bind)?;
        Self::start_on(listener, Options::default())
    }

    /// Starts on a socket the caller bound, e.g. inside a network namespace.
    pub fn start_on(listener: TcpListener, options: Options) -> Result<Self, FakeApiError> {
        listener.set_nonblocking(true).map_err(FakeApiError::Bind)?;
        let address = listener.local_addr().map_err(FakeApiError::Bind)?;
        let mut store = Store::new(options.history_limit.max(1));
        for name in BUILTIN_NAMESPACES {
            store.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))?;
        }
        let (changed, _) = tokio::sync::watch::channel(store.resource_version());
        let (cut, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            chaos: Mutex::new(ChaosState { chaos: Chaos::default(), rng: 1 }),
            counters: Counters::default(),
            access: Mutex::new(std::collections::BTreeSet::new()),
            changed,
            cut,
            bookmark_interval: options.bookmark_interval,
            address,
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("fake-apiserver")
            .build()
            .map_err(FakeApiError::Runtime)?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(FakeApiError::Bind)?
        };
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let server = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || runtime.block_on(serve::accept_loop(server, listener, stopped)))
            .map_err(FakeApiError::Runtime)?;
        Ok(Self { shared, stop: Some(stop), thread: Some(thread) })
    }

    #[must_use]
    pub fn address(&self) -> SocketAddr {
        self.shared.address
    }

    /// `http://127.0.0.1:PORT`, for `kubectl --server` or a kube-rs `Config`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.address)
    }

    /// Writes a kubeconfig whose current context points at this server, for
    /// `--kubeconfig` (no credentials: the fake authenticates nobody).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), FakeApiError> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text).map_err(|source| FakeApiError::Kubeconfig { path: path.to_owned(), source })
    }

    /// The resourceVersion of the latest change.
    #[must_use]
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    fn publish(&self, rv: u64) {
        self.shared.changed.send_replace(rv);
    }

    fn with_store<T>(&self, change: impl FnOnce(&mut Store) -> Result<T, FakeApiError>) -> Result<T, FakeApiError> {
        let mut store = self.shared.store();
        let result = change(&mut store)?;
        let rv = store.resource_version();
        drop(store);
        self.publish(rv);
        Ok(result)
    }

    /// Creates an object given as JSON (the custom resource's way in); returns
    /// it as stored, with resourceVersion, uid, creationTimestamp and generation.
    pub fn create_value(&self, object: Value) -> Result<Value, FakeApiError> {
        self.with_store(|s| s.create(object)).map(|o| (*o).clone())
    }

    /// Replaces an object given as JSON; emits MODIFIED.
    pub fn update_value(&self, object: Value) -> Result<Value, FakeApiError> {
        self.with_store(|s| s.update(object)).map(|o| (*o).clone())
    }

    /// Deletes an object; emits DELETED with its last state.
    pub fn delete_value(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, FakeApiError> {
        let resource = resources::by_kind(api_version, kind)
            .ok_or_else(|| FakeApiError::UnknownKind { api_version: api_version.to_owned(), kind: kind.to_owned() })?;
        self.with_store(|s| s.delete(resource, namespace.unwrap_or(""), name)).map(|o| (*o).clone())
    }

    /// Creates a typed object; emits ADDED.
    pub fn create<K>(&self, object: &K) -> Result<K, FakeApiError>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        Ok(serde_json::from_value(self.create_value(serde_json::to_value(object)?)?)?)
    }

    /// Replaces a typed object; emits MODIFIED.
    pub fn update<K>(&self, object: &K) -> Result<K, FakeApiError>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        Ok(serde_json::from_value(self.update_value(serde_json::to_value(object)?)?)?)
    }

    /// Deletes a typed object; returns its last state.
    pub fn delete<K>(&self, namespace: Option<&str>, name: &str) -> Result<K, FakeApiError>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        Ok(serde_json::from_value(self.delete_value(K::API_VERSION, K::KIND, namespace, name)?)?)
    }

    /// An object as stored, or `None`.
    pub fn get<K>(&self, namespace: Option<&str>, name: &str) -> Result<Option<K>, FakeApiError>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        let resource = resources::by_kind(K::API_VERSION, K::KIND)
            .ok_or_else(|| FakeApiError::UnknownKind { api_version: K::API_VERSION.into(), kind: K::KIND.into() })?;
        let object = self.shared.store().get(resource, namespace.unwrap_or(""), name);
        object.map(|o| serde_json::from_value((*o).clone())).transpose().map_err(FakeApiError::from)
    }

    /// Every stored object of a type, in key (namespace, name) order.
    pub fn objects<K>(&self) -> Result<Vec<K>, FakeApiError>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        let resource = resources::by_kind(K::API_VERSION, K::KIND)
            .ok_or_else(|| FakeApiError::UnknownKind { api_version: K::API_VERSION.into(), kind: K::KIND.into() })?;
        let (_, objects) = self.shared.store().snapshot(false);
        objects
            .iter()
            .filter(|((r, _, _), _)| *r == resource)
            .map(|(_, o)| serde_json::from_value((**o).clone()).map_err(FakeApiError::from))
            .collect()
    }

    /// Forgets the event history, as etcd compaction does: a watch from any
    /// resourceVersion before now gets `410 Expired`, and so does a `continue`
    /// token from before now.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Ends every open watch stream now (as `Chaos::abort_cut_watches` says).
    pub fn disconnect_watches(&self) {
        self.shared.cut.send_modify(|generation| *generation += 1);
    }

    /// Switches the hostile modes; takes effect at the next request or event.
    pub fn set_chaos(&self, chaos: Chaos) {
        let mut state = self.shared.chaos();
        state.rng = chaos.seed | 1;
        state.chaos = chaos;
    }

    /// Every (verb, API group, resource) clients asked for so far, as RBAC
    /// names them (`get`, `list`, `watch`; `""` for the core group).
    #[must_use]
    pub fn access(&self) -> std::collections::BTreeSet<(String, String, String)> {
        lock(&self.shared.access).clone()
    }

    #[must_use]
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            requests: get(&c.requests),
            lists: get(&c.lists),
            watches: get(&c.watches),
            expired: get(&c.expired),
            injected_failures: get(&c.injected_failures),
            cut_watches: get(&c.cut_watches),
            duplicated_events: get(&c.duplicated_events),
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
