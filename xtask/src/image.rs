//! `cargo xtask image`: the daemon's OCI image, built offline.
//!
//! No base image is pulled. The file tree is assembled here — the release
//! `bulkhead` binary, exactly the shared libraries it needs (read with `ldd`)
//! at the paths the dynamic loader looks for them, a root entry in
//! `/etc/passwd` and `/etc/group`, and `/tmp` — and packed with Debian's
//! `umoci` into an OCI image layout, written as an OCI archive (a tar of the
//! layout) at `target/image/bulkhead.oci.tar`.
//!
//! Every mtime and timestamp is `SOURCE_DATE_EPOCH`, or the time of the
//! `HEAD` commit, so the same binary and commit give the same image digest.
//!
//! The `Dockerfile` at the workspace root builds the same image with a
//! registry at hand; `tests/tests/image.rs` keeps its entrypoint, command,
//! user, environment and labels in step with the constants below.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{run, workspace_root};

/// Where the daemon lives in the image.
pub const ENTRYPOINT: &str = "/usr/bin/bulkhead";
/// Without arguments the image prints its usage: a `DaemonSet` or `docker
/// run` passes `run --policy-dir ... --interface ...` explicitly.
pub const CMD: [&str; 1] = ["--help"];
/// Root: loading BPF programs and attaching XDP needs it (or the capability
/// set docs/image.md lists).
pub const USER: &str = "0:0";
pub const ENV: [&str; 1] = ["PATH=/usr/bin"];
pub const WORKDIR: &str = "/";
pub const TITLE: &str = "bulkhead";
pub const DESCRIPTION: &str = "Bulkhead: eBPF/XDP micro-segmentation enforcer";
/// The tag inside the layout; `podman load` names the image after it
/// (`localhost/bulkhead:VERSION`).
const NAME: &str = "bulkhead";

/// What the image is made of, relative to `target/image`.
const ARCHIVE: &str = "bulkhead.oci.tar";

/// The image's labels (also set as manifest annotations), as the OCI image
/// spec's pre-defined annotation keys.
#[derive(Debug, Clone)]
pub struct Labels {
    pub version: String,
    pub revision: String,
    pub source: String,
    pub created: String,
}

impl Labels {
    /// Reads the version from the workspace, the revision and time from git.
    fn current(epoch: u64) -> anyhow::Result<Self> {
        let revision = git(&["rev-parse", "HEAD"])?;
        Ok(Self { version: env!("CARGO_PKG_VERSION").to_owned(), revision, source: source(), created: rfc3339(epoch) })
    }

    /// Every label, key and value.
    #[must_use]
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("org.opencontainers.image.title", TITLE.to_owned()),
            ("org.opencontainers.image.description", DESCRIPTION.to_owned()),
            ("org.opencontainers.image.licenses", env!("CARGO_PKG_LICENSE").to_owned()),
            ("org.opencontainers.image.version", self.version.clone()),
            ("org.opencontainers.image.revision", self.revision.clone()),
            ("org.opencontainers.image.source", self.source.clone()),
            ("org.opencontainers.image.created", self.created.clone()),
        ]
    }
}

/// Where the source lives: `BULKHEAD_IMAGE_SOURCE`, the package's
/// `repository`, git's `origin` remote, or "unpublished" when the
/// repository has none of these yet.
fn source() -> String {
    if let Some(source) = std::env::var_os("BULKHEAD_IMAGE_SOURCE") {
        return source.to_string_lossy().into_owned();
    }
    let repository = env!("CARGO_PKG_REPOSITORY");
    if !repository.is_empty() {
        return repository.to_owned();
    }
    git(&["remote", "get-url", "origin"]).unwrap_or_else(|_| "unpublished".to_owned())
}

fn git(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(workspace_root())
        .output()
        .context("cannot run git (the image labels carry the commit)")?;
    if !output.status.success() {
        bail!("`git {}` failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// `SOURCE_DATE_EPOCH` if set, else the committer time of `HEAD`.
fn source_date_epoch() -> anyhow::Result<u64> {
    if let Some(epoch) = std::env::var_os("SOURCE_DATE_EPOCH") {
        let epoch = epoch.to_string_lossy();
        return epoch.trim().parse().with_context(|| format!("SOURCE_DATE_EPOCH={epoch} is not a number of seconds"));
    }
    let epoch = git(&["log", "-1", "--format=%ct"])?;
    epoch.parse().with_context(|| format!("git gave {epoch:?} as the commit time"))
}

/// Seconds since 1970 as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
#[must_use]
pub fn rfc3339(epoch: u64) -> String {
    let (days, seconds) = (epoch / 86_400, epoch % 86_400);
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", seconds / 3600, seconds % 3600 / 60, seconds % 60)
}

/// The shared objects `binary` loads, as the paths the loader resolves them
/// to (its interpreter included); empty for a static binary.
pub fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(binary).output().context("cannot run ldd (Debian package libc-bin)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // ldd fails on a static binary, saying so.
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&output.stderr).contains("not a dynamic")
        {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", binary.display(), String::from_utf8_lossy(&output.stderr).trim());
    }
    parse_ldd(&text)
}

/// Reads `ldd` output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`
/// and `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file.
fn parse_ldd(text: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in text.lines().map(str::trim).filter(|line| !line.is_empty()) {
        if line.contains("statically linked") {
            continue;
        }
        if line.contains("=> not found") {
            bail!("ldd cannot find a library the binary needs: {line}");
        }
        let path = match line.split_once("=>") {
            Some((_, resolved)) => resolved.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        match path {
            Some(path) if path.starts_with('/') => libraries.push(PathBuf::from(path)),
            _ => {} // linux-vdso.so.1: in the kernel, not on disk
        }
    }
    Ok(libraries)
}

/// Assembles the image's file tree in `root` (which must exist and be
/// empty) from the release `binary`, every mtime set to `epoch`.
pub fn stage(binary: &Path, root: &Path, epoch: u64) -> anyhow::Result<()> {
    let libraries = shared_libraries(binary)?;
    for dir in ["usr/bin", "etc", "tmp"] {
        fs::create_dir_all(root.join(dir))?;
    }
    copy(binary, &root.join(ENTRYPOINT.trim_start_matches('/')), Some(0o755))?;
    for library in &libraries {
        // The loader looks a library up by the name ldd reports; the file
        // there on the host may be a symlink, the image gets its contents.
        let target = root.join(library.strip_prefix("/").unwrap_or(library));
        fs::create_dir_all(target.parent().context("a library path has a parent")?)?;
        copy(library, &target, None)?;
    }
    write(&root.join("etc/passwd"), "root:x:0:0:root:/:/usr/sbin/nologin\n")?;
    write(&root.join("etc/group"), "root:x:0:\n")?;
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    set_mtimes(root, epoch)?;
    println!(
        "image: staged {} with {} shared libraries: {}",
        root.display(),
        libraries.len(),
        libraries.iter().map(|l| l.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// Copies the contents (and, unless `mode` says otherwise, the permissions).
fn copy(from: &Path, to: &Path, mode: Option<u32>) -> anyhow::Result<()> {
    fs::copy(from, to).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    if let Some(mode) = mode {
        fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// Sets the mtime (and atime) of `path` and everything below it to `epoch`.
fn set_mtimes(path: &Path, epoch: u64) -> anyhow::Result<()> {
    let metadata = fs::symlink_metadata(path)?;
    if metadata.is_dir() {
        for entry in fs::read_dir(path)? {
            set_mtimes(&entry?.path(), epoch)?;
        }
    }
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch);
    let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    file.set_times(fs::FileTimes::new().set_accessed(time).set_modified(time))
        .with_context(|| format!("cannot set the times of {}", path.display()))?;
    Ok(())
}

/// The image's architecture, in OCI's (Go's) spelling: the build host's, as
/// the binary and the libraries copied beside it are.
fn oci_architecture() -> anyhow::Result<&'static str> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        other => bail!("no OCI name for the architecture {other}"),
    })
}

fn umoci(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("umoci").args(args))
}

/// `target/image`.
#[must_use]
pub fn image_dir() -> PathBuf {
    workspace_root().join("target/image")
}

/// Only the file tree, at `target/image/rootfs`, from an already built
/// `target/release/bulkhead`: what the Dockerfile's build stage copies into
/// its final stage. Needs neither root nor umoci.
pub fn rootfs_only() -> anyhow::Result<()> {
    let binary = workspace_root().join("target/release/bulkhead");
    if !binary.exists() {
        bail!("{} is missing: build it first (cargo build --release -p enforcer)", binary.display());
    }
    let root = image_dir().join("rootfs");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    fs::create_dir_all(&root)?;
    stage(&binary, &root, source_date_epoch()?)
}

/// Builds the image of `binary` and returns the archive's path.
pub fn build(binary: &Path) -> anyhow::Result<PathBuf> {
    crate::setup::packages(&crate::setup::IMAGE_PACKAGES)?;
    let epoch = source_date_epoch()?;
    let labels = Labels::current(epoch)?;
    let dir = image_dir();
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    for stale in [&layout, &bundle] {
        if stale.exists() {
            fs::remove_dir_all(stale).with_context(|| format!("cannot remove {}", stale.display()))?;
        }
    }
    fs::create_dir_all(&dir)?;
    let image = format!("{}:{NAME}:{}", layout.display(), labels.version);
    let layout_arg = layout.display().to_string();
    let bundle_arg = bundle.display().to_string();
    umoci(&["init", "--layout", &layout_arg])?;
    umoci(&["new", "--image", &image])?;
    // An empty image unpacked is a bundle with an empty rootfs; the staged
    // tree repacked is the image's single layer.
    umoci(&["unpack", "--image", &image, &bundle_arg])?;
    let root = bundle.join("rootfs");
    stage(binary, &root, epoch)?;
    umoci(&[
        "repack",
        "--image",
        &image,
        "--history.created",
        &labels.created,
        "--history.created_by",
        "cargo xtask image",
        "--history.comment",
        "bulkhead release binary and the shared libraries it needs",
        &bundle_arg,
    ])?;
    let mut config: Vec<String> = [
        "config",
        "--image",
        &image,
        "--no-history",
        "--created",
        &labels.created,
        "--os",
        "linux",
        "--architecture",
        oci_architecture()?,
        "--config.user",
        USER,
        "--config.workingdir",
        WORKDIR,
        "--config.entrypoint",
        ENTRYPOINT,
    ]
    .map(str::to_owned)
    .to_vec();
    for arg in CMD {
        config.extend(["--config.cmd".to_owned(), arg.to_owned()]);
    }
    for env in ENV {
        config.extend(["--config.env".to_owned(), env.to_owned()]);
    }
    for (key, value) in labels.pairs() {
        config.extend(["--config.label".to_owned(), format!("{key}={value}")]);
        config.extend(["--manifest.annotation".to_owned(), format!("{key}={value}")]);
    }
    run(Command::new("umoci").args(&config))?;
    umoci(&["gc", "--layout", &layout_arg])?;
    fs::remove_dir_all(&bundle)?;

    let archive = dir.join(ARCHIVE);
    let partial = dir.join(format!("{ARCHIVE}.partial"));
    run(Command::new("tar")
        .args(["--sort=name", &format!("--mtime=@{epoch}"), "--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(&layout)
        .arg("-cf")
        .arg(&partial)
        .args(["oci-layout", "index.json", "blobs"]))?;
    fs::rename(&partial, &archive)?;
    let size = fs::metadata(&archive)?.len();
    let index: serde_json::Value = serde_json::from_str(&fs::read_to_string(layout.join("index.json"))?)?;
    let digest = index["manifests"][0]["digest"].as_str().unwrap_or("?").to_owned();
    println!(
        "image: {} ({} KiB), {NAME}:{} manifest {digest}, revision {}, created {}",
        archive.display(),
        size.div_ceil(1024),
        labels.version,
        labels.revision,
        labels.created
    );
    Ok(archive)
}

#[cfg(test)]
mod tests {
    use super::{parse_ldd, rfc3339};
    use std::path::PathBuf;

    #[test]
    fn formats_epoch_seconds_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_330_989), "2026-12-03T20:49:49Z");
        assert_eq!(rfc3339(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn reads_the_libraries_ldd_resolves() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            ["/lib/x86_64-linux-gnu/libgcc_s.so.1", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]
                .map(PathBuf::from)
        );
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }
}
