//! The Kubernetes manifests in `deploy/`, rendered with `kubectl kustomize`
//! and read into JSON values, for the manifest and capability tests.
//!
//! Panics with a message naming what to install or fix: these are test
//! helpers, and a missing tool must fail the test, never skip it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Map, Value};
use yaml_rust2::{Yaml, YamlLoader};

/// The kustomize directories every checkout must have: the base and the
/// three overlays. Other tooling relies on these exact paths.
pub const DIRECTORIES: [&str; 4] =
    ["deploy/base", "deploy/overlays/privileged", "deploy/overlays/capabilities", "deploy/overlays/monitoring"];

/// The workspace root.
#[must_use]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// `kubectl kustomize DIR` (DIR relative to the workspace root): the
/// rendered YAML stream.
#[must_use]
pub fn render(dir: &str) -> String {
    let path = workspace_root().join(dir);
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .expect("cannot run kubectl; `cargo xtask setup` says how to install it");
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("kustomize prints UTF-8")
}

/// Every document of a YAML stream, as JSON values (empty documents left out).
#[must_use]
pub fn objects(yaml: &str) -> Vec<Value> {
    YamlLoader::load_from_str(yaml)
        .unwrap_or_else(|e| panic!("not YAML: {e}\n{yaml}"))
        .iter()
        .map(to_json)
        .filter(|value| !value.is_null())
        .collect()
}

fn to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Real(text) => {
            text.parse::<f64>().ok().and_then(serde_json::Number::from_f64).map_or(Value::Null, Value::Number)
        }
        Yaml::Integer(n) => Value::from(*n),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::Hash(hash) => {
            let mut map = Map::new();
            for (key, value) in hash {
                let key = match key {
                    Yaml::String(s) | Yaml::Real(s) => s.clone(),
                    Yaml::Integer(n) => n.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => panic!("unsupported YAML key {other:?}"),
                };
                map.insert(key, to_json(value));
            }
            Value::Object(map)
        }
        Yaml::Null => Value::Null,
        Yaml::Alias(_) | Yaml::BadValue => panic!("unsupported YAML node {yaml:?}"),
    }
}

/// The one object of `kind` whose name is `name` (or, for generated
/// config maps with a hash suffix, starts with `name-`).
///
/// # Panics
/// If there is none or more than one.
#[must_use]
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let matching: Vec<&Value> = objects
        .iter()
        .filter(|object| object["kind"] == kind)
        .filter(|object| {
            let actual = object["metadata"]["name"].as_str().unwrap_or_default();
            actual == name || actual.strip_prefix(name).is_some_and(|rest| rest.starts_with('-'))
        })
        .collect();
    assert_eq!(matching.len(), 1, "expected exactly one {kind} {name}, found {}", matching.len());
    matching[0]
}

/// The container called `name` in a workload's pod template.
///
/// # Panics
/// If there is no such container.
#[must_use]
pub fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("a pod template with containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The Linux capability names (`CAP_BPF`, ...) a container adds, as written
/// in its securityContext (`BPF`, ...), in order.
#[must_use]
pub fn added_capabilities(container: &Value) -> Vec<String> {
    container["securityContext"]["capabilities"]["add"]
        .as_array()
        .map(|caps| {
            caps.iter()
                .map(|cap| {
                    let name = cap.as_str().expect("capability names are strings").to_ascii_uppercase();
                    if name.starts_with("CAP_") { name } else { format!("CAP_{name}") }
                })
                .collect()
        })
        .unwrap_or_default()
}
