//! The Kubernetes manifests in `deploy/`: every kustomize directory renders,
//! every object validates offline against the Kubernetes 1.32 schema
//! (`kubernetes-validate`, strict: unknown fields are errors), and the
//! daemon set has what a node enforcer needs. Needs `kubectl` and the
//! virtualenv `cargo xtask setup` creates; no cluster.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use lab::manifests::{self, DIRECTORIES, added_capabilities, container, find, objects, render, workspace_root};
use serde_json::{Value, json};

/// The Kubernetes version the manifests must be valid for.
const KUBERNETES_VERSION: &str = "1.32.0";
const NAMESPACE: &str = "bulkhead-system";
/// API groups whose kinds (prometheus-operator's) are CRDs, absent from the
/// core schema: checked structurally below instead.
const CRD_GROUPS: [&str; 1] = ["monitoring.coreos.com/"];
/// Kinds that are not namespaced.
const CLUSTER_SCOPED: [&str; 5] =
    ["Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "CustomResourceDefinition"];

fn validator() -> PathBuf {
    let path = std::env::var_os("KUBERNETES_VALIDATE")
        .map_or_else(|| workspace_root().join("target/venv/bin/kubernetes-validate"), PathBuf::from);
    assert!(path.exists(), "{} is missing: run `cargo xtask setup`", path.display());
    path
}

/// What kubernetes-validate said about a YAML stream.
struct Validation {
    success: bool,
    output: String,
}

fn validate(label: &str, yaml: &str) -> Validation {
    let file = std::env::temp_dir().join(format!("bulkhead-manifests-{}-{label}.yaml", std::process::id()));
    std::fs::write(&file, yaml).unwrap();
    let output = Command::new(validator())
        .args(["--kubernetes-version", KUBERNETES_VERSION, "--strict"])
        .arg(&file)
        .output()
        .expect("run kubernetes-validate");
    let _ = std::fs::remove_file(&file);
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Validation { success: output.status.success(), output: text }
}

fn is_crd(object: &Value) -> bool {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    CRD_GROUPS.iter().any(|group| api_version.starts_with(group))
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().or_else(|| object["metadata"]["generateName"].as_str()).unwrap_or_default()
}

/// Validates every object of `yaml`: core kinds must each be reported as
/// passed by the strict schema check (so a misspelt `kind`, which the
/// validator only warns about, fails too); CRD kinds get a structural check.
fn assert_valid(label: &str, yaml: &str) -> Vec<Value> {
    let objects = objects(yaml);
    assert!(!objects.is_empty(), "{label} renders nothing");
    let validation = validate(label, yaml);
    assert!(
        validation.success,
        "{label} does not validate against Kubernetes {KUBERNETES_VERSION}:\n{}",
        validation.output
    );
    for object in &objects {
        let kind = object["kind"].as_str().unwrap_or_else(|| panic!("{label}: an object without kind: {object}"));
        let name = name_of(object);
        assert!(!name.is_empty(), "{label}: a {kind} without a name");
        if is_crd(object) {
            let warning = format!("Couldn't find schema for kind {kind}");
            assert!(validation.output.contains(&warning), "{label}: {kind} {name} was expected to be a CRD kind");
            assert_crd_structure(label, object, &objects);
        } else {
            let passed = format!("passed for resource {}/{name} ", kind.to_ascii_lowercase());
            assert!(
                validation.output.contains(&passed),
                "{label}: {kind} {name} was not validated against a schema:\n{}",
                validation.output
            );
        }
    }
    objects
}

/// What can be checked of a prometheus-operator object without its CRD.
fn assert_crd_structure(label: &str, object: &Value, all: &[Value]) {
    let kind = object["kind"].as_str().unwrap();
    let name = name_of(object);
    assert_eq!(object["apiVersion"], "monitoring.coreos.com/v1", "{label}: {kind} {name}");
    assert!(object["spec"].is_object(), "{label}: {kind} {name} has no spec");
    match kind {
        "ServiceMonitor" => {
            let service = find(all, "Service", "bulkhead-metrics");
            let wanted = object["spec"]["selector"]["matchLabels"].as_object().expect("ServiceMonitor matchLabels");
            for (key, value) in wanted {
                assert_eq!(&service["metadata"]["labels"][key], value, "{label}: ServiceMonitor selects {key}");
            }
            let endpoints = object["spec"]["endpoints"].as_array().expect("ServiceMonitor endpoints");
            assert!(!endpoints.is_empty());
            for endpoint in endpoints {
                assert_eq!(endpoint["port"], "metrics", "{label}: ServiceMonitor scrapes the port named metrics");
            }
        }
        "PodMonitor" => {
            assert!(object["spec"]["podMetricsEndpoints"].is_array(), "{label}: PodMonitor {name} endpoints");
        }
        "PrometheusRule" => {
            let groups = object["spec"]["groups"].as_array().expect("PrometheusRule groups");
            for group in groups {
                assert!(group["name"].is_string(), "{label}: PrometheusRule group without a name");
                for rule in group["rules"].as_array().expect("PrometheusRule rules") {
                    assert!(rule["expr"].is_string(), "{label}: a rule without expr: {rule}");
                    assert!(
                        rule["alert"].is_string() != rule["record"].is_string(),
                        "{label}: a rule needs exactly one of alert and record: {rule}"
                    );
                }
            }
        }
        other => panic!("{label}: {other} is a CRD kind this test does not know how to check"),
    }
}

/// deploy/base and every overlay directory.
fn directories() -> Vec<String> {
    let mut dirs = vec!["deploy/base".to_owned()];
    for entry in std::fs::read_dir(workspace_root().join("deploy/overlays")).expect("deploy/overlays") {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            dirs.push(format!("deploy/overlays/{}", entry.file_name().to_string_lossy()));
        }
    }
    dirs.sort();
    dirs
}

#[test]
fn every_kustomize_directory_renders_and_validates() {
    let dirs = directories();
    for expected in DIRECTORIES {
        assert!(dirs.iter().any(|d| d == expected), "{expected} is missing (found {dirs:?})");
    }
    for dir in &dirs {
        let label = dir.replace('/', "-");
        let objects = assert_valid(&label, &render(dir));
        for object in &objects {
            let kind = object["kind"].as_str().unwrap();
            let name = name_of(object);
            let labels = &object["metadata"]["labels"];
            assert_eq!(labels["app.kubernetes.io/name"], "bulkhead", "{dir}: {kind} {name}");
            assert_eq!(labels["app.kubernetes.io/part-of"], "bulkhead", "{dir}: {kind} {name}");
            if !CLUSTER_SCOPED.contains(&kind) {
                assert_eq!(object["metadata"]["namespace"], NAMESPACE, "{dir}: {kind} {name}");
            }
        }
        let _ = find(&objects, "Namespace", NAMESPACE);
        let _ = find(&objects, "DaemonSet", "bulkhead");
    }
}

#[test]
fn the_uninstall_job_validates() {
    let path = workspace_root().join("deploy/uninstall-job.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    // The Job has a generateName (one per node and run); kubernetes-validate
    // 1.37.0 stops at an object without metadata.name ("could not be
    // validated: 'name'"), so it validates a copy with a name in its place.
    assert_eq!(yaml.matches("generateName: bulkhead-uninstall-").count(), 1);
    let named = yaml.replacen("generateName: bulkhead-uninstall-", "name: bulkhead-uninstall-node", 1);
    assert_valid("uninstall-job", &named);
    let objects = objects(&yaml);
    assert_eq!(objects.len(), 1);
    let job = &objects[0];
    assert_eq!(job["kind"], "Job");
    assert_eq!(job["metadata"]["namespace"], NAMESPACE);
    let pod = &job["spec"]["template"]["spec"];
    // One Job per node: pinned to it by name, placed whatever its taints.
    assert_eq!(pod["nodeName"], "REPLACE-WITH-NODE-NAME", "the placeholder docs/deploy.md substitutes");
    let uses = yaml.lines().filter(|l| !l.trim_start().starts_with('#') && l.contains("REPLACE-WITH-NODE-NAME"));
    assert_eq!(uses.count(), 1, "the placeholder is the node name and nothing else");
    assert!(pod["tolerations"].as_array().unwrap().iter().any(|t| t["operator"] == "Exists" && t.get("key").is_none()));
    let c = container(job, "uninstall");
    assert_eq!(c["args"], serde_json::json!(["uninstall", "--bpffs-root", "/sys/fs/bpf/bulkhead"]));
    assert_eq!(c["image"], "ghcr.io/bulkhead/bulkhead:0.1.0");
    let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == "/sys/fs/bpf").unwrap();
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    assert_eq!(volume["hostPath"]["path"], "/sys/fs/bpf");
    // Unpinning is unlinking files the root user owns: no capability
    // (tests/tests/capabilities.rs runs uninstall with exactly this set).
    assert_eq!(c["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(added_capabilities(c).is_empty());
    assert_ne!(c["securityContext"]["privileged"], true);
}

#[test]
fn a_misspelt_field_fails_validation() {
    // The validation above would be worthless if it passed anything: the
    // same check, on a rendered overlay with one field name misspelt, a
    // wrong type, or a misspelt kind, must fail.
    let rendered = render("deploy/overlays/privileged");
    assert!(validate("control", &rendered).success, "the unmodified rendering must pass");

    let typo = rendered.replacen("hostNetwork: true", "hostNetwrok: true", 1);
    assert_ne!(typo, rendered);
    let validation = validate("typo", &typo);
    assert!(!validation.success, "hostNetwrok passed validation:\n{}", validation.output);
    assert!(validation.output.contains("'hostNetwrok' was unexpected"), "{}", validation.output);

    let wrong_type = rendered.replacen("terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: thirty", 1);
    assert_ne!(wrong_type, rendered);
    assert!(!validate("type", &wrong_type).success, "a string grace period passed validation");

    let nested = rendered.replacen("mountPropagation: Bidirectional", "mountPropagaton: Bidirectional", 1);
    assert_ne!(nested, rendered);
    assert!(!validate("nested", &nested).success, "a misspelt volume mount field passed validation");

    // kubernetes-validate only warns about a kind it has no schema for;
    // assert_valid insists on a "passed" line for each core object.
    let kind = rendered.replacen("kind: DaemonSet", "kind: DaemonSett", 1);
    assert_ne!(kind, rendered);
    let result = std::panic::catch_unwind(|| assert_valid("kind", &kind));
    assert!(result.is_err(), "a misspelt kind passed assert_valid");
}

fn mount<'a>(container: &'a Value, path: &str) -> &'a Value {
    container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("nothing mounted at {path}"))
}

fn volume<'a>(daemonset: &'a Value, name: &Value) -> &'a Value {
    daemonset["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| &v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The container port called `name`.
fn port(container: &Value, name: &str) -> i64 {
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_i64())
        .unwrap_or_else(|| panic!("no port {name}"))
}

fn arg<'a>(container: &'a Value, flag: &str) -> &'a str {
    let prefix = format!("{flag}=");
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str().and_then(|a| a.strip_prefix(prefix.as_str())))
        .unwrap_or_else(|| panic!("no {flag}=... argument"))
}

/// Every (verb, API group, resource) the daemon calls: list and watch each
/// kind of `enforcer::kubernetes`, and create the events it reports
/// refusals with.
fn watched() -> BTreeSet<(String, String, String)> {
    enforcer::kubernetes::watch_access()
        .chain(std::iter::once(enforcer::kubernetes::EVENT_ACCESS))
        .map(|(verb, group, resource)| (verb.to_owned(), group.to_owned(), resource.to_owned()))
        .collect()
}

/// Every (verb, API group, resource) the `ClusterRole` `bulkhead` grants.
fn granted(objects: &[Value], dir: &str) -> BTreeSet<(String, String, String)> {
    let role = find(objects, "ClusterRole", "bulkhead");
    let strings = |value: &Value| -> Vec<String> {
        value
            .as_array()
            .unwrap_or_else(|| panic!("{dir}: a list"))
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap_or_else(|| panic!("{dir}: rules")) {
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(), "{dir}: {rule}");
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    granted.insert((verb, group.clone(), resource.clone()));
                }
            }
        }
    }
    granted
}

#[test]
fn the_daemonset_has_what_a_node_enforcer_needs() {
    for dir in DIRECTORIES {
        let objects = objects(&render(dir));
        let ds = find(&objects, "DaemonSet", "bulkhead");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], true, "{dir}");
        assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet", "{dir}");
        assert_eq!(pod["priorityClassName"], "system-node-critical", "{dir}");
        let tolerations = pod["tolerations"].as_array().unwrap();
        assert!(
            tolerations
                .iter()
                .any(|t| t["operator"] == "Exists" && t.get("key").is_none() && t.get("effect").is_none()),
            "{dir}: must tolerate every taint"
        );
        assert!(pod["terminationGracePeriodSeconds"].as_i64().is_some(), "{dir}");
        let strategy = &ds["spec"]["updateStrategy"];
        assert_eq!(strategy["type"], "RollingUpdate", "{dir}");
        assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], 1, "{dir}");
        assert_eq!(strategy["rollingUpdate"]["maxSurge"], 0, "{dir}: one daemon per node and bpffs root");
        assert_eq!(pod["serviceAccountName"], "bulkhead", "{dir}");
        let selector = ds["spec"]["selector"]["matchLabels"].as_object().unwrap();
        for (key, value) in selector {
            assert_eq!(&ds["spec"]["template"]["metadata"]["labels"][key], value, "{dir}: selector {key}");
        }

        let c = container(ds, "bulkhead");
        assert_eq!(c["image"], "ghcr.io/bulkhead/bulkhead:0.1.0", "{dir}");
        assert_eq!(c["args"][0], "run", "{dir}");
        assert_eq!(arg(c, "--metrics-addr"), "0.0.0.0:9090", "{dir}");
        assert_eq!(arg(c, "--bpffs-root"), "/sys/fs/bpf/bulkhead", "{dir}");
        assert_eq!(port(c, "metrics"), 9090, "{dir}");
        for (probe, path) in
            [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]
        {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"], path, "{dir}: {probe}");
            assert!(get["port"] == "metrics" || get["port"] == 9090, "{dir}: {probe} port {}", get["port"]);
        }
        let env = c["env"].as_array().unwrap().iter().find(|e| e["name"] == "NODE_NAME").expect("NODE_NAME");
        assert_eq!(env["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName", "{dir}");
        let resources = &c["resources"];
        for (bound, resource) in [("requests", "cpu"), ("requests", "memory"), ("limits", "memory")] {
            assert!(resources[bound][resource].is_string(), "{dir}: resources.{bound}.{resource}");
        }

        // The host's bpffs, where maps and links are pinned.
        let bpffs = mount(c, "/sys/fs/bpf");
        let host = &volume(ds, &bpffs["name"])["hostPath"];
        assert_eq!(host["path"], "/sys/fs/bpf", "{dir}");
        assert_eq!(host["type"], "DirectoryOrCreate", "{dir}");
        let privileged = c["securityContext"]["privileged"] == true;
        // API validation (not in the schema): Bidirectional propagation
        // is only allowed in privileged containers.
        for m in c["volumeMounts"].as_array().unwrap() {
            if m["mountPropagation"] == "Bidirectional" {
                assert!(privileged, "{dir}: {} is Bidirectional in an unprivileged container", m["mountPath"]);
            }
        }

        // The policy ConfigMap and the TLS Secret, where the config says.
        let policy = volume(ds, &mount(c, "/etc/bulkhead/policy")["name"]);
        assert_eq!(policy["configMap"]["name"], "bulkhead-policy", "{dir}");
        let tls = volume(ds, &mount(c, "/etc/bulkhead/tls")["name"]);
        assert_eq!(tls["secret"]["secretName"], "bulkhead-api-tls", "{dir}");
        assert_eq!(tls["secret"]["optional"], false, "{dir}: the API is on, so its TLS material is required");
        let keys: BTreeSet<&str> =
            tls["secret"]["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap()).collect();
        assert_eq!(keys, BTreeSet::from(["ca.crt", "tls.crt", "tls.key"]), "{dir}");

        // The config file: mounted where --config points, naming the
        // mounted policy and TLS files and the declared API port.
        let config_path = arg(c, "--config");
        let (config_dir, config_file) = config_path.rsplit_once('/').unwrap();
        let config_volume = volume(ds, &mount(c, config_dir)["name"]);
        let config_map_name = config_volume["configMap"]["name"].as_str().unwrap();
        let config_map = find(&objects, "ConfigMap", config_map_name);
        assert!(config_map_name.starts_with("bulkhead-config"), "{dir}");
        let config =
            &manifests::objects(config_map["data"][config_file].as_str().expect("config file in the ConfigMap"))[0];
        assert_eq!(config["policy-dir"], "/etc/bulkhead/policy", "{dir}");
        assert_eq!(config["bpffs-root"], "/sys/fs/bpf/bulkhead", "{dir}");
        assert!(!config["interface"].as_array().unwrap().is_empty(), "{dir}");
        // The example policy admits none of a node's own traffic: shipped
        // enforcing, it would cut every node off its control plane.
        assert_eq!(config["audit"], true, "{dir}: the shipped policy must start in audit mode");
        for (key, file) in [("tls-cert", "tls.crt"), ("tls-key", "tls.key"), ("client-ca", "ca.crt")] {
            assert_eq!(config[key], format!("/etc/bulkhead/tls/{file}"), "{dir}: {key}");
        }
        let api_port: i64 = config["api-addr"].as_str().unwrap().rsplit_once(':').unwrap().1.parse().unwrap();
        assert_eq!(api_port, port(c, "api"), "{dir}");

        match dir {
            "deploy/overlays/privileged" => {
                assert!(privileged, "{dir}");
                assert_eq!(bpffs["mountPropagation"], "Bidirectional", "{dir}");
            }
            "deploy/overlays/capabilities" => {
                assert!(!privileged, "{dir}");
                assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false, "{dir}");
                assert_eq!(c["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]), "{dir}");
                assert!(!added_capabilities(c).is_empty(), "{dir}");
                assert_eq!(bpffs["mountPropagation"], "HostToContainer", "{dir}");
            }
            _ => {}
        }
    }
}

/// The Kubernetes source's token, and exactly the access its watchers need
/// (`enforcer::kubernetes` says what they watch; tests/tests/kubernetes.rs
/// holds a running daemon's requests to the same set).
#[test]
fn the_daemon_may_list_and_watch_exactly_what_it_watches() {
    for dir in DIRECTORIES {
        let objects = objects(&render(dir));
        let pod = &find(&objects, "DaemonSet", "bulkhead")["spec"]["template"]["spec"];
        assert_eq!(pod["automountServiceAccountToken"], true, "{dir}");
        let _ = find(&objects, "ServiceAccount", "bulkhead");
        assert_eq!(granted(&objects, dir), watched(), "{dir}: the ClusterRole grants what the daemon calls");
        for kind in ["Role", "RoleBinding"] {
            assert!(objects.iter().all(|o| o["kind"] != kind), "{dir}: the daemon needs no {kind}");
        }
        let binding = find(&objects, "ClusterRoleBinding", "bulkhead");
        assert_eq!(binding["roleRef"]["name"], "bulkhead", "{dir}");
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "bulkhead", "namespace": "bulkhead-system"}]),
            "{dir}"
        );
        assert!(
            objects
                .iter()
                .any(|o| o["kind"] == "CustomResourceDefinition"
                    && o["metadata"]["name"] == "segmentpolicies.bulkhead.dev"),
            "{dir}: the CRD"
        );
    }
}

#[test]
fn the_policy_configmap_is_the_example_policy() {
    let example = std::fs::read_to_string(workspace_root().join("examples/three-tier.yaml")).unwrap();
    let copy = std::fs::read_to_string(workspace_root().join("deploy/base/policy/three-tier.yaml")).unwrap();
    assert_eq!(copy, example, "deploy/base/policy/three-tier.yaml must be a copy of examples/three-tier.yaml");
    for dir in DIRECTORIES {
        let objects = objects(&render(dir));
        let config_map = find(&objects, "ConfigMap", "bulkhead-policy");
        assert_eq!(config_map["metadata"]["name"], "bulkhead-policy", "{dir}: no name suffix, so edits apply live");
        let data = config_map["data"].as_object().unwrap();
        assert_eq!(data.len(), 1, "{dir}");
        assert_eq!(data["three-tier.yaml"], example.as_str(), "{dir}");
    }
}

#[test]
fn the_metrics_service_selects_the_daemon_pods() {
    for dir in DIRECTORIES {
        let objects = objects(&render(dir));
        let service = find(&objects, "Service", "bulkhead-metrics");
        let ds = find(&objects, "DaemonSet", "bulkhead");
        let ports = service["spec"]["ports"].as_array().unwrap();
        let metrics = ports.iter().find(|p| p["name"] == "metrics").expect("a port named metrics");
        assert_eq!(metrics["port"], 9090, "{dir}");
        assert!(metrics["targetPort"] == "metrics" || metrics["targetPort"] == 9090, "{dir}");
        let selector = service["spec"]["selector"].as_object().unwrap();
        assert!(!selector.is_empty());
        for (key, value) in selector {
            assert_eq!(&ds["spec"]["template"]["metadata"]["labels"][key], value, "{dir}: selector {key}");
        }
    }
}

/// Whether `instance` is valid against the JSON schema `schema`, by the
/// `jsonschema` library in the virtualenv (kubernetes-validate's own).
fn schema_errors(label: &str, schema: &Value, instance: &Value) -> Option<String> {
    let dir = std::env::temp_dir().join(format!("bulkhead-schema-{}-{label}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("schema.json"), schema.to_string()).unwrap();
    std::fs::write(dir.join("instance.json"), instance.to_string()).unwrap();
    let python = validator().with_file_name("python");
    let output = Command::new(python)
        .arg("-c")
        .arg("import json, sys, jsonschema\ntry:\n    jsonschema.validate(json.load(open(sys.argv[2])), json.load(open(sys.argv[1])))\nexcept jsonschema.ValidationError as e:\n    print(e.message); sys.exit(1)")
        .arg(dir.join("schema.json"))
        .arg(dir.join("instance.json"))
        .output()
        .expect("run the virtualenv's python");
    let _ = std::fs::remove_dir_all(&dir);
    (!output.status.success())
        .then(|| format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
}

/// The `SegmentPolicy` custom resource definition (generated from the Rust
/// types; enforcer/src/crd.rs keeps it in step) is a valid Kubernetes
/// object, and its schema takes the policy file format: every example
/// policy, as a custom resource, validates; a wrongly shaped one does not.
#[test]
fn the_segment_policy_crd_validates_and_takes_the_file_format() {
    let yaml = std::fs::read_to_string(workspace_root().join("deploy/crd/segmentpolicies.bulkhead.dev.yaml")).unwrap();
    let crd = assert_valid("crd", &yaml).remove(0);
    assert_eq!(crd["metadata"]["name"], "segmentpolicies.bulkhead.dev");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let example = std::fs::read_to_string(workspace_root().join("examples/three-tier.yaml")).unwrap();
    let resource = example.replace("apiVersion: bulkhead/v1", "apiVersion: bulkhead.dev/v1");
    policy::parse_str("three-tier.yaml", &resource).expect("the parser reads the custom resource's apiVersion");
    for document in objects(&resource) {
        assert_eq!(document["kind"], "SegmentPolicy");
        let errors = schema_errors("example", schema, &document);
        assert!(errors.is_none(), "the example policy does not fit the CRD schema: {errors:?}");
        let mut wrong = document.clone();
        wrong["spec"]["identities"][0]["addresses"] = Value::String("10.0.1.0/24".into());
        assert!(schema_errors("wrong", schema, &wrong).is_some(), "a string where a list belongs passed");
    }
}
