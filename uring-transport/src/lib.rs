//! Everything that touches `/dev/fuse`: mounting, INIT, the per-core channels that carry
//! requests to the dispatcher, and the watchdog that unmounts when the server dies.
//!
//! **Architecture Invariant:** no other crate opens `/dev/fuse`, calls mount(2) for FUSE, or
//! talks to io_uring. The file system behind the dispatcher never sees a byte of the protocol.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod executor;
pub mod fdpass;
pub mod io;
pub mod mount;
pub mod notify;
pub mod ring;
pub mod session;
mod task_cell;
pub mod watchdog;

pub use mount::{MountOptions, Mounted};
pub use session::{Control, Ended, Session, SessionConfig, SessionStats, TransportMode};
