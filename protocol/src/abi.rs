//! FUSE kernel ABI (being written).
