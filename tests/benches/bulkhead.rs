//! `cargo xtask bench`: per-packet cost of the real programs beside an empty
//! XDP program (the floor), at several policy sizes; policy load and update
//! times; and the daemon's footprint. Writes JSON and a Markdown table and
//! refreshes the results section of BENCHMARKS.md. Numbers only: nothing
//! here fails because a machine is slow.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use enforcer::datapath::{Datapath, Hook, MapSizes};
use lab::frames::{self, ACK, ICMP, ICMPV6, SYN, TCP, icmp, tcp};
use lab::probe;
use lab::{Daemon, ScratchDir, ThreeTier};
use policy::model::{Action, Address, Identity, Mode, Peer, Policy, PortSpec, Protocol, Rule, Selector};
use policy::{Location, compile};

type Error = Box<dyn std::error::Error>;

fn here() -> Location {
    Location { file: Arc::from("bench"), line: 1, column: 1 }
}

fn v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

/// `n` identities (mostly single addresses, every 50th a /24 prefix) and as
/// many rules: identity i may reach identity i+1 on one TCP port; plus a
/// deny rule and ICMP for the probed pair (identities 0 and 1, which also
/// have IPv6 addresses).
fn synthetic_policy(n: usize) -> Policy {
    let peer = |i: usize| Peer { selector: Selector::Identity(format!("id{i}")), location: here() };
    let identities = (0..n)
        .map(|i| {
            let mut addresses = vec![Address {
                net: if i % 50 == 49 {
                    format!("172.{}.{}.0/24", 16 + (i >> 16), (i >> 8) & 255).parse().unwrap()
                } else {
                    IpAddr::V4(v4(i)).into()
                },
                location: here(),
            }];
            if i < 2 {
                addresses.push(Address {
                    net: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16)).into(),
                    location: here(),
                });
            }
            Identity {
                name: format!("id{i}"),
                labels: BTreeMap::new(),
                addresses,
                mode: Mode::Enforce,
                location: here(),
            }
        })
        .collect();
    let port = |protocol, first, last| PortSpec { protocol, first, last };
    let mut rules: Vec<Rule> = (0..n)
        .map(|i| Rule {
            name: format!("r{i}"),
            action: Action::Allow,
            from: vec![peer(i)],
            to: vec![peer((i + 1) % n)],
            ports: Some(vec![port(Protocol::Tcp, 1000 + (i % 1000) as u16, 1000 + (i % 1000) as u16)]),
            expires: None,
            location: here(),
        })
        .collect();
    rules.push(Rule {
        name: "probe-icmp".into(),
        action: Action::Allow,
        from: vec![peer(0)],
        to: vec![peer(1)],
        ports: Some(vec![port(Protocol::Icmp, 0, u16::MAX), port(Protocol::Icmpv6, 0, u16::MAX)]),
        expires: None,
        location: here(),
    });
    rules.push(Rule {
        name: "probe-deny".into(),
        action: Action::Deny,
        from: vec![peer(0)],
        to: vec![peer(1)],
        ports: Some(vec![port(Protocol::Tcp, 22, 22)]),
        expires: None,
        location: here(),
    });
    Policy { documents: vec!["bench".into()], identities, rules }
}

/// The packet classes measured, per family.
fn classes(family: &str) -> Vec<(&'static str, Vec<u8>)> {
    let (src, dst, icmp_proto, timestamp): (IpAddr, IpAddr, u8, u8) = if family == "IPv4" {
        (IpAddr::V4(v4(0)), IpAddr::V4(v4(1)), ICMP, 13)
    } else {
        (
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
            ICMPV6,
            130,
        )
    };
    vec![
        ("established (conntrack hit)", frames::simple(src, dst, TCP, tcp(40000, 1000, ACK))),
        (
            "new allowed (full lookup, untracked)",
            frames::simple(src, dst, icmp_proto, icmp(timestamp, 0, [0; 4], &[0; 12])),
        ),
        ("default-denied", frames::simple(src, dst, TCP, tcp(40000, 9, SYN))),
        ("deny rule", frames::simple(src, dst, TCP, tcp(40000, 22, SYN))),
        ("non-IP (ARP)", frames::arp()),
    ]
}

fn median(mut values: Vec<u32>) -> u32 {
    values.sort_unstable();
    values[values.len() / 2]
}

struct Row {
    identities: usize,
    family: &'static str,
    class: &'static str,
    ns: u32,
    floor: u32,
}

/// (policy size, full load, one-rule change) per size.
type Loads = Vec<(usize, Duration, Duration)>;

/// (update latencies in ms, idle RSS KiB, loaded RSS KiB, memlock per map).
type DaemonFigures = (Vec<f64>, u64, u64, Vec<(String, u64)>);

fn per_packet(sizes: &[usize], repeat: u32, runs: usize) -> Result<(Vec<Row>, Loads), Error> {
    let mut datapath = Datapath::load_with(MapSizes::default())?;
    let mut rows = Vec::new();
    let mut loads = Vec::new();
    for &n in sizes {
        let policy = synthetic_policy(n);
        let started = Instant::now();
        let compiled = compile(&policy);
        datapath.apply(&compiled, false)?;
        let full = started.elapsed();
        // A one-rule change on top: the port of rule r0.
        let mut changed = policy.clone();
        if let Some(ports) = changed.rules[0].ports.as_mut() {
            ports[0] = PortSpec { protocol: Protocol::Tcp, first: 2999, last: 2999 };
        }
        let started = Instant::now();
        datapath.apply(&compile(&changed), false)?;
        let one = started.elapsed();
        datapath.apply(&compiled, false)?;
        loads.push((n, full, one));
        datapath.clear_state()?;
        for family in ["IPv4", "IPv6"] {
            for (class, frame) in classes(family) {
                if class.starts_with("established") {
                    // Open the connection once so the measured packets hit conntrack.
                    let syn = frame.clone();
                    let mut opening = syn.clone();
                    let flags = opening.len() - 7;
                    opening[flags] = SYN;
                    datapath.test_run(Hook::Ingress, &opening, 1)?;
                }
                let ns = median(
                    (0..runs)
                        .map(|_| datapath.test_run(Hook::Ingress, &frame, repeat).map(|r| r.duration_ns))
                        .collect::<Result<_, _>>()?,
                );
                let floor = median(
                    (0..runs)
                        .map(|_| datapath.test_run(Hook::Calibration, &frame, repeat).map(|r| r.duration_ns))
                        .collect::<Result<_, _>>()?,
                );
                rows.push(Row { identities: n, family, class, ns, floor });
            }
        }
    }
    Ok((rows, loads))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn memlock(root: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(root.join("maps")) else { return Vec::new() };
    let mut out: Vec<(String, u64)> = entries
        .flatten()
        .filter_map(|entry| {
            let output = std::process::Command::new("bpftool")
                .args(["map", "show", "pinned"])
                .arg(entry.path())
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            let bytes = text.split_whitespace().skip_while(|w| *w != "memlock").nth(1)?;
            Some((entry.file_name().to_string_lossy().into_owned(), bytes.trim_end_matches('B').parse().ok()?))
        })
        .collect();
    out.sort();
    out
}

/// Rename-to-enforced latency through the real daemon, plus its footprint.
fn daemon_figures(changes: usize, big: usize) -> Result<DaemonFigures, Error> {
    let lab = ThreeTier::new("bench")?;
    let scratch = ScratchDir::new(&lab.stem)?;
    let dir = scratch.0.join("policy");
    std::fs::create_dir_all(&dir)?;
    let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier.yaml"))?;
    let variant = |k: usize| example.replace("8080/tcp", &format!("{}/tcp", 8080 + k % 2));
    std::fs::write(dir.join("p.yaml"), variant(0))?;
    let mut daemon = Daemon::start_with(&lab, &dir, &scratch.0.join("log"), &["--events-to", "off"])?;
    std::thread::sleep(Duration::from_secs(1));
    let pid = daemon.pid();
    let idle = rss_kib(pid);
    let generation = |daemon: &Daemon| {
        probe::http_get(&lab.router, daemon.metrics_addr, "/metrics")
            .ok()
            .and_then(|(_, body)| probe::metric(&body, "bulkhead_policy_generation"))
    };
    let mut latencies = Vec::new();
    for k in 1..=changes {
        let before = generation(&daemon).unwrap_or(0);
        let staging = dir.join(".p.yaml.new");
        std::fs::write(&staging, variant(k))?;
        let started = Instant::now();
        std::fs::rename(&staging, dir.join("p.yaml"))?;
        while generation(&daemon).unwrap_or(0) <= before {
            if started.elapsed() > Duration::from_secs(10) {
                return Err("the daemon did not apply a change within 10 s".into());
            }
        }
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    // The large policy, as YAML the daemon reads and watches.
    let policy = synthetic_policy(big);
    let mut text =
        String::from("apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: big}\nspec:\n  identities:\n");
    for identity in &policy.identities {
        let addresses: Vec<String> = identity.addresses.iter().map(|a| format!("\"{}\"", a.net)).collect();
        let _ = writeln!(text, "    - {{name: {}, addresses: [{}]}}", identity.name, addresses.join(", "));
    }
    text += "  rules:\n";
    for (i, rule) in policy.rules.iter().enumerate().take(big) {
        let _ = writeln!(
            text,
            "    - {{name: r{i}, from: [{{identity: id{i}}}], to: [{{identity: id{}}}], ports: [\"{}/tcp\"]}}",
            (i + 1) % big,
            1000 + i % 1000
        );
        let _ = rule;
    }
    let before = generation(&daemon).unwrap_or(0);
    std::fs::write(dir.join(".p.yaml.new"), text)?;
    std::fs::rename(dir.join(".p.yaml.new"), dir.join("p.yaml"))?;
    let started = Instant::now();
    while generation(&daemon).unwrap_or(0) <= before && started.elapsed() < Duration::from_mins(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let loaded = rss_kib(pid);
    let maps = memlock(&lab.bpffs_root());
    daemon.stop()?;
    Ok((latencies, idle, loaded, maps))
}

#[allow(clippy::cast_precision_loss, clippy::cast_sign_loss, reason = "sample counts are small and p is in 0..=1")]
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"), PathBuf::from);
    std::fs::create_dir_all(&out)?;
    let sizes: &[usize] = if quick { &[10, 10_000] } else { &[10, 1_000, 10_000, 100_000] };
    let (repeat, runs) = if quick { (200_000, 3) } else { (1_000_000, 5) };
    eprintln!("bench: per-packet cost through BPF_PROG_TEST_RUN ({repeat} repeats, median of {runs})");
    let (rows, loads) = per_packet(sizes, repeat, runs)?;
    let (changes, big) = if quick { (20, 10_000) } else { (100, 100_000) };
    eprintln!("bench: policy update latency through the daemon ({changes} one-rule changes) and footprint");
    let (latencies, idle_kib, loaded_kib, maps) = daemon_figures(changes, big)?;

    let mut md = String::new();
    let _ = writeln!(md, "### Per-packet cost (XDP, `BPF_PROG_TEST_RUN`, ns per packet; floor = empty XDP program)\n");
    let _ = writeln!(md, "| identities | family | class | ns | floor ns | × floor |\n|---:|---|---|---:|---:|---:|");
    for row in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.2} |",
            row.identities,
            row.family,
            row.class,
            row.ns,
            row.floor,
            f64::from(row.ns) / f64::from(row.floor.max(1))
        );
    }
    let _ = writeln!(
        md,
        "\n### Policy load (in process: compile + write + switch)\n\n| identities and rules | full load | one-rule change on top |\n|---:|---:|---:|"
    );
    for (n, full, one) in &loads {
        let _ = writeln!(md, "| {n} | {:.1} ms | {:.1} ms |", full.as_secs_f64() * 1000.0, one.as_secs_f64() * 1000.0);
    }
    let _ = writeln!(
        md,
        "\n### Policy update through the daemon (atomic rename → new generation enforced)\n\n| changes | p50 | p99 | max |\n|---:|---:|---:|---:|"
    );
    let _ = writeln!(
        md,
        "| {} | {:.2} ms | {:.2} ms | {:.2} ms |",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );
    let _ = writeln!(
        md,
        "\n### Footprint\n\n| what | value |\n|---|---:|\n| daemon RSS, example policy | {idle_kib} KiB |\n| daemon RSS, {big} identities and rules | {loaded_kib} KiB |"
    );
    for (map, bytes) in &maps {
        let _ = writeln!(md, "| map `{map}` (memlock) | {} KiB |", bytes / 1024);
    }
    print!("{md}");

    let json = serde_json::json!({
        "quick": quick,
        "per_packet": rows.iter().map(|r| serde_json::json!({"identities": r.identities, "family": r.family, "class": r.class, "ns": r.ns, "floor_ns": r.floor})).collect::<Vec<_>>(),
        "policy_load": loads.iter().map(|(n, full, one)| serde_json::json!({"size": n, "full_ms": full.as_secs_f64() * 1000.0, "one_rule_ms": one.as_secs_f64() * 1000.0})).collect::<Vec<_>>(),
        "update_latency_ms": {"p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99), "samples": latencies},
        "footprint": {"rss_idle_kib": idle_kib, "rss_loaded_kib": loaded_kib, "loaded_size": big, "maps_memlock_bytes": maps.iter().cloned().collect::<BTreeMap<_, _>>()},
    });
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&json)?)?;
    std::fs::write(out.join("results.md"), &md)?;
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
    if let Ok(text) = std::fs::read_to_string(&doc)
        && let (Some(start), Some(end)) = (text.find("<!-- results:start -->"), text.find("<!-- results:end -->"))
    {
        let head = &text[..start + "<!-- results:start -->".len()];
        let mode = if quick { "`--quick` run" } else { "full run" };
        std::fs::write(&doc, format!("{head}\n\n_Latest {mode}._\n\n{md}\n{}", &text[end..]))?;
    }
    eprintln!("bench: results in {}", out.display());
    Ok(())
}
