//! The reference evaluator: the policy's meaning, written as directly as
//! possible from the source form. It is the specification that the compiler
//! and the kernel program are tested against, and what `policy explain` uses.

use std::net::IpAddr;

use enforcer_common::DropReason;

use crate::model::{Action, Identity, Policy, PortSpec, Rule, Selector, WORLD};

/// What the evaluator needs to know about a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number.
    pub protocol: u8,
    /// Destination port for TCP/UDP, `type << 8 | code` for ICMP, else 0.
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    Drop(DropReason),
}

/// The evaluator's answer, with enough context to explain it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub src_identity: String,
    pub dst_identity: String,
    /// The deciding rule; `None` for the zero-trust default.
    pub rule: Option<String>,
}

/// Evaluates packets against one policy.
pub struct Evaluator<'p> {
    policy: &'p Policy,
    /// Rules by name: when several rules of the winning action match, the
    /// first by name is reported, so the answer never depends on file order.
    rules: Vec<&'p Rule>,
}

impl<'p> Evaluator<'p> {
    #[must_use]
    pub fn new(policy: &'p Policy) -> Self {
        let mut rules: Vec<&Rule> = policy.rules.iter().collect();
        rules.sort_by(|a, b| a.name.cmp(&b.name));
        Self { policy, rules }
    }

    /// The declared identity owning `addr`, or `None` for `world`.
    #[must_use]
    pub fn identity_of(&self, addr: IpAddr) -> Option<&'p Identity> {
        self.policy
            .identities
            .iter()
            .find(|identity| identity.addresses.iter().any(|a| a.net.contains(&addr)))
    }

    #[must_use]
    pub fn evaluate(&self, packet: &Packet) -> Decision {
        let src = self.identity_of(packet.src);
        let dst = self.identity_of(packet.dst);
        let matches = |rule: &Rule| {
            rule.from
                .iter()
                .any(|p| selector_matches(&p.selector, packet.src, src))
                && rule
                    .to
                    .iter()
                    .any(|p| selector_matches(&p.selector, packet.dst, dst))
                && ports_match(rule.ports.as_deref(), packet.protocol, packet.port)
        };
        let deny = self
            .rules
            .iter()
            .find(|r| r.action == Action::Deny && matches(r));
        let allow = || {
            self.rules
                .iter()
                .find(|r| r.action == Action::Allow && matches(r))
        };
        let (verdict, rule) = match deny {
            Some(rule) => (Verdict::Drop(DropReason::DenyRule), Some(rule)),
            None => match allow() {
                Some(rule) => (Verdict::Forward, Some(rule)),
                None => (Verdict::Drop(DropReason::DefaultDeny), None),
            },
        };
        Decision {
            verdict,
            src_identity: src.map_or(WORLD, |i| i.name.as_str()).to_owned(),
            dst_identity: dst.map_or(WORLD, |i| i.name.as_str()).to_owned(),
            rule: rule.map(|r| r.name.clone()),
        }
    }
}

fn selector_matches(selector: &Selector, addr: IpAddr, owner: Option<&Identity>) -> bool {
    match selector {
        Selector::Identity(name) => match owner {
            Some(identity) => identity.name == *name,
            None => name == WORLD,
        },
        Selector::Labels(wanted) => owner.is_some_and(|identity| {
            wanted
                .iter()
                .all(|(k, v)| identity.labels.get(k) == Some(v))
        }),
        Selector::Cidr { cidr, except } => {
            cidr.contains(&addr) && !except.iter().any(|e| e.contains(&addr))
        }
    }
}

fn ports_match(ports: Option<&[PortSpec]>, protocol: u8, port: u16) -> bool {
    ports.is_none_or(|specs| {
        specs.iter().any(|spec| {
            spec.protocol.number() == protocol && (spec.first..=spec.last).contains(&port)
        })
    })
}
