//! ringfs configuration (placeholder, being written).
