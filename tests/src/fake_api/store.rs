//! The in-memory object store: every object under one global, monotonically
//! increasing resourceVersion (as etcd's revision), and the history of changes
//! that watches replay.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};

use super::FakeApiError;
use super::resources::{NAMESPACES, RESOURCES};

/// (index into `RESOURCES`, namespace or "" when cluster-scoped, name).
pub(crate) type Key = (usize, String, String);
pub(crate) type Objects = BTreeMap<Key, Arc<Value>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Added,
    Modified,
    Deleted,
}

/// One change, as a watch replays it.
#[derive(Debug)]
pub(crate) struct Event {
    pub rv: u64,
    pub resource: usize,
    pub change: Change,
    /// The object after the change; for a deletion, its last state with the
    /// deletion's resourceVersion (what the real server sends).
    pub object: Arc<Value>,
    /// The object before the change, so that a filtered watch can tell an
    /// object entering or leaving its selector.
    pub previous: Option<Arc<Value>>,
}

/// A watch asked for events the history no longer has (`410 Gone`); holds
/// the oldest resourceVersion a watch may still start from.
#[derive(Debug)]
pub(crate) struct Gone(pub u64);

/// Pages of one list are served from the objects as they were at the first
/// page; this many such snapshots are kept.
const SNAPSHOTS_KEPT: usize = 64;

#[derive(Debug)]
pub(crate) struct Store {
    rv: u64,
    uids: u64,
    /// Copied on write only while a list snapshot shares it.
    objects: Arc<Objects>,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// A watch may start at this resourceVersion or later; before it, events
    /// are forgotten.
    oldest_watchable: u64,
    snapshots: BTreeMap<u64, Arc<Objects>>,
}

/// Now, as the API server serializes a `metav1.Time` (RFC 3339, UTC,
/// whole seconds): k8s-openapi's own type does it.
fn timestamp_now() -> Value {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let now = i64::try_from(seconds).ok().and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok());
    serde_json::to_value(Time(now.unwrap_or_default())).unwrap_or(Value::Null)
}

/// Everything but metadata and status: a change here bumps `generation`.
fn spec_part(object: &Value) -> Value {
    let mut spec = object.clone();
    if let Some(map) = spec.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    spec
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        Self {
            rv: 1,
            uids: 0,
            objects: Arc::default(),
            history: VecDeque::new(),
            history_limit,
            oldest_watchable: 1,
            snapshots: BTreeMap::new(),
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// The key an incoming object is stored under, after checking its type,
    /// name and scope.
    fn key_of(&self, object: &Value) -> Result<Key, FakeApiError> {
        let api_version = object.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
        let resource = super::resources::by_kind(api_version, kind)
            .ok_or_else(|| FakeApiError::UnknownKind { api_version: api_version.to_owned(), kind: kind.to_owned() })?;
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| FakeApiError::MissingName { kind: kind.to_owned() })?;
        let namespace = object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
        match (RESOURCES[resource].namespaced, namespace.is_empty()) {
            (true, true) => Err(FakeApiError::NamespaceRequired { kind: kind.to_owned(), name: name.to_owned() }),
            (false, false) => Err(FakeApiError::ClusterScoped { kind: kind.to_owned(), name: name.to_owned() }),
            (true, false) if !self.objects.contains_key(&(NAMESPACES, String::new(), namespace.to_owned())) => {
                Err(FakeApiError::NamespaceNotFound { namespace: namespace.to_owned() })
            }
            _ => Ok((resource, namespace.to_owned(), name.to_owned())),
        }
    }

    fn record(&mut self, resource: usize, change: Change, object: Arc<Value>, previous: Option<Arc<Value>>) {
        self.history.push_back(Arc::new(Event { rv: self.rv, resource, change, object, previous }));
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.oldest_watchable = dropped.rv;
            }
        }
    }

    fn set_metadata(object: &mut Value, field: &str, value: Value) {
        if !object.get("metadata").is_some_and(Value::is_object) {
            object["metadata"] = json!({});
        }
        object["metadata"][field] = value;
    }

    /// Creates an object, filling in what the real server fills in.
    pub fn create(&mut self, mut object: Value) -> Result<Arc<Value>, FakeApiError> {
        let key = self.key_of(&object)?;
        if self.objects.contains_key(&key) {
            return Err(FakeApiError::AlreadyExists { kind: RESOURCES[key.0].kind, namespace: key.1, name: key.2 });
        }
        self.rv += 1;
        self.uids += 1;
        Self::set_metadata(&mut object, "resourceVersion", json!(self.rv.to_string()));
        Self::set_metadata(&mut object, "uid", json!(format!("00000000-0000-4000-8000-{:012x}", self.uids)));
        Self::set_metadata(&mut object, "creationTimestamp", timestamp_now());
        Self::set_metadata(&mut object, "generation", json!(1));
        if key.0 == NAMESPACES {
            // The real server's defaults, which kubectl prints as STATUS.
            object["spec"] = json!({"finalizers": ["kubernetes"]});
            object["status"] = json!({"phase": "Active"});
        }
        let object = Arc::new(object);
        Arc::make_mut(&mut self.objects).insert(key.clone(), Arc::clone(&object));
        self.record(key.0, Change::Added, Arc::clone(&object), None);
        Ok(object)
    }

    /// Replaces an object. A non-empty `metadata.resourceVersion` must match
    /// the stored one (optimistic concurrency, as the real server checks).
    pub fn update(&mut self, mut object: Value) -> Result<Arc<Value>, FakeApiError> {
        let key = self.key_of(&object)?;
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(FakeApiError::NotFound { kind: RESOURCES[key.0].kind, namespace: key.1, name: key.2 });
        };
        let given = object.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or("");
        let stored = old.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or("");
        if !given.is_empty() && given != stored {
            return Err(FakeApiError::Conflict {
                kind: RESOURCES[key.0].kind,
                name: key.2,
                given: given.to_owned(),
                stored: stored.to_owned(),
            });
        }
        if key.0 == NAMESPACES {
            object["spec"] = old["spec"].clone();
            object["status"] = old["status"].clone();
        }
        let generation = old.pointer("/metadata/generation").and_then(Value::as_u64).unwrap_or(1);
        let generation = if spec_part(&old) == spec_part(&object) { generation } else { generation + 1 };
        self.rv += 1;
        Self::set_metadata(&mut object, "resourceVersion", json!(self.rv.to_string()));
        Self::set_metadata(&mut object, "uid", old["metadata"]["uid"].clone());
        Self::set_metadata(&mut object, "creationTimestamp", old["metadata"]["creationTimestamp"].clone());
        Self::set_metadata(&mut object, "generation", json!(generation));
        let object = Arc::new(object);
        Arc::make_mut(&mut self.objects).insert(key.clone(), Arc::clone(&object));
        self.record(key.0, Change::Modified, Arc::clone(&object), Some(old));
        Ok(object)
    }

    /// Deletes an object; a namespace takes everything in it along (each a
    /// DELETED event first, as the namespace controller would).
    pub fn delete(&mut self, resource: usize, namespace: &str, name: &str) -> Result<Arc<Value>, FakeApiError> {
        let key = (resource, namespace.to_owned(), name.to_owned());
        if !self.objects.contains_key(&key) {
            return Err(FakeApiError::NotFound {
                kind: RESOURCES[resource].kind,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            });
        }
        if resource == NAMESPACES {
            let inside: Vec<Key> = self.objects.keys().filter(|(_, ns, _)| ns == name).cloned().collect();
            for (r, ns, n) in inside {
                self.delete(r, &ns, &n)?;
            }
        }
        let Some(old) = Arc::make_mut(&mut self.objects).remove(&key) else {
            return Err(FakeApiError::NotFound { kind: RESOURCES[resource].kind, namespace: key.1, name: key.2 });
        };
        self.rv += 1;
        let mut last = (*old).clone();
        Self::set_metadata(&mut last, "resourceVersion", json!(self.rv.to_string()));
        let last = Arc::new(last);
        self.record(resource, Change::Deleted, Arc::clone(&last), Some(old));
        Ok(last)
    }

    pub fn get(&self, resource: usize, namespace: &str, name: &str) -> Option<Arc<Value>> {
        self.objects.get(&(resource, namespace.to_owned(), name.to_owned())).cloned()
    }

    /// The current objects and their resourceVersion; kept for the pages that
    /// follow when `keep` is set.
    pub fn snapshot(&mut self, keep: bool) -> (u64, Arc<Objects>) {
        let objects = Arc::clone(&self.objects);
        if keep {
            self.snapshots.insert(self.rv, Arc::clone(&objects));
            while self.snapshots.len() > SNAPSHOTS_KEPT {
                self.snapshots.pop_first();
            }
        }
        (self.rv, objects)
    }

    /// The objects as they were at `rv`, if a list snapshot kept them.
    pub fn snapshot_at(&self, rv: u64) -> Option<Arc<Objects>> {
        if rv == self.rv {
            return Some(Arc::clone(&self.objects));
        }
        self.snapshots.get(&rv).cloned()
    }

    /// Events after `rv`, and the resourceVersion they bring a watcher to.
    pub fn events_after(&self, rv: u64) -> Result<(Vec<Arc<Event>>, u64), Gone> {
        if rv < self.oldest_watchable {
            return Err(Gone(self.oldest_watchable));
        }
        let start = self.history.partition_point(|e| e.rv <= rv);
        Ok((self.history.iter().skip(start).cloned().collect(), self.rv.max(rv)))
    }

    /// Forgets every past event and list snapshot, as etcd compaction does.
    pub fn compact(&mut self) {
        self.history.clear();
        self.snapshots.clear();
        self.oldest_watchable = self.rv;
    }
}
