//! The indexed describer against the reference evaluator: for generated
//! policies and packets it must give the same identities, rule and verdict;
//! and it must answer right for a policy far too big for a linear scan.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use enforcer_common::DropReason;
use ipnet::IpNet;
use policy::model::{Action, Address, Identity, Mode, Peer, Policy, PortSpec, Protocol, Rule, Selector};
use policy::{Describer, Evaluator, Location, Packet, Verdict};
use proptest::prelude::*;

/// The moment generated policies are described at: 2026-11-25T12:30:00Z.
fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_mins(29_926_830)
}

fn here() -> Location {
    Location { file: Arc::from("generated.yaml"), line: 1, column: 1 }
}

/// The node's addresses: inside the generated identity space, so the host
/// winning over a declared identity is exercised.
const HOST_ADDRESSES: [&str; 3] = ["10.1.1.9", "fd00:1:1::1", "192.0.2.1"];

const TIERS: [&str; 3] = ["web", "app", "db"];

/// A prefix in the small generated space `10.a.b.0/8..32` or `fd00:a:b::/16..128`.
/// Addresses of different identities may overlap here (validation would
/// reject that); both the evaluator and the describer then take the first
/// declared identity, so the comparison stays meaningful and covers more.
fn net_strategy() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (
            0..4u8,
            0..4u8,
            prop_oneof![Just(9u8), Just(0), any::<u8>()],
            prop_oneof![Just(8u8), Just(16), Just(24), Just(28), Just(32)]
        )
            .prop_map(|(a, b, d, len)| IpNet::new(IpAddr::V4(Ipv4Addr::new(10, a, b, d)), len).unwrap().trunc()),
        (
            0..4u16,
            0..4u16,
            prop_oneof![Just(1u16), any::<u16>()],
            prop_oneof![Just(16u8), Just(32), Just(48), Just(64), Just(127), Just(128)]
        )
            .prop_map(|(a, b, tail, len)| {
                IpNet::new(IpAddr::V6(Ipv6Addr::new(0xfd00, a, b, 0, 0, 0, 0, tail)), len).unwrap().trunc()
            }),
    ]
}

fn identity_strategy(index: usize) -> impl Strategy<Value = Identity> {
    (
        proptest::collection::vec(net_strategy(), 0..3),
        0..3usize,
        any::<bool>(),
        proptest::option::of(0..2u8),
        proptest::bool::weighted(0.25),
    )
        .prop_map(move |(nets, tier, prod, team, audit)| {
            let mut labels = BTreeMap::from([
                ("tier".to_owned(), TIERS[tier].to_owned()),
                ("env".to_owned(), if prod { "prod" } else { "dev" }.to_owned()),
            ]);
            if let Some(team) = team {
                labels.insert("team".to_owned(), format!("t{team}"));
            }
            Identity {
                name: format!("id{index}"),
                labels,
                addresses: nets.into_iter().map(|net| Address { net, location: here() }).collect(),
                mode: if audit { Mode::Audit } else { Mode::Enforce },
                location: here(),
            }
        })
}

fn labels_strategy() -> impl Strategy<Value = BTreeMap<String, String>> {
    (proptest::option::of(0..3usize), proptest::option::of(any::<bool>()), proptest::option::of(0..3u8)).prop_map(
        |(tier, prod, team)| {
            let mut labels = BTreeMap::new();
            if let Some(tier) = tier {
                labels.insert("tier".to_owned(), TIERS[tier].to_owned());
            }
            if let Some(prod) = prod {
                labels.insert("env".to_owned(), if prod { "prod" } else { "dev" }.to_owned());
            }
            if let Some(team) = team {
                // t2 is carried by nobody.
                labels.insert("team".to_owned(), format!("t{team}"));
            }
            labels
        },
    )
}

fn selector_strategy(identities: usize) -> impl Strategy<Value = Selector> {
    prop_oneof![
        (0..identities + 3).prop_map(move |i| Selector::Identity(match i {
            i if i == identities => "world".to_owned(),
            i if i == identities + 1 => "host".to_owned(),
            i if i == identities + 2 => "ghost".to_owned(),
            i => format!("id{i}"),
        })),
        labels_strategy().prop_map(Selector::Labels),
        (net_strategy(), proptest::collection::vec(net_strategy(), 0..2)).prop_map(|(cidr, except)| {
            let except = except.into_iter().filter(|e| cidr.contains(e)).collect();
            Selector::Cidr { cidr, except }
        }),
        Just(Selector::Cidr { cidr: "0.0.0.0/0".parse().unwrap(), except: vec!["10.0.0.0/8".parse().unwrap()] }),
        Just(Selector::Cidr { cidr: "::/0".parse().unwrap(), except: Vec::new() }),
    ]
}

fn port_strategy() -> impl Strategy<Value = PortSpec> {
    prop_oneof![
        (prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)], 1..100u16, 0..50u16)
            .prop_map(|(protocol, first, width)| PortSpec { protocol, first, last: first + width }),
        prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp), Just(Protocol::Icmp), Just(Protocol::Icmpv6)]
            .prop_map(|protocol| PortSpec { protocol, first: 0, last: u16::MAX }),
        (prop_oneof![Just(Protocol::Icmp), Just(Protocol::Icmpv6)], prop_oneof![Just(0u8), Just(8), Just(128)])
            .prop_map(|(protocol, t)| PortSpec {
                protocol,
                first: u16::from(t) << 8,
                last: (u16::from(t) << 8) | 0xff
            }),
    ]
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    (1..8usize).prop_flat_map(|count| {
        let identities: Vec<_> = (0..count).map(identity_strategy).collect();
        let rule = (
            any::<bool>(),
            proptest::collection::vec(selector_strategy(count), 1..3),
            proptest::collection::vec(selector_strategy(count), 1..3),
            proptest::option::of(proptest::collection::vec(port_strategy(), 1..3)),
            // No expiry, expired before now(), expiring exactly now (so
            // inactive), or expiring after it.
            0..4u8,
        );
        (identities, proptest::collection::vec(rule, 0..12)).prop_map(|(identities, rules)| Policy {
            documents: vec!["generated".to_owned()],
            identities,
            rules: rules
                .into_iter()
                .enumerate()
                .map(|(i, (deny, from, to, ports, expiry))| Rule {
                    // Not in index order, and sometimes repeated, so "first
                    // by name" (stable) is exercised.
                    name: format!("rule-{}", (i * 7) % 13),
                    action: if deny { Action::Deny } else { Action::Allow },
                    from: from.into_iter().map(|selector| Peer { selector, location: here() }).collect(),
                    to: to.into_iter().map(|selector| Peer { selector, location: here() }).collect(),
                    ports,
                    expires: match expiry {
                        0 => None,
                        1 => Some(now() - Duration::from_secs(1)),
                        2 => Some(now()),
                        _ => Some(now() + Duration::from_hours(1)),
                    },
                    location: here(),
                })
                .collect(),
        })
    })
}

fn address_strategy() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0..5u8, 0..5u8, prop_oneof![Just(0u8), Just(9), any::<u8>()])
            .prop_map(|(a, b, d)| IpAddr::V4(Ipv4Addr::new(10, a, b, d))),
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        (0..5u16, 0..5u16, prop_oneof![Just(1u16), any::<u16>()])
            .prop_map(|(a, b, tail)| IpAddr::V6(Ipv6Addr::new(0xfd00, a, b, 0, 0, 0, 0, tail))),
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
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
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn describer_agrees_with_the_reference_evaluator(
        policy in policy_strategy(),
        packets in proptest::collection::vec(packet_strategy(), 1..40),
        audit_all in proptest::bool::weighted(0.2),
        hosts in proptest::sample::subsequence(HOST_ADDRESSES.to_vec(), 0..=HOST_ADDRESSES.len()),
    ) {
        let hosts: Vec<IpAddr> = hosts.iter().map(|a| a.parse().unwrap()).collect();
        let evaluator = Evaluator::new(&policy).with_host_addresses(hosts.clone()).with_audit(audit_all).at(now());
        let describer = Describer::new(&policy, hosts, audit_all);
        for packet in &packets {
            let spec = evaluator.evaluate(packet);
            prop_assert_eq!(&describer.describe_at(packet, now()), &spec, "packet {:?}", packet);
            prop_assert_eq!(describer.identity_name(packet.src), spec.src_identity.as_str());
        }
    }
}

#[test]
fn expiry_is_judged_at_the_moment_described() {
    let text = "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: t}\nspec:\n  identities:\n    - {name: ops, addresses: [\"10.9.0.0/24\"]}\n  rules:\n    - name: break-glass\n      from: [{identity: ops}]\n      to: [{identity: world}]\n      ports: [\"22/tcp\"]\n      expires: \"2026-11-25T12:30:00Z\"\n";
    let parsed = Arc::new(policy::parse_str("t.yaml", text).unwrap());
    let describer = Describer::new(Arc::clone(&parsed), [], false);
    assert!(Arc::ptr_eq(describer.policy(), &parsed));
    let ssh = Packet { src: "10.9.0.1".parse().unwrap(), dst: "192.0.2.1".parse().unwrap(), protocol: 6, port: 22 };
    let before = describer.describe_at(&ssh, now() - Duration::from_secs(1));
    assert_eq!((before.verdict, before.rule.as_deref()), (Verdict::Forward, Some("break-glass")));
    let after = describer.describe_at(&ssh, now());
    assert_eq!((after.verdict, after.rule), (Verdict::Drop(DropReason::DefaultDeny), None));
    assert_eq!((after.src_identity.as_str(), after.dst_identity.as_str()), ("ops", "world"));
}

/// 20,000 identities (`10.a.b.c/32` and `fd00::i/128`, labelled by shard) and
/// 20,000 rules between neighbours, plus label and CIDR rules: far beyond
/// what the evaluator's scans answer quickly, so the answers are known.
#[test]
fn describes_a_policy_with_20000_identities_and_rules() {
    const N: usize = 20_000;
    let v4 = |i: usize| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + u32::try_from(i).unwrap()));
    let v6 = |i: usize| IpAddr::V6(Ipv6Addr::from(0xfd00_u128 << 112 | i as u128));
    let peer = |selector| Peer { selector, location: here() };
    let identities = (0..N)
        .map(|i| Identity {
            name: format!("svc-{i:05}"),
            labels: BTreeMap::from([("shard".to_owned(), format!("s{}", i % 100))]),
            addresses: vec![
                Address { net: IpNet::from(v4(i)), location: here() },
                Address { net: IpNet::from(v6(i)), location: here() },
            ],
            mode: if i % 1000 == 7 { Mode::Audit } else { Mode::Enforce },
            location: here(),
        })
        .collect();
    let mut rules: Vec<Rule> = (0..N)
        .map(|i| Rule {
            name: format!("allow-{i:05}"),
            action: Action::Allow,
            from: vec![peer(Selector::Identity(format!("svc-{i:05}")))],
            to: vec![peer(Selector::Identity(format!("svc-{:05}", (i + 1) % N)))],
            ports: Some(vec![PortSpec { protocol: Protocol::Tcp, first: 443, last: 443 }]),
            expires: None,
            location: here(),
        })
        .collect();
    rules.push(Rule {
        name: "deny-shard-7-ssh".to_owned(),
        action: Action::Deny,
        from: vec![peer(Selector::Labels(BTreeMap::from([("shard".to_owned(), "s7".to_owned())])))],
        to: vec![peer(Selector::Identity("world".to_owned()))],
        ports: Some(vec![PortSpec { protocol: Protocol::Tcp, first: 22, last: 22 }]),
        expires: None,
        location: here(),
    });
    rules.push(Rule {
        name: "monitoring".to_owned(),
        action: Action::Allow,
        from: vec![peer(Selector::Cidr { cidr: "192.0.2.0/24".parse().unwrap(), except: Vec::new() })],
        to: vec![peer(Selector::Cidr { cidr: "10.0.0.0/8".parse().unwrap(), except: Vec::new() })],
        ports: None,
        expires: None,
        location: here(),
    });
    let policy = Policy { documents: vec!["scale".to_owned()], identities, rules };
    // svc-00042 claims it too: the host wins.
    let host = v4(42);
    let describer = Describer::new(&policy, [host], false);
    let tcp = |src, dst, port| Packet { src, dst, protocol: 6, port };

    let d = describer.describe_at(&tcp(v4(12_345), v4(12_346), 443), now());
    assert_eq!((d.src_identity.as_str(), d.dst_identity.as_str()), ("svc-12345", "svc-12346"));
    assert_eq!((d.verdict, d.rule.as_deref()), (Verdict::Forward, Some("allow-12345")));

    // Wrong direction: default deny; towards an audit-mode identity: audit.
    let d = describer.describe_at(&tcp(v6(1008), v6(1007), 443), now());
    assert_eq!((d.src_identity.as_str(), d.dst_identity.as_str()), ("svc-01008", "svc-01007"));
    assert_eq!((d.verdict, d.rule), (Verdict::Audit(DropReason::DefaultDeny), None));

    // Labels resolved to shard s7: svc-00007, svc-00107, ...
    let d = describer.describe_at(&tcp(v4(19_907), "198.51.100.1".parse().unwrap(), 22), now());
    assert_eq!((d.src_identity.as_str(), d.dst_identity.as_str()), ("svc-19907", "world"));
    assert_eq!((d.verdict, d.rule.as_deref()), (Verdict::Drop(DropReason::DenyRule), Some("deny-shard-7-ssh")));

    // CIDR-sourced rule towards a declared identity.
    let d = describer.describe_at(&tcp("192.0.2.5".parse().unwrap(), v4(5), 8080), now());
    assert_eq!((d.src_identity.as_str(), d.dst_identity.as_str()), ("world", "svc-00005"));
    assert_eq!((d.verdict, d.rule.as_deref()), (Verdict::Forward, Some("monitoring")));

    // The host's address is `host`, and CIDR peers never match it (though
    // 10.0.0.42 is in the rule's 10.0.0.0/8).
    let d = describer.describe_at(&tcp("192.0.2.5".parse().unwrap(), host, 8080), now());
    assert_eq!(d.dst_identity, "host");
    assert_eq!((d.verdict, d.rule), (Verdict::Drop(DropReason::DefaultDeny), None));

    // A smaller policy (the first 300 identities and rules) through both.
    let small = Policy {
        documents: policy.documents.clone(),
        identities: policy.identities[..300].to_vec(),
        rules: policy.rules[..300].iter().chain(&policy.rules[N..]).cloned().collect(),
    };
    let evaluator = Evaluator::new(&small).with_host_addresses([host]).at(now());
    let describer = Describer::new(&small, [host], false);
    for (src, dst, port) in [(7, 8, 443), (107, 108, 443), (107, 400, 22), (299, 0, 443), (5, 6, 80)] {
        for packet in [tcp(v4(src), v4(dst), port), tcp(v6(src), v6(dst), port)] {
            assert_eq!(describer.describe_at(&packet, now()), evaluator.evaluate(&packet), "{packet:?}");
        }
    }
}
