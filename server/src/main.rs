//! ringfs binary (being written).
fn main() {}
