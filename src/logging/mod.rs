//! Run outputs (being written).
