//! The monitoring overlay (`deploy/overlays/monitoring`): its alerts pass
//! `promtool`, its `PrometheusRule` is the rule file, its dashboard parses and
//! its queries are valid `PromQL`, every metric they name is exported by a
//! live daemon, and a real Prometheus scraping a real daemon sees the drops
//! and fires an alert. Needs root and Debian's `prometheus` package (both
//! provided by `cargo xtask test`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lab::probe::{self, Outcome};
use lab::{Daemon, Netns, ScratchDir, ThreeTier};
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

/// Labels Prometheus attaches to every target: not the daemon's to export.
const TARGET_LABELS: [&str; 3] = ["job", "instance", "node"];

fn overlay() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/overlays/monitoring")
}

fn read(name: &str) -> String {
    let path = overlay().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn yaml_documents(name: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(name)).unwrap_or_else(|e| panic!("{name} is not YAML: {e}"))
}

fn yaml(name: &str) -> Yaml {
    let mut documents = yaml_documents(name);
    assert_eq!(documents.len(), 1, "{name} must hold one document");
    documents.remove(0)
}

fn string<'a>(value: &'a Yaml, what: &str) -> &'a str {
    value.as_str().unwrap_or_else(|| panic!("{what} must be a string, is {value:?}"))
}

fn list<'a>(value: &'a Yaml, what: &str) -> &'a [Yaml] {
    value.as_vec().unwrap_or_else(|| panic!("{what} must be a list, is {value:?}"))
}

/// Runs `promtool ARGS` in `dir`, failing with its output unless it succeeds.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run promtool ({e}); `cargo xtask setup` installs Debian's prometheus"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "promtool {} failed:\n{text}", args.join(" "));
    text
}

/// The alerting rules of rules.yaml: (name, rule).
fn alerts() -> Vec<(String, Yaml)> {
    let rules = yaml("rules.yaml");
    let mut alerts = Vec::new();
    for group in list(&rules["groups"], "groups") {
        for rule in list(&group["rules"], "rules") {
            alerts.push((string(&rule["alert"], "alert").to_owned(), rule.clone()));
        }
    }
    alerts
}

/// Every `PromQL` expression of the alerts (rules.yaml) and the dashboard,
/// with where it comes from.
fn expressions() -> Vec<(String, String)> {
    let mut exprs: Vec<(String, String)> = alerts()
        .into_iter()
        .map(|(name, rule)| (format!("alert {name}"), string(&rule["expr"], "expr").to_owned()))
        .collect();
    exprs.extend(dashboard_targets().into_iter().map(|(title, expr)| (format!("panel {title:?}"), expr)));
    exprs
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let dir = overlay();
    let checked = promtool(&dir, &["check", "rules", "rules.yaml"]);
    let alerts = alerts();
    assert!(checked.contains(&format!("SUCCESS: {} rules found", alerts.len())), "{checked}");
    promtool(&dir, &["test", "rules", "rules.test.yaml"]);

    // promtool runs the cases it is given: every alert needs a case where it
    // fires and one where it must not.
    let tests = yaml("rules.test.yaml");
    assert_eq!(list(&tests["rule_files"], "rule_files"), [Yaml::String("rules.yaml".to_owned())]);
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in list(&tests["tests"], "tests") {
        for case in list(&test["alert_rule_test"], "alert_rule_test") {
            let name = string(&case["alertname"], "alertname").to_owned();
            if list(&case["exp_alerts"], "exp_alerts").is_empty() {
                quiet.insert(name);
            } else {
                fires.insert(name);
            }
        }
    }
    for (name, rule) in &alerts {
        assert!(fires.contains(name), "rules.test.yaml has no case where {name} fires");
        assert!(quiet.contains(name), "rules.test.yaml has no case where {name} stays quiet");
        assert!(rule["for"].as_str().is_some(), "{name} has no `for:`");
        let severity = string(&rule["labels"]["severity"], "severity");
        assert!(["critical", "warning", "info"].contains(&severity), "{name}: severity {severity}");
        for annotation in ["summary", "description", "runbook"] {
            assert!(!string(&rule["annotations"][annotation], annotation).is_empty(), "{name}: empty {annotation}");
        }
    }
}

#[test]
fn the_prometheus_rule_carries_exactly_the_rule_file() {
    let rule = yaml("prometheusrule.yaml");
    assert_eq!(string(&rule["apiVersion"], "apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(string(&rule["kind"], "kind"), "PrometheusRule");
    assert_eq!(string(&rule["metadata"]["namespace"], "namespace"), "bulkhead-system");
    assert!(
        rule["spec"] == yaml("rules.yaml"),
        "prometheusrule.yaml's spec differs from rules.yaml: run deploy/overlays/monitoring/gen-prometheusrule.sh"
    );
}

#[test]
fn the_overlay_adds_monitor_rules_and_dashboard_to_the_base() {
    let kustomization = yaml("kustomization.yaml");
    let resources: Vec<&str> =
        list(&kustomization["resources"], "resources").iter().map(|r| string(r, "resource")).collect();
    assert_eq!(resources, ["../../base", "servicemonitor.yaml", "prometheusrule.yaml"]);
    let generators = list(&kustomization["configMapGenerator"], "configMapGenerator");
    assert_eq!(generators.len(), 1);
    let dashboard = &generators[0];
    assert_eq!(string(&dashboard["namespace"], "namespace"), "bulkhead-system");
    assert_eq!(string(&dashboard["options"]["labels"]["grafana_dashboard"], "grafana_dashboard label"), "1");
    for file in list(&dashboard["files"], "files") {
        assert!(overlay().join(string(file, "file")).is_file(), "generator file {file:?} is missing");
    }

    let monitor = yaml("servicemonitor.yaml");
    assert_eq!(string(&monitor["apiVersion"], "apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(string(&monitor["kind"], "kind"), "ServiceMonitor");
    assert_eq!(string(&monitor["metadata"]["namespace"], "namespace"), "bulkhead-system");
    let spec = &monitor["spec"];
    // job="bulkhead" in the alerts and the dashboard comes from this label
    // of the bulkhead-metrics Service.
    assert_eq!(string(&spec["jobLabel"], "jobLabel"), "app.kubernetes.io/name");
    assert_eq!(string(&spec["selector"]["matchLabels"]["app.kubernetes.io/name"], "selector"), "bulkhead");
    assert_eq!(list(&spec["namespaceSelector"]["matchNames"], "matchNames"), [Yaml::String("bulkhead-system".into())]);
    let endpoints = list(&spec["endpoints"], "endpoints");
    assert_eq!(endpoints.len(), 1);
    assert_eq!(string(&endpoints[0]["port"], "port"), "metrics");
    assert_eq!(string(&endpoints[0]["path"], "path"), "/metrics");
    let relabelings = list(&endpoints[0]["relabelings"], "relabelings");
    assert!(
        relabelings.iter().any(|r| r["targetLabel"].as_str() == Some("node")
            && r["sourceLabels"]
                .as_vec()
                .is_some_and(|s| s == &[Yaml::String("__meta_kubernetes_pod_node_name".into())])),
        "no relabeling of the pod's node name into `node`: {relabelings:?}"
    );
}

fn dashboard() -> Value {
    serde_json::from_str(&read("bulkhead-dashboard.json")).unwrap_or_else(|e| panic!("dashboard JSON: {e}"))
}

/// (panel title, expr) of every query of the dashboard.
fn dashboard_targets() -> Vec<(String, String)> {
    let dashboard = dashboard();
    let mut targets = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("panel title");
        for target in panel["targets"].as_array().unwrap_or_else(|| panic!("panel {title} has no targets")) {
            let expr = target["expr"].as_str().unwrap_or_else(|| panic!("panel {title}: target without expr"));
            targets.push((title.to_owned(), expr.to_owned()));
        }
    }
    targets
}

/// A dashboard expression as Prometheus sees it once Grafana has filled in
/// its variables (`$node` as its All value). Anything else starting with `$`
/// is left in, so `PromQL` parsing fails on an unknown variable.
fn grafana_expanded(expr: &str, rate_interval: &str, range: &str) -> String {
    expr.replace("$__rate_interval", rate_interval).replace("$__range", range).replace("$node", ".*")
}

#[test]
fn the_dashboard_has_the_panels_and_valid_queries() {
    let dashboard = dashboard();
    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 39),
        "schemaVersion {}",
        dashboard["schemaVersion"]
    );
    assert_eq!(dashboard["uid"], "bulkhead");
    let variables = dashboard["templating"]["list"].as_array().expect("templating.list");
    let variable =
        |name: &str| variables.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no ${name} variable"));
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    let node = variable("node");
    assert_eq!(node["type"], "query");
    assert!(node["definition"].as_str().is_some_and(|d| d.contains("up{job=\"bulkhead\"}")), "{node}");

    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("title");
        assert!(ids.insert(panel["id"].as_u64().expect("numeric panel id")), "duplicate id in {title}");
        let kind = panel["type"].as_str().expect("type");
        assert!(["timeseries", "stat", "table"].contains(&kind), "{title}: panel type {kind}");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title} does not use the datasource variable");
        for target in panel["targets"].as_array().expect("targets") {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            let expr = target["expr"].as_str().expect("expr");
            assert!(expr.contains("node=~\"$node\""), "{title}: {expr} ignores the $node variable");
        }
    }

    // What an SRE needs to see, each by the query that shows it.
    let targets = dashboard_targets();
    let wanted: [(&str, &str, &[&str]); 7] = [
        ("drops by reason and direction", "timeseries", &["bulkhead_drop_packets_total", "by (reason, direction)"]),
        (
            "top dropped identity pairs",
            "table",
            &["topk(", "bulkhead_identity_drops_total", "src_identity, dst_identity"],
        ),
        ("forwards", "timeseries", &["bulkhead_forward_packets_total"]),
        ("apply latency", "timeseries", &["histogram_quantile(", "bulkhead_policy_apply_duration_seconds_bucket"]),
        ("policy generation per node", "timeseries", &["bulkhead_policy_generation", "by (node)"]),
        ("map fill", "timeseries", &["bulkhead_map_entries", "/ bulkhead_map_capacity"]),
        ("interfaces", "timeseries", &["bulkhead_interfaces"]),
    ];
    for (what, kind, needles) in wanted {
        let found = targets.iter().any(|(title, expr)| {
            let panel = panels.iter().find(|p| p["title"] == title.as_str()).expect("panel of target");
            panel["type"] == kind && needles.iter().all(|needle| expr.contains(needle))
        });
        assert!(found, "no {kind} panel shows {what} (a query with {needles:?})");
    }

    // promtool parses standalone expressions only inside rule files: each
    // query becomes a recording rule.
    let scratch = ScratchDir::new(&format!("bh{}-dashboard-promql", std::process::id())).expect("scratch dir");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (index, (_, expr)) in targets.iter().enumerate() {
        let expr = grafana_expanded(expr, "2m", "1h");
        let quoted = serde_json::to_string(&expr).expect("JSON string");
        writeln!(rules, "      - record: dashboard:query_{index}\n        expr: {quoted}").expect("write to a String");
    }
    std::fs::write(scratch.0.join("dashboard.rules.yaml"), &rules).unwrap();
    let checked = promtool(&scratch.0, &["check", "rules", "dashboard.rules.yaml"]);
    assert!(checked.contains(&format!("SUCCESS: {} rules found", targets.len())), "{checked}");
}

/// A `PromQL` expression read just enough to name what it uses: metric
/// names starting with `bulkhead_`, the label matchers on each, and the
/// labels it groups or matches by.
#[derive(Debug, Default)]
struct Uses {
    /// Metric name -> its matchers (label, operator, value).
    metrics: BTreeMap<String, Vec<(String, String, String)>>,
    /// Labels of `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`.
    grouping: BTreeSet<String>,
}

fn uses(expr: &str) -> Uses {
    let chars: Vec<char> = expr.chars().collect();
    let mut uses = Uses::default();
    let mut i = 0;
    let identifier = |i: &mut usize| {
        let start = *i;
        while *i < chars.len() && (chars[*i].is_ascii_alphanumeric() || chars[*i] == '_' || chars[*i] == ':') {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    let skip_space = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    let quoted = |i: &mut usize| {
        // At the opening quote; returns the unescaped content.
        let quote = chars[*i];
        let mut text = String::new();
        *i += 1;
        while *i < chars.len() && chars[*i] != quote {
            if chars[*i] == '\\' {
                *i += 1;
            }
            text.push(chars[*i]);
            *i += 1;
        }
        *i += 1;
        text
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            quoted(&mut i);
        } else if c.is_ascii_alphabetic() || c == '_' {
            let word = identifier(&mut i);
            skip_space(&mut i);
            if ["by", "without", "on", "ignoring"].contains(&word.as_str()) && chars.get(i) == Some(&'(') {
                i += 1;
                while i < chars.len() && chars[i] != ')' {
                    skip_space(&mut i);
                    let label = identifier(&mut i);
                    if !label.is_empty() {
                        uses.grouping.insert(label);
                    }
                    skip_space(&mut i);
                    if chars.get(i) == Some(&',') {
                        i += 1;
                    } else if chars.get(i) != Some(&')') {
                        panic!("cannot read the label list in {expr}");
                    }
                }
            } else if word.starts_with("bulkhead_") {
                let matchers = uses.metrics.entry(word).or_default();
                if chars.get(i) == Some(&'{') {
                    i += 1;
                    loop {
                        skip_space(&mut i);
                        if chars.get(i) == Some(&'}') {
                            i += 1;
                            break;
                        }
                        let label = identifier(&mut i);
                        skip_space(&mut i);
                        let start = i;
                        while i < chars.len() && "=!~".contains(chars[i]) {
                            i += 1;
                        }
                        let op: String = chars[start..i].iter().collect();
                        skip_space(&mut i);
                        assert!(
                            label.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                                && !op.is_empty()
                                && matches!(chars.get(i), Some('"' | '\'')),
                            "cannot read the matchers in {expr}"
                        );
                        let value = quoted(&mut i);
                        matchers.push((label, op, value));
                        skip_space(&mut i);
                        if chars.get(i) == Some(&',') {
                            i += 1;
                        }
                    }
                }
            }
        } else {
            i += 1;
        }
    }
    uses
}

/// One sample of a text exposition: (name, labels).
fn exposition(text: &str) -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
    let mut samples: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, _value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("exposition line {line}"));
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let mut parsed = BTreeMap::new();
        let mut rest = labels.strip_suffix('}').unwrap_or_else(|| panic!("exposition line {line}"));
        while let Some((label, after)) = rest.split_once("=\"") {
            let mut value = String::new();
            let mut chars = after.char_indices();
            let mut end = after.len();
            while let Some((at, c)) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next().map(|(_, c)| c)),
                    '"' => {
                        end = at + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            parsed.insert(label.trim_start_matches(',').to_owned(), value);
            rest = &after[end..];
        }
        samples.entry(name.to_owned()).or_default().push(parsed);
    }
    samples
}

/// What one expression needs from the exposition that is not there.
fn missing_from(exposition: &BTreeMap<String, Vec<BTreeMap<String, String>>>, expr: &str) -> Vec<String> {
    let uses = uses(expr);
    let mut missing = Vec::new();
    let mut labels: BTreeSet<&str> = TARGET_LABELS.into_iter().collect();
    for (metric, matchers) in &uses.metrics {
        let Some(samples) = exposition.get(metric) else {
            missing.push(format!("metric {metric}"));
            continue;
        };
        labels.extend(samples.iter().flat_map(|s| s.keys().map(String::as_str)));
        for (label, op, value) in matchers {
            if TARGET_LABELS.contains(&label.as_str()) {
                continue;
            }
            if !samples.iter().any(|s| s.contains_key(label)) {
                missing.push(format!("label {label} on {metric}"));
            } else if op == "=" && !samples.iter().any(|s| s.get(label) == Some(value)) {
                missing.push(format!("{metric}{{{label}=\"{value}\"}}"));
            }
        }
    }
    for label in &uses.grouping {
        if !labels.contains(label.as_str()) {
            missing.push(format!("label {label} (grouped by) on any metric of the expression"));
        }
    }
    missing
}

#[test]
fn the_expression_reader_finds_metrics_matchers_and_groupings() {
    let uses = uses(
        "sum by (reason, direction) (rate(bulkhead_drop_packets_total{node=~\"$node\", reason=\"x\"}[5m])) / ignoring(map) bulkhead_map_capacity{map=\"conntrack\"} and up{job=\"bulkhead_y\"}",
    );
    assert_eq!(uses.metrics.keys().collect::<Vec<_>>(), ["bulkhead_drop_packets_total", "bulkhead_map_capacity"]);
    assert_eq!(uses.metrics["bulkhead_drop_packets_total"][1], ("reason".into(), "=".into(), "x".into()));
    assert_eq!(uses.metrics["bulkhead_map_capacity"], [("map".into(), "=".into(), "conntrack".into())]);
    assert_eq!(uses.grouping.iter().collect::<Vec<_>>(), ["direction", "map", "reason"]);
    let exposition = exposition(
        "# TYPE x counter\nbulkhead_map_capacity{map=\"policy\"} 3\nbulkhead_drop_packets_total{direction=\"ingress\",reason=\"x\"} 1\n",
    );
    assert_eq!(missing_from(&exposition, "bulkhead_drop_packets_total{reason=\"x\"}"), Vec::<String>::new());
    assert_eq!(
        missing_from(&exposition, "bulkhead_map_capacity{map=\"conntrack\"}"),
        ["bulkhead_map_capacity{map=\"conntrack\"}"]
    );
    assert_eq!(
        missing_from(&exposition, "sum by (cause) (bulkhead_drop_packets_totl)"),
        ["metric bulkhead_drop_packets_totl", "label cause (grouped by) on any metric of the expression"]
    );
}

fn three_tier_policy() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The daemon enforcing examples/three-tier.yaml in a fresh lab. Fields
/// drop in order: daemon, namespaces, scratch files.
struct Enforced {
    daemon: Daemon,
    lab: ThreeTier,
    scratch: ScratchDir,
}

impl Enforced {
    fn start(label: &str) -> Self {
        let lab = ThreeTier::new(label).expect("create lab namespaces");
        let scratch = ScratchDir::new(&lab.stem).expect("scratch dir");
        std::fs::create_dir_all(scratch.0.join("policy")).unwrap();
        std::fs::write(scratch.0.join("policy/three-tier.yaml"), three_tier_policy()).unwrap();
        let daemon = Daemon::start_with(&lab, &scratch.0.join("policy"), &scratch.0.join("daemon.log"), &[])
            .expect("start bulkhead");
        Self { daemon, lab, scratch }
    }

    /// A TCP connection the policy denies: the outsider is in no identity.
    fn denied_tcp(&self) {
        let target = SocketAddr::new(IpAddr::V4(self.lab.host("db").addr), 5432);
        assert_eq!(probe::tcp(&self.lab.host("outsider").ns, target).expect("tcp probe"), Outcome::TimedOut);
    }

    fn metrics(&self) -> String {
        let (status, body) = probe::http_get(&self.lab.router, self.daemon.metrics_addr, "/metrics").expect("scrape");
        assert_eq!(status, 200, "{body}");
        body
    }
}

#[test]
fn every_metric_the_alerts_and_dashboard_use_is_exported_live() {
    let env = Enforced::start("mon-live");
    // Traffic, so labelled series (identity pairs, rule verdicts) exist.
    let _servers = probe::EchoServer::start(&env.lab.host("db").ns, &env.lab.host("db").addrs(), &[5432], &[])
        .expect("echo server");
    let allowed = SocketAddr::new(IpAddr::V4(env.lab.host("db").addr), 5432);
    assert_eq!(probe::tcp(&env.lab.host("logic").ns, allowed).expect("tcp probe"), Outcome::Connected);
    env.denied_tcp();
    let text = env.metrics();
    let exposition = exposition(&text);
    assert!(
        exposition.get("bulkhead_identity_drops_total").is_some_and(|s| s.iter().any(|l| l["dst_identity"] == "db")),
        "the denied probe left no identity pair: {text}"
    );

    let mut problems = Vec::new();
    for (source, expr) in expressions() {
        for missing in missing_from(&exposition, &expr) {
            problems.push(format!("{source}: {missing} is not in the daemon's /metrics ({expr})"));
        }
    }
    assert!(problems.is_empty(), "{}\n\n/metrics:\n{text}", problems.join("\n"));
}

fn url_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A Prometheus server in the lab's router namespace, scraping the daemon
/// there every second and evaluating rules.yaml, unchanged, every second.
/// Killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    fn start(env: &Enforced) -> Self {
        let ns = &env.lab.router;
        let port = ns
            .enter(|| TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()))
            .expect("enter router")
            .expect("free port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let dir = env.scratch.0.join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: bulkhead\n    static_configs:\n      - targets: [\"{daemon}\"]\n        labels:\n          node: {node}\n",
            rules = serde_json::to_string(&overlay().join("rules.yaml").canonicalize().expect("rules.yaml")).unwrap(),
            daemon = env.daemon.metrics_addr,
            node = ns.name(),
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = ns
            .command("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start prometheus (`cargo xtask setup` installs Debian's prometheus)");
        let mut prometheus = Self { child, addr, log };
        prometheus.wait(ns, "ready", |p, ns| {
            (probe::http_get(ns, p.addr, "/-/ready").is_ok_and(|(status, _)| status == 200)).then_some(())
        });
        prometheus
    }

    /// Polls `check` for up to a minute.
    fn wait<T>(&mut self, ns: &Netns, what: &str, mut check: impl FnMut(&Self, &Netns) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait prometheus") {
                panic!("prometheus exited with {status}: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            if let Some(value) = check(self, ns) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus: not {what} within 60 s; its log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `data` of a successful API answer.
    fn api(&self, ns: &Netns, path: &str) -> Value {
        let (status, body) = probe::http_get(ns, self.addr, path).unwrap_or((0, String::new()));
        let answer: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {status} {e}: {body}"));
        assert_eq!(answer["status"], "success", "{path}: {status} {body}");
        answer["data"].clone()
    }

    /// The instant vector `query` evaluates to.
    fn query(&self, ns: &Netns, query: &str) -> Vec<Value> {
        let data = self.api(ns, &format!("/api/v1/query?query={}", url_encoded(query)));
        assert_eq!(data["resultType"], "vector", "{query}: {data}");
        data["result"].as_array().expect("result").clone()
    }

    fn alerts(&self, ns: &Netns) -> Vec<Value> {
        self.api(ns, "/api/v1/alerts")["alerts"].as_array().expect("alerts").clone()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("sample value: {sample}"))
}

fn alert_named<'a>(alerts: &'a [Value], name: &str) -> Option<&'a Value> {
    alerts.iter().find(|a| a["labels"]["alertname"] == name)
}

#[test]
fn a_real_prometheus_sees_the_drops_and_fires_on_a_rejected_policy() {
    let env = Enforced::start("mon-prom");
    let mut prometheus = Prometheus::start(&env);
    let ns = &env.lab.router;
    let node = ns.name().to_owned();

    // Scraped, with the target labels the rules and the dashboard use.
    prometheus.wait(ns, "scraping the daemon", |p, ns| {
        p.query(ns, &format!("up{{job=\"bulkhead\", node=\"{node}\"}} == 1")).first().cloned()
    });
    let denied_increase =
        "increase(bulkhead_drop_packets_total{reason=\"default_deny\", direction=\"ingress\"}[1m]) > 0";
    assert_eq!(prometheus.query(ns, denied_increase), Vec::<Value>::new(), "default_deny drops before any traffic");

    for _ in 0..3 {
        env.denied_tcp();
    }
    let drops = prometheus.wait(ns, "seeing the drops", |p, ns| p.query(ns, denied_increase).first().cloned());
    assert_eq!(drops["metric"]["node"], node.as_str());
    assert!(value(&drops) > 0.0, "{drops}");

    // Every rule evaluates without error against real series.
    prometheus.wait(ns, "evaluating every rule", |p, ns| {
        let groups = p.api(ns, "/api/v1/rules");
        let rules: Vec<Value> = groups["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().expect("rules").clone())
            .collect();
        assert_eq!(rules.len(), alerts().len(), "{groups}");
        for rule in &rules {
            assert_ne!(rule["health"], "err", "rule {} fails: {}", rule["name"], rule["lastError"]);
        }
        rules.iter().all(|r| r["health"] == "ok").then_some(())
    });
    let active = prometheus.alerts(ns);
    for quiet in ["BulkheadDown", "BulkheadPolicyRejected", "BulkheadTargetsMissing"] {
        assert!(alert_named(&active, quiet).is_none(), "{quiet} is active with a healthy daemon: {active:?}");
    }

    // A broken file in the policy directory: the daemon rejects the merged
    // candidate and keeps its policy; the real alert, as deployed, fires.
    std::fs::write(env.scratch.0.join("policy/broken.yaml"), "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nspec: [\n")
        .unwrap();
    let fired = prometheus.wait(ns, "firing BulkheadPolicyRejected", |p, ns| {
        alert_named(&p.alerts(ns), "BulkheadPolicyRejected").filter(|a| a["state"] == "firing").cloned()
    });
    assert_eq!(fired["labels"]["node"], node.as_str(), "{fired}");
    assert_eq!(fired["labels"]["severity"], "warning", "{fired}");
    assert!(fired["annotations"]["summary"].as_str().is_some_and(|s| s.contains(&node)), "{fired}");
    assert!(env.daemon.log_text().contains("rejected policy change"), "{}", env.daemon.log_text());
    // The previous policy stays enforced.
    env.denied_tcp();

    // The dashboard's queries, as Grafana sends them for all nodes, are
    // accepted by this Prometheus and find series; only queries of
    // metrics the daemon does not export yet may come back empty.
    let mut empty = Vec::new();
    for (title, expr) in dashboard_targets() {
        let result = prometheus.query(ns, &grafana_expanded(&expr, "10s", "1m"));
        if result.is_empty() {
            empty.push(format!("{title}: {expr}"));
        }
    }
    assert!(empty.is_empty(), "dashboard queries without data:\n{}", empty.join("\n"));
}
