//! Atomic updates of map values shared by all CPUs. Core has no atomic
//! read-modify-write for BPF, so these are the instructions themselves.

/// Adds `n` to `*value`.
///
/// # Safety
/// `value` points at an 8-aligned map value valid for this program run.
#[inline(always)]
pub unsafe fn add(value: *mut u64, n: u64) {
    // SAFETY: as the caller promises.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({value} + 0) += {n}",
            value = in(reg) value,
            n = in(reg) n,
            options(nostack, preserves_flags),
        );
    }
}

/// Adds `n` to `*value` and returns what it held before.
///
/// # Safety
/// As for [`add`].
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
