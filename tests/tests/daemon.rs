//! The daemon as operators run it: a config file, map capacities, rules
//! that expire by themselves, and the metrics SREs watch. Needs root; run
//! through `cargo xtask test`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use aya::maps::{MapData, MapInfo};
use enforcer::datapath::{Datapath, MapSizes};
use lab::probe::{self, EchoServer, Outcome};
use lab::{Daemon, ScratchDir, ThreeTier};

fn three_tier() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier.yaml")).unwrap()
}

fn servers(lab: &ThreeTier) -> Vec<EchoServer> {
    lab.hosts.iter().map(|h| EchoServer::start(&h.ns, &h.addrs(), &[22, 5432, 8080], &[8125]).unwrap()).collect()
}

fn addr(lab: &ThreeTier, host: &str, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(lab.host(host).addr), port)
}

fn metric(lab: &ThreeTier, daemon: &Daemon, sample: &str) -> Option<u64> {
    let (_, body) = probe::http_get(&lab.router, daemon.metrics_addr, "/metrics").unwrap();
    probe::metric(&body, sample)
}

/// A lab named `label` and a scratch directory whose `policy/p.yaml` holds
/// `policy`; returned in the order they must be dropped last to first.
fn lab_with_policy(label: &str, policy: &str) -> (ThreeTier, ScratchDir, PathBuf) {
    let lab = ThreeTier::new(label).unwrap();
    let scratch = ScratchDir::new(&lab.stem).unwrap();
    let dir = scratch.0.join("policy");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("p.yaml"), policy).unwrap();
    (lab, scratch, dir)
}

/// Waits until the daemon's `sample` satisfies `done` (what: for the
/// failure message).
fn wait_for_metric(lab: &ThreeTier, daemon: &Daemon, sample: &str, what: &str, done: impl Fn(Option<u64>) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(metric(lab, daemon, sample)) {
        assert!(Instant::now() < deadline, "{sample} never became {what}: {}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_time_bound_rule_lapses_by_itself() {
    let lab = ThreeTier::new("expires").unwrap();
    let scratch = ScratchDir::new(&lab.stem).unwrap();
    let dir = scratch.0.join("policy");
    std::fs::create_dir_all(&dir).unwrap();
    // Room for the daemon to start and the first probes to run before it lapses.
    let expiry = SystemTime::now() + Duration::from_secs(10);
    let policy = three_tier().replace(
        "      ports: [\"8080/tcp\"]\n",
        &format!("      ports: [\"8080/tcp\"]\n      expires: \"{}\"\n", enforcer::events::rfc3339_at(expiry)),
    );
    std::fs::write(dir.join("p.yaml"), &policy).unwrap();
    let daemon = Daemon::start(&lab, &dir, &scratch.0.join("log")).unwrap();
    let _servers = servers(&lab);
    let before = probe::tcp(&lab.host("gateway").ns, addr(&lab, "logic", 8080)).unwrap();
    assert_eq!(before, Outcome::Connected, "{policy}\n{}", daemon.log_text());
    assert!(SystemTime::now() < expiry, "the daemon took too long to start for this test's timing");
    assert_eq!(probe::tcp(&lab.host("logic").ns, addr(&lab, "gateway", 8080)).unwrap(), Outcome::TimedOut);
    // Wait out the expiry (the rule's time, plus the daemon's reaction).
    while SystemTime::now() < expiry + Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_generation(&lab, &daemon, 2);
    assert_eq!(probe::tcp(&lab.host("gateway").ns, addr(&lab, "logic", 8080)).unwrap(), Outcome::TimedOut);
    assert_eq!(metric(&lab, &daemon, "bulkhead_policy_rules"), Some(4), "one rule fewer in force");
    assert_eq!(metric(&lab, &daemon, "bulkhead_policy_load_errors_total{reason=\"invalid\"}"), Some(0));
    assert_eq!(probe::tcp(&lab.host("logic").ns, addr(&lab, "db", 5432)).unwrap(), Outcome::Connected, "others stay");
}

#[test]
fn a_config_file_sets_every_option_and_flags_win() {
    let (lab, scratch, dir) = lab_with_policy("config", &three_tier());
    let interfaces: Vec<String> = lab.router_interfaces();
    let config = format!(
        "policy-dir: {}\ninterface: [{}]\nmetrics-addr: 127.0.0.1:9191\naudit: true\nconntrack-size: 4096\n",
        dir.display(),
        interfaces.join(", ")
    );
    let config_path = scratch.0.join("bulkhead.yaml");
    std::fs::write(&config_path, config).unwrap();
    let args =
        ["--config".to_owned(), config_path.display().to_string(), "--conntrack-size".to_owned(), "2048".to_owned()];
    let mut daemon = Daemon::spawn(&lab, &args, &scratch.0.join("log")).unwrap();
    daemon.metrics_addr = "127.0.0.1:9191".parse().unwrap();
    daemon.wait_ready(&lab.router).unwrap();
    let _servers = servers(&lab);
    // audit: true from the file: the outsider gets through, counted.
    assert_eq!(probe::tcp(&lab.host("outsider").ns, addr(&lab, "db", 5432)).unwrap(), Outcome::Connected);
    let audited = "bulkhead_audit_packets_total{direction=\"ingress\",reason=\"default_deny\"}";
    assert!(metric(&lab, &daemon, audited) >= Some(1));
    assert_eq!(metric(&lab, &daemon, "bulkhead_map_capacity{map=\"conntrack\"}"), Some(2048), "the flag won");
}

/// Starts the daemon on the lab's interfaces with the policy in `dir` and
/// `extra` flags, expecting it to refuse to start: it exits by itself,
/// unsuccessfully, with nothing attached. Returns its log.
fn refused_at_start(lab: &ThreeTier, dir: &Path, log: &Path, extra: &[&str]) -> String {
    let mut args = vec!["--policy-dir".to_owned(), dir.display().to_string()];
    args.extend(extra.iter().map(|&a| a.to_owned()));
    for interface in lab.router_interfaces() {
        args.extend(["--interface".to_owned(), interface]);
    }
    let mut daemon = Daemon::spawn(lab, &args, log).unwrap();
    let status = daemon.wait_exit(Duration::from_secs(20)).unwrap().expect("exits by itself");
    assert!(!status.success());
    assert!(!lab.any_xdp_attached().unwrap());
    daemon.log_text()
}

#[test]
fn a_policy_too_large_for_the_maps_is_refused_whole() {
    let (lab, scratch, dir) = lab_with_policy("capacity", &three_tier());
    let log = refused_at_start(&lab, &dir, &scratch.0.join("log"), &["--policy-map-size", "8"]);
    assert!(log.contains("entries in map `POLICY`, which holds 8"), "{log}");

    // Enough room for the example, not for a larger change: the change is
    // rejected, counted, and the example stays enforced.
    let start = ["--policy-map-size", "40"];
    let daemon = Daemon::start_with(&lab, &dir, &scratch.0.join("log2"), &start).unwrap();
    let _servers = servers(&lab);
    let bigger = three_tier().replace(
        "  rules:\n",
        "  rules:\n    - name: prod-anything\n      from: [{labels: {env: prod}}]\n      to: [{labels: {env: prod}}]\n      ports: [\"1-1000/udp\", \"2000-3000/udp\"]\n",
    );
    std::fs::write(dir.join(".p.yaml.new"), bigger).unwrap();
    std::fs::rename(dir.join(".p.yaml.new"), dir.join("p.yaml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&lab, &daemon, "bulkhead_policy_load_errors_total{reason=\"invalid\"}") != Some(1) {
        assert!(Instant::now() < deadline, "rejection not counted: {}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(metric(&lab, &daemon, "bulkhead_policy_generation"), Some(1));
    assert_eq!(probe::tcp(&lab.host("gateway").ns, addr(&lab, "logic", 8080)).unwrap(), Outcome::Connected);
}

#[test]
fn metrics_show_rule_hits_map_usage_and_apply_times() {
    let (lab, scratch, dir) = lab_with_policy("metrics", &three_tier());
    let daemon = Daemon::start(&lab, &dir, &scratch.0.join("log")).unwrap();
    let _servers = servers(&lab);
    for _ in 0..3 {
        assert_eq!(probe::tcp(&lab.host("gateway").ns, addr(&lab, "logic", 8080)).unwrap(), Outcome::Connected);
    }
    assert_eq!(probe::tcp(&lab.host("gateway").ns, addr(&lab, "db", 5432)).unwrap(), Outcome::TimedOut);
    let hits = "bulkhead_policy_verdicts_total{action=\"allow\",rule=\"gateway-to-logic\"}";
    assert_eq!(metric(&lab, &daemon, hits), Some(3), "one decision per new connection");
    let denied = "bulkhead_policy_verdicts_total{action=\"deny\",rule=\"gateway-never-touches-data\"}";
    assert_eq!(metric(&lab, &daemon, denied), Some(1));
    assert_eq!(probe::tcp(&lab.host("outsider").ns, addr(&lab, "db", 5432)).unwrap(), Outcome::TimedOut);
    let pair = |src: &str, dst: &str| {
        format!("bulkhead_identity_drops_total{{dst_identity=\"{dst}\",src_identity=\"{src}\"}}")
    };
    assert_eq!(metric(&lab, &daemon, &pair("gateway", "db")), Some(1));
    assert_eq!(metric(&lab, &daemon, &pair("world", "db")), Some(1));
    assert_eq!(metric(&lab, &daemon, &pair("other", "other")), Some(0));
    assert_eq!(metric(&lab, &daemon, "bulkhead_map_capacity{map=\"policy\"}"), Some(524_288));
    // Usage is refreshed every few seconds: wait for the connections to show.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&lab, &daemon, "bulkhead_conntrack_entries").unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "conntrack entries never reported");
        std::thread::sleep(Duration::from_millis(200));
    }
    let policy_entries = policy::compile(&policy::parse_str("p", &three_tier()).unwrap()).policy_entries.len() as u64;
    assert_eq!(metric(&lab, &daemon, "bulkhead_map_entries{map=\"policy\"}"), Some(policy_entries));
    assert!(metric(&lab, &daemon, "bulkhead_policy_apply_duration_seconds_count").is_some());
    assert!(metric(&lab, &daemon, "bulkhead_policy_slot_wait_seconds_count").is_some());
    assert_eq!(metric(&lab, &daemon, "bulkhead_state_insert_failures_total{map=\"conntrack\"}"), Some(0));
    let (_, body) = probe::http_get(&lab.router, daemon.metrics_addr, "/metrics").unwrap();
    assert!(body.contains("bulkhead_build_info{version=\""), "{body}");
}

/// Waits until the daemon enforces generation `generation` or later.
fn wait_for_generation(lab: &ThreeTier, daemon: &Daemon, generation: u64) {
    let what = format!("{generation} or more");
    wait_for_metric(lab, daemon, "bulkhead_policy_generation", &what, |now| now >= Some(generation));
}

/// The example's declaration of `db`.
const DB: &str = "    - name: db\n      labels: {tier: db, env: prod}\n      addresses: [\"10.0.3.10\"]\n";

/// A policy file declaring `db` alone.
fn db_alone() -> String {
    format!("apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {{name: db}}\nspec:\n  identities:\n{DB}")
}

/// Rules may come before the identities they name (as network policies
/// before their pods): the daemon accepts them, they admit nothing until
/// the identity is declared by another file, and from then on they do.
#[test]
fn rules_naming_an_identity_not_yet_declared_wait_for_it() {
    let without_db = three_tier().replace(DB, "");
    assert_ne!(without_db, three_tier(), "the example declares db as this test expects");
    let (lab, scratch, dir) = lab_with_policy("waiting", &without_db);
    let daemon = Daemon::start(&lab, &dir, &scratch.0.join("log")).unwrap();
    let _servers = servers(&lab);
    // Three rules name `db`: logic-to-db, gateway-admin-to-db and the deny.
    assert_eq!(metric(&lab, &daemon, "bulkhead_policy_unmatched_peers"), Some(3), "{}", daemon.log_text());
    assert!(daemon.log_text().contains("3 rule peer(s) select no identity yet"), "{}", daemon.log_text());
    let (logic, gateway) = (&lab.host("logic").ns, &lab.host("gateway").ns);
    assert_eq!(probe::tcp(logic, addr(&lab, "db", 5432)).unwrap(), Outcome::TimedOut, "db is `world` for now");
    assert_eq!(probe::tcp(gateway, addr(&lab, "db", 22)).unwrap(), Outcome::TimedOut);
    assert_eq!(probe::tcp(gateway, addr(&lab, "logic", 8080)).unwrap(), Outcome::Connected, "the rest is enforced");

    std::fs::write(dir.join("db.yaml"), db_alone()).unwrap();
    wait_for_generation(&lab, &daemon, 2);
    assert_eq!(metric(&lab, &daemon, "bulkhead_policy_unmatched_peers"), Some(0));
    assert_eq!(probe::tcp(logic, addr(&lab, "db", 5432)).unwrap(), Outcome::Connected, "{}", daemon.log_text());
    assert_eq!(probe::tcp(gateway, addr(&lab, "db", 22)).unwrap(), Outcome::Connected);
    assert_eq!(probe::tcp(gateway, addr(&lab, "db", 5432)).unwrap(), Outcome::TimedOut, "the deny rule now applies");

    std::fs::remove_file(dir.join("db.yaml")).unwrap();
    wait_for_generation(&lab, &daemon, 3);
    assert_eq!(metric(&lab, &daemon, "bulkhead_policy_unmatched_peers"), Some(3));
    assert_eq!(probe::tcp(logic, addr(&lab, "db", 5432)).unwrap(), Outcome::TimedOut, "gone with its identity");
    assert_eq!(metric(&lab, &daemon, "bulkhead_policy_load_errors_total{reason=\"invalid\"}"), Some(0));
}

/// The directory is taken as a whole: a file whose change is refused is
/// tried again with the next change to any file, and applied once the
/// whole is valid (the daemon keeps its text compressed meanwhile, not a
/// second copy).
#[test]
fn a_refused_file_is_tried_again_with_the_next_change() {
    assert!(three_tier().contains(DB), "the example declares db as this test expects");
    let (lab, scratch, dir) = lab_with_policy("heldback", &three_tier());
    let daemon = Daemon::start(&lab, &dir, &scratch.0.join("log")).unwrap();
    let _servers = servers(&lab);
    let logic = &lab.host("logic").ns;

    // `db` again, from another file: a duplicate, refused.
    std::fs::write(dir.join(".db.yaml.new"), db_alone()).unwrap();
    std::fs::rename(dir.join(".db.yaml.new"), dir.join("db.yaml")).unwrap();
    let invalid = "bulkhead_policy_load_errors_total{reason=\"invalid\"}";
    wait_for_metric(&lab, &daemon, invalid, "1", |now| now == Some(1));
    assert_eq!(metric(&lab, &daemon, "bulkhead_policy_generation"), Some(1));

    // The example without `db`: the refused file's `db` is no longer a
    // duplicate, and comes with this change (left out, no rule's `db`
    // would be declared).
    std::fs::write(dir.join(".p.yaml.new"), three_tier().replace(DB, "")).unwrap();
    std::fs::rename(dir.join(".p.yaml.new"), dir.join("p.yaml")).unwrap();
    wait_for_generation(&lab, &daemon, 2);
    assert_eq!(metric(&lab, &daemon, "bulkhead_policy_unmatched_peers"), Some(0), "{}", daemon.log_text());
    assert_eq!(probe::tcp(logic, addr(&lab, "db", 5432)).unwrap(), Outcome::Connected, "{}", daemon.log_text());
    assert_eq!(metric(&lab, &daemon, invalid), Some(1));
}

/// `policy check` names each peer that selects nothing yet, as a warning,
/// and still passes the policy; an error still fails it.
#[test]
fn policy_check_warns_of_peers_that_select_nothing_yet() {
    let scratch = ScratchDir::new(&format!("bh-check-warns-{}", std::process::id())).unwrap();
    let file = scratch.0.join("p.yaml");
    let db = "    - name: db\n      labels: {tier: db, env: prod}\n      addresses: [\"10.0.3.10\"]\n";
    std::fs::write(
        &file,
        three_tier().replace(db, "").replace(
            "{tier: logic}}]\n      to: [{identity: db}]",
            "{tier: logic}}]\n      to: [{labels: {tier: dbs}}]",
        ),
    )
    .unwrap();
    let check = |path: &Path| {
        std::process::Command::new(lab::topology::bulkhead_binary())
            .args(["policy", "check"])
            .arg(path)
            .output()
            .unwrap()
    };
    let output = check(&file);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    let warnings: Vec<&str> = stdout.lines().filter(|line| line.contains(": warning: ")).collect();
    assert_eq!(warnings.len(), 3, "{stdout}");
    assert!(warnings[0].ends_with("label selector {tier=dbs} in rule `logic-to-db` matches no identity; the peer matches nothing until an identity carries those labels"), "{stdout}");
    assert!(warnings[1].contains("rule `gateway-admin-to-db` names identity `db`, which is not declared"), "{stdout}");
    assert!(warnings.iter().all(|w| w.starts_with(&format!("{}:", file.display()))), "{stdout}");
    assert!(stdout.contains("; 3 warning(s)"), "{stdout}");
    std::fs::write(&file, three_tier().replace("name: db\n", "name: logic\n")).unwrap();
    let output = check(&file);
    assert_eq!(output.status.code(), Some(1), "a duplicate name is still an error");
    assert!(String::from_utf8_lossy(&output.stdout).contains("duplicate identity name `logic`"));
}

/// A policy directory that cannot be read is a source that is down: the
/// last policy read from it stays enforced, `bulkhead_source_up` and
/// `/readyz` say so, and both recover when it can be read again.
#[test]
fn a_policy_directory_that_cannot_be_read_is_a_source_down() {
    let (lab, scratch, dir) = lab_with_policy("srcdown", &three_tier());
    let daemon = Daemon::start(&lab, &dir, &scratch.0.join("log")).unwrap();
    let _servers = servers(&lab);
    let up = "bulkhead_source_up{source=\"files\"}";
    let wait_for = |value: u64| wait_for_metric(&lab, &daemon, up, &value.to_string(), |now| now == Some(value));
    assert_eq!(metric(&lab, &daemon, up), Some(1));
    // Root reads whatever its mode: the directory goes away instead.
    let away = scratch.0.join("policy.away");
    std::fs::rename(&dir, &away).unwrap();
    wait_for(0);
    let (status, body) = probe::http_get(&lab.router, daemon.metrics_addr, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("source files: ") && body.contains("stays enforced"), "{body}");
    let (gateway, logic) = (&lab.host("gateway").ns, &lab.host("logic").ns);
    assert_eq!(probe::tcp(gateway, addr(&lab, "logic", 8080)).unwrap(), Outcome::Connected, "still enforced");
    assert_eq!(probe::tcp(logic, addr(&lab, "gateway", 8080)).unwrap(), Outcome::TimedOut, "still enforced");
    assert_eq!(metric(&lab, &daemon, "bulkhead_policy_generation"), Some(1));

    std::fs::rename(&away, &dir).unwrap();
    wait_for(1);
    let (status, body) = probe::http_get(&lab.router, daemon.metrics_addr, "/readyz").unwrap();
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert!(daemon.log_text().contains("the policy directory can be read again"), "{}", daemon.log_text());
}

/// Repeated probes from another thread: (allowed outcomes, denied outcomes).
fn probe_continuously(lab: &ThreeTier, stop: &std::sync::atomic::AtomicBool) -> (Vec<Outcome>, Vec<Outcome>) {
    let mut allowed = Vec::new();
    let mut denied = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        allowed.push(probe::tcp(&lab.host("gateway").ns, addr(lab, "logic", 8080)).unwrap());
        denied.push(probe::tcp(&lab.host("outsider").ns, addr(lab, "db", 5432)).unwrap());
    }
    (allowed, denied)
}

#[test]
fn enforcement_survives_sigkill_and_restart() {
    let (lab, scratch, dir) = lab_with_policy("restart", &three_tier());
    let _servers = servers(&lab);
    let mut first = Daemon::start_persistent(&lab, &dir, &scratch.0.join("log1"), &[]).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (allowed, denied) = std::thread::scope(|scope| {
        let probes = scope.spawn(|| probe_continuously(&lab, &stop));
        std::thread::sleep(Duration::from_secs(1));
        first.kill();
        // The daemon is gone; the pinned programs and maps keep enforcing.
        std::thread::sleep(Duration::from_secs(2));
        let second = Daemon::start_persistent(&lab, &dir, &scratch.0.join("log2"), &[]).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let outcomes = probes.join().unwrap();
        let log = second.log_text();
        assert!(log.contains("adopted enforcement state (policy generation 1)"), "{log}");
        assert!(log.contains("replaced atomically"), "{log}");
        assert_eq!(
            metric(&lab, &second, "bulkhead_policy_generation"),
            Some(2),
            "continues from the adopted generation"
        );
        outcomes
    });
    assert!(allowed.len() >= 3 && denied.len() >= 3, "too few probes: {} / {}", allowed.len(), denied.len());
    assert!(allowed.iter().all(|o| *o == Outcome::Connected), "an allowed probe failed: {allowed:?}");
    assert!(denied.iter().all(|o| *o == Outcome::TimedOut), "a denied probe passed: {denied:?}");
}

#[test]
fn sigterm_leaves_the_node_protected_until_uninstall() {
    let (lab, scratch, dir) = lab_with_policy("uninstall", &three_tier());
    let _servers = servers(&lab);
    let mut daemon = Daemon::start_persistent(&lab, &dir, &scratch.0.join("log"), &[]).unwrap();
    let status = daemon.stop().unwrap().expect("exits on SIGTERM");
    assert!(status.success(), "{}", daemon.log_text());
    assert!(lab.any_xdp_attached().unwrap(), "still attached with the daemon gone");
    assert_eq!(probe::tcp(&lab.host("outsider").ns, addr(&lab, "db", 5432)).unwrap(), Outcome::TimedOut);
    assert_eq!(probe::tcp(&lab.host("gateway").ns, addr(&lab, "logic", 8080)).unwrap(), Outcome::Connected);

    let root = lab.bpffs_root();
    let output = lab
        .router
        .command(lab::topology::bulkhead_binary().to_str().unwrap())
        .args(["uninstall", "--bpffs-root", root.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("detached"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(!lab.any_xdp_attached().unwrap(), "uninstall detaches XDP");
    assert!(!lab.anything_pinned(), "uninstall removes every pin");
    assert_eq!(probe::tcp(&lab.host("outsider").ns, addr(&lab, "db", 5432)).unwrap(), Outcome::Connected);
    // Node traffic denied at TC egress before is open again too.
    assert_eq!(probe::tcp(&lab.router, addr(&lab, "logic", 8080)).unwrap(), Outcome::Connected);
}

#[test]
fn drops_are_reported_as_json_lines() {
    let (lab, scratch, dir) = lab_with_policy("events", &three_tier());
    let events = scratch.0.join("events.jsonl");
    let events_arg = events.display().to_string();
    let daemon = Daemon::start_with(&lab, &dir, &scratch.0.join("log"), &["--events-to", &events_arg]).unwrap();
    let _servers = servers(&lab);
    assert_eq!(probe::tcp(&lab.host("outsider").ns, addr(&lab, "db", 5432)).unwrap(), Outcome::TimedOut);
    assert_eq!(probe::tcp(&lab.host("gateway").ns, addr(&lab, "db", 5432)).unwrap(), Outcome::TimedOut);
    let read_until = |count: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&events).unwrap_or_default();
            let records: Vec<serde_json::Value> =
                text.lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect();
            if records.len() >= count || Instant::now() > deadline {
                break records;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let records = read_until(2);
    let find = |src: &str| {
        records.iter().find(|r| r["src"] == src).unwrap_or_else(|| panic!("no event from {src}: {records:?}"))
    };
    let world = find("10.0.9.10");
    assert_eq!(world["dst"], "10.0.3.10");
    assert_eq!(world["dst_port"], 5432);
    assert_eq!(world["protocol"], "tcp");
    assert_eq!((world["src_identity"].as_str(), world["dst_identity"].as_str()), (Some("world"), Some("db")));
    assert_eq!((world["reason"].as_str(), world["verdict"].as_str()), (Some("default_deny"), Some("drop")));
    assert_eq!((world["interface"].as_str(), world["direction"].as_str()), (Some("to-outsider"), Some("ingress")));
    assert!(world["time"].as_str().is_some_and(|t| t.ends_with('Z') && t.len() == 24), "{world}");
    let deny = find("10.0.1.10");
    assert_eq!(deny["rule"], "gateway-never-touches-data");
    assert_eq!(deny["reason"], "deny_rule");
    // Events name what the policy in force says: a file declaring the
    // outsider's address as an identity of its own renames its drops.
    let declared = "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: partners}\nspec:\n  identities:\n    - {name: partner, addresses: [\"10.0.9.10\"]}\n";
    std::fs::write(dir.join("partners.yaml"), declared).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&lab, &daemon, "bulkhead_policy_generation") < Some(2) {
        assert!(Instant::now() < deadline, "the new file was not applied: {}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(probe::tcp(&lab.host("outsider").ns, addr(&lab, "db", 5432)).unwrap(), Outcome::TimedOut);
    let records = read_until(records.len() + 1);
    let latest = records.iter().rev().find(|r| r["src"] == "10.0.9.10").expect("an event from the outsider");
    assert_eq!((latest["src_identity"].as_str(), latest["dst_identity"].as_str()), (Some("partner"), Some("db")));
}

#[test]
fn a_configmap_style_symlink_swap_is_applied() {
    // The layout kubelet gives a mounted ConfigMap: the visible file is a
    // symlink into `..data`, itself a symlink to a timestamped directory;
    // an update writes a new directory and renames a new `..data` over the
    // old one in one step.
    let lab = ThreeTier::new("configmap").unwrap();
    let scratch = ScratchDir::new(&lab.stem).unwrap();
    let dir = scratch.0.join("policy");
    let version = |name: &str, text: &str| {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("policy.yaml"), text).unwrap();
    };
    version("..2026_11_25_a", &three_tier());
    std::os::unix::fs::symlink("..2026_11_25_a", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/policy.yaml", dir.join("policy.yaml")).unwrap();
    let daemon = Daemon::start(&lab, &dir, &scratch.0.join("log")).unwrap();
    let _servers = servers(&lab);
    assert_eq!(probe::tcp(&lab.host("outsider").ns, addr(&lab, "db", 5432)).unwrap(), Outcome::TimedOut);

    let opened = three_tier().replace(
        "  rules:\n",
        "  rules:\n    - name: outsider-to-db\n      from: [{identity: world}]\n      to: [{identity: db}]\n      ports: [\"5432/tcp\"]\n",
    );
    version("..2026_11_25_b", &opened);
    std::os::unix::fs::symlink("..2026_11_25_b", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&lab, &daemon, "bulkhead_policy_generation") < Some(2) {
        assert!(Instant::now() < deadline, "the swap was not applied: {}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(probe::tcp(&lab.host("outsider").ns, addr(&lab, "db", 5432)).unwrap(), Outcome::Connected);
    assert_eq!(
        metric(&lab, &daemon, "bulkhead_policy_load_errors_total{reason=\"invalid\"}"),
        Some(0),
        "no half-read state rejected"
    );
}

#[test]
fn maps_pinned_with_another_layout_are_rebuilt_and_tampered_ones_refused() {
    let (lab, scratch, dir) = lab_with_policy("layout", &three_tier());
    let maps = lab.bpffs_root().join("maps");
    let stamped = |name: &str| {
        let layout = enforcer_common::maps::LAYOUT.iter().find(|l| l.name == name).unwrap();
        maps.join(enforcer::datapath::map_pin_name(layout))
    };
    {
        let _datapath = Datapath::load_pinned(MapSizes::default(), Some(&lab.bpffs_root())).unwrap();
        // The table the daemon stamps pins with is the object's own layout.
        for layout in enforcer_common::maps::LAYOUT {
            let info = MapInfo::from_pin(stamped(layout.name)).unwrap();
            assert_eq!((info.key_size(), info.value_size()), (layout.key, layout.value), "layout of {}", layout.name);
        }
        // What a Bulkhead from before layout stamps, with a smaller CONFIG
        // value, would leave: bare names, one of another size.
        for layout in enforcer_common::maps::LAYOUT {
            MapData::from_pin(stamped(layout.name)).unwrap().pin(maps.join(layout.name)).unwrap();
            std::fs::remove_file(stamped(layout.name)).unwrap();
        }
        std::fs::remove_file(maps.join("CONFIG")).unwrap();
        MapData::from_pin(maps.join("STATE_ERRORS")).unwrap().pin(maps.join("CONFIG")).unwrap();
    }
    let mut daemon = Daemon::start_persistent(&lab, &dir, &scratch.0.join("log"), &[]).unwrap();
    let log = daemon.log_text();
    assert!(log.contains("removed map CONFIG, pinned by a Bulkhead with another map layout"), "{log}");
    assert!(!log.contains("removed map CONNTRACK,"), "same-layout maps are adopted: {log}");
    let config = MapInfo::from_pin(stamped("CONFIG")).unwrap();
    assert_eq!(config.value_size(), enforcer_common::maps::LAYOUT.iter().find(|l| l.name == "CONFIG").unwrap().value);
    assert!(!maps.join("CONFIG").exists() && !maps.join("CONNTRACK").exists(), "bare pins are gone");
    daemon.stop().unwrap();
    // Detach (the maps stay pinned), so the refused start below shows it attaches nothing.
    std::fs::remove_dir_all(lab.bpffs_root().join("links")).unwrap();

    // A pin whose stamp lies about its layout was not made by Bulkhead: refused.
    std::fs::remove_file(stamped("CONFIG")).unwrap();
    MapData::from_pin(stamped("STATE_ERRORS")).unwrap().pin(stamped("CONFIG")).unwrap();
    let log = refused_at_start(&lab, &dir, &scratch.0.join("log2"), &["--detach-on-exit"]);
    assert!(log.contains("does not have the layout its name says"), "{log}");
    assert!(log.contains("run `bulkhead uninstall` and start again"), "{log}");
}
