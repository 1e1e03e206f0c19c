//! Kubernetes objects as the daemon's cluster source hands them to the
//! engine (one JSON or YAML source per object, named as the watcher names
//! them), and as `kubectl get -o yaml` prints them. Any bytes: a clean error
//! or a policy, never a panic.
//!
//! The input is split at NUL bytes into objects, so one input can hold a
//! namespace, its pods and the `NetworkPolicies` that select them.

#![no_main]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use policy::model::Enforcement;
use policy::{Contents, Engine, SourceChange};

/// The kinds the cluster source watches, in the watcher's source names.
const KINDS: [&str; 4] = ["namespaces", "pods", "networkpolicies", "segmentpolicies"];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let file: Arc<str> = Arc::from("snapshot.yaml");
    let (mut objects, mut reports) = (policy::kubernetes::Objects::default(), Vec::new());
    let _ = policy::kubernetes::read_objects(&file, text, &mut objects, &mut reports);

    let sources: Vec<SourceChange> = text
        .split('\0')
        .enumerate()
        .map(|(i, object)| SourceChange {
            source: format!("kubernetes:{}/fuzz/object-{i}", KINDS[i % KINDS.len()]),
            contents: Contents::Text(object.to_owned()),
        })
        .collect();
    let first = sources[0].source.clone();
    let mut engine = Engine::with_enforcement(Enforcement::Default);
    if engine.apply(sources, now).is_ok() {
        engine.commit();
        // An object deleted: the incremental path must take it out cleanly.
        let removed = vec![SourceChange { source: first, contents: Contents::Removed }];
        let _ = engine.apply(removed, now);
    }
});
