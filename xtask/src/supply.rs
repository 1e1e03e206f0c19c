//! The supply chain: `cargo deny` over the dependency tree (licenses, bans,
//! sources, and advisories where the advisory database can be reached) in
//! `cargo xtask test`, and `cargo xtask sbom`: a `CycloneDX` bill of
//! materials of what ships in the image (the crates in the `bulkhead`
//! binary and its eBPF object, and the Debian packages its shared
//! libraries come from).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{cargo, run, workspace_root};

/// cargo-deny release checked with this workspace (rustc ≥ 1.88).
const CARGO_DENY_VERSION: &str = "0.20.2";
/// cargo-cyclonedx release checked with this workspace.
const CARGO_CYCLONEDX_VERSION: &str = "0.5.9";
/// Where the `RustSec` advisory database lives: `cargo deny` fetches it.
const ADVISORY_DB: &str = "https://github.com/rustsec/advisory-db";

/// Installs `cargo <subcommand>` at `version` unless it is there.
fn ensure_tool(subcommand: &str, package: &str, version: &str) -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args([subcommand, "--version"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned());
    if installed.as_deref().is_some_and(|text| text.contains(version)) {
        return Ok(());
    }
    println!("supply chain: installing {package} {version} (a few minutes, once)");
    run(Command::new("cargo").args(["install", package, "--locked", "--version", version]))
}

/// `cargo deny check`: licenses, bans and sources always; advisories when
/// the database can be fetched, otherwise skipped with the reason printed.
pub fn deny() -> anyhow::Result<()> {
    ensure_tool("deny", "cargo-deny", CARGO_DENY_VERSION)?;
    let root = workspace_root();
    println!("test: cargo deny (licenses, bans, sources; deny.toml)");
    run(cargo().current_dir(&root).args([
        "deny",
        "--log-level",
        "error",
        "--all-features",
        "check",
        "licenses",
        "bans",
        "sources",
    ]))?;
    let fetched = Command::new("cargo")
        .current_dir(&root)
        .args(["deny", "fetch", "db"])
        .output()
        .context("cannot start cargo deny fetch")?;
    if !fetched.status.success() {
        let why = String::from_utf8_lossy(&fetched.stderr);
        let why = why.lines().rev().find(|line| !line.trim().is_empty()).unwrap_or("no reason given");
        println!(
            "test: cargo deny advisories SKIPPED: the advisory database ({ADVISORY_DB}) cannot be fetched from here: {}",
            why.trim()
        );
        return Ok(());
    }
    run(cargo().current_dir(&root).args(["deny", "--all-features", "check", "advisories"]))
}

/// `cargo xtask sbom`: writes `target/sbom/bulkhead.cdx.json` for the
/// image built from `binary`, and returns its path.
pub fn sbom(binary: &Path) -> anyhow::Result<PathBuf> {
    ensure_tool("cyclonedx", "cargo-cyclonedx", CARGO_CYCLONEDX_VERSION)?;
    let root = workspace_root();
    let out = root.join("target/sbom");
    std::fs::create_dir_all(&out)?;
    let [mut bom, ebpf] = crate_boms(&root, ["enforcer", "enforcer-ebpf"])?;
    let mut components: Vec<Value> = bom["components"].as_array().cloned().unwrap_or_default();
    let known: std::collections::BTreeSet<String> =
        components.iter().filter_map(|c| c["purl"].as_str().map(str::to_owned)).collect();
    for component in ebpf["components"].as_array().into_iter().flatten() {
        if component["purl"].as_str().is_some_and(|purl| !known.contains(purl)) {
            components.push(component.clone());
        }
    }
    for (package, version) in debian_packages(binary)? {
        components.push(json!({
            "type": "library",
            "bom-ref": format!("pkg:deb/debian/{package}@{version}?arch=amd64"),
            "name": package,
            "version": version,
            "purl": format!("pkg:deb/debian/{package}@{version}?arch=amd64"),
            "description": "Debian package of a shared library the image carries (see xtask/src/image.rs)",
        }));
    }
    bom["components"] = Value::Array(components);
    check(&bom)?;
    let path = out.join("bulkhead.cdx.json");
    std::fs::write(&path, serde_json::to_string_pretty(&bom)? + "\n")?;
    println!(
        "sbom: {} ({} components: crates of the binary and its eBPF object, and the Debian packages of its shared libraries)",
        path.display(),
        bom["components"].as_array().map_or(0, Vec::len)
    );
    Ok(path)
}

/// The name cargo-cyclonedx's files are written under, next to every
/// workspace member's manifest (it describes them all at once).
const BOM_FILE: &str = "bulkhead-sbom";

/// The `CycloneDX` JSON cargo-cyclonedx makes for each of `packages` (all
/// their dependencies, the host's target). Its files are removed from the
/// source tree, every member's.
fn crate_boms<const N: usize>(root: &Path, packages: [&str; N]) -> anyhow::Result<[Value; N]> {
    let described = run(cargo().current_dir(root).args([
        "cyclonedx",
        "--format",
        "json",
        "--all",
        "--override-filename",
        BOM_FILE,
        "-q",
    ]));
    let mut read = Vec::new();
    let members = std::fs::read_dir(root)?.filter_map(Result::ok).map(|entry| entry.path());
    for file in members.map(|dir| dir.join(format!("{BOM_FILE}.json"))).filter(|file| file.exists()) {
        let text = std::fs::read_to_string(&file);
        std::fs::remove_file(&file)?;
        read.push((file, text?));
    }
    described?;
    let mut boms = Vec::new();
    for package in packages {
        let wanted = root.join(package).join(format!("{BOM_FILE}.json"));
        let (_, text) = read
            .iter()
            .find(|(file, _)| *file == wanted)
            .with_context(|| format!("cargo cyclonedx described no package `{package}`"))?;
        boms.push(serde_json::from_str(text).with_context(|| format!("{} is not JSON", wanted.display()))?);
    }
    boms.try_into().map_err(|_| anyhow::anyhow!("one bill of materials per package"))
}

/// The Debian packages (name, version) the image's shared libraries come
/// from, as `dpkg -S` and `dpkg-query` tell.
fn debian_packages(binary: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut packages = std::collections::BTreeMap::new();
    for library in crate::image::shared_libraries(binary)? {
        // ldd names the path the loader uses; dpkg knows the file it links to.
        let real = std::fs::canonicalize(&library).unwrap_or_else(|_| library.clone());
        let owner = [&library, &real].iter().find_map(|path| {
            let output = Command::new("dpkg").arg("-S").arg(path).output().ok()?;
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            output.status.success().then(|| text.split(':').next().unwrap_or_default().trim().to_owned())
        });
        let Some(package) = owner else {
            bail!("no Debian package owns {}; the SBOM would miss it", library.display());
        };
        let version = Command::new("dpkg-query").args(["-W", "-f=${Version}", &package]).output()?;
        packages.insert(package, String::from_utf8_lossy(&version.stdout).trim().to_owned());
    }
    Ok(packages.into_iter().collect())
}

/// Refuses a bill of materials that misses what certainly ships.
fn check(bom: &Value) -> anyhow::Result<()> {
    if bom["bomFormat"] != "CycloneDX" {
        bail!("cargo cyclonedx wrote no CycloneDX document");
    }
    let names: std::collections::BTreeSet<&str> =
        bom["components"].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str()).collect();
    for expected in ["aya", "aya-ebpf", "tokio", "rustls", "policy", "enforcer-common", "libc6"] {
        if !names.contains(expected) {
            bail!("the SBOM lists no `{expected}`, which the image certainly ships");
        }
    }
    Ok(())
}
