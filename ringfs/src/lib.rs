//! Write a FUSE file system on ringfs's fast path.
//!
//! Implement [`FileSystem`] (async methods; every one you leave out answers `ENOSYS`), mount
//! with [`mount::mount`], and serve with a [`Session`]: per-CPU queues over FUSE-over-io_uring
//! when the kernel offers it, the classic `/dev/fuse` channel otherwise. On a queue thread the
//! backing I/O calls of [`io`] are SQEs on that queue's ring; any other future may be awaited
//! too (its waker may be called from any thread).
//!
//! This crate only re-exports the two crates that make up the library API:
//! `ringfs-protocol` (the [`FileSystem`] trait, its value types, [`init::InitParams`],
//! [`stats`]) and `ringfs-transport` ([`mount`], [`Session`] and its configuration, [`io`],
//! [`notify`], [`watchdog`]). The protocol's internals (the kernel ABI, parsing, encoding and the
//! dispatcher) are not part of it.
//!
//! A file system with one empty directory, its root, mounted and served until unmounted:
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use ringfs::mount::{mount, MountOptions};
//! use ringfs::{AttrOut, Context, FileHandle, FileSystem, FileAttr, NodeId, Result, Session, SessionConfig};
//!
//! struct Empty;
//!
//! impl FileSystem for Empty {
//!     async fn getattr(&self, _: &Context, node: NodeId, _: Option<FileHandle>) -> Result<AttrOut> {
//!         let mut attr = FileAttr::new(node.0, libc::S_IFDIR | 0o755);
//!         attr.nlink = 2;
//!         Ok(AttrOut::new(attr, Duration::from_secs(1)))
//!     }
//! }
//!
//! fn main() -> std::io::Result<()> {
//!     let mut opts = MountOptions::new(std::fs::canonicalize("/mnt/empty")?);
//!     opts.fsname = "empty".into();
//!     opts.read_only = true;
//!     let session = Session::init(mount(&opts)?, Arc::new(Empty), &SessionConfig::default())?;
//!     session.run()
//! }
//! ```
//!
//! Larger examples live in the repository: `uring-transport/examples/hello.rs` (one read-only
//! file) and `uring-transport/examples/memfs.rs` (an in-memory file system whose work runs on
//! a storage thread), walked through in `docs/library.md`.

pub use ringfs_protocol::fs::*;
pub use ringfs_protocol::{fs, init, stats};
pub use ringfs_transport::ring::{possible_cpus, QueueStats};
pub use ringfs_transport::{io, mount, notify, session, watchdog};
pub use ringfs_transport::{
    Control, Ended, MountOptions, Mounted, Session, SessionConfig, SessionStats, TransportMode,
};
