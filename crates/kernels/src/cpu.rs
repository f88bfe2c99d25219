//! Run-time choice of the instruction set.
