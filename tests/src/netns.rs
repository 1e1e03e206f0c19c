//! Network namespaces and running code inside them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{command}` failed: {stderr}; the lab needs root and iproute2 (run through `cargo xtask test`)")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {name}: {source}")]
    Enter {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon did not become ready: {0}")]
    Daemon(String),
    #[error("lab I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A unique name stem for this process's next lab.
#[must_use]
pub fn unique_stem(label: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("bh{}-{}-{label}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<Output, LabError> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| LabError::Spawn { command: command.clone(), source })?;
    if !output.status.success() {
        return Err(LabError::Command { command, stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned() });
    }
    Ok(output)
}

/// A network namespace, deleted (with every interface in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self, LabError> {
        run("ip", &["netns", "add", name])?;
        let ns = Self { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"])?;
        // Keep tests deterministic: no IPv6 autoconfiguration chatter.
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])?;
        Ok(ns)
    }

    /// Turns IPv6 back on (labs start IPv4-only), without duplicate address
    /// detection: a tentative link-local address holds up neighbour
    /// discovery for a second, long enough to make a probe time out.
    pub fn enable_ipv6(&self) -> Result<(), LabError> {
        self.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.disable_ipv6=0",
            "net.ipv6.conf.default.disable_ipv6=0",
        ])
        .map(drop)
    }

    /// No duplicate address detection on `interface` (one created before
    /// [`Netns::enable_ipv6`] keeps the default it was created with).
    pub fn skip_dad(&self, interface: &str) -> Result<(), LabError> {
        self.exec(&["sysctl", "-qw", &format!("net.ipv6.conf.{interface}.accept_dad=0")]).map(drop)
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<Output, LabError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `ip netns exec NAME ARGS...`
    pub fn exec(&self, args: &[&str]) -> Result<Output, LabError> {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command that will run inside this network namespace. It enters the
    /// network namespace only (`nsenter --net`), unlike `ip netns exec`,
    /// which also remounts /sys and so would hide the host's bpffs, where
    /// the daemon pins what must outlive it.
    #[must_use]
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/run/netns/{}", self.name)).arg("--").arg(program);
        command
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets created
    /// there stay in this namespace wherever they are used afterwards.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let enter_error = |source| LabError::Enter { name: self.name.clone(), source };
                    let file = File::open(&path).map_err(enter_error)?;
                    // SAFETY: setns on this thread only, with a valid namespace fd.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(enter_error(std::io::Error::last_os_error()));
                    }
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}
