//! The `bpf()` system call, for the commands aya 0.14 does not wrap
//! (test runs, batches, link info and detach, pinning by path, the
//! quiesce barrier's map-of-maps).

/// Calls `bpf(command, attr, size_of::<T>())`; returns what it returned.
///
/// # Safety
/// `attr` must be the `union bpf_attr` member `command` reads, and every
/// pointer in it valid for what the command reads or writes during the call.
pub(crate) unsafe fn bpf<T>(command: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: the caller passes the member the command reads; the kernel
    // copies `size_of::<T>()` bytes of it and treats the rest as zero.
    let result = unsafe { libc::syscall(libc::SYS_bpf, command, std::ptr::from_mut(attr), size_of::<T>()) };
    if result < 0 { Err(std::io::Error::last_os_error()) } else { Ok(result) }
}
