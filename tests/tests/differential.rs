//! Differential testing of the kernel programs against the reference
//! datapath (`differential/model.rs`, the policy crate's evaluator behind
//! it): random policies, and conversations of frames that are wrapped,
//! fragmented and sent in any order, quoted in ICMP errors, mutated and
//! cut, each run through the loaded XDP, TC ingress or TC egress program
//! with `BPF_PROG_TEST_RUN`. Every frame's return value must match the
//! reference's verdict, and after each case every counter (forwarded,
//! dropped and audited, per reason and direction) must have moved as the
//! reference says. A disagreement is replayed frame by frame to name the
//! first frame it is about, and written out as a case file.
//!
//! `cargo xtask test` runs a slice (`BULKHEAD_DIFFERENTIAL_FRAMES`,
//! default 300,000 frames); `cargo xtask fuzz` runs 10⁷. A run is replayed
//! by its seed (`BULKHEAD_DIFFERENTIAL_SEED`, printed at the start). The
//! cases in `differential/regressions/` run first, every time.

#[path = "differential/generate.rs"]
mod generate;
mod kernel;
#[path = "differential/model.rs"]
mod model;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use enforcer::datapath::{CounterSnapshot, Hook as ProgramHook};
use enforcer_common::{Direction, DropReason};
use generate::{Hook, Rng, Step};
use kernel::{Kernel, Observed};
use model::{Reading, Reference, Verdict};

/// Cases run under one policy before the next is generated: applying a
/// policy (about 9 ms here, most of it waiting for program runs that may
/// still read the old slot) costs as much as a thousand frames.
const CASES_PER_POLICY: usize = 40;

/// A case: a policy, perhaps a second one switched to in the middle, and frames.
#[derive(Debug, Clone)]
struct Case {
    policies: Vec<String>,
    audit_all: bool,
    /// Before which step the second policy takes over.
    switch_at: Option<usize>,
    /// Quarantined addresses and the TCP ports exempt for the node.
    quarantine: Vec<String>,
    exempt_ports: Vec<u16>,
    steps: Vec<Step>,
}

/// What a case's frames did, for the run's summary.
#[derive(Default)]
struct Tally {
    frames: u64,
    readings: BTreeMap<&'static str, u64>,
    verdicts: BTreeMap<String, u64>,
    hooks: BTreeMap<&'static str, u64>,
    switches: u64,
}

impl Tally {
    fn add(&mut self, step: &Step, verdict: Verdict) {
        self.frames += 1;
        *self.readings.entry(reading_class(&step.frame)).or_default() += 1;
        *self.verdicts.entry(verdict_label(verdict)).or_default() += 1;
        *self.hooks.entry(step.hook.name()).or_default() += 1;
    }
}

fn reading_class(frame: &[u8]) -> &'static str {
    match model::read(frame) {
        Reading::NotIp => "not IP",
        Reading::Malformed => "malformed",
        Reading::Ip(packet) => match (packet.fragment, packet.kind) {
            (model::Fragment::First(_), _) => "first fragment",
            (model::Fragment::Later(_), _) => "later fragment",
            (_, model::Kind::IcmpError(_)) => "ICMP error",
            (_, model::Kind::NeighbourDiscovery) => "neighbour discovery",
            (_, model::Kind::EchoReply) => "echo reply",
            (_, model::Kind::Trackable) => "TCP, UDP, echo request",
            (_, model::Kind::Untracked) => "other IP",
        },
    }
}

fn verdict_label(verdict: Verdict) -> String {
    match verdict {
        Verdict::Pass => "pass".to_owned(),
        Verdict::Drop(reason) => format!("drop {}", reason.label()),
        Verdict::Audit(reason) => format!("audit {}", reason.label()),
        Verdict::Ignored => "ignored (egress, not the node's)".to_owned(),
    }
}

fn program(hook: Hook) -> ProgramHook {
    match hook {
        Hook::Xdp => ProgramHook::Ingress,
        Hook::TcIngress => ProgramHook::TcIngress,
        Hook::TcEgress => ProgramHook::Egress,
    }
}

/// Whether the program's return value lets the frame through.
fn passes(hook: Hook, retval: u32) -> Option<bool> {
    const XDP_DROP: u32 = 1;
    const XDP_PASS: u32 = 2;
    const TC_ACT_SHOT: u32 = 2;
    const TC_ACT_UNSPEC: u32 = u32::MAX;
    match (hook, retval) {
        (Hook::Xdp, XDP_PASS) | (Hook::TcIngress | Hook::TcEgress, TC_ACT_UNSPEC) => Some(true),
        (Hook::Xdp, XDP_DROP) | (Hook::TcIngress | Hook::TcEgress, TC_ACT_SHOT) => Some(false),
        _ => None,
    }
}

/// Counter movements: (what, reason label, direction) → packets.
type Movements = BTreeMap<(String, &'static str), u64>;

fn direction_label(direction: Direction) -> &'static str {
    if direction == Direction::Ingress { "ingress" } else { "egress" }
}

fn expected_movement(movements: &mut Movements, direction: Direction, verdict: Verdict) {
    let key = match verdict {
        Verdict::Pass => "forward".to_owned(),
        Verdict::Drop(reason) => format!("drop {}", reason.label()),
        Verdict::Audit(reason) => format!("audit {}", reason.label()),
        Verdict::Ignored => return,
    };
    *movements.entry((key, direction_label(direction))).or_default() += 1;
}

fn observed_movements(before: &CounterSnapshot, after: &CounterSnapshot) -> Movements {
    let mut movements = Movements::new();
    let mut note = |key: String, direction: Direction, packets: u64| {
        if packets > 0 {
            movements.insert((key, direction_label(direction)), packets);
        }
    };
    for direction in Direction::ALL {
        note("forward".to_owned(), direction, after.forwards[&direction].packets - before.forwards[&direction].packets);
        for reason in DropReason::ALL {
            let delta = |map: fn(&CounterSnapshot) -> &HashMap<(DropReason, Direction), enforcer_common::Counter>| {
                let count = |s| map(s).get(&(reason, direction)).map_or(0, |c| c.packets);
                count(after) - count(before)
            };
            note(format!("drop {}", reason.label()), direction, delta(|s| &s.drops));
            note(format!("audit {}", reason.label()), direction, delta(|s| &s.audits));
        }
    }
    movements
}

/// The kernel side: the loaded programs, what they enforce now, the node's addresses.
struct Bench {
    kernel: Kernel,
    hosts: BTreeSet<IpAddr>,
    /// The policy text and audit flag in force, to skip applying them again.
    current: Option<(String, bool)>,
    generation: u32,
}

impl Bench {
    fn new() -> Self {
        let first = policy_of(&generate::policy_text(&mut Rng::new(0)));
        let mut kernel = Kernel::load(&first.1, false);
        let hosts: BTreeSet<IpAddr> = generate::HOST.iter().map(|a| a.parse().unwrap()).collect();
        kernel.datapath.set_host_addresses(&hosts, &kernel.engine).unwrap();
        Self { kernel, hosts, current: None, generation: 0 }
    }

    fn enforce(&mut self, text: &str, audit_all: bool) -> policy::Policy {
        let (policy, _) = policy_of(text);
        if self.current.as_ref().is_none_or(|(t, a)| t != text || *a != audit_all) {
            self.generation = self.kernel.enforce(&policy, audit_all);
            self.current = Some((text.to_owned(), audit_all));
        }
        policy
    }

    /// Makes the case's policy, quarantine and a clean state the kernel's,
    /// and gives the reference the same.
    fn start(&mut self, case: &Case) -> Result<Reference, String> {
        let policy = self.enforce(&case.policies[0], case.audit_all);
        let quarantine = model::Quarantine {
            nets: case
                .quarantine
                .iter()
                .map(|net| net.parse().map_err(|e| format!("{net}: {e}")))
                .collect::<Result<_, _>>()?,
            exempt_ports: case.exempt_ports.iter().copied().collect(),
        };
        let datapath = &mut self.kernel.datapath;
        datapath.set_quarantine(&quarantine.nets.iter().copied().collect()).map_err(|e| e.to_string())?;
        let exempt: Vec<(u8, u16)> = quarantine.exempt_ports.iter().map(|&port| (6, port)).collect();
        datapath.set_quarantine_exempt(&exempt).map_err(|e| e.to_string())?;
        datapath.clear_state().map_err(|e| e.to_string())?;
        Ok(Reference::new(policy, case.audit_all, quarantine, self.hosts.clone(), self.generation))
    }

    /// Runs a case; `Err` says how the kernel and the reference disagree.
    fn run(&mut self, case: &Case, tally: &mut Tally) -> Result<(), String> {
        let mut reference = self.start(case)?;
        let before = self.kernel.datapath.verdict_counters().map_err(|e| e.to_string())?;
        let mut expected = Movements::new();
        for (i, step) in case.steps.iter().enumerate() {
            if case.switch_at == Some(i) {
                let policy = self.enforce(&case.policies[1], case.audit_all);
                reference.switch(policy, self.generation);
                tally.switches += 1;
            }
            let verdict = reference.judge(step.hook.direction(), &step.frame);
            let run = self
                .kernel
                .datapath
                .test_run(program(step.hook), &step.frame, 1)
                .map_err(|e| format!("frame {i} at {}: {e}; bytes {}", step.hook.name(), hex(&step.frame)))?;
            match passes(step.hook, run.retval) {
                Some(passed) if passed == !matches!(verdict, Verdict::Drop(_)) => {}
                other => {
                    return Err(format!(
                        "frame {i} ({}): the reference says {verdict:?}, the program returned {} ({})",
                        step.hook.name(),
                        run.retval,
                        match other {
                            Some(true) => "pass",
                            Some(false) => "drop",
                            None => "neither pass nor drop",
                        }
                    ));
                }
            }
            expected_movement(&mut expected, step.hook.direction(), verdict);
            tally.add(step, verdict);
        }
        let after = self.kernel.datapath.verdict_counters().map_err(|e| e.to_string())?;
        let observed = observed_movements(&before, &after);
        if observed != expected {
            return Err(format!("counters moved {observed:?}, the reference says {expected:?}"));
        }
        Ok(())
    }

    /// Runs a case again frame by frame, reading the counters after each,
    /// and names the first frame the kernel and the reference judge apart.
    fn first_disagreement(&mut self, case: &Case) -> String {
        self.current = None;
        let mut reference = self.start(case).expect("set the case up again");
        for (i, step) in case.steps.iter().enumerate() {
            if case.switch_at == Some(i) {
                let policy = self.enforce(&case.policies[1], case.audit_all);
                reference.switch(policy, self.generation);
            }
            let expected = match reference.judge(step.hook.direction(), &step.frame) {
                Verdict::Pass => Observed::Pass,
                Verdict::Drop(reason) => Observed::Drop(reason),
                Verdict::Audit(reason) => Observed::Audit(reason),
                Verdict::Ignored => Observed::Ignored,
            };
            let observed = self.kernel.run(program(step.hook), &step.frame);
            if observed != expected {
                return format!(
                    "frame {i} at {}: the kernel says {observed:?}, the reference {expected:?}\n  reads as {:?}\n  bytes {}",
                    step.hook.name(),
                    model::read(&step.frame),
                    hex(&step.frame)
                );
            }
        }
        "no single frame disagrees when replayed one by one".to_owned()
    }
}

fn policy_of(text: &str) -> (policy::Policy, String) {
    let policy = policy::parse_str("generated.yaml", text)
        .unwrap_or_else(|e| panic!("the generator wrote an invalid policy: {e}\n{text}"));
    (policy, text.to_owned())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

fn case_json(case: &Case, why: &str) -> serde_json::Value {
    let steps: Vec<serde_json::Value> = case
        .steps
        .iter()
        .map(|step| serde_json::json!({"hook": step.hook.name(), "frame": hex(&step.frame)}))
        .collect();
    serde_json::json!({
        "why": why,
        "policies": case.policies,
        "audit_all": case.audit_all,
        "switch_at": case.switch_at,
        "quarantine": case.quarantine,
        "exempt_ports": case.exempt_ports,
        "steps": steps,
    })
}

fn case_from_json(value: &serde_json::Value) -> Option<Case> {
    let policies =
        value["policies"].as_array()?.iter().map(|p| p.as_str().map(str::to_owned)).collect::<Option<_>>()?;
    let steps = value["steps"]
        .as_array()?
        .iter()
        .map(|step| {
            Some(Step { hook: Hook::from_name(step["hook"].as_str()?)?, frame: unhex(step["frame"].as_str()?)? })
        })
        .collect::<Option<_>>()?;
    let switch_at = value["switch_at"].as_u64().and_then(|i| usize::try_from(i).ok());
    // Cases written before the quarantine was generated have no lists.
    let list = |key: &str| value.get(key).map_or(Some(&[][..]), |list| list.as_array().map(Vec::as_slice));
    let quarantine = list("quarantine")?.iter().map(|v| v.as_str().map(str::to_owned)).collect::<Option<_>>()?;
    let exempt_ports =
        list("exempt_ports")?.iter().map(|v| v.as_u64().and_then(|p| u16::try_from(p).ok())).collect::<Option<_>>()?;
    Some(Case { policies, audit_all: value["audit_all"].as_bool()?, switch_at, quarantine, exempt_ports, steps })
}

fn regressions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/differential/regressions")
}

/// Writes a failing case where `cargo xtask` output points, to be kept
/// under `differential/regressions/` once fixed.
fn keep_failure(case: &Case, why: &str, seed: u64) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/differential");
    std::fs::create_dir_all(&dir).expect("create target/differential");
    let path = dir.join(format!("failure-{seed}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&case_json(case, why)).unwrap()).expect("write the case");
    path
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.replace('_', "").parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

fn random_case(rng: &mut Rng, policy: &str, audit_all: bool) -> Case {
    let length = 16 + rng.below(160);
    let steps = generate::conversation(rng, length);
    let (policies, switch_at) = if rng.chance(4) {
        (vec![policy.to_owned(), generate::policy_text(rng)], Some(rng.below(steps.len())))
    } else {
        (vec![policy.to_owned()], None)
    };
    let (quarantine, exempt_ports) = generate::quarantine(rng);
    Case { policies, audit_all, switch_at, quarantine, exempt_ports, steps }
}

/// Kinds of frame and verdict a run of this size must have produced, so a
/// generator that stopped producing them cannot pass unnoticed.
const MUST_SEE: [&str; 17] = [
    "not IP",
    "malformed",
    "first fragment",
    "later fragment",
    "ICMP error",
    "neighbour discovery",
    "echo reply",
    "TCP, UDP, echo request",
    "other IP",
    "pass",
    "drop default_deny",
    "drop deny_rule",
    "drop malformed",
    "drop fragment_unknown",
    "drop host_spoofed",
    "drop quarantine",
    "ignored (egress, not the node's)",
];

#[test]
fn kernel_agrees_with_the_reference_on_hostile_frames() {
    let wanted = env_number("BULKHEAD_DIFFERENTIAL_FRAMES").unwrap_or(300_000);
    let seed = env_number("BULKHEAD_DIFFERENTIAL_SEED")
        .unwrap_or_else(|| SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64);
    println!("differential: seed {seed} (BULKHEAD_DIFFERENTIAL_SEED replays it), {wanted} frames");
    let mut bench = Bench::new();
    let mut tally = Tally::default();

    let mut regressions: Vec<PathBuf> = std::fs::read_dir(regressions_dir())
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect()
        })
        .unwrap_or_default();
    regressions.sort();
    for path in &regressions {
        let text = std::fs::read_to_string(path).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let case = case_from_json(&value).unwrap_or_else(|| panic!("{}: not a case file", path.display()));
        if let Err(why) = bench.run(&case, &mut tally) {
            let first = bench.first_disagreement(&case);
            panic!("regression {} is back: {why}\n{first}", path.display());
        }
    }
    println!("differential: {} kept regression cases agree", regressions.len());

    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut cases = 0u64;
    while tally.frames < wanted {
        let mut policy = generate::policy_text(&mut rng);
        let audit_all = rng.chance(8);
        for _ in 0..CASES_PER_POLICY {
            let case = random_case(&mut rng, &policy, audit_all);
            if let Err(why) = bench.run(&case, &mut tally) {
                eprintln!("differential: {why}");
                let first = bench.first_disagreement(&case);
                let kept = keep_failure(&case, &format!("{why}\n{first}"), seed);
                panic!(
                    "the kernel and the reference disagree (seed {seed}, case {cases}): {why}\n{first}\npolicy:\n{}\ncase written to {}",
                    case.policies.join("\n---\n"),
                    kept.display()
                );
            }
            cases += 1;
            // The policy switched to stays for the next case: applying it
            // again would cost another switch.
            policy.clone_from(case.policies.last().expect("a case has a policy"));
        }
    }
    let took = started.elapsed();
    println!(
        "differential: {} frames in {cases} cases ({} policy switches mid-case) agreed in {:.1} s: {:.0} frames/s",
        tally.frames,
        tally.switches,
        took.as_secs_f64(),
        f64::from(u32::try_from(tally.frames).unwrap_or(u32::MAX)) / took.as_secs_f64()
    );
    println!("  programs: {:?}", tally.hooks);
    println!("  frames read as: {:?}", tally.readings);
    println!("  verdicts: {:?}", tally.verdicts);
    if wanted >= 50_000 {
        for kind in MUST_SEE {
            let count = tally.readings.get(kind).or_else(|| tally.verdicts.get(kind)).copied().unwrap_or(0);
            assert!(count > 0, "{wanted} frames and not one {kind}: the generator no longer makes them");
        }
        assert!(tally.verdicts.keys().any(|v| v.starts_with("audit")), "no audited frame");
    }
}
