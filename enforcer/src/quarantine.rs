//! Quarantine: workloads cut off from everything at the next packet, by an
//! operator (`bulkhead quarantine add`) or by the lateral-movement detector.
//!
//! A quarantine names targets (see [`policy::target::Target`]); the engine
//! turns them into addresses, again after every policy change, and the
//! kernel isolates those addresses before it asks conntrack or the policy
//! (see the kernel's `quarantine` module). The list lives in the state dir
//! (`quarantine.json`) and the addresses in pinned tries, so a quarantine
//! holds while the daemon restarts, across policy reloads, and until it is
//! removed or lapses at its expiry.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::PoisonError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use policy::target::{Target, TargetError};
use serde::{Deserialize, Serialize};

use crate::datapath::DatapathError;
use crate::metrics::Shared;

/// The file in the state dir.
pub const FILE: &str = "quarantine.json";

/// The most targets at once: each is resolved again after every policy change.
pub const MAX_TARGETS: usize = 4096;

/// The longest reason kept.
pub const MAX_REASON: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("`{0}` is not quarantined; `bulkhead quarantine list` shows what is")]
    NotQuarantined(String),
    #[error("the expiry {0} has passed already; give a later time or a duration such as 1h")]
    Expired(String),
    #[error("{MAX_TARGETS} targets are quarantined already; remove some or quarantine a prefix or a selector")]
    TooMany,
    #[error("the reason is longer than {MAX_REASON} bytes or has control characters; shorten it")]
    Reason,
    #[error("the kernel refused the quarantine ({0}); nothing was changed")]
    Datapath(#[source] Box<DatapathError>),
    #[error("the daemon has no datapath yet (starting or stopping); try again")]
    NotRunning,
}

/// One quarantined target, as listed and as kept in the state dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The target in its written form (see [`Target`]).
    pub target: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Who quarantined it: the API client's name, or `lateral-movement`.
    pub by: String,
    /// RFC 3339.
    pub since: String,
    /// RFC 3339; none: until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// The addresses it stands for now (listings only, not kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// The daemon's quarantine list.
#[derive(Debug, Default)]
pub struct Quarantine {
    entries: BTreeMap<Target, Kept>,
    file: Option<PathBuf>,
    /// The management ports the node may still use with quarantined addresses.
    exempt: Vec<(u8, u16)>,
    /// Whether the kernel holds what the list says (false after a failed write).
    in_step: bool,
}

#[derive(Debug, Clone)]
struct Kept {
    entry: Entry,
    expires: Option<SystemTime>,
    addresses: Vec<IpNet>,
}

/// What a change did, for its caller.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub entry: Entry,
    /// Tracked connection entries cut.
    pub flows_cut: usize,
}

impl Quarantine {
    /// The list kept in `state_dir`, or an empty one. A list that cannot be
    /// read is set aside (renamed `.unreadable`), and what the kernel's
    /// pinned tries hold is kept as address targets: the node stays as
    /// isolated as it was, and the log says what happened.
    #[must_use]
    pub fn load(state_dir: Option<&Path>, kernel: &BTreeSet<IpNet>, exempt: Vec<(u8, u16)>, now: SystemTime) -> Self {
        let file = state_dir.map(|dir| dir.join(FILE));
        let mut quarantine = Self { entries: BTreeMap::new(), file: file.clone(), exempt, in_step: false };
        let lost = |why: String| if kernel.is_empty() { Ok(Vec::new()) } else { Err(why) };
        let listed: Result<Vec<Entry>, String> = match &file {
            None => lost("no state dir keeps the quarantine list".to_owned()),
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => serde_json::from_str(&text).map_err(|error| {
                    let aside = path.with_extension("json.unreadable");
                    let _ = std::fs::rename(path, &aside);
                    format!("{} is not a quarantine list ({error}); moved to {}", path.display(), aside.display())
                }),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    lost(format!("the quarantine list {} is gone", path.display()))
                }
                Err(error) => Err(format!("cannot read {} ({error})", path.display())),
            },
        };
        match listed {
            Ok(entries) => {
                for entry in entries {
                    let Ok(target) = Target::parse(&entry.target) else {
                        log::error!("quarantine list: dropping `{}`: not a target", entry.target);
                        continue;
                    };
                    let expires = entry.expires.as_deref().and_then(policy::parse_rfc3339);
                    quarantine.entries.insert(target, Kept { entry, expires, addresses: Vec::new() });
                }
            }
            Err(why) => {
                log::error!(
                    "{why}; keeping the {} quarantined addresses the kernel holds, as address targets",
                    kernel.len()
                );
                for net in kernel {
                    let target = Target::Net(*net);
                    let entry = Entry {
                        target: target.to_string(),
                        reason: "kept from the kernel: the quarantine list was lost".to_owned(),
                        by: "bulkhead".to_owned(),
                        since: crate::events::rfc3339_at(now),
                        expires: None,
                        addresses: Vec::new(),
                    };
                    quarantine.entries.insert(target, Kept { entry, expires: None, addresses: Vec::new() });
                }
            }
        }
        quarantine
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `target` is quarantined.
    #[must_use]
    pub fn holds(&self, target: &Target) -> bool {
        self.entries.contains_key(target)
    }

    /// Every entry with the addresses it stands for now.
    #[must_use]
    pub fn list(&self) -> Vec<Entry> {
        self.entries
            .values()
            .map(|kept| Entry {
                addresses: kept.addresses.iter().map(ToString::to_string).collect(),
                ..kept.entry.clone()
            })
            .collect()
    }

    /// The soonest expiry.
    #[must_use]
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.entries.values().filter_map(|kept| kept.expires).min()
    }

    fn insert(
        &mut self,
        target: Target,
        reason: &str,
        by: &str,
        expires: Option<SystemTime>,
        now: SystemTime,
    ) -> Result<Entry, QuarantineError> {
        if reason.len() > MAX_REASON || reason.chars().any(char::is_control) {
            return Err(QuarantineError::Reason);
        }
        if let Some(at) = expires
            && at <= now
        {
            return Err(QuarantineError::Expired(crate::events::rfc3339_at(at)));
        }
        if !self.entries.contains_key(&target) && self.entries.len() >= MAX_TARGETS {
            return Err(QuarantineError::TooMany);
        }
        let entry = Entry {
            target: target.to_string(),
            reason: reason.to_owned(),
            by: by.to_owned(),
            since: crate::events::rfc3339_at(now),
            expires: expires.map(crate::events::rfc3339_at),
            addresses: Vec::new(),
        };
        self.entries.insert(target, Kept { entry: entry.clone(), expires, addresses: Vec::new() });
        Ok(entry)
    }

    /// Resolves every target with the policy in force; returns the union.
    fn resolve(&mut self, engine: &policy::Engine) -> BTreeSet<IpNet> {
        let mut all = BTreeSet::new();
        for (target, kept) in &mut self.entries {
            kept.addresses = engine.resolve_target(target);
            all.extend(kept.addresses.iter().map(IpNet::trunc));
        }
        all
    }

    /// Writes the exemption and what the list stands for into `datapath`:
    /// at start, before the programs are attached.
    pub fn install(
        &mut self,
        engine: &policy::Engine,
        datapath: &mut crate::datapath::Datapath,
    ) -> Result<crate::datapath::QuarantineWrite, DatapathError> {
        datapath.set_quarantine_exempt(&self.exempt)?;
        let nets = self.resolve(engine);
        let written = datapath.set_quarantine(&nets);
        self.in_step = written.is_ok();
        // Kept as read, or as recovered from the kernel; nothing to keep
        // when there is nothing and never was.
        if !self.entries.is_empty() || self.file.as_ref().is_some_and(|file| file.exists()) {
            self.save();
        }
        written
    }

    fn save(&self) {
        let Some(path) = &self.file else { return };
        let entries: Vec<&Entry> = self.entries.values().map(|kept| &kept.entry).collect();
        let text = match serde_json::to_string_pretty(&entries) {
            Ok(text) => text + "\n",
            Err(error) => {
                log::error!("cannot write the quarantine list: {error}");
                return;
            }
        };
        if let Err(error) = crate::state::write_atomically(path, text.as_bytes()) {
            log::error!(
                "cannot keep the quarantine list in {} ({error}); it holds until the daemon restarts, then only the kernel's addresses are kept",
                path.display()
            );
        }
    }
}

/// Writes what the list stands for into the kernel. Lock order: the list,
/// then the engine, then the datapath (the maintainer takes the engine
/// before the datapath too).
fn write(quarantine: &mut Quarantine, shared: &Shared) -> Result<crate::datapath::QuarantineWrite, QuarantineError> {
    let nets = {
        let engine = shared.engine.read().unwrap_or_else(PoisonError::into_inner);
        quarantine.resolve(&engine)
    };
    let mut guard = shared.datapath.lock().unwrap_or_else(PoisonError::into_inner);
    let datapath = guard.as_mut().ok_or(QuarantineError::NotRunning)?;
    let result = datapath.set_quarantine(&nets).map_err(|error| QuarantineError::Datapath(Box::new(error)));
    quarantine.in_step = result.is_ok();
    result
}

/// Makes the kernel isolate what the list stands for now: after a policy
/// change (a quarantined identity's new address), and at start.
pub fn enforce(shared: &Shared) {
    let mut quarantine = shared.quarantine.lock().unwrap_or_else(PoisonError::into_inner);
    if quarantine.is_empty() && quarantine.in_step {
        return;
    }
    match write(&mut quarantine, shared) {
        Ok(written) if !written.added.is_empty() || !written.removed.is_empty() => log::info!(
            "quarantine: {} addresses isolated, {} released, {} tracked connections cut",
            written.added.len(),
            written.removed.len(),
            written.flows_cut
        ),
        Ok(_) => {}
        Err(error) => log::error!("quarantine: {error}; retried after the next change"),
    }
}

/// Quarantines `target` (again, with a new reason and expiry, if it is
/// already). All or nothing: a target the kernel cannot take is not listed.
pub fn add(
    shared: &Shared,
    target: &str,
    reason: &str,
    expires: Option<SystemTime>,
    by: &str,
) -> Result<Change, QuarantineError> {
    let target = Target::parse(target)?;
    let now = SystemTime::now();
    let mut quarantine = shared.quarantine.lock().unwrap_or_else(PoisonError::into_inner);
    let before = quarantine.entries.get(&target).cloned();
    let entry = quarantine.insert(target.clone(), reason, by, expires, now)?;
    let written = match write(&mut quarantine, shared) {
        Ok(written) => written,
        Err(error) => {
            match before {
                Some(kept) => quarantine.entries.insert(target, kept),
                None => quarantine.entries.remove(&target),
            };
            // Put the kernel back in step with the list as it was.
            let _ = write(&mut quarantine, shared);
            return Err(error);
        }
    };
    quarantine.save();
    let listed = quarantine.list().into_iter().find(|e| e.target == entry.target).unwrap_or(entry);
    drop(quarantine);
    announce(shared, "start", &listed, None);
    Ok(Change { entry: listed, flows_cut: written.flows_cut })
}

/// Lifts the quarantine of `target`.
pub fn remove(shared: &Shared, target: &str, by: &str) -> Result<Entry, QuarantineError> {
    let target = Target::parse(target)?;
    let mut quarantine = shared.quarantine.lock().unwrap_or_else(PoisonError::into_inner);
    let kept = quarantine.entries.remove(&target).ok_or_else(|| QuarantineError::NotQuarantined(target.to_string()))?;
    if let Err(error) = write(&mut quarantine, shared) {
        quarantine.entries.insert(target, kept);
        let _ = write(&mut quarantine, shared);
        return Err(error);
    }
    quarantine.save();
    drop(quarantine);
    let entry = Entry { addresses: kept.addresses.iter().map(ToString::to_string).collect(), ..kept.entry };
    announce(shared, "end", &entry, Some(&format!("removed by {by}")));
    Ok(entry)
}

/// Lifts every quarantine whose expiry has come.
pub fn lapse(shared: &Shared, now: SystemTime) {
    let mut quarantine = shared.quarantine.lock().unwrap_or_else(PoisonError::into_inner);
    let due: Vec<Target> = quarantine
        .entries
        .iter()
        .filter(|(_, kept)| kept.expires.is_some_and(|at| at <= now))
        .map(|(t, _)| t.clone())
        .collect();
    if due.is_empty() {
        return;
    }
    let lapsed: Vec<Kept> = due.iter().filter_map(|target| quarantine.entries.remove(target)).collect();
    if let Err(error) = write(&mut quarantine, shared) {
        // The kernel keeps isolating them; the next tick tries again.
        log::error!("quarantine: lifting {} lapsed targets failed: {error}; retrying", lapsed.len());
        for (target, kept) in due.into_iter().zip(lapsed) {
            quarantine.entries.insert(target, kept);
        }
        return;
    }
    quarantine.save();
    drop(quarantine);
    for kept in lapsed {
        let entry = Entry { addresses: kept.addresses.iter().map(ToString::to_string).collect(), ..kept.entry };
        announce(shared, "end", &entry, Some("expired"));
    }
}

/// Lifts lapsed quarantines until `stop`: at their expiry, within 100 ms.
pub fn spawn_expiry(shared: std::sync::Arc<Shared>, stop: std::sync::Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            let next = shared.quarantine.lock().unwrap_or_else(PoisonError::into_inner).next_expiry();
            let now = SystemTime::now();
            if next.is_some_and(|at| at <= now) {
                lapse(&shared, now);
            }
        }
    })
}

/// The JSON event of a quarantine starting or ending, and its audit line.
#[derive(Serialize)]
struct QuarantineEvent<'a> {
    time: String,
    event: &'static str,
    action: &'static str,
    target: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'a str,
    by: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires: Option<&'a str>,
    addresses: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    ended: Option<&'a str>,
}

fn announce(shared: &Shared, action: &'static str, entry: &Entry, ended: Option<&str>) {
    let event = QuarantineEvent {
        time: crate::events::rfc3339_at(SystemTime::now()),
        event: "quarantine",
        action,
        target: &entry.target,
        reason: &entry.reason,
        by: &entry.by,
        expires: entry.expires.as_deref(),
        addresses: &entry.addresses,
        ended,
    };
    log::info!(
        target: "audit",
        "who={} action=quarantine-{action} target={} addresses={} reason={:?}{}",
        entry.by,
        entry.target,
        entry.addresses.join(","),
        entry.reason,
        ended.map(|why| format!(" ended={why:?}")).unwrap_or_default()
    );
    if let Ok(line) = serde_json::to_string(&event) {
        shared.announce(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_survives_a_restart_and_an_unreadable_one_keeps_the_kernels_addresses() {
        let dir = std::env::temp_dir().join(format!("bulkhead-quarantine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let now = SystemTime::now();
        let mut list = Quarantine::load(Some(&dir), &BTreeSet::new(), Vec::new(), now);
        let later = now + Duration::from_hours(1);
        list.insert(Target::parse("web").unwrap(), "beaconing", "alice", Some(later), now).unwrap();
        list.insert(Target::parse("10.0.0.0/24").unwrap(), "", "bob", None, now).unwrap();
        list.save();
        let again = Quarantine::load(Some(&dir), &BTreeSet::new(), Vec::new(), now);
        assert_eq!(again.list(), list.list());
        assert_eq!(again.next_expiry().map(|t| t.duration_since(later).unwrap_or_default().as_secs()), Some(0));

        std::fs::write(dir.join(FILE), "{not json").unwrap();
        let kernel: BTreeSet<IpNet> = ["10.0.0.7/32".parse().unwrap()].into();
        let recovered = Quarantine::load(Some(&dir), &kernel, Vec::new(), now);
        assert_eq!(recovered.list().iter().map(|e| e.target.as_str()).collect::<Vec<_>>(), ["10.0.0.7"]);
        assert!(dir.join("quarantine.json.unreadable").exists(), "the unreadable list is set aside, not lost");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_requests_change_nothing() {
        let now = SystemTime::now();
        let mut list = Quarantine::default();
        let web = Target::parse("web").unwrap();
        let past = now - Duration::from_secs(1);
        assert!(matches!(list.insert(web.clone(), "", "a", Some(past), now), Err(QuarantineError::Expired(_))));
        assert!(matches!(list.insert(web.clone(), "x\u{7}", "a", None, now), Err(QuarantineError::Reason)));
        assert!(list.is_empty());
        for i in 0..MAX_TARGETS {
            list.insert(Target::parse(&format!("id{i}")).unwrap(), "", "a", None, now).unwrap();
        }
        assert!(matches!(list.insert(web, "", "a", None, now), Err(QuarantineError::TooMany)));
        // Quarantining a listed target again only updates it.
        list.insert(Target::parse("id0").unwrap(), "again", "a", None, now).unwrap();
        assert_eq!(list.len(), MAX_TARGETS);
    }
}
