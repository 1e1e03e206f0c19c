//! A fast reader for the plain subset of YAML that policy files and
//! `kubectl -o yaml` output are written in: block mappings and sequences
//! by indentation, one-line flow collections, one-line plain and quoted
//! scalars, comments and `---` between documents. A 100,000-rule file is
//! read in about a quarter of the general parser's time.
//!
//! It only ever answers for text it fully understands: anything outside the
//! subset (anchors, aliases, tags, block scalars, multi-line scalars or flow
//! collections, complex keys, directives, tabs, carriage returns, escapes it
//! does not know, and every error) makes it give up, and the general parser
//! reads the text instead, from the start: what the fast reader handed on
//! before it gave up is taken back ([`super::Streamed::Restart`]). A
//! property test checks that whenever it answers, its tree equals the
//! general parser's, marks included.

use std::borrow::Cow;

use super::{Mark, Receiver};

/// The text is outside the subset: read it with the general parser.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct GiveUp;

type Read<T> = Result<T, GiveUp>;

/// Reads all of `text`, reporting to `out`.
pub(super) fn read(text: &str, out: &mut dyn Receiver) -> Read<()> {
    // Tabs, carriage returns, other control bytes and a byte-order mark
    // are left to the general parser.
    if text.bytes().any(|b| (b < 0x20 && b != b'\n') || b == 0x7f) || text.starts_with('\u{feff}') {
        return Err(GiveUp);
    }
    let mut reader = Reader { text, out, lines: Lines::new(text), stack: Vec::new(), pending: None, root_done: false };
    reader.stream()
}

/// One line: where it starts, its indentation, and its content's byte range.
#[derive(Clone, Copy)]
struct Line {
    /// 1-based.
    number: u32,
    start: usize,
    /// Byte offset of the first non-space byte.
    content: usize,
    end: usize,
    /// All ASCII: a column is then a byte offset (most policy lines are,
    /// and a flow line has a dozen marks to place).
    ascii: bool,
}

impl Line {
    fn indent(&self) -> usize {
        self.content - self.start
    }
}

/// The lines of a text that hold more than spaces and a comment.
struct Lines<'t> {
    text: &'t str,
    at: usize,
    number: u32,
}

impl<'t> Lines<'t> {
    fn new(text: &'t str) -> Self {
        Self { text, at: 0, number: 0 }
    }

    fn next_line(&mut self) -> Option<Line> {
        let bytes = self.text.as_bytes();
        while self.at < bytes.len() {
            let start = self.at;
            let end = memchr_newline(bytes, start);
            self.at = end + 1;
            self.number += 1;
            let content = start + bytes[start..end].iter().take_while(|&&b| b == b' ').count();
            if content < end && bytes[content] != b'#' {
                let ascii = bytes[start..end].is_ascii();
                return Some(Line { number: self.number, start, content, end, ascii });
            }
        }
        None
    }

    /// Where the text ends, as the general parser marks it (the start of
    /// the line after the last), for a text that ends with a line break.
    fn end_mark(&self) -> Option<Mark> {
        let text = self.text;
        text.ends_with('\n')
            .then(|| Mark { line: u32::try_from(text.matches('\n').count() + 1).unwrap_or(u32::MAX), column: 1 })
    }
}

fn memchr_newline(bytes: &[u8], from: usize) -> usize {
    bytes[from..].iter().position(|&b| b == b'\n').map_or(bytes.len(), |i| from + i)
}

/// 1-based column of byte `at` on the line starting at `line_start`, in
/// characters as the general parser counts them.
fn column_of(text: &str, line_start: usize, at: usize) -> u32 {
    let chars = text.as_bytes()[line_start..at].iter().filter(|&&b| (b & 0xC0) != 0x80).count();
    u32::try_from(chars + 1).unwrap_or(u32::MAX)
}

/// An open block collection and the column its entries start at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    Mapping(usize),
    /// `compact`: a sequence at its parent mapping's own indentation.
    Sequence {
        indent: usize,
        compact: bool,
    },
}

/// A node announced but not yet read: the value of a key or the item of a
/// `-` that ended its line; its content comes on later lines, or is empty.
#[derive(Clone, Copy)]
enum Pending {
    Value { mapping: usize },
    Item { sequence: usize },
}

struct Reader<'t, 'o> {
    text: &'t str,
    out: &'o mut dyn Receiver,
    lines: Lines<'t>,
    stack: Vec<Block>,
    pending: Option<Pending>,
    /// The document's root was a one-line node: nothing may follow it.
    root_done: bool,
}

impl Reader<'_, '_> {
    fn mark(&self, line: &Line, at: usize) -> Mark {
        Mark { line: line.number, column: self.column(line, at) }
    }

    /// The 1-based column of byte `at` of `line`.
    fn column(&self, line: &Line, at: usize) -> u32 {
        if line.ascii {
            u32::try_from(at - line.start + 1).unwrap_or(u32::MAX)
        } else {
            column_of(self.text, line.start, at)
        }
    }

    fn byte(&self, at: usize) -> u8 {
        self.text.as_bytes().get(at).copied().unwrap_or(b'\n')
    }

    fn stream(&mut self) -> Read<()> {
        let mut started = false;
        while let Some(line) = self.lines.next_line() {
            if line.indent() == 0 && self.text[line.content..line.end].starts_with("---") {
                let rest = &self.text[line.content + 3..line.end];
                if !(rest.is_empty() || rest.starts_with(" #") || rest.trim_start_matches(' ').is_empty()) {
                    return Err(GiveUp);
                }
                if started {
                    self.close_all(Some(self.mark(&line, line.content)))?;
                }
                started = true;
                self.root_done = false;
                continue;
            }
            let content = &self.text[line.content..line.end];
            if line.indent() == 0 && (content.starts_with("...") || content.starts_with('%')) {
                return Err(GiveUp);
            }
            started = true;
            self.line(&line)?;
        }
        let end = self.lines.end_mark();
        self.close_all(end)
    }

    /// Ends the document: the pending node is empty (marked at the next
    /// token, which must be known), every block closes.
    fn close_all(&mut self, next_token: Option<Mark>) -> Read<()> {
        if self.pending.take().is_some() {
            self.out.scalar(Cow::Borrowed(""), false, next_token.ok_or(GiveUp)?);
        }
        while self.stack.pop().is_some() {
            self.out.end();
        }
        Ok(())
    }

    fn line(&mut self, line: &Line) -> Read<()> {
        let indent = line.indent();
        let is_item = self.is_item(line.content);
        if let Some(pending) = self.pending.take() {
            let (owner, compact_ok) = match pending {
                Pending::Value { mapping } => (mapping, true),
                Pending::Item { sequence } => (sequence, false),
            };
            if indent > owner {
                return self.node_block(line, line.content, false);
            }
            if indent == owner && is_item && compact_ok {
                // A sequence at its key's own indentation.
                return self.node_block(line, line.content, true);
            }
            // The general parser marks an empty node at the token after
            // it, and an empty item followed by another item past that
            // item's dash.
            let mark = match pending {
                Pending::Item { sequence } if is_item && indent == sequence => {
                    let after = self.skip_spaces(line.content + 1, line.end);
                    if after < line.end && self.byte(after) == b'#' {
                        return Err(GiveUp);
                    }
                    self.mark(line, after)
                }
                Pending::Item { .. } if is_item => return Err(GiveUp),
                _ => self.mark(line, line.content),
            };
            self.out.scalar(Cow::Borrowed(""), false, mark);
        }
        // Close what this line's indentation ends.
        while let Some(&top) = self.stack.last() {
            let keep = match top {
                Block::Mapping(at) => at <= indent,
                // A compact sequence ends at the first line at its
                // indentation that is not an item.
                Block::Sequence { indent: at, compact } => at < indent || (at == indent && (is_item || !compact)),
            };
            if keep {
                break;
            }
            self.stack.pop();
            self.out.end();
        }
        match self.stack.last().copied() {
            None => {
                if indent != 0 || self.root_done {
                    return Err(GiveUp);
                }
                self.node_block(line, line.content, false)?;
                self.root_done = self.stack.is_empty() && self.pending.is_none();
                Ok(())
            }
            Some(Block::Mapping(at)) if at == indent && !is_item => self.entry(line, line.content, at),
            Some(Block::Sequence { indent: at, .. }) if at == indent && is_item => self.item(line, line.content, at),
            Some(_) => Err(GiveUp),
        }
    }

    fn is_item(&self, at: usize) -> bool {
        self.byte(at) == b'-' && matches!(self.byte(at + 1), b' ' | b'\n')
    }

    /// A node starting at byte `at` of `line` (in block context): a block
    /// sequence or mapping opening here, or a one-line flow or scalar node.
    fn node_block(&mut self, line: &Line, at: usize, compact: bool) -> Read<()> {
        let indent = self.column(line, at) as usize - 1;
        if self.is_item(at) {
            let content = self.skip_spaces(at + 1, line.end);
            // The general parser marks an indented sequence at its first
            // dash, a compact one at its first item.
            let mark = if compact {
                if content == line.end || self.byte(content) == b'#' {
                    return Err(GiveUp);
                }
                self.mark(line, content)
            } else {
                self.mark(line, at)
            };
            self.out.sequence_start(mark);
            self.stack.push(Block::Sequence { indent, compact });
            return self.item(line, at, indent);
        }
        if compact {
            return Err(GiveUp);
        }
        if self.key_end(line, at).is_some() {
            self.out.mapping_start(self.mark(line, at));
            self.stack.push(Block::Mapping(indent));
            return self.entry(line, at, indent);
        }
        let end = self.flow_or_scalar(line, at, false)?;
        self.rest_is_empty(end, line.end)
    }

    /// `- …` at byte `at`, in the sequence at column `indent`.
    fn item(&mut self, line: &Line, at: usize, indent: usize) -> Read<()> {
        let content = self.skip_spaces(at + 1, line.end);
        if content == line.end || self.byte(content) == b'#' {
            self.pending = Some(Pending::Item { sequence: indent });
            return Ok(());
        }
        if self.is_item(content) {
            return Err(GiveUp);
        }
        if self.key_end(line, content).is_some() {
            let column = self.column(line, content) as usize - 1;
            self.out.mapping_start(self.mark(line, content));
            self.stack.push(Block::Mapping(column));
            return self.entry(line, content, column);
        }
        let end = self.flow_or_scalar(line, content, false)?;
        self.rest_is_empty(end, line.end)
    }

    /// `key: …` at byte `at`, in the mapping at column `indent`.
    fn entry(&mut self, line: &Line, at: usize, indent: usize) -> Read<()> {
        let Some(colon) = self.key_end(line, at) else { return Err(GiveUp) };
        let key_end = self.scalar(line, at, false)?;
        if key_end != colon {
            return Err(GiveUp);
        }
        let value = self.skip_spaces(colon + 1, line.end);
        if value == line.end || self.byte(value) == b'#' {
            self.pending = Some(Pending::Value { mapping: indent });
            return Ok(());
        }
        if self.is_item(value) || self.key_end(line, value).is_some() {
            return Err(GiveUp);
        }
        let end = self.flow_or_scalar(line, value, false)?;
        self.rest_is_empty(end, line.end)
    }

    /// Where the colon of a one-line block key starting at `at` is, if the
    /// line holds `key:` followed by a space or its end.
    fn key_end(&self, line: &Line, at: usize) -> Option<usize> {
        let bytes = self.text.as_bytes();
        match bytes[at] {
            b'"' | b'\'' => {
                let close = self.quoted_end(at, line.end).ok()?;
                (self.byte(close) == b':' && matches!(self.byte(close + 1), b' ' | b'\n')).then_some(close)
            }
            b'[' | b'{' => None,
            _ => {
                // The general parser limits implicit keys to 1024 characters.
                let end = line.end.min(at + 1000);
                let mut i = at;
                while i < end {
                    match bytes[i] {
                        b':' if matches!(self.byte(i + 1), b' ' | b'\n') => return Some(i),
                        b'#' if i > at && bytes[i - 1] == b' ' => return None,
                        _ => i += 1,
                    }
                }
                None
            }
        }
    }

    fn skip_spaces(&self, mut at: usize, end: usize) -> usize {
        while at < end && self.byte(at) == b' ' {
            at += 1;
        }
        at
    }

    /// Only spaces and a comment may follow a node on its line.
    fn rest_is_empty(&self, from: usize, end: usize) -> Read<()> {
        let next = self.skip_spaces(from, end);
        if next == end || (self.byte(next) == b'#' && next > from) { Ok(()) } else { Err(GiveUp) }
    }

    /// A flow collection or a scalar at `at`; returns where it ends.
    fn flow_or_scalar(&mut self, line: &Line, at: usize, in_flow: bool) -> Read<usize> {
        match self.byte(at) {
            b'[' | b'{' => self.flow_collection(line, at),
            _ => self.scalar(line, at, in_flow),
        }
    }

    /// A one-line flow sequence or mapping at `at`: its entries (nodes, or
    /// `key: node` pairs), separated by commas, up to its closing bracket.
    fn flow_collection(&mut self, line: &Line, at: usize) -> Read<usize> {
        let mapping = self.byte(at) == b'{';
        let close = if mapping { b'}' } else { b']' };
        let mark = self.mark(line, at);
        if mapping {
            self.out.mapping_start(mark);
        } else {
            self.out.sequence_start(mark);
        }
        let mut i = self.skip_spaces(at + 1, line.end);
        if self.byte(i) == close {
            self.out.end();
            return Ok(i + 1);
        }
        loop {
            if mapping {
                self.starts_entry(i)?;
                let key_end = self.scalar(line, i, true)?;
                if self.byte(key_end) != b':' || self.byte(key_end + 1) != b' ' {
                    return Err(GiveUp);
                }
                i = self.skip_spaces(key_end + 1, line.end);
            }
            self.starts_entry(i)?;
            let end = self.flow_or_scalar(line, i, true)?;
            i = self.skip_spaces(end, line.end);
            match self.byte(i) {
                b',' => i = self.skip_spaces(i + 1, line.end),
                b if b == close => {
                    self.out.end();
                    return Ok(i + 1);
                }
                _ => return Err(GiveUp),
            }
        }
    }

    /// A flow collection's entry may not be empty: no separator, closing
    /// bracket, comment or line end where it starts.
    fn starts_entry(&self, at: usize) -> Read<()> {
        if matches!(self.byte(at), b',' | b']' | b'}' | b'#' | b'\n') { Err(GiveUp) } else { Ok(()) }
    }

    /// Where a quoted scalar starting at `at` ends (the byte after its
    /// closing quote), on this line.
    fn quoted_end(&self, at: usize, end: usize) -> Read<usize> {
        let bytes = self.text.as_bytes();
        let quote = bytes[at];
        let mut i = at + 1;
        while i < end {
            match bytes[i] {
                b'\\' if quote == b'"' => i += 2,
                b'\'' if quote == b'\'' && self.byte(i + 1) == b'\'' => i += 2,
                b if b == quote => return Ok(i + 1),
                _ => i += 1,
            }
        }
        Err(GiveUp)
    }

    /// A scalar at `at` (in a flow collection or not): reported, and where
    /// it ends. A plain one ends before `: `, ` #` and the line's end, and in
    /// a flow collection before its indicators.
    fn scalar(&mut self, line: &Line, at: usize, in_flow: bool) -> Read<usize> {
        let bytes = self.text.as_bytes();
        let mark = self.mark(line, at);
        match bytes[at] {
            b'"' => {
                let end = self.quoted_end(at, line.end)?;
                let text = unescape_double(&self.text[at + 1..end - 1])?;
                self.out.scalar(text, true, mark);
                Ok(end)
            }
            b'\'' => {
                let end = self.quoted_end(at, line.end)?;
                let raw = &self.text[at + 1..end - 1];
                let text = if raw.contains("''") { Cow::Owned(raw.replace("''", "'")) } else { Cow::Borrowed(raw) };
                self.out.scalar(text, true, mark);
                Ok(end)
            }
            first => {
                let plain_start = first.is_ascii_alphanumeric()
                    || matches!(first, b'.' | b'/' | b'_' | b'~' | b'+')
                    || (first == b'-' && !matches!(self.byte(at + 1), b' ' | b'\n' | b',' | b']' | b'}'));
                if !plain_start {
                    return Err(GiveUp);
                }
                let mut i = at;
                let mut last = at;
                while i < line.end {
                    let b = bytes[i];
                    match b {
                        b':' => {
                            let next = self.byte(i + 1);
                            if matches!(next, b' ' | b'\n') || (in_flow && matches!(next, b',' | b']' | b'}')) {
                                break;
                            }
                            if in_flow {
                                return Err(GiveUp);
                            }
                        }
                        b'#' if bytes[i - 1] == b' ' => break,
                        // The general parser checks again after a space what
                        // a scalar may start with.
                        b' ' if matches!(
                            self.byte(i + 1),
                            b'-' | b'?' | b':' | b'!' | b'&' | b'*' | b'|' | b'>' | b'\'' | b'"' | b'%' | b'@' | b'`'
                        ) =>
                        {
                            return Err(GiveUp);
                        }
                        b',' | b'[' | b']' | b'{' | b'}' if in_flow => break,
                        // Plain scalars stay ASCII here.
                        0x80.. => return Err(GiveUp),
                        _ => {}
                    }
                    if b != b' ' {
                        last = i + 1;
                    }
                    i += 1;
                }
                self.out.scalar(Cow::Borrowed(&self.text[at..last]), false, mark);
                Ok(last)
            }
        }
    }
}

/// The text of a one-line double-quoted scalar, escapes resolved; gives up
/// on escapes other than the common ones.
fn unescape_double(raw: &str) -> Read<Cow<'_, str>> {
    if !raw.contains('\\') {
        return Ok(Cow::Borrowed(raw));
    }
    let mut text = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            text.push(c);
            continue;
        }
        text.push(match chars.next() {
            Some('"') => '"',
            Some('\\') => '\\',
            Some('/') => '/',
            Some('n') => '\n',
            Some('t') => '\t',
            _ => return Err(GiveUp),
        });
    }
    Ok(Cow::Owned(text))
}
