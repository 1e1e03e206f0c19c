//! Bulkhead's kernel programs: thin entry points over small modules.
//!
//! XDP on an enforced interface judges everything entering the node; TC
//! egress on it judges what the node itself originates (source identity
//! `host`) and lets forwarded traffic, already judged at ingress, through
//! uncounted. So every packet is judged and counted exactly once.
//!
//! Verdict order for an IP packet: parse (malformed → drop), quarantine
//! (only while some address is quarantined), connection tracking (replies
//! and unchanged-generation originators pass with one lookup), then
//! identities and policy. Every drop is counted with its
//! reason; nothing classifiable returns `XDP_ABORTED`.
#![no_std]
#![no_main]
// Header fields are loaded by inline assembly (see `parse::Header`), which
// is unstable on BPF; the crate builds with nightly for build-std anyway.
#![feature(asm_experimental_arch)]
// BPF programs inline their helpers on purpose: it keeps bounds checks next
// to the accesses they guard, where the verifier can see them.
#![allow(clippy::inline_always)]

mod atomic;
mod cache;
mod clock;
mod conntrack;
mod events;
mod flow_cache;
mod fragments;
mod identity;
mod maps;
mod metrics;
mod parse;
mod policy;
mod quarantine;

use core::mem::MaybeUninit;

use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action};
use aya_ebpf::macros::{classifier, xdp};
use aya_ebpf::programs::{TcContext, XdpContext};
use enforcer_common::{
    CONFIG_FLAG_AUDIT, CONFIG_FLAG_NO_FLOW_CACHE, CONFIG_FLAG_NO_VERDICT_CACHE, CONFIG_FLAG_QUARANTINE,
    CONFIG_FLAG_REPORT_ADMITS, CONFIG_INDEX, Config, Direction, DropReason, IDENTITY_FLAG_AUDIT, IDENTITY_HOST,
    IdentityPairKey, IdentityValue, slot_of,
};

use crate::parse::{Fragment, Frame, Kind, Packet, Parsed};

/// What happens to a packet, and how it is counted.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Passes; counted as forwarded.
    Pass,
    /// Dropped; counted under the reason.
    Drop,
    /// Passes by audit mode; counted as audited under the would-be reason.
    Audit,
    /// Forwarded traffic seen again at egress: passes, counted at ingress already.
    Ignore,
}

/// An action and its reason. A struct, not an enum carrying the reason in
/// its drop and audit variants: LLVM may read such a payload on paths where
/// it is undefined, and the verifier rejects the uninitialised register.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub action: Action,
    /// Why, for `Drop` and `Audit`; any value otherwise, never counted.
    pub reason: DropReason,
}

impl Verdict {
    pub const PASS: Self = Self { action: Action::Pass, reason: DropReason::DefaultDeny };
    pub const IGNORE: Self = Self { action: Action::Ignore, reason: DropReason::DefaultDeny };

    #[inline(always)]
    pub const fn drop(reason: DropReason) -> Self {
        Self { action: Action::Drop, reason }
    }

    #[inline(always)]
    pub const fn audit(reason: DropReason) -> Self {
        Self { action: Action::Audit, reason }
    }
}

/// How much of a socket buffer must be readable directly: the deepest
/// header read is an `ICMPv6` error quoting IPv6 + transport behind two VLAN tags.
const HEADERS_NEEDED: u32 = 160;

/// Judges every frame entering an enforced interface.
#[xdp]
#[allow(clippy::needless_pass_by_value, reason = "the signature #[xdp] requires")]
pub fn bulkhead_xdp(ctx: XdpContext) -> u32 {
    let frame = Frame { start: ctx.data(), end: ctx.data_end(), wire_len: ctx.data_end() - ctx.data() };
    // Read only for events: three dependent loads every packet would pay for.
    let ifindex = || ctx.ingress_ifindex() as u32;
    if account(judge(&frame, Direction::Ingress, ifindex), Direction::Ingress, frame.wire_len as u64) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// Judges what the node itself sends out of an enforced interface.
#[classifier]
#[allow(clippy::needless_pass_by_value, reason = "the signature #[classifier] requires")]
pub fn bulkhead_tc_egress(ctx: TcContext) -> i32 {
    judge_tc(&ctx, Direction::Egress)
}

/// Judges every packet entering an enforced interface, like
/// `bulkhead_xdp`, for interfaces attached at TC ingress instead
/// (`--ingress-hook tc`): on veth this avoids the copy native XDP makes of
/// every packet the sending stack built.
#[classifier]
#[allow(clippy::needless_pass_by_value, reason = "the signature #[classifier] requires")]
pub fn bulkhead_tc_ingress(ctx: TcContext) -> i32 {
    judge_tc(&ctx, Direction::Ingress)
}

#[inline(always)]
fn judge_tc(ctx: &TcContext, direction: Direction) -> i32 {
    let wire_len = ctx.len();
    let wanted = if wire_len < HEADERS_NEEDED { wire_len } else { HEADERS_NEEDED };
    if ((ctx.data_end() - ctx.data()) as u32) < wanted {
        // Headers in paged data: make them readable. On failure the bounds
        // checks below classify what is readable, so nothing is guessed.
        let _ = ctx.pull_data(wanted);
    }
    let frame = Frame { start: ctx.data(), end: ctx.data_end(), wire_len: wire_len as usize };
    // SAFETY: the context points at the kernel's socket buffer for this run.
    let ifindex = || unsafe { (*ctx.skb.skb).ifindex };
    if account(judge(&frame, direction, ifindex), direction, u64::from(wire_len)) {
        // Let any later program on the hook have its say.
        TC_ACT_UNSPEC
    } else {
        TC_ACT_SHOT
    }
}

/// Does nothing: the floor `cargo xtask bench` measures the real programs
/// against, loaded beside them but never attached.
#[xdp]
#[allow(clippy::needless_pass_by_value, reason = "the signature #[xdp] requires")]
pub fn bulkhead_calibration(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Counts the verdict; true if the packet passes.
#[inline(always)]
fn account(verdict: Verdict, direction: Direction, bytes: u64) -> bool {
    match verdict.action {
        Action::Pass => {
            metrics::count_forward(direction, bytes);
            true
        }
        Action::Drop => {
            metrics::count_drop(verdict.reason, direction, bytes);
            false
        }
        Action::Audit => {
            metrics::count_audit(verdict.reason, direction, bytes);
            true
        }
        Action::Ignore => true,
    }
}

/// `ifindex` gives the interface's index, for events.
#[inline(always)]
fn judge(frame: &Frame, direction: Direction, ifindex: impl Fn() -> u32) -> Verdict {
    let mut storage = MaybeUninit::uninit();
    let packet = Packet::blank(&mut storage);
    match parse::parse(frame, packet) {
        Parsed::NotIp => return Verdict::PASS,
        Parsed::Drop(reason) => return Verdict::drop(reason),
        Parsed::Ip => {}
    }
    if packet.kind == Kind::NeighbourDiscovery {
        return Verdict::PASS;
    }
    let config = maps::CONFIG.get(CONFIG_INDEX).copied().unwrap_or_default();
    let now = clock::now(&config);
    let mut pair = events::Pair::UNKNOWN;
    let verdict = judge_ip(packet, direction, &config, now, &mut pair);
    // Whatever decided a first fragment (conntrack, policy, audit) decides
    // the datagram's later fragments too.
    if let Fragment::First(id) = packet.fragment
        && verdict.action != Action::Ignore
    {
        fragments::remember(packet, id, verdict, now);
    }
    let audit = match verdict.action {
        Action::Drop => false,
        Action::Audit => true,
        Action::Pass | Action::Ignore => return verdict,
    };
    let judged = events::Judged { direction, reason: verdict.reason, audit, ifindex };
    events::report(packet, &judged, &pair, now);
    verdict
}

/// `pair` receives the packet's identities once they are looked up, and
/// what the verdict cache knows of where their drops are counted.
///
/// A bare SYN (at ingress) asks the policy before conntrack: it opens a
/// connection, and when the policy denies it, it is dropped without the
/// conntrack lookup, which is most of what a denied packet would cost
/// otherwise (under a scan or a SYN flood, most of the traffic). The only
/// entries that lookup could find are the reply side of a connection the
/// peer opened on the same ports (a TCP simultaneous open, whose handshake
/// still completes with the SYN-ACK, which conntrack passes) or an entry
/// the policy no longer allows, which the connection's next non-SYN packet
/// forgets. When the policy allows it (or audit mode would pass it),
/// conntrack is asked as for any other packet.
#[inline(always)]
fn judge_ip(packet: &Packet, direction: Direction, config: &Config, now: u64, pair: &mut events::Pair) -> Verdict {
    let tracked_kind = matches!(packet.kind, Kind::Trackable | Kind::EchoReply);
    let opening = direction == Direction::Ingress
        && packet.kind == Kind::Trackable
        && packet.flow.protocol == parse::PROTO_TCP
        && packet.tcp_flags & (parse::TCP_SYN | parse::TCP_ACK) == parse::TCP_SYN;
    // Quarantine first: it overrides every cache, connection and rule.
    let quarantine = config.flags & CONFIG_FLAG_QUARANTINE != 0;
    if quarantine && direction == Direction::Ingress {
        match quarantine::check_ingress(packet, config) {
            quarantine::Check::Clear => {}
            quarantine::Check::Isolate => return Verdict::drop(DropReason::Quarantine),
            quarantine::Check::Exempt => return Verdict::PASS,
        }
    }
    // Fast path: one conntrack lookup for established flows at ingress.
    let mut stale = false;
    if direction == Direction::Ingress && tracked_kind && !opening {
        let flow_slot =
            if config.flags & CONFIG_FLAG_NO_FLOW_CACHE == 0 { flow_cache::slot(packet, config) } else { None };
        if let Some(flow_slot) = &flow_slot
            && flow_cache::passes(flow_slot, now)
        {
            return Verdict::PASS;
        }
        match conntrack::lookup(packet, direction, config.policy_generation, now) {
            conntrack::Hit::Pass { settled } => {
                if settled && let Some(flow_slot) = &flow_slot {
                    flow_cache::store(flow_slot, now);
                }
                return Verdict::PASS;
            }
            conntrack::Hit::Audit(reason) => return Verdict::audit(reason),
            conntrack::Hit::Stale => stale = true,
            conntrack::Hit::Miss => {}
        }
    }
    let slot = slot_of(config.policy_generation);
    // Whole packets at ingress that the policy judges by their tuple alone
    // may take their identities and the policy's answer from the cache.
    let cached = direction == Direction::Ingress
        && packet.fragment == Fragment::Whole
        && packet.kind != Kind::IcmpError
        && config.flags & CONFIG_FLAG_NO_VERDICT_CACHE == 0;
    let cache_slot = cache::slot(packet, config);
    let (dst, outcome) = if cached && let Some(hit) = cache::lookup(&cache_slot) {
        if hit.src.id == IDENTITY_HOST {
            return Verdict::drop(DropReason::HostSpoofed);
        }
        *pair = events::Pair {
            key: IdentityPairKey { slot: slot as u32, src: hit.src.id, dst: hit.dst.id },
            index: hit.pair_index,
            cache_entry: cache_slot.index(),
        };
        (hit.dst, hit.outcome)
    } else {
        let world = identity::world(config);
        let src = identity::lookup(slot, packet.flow.family, &packet.flow.src_addr, world);
        // What the node itself sends (forwarded traffic was judged at ingress).
        if quarantine && direction == Direction::Egress && src.id == IDENTITY_HOST {
            match quarantine::check_egress(packet) {
                quarantine::Check::Clear => {}
                quarantine::Check::Isolate => return Verdict::drop(DropReason::Quarantine),
                quarantine::Check::Exempt => return Verdict::PASS,
            }
        }
        match direction {
            Direction::Ingress if src.id == IDENTITY_HOST => {
                return Verdict::drop(DropReason::HostSpoofed);
            }
            Direction::Egress if src.id != IDENTITY_HOST => return Verdict::IGNORE,
            Direction::Egress if tracked_kind => {
                match conntrack::lookup(packet, direction, config.policy_generation, now) {
                    conntrack::Hit::Pass { .. } => return Verdict::PASS,
                    conntrack::Hit::Audit(reason) => return Verdict::audit(reason),
                    conntrack::Hit::Stale => stale = true,
                    conntrack::Hit::Miss => {}
                }
            }
            _ => {}
        }
        // One read when the source is also the destination: the daemon may
        // change one address's entry in the slot being read (see its map
        // writer), and two reads could give one address two identities.
        let addrs = cache::flow_words::<4>(&packet.flow);
        let dst = if cache::same_words(&[addrs[0], addrs[1]], &[addrs[2], addrs[3]]) {
            src
        } else {
            identity::lookup(slot, packet.flow.family, &packet.flow.dst_addr, world)
        };
        pair.key = IdentityPairKey { slot: slot as u32, src: src.id, dst: dst.id };
        if let Fragment::Later(id) = packet.fragment {
            if let Some(verdict) = fragments::recall(packet, id, now) {
                return verdict;
            }
            let audit = config.flags & CONFIG_FLAG_AUDIT != 0 || dst.flags & IDENTITY_FLAG_AUDIT != 0;
            return match policy::decide_any_port(slot, src, dst, packet.flow.protocol) {
                policy::Outcome::Allow { .. } => Verdict::PASS,
                policy::Outcome::Deny { reason, .. } => audited(reason, audit),
            };
        }
        if packet.kind == Kind::IcmpError && conntrack::is_tracked(&packet.quoted, now) {
            return Verdict::PASS;
        }
        let outcome = policy::decide(slot, src, dst, packet.flow.protocol, packet.policy_port);
        if cached {
            cache::store(&cache_slot, src, dst, &outcome);
            pair.cache_entry = cache_slot.index();
        }
        (dst, outcome)
    };
    let audit = config.flags & CONFIG_FLAG_AUDIT != 0 || dst.flags & IDENTITY_FLAG_AUDIT != 0;
    let dropped = !audit && matches!(outcome, policy::Outcome::Deny { .. });
    if opening && !dropped {
        match conntrack::lookup(packet, direction, config.policy_generation, now) {
            conntrack::Hit::Pass { .. } => return Verdict::PASS,
            conntrack::Hit::Audit(reason) => return Verdict::audit(reason),
            conntrack::Hit::Stale => stale = true,
            conntrack::Hit::Miss => {}
        }
    }
    let report_admit = direction == Direction::Ingress && config.flags & CONFIG_FLAG_REPORT_ADMITS != 0;
    conclude(packet, direction, dst, config.policy_generation, (audit, stale, report_admit), now, outcome)
}

/// The verdict for a packet no tracked flow covers, from the policy's
/// `outcome`, with the conntrack bookkeeping it implies. `stale`: conntrack
/// holds an unusable entry for the packet's tuple, which a denial must
/// forget. `report_admit`: a connection admitted is reported for the
/// lateral-movement detector.
#[inline(always)]
fn conclude(
    packet: &Packet,
    direction: Direction,
    dst: IdentityValue,
    generation: u32,
    (audit, stale, report_admit): (bool, bool, bool),
    now: u64,
    outcome: policy::Outcome,
) -> Verdict {
    // Replies come back in at ingress, unless the node itself answers.
    let reply_hook = if dst.id == IDENTITY_HOST { Direction::Egress } else { Direction::Ingress };
    let hooks = (direction, reply_hook);
    let trackable = packet.kind == Kind::Trackable;
    let slot = slot_of(generation);
    // Rule counters are bumped last: a map lookup between the decision and
    // the conntrack bookkeeping doubles the paths the verifier must walk.
    match outcome {
        policy::Outcome::Allow { rule_index } => {
            if trackable {
                conntrack::admit(packet, hooks, generation, rule_index, None, now);
                if report_admit {
                    events::report_admit(packet, now);
                }
            }
            metrics::count_rule(slot, rule_index);
            Verdict::PASS
        }
        policy::Outcome::Deny { reason, rule_index } => {
            let verdict = audited(reason, audit);
            if trackable {
                match verdict.action {
                    Action::Audit => {
                        conntrack::admit(packet, hooks, generation, u32::MAX, Some(verdict.reason), now);
                    }
                    _ if stale => conntrack::revoke(packet),
                    _ => {}
                }
            }
            metrics::count_rule(slot, rule_index);
            verdict
        }
    }
}

#[inline(always)]
fn audited(reason: DropReason, audit: bool) -> Verdict {
    if audit && reason.is_policy() { Verdict::audit(reason) } else { Verdict::drop(reason) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
