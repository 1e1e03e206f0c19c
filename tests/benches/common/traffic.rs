//! Traffic through the kernel: 64-byte UDP from many sources, half of them
//! allowed, sent by trafgen from one namespace to another over veth, with
//! no filter, Bulkhead, nftables and iptables enforcing the same policy.
//!
//! CPUs: trafgen is pinned to CPU 0; the receiving veth runs its NAPI poll
//! in a kernel thread (threaded NAPI) pinned to CPU 1, so every filter,
//! and the stack behind it, runs on CPU 1 alone. The receiver's cost per
//! packet is CPU 1's busy time (all of the run it was not idle, see
//! [`cpu_away_ns`]) divided by the packets it handled; whichever side was
//! busier than the other is reported as the bottleneck.
//!
//! That total is mostly the veth and UDP receive path, which every filter
//! shares, and it moves by ±10% from round to round with the host. So more
//! rounds run under `perf`, sampling CPU 1 with call chains, to tell each
//! filter's own work apart from the stack around it ([`Profile`]).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use enforcer::datapath::{Datapath, IngressHook, MapSizes, XdpAttach};
use lab::frames::{self, UDP};
use lab::netns::{run, unique_stem};
use lab::{LabError, Netns};
use policy::model::{Action, Address, Identity, Mode, Peer, Policy, PortSpec, Protocol, Rule, Selector};

use crate::Error;
use crate::synthetic::here;

const RECEIVER: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 1);
const SENDER: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 2);
/// The offered load: what one sender CPU sustains here with room to spare,
/// so that every filter is compared at the same rate and the receiver's
/// CPU cost per packet tells them apart (veth pushes back on a full
/// receive ring, which trafgen cannot take at full speed).
pub const OFFERED_PPS: u32 = 250_000;
/// Distinct frames trafgen cycles through: half allowed, half denied.
const FRAMES: usize = 1024;

/// The filters compared, in table order.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Nothing,
    BulkheadNative,
    BulkheadGeneric,
    BulkheadTc,
    Nftables,
    Iptables,
}

impl Filter {
    pub const ALL: [Self; 6] =
        [Self::Nothing, Self::BulkheadNative, Self::BulkheadGeneric, Self::BulkheadTc, Self::Nftables, Self::Iptables];

    /// Whether profiled rounds sample this filter. Not no filter, which has
    /// no code, nor iptables, whose cost its totals make plain.
    fn sampled(self) -> bool {
        !matches!(self, Self::Nothing | Self::Iptables)
    }

    /// Whether a sampled frame belongs to this filter's own code.
    fn owns(self, address: u64, symbol: &str) -> bool {
        match self {
            Self::Nothing | Self::Iptables => false,
            // The program and its subprograms (`bpf_prog_<tag>_<name>`).
            Self::BulkheadNative | Self::BulkheadGeneric | Self::BulkheadTc => {
                is_bpf_program(symbol) || (symbol == "[unknown]" && BPF_TEXT.contains(&address))
            }
            Self::Nftables => symbol == "nft_do_chain_netdev",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Nothing => "no filter",
            Self::BulkheadNative => "Bulkhead (native XDP)",
            Self::BulkheadGeneric => "Bulkhead (generic XDP)",
            Self::BulkheadTc => "Bulkhead (TC ingress)",
            Self::Nftables => "nftables (netdev ingress, set)",
            Self::Iptables => "iptables (one rule per pair)",
        }
    }
}

#[derive(Clone)]
pub struct TrafficRow {
    pub filter: Filter,
    pub rules: usize,
    pub seconds: f64,
    pub sent: u64,
    pub passed: u64,
    /// Dropped by the filter, by its own counters.
    pub filtered: u64,
    /// Neither passed nor dropped by the filter: lost in queues.
    pub lost: u64,
    /// Receiver CPU time per handled packet, ns.
    pub receiver_ns: f64,
    /// Share of the run the receiving CPU (1) was busy.
    pub receiver_busy: f64,
    /// Share of the run the sending CPU (0) was busy.
    pub sender_busy: f64,
    /// The receiver cost of every round, in round order (this row is the
    /// round with the median).
    pub round_ns: Vec<f64>,
    /// Where the receiving CPU's time went, in each profiled round.
    pub profiles: Vec<Profile>,
}

/// CPU 1's kernel samples in a profiled run, and how many of them fell in
/// the filter's own code (see [`Filter::owns`]): Bulkhead's eBPF program
/// and the kernel's map code it calls; nftables' netdev chain and what it
/// calls. Samples freeing a dropped packet are left out for every filter:
/// the kernel frees what any of them drops, but under nftables the free
/// runs inside its hook.
#[derive(Clone, Copy, Default)]
pub struct Profile {
    pub samples: u64,
    pub own: u64,
    /// Packets the receiver handled in the profiled run (set by its caller).
    pub packets: u64,
}

impl Profile {
    /// The filter's own CPU time per packet. CPU 1 never idles while it
    /// is sampled, so each sample stands for one sampling period of it.
    #[allow(clippy::cast_precision_loss, reason = "counts are far below 2^52")]
    pub fn own_ns(&self) -> f64 {
        self.own as f64 * 1e9 / f64::from(SAMPLING_HZ) / self.packets.max(1) as f64
    }

    /// Reads `perf script -F ip,sym` output: one call chain per sample,
    /// innermost frame first, samples separated by blank lines.
    fn of_script(script: &str, filter: Filter) -> Self {
        let mut profile = Self::default();
        for sample in script.split("\n\n") {
            let frames: Vec<(u64, &str)> = sample
                .lines()
                .filter_map(|line| {
                    let (address, symbol) = line.trim().split_once(' ')?;
                    Some((u64::from_str_radix(address, 16).ok()?, symbol.trim()))
                })
                .collect();
            // User space: the spinner (see `Sampler::start`) or a stray process.
            if frames.first().is_none_or(|&(address, _)| address < KERNEL_SPACE) {
                continue;
            }
            profile.samples += 1;
            let frees = frames.iter().any(|(_, symbol)| FREEING.iter().any(|f| symbol.starts_with(f)));
            if !frees && frames.iter().any(|&(address, symbol)| filter.owns(address, symbol)) {
                profile.own += 1;
            }
        }
        profile
    }
}

/// The lowest kernel address on x86-64: below it is user space.
const KERNEL_SPACE: u64 = 0xffff_8000_0000_0000;

/// Kernel functions that free a socket buffer and its memory.
const FREEING: [&str; 9] = [
    "kfree_skb",
    "sk_skb_reason_drop",
    "consume_skb",
    "skb_release",
    "skb_free_head",
    "sock_wfree",
    "kmem_cache_free",
    "__slab_free",
    "kfree",
];

/// A BPF program's symbol, `bpf_prog_<16 hex digits>_<name>` (not a kernel
/// function such as `bpf_prog_run_generic_xdp`, which runs one).
fn is_bpf_program(symbol: &str) -> bool {
    symbol.strip_prefix("bpf_prog_").is_some_and(|rest| {
        rest.len() > 17 && rest.as_bytes()[16] == b'_' && rest[..16].bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// Sampling rate of the profiled rounds, Hz: off the timer tick, so that
/// samples do not fall in step with it.
pub const SAMPLING_HZ: u32 = 4999;

/// `perf record` sampling every CPU with call chains, enabled only for the
/// length of one run; [`Sampler::finish`] reads back CPU 1's samples.
struct Sampler {
    /// Whose own code the samples are counted for.
    filter: Filter,
    perf: Option<std::process::Child>,
    /// Keeps CPU 1 from idling; see [`Sampler::start`].
    spinner: Option<std::process::Child>,
    /// Holds the recording and perf's control and acknowledgement FIFOs.
    dir: std::path::PathBuf,
    control: std::fs::File,
    ack: std::fs::File,
}

impl Sampler {
    fn start(stem: &str, filter: Filter) -> Result<Self, Error> {
        let dir = std::env::temp_dir().join(format!("{stem}.perf"));
        std::fs::create_dir_all(&dir)?;
        for fifo in ["control", "ack"] {
            let path = dir.join(fifo);
            let _ = std::fs::remove_file(&path);
            run("mkfifo", &[&path.to_string_lossy()])?;
        }
        // Opened for reading and writing, a FIFO opens at once whether or
        // not perf has opened its end yet.
        let open = |name: &str| std::fs::OpenOptions::new().read(true).write(true).open(dir.join(name));
        let (control, ack) = (open("control")?, open("ack")?);
        // Every CPU, not just CPU 1: perf learns the names of BPF programs
        // from events on the CPU that loads them. Events start disabled,
        // so perf's own start-up is not sampled.
        let perf = std::process::Command::new("perf")
            .args(["record", "--quiet", "-a", "-g", "-e", "cpu-clock", "-F", &SAMPLING_HZ.to_string(), "-D", "-1"])
            .arg(format!("--control=fifo:{},{}", dir.join("control").display(), dir.join("ack").display()))
            .arg("-o")
            .arg(dir.join("data"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start perf (Debian package linux-perf): {e}"))?;
        // perf's clock does not sample an idle CPU, and receive work that
        // an interrupt brings to an idle CPU runs in the idle task: without
        // this spinner, most of CPU 1's receive work would go unsampled.
        // It runs only when nothing else wants CPU 1 (SCHED_IDLE), and its
        // own samples are in user space, which `Profile` leaves out.
        let spinner = std::process::Command::new("taskset")
            .args(["-c", "1", "chrt", "--idle", "0", "sh", "-c", "while :; do :; done"])
            .spawn()?;
        let mut sampler = Self { filter, perf: Some(perf), spinner: Some(spinner), dir, control, ack };
        sampler.tell("enable")?;
        Ok(sampler)
    }

    /// Sends perf a control command and waits for its acknowledgement.
    fn tell(&mut self, command: &str) -> Result<(), Error> {
        use std::io::{Read as _, Write as _};
        use std::os::fd::AsRawFd as _;
        writeln!(self.control, "{command}")?;
        let mut poll = libc::pollfd { fd: self.ack.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&raw mut poll, 1, 10_000) } != 1 {
            return Err(format!("perf did not acknowledge `{command}` within 10 s").into());
        }
        let mut reply = [0; 64];
        let n = self.ack.read(&mut reply)?;
        if !String::from_utf8_lossy(&reply[..n]).contains("ack") {
            return Err(format!("perf answered `{command}` with {:?}", String::from_utf8_lossy(&reply[..n])).into());
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Profile, Error> {
        self.tell("disable")?;
        if let Some(mut spinner) = self.spinner.take() {
            spinner.kill()?;
            spinner.wait()?;
        }
        if let Some(mut perf) = self.perf.take() {
            run("kill", &["-INT", &perf.id().to_string()])?;
            perf.wait()?;
        }
        let script = std::process::Command::new("perf")
            .args(["script", "--cpu", "1", "-F", "ip,sym", "-i"])
            .arg(self.dir.join("data"))
            .stderr(std::process::Stdio::null())
            .output()?;
        if !script.status.success() {
            return Err(format!("perf script failed on {}", self.dir.join("data").display()).into());
        }
        Ok(Profile::of_script(&String::from_utf8_lossy(&script.stdout), self.filter))
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        for mut child in [self.perf.take(), self.spinner.take()].into_iter().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where the kernel puts JIT-compiled BPF programs (the module area): a
/// frame there that `perf` could not name is a BPF program's.
const BPF_TEXT: std::ops::Range<u64> = 0xffff_ffff_a000_0000..0xffff_ffff_ff00_0000;

impl TrafficRow {
    /// The filter's own CPU ns per packet in each profiled round, in round order.
    pub fn own_ns_rounds(&self) -> Vec<f64> {
        self.profiles.iter().map(Profile::own_ns).collect()
    }

    /// The median of [`TrafficRow::own_ns_rounds`], if any round was profiled.
    pub fn own_ns(&self) -> Option<f64> {
        let mut rounds = self.own_ns_rounds();
        rounds.sort_by(f64::total_cmp);
        rounds.get(rounds.len() / 2).copied()
    }

    #[allow(clippy::cast_precision_loss, reason = "packet counts are far below 2^52")]
    pub fn pps(&self, packets: u64) -> f64 {
        packets as f64 / self.seconds
    }

    /// What limited the rate: the receiver if it lost packets or had no
    /// idle time left (it then also slows the sender, whose ring slots are
    /// freed only as the receiver consumes them), else the offered load.
    pub fn bottleneck(&self) -> &'static str {
        if self.lost > self.sent / 100 || self.receiver_busy > 0.95 { "receiver" } else { "offered load (sender)" }
    }
}

/// Allowed source `i`: its address and the one UDP port it may reach.
fn allowed(i: usize) -> (Ipv4Addr, u16) {
    (Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8), 5000 + (i % 1000) as u16)
}

/// Sources that no rule names (default-denied).
fn denied(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 2, (i >> 8) as u8, i as u8)
}

/// `rules` allowed (source, port) pairs to the receiver, one identity per source.
fn pair_policy(rules: usize) -> Policy {
    let peer = |name: String| Peer { selector: Selector::Identity(name), location: here() };
    let identity = |name: String, addr: Ipv4Addr| Identity {
        name,
        labels: std::collections::BTreeMap::new(),
        addresses: vec![Address { net: IpAddr::V4(addr).into(), location: here() }],
        mode: Mode::Enforce,
        pod: None,
        location: here(),
    };
    let mut identities: Vec<Identity> = (0..rules).map(|i| identity(format!("src{i}"), allowed(i).0)).collect();
    identities.push(identity("receiver".into(), RECEIVER));
    let rules = (0..rules)
        .map(|i| Rule {
            name: format!("r{i}"),
            action: Action::Allow,
            from: vec![peer(format!("src{i}"))],
            to: vec![peer("receiver".into())],
            ports: Some(vec![PortSpec { protocol: Protocol::Udp, first: allowed(i).1, last: allowed(i).1 }]),
            expires: None,
            named_ports: Vec::new(),
            side: policy::model::Side::Both,
            location: here(),
        })
        .collect();
    Policy { documents: vec!["traffic".into()], identities, rules, ..Policy::default() }
}

/// A sender and a receiver namespace joined by one veth pair.
struct Link {
    tx: Netns,
    rx: Netns,
    tx_if: String,
    rx_if: String,
}

impl Link {
    fn new() -> Result<Self, LabError> {
        let stem = unique_stem("traffic");
        let tx = Netns::new(&format!("{stem}-tx"))?;
        let rx = Netns::new(&format!("{stem}-rx"))?;
        // Interface names are at most 15 bytes and global until moved.
        let short = format!("bt{}", std::process::id() % 100_000);
        let (tx_if, rx_if) = (format!("{short}s"), format!("{short}r"));
        run("ip", &["link", "add", &tx_if, "type", "veth", "peer", "name", &rx_if])?;
        run("ip", &["link", "set", &tx_if, "netns", tx.name()])?;
        run("ip", &["link", "set", &rx_if, "netns", rx.name()])?;
        tx.ip(&["addr", "add", &format!("{SENDER}/16"), "dev", &tx_if])?;
        rx.ip(&["addr", "add", &format!("{RECEIVER}/16"), "dev", &rx_if])?;
        tx.ip(&["link", "set", &tx_if, "up"])?;
        rx.ip(&["link", "set", &rx_if, "up"])?;
        // Sources are spoofed and unrouted: accept them without a reverse route.
        for key in ["all", "default", rx_if.as_str()] {
            rx.exec(&["sysctl", "-qw", &format!("net.ipv4.conf.{key}.rp_filter=0")])?;
        }
        // GRO gives veth a NAPI context, and threaded NAPI a kernel thread
        // that can be pinned to the receiving CPU.
        rx.exec(&["ethtool", "-K", &rx_if, "gro", "on"])?;
        rx.exec(&["sh", "-c", &format!("echo 1 > /sys/class/net/{rx_if}/threaded")])?;
        // Without XDP, veth hands packets to the stack on the sending CPU;
        // RPS moves that work to CPU 1 too, so every filter runs there.
        rx.exec(&["sh", "-c", &format!("echo 2 > /sys/class/net/{rx_if}/queues/rx-0/rps_cpus")])?;
        // A legacy iptables table, once created in a namespace, stays hooked
        // in for the namespace's life (flushing empties it, it does not
        // unhook it): create it now, so that every run walks it empty, not
        // just the runs after the iptables one.
        rx.exec(&["iptables-legacy", "-L", "INPUT", "-n"])?;
        Ok(Self { tx, rx, tx_if, rx_if })
    }

    /// The receiving NAPI thread, pinned to CPU 1 (it is recreated when an
    /// XDP program is attached, so this is asked again before every run).
    fn pin_receiver_thread(&self) -> Result<(), Error> {
        let wanted = format!("napi/{}-", self.rx_if);
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.starts_with(&wanted) {
                run("taskset", &["-pc", "1", &pid.to_string()])?;
                return Ok(());
            }
        }
        Err(format!("no NAPI thread for {}; threaded NAPI on veth needs GRO on", self.rx_if).into())
    }

    fn frames(&self, rules: usize) -> Result<Vec<Vec<u8>>, Error> {
        let mac = self.rx.exec(&["cat", &format!("/sys/class/net/{}/address", self.rx_if)])?;
        let mac: Vec<u8> = String::from_utf8_lossy(&mac.stdout)
            .trim()
            .split(':')
            .map(|b| u8::from_str_radix(b, 16))
            .collect::<Result<_, _>>()?;
        let udp_frame = |src: Ipv4Addr, port: u16| {
            // 14 + 20 + 8 + 22 = 64 bytes on the wire (without FCS).
            let mut frame = frames::simple(src.into(), RECEIVER.into(), UDP, frames::udp(40000, port, &[0; 22]));
            frame[..6].copy_from_slice(&mac);
            // The lab's frames leave the IPv4 header checksum to the tests
            // that need it; the receiving stack does.
            let sum: u32 = frame[14..34].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
            let folded = (sum & 0xffff) + (sum >> 16);
            let checksum = !(((folded & 0xffff) + (folded >> 16)) as u16);
            frame[24..26].copy_from_slice(&checksum.to_be_bytes());
            frame
        };
        Ok((0..FRAMES)
            .map(|k| {
                if k % 2 == 0 {
                    let (src, port) = allowed((k / 2) * rules / (FRAMES / 2));
                    udp_frame(src, port)
                } else {
                    udp_frame(denied(k / 2), 5000)
                }
            })
            .collect())
    }

    /// Packets the receiver's UDP layer took in (no socket listens: they
    /// end as `NoPorts`, the cheapest possible delivery).
    fn delivered(&self) -> Result<u64, Error> {
        let snmp = String::from_utf8_lossy(&self.rx.exec(&["cat", "/proc/net/snmp"])?.stdout).into_owned();
        let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
        let (names, values) = (udp.next().unwrap_or(""), udp.next().unwrap_or(""));
        let field = |name: &str| {
            names
                .split_whitespace()
                .position(|n| n == name)
                .and_then(|i| values.split_whitespace().nth(i)?.parse().ok())
        };
        Ok(field("InDatagrams").unwrap_or(0) + field("NoPorts").unwrap_or(0))
    }

    fn sent(&self) -> Result<u64, Error> {
        let path = format!("/sys/class/net/{}/statistics/tx_packets", self.tx_if);
        Ok(String::from_utf8_lossy(&self.tx.exec(&["cat", &path])?.stdout).trim().parse()?)
    }

    /// Sends for `seconds` and measures; `filtered` reads the filter's drop
    /// counter. `profiled`: the filter to sample CPU 1 for, with `perf`.
    fn measure(
        &self,
        frames: &[Vec<u8>],
        seconds: u64,
        filtered: &mut dyn FnMut() -> Result<u64, Error>,
        profiled: Option<Filter>,
    ) -> Result<Measured, Error> {
        let mut config = String::new();
        for frame in frames {
            let bytes: Vec<String> = frame.iter().map(|b| format!("0x{b:02x}")).collect();
            let _ = writeln!(config, "{{ {} }}", bytes.join(", "));
        }
        let config_path = std::env::temp_dir().join(format!("{}.trafgen", self.tx.name()));
        std::fs::write(&config_path, config)?;
        self.pin_receiver_thread()?;
        let sampler = profiled.map(|filter| Sampler::start(self.tx.name(), filter)).transpose()?;
        let (sent0, delivered0, filtered0) = (self.sent()?, self.delivered()?, filtered()?);
        let away0 = cpu_away_ns()?;
        let started = Instant::now();
        let output = self
            .tx
            .command("timeout")
            .args([
                &seconds.to_string(),
                "taskset",
                "-c",
                "0",
                "trafgen",
                "--dev",
                &self.tx_if,
                "--cpus",
                "1",
                "-Q",
                "--rate",
                &format!("{OFFERED_PPS}pps"),
            ])
            .arg("--conf")
            .arg(&config_path)
            .output()?;
        let elapsed = started.elapsed();
        let _ = std::fs::remove_file(&config_path);
        // trafgen runs until `timeout` stops it; stopped with a full queue,
        // it may report a failed flush, which is no failure of the run.
        if elapsed < Duration::from_secs(seconds) {
            return Err(format!("trafgen stopped early: {}", String::from_utf8_lossy(&output.stderr)).into());
        }
        std::thread::sleep(Duration::from_millis(200)); // let the receiver drain its queue
        let sent = self.sent()? - sent0;
        let passed = self.delivered()? - delivered0;
        let dropped = filtered()? - filtered0;
        let away1 = cpu_away_ns()?;
        // Busy time from trafgen's start to the end of the drain (the
        // receiver's work too), as a share of trafgen's time.
        let watched = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        #[allow(clippy::cast_precision_loss, reason = "nanoseconds of a few seconds")]
        let busy = |cpu: usize| {
            watched.saturating_sub(away1[cpu].saturating_sub(away0[cpu])) as f64 / elapsed.as_nanos() as f64
        };
        let profile = sampler.map(Sampler::finish).transpose()?;
        Ok(Measured { seconds: elapsed.as_secs_f64(), sent, passed, dropped, busy: [busy(0), busy(1)], profile })
    }
}

/// What one run of [`Link::measure`] saw.
struct Measured {
    seconds: f64,
    sent: u64,
    passed: u64,
    /// By the filter's own counter.
    dropped: u64,
    /// Share of the run CPUs 0 and 1 were busy.
    busy: [f64; 2],
    profile: Option<Profile>,
}

/// A filter's drop counter: the first line of `command`'s output that
/// contains `marker`, read by `packets`.
fn drop_count(ns: &Netns, command: &[&str], marker: &str, packets: fn(&str) -> Option<u64>) -> Result<u64, Error> {
    let out = ns.exec(command)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(text.lines().find(|l| l.contains(marker)).and_then(packets).unwrap_or(0))
}

/// Time CPUs 0 and 1 have spent idle, waiting for I/O or stolen by the
/// hypervisor so far, ns, from `/proc/stat`. Busy time is the rest of the
/// wall-clock time. This kernel (`TICK_CPU_ACCOUNTING`) counts user,
/// system and softirq time by sampling the CPU at each timer tick, and
/// receive work that comes in bursts between ticks goes mostly unseen: in
/// this bench the sampled figure for the receiving CPU read as little as a
/// third of its real busy time. Idle time is measured exactly, at each
/// entry to and exit from idle (`NO_HZ`), and steal comes from the
/// hypervisor's clock.
fn cpu_away_ns() -> Result<[u64; 2], Error> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    // SAFETY: sysconf has no preconditions.
    let tick_ns = 1_000_000_000 / u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    let mut out = [0; 2];
    for (cpu, slot) in out.iter_mut().enumerate() {
        let line = stat.lines().find(|l| l.starts_with(&format!("cpu{cpu} "))).ok_or("the bench needs two CPUs")?;
        let fields: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal guest guest_nice
        let away: u64 = [3, 4, 7].iter().filter_map(|&i| fields.get(i)).sum();
        *slot = away * tick_ns;
    }
    Ok(out)
}

/// Runs every filter at every rule count, `rounds` times over, the rounds
/// one after another so that a slow stretch of the host (other guests)
/// falls on one round of every filter rather than on every round of one;
/// each (rules, filter) keeps its round with the median receiver cost.
/// Then `sampled.0` more rounds of `sampled.1` seconds under `perf`,
/// which only say where the time went: sampling costs CPU, so their
/// totals are not kept.
pub fn run_all(
    rule_counts: &[usize],
    seconds: u64,
    rounds: usize,
    sampled: (usize, u64),
) -> Result<Vec<TrafficRow>, Error> {
    let link = Link::new()?;
    let mut runs: Vec<TrafficRow> = Vec::new();
    for _ in 0..rounds {
        runs.extend(run_round(&link, rule_counts, seconds, false)?);
    }
    let mut sampled_runs: Vec<TrafficRow> = Vec::new();
    for _ in 0..sampled.0 {
        sampled_runs.extend(run_round(&link, rule_counts, sampled.1, true)?);
    }
    let mut rows = Vec::new();
    for &rules in rule_counts {
        for filter in Filter::ALL {
            let same_filter = |r: &&TrafficRow| r.rules == rules && r.filter == filter;
            let mut same: Vec<&TrafficRow> = runs.iter().filter(same_filter).collect();
            let round_ns: Vec<f64> = same.iter().map(|r| r.receiver_ns).collect();
            same.sort_by(|a, b| a.receiver_ns.total_cmp(&b.receiver_ns));
            let profiles = sampled_runs.iter().filter(same_filter).flat_map(|r| r.profiles.clone()).collect();
            if let Some(median) = same.get(same.len() / 2) {
                rows.push(TrafficRow { round_ns, profiles, ..(*median).clone() });
            }
        }
    }
    Ok(rows)
}

/// One round: every filter at every rule count, `seconds` each, those
/// [`Filter::sampled`] sampled by `perf` if `profiled`.
fn run_round(link: &Link, rule_counts: &[usize], seconds: u64, profiled: bool) -> Result<Vec<TrafficRow>, Error> {
    let mut rows = Vec::new();
    for &rules in rule_counts {
        let frames = link.frames(rules)?;
        for filter in Filter::ALL {
            let mut datapath = None;
            let mut counter: Box<dyn FnMut() -> Result<u64, Error>> = match filter {
                Filter::Nothing => Box::new(|| Ok(0)),
                Filter::BulkheadNative | Filter::BulkheadGeneric | Filter::BulkheadTc => {
                    let mut loaded = Datapath::load_with(MapSizes::default())?;
                    if filter == Filter::BulkheadTc {
                        loaded.set_ingress_hook(IngressHook::Tc);
                    }
                    loaded.set_xdp_attach(if filter == Filter::BulkheadNative {
                        XdpAttach::Native
                    } else {
                        XdpAttach::Generic
                    });
                    loaded.enforce(&mut policy::Engine::new(), &pair_policy(rules), false)?;
                    let rx_if = link.rx_if.clone();
                    link.rx.enter(|| loaded.attach(&rx_if))??;
                    datapath = Some(loaded);
                    Box::new(|| Ok(0))
                }
                Filter::Nftables => {
                    nftables(link, rules)?;
                    let rx = &link.rx;
                    // `... counter packets N bytes M drop`
                    Box::new(move || {
                        drop_count(rx, &["nft", "list", "chain", "netdev", "bhbench", "ingress"], "drop", |line| {
                            line.split_whitespace().skip_while(|w| *w != "packets").nth(1)?.parse().ok()
                        })
                    })
                }
                Filter::Iptables => {
                    iptables(link, rules)?;
                    let rx = &link.rx;
                    // `N M DROP ...` (packets first)
                    Box::new(move || {
                        drop_count(rx, &["iptables-legacy", "-L", "INPUT", "-v", "-x", "-n"], "DROP", |line| {
                            line.split_whitespace().next()?.parse().ok()
                        })
                    })
                }
            };
            let bulkhead_drops = |datapath: &Option<Datapath>| -> Result<u64, Error> {
                Ok(datapath.as_ref().map_or(Ok(0), |d| {
                    d.counters().map(|c| c.drops.values().map(|counter| counter.packets).sum::<u64>())
                })?)
            };
            let before = bulkhead_drops(&datapath)?;
            let sample = (profiled && filter.sampled()).then_some(filter);
            let Measured { seconds, sent, passed, dropped, busy: [sender_busy, busy], profile } =
                link.measure(&frames, seconds, &mut *counter, sample)?;
            drop(counter);
            let filtered = dropped + bulkhead_drops(&datapath)? - before;
            // Detach and remove before the next filter.
            drop(datapath);
            let _ = link.rx.exec(&["nft", "delete", "table", "netdev", "bhbench"]);
            let _ = link.rx.exec(&["iptables-legacy", "-F", "INPUT"]);
            let handled = passed + filtered;
            let profile = profile.map(|p| Profile { packets: handled, ..p });
            #[allow(clippy::cast_precision_loss, reason = "packet counts are far below 2^52")]
            let receiver_ns = busy * seconds * 1e9 / handled.max(1) as f64;
            let sampled = profile.map_or(String::new(), |p| {
                format!(", profiled: {} of {} samples in the filter's own code", p.own, p.samples)
            });
            eprintln!(
                "bench: traffic {} at {rules} rules: sent {sent}, passed {passed}, filtered {filtered}, CPU 0 busy {:.0}%, CPU 1 busy {:.0}%{sampled}",
                filter.name(),
                sender_busy * 100.0,
                busy * 100.0
            );
            rows.push(TrafficRow {
                filter,
                rules,
                seconds,
                sent,
                passed,
                filtered,
                lost: sent.saturating_sub(handled),
                receiver_ns,
                receiver_busy: busy,
                sender_busy,
                round_ns: vec![receiver_ns],
                profiles: profile.into_iter().collect(),
            });
        }
    }
    Ok(rows)
}

/// The policy as nftables' strongest form: one hash-set lookup on
/// (source, port) at the netdev ingress hook, the earliest nftables gets.
fn nftables(link: &Link, rules: usize) -> Result<(), Error> {
    let elements: Vec<String> = (0..rules)
        .map(|i| {
            let (src, port) = allowed(i);
            format!("{src} . {port}")
        })
        .collect();
    let ruleset = format!(
        "table netdev bhbench {{\n  set allowed {{ type ipv4_addr . inet_service; elements = {{ {} }} }}\n  chain ingress {{\n    type filter hook ingress device \"{}\" priority 0; policy accept;\n    ip daddr {RECEIVER} ip protocol udp ip saddr . udp dport @allowed accept\n    ip daddr {RECEIVER} ip protocol udp counter drop\n  }}\n}}\n",
        elements.join(", "),
        link.rx_if
    );
    let path = std::env::temp_dir().join(format!("{}.nft", link.rx.name()));
    std::fs::write(&path, ruleset)?;
    let result = link.rx.exec(&["nft", "-f", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    result?;
    Ok(())
}

/// The policy as classic iptables: one INPUT rule per allowed pair, in
/// order, then a drop (`iptables-legacy`: `x_tables`, evaluated linearly).
fn iptables(link: &Link, rules: usize) -> Result<(), Error> {
    let mut text = String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for i in 0..rules {
        let (src, port) = allowed(i);
        let _ = writeln!(text, "-A INPUT -s {src}/32 -d {RECEIVER}/32 -p udp -m udp --dport {port} -j ACCEPT");
    }
    let _ = writeln!(text, "-A INPUT -d {RECEIVER}/32 -p udp -j DROP\nCOMMIT");
    let mut child = link.rx.command("iptables-legacy-restore").stdin(std::process::Stdio::piped()).spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().ok_or("no stdin")?, text.as_bytes())?;
    if !child.wait()?.success() {
        return Err("iptables-legacy-restore failed".into());
    }
    Ok(())
}

pub fn markdown(md: &mut String, rows: &[TrafficRow]) {
    let _ = writeln!(
        md,
        "\n### Traffic through the kernel (64-byte UDP over veth, half allowed, {} kpps offered; trafgen on CPU 0, receiving stack on CPU 1; the median of the rounds)\n\n| rules | filter | sent kpps | passed kpps | dropped kpps | lost | receiver CPU ns/packet | receiver busy | sender busy | bottleneck |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
        OFFERED_PPS / 1000
    );
    for row in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.0}% | {:.0}% | {} |",
            row.rules,
            row.filter.name(),
            row.pps(row.sent) / 1000.0,
            row.pps(row.passed) / 1000.0,
            row.pps(row.filtered) / 1000.0,
            row.lost,
            row.receiver_ns,
            row.receiver_busy * 100.0,
            row.sender_busy * 100.0,
            row.bottleneck()
        );
    }
    versus(md, rows, "receiver ns per packet", |row| row.round_ns.clone());
    let _ = writeln!(
        md,
        "\n### Each filter's own work on the receiving CPU (CPU 1 sampled by `perf` at {SAMPLING_HZ} Hz with call chains in more rounds; freeing dropped packets left out)\n\n| rules | filter | own CPU ns per packet (median) | round by round | samples in its own code, all rounds |\n|---:|---|---:|---|---:|",
    );
    for row in rows {
        let Some(own_ns) = row.own_ns() else { continue };
        let rounds: Vec<String> = row.own_ns_rounds().iter().map(|ns| format!("{ns:.0}")).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {own_ns:.0} | {} | {} |",
            row.rules,
            row.filter.name(),
            rounds.join(", "),
            row.profiles.iter().map(|p| p.own).sum::<u64>()
        );
    }
    versus(md, rows, "own CPU ns per packet", TrafficRow::own_ns_rounds);
}

/// Bulkhead at TC ingress against nftables' set, round by round, so that a
/// lead can be told from the spread: each round ran every filter one after
/// another. `rounds` gives a row's figure for each round.
fn versus(md: &mut String, rows: &[TrafficRow], what: &str, rounds: impl Fn(&TrafficRow) -> Vec<f64>) {
    for rules in rows.iter().map(|r| r.rules).collect::<std::collections::BTreeSet<_>>() {
        let of = |filter| rows.iter().find(|r| r.rules == rules && r.filter == filter).map(&rounds);
        let (Some(ours), Some(theirs)) = (of(Filter::BulkheadTc), of(Filter::Nftables)) else {
            continue;
        };
        if ours.is_empty() {
            continue;
        }
        let per_round: Vec<String> = ours.iter().zip(&theirs).map(|(a, b)| format!("{a:.0} vs {b:.0}")).collect();
        let ahead = ours.iter().zip(&theirs).filter(|(a, b)| a < b).count();
        let _ = writeln!(
            md,
            "\nAt {rules} rules, Bulkhead (TC ingress) vs nftables (set), {what} round by round: {} (Bulkhead cheaper in {ahead} of {}).",
            per_round.join(", "),
            per_round.len()
        );
    }
}

pub fn json(rows: &[TrafficRow]) -> serde_json::Value {
    rows.iter().map(|r| serde_json::json!({"rules": r.rules, "filter": r.filter.name(), "seconds": r.seconds, "sent": r.sent, "passed": r.passed, "filtered": r.filtered, "lost": r.lost, "receiver_ns_per_packet": r.receiver_ns, "receiver_busy": r.receiver_busy, "sender_busy": r.sender_busy, "bottleneck": r.bottleneck(), "round_receiver_ns": r.round_ns, "own_ns_per_packet": r.own_ns(), "profiled_rounds": r.profiles.iter().map(|p| serde_json::json!({"kernel_samples": p.samples, "own_samples": p.own, "packets": p.packets, "own_ns_per_packet": p.own_ns()})).collect::<Vec<_>>()})).collect()
}
