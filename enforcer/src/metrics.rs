//! Prometheus exposition. Kernel counters are read at scrape time, so
//! `/metrics` is always exactly what the kernel counted.

use std::sync::{Arc, Mutex};

use enforcer_common::{Direction, DropReason};
use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::datapath::{CounterSnapshot, Datapath};

/// Policy figures exported beside the counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct PolicyStats {
    pub identities: usize,
    pub rules: usize,
    /// Generation of the enforced policy; bumped by every applied change.
    pub generation: u32,
    /// Candidate policies rejected since start.
    pub load_errors: u64,
}

/// Renders the text exposition of `snapshot` and `stats`.
pub fn render(snapshot: &CounterSnapshot, stats: PolicyStats) -> Result<String, prometheus::Error> {
    let registry = Registry::new();
    let labelled = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
        let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
        registry.register(Box::new(vec.clone()))?;
        Ok(vec)
    };
    let drop_packets = labelled(
        "bulkhead_drop_packets_total",
        "Packets dropped, by drop reason and direction.",
        &["reason", "direction"],
    )?;
    let drop_bytes = labelled(
        "bulkhead_drop_bytes_total",
        "Bytes of dropped packets, by drop reason and direction.",
        &["reason", "direction"],
    )?;
    let forward_packets = labelled("bulkhead_forward_packets_total", "Packets passed, by direction.", &["direction"])?;
    let forward_bytes =
        labelled("bulkhead_forward_bytes_total", "Bytes of passed packets, by direction.", &["direction"])?;
    let audit_packets = labelled(
        "bulkhead_audit_packets_total",
        "Packets audit mode passed that the policy would have dropped, by would-be reason and direction.",
        &["reason", "direction"],
    )?;
    let audit_bytes = labelled(
        "bulkhead_audit_bytes_total",
        "Bytes of packets audit mode passed, by would-be reason and direction.",
        &["reason", "direction"],
    )?;
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
    let gauge = |name: &str, help: &str, value: i64| -> Result<(), prometheus::Error> {
        let gauge = IntGauge::new(name, help)?;
        gauge.set(value);
        registry.register(Box::new(gauge))
    };
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    gauge("bulkhead_identities", "Identities declared by the enforced policy.", count(stats.identities))?;
    gauge("bulkhead_policy_rules", "Rules in the enforced policy.", count(stats.rules))?;
    gauge("bulkhead_policy_generation", "Generation of the enforced policy.", i64::from(stats.generation))?;
    let errors = prometheus::IntCounter::new(
        "bulkhead_policy_load_errors_total",
        "Candidate policies rejected (the previous policy stayed enforced).",
    )?;
    errors.inc_by(stats.load_errors);
    registry.register(Box::new(errors))?;

    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// What the HTTP handlers share with the daemon.
pub struct Shared {
    pub datapath: Mutex<Option<Datapath>>,
    pub stats: Mutex<PolicyStats>,
    pub ready: std::sync::atomic::AtomicBool,
}

impl Shared {
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            datapath: Mutex::new(None),
            stats: Mutex::new(PolicyStats::default()),
            ready: std::sync::atomic::AtomicBool::new(false),
        })
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
        let stats = PolicyStats { identities: 4, rules: 2, generation: 3, load_errors: 1 };
        let text = render(&snapshot, stats).unwrap();
        assert!(text.contains("bulkhead_drop_packets_total{direction=\"ingress\",reason=\"deny_rule\"} 3"), "{text}");
        assert!(text.contains("bulkhead_drop_bytes_total{direction=\"ingress\",reason=\"deny_rule\"} 180"), "{text}");
        assert!(text.contains("bulkhead_drop_packets_total{direction=\"egress\",reason=\"malformed\"} 0"), "{text}");
        assert!(text.contains("bulkhead_forward_packets_total{direction=\"ingress\"} 7"), "{text}");
        assert!(text.contains("bulkhead_identities 4"), "{text}");
        assert!(text.contains("bulkhead_policy_rules 2"), "{text}");
        let audit = "bulkhead_audit_packets_total{direction=\"egress\",reason=\"default_deny\"} 5";
        assert!(text.contains(audit), "{text}");
        assert!(text.contains("bulkhead_policy_generation 3"), "{text}");
        assert!(text.contains("bulkhead_policy_load_errors_total 1"), "{text}");
    }
}
