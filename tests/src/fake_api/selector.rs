//! Label and field selectors, parsed from the query strings kube-rs and
//! kubectl send (`labels.Parse` and `fields.ParseSelector` syntax).

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed `labelSelector`: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector(Vec<LabelRequirement>);

/// Splits on commas outside parentheses: `a in (x,y),b=c` is two terms.
fn split_terms(text: &str) -> Result<Vec<&str>, String> {
    let mut terms = Vec::new();
    let mut depth = 0_u32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or_else(|| format!("unbalanced ')' in {text:?}"))?,
            ',' if depth == 0 => {
                terms.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced '(' in {text:?}"));
    }
    terms.push(text[start..].trim());
    Ok(terms.into_iter().filter(|t| !t.is_empty()).collect())
}

fn checked_key(key: &str, term: &str) -> Result<String, String> {
    let key = key.trim();
    if key.is_empty() || key.contains(char::is_whitespace) || key.contains(['=', '!', '(', ')']) {
        return Err(format!("invalid label key in requirement {term:?}"));
    }
    Ok(key.to_owned())
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in split_terms(text)? {
            let requirement = if let Some(open) = term.find('(') {
                let close = term
                    .rfind(')')
                    .filter(|&c| c == term.len() - 1)
                    .ok_or_else(|| format!("missing ')' in {term:?}"))?;
                let head: Vec<&str> = term[..open].split_whitespace().collect();
                let values: Vec<String> = term[open + 1..close].split(',').map(|v| v.trim().to_owned()).collect();
                match head.as_slice() {
                    [key, "in"] => LabelRequirement::In(checked_key(key, term)?, values),
                    [key, "notin"] => LabelRequirement::NotIn(checked_key(key, term)?, values),
                    _ => return Err(format!("expected `key in (..)` or `key notin (..)`, got {term:?}")),
                }
            } else if let Some(key) = term.strip_prefix('!') {
                LabelRequirement::DoesNotExist(checked_key(key, term)?)
            } else if let Some((key, value)) = term.split_once("!=") {
                LabelRequirement::NotEquals(checked_key(key, term)?, value.trim().to_owned())
            } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
                LabelRequirement::Equals(checked_key(key, term)?, value.trim().to_owned())
            } else if term.contains(['<', '>']) {
                return Err(format!("numeric comparisons are not served by the fake: {term:?}"));
            } else {
                LabelRequirement::Exists(checked_key(term, term)?)
            };
            requirements.push(requirement);
        }
        Ok(Self(requirements))
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|requirement| match requirement {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::DoesNotExist(k) => label(k).is_none(),
        })
    }
}

/// One `field=value` or `field!=value` term.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldRequirement {
    /// JSON pointer of the field, e.g. `/spec/nodeName`.
    pointer: String,
    value: String,
    equal: bool,
}

/// A parsed `fieldSelector`, limited to the fields the type allows, as the
/// real server limits it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector(Vec<FieldRequirement>);

impl FieldSelector {
    pub fn parse(text: &str, allowed: &[&str]) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, v, true)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            let field = field.trim();
            if !["metadata.name", "metadata.namespace"].contains(&field) && !allowed.contains(&field) {
                return Err(format!("field label not supported: {field}"));
            }
            requirements.push(FieldRequirement {
                pointer: format!("/{}", field.replace('.', "/")),
                value: value.trim().to_owned(),
                equal,
            });
        }
        Ok(Self(requirements))
    }

    /// Whether the object's fields satisfy every term; an absent field reads as "".
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|r| {
            let actual = object.pointer(&r.pointer).and_then(Value::as_str).unwrap_or("");
            (actual == r.value) == r.equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_as_kube_rs_renders_them() {
        let pod = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let cases = [
            ("app=web", true),
            ("app==web,tier=front", true),
            ("app!=web", false),
            ("tier in (back, front)", true),
            ("tier notin (front)", false),
            ("app,!missing", true),
            ("missing", false),
            ("missing!=x", true),
            ("missing notin (x)", true),
            ("", true),
        ];
        for (text, expected) in cases {
            let selector = LabelSelector::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(selector.matches(&pod), expected, "{text}");
        }
        assert!(LabelSelector::parse("a in (b").is_err());
        assert!(LabelSelector::parse("a > 3").is_err());
    }

    #[test]
    fn field_selectors_are_limited_to_served_fields() {
        let pod = json!({"metadata": {"name": "p", "namespace": "n"}, "spec": {"nodeName": "node-a"}});
        let fields = &["spec.nodeName"];
        assert!(FieldSelector::parse("spec.nodeName=node-a,metadata.name=p", fields).is_ok_and(|s| s.matches(&pod)));
        assert!(FieldSelector::parse("spec.nodeName!=node-a", fields).is_ok_and(|s| !s.matches(&pod)));
        assert!(FieldSelector::parse("spec.hostname=x", fields).is_err());
    }
}
