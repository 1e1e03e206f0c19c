//! Policy load times: the synthetic policies in process (compile, write,
//! switch; and a one-rule change on top), and the large one through the
//! daemon (file rename → enforced).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use enforcer::datapath::Datapath;
use lab::Daemon;
use policy::Engine;
use policy::engine::{Contents, SourceChange};
use policy::model::{Policy, PortSpec, Protocol};

use crate::Error;
use crate::live::{LiveProgram, denied_before, enforced_after, syn};
use crate::results::ms;
use crate::synthetic::{policy_yaml, synthetic_policy, v4};
use crate::update::CHANGE_GAP;

/// Loading a synthetic policy of `size` identities and rules in process.
pub struct Load {
    size: usize,
    full: Duration,
    compile: Duration,
    one_rule: Duration,
}

pub type Loads = Vec<Load>;

/// Applies `policy` (a synthetic policy: as many identities as rules) to
/// `datapath`, timed, then a one-rule change on top, timed, and `policy`
/// again, which stays applied.
pub fn in_process(datapath: &mut Datapath, policy: &Policy) -> Result<Load, Error> {
    // Each timed apply comes as an isolated change would, after the
    // wait that follows the previous switch (see CHANGE_GAP).
    std::thread::sleep(CHANGE_GAP);
    let mut engine = Engine::new();
    let whole = vec![SourceChange { source: "big".to_owned(), contents: Contents::Parsed(policy.clone()) }];
    let started = Instant::now();
    let diff = engine.apply(whole, SystemTime::now())?;
    let compile_time = started.elapsed();
    datapath.apply(&diff, &engine, false)?;
    let full = started.elapsed();
    drop(diff);
    // As the daemon does after its first load: the other slot too, so
    // that a change writes only itself.
    datapath.prefill_standby(&engine)?;
    // A one-rule change on top, in a source of its own: rule r0 again,
    // under another name and port.
    let mut extra = Policy::default();
    let mut rule = policy.rules[0].clone();
    "extra".clone_into(&mut rule.name);
    if let Some(ports) = rule.ports.as_mut() {
        ports[0] = PortSpec { protocol: Protocol::Tcp, first: 2999, last: 2999 };
    }
    extra.rules.push(rule);
    let change = vec![SourceChange { source: "extra".to_owned(), contents: Contents::Parsed(extra) }];
    std::thread::sleep(CHANGE_GAP);
    let started = Instant::now();
    let diff = engine.apply(change, SystemTime::now())?;
    datapath.apply(&diff, &engine, false)?;
    let one = started.elapsed();
    let back = engine
        .apply(vec![SourceChange { source: "extra".to_owned(), contents: Contents::Removed }], SystemTime::now())?;
    std::thread::sleep(CHANGE_GAP);
    datapath.apply(&back, &engine, false)?;
    Ok(Load { size: policy.identities.len(), full, compile: compile_time, one_rule: one })
}

pub fn markdown(md: &mut String, loads: &Loads) {
    let _ = writeln!(
        md,
        "\n### Policy load (in process: compile + write + switch)\n\n| identities and rules | full load | of which compile | one-rule change on top |\n|---:|---:|---:|---:|"
    );
    for load in loads {
        let _ = writeln!(
            md,
            "| {} | {:.1} ms | {:.1} ms | {:.1} ms |",
            load.size,
            ms(load.full),
            ms(load.compile),
            ms(load.one_rule)
        );
    }
}

pub fn json(loads: &Loads) -> serde_json::Value {
    loads.iter().map(|l| serde_json::json!({"size": l.size, "full_ms": ms(l.full), "compile_ms": ms(l.compile), "one_rule_ms": ms(l.one_rule)})).collect()
}

/// The large policy through the daemon.
pub struct Large {
    size: usize,
    /// Rename → enforced.
    full: Duration,
    /// A one-rule change to it, the same way.
    change: Duration,
    /// The daemon's own account of the two applies.
    breakdown: Vec<String>,
}

/// The synthetic policy of `big` identities and rules, as YAML the daemon
/// reads and watches in `dir`, renamed into place and timed until
/// `program` enforces it; then a one-rule change to it, the same way.
pub fn through_daemon(daemon: &Daemon, program: &LiveProgram, dir: &Path, big: usize) -> Result<Large, Error> {
    // The large policy, as YAML the daemon reads and watches. (A pushed
    // policy stays until the directory changes, which this rename does.)
    let policy = synthetic_policy(big);
    let limit = Duration::from_mins(3);
    // Probe: identity 0 to identity 1 on rule r0's port, which neither the
    // three-tier policy nor the large one before the change allows.
    let load = |port: u16, source_port: u16| -> Result<Duration, Error> {
        let text = policy_yaml(&policy, port);
        // A policy the daemon would reject would only show up as a timeout.
        policy::parse_str("big.yaml", &text).map_err(|e| format!("the synthetic policy is invalid: {e}"))?;
        std::fs::write(dir.join(".p.yaml.new"), text)?;
        let probe = syn(v4(0), v4(1), source_port, port);
        denied_before(program, &probe)?;
        let started = Instant::now();
        std::fs::rename(dir.join(".p.yaml.new"), dir.join("p.yaml"))?;
        // Seconds-long loads need no finer than a millisecond.
        enforced_after(program, &probe, started, limit, Duration::from_millis(1))
    };
    let big_load = load(1000, 30_000)?;
    let big_change = load(2999, 30_001)?;
    // The daemon logs where each apply's time went.
    std::thread::sleep(Duration::from_millis(200));
    let breakdown: Vec<String> = daemon
        .log_text()
        .lines()
        .filter(|l| l.contains(&format!("{big} identities")) && l.contains(" took "))
        .filter_map(|l| l.split(" took ").nth(1).map(str::to_owned))
        .collect();
    Ok(Large { size: big, full: big_load, change: big_change, breakdown })
}

pub fn large_markdown(md: &mut String, large: &Large) {
    let big = large.size;
    let _ = writeln!(
        md,
        "\n| {big} identities and rules, through the daemon | time |\n|---|---:|\n| full load (rename → enforced: parse, validate, compile, write, switch) | {:.0} ms |\n| one-rule change to it | {:.0} ms |",
        ms(large.full),
        ms(large.change)
    );
    for (what, line) in ["full load", "one-rule change"].iter().zip(&large.breakdown) {
        let _ = writeln!(md, "\nThe daemon's log for the {what}: {line}.");
    }
}

pub fn large_json(large: &Large) -> serde_json::Value {
    serde_json::json!({"size": large.size, "full_load_ms": ms(large.full), "one_rule_change_ms": ms(large.change), "daemon_breakdown": large.breakdown})
}
