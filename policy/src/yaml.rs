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
    pub mark: Mark,
}

/// Where a node starts: 1-based line and column. The file is the same for
/// every node of a tree, so nodes do not carry it: a 100k-rule policy is
/// millions of nodes, and their size decides how much memory a load touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mark {
    pub line: u32,
    pub column: u32,
}

impl Mark {
    fn of(marker: Marker) -> Self {
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Self { line: clamp(marker.line().max(1)), column: clamp(marker.col() + 1) }
    }

    /// This mark in `file`.
    #[must_use]
    pub fn location(self, file: &Arc<str>) -> Location {
        Location { file: Arc::clone(file), line: self.line, column: self.column }
    }
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

    /// Where this node starts in `file`.
    #[must_use]
    pub fn location(&self, file: &Arc<str>) -> Location {
        self.mark.location(file)
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
    parse_documents_streaming(file, text, None)
}

/// Which list of a policy document's `spec` an item belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecList {
    Identities,
    Rules,
}

/// Receives each item of a document's `spec.identities` and `spec.rules`
/// as soon as it is complete, with the mark of its list; the list itself
/// stays in the tree, empty.
pub type ItemSink<'a> = &'a mut dyn FnMut(Mark, SpecList, Node);

/// Like [`parse_documents`], but hands the items of `spec.identities` and
/// `spec.rules` to `sink` instead of keeping them: a 100k-rule policy is
/// millions of nodes, and a tree of one item at a time stays in cache
/// where a tree of them all costs hundreds of megabytes of fresh memory.
pub fn parse_documents_streaming(
    file: &Arc<str>,
    text: &str,
    sink: Option<ItemSink<'_>>,
) -> Result<Vec<Node>, Diagnostic> {
    let mut builder = TreeBuilder { stack: Vec::new(), documents: Vec::new(), alias: None, sink };
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut builder, true)
        .map_err(|error| Diagnostic::new(location(file, *error.marker()), format!("invalid YAML: {}", error.info())))?;
    if let Some(mark) = builder.alias {
        return Err(Diagnostic::new(
            mark.location(file),
            "YAML aliases (*name) are not supported in policy files; write the value out in full",
        ));
    }
    Ok(builder.documents.into_iter().filter(|document| !document.is_null()).collect())
}

fn location(file: &Arc<str>, marker: Marker) -> Location {
    Mark::of(marker).location(file)
}

enum Partial {
    Sequence(Mark, Vec<Node>),
    Mapping(Mark, Vec<(Node, Node)>, Option<Node>),
}

struct TreeBuilder<'s> {
    stack: Vec<Partial>,
    documents: Vec<Node>,
    /// Where the first alias is: aliases are refused.
    alias: Option<Mark>,
    sink: Option<ItemSink<'s>>,
}

/// The text of a plain-name key, if `key` is one.
fn key_text(key: Option<&Node>) -> Option<&str> {
    match key {
        Some(Node { value: Value::Scalar { text, .. }, .. }) => Some(text),
        _ => None,
    }
}

impl TreeBuilder<'_> {
    /// The list a node completed now belongs to, if it is an item of a
    /// document's `spec.identities` or `spec.rules`: the stack is then the
    /// document's mapping (at key `spec`), the spec mapping (at the list's
    /// key) and the list.
    fn spec_list(&self) -> Option<(Mark, SpecList)> {
        let [Partial::Mapping(_, _, root_key), Partial::Mapping(_, _, spec_key), Partial::Sequence(mark, _)] =
            self.stack.as_slice()
        else {
            return None;
        };
        if key_text(root_key.as_ref()) != Some("spec") {
            return None;
        }
        match key_text(spec_key.as_ref()) {
            Some("identities") => Some((*mark, SpecList::Identities)),
            Some("rules") => Some((*mark, SpecList::Rules)),
            _ => None,
        }
    }

    fn finish(&mut self, node: Node) {
        if self.sink.is_some()
            && let Some((mark, list)) = self.spec_list()
            && let Some(sink) = self.sink.as_mut()
        {
            sink(mark, list, node);
            return;
        }
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

impl MarkedEventReceiver for TreeBuilder<'_> {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if self.alias.is_some() {
            return;
        }
        let here = Mark::of(mark);
        match event {
            Event::Scalar(text, style, _, _) => self.finish(Node {
                value: Value::Scalar { text, quoted: !matches!(style, TScalarStyle::Plain) },
                mark: here,
            }),
            Event::SequenceStart(..) => self.stack.push(Partial::Sequence(here, Vec::new())),
            Event::MappingStart(..) => self.stack.push(Partial::Mapping(here, Vec::new(), None)),
            Event::SequenceEnd | Event::MappingEnd => {
                // Shrunk to fit: most mappings and lists in a policy hold one
                // or two items, and a vector grows to room for four.
                let node = match self.stack.pop() {
                    Some(Partial::Sequence(mark, mut items)) => {
                        items.shrink_to_fit();
                        Node { value: Value::Sequence(items), mark }
                    }
                    // A block mapping's start mark lies past its first key;
                    // point at the first key, where a reader expects it.
                    Some(Partial::Mapping(mark, mut entries, _)) => {
                        entries.shrink_to_fit();
                        Node { mark: entries.first().map_or(mark, |(key, _)| key.mark), value: Value::Mapping(entries) }
                    }
                    None => return,
                };
                self.finish(node);
            }
            Event::Alias(_) => self.alias = Some(here),
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
        assert_eq!(entries[0].0.mark, Mark { line: 1, column: 1 });
        let Value::Sequence(items) = &entries[1].1.value else { panic!("sequence") };
        assert_eq!(items[0].mark, Mark { line: 3, column: 5 });
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
