//! placeholder: the egg optimizer lands here
