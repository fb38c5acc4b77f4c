//! Reductions and softmax along one axis.
