//! The daemon's pinned state under its bpffs root, and keeping it true to
//! the node.
//!
//! Pins outlive the daemon on purpose: they keep the node protected while
//! it restarts or upgrades. But the node changes while no daemon watches:
//! pods go and take their veths with them, namespaces are rebuilt, links
//! are renamed. A link pinned for an interface that is gone is defunct (the
//! kernel reports it attached to ifindex 0) and cannot be updated; one
//! whose interface was renamed sits under the old name. Before attaching,
//! the daemon therefore reads the interface every pinned link really holds
//! and makes the pins say so: defunct ones are removed, renamed ones are
//! moved to the interface's new name, ones for interfaces it no longer
//! selects are removed (which detaches them). Each repair is logged and
//! counted. Nothing here ever fails the daemon over state it can rebuild.
//!
//! Pin names are `<hook>-<interface>` in `links/`, with hook `xdp`
//! (XDP ingress), `tcin` (TC ingress) or `tc` (TC egress), and any `.` of
//! the interface name written `%` (bpffs refuses dots).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};

use crate::sys::bpf;

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;

/// The hooks a pinned link can hold, as named in its pin.
pub const LINK_KINDS: [&str; 3] = ["xdp", "tcin", "tc"];

#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    #[error(
        "{path} is not on a bpffs and mounting one at {mount} failed: {source}; mount it yourself (`mount -t bpf bpf {mount}`) or pass another --bpffs-root"
    )]
    Mount {
        path: PathBuf,
        mount: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the pinned links in {path} failed: {source}; check the bpffs root and its permissions")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether `path` lies on a bpffs.
#[must_use]
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(name) = CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs fills the zeroed buffer; `name` is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let ok = unsafe { libc::statfs(name.as_ptr(), &raw mut stat) } == 0;
    #[allow(clippy::useless_conversion, reason = "f_type is i64 here but i32 or u32 on other targets")]
    let kind = i64::from(stat.f_type);
    ok && kind == BPF_FS_MAGIC
}

/// Makes sure the bpffs root's parent is a bpffs, mounting one there if
/// not, as cilium-agent does: under `ip netns exec`, in a container
/// without the host's `/sys/fs/bpf`, or on a host that never mounted it,
/// the daemon still runs. Returns where it mounted one, if it did.
///
/// A bpffs mounted here lives in the daemon's mount namespace: pins in it
/// keep the programs attached only while that namespace lives (under
/// `ip netns exec`, until the daemon exits). Mount the host's bpffs to keep
/// enforcement across restarts.
pub fn ensure_bpffs(root: &Path) -> Result<Option<PathBuf>, PinsError> {
    let parent = root.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(root).to_path_buf();
    let mount_error = |source| PinsError::Mount { path: root.to_path_buf(), mount: parent.clone(), source };
    if is_bpffs(&parent) || (!parent.exists() && nearest_existing(&parent).is_some_and(|p| is_bpffs(&p))) {
        return Ok(None);
    }
    std::fs::create_dir_all(&parent).map_err(mount_error)?;
    let target = CString::new(parent.as_os_str().as_encoded_bytes())
        .map_err(|_| mount_error(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    // SAFETY: all strings are NUL-terminated and live for the call.
    let mounted =
        unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, c"mode=0700".as_ptr().cast()) };
    if mounted != 0 {
        return Err(mount_error(std::io::Error::last_os_error()));
    }
    Ok(Some(parent))
}

fn nearest_existing(path: &Path) -> Option<PathBuf> {
    path.ancestors().find(|p| p.exists()).map(Path::to_path_buf)
}

/// The `bpf_obj_get_info_by_fd` member of `union bpf_attr`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info`, then its union, whose `xdp` and
/// `tcx` members both start with the ifindex. The union holds 64-bit
/// members, so it starts 8-byte aligned, after 4 bytes of padding. The
/// kernel fills at most `info_len` bytes and requires any tail it does not
/// know to be zero.
#[repr(C)]
struct LinkInfoHead {
    link_type: u32,
    id: u32,
    prog_id: u32,
    padding: u32,
    target: [u32; 28],
}

/// `BPF_LINK_TYPE_XDP` and `BPF_LINK_TYPE_TCX` from `linux/bpf.h`.
const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// The `BPF_OBJ_PIN`/`BPF_OBJ_GET` member of `union bpf_attr`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Opens the BPF object pinned at `path`.
fn open_pin(path: &Path) -> std::io::Result<OwnedFd> {
    let name = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut attr = ObjGetAttr { pathname: name.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: BPF_OBJ_GET reads the path, NUL-terminated and alive for the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }?;
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The interface the link pinned at `path` is attached to: `Some(0)` for a
/// defunct link (its interface is gone), `None` for a link of a type
/// without an ifindex.
fn pinned_link_ifindex(path: &Path) -> std::io::Result<Option<u32>> {
    let link = open_pin(path)?;
    let mut info = LinkInfoHead { link_type: 0, id: 0, prog_id: 0, padding: 0, target: [0; 28] };
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(link.as_raw_fd()).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?,
        info_len: u32::try_from(size_of::<LinkInfoHead>()).unwrap_or(u32::MAX),
        info: std::ptr::from_mut(&mut info) as u64,
    };
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD reads the info member and writes at
    // most `info_len` bytes to `info`, which lives for the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(matches!(info.link_type, BPF_LINK_TYPE_XDP | BPF_LINK_TYPE_TCX).then_some(info.target[0]))
}

/// The path a link of `kind` for `interface` is pinned at.
#[must_use]
pub fn link_pin(root: &Path, kind: &str, interface: &str) -> PathBuf {
    root.join("links").join(pin_name(kind, interface))
}

/// The pin name of a link of `kind` for `interface`. bpffs refuses names
/// with a dot, which VLAN interfaces have (`eth0.100`); the kernel never
/// names an interface with `%` (a name template), so it stands in.
fn pin_name(kind: &str, interface: &str) -> String {
    format!("{kind}-{}", interface.replace('.', "%"))
}

/// One repair made to the pinned links, for the log and the counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// The link's interface is gone (deleted, or re-created with another
    /// ifindex): the pin was removed, and the interface, if it is back,
    /// gets a fresh link.
    Defunct { pin: String },
    /// The interface was renamed while no daemon watched: the pin moved.
    Renamed { pin: String, to: String },
    /// The interface is no longer selected: the pin was removed, which
    /// detaches the program from it.
    Unselected { pin: String, interface: String },
    /// Not a link this daemon can read (corrupt, or of another kind): removed.
    Unreadable { pin: String, why: String },
    /// Another pin already holds the renamed interface's link: this one removed.
    Duplicate { pin: String },
}

impl Repair {
    /// The metrics label of this repair.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::Defunct { .. } => "defunct",
            Self::Renamed { .. } => "renamed",
            Self::Unselected { .. } => "unselected",
            Self::Unreadable { .. } => "unreadable",
            Self::Duplicate { .. } => "duplicate",
        }
    }
}

impl std::fmt::Display for Repair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Defunct { pin } => write!(f, "removed pinned link {pin}: its interface no longer exists"),
            Self::Renamed { pin, to } => write!(f, "moved pinned link {pin} to {to}: its interface was renamed"),
            Self::Unselected { pin, interface } => {
                write!(f, "removed pinned link {pin}: interface `{interface}` is no longer selected by --interface")
            }
            Self::Unreadable { pin, why } => write!(f, "removed pinned link {pin}: {why}"),
            Self::Duplicate { pin } => write!(f, "removed pinned link {pin}: another pin holds the same link"),
        }
    }
}

/// A pin holding a live link: (pin name, path, current interface name).
type Holder<'a> = (&'a String, &'a PathBuf, String);

/// Makes the pins under `root/links` describe the node as it is now (see
/// the module documentation); `selected` says which interface names the
/// daemon enforces on. Returns the repairs made. Only failing to read the
/// directory is an error: a pin that cannot be repaired is removed.
pub fn repair_links(root: &Path, selected: &dyn Fn(&str) -> bool) -> Result<Vec<Repair>, PinsError> {
    let dir = root.join("links");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(PinsError::Read { path: dir, source }),
    };
    let mut pins: BTreeMap<String, PathBuf> = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(|source| PinsError::Read { path: dir.clone(), source })?;
        pins.insert(entry.file_name().to_string_lossy().into_owned(), entry.path());
    }
    let mut repairs = Vec::new();
    let mut remove = |path: &Path, repair: Repair| {
        // Only an unselected interface's link is detached: a duplicate pin
        // may hold the very link that stays, and a defunct one is detached
        // already. A pin that is already gone needs no removing.
        let _ = if matches!(repair, Repair::Unselected { .. }) {
            detach_and_unpin(path)
        } else {
            std::fs::remove_file(path)
        };
        repairs.push(repair);
    };
    // First read every pin: which live interface (index, current name) it
    // holds, grouped by (hook, index).
    let mut live: BTreeMap<(&str, u32), Vec<Holder>> = BTreeMap::new();
    for (pin, path) in &pins {
        let Some((kind, _)) = pin.split_once('-').filter(|(kind, name)| LINK_KINDS.contains(kind) && !name.is_empty())
        else {
            remove(path, Repair::Unreadable { pin: pin.clone(), why: "not a name this daemon pins".to_owned() });
            continue;
        };
        let index = match pinned_link_ifindex(path) {
            Ok(Some(index)) => index,
            Ok(None) => {
                remove(path, Repair::Unreadable { pin: pin.clone(), why: "not an XDP or tcx link".to_owned() });
                continue;
            }
            Err(error) => {
                remove(path, Repair::Unreadable { pin: pin.clone(), why: format!("cannot read it: {error}") });
                continue;
            }
        };
        match (index != 0).then(|| crate::interfaces::interface_name(index)).flatten() {
            None => remove(path, Repair::Defunct { pin: pin.clone() }),
            Some(current) if !selected(&current) => {
                remove(path, Repair::Unselected { pin: pin.clone(), interface: current });
            }
            Some(current) => live.entry((kind, index)).or_default().push((pin, path, current)),
        }
    }
    // Then one pin per hook and interface, under the interface's current
    // name. Renames go through a temporary name, so names swapped between
    // two interfaces never collide.
    let mut moves = Vec::new();
    for ((kind, index), mut holders) in live {
        // Prefer the pin already under the right name.
        holders.sort_by_key(|(pin, _, current)| **pin != pin_name(kind, current));
        let mut holders = holders.into_iter();
        let Some((pin, path, current)) = holders.next() else { continue };
        for (duplicate, path, _) in holders {
            remove(path, Repair::Duplicate { pin: duplicate.clone() });
        }
        let wanted = pin_name(kind, &current);
        if *pin != wanted {
            // bpffs refuses names with a dot.
            let parked = dir.join(format!("moving_{kind}_{index}"));
            match move_pin(path, &parked) {
                Ok(()) => moves.push((pin.clone(), parked, wanted)),
                Err(error) => {
                    remove(path, Repair::Unreadable { pin: pin.clone(), why: format!("cannot move it: {error}") });
                }
            }
        }
    }
    for (pin, parked, wanted) in moves {
        match move_pin(&parked, &dir.join(&wanted)) {
            Ok(()) => repairs.push(Repair::Renamed { pin, to: wanted }),
            Err(error) => {
                let _ = std::fs::remove_file(&parked);
                repairs.push(Repair::Unreadable { pin, why: format!("cannot move it to {wanted}: {error}") });
            }
        }
    }
    Ok(repairs)
}

/// Detaches the programs of every hook on `interface` and removes their pins.
pub fn remove_links(root: &Path, interface: &str) {
    for kind in LINK_KINDS {
        let _ = detach_and_unpin(&link_pin(root, kind, interface));
    }
}

/// Detaches the link pinned at `path`, then removes the pin. Only removing
/// the pin detaches too, but later: bpffs drops its reference when the
/// inode is freed, after an RCU grace period, so for a moment the program
/// would still run with nothing pinned. An explicit `BPF_LINK_DETACH`
/// takes effect before this returns. A pin that is not a link, or a link
/// already defunct, is simply removed.
pub fn detach_and_unpin(path: &Path) -> std::io::Result<()> {
    if let Ok(link) = open_pin(path) {
        #[repr(C)]
        struct DetachAttr {
            link_fd: u32,
        }
        if let Ok(link_fd) = u32::try_from(link.as_raw_fd()) {
            let mut attr = DetachAttr { link_fd };
            // SAFETY: BPF_LINK_DETACH reads the link descriptor, alive for the call.
            let _ = unsafe { bpf(BPF_LINK_DETACH, &mut attr) };
        }
    }
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Moves the pins of `from` to `to` after the interface was renamed.
pub fn rename_links(root: &Path, from: &str, to: &str) -> std::io::Result<()> {
    for kind in LINK_KINDS {
        let path = link_pin(root, kind, from);
        if path.exists() {
            move_pin(&path, &link_pin(root, kind, to))?;
        }
    }
    Ok(())
}

/// Moves a pin: bpffs refuses `rename` here, so the object is pinned again at
/// `to` before the pin at `from` goes; the link is never without a pin.
pub(crate) fn move_pin(from: &Path, to: &Path) -> std::io::Result<()> {
    let link = open_pin(from)?;
    let name =
        CString::new(to.as_os_str().as_encoded_bytes()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut attr = ObjGetAttr {
        pathname: name.as_ptr() as u64,
        bpf_fd: u32::try_from(link.as_raw_fd()).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?,
        file_flags: 0,
    };
    // SAFETY: BPF_OBJ_PIN reads the path and descriptor, both alive for the call.
    unsafe { bpf(BPF_OBJ_PIN, &mut attr) }?;
    std::fs::remove_file(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_paths_name_hook_and_interface() {
        assert_eq!(link_pin(Path::new("/sys/fs/bpf/b"), "xdp", "eth0"), Path::new("/sys/fs/bpf/b/links/xdp-eth0"));
        // bpffs refuses dots in names.
        assert_eq!(link_pin(Path::new("/b"), "tc", "eth0.100"), Path::new("/b/links/tc-eth0%100"));
    }

    #[test]
    fn the_link_info_head_matches_the_kernel_layout() {
        // type, id, prog_id, then the 8-byte aligned union whose first u32 is the ifindex.
        assert_eq!(std::mem::offset_of!(LinkInfoHead, target), 16);
        assert_eq!(std::mem::offset_of!(InfoAttr, info), 8);
    }

    #[test]
    fn a_plain_directory_is_not_bpffs() {
        assert!(!is_bpffs(&std::env::temp_dir()));
        assert!(!is_bpffs(Path::new("/no/such/path")));
    }

    #[test]
    fn a_missing_links_directory_needs_no_repair() {
        let root = std::env::temp_dir().join(format!("bulkhead-pins-{}", std::process::id()));
        assert_eq!(repair_links(&root, &|_| true).unwrap(), Vec::new());
    }

    #[test]
    fn pins_that_are_not_links_are_removed() {
        let root = std::env::temp_dir().join(format!("bulkhead-pins-junk-{}", std::process::id()));
        std::fs::create_dir_all(root.join("links")).unwrap();
        std::fs::write(root.join("links/xdp-eth0"), b"not a link").unwrap();
        std::fs::write(root.join("links/stray"), b"").unwrap();
        let repairs = repair_links(&root, &|_| true).unwrap();
        assert_eq!(repairs.len(), 2, "{repairs:?}");
        assert!(repairs.iter().all(|r| r.label() == "unreadable"), "{repairs:?}");
        assert_eq!(std::fs::read_dir(root.join("links")).unwrap().count(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
