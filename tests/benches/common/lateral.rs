//! The lateral-movement detector: how soon it quarantines a scanner (real
//! daemon, real packets), what it costs the daemon under a 100 kpps scan,
//! how much state a tracked source takes, and how often it would flag
//! benign hosts over a simulated day.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use enforcer::lateral::{Detector, LateralConfig, LateralMode, ProbeTarget};
use lab::frames::{self, SYN, TCP};
use lab::{Daemon, ScratchDir, ThreeTier};

use crate::Error;
use crate::results::percentile;

/// Scanners, one per trial: a source is flagged once per window, so each
/// trial probes from a host of its own.
const SCANNERS: usize = 8;

/// `--lateral-movement` mode, daemon CPU (% of one core), suspects flagged.
type ScanCost = (&'static str, f64, f64);

pub struct LateralFigures {
    /// Per trial: denied first contacts the detector needed, ms from the
    /// first probe to the quarantine seen in the metrics, ms the detector
    /// reported from the first denied contact to its decision.
    trials: Vec<(u64, f64, u64)>,
    /// Daemon CPU (% of one CPU) during a 100 kpps scan, detector on
    /// (`alert`) and off, and the events it read per second.
    scan_cpu: Vec<ScanCost>,
    scan_pps: f64,
    /// Bytes of detector state per tracked source (four first contacts).
    bytes_per_source: usize,
    /// Detector observations per second in one thread.
    observations_per_s: f64,
    /// Simulated benign source-days and how many were flagged, per pattern.
    benign: Vec<(&'static str, u64, u64)>,
    /// Other settings tried: (window s, `P_F`, denied first contacts to
    /// decide, flagged source-days per benign pattern).
    candidates: Vec<(u64, f64, u32, Vec<u64>)>,
}

/// The defaults' alternatives, measured on the same benign days.
fn candidates() -> Vec<(u64, f64, u32, Vec<u64>)> {
    let mut rows = Vec::new();
    for window in [10, 30, 60] {
        for false_positive in [0.01, 0.001, 0.0001] {
            let config =
                LateralConfig { window: Duration::from_secs(window), false_positive, ..LateralConfig::default() };
            let flagged = benign_days(&config).iter().map(|row| row.2).collect();
            rows.push((window, false_positive, Detector::new(config).denials_to_decide(), flagged));
        }
    }
    rows
}

fn metric(lab: &ThreeTier, daemon: &Daemon, sample: &str) -> Result<u64, Error> {
    let (_, body) = lab::probe::http_get(&lab.router, daemon.metrics_addr, "/metrics")?;
    Ok(lab::probe::metric(&body, sample).unwrap_or(0))
}

/// The daemon's CPU time so far (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64, Error> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from the state (field 3).
    Ok(fields.get(11).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0))
}

pub fn figures(trials: usize, scan_seconds: u64) -> Result<LateralFigures, Error> {
    let mut hosts: Vec<(&'static str, [u8; 3])> = vec![("target", [10, 0, 3]), ("flood", [10, 0, 9])];
    let names = ["scan0", "scan1", "scan2", "scan3", "scan4", "scan5", "scan6", "scan7"];
    for (i, name) in names.iter().enumerate().take(SCANNERS) {
        hosts.push((name, [10, 0, 20 + u8::try_from(i)?]));
    }
    let lab = ThreeTier::with_hosts("benchlat", &hosts)?;
    let scratch = ScratchDir::new(&lab.stem)?;
    let policy = scratch.0.join("policy");
    std::fs::create_dir_all(&policy)?;
    std::fs::write(
        policy.join("p.yaml"),
        "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: bench}\nspec:\n  identities:\n    - {name: target, addresses: [\"10.0.3.10\"]}\n",
    )?;
    let run = |mode: &str, log: &str| {
        let args = ["--events-to", "off", "--lateral-movement", mode, "--lateral-movement-quarantine-for", "2m"];
        Daemon::start_with(&lab, &policy, &scratch.0.join(log), &args)
    };
    let target = SocketAddr::new(IpAddr::V4(lab.host("target").addr), 0);
    let daemon = run("quarantine", "log-trials")?;
    let trials = scanner_trials(&lab, daemon, &names[..trials.min(SCANNERS)], target)?;
    let (scan_cpu, scan_pps) = scan_cost(&lab, &run, target, scan_seconds)?;
    Ok(LateralFigures {
        trials,
        scan_cpu,
        scan_pps,
        bytes_per_source: Detector::bytes_per_source(4),
        observations_per_s: observation_rate(),
        benign: benign_days(&LateralConfig::default()),
        candidates: candidates(),
    })
}

/// Each scanner probes a new closed port every 20 ms until the daemon
/// quarantines it: (denied first contacts reported, ms to the quarantine
/// seen in the metrics, ms the detector reported).
fn scanner_trials(
    lab: &ThreeTier,
    mut daemon: Daemon,
    names: &[&str],
    target: SocketAddr,
) -> Result<Vec<(u64, f64, u64)>, Error> {
    let mut results = Vec::new();
    for (trial, name) in names.iter().enumerate() {
        let scanner = &lab.host(name).ns;
        let first = Instant::now();
        let mut sent = 0u64;
        let quarantined = loop {
            if metric(lab, &daemon, "bulkhead_quarantined")? > u64::try_from(trial)? {
                break first.elapsed();
            }
            if sent < 40 {
                sent += 1;
                let to = SocketAddr::new(target.ip(), 9000 + u16::try_from(sent)?);
                // A SYN that nothing answers: connect gives up at once.
                scanner.enter(|| {
                    std::thread::spawn(move || TcpStream::connect_timeout(&to, Duration::from_millis(300)))
                })?;
            }
            if first.elapsed() > Duration::from_secs(5) {
                return Err(format!("{name} was not quarantined in 5 s").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        results.push((sent, quarantined));
    }
    let log = daemon.log_text();
    let _ = daemon.stop();
    let reported: Vec<(u64, u64)> = log
        .lines()
        .filter(|line| line.contains("who=lateral-movement action=quarantine"))
        .map(|line| {
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|word| word.strip_prefix(key))
                    .and_then(|value| value.parse().ok())
                    .unwrap_or(0)
            };
            (field("denied_targets="), field("after_ms="))
        })
        .collect();
    Ok(results
        .iter()
        .zip(reported.iter().chain(std::iter::repeat(&(0, 0))))
        .map(|((_, seen), (attempts, after))| (*attempts, crate::results::ms(*seen), *after))
        .collect())
}

/// A 100 kpps SYN scan from 100 spoofed sources to 1,024 ports, detector
/// on and off: the daemon's CPU (% of one core) while the kernel drops
/// it, the suspects flagged, and the rate dropped.
fn scan_cost(
    lab: &ThreeTier,
    run: &dyn Fn(&str, &str) -> Result<Daemon, lab::LabError>,
    target: SocketAddr,
    scan_seconds: u64,
) -> Result<(Vec<ScanCost>, f64), Error> {
    let flood = lab.host("flood");
    let mac = lab.router.exec(&["cat", &format!("/sys/class/net/{}/address", flood.router_interface)])?;
    let mac: Vec<u8> = String::from_utf8_lossy(&mac.stdout)
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    let mut config = String::new();
    for k in 0..1024u16 {
        let src = IpAddr::V4(Ipv4Addr::new(10, 0, 9, 20 + u8::try_from(k % 100)?));
        let mut frame = frames::simple(src, target.ip(), TCP, frames::tcp(40000 + k, 1 + k, SYN));
        frame[..6].copy_from_slice(&mac);
        let bytes: Vec<String> = frame.iter().map(|b| format!("0x{b:02x}")).collect();
        let _ = writeln!(config, "{{ {} }}", bytes.join(", "));
    }
    let config_path = std::env::temp_dir().join(format!("{}.trafgen", lab.stem));
    std::fs::write(&config_path, config)?;
    let mut scan_cpu = Vec::new();
    let mut scan_pps = 0.0;
    for mode in ["alert", "off"] {
        let mut daemon = run(mode, &format!("log-scan-{mode}"))?;
        let ticks0 = cpu_ticks(daemon.pid())?;
        let drops0 =
            metric(lab, &daemon, "bulkhead_drop_packets_total{direction=\"ingress\",reason=\"default_deny\"}")?;
        let started = Instant::now();
        flood
            .ns
            .command("timeout")
            .args([&scan_seconds.to_string(), "trafgen", "--dev", "eth0", "--cpus", "1", "-Q", "--rate", "100000pps"])
            .arg("--conf")
            .arg(&config_path)
            .output()?;
        let seconds = started.elapsed().as_secs_f64();
        let ticks = cpu_ticks(daemon.pid())? - ticks0;
        let drops = metric(lab, &daemon, "bulkhead_drop_packets_total{direction=\"ingress\",reason=\"default_deny\"}")?;
        let suspects = metric(lab, &daemon, "bulkhead_lateral_movement_suspects_total")?;
        let _ = daemon.stop();
        #[allow(clippy::cast_precision_loss, reason = "counts of a few million")]
        let (cpu, pps) = (ticks as f64 / 100.0 / seconds * 100.0, (drops - drops0) as f64 / seconds);
        if mode == "alert" {
            scan_pps = pps;
        }
        #[allow(clippy::cast_precision_loss, reason = "a count")]
        scan_cpu.push((mode, cpu, suspects as f64));
    }
    let _ = std::fs::remove_file(&config_path);
    Ok((scan_cpu, scan_pps))
}

/// Observations the detector takes per second, each a new target of one
/// of 10,000 sources.
fn observation_rate() -> f64 {
    let mut detector = Detector::new(LateralConfig { mode: LateralMode::Alert, ..LateralConfig::default() });
    let start = Instant::now();
    let count = 2_000_000u32;
    for i in 0..count {
        let source = IpAddr::from((0x0a40_0000 + i % 10_000).to_be_bytes());
        let target = ProbeTarget {
            dst: IpAddr::from([10, 0, 3, 10]),
            protocol: 6,
            port: Some(u16::try_from(i / 10_000 % 3).unwrap_or(0)),
        };
        detector.observe(source, "world", target, false, start);
    }
    f64::from(count) / start.elapsed().as_secs_f64()
}

/// A tiny deterministic generator.
struct Dice(u64);

impl Dice {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        #[allow(clippy::cast_precision_loss, reason = "53 bits are plenty")]
        let unit = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
        unit
    }
}

/// Benign sources over a simulated day: (pattern, source-days, flagged).
/// Every denial is to a target never tried before (the worst case: a
/// retried target is no new evidence); allowed first contacts, where a
/// pattern has them, go to targets of their own.
fn benign_days(config: &LateralConfig) -> Vec<(&'static str, u64, u64)> {
    let mut rows = Vec::new();
    let sources = 1_000u32;
    let day = 86_400.0;
    // (pattern, denials a minute, burst of three each minute, allowed first contacts a minute)
    let patterns: [(&'static str, f64, bool, f64); 5] = [
        ("3 denied a minute in one burst, nothing allowed", 3.0, true, 0.0),
        ("1 denied a minute at random, nothing allowed", 1.0, false, 0.0),
        ("1 denied a minute at random, 10 allowed", 1.0, false, 10.0),
        ("3 denied a minute at random, 10 allowed", 3.0, false, 10.0),
        ("3 denied a minute at random, 30 allowed", 3.0, false, 30.0),
    ];
    for (name, denied_per_min, burst, allowed_per_min) in patterns {
        let mut detector = Detector::new(LateralConfig { mode: LateralMode::Alert, ..config.clone() });
        let mut dice = Dice(0x9e37_79b9_7f4a_7c15);
        let base = Instant::now();
        let mut flagged = 0u64;
        for s in 0..sources {
            let source = IpAddr::from((0x0a50_0000 + s).to_be_bytes());
            // (time, allowed) of every first contact, in time order.
            let mut contacts: Vec<(f64, bool)> = Vec::new();
            let stream = |rate: f64, allowed: bool, dice: &mut Dice, contacts: &mut Vec<(f64, bool)>| {
                let mut t = 0.0;
                while rate > 0.0 && t < day {
                    // Exponential gaps: a Poisson stream.
                    t += -(1.0 - dice.uniform()).ln() * 60.0 / rate;
                    contacts.push((t, allowed));
                }
            };
            if burst {
                let mut t = 0.0;
                while t < day {
                    contacts.extend([(t, false), (t + 0.001, false), (t + 0.002, false)]);
                    t += 60.0;
                }
            } else {
                stream(denied_per_min, false, &mut dice, &mut contacts);
            }
            stream(allowed_per_min, true, &mut dice, &mut contacts);
            contacts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let before = detector.suspects;
            for (k, (at, allowed)) in contacts.into_iter().enumerate() {
                let port = u16::try_from(k % 65_000).unwrap_or(0) + 1;
                let dst = if allowed { [10, 0, 4, 10] } else { [10, 0, 3, 10] };
                let target = ProbeTarget { dst: IpAddr::from(dst), protocol: 6, port: Some(port) };
                detector.observe(source, "benign", target, allowed, base + Duration::from_secs_f64(at));
            }
            if detector.suspects > before {
                flagged += 1;
            }
        }
        rows.push((name, u64::from(sources), flagged));
    }
    rows
}

#[allow(clippy::cast_precision_loss, reason = "counts of a few")]
pub fn markdown(md: &mut String, figures: &LateralFigures) {
    let _ = writeln!(md, "\n### Lateral-movement detector\n");
    let _ = writeln!(
        md,
        "{} scanners, each probing one closed port every 20 ms until quarantined (`--lateral-movement quarantine`, real daemon, real packets):\n",
        figures.trials.len()
    );
    let attempts: Vec<f64> = figures.trials.iter().map(|t| t.0 as f64).collect();
    let seen: Vec<f64> = figures.trials.iter().map(|t| t.1).collect();
    let decided: Vec<f64> = figures.trials.iter().map(|t| t.2 as f64).collect();
    let _ = writeln!(md, "| | p50 | max |\n|---|---:|---:|");
    for (what, values) in [
        ("denied first contacts to decide", &attempts),
        ("first denied contact → decision, ms", &decided),
        ("first probe → quarantine in force (metrics), ms", &seen),
    ] {
        let _ = writeln!(md, "| {what} | {:.0} | {:.0} |", percentile(values, 0.5), percentile(values, 1.0));
    }
    let _ = writeln!(
        md,
        "\nA {:.0} pps SYN scan from 100 spoofed sources to 1,024 ports, dropped in the kernel:\n",
        figures.scan_pps
    );
    let _ = writeln!(md, "| `--lateral-movement` | daemon CPU, % of one core | suspects flagged |\n|---|---:|---:|");
    for (mode, cpu, suspects) in &figures.scan_cpu {
        let _ = writeln!(md, "| {mode} | {cpu:.1} | {suspects:.0} |");
    }
    let _ = writeln!(
        md,
        "\nState per tracked source (four first contacts): {} bytes. One thread takes {:.1} million observations per second.\n",
        figures.bytes_per_source,
        figures.observations_per_s / 1e6
    );
    let _ = writeln!(
        md,
        "| benign pattern (simulated day, every denial a new target) | source-days | flagged |\n|---|---:|---:|"
    );
    for (name, days, flagged) in &figures.benign {
        let _ = writeln!(md, "| {name} | {days} | {flagged} |");
    }
    let _ = writeln!(
        md,
        "\nThe defaults against other settings (flagged source-days per benign pattern, in the order above):\n"
    );
    let _ = writeln!(md, "| window | `P_F` | denials to decide | flagged |\n|---:|---:|---:|---|");
    for (window, false_positive, denials, flagged) in &figures.candidates {
        let flagged: Vec<String> = flagged.iter().map(ToString::to_string).collect();
        let _ = writeln!(md, "| {window} s | {false_positive} | {denials} | {} |", flagged.join(" / "));
    }
}

pub fn json(figures: &LateralFigures) -> serde_json::Value {
    serde_json::json!({
        "trials": figures.trials.iter().map(|t| serde_json::json!({"attempts": t.0, "quarantined_ms": t.1, "decided_ms": t.2})).collect::<Vec<_>>(),
        "scan_pps": figures.scan_pps,
        "scan_cpu": figures.scan_cpu.iter().map(|(mode, cpu, suspects)| serde_json::json!({"mode": mode, "cpu_percent": cpu, "suspects": suspects})).collect::<Vec<_>>(),
        "bytes_per_source": figures.bytes_per_source,
        "observations_per_s": figures.observations_per_s,
        "benign": figures.benign.iter().map(|(name, days, flagged)| serde_json::json!({"pattern": name, "source_days": days, "flagged": flagged})).collect::<Vec<_>>(),
    })
}
