//! The synthetic policies measured: `n` identities and as many rules, in
//! process and as the YAML file the daemon reads.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use policy::Location;
use policy::model::{Action, Address, Identity, Mode, Peer, Policy, PortSpec, Protocol, Rule, Selector};

pub fn here() -> Location {
    Location { file: Arc::from("bench"), line: 1, column: 1 }
}

pub fn v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

/// `n` identities (mostly single addresses, every 50th a /24 prefix) and as
/// many rules: identity i may reach identity i+1 on one TCP port; plus a
/// deny rule and ICMP for the probed pair (identities 0 and 1, which also
/// have IPv6 addresses).
pub fn synthetic_policy(n: usize) -> Policy {
    let peer = |i: usize| Peer { selector: Selector::Identity(format!("id{i}")), location: here() };
    let identities = (0..n)
        .map(|i| {
            let mut addresses = vec![Address {
                net: if i % 50 == 49 {
                    // Prefix k: 172.16.0.0/24, 172.16.1.0/24, ... (4096 fit, 100k needs 2000).
                    let k = i / 50;
                    format!("172.{}.{}.0/24", 16 + k / 256, k % 256).parse().unwrap()
                } else {
                    IpAddr::V4(v4(i)).into()
                },
                location: here(),
            }];
            if i < 2 {
                addresses.push(Address {
                    net: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16)).into(),
                    location: here(),
                });
            }
            Identity {
                name: format!("id{i}"),
                labels: BTreeMap::new(),
                addresses,
                mode: Mode::Enforce,
                pod: None,
                location: here(),
            }
        })
        .collect();
    let port = |protocol, first, last| PortSpec { protocol, first, last };
    let mut rules: Vec<Rule> = (0..n)
        .map(|i| Rule {
            name: format!("r{i}"),
            action: Action::Allow,
            from: vec![peer(i)],
            to: vec![peer((i + 1) % n)],
            ports: Some(vec![port(Protocol::Tcp, 1000 + (i % 1000) as u16, 1000 + (i % 1000) as u16)]),
            expires: None,
            named_ports: Vec::new(),
            side: policy::model::Side::Both,
            location: here(),
        })
        .collect();
    rules.push(Rule {
        name: "probe-icmp".into(),
        action: Action::Allow,
        from: vec![peer(0)],
        to: vec![peer(1)],
        ports: Some(vec![port(Protocol::Icmp, 0, u16::MAX), port(Protocol::Icmpv6, 0, u16::MAX)]),
        expires: None,
        named_ports: Vec::new(),
        side: policy::model::Side::Both,
        location: here(),
    });
    rules.push(Rule {
        name: "probe-deny".into(),
        action: Action::Deny,
        from: vec![peer(0)],
        to: vec![peer(1)],
        ports: Some(vec![port(Protocol::Tcp, 22, 22)]),
        expires: None,
        named_ports: Vec::new(),
        side: policy::model::Side::Both,
        location: here(),
    });
    Policy { documents: vec!["bench".into()], identities, rules, ..Policy::default() }
}

/// The synthetic policy as the YAML an operator would write.
pub fn policy_yaml(policy: &Policy, port_of_first_rule: u16) -> String {
    let n = policy.identities.len();
    let mut text =
        String::from("apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: big}\nspec:\n  identities:\n");
    for identity in &policy.identities {
        let addresses: Vec<String> = identity.addresses.iter().map(|a| format!("\"{}\"", a.net)).collect();
        let _ = writeln!(text, "    - {{name: {}, addresses: [{}]}}", identity.name, addresses.join(", "));
    }
    text += "  rules:\n";
    for i in 0..n {
        let port = if i == 0 { port_of_first_rule } else { 1000 + (i % 1000) as u16 };
        let _ = writeln!(
            text,
            "    - {{name: r{i}, from: [{{identity: id{i}}}], to: [{{identity: id{}}}], ports: [\"{port}/tcp\"]}}",
            (i + 1) % n,
        );
    }
    text
}
