//! A policy switch is atomic: under continuous traffic through the real XDP
//! program, flipping between two policies hundreds of times never judges a
//! packet by one policy's identities and the other's rules; and the barrier
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

/// Under A, 10.1.0.5 is `a` (numeric identity 256) and may reach port 80;
/// `z` (257) may reach 83.
const A: &str = r#"
apiVersion: bulkhead/v1
kind: SegmentPolicy
metadata: {name: a}
spec:
  identities:
    - {name: a, addresses: ["10.1.0.5"]}
    - {name: z, addresses: ["10.1.0.6"]}
  rules:
    - {name: a-out, from: [{identity: a}], to: [{identity: world}], ports: ["80/tcp"]}
    - {name: z-out, from: [{identity: z}], to: [{identity: world}], ports: ["83/tcp"]}
"#;

/// Under B, 10.1.0.5 is `b` (257) and may reach port 81; `z` (256) may reach 82.
const B: &str = r#"
apiVersion: bulkhead/v1
kind: SegmentPolicy
metadata: {name: b}
spec:
  identities:
    - {name: b, addresses: ["10.1.0.5"]}
    - {name: z, addresses: ["10.1.0.4"]}
  rules:
    - {name: b-out, from: [{identity: b}], to: [{identity: world}], ports: ["81/tcp"]}
    - {name: z-out, from: [{identity: z}], to: [{identity: world}], ports: ["82/tcp"]}
"#;

const XDP_PASS: u32 = 2;

#[test]
fn flipping_policies_under_traffic_never_mixes_them() {
    let a = policy::compile(&policy::parse_str("a.yaml", A).unwrap());
    let b = policy::compile(&policy::parse_str("b.yaml", B).unwrap());
    // The premise: the numbers really are swapped between the two policies.
    assert_eq!(a.lookup_identity("10.1.0.5".parse().unwrap()).id, 256);
    assert_eq!(b.lookup_identity("10.1.0.5".parse().unwrap()).id, 257);

    let mut kernel = Kernel::load(A, false);
    let fd = kernel.datapath.program_fd(Hook::Ingress).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            // Passes per destination port 80..=83. 82 and 83 pass only if a
            // packet meets one policy's identities and the other's rules.
            let mut passed = [0u64; 4];
            let mut sent = 0u64;
            let src: IpAddr = "10.1.0.5".parse().unwrap();
            let dst: IpAddr = "192.0.2.1".parse().unwrap();
            while !stop.load(Ordering::Relaxed) {
                for (i, port) in (80..=83).enumerate() {
                    // A fresh source port each time, so conntrack never answers.
                    let source_port = 1024 + (sent % 60_000) as u16;
                    let frame = simple(src, dst, TCP, tcp(source_port, port, SYN));
                    let run = enforcer::testrun::run(fd, &frame, 1).expect("test run");
                    if run.retval == XDP_PASS {
                        passed[i] += 1;
                    }
                    sent += 1;
                }
            }
            (passed, sent)
        })
    };
    let flips = 400;
    for flip in 0..flips {
        let next = if flip % 2 == 0 { &b } else { &a };
        kernel.datapath.apply(next, false).unwrap();
        // Let some traffic meet each generation.
        std::thread::sleep(std::time::Duration::from_micros(300));
    }
    stop.store(true, Ordering::Relaxed);
    let (passed, sent) = traffic.join().unwrap();
    assert!(sent > 10_000, "only {sent} packets were sent");
    assert!(passed[0] > 0 && passed[1] > 0, "both policies were enforced during the run: {passed:?}");
    assert_eq!((passed[2], passed[3]), (0, 0), "packets judged by a mix of two policies ({sent} sent)");
    assert_eq!(kernel.datapath.generation(), flips + 1);
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
