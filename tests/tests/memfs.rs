//! The in-memory example file system (`uring-transport/examples/memfs.rs`), built only on the
//! library's public API and served from a storage thread, mounted on both transports and put
//! through a real workload: a tree, patterned data, rename, unlink, `ls -l`, `cp -r` + `diff -r`,
//! concurrent writers from several processes.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{require, Server};

/// Runs `f` on a thread and fails the test if it takes longer than `limit` (a hang).
fn within<T: Send + 'static>(limit: Duration, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

/// Deterministic contents for file `seed`: `len` bytes no two files share.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// A source tree for `cp -r`: nested directories, files of several sizes, a symlink, an empty
/// directory.
fn source_tree() -> tempfile::TempDir {
    let src = tempfile::tempdir_in("/tmp").expect("tempdir");
    for d in 0..4u64 {
        let dir = src.path().join(format!("dir{d}")).join("inner");
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..6u64 {
            let len = [0, 1, 4095, 4096, 70_000, 300_001][f as usize];
            std::fs::write(dir.join(format!("f{f}")), pattern(d * 100 + f, len)).expect("write");
        }
    }
    std::fs::create_dir(src.path().join("empty")).expect("mkdir");
    std::os::unix::fs::symlink("dir0/inner/f5", src.path().join("link")).expect("symlink");
    src
}

fn workload(mnt: &Path) {
    // A tree of patterned files, read back.
    for d in 0..3u64 {
        let dir = mnt.join(format!("d{d}/sub"));
        std::fs::create_dir_all(&dir).expect("mkdir -p");
        for f in 0..5u64 {
            std::fs::write(dir.join(format!("f{f}")), pattern(d * 10 + f, 1000 + 37_000 * f as usize)).expect("write");
        }
    }
    for d in 0..3u64 {
        for f in 0..5u64 {
            let got = std::fs::read(mnt.join(format!("d{d}/sub/f{f}"))).expect("read back");
            assert!(got == pattern(d * 10 + f, 1000 + 37_000 * f as usize), "d{d}/sub/f{f} read back differs");
        }
    }
    // Overwrite in the middle, truncate, extend.
    let p = mnt.join("d0/sub/f4");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&p).expect("open");
        f.write_all_at(b"MIDDLE", 5000).expect("pwrite");
        f.set_len(6000).expect("ftruncate");
        f.set_len(7000).expect("extend");
    }
    let mut want = pattern(4, 1000 + 37_000 * 4);
    want[5000..5006].copy_from_slice(b"MIDDLE");
    want.truncate(6000);
    want.resize(7000, 0);
    assert!(std::fs::read(&p).expect("read") == want, "overwrite/truncate/extend differs");

    // Rename a file across directories and over an existing one, and a directory.
    std::fs::rename(mnt.join("d0/sub/f0"), mnt.join("d1/moved")).expect("rename file");
    assert_eq!(err_of(std::fs::metadata(mnt.join("d0/sub/f0"))), Some(libc::ENOENT));
    assert!(std::fs::read(mnt.join("d1/moved")).expect("read moved") == pattern(0, 1000));
    std::fs::rename(mnt.join("d1/moved"), mnt.join("d1/sub/f1")).expect("rename over a file");
    assert!(std::fs::read(mnt.join("d1/sub/f1")).expect("read replaced") == pattern(0, 1000));
    std::fs::rename(mnt.join("d2"), mnt.join("d0/d2moved")).expect("rename dir");
    assert!(std::fs::read(mnt.join("d0/d2moved/sub/f2")).expect("read in moved dir") == pattern(22, 75_000));
    assert_eq!(
        err_of(std::fs::rename(mnt.join("d0"), mnt.join("d0/d2moved/inside"))),
        Some(libc::EINVAL),
        "a directory moved below itself"
    );
    assert_eq!(err_of(std::fs::remove_dir(mnt.join("d1/sub"))), Some(libc::ENOTEMPTY));

    // ls -l sees names, types and sizes.
    let ls = run(Command::new("ls").arg("-ln").arg(mnt.join("d1/sub")));
    let line = ls.lines().find(|l| l.ends_with(" f3")).unwrap_or_else(|| panic!("f3 missing in ls -l:\n{ls}"));
    assert!(line.starts_with("-rw"), "{line}");
    assert!(line.contains(&format!(" {} ", 1000 + 37_000 * 3)), "size of f3 in {line}");
    let ls = run(Command::new("ls").arg("-ln").arg(mnt.join("d0")));
    assert!(ls.lines().any(|l| l.starts_with('d') && l.ends_with(" d2moved")), "{ls}");

    // Unlink an open file: it stays readable through the open descriptor.
    let open = std::fs::File::open(mnt.join("d1/sub/f2")).expect("open");
    std::fs::remove_file(mnt.join("d1/sub/f2")).expect("unlink");
    assert_eq!(err_of(std::fs::metadata(mnt.join("d1/sub/f2"))), Some(libc::ENOENT));
    {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; 75_000];
        open.read_exact_at(&mut buf, 0).expect("read unlinked file");
        assert!(buf == pattern(12, 75_000), "unlinked file contents");
    }
    drop(open);

    // cp -r in, diff -r back.
    let src = source_tree();
    run(Command::new("cp").arg("-r").arg(src.path()).arg(mnt.join("copy")));
    run(Command::new("diff").arg("-r").arg("--no-dereference").arg(src.path()).arg(mnt.join("copy")));
    assert_eq!(std::fs::read_link(mnt.join("copy/link")).expect("readlink"), PathBuf::from("dir0/inner/f5"));

    // rm -r everything; the root is empty again.
    run(Command::new("rm").arg("-r").arg(mnt.join("copy")).arg(mnt.join("d0")).arg(mnt.join("d1")));
    assert_eq!(std::fs::read_dir(mnt).expect("readdir").count(), 0);
}

/// Several processes write disjoint 64 KiB blocks of one file and whole files of their own at
/// the same time; everything reads back.
fn concurrent_writers(mnt: &Path) {
    const PROCS: u64 = 6;
    const BLOCKS: u64 = 8;
    let src = tempfile::tempdir_in("/tmp").expect("tempdir");
    let mut kids = Vec::new();
    for p in 0..PROCS {
        let block = src.path().join(format!("b{p}"));
        std::fs::write(&block, pattern(1000 + p, 64 * 1024 * BLOCKS as usize)).expect("write source");
        // Process p writes blocks p, p + PROCS, ... of `shared` and all of `own{p}`.
        let mut script = String::new();
        for b in 0..BLOCKS {
            script += &format!(
                "dd if={blk} of={mnt}/shared bs=65536 skip={b} seek={s} count=1 conv=notrunc status=none && ",
                blk = block.display(),
                mnt = mnt.display(),
                s = b * PROCS + p,
            );
        }
        script += &format!("cp {} {}/own{p}", block.display(), mnt.display());
        kids.push(Command::new("sh").arg("-c").arg(script).spawn().expect("spawn writer"));
    }
    for mut k in kids {
        assert!(k.wait().expect("wait writer").success(), "a writer process failed");
    }
    let shared = std::fs::read(mnt.join("shared")).expect("read shared");
    assert_eq!(shared.len() as u64, 64 * 1024 * BLOCKS * PROCS);
    for p in 0..PROCS {
        let want = pattern(1000 + p, 64 * 1024 * BLOCKS as usize);
        assert!(std::fs::read(mnt.join(format!("own{p}"))).expect("read own") == want, "own{p} differs");
        for b in 0..BLOCKS {
            let at = ((b * PROCS + p) * 65536) as usize;
            let from = (b * 65536) as usize;
            assert!(shared[at..at + 65536] == want[from..from + 65536], "shared block {b} of writer {p} differs");
        }
    }
}

fn case(transport: &str) {
    let server = Server::memfs(transport);
    let mnt = server.mountpoint.clone();
    within(Duration::from_secs(180), "memfs workload", move || {
        workload(&mnt);
        concurrent_writers(&mnt);
    });
    drop(server);
}

#[test]
fn memfs_serves_a_real_workload_on_uring() {
    if !require("memfs_serves_a_real_workload_on_uring", true, &["memfs"]) {
        return;
    }
    case("uring");
}

#[test]
fn memfs_serves_a_real_workload_on_dev_fuse() {
    if !require("memfs_serves_a_real_workload_on_dev_fuse", false, &["memfs"]) {
        return;
    }
    case("dev-fuse");
}
