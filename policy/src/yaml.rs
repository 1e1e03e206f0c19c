//! A YAML tree that remembers where every node came from, so that every
//! policy error can name its file, line and column.

use std::sync::Arc;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::error::{Diagnostic, Location};

/// A YAML node and where it starts.
#[derive(Debug, Clone)]
pub struct Node {
    pub value: Value,
    pub location: Location,
}

#[derive(Debug, Clone)]
pub enum Value {
    /// A scalar; `quoted` is false for plain scalars, which YAML may read as
    /// null, booleans or numbers.
    Scalar {
        text: String,
        quoted: bool,
    },
    Sequence(Vec<Node>),
    Mapping(Vec<(Node, Node)>),
}

impl Node {
    /// True for an empty plain scalar, `~` or `null`.
    #[must_use]
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, quoted: false } if text.is_empty() || text == "~" || text == "null" || text == "Null" || text == "NULL")
    }

    /// What kind of node this is, for error messages.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match &self.value {
            _ if self.is_null() => "nothing (null)",
            Value::Scalar { .. } => "a scalar",
            Value::Sequence(_) => "a list",
            Value::Mapping(_) => "a mapping",
        }
    }
}

/// Parses every document of `text`; empty documents are dropped.
pub fn parse_documents(file: &Arc<str>, text: &str) -> Result<Vec<Node>, Diagnostic> {
    let mut builder = TreeBuilder { file: Arc::clone(file), stack: Vec::new(), documents: Vec::new(), error: None };
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut builder, true)
        .map_err(|error| Diagnostic::new(location(file, *error.marker()), format!("invalid YAML: {}", error.info())))?;
    if let Some(error) = builder.error {
        return Err(error);
    }
    Ok(builder.documents.into_iter().filter(|document| !document.is_null()).collect())
}

fn location(file: &Arc<str>, mark: Marker) -> Location {
    Location { file: Arc::clone(file), line: mark.line().max(1), column: mark.col() + 1 }
}

enum Partial {
    Sequence(Location, Vec<Node>),
    Mapping(Location, Vec<(Node, Node)>, Option<Node>),
}

struct TreeBuilder {
    file: Arc<str>,
    stack: Vec<Partial>,
    documents: Vec<Node>,
    error: Option<Diagnostic>,
}

impl TreeBuilder {
    fn finish(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.documents.push(node),
            Some(Partial::Sequence(_, items)) => items.push(node),
            Some(Partial::Mapping(_, entries, pending_key)) => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => entries.push((key, node)),
            },
        }
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let here = location(&self.file, mark);
        match event {
            Event::Scalar(text, style, _, _) => self.finish(Node {
                value: Value::Scalar { text, quoted: !matches!(style, TScalarStyle::Plain) },
                location: here,
            }),
            Event::SequenceStart(..) => self.stack.push(Partial::Sequence(here, Vec::new())),
            Event::MappingStart(..) => self.stack.push(Partial::Mapping(here, Vec::new(), None)),
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Partial::Sequence(location, items)) => Node { value: Value::Sequence(items), location },
                    // A block mapping's start mark lies past its first key;
                    // point at the first key, where a reader expects it.
                    Some(Partial::Mapping(location, entries, _)) => Node {
                        location: entries.first().map_or(location, |(key, _)| key.location.clone()),
                        value: Value::Mapping(entries),
                    },
                    None => return,
                };
                self.finish(node);
            }
            Event::Alias(_) => {
                self.error = Some(Diagnostic::new(
                    here,
                    "YAML aliases (*name) are not supported in policy files; write the value out in full",
                ));
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentStart | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_line_and_column() {
        let file: Arc<str> = Arc::from("p.yaml");
        let docs = parse_documents(&file, "a: 1\nb:\n  - x\n").unwrap();
        let Value::Mapping(entries) = &docs[0].value else { panic!("mapping") };
        assert_eq!((entries[0].0.location.line, entries[0].0.location.column), (1, 1));
        let Value::Sequence(items) = &entries[1].1.value else { panic!("sequence") };
        assert_eq!((items[0].location.line, items[0].location.column), (3, 5));
    }

    #[test]
    fn multiple_documents_and_empty_ones() {
        let file: Arc<str> = Arc::from("p.yaml");
        let docs = parse_documents(&file, "---\na: 1\n---\n---\nb: 2\n").unwrap();
        assert_eq!(docs.len(), 2);
    }

    #[test]
    fn syntax_error_has_position() {
        let file: Arc<str> = Arc::from("p.yaml");
        let error = parse_documents(&file, "a: [1, 2\nb: 3\n").unwrap_err();
        assert!(error.to_string().starts_with("p.yaml:"), "{error}");
        assert!(error.message.contains("invalid YAML"), "{error}");
    }

    #[test]
    fn aliases_are_refused() {
        let file: Arc<str> = Arc::from("p.yaml");
        let error = parse_documents(&file, "a: &x 1\nb: *x\n").unwrap_err();
        assert_eq!(error.location.line, 2);
        assert!(error.message.contains("aliases"));
    }
}
