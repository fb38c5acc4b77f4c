//! Diagnostics: one serializable type for every error attnc reports about a source file.
//!
//! Stages produce [`Diagnostic`]s with byte spans; [`Diagnostic::render`] turns one into the
//! human form (file:line:col, the source line, a caret) and [`Diagnostic::to_json`] into the
//! machine form used by `--format json`.

use crate::span::Span;
use serde::Serialize;

/// How serious a diagnostic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The program is rejected.
    Error,
    /// Worth knowing; the program is accepted.
    Warning,
    /// Extra information.
    Note,
}

/// A place in the source with a short message.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Label {
    /// The place.
    pub span: Span,
    /// What is wrong or relevant there (may be empty).
    pub message: String,
    /// The primary label is where the error is; secondary ones give context.
    pub primary: bool,
}

/// An error or warning about a source file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diagnostic {
    /// How serious.
    pub severity: Severity,
    /// One line, lowercase, no final dot.
    pub message: String,
    /// Places in the source; the first primary label gives the reported line and column.
    pub labels: Vec<Label>,
    /// Extra lines printed after the source excerpt.
    pub notes: Vec<String>,
}

impl Diagnostic {
    /// An error with a primary label at `span`.
    pub fn error(message: impl Into<String>, span: Span) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            message: message.into(),
            labels: vec![Label {
                span,
                message: String::new(),
                primary: true,
            }],
            notes: Vec::new(),
        }
    }

    /// Adds a secondary label.
    pub fn with_label(mut self, span: Span, message: impl Into<String>) -> Diagnostic {
        self.labels.push(Label {
            span,
            message: message.into(),
            primary: false,
        });
        self
    }

    /// Sets the message of the primary label.
    pub fn with_primary_message(mut self, message: impl Into<String>) -> Diagnostic {
        if let Some(label) = self.labels.iter_mut().find(|l| l.primary) {
            label.message = message.into();
        }
        self
    }

    /// Adds a note line.
    pub fn with_note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }

    /// The span of the primary label, if there is one.
    pub fn primary_span(&self) -> Option<Span> {
        self.labels.iter().find(|l| l.primary).map(|l| l.span)
    }
}
