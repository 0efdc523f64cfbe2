//! A file system whose answers come from other threads, for the transport's robustness tests.
//!
//! - `now`: a read answered at once by a helper thread, through a channel;
//! - `later`: a read answered by a timer thread after `DELAY_MS` milliseconds (default 5);
//! - `sleepy`: a read answered by the timer thread after 60 s (a request kept in flight);
//! - `panic`: a read that panics (the transport answers EIO and goes on);
//! - looking up `die` makes the serving queue fail as if its ring had failed (the transport
//!   aborts the connection: every caller gets an error).
//!
//! Nothing here runs on a queue's ring: the requests wait on wakers called from other threads,
//! which must wake the queue that serves them. `offthread MOUNTPOINT [dev-fuse|uring|auto]`;
//! `umount MOUNTPOINT` ends it.

use std::collections::BinaryHeap;
use std::ffi::CStr;
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use ringfs_protocol::*;
use ringfs_transport::mount::{mount, MountOptions};
use ringfs_transport::{Session, SessionConfig, TransportMode};

const TEXT: &[u8] = b"0123456789abcdef";

/// A one-shot answer filled in by another thread.
#[derive(Default)]
struct Answer {
    state: Mutex<(Option<Vec<u8>>, Option<Waker>)>,
}

impl Answer {
    fn fill(&self, data: Vec<u8>) {
        let waker = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.0 = Some(data);
            s.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Waits for an [`Answer`].
struct Wait(Arc<Answer>);

impl Future for Wait {
    type Output = Vec<u8>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Vec<u8>> {
        let mut s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.0.take() {
            Some(d) => Poll::Ready(d),
            None => {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// A timer job: answer `answer` at `at`.
struct Job {
    at: Instant,
    answer: Arc<Answer>,
}

impl PartialEq for Job {
    fn eq(&self, o: &Job) -> bool {
        self.at == o.at
    }
}
impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, o: &Job) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Job {
    fn cmp(&self, o: &Job) -> std::cmp::Ordering {
        o.at.cmp(&self.at) // earliest first in the max-heap
    }
}

/// The timer thread: answers each job at its time.
fn timer(rx: mpsc::Receiver<Job>) {
    let mut heap = BinaryHeap::new();
    loop {
        let now = Instant::now();
        while heap.peek().is_some_and(|j: &Job| j.at <= now) {
            if let Some(j) = heap.pop() {
                j.answer.fill(TEXT.to_vec());
            }
        }
        let next = match heap.peek() {
            Some(j) => rx.recv_timeout(j.at.saturating_duration_since(now)),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(j) => heap.push(j),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

struct OffThread {
    delay: Duration,
    timer: Mutex<mpsc::Sender<Job>>,
    helper: Mutex<mpsc::Sender<Arc<Answer>>>,
}

impl OffThread {
    fn after(&self, d: Duration) -> Wait {
        let answer = Arc::new(Answer::default());
        let job = Job { at: Instant::now() + d, answer: answer.clone() };
        let _ = self.timer.lock().unwrap_or_else(|e| e.into_inner()).send(job);
        Wait(answer)
    }

    fn now(&self) -> Wait {
        let answer = Arc::new(Answer::default());
        let _ = self.helper.lock().unwrap_or_else(|e| e.into_inner()).send(answer.clone());
        Wait(answer)
    }
}

const NAMES: [&[u8]; 4] = [b"now", b"later", b"sleepy", b"panic"];

fn attr(node: NodeId) -> FileAttr {
    let (mode, size, nlink) =
        if node == NodeId::ROOT { (libc::S_IFDIR | 0o755, 0, 2) } else { (libc::S_IFREG | 0o444, TEXT.len(), 1) };
    let mut attr = FileAttr::new(node.0, mode);
    attr.size = size as u64;
    attr.nlink = nlink;
    attr.blksize = 4096;
    attr
}

impl FileSystem for OffThread {
    fn init(&self, conn: &mut ConnInfo) -> Result<()> {
        conn.readdirplus = false;
        Ok(())
    }

    async fn lookup(&self, _: &Context, parent: NodeId, name: &CStr) -> Result<Entry> {
        if parent != NodeId::ROOT {
            return Err(Errno::ENOENT);
        }
        if name.to_bytes() == b"die" {
            ringfs_transport::io::fail_this_queue();
            return Err(Errno::ENOENT);
        }
        let k = NAMES.iter().position(|n| *n == name.to_bytes()).ok_or(Errno::ENOENT)?;
        let node = NodeId(k as u64 + 2);
        let t = Duration::ZERO;
        Ok(Entry::new(node, 0, attr(node), t, t))
    }

    async fn getattr(&self, _: &Context, node: NodeId, _: Option<FileHandle>) -> Result<AttrOut> {
        Ok(AttrOut::new(attr(node), Duration::ZERO))
    }

    async fn open(&self, _: &Context, _: NodeId, _: u32) -> Result<Opened> {
        // Direct I/O: every read reaches the server.
        let mut options = OpenOptions::default();
        options.direct_io = true;
        Ok(Opened::new(FileHandle(0), options))
    }

    async fn read(&self, _: &Context, node: NodeId, _: FileHandle, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let data = match node.0 {
            2 => self.now().await,
            3 => self.after(self.delay).await,
            4 => self.after(Duration::from_secs(60)).await,
            5 => panic!("the offthread example panics on purpose"),
            _ => return Err(Errno::ENOENT),
        };
        let data = data.get(offset as usize..).unwrap_or(&[]);
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        Ok(n)
    }
}

fn main() -> std::io::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let mut args = std::env::args().skip(1);
    let mountpoint = args.next().expect("usage: offthread MOUNTPOINT [dev-fuse|uring|auto]");
    let transport = match args.next().as_deref() {
        Some("dev-fuse") => TransportMode::DevFuse,
        Some("uring") => TransportMode::Uring,
        _ => TransportMode::Auto,
    };
    let delay = Duration::from_millis(std::env::var("DELAY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(5));
    let (ttx, trx) = mpsc::channel();
    std::thread::spawn(move || timer(trx));
    let (htx, hrx) = mpsc::channel::<Arc<Answer>>();
    std::thread::spawn(move || {
        for a in hrx {
            a.fill(TEXT.to_vec());
        }
    });
    let fs = OffThread { delay, timer: Mutex::new(ttx), helper: Mutex::new(htx) };
    let mut opts = MountOptions::new(std::fs::canonicalize(mountpoint)?);
    opts.fsname = "offthread".into();
    opts.subtype = "offthread".into();
    opts.allow_other = true;
    opts.read_only = true;
    opts.noexec = true;
    let mounted = mount(&opts)?;
    let mut cfg = SessionConfig::default();
    cfg.transport = transport;
    cfg.queue_depth = 8;
    Session::init(mounted, Arc::new(fs), &cfg)?.run()
}
