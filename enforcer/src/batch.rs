//! Batched hash-map writes (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`):
//! one system call per many thousand entries instead of one per entry. A
//! 100k-rule policy is 200k entries, and on a CPU whose mitigations make every
//! system call costly, entry-by-entry writing was most of its load time.
//! aya 0.14 has no wrapper for these commands.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use aya::Pod;
use aya::maps::{MapData, MapError};
use aya::sys::SyscallError;

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries per system call: large enough that the call's own cost vanishes,
/// small enough that no single call holds the CPU for long.
const CHUNK: usize = 8192;

/// The `batch` member of `union bpf_attr` (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Runs one batch command; returns how many entries the kernel processed,
/// and the error that stopped it, if any.
fn command(
    command: libc::c_long,
    map: &MapData,
    keys: *const u8,
    values: *const u8,
    count: usize,
) -> (usize, io::Result<()>) {
    let Ok(map_fd) = u32::try_from(map.fd().as_fd().as_raw_fd()) else {
        return (0, Err(io::Error::from_raw_os_error(libc::EBADF)));
    };
    let Ok(wanted) = u32::try_from(count) else {
        return (0, Err(io::Error::from_raw_os_error(libc::E2BIG)));
    };
    let mut attr =
        BatchAttr { keys: keys as u64, values: values as u64, count: wanted, map_fd, ..BatchAttr::default() };
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; the kernel
    // reads `count` keys (and values) from the arrays, alive for the call,
    // and writes only `attr.count`.
    let result = unsafe { libc::syscall(libc::SYS_bpf, command, &raw mut attr, std::mem::size_of::<BatchAttr>()) };
    if result < 0 {
        // On failure `count` says how many entries were done before it.
        (attr.count.min(wanted) as usize, Err(io::Error::last_os_error()))
    } else {
        (count, Ok(()))
    }
}

fn failed(call: &'static str, io_error: io::Error) -> MapError {
    MapError::SyscallError(SyscallError { call, io_error })
}

/// Inserts or replaces `entries` in a hash map. Returns how many of them (a
/// prefix) are written, and the error that stopped the rest, if any.
pub fn update<K: Pod, V: Pod>(map: &MapData, entries: &[(K, V)]) -> (usize, Result<(), MapError>) {
    let mut done = 0;
    for chunk in entries.chunks(CHUNK) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let (written, result) =
            command(BPF_MAP_UPDATE_BATCH, map, keys.as_ptr().cast(), values.as_ptr().cast(), chunk.len());
        done += written;
        if let Err(error) = result {
            return (done, Err(failed("bpf_map_update_batch", error)));
        }
    }
    (done, Ok(()))
}

/// Removes `keys` from a hash map; a key already absent counts as removed.
/// Returns how many of them (a prefix) are gone, and the error that stopped
/// the rest, if any.
pub fn delete<K: Pod>(map: &MapData, keys: &[K]) -> (usize, Result<(), MapError>) {
    let mut done = 0;
    while done < keys.len() {
        let chunk = &keys[done..keys.len().min(done + CHUNK)];
        let (removed, result) =
            command(BPF_MAP_DELETE_BATCH, map, chunk.as_ptr().cast(), std::ptr::null(), chunk.len());
        done += removed;
        match result {
            Ok(()) => {}
            // The kernel stops at a missing key: it is as good as deleted.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => done += 1,
            Err(error) => return (done, Err(failed("bpf_map_delete_batch", error))),
        }
    }
    (done, Ok(()))
}
