//! `cargo xtask bench`: per-packet cost of the real programs beside an empty
//! XDP program (the floor), at several policy sizes; policy load and update
//! times; and the daemon's footprint. Writes JSON and a Markdown table and
//! refreshes the results section of BENCHMARKS.md. Numbers only: nothing
//! here fails because a machine is slow.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use enforcer::datapath::{Datapath, Hook, MapSizes};
use lab::frames::{self, ACK, ICMP, ICMPV6, SYN, TCP, icmp, tcp};
use lab::pki::Ca;
use lab::{Daemon, ScratchDir, ThreeTier};
use policy::model::{Action, Address, Identity, Mode, Peer, Policy, PortSpec, Protocol, Rule, Selector};
use policy::{Location, compile};

#[path = "common/traffic.rs"]
mod traffic;

type Error = Box<dyn std::error::Error>;

fn here() -> Location {
    Location { file: Arc::from("bench"), line: 1, column: 1 }
}

fn v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

/// `n` identities (mostly single addresses, every 50th a /24 prefix) and as
/// many rules: identity i may reach identity i+1 on one TCP port; plus a
/// deny rule and ICMP for the probed pair (identities 0 and 1, which also
/// have IPv6 addresses).
fn synthetic_policy(n: usize) -> Policy {
    let peer = |i: usize| Peer { selector: Selector::Identity(format!("id{i}")), location: here() };
    let identities = (0..n)
        .map(|i| {
            let mut addresses = vec![Address {
                net: if i % 50 == 49 {
                    // Prefix k: 172.16.0.0/24, 172.16.1.0/24, ... (4096 fit, 100k needs 2000).
                    let k = i / 50;
                    format!("172.{}.{}.0/24", 16 + k / 256, k % 256).parse().unwrap()
                } else {
                    IpAddr::V4(v4(i)).into()
                },
                location: here(),
            }];
            if i < 2 {
                addresses.push(Address {
                    net: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16)).into(),
                    location: here(),
                });
            }
            Identity {
                name: format!("id{i}"),
                labels: BTreeMap::new(),
                addresses,
                mode: Mode::Enforce,
                location: here(),
            }
        })
        .collect();
    let port = |protocol, first, last| PortSpec { protocol, first, last };
    let mut rules: Vec<Rule> = (0..n)
        .map(|i| Rule {
            name: format!("r{i}"),
            action: Action::Allow,
            from: vec![peer(i)],
            to: vec![peer((i + 1) % n)],
            ports: Some(vec![port(Protocol::Tcp, 1000 + (i % 1000) as u16, 1000 + (i % 1000) as u16)]),
            expires: None,
            location: here(),
        })
        .collect();
    rules.push(Rule {
        name: "probe-icmp".into(),
        action: Action::Allow,
        from: vec![peer(0)],
        to: vec![peer(1)],
        ports: Some(vec![port(Protocol::Icmp, 0, u16::MAX), port(Protocol::Icmpv6, 0, u16::MAX)]),
        expires: None,
        location: here(),
    });
    rules.push(Rule {
        name: "probe-deny".into(),
        action: Action::Deny,
        from: vec![peer(0)],
        to: vec![peer(1)],
        ports: Some(vec![port(Protocol::Tcp, 22, 22)]),
        expires: None,
        location: here(),
    });
    Policy { documents: vec!["bench".into()], identities, rules }
}

/// The packet classes measured, per family.
fn classes(family: &str) -> Vec<(&'static str, Vec<u8>)> {
    // `unknown` is in no identity: `world`, which no synthetic rule names.
    let (src, dst, unknown, icmp_proto, timestamp): (IpAddr, IpAddr, IpAddr, u8, u8) = if family == "IPv4" {
        (IpAddr::V4(v4(0)), IpAddr::V4(v4(1)), IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), ICMP, 13)
    } else {
        (
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            ICMPV6,
            130,
        )
    };
    vec![
        ("established (conntrack hit)", frames::simple(src, dst, TCP, tcp(40000, 1000, ACK))),
        (
            "new allowed (full lookup, untracked)",
            frames::simple(src, dst, icmp_proto, icmp(timestamp, 0, [0; 4], &[0; 12])),
        ),
        ("default-denied", frames::simple(src, dst, TCP, tcp(40000, 9, SYN))),
        ("deny rule", frames::simple(src, dst, TCP, tcp(40000, 22, SYN))),
        ("unknown source (world, default-denied)", frames::simple(unknown, dst, TCP, tcp(40000, 1000, SYN))),
        ("non-IP (ARP)", frames::arp()),
    ]
}

fn median(mut values: Vec<u32>) -> u32 {
    values.sort_unstable();
    values[values.len() / 2]
}

struct Row {
    identities: usize,
    family: &'static str,
    class: &'static str,
    ns: u32,
    floor: u32,
    /// Median over rounds of (program ns / floor ns in the same round).
    ratio: f64,
}

/// Loading a synthetic policy of `size` identities and rules in process.
struct Load {
    size: usize,
    full: Duration,
    compile: Duration,
    one_rule: Duration,
}

type Loads = Vec<Load>;

/// `spin`: a class (or the start of its name) to run alone for 30 s first.
fn per_packet(sizes: &[usize], repeat: u32, runs: usize, spin: Option<&str>) -> Result<(Vec<Row>, Loads), Error> {
    // Room for the largest synthetic policy (100k rules plus two).
    let mut datapath = Datapath::load_with(MapSizes { rules: 131_072, ..MapSizes::default() })?;
    let mut rows = Vec::new();
    let mut loads = Vec::new();
    for &n in sizes {
        let policy = synthetic_policy(n);
        // Each timed apply comes as an isolated change would, after the
        // wait that follows the previous switch (see CHANGE_GAP).
        std::thread::sleep(CHANGE_GAP);
        let started = Instant::now();
        let compiled = compile(&policy);
        let compile_time = started.elapsed();
        datapath.apply(&compiled, false)?;
        let full = started.elapsed();
        // A one-rule change on top: the port of rule r0.
        let mut changed = policy.clone();
        if let Some(ports) = changed.rules[0].ports.as_mut() {
            ports[0] = PortSpec { protocol: Protocol::Tcp, first: 2999, last: 2999 };
        }
        std::thread::sleep(CHANGE_GAP);
        let started = Instant::now();
        datapath.apply(&compile(&changed), false)?;
        let one = started.elapsed();
        datapath.apply(&compiled, false)?;
        loads.push(Load { size: n, full, compile: compile_time, one_rule: one });
        datapath.clear_state()?;
        for family in ["IPv4", "IPv6"] {
            for (class, frame) in classes(family) {
                if class.starts_with("established") {
                    // Open the connection once so the measured packets hit conntrack.
                    let syn = frame.clone();
                    let mut opening = syn.clone();
                    let flags = opening.len() - 7;
                    opening[flags] = SYN;
                    datapath.test_run(Hook::Ingress, &opening, 1)?;
                }
                if spin.is_some_and(|c| class.starts_with(c)) {
                    // For a profiler (`perf record -a`) to watch this class alone.
                    let until = Instant::now() + Duration::from_secs(30);
                    while Instant::now() < until {
                        datapath.test_run(Hook::Ingress, &frame, repeat)?;
                    }
                }
                // Floor and program alternate, and each round yields its own
                // ratio: a slow stretch of the machine (another guest, a
                // frequency change) then weighs on both sides of the ratio.
                let (mut program, mut floor, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..runs {
                    let empty = datapath.test_run(Hook::Calibration, &frame, repeat)?.duration_ns;
                    let real = datapath.test_run(Hook::Ingress, &frame, repeat)?.duration_ns;
                    program.push(real);
                    floor.push(empty);
                    ratios.push(f64::from(real) / f64::from(empty.max(1)));
                }
                ratios.sort_by(f64::total_cmp);
                let ratio = ratios[ratios.len() / 2];
                rows.push(Row { identities: n, family, class, ns: median(program), floor: median(floor), ratio });
            }
        }
    }
    Ok((rows, loads))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn memlock(root: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(root.join("maps")) else { return Vec::new() };
    let mut out: Vec<(String, u64)> = entries
        .flatten()
        .filter_map(|entry| {
            let output = Command::new("bpftool").args(["map", "show", "pinned"]).arg(entry.path()).output().ok()?;
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            let bytes = text.split_whitespace().skip_while(|w| *w != "memlock").nth(1)?;
            Some((entry.file_name().to_string_lossy().into_owned(), bytes.trim_end_matches('B').parse().ok()?))
        })
        .collect();
    out.sort();
    out
}

/// What the daemon part measures.
struct DaemonFigures {
    /// Rename, `bulkhead policy push` started, or push request sent on an
    /// open API connection → new generation enforced.
    updates: UpdateSeries,
    /// The large policy: rename → enforced, and a one-rule change to it.
    big_load: Duration,
    big_change: Duration,
    /// The daemon's own account of the two large applies.
    breakdown: Vec<String>,
    idle_kib: u64,
    loaded_kib: u64,
    maps: Vec<(String, u64)>,
}

/// Port of the bench daemon's admin API inside its namespace.
const API: &str = "127.0.0.1:9443";

/// A client that stays connected to the admin API, as a controller pushing
/// policy would: each push is one HTTP request on the same mutual-TLS
/// session, so no process start or handshake is timed, only the daemon.
struct ApiSession {
    tls: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
}

impl ApiSession {
    /// Connects from inside `lab`'s router namespace, where the API listens.
    fn open(lab: &ThreeTier, ca: &Path, cert: &Path, key: &Path) -> Result<Self, Error> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(ca)? {
            roots.add(ca?)?;
        }
        let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key)?)?;
        let tcp = lab.router.enter(|| std::net::TcpStream::connect(API))??;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let connection = rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("127.0.0.1")?)?;
        Ok(Self { tls: rustls::StreamOwned::new(connection, tcp) })
    }

    /// Pushes one policy file and waits for the daemon's answer.
    fn push(&mut self, name: &str, text: &str) -> Result<(), Error> {
        use std::io::{Read as _, Write as _};
        let body = serde_json::json!({ "files": [{ "name": name, "text": text }] }).to_string();
        let request = format!(
            "POST /v1/policy HTTP/1.1\r\nHost: {API}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.tls.write_all(request.as_bytes())?;
        self.tls.flush()?;
        // Byte by byte up to the body, so nothing of a later response is
        // read ahead; then exactly Content-Length bytes.
        let mut head = Vec::new();
        let mut byte = [0u8];
        while !head.ends_with(b"\r\n\r\n") {
            self.tls.read_exact(&mut byte)?;
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let length = head
            .lines()
            .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or("the daemon's answer has no Content-Length")?;
        let mut answer = vec![0; length];
        self.tls.read_exact(&mut answer)?;
        if !head.lines().next().is_some_and(|status| status.contains(" 200 ")) {
            return Err(format!(
                "push refused: {} {}",
                head.lines().next().unwrap_or_default(),
                String::from_utf8_lossy(&answer)
            )
            .into());
        }
        Ok(())
    }
}

/// The XDP program a running daemon attached, found through the link it
/// pinned: probe packets run through it (`BPF_PROG_TEST_RUN`) are judged
/// exactly as a packet arriving on the interface would be, by the same
/// program reading the same maps.
struct LiveProgram(OwnedFd);

impl LiveProgram {
    fn attached_under(bpffs_root: &Path) -> Result<Self, Error> {
        let links = bpffs_root.join("links");
        let link = std::fs::read_dir(&links)?
            .flatten()
            .map(|entry| entry.path())
            .find(|path| path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("xdp-")))
            .ok_or_else(|| format!("no pinned XDP link under {}", links.display()))?;
        let bpf = |command: libc::c_long, attr: &mut [u64; 16]| {
            // SAFETY: `attr` is a zeroed bpf_attr large enough for these
            // commands; the kernel reads and writes only inside it (and the
            // buffers it points at, alive for the call).
            let result = unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), 128usize) };
            if result < 0 { Err(std::io::Error::last_os_error()) } else { Ok(result as i32) }
        };
        // BPF_OBJ_GET: the pinned link.
        let path = std::ffi::CString::new(link.to_string_lossy().into_owned())?;
        let mut attr = [0u64; 16];
        attr[0] = path.as_ptr() as u64;
        // SAFETY: a fresh descriptor the kernel just returned.
        let link_fd = unsafe { OwnedFd::from_raw_fd(bpf(7, &mut attr)?) };
        // BPF_OBJ_GET_INFO_BY_FD: struct bpf_link_info { type, id, prog_id, .. }.
        let mut info = [0u32; 32];
        let mut attr = [0u64; 16];
        attr[0] = u64::from(link_fd.as_raw_fd().cast_unsigned()) | (std::mem::size_of_val(&info) as u64) << 32;
        attr[1] = info.as_mut_ptr() as u64;
        bpf(15, &mut attr)?;
        // BPF_PROG_GET_FD_BY_ID.
        let mut attr = [0u64; 16];
        attr[0] = u64::from(info[2]);
        // SAFETY: as above.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(bpf(13, &mut attr)?) }))
    }

    /// True if the program passes `frame`.
    fn passes(&self, frame: &[u8]) -> Result<bool, Error> {
        const XDP_PASS: u32 = 2;
        Ok(enforcer::testrun::run(self.0.as_raw_fd(), frame, 1)?.retval == XDP_PASS)
    }
}

/// Sends `probe` through the live program until it passes; the time since
/// `started`. The probe must be a packet only the new policy allows.
fn enforced_after(
    program: &LiveProgram,
    probe: &[u8],
    started: Instant,
    limit: Duration,
    resolution: Duration,
) -> Result<Duration, Error> {
    while !program.passes(probe)? {
        if started.elapsed() > limit {
            return Err(format!("the daemon did not apply a change within {limit:?}").into());
        }
        // The probe's own CPU time is taken from the daemon it times on
        // this two-core machine: poll no finer than the figure needs.
        std::thread::sleep(resolution);
    }
    Ok(started.elapsed())
}

/// Fails unless `probe` is dropped: a probe that passes before a change
/// cannot time it.
fn denied_before(program: &LiveProgram, probe: &[u8]) -> Result<(), Error> {
    if program.passes(probe)? {
        return Err("the probe passed before the change: it cannot time it".into());
    }
    Ok(())
}

/// How far apart the timed changes are, as separate edits are: longer than
/// the daemon's wait for program runs still reading the slot it left at
/// the previous change (one RCU grace period, 7–45 ms here), which a change
/// coming sooner waits out first. The back-to-back row times that case.
const CHANGE_GAP: Duration = Duration::from_millis(50);

/// Times one-rule changes of the three-tier policy, `gap` apart: change
/// `k` makes variant `k` (`prepare`, untimed) and hands it to the daemon
/// (`apply`), and is timed until a probe passes that only variant `k`
/// allows — a SYN from the gateway tier to the logic tier on that variant's
/// port, from a source port conntrack has not seen. (Polling /metrics
/// instead would time the scrape, and slow the daemon it measures.)
fn time_changes(
    program: &LiveProgram,
    changes: std::ops::RangeInclusive<usize>,
    gap: Duration,
    prepare: impl Fn(usize) -> Result<(), Error>,
    apply: impl Fn(usize) -> Result<(), Error>,
) -> Result<Vec<f64>, Error> {
    let (gateway, logic) = (Ipv4Addr::new(10, 0, 1, 7), Ipv4Addr::new(10, 0, 2, 7));
    changes
        .map(|k| {
            let probe = syn(gateway, logic, 20_000 + k as u16, 8080 + (k % 2) as u16);
            denied_before(program, &probe)?;
            prepare(k)?;
            std::thread::sleep(gap);
            let started = Instant::now();
            apply(k)?;
            Ok(enforced_after(program, &probe, started, Duration::from_secs(10), Duration::from_micros(20))?
                .as_secs_f64()
                * 1000.0)
        })
        .collect()
}

/// A TCP SYN from `src` to `dst`, which conntrack has never seen if
/// `src_port` is fresh.
fn syn(src: Ipv4Addr, dst: Ipv4Addr, src_port: u16, dst_port: u16) -> Vec<u8> {
    frames::simple(IpAddr::V4(src), IpAddr::V4(dst), TCP, tcp(src_port, dst_port, SYN))
}

/// The synthetic policy as the YAML an operator would write.
fn policy_yaml(policy: &Policy, port_of_first_rule: u16) -> String {
    let n = policy.identities.len();
    let mut text =
        String::from("apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: big}\nspec:\n  identities:\n");
    for identity in &policy.identities {
        let addresses: Vec<String> = identity.addresses.iter().map(|a| format!("\"{}\"", a.net)).collect();
        let _ = writeln!(text, "    - {{name: {}, addresses: [{}]}}", identity.name, addresses.join(", "));
    }
    text += "  rules:\n";
    for i in 0..n {
        let port = if i == 0 { port_of_first_rule } else { 1000 + (i % 1000) as u16 };
        let _ = writeln!(
            text,
            "    - {{name: r{i}, from: [{{identity: id{i}}}], to: [{{identity: id{}}}], ports: [\"{port}/tcp\"]}}",
            (i + 1) % n,
        );
    }
    text
}

/// What a policy-pushing client needs: the server's CA, its certificate
/// and key, and where to write the files it pushes.
struct ClientFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    scratch: PathBuf,
}

/// `changes` one-rule changes each by rename, by `bulkhead policy push`
/// and by a push on an open API connection, [`CHANGE_GAP`] apart; then as
/// many renames back to back, each as soon as the last is enforced. Each
/// series in ms.
fn timed_updates(
    lab: &ThreeTier,
    daemon: &Daemon,
    program: &LiveProgram,
    dir: &Path,
    client: &ClientFiles,
    changes: usize,
    variant: &dyn Fn(usize) -> String,
) -> Result<UpdateSeries, Error> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let staging = dir.join(".p.yaml.new");
    let rename_in = |k: usize| Ok(std::fs::write(&staging, variant(k))?);
    let rename = |_| Ok(std::fs::rename(&staging, dir.join("p.yaml"))?);
    let renames = time_changes(program, 1..=changes, CHANGE_GAP, rename_in, rename)?;
    let push_file = client.scratch.join("pushed.yaml");
    let bulkhead = lab::topology::bulkhead_binary();
    let pushes = time_changes(
        program,
        changes + 1..=2 * changes,
        CHANGE_GAP,
        |k| Ok(std::fs::write(&push_file, variant(k))?),
        |_| {
            // Started from a thread inside the router's namespace, where the
            // API listens, as an operator's shell there would start it (not
            // through `nsenter`, whose own start would be timed too).
            let output = lab.router.enter(|| {
                Command::new(&bulkhead)
                    .args(["policy", "push", &path(&push_file), "--server", &format!("https://{API}")])
                    .args(["--cert", &path(&client.cert), "--key", &path(&client.key), "--ca", &path(&client.ca)])
                    .output()
            })??;
            if !output.status.success() {
                return Err(format!("policy push failed: {}", String::from_utf8_lossy(&output.stderr)).into());
            }
            Ok(())
        },
    )?;
    let session = std::cell::RefCell::new(ApiSession::open(lab, &client.ca, &client.cert, &client.key)?);
    let first = 2 * changes + 1;
    let texts: Vec<String> = (first..=3 * changes).map(variant).collect();
    let session_pushes = time_changes(
        program,
        first..=3 * changes,
        CHANGE_GAP,
        |_| Ok(()),
        |k| session.borrow_mut().push("pushed.yaml", &texts[k - first]),
    )?;
    let spaced_slot_waits = slot_waits(lab, daemon)?;
    // Back on the files (a pushed policy stays until the directory changes).
    let back_to_back = time_changes(program, 3 * changes + 1..=4 * changes, Duration::ZERO, rename_in, rename)?;
    let all_slot_waits = slot_waits(lab, daemon)?;
    let back_to_back_slot_waits = SlotWaits {
        applies: all_slot_waits.applies - spaced_slot_waits.applies,
        waited: all_slot_waits.waited - spaced_slot_waits.waited,
    };
    Ok(UpdateSeries { renames, pushes, session_pushes, back_to_back, spaced_slot_waits, back_to_back_slot_waits })
}

/// Of the daemon's applies so far, how many waited over a millisecond for
/// program runs still reading the slot they rewrote, from its metrics.
#[derive(Clone, Copy)]
struct SlotWaits {
    applies: u64,
    waited: u64,
}

fn slot_waits(lab: &ThreeTier, daemon: &Daemon) -> Result<SlotWaits, Error> {
    let (_, text) = lab::probe::http_get(&lab.router, daemon.metrics_addr, "/metrics")?;
    let value = |series: &str| -> Result<u64, Error> {
        let line = text
            .lines()
            .find(|line| line.starts_with(series))
            .ok_or_else(|| format!("no {series} in the daemon's metrics"))?;
        Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
    };
    let applies = value("bulkhead_policy_slot_wait_seconds_count ")?;
    let within = value("bulkhead_policy_slot_wait_seconds_bucket{le=\"0.001\"} ")?;
    Ok(SlotWaits { applies, waited: applies - within })
}

/// One-rule change latencies through the daemon, ms.
struct UpdateSeries {
    renames: Vec<f64>,
    pushes: Vec<f64>,
    session_pushes: Vec<f64>,
    back_to_back: Vec<f64>,
    /// Over the three spaced series.
    spaced_slot_waits: SlotWaits,
    back_to_back_slot_waits: SlotWaits,
}

/// Update latency through the real daemon (file renames and API pushes),
/// the large policy's load and one-rule change, and the footprint.
fn daemon_figures(changes: usize, big: usize) -> Result<DaemonFigures, Error> {
    let lab = ThreeTier::new("bench")?;
    let scratch = ScratchDir::new(&lab.stem)?;
    let dir = scratch.0.join("policy");
    let pki = scratch.0.join("pki");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(&pki)?;
    let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier.yaml"))?;
    let variant = |k: usize| example.replace("8080/tcp", &format!("{}/tcp", 8080 + k % 2));
    std::fs::write(dir.join("p.yaml"), variant(0))?;
    let (server_ca, client_ca) = (Ca::new("bench server CA"), Ca::new("bench client CA"));
    let ca_pem = server_ca.write_pem(&pki, "server-ca.pem")?;
    let client_ca_pem = client_ca.write_pem(&pki, "client-ca.pem")?;
    let (cert, key) = server_ca.issue(&pki, "server", "server", false)?;
    let (client_cert, client_key) = client_ca.issue(&pki, "operator", "bench-operator", false)?;
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let rule_room = (big + 16).to_string();
    let args = [
        "--events-to",
        "off",
        "--rule-map-size",
        &rule_room,
        "--api-addr",
        API,
        "--tls-cert",
        &path(&cert),
        "--tls-key",
        &path(&key),
        "--client-ca",
        &path(&client_ca_pem),
        "--api-role",
        "bench-operator=operator",
    ];
    let mut daemon = Daemon::start_with(&lab, &dir, &scratch.0.join("log"), &args)?;
    std::thread::sleep(Duration::from_secs(1));
    let pid = daemon.pid();
    let idle_kib = rss_kib(pid);
    let program = LiveProgram::attached_under(&lab.bpffs_root())?;
    let client = ClientFiles { ca: ca_pem, cert: client_cert, key: client_key, scratch: scratch.0.clone() };
    let updates = timed_updates(&lab, &daemon, &program, &dir, &client, changes, &variant)?;
    // The large policy, as YAML the daemon reads and watches. (A pushed
    // policy stays until the directory changes, which this rename does.)
    let policy = synthetic_policy(big);
    let limit = Duration::from_mins(3);
    // Probe: identity 0 to identity 1 on rule r0's port, which neither the
    // three-tier policy nor the large one before the change allows.
    let load = |port: u16, source_port: u16| -> Result<Duration, Error> {
        let text = policy_yaml(&policy, port);
        // A policy the daemon would reject would only show up as a timeout.
        policy::parse_str("big.yaml", &text).map_err(|e| format!("the synthetic policy is invalid: {e}"))?;
        std::fs::write(dir.join(".p.yaml.new"), text)?;
        let probe = syn(v4(0), v4(1), source_port, port);
        denied_before(&program, &probe)?;
        let started = Instant::now();
        std::fs::rename(dir.join(".p.yaml.new"), dir.join("p.yaml"))?;
        // Seconds-long loads need no finer than a millisecond.
        enforced_after(&program, &probe, started, limit, Duration::from_millis(1))
    };
    let big_load = load(1000, 30_000)?;
    let big_change = load(2999, 30_001)?;
    // The daemon logs where each apply's time went.
    std::thread::sleep(Duration::from_millis(200));
    let breakdown: Vec<String> = daemon
        .log_text()
        .lines()
        .filter(|l| l.contains(&format!("{big} identities")) && l.contains(" took "))
        .filter_map(|l| l.split(" took ").nth(1).map(str::to_owned))
        .collect();
    // After an apply the daemon records the new policy and then returns the
    // parse's memory to the kernel: read once the figure holds still.
    let mut loaded_kib = rss_kib(pid);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        let now = rss_kib(pid);
        if now == loaded_kib {
            break;
        }
        loaded_kib = now;
    }
    let maps = memlock(&lab.bpffs_root());
    daemon.stop()?;
    Ok(DaemonFigures { updates, big_load, big_change, breakdown, idle_kib, loaded_kib, maps })
}

#[allow(clippy::cast_precision_loss, clippy::cast_sign_loss, reason = "sample counts are small and p is in 0..=1")]
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn packets_md(md: &mut String, rows: &[Row], loads: &Loads) {
    let _ = writeln!(md, "### Per-packet cost (XDP, `BPF_PROG_TEST_RUN`, ns per packet; floor = empty XDP program)\n");
    let _ = writeln!(md, "| identities | family | class | ns | floor ns | × floor |\n|---:|---|---|---:|---:|---:|");
    for row in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.2} |",
            row.identities, row.family, row.class, row.ns, row.floor, row.ratio
        );
    }
    let _ = writeln!(
        md,
        "\n### Policy load (in process: compile + write + switch)\n\n| identities and rules | full load | of which compile | one-rule change on top |\n|---:|---:|---:|---:|"
    );
    for load in loads {
        let _ = writeln!(
            md,
            "| {} | {:.1} ms | {:.1} ms | {:.1} ms |",
            load.size,
            ms(load.full),
            ms(load.compile),
            ms(load.one_rule)
        );
    }
}

fn daemon_md(md: &mut String, figures: &DaemonFigures, big: usize) {
    let _ = writeln!(
        md,
        "\n### Policy update through the daemon (one-rule change → new generation enforced; changes {} ms apart unless back to back)\n\n| how | changes | p50 | p99 | max |\n|---|---:|---:|---:|---:|",
        CHANGE_GAP.as_millis()
    );
    for (how, samples) in [
        ("atomic rename of the policy file", &figures.updates.renames),
        ("`bulkhead policy push` (mTLS API, CLI start included)", &figures.updates.pushes),
        ("API push on an open mTLS connection (a controller's client)", &figures.updates.session_pushes),
        ("renames back to back (each as soon as the last is enforced)", &figures.updates.back_to_back),
    ] {
        let _ = writeln!(
            md,
            "| {how} | {} | {:.2} ms | {:.2} ms | {:.2} ms |",
            samples.len(),
            percentile(samples, 0.5),
            percentile(samples, 0.99),
            percentile(samples, 1.0)
        );
    }
    let (spaced, back_to_back) = (figures.updates.spaced_slot_waits, figures.updates.back_to_back_slot_waits);
    let _ = writeln!(
        md,
        "\nApplies that waited over 1 ms for program runs still reading the slot they rewrote (`bulkhead_policy_slot_wait_seconds`): {} of {} changes in the three spaced series, {} of {} back to back.",
        spaced.waited, spaced.applies, back_to_back.waited, back_to_back.applies
    );
    let _ = writeln!(
        md,
        "\n| {big} identities and rules, through the daemon | time |\n|---|---:|\n| full load (rename → enforced: parse, validate, compile, write, switch) | {:.0} ms |\n| one-rule change to it | {:.0} ms |",
        ms(figures.big_load),
        ms(figures.big_change)
    );
    for (what, line) in ["full load", "one-rule change"].iter().zip(&figures.breakdown) {
        let _ = writeln!(md, "\nThe daemon's log for the {what}: {line}.");
    }
    let _ = writeln!(
        md,
        "\n### Footprint\n\n| what | value |\n|---|---:|\n| daemon RSS, example policy | {} KiB |\n| daemon RSS, {big} identities and rules | {} KiB |",
        figures.idle_kib, figures.loaded_kib
    );
    for (map, bytes) in &figures.maps {
        let _ = writeln!(md, "| map `{map}` (memlock) | {} KiB |", bytes / 1024);
    }
}

fn traffic_md(md: &mut String, rows: &[traffic::TrafficRow]) {
    let _ = writeln!(
        md,
        "\n### Traffic through the kernel (64-byte UDP over veth, half allowed, {} kpps offered; trafgen on CPU 0, receiving stack on CPU 1; the median of the rounds)\n\n| rules | filter | sent kpps | passed kpps | dropped kpps | lost | receiver CPU ns/packet | receiver busy | sender busy | bottleneck |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
        traffic::OFFERED_PPS / 1000
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
        "\n### Each filter's own work on the receiving CPU (CPU 1 sampled by `perf` at {} Hz with call chains in more rounds; freeing dropped packets left out)\n\n| rules | filter | own CPU ns per packet (median) | round by round | samples in its own code, all rounds |\n|---:|---|---:|---|---:|",
        traffic::SAMPLING_HZ
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
    versus(md, rows, "own CPU ns per packet", traffic::TrafficRow::own_ns_rounds);
}

/// Bulkhead at TC ingress against nftables' set, round by round, so that a
/// lead can be told from the spread: each round ran every filter one after
/// another. `rounds` gives a row's figure for each round.
fn versus(
    md: &mut String,
    rows: &[traffic::TrafficRow],
    what: &str,
    rounds: impl Fn(&traffic::TrafficRow) -> Vec<f64>,
) {
    for rules in rows.iter().map(|r| r.rules).collect::<std::collections::BTreeSet<_>>() {
        let of = |filter| rows.iter().find(|r| r.rules == rules && r.filter == filter).map(&rounds);
        let (Some(ours), Some(theirs)) = (of(traffic::Filter::BulkheadTc), of(traffic::Filter::Nftables)) else {
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

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value_of = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let out =
        value_of("--out").map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"), PathBuf::from);
    std::fs::create_dir_all(&out)?;
    // For working on one part: `--only packets|daemon|traffic`, `--sizes 10,100000`,
    // and `--spin established` (see `per_packet`).
    let only = value_of("--only");
    let wanted = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let custom_sizes: Option<Vec<usize>> =
        value_of("--sizes").map(|list| list.split(',').filter_map(|n| n.parse().ok()).collect());
    let default_sizes: &[usize] = if quick { &[10, 10_000] } else { &[10, 1_000, 10_000, 100_000] };
    let sizes = custom_sizes.as_deref().unwrap_or(default_sizes);
    let started = Instant::now();

    let mut md = String::new();
    let mut json = serde_json::Map::new();
    json.insert("quick".into(), quick.into());
    if wanted("packets") {
        let (repeat, runs) = if quick { (200_000, 3) } else { (1_000_000, 9) };
        eprintln!(
            "bench: per-packet cost through BPF_PROG_TEST_RUN ({repeat} repeats, {runs} rounds of floor then program)"
        );
        let (rows, loads) = per_packet(sizes, repeat, runs, value_of("--spin").as_deref())?;
        packets_md(&mut md, &rows, &loads);
        json.insert("per_packet".into(), rows.iter().map(|r| serde_json::json!({"identities": r.identities, "family": r.family, "class": r.class, "ns": r.ns, "floor_ns": r.floor, "ratio_to_floor": r.ratio})).collect());
        json.insert("policy_load".into(), loads.iter().map(|l| serde_json::json!({"size": l.size, "full_ms": ms(l.full), "compile_ms": ms(l.compile), "one_rule_ms": ms(l.one_rule)})).collect());
    }
    if wanted("daemon") {
        let (changes, big) = if quick { (20, 10_000) } else { (100, 100_000) };
        eprintln!(
            "bench: policy updates through the daemon ({changes} renames, {changes} CLI pushes, {changes} pushes on an open connection, {changes} back-to-back renames, {big}-rule policy) and footprint"
        );
        let figures = daemon_figures(changes, big)?;
        daemon_md(&mut md, &figures, big);
        let series = |samples: &[f64]| serde_json::json!({"p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99), "samples": samples});
        let updates = &figures.updates;
        json.insert(
            "update_latency_ms".into(),
            serde_json::json!({
                "change_gap_ms": ms(CHANGE_GAP),
                "rename": series(&updates.renames),
                "push": series(&updates.pushes),
                "push_open_connection": series(&updates.session_pushes),
                "rename_back_to_back": series(&updates.back_to_back),
                "slot_waits_over_1ms": {
                    "spaced": {"applies": updates.spaced_slot_waits.applies, "waited": updates.spaced_slot_waits.waited},
                    "back_to_back": {"applies": updates.back_to_back_slot_waits.applies, "waited": updates.back_to_back_slot_waits.waited},
                },
            }),
        );
        json.insert("large_policy".into(), serde_json::json!({"size": big, "full_load_ms": ms(figures.big_load), "one_rule_change_ms": ms(figures.big_change), "daemon_breakdown": figures.breakdown}));
        json.insert("footprint".into(), serde_json::json!({"rss_idle_kib": figures.idle_kib, "rss_loaded_kib": figures.loaded_kib, "loaded_size": big, "maps_memlock_bytes": figures.maps.iter().cloned().collect::<BTreeMap<_, _>>()}));
    }
    if wanted("traffic") {
        let (seconds, rounds, profiled) = if quick { (2, 1, (1, 2)) } else { (5, 5, (3, 3)) };
        eprintln!(
            "bench: traffic through veth with trafgen ({rounds} rounds of {seconds} s per filter and size, then {} profiled of {} s)",
            profiled.0, profiled.1
        );
        let rows = traffic::run_all(&[1_000, 10_000], seconds, rounds, profiled)?;
        traffic_md(&mut md, &rows);
        json.insert("traffic".into(), rows.iter().map(|r| serde_json::json!({"rules": r.rules, "filter": r.filter.name(), "seconds": r.seconds, "sent": r.sent, "passed": r.passed, "filtered": r.filtered, "lost": r.lost, "receiver_ns_per_packet": r.receiver_ns, "receiver_busy": r.receiver_busy, "sender_busy": r.sender_busy, "bottleneck": r.bottleneck(), "round_receiver_ns": r.round_ns, "own_ns_per_packet": r.own_ns(), "profiled_rounds": r.profiles.iter().map(|p| serde_json::json!({"kernel_samples": p.samples, "own_samples": p.own, "packets": p.packets, "own_ns_per_packet": p.own_ns()})).collect::<Vec<_>>()})).collect());
    }
    let took = started.elapsed();
    let _ = writeln!(md, "\n_The run took {:.1} minutes._", took.as_secs_f64() / 60.0);
    json.insert("duration_s".into(), took.as_secs_f64().into());
    print!("{md}");
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&json)?)?;
    std::fs::write(out.join("results.md"), &md)?;
    // Only a whole run replaces the published table.
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
    if only.is_none()
        && custom_sizes.is_none()
        && let Ok(text) = std::fs::read_to_string(&doc)
        && let (Some(start), Some(end)) = (text.find("<!-- results:start -->"), text.find("<!-- results:end -->"))
    {
        let head = &text[..start + "<!-- results:start -->".len()];
        let mode = if quick { "`--quick` run" } else { "full run" };
        std::fs::write(&doc, format!("{head}\n\n_Latest {mode}._\n\n{md}\n{}", &text[end..]))?;
    }
    eprintln!("bench: results in {}", out.display());
    Ok(())
}
