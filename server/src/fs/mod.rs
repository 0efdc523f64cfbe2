//! The passthrough file system (being written).
