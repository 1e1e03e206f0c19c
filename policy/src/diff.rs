//! What changed between two policies, by identity and rule name: for the
//! audit log of a push and for `bulkhead policy diff`.

use std::collections::BTreeMap;

use crate::model::{Peer, Policy, Selector};

/// How one named item changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    Removed,
    Added,
    Changed,
}

/// One changed identity or rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Difference {
    /// `identity` or `rule`.
    pub kind: &'static str,
    pub name: String,
    pub change: Change,
}

/// Every identity and rule that differs from `old` to `new` (positions
/// are ignored: moving a rule between files is no change).
#[must_use]
pub fn diff(old: &Policy, new: &Policy) -> Vec<Difference> {
    let identities = |p: &Policy| -> BTreeMap<String, String> {
        p.identities
            .iter()
            .map(|i| {
                let addresses: Vec<_> = i.addresses.iter().map(|a| a.net).collect();
                (i.name.clone(), format!("{:?}", (&i.labels, addresses, i.mode)))
            })
            .collect()
    };
    let rules = |p: &Policy| -> BTreeMap<String, String> {
        let selectors = |peers: &[Peer]| peers.iter().map(|p| p.selector.clone()).collect::<Vec<Selector>>();
        p.rules
            .iter()
            .map(|r| {
                (r.name.clone(), format!("{:?}", (r.action, selectors(&r.from), selectors(&r.to), &r.ports, r.expires)))
            })
            .collect()
    };
    let mut out = Vec::new();
    for (kind, before, after) in [("identity", identities(old), identities(new)), ("rule", rules(old), rules(new))] {
        for name in before.keys().filter(|name| !after.contains_key(*name)) {
            out.push(Difference { kind, name: name.clone(), change: Change::Removed });
        }
        for (name, item) in &after {
            match before.get(name) {
                None => out.push(Difference { kind, name: name.clone(), change: Change::Added }),
                Some(previous) if previous != item => {
                    out.push(Difference { kind, name: name.clone(), change: Change::Changed });
                }
                Some(_) => {}
            }
        }
    }
    out
}

/// `identities +a -r ~c, rules +a -r ~c`.
#[must_use]
pub fn summary(differences: &[Difference]) -> String {
    let count =
        |kind: &str, change: Change| differences.iter().filter(|d| d.kind == kind && d.change == change).count();
    let part = |kind: &str| {
        format!("+{} -{} ~{}", count(kind, Change::Added), count(kind, Change::Removed), count(kind, Change::Changed))
    };
    format!("identities {}, rules {}", part("identity"), part("rule"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_added_removed_and_changed_names() {
        let base = "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: t}\nspec:\n  identities:\n    - {name: a, addresses: [\"10.0.0.1\"]}\n    - {name: b, addresses: [\"10.0.0.2\"]}\n  rules:\n    - {name: r1, from: [{identity: a}], to: [{identity: b}], ports: [\"80/tcp\"]}\n    - {name: r2, from: [{identity: b}], to: [{identity: a}]}\n";
        let old = crate::parse_str("old.yaml", base).unwrap();
        let edited = base.replace("80/tcp", "81/tcp").replace(
            "    - {name: r2, from: [{identity: b}], to: [{identity: a}]}\n",
            "    - {name: r3, from: [{identity: b}], to: [{identity: world}]}\n",
        );
        // Moved to another file at other positions: only real changes count.
        let new = crate::parse_str("elsewhere.yaml", &format!("# moved\n{edited}")).unwrap();
        let differences = diff(&old, &new);
        let described: Vec<(&str, &str, Change)> =
            differences.iter().map(|d| (d.kind, d.name.as_str(), d.change)).collect();
        assert_eq!(
            described,
            [("rule", "r2", Change::Removed), ("rule", "r1", Change::Changed), ("rule", "r3", Change::Added)]
        );
        assert_eq!(summary(&differences), "identities +0 -0 ~0, rules +1 -1 ~1");
        assert!(diff(&old, &old).is_empty());
    }
}
