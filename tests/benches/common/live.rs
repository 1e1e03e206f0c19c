//! The program a running daemon attached, probed to time when a change is
//! enforced: a probe packet only the new policy allows, sent through it
//! until it passes.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use lab::frames::{self, SYN, TCP, tcp};

use crate::Error;

/// The XDP program a running daemon attached, found through the link it
/// pinned: probe packets run through it (`BPF_PROG_TEST_RUN`) are judged
/// exactly as a packet arriving on the interface would be, by the same
/// program reading the same maps.
pub struct LiveProgram(OwnedFd);

impl LiveProgram {
    pub fn attached_under(bpffs_root: &Path) -> Result<Self, Error> {
        let links = bpffs_root.join("links");
        let link = std::fs::read_dir(&links)?
            .flatten()
            .map(|entry| entry.path())
            .find(|path| path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("xdp-")))
            .ok_or_else(|| format!("no pinned XDP link under {}", links.display()))?;
        let bpf = |command: libc::c_long, attr: &mut [u64; 16]| {
            // SAFETY: `attr` is a zeroed bpf_attr large enough for these
            // commands; the kernel reads and writes only inside it (and the
            // buffers it points at, alive for the call).
            let result = unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), 128usize) };
            if result < 0 { Err(std::io::Error::last_os_error()) } else { Ok(result as i32) }
        };
        // BPF_OBJ_GET: the pinned link.
        let path = std::ffi::CString::new(link.to_string_lossy().into_owned())?;
        let mut attr = [0u64; 16];
        attr[0] = path.as_ptr() as u64;
        // SAFETY: a fresh descriptor the kernel just returned.
        let link_fd = unsafe { OwnedFd::from_raw_fd(bpf(7, &mut attr)?) };
        // BPF_OBJ_GET_INFO_BY_FD: struct bpf_link_info { type, id, prog_id, .. }.
        let mut info = [0u32; 32];
        let mut attr = [0u64; 16];
        attr[0] = u64::from(link_fd.as_raw_fd().cast_unsigned()) | (std::mem::size_of_val(&info) as u64) << 32;
        attr[1] = info.as_mut_ptr() as u64;
        bpf(15, &mut attr)?;
        // BPF_PROG_GET_FD_BY_ID.
        let mut attr = [0u64; 16];
        attr[0] = u64::from(info[2]);
        // SAFETY: as above.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(bpf(13, &mut attr)?) }))
    }

    /// True if the program passes `frame`.
    pub fn passes(&self, frame: &[u8]) -> Result<bool, Error> {
        const XDP_PASS: u32 = 2;
        Ok(enforcer::testrun::run(self.0.as_raw_fd(), frame, 1)?.retval == XDP_PASS)
    }
}

/// Sends `probe` through the live program until it passes; the time since
/// `started`. The probe must be a packet only the new policy allows.
pub fn enforced_after(
    program: &LiveProgram,
    probe: &[u8],
    started: Instant,
    limit: Duration,
    resolution: Duration,
) -> Result<Duration, Error> {
    settled_after(program, probe, true, started, limit, resolution)
}

/// Sends `probe` through the live program until it passes (`pass`) or is
/// dropped (a revocation); the time since `started`.
pub fn settled_after(
    program: &LiveProgram,
    probe: &[u8],
    pass: bool,
    started: Instant,
    limit: Duration,
    resolution: Duration,
) -> Result<Duration, Error> {
    while program.passes(probe)? != pass {
        if started.elapsed() > limit {
            return Err(format!("the daemon did not apply a change within {limit:?}").into());
        }
        // The probe's own CPU time is taken from the daemon it times on
        // this two-core machine: poll no finer than the figure needs.
        std::thread::sleep(resolution);
    }
    Ok(started.elapsed())
}

/// Fails unless `probe` is dropped: a probe that passes before a change
/// cannot time it.
pub fn denied_before(program: &LiveProgram, probe: &[u8]) -> Result<(), Error> {
    if program.passes(probe)? {
        return Err("the probe passed before the change: it cannot time it".into());
    }
    Ok(())
}

/// A TCP SYN from `src` to `dst`, which conntrack has never seen if
/// `src_port` is fresh.
pub fn syn(src: Ipv4Addr, dst: Ipv4Addr, src_port: u16, dst_port: u16) -> Vec<u8> {
    frames::simple(IpAddr::V4(src), IpAddr::V4(dst), TCP, tcp(src_port, dst_port, SYN))
}
