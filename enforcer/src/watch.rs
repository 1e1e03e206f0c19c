//! Watches the policy directory with inotify, so a change is applied within
//! milliseconds; the daemon also re-reads it every second as a backstop.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;
use std::time::Duration;

/// Events that mean a file's content may now be complete and different.
/// `IN_MODIFY` and `IN_CREATE` are left out on purpose: they fire while a
/// file is still being written, and a half-written policy must not count as
/// a rejected change. A Kubernetes `ConfigMap` update renames a symlink into
/// place (`IN_MOVED_TO`).
const MASK: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_DELETE
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

pub struct Watcher {
    fd: OwnedFd,
}

impl Watcher {
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: valid fd and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), MASK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Waits up to `timeout` for a change; true if one happened. Drains
    /// every queued event, so a burst counts once.
    #[must_use]
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut poll = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&raw mut poll, 1, millis) } <= 0 {
            return false;
        }
        let mut buffer = [0u8; 4096];
        let mut changed = false;
        loop {
            // SAFETY: reading into a buffer we own, of the given size.
            let read = unsafe { libc::read(self.fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
            if read <= 0 {
                return changed;
            }
            changed = true;
        }
    }
}
