//! `BPF_PROG_TEST_RUN`: runs a loaded program on a crafted frame inside the
//! kernel. The packet-table tests and the benchmarks drive the real programs
//! through it; aya 0.14 has no wrapper for it.

use std::os::fd::RawFd;

use crate::sys::bpf;

/// Result of one `BPF_PROG_TEST_RUN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (`XDP_*` or `TC_ACT_*`).
    pub retval: u32,
    /// Mean nanoseconds per repetition, as the kernel measured it.
    pub duration_ns: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    padding: u32,
}

pub fn run(prog_fd: RawFd, frame: &[u8], repeat: u32) -> std::io::Result<TestRun> {
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(prog_fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?,
        data_size_in: u32::try_from(frame.len()).map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?,
        data_in: frame.as_ptr() as u64,
        repeat,
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; the
    // kernel reads `frame` (alive for the call) and writes only into `attr`.
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
    Ok(TestRun { retval: attr.retval, duration_ns: attr.duration })
}
