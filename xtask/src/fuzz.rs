//! `cargo xtask fuzz [--time S] [TARGET]`: builds the fuzz targets in
//! `fuzz/` (cargo-fuzz, libFuzzer, nightly) and runs each for S seconds
//! from its seed corpus, bounded in memory and in time per input, so that
//! an input that exhausts either is a finding like a crash.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// A fuzz target (a `[[bin]]` of `fuzz/Cargo.toml`) and the longest input
/// worth trying on it: beyond that, inputs only cost time per run.
pub struct Target {
    pub name: &'static str,
    max_len: usize,
}

pub const TARGETS: [Target; 5] = [
    // Policy text: the parser, validator, compiler and incremental engine.
    Target { name: "policy", max_len: 16_384 },
    // Kubernetes objects as the cluster source hands them to the engine.
    Target { name: "kubernetes", max_len: 16_384 },
    // Admin API requests: method, path, query, headers, body.
    Target { name: "api", max_len: 16_384 },
    // The `bulkhead run --config` file.
    Target { name: "config", max_len: 4096 },
    // Kernel event records into JSON lines: one 64-byte record and a clock offset.
    Target { name: "events", max_len: 128 },
];

/// The name `cargo xtask fuzz` gives the kernel differential test.
pub const KERNEL: &str = "kernel";

/// Runs the kernel programs against the reference datapath
/// (`tests/tests/differential.rs`) on `frames` hostile frames, in a release
/// build: the test prints the frames per second, what the frames were and
/// how they were judged, and fails on the first disagreement.
pub fn differential(frames: u64) -> anyhow::Result<()> {
    crate::build()?;
    println!(
        "fuzz: kernel: {frames} frames through the XDP and TC programs, each checked against the reference datapath"
    );
    crate::run(
        crate::cargo()
            .args(["test", "--release", "-p", "tests", "--test", "differential", "--", "--nocapture"])
            .env("BULKHEAD_DIFFERENTIAL_FRAMES", frames.to_string())
            .current_dir(crate::workspace_root()),
    )
}

/// Memory a target may use (`-rss_limit_mb`, and so the largest single
/// allocation too) before the run counts as out of memory.
const RSS_LIMIT_MB: u32 = 2048;
/// Seconds one input may take (`-timeout`) before the run counts as hung.
const INPUT_TIMEOUT_S: u32 = 10;

/// What one target's run did.
pub struct Outcome {
    pub target: &'static str,
    /// Inputs run (libFuzzer's `stat::number_of_executed_units`).
    pub inputs: Option<u64>,
    pub new_units: Option<u64>,
    /// What went wrong and where the input that did it was written.
    pub finding: Option<String>,
    pub log: PathBuf,
}

fn fuzz_dir() -> PathBuf {
    crate::workspace_root().join("fuzz")
}

/// `cargo +nightly fuzz ...` in the workspace: the rustup proxy with
/// nightly, whatever toolchain runs xtask itself.
fn cargo_fuzz() -> Command {
    let mut command = Command::new("cargo");
    command
        .arg("+nightly")
        .arg("fuzz")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .current_dir(crate::workspace_root());
    command
}

/// Runs `only` (or every target) for `seconds` each; fails if any target
/// crashed, hung or ran out of memory.
pub fn fuzz(seconds: u64, only: Option<&str>) -> anyhow::Result<Vec<Outcome>> {
    let targets: Vec<&Target> = match only {
        None => TARGETS.iter().collect(),
        Some(name) => {
            let Some(target) = TARGETS.iter().find(|t| t.name == name) else {
                let names: Vec<&str> = TARGETS.iter().map(|t| t.name).chain([KERNEL]).collect();
                bail!("no fuzz target `{name}`; the targets are {}", names.join(", "));
            };
            vec![target]
        }
    };
    crate::setup::fuzz_tools()?;
    println!("fuzz: building the fuzz targets (release, debug assertions and overflow checks on)");
    let mut build = cargo_fuzz();
    build.args(["build", "--debug-assertions"]);
    if let Some(name) = only {
        build.arg(name);
    }
    crate::run(&mut build)?;
    let mut outcomes = Vec::new();
    for target in targets {
        let outcome = run_target(target, seconds)?;
        let inputs = outcome.inputs.map_or_else(|| "?".to_owned(), |n| n.to_string());
        let new_units = outcome.new_units.map_or_else(|| "?".to_owned(), |n| n.to_string());
        match &outcome.finding {
            None => println!(
                "fuzz: {}: {inputs} inputs in {seconds} s, {new_units} new coverage units, found nothing",
                outcome.target
            ),
            Some(finding) => println!("fuzz: {}: {inputs} inputs, then found {finding}", outcome.target),
        }
        outcomes.push(outcome);
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.finding.is_some()).collect();
    if !failed.is_empty() {
        for outcome in &failed {
            println!(
                "fuzz: {} found {}; its log is {}",
                outcome.target,
                outcome.finding.as_deref().unwrap_or_default(),
                outcome.log.display()
            );
        }
        bail!(
            "{} fuzz target(s) failed; replay an input with `cargo +nightly fuzz run --debug-assertions TARGET INPUT`, fix the code, and add the input as a regression test",
            failed.len()
        );
    }
    Ok(outcomes)
}

fn run_target(target: &Target, seconds: u64) -> anyhow::Result<Outcome> {
    let root = crate::workspace_root();
    // New inputs go to a working corpus under target/; the seeds in git stay as they are.
    let work = root.join("target/fuzz/corpus").join(target.name);
    let seeds = fuzz_dir().join("corpus").join(target.name);
    // Inputs that once failed, run again first (their fixes have unit tests too).
    let regressions = fuzz_dir().join("regressions").join(target.name);
    let logs = root.join("target/fuzz/logs");
    for dir in [&work, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let log_path = logs.join(format!("{}.log", target.name));
    let mut log = std::fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    println!("fuzz: running {} for {seconds} s (log: {})", target.name, log_path.display());
    let mut command = cargo_fuzz();
    command
        .args(["run", "--debug-assertions", target.name])
        .arg(&work)
        .arg(&seeds)
        .args(regressions.is_dir().then_some(&regressions))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-max_len={}", target.max_len))
        .arg("-print_final_stats=1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().context("cannot start cargo fuzz run")?;
    // libFuzzer reports on stderr; the targets print nothing on stdout.
    let stdout = child.stdout.take().context("cargo fuzz has no stdout")?;
    let stdout_thread = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let mut summary = Summary::default();
    for line in BufReader::new(child.stderr.take().context("cargo fuzz has no stderr")?).lines() {
        let line = line?;
        writeln!(log, "{line}")?;
        summary.read(&line);
    }
    let status = child.wait()?;
    let stdout = stdout_thread.join().unwrap_or_default();
    log.write_all(stdout.as_bytes())?;
    let finding = if status.success() {
        None
    } else {
        let what = summary.problem.clone().unwrap_or_else(|| format!("a failure ({status})"));
        Some(match &summary.artifact {
            Some(artifact) => format!("{what}, input written to {}", artifact.display()),
            None => what,
        })
    };
    if finding.is_some() {
        // The end of the log says what failed and where.
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(40)..] {
            println!("    {line}");
        }
    }
    Ok(Outcome { target: target.name, inputs: summary.inputs, new_units: summary.new_units, finding, log: log_path })
}

/// What libFuzzer's output says of a run.
#[derive(Default)]
struct Summary {
    inputs: Option<u64>,
    new_units: Option<u64>,
    problem: Option<String>,
    artifact: Option<PathBuf>,
}

impl Summary {
    fn read(&mut self, line: &str) {
        let stat = |name: &str| line.strip_prefix(name).and_then(|rest| rest.trim().parse::<u64>().ok());
        if let Some(n) = stat("stat::number_of_executed_units:") {
            self.inputs = Some(n);
        } else if let Some(n) = stat("stat::new_units_added:") {
            self.new_units = Some(n);
        } else if let Some(rest) = line.strip_prefix("Done ")
            && self.inputs.is_none()
        {
            // `Done 123 runs in 10 second(s)`, should the stats be missing.
            self.inputs = rest.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if let Some(path) = line.split("Test unit written to ").nth(1) {
            self.artifact = Some(Path::new(path.trim()).to_path_buf());
        } else if self.problem.is_none() {
            self.problem = problem(line);
        }
    }
}

/// The kind of finding a libFuzzer line reports, if it reports one.
fn problem(line: &str) -> Option<String> {
    if line.contains("ERROR: libFuzzer: timeout") {
        Some(format!("a timeout (an input ran over {INPUT_TIMEOUT_S} s)"))
    } else if line.contains("ERROR: libFuzzer: out-of-memory") {
        Some(format!("an out-of-memory (over {RSS_LIMIT_MB} MB)"))
    } else if line.contains("panicked at") {
        Some(format!("a panic: {}", line.trim()))
    } else if line.contains("ERROR: libFuzzer: deadly signal") || line.contains("ERROR: AddressSanitizer") {
        Some(line.trim().trim_start_matches('=').to_owned())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_output() {
        let mut summary = Summary::default();
        for line in [
            "#1024\tpulse  cov: 812 ft: 2301 corp: 120/9Kb exec/s: 512 rss: 60Mb",
            "thread '<unnamed>' panicked at policy/src/parse.rs:12:5:",
            "==1234== ERROR: libFuzzer: deadly signal",
            "artifact_prefix='/w/fuzz/artifacts/policy/'; Test unit written to /w/fuzz/artifacts/policy/crash-abc",
            "stat::number_of_executed_units: 40960",
            "stat::new_units_added: 17",
        ] {
            summary.read(line);
        }
        assert_eq!(summary.inputs, Some(40_960));
        assert_eq!(summary.new_units, Some(17));
        assert_eq!(
            summary.problem.as_deref(),
            Some("a panic: thread '<unnamed>' panicked at policy/src/parse.rs:12:5:")
        );
        assert_eq!(summary.artifact, Some(PathBuf::from("/w/fuzz/artifacts/policy/crash-abc")));
        let mut timed_out = Summary::default();
        timed_out.read("==77== ERROR: libFuzzer: timeout after 11 seconds");
        timed_out.read("Done 99 runs in 12 second(s)");
        assert_eq!(timed_out.inputs, Some(99));
        assert!(timed_out.problem.unwrap().starts_with("a timeout"));
    }
}
