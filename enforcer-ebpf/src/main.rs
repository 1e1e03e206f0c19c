//! Bulkhead's kernel programs: thin entry points over small modules.
//!
//! Verdict order for an IP packet: parse (malformed → drop), connection
//! tracking (replies and unchanged-generation originators pass with one
//! lookup), then identities and policy. Every drop is counted with its
//! reason; nothing classifiable returns `XDP_ABORTED`.
#![no_std]
#![no_main]
// BPF programs inline their helpers on purpose: it keeps bounds checks next
// to the accesses they guard, where the verifier can see them.
#![allow(clippy::inline_always)]

mod conntrack;
mod identity;
mod maps;
mod metrics;
mod parse;
mod policy;

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::xdp;
use aya_ebpf::programs::XdpContext;
use enforcer_common::{CONFIG_INDEX, Direction, DropReason};

use crate::parse::{Frame, Kind, Parsed};

/// Judges every frame entering an enforced interface.
#[xdp]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the signature #[xdp] requires"
)]
pub fn bulkhead_xdp(ctx: XdpContext) -> u32 {
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    match judge(&frame) {
        Ok(()) => {
            metrics::count_forward(Direction::Ingress, frame.len());
            xdp_action::XDP_PASS
        }
        Err(reason) => {
            metrics::count_drop(reason, Direction::Ingress, frame.len());
            xdp_action::XDP_DROP
        }
    }
}

/// `Ok` to pass the frame, `Err(reason)` to drop it.
#[inline(always)]
fn judge(frame: &Frame) -> Result<(), DropReason> {
    let packet = match parse::parse(frame) {
        Parsed::NotIp => return Ok(()),
        Parsed::Drop(reason) => return Err(reason),
        Parsed::Ip(packet) => packet,
    };
    if packet.kind == Kind::NeighbourDiscovery {
        return Ok(());
    }
    let generation = maps::CONFIG
        .get(CONFIG_INDEX)
        .map_or(0, |c| c.policy_generation);
    // SAFETY: a plain helper call with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if matches!(packet.kind, Kind::Trackable | Kind::EchoReply)
        && let conntrack::Hit::Pass = conntrack::lookup(&packet, generation, now)
    {
        return Ok(());
    }
    let src = identity::lookup(packet.flow.family, &packet.flow.src_addr);
    let dst = identity::lookup(packet.flow.family, &packet.flow.dst_addr);
    match policy::decide(src, dst, packet.flow.protocol, packet.policy_port) {
        policy::Outcome::Allow { rule_index } => {
            if packet.kind == Kind::Trackable {
                conntrack::admit(&packet, generation, rule_index, now);
            }
            Ok(())
        }
        policy::Outcome::Deny(reason) => {
            if packet.kind == Kind::Trackable {
                conntrack::revoke(&packet);
            }
            Err(reason)
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
