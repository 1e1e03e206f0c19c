//! Prometheus exposition. Kernel counters are read at scrape time, so
//! `/metrics` is always exactly what the kernel counted.

use std::sync::{Arc, Mutex};

use enforcer_common::{Direction, DropReason, StateError};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::datapath::{CounterSnapshot, Datapath};

/// Why a candidate policy was refused: the `reason` label of
/// `bulkhead_policy_load_errors_total`. `invalid`: the policy itself (or
/// the maps' room); `unreadable`: the directory or a file could not be
/// read; the rest are `--trusted-keys` refusals (see `signing`).
pub const LOAD_ERROR_REASONS: [&str; 10] = [
    "invalid",
    "unreadable",
    "unsigned",
    "untrusted_key",
    "bad_signature",
    "bad_manifest",
    "files_differ",
    "expired",
    "rollback",
    "trusted_keys",
];

/// Refused candidate policies, counted by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadErrors([u64; LOAD_ERROR_REASONS.len()]);

impl LoadErrors {
    /// Counts one refusal for `reason` (one of [`LOAD_ERROR_REASONS`]; any
    /// other counts as `invalid`).
    pub fn count(&mut self, reason: &str) {
        let at = LOAD_ERROR_REASONS.iter().position(|known| *known == reason).unwrap_or(0);
        self.0[at] += 1;
    }

    #[must_use]
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Every reason with its count, zeros included.
    pub fn by_reason(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        LOAD_ERROR_REASONS.iter().copied().zip(self.0.iter().copied())
    }
}

/// Policy figures exported beside the counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct PolicyStats {
    pub identities: usize,
    pub rules: usize,
    /// Generation of the enforced policy; bumped by every applied change.
    pub generation: u32,
    /// Candidate policies rejected since start, by reason.
    pub load_errors: LoadErrors,
    /// Identity pairs exported by name in `bulkhead_identity_drops_total`;
    /// the rest are summed under `other`.
    pub identity_drops_top: usize,
    /// Rule peers of the enforced policy that select no identity yet.
    pub unmatched_peers: usize,
    /// Whether the policy directory could be read at the last look (while
    /// it cannot, the last policy read from it stays enforced): derived
    /// from [`Shared::source_down`] when metrics are rendered.
    pub files_up: bool,
    /// With `--kubernetes`: whether every watcher has listed and none is
    /// failing, derived from [`Shared::kubernetes_down`]; `None` without.
    pub kubernetes_up: Option<bool>,
    /// With `--kubernetes`: cluster objects the policy refuses (each
    /// reported in the log; what they gave before stays enforced).
    pub kubernetes_rejected: usize,
    /// Quarantined targets, from [`Shared::quarantine`] at each scrape.
    pub quarantined: usize,
    /// Suspects the lateral-movement detector flagged since start, and the
    /// sources it tracks now; from [`Shared::lateral`] at each scrape.
    pub lateral_suspects: u64,
    pub lateral_tracked: usize,
}

/// How full the maps are; refreshed by the daemon's maintenance loop, since
/// counting the conntrack table walks it.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// (map, entries, capacity) for the maps a policy fills.
    pub maps: Vec<(&'static str, u64, u32)>,
    /// Tracked connection entries and the table's capacity.
    pub conntrack: (u64, u32),
}

/// The interfaces the daemon enforces on, and what changed them.
#[derive(Debug, Clone, Default)]
pub struct InterfaceStats {
    /// Interfaces each hook is attached to, by hook label.
    pub hooks: Vec<(&'static str, usize)>,
    /// Interfaces attached, removed, renamed, or that failed to attach, since start.
    pub changes: std::collections::BTreeMap<&'static str, u64>,
    /// Pinned state repaired (defunct, renamed, unselected, ... links), since start.
    pub repairs: std::collections::BTreeMap<&'static str, u64>,
    /// Selected interfaces that could not be attached, with the reason:
    /// the node is not fully enforced while any is listed.
    pub unenforced: std::collections::BTreeMap<String, String>,
}

/// Labels of `bulkhead_interface_changes_total`, always exported.
pub const INTERFACE_CHANGES: [&str; 4] = ["attached", "removed", "renamed", "attach_failed"];
/// Labels of `bulkhead_pin_repairs_total`, always exported.
pub const PIN_REPAIRS: [&str; 6] = ["defunct", "renamed", "unselected", "unreadable", "duplicate", "map_rebuilt"];

/// Registers metrics into one fresh registry per scrape.
struct Builder {
    registry: Registry,
}

impl Builder {
    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
        let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(vec.clone()))?;
        Ok(vec)
    }

    fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, prometheus::Error> {
        let vec = IntGaugeVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(vec.clone()))?;
        Ok(vec)
    }

    fn gauge(&self, name: &str, help: &str, value: i64) -> Result<(), prometheus::Error> {
        let gauge = IntGauge::new(name, help)?;
        gauge.set(value);
        self.registry.register(Box::new(gauge))
    }
}

fn saturating(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// Renders the text exposition.
pub fn render(
    snapshot: &CounterSnapshot,
    stats: PolicyStats,
    usage: &Usage,
    interfaces: &InterfaceStats,
    cluster_versions: &std::collections::BTreeMap<&'static str, u64>,
    histograms: &[&Histogram],
) -> Result<String, prometheus::Error> {
    let builder = Builder { registry: Registry::new() };
    for histogram in histograms {
        builder.registry.register(Box::new((*histogram).clone()))?;
    }
    traffic(&builder, snapshot)?;
    policy_figures(&builder, snapshot, stats)?;
    usage_figures(&builder, snapshot, usage)?;
    interface_figures(&builder, interfaces)?;
    if !cluster_versions.is_empty() {
        let versions = builder.gauges(
            "bulkhead_kubernetes_resource_version",
            "The newest resourceVersion of each watched kind that the enforced policy includes: how current this node's view of the cluster is (compare with the API server's).",
            &["resource"],
        )?;
        for (resource, version) in cluster_versions {
            versions.with_label_values(&[resource]).set(i64::try_from(*version).unwrap_or(i64::MAX));
        }
    }
    let build = builder.gauges("bulkhead_build_info", "Build of the running daemon.", &["version"])?;
    build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    let registry = builder.registry;
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Forwarded, dropped and audited packets and bytes.
fn traffic(builder: &Builder, snapshot: &CounterSnapshot) -> Result<(), prometheus::Error> {
    let by_reason = ["reason", "direction"];
    let drop_packets = builder.counters(
        "bulkhead_drop_packets_total",
        "Packets dropped, by drop reason and direction.",
        &by_reason,
    )?;
    let drop_bytes = builder.counters(
        "bulkhead_drop_bytes_total",
        "Bytes of dropped packets, by drop reason and direction.",
        &by_reason,
    )?;
    let audit_packets = builder.counters(
        "bulkhead_audit_packets_total",
        "Packets audit mode passed that the policy would have dropped, by would-be reason and direction.",
        &by_reason,
    )?;
    let audit_bytes = builder.counters(
        "bulkhead_audit_bytes_total",
        "Bytes of packets audit mode passed, by would-be reason and direction.",
        &by_reason,
    )?;
    let forward_packets =
        builder.counters("bulkhead_forward_packets_total", "Packets passed, by direction.", &["direction"])?;
    let forward_bytes =
        builder.counters("bulkhead_forward_bytes_total", "Bytes of passed packets, by direction.", &["direction"])?;
    for direction in Direction::ALL {
        for reason in DropReason::ALL {
            let labels = [reason.label(), direction.label()];
            let counter = snapshot.drops.get(&(reason, direction)).copied().unwrap_or_default();
            drop_packets.with_label_values(&labels).inc_by(counter.packets);
            drop_bytes.with_label_values(&labels).inc_by(counter.bytes);
            let counter = snapshot.audits.get(&(reason, direction)).copied().unwrap_or_default();
            audit_packets.with_label_values(&labels).inc_by(counter.packets);
            audit_bytes.with_label_values(&labels).inc_by(counter.bytes);
        }
        let counter = snapshot.forwards.get(&direction).copied().unwrap_or_default();
        forward_packets.with_label_values(&[direction.label()]).inc_by(counter.packets);
        forward_bytes.with_label_values(&[direction.label()]).inc_by(counter.bytes);
    }
    Ok(())
}

/// The enforced policy: size, generation, rejections, per-rule decisions.
fn policy_figures(builder: &Builder, snapshot: &CounterSnapshot, stats: PolicyStats) -> Result<(), prometheus::Error> {
    builder.gauge(
        "bulkhead_identities",
        "Identities declared by the enforced policy.",
        saturating(stats.identities),
    )?;
    builder.gauge("bulkhead_policy_rules", "Rules in the enforced policy.", saturating(stats.rules))?;
    builder.gauge(
        "bulkhead_policy_unmatched_peers",
        "Rule peers of the enforced policy that select no identity yet (an undeclared name, labels no identity carries).",
        saturating(stats.unmatched_peers),
    )?;
    builder.gauge("bulkhead_policy_generation", "Generation of the enforced policy.", i64::from(stats.generation))?;
    let sources = builder.gauges(
        "bulkhead_source_up",
        "Whether each policy source can be read (1) or not (0); while one cannot, what it gave last stays enforced.",
        &["source"],
    )?;
    sources.with_label_values(&["files"]).set(i64::from(stats.files_up));
    if let Some(up) = stats.kubernetes_up {
        sources.with_label_values(&["kubernetes"]).set(i64::from(up));
        builder.gauge(
            "bulkhead_kubernetes_objects_rejected",
            "Cluster objects (SegmentPolicies, NetworkPolicies, pods) the policy refuses, each reported in the log; what they gave before stays enforced.",
            i64::try_from(stats.kubernetes_rejected).unwrap_or(i64::MAX),
        )?;
    }
    builder.gauge(
        "bulkhead_quarantined",
        "Targets quarantined now (bulkhead quarantine list): their addresses are isolated whatever the policy says.",
        saturating(stats.quarantined),
    )?;
    let suspects = builder.counters(
        "bulkhead_lateral_movement_suspects_total",
        "Sources the lateral-movement detector flagged for probing targets they may not reach.",
        &[],
    )?;
    suspects.with_label_values(&[] as &[&str]).inc_by(stats.lateral_suspects);
    builder.gauge(
        "bulkhead_lateral_movement_tracked_sources",
        "Sources the lateral-movement detector tracks now (denied recently).",
        saturating(stats.lateral_tracked),
    )?;
    let errors = builder.counters(
        "bulkhead_policy_load_errors_total",
        "Candidate policies rejected (the previous policy stayed enforced), by reason.",
        &["reason"],
    )?;
    for (reason, count) in stats.load_errors.by_reason() {
        errors.with_label_values(&[reason]).inc_by(count);
    }
    let pairs = builder.counters(
        "bulkhead_identity_drops_total",
        "Dropped packets by source and destination identity: the top pairs by name, the rest as other.",
        &["src_identity", "dst_identity"],
    )?;
    let mut ranked: Vec<(&(String, String), &u64)> = snapshot.identity_drops.iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let mut other = 0;
    for (rank, ((src, dst), count)) in ranked.into_iter().enumerate() {
        if rank < stats.identity_drops_top {
            pairs.with_label_values(&[src.as_str(), dst.as_str()]).inc_by(*count);
        } else {
            other += count;
        }
    }
    pairs.with_label_values(&["other", "other"]).inc_by(other);
    let verdicts = builder.counters(
        "bulkhead_policy_verdicts_total",
        "Policy decisions made by each rule (new and re-judged flows; established flows pass by conntrack).",
        &["rule", "action"],
    )?;
    for ((rule, action), count) in &snapshot.rules {
        verdicts.with_label_values(&[rule.as_str(), &action.to_string()]).inc_by(*count);
    }
    Ok(())
}

/// How full the maps are, and what the kernel could not record.
fn usage_figures(builder: &Builder, snapshot: &CounterSnapshot, usage: &Usage) -> Result<(), prometheus::Error> {
    let failures = builder.counters(
        "bulkhead_state_insert_failures_total",
        "State-table inserts the kernel could not make (the packet was still judged).",
        &["map"],
    )?;
    let lost = builder.counters(
        "bulkhead_events_lost_total",
        "Events not reported: drops and audits over the per-CPU rate (rate_limit) or with the ring full (ring_full); admitted connections over their own rate, reported only to the lateral-movement detector (admit_rate_limit).",
        &["cause"],
    )?;
    for error in StateError::ALL {
        let count = snapshot.state_errors.get(&error).copied().unwrap_or(0);
        match error {
            StateError::Conntrack | StateError::Fragments | StateError::IdentityDrops => {
                failures.with_label_values(&[error.label()]).inc_by(count);
            }
            StateError::EventsRateLimited | StateError::EventsRingFull | StateError::AdmitsRateLimited => {
                lost.with_label_values(&[error.label()]).inc_by(count);
            }
        }
    }
    let entries = builder.gauges("bulkhead_map_entries", "Entries in each map.", &["map"])?;
    let capacity = builder.gauges("bulkhead_map_capacity", "Capacity of each map.", &["map"])?;
    let (ct_entries, ct_capacity) = usage.conntrack;
    for (map, used, size) in usage.maps.iter().copied().chain(std::iter::once(("conntrack", ct_entries, ct_capacity))) {
        entries.with_label_values(&[map]).set(saturating(used));
        capacity.with_label_values(&[map]).set(i64::from(size));
    }
    builder.gauge(
        "bulkhead_conntrack_entries",
        "Tracked connection entries (two per connection).",
        saturating(ct_entries),
    )
}

/// Where the programs are attached, and the repairs that kept them so.
fn interface_figures(builder: &Builder, stats: &InterfaceStats) -> Result<(), prometheus::Error> {
    let hooks = builder.gauges(
        "bulkhead_interfaces",
        "Interfaces each program is attached to, by hook (xdp, tc_ingress, tc_egress).",
        &["hook"],
    )?;
    for (hook, count) in &stats.hooks {
        hooks.with_label_values(&[hook]).set(saturating(*count));
    }
    let changes = builder.counters(
        "bulkhead_interface_changes_total",
        "Interfaces attached, removed (gone or no longer selected), renamed, or that failed to attach.",
        &["change"],
    )?;
    for change in INTERFACE_CHANGES {
        changes.with_label_values(&[change]).inc_by(stats.changes.get(change).copied().unwrap_or(0));
    }
    let repairs = builder.counters(
        "bulkhead_pin_repairs_total",
        "Pinned state repaired at start: links defunct, renamed, unselected, unreadable or duplicate; maps of another layout rebuilt.",
        &["repair"],
    )?;
    for repair in PIN_REPAIRS {
        repairs.with_label_values(&[repair]).inc_by(stats.repairs.get(repair).copied().unwrap_or(0));
    }
    builder.gauge(
        "bulkhead_interfaces_unenforced",
        "Selected interfaces the programs could not be attached to; /readyz fails while it is above 0.",
        saturating(stats.unenforced.len()),
    )
}

/// What the HTTP handlers share with the daemon.
pub struct Shared {
    pub datapath: Mutex<Option<Datapath>>,
    pub stats: Mutex<PolicyStats>,
    pub usage: Mutex<Usage>,
    /// The policy engine: the one copy of the enforced policy. The
    /// maintainer thread, its only writer, changes it; the event pump reads
    /// it to name identities and rules, holding no other lock meanwhile.
    pub engine: std::sync::RwLock<policy::Engine>,
    /// The sources of the enforced policy (files or a push), for the API.
    pub sources: Mutex<Vec<Arc<crate::sources::StoredSource>>>,
    /// Why the last candidate policy was rejected, if it was.
    pub last_error: Mutex<Option<String>>,
    /// Live drop and audit events (JSON lines) for API subscribers.
    pub events: tokio::sync::broadcast::Sender<String>,
    /// The most recent events, for `bulkhead flows` without `--follow`.
    pub recent_events: Mutex<std::collections::VecDeque<String>>,
    /// The flows audit mode passed, for `bulkhead policy suggest`.
    pub observed: Mutex<crate::observed::Observed>,
    /// Which allow rules are used, for `bulkhead policy unused`.
    pub rule_usage: Mutex<crate::usage::RuleUsage>,
    pub ready: std::sync::atomic::AtomicBool,
    /// Why a policy source cannot be read now, if one cannot: `/readyz`
    /// says so (the last policy stays enforced meanwhile).
    pub source_down: Mutex<Option<String>>,
    /// With `--kubernetes`: why the cluster's objects are not all known
    /// now (a watcher failing, or not listed yet); `/readyz` says so.
    pub kubernetes_down: Mutex<Option<String>>,
    /// With `--kubernetes`: the newest resourceVersion of each kind
    /// (by plural) that the enforced policy includes.
    pub kubernetes_versions: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Where the programs are attached; see [`InterfaceStats`].
    pub interfaces: Mutex<InterfaceStats>,
    /// Quarantined targets (see `quarantine`).
    pub quarantine: Mutex<crate::quarantine::Quarantine>,
    /// The lateral-movement detector (see `lateral`), fed by the event pump.
    pub lateral: Mutex<crate::lateral::Detector>,
    /// JSON lines the daemon itself reports (quarantine, lateral movement),
    /// waiting for the event pump to write them where drop events go.
    pub daemon_events: Mutex<std::collections::VecDeque<String>>,
    /// Time from reading a changed policy to publishing its generation.
    pub apply_duration: Histogram,
    /// Of that, the wait for program runs still reading the slot rewritten.
    pub slot_wait: Histogram,
}

fn apply_duration_histogram() -> Histogram {
    let opts = HistogramOpts::new(
        "bulkhead_policy_apply_duration_seconds",
        "Time from reading a changed policy to enforcing it: parse, validate, compile, write, switch.",
    )
    .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]);
    Histogram::with_opts(opts).expect("static histogram options are valid")
}

fn slot_wait_histogram() -> Histogram {
    let opts = HistogramOpts::new(
        "bulkhead_policy_slot_wait_seconds",
        "Part of each policy apply spent waiting for program runs that may still read the slot it rewrites; non-zero only for a change within an RCU grace period of the one before.",
    )
    .buckets(vec![0.0001, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]);
    Histogram::with_opts(opts).expect("static histogram options are valid")
}

impl Shared {
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            datapath: Mutex::new(None),
            stats: Mutex::new(PolicyStats::default()),
            usage: Mutex::new(Usage::default()),
            engine: std::sync::RwLock::new(policy::Engine::new()),
            sources: Mutex::new(Vec::new()),
            last_error: Mutex::new(None),
            source_down: Mutex::new(None),
            kubernetes_down: Mutex::new(None),
            kubernetes_versions: Mutex::new(std::collections::BTreeMap::new()),
            events: tokio::sync::broadcast::channel(4096).0,
            recent_events: Mutex::new(std::collections::VecDeque::new()),
            observed: Mutex::new(crate::observed::Observed::default()),
            rule_usage: Mutex::new(crate::usage::RuleUsage::default()),
            ready: std::sync::atomic::AtomicBool::new(false),
            interfaces: Mutex::new(InterfaceStats::default()),
            quarantine: Mutex::new(crate::quarantine::Quarantine::default()),
            lateral: Mutex::new(crate::lateral::Detector::new(crate::lateral::LateralConfig::default())),
            daemon_events: Mutex::new(std::collections::VecDeque::new()),
            apply_duration: apply_duration_histogram(),
            slot_wait: slot_wait_histogram(),
        })
    }
}

/// Daemon events waiting for the pump beyond this are dropped, oldest first
/// (they are in the log too).
const MAX_DAEMON_EVENTS: usize = 4096;

/// Recent events kept for `bulkhead flows` without `--follow`.
pub const RECENT_EVENTS: usize = 1000;

impl Shared {
    /// Reports a daemon event (one JSON line): to API subscribers, to the
    /// recent events, and where drop events go.
    pub fn announce(&self, line: String) {
        let _ = self.events.send(line.clone());
        self.remember_event(line.clone());
        let mut waiting = self.daemon_events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if waiting.len() == MAX_DAEMON_EVENTS {
            waiting.pop_front();
        }
        waiting.push_back(line);
    }

    /// Keeps `line` among the recent events.
    pub fn remember_event(&self, line: String) {
        let mut recent = self.recent_events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.len() == RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(line);
    }

    /// Takes the daemon events waiting to be written.
    pub fn take_daemon_events(&self) -> Vec<String> {
        self.daemon_events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use enforcer_common::Counter;

    use super::*;

    #[test]
    fn renders_every_reason_and_direction_with_values() {
        let mut snapshot = CounterSnapshot::default();
        snapshot.drops.insert((DropReason::DenyRule, Direction::Ingress), Counter { packets: 3, bytes: 180 });
        snapshot.forwards.insert(Direction::Ingress, Counter { packets: 7, bytes: 700 });
        snapshot.audits.insert((DropReason::DefaultDeny, Direction::Egress), Counter { packets: 5, bytes: 500 });
        for (pair, count) in [(("world", "db"), 9), (("web", "db"), 5), (("web", "app"), 1), (("app", "db"), 1)] {
            snapshot.identity_drops.insert((pair.0.to_owned(), pair.1.to_owned()), count);
        }
        let stats = PolicyStats {
            identities: 4,
            rules: 2,
            generation: 3,
            load_errors: {
                let mut errors = LoadErrors::default();
                errors.count("rollback");
                errors
            },
            identity_drops_top: 2,
            unmatched_peers: 5,
            files_up: false,
            kubernetes_up: Some(true),
            kubernetes_rejected: 2,
            quarantined: 3,
            lateral_suspects: 7,
            lateral_tracked: 11,
        };
        snapshot.rules.insert(("web-to-db".to_owned(), policy::model::Action::Allow), 9);
        let usage = Usage { maps: vec![("policy", 12, 100)], conntrack: (4, 1000) };
        let histogram = apply_duration_histogram();
        histogram.observe(0.002);
        let slot_wait = slot_wait_histogram();
        slot_wait.observe(0.012);
        let mut interfaces = InterfaceStats { hooks: vec![("xdp", 3), ("tc_egress", 3)], ..InterfaceStats::default() };
        interfaces.changes.insert("attached", 4);
        interfaces.repairs.insert("defunct", 2);
        interfaces.unenforced.insert("lxc9".to_owned(), "busy".to_owned());
        let versions = std::collections::BTreeMap::from([("pods", 41)]);
        let text = render(&snapshot, stats, &usage, &interfaces, &versions, &[&histogram, &slot_wait]).unwrap();
        assert!(text.contains("bulkhead_kubernetes_resource_version{resource=\"pods\"} 41"), "{text}");
        for line in [
            "bulkhead_interfaces{hook=\"xdp\"} 3",
            "bulkhead_interface_changes_total{change=\"attached\"} 4",
            "bulkhead_interface_changes_total{change=\"removed\"} 0",
            "bulkhead_pin_repairs_total{repair=\"defunct\"} 2",
            "bulkhead_pin_repairs_total{repair=\"renamed\"} 0",
            "bulkhead_interfaces_unenforced 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        for line in [
            "bulkhead_policy_verdicts_total{action=\"allow\",rule=\"web-to-db\"} 9",
            "bulkhead_map_entries{map=\"policy\"} 12",
            "bulkhead_map_capacity{map=\"conntrack\"} 1000",
            "bulkhead_conntrack_entries 4",
            "bulkhead_state_insert_failures_total{map=\"conntrack\"} 0",
            "bulkhead_events_lost_total{cause=\"rate_limit\"} 0",
            "bulkhead_identity_drops_total{dst_identity=\"db\",src_identity=\"world\"} 9",
            "bulkhead_identity_drops_total{dst_identity=\"db\",src_identity=\"web\"} 5",
            "bulkhead_identity_drops_total{dst_identity=\"other\",src_identity=\"other\"} 2",
            "bulkhead_policy_apply_duration_seconds_count 1",
            "bulkhead_policy_slot_wait_seconds_bucket{le=\"0.01\"} 0",
            "bulkhead_policy_slot_wait_seconds_bucket{le=\"0.025\"} 1",
            "bulkhead_build_info{version=",
        ] {
            assert!(text.contains(line), "missing {line} in {text}");
        }
        assert!(text.contains("bulkhead_drop_packets_total{direction=\"ingress\",reason=\"deny_rule\"} 3"), "{text}");
        assert!(text.contains("bulkhead_drop_bytes_total{direction=\"ingress\",reason=\"deny_rule\"} 180"), "{text}");
        assert!(text.contains("bulkhead_drop_packets_total{direction=\"egress\",reason=\"malformed\"} 0"), "{text}");
        assert!(text.contains("bulkhead_forward_packets_total{direction=\"ingress\"} 7"), "{text}");
        assert!(text.contains("bulkhead_identities 4"), "{text}");
        assert!(text.contains("bulkhead_policy_rules 2"), "{text}");
        assert!(text.contains("bulkhead_policy_unmatched_peers 5"), "{text}");
        assert!(text.contains("bulkhead_source_up{source=\"files\"} 0"), "{text}");
        assert!(text.contains("bulkhead_source_up{source=\"kubernetes\"} 1"), "{text}");
        assert!(text.contains("bulkhead_kubernetes_objects_rejected 2"), "{text}");
        let audit = "bulkhead_audit_packets_total{direction=\"egress\",reason=\"default_deny\"} 5";
        assert!(text.contains(audit), "{text}");
        assert!(text.contains("bulkhead_policy_generation 3"), "{text}");
        assert!(text.contains("bulkhead_policy_load_errors_total{reason=\"rollback\"} 1"), "{text}");
        assert!(text.contains("\nbulkhead_quarantined 3\n"), "{text}");
        assert!(text.contains("\nbulkhead_lateral_movement_suspects_total 7\n"), "{text}");
        assert!(text.contains("\nbulkhead_lateral_movement_tracked_sources 11\n"), "{text}");
        assert!(text.contains("bulkhead_drop_packets_total{direction=\"egress\",reason=\"quarantine\"} 0"), "{text}");
        assert!(text.contains("bulkhead_policy_load_errors_total{reason=\"invalid\"} 0"), "{text}");
    }
}
