//! Atomic updates of map values shared by all CPUs. Core has no atomic
//! read-modify-write for BPF, so this is the instruction itself.

/// Adds `n` to `*value` and returns what it held before.
///
/// # Safety
/// `value` points at an 8-aligned map value valid for this program run.
#[inline(always)]
pub unsafe fn fetch_add(value: *mut u64, n: u64) -> u64 {
    let mut old = n;
    // SAFETY: as the caller promises.
    unsafe {
        core::arch::asm!(
            "{old} = atomic_fetch_add((u64 *)({value} + 0), {old})",
            value = in(reg) value,
            old = inout(reg) old,
            options(nostack, preserves_flags),
        );
    }
    old
}
