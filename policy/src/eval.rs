//! The reference evaluator: the policy's meaning, written as directly as
//! possible from the source form. It is the specification that the compiler
//! and the kernel program are tested against, and what `policy explain` uses.

use std::net::IpAddr;
use std::time::SystemTime;

use enforcer_common::DropReason;

use crate::model::{
    Action, Enforcement, HOST, Identity, Mode, Policy, PortName, PortSpec, Rule, Selector, Side, WORLD,
};

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
    /// The pods (`namespace/name`) at the source and destination, where
    /// they are pods: an identity stands for all pods alike.
    pub src_pod: Option<String>,
    pub dst_pod: Option<String>,
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
    enforcement: Enforcement,
}

impl<'p> Evaluator<'p> {
    #[must_use]
    pub fn new(policy: &'p Policy) -> Self {
        let mut rules: Vec<&Rule> = policy.rules.iter().collect();
        rules.sort_by(|a, b| a.name.cmp(&b.name));
        Self {
            policy,
            rules,
            host_addresses: Vec::new(),
            audit_all: false,
            now: SystemTime::now(),
            enforcement: Enforcement::Always,
        }
    }

    /// Which identities are isolated (see [`Enforcement`]).
    #[must_use]
    pub fn with_enforcement(mut self, enforcement: Enforcement) -> Self {
        self.enforcement = enforcement;
        self
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

    /// The pod (`namespace/name`) at `addr`, if a pod has it.
    #[must_use]
    pub fn pod_name(&self, addr: IpAddr) -> Option<String> {
        match self.owner_of(addr) {
            Owner::Declared(Identity { pod: Some(pod), .. }) => Some(format!("{}/{}", pod.namespace, pod.name)),
            _ => None,
        }
    }

    fn rule_matches_peers(&self, rule: &Rule, src: IpAddr, dst: IpAddr) -> bool {
        let (src_owner, dst_owner) = (self.owner_of(src), self.owner_of(dst));
        rule.from.iter().any(|p| self.selector_matches(&p.selector, src, src_owner))
            && rule.to.iter().any(|p| self.selector_matches(&p.selector, dst, dst_owner))
    }

    fn selector_matches(&self, selector: &Selector, addr: IpAddr, owner: Owner<'_>) -> bool {
        match (selector, owner) {
            (Selector::Identity(name), owner) => owner.name() == name,
            (Selector::Labels(wanted), Owner::Declared(identity)) => {
                wanted.iter().all(|(k, v)| identity.labels.get(k) == Some(v))
            }
            (Selector::Pods(peer), Owner::Declared(identity)) => {
                peer.selects(identity, self.policy.pod_namespace(identity))
            }
            // Labels and pods match declared identities only, and the node's
            // own addresses are matched only by `{identity: host}`.
            (Selector::Labels(_) | Selector::Pods(_), _) | (Selector::Cidr { .. }, Owner::Host) => false,
            (Selector::Cidr { cidr, except }, _) => cidr.contains(&addr) && !except.iter().any(|e| e.contains(&addr)),
        }
    }

    /// Whether `rule` covers `protocol`/`port` towards `dst`: a named port
    /// is looked up among the destination pod's ports.
    fn ports_match(&self, rule: &Rule, dst: IpAddr, protocol: u8, port: u16) -> bool {
        ports_match(rule.ports.as_deref(), protocol, port)
            || (!rule.named_ports.is_empty()
                && matches!(self.owner_of(dst), Owner::Declared(identity)
                    if named_port_numbers(identity, &rule.named_ports).any(|(p, number)| p == protocol && number == port)))
    }

    /// Whether `addr` is isolated in the direction rules of `side` speak
    /// for: under `always` everything is, under `default` what a rule of
    /// that side selects at its own end.
    fn isolated(&self, side: Side, addr: IpAddr) -> bool {
        self.enforcement == Enforcement::Always || self.isolating_rules(side, addr).next().is_some()
    }

    /// The rules (by name) that isolate `addr` for the direction `side`
    /// stands for (`Side::Ingress`, `Side::Egress`), whatever the
    /// enforcement: the rules of that side that select it at their own end.
    pub fn isolating_rules(&self, side: Side, addr: IpAddr) -> impl Iterator<Item = &'p str> + '_ {
        let owner = self.owner_of(addr);
        self.rules
            .iter()
            .filter(move |rule| rule.side == side && side != Side::Both && rule.is_active_at(self.now))
            .filter_map(move |rule| {
                let end = if side == Side::Ingress { &rule.to } else { &rule.from };
                end.iter().any(|peer| self.selector_matches(&peer.selector, addr, owner)).then_some(rule.name.as_str())
            })
    }

    /// The enforcement evaluated under.
    #[must_use]
    pub fn enforcement(&self) -> Enforcement {
        self.enforcement
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
            src_pod: self.pod_name(packet.src),
            dst_pod: self.pod_name(packet.dst),
        }
    }

    /// The policy's decision for a packet with known ports.
    ///
    /// A deny rule that matches decides. Otherwise the first allow rule by
    /// name of those that count decides: rules that speak for the
    /// connection always count; rules that speak for one end count when
    /// the other end is open, and an ingress rule counts when both ends
    /// are isolated and some egress rule admits the packet too. No rule
    /// deciding, the packet passes if both ends are open, and is dropped
    /// by the zero-trust default otherwise.
    #[must_use]
    pub fn evaluate(&self, packet: &Packet) -> Decision {
        let matches = |rule: &&&Rule| {
            rule.is_active_at(self.now)
                && self.rule_matches_peers(rule, packet.src, packet.dst)
                && self.ports_match(rule, packet.dst, packet.protocol, packet.port)
        };
        if let Some(rule) = self.rules.iter().filter(|r| r.action == Action::Deny).find(matches) {
            return self.decision(packet, self.audited(DropReason::DenyRule, packet.dst), Some(rule));
        }
        let src_open = !self.isolated(Side::Egress, packet.src);
        // The node may always reach its own pods, as Kubernetes has it.
        let node = self.enforcement == Enforcement::Default && matches!(self.owner_of(packet.src), Owner::Host);
        let dst_open = node || !self.isolated(Side::Ingress, packet.dst);
        let allows = |side: Side| self.rules.iter().filter(move |r| r.action == Action::Allow && r.side == side);
        let egress_admits = || allows(Side::Egress).any(|rule| matches(&rule));
        let counted = |rule: &&&Rule| match rule.side {
            Side::Both => true,
            Side::Egress => !src_open && dst_open,
            Side::Ingress => !dst_open && (src_open || egress_admits()),
        };
        let allow = self.rules.iter().filter(|r| r.action == Action::Allow).filter(matches).find(counted);
        match allow {
            Some(rule) => self.decision(packet, Verdict::Forward, Some(rule)),
            None if src_open && dst_open => self.decision(packet, Verdict::Forward, None),
            None => self.decision(packet, self.audited(DropReason::DefaultDeny, packet.dst), None),
        }
    }

    /// The decision for a later IP fragment whose first fragment was never
    /// seen (its ports are unknown): it passes only if the policy passes
    /// every port of the protocol, and no deny rule covers any;
    /// `packet.port` is ignored.
    #[must_use]
    pub fn evaluate_orphan_fragment(&self, packet: &Packet) -> Decision {
        // Every decision is constant between the ends of the ranges the
        // rules on this pair name: asking at each start covers every port.
        let mut starts: Vec<u32> = vec![0];
        for rule in
            self.rules.iter().filter(|r| r.is_active_at(self.now) && self.rule_matches_peers(r, packet.src, packet.dst))
        {
            for spec in rule.ports.iter().flatten().filter(|s| s.protocol.number() == packet.protocol) {
                starts.extend([u32::from(spec.first), u32::from(spec.last) + 1]);
            }
            if let Owner::Declared(identity) = self.owner_of(packet.dst) {
                for (protocol, port) in named_port_numbers(identity, &rule.named_ports) {
                    if protocol == packet.protocol {
                        starts.extend([u32::from(port), u32::from(port) + 1]);
                    }
                }
            }
        }
        starts.retain(|start| u16::try_from(*start).is_ok());
        starts.sort_unstable();
        starts.dedup();
        let denied_somewhere = starts.iter().any(|&port| {
            let decision = self.evaluate(&Packet { port: port as u16, ..*packet });
            !matches!(decision.verdict, Verdict::Forward)
        });
        if denied_somewhere {
            self.decision(packet, self.audited(DropReason::FragmentUnknown, packet.dst), None)
        } else {
            let rule = self.evaluate(&Packet { port: 0, ..*packet }).rule;
            Decision {
                verdict: Verdict::Forward,
                src_identity: self.identity_name(packet.src),
                dst_identity: self.identity_name(packet.dst),
                rule,
                src_pod: self.pod_name(packet.src),
                dst_pod: self.pod_name(packet.dst),
            }
        }
    }
}

/// The (protocol number, port) pairs `names` resolve to among a pod
/// identity's named ports.
fn named_port_numbers<'a>(identity: &'a Identity, names: &'a [PortName]) -> impl Iterator<Item = (u8, u16)> + 'a {
    let ports = identity.pod.iter().flat_map(|pod| &pod.ports);
    ports
        .filter(|port| names.iter().any(|name| name.name == port.name && name.protocol == port.protocol))
        .map(|port| (port.protocol.number(), port.port))
}

fn ports_match(ports: Option<&[PortSpec]>, protocol: u8, port: u16) -> bool {
    ports.is_none_or(|specs| {
        specs.iter().any(|spec| spec.protocol.number() == protocol && (spec.first..=spec.last).contains(&port))
    })
}
