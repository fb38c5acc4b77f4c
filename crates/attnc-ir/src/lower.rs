//! Lowering from the AST to the IR, with name, arity, shape and type checking.
