//! The daemon's footprint: its resident size with the example policy and
//! with the large one, and the locked memory of each map it pinned.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub struct Footprint {
    pub idle_kib: u64,
    pub loaded_kib: u64,
    /// Identities and rules in the policy `loaded_kib` was read with.
    pub loaded_size: usize,
    pub maps: Vec<(String, u64)>,
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

pub fn memlock(root: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(root.join("maps")) else { return Vec::new() };
    let mut out: Vec<(String, u64)> = entries
        .flatten()
        .filter_map(|entry| {
            let output = Command::new("bpftool").args(["map", "show", "pinned"]).arg(entry.path()).output().ok()?;
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            let bytes = text.split_whitespace().skip_while(|w| *w != "memlock").nth(1)?;
            // Pins carry a layout stamp (`CONNTRACK-v1-40x40`): report the map's name.
            let pin = entry.file_name().to_string_lossy().into_owned();
            let name = pin.split('-').next().unwrap_or(&pin).to_owned();
            Some((name, bytes.trim_end_matches('B').parse().ok()?))
        })
        .collect();
    out.sort();
    out
}

/// The resident size of `pid` once it holds still.
pub fn settled_rss_kib(pid: u32) -> u64 {
    // After an apply the daemon records the new policy and then returns the
    // parse's memory to the kernel: read once the figure holds still.
    let mut loaded_kib = rss_kib(pid);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        let now = rss_kib(pid);
        if now == loaded_kib {
            break;
        }
        loaded_kib = now;
    }
    loaded_kib
}

pub fn markdown(md: &mut String, footprint: &Footprint) {
    let big = footprint.loaded_size;
    let _ = writeln!(
        md,
        "\n### Footprint\n\n| what | value |\n|---|---:|\n| daemon RSS, example policy | {} KiB |\n| daemon RSS, {big} identities and rules | {} KiB |",
        footprint.idle_kib, footprint.loaded_kib
    );
    for (map, bytes) in &footprint.maps {
        let _ = writeln!(md, "| map `{map}` (memlock) | {} KiB |", bytes / 1024);
    }
}

pub fn json(footprint: &Footprint) -> serde_json::Value {
    serde_json::json!({"rss_idle_kib": footprint.idle_kib, "rss_loaded_kib": footprint.loaded_kib, "loaded_size": footprint.loaded_size, "maps_memlock_bytes": footprint.maps.iter().cloned().collect::<BTreeMap<_, _>>()})
}
