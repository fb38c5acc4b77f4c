//! attnc: a compiler for attention.
#![warn(missing_docs)]

pub mod io;
