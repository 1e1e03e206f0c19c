//! `cargo xtask bench`: per-packet cost of the real programs beside an empty
//! XDP program (the floor), at several policy sizes; policy load and update
//! times; and the daemon's footprint. Writes JSON and a Markdown table and
//! refreshes the results section of BENCHMARKS.md. Numbers only: nothing
//! here fails because a machine is slow.
//!
//! This file only runs the parts; each measured concern has its file under
//! `common/`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/footprint.rs"]
mod footprint;
#[path = "common/incremental.rs"]
mod incremental;
#[path = "common/lateral.rs"]
mod lateral;
#[path = "common/live.rs"]
mod live;
#[path = "common/load.rs"]
mod load;
#[path = "common/per_packet.rs"]
mod per_packet;
#[path = "common/results.rs"]
mod results;
#[path = "common/synthetic.rs"]
mod synthetic;
#[path = "common/traffic.rs"]
mod traffic;
#[path = "common/update.rs"]
mod update;

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value_of = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let out =
        value_of("--out").map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"), PathBuf::from);
    std::fs::create_dir_all(&out)?;
    // For working on one part: `--only packets|daemon|loads|traffic|cluster|lateral`, `--sizes 10,100000`,
    // and `--spin established` (see `per_packet`).
    let only = value_of("--only");
    let wanted = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let custom_sizes: Option<Vec<usize>> =
        value_of("--sizes").map(|list| list.split(',').filter_map(|n| n.parse().ok()).collect());
    let default_sizes: &[usize] = if quick { &[10, 10_000] } else { &[10, 1_000, 10_000, 100_000] };
    let sizes = custom_sizes.as_deref().unwrap_or(default_sizes);
    let started = Instant::now();

    let mut md = String::new();
    let mut json = serde_json::Map::new();
    json.insert("quick".into(), quick.into());
    if wanted("packets") {
        let (repeat, runs) = if quick { (200_000, 3) } else { (1_000_000, 9) };
        eprintln!(
            "bench: per-packet cost through BPF_PROG_TEST_RUN ({repeat} repeats, {runs} rounds of floor then program)"
        );
        let (rows, loads) = per_packet::per_packet(sizes, repeat, runs, value_of("--spin").as_deref())?;
        per_packet::markdown(&mut md, &rows);
        load::markdown(&mut md, &loads);
        json.insert("per_packet".into(), per_packet::json(&rows));
        json.insert("policy_load".into(), load::json(&loads));
    }
    if wanted("daemon") || only.as_deref() == Some("loads") {
        let loads_only = only.as_deref() == Some("loads");
        let (changes, big, incremental_changes, churn_seconds) =
            if quick { (20, 10_000, 60, 5) } else { (100, 100_000, 1_000, 60) };
        eprintln!(
            "bench: policy updates through the daemon ({changes} renames, {changes} CLI pushes, {changes} pushes on an open connection, {changes} back-to-back renames, {big}-rule policy) and footprint"
        );
        let figures = daemon::figures(changes, big, incremental_changes, churn_seconds, loads_only)?;
        daemon::markdown(&mut md, &figures);
        daemon::json(&mut json, &figures);
    }
    if wanted("cluster") {
        let (pods, policies, changes, churn_seconds) =
            if quick { (1_000, 100, 20, 3) } else { (10_000, 1_000, 100, 10) };
        eprintln!(
            "bench: 3 emulated nodes against a fake API with {pods} pods and {policies} NetworkPolicies ({changes} pods created and deleted, {churn_seconds} s of 100 relabels per second)"
        );
        let figures = cluster::figures(pods, policies, changes, churn_seconds)?;
        cluster::markdown(&mut md, &figures);
        json.insert("cluster".into(), cluster::json(&figures));
    }
    if wanted("lateral") {
        let (trials, scan_seconds) = if quick { (4, 3) } else { (8, 10) };
        eprintln!(
            "bench: the lateral-movement detector ({trials} scanners quarantined, {scan_seconds} s of a 100 kpps scan with the detector on and off, a simulated day of benign hosts)"
        );
        let figures = lateral::figures(trials, scan_seconds)?;
        lateral::markdown(&mut md, &figures);
        json.insert("lateral".into(), lateral::json(&figures));
    }
    if wanted("traffic") {
        let (seconds, rounds, profiled) = if quick { (2, 1, (1, 2)) } else { (5, 5, (3, 3)) };
        eprintln!(
            "bench: traffic through veth with trafgen ({rounds} rounds of {seconds} s per filter and size, then {} profiled of {} s)",
            profiled.0, profiled.1
        );
        let rows = traffic::run_all(&[1_000, 10_000], seconds, rounds, profiled)?;
        traffic::markdown(&mut md, &rows);
        json.insert("traffic".into(), traffic::json(&rows));
    }
    let took = started.elapsed();
    let _ = writeln!(md, "\n_The run took {:.1} minutes._", took.as_secs_f64() / 60.0);
    json.insert("duration_s".into(), took.as_secs_f64().into());
    print!("{md}");
    results::write(&out, &md, &json)?;
    // Only a whole run replaces the published table.
    if only.is_none() && custom_sizes.is_none() {
        results::publish(&md, quick)?;
    }
    eprintln!("bench: results in {}", out.display());
    Ok(())
}
