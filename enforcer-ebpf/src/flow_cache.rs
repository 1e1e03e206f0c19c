//! The flow cache: per CPU, direct-mapped, the tuples whose conntrack entry
//! just passed a packet at the ingress hook without changing state. An
//! established flow's next packets on this CPU take one array lookup and a
//! compare instead of the conntrack hash lookup, which is most of what an
//! established packet costs.
//!
//! An entry stands for "conntrack would pass this tuple" and is exact for
//! as long as what that answer depends on stays put:
//! - the policy generation (an original entry passes only under the
//!   generation that admitted it) and the verdict epoch, both in the tag;
//! - the conntrack entry itself: the kernel forgets connections only in
//!   [`crate::conntrack::revoke`], which bumps the conntrack epoch, also in
//!   the tag; the daemon forgets them only with a new verdict epoch;
//! - its clock: an entry is used for [`FLOW_CACHE_REVALIDATE_NS`] at most,
//!   then the packet looks conntrack up again, which refreshes the entry's
//!   clock as every packet used to. Every conntrack timeout is far longer,
//!   so no entry the cache stands for can have expired in between.
//!
//! The one thing not in the tag is LRU eviction, which the kernel does
//! silently when the table is full: a flow evicted then keeps passing on a
//! CPU that cached it for at most [`FLOW_CACHE_REVALIDATE_NS`], under the
//! same policy generation that admitted it. The same bound holds for a
//! revoke racing a lookup on a CPU that reorders loads (arm64; x86 keeps
//! them in order): that CPU may read the epoch after the revoke's bump but
//! find the entry before its removal. TCP packets that may change a
//! connection's state (SYN, FIN, RST, or anything before it is
//! established) always take the conntrack lookup, and are never cached.

use enforcer_common::{Config, FLOW_CACHE_ENTRIES, FlowKey, timeouts::FLOW_CACHE_REVALIDATE_NS};

use crate::cache::{flow_words, same_words};
use crate::maps::{CONNTRACK_EPOCH, FLOW_CACHE};
use crate::parse::{PROTO_TCP, Packet, TCP_FIN, TCP_RST, TCP_SYN};

/// Where a tuple's entry lives, and what it must say to stand for it.
pub struct Slot {
    index: u32,
    words: [u64; 5],
    generation: u32,
    verdict_epoch: u32,
    conntrack_epoch: u64,
}

/// The tuple's slot, or `None` for a packet the cache must not answer (a
/// TCP packet that may change its connection's state) or need not: a SYN
/// opens a connection, so in a SYN flood or a scan the probe would only
/// ever miss.
#[inline(always)]
pub fn slot(packet: &Packet, config: &Config) -> Option<Slot> {
    if packet.flow.protocol == PROTO_TCP && packet.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        return None;
    }
    let words = flow_words::<5>(&packet.flow);
    let mixed = (words[0]
        ^ words[1].rotate_left(11)
        ^ words[2].rotate_left(23)
        ^ words[3].rotate_left(37)
        ^ words[4].rotate_left(51))
    .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let index = (mixed >> (64 - FLOW_CACHE_ENTRIES.trailing_zeros())) as u32;
    let conntrack_epoch = CONNTRACK_EPOCH.get(0).copied().unwrap_or(0);
    Some(Slot {
        index,
        words,
        generation: config.policy_generation,
        verdict_epoch: config.verdict_epoch,
        conntrack_epoch,
    })
}

/// Whether this CPU saw the tuple pass by conntrack recently enough to pass
/// it again without looking.
#[inline(always)]
pub fn passes(slot: &Slot, now: u64) -> bool {
    let Some(entry) = FLOW_CACHE.get(slot.index) else { return false };
    entry.generation == slot.generation
        && entry.verdict_epoch == slot.verdict_epoch
        && entry.conntrack_epoch == slot.conntrack_epoch
        && now.wrapping_sub(entry.verified_ns) < FLOW_CACHE_REVALIDATE_NS
        && same_words(&flow_words::<5>(&entry.flow), &slot.words)
}

/// Remembers that conntrack just passed the tuple without changing state.
#[inline(always)]
pub fn store(slot: &Slot, now: u64) {
    let Some(entry) = FLOW_CACHE.get_ptr_mut(slot.index) else { return };
    // SAFETY: this CPU's own entry; programs do not migrate while they run.
    unsafe {
        (*entry).flow = *core::ptr::from_ref(&slot.words).cast::<FlowKey>();
        (*entry).verified_ns = now;
        (*entry).generation = slot.generation;
        (*entry).verdict_epoch = slot.verdict_epoch;
        (*entry).conntrack_epoch = slot.conntrack_epoch;
    }
}

/// Makes every CPU's entries stale: the kernel is about to forget a
/// connection that some CPU may have cached.
#[inline(always)]
pub fn invalidate_all() {
    if let Some(epoch) = CONNTRACK_EPOCH.get_ptr_mut(0) {
        // Atomic, so that bumps on two CPUs at once are not lost.
        // SAFETY: an 8-aligned map value, valid for this program run.
        unsafe { crate::atomic::fetch_add(epoch, 1) };
    }
}
