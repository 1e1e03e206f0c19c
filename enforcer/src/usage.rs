//! Which allow rules are used: for each rule in force, since when this
//! node has enforced it and when it last allowed a packet, from the
//! kernel's per-rule verdict counters. Kept in the state directory
//! (`rule-usage.json`) across restarts, so `bulkhead policy unused
//! --since 30d` can name the permissions nobody used in a month: the data
//! for access reviews and for revoking what is not needed.
//!
//! "Used" means the rule decided a packet: a new connection, or one judged
//! again after a policy change (established flows pass by conntrack, so a
//! long-lived connection counts when it opened). Times have the
//! granularity of the refresh ([`REFRESH`]).
//!
//! The record holds every rule in force, so it is as large as the policy:
//! it is kept as one sorted vector of fixed-size records whose names are
//! the engine's own (shared, not copied), 24 bytes a rule. As a map of
//! strings to the JSON shape it took 137 bytes a rule, 13.7 MB at 100,000.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::PoisonError;
use std::time::{Duration, SystemTime};

use policy::engine::Name;
use policy::model::Action;
use serde::{Deserialize, Serialize};

use crate::metrics::Shared;

/// How often the counters are read (and the file written, when changed).
pub const REFRESH: Duration = Duration::from_secs(30);

/// One rule's use, in seconds since the epoch: the record's file format
/// and the API's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleUse {
    /// `allow` or `deny`.
    pub action: String,
    /// Since when this node has enforced the rule (by name).
    pub since: u64,
    /// When it last decided a packet, if it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<u64>,
}

/// One rule's use as kept: 24 bytes.
#[derive(Debug, Clone)]
struct Tracked {
    name: Name,
    /// Since when, and whether the rule denies in the top bit ([`DENIES`]):
    /// a byte of its own would round the record up by 8 bytes.
    since_and_action: u64,
    /// Seconds from `since` to the last use, plus one; 0 when never used.
    /// A last use before `since` (a clock set back, a record edited by
    /// hand) is kept as `since`, one 136 years after as that.
    used_after: u32,
    /// The low 32 bits of this run's count when last read (counters start
    /// at zero with the daemon): a count that grew changes them by less
    /// than 2^31, unless it grew by more between two reads, 71 million
    /// decisions a second for one rule.
    counted: u32,
}

/// [`Tracked::since_and_action`]'s action bit. Times are seconds since
/// the epoch, far below it (a `since` read from a file at or above it is
/// taken as the largest time below).
const DENIES: u64 = 1 << 63;

impl Tracked {
    fn new(name: Name, action: Action, since: u64, last_used: u64) -> Self {
        let denies = if action == Action::Deny { DENIES } else { 0 };
        let mut tracked = Self { name, since_and_action: since.min(DENIES - 1) | denies, used_after: 0, counted: 0 };
        if last_used != 0 {
            tracked.set_last_used(last_used);
        }
        tracked
    }

    fn set_last_used(&mut self, at: u64) {
        let after = at.saturating_sub(self.since()).saturating_add(1);
        self.used_after = u32::try_from(after).unwrap_or(u32::MAX);
    }

    /// 0 when never used (no packet is decided at the epoch).
    fn last_used(&self) -> u64 {
        match self.used_after {
            0 => 0,
            after => self.since() + u64::from(after) - 1,
        }
    }

    fn action(&self) -> Action {
        if self.since_and_action & DENIES == 0 { Action::Allow } else { Action::Deny }
    }

    fn since(&self) -> u64 {
        self.since_and_action & !DENIES
    }

    fn as_use(&self) -> RuleUse {
        RuleUse {
            action: self.action().to_string(),
            since: self.since(),
            last_used: Some(self.last_used()).filter(|&used| used != 0),
        }
    }
}

/// The rules in force and their use.
#[derive(Debug, Default)]
pub struct RuleUsage {
    file: Option<PathBuf>,
    /// Sorted by name; names are unique.
    rules: Vec<Tracked>,
    changed: bool,
    /// A failure to write is logged once, not every refresh.
    write_failed: bool,
}

fn seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The record as read from its file; an entry with an action other than
/// `allow` or `deny` makes the whole record unreadable, like any other
/// damage.
fn from_file(text: &str) -> Result<Vec<Tracked>, String> {
    let read: BTreeMap<String, RuleUse> = serde_json::from_str(text).map_err(|error| error.to_string())?;
    read.into_iter()
        .map(|(name, rule)| {
            let action = match rule.action.as_str() {
                "allow" => Action::Allow,
                "deny" => Action::Deny,
                other => return Err(format!("rule {name:?} has action {other:?}")),
            };
            let last_used = rule.last_used.unwrap_or(0);
            Ok(Tracked::new(Name::from(name), action, rule.since, last_used))
        })
        .collect()
}

impl RuleUsage {
    /// What `state_dir/rule-usage.json` holds; empty if there is none yet.
    /// A file that cannot be read is reported and started afresh (the
    /// counters themselves are intact: only the history before is lost).
    #[must_use]
    pub fn load(state_dir: &Path) -> Self {
        let file = state_dir.join("rule-usage.json");
        let rules = match std::fs::read_to_string(&file) {
            Ok(text) => from_file(&text).unwrap_or_else(|error| {
                log::warn!("{} is not a rule usage record ({error}); starting it afresh", file.display());
                Vec::new()
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(error) => {
                log::warn!("cannot read {} ({error}); starting rule usage afresh", file.display());
                Vec::new()
            }
        };
        Self { file: Some(file), rules, ..Self::default() }
    }

    /// Takes the rules in force now and the counts of this run (rule and
    /// action → packets decided since the daemon started): a rule whose
    /// count grew was used now; rules that left are forgotten. One pass
    /// over the three, each in name order.
    pub fn update(
        &mut self,
        in_force: impl IntoIterator<Item = (Name, Action)>,
        counts: &BTreeMap<(String, Action), u64>,
        now: SystemTime,
    ) {
        let mut in_force: Vec<(Name, Action)> = in_force.into_iter().collect();
        in_force.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        in_force.dedup_by(|a, b| a.0 == b.0);
        let now = seconds(now);
        let mut counts = counts.iter().peekable();
        let mut before = std::mem::take(&mut self.rules).into_iter().peekable();
        let mut kept = Vec::with_capacity(in_force.len());
        for (name, action) in in_force {
            while before.next_if(|old| *old.name < *name).is_some() {
                self.changed = true; // a rule that left
            }
            let mut tracked = match before.next_if(|old| old.name == name) {
                Some(old) if old.action() == action => Tracked { name, ..old },
                // New, or the name now has the other action: another permission.
                _ => {
                    self.changed = true;
                    Tracked::new(name, action, now, 0)
                }
            };
            while counts.next_if(|((counted, a), _)| (counted.as_str(), *a) < (&*tracked.name, action)).is_some() {}
            let count = counts
                .next_if(|((counted, a), _)| counted.as_str() == &*tracked.name && *a == action)
                .map_or(0, |(_, count)| *count);
            #[allow(clippy::cast_possible_truncation, reason = "the low bits tell a count that grew; see `counted`")]
            let count = count as u32;
            // Grown, as the low bits tell (a count read as less, a rule's
            // counter gone, is no use).
            if (1..1 << 31).contains(&count.wrapping_sub(tracked.counted)) {
                tracked.set_last_used(now);
                self.changed = true;
            }
            tracked.counted = count;
            kept.push(tracked);
        }
        self.changed |= before.next().is_some();
        self.rules = kept;
    }

    /// Writes the record if it changed (atomically; best effort: a failure
    /// is logged once and the record stays in memory).
    pub fn save(&mut self) {
        let Some(file) = &self.file else { return };
        if !self.changed {
            return;
        }
        let record = Record(&self.rules);
        let written = serde_json::to_vec(&record)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::state::write_atomically(file, &bytes));
        match written {
            Ok(()) => {
                self.changed = false;
                self.write_failed = false;
            }
            Err(error) if !self.write_failed => {
                self.write_failed = true;
                log::warn!("cannot keep rule usage in {} ({error}); it is kept in memory only", file.display());
            }
            Err(_) => {}
        }
    }

    /// Every rule in force with its use.
    #[must_use]
    pub fn report(&self) -> BTreeMap<String, RuleUse> {
        self.rules.iter().map(|tracked| (tracked.name.to_string(), tracked.as_use())).collect()
    }
}

/// The record in its file's shape (a map of names to [`RuleUse`]), written
/// without building that map.
struct Record<'a>(&'a [Tracked]);

impl Serialize for Record<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|tracked| (&*tracked.name, tracked.as_use())))
    }
}

/// Reads the counters and the rules in force into `shared`'s record, and
/// writes it if it changed.
pub fn refresh(shared: &Shared) {
    let counts = {
        let guard = shared.datapath.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(datapath) = guard.as_ref() else { return };
        match datapath.counters() {
            Ok(snapshot) => snapshot.rules,
            Err(error) => {
                log::warn!("reading the rule counters failed ({error}); rule usage not refreshed");
                return;
            }
        }
    };
    let in_force: Vec<(Name, Action)> = {
        let engine = shared.engine.read().unwrap_or_else(PoisonError::into_inner);
        engine.rule_table().map(|(_, rule)| (rule.name, rule.action)).collect()
    };
    let mut usage = shared.rule_usage.lock().unwrap_or_else(PoisonError::into_inner);
    usage.update(in_force, &counts, SystemTime::now());
    usage.save();
}

/// The allow rules of `report` that decided nothing since `since`: name,
/// and what is known of it.
#[must_use]
pub fn unused(report: &BTreeMap<String, RuleUse>, since: SystemTime) -> Vec<(&str, &RuleUse)> {
    let since = seconds(since);
    report
        .iter()
        .filter(|(_, rule)| rule.action == Action::Allow.to_string())
        .filter(|(_, rule)| rule.last_used.is_none_or(|used| used < since))
        .map(|(name, rule)| (name.as_str(), rule))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(list: &[(&str, Action)]) -> Vec<(Name, Action)> {
        list.iter().map(|(name, action)| (Name::from(*name), *action)).collect()
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn rules_are_used_when_their_count_grows_and_the_record_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("bulkhead-usage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let in_force = rules(&[("web", Action::Allow), ("admin", Action::Allow), ("never", Action::Deny)]);
        let mut usage = RuleUsage::load(&dir);
        usage.update(in_force.clone(), &BTreeMap::from([(("web".to_owned(), Action::Allow), 3)]), at(1000));
        usage.save();
        let report = usage.report();
        assert_eq!(report["web"].last_used, Some(1000));
        assert_eq!((report["admin"].since, report["admin"].last_used), (1000, None));
        // Counted again, unchanged: not used again.
        usage.update(in_force.clone(), &BTreeMap::from([(("web".to_owned(), Action::Allow), 3)]), at(2000));
        assert_eq!(usage.report()["web"].last_used, Some(1000));
        let report = usage.report();
        let unused_now: Vec<&str> = unused(&report, at(1500)).into_iter().map(|(name, _)| name).collect();
        assert_eq!(unused_now, ["admin", "web"], "deny rules are not permissions");
        usage.save();

        // A restart: counters start at zero, the record is read back.
        let mut restarted = RuleUsage::load(&dir);
        assert_eq!(restarted.report(), usage.report());
        restarted.update(in_force.clone(), &BTreeMap::from([(("admin".to_owned(), Action::Allow), 1)]), at(3000));
        let report = restarted.report();
        assert_eq!((report["web"].last_used, report["admin"].last_used), (Some(1000), Some(3000)));
        // A rule that leaves is forgotten; one that comes is new.
        restarted.update(rules(&[("admin", Action::Allow)]), &BTreeMap::new(), at(4000));
        assert_eq!(restarted.report().keys().collect::<Vec<_>>(), ["admin"]);
        // The file is a map of names to their use, as it always was.
        restarted.save();
        let text = std::fs::read_to_string(dir.join("rule-usage.json")).unwrap();
        assert_eq!(text, r#"{"admin":{"action":"allow","since":1000,"last_used":3000}}"#);
        // A name that comes back with the other action is another permission.
        restarted.update(rules(&[("admin", Action::Deny)]), &BTreeMap::new(), at(5000));
        assert_eq!((restarted.report()["admin"].since, restarted.report()["admin"].last_used), (5000, None));
        assert_eq!(restarted.report()["admin"].action, "deny");
        restarted.save();
        assert_eq!(RuleUsage::load(&dir).report(), restarted.report(), "a deny rule's time and action read back");
        std::fs::write(dir.join("rule-usage.json"), r#"{"admin":{"action":"permit","since":1}}"#).unwrap();
        assert!(RuleUsage::load(&dir).report().is_empty(), "an unknown action starts afresh");
        std::fs::write(dir.join("rule-usage.json"), "garbage").unwrap();
        assert!(RuleUsage::load(&dir).report().is_empty(), "a damaged record starts afresh");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A count past 2^32 is still a count that grew; one read as less is
    /// no use.
    #[test]
    fn counts_are_followed_past_32_bits() {
        let mut usage = RuleUsage::default();
        let in_force = rules(&[("web", Action::Allow)]);
        let count = |n: u64| BTreeMap::from([(("web".to_owned(), Action::Allow), n)]);
        usage.update(in_force.clone(), &count((1 << 32) - 2), at(1000));
        usage.update(in_force.clone(), &count((1 << 32) + 5), at(2000));
        assert_eq!(usage.report()["web"].last_used, Some(2000));
        usage.update(in_force.clone(), &count(3), at(3000));
        assert_eq!(usage.report()["web"].last_used, Some(2000));
        usage.update(in_force, &count(4), at(4000));
        assert_eq!(usage.report()["web"].last_used, Some(4000));
    }

    /// 100,000 rules in force are 100,000 records.
    #[test]
    fn records_stay_compact() {
        assert_eq!(size_of::<Tracked>(), 24);
        let far = Tracked::new(Name::from("r"), Action::Deny, u64::MAX, 0);
        assert_eq!((far.action(), far.since(), far.last_used()), (Action::Deny, DENIES - 1, 0));
        // Last uses come back as they were, from the second `since` is.
        let used = Tracked::new(Name::from("r"), Action::Allow, 1000, 1000);
        assert_eq!(used.last_used(), 1000);
        let used = Tracked::new(Name::from("r"), Action::Allow, 1000, 1000 + u64::from(u32::MAX) - 1);
        assert_eq!(used.last_used(), 1000 + u64::from(u32::MAX) - 1);
        // Before `since`: kept as `since`; past the range, as its end.
        assert_eq!(Tracked::new(Name::from("r"), Action::Allow, 1000, 10).last_used(), 1000);
        let far_use = Tracked::new(Name::from("r"), Action::Allow, 1000, u64::MAX);
        assert_eq!(far_use.last_used(), 1000 + u64::from(u32::MAX) - 1);
    }
}
