//! The packet clock: timeouts only ever compare two of its readings, so it
//! need not be `CLOCK_MONOTONIC`. It is jiffies scaled by the tick length
//! the daemon measured, because the verifier inlines `bpf_jiffies64` into
//! one load, where `bpf_ktime_get_coarse_ns` is a helper call three
//! functions deep: on CPUs whose mitigations make every return costly, that
//! call was a tenth of an established flow's cost.

use aya_ebpf::helpers::bpf_jiffies64;
use enforcer_common::{Config, MAX_CLOCK_TICK_NS};

/// Now, in nanoseconds on the packet clock.
#[inline(always)]
pub fn now(config: &Config) -> u64 {
    // Before the daemon has written the tick, assume the longest one Linux
    // allows: a clock that runs fast only makes state expire early.
    let tick = if config.clock_tick_ns == 0 { MAX_CLOCK_TICK_NS } else { config.clock_tick_ns };
    // SAFETY: a helper with no arguments, inlined by the verifier.
    unsafe { bpf_jiffies64() }.wrapping_mul(u64::from(tick))
}
