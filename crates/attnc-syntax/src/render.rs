//! Turning a [`Diagnostic`] into text for people (rustc-like) or a located, serializable form for
//! `--format json`.
//!
//! Spans are clamped to the text and moved back to character boundaries first, so any span —
//! past the end, inside a multi-byte character, at the end of the file — renders without a
//! panic. Tabs are shown as four spaces and control characters as `�`, with carets aligned to
//! what is shown.

use crate::diagnostic::{Diagnostic, Severity};
use crate::span::Span;
use serde::Serialize;
use std::fmt::Write;

/// Byte offsets to 1-based lines and 1-based columns (counted in characters).
///
/// A line ends at `\n`; a `\r` just before it is not part of the line's text.
#[derive(Clone, Debug)]
pub struct LineIndex<'a> {
    src: &'a str,
    /// Byte offset where each line starts.
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    /// Indexes the lines of `src`.
    pub fn new(src: &'a str) -> LineIndex<'a> {
        let starts = std::iter::once(0)
            .chain(src.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex { src, starts }
    }

    /// `offset` clamped to the text and moved back to a character boundary.
    pub fn clamp(&self, offset: usize) -> usize {
        let mut offset = offset.min(self.src.len());
        while !self.src.is_char_boundary(offset) {
            offset -= 1;
        }
        offset
    }

    /// The 1-based line and 1-based character column of `offset` (clamped).
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = self.clamp(offset);
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts[line - 1];
        (line, self.src[start..offset].chars().count() + 1)
    }

    /// The text of 1-based `line`, without its line ending; empty past the last line.
    pub fn line_text(&self, line: usize) -> &'a str {
        let Some(&start) = self.starts.get(line.wrapping_sub(1)) else {
            return "";
        };
        let end = self
            .starts
            .get(line)
            .map_or(self.src.len(), |&next| next - 1);
        let text = &self.src[start..end.max(start)];
        text.strip_suffix('\r').unwrap_or(text)
    }

    /// The byte offset where 1-based `line` starts.
    fn line_start(&self, line: usize) -> usize {
        self.starts
            .get(line.wrapping_sub(1))
            .copied()
            .unwrap_or(self.src.len())
    }
}

/// One label of a [`LocatedDiagnostic`]: a span as lines and columns (the end is exclusive).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocatedLabel {
    /// 1-based line of the start.
    pub line: usize,
    /// 1-based character column of the start.
    pub column: usize,
    /// 1-based line of the end.
    pub end_line: usize,
    /// 1-based character column just past the end.
    pub end_column: usize,
    /// The label's message (may be empty).
    pub message: String,
    /// Whether this is the primary label.
    pub primary: bool,
}

/// A diagnostic with its places as lines and columns: the `--format json` form.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LocatedDiagnostic {
    /// How serious.
    pub severity: Severity,
    /// The one-line message.
    pub message: String,
    /// The file name as given by the caller.
    pub file: String,
    /// Line of the primary label (of the first label if none is primary; 1 if there is none).
    pub line: usize,
    /// Column of the primary label (same rule as `line`).
    pub column: usize,
    /// Every label, in the diagnostic's order.
    pub labels: Vec<LocatedLabel>,
    /// The notes.
    pub notes: Vec<String>,
}

impl Diagnostic {
    /// Places every label of this diagnostic in `src`.
    pub fn locate(&self, file_name: &str, src: &str) -> LocatedDiagnostic {
        let index = LineIndex::new(src);
        let labels: Vec<LocatedLabel> = self
            .labels
            .iter()
            .map(|label| {
                let (line, column) = index.line_col(label.span.start as usize);
                let (end_line, end_column) = index.line_col(label.span.end as usize);
                LocatedLabel {
                    line,
                    column,
                    end_line,
                    end_column,
                    message: label.message.clone(),
                    primary: label.primary,
                }
            })
            .collect();
        let main = labels.iter().find(|l| l.primary).or(labels.first());
        LocatedDiagnostic {
            severity: self.severity,
            message: self.message.clone(),
            file: file_name.to_string(),
            line: main.map_or(1, |l| l.line),
            column: main.map_or(1, |l| l.column),
            labels,
            notes: self.notes.clone(),
        }
    }

    /// The located diagnostic as one line of JSON.
    pub fn to_json(&self, file_name: &str, src: &str) -> String {
        serde_json::to_string(&self.locate(file_name, src))
            .unwrap_or_else(|e| format!("{{\"error\":\"cannot serialize diagnostic: {e}\"}}"))
    }

    /// The human form: message, `--> file:line:col`, the source lines with carets, notes.
    pub fn render(&self, file_name: &str, src: &str) -> String {
        let index = LineIndex::new(src);
        let located = self.locate(file_name, src);
        let mut out = format!("{}: {}\n", severity_word(self.severity), self.message);

        let mut marks: Vec<Mark> = self
            .labels
            .iter()
            .map(|label| Mark::new(&index, label.span, &label.message, label.primary))
            .collect();
        marks.sort_by_key(|m| (m.line, !m.primary, m.from));
        let width = marks
            .iter()
            .map(|m| m.line)
            .max()
            .unwrap_or(1)
            .to_string()
            .len();
        let pad = " ".repeat(width);

        if marks.is_empty() {
            let _ = writeln!(out, "{pad}--> {file_name}");
        } else {
            let _ = writeln!(
                out,
                "{pad}--> {file_name}:{}:{}",
                located.line, located.column
            );
            let _ = writeln!(out, "{pad} |");
            let mut previous: Option<usize> = None;
            for mark in &marks {
                if previous != Some(mark.line) {
                    if previous.is_some_and(|p| mark.line > p + 1) {
                        let _ = writeln!(out, "...");
                    }
                    let shown = display(index.line_text(mark.line));
                    let _ = writeln!(out, "{:>width$} | {}", mark.line, shown.trim_end());
                    previous = Some(mark.line);
                }
                let symbol = if mark.primary { "^" } else { "-" };
                let underline = format!(
                    "{}{}",
                    " ".repeat(mark.from),
                    symbol.repeat(mark.to.saturating_sub(mark.from).max(1))
                );
                if mark.message.is_empty() {
                    let _ = writeln!(out, "{pad} | {underline}");
                } else {
                    let _ = writeln!(out, "{pad} | {underline} {}", mark.message);
                }
            }
        }
        for note in &self.notes {
            let _ = writeln!(out, "{pad} = note: {note}");
        }
        out
    }
}

fn severity_word(severity: Severity) -> &'static str {
    match severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Note => "note",
    }
}

/// A label placed on one shown line, in display columns (0-based).
struct Mark {
    line: usize,
    from: usize,
    to: usize,
    message: String,
    primary: bool,
}

impl Mark {
    fn new(index: &LineIndex<'_>, span: Span, message: &str, primary: bool) -> Mark {
        let start = index.clamp(span.start as usize);
        let end = index.clamp(span.end as usize).max(start);
        let (line, _) = index.line_col(start);
        let line_start = index.line_start(line);
        let text = index.line_text(line);
        // A span running past its first line is underlined to the end of that line.
        let line_end = line_start + text.len();
        let from = display_width(&text[..start.min(line_end) - line_start]);
        let to = display_width(&text[..end.min(line_end).max(start.min(line_end)) - line_start]);
        Mark {
            line,
            from,
            to,
            message: message.to_string(),
            primary,
        }
    }
}

/// How a source character is shown: tabs as four spaces, control characters as `�`.
fn display(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\t' => "    ".to_string(),
            c if c.is_control() => '\u{FFFD}'.to_string(),
            c => c.to_string(),
        })
        .collect()
}

fn display_width(text: &str) -> usize {
    text.chars().map(|c| if c == '\t' { 4 } else { 1 }).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_columns_count_characters() {
        let index = LineIndex::new("ab\r\né😀x\n");
        assert_eq!(index.line_col(0), (1, 1));
        assert_eq!(index.line_col(4), (2, 1));
        assert_eq!(index.line_col(6), (2, 2));
        assert_eq!(index.line_col(7), (2, 2)); // inside 😀: moved back
        assert_eq!(index.line_col(10), (2, 3));
        assert_eq!(index.line_col(1000), (3, 1));
        assert_eq!(index.line_text(1), "ab");
        assert_eq!(index.line_text(2), "é😀x");
        assert_eq!(index.line_text(3), "");
        assert_eq!(index.line_text(9), "");
    }

    #[test]
    fn any_span_renders() {
        let src = "\té😀\r\n\u{200B}x";
        for start in 0..20u32 {
            for end in 0..20u32 {
                let d = Diagnostic::error("e", Span { start, end }).with_label(
                    Span {
                        start: end,
                        end: start,
                    },
                    "x",
                );
                let _ = d.render("f", src);
                let _ = d.locate("f", src);
            }
        }
        let _ = Diagnostic::error("e", Span::new(0, 5)).render("f", "");
    }
}
