//! Per-packet cost: the real programs through `BPF_PROG_TEST_RUN` beside
//! an empty XDP program (the floor), per policy size, family and packet
//! class. Each size's policy is loaded first, and that load timed (see
//! [`crate::load`]).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use enforcer::datapath::{Datapath, Hook, MapSizes};
use lab::frames::{self, ACK, ICMP, ICMPV6, SYN, TCP, icmp, tcp};

use crate::Error;
use crate::load::{self, Loads};
use crate::synthetic::{synthetic_policy, v4};

/// The packet classes measured, per family.
fn classes(family: &str) -> Vec<(&'static str, Vec<u8>)> {
    // `unknown` is in no identity: `world`, which no synthetic rule names.
    let (src, dst, unknown, icmp_proto, timestamp): (IpAddr, IpAddr, IpAddr, u8, u8) = if family == "IPv4" {
        (IpAddr::V4(v4(0)), IpAddr::V4(v4(1)), IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), ICMP, 13)
    } else {
        (
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            ICMPV6,
            130,
        )
    };
    vec![
        ("established (conntrack hit)", frames::simple(src, dst, TCP, tcp(40000, 1000, ACK))),
        // An ICMP timestamp request: allowed, never tracked.
        ("new allowed", frames::simple(src, dst, icmp_proto, icmp(timestamp, 0, [0; 4], &[0; 12]))),
        ("default-denied", frames::simple(src, dst, TCP, tcp(40000, 9, SYN))),
        ("deny rule", frames::simple(src, dst, TCP, tcp(40000, 22, SYN))),
        // From no identity (`world`) to one no rule opens to `world`.
        ("unknown source", frames::simple(unknown, dst, TCP, tcp(40000, 1000, SYN))),
        ("non-IP (ARP)", frames::arp()),
    ]
}

fn median(mut values: Vec<u32>) -> u32 {
    values.sort_unstable();
    values[values.len() / 2]
}

pub struct Row {
    identities: usize,
    family: &'static str,
    class: &'static str,
    ns: u32,
    floor: u32,
    /// Median over rounds of (program ns / floor ns in the same round).
    ratio: f64,
}

/// `spin`: a class (or the start of its name) to run alone for 30 s first.
pub fn per_packet(sizes: &[usize], repeat: u32, runs: usize, spin: Option<&str>) -> Result<(Vec<Row>, Loads), Error> {
    // Room for the largest synthetic policy (100k rules plus two).
    let mut datapath = Datapath::load_with(MapSizes { rules: 131_072, ..MapSizes::default() })?;
    let mut rows = Vec::new();
    let mut loads = Vec::new();
    for &n in sizes {
        let policy = synthetic_policy(n);
        loads.push(load::in_process(&mut datapath, &policy)?);
        datapath.clear_state()?;
        for (family, cache) in [("IPv4", true), ("IPv6", true), ("IPv4", false), ("IPv6", false)] {
            datapath.set_verdict_cache(cache)?;
            datapath.set_flow_cache(cache)?;
            for (class, frame) in classes(family) {
                // The policy classes twice: repeated (every run after the
                // first is a verdict cache hit, as in a flood) and with the
                // cache off (the full lookup a never-seen tuple takes, as in
                // a scan, minus the cache's store). Established flows twice
                // too: by the flow cache, and by the conntrack lookup a flow
                // takes on its first packet on a CPU (or once a second).
                let class = match (cache, class) {
                    (true, "new allowed") => "new allowed, untracked (repeated tuple: verdict cache)",
                    (true, "default-denied") => "default-denied (repeated tuple: verdict cache)",
                    (true, "deny rule") => "deny rule (repeated tuple: verdict cache)",
                    (true, "unknown source") => "unknown source, world (repeated tuple: verdict cache)",
                    (true, "established (conntrack hit)") => "established (repeated: flow cache)",
                    (true, class) => class,
                    (false, "established (conntrack hit)") => "established (flow cache off: conntrack lookup)",
                    (false, "new allowed") => "new allowed, untracked (never-seen tuple: full lookup)",
                    (false, "default-denied") => "default-denied (never-seen tuple: full lookup)",
                    (false, "deny rule") => "deny rule (never-seen tuple: full lookup)",
                    (false, "unknown source") => "unknown source, world (never-seen tuple: full lookup)",
                    (false, _) => continue,
                };
                if class.starts_with("established") {
                    // Open the connection once so the measured packets hit conntrack.
                    let syn = frame.clone();
                    let mut opening = syn.clone();
                    let flags = opening.len() - 7;
                    opening[flags] = SYN;
                    datapath.test_run(Hook::Ingress, &opening, 1)?;
                }
                if spin.is_some_and(|c| class.starts_with(c)) {
                    // For a profiler (`perf record -a`) to watch this class alone.
                    let until = Instant::now() + Duration::from_secs(30);
                    while Instant::now() < until {
                        datapath.test_run(Hook::Ingress, &frame, repeat)?;
                    }
                }
                let (ns, floor, ratio) = measure(&mut datapath, &frame, repeat, runs)?;
                rows.push(Row { identities: n, family, class, ns, floor, ratio });
            }
        }
        datapath.set_verdict_cache(true)?;
        datapath.set_flow_cache(true)?;
    }
    if let Some(&n) = sizes.last() {
        quarantined(&mut datapath, n, repeat, runs, &mut rows)?;
    }
    Ok((rows, loads))
}

/// What a quarantine adds: with one address quarantined elsewhere, every
/// packet asks the quarantine tries first (two lookups); a packet from the
/// quarantined address is dropped there. IPv4, caches on, the largest
/// policy (still loaded).
fn quarantined(datapath: &mut Datapath, n: usize, repeat: u32, runs: usize, rows: &mut Vec<Row>) -> Result<(), Error> {
    let elsewhere: ipnet::IpNet = "203.0.113.7/32".parse()?;
    datapath.set_quarantine(&[elsewhere].into_iter().collect())?;
    datapath.clear_state()?;
    let mut frames = classes("IPv4");
    frames.retain(|(class, _)| matches!(*class, "established (conntrack hit)" | "default-denied"));
    let (src, dst) = (IpAddr::V4(v4(0)), IpAddr::V4(v4(1)));
    let mut opening = frames::simple(src, dst, TCP, tcp(40000, 1000, SYN));
    datapath.test_run(Hook::Ingress, &opening, 1)?;
    for (class, frame) in frames {
        let class = match class {
            "established (conntrack hit)" => "established (repeated: flow cache), a quarantine in force elsewhere",
            _ => "default-denied (repeated tuple: verdict cache), a quarantine in force elsewhere",
        };
        let (ns, floor, ratio) = measure(datapath, &frame, repeat, runs)?;
        rows.push(Row { identities: n, family: "IPv4", class, ns, floor, ratio });
    }
    opening = frames::simple(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)), dst, TCP, tcp(40000, 1000, ACK));
    let (ns, floor, ratio) = measure(datapath, &opening, repeat, runs)?;
    rows.push(Row {
        identities: n,
        family: "IPv4",
        class: "quarantined source (dropped as quarantine)",
        ns,
        floor,
        ratio,
    });
    datapath.set_quarantine(&std::collections::BTreeSet::new())?;
    Ok(())
}

/// Program and floor alternate, and each round yields its own ratio: a
/// slow stretch of the machine (another guest, a frequency change) then
/// weighs on both sides of the ratio. (median ns, median floor ns, median
/// ratio.)
fn measure(datapath: &mut Datapath, frame: &[u8], repeat: u32, runs: usize) -> Result<(u32, u32, f64), Error> {
    let (mut program, mut floor, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let empty = datapath.test_run(Hook::Calibration, frame, repeat)?.duration_ns;
        let real = datapath.test_run(Hook::Ingress, frame, repeat)?.duration_ns;
        program.push(real);
        floor.push(empty);
        ratios.push(f64::from(real) / f64::from(empty.max(1)));
    }
    ratios.sort_by(f64::total_cmp);
    Ok((median(program), median(floor), ratios[ratios.len() / 2]))
}

pub fn markdown(md: &mut String, rows: &[Row]) {
    let _ = writeln!(md, "### Per-packet cost (XDP, `BPF_PROG_TEST_RUN`, ns per packet; floor = empty XDP program)\n");
    let _ = writeln!(md, "| identities | family | class | ns | floor ns | × floor |\n|---:|---|---|---:|---:|---:|");
    for row in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.2} |",
            row.identities, row.family, row.class, row.ns, row.floor, row.ratio
        );
    }
}

pub fn json(rows: &[Row]) -> serde_json::Value {
    rows.iter().map(|r| serde_json::json!({"identities": r.identities, "family": r.family, "class": r.class, "ns": r.ns, "floor_ns": r.floor, "ratio_to_floor": r.ratio})).collect()
}
