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
    aya_build::build_ebpf(
        [Package { name: "enforcer-ebpf", root_dir: root, ..Package::default() }],
        Toolchain::default(),
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` to install nightly rust-src and bpf-linker")
}
