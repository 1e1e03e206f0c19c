//! The compiler against the reference evaluator: whatever the kernel's maps
//! would answer (simulated by `CompiledPolicy::lookup_*`) must be what the
//! evaluator says, for hand-picked cases and for generated policies.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use enforcer_common::{
    ACTION_ALLOW, ACTION_DENY, DropReason, IDENTITY_FLAG_AUDIT, IDENTITY_FLAG_NO_RULES_FROM_WORLD, IDENTITY_HOST,
    IDENTITY_WORLD, IdentityValue, POLICY_FLAG_WHOLE_PROTOCOL,
};
use ipnet::IpNet;
use policy::model::{Action, Address, Identity, Mode, Peer, Policy, PortSpec, Protocol, Rule, Selector};
use policy::{CompiledPolicy, Evaluator, IdAssigner, Location, Packet, Verdict, compile, compile_at, compile_stable};
use proptest::prelude::*;

/// The moment generated policies are compiled and evaluated at: 2026-11-25T12:30:00Z.
fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_mins(29_926_830)
}

const THREE_TIER: &str = include_str!("../../examples/three-tier.yaml");

/// The node's addresses in generated cases (10.0.7.9 may also be claimed
/// by a generated identity: the host wins, as in the kernel).
const HOST_ADDRESSES: [&str; 2] = ["10.0.7.9", "fd00:1::1"];

/// What the kernel's maps answer, as the kernel program combines them:
/// host addresses first, identity maps, the `world` shortcut, policy
/// lookup, audit flags.
struct MapModel<'a> {
    compiled: &'a CompiledPolicy,
    hosts: Vec<IpAddr>,
    audit_all: bool,
}

impl MapModel<'_> {
    fn identity(&self, addr: IpAddr) -> IdentityValue {
        if self.hosts.contains(&addr) {
            return IdentityValue { id: IDENTITY_HOST, flags: 0 };
        }
        self.compiled.lookup_identity(addr)
    }

    fn policy_drop(&self, reason: DropReason, dst: IdentityValue) -> Verdict {
        if self.audit_all || dst.flags & IDENTITY_FLAG_AUDIT != 0 {
            Verdict::Audit(reason)
        } else {
            Verdict::Drop(reason)
        }
    }

    fn rule_name(&self, index: u32) -> String {
        self.compiled.rules[index as usize].name.clone()
    }

    fn decide(&self, packet: &Packet) -> (Verdict, Option<String>) {
        let (src, dst) = (self.identity(packet.src), self.identity(packet.dst));
        if src.id == IDENTITY_WORLD && dst.flags & IDENTITY_FLAG_NO_RULES_FROM_WORLD != 0 {
            return (self.policy_drop(DropReason::DefaultDeny, dst), None);
        }
        match self.compiled.lookup_policy(src.id, dst.id, packet.protocol, packet.port) {
            None => (self.policy_drop(DropReason::DefaultDeny, dst), None),
            Some(value) if value.action == ACTION_ALLOW => (Verdict::Forward, Some(self.rule_name(value.rule_index))),
            Some(value) if value.action == ACTION_DENY => {
                (self.policy_drop(DropReason::DenyRule, dst), Some(self.rule_name(value.rule_index)))
            }
            Some(value) => panic!("unknown action {}", value.action),
        }
    }

    fn decide_orphan_fragment(&self, packet: &Packet) -> (Verdict, Option<String>) {
        let (src, dst) = (self.identity(packet.src), self.identity(packet.dst));
        match self.compiled.lookup_policy(src.id, dst.id, packet.protocol, 0) {
            Some(v) if v.action == ACTION_ALLOW && v.flags & POLICY_FLAG_WHOLE_PROTOCOL != 0 => {
                (Verdict::Forward, Some(self.rule_name(v.rule_index)))
            }
            _ => (self.policy_drop(DropReason::FragmentUnknown, dst), None),
        }
    }
}

/// The verdict and deciding rule the compiled maps give a packet.
fn compiled_decision(compiled: &CompiledPolicy, packet: &Packet) -> (Verdict, Option<String>) {
    MapModel { compiled, hosts: Vec::new(), audit_all: false }.decide(packet)
}

fn tcp(src: &str, dst: &str, port: u16) -> Packet {
    Packet { src: src.parse().unwrap(), dst: dst.parse().unwrap(), protocol: 6, port }
}

#[test]
fn three_tier_compiles_to_the_expected_verdicts() {
    let parsed = policy::parse_str("three-tier.yaml", THREE_TIER).unwrap();
    let compiled = compile(&parsed);
    let cases = [
        (tcp("10.0.1.10", "10.0.2.10", 8080), Verdict::Forward, Some("gateway-to-logic")),
        (tcp("10.0.1.10", "10.0.3.10", 5432), Verdict::Drop(DropReason::DenyRule), Some("gateway-never-touches-data")),
        (tcp("10.0.1.10", "10.0.3.10", 22), Verdict::Forward, Some("gateway-admin-to-db")),
        (tcp("10.0.2.10", "10.0.1.10", 8080), Verdict::Drop(DropReason::DefaultDeny), None),
        (tcp("10.0.9.10", "10.0.3.10", 5432), Verdict::Drop(DropReason::DefaultDeny), None),
        // 10.0.3.11 is not db (db is a single address): world.
        (tcp("10.0.2.10", "10.0.3.11", 5432), Verdict::Drop(DropReason::DefaultDeny), None),
    ];
    for (packet, verdict, rule) in cases {
        let got = compiled_decision(&compiled, &packet);
        assert_eq!(got, (verdict, rule.map(str::to_owned)), "{packet:?}");
        let spec = Evaluator::new(&parsed).evaluate(&packet);
        assert_eq!((spec.verdict, spec.rule), got, "evaluator disagrees on {packet:?}");
    }
    assert_eq!(compiled.lookup_identity("192.0.2.1".parse().unwrap()).id, IDENTITY_WORLD);
    assert_eq!(compiled.atom_owner(compiled.lookup_identity("10.0.3.10".parse().unwrap()).id), Some("db"));
}

#[test]
fn single_addresses_and_prefixes_become_identity_entries() {
    let parsed = policy::parse_str("three-tier.yaml", THREE_TIER).unwrap();
    let compiled = compile(&parsed);
    let nets: Vec<String> = compiled.identity_entries.iter().map(|e| e.net.to_string()).collect();
    assert_eq!(nets, ["10.0.1.0/24", "10.0.2.0/24", "10.0.3.10/32"]);
}

#[test]
fn cidr_except_splits_an_identity_into_atoms() {
    let text = "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: t}\nspec:\n  identities:\n    - name: web\n      addresses: [\"10.1.0.0/16\"]\n  rules:\n    - name: part-of-web\n      from: [{cidr: \"10.1.0.0/17\", except: [\"10.1.1.0/24\"]}]\n      to: [{identity: world}]\n      ports: [\"443/tcp\"]\n";
    let parsed = policy::parse_str("t.yaml", text).unwrap();
    let compiled = compile(&parsed);
    let inside = compiled.lookup_identity("10.1.2.3".parse().unwrap()).id;
    let excepted = compiled.lookup_identity("10.1.1.3".parse().unwrap()).id;
    let outside = compiled.lookup_identity("10.1.200.3".parse().unwrap()).id;
    assert_ne!(inside, excepted);
    assert_eq!(excepted, outside, "addresses outside the CIDR peer share web's plain atom");
    assert_eq!(compiled.atom_owner(inside), Some("web"));
    let allowed = compiled.lookup_policy(inside, IDENTITY_WORLD, 6, 443).unwrap();
    assert_eq!(allowed.action, ACTION_ALLOW);
    assert!(compiled.lookup_policy(excepted, IDENTITY_WORLD, 6, 443).is_none());
}

#[test]
fn port_ranges_become_few_prefixes() {
    let text = "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: t}\nspec:\n  rules:\n    - name: range\n      from: [{identity: world}]\n      to: [{identity: world}]\n      ports: [\"1-65535/tcp\", \"1024-2047/udp\"]\n";
    let compiled = compile(&policy::parse_str("t.yaml", text).unwrap());
    // 1-65535 is 16 aligned blocks; 1024-2047 is exactly one.
    assert_eq!(compiled.policy_entries.len(), 17);
    assert!(compiled.lookup_policy(IDENTITY_WORLD, IDENTITY_WORLD, 6, 0).is_none(), "port 0 is not in 1-65535");
    assert!(compiled.lookup_policy(IDENTITY_WORLD, IDENTITY_WORLD, 6, 65535).is_some());
    assert!(compiled.lookup_policy(IDENTITY_WORLD, IDENTITY_WORLD, 17, 2047).is_some());
    assert!(compiled.lookup_policy(IDENTITY_WORLD, IDENTITY_WORLD, 17, 2048).is_none());
}

// ---- generated policies ----------------------------------------------------

fn here() -> Location {
    Location { file: Arc::from("generated.yaml"), line: 1, column: 1 }
}

const TIERS: [&str; 3] = ["web", "app", "db"];

/// Identity `i` lives in 10.i.0.0/16 (as a /16, a /24 or a single address)
/// or in `fd00:i::/32`, so identities never overlap.
fn identity_strategy(index: usize) -> impl Strategy<Value = Identity> {
    (0..4usize, 0..3usize, any::<bool>(), 0..4u8).prop_map(move |(shape, tier, prod, mode)| {
        let i = index as u8;
        let net: IpNet = match shape {
            0 => format!("10.{i}.0.0/16").parse().unwrap(),
            1 => format!("10.{i}.7.0/24").parse().unwrap(),
            2 => format!("10.{i}.7.9/32").parse().unwrap(),
            _ => format!("fd00:{i}::/32").parse().unwrap(),
        };
        let mut labels = BTreeMap::new();
        labels.insert("tier".to_owned(), TIERS[tier].to_owned());
        labels.insert("env".to_owned(), if prod { "prod" } else { "dev" }.to_owned());
        Identity {
            name: format!("id{index}"),
            labels,
            addresses: vec![Address { net, location: here() }],
            mode: if mode == 0 { Mode::Audit } else { Mode::Enforce },
            pod: None,
            location: here(),
        }
    })
}

fn selector_strategy(identities: usize) -> impl Strategy<Value = Selector> {
    prop_oneof![
        (0..identities + 2).prop_map(move |i| Selector::Identity(match i {
            i if i == identities => "world".to_owned(),
            i if i == identities + 1 => "host".to_owned(),
            i => format!("id{i}"),
        })),
        (0..3usize).prop_map(|t| Selector::Labels(BTreeMap::from([("tier".to_owned(), TIERS[t].to_owned())]))),
        Just(Selector::Labels(BTreeMap::from([("env".to_owned(), "prod".to_owned())]))),
        (0..6u8, 8..=24u8, proptest::option::of(0..3u8)).prop_map(|(second, len, except)| {
            let cidr: IpNet = IpNet::new(IpAddr::V4(Ipv4Addr::new(10, second, 7, 0)), len).unwrap().trunc();
            let except = except
                .map(|_| IpNet::new(IpAddr::V4(Ipv4Addr::new(10, second, 7, 9)), 32).unwrap())
                .filter(|e| cidr.contains(e) && *e != cidr)
                .into_iter()
                .collect();
            Selector::Cidr { cidr, except }
        }),
    ]
}

fn port_strategy() -> impl Strategy<Value = PortSpec> {
    prop_oneof![
        (prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)], 1..100u16, 0..50u16)
            .prop_map(|(protocol, first, width)| PortSpec { protocol, first, last: first + width }),
        prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp), Just(Protocol::Icmp), Just(Protocol::Icmpv6)]
            .prop_map(|protocol| PortSpec { protocol, first: 0, last: u16::MAX }),
        (
            prop_oneof![Just(Protocol::Icmp), Just(Protocol::Icmpv6)],
            prop_oneof![Just(0u8), Just(3), Just(8), Just(128)]
        )
            .prop_map(|(protocol, t)| PortSpec {
                protocol,
                first: u16::from(t) << 8,
                last: (u16::from(t) << 8) | 0xff
            }),
    ]
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    (1..6usize).prop_flat_map(|count| {
        let identities: Vec<_> = (0..count).map(identity_strategy).collect();
        let rule = (
            any::<bool>(),
            proptest::collection::vec(selector_strategy(count), 1..3),
            proptest::collection::vec(selector_strategy(count), 1..3),
            proptest::option::of(proptest::collection::vec(port_strategy(), 1..3)),
            // No expiry, expired before now(), or expiring after it.
            0..3u8,
        );
        (identities, proptest::collection::vec(rule, 0..8)).prop_map(|(identities, rules)| Policy {
            documents: vec!["generated".to_owned()],
            identities,
            rules: rules
                .into_iter()
                .enumerate()
                .map(|(i, (deny, from, to, ports, expiry))| Rule {
                    // Names not in index order, so "first by name" is exercised.
                    name: format!("rule-{}", (i * 7) % 11),
                    action: if deny { Action::Deny } else { Action::Allow },
                    from: from.into_iter().map(|selector| Peer { selector, location: here() }).collect(),
                    to: to.into_iter().map(|selector| Peer { selector, location: here() }).collect(),
                    ports,
                    named_ports: Vec::new(),
                    expires: match expiry {
                        0 => None,
                        1 => Some(now() - Duration::from_secs(1)),
                        _ => Some(now() + Duration::from_hours(1)),
                    },
                    side: policy::model::Side::Both,
                    location: here(),
                })
                .collect(),
            ..Policy::default()
        })
    })
}

fn address_strategy() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0..6u8, prop_oneof![Just(7u8), any::<u8>()], prop_oneof![Just(9u8), any::<u8>()])
            .prop_map(|(b, c, d)| IpAddr::V4(Ipv4Addr::new(10, b, c, d))),
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        (0..6u16, any::<u16>()).prop_map(|(i, tail)| IpAddr::V6(Ipv6Addr::new(0xfd00, i, 0, 0, 0, 0, 0, tail))),
        (0..HOST_ADDRESSES.len()).prop_map(|i| HOST_ADDRESSES[i].parse().unwrap()),
    ]
}

fn packet_strategy() -> impl Strategy<Value = Packet> {
    (
        address_strategy(),
        address_strategy(),
        prop_oneof![Just(6u8), Just(17), Just(1), Just(58), Just(47)],
        prop_oneof![0..160u16, any::<u16>()],
    )
        .prop_map(|(src, dst, protocol, port)| Packet { src, dst, protocol, port })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn compiled_maps_agree_with_the_reference_evaluator(
        policy in policy_strategy(),
        packets in proptest::collection::vec(packet_strategy(), 1..40),
        audit_all in proptest::bool::weighted(0.2),
    ) {
        // Generated names can repeat; keep the first of each, as validation would demand.
        let mut policy = policy;
        let mut seen = std::collections::HashSet::new();
        policy.rules.retain(|r| seen.insert(r.name.clone()));
        let compiled = compile_at(&policy, now());
        // The `world` shortcut flag marks exactly the destinations with no
        // (world, destination) policy entry.
        let reached_from_world: std::collections::HashSet<u32> = compiled
            .policy_entries
            .iter()
            .filter(|e| u32::from_be_bytes(e.key.src_identity) == IDENTITY_WORLD)
            .map(|e| u32::from_be_bytes(e.key.dst_identity))
            .collect();
        for entry in &compiled.identity_entries {
            let flagged = entry.flags & IDENTITY_FLAG_NO_RULES_FROM_WORLD != 0;
            prop_assert_eq!(flagged, !reached_from_world.contains(&entry.id), "identity entry {:?}", entry);
        }
        let hosts: Vec<IpAddr> = HOST_ADDRESSES.iter().map(|a| a.parse().unwrap()).collect();
        let model = MapModel { compiled: &compiled, hosts: hosts.clone(), audit_all };
        let evaluator = Evaluator::new(&policy).with_host_addresses(hosts).with_audit(audit_all).at(now());
        for packet in &packets {
            let spec = evaluator.evaluate(packet);
            prop_assert_eq!((spec.verdict, spec.rule), model.decide(packet), "packet {:?}", packet);
            let spec = evaluator.evaluate_orphan_fragment(packet);
            prop_assert_eq!((spec.verdict, spec.rule), model.decide_orphan_fragment(packet), "orphan fragment {:?}", packet);
        }
    }
}

/// Checks that `stable` is `fresh` with its atoms renumbered: the same
/// atoms in the same order (owner, flags), a one-to-one renumbering, and the
/// same identity and policy entries once renumbered.
fn assert_renumbered(fresh: &CompiledPolicy, stable: &CompiledPolicy) -> Result<(), TestCaseError> {
    prop_assert_eq!(fresh.atoms.len(), stable.atoms.len());
    let mut renumber = std::collections::HashMap::new();
    let mut taken = std::collections::HashSet::new();
    for (f, s) in fresh.atoms.iter().zip(&stable.atoms) {
        prop_assert_eq!((&f.owner, f.flags), (&s.owner, s.flags));
        prop_assert!(taken.insert(s.id), "number {} given to two atoms", s.id);
        renumber.insert(f.id, s.id);
    }
    let id = |n: u32| renumber.get(&n).copied().unwrap_or(n);
    let entries: Vec<_> = fresh.identity_entries.iter().map(|e| (e.net, id(e.id), e.flags)).collect();
    let stable_entries: Vec<_> = stable.identity_entries.iter().map(|e| (e.net, e.id, e.flags)).collect();
    prop_assert_eq!(entries, stable_entries);
    let key = |src: u32, dst: u32, e: &policy::compile::PolicyEntry| {
        (src, dst, e.key.protocol, e.key.port, e.prefix_len, e.value.action, e.value.rule_index, e.value.flags)
    };
    let mut policy: Vec<_> = fresh
        .policy_entries
        .iter()
        .map(|e| key(id(u32::from_be_bytes(e.key.src_identity)), id(u32::from_be_bytes(e.key.dst_identity)), e))
        .collect();
    let mut stable_policy: Vec<_> = stable
        .policy_entries
        .iter()
        .map(|e| key(u32::from_be_bytes(e.key.src_identity), u32::from_be_bytes(e.key.dst_identity), e))
        .collect();
    policy.sort_unstable();
    stable_policy.sort_unstable();
    prop_assert_eq!(policy, stable_policy);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A sequence of policies compiled with one [`IdAssigner`] gives, at
    /// every step, exactly what a compile from scratch gives, renumbered;
    /// compiling the same policy again renumbers nothing.
    #[test]
    fn stable_numbering_compiles_what_a_fresh_compile_does(
        policies in proptest::collection::vec(policy_strategy(), 1..5),
    ) {
        let mut ids = IdAssigner::default();
        for mut policy in policies {
            let mut seen = std::collections::HashSet::new();
            policy.rules.retain(|r| seen.insert(r.name.clone()));
            let stable = compile_stable(&policy, now(), &mut ids);
            assert_renumbered(&compile_at(&policy, now()), &stable)?;
            let again = compile_stable(&policy, now(), &mut ids);
            let numbers = |c: &CompiledPolicy| c.atoms.iter().map(|a| a.id).collect::<Vec<_>>();
            prop_assert_eq!(numbers(&stable), numbers(&again));
            prop_assert_eq!(ids.len(), stable.atoms.len() - 2, "every atom but world and host is numbered by the assigner");
        }
    }
}

#[test]
fn adding_an_identity_renumbers_no_other() {
    let policy = |extra: &str| {
        let text = format!(
            "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {{name: t}}\nspec:\n  identities:\n{extra}    - {{name: web, addresses: [\"10.1.0.0/24\"]}}\n    - {{name: db, addresses: [\"10.2.0.10\"]}}\n  rules:\n    - {{name: web-db, from: [{{identity: web}}], to: [{{identity: db}}], ports: [\"5432/tcp\"]}}\n    - {{name: lan, from: [{{cidr: \"10.0.0.0/8\"}}], to: [{{identity: db}}], ports: [\"22/tcp\"]}}\n"
        );
        policy::parse_str("t.yaml", &text).unwrap()
    };
    let before = policy("");
    // Its address sorts before every other, so a fresh compile renumbers them.
    let after = policy("    - {name: aaa, addresses: [\"10.0.0.1\"]}\n");
    let id = |c: &CompiledPolicy, addr: &str| c.lookup_identity(addr.parse().unwrap()).id;
    let (fresh_before, fresh_after) = (compile_at(&before, now()), compile_at(&after, now()));
    assert_ne!(id(&fresh_before, "10.1.0.5"), id(&fresh_after, "10.1.0.5"), "a fresh compile renumbers");
    let mut ids = IdAssigner::default();
    let first = compile_stable(&before, now(), &mut ids);
    let second = compile_stable(&after, now(), &mut ids);
    for addr in ["10.1.0.5", "10.2.0.10", "10.3.0.1"] {
        assert_eq!(id(&first, addr), id(&second, addr), "{addr} keeps its number");
    }
    assert!(first.atoms.iter().all(|a| a.id != id(&second, "10.0.0.1")), "the new identity gets a new number");
    // Its policy entries are the only ones added.
    let keys = |c: &CompiledPolicy| {
        c.policy_entries.iter().map(|e| (e.key, e.prefix_len)).collect::<std::collections::HashSet<_>>()
    };
    assert!(keys(&first).is_subset(&keys(&second)));
}

#[test]
fn expired_rules_lapse_by_themselves() {
    let text = "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: t}\nspec:\n  identities:\n    - {name: ops, addresses: [\"10.9.0.0/24\"]}\n  rules:\n    - name: break-glass\n      from: [{identity: ops}]\n      to: [{identity: world}]\n      ports: [\"22/tcp\"]\n      expires: \"2026-11-25T12:30:00Z\"\n";
    let parsed = policy::parse_str("t.yaml", text).unwrap();
    let before = now() - Duration::from_secs(1);
    let compiled = compile_at(&parsed, before);
    assert_eq!(compiled.rules.len(), 1);
    assert_eq!(compiled.next_expiry, Some(now()));
    let ops = compiled.lookup_identity("10.9.0.1".parse().unwrap()).id;
    assert!(compiled.lookup_policy(ops, IDENTITY_WORLD, 6, 22).is_some());
    let after = compile_at(&parsed, now());
    assert!(after.rules.is_empty() && after.policy_entries.is_empty() && after.next_expiry.is_none());
    let ssh = tcp("10.9.0.1", "192.0.2.1", 22);
    assert_eq!(Evaluator::new(&parsed).at(before).evaluate(&ssh).verdict, Verdict::Forward);
    assert_eq!(Evaluator::new(&parsed).at(now()).evaluate(&ssh).verdict, Verdict::Drop(DropReason::DefaultDeny));
}
