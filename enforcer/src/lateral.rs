//! The lateral-movement detector: flags a source that probes many
//! destinations or ports it may not reach, from the kernel's drop events
//! (no per-packet work is added: it reads what the event pump reads).
//!
//! The test is sequential, after Threshold Random Walk (Jung, Paxson,
//! Berger, Balakrishnan, 2004): each *first contact* of a source with a
//! target (destination address, protocol, port) within the window is one
//! observation. A denied one multiplies the source's likelihood ratio by
//! `(1 - θ1) / (1 - θ0)`, an allowed one by `θ1 / θ0`, where θ0 is how
//! often a benign source's first contacts succeed and θ1 a scanner's. The
//! source is a suspect once the ratio reaches `η1 = P_D / P_F`. θ0 0.8,
//! θ1 0.2 and `P_D` 0.99 are the published parameters: a denied first
//! contact multiplies by 4, an allowed one divides by 4.
//!
//! Observations older than the window leave the walk: TRW's walk never
//! forgets, and a benign host's rare denied attempts (a stale address, a
//! misconfigured client) would add up over days.
//!
//! The defaults were chosen by measurement (`cargo xtask bench --only
//! lateral`, BENCHMARKS.md): simulated days of benign hosts whose every
//! denial is a target never tried before, against each window (10, 30,
//! 60 s) and `P_F` (0.01, 0.001, 0.0001). The published `P_F` of 0.01
//! decides after 4 denials, but flags most hosts that see one denial a
//! minute at random; a 10 s window with `P_F` 0.0001 (η1 9,900: the
//! seventh distinct denied target decides, 4⁷ ≥ 9,900 > 4⁶) flagged none
//! of them, nor any host with three denials a minute in a burst, and
//! still decides on any scan of seven targets in 10 s within a fraction
//! of a second.
//!
//! Events are rate-limited in the kernel: a scan's later probes may not be
//! reported. Counting distinct targets, not events, keeps the test sound:
//! a lost event only delays the decision, never invents evidence, and a
//! retransmitted probe is one target however often it is seen.
//!
//! The kernel reports denials as drop events, and, while the detector runs
//! (`--lateral-movement` not `off`), every connection the policy admits at
//! ingress as an admit event: one ring buffer write per new connection,
//! nothing per packet of an established one, from a budget of its own
//! (1,000 per second per CPU; the excess is counted in
//! `bulkhead_events_lost_total{cause="admit_rate_limit"}`). An admit lost
//! to the budget only leaves out benign evidence.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

/// What the detector does about a suspect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LateralMode {
    Off,
    #[default]
    Alert,
    Quarantine,
}

impl LateralMode {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Alert => "alert",
            Self::Quarantine => "quarantine",
        }
    }
}

/// The detector's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LateralConfig {
    pub mode: LateralMode,
    /// How long `quarantine` mode quarantines a suspect.
    pub quarantine_for: Duration,
    /// Identities never flagged (scanners run on purpose).
    pub exempt: Vec<String>,
    /// How long a first contact counts.
    pub window: Duration,
    /// How often a benign source's first contacts succeed (θ0).
    pub benign_success: f64,
    /// How often a scanner's first contacts succeed (θ1).
    pub scanner_success: f64,
    /// Probability of flagging a scanner (`P_D`).
    pub detection: f64,
    /// Probability of flagging a benign source (`P_F`).
    pub false_positive: f64,
    /// Sources tracked at once; beyond, the one seen longest ago is dropped.
    pub max_sources: usize,
}

impl Default for LateralConfig {
    fn default() -> Self {
        Self {
            mode: LateralMode::Alert,
            quarantine_for: Duration::from_mins(10),
            exempt: Vec::new(),
            window: Duration::from_secs(10),
            benign_success: 0.8,
            scanner_success: 0.2,
            detection: 0.99,
            false_positive: 0.0001,
            max_sources: 10_000,
        }
    }
}

/// A probed target: destination, IP protocol number and port (ICMP type
/// for ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProbeTarget {
    pub dst: IpAddr,
    pub protocol: u8,
    pub port: Option<u16>,
}

impl ProbeTarget {
    /// The protocol number of an event's protocol name.
    #[must_use]
    pub fn protocol_number(name: &str) -> u8 {
        match name {
            "icmp" => 1,
            "tcp" => 6,
            "udp" => 17,
            "icmpv6" => 58,
            other => other.parse().unwrap_or(0),
        }
    }
}

impl std::fmt::Display for ProbeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let protocol = crate::events::protocol_name(self.protocol);
        match (self.port, self.dst) {
            (Some(port), IpAddr::V6(addr)) => write!(f, "[{addr}]:{port}/{protocol}"),
            (Some(port), addr) => write!(f, "{addr}:{port}/{protocol}"),
            (None, addr) => write!(f, "{addr}/{protocol}"),
        }
    }
}

/// The most first contacts kept per source: the decision needs a handful;
/// the rest would only be evidence, and a scanner must not grow the state.
const MAX_CONTACTS: usize = 32;

/// One source's walk: its first contacts within the window, oldest first.
#[derive(Debug)]
struct Walk {
    identity: String,
    contacts: VecDeque<(Instant, ProbeTarget, bool)>,
    /// When it was flagged; not flagged again before its evidence has left
    /// the window.
    flagged: Option<Instant>,
    last_seen: Instant,
}

/// A source the test decided is scanning, with its evidence.
#[derive(Debug, Clone, Serialize)]
pub struct Suspect {
    pub source: IpAddr,
    pub identity: String,
    /// The distinct targets it was denied within the window, oldest first.
    pub denied_targets: Vec<String>,
    /// Allowed first contacts within the window.
    pub allowed_targets: usize,
    /// The walk's likelihood ratio when it decided.
    pub likelihood_ratio: f64,
    /// From its first denied first contact in the window to the decision.
    pub after_ms: u64,
}

/// The detector's state: one walk per source seen denied recently.
#[derive(Debug)]
pub struct Detector {
    config: LateralConfig,
    walks: HashMap<IpAddr, Walk>,
    /// Suspects flagged since start.
    pub suspects: u64,
}

impl Detector {
    #[must_use]
    pub fn new(config: LateralConfig) -> Self {
        Self { config, walks: HashMap::new(), suspects: 0 }
    }

    #[must_use]
    pub fn config(&self) -> &LateralConfig {
        &self.config
    }

    /// Sources tracked now.
    #[must_use]
    pub fn tracked(&self) -> usize {
        self.walks.len()
    }

    fn log_ratio(&self, allowed: bool) -> f64 {
        let c = &self.config;
        if allowed {
            (c.scanner_success / c.benign_success).ln()
        } else {
            ((1.0 - c.scanner_success) / (1.0 - c.benign_success)).ln()
        }
    }

    /// Takes one observation: `source` (of `identity`) made a contact with
    /// `target` that the policy `allowed` or denied, at `now`. Returns the
    /// suspect when this observation decides.
    pub fn observe(
        &mut self,
        source: IpAddr,
        identity: &str,
        target: ProbeTarget,
        allowed: bool,
        now: Instant,
    ) -> Option<Suspect> {
        if self.config.mode == LateralMode::Off || self.config.exempt.iter().any(|e| e == identity) {
            return None;
        }
        if !self.walks.contains_key(&source) && self.walks.len() >= self.config.max_sources {
            self.forget_stale(now);
            if self.walks.len() >= self.config.max_sources {
                let oldest = self.walks.iter().min_by_key(|(_, walk)| walk.last_seen).map(|(addr, _)| *addr);
                if let Some(oldest) = oldest {
                    self.walks.remove(&oldest);
                }
            }
        }
        let window = self.config.window;
        let walk = self.walks.entry(source).or_insert_with(|| Walk {
            identity: identity.to_owned(),
            contacts: VecDeque::new(),
            flagged: None,
            last_seen: now,
        });
        walk.last_seen = now;
        identity.clone_into(&mut walk.identity);
        while walk.contacts.front().is_some_and(|(at, _, _)| now.saturating_duration_since(*at) >= window) {
            walk.contacts.pop_front();
        }
        if walk.flagged.is_some_and(|at| now.saturating_duration_since(at) >= window) {
            walk.flagged = None;
        }
        // Only a first contact is evidence: a retransmission, or a target
        // seen again, is not.
        if walk.contacts.iter().any(|(_, seen, _)| *seen == target) {
            return None;
        }
        if walk.contacts.len() == MAX_CONTACTS {
            walk.contacts.pop_front();
        }
        walk.contacts.push_back((now, target, allowed));
        if walk.flagged.is_some() {
            return None;
        }
        let (deny_step, allow_step) = (self.log_ratio(false), self.log_ratio(true));
        let walk = &self.walks[&source];
        let sum: f64 = walk.contacts.iter().map(|(_, _, ok)| if *ok { allow_step } else { deny_step }).sum();
        let threshold = (self.config.detection / self.config.false_positive).ln();
        if sum < threshold {
            return None;
        }
        let denied: Vec<&(Instant, ProbeTarget, bool)> = walk.contacts.iter().filter(|(_, _, ok)| !ok).collect();
        let first = denied.first().map_or(now, |(at, _, _)| *at);
        let suspect = Suspect {
            source,
            identity: walk.identity.clone(),
            denied_targets: denied.iter().map(|(_, target, _)| target.to_string()).collect(),
            allowed_targets: walk.contacts.len() - denied.len(),
            likelihood_ratio: sum.exp(),
            after_ms: u64::try_from(now.saturating_duration_since(first).as_millis()).unwrap_or(u64::MAX),
        };
        if let Some(walk) = self.walks.get_mut(&source) {
            walk.flagged = Some(now);
        }
        self.suspects += 1;
        Some(suspect)
    }

    /// Denied first contacts (and nothing allowed) it takes to decide.
    #[must_use]
    pub fn denials_to_decide(&self) -> u32 {
        let threshold = (self.config.detection / self.config.false_positive).ln();
        let step = self.log_ratio(false);
        let mut denials = 1;
        while f64::from(denials) * step < threshold {
            denials += 1;
        }
        denials
    }

    /// The bytes one tracked source takes with `contacts` first contacts
    /// in its window (its map slot at the table's load, the contacts'
    /// buffer, a short identity name), for the docs and the benchmark.
    #[must_use]
    pub fn bytes_per_source(contacts: usize) -> usize {
        let slot = std::mem::size_of::<(IpAddr, Walk)>() + 1;
        let buffer = contacts.next_power_of_two() * std::mem::size_of::<(Instant, ProbeTarget, bool)>();
        // hashbrown keeps its table at most 7/8 full; names are ~16 bytes.
        slot * 8 / 7 + buffer + 16
    }

    /// Forgets sources with nothing in the window and not flagged recently.
    pub fn forget_stale(&mut self, now: Instant) {
        let window = self.config.window;
        self.walks.retain(|_, walk| now.saturating_duration_since(walk.last_seen) < window);
    }
}

/// The JSON event of a suspect.
#[derive(Serialize)]
struct SuspectEvent<'a> {
    time: String,
    event: &'static str,
    action: &'static str,
    #[serde(flatten)]
    suspect: &'a Suspect,
}

/// Feeds the drop events the pump read to the detector, and acts on each
/// suspect: a JSON event and the counter; in `quarantine` mode the source
/// is quarantined too.
pub fn observe_events(shared: &crate::metrics::Shared, records: &[crate::events::EventRecord]) {
    let now = Instant::now();
    let (suspects, mode, quarantine_for) = {
        let mut detector = shared.lateral.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if detector.config.mode == LateralMode::Off {
            return;
        }
        let mut suspects = Vec::new();
        for record in records {
            // Policy denials and admits only: a broken, spoofed or
            // quarantined packet says nothing of what its source may reach.
            let denied = record.verdict == "drop" && matches!(record.reason, "default_deny" | "deny_rule");
            let allowed = record.verdict == "admit";
            // The node's own traffic is the node's, not a workload's.
            if !(denied || allowed) || record.src_identity == policy::model::HOST {
                continue;
            }
            let (Ok(source), Ok(dst)) = (record.src.parse::<IpAddr>(), record.dst.parse::<IpAddr>()) else { continue };
            let port = record.dst_port.or(record.icmp_type.map(u16::from));
            let target = ProbeTarget { dst, protocol: ProbeTarget::protocol_number(&record.protocol), port };
            if let Some(suspect) = detector.observe(source, &record.src_identity, target, allowed, now) {
                suspects.push(suspect);
            }
        }
        (suspects, detector.config.mode, detector.config.quarantine_for)
    };
    for suspect in suspects {
        act(shared, &suspect, mode, quarantine_for);
    }
}

fn act(shared: &crate::metrics::Shared, suspect: &Suspect, mode: LateralMode, quarantine_for: Duration) {
    log::warn!(
        target: "audit",
        "who=lateral-movement action={} source={} identity={} denied_targets={} after_ms={}",
        mode.name(),
        suspect.source,
        suspect.identity,
        suspect.denied_targets.len(),
        suspect.after_ms
    );
    let event = SuspectEvent {
        time: crate::events::rfc3339_at(std::time::SystemTime::now()),
        event: "lateral_movement",
        action: mode.name(),
        suspect,
    };
    if let Ok(line) = serde_json::to_string(&event) {
        shared.announce(line);
    }
    if mode == LateralMode::Quarantine {
        let reason = format!(
            "lateral movement: {} distinct targets denied within {} ms",
            suspect.denied_targets.len(),
            suspect.after_ms
        );
        let expires = std::time::SystemTime::now() + quarantine_for;
        if let Err(error) =
            crate::quarantine::add(shared, &suspect.source.to_string(), &reason, Some(expires), "lateral-movement")
        {
            log::error!("quarantining lateral-movement suspect {} failed: {error}", suspect.source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: u8, port: u16) -> ProbeTarget {
        ProbeTarget { dst: IpAddr::from([10, 0, 0, host]), protocol: 6, port: Some(port) }
    }

    const SCANNER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 9, 9));

    #[test]
    fn the_seventh_distinct_denied_target_decides() {
        let mut detector = Detector::new(LateralConfig::default());
        assert_eq!(detector.denials_to_decide(), 7);
        let published = Detector::new(LateralConfig { false_positive: 0.01, ..LateralConfig::default() });
        assert_eq!(published.denials_to_decide(), 4, "TRW's published parameters");
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        for port in 1..=6 {
            assert!(detector.observe(SCANNER, "web", target(2, port), false, at(u64::from(port) * 10)).is_none());
        }
        // Retransmissions of a probe are not new evidence.
        for _ in 0..10 {
            assert!(detector.observe(SCANNER, "web", target(2, 6), false, at(70)).is_none());
        }
        let suspect = detector.observe(SCANNER, "web", target(3, 22), false, at(80)).unwrap();
        assert_eq!(suspect.denied_targets.len(), 7);
        assert_eq!(suspect.denied_targets[0], "10.0.0.2:1/tcp");
        assert_eq!(suspect.denied_targets[6], "10.0.0.3:22/tcp");
        assert_eq!((suspect.after_ms, suspect.likelihood_ratio.round()), (70, 16384.0));
        // Flagged once, not again while its evidence is in the window.
        assert!(detector.observe(SCANNER, "web", target(4, 22), false, at(90)).is_none());
        assert_eq!(detector.suspects, 1);
    }

    #[test]
    fn evidence_leaves_with_the_window() {
        let mut detector = Detector::new(LateralConfig::default());
        let start = Instant::now();
        // Six denials, then a pause longer than the window: they are gone.
        for port in 1..=6 {
            assert!(detector.observe(SCANNER, "web", target(2, port), false, start).is_none());
        }
        let later = start + Duration::from_secs(11);
        for port in 7..=12 {
            assert!(detector.observe(SCANNER, "web", target(2, port), false, later).is_none(), "port {port}");
        }
        assert!(detector.observe(SCANNER, "web", target(2, 13), false, later).is_some());
    }

    #[test]
    fn three_denied_attempts_a_minute_are_never_flagged() {
        let mut detector = Detector::new(LateralConfig::default());
        let start = Instant::now();
        // A day of a benign host: three denied first contacts each minute
        // (as a burst), to targets it never reached before.
        for minute in 0..1440u64 {
            for i in 0..3u64 {
                let at = start + Duration::from_secs(minute * 60) + Duration::from_millis(i);
                let port = u16::try_from((minute * 3 + i) % 60_000).unwrap() + 1;
                assert!(detector.observe(SCANNER, "web", target(2, port), false, at).is_none(), "minute {minute}");
            }
        }
        assert_eq!(detector.suspects, 0);
        assert!(detector.tracked() <= 1);
    }

    #[test]
    fn allowed_first_contacts_weigh_against_and_exempt_identities_are_never_flagged() {
        let mut detector = Detector::new(LateralConfig::default());
        let start = Instant::now();
        for host in 10..14 {
            detector.observe(SCANNER, "web", target(host, 80), true, start);
        }
        // Four allowed contacts take 4⁴ off the ratio: eleven denials are needed.
        for port in 1..=10 {
            assert!(detector.observe(SCANNER, "web", target(2, port), false, start).is_none(), "port {port}");
        }
        assert!(detector.observe(SCANNER, "web", target(2, 11), false, start).is_some());

        let config = LateralConfig { exempt: vec!["nmap".to_owned()], ..LateralConfig::default() };
        let mut detector = Detector::new(config);
        for port in 1..=100 {
            assert!(detector.observe(SCANNER, "nmap", target(2, port), false, start).is_none());
        }
        assert_eq!(detector.tracked(), 0);
    }

    #[test]
    fn state_is_bounded_by_sources_and_contacts() {
        let config = LateralConfig { max_sources: 100, ..LateralConfig::default() };
        let mut detector = Detector::new(config);
        let start = Instant::now();
        for i in 0..10_000u32 {
            let source = IpAddr::from(i.to_be_bytes());
            detector.observe(source, "world", target(2, 1), false, start);
        }
        assert_eq!(detector.tracked(), 100);
        let walk_len = |d: &Detector| d.walks.values().map(|w| w.contacts.len()).max().unwrap_or(0);
        for port in 1..=1000 {
            detector.observe(SCANNER, "web", target(2, port), false, start);
        }
        assert!(walk_len(&detector) <= MAX_CONTACTS);
    }
}
