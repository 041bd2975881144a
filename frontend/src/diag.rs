//! Diagnostics: what a user sees when a model file or config is wrong.
//!
//! A [`Diagnostic`] has a stable [`Code`], a lowercase message, labelled spans (the first
//! primary), notes with facts and an optional help with the fix. [`render`] draws them with
//! miette (file:line:col, source excerpt, labels), with or without colour.

use ir::Span;
use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource, SourceSpan};
use std::fmt;

/// Stable error codes, one per diagnostic class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    /// Unexpected token or missing piece of syntax.
    Syntax,
    /// A bracket or brace never closed.
    Unclosed,
    /// A malformed literal (number out of range, unterminated string, stray character).
    Lexical,
    /// Nesting deeper than the parser allows, a file too large, or elaboration too large.
    Limit,
    /// A name that is not defined.
    UnknownName,
    /// A call of something that is neither a builtin op nor a block.
    UnknownOp,
    /// A named argument or attribute the callee does not take.
    UnknownAttribute,
    /// A name defined twice.
    Duplicate,
    /// Wrong number of arguments.
    Arity,
    /// An argument or attribute of the wrong kind or value (axis out of range, ...).
    BadArgument,
    /// Tensor shapes that do not fit together.
    ShapeMismatch,
    /// Tensor dtypes that do not fit together.
    DTypeMismatch,
    /// A config value that is out of range, inconsistent or of the wrong type.
    InvalidConfig,
    /// A config key that ma2mba does not know (a warning).
    UnknownConfigKey,
    /// A value used where a different kind is expected (a tensor where a number is needed).
    Type,
    /// An IO problem reading a model file or config.
    Io,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Syntax => "E0100",
            Code::Unclosed => "E0101",
            Code::Lexical => "E0102",
            Code::Limit => "E0103",
            Code::UnknownName => "E0200",
            Code::UnknownOp => "E0201",
            Code::UnknownAttribute => "E0202",
            Code::Duplicate => "E0203",
            Code::Arity => "E0300",
            Code::BadArgument => "E0301",
            Code::ShapeMismatch => "E0400",
            Code::DTypeMismatch => "E0401",
            Code::Type => "E0402",
            Code::InvalidConfig => "E0500",
            Code::UnknownConfigKey => "W0501",
            Code::Io => "E0600",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Label {
    pub span: Span,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub code: Code,
    pub severity: Severity,
    pub message: String,
    /// The first label is the primary one.
    pub labels: Vec<Label>,
    pub notes: Vec<String>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(code: Code, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            code,
            severity: Severity::Error,
            message: message.into(),
            labels: Vec::new(),
            notes: Vec::new(),
            help: None,
        }
    }

    pub fn warning(code: Code, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, message)
        }
    }

    pub fn label(mut self, span: Span, text: impl Into<String>) -> Diagnostic {
        self.labels.push(Label {
            span,
            text: text.into(),
        });
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The primary span, if any.
    pub fn span(&self) -> Option<Span> {
        self.labels.first().map(|l| l.span)
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)
    }
}

/// Source files that spans point into, indexed by `Span::file`.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    files: Vec<(String, String)>,
}

impl Sources {
    pub fn new() -> Sources {
        Sources::default()
    }

    /// Adds a file and returns its index for spans.
    pub fn add(&mut self, name: impl Into<String>, text: impl Into<String>) -> u16 {
        self.files.push((name.into(), text.into()));
        (self.files.len() - 1) as u16
    }

    pub fn name(&self, file: u16) -> &str {
        self.files.get(file as usize).map_or("<unknown>", |f| &f.0)
    }

    pub fn text(&self, file: u16) -> &str {
        self.files.get(file as usize).map_or("", |f| &f.1)
    }

    pub fn names(&self) -> Vec<String> {
        self.files.iter().map(|f| f.0.clone()).collect()
    }

    /// 1-based line and column of a byte offset (column counts characters).
    pub fn line_col(&self, file: u16, offset: u32) -> (usize, usize) {
        let text = self.text(file);
        let mut off = (offset as usize).min(text.len());
        while !text.is_char_boundary(off) {
            off -= 1;
        }
        let before = &text[..off];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }
}

/// The miette view of one diagnostic: labels from the primary file only (miette shows one
/// source per report); labels elsewhere become notes.
struct Report<'a> {
    diag: &'a Diagnostic,
    source: NamedSource<String>,
    labels: Vec<LabeledSpan>,
    notes: Vec<String>,
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.diag.message)
    }
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.diag.message)
    }
}

impl std::error::Error for Report<'_> {}

impl miette::Diagnostic for Report<'_> {
    fn code<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        Some(Box::new(self.diag.code.as_str()))
    }

    fn severity(&self) -> Option<miette::Severity> {
        Some(match self.diag.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        })
    }

    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.diag
            .help
            .as_ref()
            .map(|h| Box::new(h.as_str()) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        (!self.labels.is_empty()).then_some(&self.source as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        (!self.labels.is_empty()).then(|| Box::new(self.labels.iter().cloned()) as Box<_>)
    }
}

/// Renders diagnostics as text; `color` turns ANSI colours on.
pub fn render(diags: &[Diagnostic], sources: &Sources, color: bool) -> String {
    let theme = if color {
        GraphicalTheme::unicode()
    } else {
        GraphicalTheme::unicode_nocolor()
    };
    let handler = GraphicalReportHandler::new_themed(theme)
        .with_width(100)
        .with_links(false);
    let mut out = String::new();
    for d in diags {
        let file = d.span().map_or(0, |s| s.file);
        let text = sources.text(file).to_string();
        let mut notes = Vec::new();
        let mut labels = Vec::new();
        for (i, l) in d.labels.iter().enumerate() {
            if l.span.file != file {
                let (line, col) = sources.line_col(l.span.file, l.span.start);
                notes.push(format!(
                    "note: {} ({}:{line}:{col})",
                    l.text,
                    sources.name(l.span.file)
                ));
                continue;
            }
            let start = (l.span.start as usize).min(text.len());
            let end = (l.span.end as usize).clamp(start, text.len());
            let span = SourceSpan::new(start.into(), end - start);
            let label = (!l.text.is_empty()).then(|| l.text.clone());
            labels.push(if i == 0 {
                LabeledSpan::new_primary_with_span(label, span)
            } else {
                LabeledSpan::new_with_span(label, span)
            });
        }
        for n in &d.notes {
            notes.push(format!("note: {n}"));
        }
        let report = Report {
            diag: d,
            source: NamedSource::new(sources.name(file), text),
            labels,
            notes,
        };
        if handler.render_report(&mut out, &report).is_err() {
            out.push_str(&format!("error[{}]: {}\n", d.code.as_str(), d.message));
        }
        // miette has no notes; they follow the report, indented like its help line.
        for n in &report.notes {
            out.push_str("  ");
            out.push_str(n);
            out.push('\n');
        }
    }
    out
}

/// Edit distance between two names, for "did you mean" suggestions.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The candidate closest to `name`, if it is close enough to be a likely typo.
pub fn near_name<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c)
}
