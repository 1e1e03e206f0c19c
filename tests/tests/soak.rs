//! The soak: real traffic through the namespace topology for minutes while
//! policies flip (through the policy directory and the admin API, alone and
//! in bursts), identities churn with them, interfaces and whole namespaces
//! come and go, the daemon is killed (SIGKILL) at random moments and started again
//! on the same pins and state, and API clients with good and bad
//! certificates call in. Asserted throughout: no packet judged by a mixed
//! policy, no allowed connection lost (README, *Restarts and upgrades*: the
//! programs keep enforcing while the daemon is down, and a restarted daemon
//! adopts the pinned maps, conntrack included), no denied packet passed,
//! the daemon's memory and descriptors flat, no panic in any log.
//!
//! `BULKHEAD_SOAK_MINUTES` (fractional allowed) sets the length; the
//! default is the short slice `cargo xtask test` runs, `cargo xtask soak`
//! a long one. `BULKHEAD_SOAK_SEED` repeats a run's random choices. Needs
//! root; run through `cargo xtask test` or `cargo xtask soak`.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use lab::pki::ApiPki;
use lab::probe::{self, EchoServer, Outcome, TcpSession};
use lab::rng::Rng;
use lab::{Daemon, Netns, ScratchDir, ThreeTier};

/// The short slice `cargo xtask test` runs, in minutes: long enough for
/// several restarts and every kind of churn, short enough to keep the
/// whole test run near its half hour.
const DEFAULT_MINUTES: f64 = 1.5;

const API: &str = "127.0.0.1:9443";
const METRICS: &str = "127.0.0.1:9090";

/// The hosts behind the router. `db` serves every probed port; `guest`
/// only has an identity under policy B; `spare`'s veth is deleted and
/// re-created while the daemon runs and while it is down. Namespaces
/// created and removed during the soak get 10.0.6.10 behind `to-xN`.
const HOSTS: [(&str, [u8; 3]); 6] = [
    ("gateway", [10, 0, 1]),
    ("logic", [10, 0, 2]),
    ("db", [10, 0, 3]),
    ("guest", [10, 0, 4]),
    ("spare", [10, 0, 5]),
    ("outsider", [10, 0, 9]),
];

/// Router-side interfaces with no churn namespace present.
const STABLE_INTERFACES: u64 = HOSTS.len() as u64;

/// Under A the gateway (10.0.1.10) is `web`, which may reach port 8080,
/// and logic (10.0.2.10) is `app`, which may not; the outsider is `tmp`,
/// which may reach 22. `edge` (spare and the churned namespaces) may reach
/// 8080 under every policy. The destination, db, is `world` throughout.
const A: &str = r#"apiVersion: bulkhead/v1
kind: SegmentPolicy
metadata: {name: soak}
spec:
  identities:
    - {name: web, addresses: ["10.0.1.10"]}
    - {name: app, addresses: ["10.0.2.10"]}
    - {name: tmp, addresses: ["10.0.9.10"]}
    - {name: edge, addresses: ["10.0.5.10", "10.0.6.0/24"]}
  rules:
    - {name: web-8080, from: [{identity: web}], to: [{identity: world}], ports: ["8080/tcp"]}
    - {name: app-8080, action: deny, from: [{identity: app}], to: [{identity: world}], ports: ["8080/tcp"]}
    - {name: tmp-22, from: [{identity: tmp}], to: [{identity: world}], ports: ["22/tcp"]}
    - {name: edge-8080, from: [{identity: edge}], to: [{identity: world}], ports: ["8080/tcp"]}
"#;

/// Under B the gateway's address has moved to `app`, and the two 8080
/// rules have swapped actions: the gateway may still reach 8080, but a
/// packet judged by A's identities and B's rules, or B's identities and
/// A's rules, is dropped. `tmp` and its rule are revoked together and
/// `guest` (10.0.4.10) appears: were it given `tmp`'s number while `tmp`'s
/// entries lingered, it would reach 22. Logic may reach 8080 now, the
/// outsider no longer 22.
const B: &str = r#"apiVersion: bulkhead/v1
kind: SegmentPolicy
metadata: {name: soak}
spec:
  identities:
    - {name: web, addresses: ["10.0.7.10"]}
    - {name: app, addresses: ["10.0.1.10", "10.0.2.10"]}
    - {name: guest, addresses: ["10.0.4.10"]}
    - {name: edge, addresses: ["10.0.5.10", "10.0.6.0/24"]}
  rules:
    - {name: web-8080, action: deny, from: [{identity: web}], to: [{identity: world}], ports: ["8080/tcp"]}
    - {name: app-8080, from: [{identity: app}], to: [{identity: world}], ports: ["8080/tcp"]}
    - {name: edge-8080, from: [{identity: edge}], to: [{identity: world}], ports: ["8080/tcp"]}
"#;

/// C is B without `guest`: one single-address identity removed, which the
/// daemon writes into the live slot (B ↔ C), not by a switch of slots.
const C: &str = r#"apiVersion: bulkhead/v1
kind: SegmentPolicy
metadata: {name: soak}
spec:
  identities:
    - {name: web, addresses: ["10.0.7.10"]}
    - {name: app, addresses: ["10.0.1.10", "10.0.2.10"]}
    - {name: edge, addresses: ["10.0.5.10", "10.0.6.0/24"]}
  rules:
    - {name: web-8080, action: deny, from: [{identity: web}], to: [{identity: world}], ports: ["8080/tcp"]}
    - {name: app-8080, from: [{identity: app}], to: [{identity: world}], ports: ["8080/tcp"]}
    - {name: edge-8080, from: [{identity: edge}], to: [{identity: world}], ports: ["8080/tcp"]}
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    A,
    B,
    C,
}

impl Policy {
    const ALL: [Self; 3] = [Self::A, Self::B, Self::C];

    fn yaml(self) -> &'static str {
        match self {
            Self::A => A,
            Self::B => B,
            Self::C => C,
        }
    }

    /// The file's text for flip `flip`: a comment makes every text
    /// written unique, so the daemon's `GET /v1/policy` tells which one it
    /// enforces.
    fn text(self, flip: u64) -> String {
        format!("# soak flip {flip}: policy {self:?}\n{}", self.yaml())
    }

    /// What logic → db:8080 and outsider → db:22 see under this policy:
    /// the probes whose verdict differs between policies.
    fn swings(self) -> [Outcome; 2] {
        match self {
            Self::A => [Outcome::TimedOut, Outcome::Connected],
            Self::B | Self::C => [Outcome::Connected, Outcome::TimedOut],
        }
    }
}

/// What the soak did and saw, counted by the threads doing it.
#[derive(Default)]
struct Tally {
    /// New connections gateway → db:8080 made and echoed.
    allowed: AtomicU64,
    /// Denied probes dropped (never connected).
    denied: AtomicU64,
    /// Probes whose verdict differs by policy: connected, dropped.
    swing_passed: AtomicU64,
    swing_dropped: AtomicU64,
    /// Round trips on the one long-lived connection.
    exchanges: AtomicU64,
    /// Probes from a re-created interface or a new namespace.
    churn_probes: AtomicU64,
    /// API calls with a good certificate answered; with a bad one refused
    /// at the handshake; without a role (or a viewer pushing) answered 403;
    /// unanswered because the daemon was restarting meanwhile.
    api_answered: AtomicU64,
    api_refused: AtomicU64,
    api_forbidden: AtomicU64,
    api_unanswered: AtomicU64,
    flips_written: AtomicU64,
    flips_pushed: AtomicU64,
    bursts: AtomicU64,
    restarts: AtomicU64,
    kills_mid_flip: AtomicU64,
    interface_cycles: AtomicU64,
    namespace_cycles: AtomicU64,
}

impl Tally {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One sample of the daemon's footprint.
#[derive(Debug, Clone, Copy)]
struct Sample {
    incarnation: u64,
    /// Since this incarnation answered.
    age: Duration,
    rss_kib: u64,
    fds: u64,
    /// Tracked connection entries in the pinned conntrack table, which
    /// outlives every incarnation (`bulkhead_conntrack_entries`).
    conntrack: u64,
}

/// The daemon running now.
#[derive(Clone, Copy)]
struct Running {
    incarnation: u64,
    pid: u32,
    since: Instant,
}

struct Soak {
    /// Declared first, dropped first: servers, then the daemon (SIGTERM;
    /// its programs stay pinned), then the scratch directory, then the lab,
    /// whose drop unpins everything and deletes the namespaces.
    _servers: Vec<EchoServer>,
    daemon: Mutex<Daemon>,
    scratch: ScratchDir,
    lab: ThreeTier,
    policy_dir: PathBuf,
    pki: PathBuf,
    ca_pem: PathBuf,
    args: Vec<String>,
    /// Even while a daemon that answers runs; odd from just before a kill
    /// until its successor answers. A call that began and ended in the
    /// same even epoch had a daemon the whole time.
    epoch: AtomicU64,
    running: Mutex<Option<Running>>,
    logs: Mutex<Vec<PathBuf>>,
    stop: AtomicBool,
    started: Instant,
    tally: Tally,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sets its flag when dropped, unwinding included: a failed assertion in
/// any thread stops the others, so the scope ends and the lab is removed.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A policy other than `not`.
fn policy_other_than(rng: &mut Rng, not: Policy) -> Policy {
    let others: Vec<Policy> = Policy::ALL.into_iter().filter(|&p| p != not).collect();
    *rng.pick(&others)
}

fn soak_length() -> Duration {
    let minutes = std::env::var("BULKHEAD_SOAK_MINUTES")
        .ok()
        .map_or(DEFAULT_MINUTES, |text| text.parse().expect("BULKHEAD_SOAK_MINUTES is a number of minutes"));
    assert!(minutes > 0.0, "BULKHEAD_SOAK_MINUTES must be positive");
    Duration::from_secs_f64(minutes * 60.0)
}

fn seed() -> u64 {
    std::env::var("BULKHEAD_SOAK_SEED").ok().map_or_else(
        || SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1,
        |text| text.parse().expect("BULKHEAD_SOAK_SEED is a number"),
    )
}

fn db(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 3, 10)), port)
}

fn write_atomically(dir: &Path, name: &str, text: &str) {
    let hidden = dir.join(format!(".{name}.new"));
    std::fs::write(&hidden, text).unwrap();
    std::fs::rename(&hidden, dir.join(name)).unwrap();
}

impl Soak {
    fn new() -> Self {
        let lab = ThreeTier::with_hosts("soak", &HOSTS).unwrap();
        let scratch = ScratchDir::new(&lab.stem).unwrap();
        let (pki, policy_dir) = (scratch.0.join("pki"), scratch.0.join("policy"));
        std::fs::create_dir_all(&pki).unwrap();
        std::fs::create_dir_all(&policy_dir).unwrap();
        write_atomically(&policy_dir, "p.yaml", &Policy::A.text(0));
        let api_pki = ApiPki::issue(&pki).unwrap();
        let mut args: Vec<String> = vec!["--policy-dir".into(), policy_dir.display().to_string()];
        args.extend(["--interface".into(), "to-*".into(), "--api-addr".into(), API.into()]);
        args.extend(api_pki.daemon_args());
        let ca_pem = api_pki.ca_pem;
        let log = scratch.0.join("daemon-0.log");
        let daemon = Daemon::spawn(&lab, &args, &log).unwrap();
        let servers = vec![EchoServer::start(&lab.host("db").ns, &[db(0).ip()], &[22, 5432, 8080, 8081], &[]).unwrap()];
        let pid = daemon.pid();
        let soak = Self {
            _servers: servers,
            daemon: Mutex::new(daemon),
            scratch,
            lab,
            policy_dir,
            pki,
            ca_pem,
            args,
            epoch: AtomicU64::new(1),
            running: Mutex::new(None),
            logs: Mutex::new(vec![log]),
            stop: AtomicBool::new(false),
            started: Instant::now(),
            tally: Tally::default(),
        };
        lock(&soak.daemon).wait_ready(&soak.lab.router).unwrap();
        soak.wait_for_api();
        soak.came_up(0, pid);
        soak
    }

    /// How far into the soak, for messages.
    fn at(&self) -> String {
        format!("at {:.1} s (epoch {})", self.started.elapsed().as_secs_f64(), self.epoch.load(Ordering::SeqCst))
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Fails the soak with `what`, showing the end of the daemons' logs
    /// (the lab and its logs are removed as the failure unwinds).
    fn fail(&self, what: &str) -> ! {
        self.stop.store(true, Ordering::Relaxed);
        let logs = lock(&self.logs).clone();
        for log in logs.iter().rev().take(2).rev() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            // Drop events (JSON lines) would fill the tail.
            let lines: Vec<&str> = text.lines().filter(|line| !line.starts_with('{')).collect();
            eprintln!("last lines of {} (drop events left out):", log.display());
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("| {line}");
            }
        }
        panic!("{what} {}", self.at());
    }

    /// One request on a fresh mutual-TLS connection as client `who`:
    /// (status, body), status 0 if no HTTP answer came (refused at the
    /// handshake, or no daemon listening).
    fn request(&self, who: &str, method: &str, path: &str, body: &str) -> (u16, String) {
        let (cert, key) = (self.pki.join(format!("{who}.pem")), self.pki.join(format!("{who}.key")));
        let config = enforcer::tls::client_config(&self.ca_pem, &cert, &key).unwrap();
        let content_type = (!body.is_empty()).then_some("application/json");
        let request = probe::HttpsRequest { host: API, method, path, content_type, body };
        self.lab
            .router
            .enter(|| match TcpStream::connect_timeout(&API.parse().unwrap(), Duration::from_secs(2)) {
                Ok(tcp) => probe::https_exchange(tcp, config, &request),
                Err(_) => (0, String::new()),
            })
            .unwrap()
    }

    /// The metrics endpoint's `sample`, if the daemon answers.
    fn metric(&self, sample: &str) -> Option<u64> {
        let (_, body) = probe::http_get(&self.lab.router, METRICS.parse().unwrap(), "/metrics").ok()?;
        probe::metric(&body, sample)
    }

    /// Waits until the admin API answers a viewer: `/readyz` may answer
    /// before the API's listener is bound.
    fn wait_for_api(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.request("viewer", "GET", "/v1/status", "").0 != 200 {
            if Instant::now() > deadline {
                self.fail("the admin API did not answer within 30 s of /readyz");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn came_up(&self, incarnation: u64, pid: u32) {
        *lock(&self.running) = Some(Running { incarnation, pid, since: Instant::now() });
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(epoch.is_multiple_of(2), "up epochs are even");
    }

    fn going_down(&self) {
        *lock(&self.running) = None;
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(!epoch.is_multiple_of(2), "down epochs are odd");
    }

    /// Waits until the daemon has XDP on `count` interfaces.
    fn wait_for_interfaces(&self, count: u64, why: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.metric("bulkhead_interfaces{hook=\"xdp\"}") != Some(count) {
            if Instant::now() > deadline {
                let now = self.metric("bulkhead_interfaces{hook=\"xdp\"}");
                self.fail(&format!("{why}: XDP on {now:?} interfaces, never {count}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Entries under the lab's bpffs root (maps and links).
    fn pins(&self) -> usize {
        ["maps", "links"]
            .iter()
            .map(|dir| std::fs::read_dir(self.lab.bpffs_root().join(dir)).map_or(0, Iterator::count))
            .sum()
    }
}

/// Connects from the calling thread's namespace to `to` within `timeout`.
fn connect(to: SocketAddr, timeout: Duration) -> Result<TcpStream, Outcome> {
    match TcpStream::connect_timeout(&to, timeout) {
        Ok(stream) => Ok(stream),
        Err(error) if error.kind() == std::io::ErrorKind::TimedOut => Err(Outcome::TimedOut),
        Err(error) => Err(Outcome::Failed(format!("connect: {error}"))),
    }
}

/// One line echoed on `stream`.
fn echo(stream: &TcpStream, line: &str) -> Outcome {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    if let Err(error) = (&*stream).write_all(format!("{line}\n").as_bytes()) {
        return Outcome::Failed(format!("write: {error}"));
    }
    let mut reply = String::new();
    match BufReader::new(stream).read_line(&mut reply) {
        Ok(_) if reply == format!("echo {line}\n") => Outcome::Connected,
        Ok(_) => Outcome::Failed(format!("echo {reply:?}")),
        Err(error) => Outcome::Failed(format!("read: {error}")),
    }
}

/// What a probe thread expects of its connections.
#[derive(Clone, Copy)]
enum Expect {
    /// Allowed by every policy, and only by a whole one: connects within
    /// the probe's timeout (shorter than TCP's 1 s SYN retransmission, so
    /// one dropped SYN shows) and echoes.
    Allowed,
    /// Denied by every policy: never connects.
    Denied,
    /// Allowed by some policies: connects or is dropped, nothing else.
    Swing,
}

/// New connections from host `from` to db:`port` in a loop, each judged
/// afresh by the policy (a bare SYN asks the policy first), for the whole
/// soak, restarts included.
fn probe_loop(soak: &Soak, from: &str, port: u16, expect: Expect) {
    soak.lab
        .host(from)
        .ns
        .enter(|| {
            let _stop = StopOnDrop(&soak.stop);
            let mut round = 0u64;
            while !soak.stopped() {
                round += 1;
                match expect {
                    Expect::Allowed => match connect(db(port), probe::BLOCKED_AFTER) {
                        Ok(stream) => match echo(&stream, &format!("soak {round}")) {
                            Outcome::Connected => Tally::add(&soak.tally.allowed),
                            other => soak.fail(&format!("{from} -> db:{port} (allowed) connected, then {other:?}")),
                        },
                        Err(outcome) => soak.fail(&format!("{from} -> db:{port} (allowed): {outcome:?}")),
                    },
                    // A SYN that passes is answered in well under 200 ms.
                    Expect::Denied => match connect(db(port), Duration::from_millis(200)) {
                        Err(Outcome::TimedOut) => Tally::add(&soak.tally.denied),
                        Ok(_) => soak.fail(&format!("{from} -> db:{port} (denied) connected")),
                        Err(other) => soak.fail(&format!("{from} -> db:{port} (denied): {other:?}")),
                    },
                    Expect::Swing => match connect(db(port), Duration::from_millis(200)) {
                        Ok(_) => Tally::add(&soak.tally.swing_passed),
                        Err(Outcome::TimedOut) => Tally::add(&soak.tally.swing_dropped),
                        Err(other) => soak.fail(&format!("{from} -> db:{port}: {other:?}")),
                    },
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .unwrap();
}

/// One connection gateway → db:8080 kept open for the whole soak, a line
/// echoed every 200 ms: it must live through every flip (each whole
/// policy allows it), every restart (conntrack is adopted) and every churn.
fn session_loop(soak: &Soak) {
    let _stop = StopOnDrop(&soak.stop);
    let mut session = match TcpSession::connect(&soak.lab.host("gateway").ns, db(8080)).unwrap() {
        Ok(session) => session,
        Err(outcome) => soak.fail(&format!("the long-lived connection could not open: {outcome:?}")),
    };
    let mut round = 0u64;
    while !soak.stopped() {
        round += 1;
        match session.exchange(&format!("long-lived {round}"), Duration::from_secs(4)) {
            Outcome::Connected => Tally::add(&soak.tally.exchanges),
            other => soak.fail(&format!("the long-lived connection was lost at round {round}: {other:?}")),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// API clients in a loop: viewer and operator read the status; an expired
/// certificate and one from another CA are refused at the handshake, even
/// while the daemon restarts; a certificate without a role, and a viewer
/// pushing, get 403.
fn api_loop(soak: &Soak) {
    let _stop = StopOnDrop(&soak.stop);
    let calls = [
        ("viewer", "GET", "/v1/status", 200),
        ("expired", "GET", "/v1/status", 0),
        ("operator", "GET", "/v1/policy", 200),
        ("untrusted", "GET", "/v1/status", 0),
        ("norole", "GET", "/v1/status", 403),
        ("viewer", "POST", "/v1/policy", 403),
        ("untrusted", "POST", "/v1/policy", 0),
        ("operator", "GET", "/v1/status", 200),
    ];
    let push = serde_json::json!({"files": [{"name": "p.yaml", "text": A}]}).to_string();
    for (who, method, path, expected) in calls.iter().cycle() {
        if soak.stopped() {
            break;
        }
        let body = if *method == "POST" { push.as_str() } else { "" };
        let before = soak.epoch.load(Ordering::SeqCst);
        let (status, _) = soak.request(who, method, path, body);
        let after = soak.epoch.load(Ordering::SeqCst);
        let up_throughout = before == after && before.is_multiple_of(2);
        let tally = &soak.tally;
        match (*expected, status) {
            (_, 0) if !up_throughout => Tally::add(&tally.api_unanswered),
            (0, 0) => Tally::add(&tally.api_refused),
            (403, 403) => Tally::add(&tally.api_forbidden),
            (200, 200) => Tally::add(&tally.api_answered),
            _ => soak.fail(&format!("{who} {method} {path}: {status}, expected {expected}")),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The daemon's footprint every half second, each sample tagged with the
/// incarnation it was read from (a sample straddling a kill is dropped).
fn sample_loop(soak: &Soak) -> Vec<Sample> {
    let _stop = StopOnDrop(&soak.stop);
    let mut samples = Vec::new();
    while !soak.stopped() {
        std::thread::sleep(Duration::from_millis(500));
        let Some(running) = *lock(&soak.running) else { continue };
        let status = std::fs::read_to_string(format!("/proc/{}/status", running.pid)).unwrap_or_default();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
        let fds = std::fs::read_dir(format!("/proc/{}/fd", running.pid)).map(Iterator::count);
        let conntrack = soak.metric("bulkhead_conntrack_entries");
        let still = lock(&soak.running).is_some_and(|now| now.incarnation == running.incarnation);
        if let (Some(rss_kib), Ok(fds), Some(conntrack), true) = (rss, fds, conntrack, still) {
            let age = running.since.elapsed();
            samples.push(Sample { incarnation: running.incarnation, age, rss_kib, fds: fds as u64, conntrack });
        }
    }
    samples
}

/// The chaos side: what the policy directory holds, what the daemon
/// enforces, and the generation it last reported.
struct Chaos<'a> {
    soak: &'a Soak,
    rng: Rng,
    flip: u64,
    dir: (Policy, String),
    enforced: (Policy, String),
    generation: u64,
    namespaces: u64,
}

#[derive(Debug, Clone, Copy)]
enum Action {
    /// A new policy written to the directory.
    File,
    /// Several written back to back, 5–120 ms apart.
    Burst,
    /// A new policy pushed by an operator through the API.
    Push,
    /// `to-spare` deleted, forgotten, re-created (a new ifindex), attached.
    Interface,
    /// A new namespace behind a new interface, attached, probed, removed.
    Namespace,
    /// SIGKILL at a quiet moment, or just after a policy was written (mid
    /// apply, perhaps); sometimes `to-spare` is re-created while down.
    Restart { mid_flip: bool },
}

impl Chaos<'_> {
    fn next_text(&mut self, policy: Policy) -> String {
        self.flip += 1;
        policy.text(self.flip)
    }

    fn write(&mut self, policy: Policy) {
        let text = self.next_text(policy);
        write_atomically(&self.soak.policy_dir, "p.yaml", &text);
        self.dir = (policy, text);
        Tally::add(&self.soak.tally.flips_written);
    }

    fn run(&mut self, action: Action) {
        let soak = self.soak;
        match action {
            Action::File => {
                let next = policy_other_than(&mut self.rng, self.enforced.0);
                self.write(next);
                self.enforced = self.dir.clone();
                self.settle("a policy written to the directory");
            }
            Action::Burst => {
                for _ in 0..3 + self.rng.below(10) {
                    let next = policy_other_than(&mut self.rng, self.dir.0);
                    self.write(next);
                    std::thread::sleep(self.rng.millis(5, 120));
                }
                self.enforced = self.dir.clone();
                Tally::add(&soak.tally.bursts);
                self.settle("the last of a burst of policies");
            }
            Action::Push => self.push(),
            Action::Interface => self.interface(),
            Action::Namespace => self.namespace(),
            Action::Restart { mid_flip } => self.restart(mid_flip),
        }
    }

    fn push(&mut self) {
        let policy = policy_other_than(&mut self.rng, self.enforced.0);
        let text = self.next_text(policy);
        let body = serde_json::json!({"files": [{"name": "p.yaml", "text": text}]}).to_string();
        let (status, answer) = self.soak.request("operator", "POST", "/v1/policy", &body);
        if status != 200 {
            self.soak.fail(&format!("an operator's push: {status} {answer}"));
        }
        Tally::add(&self.soak.tally.flips_pushed);
        self.enforced = (policy, text);
        self.settle("a policy pushed through the API");
    }

    /// Waits until the daemon enforces exactly the expected text, checks
    /// the generation moved on, and that the probes whose verdict differs
    /// by policy see the expected one.
    fn settle(&mut self, what: &str) {
        let soak = self.soak;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = soak.request("viewer", "GET", "/v1/policy", "");
            let files: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let texts: Vec<&str> =
                files["files"].as_array().into_iter().flatten().filter_map(|f| f["text"].as_str()).collect();
            if status == 200 && texts == [self.enforced.1.as_str()] {
                break;
            }
            if Instant::now() > deadline {
                soak.fail(&format!("{what} was not enforced within 20 s ({status}, enforcing {texts:?})"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (_, body) = soak.request("viewer", "GET", "/v1/status", "");
        let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let Some(generation) = status["generation"].as_u64() else { soak.fail(&format!("no generation in {body}")) };
        if generation <= self.generation {
            soak.fail(&format!("{what}: generation {generation} after {}", self.generation));
        }
        self.generation = generation;
        let (logic, outsider) = (&soak.lab.host("logic").ns, &soak.lab.host("outsider").ns);
        let seen = probe::all_at_once(&[(logic, db(8080)), (outsider, db(22))], false).unwrap();
        let expected = self.enforced.0.swings();
        if seen != expected {
            soak.fail(&format!("{what}: policy {:?} enforced, yet logic -> db:8080 and outsider -> db:22 saw {seen:?}, not {expected:?}", self.enforced.0));
        }
    }

    /// `from` reaches db:8080 (edge may) and not db:8081.
    fn probe_edge(&self, from: &Netns, what: &str) {
        let seen = probe::all_at_once(&[(from, db(8080)), (from, db(8081))], false).unwrap();
        if seen != [Outcome::Connected, Outcome::TimedOut] {
            self.soak.fail(&format!("{what}: db:8080 and db:8081 saw {seen:?}"));
        }
        self.soak.tally.churn_probes.fetch_add(2, Ordering::Relaxed);
    }

    fn interface(&mut self) {
        let soak = self.soak;
        soak.lab.router.ip(&["link", "del", "to-spare"]).unwrap();
        soak.wait_for_interfaces(STABLE_INTERFACES - 1, "to-spare deleted");
        soak.lab.rewire("spare").unwrap();
        soak.wait_for_interfaces(STABLE_INTERFACES, "to-spare re-created");
        self.probe_edge(&soak.lab.host("spare").ns, "through the re-created to-spare");
        Tally::add(&soak.tally.interface_cycles);
    }

    fn namespace(&mut self) {
        let soak = self.soak;
        self.namespaces += 1;
        let ns = Netns::new(&format!("{}-x{}", soak.lab.stem, self.namespaces)).unwrap();
        let interface = format!("to-x{}", self.namespaces);
        soak.lab
            .router
            .ip(&["link", "add", &interface, "type", "veth", "peer", "name", "eth0", "netns", ns.name()])
            .unwrap();
        soak.lab.router.ip(&["addr", "add", "10.0.6.1/24", "dev", &interface]).unwrap();
        ns.ip(&["addr", "add", "10.0.6.10/24", "dev", "eth0"]).unwrap();
        soak.lab.router.ip(&["link", "set", &interface, "up"]).unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
        ns.ip(&["route", "add", "default", "via", "10.0.6.1"]).unwrap();
        soak.wait_for_interfaces(STABLE_INTERFACES + 1, &format!("{interface} added"));
        self.probe_edge(&ns, &format!("from a new namespace behind {interface}"));
        drop(ns);
        soak.wait_for_interfaces(STABLE_INTERFACES, &format!("{interface}'s namespace removed"));
        Tally::add(&soak.tally.namespace_cycles);
    }

    fn restart(&mut self, mid_flip: bool) {
        let soak = self.soak;
        let before = self.generation;
        let mut daemon = lock(&soak.daemon);
        if mid_flip {
            let next = policy_other_than(&mut self.rng, self.dir.0);
            self.write(next);
            std::thread::sleep(self.rng.millis(0, 150));
            Tally::add(&soak.tally.kills_mid_flip);
        }
        soak.going_down();
        daemon.kill();
        let rewired = self.rng.one_in(3);
        if rewired {
            // No daemon watches: the new veth carries no program until one
            // starts (README, *Node churn*), so nothing probes through it.
            soak.lab.rewire("spare").unwrap();
        }
        // The traffic threads keep probing: the pinned programs enforce.
        std::thread::sleep(self.rng.millis(200, 2500));
        let incarnation = Tally::get(&soak.tally.restarts) + 1;
        let log = soak.scratch.0.join(format!("daemon-{incarnation}.log"));
        lock(&soak.logs).push(log.clone());
        *daemon = Daemon::spawn(&soak.lab, &soak.args, &log).unwrap();
        if let Err(error) = daemon.wait_ready(&soak.lab.router) {
            soak.fail(&format!("the restarted daemon: {error}"));
        }
        soak.wait_for_api();
        soak.came_up(incarnation, daemon.pid());
        drop(daemon);
        Tally::add(&soak.tally.restarts);
        let text = std::fs::read_to_string(&log).unwrap();
        if !text.contains("adopted enforcement state") {
            soak.fail("the restarted daemon did not adopt the pinned state");
        }
        if rewired && !text.contains("no longer exists") {
            soak.fail("the restarted daemon did not repair the pins of the re-created to-spare");
        }
        // A push does not outlive the daemon: the directory is what it reads.
        self.enforced = self.dir.clone();
        self.settle("the policy directory after a restart");
        assert!(self.generation > before);
        if rewired {
            soak.wait_for_interfaces(STABLE_INTERFACES, "after the restart");
            self.probe_edge(&soak.lab.host("spare").ns, "through to-spare, re-created while the daemon was down");
            Tally::add(&soak.tally.interface_cycles);
        }
    }

    /// Runs every kind of action in a shuffled order, round after round,
    /// a random pause between, until `until`; restarts only before
    /// `restarts_until`, so the last incarnation runs long enough to show
    /// whether its footprint is flat.
    fn run_until(&mut self, until: Instant, restarts_until: Instant) {
        while Instant::now() < until && !self.soak.stopped() {
            let mut actions = vec![Action::File, Action::Burst, Action::Push, Action::Interface, Action::Namespace];
            if Instant::now() < restarts_until {
                actions.push(Action::Restart { mid_flip: self.rng.one_in(2) });
            }
            self.rng.shuffle(&mut actions);
            for action in actions {
                if Instant::now() >= until || self.soak.stopped() {
                    break;
                }
                if matches!(action, Action::Restart { .. }) && Instant::now() >= restarts_until {
                    continue;
                }
                self.run(action);
                std::thread::sleep(self.rng.millis(0, 500));
            }
        }
    }
}

/// The policies' premise, as `atomic.rs` checks it: a flip between A and
/// B changes identity entries and policy entries together, so a packet
/// judged by half of one would show; C is B less one identity.
fn check_premise() {
    let parse = |policy: Policy| policy::parse_str("p.yaml", &policy.text(0)).unwrap();
    let whole = |policy: Policy| {
        vec![policy::SourceChange { source: "p.yaml".into(), contents: policy::Contents::Parsed(parse(policy)) }]
    };
    let mut engine = policy::Engine::new();
    engine.apply(whole(Policy::A), SystemTime::now()).unwrap();
    let a_to_b = engine.apply(whole(Policy::B), SystemTime::now()).unwrap();
    assert!(!a_to_b.identities.is_empty() && !a_to_b.policy.is_empty(), "{a_to_b:?}");
    engine.commit();
    let b_to_c = engine.apply(whole(Policy::C), SystemTime::now()).unwrap();
    assert!(!b_to_c.identities.is_empty(), "{b_to_c:?}");
}

/// Samples this long after an incarnation answered are compared: before,
/// it is still loading programs, filling maps and opening its servers.
const WARM_UP: Duration = Duration::from_secs(5);

/// Descriptors the daemon may hold beyond its steady set at a sample: the
/// soak's own clients have at most one connection open each to the API
/// (the API thread, the chaos thread) and to /metrics (the chaos thread),
/// and the daemon briefly opens policy files, netlink sockets and /proc.
const FD_SLACK: u64 = 8;

/// How much the resident set may rise in the last third of the long
/// incarnation over its first third, and differ between incarnations at
/// the same age: allocator high-water marks move by a few MiB with TLS
/// handshakes and policy parses, while a leak per request, flip, packet
/// event, interface or tracked connection grows with the soak's length.
/// (The conntrack table, pinned and adopted by every incarnation, fills
/// with the soak's connections; the daemon once read it whole into a
/// vector to count it, and its resident set grew with the table. It
/// counts without keeping now, and the soak prints the table's size beside
/// the resident set.)
const RSS_SLACK_KIB: u64 = 4096;

fn max_of(samples: &[Sample], field: fn(&Sample) -> u64) -> u64 {
    samples.iter().map(field).max().unwrap_or(0)
}

/// The footprint flat within the last (longest) incarnation, first third
/// against last third (like with like: one process), and the descriptors
/// the same in every incarnation at the same age. Returns the lines to
/// print; the assertions come after the summary is printed.
fn footprint(samples: &[Sample]) -> (Vec<String>, Vec<(bool, &'static str)>) {
    let warm: Vec<Sample> = samples.iter().copied().filter(|s| s.age >= WARM_UP).collect();
    let last_incarnation = warm.last().expect("footprint samples").incarnation;
    let steady: Vec<Sample> = warm.iter().copied().filter(|s| s.incarnation == last_incarnation).collect();
    assert!(steady.len() >= 9, "only {} samples of the last incarnation: the soak is too short to judge", steady.len());
    let third = steady.len() / 3;
    let (first, end) = (&steady[..third], &steady[steady.len() - third..]);
    let rss = |s: &Sample| s.rss_kib;
    let fds = |s: &Sample| s.fds;
    let (head, tail) = (steady[0], steady[steady.len() - 1]);
    let mut lines = vec![format!(
        "last incarnation ({} samples over {:.0} s): RSS {} KiB first, {} KiB last, max {} KiB in the first third and {} KiB in the last; fds {} first, {} last, max {} then {}; conntrack entries {} first, {} last",
        steady.len(),
        tail.age.saturating_sub(head.age).as_secs_f64(),
        head.rss_kib,
        tail.rss_kib,
        max_of(first, rss),
        max_of(end, rss),
        head.fds,
        tail.fds,
        max_of(first, fds),
        max_of(end, fds),
        head.conntrack,
        tail.conntrack
    )];
    // Across restarts, each incarnation's first sample past its warm-up,
    // shown beside the conntrack table's entries: every incarnation adopts
    // that table, which keeps filling (closed connections' entries stay
    // until evicted).
    let mut at_warm_up: Vec<Sample> = Vec::new();
    for sample in &warm {
        if at_warm_up.last().is_none_or(|s| s.incarnation != sample.incarnation) {
            at_warm_up.push(*sample);
        }
    }
    let list =
        |field: fn(&Sample) -> u64| at_warm_up.iter().map(|s| field(s).to_string()).collect::<Vec<_>>().join(", ");
    lines.push(format!("RSS (KiB) of each incarnation {} s after it answered: {}", WARM_UP.as_secs(), list(rss)));
    lines.push(format!("conntrack entries then: {}", list(|s| s.conntrack)));
    lines.push(format!("fds then: {}", list(fds)));
    let spread = |field: fn(&Sample) -> u64| {
        let values = at_warm_up.iter().map(field);
        values.clone().max().unwrap_or(0) - values.min().unwrap_or(0)
    };
    let rss_bound = max_of(first, rss) + RSS_SLACK_KIB;
    lines.push(format!("RSS bound for the last third: {rss_bound} KiB (first third's max + {RSS_SLACK_KIB} KiB)"));
    let checks = vec![
        (max_of(end, rss) <= rss_bound, "RSS grew within the last incarnation"),
        (spread(rss) <= RSS_SLACK_KIB, "RSS differs between incarnations at the same age"),
        (max_of(end, fds) <= max_of(first, fds) + FD_SLACK, "descriptors grew within the last incarnation"),
        (spread(fds) <= FD_SLACK, "descriptors differ between incarnations"),
    ];
    (lines, checks)
}

/// Every daemon log: no panic; the refused handshakes were audited.
fn check_logs(soak: &Soak) -> (usize, usize) {
    let logs = lock(&soak.logs).clone();
    let mut errors = 0;
    let mut audited_refusals = 0;
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        let panics: Vec<&str> = text.lines().filter(|l| l.contains("panicked")).collect();
        assert!(panics.is_empty(), "{}: {}", log.display(), panics.join("\n"));
        errors += text.lines().filter(|l| l.contains(" ERROR ")).count();
        audited_refusals += text.lines().filter(|l| l.contains("action=connect result=refused why=\"TLS:")).count();
    }
    assert!(audited_refusals > 0, "no refused handshake was audited");
    (logs.len(), errors)
}

fn print_summary(soak: &Soak, seed: u64, footprint: &[String], logs: (usize, usize)) {
    let t = &soak.tally;
    let n = Tally::get;
    println!("soak: {:.1} min, seed {seed}", soak.started.elapsed().as_secs_f64() / 60.0);
    println!(
        "soak: policy flips {} written ({} bursts), {} pushed; restarts {} (SIGKILL, {} just after a write)",
        n(&t.flips_written),
        n(&t.bursts),
        n(&t.flips_pushed),
        n(&t.restarts),
        n(&t.kills_mid_flip)
    );
    println!(
        "soak: interface cycles {}, namespace cycles {}, {} probes through them",
        n(&t.interface_cycles),
        n(&t.namespace_cycles),
        n(&t.churn_probes)
    );
    println!(
        "soak: allowed connections {} (none lost), denied probes {} (all dropped), swinging probes {} passed / {} dropped, long-lived round trips {}",
        n(&t.allowed),
        n(&t.denied),
        n(&t.swing_passed),
        n(&t.swing_dropped),
        n(&t.exchanges)
    );
    println!(
        "soak: API calls answered {}, bad certificates refused {}, 403 {}, unanswered while restarting {}",
        n(&t.api_answered),
        n(&t.api_refused),
        n(&t.api_forbidden),
        n(&t.api_unanswered)
    );
    for line in footprint {
        println!("soak: {line}");
    }
    println!("soak: {} daemon logs, no panic, {} ERROR lines", logs.0, logs.1);
}

/// See the module's doc. One test: its parts share one lab and run at once.
#[test]
fn the_enforcer_holds_through_flips_churn_restarts_and_bad_clients() {
    let length = soak_length();
    let seed = seed();
    println!("soak: {:.1} min, seed {seed} (BULKHEAD_SOAK_SEED repeats it)", length.as_secs_f64() / 60.0);
    check_premise();
    let soak = &Soak::new();
    let pins_at_start = soak.pins();
    let samples = std::thread::scope(|scope| {
        let _stop = StopOnDrop(&soak.stop);
        let probes = [
            ("gateway", 8080, Expect::Allowed),
            ("gateway", 8081, Expect::Denied),
            ("guest", 22, Expect::Denied),
            ("outsider", 5432, Expect::Denied),
            ("logic", 8080, Expect::Swing),
            ("outsider", 22, Expect::Swing),
        ];
        for (from, port, expect) in probes {
            scope.spawn(move || probe_loop(soak, from, port, expect));
        }
        scope.spawn(|| session_loop(soak));
        scope.spawn(|| api_loop(soak));
        let sampler = scope.spawn(|| sample_loop(soak));
        let start = (Policy::A, Policy::A.text(0));
        let mut chaos = Chaos {
            soak,
            rng: Rng::new(seed),
            flip: 0,
            dir: start.clone(),
            enforced: start,
            generation: 0,
            namespaces: 0,
        };
        chaos.settle("the first policy");
        let now = Instant::now();
        chaos.run_until(now + length, now + length / 2);
        soak.stop.store(true, Ordering::Relaxed);
        sampler.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    let t = &soak.tally;
    for (what, counter) in [
        ("restart", &t.restarts),
        ("policy written", &t.flips_written),
        ("policy pushed", &t.flips_pushed),
        ("burst", &t.bursts),
        ("interface cycle", &t.interface_cycles),
        ("namespace cycle", &t.namespace_cycles),
        ("policy-dependent probe passed", &t.swing_passed),
        ("policy-dependent probe dropped", &t.swing_dropped),
        ("bad certificate refused", &t.api_refused),
        ("API call answered", &t.api_answered),
    ] {
        assert!(Tally::get(counter) > 0, "no {what} in the whole soak: too short to mean anything");
    }
    assert_eq!(soak.pins(), pins_at_start, "pins under {} piled up", soak.lab.bpffs_root().display());
    let (footprint, checks) = footprint(&samples);
    let logs = check_logs(soak);
    print_summary(soak, seed, &footprint, logs);
    for (held, what) in checks {
        assert!(held, "{what}: {}", footprint.join("; "));
    }
}
