//! Requests the kernel resends after a crash failover (`FUSE_UNIQUE_RESEND` in `unique`): one
//! whose first attempt already took effect is answered as done; the same error on a request
//! that was not resent stands.

use std::ffi::CStr;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use ringfs_protocol::abi::{self, opcode, FuseInHeader, FuseMkdirIn};
use ringfs_protocol::dispatch::{Dispatcher, Outcome};
use ringfs_protocol::request::parse;
use ringfs_protocol::*;
use zerocopy::IntoBytes;

fn run<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = TaskContext::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// A file system where the name already exists and nothing can be removed: what a dead server
/// that had done the first attempt leaves behind.
#[derive(Default)]
struct AlreadyDone {
    lookups: AtomicU64,
}

impl FileSystem for AlreadyDone {
    async fn lookup(&self, _: &Context, _: NodeId, _: &CStr) -> Result<Entry> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let attr = FileAttr::new(7, libc::S_IFDIR | 0o755);
        Ok(Entry::new(NodeId(7), 1, attr, Duration::from_secs(1), Duration::from_secs(1)))
    }
    async fn mkdir(&self, _: &Context, _: NodeId, _: &CStr, _: u32, _: u32) -> Result<Entry> {
        Err(Errno(libc::EEXIST))
    }
    async fn unlink(&self, _: &Context, _: NodeId, _: &CStr) -> Result<()> {
        Err(Errno(libc::ENOENT))
    }
}

fn request(op: u32, unique: u64, body: &[u8]) -> Vec<u8> {
    let h = FuseInHeader {
        len: (40 + body.len()) as u32,
        opcode: op,
        unique,
        nodeid: 1,
        uid: 0,
        gid: 0,
        pid: 1,
        total_extlen: 0,
        padding: 0,
    };
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn mkdir_body() -> Vec<u8> {
    let mut b = FuseMkdirIn { mode: 0o755, umask: 0 }.as_bytes().to_vec();
    b.extend_from_slice(b"d\0");
    b
}

#[test]
fn a_resent_mkdir_that_happened_answers_the_entry_and_a_fresh_one_gets_eexist() {
    let fs = Arc::new(AlreadyDone::default());
    let d = Dispatcher::new(fs.clone());
    let mut out = vec![0u8; 8192];
    let fresh = request(opcode::MKDIR, 10, &mkdir_body());
    let o = run(d.dispatch(&parse(&fresh).expect("parse"), &mut out));
    assert_eq!(o, Outcome::Reply { error: -libc::EEXIST, len: 0 });
    let resent = request(opcode::MKDIR, 12 | abi::UNIQUE_RESEND, &mkdir_body());
    let o = run(d.dispatch(&parse(&resent).expect("parse"), &mut out));
    assert!(matches!(o, Outcome::Reply { error: 0, len } if len > 0), "{o:?}");
    assert_eq!(fs.lookups.load(Ordering::Relaxed), 1);
    assert_eq!(d.stats().resent.load(Ordering::Relaxed), 1);
    assert_eq!(d.stats().resent_done.load(Ordering::Relaxed), 1);
}

#[test]
fn a_resent_unlink_whose_name_is_gone_succeeds_and_a_fresh_one_gets_enoent() {
    let d = Dispatcher::new(Arc::new(AlreadyDone::default()));
    let mut out = vec![0u8; 8192];
    let fresh = request(opcode::UNLINK, 20, b"f\0");
    let o = run(d.dispatch(&parse(&fresh).expect("parse"), &mut out));
    assert_eq!(o, Outcome::Reply { error: -libc::ENOENT, len: 0 });
    let resent = request(opcode::UNLINK, 22 | abi::UNIQUE_RESEND, b"f\0");
    let o = run(d.dispatch(&parse(&resent).expect("parse"), &mut out));
    assert_eq!(o, Outcome::Reply { error: 0, len: 0 });
}
