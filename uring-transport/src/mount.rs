//! Opening `/dev/fuse` and mounting it, unmounting, and reading the mount table.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What to mount where. Build it with [`MountOptions::new`] and change the fields you need
/// (new fields may be added: the struct is `#[non_exhaustive]`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MountOptions {
    /// Mount point (absolute, canonical).
    pub mountpoint: PathBuf,
    /// Shown as the device in /proc/mounts.
    pub fsname: String,
    /// File-system subtype: the type shows as `fuse.<subtype>`, or `fuse` when empty.
    pub subtype: String,
    /// Let users other than root use the mount.
    pub allow_other: bool,
    /// The kernel checks permissions from the attributes.
    pub default_permissions: bool,
    /// Mount read-only.
    pub read_only: bool,
    /// MS_NOSUID.
    pub nosuid: bool,
    /// MS_NODEV.
    pub nodev: bool,
    /// MS_NOEXEC.
    pub noexec: bool,
    /// MS_NOATIME.
    pub noatime: bool,
    /// MS_STRICTATIME.
    pub strictatime: bool,
    /// MS_NODIRATIME.
    pub nodiratime: bool,
    /// Largest read request, in bytes.
    pub max_read: u32,
}

impl MountOptions {
    /// Options for a mount at `mountpoint` (absolute, canonical) with safe defaults: fsname
    /// `fuse`, no subtype, only the mounting user may use it, the kernel checks permissions,
    /// read-write, `nosuid` and `nodev`, reads of up to 128 KiB.
    pub fn new(mountpoint: impl Into<PathBuf>) -> MountOptions {
        MountOptions {
            mountpoint: mountpoint.into(),
            fsname: "fuse".into(),
            subtype: String::new(),
            allow_other: false,
            default_permissions: true,
            read_only: false,
            nosuid: true,
            nodev: true,
            noexec: false,
            noatime: false,
            strictatime: false,
            nodiratime: false,
            max_read: 128 * 1024,
        }
    }
}

/// A mounted FUSE connection whose INIT has not been answered yet.
#[derive(Debug)]
pub struct Mounted {
    pub(crate) fd: OwnedFd,
    mountpoint: PathBuf,
    dev: u64,
}

impl Mounted {
    /// A mount served before by another process, which handed over its /dev/fuse descriptor.
    pub fn from_parts(fd: OwnedFd, mountpoint: PathBuf, dev: u64) -> Mounted {
        Mounted { fd, mountpoint, dev }
    }

    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The mount's device number (`st_dev` seen through it; the FUSE connection id).
    pub fn dev(&self) -> u64 {
        self.dev
    }
}

fn err(context: String, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{context}: {e}"))
}

/// Opens `/dev/fuse` with a clear error.
pub fn open_dev_fuse() -> io::Result<OwnedFd> {
    match File::options().read(true).write(true).open("/dev/fuse") {
        Ok(f) => Ok(f.into()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(err(
            "cannot open /dev/fuse".into(),
            io::Error::new(e.kind(), "no such device node (load the module: modprobe fuse)"),
        )),
        Err(e) => Err(err("cannot open /dev/fuse".into(), e)),
    }
}

/// Escapes a value for the comma-separated FUSE mount data.
fn option_value_ok(v: &str) -> bool {
    !v.contains(',') && !v.contains('\0')
}

/// The helper that mounts and unmounts FUSE file systems for users (set-uid root, from
/// Debian's fuse3 package), as libfuse uses it.
pub const FUSERMOUNT: &str = "fusermount3";

/// Whether this process may mount itself: CAP_SYS_ADMIN in its effective set (root, normally).
/// Without it, [`mount`] and [`unmount`] go through [`FUSERMOUNT`].
pub fn can_mount() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return rustix::process::geteuid().is_root();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// Mounts a new FUSE connection at `opts.mountpoint`: with mount(2) when the process may
/// ([`can_mount`]), else through [`FUSERMOUNT`] (which forces `nosuid,nodev` for users).
pub fn mount(opts: &MountOptions) -> io::Result<Mounted> {
    let mp = &opts.mountpoint;
    let meta = std::fs::metadata(mp).map_err(|e| err(format!("mount point {}", mp.display()), e))?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("mount point {}: not a directory", mp.display()),
        ));
    }
    if let Some(m) = find_mount(mp)? {
        if m.fstype.starts_with("fuse") {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!("mount point {}: busy, already a {} mount (unmount it first)", mp.display(), m.fstype),
            ));
        }
    }
    if !option_value_ok(&opts.fsname) || !option_value_ok(&opts.subtype) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "fsname and subtype may not contain ',' or NUL"));
    }
    if !can_mount() {
        let fd = fusermount_mount(opts)?;
        let dev = match find_mount(mp)? {
            Some(m) => m.dev,
            None => return Err(io::Error::other(format!("mounted {} but cannot find it in mountinfo", mp.display()))),
        };
        return Ok(Mounted { fd, mountpoint: mp.clone(), dev });
    }
    let fd = open_dev_fuse()?;
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},max_read={}",
        fd.as_raw_fd(),
        meta.mode() & libc::S_IFMT,
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
        opts.max_read
    );
    if opts.default_permissions {
        data.push_str(",default_permissions");
    }
    if opts.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags: libc::c_ulong = 0;
    if opts.read_only {
        flags |= libc::MS_RDONLY;
    }
    if opts.nosuid {
        flags |= libc::MS_NOSUID;
    }
    if opts.nodev {
        flags |= libc::MS_NODEV;
    }
    if opts.noexec {
        flags |= libc::MS_NOEXEC;
    }
    if opts.noatime {
        flags |= libc::MS_NOATIME;
    }
    if opts.strictatime {
        flags |= libc::MS_STRICTATIME;
    }
    if opts.nodiratime {
        flags |= libc::MS_NODIRATIME;
    }
    let source = CString::new(opts.fsname.as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let fstype = if opts.subtype.is_empty() { "fuse".to_owned() } else { format!("fuse.{}", opts.subtype) };
    let fstype = CString::new(fstype).map_err(|_| io::ErrorKind::InvalidInput)?;
    let target = CString::new(mp.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let cdata = CString::new(data).map_err(|_| io::ErrorKind::InvalidInput)?;
    let flags = rustix::mount::MountFlags::from_bits_retain(flags as _);
    if let Err(e) = rustix::mount::mount(&*source, &*target, &*fstype, flags, Some(cdata.as_c_str())) {
        let e = io::Error::from(e);
        let hint = match e.raw_os_error() {
            Some(libc::EPERM) => " (ringfs must run as root, with CAP_SYS_ADMIN)",
            Some(libc::ENODEV) => " (the fuse file system type is not available: modprobe fuse)",
            _ => "",
        };
        return Err(io::Error::new(e.kind(), format!("mount on {} failed: {e}{hint}", mp.display())));
    }
    let dev = match find_mount(mp)? {
        Some(m) => m.dev,
        None => return Err(io::Error::other(format!("mounted {} but cannot find it in mountinfo", mp.display()))),
    };
    Ok(Mounted { fd, mountpoint: mp.clone(), dev })
}

/// The words of `opts` that a user's mount cannot have: `strictatime` and `nodiratime`.
/// fusermount3 (3.14, Debian 12) refuses them ("unknown option"), and they would change
/// nothing on the FUSE mount itself anyway: FUSE inodes are `S_NOATIME`, the server owns access
/// times, and a server applies these modes to the backing directory through a private bind mount
/// (`open_tree`/`mount_setattr`), which needs CAP_SYS_ADMIN. `noatime` is accepted.
pub fn user_mount_refuses(opts: &MountOptions) -> Vec<&'static str> {
    [(opts.strictatime, "strictatime"), (opts.nodiratime, "nodiratime")]
        .into_iter()
        .filter_map(|(on, word)| on.then_some(word))
        .collect()
}

/// The `-o` list for [`FUSERMOUNT`]: the words it accepts (it sets `fd`, `rootmode`,
/// `user_id` and `group_id` itself, and adds `nosuid,nodev` for users). The words it refuses
/// ([`user_mount_refuses`]) are left out; [`fusermount_mount`] fails before running it when
/// `opts` has them.
fn fusermount_options(opts: &MountOptions) -> String {
    let mut o = vec![if opts.read_only { "ro".to_owned() } else { "rw".to_owned() }];
    for (on, word) in [
        (opts.nosuid, "nosuid"),
        (opts.nodev, "nodev"),
        (opts.noexec, "noexec"),
        (opts.noatime, "noatime"),
        (opts.default_permissions, "default_permissions"),
        (opts.allow_other, "allow_other"),
    ] {
        if on {
            o.push(word.to_owned());
        }
    }
    o.push(format!("fsname={}", opts.fsname));
    if !opts.subtype.is_empty() {
        o.push(format!("subtype={}", opts.subtype));
    }
    o.push(format!("max_read={}", opts.max_read));
    o.join(",")
}

/// Mounts through [`FUSERMOUNT`]: it opens /dev/fuse, mounts, and hands the descriptor back
/// over a Unix socket (`SCM_RIGHTS`) whose number it finds in `_FUSE_COMMFD`.
fn fusermount_mount(opts: &MountOptions) -> io::Result<OwnedFd> {
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    use std::os::unix::process::CommandExt;
    let refused = user_mount_refuses(opts);
    if !refused.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "mount on {}: {} {} root: {FUSERMOUNT} refuses {} for a user's mount (noatime it accepts)",
                opts.mountpoint.display(),
                refused.join(" and "),
                if refused.len() > 1 { "need" } else { "needs" },
                if refused.len() > 1 { "them" } else { "it" },
            ),
        ));
    }
    let (ours, theirs) = socketpair(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)
        .map_err(|e| err("socketpair".into(), e.into()))?;
    let child_fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(FUSERMOUNT);
    cmd.arg("-o")
        .arg(fusermount_options(opts))
        .arg("--")
        .arg(&opts.mountpoint)
        .env("_FUSE_COMMFD", child_fd.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: fcntl is async-signal-safe; the child keeps its end of the socket across exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(child_fd, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::NotFound { " (install the fuse3 package)" } else { "" };
        err(format!("running {FUSERMOUNT}{hint}"), e)
    })?;
    // Our copy of its end would keep the socket open after it exits.
    drop(theirs);
    let received = receive_fd(&ours);
    let out = child.wait_with_output().map_err(|e| err(format!("waiting for {FUSERMOUNT}"), e))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if !out.status.success() || received.is_err() {
        let hint = if stderr.contains("allow_other") {
            " (allow_other for users needs `user_allow_other` in /etc/fuse.conf)"
        } else {
            ""
        };
        let why = match (&received, stderr.is_empty()) {
            (_, false) => stderr,
            (Err(e), true) => e.to_string(),
            (Ok(_), true) => out.status.to_string(),
        };
        return Err(io::Error::other(format!(
            "mount on {} through {FUSERMOUNT} failed: {why}{hint}",
            opts.mountpoint.display()
        )));
    }
    received
}

/// Receives one descriptor sent with `SCM_RIGHTS` on `sock`.
fn receive_fd(sock: &OwnedFd) -> io::Result<OwnedFd> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut byte = [0u8; 1];
    // Room for one control message carrying one descriptor.
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let n = loop {
        let mut iov = [io::IoSliceMut::new(&mut byte)];
        match recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r?.bytes,
        }
    };
    if n == 0 {
        return Err(io::Error::other(format!("{FUSERMOUNT} sent no descriptor")));
    }
    // The first control message, as before: descriptors beyond the first (none are sent) are
    // closed when the drain drops them.
    let fd = match control.drain().next() {
        Some(RecvAncillaryMessage::ScmRights(mut fds)) => fds.next(),
        _ => None,
    };
    fd.ok_or_else(|| io::Error::other(format!("{FUSERMOUNT} sent no descriptor")))
}

/// Unmounts `mountpoint` through [`FUSERMOUNT`] (`-u`, with `-z` for a lazy detach).
pub fn fusermount_unmount(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    let out = std::process::Command::new(FUSERMOUNT)
        .arg(if lazy { "-uz" } else { "-u" })
        .arg("--")
        .arg(mountpoint)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .map_err(|e| err(format!("running {FUSERMOUNT}"), e))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let kind = if stderr.contains("busy") { io::ErrorKind::ResourceBusy } else { io::ErrorKind::Other };
    Err(io::Error::new(kind, format!("{FUSERMOUNT} -u {}: {stderr}", mountpoint.display())))
}

/// The mount(8) words a remount (`mount -o remount,...`) applies; every other option of the
/// mount stays as it was mounted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemountFlags {
    /// `ro` (else `rw`).
    pub read_only: bool,
    /// `nosuid`.
    pub nosuid: bool,
    /// `nodev`.
    pub nodev: bool,
    /// `noexec`.
    pub noexec: bool,
    /// `noatime`.
    pub noatime: bool,
    /// `nodiratime`.
    pub nodiratime: bool,
    /// `strictatime` (else the kernel's default, relatime).
    pub strictatime: bool,
}

impl RemountFlags {
    /// Reads the mount(8) words of a comma-separated option list (later words win; others are
    /// ignored, as is `remount` itself).
    pub fn from_options(list: &str) -> RemountFlags {
        let mut f = RemountFlags::default();
        for word in list.split(',') {
            match word.trim() {
                "ro" => f.read_only = true,
                "rw" => f.read_only = false,
                "nosuid" => f.nosuid = true,
                "suid" => f.nosuid = false,
                "nodev" => f.nodev = true,
                "dev" => f.nodev = false,
                "noexec" => f.noexec = true,
                "exec" => f.noexec = false,
                "noatime" => f.noatime = true,
                "atime" => f.noatime = false,
                "nodiratime" => f.nodiratime = true,
                "diratime" => f.nodiratime = false,
                "strictatime" => (f.strictatime, f.noatime) = (true, false),
                "relatime" => f.strictatime = false,
                _ => {}
            }
        }
        f
    }

    fn bits(&self) -> libc::c_ulong {
        let mut b = libc::MS_REMOUNT;
        for (on, bit) in [
            (self.read_only, libc::MS_RDONLY),
            (self.nosuid, libc::MS_NOSUID),
            (self.nodev, libc::MS_NODEV),
            (self.noexec, libc::MS_NOEXEC),
            (self.noatime, libc::MS_NOATIME),
            (self.nodiratime, libc::MS_NODIRATIME),
            (self.strictatime, libc::MS_STRICTATIME),
        ] {
            if on {
                b |= bit;
            }
        }
        b
    }
}

/// Changes the flags of the FUSE mount on `mountpoint` in place (`mount -o remount,ro`): the
/// server keeps serving; only the kernel's view changes (read-only, nosuid, ...). The FUSE
/// options themselves cannot change on a remount.
///
/// Needs CAP_SYS_ADMIN ([`can_mount`]): the kernel refuses `MS_REMOUNT` to users, also on
/// their own mounts, and [`FUSERMOUNT`] has no remount. Without it the call fails before
/// trying, with an error that says so and what to do instead (unmount and mount again).
pub fn remount(mountpoint: &Path, flags: &RemountFlags) -> io::Result<()> {
    let target = CString::new(mountpoint.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    match find_mount(mountpoint)? {
        Some(m) if m.fstype == "fuse" || m.fstype.starts_with("fuse.") => {}
        Some(m) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is a {} mount, not a FUSE one", mountpoint.display(), m.fstype),
            ))
        }
        None => {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a mount point", mountpoint.display()),
            ))
        }
    }
    if !can_mount() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "remount of {mp} refused: only root (CAP_SYS_ADMIN) can remount; the kernel refuses a \
                 remount to users, also of their own mounts, and {FUSERMOUNT} has no remount. Unmount \
                 ({FUSERMOUNT} -u {mp}) and mount again with the new options",
                mp = mountpoint.display()
            ),
        ));
    }
    // SAFETY: valid C string target; null source, type and data (FUSE ignores remount data).
    let rc =
        unsafe { libc::mount(std::ptr::null(), target.as_ptr(), std::ptr::null(), flags.bits(), std::ptr::null()) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("remount of {} failed: {e}", mountpoint.display())));
    }
    Ok(())
}

/// Unmounts `mountpoint`; a busy mount is detached lazily (it goes away when its last user
/// does). Returns whether a lazy detach was needed.
/// Without the privilege to unmount (EPERM), it goes through [`FUSERMOUNT`].
pub fn unmount(mountpoint: &Path) -> io::Result<bool> {
    let target = CString::new(mountpoint.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    use rustix::mount::UnmountFlags;
    let Err(e) = rustix::mount::unmount(&*target, UnmountFlags::empty()) else { return Ok(false) };
    let e = io::Error::from(e);
    if e.raw_os_error() == Some(libc::EPERM) {
        return match fusermount_unmount(mountpoint, false) {
            Ok(()) => Ok(false),
            Err(_) => fusermount_unmount(mountpoint, true).map(|()| true),
        };
    }
    if e.raw_os_error() != Some(libc::EBUSY) {
        return Err(e);
    }
    rustix::mount::unmount(&*target, UnmountFlags::DETACH).map(|()| true).map_err(io::Error::from)
}

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MountEntry {
    /// Device number (major:minor).
    pub dev: u64,
    /// Mount point path.
    pub mountpoint: PathBuf,
    /// File-system type (e.g. `fuse.ringfs`).
    pub fstype: String,
    /// Mount source.
    pub source: String,
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Where the fuse control file system lists connections.
pub const FUSECTL: &str = "/sys/fs/fuse/connections";

/// The fuse control directory of the connection whose mount has device number `dev` (st_dev):
/// the kernel names it after its own encoding of the device number (major << 20 | minor).
pub fn fusectl_dir(dev: u64) -> PathBuf {
    let kdev = (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev));
    Path::new(FUSECTL).join(kdev.to_string())
}

/// Aborts the FUSE connection of the mount with device number `dev` (fusectl `abort`): every
/// waiting and future request fails with ENOTCONN, and the server's channels report the
/// connection gone. Mounts the fuse control file system first if it is not mounted.
pub fn abort_connection(dev: u64) -> io::Result<()> {
    let dir = fusectl_dir(dev);
    if !dir.exists() && std::fs::read_dir(FUSECTL).is_ok_and(|mut d| d.next().is_none()) {
        let (src, target, fstype) = (c"fusectl", CString::new(FUSECTL)?, c"fusectl");
        let rc = rustix::mount::mount(src, &*target, fstype, rustix::mount::MountFlags::empty(), None);
        if let Err(e) = rc {
            let e = io::Error::from(e);
            return Err(io::Error::new(e.kind(), format!("mounting fusectl on {FUSECTL}: {e}")));
        }
    }
    std::fs::write(dir.join("abort"), b"1")
        .map_err(|e| io::Error::new(e.kind(), format!("writing {}/abort: {e}", dir.display())))
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut v = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let f: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if f.len() < 5 || r.len() < 2 {
            continue;
        }
        let Some((maj, min)) = f[2].split_once(':') else { continue };
        let (Ok(maj), Ok(min)) = (maj.parse::<u32>(), min.parse::<u32>()) else { continue };
        v.push(MountEntry {
            dev: libc::makedev(maj, min),
            mountpoint: PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(f[4]))),
            fstype: r[0].to_string(),
            source: String::from_utf8_lossy(&unescape(r[1])).into_owned(),
        });
    }
    v
}

/// The topmost mount at exactly `mountpoint`, if any.
pub fn find_mount(mountpoint: &Path) -> io::Result<Option<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text).into_iter().rev().find(|m| m.mountpoint == mountpoint))
}

/// Clones a session fd (FUSE_DEV_IOC_CLONE): a new fd on which the same connection's requests
/// can be read by another thread.
pub fn clone_fd(master: &OwnedFd) -> io::Result<OwnedFd> {
    let fd = open_dev_fuse()?;
    let mut id: u32 = master.as_raw_fd() as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads a u32 fd number from the pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), ringfs_protocol::abi::ioctl::DEV_IOC_CLONE as _, &mut id) };
    if rc != 0 {
        return Err(err("FUSE_DEV_IOC_CLONE".into(), io::Error::last_os_error()));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fusermount_words() {
        let opts = MountOptions {
            mountpoint: PathBuf::from("/m"),
            fsname: "/srv/d".into(),
            subtype: "ringfs".into(),
            allow_other: false,
            default_permissions: true,
            read_only: false,
            nosuid: true,
            nodev: false,
            noexec: false,
            noatime: true,
            strictatime: false,
            nodiratime: false,
            max_read: 131072,
        };
        assert_eq!(
            fusermount_options(&opts),
            "rw,nosuid,noatime,default_permissions,fsname=/srv/d,subtype=ringfs,max_read=131072"
        );
        assert!(user_mount_refuses(&opts).is_empty());
        let opts = MountOptions { strictatime: true, nodiratime: true, ..opts };
        assert_eq!(user_mount_refuses(&opts), ["strictatime", "nodiratime"]);
        let e = fusermount_mount(&opts).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("strictatime and nodiratime need root"), "{e}");
    }

    #[test]
    fn remount_words() {
        // What mount(8) passes for `mount -o remount,ro MNT` (the mount's options plus the change).
        let f = RemountFlags::from_options("ro,relatime,remount,user_id=0,group_id=0,max_read=1048576,dev,suid");
        assert_eq!(f, RemountFlags { read_only: true, ..RemountFlags::default() });
        assert_eq!(f.bits(), libc::MS_REMOUNT | libc::MS_RDONLY);
        let f = RemountFlags::from_options("ro,rw,remount,nosuid,nodev,noexec,noatime,strictatime");
        assert_eq!(
            f.bits(),
            libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_STRICTATIME
        );
    }

    #[test]
    fn parses_mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 0:52 / /tmp/m rw,nosuid shared:5 - fuse.ringfs /srv/data rw,user_id=0\n";
        let v = parse_mountinfo(text);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].mountpoint, PathBuf::from("/mnt/with space"));
        assert_eq!(v[0].dev, libc::makedev(98, 0));
        assert_eq!(v[1].fstype, "fuse.ringfs");
        assert_eq!(v[1].source, "/srv/data");
    }
}
