//! A deliberately slow file system for tests: a file `slow` whose every read takes `DELAY_MS`
//! milliseconds (default 3000), a name `slowlookup` whose every lookup takes as long, and a
//! file `fast` answered at once.
//!
//! The delay is an io_uring timeout on the serving queue (`ringfs_transport::io::sleep`), so
//! other requests on the same core keep completing, and an interrupted read ends at once
//! with EINTR. Each delayed request prints `slow: <op> delayed` on stderr when it starts
//! waiting, so that a test knows the request has reached the file system (a signal sent to the
//! caller before that proves nothing). `slow MOUNTPOINT [dev-fuse|uring|auto]`;
//! `umount MOUNTPOINT` ends it.

use std::ffi::CStr;
use std::sync::Arc;
use std::time::Duration;

use ringfs_protocol::*;
use ringfs_transport::mount::{mount, MountOptions};
use ringfs_transport::{Session, SessionConfig, TransportMode};

const TEXT: &[u8] = b"0123456789abcdef";

struct Slow {
    delay: Duration,
}

fn attr(node: NodeId) -> FileAttr {
    let (mode, size, nlink) =
        if node == NodeId::ROOT { (libc::S_IFDIR | 0o755, 0, 2) } else { (libc::S_IFREG | 0o444, TEXT.len(), 1) };
    let mut attr = FileAttr::new(node.0, mode);
    attr.size = size as u64;
    attr.nlink = nlink;
    attr.blksize = 4096;
    attr
}

impl FileSystem for Slow {
    fn init(&self, conn: &mut ConnInfo) -> Result<()> {
        conn.readdirplus = false;
        Ok(())
    }

    async fn lookup(&self, _: &Context, parent: NodeId, name: &CStr) -> Result<Entry> {
        let node = match (parent, name.to_bytes()) {
            (NodeId::ROOT, b"slow") => NodeId(2),
            (NodeId::ROOT, b"fast") => NodeId(3),
            (NodeId::ROOT, b"slowlookup") => NodeId(4),
            _ => return Err(Errno::ENOENT),
        };
        if node == NodeId(4) {
            eprintln!("slow: lookup delayed");
            ringfs_transport::io::sleep(self.delay).await.map_err(|_| Errno::EINTR)?;
        }
        let t = Duration::ZERO;
        Ok(Entry::new(node, 0, attr(node), t, t))
    }

    async fn getattr(&self, _: &Context, node: NodeId, _: Option<FileHandle>) -> Result<AttrOut> {
        Ok(AttrOut::new(attr(node), Duration::ZERO))
    }

    async fn open(&self, _: &Context, _: NodeId, _: u32) -> Result<Opened> {
        // Direct I/O: every read reaches the server (no page cache hits).
        let mut options = OpenOptions::default();
        options.direct_io = true;
        Ok(Opened::new(FileHandle(0), options))
    }

    async fn read(&self, _: &Context, node: NodeId, _: FileHandle, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if node == NodeId(2) {
            eprintln!("slow: read delayed");
            ringfs_transport::io::sleep(self.delay).await.map_err(|_| Errno::EINTR)?;
        }
        let data = TEXT.get(offset as usize..).unwrap_or(&[]);
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        Ok(n)
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let mountpoint = args.next().expect("usage: slow MOUNTPOINT [dev-fuse|uring|auto]");
    let transport = match args.next().as_deref() {
        Some("dev-fuse") => TransportMode::DevFuse,
        Some("uring") => TransportMode::Uring,
        _ => TransportMode::Auto,
    };
    let delay = Duration::from_millis(std::env::var("DELAY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000));
    let mut opts = MountOptions::new(std::fs::canonicalize(mountpoint)?);
    opts.fsname = "slow".into();
    opts.subtype = "slow".into();
    opts.allow_other = true;
    opts.read_only = true;
    opts.noexec = true;
    let mounted = mount(&opts)?;
    let mut cfg = SessionConfig::default();
    cfg.transport = transport;
    cfg.workers = 1;
    cfg.queue_depth = 8;
    cfg.busy_poll = std::time::Duration::ZERO;
    Session::init(mounted, Arc::new(Slow { delay }), &cfg)?.run()
}
