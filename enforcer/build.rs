//! Builds the kernel programs with aya-build (nightly, bpf-linker) into
//! `OUT_DIR`, where `src/ebpf.rs` embeds them.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root = std::path::Path::new(&metadata_dir)
        .parent()
        .ok_or_else(|| anyhow!("enforcer has no parent directory"))?
        .join("enforcer-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("workspace path is not UTF-8"))?;
    // aya-build relays every line the nested cargo prints as a build-script
    // warning, so its progress ("Compiling ...") would read as dozens of
    // warnings in every build. Quiet keeps only real diagnostics and errors.
    // SAFETY: the build script is single-threaded here; the variable is
    // inherited by the nested cargo that aya-build spawns.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    // The kernel programs share the map layout of the daemon's features.
    let features: &[&str] =
        if std::env::var_os("CARGO_FEATURE_LAYOUT_TEST").is_some() { &["layout-test"] } else { &[] };
    aya_build::build_ebpf(
        [Package { name: "enforcer-ebpf", root_dir: root, features, ..Package::default() }],
        Toolchain::default(),
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` to install nightly rust-src and bpf-linker")
}
