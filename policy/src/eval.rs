//! The reference evaluator: the policy's meaning, written as directly as
//! possible from the source form. It is the specification that the compiler
//! and the kernel program are tested against, and what `policy explain` uses.

use std::net::IpAddr;
use std::time::SystemTime;

use enforcer_common::DropReason;

use crate::model::{Action, HOST, Identity, Mode, Policy, PortSpec, Rule, Selector, WORLD};

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
    /// Passed by audit mode; the policy would have dropped it for this reason.
    Audit(DropReason),
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

/// Who owns an address.
#[derive(Debug, Clone, Copy)]
enum Owner<'p> {
    Host,
    Declared(&'p Identity),
    World,
}

impl Owner<'_> {
    fn name(&self) -> &str {
        match self {
            Owner::Host => HOST,
            Owner::Declared(identity) => &identity.name,
            Owner::World => WORLD,
        }
    }
}

/// Evaluates packets against one policy.
pub struct Evaluator<'p> {
    policy: &'p Policy,
    /// Rules by name: when several rules of the winning action match, the
    /// first by name is reported, so the answer never depends on file order.
    rules: Vec<&'p Rule>,
    /// The node's own addresses: identity `host`, whatever the policy says.
    host_addresses: Vec<IpAddr>,
    /// Daemon-wide audit mode.
    audit_all: bool,
    /// The moment evaluated: rules expired by then do not apply.
    now: SystemTime,
}

impl<'p> Evaluator<'p> {
    #[must_use]
    pub fn new(policy: &'p Policy) -> Self {
        let mut rules: Vec<&Rule> = policy.rules.iter().collect();
        rules.sort_by(|a, b| a.name.cmp(&b.name));
        Self { policy, rules, host_addresses: Vec::new(), audit_all: false, now: SystemTime::now() }
    }

    /// Evaluates as of `now` instead of the current time.
    #[must_use]
    pub fn at(mut self, now: SystemTime) -> Self {
        self.now = now;
        self
    }

    /// Declares the node's own addresses (identity `host`).
    #[must_use]
    pub fn with_host_addresses(mut self, addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        self.host_addresses = addresses.into_iter().collect();
        self
    }

    /// Daemon-wide audit mode: policy drops become audits.
    #[must_use]
    pub fn with_audit(mut self, audit_all: bool) -> Self {
        self.audit_all = audit_all;
        self
    }

    fn owner_of(&self, addr: IpAddr) -> Owner<'p> {
        if self.host_addresses.contains(&addr) {
            return Owner::Host;
        }
        self.policy
            .identities
            .iter()
            .find(|identity| identity.addresses.iter().any(|a| a.net.contains(&addr)))
            .map_or(Owner::World, Owner::Declared)
    }

    /// The name of the identity owning `addr`: a declared one, `host` or `world`.
    #[must_use]
    pub fn identity_name(&self, addr: IpAddr) -> String {
        self.owner_of(addr).name().to_owned()
    }

    fn rule_matches_peers(&self, rule: &Rule, src: IpAddr, dst: IpAddr) -> bool {
        let (src_owner, dst_owner) = (self.owner_of(src), self.owner_of(dst));
        rule.from.iter().any(|p| selector_matches(&p.selector, src, src_owner))
            && rule.to.iter().any(|p| selector_matches(&p.selector, dst, dst_owner))
    }

    /// Turns a policy drop into an audit where audit mode applies: daemon
    /// wide, or for traffic towards an identity in `mode: audit`.
    fn audited(&self, reason: DropReason, dst: IpAddr) -> Verdict {
        let audit_dst = matches!(self.owner_of(dst), Owner::Declared(i) if i.mode == Mode::Audit);
        if reason.is_policy() && (self.audit_all || audit_dst) { Verdict::Audit(reason) } else { Verdict::Drop(reason) }
    }

    fn decision(&self, packet: &Packet, verdict: Verdict, rule: Option<&Rule>) -> Decision {
        Decision {
            verdict,
            src_identity: self.identity_name(packet.src),
            dst_identity: self.identity_name(packet.dst),
            rule: rule.map(|r| r.name.clone()),
        }
    }

    /// The policy's decision for a packet with known ports.
    #[must_use]
    pub fn evaluate(&self, packet: &Packet) -> Decision {
        let matches = |rule: &&&Rule| {
            rule.is_active_at(self.now)
                && self.rule_matches_peers(rule, packet.src, packet.dst)
                && ports_match(rule.ports.as_deref(), packet.protocol, packet.port)
        };
        let deny = self.rules.iter().filter(|r| r.action == Action::Deny).find(matches);
        let allow = || self.rules.iter().filter(|r| r.action == Action::Allow).find(matches);
        match deny {
            Some(rule) => self.decision(packet, self.audited(DropReason::DenyRule, packet.dst), Some(rule)),
            None => match allow() {
                Some(rule) => self.decision(packet, Verdict::Forward, Some(rule)),
                None => self.decision(packet, self.audited(DropReason::DefaultDeny, packet.dst), None),
            },
        }
    }

    /// The decision for a later IP fragment whose first fragment was never
    /// seen (its ports are unknown): it passes only if the policy allows the
    /// pair every port of the protocol; `packet.port` is ignored.
    #[must_use]
    pub fn evaluate_orphan_fragment(&self, packet: &Packet) -> Decision {
        let matching: Vec<&&Rule> = self
            .rules
            .iter()
            .filter(|r| r.is_active_at(self.now) && self.rule_matches_peers(r, packet.src, packet.dst))
            .collect();
        let port_ranges = |action| -> Vec<(u16, u16)> {
            let mut ranges: Vec<(u16, u16)> = Vec::new();
            for rule in matching.iter().filter(|r| r.action == action) {
                match &rule.ports {
                    None => ranges.push((0, u16::MAX)),
                    Some(specs) => ranges.extend(
                        specs.iter().filter(|s| s.protocol.number() == packet.protocol).map(|s| (s.first, s.last)),
                    ),
                }
            }
            ranges
        };
        let denied_somewhere = !port_ranges(Action::Deny).is_empty();
        let mut allowed = port_ranges(Action::Allow);
        allowed.sort_unstable();
        // Do the allowed ranges cover 0..=65535 without a gap?
        let mut next: u32 = 0;
        for (first, last) in allowed {
            if u32::from(first) > next {
                break;
            }
            next = next.max(u32::from(last) + 1);
        }
        let allowed_everywhere = next > u32::from(u16::MAX);
        if allowed_everywhere && !denied_somewhere {
            let rule = self.evaluate(&Packet { port: 0, ..*packet }).rule;
            Decision {
                verdict: Verdict::Forward,
                src_identity: self.identity_name(packet.src),
                dst_identity: self.identity_name(packet.dst),
                rule,
            }
        } else {
            self.decision(packet, self.audited(DropReason::FragmentUnknown, packet.dst), None)
        }
    }
}

fn selector_matches(selector: &Selector, addr: IpAddr, owner: Owner<'_>) -> bool {
    match (selector, owner) {
        (Selector::Identity(name), owner) => owner.name() == name,
        (Selector::Labels(wanted), Owner::Declared(identity)) => {
            wanted.iter().all(|(k, v)| identity.labels.get(k) == Some(v))
        }
        // Labels match declared identities only, and the node's own
        // addresses are matched only by `{identity: host}`.
        (Selector::Labels(_), _) | (Selector::Cidr { .. }, Owner::Host) => false,
        (Selector::Cidr { cidr, except }, _) => cidr.contains(&addr) && !except.iter().any(|e| e.contains(&addr)),
    }
}

fn ports_match(ports: Option<&[PortSpec]>, protocol: u8, port: u16) -> bool {
    ports.is_none_or(|specs| {
        specs.iter().any(|spec| spec.protocol.number() == protocol && (spec.first..=spec.last).contains(&port))
    })
}
