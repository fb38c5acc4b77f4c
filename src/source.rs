//! From source bytes to a checked IR module: decode, parse, lower.

use attnc_ir::Module;
use attnc_syntax::Diagnostic;

/// Parses and checks `text`; every kernel of the file is lowered to the IR.
///
/// Syntax errors stop before checking, so a broken file reports only what is certainly wrong.
pub fn compile_text(text: &str) -> Result<Module, Vec<Diagnostic>> {
    let (file, diagnostics) = attnc_syntax::parse(text);
    if !diagnostics.is_empty() {
        return Err(diagnostics);
    }
    attnc_ir::lower::lower_file(&file)
}

/// Decodes `bytes` as UTF-8, then [`compile_text`]s it.
///
/// Returns the decoded text beside the result so diagnostics can be rendered against it.
pub fn compile_bytes(bytes: &[u8]) -> (String, Result<Module, Vec<Diagnostic>>) {
    match attnc_syntax::decode_source(bytes) {
        Ok(text) => (text.to_string(), compile_text(text)),
        Err(diagnostic) => (
            String::from_utf8_lossy(bytes).into_owned(),
            Err(vec![diagnostic]),
        ),
    }
}
