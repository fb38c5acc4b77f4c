//! The IR as a Graphviz DOT graph.
