//! A policy change is atomic: under continuous traffic through the real XDP
//! program, hundreds of incremental changes (an address moving from one
//! identity to another while the rules swap; an identity revoked with its
//! rule while another appears) never judge a packet by half a change; and the barrier
//! the datapath waits on before rewriting the slot a switch left is the
//! kernel's own wait for running programs (a map-of-maps update). Needs
//! root; run through `cargo xtask test`.

mod kernel;

use std::net::IpAddr;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use aya::maps::{ArrayOfMaps, Map, MapData, MapType};
use enforcer::datapath::Hook;
use enforcer::quiesce::ProgramBarrier;
use kernel::Kernel;
use lab::frames::{SYN, TCP, simple, tcp};

/// Under A, 10.1.0.5 is `web`, which may reach port 80, and `db` may not;
/// `tmp` (10.1.0.8) may reach 82; 10.1.0.9 is nobody.
const A: &str = r#"
apiVersion: bulkhead/v1
kind: SegmentPolicy
metadata: {name: a}
spec:
  identities:
    - {name: web, addresses: ["10.1.0.5"]}
    - {name: db, addresses: ["10.1.0.6"]}
    - {name: tmp, addresses: ["10.1.0.8"]}
  rules:
    - {name: web-80, from: [{identity: web}], to: [{identity: world}], ports: ["80/tcp"]}
    - {name: db-80, action: deny, from: [{identity: db}], to: [{identity: world}], ports: ["80/tcp"]}
    - {name: tmp-out, from: [{identity: tmp}], to: [{identity: world}], ports: ["82/tcp"]}
"#;

/// Under B, 10.1.0.5 has moved to `db`, and the two rules have swapped
/// actions, so 10.1.0.5 may still reach 80: the same three entries change
/// value in place (the address's identity, both rules' verdicts), and a
/// packet judged by A's identities and B's rules, or B's identities and
/// A's rules, is dropped. `tmp` and its rule are revoked together, and a
/// new identity `guest` (10.1.0.9) appears: were it given `tmp`'s number
/// while `tmp`'s entries lingered, it would reach 82.
const B: &str = r#"
apiVersion: bulkhead/v1
kind: SegmentPolicy
metadata: {name: b}
spec:
  identities:
    - {name: web, addresses: ["10.1.0.7"]}
    - {name: db, addresses: ["10.1.0.5", "10.1.0.6"]}
    - {name: guest, addresses: ["10.1.0.9"]}
  rules:
    - {name: web-80, action: deny, from: [{identity: web}], to: [{identity: world}], ports: ["80/tcp"]}
    - {name: db-80, from: [{identity: db}], to: [{identity: world}], ports: ["80/tcp"]}
"#;

const XDP_PASS: u32 = 2;

#[test]
fn changes_under_traffic_never_judge_a_packet_by_half_a_change() {
    let a = policy::parse_str("a.yaml", A).unwrap();
    let b = policy::parse_str("b.yaml", B).unwrap();
    // The premise: each step changes identity entries and policy entries
    // together, so a half-written step would show.
    let mut engine = policy::Engine::new();
    let whole = |p: &policy::Policy| {
        vec![policy::SourceChange { source: "policy".into(), contents: policy::Contents::Parsed(p.clone()) }]
    };
    engine.apply(whole(&a), std::time::SystemTime::now()).unwrap();
    let a_to_b = engine.apply(whole(&b), std::time::SystemTime::now()).unwrap();
    assert!(!a_to_b.identities.is_empty() && !a_to_b.policy.is_empty(), "{a_to_b:?}");

    let mut kernel = Kernel::load(A, false);
    // (source, destination port): 10.1.0.5 → 80 (always allowed) and 81
    // (never), 10.1.0.8 → 82 (allowed by A), 10.1.0.9 → 82 (never).
    let probes = [("10.1.0.5", 80), ("10.1.0.5", 81), ("10.1.0.8", 82), ("10.1.0.9", 82)];
    let flips = 400;
    let (passed, rounds) = probed_while(&mut kernel, probes, flips, |kernel, flip| {
        kernel.enforce(if flip % 2 == 0 { &b } else { &a }, false);
    });
    assert!(rounds > 2_500, "only {rounds} rounds of probes were sent");
    assert!(passed[2] > 0 && passed[2] < rounds, "both policies were enforced during the run: {passed:?}");
    assert_eq!(passed[0], rounds, "allowed packets dropped by half a change ({rounds} rounds): {passed:?}");
    assert_eq!((passed[1], passed[3]), (0, 0), "packets passed by half a change ({rounds} rounds): {passed:?}");
    assert_eq!(kernel.datapath.generation(), flips as u32 + 1);
}

/// Sends `probes` (source, destination port: a SYN to 192.0.2.1, from a
/// fresh source port each time so that conntrack never answers) through
/// the XDP program in a loop, while `change` is called `changes` times,
/// 300 µs apart so that some traffic meets each generation. Returns how
/// often each probe passed, and the rounds sent.
fn probed_while<const N: usize>(
    kernel: &mut Kernel,
    probes: [(&'static str, u16); N],
    changes: usize,
    mut change: impl FnMut(&mut Kernel, usize),
) -> ([u64; N], u64) {
    let fd = kernel.datapath.program_fd(Hook::Ingress).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut passed = [0u64; N];
            let mut rounds = 0u64;
            let dst: IpAddr = "192.0.2.1".parse().unwrap();
            while !stop.load(Ordering::Relaxed) {
                for (i, (src, port)) in probes.iter().enumerate() {
                    let source_port = 1024 + (rounds % 60_000) as u16;
                    let frame = simple(src.parse().unwrap(), dst, TCP, tcp(source_port, *port, SYN));
                    if enforcer::testrun::run(fd, &frame, 1).expect("test run").retval == XDP_PASS {
                        passed[i] += 1;
                    }
                }
                rounds += 1;
            }
            (passed, rounds)
        })
    };
    for k in 0..changes {
        change(kernel, k);
        std::thread::sleep(std::time::Duration::from_micros(300));
    }
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap()
}

/// The map behind `fd`, through a descriptor of its own.
fn map_data(fd: BorrowedFd<'_>) -> MapData {
    MapData::from_fd(fd.try_clone_to_owned().expect("duplicate the map's descriptor")).expect("map info")
}

/// The wait before a left slot is rewritten is the kernel's own: updating
/// a map-of-maps with a map returns only after an RCU grace period, when
/// every program run that began before it has ended. So the barrier must be
/// such an update, and after a wait the outer map must hold the inner one.
#[test]
fn the_slot_barrier_is_the_kernels_wait_for_running_programs() {
    let barrier = ProgramBarrier::new().expect("create the barrier maps");
    let outer = map_data(barrier.map_of_maps());
    let outer_type = outer.info().expect("map info").map_type().expect("a known map type");
    assert_eq!(outer_type, MapType::ArrayOfMaps, "only a map-of-maps update waits for programs");
    let inner_id = map_data(barrier.held_map()).info().expect("map info").id();
    let outer: ArrayOfMaps<MapData, MapData> =
        Map::from_map_data(outer).expect("a map aya knows").try_into().expect("an array of maps");
    for _ in 0..3 {
        barrier.wait().expect("wait for running programs");
        let held = outer.get(&0, 0).expect("the outer map holds a map");
        assert_eq!(held.info().expect("map info").id(), inner_id, "the update stored the held map");
    }
}

/// S0 for the in-place test: `tmp` (10.1.0.8) may reach port 82.
const S0: &str = r#"
apiVersion: bulkhead/v1
kind: SegmentPolicy
metadata: {name: s}
spec:
  identities:
    - {name: web, addresses: ["10.1.0.5"]}
    - {name: tmp, addresses: ["10.1.0.8"]}
  rules:
    - {name: web-80, from: [{identity: web}], to: [{identity: world}], ports: ["80/tcp"]}
    - {name: tmp-82, from: [{identity: tmp}], to: [{identity: world}], ports: ["82/tcp"]}
"#;

/// S1: 10.1.0.8 has moved to `web`, which may now reach 82 too; `tmp` and
/// its rule are gone. From S0 this is one change the datapath writes into
/// the live slot: `web`'s new entries, then the one address's identity
/// entry, and `tmp`'s entries only a grace period later.
const S1: &str = r#"
apiVersion: bulkhead/v1
kind: SegmentPolicy
metadata: {name: s}
spec:
  identities:
    - {name: web, addresses: ["10.1.0.5", "10.1.0.8"]}
  rules:
    - {name: web-80, from: [{identity: web}], to: [{identity: world}], ports: ["80/tcp"]}
    - {name: web-82, from: [{identity: web}], to: [{identity: world}], ports: ["82/tcp"]}
"#;

/// S2: S1 and a new identity `guest` (10.1.0.9) that no rule names. Were it
/// given `tmp`'s number while `tmp`'s entries linger, it would reach 82.
const S2: &str = r#"
apiVersion: bulkhead/v1
kind: SegmentPolicy
metadata: {name: s}
spec:
  identities:
    - {name: web, addresses: ["10.1.0.5", "10.1.0.8"]}
    - {name: guest, addresses: ["10.1.0.9"]}
  rules:
    - {name: web-80, from: [{identity: web}], to: [{identity: world}], ports: ["80/tcp"]}
    - {name: web-82, from: [{identity: web}], to: [{identity: world}], ports: ["82/tcp"]}
"#;

/// Small changes back to back, written into the slot the kernel is reading
/// (S0 → S1 → S2 → S1), with a switch of slots back to S0 (which changes
/// `web`'s entries while moving an address away from it, so it cannot be
/// written in place): under continuous traffic, a packet is never judged
/// by half a change. 10.1.0.8 may reach 82 under every policy of the cycle,
/// so a drop would show `tmp`'s entries gone before the address left it, or
/// the address moved before `web`'s entries were there; 10.1.0.9 never
/// may, so a pass would show a number given out again too soon.
#[test]
fn changes_written_into_the_live_slot_never_judge_a_packet_by_half_a_change() {
    let cycle: Vec<policy::Policy> = [S1, S2, S1, S0]
        .iter()
        .enumerate()
        .map(|(i, text)| policy::parse_str(&format!("s{i}.yaml"), text).unwrap())
        .collect();
    let mut kernel = Kernel::load(S0, false);
    // Every packet reads the maps: the verdict cache would answer repeated
    // tuples from before the change until its generation moves on.
    kernel.datapath.set_verdict_cache(false).unwrap();
    // Always passes (twice), never passes (twice), passes under S1 and S2 only.
    let probes = [("10.1.0.5", 80), ("10.1.0.8", 82), ("10.1.0.9", 82), ("10.1.0.5", 81), ("10.1.0.8", 80)];
    let changes = 600;
    let (passed, rounds) = probed_while(&mut kernel, probes, changes, |kernel, change| {
        kernel.enforce(&cycle[change % cycle.len()], false);
    });
    assert!(rounds > 5_000, "only {rounds} rounds of probes were sent");
    assert!(passed[4] > 0 && passed[4] < rounds, "both kinds of policy were enforced during the run: {passed:?}");
    assert_eq!((passed[0], passed[1]), (rounds, rounds), "allowed packets dropped by half a change: {passed:?}");
    assert_eq!((passed[2], passed[3]), (0, 0), "packets passed by half a change: {passed:?}");
    let in_place = kernel.datapath.changes_in_place();
    assert_eq!(in_place, 3 * changes as u64 / 4, "S0 → S1 → S2 → S1 in place, back to S0 by a switch");
    assert_eq!(kernel.datapath.generation(), changes as u32 + 1);
}
