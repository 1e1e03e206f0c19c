//! Changes that cost what they change: one rule, one identity or one
//! address added or removed on top of a base policy (10 or 100,000
//! identities and rules in one file), with the change in a second file of
//! the same directory (renamed into place, as an editor or a `ConfigMap`
//! update does) or sent for that one file through the admin API
//! (`PUT /v1/policy/files/NAME` on an open mutual-TLS connection). Each is
//! timed from handing it over until the live program enforces it (a probe
//! passes for an addition, is dropped for a removal). And address churn:
//! a thousand address changes a second for a minute, with the lag of each
//! change the prober catches.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lab::{Daemon, ThreeTier};

use crate::Error;
use crate::footprint;
use crate::live::{self, LiveProgram, syn};
use crate::results::percentile;
use crate::synthetic::v4;
use crate::update::{ApiSession, CHANGE_GAP, ClientFiles};

/// Port the base `extra-out` rule opens from the extra identities to id1.
const EXTRA_PORT: u16 = 40_001;

/// The six kinds of change, in the order they cycle.
const KINDS: [&str; 6] =
    ["rule added", "rule removed", "identity added", "identity removed", "address added", "address removed"];

fn extra_source() -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 100, 1)
}

/// The second file: identity `extra0` and a rule from the identities
/// labelled `role: extra` to id1, plus whatever change `k` adds (kinds 0, 2
/// and 4 add; the next change, 1, 3 or 5, takes it away again).
fn second_file(k: usize) -> String {
    let mut extra_addresses = format!("\"{}\"", extra_source());
    let mut identities = String::new();
    let mut rules = format!(
        "    - {{name: extra-out, from: [{{labels: {{role: extra}}}}], to: [{{identity: id1}}], ports: [\"{EXTRA_PORT}/tcp\"]}}\n"
    );
    match k % 6 {
        0 => {
            let _ = writeln!(
                rules,
                "    - {{name: extra-rule-{k}, from: [{{identity: extra0}}], to: [{{identity: id1}}], ports: [\"{}/tcp\"]}}",
                rule_port(k)
            );
        }
        2 => {
            let _ = writeln!(
                identities,
                "    - {{name: extra-{k}, labels: {{role: extra}}, addresses: [\"{}\"]}}",
                identity_address(k)
            );
        }
        4 => {
            let _ = write!(extra_addresses, ", \"{}\"", added_address(k));
        }
        _ => {}
    }
    format!(
        "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {{name: extra}}\nspec:\n  identities:\n    - {{name: extra0, labels: {{role: extra}}, addresses: [{extra_addresses}]}}\n{identities}  rules:\n{rules}"
    )
}

fn rule_port(k: usize) -> u16 {
    41_000 + (k % 1000) as u16
}

fn identity_address(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 101, (k % 250) as u8 + 1)
}

fn added_address(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 102, (k % 250) as u8 + 1)
}

/// The probe change `k` is timed with (a removal is probed with what the
/// addition before it opened), and whether it must pass after the change.
fn probe(k: usize) -> (Vec<u8>, bool) {
    let added = k - k % 2;
    let source_port = 20_000 + (added % 40_000) as u16;
    let frame = match added % 6 {
        0 => syn(extra_source(), v4(1), source_port, rule_port(added)),
        2 => syn(identity_address(added), v4(1), source_port, EXTRA_PORT),
        _ => syn(added_address(added), v4(1), source_port, EXTRA_PORT),
    };
    (frame, k.is_multiple_of(2))
}

/// [`live::settled_after`] as the change series poll: every 20 µs, for
/// at most 10 s.
fn settled_after(program: &LiveProgram, probe: &[u8], pass: bool, started: Instant) -> Result<Duration, Error> {
    live::settled_after(program, probe, pass, started, Duration::from_secs(10), Duration::from_micros(20))
}

/// Latencies (ms) of one series, by kind of change.
pub type ByKind = Vec<(&'static str, Vec<f64>)>;

fn by_kind(samples: &[(usize, f64)]) -> ByKind {
    KINDS
        .iter()
        .enumerate()
        .map(|(i, kind)| (*kind, samples.iter().filter(|(k, _)| k % 6 == i).map(|(_, ms)| *ms).collect()))
        .collect()
}

/// Runs `changes` changes `first..`, each handed over by `apply(k)` after
/// `gap`, and timed until enforced.
fn series(
    program: &LiveProgram,
    first: usize,
    changes: usize,
    gap: Duration,
    apply: &mut dyn FnMut(usize) -> Result<(), Error>,
) -> Result<ByKind, Error> {
    let mut samples = Vec::with_capacity(changes);
    for k in first..first + changes {
        let (frame, pass) = probe(k);
        if program.passes(&frame)? == pass {
            return Err(format!("change {k} ({}): the probe already shows it", KINDS[k % 6]).into());
        }
        std::thread::sleep(gap);
        let started = Instant::now();
        apply(k)?;
        samples.push((k, settled_after(program, &frame, pass, started)?.as_secs_f64() * 1000.0));
    }
    Ok(by_kind(&samples))
}

/// The four series on top of one base policy.
pub struct Incremental {
    pub base: usize,
    pub files_spaced: ByKind,
    pub files_back_to_back: ByKind,
    pub api_spaced: ByKind,
    pub api_back_to_back: ByKind,
}

/// With the base policy enforced from `p.yaml` in `dir`: `changes` changes
/// (cycling through the six kinds, so an even number ends where it began)
/// by renaming `q.yaml` into place, [`CHANGE_GAP`] apart and back to back,
/// then the same through the API, where `q.yaml` is one file of the
/// enforced policy. Ends with the directory in force again.
pub fn changes_on_top(
    lab: &ThreeTier,
    program: &LiveProgram,
    dir: &Path,
    client: &ClientFiles,
    base: usize,
    changes: usize,
) -> Result<Incremental, Error> {
    let staging = dir.join(".q.yaml.new");
    let mut rename = |k: usize| -> Result<(), Error> {
        std::fs::write(&staging, second_file(k))?;
        Ok(std::fs::rename(&staging, dir.join("q.yaml"))?)
    };
    // The second file in place before anything is timed (k = 1: the base).
    rename(1)?;
    settled_after(program, &probe(0).0, false, Instant::now())?;
    std::thread::sleep(Duration::from_millis(200));
    let files_spaced = series(program, 0, changes, CHANGE_GAP, &mut rename)?;
    let files_back_to_back = series(program, changes, changes, Duration::ZERO, &mut rename)?;
    // The API's q.yaml is a source of its own beside the directory's
    // files: the directory's q.yaml goes first, or the two would declare
    // the same identity.
    let base_rule = syn(extra_source(), v4(1), 19_999, EXTRA_PORT);
    std::fs::remove_file(dir.join("q.yaml"))?;
    settled_after(program, &base_rule, false, Instant::now())?;
    let mut session = ApiSession::open(lab, &client.ca, &client.cert, &client.key)?;
    let mut put = |k: usize| session.put("q.yaml", &second_file(k));
    put(1)?;
    settled_after(program, &base_rule, true, Instant::now())?;
    std::thread::sleep(Duration::from_millis(200));
    let api_spaced = series(program, 2 * changes, changes, CHANGE_GAP, &mut put)?;
    let api_back_to_back = series(program, 3 * changes, changes, Duration::ZERO, &mut put)?;
    session.delete("q.yaml")?;
    Ok(Incremental { base, files_spaced, files_back_to_back, api_spaced, api_back_to_back })
}

/// Address churn: what a busy node's pods do to the engine.
pub struct Churn {
    pub base: usize,
    pub seconds: u64,
    pub written: usize,
    /// Lag (ms) of each change the prober caught: written → enforced.
    pub lags: Vec<f64>,
    /// Changes the prober chased but whose address left the window first
    /// (a lag longer than the window).
    pub missed: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub generations: u64,
}

fn churn_address(j: usize) -> Ipv4Addr {
    let j = j % 60_000;
    Ipv4Addr::new(10, 250, (j >> 8) as u8, j as u8)
}

/// `per_second` address changes a second for `seconds` on top of the base:
/// each renames in a `q.yaml` where `extra0` holds a window of 100
/// addresses that slides by one. A prober sends SYNs from the newest
/// address until one passes, records the lag since that change was
/// written, and moves on to the newest change then.
pub fn address_churn(
    lab: &ThreeTier,
    daemon: &Daemon,
    program: &LiveProgram,
    dir: &Path,
    base: usize,
    per_second: u32,
    seconds: u64,
) -> Result<Churn, Error> {
    /// Addresses `extra0` holds at once: a change's address stays for the
    /// next `WINDOW - 1` changes, so lags up to `WINDOW / per_second` are seen.
    const WINDOW: usize = 100;
    let file = |k: usize| -> String {
        let addresses: Vec<String> =
            (k.saturating_sub(WINDOW - 1)..=k).map(|j| format!("\"{}\"", churn_address(j))).collect();
        format!(
            "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {{name: extra}}\nspec:\n  identities:\n    - {{name: extra0, labels: {{role: extra}}, addresses: [\"{}\", {}]}}\n  rules:\n    - {{name: extra-out, from: [{{labels: {{role: extra}}}}], to: [{{identity: id1}}], ports: [\"{EXTRA_PORT}/tcp\"]}}\n",
            extra_source(),
            addresses.join(", ")
        )
    };
    let staging = dir.join(".q.yaml.new");
    std::fs::write(&staging, file(0))?;
    std::fs::rename(&staging, dir.join("q.yaml"))?;
    // After API changes the directory comes back whole: wait for it.
    let first = syn(churn_address(0), v4(1), 19_998, EXTRA_PORT);
    live::enforced_after(program, &first, Instant::now(), Duration::from_mins(3), Duration::from_millis(5))?;
    std::thread::sleep(Duration::from_millis(500));
    let generation = |lab: &ThreeTier| -> Result<u64, Error> {
        let (_, text) = lab::probe::http_get(&lab.router, daemon.metrics_addr, "/metrics")?;
        lab::probe::metric(&text, "bulkhead_policy_generation").ok_or_else(|| "no generation in the metrics".into())
    };
    let generation_before = generation(lab)?;
    let rss_before_kib = footprint::rss_kib(daemon.pid());
    let written_at: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(vec![Instant::now()]));
    let latest = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (written_at, latest, stop) = (Arc::clone(&written_at), Arc::clone(&latest), Arc::clone(&stop));
        let program = LiveProgram::attached_under(&lab.bpffs_root())?;
        std::thread::spawn(move || -> Result<(Vec<f64>, usize), String> {
            let mut lags = Vec::new();
            let mut missed = 0;
            let mut caught = 0;
            let mut attempt: usize = 0;
            while !stop.load(Ordering::Relaxed) {
                // Chase the newest change until it is enforced, or until
                // its address has slid out of the window (a lag longer
                // than the window: counted as missed).
                let k = latest.load(Ordering::Acquire);
                if k == caught {
                    std::thread::sleep(Duration::from_micros(100));
                    continue;
                }
                loop {
                    attempt += 1;
                    let frame = syn(churn_address(k), v4(1), 1024 + (attempt % 60_000) as u16, EXTRA_PORT);
                    if program.passes(&frame).map_err(|e| e.to_string())? {
                        let at = written_at.lock().map_err(|e| e.to_string())?[k];
                        lags.push(at.elapsed().as_secs_f64() * 1000.0);
                        break;
                    }
                    if latest.load(Ordering::Acquire) >= k + WINDOW || stop.load(Ordering::Relaxed) {
                        missed += 1;
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                caught = k;
            }
            Ok((lags, missed))
        })
    };
    let interval = Duration::from_secs(1) / per_second;
    let started = Instant::now();
    let mut k = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        k += 1;
        std::fs::write(&staging, file(k))?;
        let due = started + interval * u32::try_from(k).unwrap_or(u32::MAX);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        written_at.lock().map_err(|e| e.to_string())?.push(Instant::now());
        std::fs::rename(&staging, dir.join("q.yaml"))?;
        latest.store(k, Ordering::Release);
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (lags, missed) = prober.join().map_err(|_| "the prober panicked")??;
    let rss_after_kib = footprint::rss_kib(daemon.pid());
    let generations = generation(lab)? - generation_before;
    std::fs::remove_file(dir.join("q.yaml"))?;
    Ok(Churn { base, seconds, written: k, lags, missed, rss_before_kib, rss_after_kib, generations })
}

fn stats(samples: &[f64]) -> String {
    if samples.is_empty() {
        return "| 0 | – | – | – |".to_owned();
    }
    format!(
        "| {} | {:.2} ms | {:.2} ms | {:.2} ms |",
        samples.len(),
        percentile(samples, 0.5),
        percentile(samples, 0.99),
        percentile(samples, 1.0)
    )
}

pub fn markdown(md: &mut String, runs: &[Incremental], churn: Option<&Churn>) {
    let _ = writeln!(
        md,
        "\n### Changes on top of a large policy (second file or one API file → enforced)\n\n| base | how | change | changes | p50 | p99 | max |\n|---:|---|---|---:|---:|---:|---:|"
    );
    for run in runs {
        for (how, series) in [
            ("file renamed, spaced", &run.files_spaced),
            ("file renamed, back to back", &run.files_back_to_back),
            ("API PUT, spaced", &run.api_spaced),
            ("API PUT, back to back", &run.api_back_to_back),
        ] {
            for (kind, samples) in series {
                let _ = writeln!(md, "| {} | {how} | {kind} {}", run.base, stats(samples));
            }
            let all: Vec<f64> = series.iter().flat_map(|(_, s)| s.iter().copied()).collect();
            let _ = writeln!(md, "| {} | {how} | **all** {}", run.base, stats(&all));
        }
    }
    if let Some(churn) = churn {
        let _ = writeln!(
            md,
            "\nAddress churn on top of {} identities and rules: {} address changes in {} s ({}/s), applied as {} generations; lag of the {} changes the prober caught, written → enforced: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} chased changes not enforced within the 100-change window). Daemon RSS {} KiB before, {} KiB after.",
            churn.base,
            churn.written,
            churn.seconds,
            churn.written / usize::try_from(churn.seconds.max(1)).unwrap_or(1),
            churn.generations,
            churn.lags.len(),
            percentile(&churn.lags, 0.5),
            percentile(&churn.lags, 0.99),
            percentile(&churn.lags, 1.0),
            churn.missed,
            churn.rss_before_kib,
            churn.rss_after_kib
        );
    }
}

pub fn json(runs: &[Incremental], churn: Option<&Churn>) -> serde_json::Value {
    let series = |by: &ByKind| -> serde_json::Value {
        by.iter()
            .map(|(kind, s)| {
                (
                    (*kind).to_owned(),
                    serde_json::json!({"p50": percentile(s, 0.5), "p99": percentile(s, 0.99), "samples": s}),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    serde_json::json!({
        "runs": runs.iter().map(|r| serde_json::json!({
            "base": r.base,
            "files_spaced": series(&r.files_spaced),
            "files_back_to_back": series(&r.files_back_to_back),
            "api_spaced": series(&r.api_spaced),
            "api_back_to_back": series(&r.api_back_to_back),
        })).collect::<Vec<_>>(),
        "churn": churn.map(|c| serde_json::json!({
            "base": c.base, "seconds": c.seconds, "written": c.written, "generations": c.generations,
            "lag_p50_ms": percentile(&c.lags, 0.5), "lag_p99_ms": percentile(&c.lags, 0.99), "lag_max_ms": percentile(&c.lags, 1.0),
            "caught": c.lags.len(), "missed": c.missed, "rss_before_kib": c.rss_before_kib, "rss_after_kib": c.rss_after_kib,
        })),
    })
}
