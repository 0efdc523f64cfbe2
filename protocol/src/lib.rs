//! The FUSE protocol as ringfs speaks it, and the library API for file systems.
//!
//! - `abi`: the kernel ABI (protocol 7.45) as `#[repr(C)]` zerocopy structs and constants.
//! - `request`: requests parsed by borrowing from the transport's buffer.
//! - `reply`: reply encoding.
//! - [`fs`]: the [`fs::FileSystem`] trait that file systems implement.
//! - `dispatch`: decodes a request, calls the file system, encodes the reply.
//! - [`init`]: INIT negotiation and the capability table.
//! - [`stats`]: per-operation counters the dispatcher keeps.
//!
//! A file system needs [`fs`] (re-exported at the root), [`init::InitParams`] and, to read the
//! counters, [`stats`]. `abi`, `request`, `reply` and `dispatch` are the transport's internals
//! (the kernel ABI and its encoding): public for `uring-transport` and the ringfs server, hidden
//! from the documentation and not part of the API a file system may rely on.
#![deny(clippy::undocumented_unsafe_blocks)]

#[doc(hidden)]
pub mod abi;
#[doc(hidden)]
pub mod dispatch;
pub mod fs;
pub mod init;
#[doc(hidden)]
pub mod reply;
#[doc(hidden)]
pub mod request;
pub mod stats;

pub use fs::*;
