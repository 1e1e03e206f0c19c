//! The daemon part: one lab with a running daemon, its admin API on mutual
//! TLS, in which update latency, the large policy's load and the footprint
//! are measured, in that order.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use lab::pki::ApiPki;
use lab::{Daemon, ScratchDir, ThreeTier};

use std::time::Instant;

use crate::Error;
use crate::footprint::{self, Footprint};
use crate::incremental::{self, Churn, Incremental};
use crate::live::{LiveProgram, denied_before, enforced_after, syn};
use crate::load::{self, Large};
use crate::synthetic::{policy_yaml, synthetic_policy, v4};
use crate::update::{self, API, ClientFiles, UpdateSeries};

/// What the daemon part measures.
pub struct DaemonFigures {
    /// Rename, `bulkhead policy push` started, or push request sent on an
    /// open API connection → new generation enforced. None when only the
    /// loads were measured.
    updates: Option<UpdateSeries>,
    /// The large policy: rename → enforced, and a one-rule change to it.
    large: Large,
    footprint: Footprint,
    /// Changes on top of the small and the large policy.
    incremental: Vec<Incremental>,
    churn: Option<Churn>,
    /// (identities and rules, daemon RSS KiB) for the synthetic policies.
    rss_by_size: Vec<(usize, u64)>,
}

/// Renames the synthetic policy of `size` into `dir` as `p.yaml`, with
/// rule r0 on `port`, and waits until it is enforced.
fn load_synthetic(program: &LiveProgram, dir: &Path, size: usize, port: u16) -> Result<(), Error> {
    std::fs::write(dir.join(".p.yaml.new"), policy_yaml(&synthetic_policy(size), port))?;
    let probe = syn(v4(0), v4(1), 31_000 + port, port);
    denied_before(program, &probe)?;
    let started = Instant::now();
    std::fs::rename(dir.join(".p.yaml.new"), dir.join("p.yaml"))?;
    enforced_after(program, &probe, started, Duration::from_mins(3), Duration::from_millis(1))?;
    Ok(())
}

/// `result`, with the end of the daemon's log added to an error: a bench
/// that stops on a change the daemon did not apply says why it did not.
fn explained<T>(result: Result<T, Error>, daemon: &Daemon) -> Result<T, Error> {
    result.map_err(|error| {
        let log = daemon.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("{error}\nthe end of the daemon's log:\n{}", tail.join("\n")).into()
    })
}

/// Update latency through the real daemon (file renames and API pushes),
/// the large policy's load and one-rule change, and the footprint. With
/// `loads_only`, just the loads and the footprint (`--only loads`: a quick
/// look at load time and memory while working on them).
pub fn figures(
    changes: usize,
    big: usize,
    incremental_changes: usize,
    churn_seconds: u64,
    loads_only: bool,
) -> Result<DaemonFigures, Error> {
    let lab = ThreeTier::new("bench")?;
    let scratch = ScratchDir::new(&lab.stem)?;
    let dir = scratch.0.join("policy");
    let pki = scratch.0.join("pki");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(&pki)?;
    let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier.yaml"))?;
    let variant = |k: usize| example.replace("8080/tcp", &format!("{}/tcp", 8080 + k % 2));
    std::fs::write(dir.join("p.yaml"), variant(0))?;
    let api_pki = ApiPki::issue(&pki)?;
    let rule_room = (big + 16).to_string();
    let mut args: Vec<String> =
        ["--events-to", "off", "--rule-map-size", &rule_room, "--api-addr", API].map(str::to_owned).into();
    args.extend(api_pki.daemon_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start_with(&lab, &dir, &scratch.0.join("log"), &args)?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let pid = daemon.pid();
    let idle_kib = footprint::rss_kib(pid);
    let program = LiveProgram::attached_under(&lab.bpffs_root())?;
    let client = ClientFiles {
        ca: api_pki.ca_pem,
        cert: pki.join("operator.pem"),
        key: pki.join("operator.key"),
        scratch: scratch.0.clone(),
    };
    let updates = if loads_only {
        None
    } else {
        Some(explained(update::timed_updates(&lab, &daemon, &program, &dir, &client, changes, &variant), &daemon)?)
    };
    let mut rss_by_size = Vec::new();
    let mut incremental = Vec::new();
    for (size, port) in [(10, 3001), (1_000, 3002), (10_000, 3003)] {
        if size >= big {
            break;
        }
        explained(load_synthetic(&program, &dir, size, port), &daemon)?;
        rss_by_size.push((size, footprint::settled_rss_kib(pid)));
        if size == 10 && !loads_only {
            let on_top = incremental::changes_on_top(&lab, &program, &dir, &client, size, incremental_changes);
            incremental.push(explained(on_top, &daemon)?);
        }
    }
    let large = explained(load::through_daemon(&daemon, &program, &dir, big), &daemon)?;
    // The steady state: once the rule usage record has taken in the large
    // policy's rules (its first refresh comes a period after the start).
    let first_usage_refresh = enforcer::usage::REFRESH + Duration::from_secs(3);
    std::thread::sleep(first_usage_refresh.saturating_sub(started.elapsed()));
    let loaded_kib = footprint::settled_rss_kib(pid);
    rss_by_size.push((big, loaded_kib));
    let mut churn = None;
    if !loads_only {
        let on_top = incremental::changes_on_top(&lab, &program, &dir, &client, big, incremental_changes);
        incremental.push(explained(on_top, &daemon)?);
        let churned = incremental::address_churn(&lab, &daemon, &program, &dir, big, 1000, churn_seconds);
        churn = Some(explained(churned, &daemon)?);
    }
    let maps = footprint::memlock(&lab.bpffs_root());
    daemon.stop()?;
    Ok(DaemonFigures {
        updates,
        large,
        footprint: Footprint { idle_kib, loaded_kib, loaded_size: big, maps },
        incremental,
        churn,
        rss_by_size,
    })
}

pub fn markdown(md: &mut String, figures: &DaemonFigures) {
    if let Some(updates) = &figures.updates {
        update::markdown(md, updates);
    }
    load::large_markdown(md, &figures.large);
    incremental::markdown(md, &figures.incremental, figures.churn.as_ref());
    footprint::markdown(md, &figures.footprint);
    let _ = writeln!(md, "\n| identities and rules | daemon RSS |\n|---:|---:|");
    for (size, kib) in &figures.rss_by_size {
        let _ = writeln!(md, "| {size} | {} MiB |", kib / 1024);
    }
}

pub fn json(json: &mut serde_json::Map<String, serde_json::Value>, figures: &DaemonFigures) {
    if let Some(updates) = &figures.updates {
        json.insert("update_latency_ms".into(), update::json(updates));
    }
    json.insert("large_policy".into(), load::large_json(&figures.large));
    json.insert("footprint".into(), footprint::json(&figures.footprint));
    json.insert("incremental".into(), incremental::json(&figures.incremental, figures.churn.as_ref()));
    json.insert(
        "rss_by_size_kib".into(),
        figures.rss_by_size.iter().map(|(size, kib)| serde_json::json!({"size": size, "rss_kib": kib})).collect(),
    );
}
