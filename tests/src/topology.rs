//! The demo topology: a router namespace running `bulkhead`, and hosts
//! `gateway`, `logic`, `db` and the unlabelled `outsider`, each on its own
//! /24 behind a veth pair.
//!
//! ```text
//!   gateway 10.0.1.10 ─┐
//!   logic   10.0.2.10 ─┼─ router (bulkhead, XDP and TC egress on every router-side veth)
//!   db      10.0.3.10 ─┤
//!   outsider 10.0.9.10 ┘
//! ```
//!
//! With IPv6 each host also has `fd00:N::10/64` behind the router's `fd00:N::1`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{LabError, Netns, unique_stem};
use crate::probe;

/// One host of the topology.
#[derive(Debug)]
pub struct Host {
    pub name: &'static str,
    pub ns: Netns,
    pub addr: Ipv4Addr,
    /// The host's IPv6 address, in a dual-stack lab.
    pub addr6: Option<Ipv6Addr>,
    /// The router's address on this host's link.
    pub router_addr: Ipv4Addr,
    /// The router-side interface this host hangs off.
    pub router_interface: String,
}

impl Host {
    /// The host's addresses, IPv4 first.
    #[must_use]
    pub fn addrs(&self) -> Vec<IpAddr> {
        let mut addrs = vec![IpAddr::V4(self.addr)];
        addrs.extend(self.addr6.map(IpAddr::V6));
        addrs
    }
}

/// The router and its hosts.
pub struct ThreeTier {
    /// Hosts are declared before the router so they are dropped first.
    pub hosts: Vec<Host>,
    pub router: Netns,
    pub stem: String,
}

impl Drop for ThreeTier {
    /// Removes anything a daemon left pinned (unpinning detaches it); the
    /// namespaces go with the fields.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.bpffs_root());
        let _ = std::fs::remove_dir_all(self.state_dir());
    }
}

/// Creates the veth pair `router_interface` (router side) / `eth0` (in
/// `ns`) for subnet `<subnet>.0/24` (and `fd00:<last byte of subnet>::/64`),
/// with the host's default route through the router (`<subnet>.1`).
/// Returns the host's addresses (`<subnet>.10`).
fn wire(
    router: &Netns,
    ns: &Netns,
    router_interface: &str,
    subnet: [u8; 3],
    ipv6: bool,
) -> Result<(Ipv4Addr, Option<Ipv6Addr>), LabError> {
    let [a, b, octet] = subnet;
    let peer = ["link", "add", router_interface, "type", "veth", "peer", "name", "eth0", "netns", ns.name()];
    router.ip(&peer)?;
    router.ip(&["addr", "add", &format!("{a}.{b}.{octet}.1/24"), "dev", router_interface])?;
    let addr = Ipv4Addr::new(a, b, octet, 10);
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    let addr6 = if ipv6 {
        ns.enable_ipv6()?;
        ns.skip_dad("eth0")?;
        router.skip_dad(router_interface)?;
        let addr6 = Ipv6Addr::new(0xfd00, u16::from(octet), 0, 0, 0, 0, 0, 0x10);
        router.ip(&["addr", "add", &format!("fd00:{octet}::1/64"), "dev", router_interface, "nodad"])?;
        ns.ip(&["addr", "add", &format!("{addr6}/64"), "dev", "eth0", "nodad"])?;
        Some(addr6)
    } else {
        None
    };
    router.ip(&["link", "set", router_interface, "up"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["route", "add", "default", "via", &format!("{a}.{b}.{octet}.1")])?;
    if ipv6 {
        ns.ip(&["-6", "route", "add", "default", "via", &format!("fd00:{octet}::1")])?;
    }
    Ok((addr, addr6))
}

/// Host name, subnet's third octet.
pub const HOSTS: [(&str, u8); 4] = [("gateway", 1), ("logic", 2), ("db", 3), ("outsider", 9)];

impl ThreeTier {
    /// An IPv4-only lab (no IPv6 chatter, so drop counts are exact).
    pub fn new(label: &str) -> Result<Self, LabError> {
        Self::build(label, false)
    }

    /// A lab with IPv4 and IPv6 on every link.
    pub fn dual_stack(label: &str) -> Result<Self, LabError> {
        Self::build(label, true)
    }

    /// A lab of other hosts: each `(name, subnet)` on `<subnet>.0/24`,
    /// IPv4 only, behind a router-side interface named `to-<name>`.
    pub fn with_hosts(label: &str, hosts: &[(&'static str, [u8; 3])]) -> Result<Self, LabError> {
        Self::build_hosts(label, hosts, false)
    }

    fn build(label: &str, ipv6: bool) -> Result<Self, LabError> {
        let hosts: Vec<(&'static str, [u8; 3])> = HOSTS.iter().map(|&(name, octet)| (name, [10, 0, octet])).collect();
        Self::build_hosts(label, &hosts, ipv6)
    }

    fn build_hosts(label: &str, wanted: &[(&'static str, [u8; 3])], ipv6: bool) -> Result<Self, LabError> {
        let stem = unique_stem(label);
        let router = Netns::new(&format!("{stem}-router"))?;
        router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        if ipv6 {
            router.enable_ipv6()?;
            router.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        }
        let mut hosts = Vec::new();
        for &(name, subnet) in wanted {
            let ns = Netns::new(&format!("{stem}-{name}"))?;
            let router_interface = format!("to-{name}");
            let (addr, addr6) = wire(&router, &ns, &router_interface, subnet, ipv6)?;
            let router_addr = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 1);
            hosts.push(Host { name, ns, addr, addr6, router_addr, router_interface });
        }
        Ok(Self { hosts, router, stem })
    }

    /// Deletes the veth pair of host `name` (if it still exists) and
    /// creates it again with the same names and addresses, as pod churn or
    /// a rebuilt namespace does: the router-side interface comes back with
    /// a new ifindex.
    pub fn rewire(&self, name: &str) -> Result<(), LabError> {
        let host = self.host(name);
        if self.router.ip(&["link", "show", &host.router_interface]).is_ok() {
            self.router.ip(&["link", "del", &host.router_interface])?;
        }
        let [a, b, c, _] = host.addr.octets();
        wire(&self.router, &host.ns, &host.router_interface, [a, b, c], host.addr6.is_some())?;
        Ok(())
    }

    /// Renames the router-side interface of host `name` to `to`, keeping
    /// its addresses, index and routes (the link goes down and up).
    pub fn rename_router_interface(&mut self, name: &str, to: &str) -> Result<(), LabError> {
        let from = self.host(name).router_interface.clone();
        self.router.ip(&["link", "set", &from, "down"])?;
        self.router.ip(&["link", "set", &from, "name", to])?;
        self.router.ip(&["link", "set", to, "up"])?;
        let host = self.hosts.iter_mut().find(|h| h.name == name).expect("checked by host() above");
        to.clone_into(&mut host.router_interface);
        Ok(())
    }

    /// The host called `name`.
    ///
    /// # Panics
    /// If there is no such host: a typo in the caller.
    #[must_use]
    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Router-side interfaces, where Bulkhead enforces.
    #[must_use]
    pub fn router_interfaces(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.router_interface.clone()).collect()
    }

    /// Where daemons of this lab pin their maps and links.
    #[must_use]
    pub fn bpffs_root(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(&self.stem)
    }

    /// The lab's daemons' `--state-dir`, unless a test gives its own:
    /// nothing of a test's is kept on the host after it.
    #[must_use]
    pub fn state_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("{}-state", self.stem))
    }

    /// Whether anything is pinned under the lab's bpffs root.
    #[must_use]
    pub fn anything_pinned(&self) -> bool {
        self.bpffs_root().exists()
    }

    /// Whether an XDP program is attached to any router interface. (This
    /// bpftool cannot list tcx links; tests check TC egress by its effect.)
    pub fn any_xdp_attached(&self) -> Result<bool, LabError> {
        let output = self.router.ip(&["-d", "link", "show"])?;
        Ok(String::from_utf8_lossy(&output.stdout).contains("prog/xdp"))
    }
}

/// The `bulkhead` daemon running in a namespace; SIGTERM on drop.
pub struct Daemon {
    child: Child,
    ns_name: String,
    log: PathBuf,
    pub metrics_addr: SocketAddr,
}

/// Where the release binary is, unless `BULKHEAD_BIN` says otherwise.
#[must_use]
pub fn bulkhead_binary() -> PathBuf {
    std::env::var_os("BULKHEAD_BIN")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/bulkhead"), PathBuf::from)
}

impl Daemon {
    /// Starts `bulkhead run` in the lab's router with the given arguments,
    /// pinning under the lab's own bpffs root, without waiting for it.
    pub fn spawn(lab: &ThreeTier, args: &[String], log: &Path) -> Result<Self, LabError> {
        Self::spawn_wrapped(lab, &[], &bulkhead_binary(), args, log)
    }

    /// As [`Daemon::spawn`], running the `bulkhead` at `binary` (another build).
    pub fn spawn_binary(lab: &ThreeTier, binary: &Path, args: &[String], log: &Path) -> Result<Self, LabError> {
        Self::spawn_wrapped(lab, &[], binary, args, log)
    }

    /// As [`Daemon::spawn_binary`], with the daemon started through
    /// `wrapper`, a command that execs its last arguments (such as
    /// `setpriv ... --`), so the child's pid is still the daemon's.
    pub fn spawn_wrapped(
        lab: &ThreeTier,
        wrapper: &[String],
        binary: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<Self, LabError> {
        let ns = &lab.router;
        let binary_text = binary.to_str().unwrap_or("bulkhead");
        let log_file = std::fs::File::create(log)?;
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = ns.command(program);
                command.args(rest).arg(binary_text);
                command
            }
            None => ns.command(binary_text),
        };
        command.arg("run").arg("--bpffs-root").arg(lab.bpffs_root());
        if !args.iter().any(|arg| arg == "--state-dir") {
            command.arg("--state-dir").arg(lab.state_dir());
        }
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .map_err(|source| LabError::Spawn { command: format!("{} run", binary.display()), source })?;
        Ok(Self {
            child,
            ns_name: ns.name().to_owned(),
            log: log.to_path_buf(),
            metrics_addr: "127.0.0.1:9090".parse().expect("literal address"),
        })
    }

    /// Starts the daemon enforcing `policy_dir` on the router's interfaces
    /// and waits until `/readyz` answers 200. It detaches when it exits.
    pub fn start(lab: &ThreeTier, policy_dir: &Path, log: &Path) -> Result<Self, LabError> {
        Self::start_with(lab, policy_dir, log, &[])
    }

    /// As [`Daemon::start`], with extra `bulkhead run` arguments.
    pub fn start_with(lab: &ThreeTier, policy_dir: &Path, log: &Path, extra: &[&str]) -> Result<Self, LabError> {
        let mut with_detach = vec!["--detach-on-exit"];
        with_detach.extend_from_slice(extra);
        Self::start_persistent(lab, policy_dir, log, &with_detach)
    }

    /// As [`Daemon::start_with`], but leaving the programs attached and
    /// pinned when the daemon exits, as production does.
    pub fn start_persistent(lab: &ThreeTier, policy_dir: &Path, log: &Path, extra: &[&str]) -> Result<Self, LabError> {
        let mut args: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
        args.extend(["--policy-dir".to_owned(), policy_dir.display().to_string()]);
        for interface in lab.router_interfaces() {
            args.push("--interface".to_owned());
            args.push(interface);
        }
        let mut daemon = Self::spawn(lab, &args, log)?;
        daemon.wait_ready(&lab.router)?;
        Ok(daemon)
    }

    /// Waits until `/readyz` on `metrics_addr` in `ns` answers 200.
    pub fn wait_ready(&mut self, ns: &Netns) -> Result<(), LabError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(LabError::Daemon(format!("exited with {status}: {}", self.log_text())));
            }
            if let Ok((200, _)) = probe::http_get(ns, self.metrics_addr, "/readyz") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LabError::Daemon(format!("no 200 from /readyz within 30 s: {}", self.log_text())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the daemon to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, LabError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(None)
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> Result<Option<ExitStatus>, LabError> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(Some(status));
        }
        // nsenter execs the daemon, so the child pid is the daemon's.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).output();
        self.wait_exit(Duration::from_secs(10))
    }

    /// The daemon's process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the daemon with SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything the daemon printed so far.
    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The namespace the daemon runs in.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.ns_name
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !matches!(self.stop(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A scratch directory removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(stem: &str) -> Result<Self, LabError> {
        let path = std::env::temp_dir().join(stem);
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
