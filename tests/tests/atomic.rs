//! A policy switch is atomic: under continuous traffic through the real XDP
//! program, flipping between two policies hundreds of times never judges a
//! packet by one policy's identities and the other's rules; and the barrier
//! the datapath waits on before rewriting the slot a switch left is the
//! kernel's own wait for running programs (a map-of-maps update). Needs
//! root; run through `cargo xtask test`.

mod kernel;

use std::net::IpAddr;
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// `struct bpf_map_info`'s leading fields (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct MapInfo {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

fn bpf(command: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<()> {
    // SAFETY: `attr` is a zeroed bpf_attr of the size passed; the kernel
    // reads it and the buffers it points at, alive for the call.
    let result = unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), size_of_val(attr)) };
    if result < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

fn map_info(map: BorrowedFd<'_>) -> MapInfo {
    let mut info = MapInfo::default();
    let mut attr = [0u64; 16];
    // BPF_OBJ_GET_INFO_BY_FD: bpf_fd and info_len, then the info pointer.
    attr[0] = u64::from(map.as_raw_fd().cast_unsigned()) | (size_of::<MapInfo>() as u64) << 32;
    attr[1] = (&raw mut info) as u64;
    bpf(15, &mut attr).expect("map info");
    info
}

/// The wait before a left slot is rewritten is the kernel's own: updating
/// a map-of-maps with a map returns only after an RCU grace period, when
/// every program run that began before it has ended. So the barrier must be
/// such an update, and after a wait the outer map must hold the inner one.
#[test]
fn the_slot_barrier_is_the_kernels_wait_for_running_programs() {
    const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
    let barrier = ProgramBarrier::new().expect("create the barrier maps");
    let outer = map_info(barrier.map_of_maps());
    assert_eq!(outer.map_type, BPF_MAP_TYPE_ARRAY_OF_MAPS, "only a map-of-maps update waits for programs");
    let inner_id = map_info(barrier.held_map()).id;
    for _ in 0..3 {
        barrier.wait().expect("wait for running programs");
        // BPF_MAP_LOOKUP_ELEM on a map-of-maps answers the held map's id.
        let (key, mut held) = (0u32, 0u32);
        let mut attr = [0u64; 16];
        attr[0] = u64::from(barrier.map_of_maps().as_raw_fd().cast_unsigned());
        attr[1] = (&raw const key) as u64;
        attr[2] = (&raw mut held) as u64;
        bpf(1, &mut attr).expect("look the held map up");
        assert_eq!(held, inner_id, "the update stored the held map");
    }
}
