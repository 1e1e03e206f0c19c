// Shared by several test binaries, each using part of it.
#![allow(dead_code)]

//! Drives the real kernel programs through `BPF_PROG_TEST_RUN` and reports
//! what they did to a frame, read from their own counters.

use enforcer::datapath::{CounterSnapshot, Datapath, Hook};
use enforcer_common::{Direction, DropReason};

/// What a program did with one frame, as its return value and counters say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    Pass,
    Drop(DropReason),
    Audit(DropReason),
    /// Passed without being counted (forwarded traffic at egress).
    Ignored,
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX;

pub struct Kernel {
    pub datapath: Datapath,
    /// The policy state the datapath's maps follow.
    pub engine: policy::Engine,
}

impl Kernel {
    /// Loads the programs and applies `policy_yaml`.
    pub fn load(policy_yaml: &str, audit_all: bool) -> Self {
        let parsed = policy::parse_str("table.yaml", policy_yaml).expect("test policy is valid");
        let mut datapath = Datapath::load().expect("load the eBPF programs (needs root)");
        let mut engine = policy::Engine::new();
        // As the daemon's: small changes are written into the live slot.
        engine.hold_freed_numbers(enforcer::datapath::MapSizes::default().rules);
        datapath.enforce(&mut engine, &parsed, audit_all).expect("apply policy");
        Self { datapath, engine }
    }

    /// Makes `policy` the whole policy; returns the new generation.
    pub fn enforce(&mut self, policy: &policy::Policy, audit_all: bool) -> u32 {
        self.datapath.enforce(&mut self.engine, policy, audit_all).expect("apply policy")
    }

    fn snapshot(&self) -> CounterSnapshot {
        self.datapath.counters().expect("read counters")
    }

    /// Runs one frame through the program at `hook` and reports the verdict,
    /// checking that exactly one counter moved, by one packet of this size.
    pub fn run(&mut self, hook: Hook, frame: &[u8]) -> Observed {
        let direction = match hook {
            Hook::Ingress | Hook::TcIngress | Hook::Calibration => Direction::Ingress,
            Hook::Egress => Direction::Egress,
        };
        let before = self.snapshot();
        let result = self.datapath.test_run(hook, frame, 1).expect("BPF_PROG_TEST_RUN");
        let after = self.snapshot();
        let mut moved = Vec::new();
        for reason in DropReason::ALL {
            let key = (reason, direction);
            let delta = |a: &CounterSnapshot, b: &CounterSnapshot, audit: bool| {
                let pick = |s: &CounterSnapshot| {
                    let map = if audit { &s.audits } else { &s.drops };
                    map.get(&key).copied().unwrap_or_default()
                };
                (pick(b).packets - pick(a).packets, pick(b).bytes - pick(a).bytes)
            };
            let (packets, bytes) = delta(&before, &after, false);
            if packets > 0 {
                moved.push((Observed::Drop(reason), packets, bytes));
            }
            let (packets, bytes) = delta(&before, &after, true);
            if packets > 0 {
                moved.push((Observed::Audit(reason), packets, bytes));
            }
        }
        let forwarded = after.forwards[&direction].packets - before.forwards[&direction].packets;
        if forwarded > 0 {
            let bytes = after.forwards[&direction].bytes - before.forwards[&direction].bytes;
            moved.push((Observed::Pass, forwarded, bytes));
        }
        assert!(moved.len() <= 1, "more than one counter moved: {moved:?}");
        let observed = match moved.first() {
            Some(&(observed, packets, bytes)) => {
                assert_eq!((packets, bytes), (1, frame.len() as u64), "counted once, with the frame's size");
                observed
            }
            None => Observed::Ignored,
        };
        let passed = match (hook, result.retval) {
            (Hook::Ingress, XDP_PASS) | (Hook::Egress | Hook::TcIngress, TC_ACT_UNSPEC) => true,
            (Hook::Ingress, XDP_DROP) | (Hook::Egress | Hook::TcIngress, TC_ACT_SHOT) => false,
            (_, other) => panic!("unexpected return value {other} (XDP_ABORTED is 0) for {observed:?}"),
        };
        assert_eq!(passed, !matches!(observed, Observed::Drop(_)), "return value disagrees with the counters");
        observed
    }

    pub fn ingress(&mut self, frame: &[u8]) -> Observed {
        self.run(Hook::Ingress, frame)
    }

    pub fn egress(&mut self, frame: &[u8]) -> Observed {
        self.run(Hook::Egress, frame)
    }
}
