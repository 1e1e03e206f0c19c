//! `cargo xtask setup`: installs what is missing, says what it did, and is
//! quick when everything is already there.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// bpf-linker release known to work with aya 0.14 and LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// kubernetes-validate release the manifest tests validate with; it carries
/// the Kubernetes JSON schemas up to 1.37, the tests ask for 1.32.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// cargo-fuzz release `cargo xtask fuzz` drives libFuzzer with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Oldest kubectl whose built-in kustomize (v5) renders `deploy/`.
const KUBECTL_MIN_MINOR: u32 = 27;

/// Debian packages the tests and the demo use. `prometheus` brings
/// `promtool` (rule checks and rule unit tests) and the server the
/// monitoring test scrapes the daemon with; it is installed without starting
/// its service (see [`packages`]). `minisign`: the signed-policy tests
/// sign and check with the stock tool too.
const PACKAGES: [&str; 4] = ["iproute2", "bpftool", "prometheus", "minisign"];

/// What `cargo xtask bench` adds: trafgen (in netsniff-ng) to generate the
/// traffic, the peers Bulkhead is measured against, and perf to sample
/// where the receiving CPU's time goes.
pub const BENCH_PACKAGES: [&str; 5] = ["netsniff-ng", "nftables", "iptables", "ethtool", "linux-perf"];

/// What `cargo xtask image` (and so `cargo xtask test`, which builds the
/// image and runs it) adds: umoci assembles the OCI image, skopeo reads the
/// archive as registries' tools do, runc runs it in the image test.
pub const IMAGE_PACKAGES: [&str; 3] = ["umoci", "skopeo", "runc"];

fn output(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn run(program: &str, args: &[&str], envs: &[(&str, &Path)]) -> anyhow::Result<()> {
    let mut command = Command::new(program);
    command.args(args);
    for (key, value) in envs {
        command.env(key, value);
    }
    let status = command.status().with_context(|| format!("cannot start {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed with {status}", args.join(" "));
    }
    Ok(())
}

pub fn setup() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("setup, tests and the demo need root (BPF, XDP, network namespaces); run as root");
    }
    nightly_rust_src()?;
    bpf_linker()?;
    packages(&PACKAGES)?;
    bpffs()?;
    kubectl()?;
    kubernetes_validate()?;
    Ok(())
}

/// What `cargo xtask fuzz` needs: nightly (libFuzzer's instrumentation),
/// cargo-fuzz, and, since the daemon's library is fuzzed too and its build
/// script builds the kernel programs, rust-src and bpf-linker. No root.
pub fn fuzz_tools() -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    cargo_fuzz()
}

fn cargo_fuzz() -> anyhow::Result<()> {
    if let Some(version) = output("cargo", &["+nightly", "fuzz", "--version"])
        && version.contains(CARGO_FUZZ_VERSION)
    {
        println!("setup: {version} already installed");
        return Ok(());
    }
    println!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (a couple of minutes, once)");
    run("cargo", &["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION, "--locked", "--force"], &[])?;
    let version = output("cargo", &["+nightly", "fuzz", "--version"])
        .context("cargo-fuzz was installed but `cargo fuzz` does not run; is ~/.cargo/bin on PATH?")?;
    println!("setup: {version} installed");
    Ok(())
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    if output("rustc", &["+nightly", "--print", "sysroot"]).is_none() {
        println!("setup: installing the nightly toolchain (eBPF programs need it)");
        run("rustup", &["toolchain", "install", "nightly", "--profile", "minimal"], &[])?;
    }
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"]).context("rustc +nightly does not run")?;
    Ok(PathBuf::from(sysroot))
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml").exists() {
        println!("setup: nightly rust-src already installed");
        return Ok(());
    }
    println!("setup: installing nightly rust-src (build-std for bpfel-unknown-none)");
    run("rustup", &["component", "add", "rust-src", "--toolchain", "nightly"], &[])
}

/// bpf-linker must link against the very LLVM that nightly rustc uses.
/// Nightly ships it as `libLLVM.so.<major>.<minor>-rust-<version>-nightly`;
/// bpf-linker's build wants an LLVM prefix with `lib/libLLVM.so`, so we make
/// one of symlinks in a directory that stays (the binary's rpath points at it).
fn bpf_linker() -> anyhow::Result<()> {
    if let Some(version) = output("bpf-linker", &["--version"])
        && version.contains(BPF_LINKER_VERSION)
    {
        println!("setup: {version} already installed");
        return Ok(());
    }
    let sysroot_lib = nightly_sysroot()?.join("lib");
    let library = std::fs::read_dir(&sysroot_lib)?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}; is the nightly toolchain complete?", sysroot_lib.display()))?;
    let major: u32 = library
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read the LLVM version from {library}"))?;
    if !(19..=22).contains(&major) {
        bail!(
            "nightly uses LLVM {major}, which bpf-linker {BPF_LINKER_VERSION} does not support; use a nightly with LLVM 19-22"
        );
    }
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home)
        .join(".local/share/bulkhead")
        .join(format!("llvm-{}", library.trim_start_matches("libLLVM.so.")));
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    for link in ["libLLVM.so", library.as_str()] {
        let path = lib.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(sysroot_lib.join(&library), &path)
            .with_context(|| format!("cannot create {}", path.display()))?;
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} (a few minutes, once)");
    let feature = format!("llvm-{major}");
    run(
        "cargo",
        &[
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &feature,
            "--force",
        ],
        &[("LLVM_PREFIX", &prefix)],
    )?;
    let version = output("bpf-linker", &["--version"])
        .context("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?")?;
    println!("setup: {version} installed");
    Ok(())
}

/// Installs the Debian `packages` that are missing.
pub fn packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| {
            output("dpkg-query", &["-W", "-f=${Status}", package])
                .is_none_or(|status| !status.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        println!("setup: Debian packages already installed: {}", packages.join(", "));
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(", "));
    run("apt-get", &["update", "-qq"], &[])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    // Some packages (prometheus) start a service from their maintainer
    // scripts; the tests run their own instances, so nothing may be left
    // running. invoke-rc.d and deb-systemd-invoke ask policy-rc.d first.
    let _no_services = NoServiceStarts::install()?;
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot start apt-get")?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    for package in missing.iter().filter(|package| NOT_AT_BOOT.contains(package)) {
        not_at_boot(package);
    }
    Ok(())
}

/// Packages whose service must not start at boot either: a system
/// prometheus would listen on 9090, the daemon's default metrics port.
/// Only a fresh install is changed; an administrator's later choice stays.
const NOT_AT_BOOT: [&str; 1] = ["prometheus"];

/// Undoes the boot-time enabling a package's postinst did (systemd and
/// sysvinit), best effort: on a machine with neither, there is none.
fn not_at_boot(service: &str) {
    let unit = format!("{service}.service");
    for (program, args) in [("deb-systemd-helper", ["disable", unit.as_str()]), ("update-rc.d", [service, "disable"])] {
        let _ = Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    println!("setup: {service} installed as a tool only; its service is not started and not enabled at boot");
}

/// Where Debian's maintainer scripts ask whether they may start a service.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// A `policy-rc.d` that forbids service starts (exit 101, "action
/// forbidden") for as long as it lives; removed on drop. An existing
/// `policy-rc.d` is the administrator's and is left alone.
struct NoServiceStarts {
    created: bool,
}

impl NoServiceStarts {
    fn install() -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        if Path::new(POLICY_RC_D).exists() {
            return Ok(Self { created: false });
        }
        std::fs::write(POLICY_RC_D, "#!/bin/sh\n# Written by `cargo xtask setup` for one apt-get run.\nexit 101\n")
            .with_context(|| format!("cannot write {POLICY_RC_D}"))?;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self { created: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
}

fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    if mounts.lines().any(|line| line.split_whitespace().nth(2) == Some("bpf")) {
        println!("setup: bpffs already mounted");
        return Ok(());
    }
    println!("setup: mounting bpffs at /sys/fs/bpf");
    std::fs::create_dir_all("/sys/fs/bpf").ok();
    run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"], &[])
}

/// The minor version of `kubectl version --client`, if kubectl runs.
fn kubectl_minor() -> Option<u32> {
    let version = output("kubectl", &["version", "--client"])?;
    let rest = version.lines().find_map(|line| line.strip_prefix("Client Version: v"))?;
    rest.split('.').nth(1)?.parse().ok()
}

/// kubectl renders the manifests in `deploy/` (`kubectl kustomize`) for the
/// manifest tests. Debian bookworm's `kubernetes-client` is 1.20, whose
/// kustomize is too old, so only an apt source that offers a package named
/// `kubectl` (pkgs.k8s.io, Google Cloud's) is used; otherwise setup says
/// what to install.
fn kubectl() -> anyhow::Result<()> {
    if let Some(minor) = kubectl_minor() {
        if minor >= KUBECTL_MIN_MINOR {
            println!("setup: kubectl 1.{minor} already installed");
            return Ok(());
        }
        bail!(
            "kubectl 1.{minor} is too old to render deploy/ (kustomize v5 needs kubectl 1.{KUBECTL_MIN_MINOR} or newer); install a newer kubectl from https://pkgs.k8s.io (https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/)"
        );
    }
    let candidate = output("apt-cache", &["policy", "kubectl"]).and_then(|policy| {
        policy
            .lines()
            .find_map(|line| line.trim().strip_prefix("Candidate:").map(|c| c.trim().to_owned()))
            .filter(|candidate| candidate != "(none)")
    });
    if candidate.is_none() {
        bail!(
            "kubectl is not installed and no apt source offers it (Debian's kubernetes-client 1.20 is too old for kustomize v5); install kubectl 1.{KUBECTL_MIN_MINOR} or newer from https://pkgs.k8s.io (https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/) and run setup again"
        );
    }
    packages(&["kubectl"])?;
    match kubectl_minor() {
        Some(minor) if minor >= KUBECTL_MIN_MINOR => {
            println!("setup: kubectl 1.{minor} installed");
            Ok(())
        }
        _ => bail!(
            "the apt package kubectl does not provide kubectl 1.{KUBECTL_MIN_MINOR} or newer; install one from https://pkgs.k8s.io"
        ),
    }
}

/// Where setup installs kubernetes-validate: a virtualenv of its own under
/// the workspace's target directory (tests/tests/manifests.rs looks there).
fn validate_venv() -> PathBuf {
    crate::workspace_root().join("target/venv")
}

/// `kubernetes-validate` (`PyPI`) checks every rendered object against the
/// Kubernetes `OpenAPI` schema offline, in a virtualenv so the system Python
/// stays untouched.
fn kubernetes_validate() -> anyhow::Result<()> {
    let venv = validate_venv();
    let validator = venv.join("bin/kubernetes-validate");
    let validator_text = validator.display().to_string();
    if let Some(version) = output(&validator_text, &["--version"])
        && version.trim() == KUBERNETES_VALIDATE_VERSION
    {
        println!("setup: kubernetes-validate {version} already installed in {}", venv.display());
        return Ok(());
    }
    let venv_text = venv.display().to_string();
    if !venv.join("bin/pip").exists() {
        println!("setup: creating a Python virtualenv at {venv_text}");
        if run("python3", &["-m", "venv", &venv_text], &[]).is_err() {
            // Debian's python3 has no venv module without python3-venv.
            packages(&["python3-venv"])?;
            run("python3", &["-m", "venv", "--clear", &venv_text], &[])?;
        }
    }
    println!("setup: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} into {venv_text}");
    let pip = venv.join("bin/pip").display().to_string();
    let requirement = format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}");
    run(&pip, &["install", "--quiet", &requirement], &[])?;
    let version = output(&validator_text, &["--version"])
        .with_context(|| format!("kubernetes-validate was installed but {validator_text} does not run"))?;
    println!("setup: kubernetes-validate {version} installed");
    Ok(())
}
