//! What the daemon keeps of the Kubernetes source between changes: the
//! watchers' reports, coalesced into the next change; which kinds are
//! listed and which fail (`bulkhead_source_up{source="kubernetes"}`,
//! `/readyz`); and which objects the policy refuses.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use enforcer::kubernetes::{Kind, Refusal, Report};
use policy::engine::{Contents, SourceChange};

/// How often refused changes are tried again when nothing was removed.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// The Kubernetes source as the maintainer sees it.
pub struct Cluster {
    reports: Receiver<Report>,
    /// Changes not applied yet, by source: a later one replaces an earlier.
    pending: BTreeMap<String, SourceChange>,
    listed: BTreeSet<Kind>,
    failing: BTreeMap<Kind, String>,
    /// Objects whose last change the policy refused, with the first
    /// problem and the change: what each gave before stays enforced, and
    /// the change is tried again when something it may have collided with
    /// goes (a pod's address is often given to the next pod before the
    /// old pod's deletion arrives).
    refused: BTreeMap<String, (String, SourceChange)>,
    /// When refused changes were last tried again.
    last_retry: Instant,
    /// The newest resourceVersion of each kind reported, whose changes are
    /// pending (published once they are applied).
    versions: BTreeMap<Kind, u64>,
    /// Where refusals go to be reported on their objects.
    refusals: tokio::sync::mpsc::UnboundedSender<Refusal>,
}

impl Cluster {
    pub fn new(reports: Receiver<Report>, refusals: tokio::sync::mpsc::UnboundedSender<Refusal>) -> Self {
        Self {
            reports,
            pending: BTreeMap::new(),
            listed: BTreeSet::new(),
            failing: BTreeMap::new(),
            refused: BTreeMap::new(),
            last_retry: Instant::now(),
            versions: BTreeMap::new(),
            refusals,
        }
    }

    /// Takes every report waiting; false once the watchers are gone.
    pub fn drain(&mut self) -> bool {
        loop {
            match self.reports.try_recv() {
                Ok(report) => self.take(report),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Waits, up to `timeout`, until every kind is listed once: the
    /// daemon's first policy then holds the whole cluster.
    pub fn wait_listed(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.listed.len() < Kind::ALL.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok(report) => self.take(report),
                Err(_) => return,
            }
        }
    }

    fn take(&mut self, report: Report) {
        match report {
            Report::Changes(changes) => {
                for change in changes {
                    self.pending.insert(change.source.clone(), change);
                }
            }
            Report::Listed(kind) => {
                if self.listed.insert(kind) {
                    log::info!("kubernetes: {kind} listed");
                }
            }
            Report::Down { kind, reason } => {
                if self.failing.insert(kind, reason.clone()).is_none() {
                    log::warn!(
                        "kubernetes: watching {kind} fails ({reason}); retrying, and what the cluster gave last stays enforced"
                    );
                }
            }
            Report::Version { kind, version } => {
                let newest = self.versions.entry(kind).or_insert(version);
                *newest = (*newest).max(version);
            }
            Report::Up(kind) => {
                if self.failing.remove(&kind).is_some() {
                    log::info!("kubernetes: watching {kind} works again");
                }
            }
        }
    }

    /// The changes waiting (the engine takes them as one change, in any
    /// order).
    pub fn take_pending(&mut self) -> Vec<SourceChange> {
        std::mem::take(&mut self.pending).into_values().collect()
    }

    /// Refused changes to try again, one by one, after `taken` (the changes
    /// just taken): when one of those removed something, or every
    /// [`RETRY_INTERVAL`], as what they collided with may be gone. A refused
    /// object that just changed again is not among them.
    pub fn retries(&mut self, taken: &[SourceChange]) -> Vec<SourceChange> {
        let removal = taken.iter().any(|change| matches!(change.contents, Contents::Removed));
        if self.refused.is_empty() || !(removal || self.last_retry.elapsed() >= RETRY_INTERVAL) {
            return Vec::new();
        }
        self.last_retry = Instant::now();
        self.refused
            .iter()
            .filter(|(source, _)| !taken.iter().any(|change| &change.source == *source))
            .map(|(_, (_, change))| change.clone())
            .collect()
    }

    /// The newest resourceVersion of each kind that the changes taken so
    /// far include: once they are applied, this node's view of the cluster.
    pub fn versions(&self) -> &BTreeMap<Kind, u64> {
        &self.versions
    }

    /// Why the cluster's objects are not all known now, if they are not.
    pub fn why_not_up(&self) -> Option<String> {
        if let Some((kind, reason)) = self.failing.iter().next() {
            return Some(format!("kubernetes: watching {kind} fails: {reason}"));
        }
        let unlisted: Vec<String> =
            Kind::ALL.iter().filter(|kind| !self.listed.contains(kind)).map(ToString::to_string).collect();
        (!unlisted.is_empty()).then(|| format!("kubernetes: waiting for the first list of {}", unlisted.join(", ")))
    }

    /// Notes that the policy took `changes`: they are no longer refused.
    pub fn taken(&mut self, changes: &[SourceChange]) {
        for change in changes {
            if self.refused.remove(&change.source).is_some() {
                log::info!("kubernetes: {} is accepted now", change.source);
            }
        }
    }

    /// Notes that the policy refused `change`, for `problems`; reported
    /// unless it was refused for the same reason already.
    pub fn refuse(&mut self, change: &SourceChange, problems: &[String]) {
        let first = problems.first().cloned().unwrap_or_default();
        if matches!(change.contents, Contents::Removed) {
            self.refused.remove(&change.source);
            return;
        }
        let known = self.refused.insert(change.source.clone(), (first.clone(), change.clone()));
        if known.is_some_and(|(before, _)| before == first) {
            return;
        }
        log::warn!(
            "kubernetes: {} is refused and not applied ({} problem(s)): {}; what it gave before stays enforced",
            change.source,
            problems.len(),
            problems.join("; ")
        );
        let _ = self.refusals.send(Refusal { source: change.source.clone(), problems: problems.to_vec() });
    }

    /// Objects the policy refuses now.
    pub fn refused(&self) -> usize {
        self.refused.len()
    }
}
