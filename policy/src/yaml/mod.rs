//! A YAML tree that remembers where every node came from, so that every
//! policy error can name its file, line and column.

mod fast;

use std::borrow::Cow;
use std::sync::Arc;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::error::{Diagnostic, Location};

/// A YAML node and where it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
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

#[derive(Debug, Clone, PartialEq, Eq)]
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
pub type ItemSink<'a> = &'a mut dyn FnMut(Streamed);

/// What an [`ItemSink`] receives.
#[derive(Debug)]
pub enum Streamed {
    /// An item, with the mark of its list.
    Item(Mark, SpecList, Node),
    /// Forget every item so far: the text is read again from its start
    /// (the fast reader gave up on it, and the general parser reads it).
    Restart,
}

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
    // The fast reader answers only for text it reads completely; when it
    // gives up, the sink forgets what it handed on, and the general parser
    // reads the text from the start.
    if fast::read(text, &mut builder).is_ok() && builder.stack.is_empty() {
        return Ok(builder.documents.into_iter().filter(|document| !document.is_null()).collect());
    }
    let mut sink = builder.sink.take();
    if let Some(sink) = sink.as_mut() {
        sink(Streamed::Restart);
    }
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

/// What a YAML reader reports, in document order: nodes as they start
/// (collections) or are complete (scalars), and collections' ends.
trait Receiver {
    /// `text` is borrowed from the text read where it can be.
    fn scalar(&mut self, text: Cow<'_, str>, quoted: bool, mark: Mark);
    fn sequence_start(&mut self, mark: Mark);
    fn mapping_start(&mut self, mark: Mark);
    fn end(&mut self);
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

/// The list a node completed now belongs to, if it is an item of a
/// document's `spec.identities` or `spec.rules`: the stack is then the
/// document's mapping (at key `spec`), the spec mapping (at the list's key)
/// and the list.
fn spec_list_of(stack: &[Partial]) -> Option<(Mark, SpecList)> {
    let [Partial::Mapping(_, _, root_key), Partial::Mapping(_, _, spec_key), Partial::Sequence(mark, _)] = stack else {
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

impl TreeBuilder<'_> {
    /// Whether a node completed now is part of an item going to the sink:
    /// dropped once read, so not worth shrinking.
    fn inside_streamed_item(&self) -> bool {
        self.sink.is_some() && self.stack.len() >= 3 && spec_list_of(&self.stack[..3]).is_some()
    }

    fn finish(&mut self, node: Node) {
        if self.sink.is_some()
            && let Some((mark, list)) = spec_list_of(&self.stack)
            && let Some(sink) = self.sink.as_mut()
        {
            sink(Streamed::Item(mark, list, node));
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

impl Receiver for TreeBuilder<'_> {
    fn scalar(&mut self, text: Cow<'_, str>, quoted: bool, mark: Mark) {
        self.finish(Node { value: Value::Scalar { text: text.into_owned(), quoted }, mark });
    }

    fn sequence_start(&mut self, mark: Mark) {
        self.stack.push(Partial::Sequence(mark, Vec::new()));
    }

    fn mapping_start(&mut self, mark: Mark) {
        self.stack.push(Partial::Mapping(mark, Vec::new(), None));
    }

    fn end(&mut self) {
        // Shrunk to fit when kept: most mappings and lists in a policy hold
        // one or two items, and a vector grows to room for four.
        let popped = self.stack.pop();
        let keep = !self.inside_streamed_item();
        let node = match popped {
            Some(Partial::Sequence(mark, mut items)) => {
                if keep {
                    items.shrink_to_fit();
                }
                Node { value: Value::Sequence(items), mark }
            }
            // A block mapping's start mark lies past its first key; point
            // at the first key, where a reader expects it.
            Some(Partial::Mapping(mark, mut entries, _)) => {
                if keep {
                    entries.shrink_to_fit();
                }
                Node { mark: entries.first().map_or(mark, |(key, _)| key.mark), value: Value::Mapping(entries) }
            }
            None => return,
        };
        self.finish(node);
    }
}

impl MarkedEventReceiver for TreeBuilder<'_> {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if self.alias.is_some() {
            return;
        }
        let here = Mark::of(mark);
        match event {
            Event::Scalar(text, style, _, _) => {
                self.scalar(Cow::Owned(text), !matches!(style, TScalarStyle::Plain), here);
            }
            Event::SequenceStart(..) => self.sequence_start(here),
            Event::MappingStart(..) => self.mapping_start(here),
            Event::SequenceEnd | Event::MappingEnd => self.end(),
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

/// The fast reader against the general parser: whenever the fast one
/// answers, its tree is the general parser's, marks included.
#[cfg(test)]
mod fast_reader {
    use proptest::prelude::*;

    use super::*;

    /// The general parser's tree of `text`, if it reads it.
    fn general(text: &str) -> Option<Vec<Node>> {
        let mut builder = TreeBuilder { stack: Vec::new(), documents: Vec::new(), alias: None, sink: None };
        Parser::new_from_str(text).load(&mut builder, true).ok()?;
        if builder.alias.is_some() {
            return None;
        }
        Some(builder.documents.into_iter().filter(|document| !document.is_null()).collect())
    }

    /// The fast reader's tree of `text`, if it answers.
    fn fast(text: &str) -> Option<Vec<Node>> {
        let mut builder = TreeBuilder { stack: Vec::new(), documents: Vec::new(), alias: None, sink: None };
        fast::read(text, &mut builder).ok()?;
        assert!(builder.stack.is_empty(), "the fast reader left collections open: {text:?}");
        Some(builder.documents.into_iter().filter(|document| !document.is_null()).collect())
    }

    fn agree(text: &str) -> Result<bool, TestCaseError> {
        let Some(ours) = fast(text) else { return Ok(false) };
        let theirs = general(text);
        prop_assert!(theirs.is_some(), "the fast reader read what the general parser refuses: {text:?}");
        prop_assert_eq!(Some(ours), theirs, "the trees differ for {:?}", text);
        Ok(true)
    }

    fn append(out: &mut String, line: std::fmt::Arguments<'_>) {
        use std::fmt::Write as _;
        let _ = out.write_fmt(line);
    }

    /// A tiny generator, so one seed drives a whole document.
    struct Dice(u64);

    impl Dice {
        fn roll(&mut self, sides: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % sides as u64) as usize
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.roll(items.len())]
        }
    }

    /// Scalars as policies write them, and (one time in eight) odd ones.
    const SCALARS: [&str; 19] = [
        "web",
        "10.0.0.1",
        "\"10.0.0.1/32\"",
        "'it''s'",
        "\"a \\\"q\\\" \\\\ \\n\"",
        "80/tcp",
        "true",
        "~",
        "-1",
        "a b",
        "fd00::1",
        "x#y",
        "\"\"",
        "''",
        "1.5",
        "a[1]",
        "\"é\"",
        "web-0",
        "_x.y/z",
    ];
    const ODD_SCALARS: [&str; 10] = ["a:b", "a,b", "v: w", ":x", "-", "?", "é", "&x", "a #c", "'a\nb'"];

    fn scalar(dice: &mut Dice) -> String {
        if dice.roll(8) == 0 { dice.pick(&ODD_SCALARS) } else { dice.pick(&SCALARS) }.to_owned()
    }

    /// A scalar for a flow collection, where `[1]` would be one.
    fn flow_scalar(dice: &mut Dice) -> String {
        let scalar = scalar(dice);
        if scalar.contains('[') && dice.roll(4) != 0 { "x".to_owned() } else { scalar }
    }

    fn flow(dice: &mut Dice, depth: usize) -> String {
        let items = dice.roll(3);
        let node =
            |dice: &mut Dice| if depth < 2 && dice.roll(3) == 0 { flow(dice, depth + 1) } else { flow_scalar(dice) };
        let separator = [", ", ",", " , "][dice.roll(3)];
        if dice.roll(2) == 0 {
            let parts: Vec<String> = (0..items).map(|_| node(dice)).collect();
            format!("[{}]", parts.join(separator))
        } else {
            let parts: Vec<String> = (0..items).map(|_| format!("{}: {}", flow_scalar(dice), node(dice))).collect();
            format!("{{{}}}", parts.join(separator))
        }
    }

    fn inline(dice: &mut Dice) -> String {
        let comment = if dice.roll(5) == 0 { " # note" } else { "" };
        let value = if dice.roll(3) == 0 { flow(dice, 0) } else { scalar(dice) };
        format!("{value}{comment}")
    }

    /// A block node at `indent`, as the lines after a key or dash.
    fn block(dice: &mut Dice, indent: usize, depth: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        let entries = 1 + dice.roll(3);
        let mapping = dice.roll(2) == 0;
        for _ in 0..entries {
            if dice.roll(8) == 0 {
                append(out, format_args!("{pad}# comment\n"));
            }
            if dice.roll(10) == 0 {
                out.push('\n');
            }
            let lead = if mapping {
                format!("{pad}{}:", scalar(dice))
            } else {
                format!("{pad}-{}", " ".repeat(dice.roll(3) / 2 * 2))
            };
            match dice.roll(if depth < 3 { 4 } else { 1 }) {
                0 => append(out, format_args!("{lead} {}\n", inline(dice))),
                1 => {
                    let comment = if dice.roll(4) == 0 { " # c" } else { "" };
                    append(out, format_args!("{lead}{comment}\n"));
                    let deeper = if mapping && dice.roll(3) == 0 { indent } else { indent + 1 + dice.roll(3) };
                    if deeper == indent {
                        // A compact sequence at the key's indentation.
                        for _ in 0..=dice.roll(2) {
                            append(out, format_args!("{pad}- {}\n", inline(dice)));
                        }
                    } else {
                        block(dice, deeper, depth + 1, out);
                    }
                }
                2 if !mapping => {
                    // A mapping in an item: `- key: value` and more keys below.
                    let inner = " ".repeat(indent + 2);
                    append(out, format_args!("{pad}- {}: {}\n", scalar(dice), inline(dice)));
                    for _ in 0..dice.roll(3) {
                        append(out, format_args!("{inner}{}: {}\n", scalar(dice), inline(dice)));
                    }
                }
                _ => append(out, format_args!("{lead}\n")),
            }
        }
    }

    fn document(dice: &mut Dice) -> String {
        let mut text = String::new();
        for i in 0..=dice.roll(2) {
            if i > 0 || dice.roll(3) == 0 {
                text.push_str(["---\n", "--- # c\n", "---  \n"][dice.roll(3)]);
            }
            match dice.roll(6) {
                0 => append(&mut text, format_args!("{}\n", inline(dice))),
                _ => block(dice, 0, 0, &mut text),
            }
        }
        if dice.roll(4) == 0 {
            text.pop();
        }
        text
    }

    const EDITS: [&str; 28] = [
        ":", " ", "-", "#", "'", "\"", "[", "]", "{", "}", ",", "\n", "  ", "&a ", "*a", "!t ", "|", ">", "?", "%",
        "\\", "é", "---", "...", "\t", "\r", ": ", "- ",
    ];

    fn mutate(dice: &mut Dice, text: &str) -> String {
        let mut text = text.to_owned();
        for _ in 0..=dice.roll(3) {
            let mut at = dice.roll(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            if dice.roll(3) == 0 {
                let mut end = (at + dice.roll(4)).min(text.len());
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.replace_range(at..end, "");
            } else {
                text.insert_str(at, dice.pick(&EDITS));
            }
        }
        text
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn the_fast_reader_agrees_with_the_general_parser(seed in 1..u64::MAX) {
            let mut dice = Dice(seed);
            let text = document(&mut dice);
            agree(&text)?;
            for _ in 0..4 {
                agree(&mutate(&mut dice, &text))?;
            }
        }
    }

    /// The property means something only if the fast reader answers for
    /// most generated documents.
    #[test]
    fn the_fast_reader_answers_for_most_generated_documents() {
        let answered = (1..=500u64).filter(|seed| fast(&document(&mut Dice(*seed * 7919))).is_some()).count();
        assert!(answered > 250, "the fast reader answered for only {answered} of 500 documents");
    }

    /// What policy files and `kubectl -o yaml` look like is read fast.
    #[test]
    fn policy_files_and_kubectl_output_are_read_fast() {
        let example = include_str!("../../../examples/three-tier.yaml");
        let kubectl = "apiVersion: v1\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata:\n    labels:\n      app: web\n    name: web-0\n    namespace: shop\n  spec:\n    containers:\n    - image: nginx:1.25\n      name: web\n      ports:\n      - containerPort: 80\n        name: http\n        protocol: TCP\n  status:\n    podIP: 10.0.1.7\n    podIPs:\n    - ip: 10.0.1.7\nkind: List\nmetadata:\n  resourceVersion: \"\"\n";
        let flow = "spec:\n  identities:\n    - {name: id1, addresses: [\"10.0.0.1\"]}\n  rules:\n    - {name: r1, from: [{identity: id1}], to: [{identity: id2}], ports: [\"1000/tcp\"]}\n";
        for text in [example, kubectl, flow] {
            assert!(fast(text).is_some(), "not read fast: {text}");
            assert!(agree(text).unwrap());
        }
    }
}
