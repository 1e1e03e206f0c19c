//! The incremental engine against the full compiler: for random sequences
//! of changes to several sources, the engine accepts exactly what full
//! validation accepts, its diffs replayed from empty maps give exactly its
//! state, and that state is a full compile of the same policy entry for
//! entry, modulo the numbering of atoms and rules. What the engine says of
//! a packet (`Engine::describe`, which names kernel events) is the
//! reference evaluator's answer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use enforcer_common::{IDENTITY_HOST, IDENTITY_WORLD, IdentityValue, PolicyKeyData, PolicyValue};
use ipnet::IpNet;
use policy::engine::{Contents, Engine, EntryDiff, SourceChange};
use policy::kubernetes::{LabelSelector, Namespace, Operator, Requirement};
use policy::model::{
    Action, Address, Enforcement, Identity, Mode, NamedPort, NamespaceScope, Peer, PodInfo, PodPeer, Policy, PortName,
    PortSpec, Protocol, Rule, Selector, Side,
};
use policy::{CompiledPolicy, IdAssigner, Location, compile_enforcing};
use proptest::prelude::*;

fn start() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000)
}

fn here() -> Location {
    Location { file: Arc::from("generated.yaml"), line: 1, column: 1 }
}

/// A tiny deterministic generator, so one proptest seed drives a whole
/// sequence of structured changes.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % sides as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.roll(items.len())]
    }
}

const NETS: [&str; 14] = [
    "10.0.0.1/32",
    "10.0.0.2/32",
    "10.0.1.5/32",
    "10.0.1.0/24",
    "10.0.2.0/24",
    "10.0.2.7/32",
    "10.0.0.0/16",
    "10.1.0.0/16",
    "10.1.3.3/32",
    "192.168.0.9/32",
    "fd00::1/128",
    "fd00::2/128",
    "fd00:1::/64",
    "fd00::/16",
];

fn identity(dice: &mut Dice, index: usize) -> Identity {
    let addresses =
        (0..dice.roll(3)).map(|_| Address { net: dice.pick(&NETS).parse().unwrap(), location: here() }).collect();
    let pod = (dice.roll(3) == 0).then(|| pod(dice));
    Identity { name: format!("id{index}"), labels: labels(dice), addresses, mode: mode(dice), pod, location: here() }
}

/// What makes an identity a pod: a namespace, and a named port or none.
fn pod(dice: &mut Dice) -> PodInfo {
    let ports = match dice.roll(3) {
        0 => Vec::new(),
        _ => vec![NamedPort { name: "http".to_owned(), protocol: Protocol::Tcp, port: *dice.pick(&[80, 85]) }],
    };
    PodInfo { namespace: dice.pick(&["x", "y"]).to_string(), ports, name: format!("p{}", dice.roll(100)) }
}

/// Another pod alike `pod` (a replica), at other addresses: the same
/// identity, so it may be declared beside it, in any source.
fn replica(dice: &mut Dice, pod: &Identity) -> Identity {
    let mut replica = pod.clone();
    replica.addresses =
        (0..=dice.roll(2)).map(|_| Address { net: dice.pick(&NETS).parse().unwrap(), location: here() }).collect();
    if let Some(info) = &mut replica.pod {
        info.name = format!("p{}", dice.roll(100));
    }
    replica
}

/// Declarations of the namespaces pods are in (or not: an undeclared
/// namespace is known by its name only).
fn namespaces(dice: &mut Dice) -> Vec<Namespace> {
    let mut declared = Vec::new();
    for name in ["x", "y"] {
        if dice.roll(2) == 0 {
            let labels = BTreeMap::from([("team".to_owned(), dice.pick(&["a", "b"]).to_string())]);
            declared.push(Namespace { name: name.to_owned(), labels, location: here() });
        }
    }
    declared
}

fn pod_selector(dice: &mut Dice) -> PodPeer {
    let mut pods = LabelSelector { match_labels: labels(dice), match_expressions: Vec::new() };
    if dice.roll(3) == 0 {
        let (key, operator) = *dice.pick(&[
            ("tier", Operator::In),
            ("env", Operator::NotIn),
            ("env", Operator::Exists),
            ("tier", Operator::DoesNotExist),
        ]);
        let values = if matches!(operator, Operator::In | Operator::NotIn) {
            vec!["web".to_owned(), "prod".to_owned()]
        } else {
            Vec::new()
        };
        pods.match_expressions.push(Requirement { key: key.to_owned(), operator, values });
    }
    let namespaces = match dice.roll(3) {
        0 => NamespaceScope::Matching(LabelSelector {
            match_labels: [("team".to_owned(), dice.pick(&["a", "b"]).to_string())].into(),
            match_expressions: Vec::new(),
        }),
        1 => NamespaceScope::Matching(LabelSelector::default()),
        _ => NamespaceScope::Named(dice.pick(&["x", "y"]).to_string()),
    };
    PodPeer { namespaces, pods }
}

fn labels(dice: &mut Dice) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    if dice.roll(3) > 0 {
        labels.insert("tier".to_owned(), dice.pick(&["web", "app", "db"]).to_string());
    }
    if dice.roll(2) > 0 {
        labels.insert("env".to_owned(), dice.pick(&["prod", "dev"]).to_string());
    }
    labels
}

fn mode(dice: &mut Dice) -> Mode {
    if dice.roll(5) == 0 { Mode::Audit } else { Mode::Enforce }
}

fn selector(dice: &mut Dice) -> Selector {
    match dice.roll(11) {
        9 | 10 => Selector::Pods(pod_selector(dice)),
        0..=3 => Selector::Identity(format!("id{}", dice.roll(8))),
        4 => Selector::Identity(dice.pick(&["world", "host"]).to_string()),
        5 | 6 => {
            let mut wanted = labels(dice);
            if wanted.is_empty() && dice.roll(3) > 0 {
                wanted.insert("tier".to_owned(), "web".to_owned());
            }
            Selector::Labels(wanted)
        }
        _ => {
            let cidr: IpNet =
                dice.pick(&["10.0.0.0/16", "10.0.1.0/24", "0.0.0.0/0", "10.0.0.0/8", "fd00::/16"]).parse().unwrap();
            let except = match dice.roll(3) {
                0 => vec![dice.pick(&["10.0.1.5/32", "10.0.2.0/24", "10.0.0.0/24", "fd00::1/128"]).parse().unwrap()],
                _ => Vec::new(),
            };
            let except = except.into_iter().filter(|e: &IpNet| cidr.contains(e) && *e != cidr).collect();
            Selector::Cidr { cidr, except }
        }
    }
}

fn rule(dice: &mut Dice, index: usize, now: SystemTime) -> Rule {
    let peers =
        |dice: &mut Dice| (0..=dice.roll(2)).map(|_| Peer { selector: selector(dice), location: here() }).collect();
    let ports = match dice.roll(4) {
        0 => None,
        _ => Some(
            (0..=dice.roll(2))
                .map(|_| match dice.roll(5) {
                    0 => PortSpec { protocol: Protocol::Tcp, first: 80, last: 80 },
                    1 => PortSpec { protocol: Protocol::Tcp, first: 70, last: 90 },
                    2 => PortSpec { protocol: Protocol::Udp, first: 0, last: u16::MAX },
                    3 => PortSpec { protocol: Protocol::Icmp, first: 8 << 8, last: (8 << 8) | 0xff },
                    _ => PortSpec { protocol: Protocol::Tcp, first: 1000, last: 1000 + dice.roll(3) as u16 },
                })
                .collect(),
        ),
    };
    let named_ports = if ports.is_some() && dice.roll(3) == 0 {
        vec![PortName { protocol: Protocol::Tcp, name: "http".to_owned() }]
    } else {
        Vec::new()
    };
    let side = *dice.pick(&[Side::Both, Side::Both, Side::Ingress, Side::Egress]);
    let action = if side == Side::Both && dice.roll(4) == 0 { Action::Deny } else { Action::Allow };
    // One end of a rule for one end is the pods it isolates.
    let (from, to) = match side {
        Side::Ingress => (peers(dice), vec![Peer { selector: Selector::Pods(pod_selector(dice)), location: here() }]),
        Side::Egress => (vec![Peer { selector: Selector::Pods(pod_selector(dice)), location: here() }], peers(dice)),
        Side::Both => (peers(dice), peers(dice)),
    };
    Rule {
        name: format!("rule-{index}"),
        action,
        from,
        to,
        ports,
        named_ports,
        side,
        expires: match dice.roll(6) {
            0 => Some(now + Duration::from_secs(30)),
            1 => Some(now + Duration::from_secs(150)),
            _ => None,
        },
        location: here(),
    }
}

const SOURCES: usize = 3;

/// One random change: the sources it replaces.
fn change(dice: &mut Dice, sources: &[Policy], now: SystemTime) -> Vec<(usize, Policy)> {
    let s = dice.roll(SOURCES);
    let mut source = sources[s].clone();
    let pods: Vec<&Identity> =
        sources.iter().flat_map(|source| &source.identities).filter(|i| i.pod.is_some()).collect();
    match dice.roll(14) {
        13 if !pods.is_empty() => {
            // One more replica of a pod: the identity gains addresses.
            let of = pods[dice.roll(pods.len())];
            let alike = replica(dice, of);
            source.identities.push(alike);
        }
        12 if !source.identities.is_empty() => {
            // A pod moved, renamed a port, or an identity became or stopped
            // being a pod.
            let at = dice.roll(source.identities.len());
            source.identities[at].pod = (dice.roll(4) > 0).then(|| pod(dice));
        }
        0 | 1 => {
            let index = dice.roll(9);
            source.identities.push(identity(dice, index));
        }
        11 => source.namespaces = namespaces(dice),
        2 if !source.identities.is_empty() => {
            let at = dice.roll(source.identities.len());
            source.identities.remove(at);
        }
        3 if !source.identities.is_empty() => {
            let at = dice.roll(source.identities.len());
            let fresh = identity(dice, 0);
            source.identities[at].addresses = fresh.addresses;
        }
        4 if !source.identities.is_empty() => {
            let at = dice.roll(source.identities.len());
            source.identities[at].labels = labels(dice);
        }
        5 if !source.identities.is_empty() => {
            let at = dice.roll(source.identities.len());
            source.identities[at].mode = mode(dice);
        }
        6 | 7 => {
            let index = dice.roll(12);
            source.rules.push(rule(dice, index, now));
        }
        8 if !source.rules.is_empty() => {
            let at = dice.roll(source.rules.len());
            source.rules.remove(at);
        }
        9 if !source.rules.is_empty() => {
            let at = dice.roll(source.rules.len());
            let name = source.rules[at].name.clone();
            source.rules[at] = Rule { name, ..rule(dice, 0, now) };
        }
        10 if !source.identities.is_empty() => {
            // Move an identity to another source, in one change.
            let at = dice.roll(source.identities.len());
            let moved = source.identities.remove(at);
            let other = (s + 1) % SOURCES;
            let mut target = sources[other].clone();
            target.identities.push(moved);
            return vec![(s, source), (other, target)];
        }
        _ => {
            source = Policy::default();
            for _ in 0..dice.roll(4) {
                let index = dice.roll(9);
                source.identities.push(identity(dice, index));
            }
            for _ in 0..dice.roll(4) {
                let index = dice.roll(12);
                source.rules.push(rule(dice, index, now));
            }
        }
    }
    vec![(s, source)]
}

fn merged(sources: &[Policy]) -> Policy {
    let mut policy = Policy::default();
    for source in sources {
        policy.identities.extend(source.identities.iter().cloned());
        policy.rules.extend(source.rules.iter().cloned());
        policy.namespaces.extend(source.namespaces.iter().cloned());
    }
    policy
}

/// Addresses probed by [`assert_describes`]: inside and around every
/// prefix the generator declares.
const PROBED: [&str; 12] = [
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.77",
    "10.0.1.5",
    "10.0.1.6",
    "10.0.2.7",
    "10.1.3.3",
    "10.9.9.9",
    "192.168.0.9",
    "fd00::1",
    "fd00:1::5",
    "2001:db8::1",
];

/// The engine describes random packets as the reference evaluator decides
/// them (audit modes aside: the kernel's verdict says that), with one of
/// the probed addresses sometimes the node's own.
fn assert_describes(dice: &mut Dice, policy: &Policy, engine: &Engine, now: SystemTime) -> Result<(), TestCaseError> {
    use policy::eval::{Evaluator, Packet, Verdict};
    let hosts: Vec<IpAddr> = if dice.roll(3) == 0 { vec![dice.pick(&PROBED).parse().unwrap()] } else { Vec::new() };
    let evaluator = Evaluator::new(policy)
        .at(now)
        .with_host_addresses(hosts.iter().copied())
        .with_enforcement(engine.enforcement());
    for _ in 0..24 {
        let src: IpAddr = dice.pick(&PROBED).parse().unwrap();
        let dst: IpAddr = dice.pick(&PROBED).parse().unwrap();
        let (protocol, port) =
            *dice.pick(&[(6, 80), (6, 85), (6, 1001), (6, 22), (17, 53), (17, 80), (1, 8 << 8), (58, 0)]);
        let packet = Packet { src, dst, protocol, port };
        let mut expected = evaluator.evaluate(&packet);
        if let Verdict::Audit(reason) = expected.verdict {
            expected.verdict = Verdict::Drop(reason);
        }
        prop_assert_eq!(engine.describe(&packet, &hosts), expected, "{:?} with host addresses {:?}", packet, hosts);
    }
    Ok(())
}

/// The maps as the diffs leave them, each diff checked against what the
/// maps held before it.
#[derive(Default)]
struct Maps {
    identities: HashMap<IpNet, IdentityValue>,
    policy: HashMap<(u32, PolicyKeyData), PolicyValue>,
    rules: HashMap<u32, String>,
}

impl Maps {
    fn replay(&mut self, diff: &EntryDiff) -> Result<(), TestCaseError> {
        for delta in &diff.identities {
            prop_assert_eq!(self.identities.get(&delta.key), delta.old.as_ref(), "old value of {}", delta.key);
            match delta.new {
                Some(value) => self.identities.insert(delta.key, value),
                None => self.identities.remove(&delta.key),
            };
        }
        for delta in &diff.policy {
            prop_assert_eq!(self.policy.get(&delta.key), delta.old.as_ref(), "old value of {:?}", delta.key);
            match delta.new {
                Some(value) => self.policy.insert(delta.key, value),
                None => self.policy.remove(&delta.key),
            };
        }
        for delta in &diff.rules {
            prop_assert_eq!(self.rules.get(&delta.key).map(String::as_str), delta.old.as_ref().map(|r| &*r.name));
            match &delta.new {
                Some(rule) => self.rules.insert(delta.key, rule.name.to_string()),
                None => self.rules.remove(&delta.key),
            };
        }
        Ok(())
    }
}

/// Checks the engine (and the replayed maps) against a full compile.
fn assert_same(fresh: &CompiledPolicy, engine: &Engine, maps: &Maps) -> Result<(), TestCaseError> {
    let mut renumber: HashMap<u32, u32> =
        HashMap::from([(IDENTITY_WORLD, IDENTITY_WORLD), (IDENTITY_HOST, IDENTITY_HOST)]);
    let engine_identities: HashMap<IpNet, IdentityValue> = engine.identity_entries().collect();
    prop_assert_eq!(&engine_identities, &maps.identities, "replayed identity diffs");
    prop_assert_eq!(
        fresh.identity_entries.len(),
        engine_identities.len(),
        "identity entries: full compile {:?}, engine {:?}",
        fresh.identity_entries,
        engine_identities
    );
    for entry in &fresh.identity_entries {
        let Some(ours) = engine_identities.get(&entry.net) else {
            return Err(TestCaseError::fail(format!("no identity entry for {}", entry.net)));
        };
        prop_assert_eq!(entry.flags, ours.flags, "flags of {}", entry.net);
        let mapped = *renumber.entry(entry.id).or_insert(ours.id);
        prop_assert_eq!(mapped, ours.id, "atom of {}", entry.net);
    }
    let mut fresh_atoms: Vec<(u32, String, u32)> = fresh
        .atoms
        .iter()
        .map(|a| (renumber.get(&a.id).copied().unwrap_or(u32::MAX), a.owner.clone(), a.flags))
        .collect();
    let mut our_atoms: Vec<(u32, String, u32)> =
        engine.atoms().map(|(id, owner, flags)| (id, owner.to_string(), flags)).collect();
    fresh_atoms.sort();
    our_atoms.sort();
    prop_assert_eq!(fresh_atoms, our_atoms, "atoms");

    let engine_policy: HashMap<(u32, PolicyKeyData), PolicyValue> =
        engine.policy_entries().map(|e| ((e.prefix_len, e.key), e.value)).collect();
    prop_assert_eq!(&engine_policy, &maps.policy, "replayed policy diffs");
    let id = |n: [u8; 4]| u32::from_be_bytes(n);
    let mut expected: Vec<_> = fresh
        .policy_entries
        .iter()
        .map(|e| {
            let src = renumber.get(&id(e.key.src_identity)).copied().unwrap_or(u32::MAX);
            let dst = renumber.get(&id(e.key.dst_identity)).copied().unwrap_or(u32::MAX);
            let rule =
                fresh.rules.get(e.value.rule_index as usize).map_or_else(|| "(open)".to_owned(), |r| r.name.clone());
            (src, dst, e.key.protocol, e.key.port, e.prefix_len, e.value.action, rule, e.value.flags)
        })
        .collect();
    let mut ours: Vec<_> = engine
        .policy_entries()
        .map(|e| {
            let rule = maps.rules.get(&e.value.rule_index).cloned().unwrap_or_else(|| "(open)".to_owned());
            (
                id(e.key.src_identity),
                id(e.key.dst_identity),
                e.key.protocol,
                e.key.port,
                e.prefix_len,
                e.value.action,
                rule,
                e.value.flags,
            )
        })
        .collect();
    expected.sort();
    ours.sort();
    prop_assert_eq!(expected, ours, "policy entries");
    let mut fresh_rules: Vec<&str> = fresh.rules.iter().map(|r| r.name.as_str()).collect();
    let mut our_rules: Vec<&str> = maps.rules.values().map(String::as_str).collect();
    fresh_rules.sort_unstable();
    our_rules.sort_unstable();
    prop_assert_eq!(fresh_rules, our_rules, "rules in force");
    prop_assert_eq!(fresh.next_expiry, engine.next_expiry());
    for addr in ["10.0.1.5", "10.0.1.6", "10.0.0.1", "10.7.7.7", "fd00::1", "fd00:1::9"] {
        let addr: IpAddr = addr.parse().unwrap();
        let want = fresh.lookup_identity(addr);
        let got = engine.lookup_identity(addr);
        prop_assert_eq!(
            (renumber.get(&want.id).copied(), want.flags),
            (Some(got.id), got.flags),
            "identity of {}",
            addr
        );
    }
    Ok(())
}

/// Atom and rule numbers freed since the last release.
#[derive(Default)]
struct Held {
    atoms: HashSet<u32>,
    rules: HashSet<u32>,
}

impl Held {
    /// Fails if `diff` gives out a held number; then holds what it frees.
    fn check(&mut self, diff: &EntryDiff) -> Result<(), TestCaseError> {
        for delta in &diff.atoms {
            prop_assert!(
                delta.old.is_some() || !self.atoms.contains(&delta.key),
                "atom {} given out again before its release",
                delta.key
            );
        }
        for delta in &diff.rules {
            prop_assert!(
                delta.old.is_some() || !self.rules.contains(&delta.key),
                "rule number {} given out again before its release",
                delta.key
            );
        }
        self.atoms.extend(diff.atoms.iter().filter(|d| d.new.is_none()).map(|d| d.key));
        self.rules.extend(diff.rules.iter().filter(|d| d.new.is_none()).map(|d| d.key));
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn incremental_changes_equal_a_full_compile(seed in 1..u64::MAX, steps in 1..40usize) {
        let mut dice = Dice(seed);
        let enforcement = if dice.roll(2) == 0 { Enforcement::Always } else { Enforcement::Default };
        let compile_at = |policy: &Policy, now| compile_enforcing(policy, now, &mut IdAssigner::default(), enforcement);
        let mut engine = Engine::with_enforcement(enforcement);
        let mut maps = Maps::default();
        let mut sources: Vec<Policy> = vec![Policy::default(); SOURCES];
        let mut now = start();
        // Half the cases hold freed numbers as the daemon does, released
        // now and then: none may come back before its release.
        let holding = dice.roll(2) == 0;
        if holding {
            engine.hold_freed_numbers(u32::MAX);
        }
        let mut held = Held::default();
        for _ in 0..steps {
            if holding && dice.roll(4) == 0 {
                let atoms: Vec<u32> = held.atoms.drain().collect();
                let rules: Vec<u32> = held.rules.drain().collect();
                engine.release_numbers(&atoms, &rules);
            }
            if dice.roll(8) == 0 {
                now += Duration::from_mins(1);
                let diff = engine.advance(now);
                if holding {
                    held.check(&diff)?;
                }
                maps.replay(&diff)?;
                assert_same(&compile_at(&merged(&sources), now), &engine, &maps)?;
                assert_describes(&mut dice, &merged(&sources), &engine, now)?;
                continue;
            }
            // The daemon packs the engine's tables after large changes:
            // packing changes nothing the engine says or does next.
            if dice.roll(4) == 0 {
                engine.compact();
                assert_same(&compile_at(&merged(&sources), now), &engine, &maps)?;
            }
            let replaced = change(&mut dice, &sources, now);
            let mut candidate = sources.clone();
            for (s, policy) in &replaced {
                candidate[*s] = policy.clone();
            }
            let valid = policy::validate(&merged(&candidate));
            let changes = replaced
                .iter()
                .map(|(s, policy)| SourceChange { source: format!("s{s}"), contents: Contents::Parsed(policy.clone()) })
                .collect();
            match engine.apply(changes, now) {
                Ok(diff) => {
                    prop_assert!(valid.is_ok(), "the engine accepted an invalid policy: {:?}", valid);
                    sources = candidate;
                    if holding {
                        held.check(&diff)?;
                    }
                    maps.replay(&diff)?;
                }
                Err(error) => {
                    let Err(expected) = valid else {
                        return Err(TestCaseError::fail(format!("the engine refused a valid policy: {error}")));
                    };
                    prop_assert_eq!(error.to_string(), expected.to_string());
                }
            }
            assert_same(&compile_at(&merged(&sources), now), &engine, &maps)?;
            assert_describes(&mut dice, &merged(&sources), &engine, now)?;
            // Peers selecting nothing are valid; the engine counts what the
            // full validator warns of.
            // (Pods not there yet are not counted: in a cluster they are the
            // rule, not a likely mistake.)
            let warned = policy::warnings(&merged(&sources));
            let counted = warned.iter().filter(|warning| !warning.message.contains("selects no pod")).count();
            prop_assert_eq!(engine.unmatched_peers(), counted);
        }
    }
}

/// A rule number freed while numbers are held comes back only after its
/// release, unless every number below the rule map's size is taken or held:
/// then the held one comes back early rather than one the map has no room for.
#[test]
fn held_rule_numbers_come_back_early_only_when_the_rule_map_is_full() {
    let text = |rules: &[&str]| {
        let mut text = String::from(
            "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: p}\nspec:\n  identities:\n    - {name: a, addresses: [\"10.0.0.1\"]}\n  rules:\n",
        );
        for rule in rules {
            let _ = writeln!(text, "    - {{name: {rule}, from: [{{identity: a}}], to: [{{identity: world}}]}}");
        }
        text
    };
    let numbers =
        |diff: &EntryDiff| -> Vec<u32> { diff.rules.iter().filter(|d| d.new.is_some()).map(|d| d.key).collect() };
    for (slots, expected) in [(2, 1), (3, 2)] {
        let mut engine = Engine::new();
        engine.hold_freed_numbers(slots);
        let mut apply = |rules: &[&str]| {
            let change = SourceChange { source: "p".into(), contents: Contents::Text(text(rules)) };
            engine.apply(vec![change], start()).unwrap()
        };
        assert_eq!(numbers(&apply(&["r0", "r1"])), [0, 1]);
        apply(&["r0"]);
        assert_eq!(numbers(&apply(&["r0", "r2"])), [expected], "rule map of {slots}");
    }
}

/// Pods alike are one identity however their declarations come and go:
/// another replica in another source adds its address; a declaration of
/// the same name that is not alike is refused as a duplicate, and accepted
/// once, in one change, it arrives as the first one leaves.
#[test]
fn pods_alike_are_one_identity_across_sources() {
    let pod = |labels: &str, pod: &str, address: &str| {
        let labels = BTreeMap::from([("app".to_owned(), labels.to_owned())]);
        let info = PodInfo { namespace: "x".to_owned(), ports: Vec::new(), name: pod.to_owned() };
        let net = address.parse().unwrap();
        Policy {
            identities: vec![Identity {
                name: "x/{app=web}".to_owned(),
                labels,
                addresses: vec![Address { net, location: here() }],
                mode: Mode::Enforce,
                pod: Some(info),
                location: here(),
            }],
            ..Policy::default()
        }
    };
    let set = |source: &str, policy: Option<Policy>| SourceChange {
        source: source.to_owned(),
        contents: policy.map_or(Contents::Removed, Contents::Parsed),
    };
    for (first, second) in [("a", "b"), ("b", "a")] {
        let mut engine = Engine::new();
        engine.apply(vec![set(first, Some(pod("web", "web-1", "10.0.0.1/32")))], start()).expect("one pod");
        let diff = engine.apply(vec![set(second, Some(pod("web", "web-2", "10.0.0.2/32")))], start()).expect("alike");
        // One identity: the second address joins the first's atom.
        let atoms: Vec<_> = engine.identity_entries().map(|(_, value)| value).collect();
        assert_eq!(diff.atoms, [], "no new atom for a replica");
        assert_eq!(atoms.len(), 2);
        assert_eq!(atoms[0], atoms[1]);
        assert_eq!(engine.identity_count(), 1);
        let packet = policy::eval::Packet {
            src: "10.0.0.2".parse().unwrap(),
            dst: "10.0.0.1".parse().unwrap(),
            protocol: 6,
            port: 80,
        };
        let described = engine.describe(&packet, &[]);
        assert_eq!((described.src_pod.as_deref(), described.dst_pod.as_deref()), (Some("x/web-2"), Some("x/web-1")));
        // Not alike: a duplicate, refused; the last good state stays. Also
        // when the first declaration leaves in the same change: the
        // replica left is not alike the newcomer.
        let refused = engine.apply(vec![set(second, Some(pod("api", "api-1", "10.0.0.2/32")))], start());
        assert!(refused.unwrap_err().to_string().contains("duplicate identity name"));
        let refused = engine.apply(vec![set("c", Some(pod("api", "api-1", "10.0.0.3/32"))), set(first, None)], start());
        assert!(refused.unwrap_err().to_string().contains("duplicate identity name"));
        // The first pod leaves as the other arrives: one declaration, valid.
        engine
            .apply(vec![set(second, Some(pod("api", "api-1", "10.0.0.2/32"))), set(first, None)], start())
            .expect("a single declaration");
        engine.apply(vec![set(first, Some(pod("api", "api-2", "10.0.0.1/32")))], start()).expect("alike the one left");
        assert_eq!(engine.identity_count(), 1);
    }
}

/// A quarantine target stands for the addresses the policy in force gives
/// it: an identity's, a pod's own (not its replicas'), or those of every
/// identity a label selector picks (within a namespace when given); and
/// again after a change, so a replacement pod is covered as it appears.
#[test]
fn quarantine_targets_resolve_to_the_addresses_in_force() {
    use policy::target::Target;
    let pod = |name: &str, namespace: &str, app: &str, ip: &str| SourceChange {
        source: format!("kubernetes:pods/{namespace}/{name}"),
        contents: Contents::Text(format!(
            r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"labels":{{"app":"{app}"}},"name":"{name}","namespace":"{namespace}"}},"spec":{{"containers":[{{"name":"c"}}]}},"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#
        )),
    };
    let file = SourceChange {
        source: "p.yaml".into(),
        contents: Contents::Text(
            "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: t}\nspec:\n  identities:\n    - {name: db, labels: {app: db}, addresses: [\"10.9.0.0/24\"]}\n".into(),
        ),
    };
    let mut engine = Engine::with_enforcement(Enforcement::Default);
    let changes = vec![
        file,
        pod("web-1", "shop", "web", "10.64.0.1"),
        pod("web-2", "shop", "web", "10.64.0.2"),
        pod("web-1", "staging", "web", "10.65.0.1"),
        pod("db-0", "shop", "db", "10.64.0.9"),
    ];
    engine.apply(changes, start()).unwrap();
    let resolve = |engine: &Engine, text: &str| {
        let mut nets: Vec<String> =
            engine.resolve_target(&Target::parse(text).unwrap()).iter().map(ToString::to_string).collect();
        nets.sort();
        nets
    };
    assert_eq!(resolve(&engine, "db"), ["10.9.0.0/24"]);
    assert_eq!(resolve(&engine, "pod/shop/web-1"), ["10.64.0.1/32"], "one pod, not its replicas");
    assert_eq!(resolve(&engine, "shop/{app=web}"), ["10.64.0.1/32", "10.64.0.2/32"], "the pods' identity");
    assert_eq!(resolve(&engine, "shop/app=web"), ["10.64.0.1/32", "10.64.0.2/32"]);
    assert_eq!(resolve(&engine, "app=web"), ["10.64.0.1/32", "10.64.0.2/32", "10.65.0.1/32"], "every namespace");
    assert_eq!(resolve(&engine, "app=db"), ["10.64.0.9/32", "10.9.0.0/24"], "pods and file identities alike");
    assert_eq!(resolve(&engine, "10.1.2.3"), ["10.1.2.3/32"]);
    assert!(resolve(&engine, "pod/shop/web-3").is_empty() && resolve(&engine, "nothing").is_empty());
    // web-1 is replaced by a pod at another address.
    let removed = SourceChange { source: "kubernetes:pods/shop/web-1".into(), contents: Contents::Removed };
    engine.apply(vec![removed, pod("web-1", "shop", "web", "10.64.0.7")], start()).unwrap();
    assert_eq!(resolve(&engine, "pod/shop/web-1"), ["10.64.0.7/32"]);
    assert_eq!(resolve(&engine, "shop/app=web"), ["10.64.0.2/32", "10.64.0.7/32"]);
}
