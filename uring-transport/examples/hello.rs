//! The smallest ringfs file system: one read-only file, `hello`, in the root.
//!
//! `cargo run -p uring-transport --example hello -- /mnt/point` (as root), then
//! `cat /mnt/point/hello`; Ctrl-C or `umount /mnt/point` ends it.

use std::ffi::CStr;
use std::sync::Arc;
use std::time::Duration;

use ringfs_protocol::*;
use ringfs_transport::mount::{mount, MountOptions};
use ringfs_transport::{Session, SessionConfig};

const TEXT: &[u8] = b"hello from ringfs\n";
const FILE: NodeId = NodeId(2);

struct Hello;

fn attr(node: NodeId) -> FileAttr {
    let (mode, size, nlink) =
        if node == NodeId::ROOT { (libc::S_IFDIR | 0o755, 0, 2) } else { (libc::S_IFREG | 0o444, TEXT.len(), 1) };
    let mut attr = FileAttr::new(node.0, mode);
    attr.size = size as u64;
    attr.nlink = nlink;
    attr.blksize = 4096;
    attr
}

impl FileSystem for Hello {
    fn init(&self, conn: &mut ConnInfo) -> Result<()> {
        // Only plain readdir is implemented.
        conn.readdirplus = false;
        Ok(())
    }

    async fn lookup(&self, _: &Context, parent: NodeId, name: &CStr) -> Result<Entry> {
        if parent != NodeId::ROOT || name.to_bytes() != b"hello" {
            return Err(Errno::ENOENT);
        }
        let t = Duration::from_secs(1);
        Ok(Entry::new(FILE, 0, attr(FILE), t, t))
    }

    async fn getattr(&self, _: &Context, node: NodeId, _: Option<FileHandle>) -> Result<AttrOut> {
        Ok(AttrOut::new(attr(node), Duration::from_secs(1)))
    }

    async fn open(&self, _: &Context, _: NodeId, _: u32) -> Result<Opened> {
        Ok(Opened::new(FileHandle(0), OpenOptions::default()))
    }

    async fn read(&self, _: &Context, _: NodeId, _: FileHandle, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let data = TEXT.get(offset as usize..).unwrap_or(&[]);
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        Ok(n)
    }

    async fn opendir(&self, _: &Context, _: NodeId, _: u32) -> Result<Opened> {
        Ok(Opened::new(FileHandle(0), OpenOptions::default()))
    }

    async fn readdir(&self, _: &Context, _: NodeId, _: FileHandle, offset: u64, out: &mut DirBuffer<'_>) -> Result<()> {
        let entries: [(u64, u32, &[u8]); 3] =
            [(1, libc::DT_DIR as u32, b"."), (1, libc::DT_DIR as u32, b".."), (2, libc::DT_REG as u32, b"hello")];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if !out.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        Ok(())
    }
}

fn main() -> std::io::Result<()> {
    let mountpoint = std::env::args().nth(1).expect("usage: hello MOUNTPOINT");
    let mut opts = MountOptions::new(std::fs::canonicalize(mountpoint)?);
    opts.fsname = "hello".into();
    opts.subtype = "hello".into();
    opts.read_only = true;
    opts.noexec = true;
    let mounted = mount(&opts)?;
    let mut cfg = SessionConfig::default();
    cfg.transport = ringfs_transport::TransportMode::Auto;
    cfg.queue_depth = 4;
    cfg.busy_poll = std::time::Duration::ZERO;
    let session = Session::init(mounted, Arc::new(Hello), &cfg)?;
    let stats = session.stats();
    session.run()?;
    let per_queue: Vec<u64> =
        stats.queues.iter().map(|q| q.requests.load(std::sync::atomic::Ordering::Relaxed)).collect();
    eprintln!("served; io_uring: {} (requests per queue {per_queue:?})", stats.uring);
    Ok(())
}
