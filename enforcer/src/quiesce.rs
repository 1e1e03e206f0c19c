//! Waiting until every BPF program that started before a point in time has
//! finished. After switching the kernel to the other policy slot, the daemon
//! must not rewrite the slot it left while a program run that read the old
//! generation may still be looking entries up in it: that run could meet
//! half of one policy and half of the next.
//!
//! A fixed grace time is only a guess (a vCPU the hypervisor stops
//! mid-program can stay stopped for milliseconds). The kernel gives
//! userspace exactly one exact wait: after an update of a map-of-maps it
//! waits for an RCU grace period before returning, so that every
//! non-sleepable program running when the update began has completed
//! (`maybe_wait_bpf_programs` in kernel/bpf/syscall.c). XDP and TC
//! programs are non-sleepable. [`ProgramBarrier`] owns a one-slot
//! array-of-maps used for nothing but that wait.

use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

use crate::sys::bpf;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// The map-creation prefix of `union bpf_attr` (linux/bpf.h); the kernel
/// treats the fields after it as zero.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// The element-update member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct MapUpdateAttr {
    map_fd: u32,
    padding: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    #[error(
        "creating the map-of-maps the daemon waits on for in-flight programs failed: {0}; the kernel needs BPF_MAP_TYPE_ARRAY_OF_MAPS (Linux 4.12 or later)"
    )]
    Create(#[source] std::io::Error),
    #[error("waiting for in-flight BPF programs to finish failed: {0}")]
    Wait(#[source] std::io::Error),
}

/// Waits for running BPF programs to finish; see the module documentation.
pub struct ProgramBarrier {
    outer: OwnedFd,
    /// The map the outer one holds; writing it again is the whole wait.
    inner: OwnedFd,
}

fn create(map_type: u32, inner_map_fd: u32, name: &[u8]) -> std::io::Result<OwnedFd> {
    let mut attr =
        MapCreateAttr { map_type, key_size: 4, value_size: 4, max_entries: 1, inner_map_fd, ..Default::default() };
    attr.map_name[..name.len()].copy_from_slice(name);
    // SAFETY: BPF_MAP_CREATE reads the map-creation member.
    let fd = unsafe { bpf(BPF_MAP_CREATE, &mut attr) }?;
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl ProgramBarrier {
    /// Creates the two one-entry maps the wait uses (a few hundred bytes of
    /// kernel memory, gone with the daemon).
    pub fn new() -> Result<Self, QuiesceError> {
        let inner = create(BPF_MAP_TYPE_ARRAY, 0, b"bh_quiesce_in").map_err(QuiesceError::Create)?;
        let inner_fd = u32::try_from(inner.as_raw_fd()).map_err(|_| QuiesceError::Create(ebadf()))?;
        let outer = create(BPF_MAP_TYPE_ARRAY_OF_MAPS, inner_fd, b"bh_quiesce").map_err(QuiesceError::Create)?;
        Ok(Self { outer, inner })
    }

    /// The map-of-maps whose update is the wait, for inspection.
    #[must_use]
    pub fn map_of_maps(&self) -> BorrowedFd<'_> {
        self.outer.as_fd()
    }

    /// The map it holds.
    #[must_use]
    pub fn held_map(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }

    /// Returns once every BPF program that was running when it was called
    /// has finished: one RCU grace period, some milliseconds.
    pub fn wait(&self) -> Result<(), QuiesceError> {
        let key = 0u32;
        let value = u32::try_from(self.inner.as_raw_fd()).map_err(|_| QuiesceError::Wait(ebadf()))?;
        let mut attr = MapUpdateAttr {
            map_fd: u32::try_from(self.outer.as_raw_fd()).map_err(|_| QuiesceError::Wait(ebadf()))?,
            key: std::ptr::from_ref(&key) as u64,
            value: std::ptr::from_ref(&value) as u64,
            ..MapUpdateAttr::default()
        };
        // SAFETY: BPF_MAP_UPDATE_ELEM reads the update member and the key
        // and value it points at, both alive for the call.
        unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop).map_err(QuiesceError::Wait)
    }
}

fn ebadf() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EBADF)
}
