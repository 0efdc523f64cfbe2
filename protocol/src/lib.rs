//! The FUSE protocol as ringfs speaks it, and the library API for file systems.
//!
//! - [`abi`]: the kernel ABI (protocol 7.45) as `#[repr(C)]` zerocopy structs and constants.
//! - [`request`]: requests parsed by borrowing from the transport's buffer.
//! - [`reply`]: reply encoding.
//! - [`fs`]: the [`fs::FileSystem`] trait that file systems implement.
//! - [`dispatch`]: decodes a request, calls the file system, encodes the reply.
//! - [`init`]: INIT negotiation and the capability table.
//! - [`stats`]: per-operation counters the dispatcher keeps.

pub mod abi;
pub mod dispatch;
pub mod fs;
pub mod init;
pub mod reply;
pub mod request;
pub mod stats;

pub use fs::*;
