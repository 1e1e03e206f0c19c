//! `cargo xtask demo`: the three-tier scenario with real connections.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use enforcer_common::{Direction, DropReason};
use lab::probe::{self, EchoServer, Outcome};
use lab::{Daemon, ScratchDir, ThreeTier};
use policy::{Packet, Verdict};

/// The demo's policy, embedded so the demo needs nothing but the binary.
const POLICY: &str = include_str!("../../examples/three-tier.yaml");

#[derive(Clone, Copy)]
enum Traffic {
    Tcp(u16),
    Udp(u16),
    Ping,
}

impl Traffic {
    fn packet(self, src: Ipv4Addr, dst: Ipv4Addr) -> Packet {
        let (protocol, port) = match self {
            Traffic::Tcp(port) => (6, port),
            Traffic::Udp(port) => (17, port),
            Traffic::Ping => (1, 8 << 8),
        };
        Packet { src: src.into(), dst: dst.into(), protocol, port }
    }

    fn label(self) -> String {
        match self {
            Traffic::Tcp(port) => format!("{port}/tcp"),
            Traffic::Udp(port) => format!("{port}/udp"),
            Traffic::Ping => "icmp echo".to_owned(),
        }
    }
}

const PROBES: [(&str, &str, Traffic); 14] = [
    ("gateway", "logic", Traffic::Tcp(8080)),
    ("logic", "db", Traffic::Tcp(5432)),
    ("logic", "db", Traffic::Udp(8125)),
    ("gateway", "db", Traffic::Tcp(22)),
    ("gateway", "db", Traffic::Tcp(5432)),
    ("gateway", "db", Traffic::Udp(8125)),
    ("logic", "gateway", Traffic::Tcp(8080)),
    ("db", "logic", Traffic::Tcp(8080)),
    ("gateway", "db", Traffic::Ping),
    ("db", "gateway", Traffic::Ping),
    ("outsider", "gateway", Traffic::Tcp(8080)),
    ("outsider", "db", Traffic::Tcp(5432)),
    ("outsider", "logic", Traffic::Udp(8125)),
    ("outsider", "db", Traffic::Ping),
];

static STOP: AtomicBool = AtomicBool::new(false);

/// Ctrl-C or SIGTERM ends the demo through the normal path, so `Drop`
/// removes the daemon and namespaces.
fn catch_signals() -> anyhow::Result<()> {
    // SAFETY: plain signal-mask calls on a stack-allocated set, done before
    // any other thread exists so every thread inherits the mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) != 0 {
            bail!("cannot block SIGINT/SIGTERM");
        }
        std::thread::spawn(move || {
            let mut signal = 0;
            libc::sigwait(&raw const set, &raw mut signal);
            STOP.store(true, Ordering::SeqCst);
        });
    }
    Ok(())
}

pub fn demo(binary: &Path, keep: bool) -> anyhow::Result<()> {
    catch_signals()?;
    // SAFETY: set before any thread reads the environment.
    unsafe { std::env::set_var("BULKHEAD_BIN", binary) };
    let parsed =
        policy::parse_str("examples/three-tier.yaml", POLICY).context("the embedded demo policy is invalid")?;

    let lab = ThreeTier::new("demo").context("creating the demo namespaces failed")?;
    let scratch = ScratchDir::new(&lab.stem)?;
    let policy_dir = scratch.0.join("policy");
    std::fs::create_dir_all(&policy_dir)?;
    std::fs::write(policy_dir.join("three-tier.yaml"), POLICY)?;
    println!("demo: topology {}-{{router,gateway,logic,db,outsider}}", lab.stem);
    for host in &lab.hosts {
        println!("demo:   {:<9} {:<11} via router interface {}", host.name, host.addr, host.router_interface);
    }
    let servers: Vec<EchoServer> = lab
        .hosts
        .iter()
        .map(|host| EchoServer::start(&host.ns, &host.addrs(), &[22, 5432, 8080], &[8125]))
        .collect::<Result<_, _>>()?;
    let daemon = Daemon::start(&lab, &policy_dir, &scratch.0.join("bulkhead.log")).context("bulkhead did not start")?;
    println!("demo: bulkhead is enforcing examples/three-tier.yaml on every router interface\n");

    let Some(mismatches) = probe_table(&lab, &policy::Evaluator::new(&parsed))? else {
        println!("demo: interrupted");
        return Ok(());
    };
    print_counters(&lab, &daemon)?;

    if keep {
        println!(
            "\ndemo: left running; try `ip netns exec {}-gateway bash` or \
             `ip netns exec {} curl -s 127.0.0.1:9090/metrics`. Ctrl-C to clean up.",
            lab.stem,
            daemon.namespace()
        );
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    drop(servers);
    drop(daemon);
    drop(lab);
    println!("\ndemo: cleaned up (daemon stopped, namespaces removed)");
    if mismatches > 0 {
        bail!("{mismatches} probe(s) disagreed with the policy");
    }
    Ok(())
}

/// Probes every pair, prints what the policy says beside what happened,
/// and returns how many disagreed (`None` if interrupted).
fn probe_table(lab: &ThreeTier, evaluator: &policy::Evaluator<'_>) -> anyhow::Result<Option<usize>> {
    println!("{:<9} {:<9} {:<10} {:<46} OBSERVED", "FROM", "TO", "TRAFFIC", "POLICY SAYS");
    let mut mismatches = 0;
    for (from, to, traffic) in PROBES {
        if STOP.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let (src, dst) = (lab.host(from), lab.host(to));
        let decision = evaluator.evaluate(&traffic.packet(src.addr, dst.addr));
        let expected_allowed = matches!(decision.verdict, Verdict::Forward | Verdict::Audit(_));
        let rule = decision.rule.map_or_else(String::new, |rule| format!(" ({rule})"));
        let expected = match decision.verdict {
            Verdict::Forward => format!("allow{rule}"),
            Verdict::Drop(reason) => format!("drop {}{rule}", reason.label()),
            Verdict::Audit(reason) => format!("audit {}{rule}", reason.label()),
        };
        let outcome = match traffic {
            Traffic::Tcp(port) => probe::tcp(&src.ns, SocketAddr::new(IpAddr::V4(dst.addr), port))?,
            Traffic::Udp(port) => probe::udp(&src.ns, SocketAddr::new(IpAddr::V4(dst.addr), port))?,
            Traffic::Ping => probe::ping(&src.ns, dst.addr)?,
        };
        let (observed, agrees) = observed(outcome, expected_allowed);
        if !agrees {
            mismatches += 1;
        }
        println!("{from:<9} {to:<9} {:<10} {expected:<46} {observed}", traffic.label());
    }
    Ok(Some(mismatches))
}

/// What a probe saw, as the demos print it (marked where it differs from
/// what the policy says), and whether it agrees with `allowed`.
pub(crate) fn observed(outcome: Outcome, allowed: bool) -> (String, bool) {
    let (seen, agrees) = match outcome {
        Outcome::Connected => ("ALLOWED: data both ways".to_owned(), allowed),
        Outcome::TimedOut => ("BLOCKED: timed out".to_owned(), !allowed),
        Outcome::Failed(why) => (format!("ERROR: {why}"), false),
    };
    let mark = if agrees { "" } else { "   <-- differs from the policy" };
    (format!("{seen}{mark}"), agrees)
}

fn print_counters(lab: &ThreeTier, daemon: &Daemon) -> anyhow::Result<()> {
    let (status, metrics) = probe::http_get(&lab.router, daemon.metrics_addr, "/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    println!("\nCounters from http://{}/metrics (router namespace):", daemon.metrics_addr);
    let value = |name: &str, labels: &str| probe::metric(&metrics, &format!("{name}{labels}")).unwrap_or(0);
    for reason in DropReason::ALL {
        for direction in Direction::ALL {
            let labels = format!("{{direction=\"{}\",reason=\"{}\"}}", direction.label(), reason.label());
            let packets = value("bulkhead_drop_packets_total", &labels);
            let bytes = value("bulkhead_drop_bytes_total", &labels);
            if direction == Direction::Ingress || packets > 0 {
                println!("  bulkhead_drop_packets_total{labels:<48} {packets:>6}   ({bytes} bytes)");
            }
        }
    }
    let labels = "{direction=\"ingress\"}";
    let forwarded = value("bulkhead_forward_packets_total", labels);
    let bytes = value("bulkhead_forward_bytes_total", labels);
    println!("  bulkhead_forward_packets_total{labels:<45} {forwarded:>6}   ({bytes} bytes)");
    Ok(())
}
