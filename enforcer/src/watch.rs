//! Watches the policy directory with inotify, so a change is applied within
//! milliseconds; the daemon also re-reads it every second as a backstop.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
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

    /// Reads every queued event, so a burst counts once; true if there was one.
    fn drain(&self) -> bool {
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

/// Ends a [`Wakeup::wait`] early: work that arrives by channel (an API
/// push, SIGHUP) is taken at once, not when the current wait times out.
#[derive(Clone)]
pub struct Wakeup {
    fd: Arc<OwnedFd>,
}

impl Wakeup {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        Ok(Self { fd: Arc::new(unsafe { OwnedFd::from_raw_fd(raw) }) })
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes eight bytes we own to a valid eventfd. It can only
        // fail when the counter is saturated, which still means "awake".
        unsafe { libc::write(self.fd.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Waits up to `timeout` for a change in the watched directory or a
    /// wake-up; true if the directory changed.
    #[must_use]
    pub fn wait(&self, watcher: Option<&Watcher>, timeout: Duration) -> bool {
        let mut polls = [
            libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: watcher.map_or(-1, |w| w.fd.as_raw_fd()), events: libc::POLLIN, revents: 0 },
        ];
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: two valid pollfds (a negative fd is ignored by poll).
        if unsafe { libc::poll(polls.as_mut_ptr(), 2, millis) } <= 0 {
            return false;
        }
        let mut counter = 0u64;
        // SAFETY: reads the eventfd's eight-byte counter into one we own.
        unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut counter).cast(), 8) };
        watcher.is_some_and(Watcher::drain)
    }
}

/// A channel whose sends wake the receiver's [`Wakeup::wait`].
pub struct Mailbox<T> {
    sender: mpsc::Sender<T>,
    wakeup: Wakeup,
}

impl<T> Clone for Mailbox<T> {
    fn clone(&self) -> Self {
        Self { sender: self.sender.clone(), wakeup: self.wakeup.clone() }
    }
}

impl<T> Mailbox<T> {
    #[must_use]
    pub fn new(sender: mpsc::Sender<T>, wakeup: Wakeup) -> Self {
        Self { sender, wakeup }
    }

    /// Sends and wakes the receiver.
    ///
    /// # Errors
    /// If the receiver is gone (the daemon is shutting down).
    pub fn send(&self, value: T) -> Result<(), mpsc::SendError<T>> {
        let sent = self.sender.send(value);
        self.wakeup.wake();
        sent
    }
}
