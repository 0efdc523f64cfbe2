//! ringfs transport (being written).
