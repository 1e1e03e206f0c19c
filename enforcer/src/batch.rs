//! Batched map reads and writes (`BPF_MAP_LOOKUP_BATCH`,
//! `BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`): one system call per
//! many thousand entries instead of one (or two) per entry. A
//! 100k-rule policy is 200k entries, and on a CPU whose mitigations make every
//! system call costly, entry-by-entry writing was most of its load time.
//! aya 0.14 has no wrapper for these commands.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use aya::Pod;
use aya::maps::{MapData, MapError};
use aya::sys::SyscallError;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
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

fn map_fd(map: &MapData) -> io::Result<u32> {
    u32::try_from(map.fd().as_fd().as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))
}

/// The `bpf()` system call for a batch command. The caller's `attr` points
/// only at buffers alive for the call and sized for `attr.count` entries
/// (keys, and values or cursors where the command uses them).
fn bpf(command: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed, and every
    // pointer in it is valid for what the command reads or writes (above).
    unsafe { crate::sys::bpf(command, attr) }.map(drop)
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
    let map_fd = match map_fd(map) {
        Ok(fd) => fd,
        Err(error) => return (0, Err(error)),
    };
    let Ok(wanted) = u32::try_from(count) else {
        return (0, Err(io::Error::from_raw_os_error(libc::E2BIG)));
    };
    let mut attr =
        BatchAttr { keys: keys as u64, values: values as u64, count: wanted, map_fd, ..BatchAttr::default() };
    match bpf(command, &mut attr) {
        Ok(()) => (count, Ok(())),
        // On failure `count` says how many entries were done before it.
        Err(error) => (attr.count.min(wanted) as usize, Err(error)),
    }
}

/// What one `BPF_MAP_LOOKUP_BATCH` call read.
struct Chunk {
    /// Entries read into the buffers.
    got: usize,
    /// The kernel's cursor to go on from.
    next: u32,
    /// Whether the map's end was reached (with the entries read so far).
    at_end: bool,
}

/// One `BPF_MAP_LOOKUP_BATCH` call, from `cursor` (the map's start with
/// `None`), into `keys` and `values`, which hold room for `wanted` entries
/// of the map's key and value sizes. Errors other than the map's end are
/// returned as the kernel gave them.
fn lookup_chunk(map_fd: u32, cursor: Option<u32>, keys: *mut u8, values: *mut u8, wanted: u32) -> io::Result<Chunk> {
    let mut next = 0u32;
    let mut attr = BatchAttr {
        in_batch: cursor.as_ref().map_or(0, |c| std::ptr::from_ref(c) as u64),
        out_batch: std::ptr::from_mut(&mut next) as u64,
        keys: keys as u64,
        values: values as u64,
        count: wanted,
        map_fd,
        ..BatchAttr::default()
    };
    let at_end = match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(()) => false,
        // ENOENT: the map's end, with whatever this chunk holds.
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => true,
        Err(error) => return Err(error),
    };
    Ok(Chunk { got: attr.count.min(wanted) as usize, next, at_end })
}

/// Sums over CPUs of the `u64` counters at `keys` of a per-CPU array with
/// `cpus` possible CPUs (the sum for key `k` at `k - keys.start`), read a
/// chunk of keys per system call: a 100k-rule policy has 200k rule
/// counters, and reading them one by one held the datapath for a quarter
/// of a second per scrape.
pub fn per_cpu_sums(map: &MapData, keys: std::ops::Range<u32>, cpus: usize) -> Result<Vec<u64>, MapError> {
    let map_fd = map_fd(map).map_err(|error| failed("bpf_map_lookup_batch", error))?;
    let (first, count) = (keys.start, keys.len() as u32);
    let mut sums = vec![0u64; count as usize];
    // The kernel's cursor: the key before the next chunk (none from key 0).
    let mut cursor: Option<u32> = first.checked_sub(1);
    let mut read = 0u32;
    while read < count {
        let wanted = (count - read).min(CHUNK as u32);
        let mut keys = vec![0u32; wanted as usize];
        // A per-CPU value is one 8-aligned slot per possible CPU.
        let mut values = vec![0u64; wanted as usize * cpus];
        let Chunk { got, next, at_end } =
            lookup_chunk(map_fd, cursor, keys.as_mut_ptr().cast(), values.as_mut_ptr().cast(), wanted)
                .map_err(|error| failed("bpf_map_lookup_batch", error))?;
        for (key, per_cpu) in keys[..got].iter().zip(values.chunks(cpus)) {
            if let Some(sum) = key.checked_sub(first).and_then(|at| sums.get_mut(at as usize)) {
                *sum = per_cpu.iter().sum();
            }
        }
        read += got as u32;
        if at_end || got == 0 {
            break;
        }
        cursor = Some(next);
    }
    Ok(sums)
}

/// Every entry of a hash map (not a per-CPU one) whose keys are `K` and
/// values `V`, a chunk of buckets per system call instead of two calls per
/// entry.
pub fn hash_entries<K: Pod, V: Pod>(map: &MapData) -> Result<Vec<(K, V)>, MapError> {
    let mut entries = Vec::new();
    for_each_hash_entry(map, |key, value| entries.push((key, value)))?;
    Ok(entries)
}

/// How many entries a hash map holds, read in batches and not kept: the
/// conntrack gauge counts up to 262,144 entries every scrape, and a vector
/// of them all (grown by doubling) left its peak in the daemon's resident
/// set, growing with the table.
pub fn hash_len<K: Pod, V: Pod>(map: &MapData) -> Result<usize, MapError> {
    let mut count = 0;
    for_each_hash_entry::<K, V>(map, |_, _| count += 1)?;
    Ok(count)
}

/// Calls `each` with every entry of a hash map, read a chunk at a time
/// into two buffers reused from chunk to chunk.
fn for_each_hash_entry<K: Pod, V: Pod>(map: &MapData, mut each: impl FnMut(K, V)) -> Result<(), MapError> {
    let map_fd = map_fd(map).map_err(|error| failed("bpf_map_lookup_batch", error))?;
    let (key_size, value_size) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    // The kernel's cursor: a bucket number, opaque to us.
    let mut cursor: Option<u32> = None;
    let mut chunk = CHUNK;
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    loop {
        keys.resize(chunk * key_size, 0u8);
        values.resize(chunk * value_size, 0u8);
        let wanted = u32::try_from(chunk).unwrap_or(u32::MAX);
        let Chunk { got, next, at_end } =
            match lookup_chunk(map_fd, cursor, keys.as_mut_ptr(), values.as_mut_ptr(), wanted) {
                Ok(read) => read,
                // One bucket holds more entries than the buffers: larger ones.
                Err(error) if error.raw_os_error() == Some(libc::ENOSPC) && chunk < CHUNK << 8 => {
                    chunk *= 2;
                    continue;
                }
                Err(error) => return Err(failed("bpf_map_lookup_batch", error)),
            };
        for i in 0..got {
            // SAFETY: the kernel wrote `got` whole keys and values of the
            // map's sizes, which are `K`'s and `V`'s; both are plain data.
            let (key, value) = unsafe {
                (
                    std::ptr::read_unaligned(keys.as_ptr().add(i * key_size).cast::<K>()),
                    std::ptr::read_unaligned(values.as_ptr().add(i * value_size).cast::<V>()),
                )
            };
            each(key, value);
        }
        if at_end || (got == 0 && cursor == Some(next)) {
            break;
        }
        cursor = Some(next);
    }
    Ok(())
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
