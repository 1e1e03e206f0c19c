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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::PoisonError;
use std::time::{Duration, SystemTime};

use policy::model::Action;
use serde::{Deserialize, Serialize};

use crate::metrics::Shared;

/// How often the counters are read (and the file written, when changed).
pub const REFRESH: Duration = Duration::from_secs(30);

/// One rule's use, in seconds since the epoch.
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

/// The rules in force and their use.
#[derive(Debug, Default)]
pub struct RuleUsage {
    file: Option<PathBuf>,
    rules: BTreeMap<String, RuleUse>,
    /// This run's counts when last read: counters start at zero with the daemon.
    counted: BTreeMap<String, u64>,
    changed: bool,
    /// A failure to write is logged once, not every refresh.
    write_failed: bool,
}

fn seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl RuleUsage {
    /// What `state_dir/rule-usage.json` holds; empty if there is none yet.
    /// A file that cannot be read is reported and started afresh (the
    /// counters themselves are intact: only the history before is lost).
    #[must_use]
    pub fn load(state_dir: &Path) -> Self {
        let file = state_dir.join("rule-usage.json");
        let rules = match std::fs::read_to_string(&file) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|error| {
                log::warn!("{} is not a rule usage record ({error}); starting it afresh", file.display());
                BTreeMap::new()
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(error) => {
                log::warn!("cannot read {} ({error}); starting rule usage afresh", file.display());
                BTreeMap::new()
            }
        };
        Self { file: Some(file), rules, ..Self::default() }
    }

    /// Takes the rules in force now and the counts of this run (rule and
    /// action → packets decided since the daemon started): a rule whose
    /// count grew was used now; rules that left are forgotten.
    pub fn update(
        &mut self,
        in_force: &BTreeMap<String, Action>,
        counts: &BTreeMap<(String, Action), u64>,
        now: SystemTime,
    ) {
        let before = self.rules.len();
        self.rules.retain(|name, _| in_force.contains_key(name));
        self.counted.retain(|name, _| in_force.contains_key(name));
        self.changed |= self.rules.len() != before;
        for (name, action) in in_force {
            let entry = self.rules.entry(name.clone()).or_insert_with(|| {
                self.changed = true;
                RuleUse { action: action.to_string(), since: seconds(now), last_used: None }
            });
            let count = counts.get(&(name.clone(), *action)).copied().unwrap_or(0);
            let counted = self.counted.entry(name.clone()).or_insert(0);
            if count > *counted {
                entry.last_used = Some(seconds(now));
                self.changed = true;
            }
            *counted = count;
        }
    }

    /// Writes the record if it changed (atomically; best effort: a failure
    /// is logged once and the record stays in memory).
    pub fn save(&mut self) {
        let Some(file) = &self.file else { return };
        if !self.changed {
            return;
        }
        let written = serde_json::to_vec(&self.rules)
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
        self.rules.clone()
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
    let in_force: BTreeMap<String, Action> = {
        let engine = shared.engine.read().unwrap_or_else(PoisonError::into_inner);
        engine.rule_table().map(|(_, rule)| (rule.name.to_string(), rule.action)).collect()
    };
    let mut usage = shared.rule_usage.lock().unwrap_or_else(PoisonError::into_inner);
    usage.update(&in_force, &counts, SystemTime::now());
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

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn rules_are_used_when_their_count_grows_and_the_record_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("bulkhead-usage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let in_force: BTreeMap<String, Action> = [
            ("web".to_owned(), Action::Allow),
            ("admin".to_owned(), Action::Allow),
            ("never".to_owned(), Action::Deny),
        ]
        .into();
        let mut usage = RuleUsage::load(&dir);
        usage.update(&in_force, &BTreeMap::from([(("web".to_owned(), Action::Allow), 3)]), at(1000));
        usage.save();
        let report = usage.report();
        assert_eq!(report["web"].last_used, Some(1000));
        assert_eq!((report["admin"].since, report["admin"].last_used), (1000, None));
        // Counted again, unchanged: not used again.
        usage.update(&in_force, &BTreeMap::from([(("web".to_owned(), Action::Allow), 3)]), at(2000));
        assert_eq!(usage.report()["web"].last_used, Some(1000));
        let report = usage.report();
        let unused_now: Vec<&str> = unused(&report, at(1500)).into_iter().map(|(name, _)| name).collect();
        assert_eq!(unused_now, ["admin", "web"], "deny rules are not permissions");
        usage.save();

        // A restart: counters start at zero, the record is read back.
        let mut restarted = RuleUsage::load(&dir);
        assert_eq!(restarted.report(), usage.report());
        restarted.update(&in_force, &BTreeMap::from([(("admin".to_owned(), Action::Allow), 1)]), at(3000));
        let report = restarted.report();
        assert_eq!((report["web"].last_used, report["admin"].last_used), (Some(1000), Some(3000)));
        // A rule that leaves is forgotten; one that comes is new.
        let fewer: BTreeMap<String, Action> = [("admin".to_owned(), Action::Allow)].into();
        restarted.update(&fewer, &BTreeMap::new(), at(4000));
        assert_eq!(restarted.report().keys().collect::<Vec<_>>(), ["admin"]);
        std::fs::write(dir.join("rule-usage.json"), "garbage").unwrap();
        assert!(RuleUsage::load(&dir).report().is_empty(), "a damaged record starts afresh");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
