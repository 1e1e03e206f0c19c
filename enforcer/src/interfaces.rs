//! Which interfaces the daemon enforces on, and noticing them come and go.
//!
//! `--interface` takes names and shell-style patterns (`eth*`, `lxc*`,
//! `veth?`, `en[a-z]*`). Pods come and go all day, and their veths with
//! them, so the daemon listens for the kernel's link notifications
//! (rtnetlink, `RTMGRP_LINK`) and reconciles at once: a matching interface
//! that appears is attached, one that disappears is forgotten, a renamed
//! one follows its new name. A notification only triggers a reconcile
//! against the full interface list, so a lost notification (the socket's
//! buffer overflowed) costs nothing but the next reconcile, which the
//! daemon also runs every second as a backstop.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::Duration;

/// Interface names and patterns from `--interface`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    patterns: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InterfacesError {
    #[error("--interface `{pattern}` is not a valid pattern: {why}")]
    Pattern { pattern: String, why: &'static str },
    #[error("listening for interface changes (rtnetlink) failed: {0}")]
    Netlink(#[source] std::io::Error),
    #[error("listing the network interfaces failed: {0}")]
    List(#[source] std::io::Error),
}

/// Whether `pattern` holds glob metacharacters (otherwise it is a name).
#[must_use]
pub fn is_pattern(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

impl Selector {
    /// Checks every pattern; a name must be 1–15 bytes, as the kernel allows.
    pub fn new(patterns: &[String]) -> Result<Self, InterfacesError> {
        for pattern in patterns {
            let why = if pattern.is_empty() {
                Some("it is empty")
            } else if !is_pattern(pattern) && pattern.len() >= libc::IF_NAMESIZE {
                Some("interface names have at most 15 bytes")
            } else if pattern.contains(['/', ' ', '\0']) {
                Some("interface names cannot contain `/`, spaces or NUL")
            } else {
                glob_check(pattern).err()
            };
            if let Some(why) = why {
                return Err(InterfacesError::Pattern { pattern: pattern.clone(), why });
            }
        }
        Ok(Self { patterns: patterns.to_vec() })
    }

    /// Whether the daemon enforces on the interface called `name`.
    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| glob_match(p.as_bytes(), name.as_bytes()))
    }

    /// The plain names (no pattern): these must exist when the daemon starts.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.patterns.iter().map(String::as_str).filter(|p| !is_pattern(p))
    }

    /// The selected interfaces that exist now, by index.
    pub fn selected(&self) -> Result<BTreeMap<u32, String>, InterfacesError> {
        Ok(list()?.into_iter().filter(|(_, name)| self.matches(name)).collect())
    }
}

/// Validates bracket expressions: every `[` needs its `]`.
fn glob_check(pattern: &str) -> Result<(), &'static str> {
    let bytes = pattern.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'[' {
            match class_end(bytes, i) {
                Some(end) => i = end,
                None => return Err("`[` without a closing `]`"),
            }
        }
        i += 1;
    }
    Ok(())
}

/// The index of the `]` closing the class opened at `open`.
fn class_end(bytes: &[u8], open: usize) -> Option<usize> {
    let mut i = open + 1;
    if bytes.get(i) == Some(&b'!') {
        i += 1;
    }
    // A `]` right after the opening bracket is a member, as in the shell.
    if bytes.get(i) == Some(&b']') {
        i += 1;
    }
    (i..bytes.len()).find(|&j| bytes[j] == b']')
}

/// Shell-style matching: `*` any run, `?` one byte, `[a-z]`/`[!0-9]` a class.
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    // Where to resume after the last `*`: (pattern index after it, name index).
    let mut resume: Option<(usize, usize)> = None;
    while n < name.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                resume = Some((p + 1, n));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => match class_end(pattern, p) {
                Some(end) if class_matches(&pattern[p + 1..end], name[n]) => Some(end + 1),
                Some(_) => None,
                None => (name[n] == b'[').then_some(p + 1),
            },
            Some(&literal) => (literal == name[n]).then_some(p + 1),
            None => None,
        };
        match (step, resume) {
            (Some(next), _) => {
                p = next;
                n += 1;
            }
            (None, Some((after_star, from))) => {
                p = after_star;
                n = from + 1;
                resume = Some((after_star, from + 1));
            }
            (None, None) => return false,
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

fn class_matches(class: &[u8], byte: u8) -> bool {
    let (negated, class) = match class.split_first() {
        Some((b'!', rest)) => (true, rest),
        _ => (false, class),
    };
    let mut i = 0;
    let mut found = false;
    while i < class.len() {
        if i + 2 < class.len() && class[i + 1] == b'-' {
            found |= (class[i]..=class[i + 2]).contains(&byte);
            i += 3;
        } else {
            found |= class[i] == byte;
            i += 1;
        }
    }
    found != negated
}

/// The name of the interface with index `index`, if there is one.
#[must_use]
pub fn interface_name(index: u32) -> Option<String> {
    let mut buffer = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname needs.
    let name = unsafe { libc::if_indextoname(index, buffer.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buffer`.
    Some(unsafe { std::ffi::CStr::from_ptr(buffer.as_ptr()) }.to_string_lossy().into_owned())
}

/// The index of the interface named `name`, if it exists.
#[must_use]
pub fn interface_index(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: `name` is NUL-terminated.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Every network interface of this namespace: index → name.
pub fn list() -> Result<BTreeMap<u32, String>, InterfacesError> {
    // SAFETY: if_nameindex returns a list we free below, or null.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(InterfacesError::List(std::io::Error::last_os_error()));
    }
    let mut interfaces = BTreeMap::new();
    let mut entry = head;
    // SAFETY: the list ends with an entry whose index is 0; each name is a
    // NUL-terminated string owned by the list until it is freed.
    unsafe {
        while (*entry).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*entry).if_name).to_string_lossy().into_owned();
            interfaces.insert((*entry).if_index, name);
            entry = entry.add(1);
        }
        libc::if_freenameindex(head);
    }
    Ok(interfaces)
}

/// A socket that receives the kernel's link notifications.
pub struct LinkWatcher {
    socket: OwnedFd,
}

/// `RTMGRP_LINK` from `linux/rtnetlink.h`.
const RTMGRP_LINK: u32 = 1;

impl LinkWatcher {
    /// Subscribes to link notifications. Open it before listing the
    /// interfaces, so that nothing created in between goes unnoticed.
    pub fn new() -> Result<Self, InterfacesError> {
        // SAFETY: plain socket creation.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(InterfacesError::Netlink(std::io::Error::last_os_error()));
        }
        // SAFETY: a descriptor the kernel just returned, owned by nobody else.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zero is a valid value.
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        address.nl_groups = RTMGRP_LINK;
        // SAFETY: `address` is a sockaddr_nl of the size passed.
        let bound = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                std::ptr::from_ref(&address).cast(),
                u32::try_from(size_of::<libc::sockaddr_nl>()).unwrap_or(u32::MAX),
            )
        };
        if bound != 0 {
            return Err(InterfacesError::Netlink(std::io::Error::last_os_error()));
        }
        Ok(Self { socket })
    }

    /// Waits up to `timeout` for link notifications and drains them.
    /// Returns whether any arrived (or were lost to an overflow, which
    /// equally calls for a reconcile).
    #[must_use]
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut poll = libc::pollfd { fd: self.socket.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&raw mut poll, 1, millis) } <= 0 {
            return false;
        }
        let mut buffer = [0u8; 16 * 1024];
        let mut any = false;
        loop {
            // SAFETY: the buffer is valid for its length.
            let read = unsafe { libc::recv(self.socket.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
            if read > 0 {
                any = true;
                continue;
            }
            let error = std::io::Error::last_os_error();
            // ENOBUFS: notifications were lost; the reconcile catches up.
            return any || error.raw_os_error() == Some(libc::ENOBUFS);
        }
    }
}

/// What one reconcile changed, for the log and the counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Interfaces newly attached: (index, name).
    pub attached: Vec<(u32, String)>,
    /// Interfaces forgotten because they are gone or no longer match.
    pub removed: Vec<(u32, String)>,
    /// Interfaces renamed: (index, old name, new name).
    pub renamed: Vec<(u32, String, String)>,
    /// Interfaces that match but could not be attached: (name, why).
    pub failed: Vec<(String, String)>,
}

impl Changes {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.attached.is_empty() && self.removed.is_empty() && self.renamed.is_empty() && self.failed.is_empty()
    }
}

/// What the datapath must offer a reconcile; a trait so the decision
/// logic is unit-tested without a kernel.
pub trait Attacher {
    /// (index, name) of every attached interface.
    fn attached(&self) -> Vec<(u32, String)>;
    fn attach(&mut self, name: &str) -> Result<(), String>;
    fn detach(&mut self, index: u32);
    fn rename(&mut self, index: u32, name: &str);
}

/// Brings the attachments in line with the interfaces that exist now
/// (`present`, index → name) and the selector.
pub fn reconcile(selector: &Selector, present: &BTreeMap<u32, String>, attacher: &mut dyn Attacher) -> Changes {
    let mut changes = Changes::default();
    for (index, old) in attacher.attached() {
        match present.get(&index) {
            Some(name) if selector.matches(name) => {
                if *name != old {
                    attacher.rename(index, name);
                    changes.renamed.push((index, old, name.clone()));
                }
            }
            _ => {
                attacher.detach(index);
                changes.removed.push((index, old));
            }
        }
    }
    let kept: Vec<u32> = attacher.attached().into_iter().map(|(index, _)| index).collect();
    for (index, name) in present {
        if selector.matches(name) && !kept.contains(index) {
            match attacher.attach(name) {
                Ok(()) => changes.attached.push((*index, name.clone())),
                Err(why) => changes.failed.push((name.clone(), why)),
            }
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(patterns: &[&str]) -> Selector {
        Selector::new(&patterns.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn globs_match_as_in_the_shell() {
        let cases = [
            ("eth*", "eth0", true),
            ("eth*", "eth", true),
            ("eth*", "veth0", false),
            ("*eth*", "veth0", true),
            ("lxc?", "lxc1", true),
            ("lxc?", "lxc12", false),
            ("en[a-z]*", "enp3s0", true),
            ("en[!a-z]*", "enp3s0", false),
            ("en[!a-z]*", "en0", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("h1", "h1", true),
            ("h1", "h10", false),
            ("*", "anything", true),
            ("[]x]y", "]y", true),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(glob_match(pattern.as_bytes(), name.as_bytes()), expected, "{pattern} vs {name}");
        }
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        for bad in ["", "eth[0", "a-very-long-interface-name", "a/b"] {
            let error = Selector::new(&[bad.to_owned()]).unwrap_err();
            assert!(error.to_string().contains(&format!("`{bad}`")), "{error}");
        }
        assert_eq!(selector(&["eth0", "lxc*"]).names().collect::<Vec<_>>(), ["eth0"]);
    }

    #[derive(Default)]
    struct Fake {
        attached: Vec<(u32, String)>,
        refuse: Option<String>,
        present: BTreeMap<u32, String>,
    }

    impl Attacher for Fake {
        fn attached(&self) -> Vec<(u32, String)> {
            self.attached.clone()
        }
        fn attach(&mut self, name: &str) -> Result<(), String> {
            if self.refuse.as_deref() == Some(name) {
                return Err("busy".to_owned());
            }
            let index = self.present.iter().find(|(_, n)| *n == name).map(|(i, _)| *i).unwrap();
            self.attached.push((index, name.to_owned()));
            Ok(())
        }
        fn detach(&mut self, index: u32) {
            self.attached.retain(|(i, _)| *i != index);
        }
        fn rename(&mut self, index: u32, name: &str) {
            self.attached.iter_mut().filter(|(i, _)| *i == index).for_each(|(_, n)| *n = name.to_owned());
        }
    }

    #[test]
    fn a_reconcile_attaches_new_forgets_gone_and_follows_renames() {
        let present: BTreeMap<u32, String> =
            [(2, "lxc-a"), (3, "lxc-renamed"), (5, "eth0"), (6, "lxc-new"), (7, "lxc-busy")]
                .into_iter()
                .map(|(i, n)| (i, n.to_owned()))
                .collect();
        let mut fake = Fake {
            attached: vec![(2, "lxc-a".into()), (3, "lxc-b".into()), (4, "lxc-gone".into())],
            refuse: Some("lxc-busy".into()),
            present: present.clone(),
        };
        let changes = reconcile(&selector(&["lxc*"]), &present, &mut fake);
        assert_eq!(changes.renamed, [(3, "lxc-b".to_owned(), "lxc-renamed".to_owned())]);
        assert_eq!(changes.removed, [(4, "lxc-gone".to_owned())]);
        assert_eq!(changes.attached, [(6, "lxc-new".to_owned())]);
        assert_eq!(changes.failed, [("lxc-busy".to_owned(), "busy".to_owned())]);
        let mut now = fake.attached.clone();
        now.sort();
        assert_eq!(now, [(2, "lxc-a".into()), (3, "lxc-renamed".into()), (6, "lxc-new".into())]);
        // A second reconcile of the same state changes nothing but retries the refused one.
        fake.refuse = None;
        let again = reconcile(&selector(&["lxc*"]), &present, &mut fake);
        assert_eq!(again.attached, [(7, "lxc-busy".to_owned())]);
        assert!(again.removed.is_empty() && again.renamed.is_empty());
    }

    #[test]
    fn a_rename_out_of_the_selection_detaches() {
        let present: BTreeMap<u32, String> = [(3, "other".to_owned())].into_iter().collect();
        let mut fake = Fake { attached: vec![(3, "lxc-b".into())], ..Fake::default() };
        let changes = reconcile(&selector(&["lxc*"]), &present, &mut fake);
        assert_eq!(changes.removed, [(3, "lxc-b".to_owned())]);
        assert!(fake.attached.is_empty());
    }

    #[test]
    fn the_loopback_interface_is_listed() {
        assert!(list().unwrap().values().any(|name| name == "lo"));
    }
}
