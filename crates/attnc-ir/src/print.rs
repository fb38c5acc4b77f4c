//! The IR as text, one node a line.
