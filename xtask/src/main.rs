//! `cargo xtask`: one-command setup, build, test and demo for Bulkhead.

mod demo;
mod demo_cluster;
mod fuzz;
mod image;
mod setup;
mod supply;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Bulkhead developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything the build and tests need (idempotent).
    Setup,
    /// Set up if needed, then build the release binary at target/release/bulkhead.
    Build,
    /// Set up, build, lint, and run every unit and privileged integration test.
    Test,
    /// Measure per-packet cost, policy load and update times, and footprint; refresh BENCHMARKS.md.
    Bench {
        /// A shorter subset: fewer policy sizes, repeats and changes.
        #[arg(long)]
        quick: bool,
        /// One part only, for working on it: packets, daemon, loads, cluster,
        /// lateral or traffic (BENCHMARKS.md is then left as it is).
        #[arg(long, value_name = "PART")]
        only: Option<String>,
    },
    /// Build, then write a `CycloneDX` SBOM of what ships in the image to
    /// target/sbom/bulkhead.cdx.json (crates and Debian packages).
    Sbom,
    /// Fuzz the parsers (policy, Kubernetes objects, admin API requests, config
    /// file, kernel events) with libFuzzer on nightly; any crash, hang or
    /// memory blowup fails and leaves its input under fuzz/artifacts/. Then
    /// (target `kernel`) compare the kernel programs with the reference
    /// datapath on hostile frames; a disagreement fails and leaves its case
    /// under target/differential/.
    Fuzz {
        /// Seconds to run each libFuzzer target.
        #[arg(long, value_name = "S", default_value_t = 60)]
        time: u64,
        /// Frames the kernel differential test compares.
        #[arg(long, value_name = "N", default_value_t = 10_000_000)]
        frames: u64,
        /// One target (policy, kubernetes, api, config, events, kernel); all of them if left out.
        #[arg(value_name = "TARGET")]
        target: Option<String>,
    },
    /// Build, then run the soak (`tests/tests/soak.rs`): traffic through the
    /// namespace topology while policies flip, identities and interfaces
    /// churn, the daemon is killed (SIGKILL) and restarted, and API clients with
    /// good and bad certificates call in.
    Soak {
        /// How long, in minutes (fractions allowed).
        #[arg(long, value_name = "N", default_value_t = 30.0)]
        minutes: f64,
    },
    /// Build, then pack the daemon into an OCI image at target/image/bulkhead.oci.tar (offline, with umoci).
    Image {
        /// Only assemble the image's files at target/image/rootfs from an existing
        /// target/release/bulkhead (no setup, no root, no umoci): the Dockerfile's build stage.
        #[arg(long)]
        rootfs_only: bool,
    },
    /// Build, then enforce examples/three-tier.yaml in a namespace topology and probe it.
    Demo {
        /// Leave the topology and daemon running until Ctrl-C.
        #[arg(long)]
        keep: bool,
        /// Three emulated nodes instead, each with its own daemon, all
        /// learning pods and policies from one fake Kubernetes API server.
        #[arg(long, conflicts_with = "keep")]
        cluster: bool,
    },
}

/// The workspace root (xtask lives one level below it).
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is inside the workspace").to_path_buf()
}

/// Runs a command in the workspace, failing if it fails.
fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    let status = command.current_dir(workspace_root()).status().with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds the release daemon and returns its path.
fn build() -> anyhow::Result<PathBuf> {
    setup::setup()?;
    println!("build: cargo build --release -p enforcer");
    run(cargo().args(["build", "--release", "-p", "enforcer"]))?;
    let binary = workspace_root().join("target/release/bulkhead");
    if !binary.exists() {
        bail!("the build finished but {} is missing", binary.display());
    }
    println!("build: {}", binary.display());
    Ok(binary)
}

/// Builds the test-only daemon whose map layout differs (feature
/// `layout-test`) and keeps it as `target/layout-test/bulkhead`; the
/// upgrade test runs it beside the release binary. A debug build: its
/// dependencies are the ones `cargo test` builds anyway, so it costs one
/// crate and the kernel programs, not a second release build of everything.
fn build_other_layout() -> anyhow::Result<PathBuf> {
    println!("build: the layout-test daemon for the upgrade test (target/layout-test/bulkhead)");
    run(cargo().args(["build", "-p", "enforcer", "--bin", "bulkhead", "--features", "layout-test"]))?;
    let built = workspace_root().join("target/debug/bulkhead");
    let dir = workspace_root().join("target/layout-test");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let copy = dir.join("bulkhead");
    // A hard link, where it can be one: the test build later replaces
    // target/debug/bulkhead with a new file and leaves this one as it is,
    // and a copy would take the binary's size again on disk.
    match std::fs::remove_file(&copy) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("cannot replace {}", copy.display())),
    }
    if std::fs::hard_link(&built, &copy).is_err() {
        std::fs::copy(&built, &copy)
            .with_context(|| format!("cannot copy {} to {}", built.display(), copy.display()))?;
    }
    Ok(copy)
}

fn test() -> anyhow::Result<()> {
    let binary = build()?;
    let other_layout = build_other_layout()?;
    // tests/tests/image.rs runs this image with runc.
    let image = image::build(&binary)?;
    println!("test: formatting");
    run(cargo().args(["fmt", "--all", "--check"]))?;
    println!("test: clippy (pedantic, warnings are errors)");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "enforcer-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    supply::deny()?;
    supply::sbom(&binary)?;
    fuzz_briefly()?;
    println!(
        "test: unit and integration tests (integration tests run real traffic through the XDP program in namespaces)"
    );
    let mut command = cargo();
    command
        .args(["test", "--workspace", "--exclude", "enforcer-ebpf"])
        .env("BULKHEAD_BIN", &binary)
        .env("BULKHEAD_BIN_OTHER_LAYOUT", &other_layout)
        .env("BULKHEAD_IMAGE", &image)
        .current_dir(workspace_root())
        .stdout(Stdio::piped());
    let mut child = command.spawn().context("cannot start cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().context("cargo test has no stdout")?).lines() {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = parse_test_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    // One closing line for the whole run, so the total is not hidden behind
    // the last crate's (often empty) doc-test summary.
    println!("xtask: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

/// `cargo xtask soak`: the soak test alone, for `minutes`. `cargo xtask
/// test` runs the same test for its default short slice.
fn soak(minutes: f64) -> anyhow::Result<()> {
    if !(minutes > 0.0 && minutes.is_finite()) {
        bail!("--minutes must be a positive number, not {minutes}");
    }
    let binary = build()?;
    println!("soak: {minutes} min (tests/tests/soak.rs)");
    run(cargo()
        .args(["test", "-p", "tests", "--test", "soak", "--", "--nocapture"])
        .env("BULKHEAD_BIN", &binary)
        .env("BULKHEAD_SOAK_MINUTES", minutes.to_string()))
}

/// Seconds `cargo xtask test` fuzzes each target: enough to run every seed
/// and some thousands of mutations, while the whole test stays near half an
/// hour; `cargo xtask fuzz` runs longer.
const TEST_FUZZ_SECONDS: u64 = 10;

/// The fuzz slice of `cargo xtask test`: every target, briefly.
fn fuzz_briefly() -> anyhow::Result<()> {
    println!("test: fuzz targets, {TEST_FUZZ_SECONDS} s each");
    fuzz::fuzz(TEST_FUZZ_SECONDS, None).map(drop)
}

/// Reads `test result: ok. 12 passed; 0 failed; ...` into (passed, failed).
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';')
            .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(word))
            .and_then(|n| n.trim().parse::<u64>().ok())
    };
    Some((count(" passed")?, count(" failed")?))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(),
        Task::Build => build().map(drop),
        Task::Test => test(),
        Task::Sbom => {
            let binary = build()?;
            supply::sbom(&binary).map(drop)
        }
        Task::Bench { quick, only } => {
            let binary = build()?;
            setup::packages(&setup::BENCH_PACKAGES)?;
            let mut command = cargo();
            command.args(["bench", "-p", "tests", "--bench", "bulkhead", "--"]).env("BULKHEAD_BIN", &binary);
            if quick {
                command.arg("--quick");
            }
            if let Some(part) = only {
                command.args(["--only", &part]);
            }
            run(&mut command)
        }
        Task::Soak { minutes } => soak(minutes),
        Task::Fuzz { time, frames, target } => match target.as_deref() {
            Some(fuzz::KERNEL) => fuzz::differential(frames),
            Some(one) => fuzz::fuzz(time, Some(one)).map(drop),
            None => {
                fuzz::fuzz(time, None)?;
                fuzz::differential(frames)
            }
        },
        Task::Image { rootfs_only: true } => image::rootfs_only(),
        Task::Image { rootfs_only: false } => {
            let binary = build()?;
            image::build(&binary).map(drop)
        }
        Task::Demo { keep, cluster } => {
            let binary = build()?;
            if cluster { demo_cluster::demo(&binary) } else { demo::demo(&binary, keep) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_test_result;

    #[test]
    fn reads_cargo_test_summaries() {
        let ok = "test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 10.07s";
        assert_eq!(parse_test_result(ok), Some((12, 0)));
        let failed = "test result: FAILED. 11 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(parse_test_result(failed), Some((11, 1)));
        assert_eq!(parse_test_result("test foo ... ok"), None);
    }
}
