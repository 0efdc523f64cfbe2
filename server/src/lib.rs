//! ringfs server library: the passthrough file system and the pieces of the binary.
#![deny(clippy::undocumented_unsafe_blocks)]
pub mod cli;
pub mod failover;
pub mod fs;
pub mod metrics;
pub mod run;
pub mod service;
pub mod upgrade;
