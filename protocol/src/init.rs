//! INIT negotiation: which capabilities ringfs asks for, and why.

use crate::abi::{FuseInitIn, FuseInitOut, InitFlags, KERNEL_MINOR_VERSION, KERNEL_VERSION, MIN_KERNEL_MINOR_VERSION};
use crate::fs::{ConnInfo, Errno};

/// What the server wants from the connection, from its configuration.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct InitParams {
    /// Largest WRITE the kernel may send, in bytes (multiple of 4096).
    pub max_write: u32,
    /// Largest readahead, in bytes.
    pub max_readahead: u32,
    /// Maximum background requests.
    pub max_background: u16,
    /// Background requests at which the kernel marks the connection congested.
    pub congestion_threshold: u16,
    /// Ask for the writeback cache (excludes passthrough).
    pub writeback_cache: bool,
    /// Ask for passthrough of file I/O to backing files.
    pub passthrough: bool,
    /// Ask for FUSE over io_uring.
    pub over_io_uring: bool,
    /// `default_permissions` is in the mount options (told to the file system).
    pub default_permissions: bool,
    /// Let the kernel pick READDIRPLUS only for a directory's first chunk and after lookups
    /// in it (FUSE_READDIRPLUS_AUTO); otherwise every chunk is a READDIRPLUS.
    pub readdirplus_auto: bool,
}

impl Default for InitParams {
    /// 128 KiB writes and readahead, 16 background requests (congestion at 12), no writeback
    /// cache, no passthrough, the kernel checks permissions, READDIRPLUS for every chunk.
    fn default() -> InitParams {
        InitParams {
            max_write: 128 * 1024,
            max_readahead: 128 * 1024,
            max_background: 16,
            congestion_threshold: 12,
            writeback_cache: false,
            passthrough: false,
            over_io_uring: false,
            default_permissions: true,
            readdirplus_auto: false,
        }
    }
}

/// The capability table: each flag ringfs asks for, with the reason. Flags not listed are
/// refused (left out of the reply):
/// - `POSIX_LOCKS`, `FLOCK_LOCKS`: by default the kernel keeps locks itself (local to this
///   mount), which is correct for users of the mount and avoids lock-owner bookkeeping in the
///   server. Offered to the file system as opt-ins (`ConnInfo::posix_locks`,
///   `ConnInfo::flock_locks`): it then serves GETLK/SETLK/SETLKW itself.
/// - `EXPORT_SUPPORT`: offered to the file system as an opt-in (`ConnInfo::export_support`): it
///   must then answer lookups of "." (a node by id, after the kernel forgot it) and ".." (a
///   directory's parent). Without it ringfs says `NO_EXPORT_SUPPORT`: `name_to_handle_at` is
///   EOPNOTSUPP and the mount cannot be exported over NFS.
/// - `DONT_MASK`: the kernel applies the caller's umask before sending modes.
/// - `SPLICE_*`: copies through pipes cost more than they save for this server.
/// - `POSIX_ACL` with `DONT_MASK`: offered to the file system as an opt-in
///   (`ConnInfo::posix_acl`, only with `default_permissions`): it then applies umasks itself.
/// - `SECURITY_CTX`, `SETXATTR_EXT`: security labels and the ACL set-gid flag are not
///   negotiated (a file system that sets ACLs with the caller's credentials gets the set-gid
///   clearing from the backing file system; ringfs's passthrough file system, which sets them
///   as root under `default_permissions`, decides it from the caller's groups).
/// - `ATOMIC_O_TRUNC`: the kernel would send O_TRUNC inside OPEN and check for a running
///   executable (ETXTBSY) only afterwards, so `open(O_RDONLY|O_TRUNC)` of a binary that is being
///   executed would empty it and then fail, killing the running program. Without it the kernel
///   checks first and truncates with a SETATTR (one more round trip per truncating open).
/// - `HANDLE_KILLPRIV`: superseded by `HANDLE_KILLPRIV_V2`, which is offered to the file system
///   as an opt-in (`ConnInfo::handle_killpriv_v2`): it then clears set-uid/set-gid itself.
pub const BASE_FLAGS: &[(InitFlags, &str)] = &[
    (InitFlags::ASYNC_READ, "concurrent reads of one file"),
    (InitFlags::BIG_WRITES, "writes larger than one page"),
    (InitFlags::AUTO_INVAL_DATA, "page cache dropped when mtime/size change"),
    (InitFlags::DO_READDIRPLUS, "directory listing fills the entry cache"),
    (InitFlags::ASYNC_DIO, "concurrent direct I/O"),
    (InitFlags::PARALLEL_DIROPS, "lookups and readdirs of one directory run in parallel"),
    (InitFlags::ABORT_ERROR, "ECONNABORTED instead of ENOTCONN after an abort"),
    (InitFlags::MAX_PAGES, "requests as large as max_write"),
    (InitFlags::CACHE_SYMLINKS, "symlink targets cached in the page cache"),
    (InitFlags::INIT_EXT, "second flags word"),
    (InitFlags::NO_EXPORT_SUPPORT, "not exportable over NFS"),
    (InitFlags::DIRECT_IO_ALLOW_MMAP, "shared mmap of direct-I/O files"),
    (InitFlags::HAS_EXPIRE_ONLY, "invalidations may only expire entries"),
];

/// The negotiated result.
#[doc(hidden)] // the transport's internals: carries the ABI reply
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Negotiated {
    /// The reply to send.
    pub out: FuseInitOut,
    /// Capabilities in effect.
    pub flags: InitFlags,
    /// What the file system is told.
    pub conn: ConnInfo,
    /// The kernel offered FUSE_HANDLE_KILLPRIV_V2 (enabled if the file system opts in).
    pub killpriv_offered: bool,
    /// The kernel offered FUSE_POSIX_ACL and FUSE_DONT_MASK and permissions are checked by the
    /// kernel (enabled if the file system opts in).
    pub acl_offered: bool,
    /// The kernel offered FUSE_EXPORT_SUPPORT (enabled if the file system opts in).
    pub export_offered: bool,
    /// The kernel offered FUSE_POSIX_LOCKS (enabled if the file system opts in).
    pub posix_locks_offered: bool,
    /// The kernel offered FUSE_FLOCK_LOCKS (enabled if the file system opts in to both kinds).
    pub flock_offered: bool,
}

#[doc(hidden)] // the transport's internals (ABI argument)
/// Negotiates INIT. Returns `Err(EPROTO)` for a kernel too old to speak with.
pub fn negotiate(arg: &FuseInitIn, p: &InitParams) -> Result<Negotiated, Errno> {
    if arg.major != KERNEL_VERSION || arg.minor < MIN_KERNEL_MINOR_VERSION {
        return Err(Errno(libc::EPROTO));
    }
    let mut offered = InitFlags::from_bits_retain(arg.flags as u64);
    if offered.contains(InitFlags::INIT_EXT) {
        offered |= InitFlags::from_bits_retain((arg.flags2 as u64) << 32);
    }
    let mut want = BASE_FLAGS.iter().fold(InitFlags::empty(), |acc, (f, _)| acc | *f);
    if p.writeback_cache {
        want |= InitFlags::WRITEBACK_CACHE;
    }
    if p.passthrough && !p.writeback_cache {
        want |= InitFlags::PASSTHROUGH;
    }
    if p.over_io_uring {
        want |= InitFlags::OVER_IO_URING;
    }
    if p.readdirplus_auto {
        // Without it every chunk of a listing is a READDIRPLUS: with it, only a directory's
        // first chunk and those after a lookup in it, then one LOOKUP per name (`find`).
        want |= InitFlags::READDIRPLUS_AUTO;
    }
    // Offered to the file system, which must opt in (it takes over clearing set-uid/set-gid).
    want |= InitFlags::HANDLE_KILLPRIV_V2;
    let acl = InitFlags::POSIX_ACL | InitFlags::DONT_MASK;
    let mut flags = offered & want;
    let killpriv_offered = flags.contains(InitFlags::HANDLE_KILLPRIV_V2);
    flags -= InitFlags::HANDLE_KILLPRIV_V2;
    // POSIX_ACL switches default_permissions on in the kernel: only offered where it is on.
    let acl_offered = p.default_permissions && offered.contains(acl);
    let export_offered = offered.contains(InitFlags::EXPORT_SUPPORT);
    let posix_locks_offered = offered.contains(InitFlags::POSIX_LOCKS);
    let flock_offered = offered.contains(InitFlags::FLOCK_LOCKS);
    let max_write = p.max_write.clamp(4096, 16 << 20) & !4095;
    let max_pages = max_write.div_ceil(4096).clamp(1, u16::MAX as u32) as u16;
    let bits = flags.bits();
    let out = FuseInitOut {
        major: KERNEL_VERSION,
        minor: KERNEL_MINOR_VERSION,
        max_readahead: arg.max_readahead.min(p.max_readahead),
        flags: bits as u32,
        max_background: p.max_background,
        congestion_threshold: p.congestion_threshold,
        max_write,
        time_gran: 1,
        max_pages,
        map_alignment: 0,
        flags2: (bits >> 32) as u32,
        max_stack_depth: if flags.contains(InitFlags::PASSTHROUGH) { 1 } else { 0 },
        request_timeout: 0,
        unused: [0; 11],
    };
    let conn = ConnInfo {
        proto_minor: arg.minor,
        passthrough: flags.contains(InitFlags::PASSTHROUGH),
        readdirplus: flags.contains(InitFlags::DO_READDIRPLUS),
        writeback_cache: flags.contains(InitFlags::WRITEBACK_CACHE),
        // Opt-in: the file system sets it in `init` if it honours the kill flags.
        handle_killpriv_v2: false,
        posix_acl: false,
        export_support: false,
        posix_locks: false,
        flock_locks: false,
        default_permissions: p.default_permissions,
        no_opendir_support: offered.contains(InitFlags::NO_OPENDIR_SUPPORT),
        max_write,
        max_read: max_pages as u32 * 4096,
    };
    Ok(Negotiated {
        out,
        flags,
        conn,
        killpriv_offered,
        acl_offered,
        export_offered,
        posix_locks_offered,
        flock_offered,
    })
}

#[doc(hidden)] // the transport's internals
/// Applies what the file system switched off in [`ConnInfo`] to the reply.
pub fn apply_conn(n: &mut Negotiated) {
    let mut drop = InitFlags::empty();
    if !n.conn.passthrough {
        drop |= InitFlags::PASSTHROUGH;
        n.out.max_stack_depth = 0;
    }
    if !n.conn.readdirplus {
        drop |= InitFlags::DO_READDIRPLUS | InitFlags::READDIRPLUS_AUTO;
    }
    if !n.conn.writeback_cache {
        drop |= InitFlags::WRITEBACK_CACHE;
    }
    n.flags -= drop;
    if n.conn.handle_killpriv_v2 && n.killpriv_offered {
        n.flags |= InitFlags::HANDLE_KILLPRIV_V2;
    } else {
        n.conn.handle_killpriv_v2 = false;
    }
    if n.conn.posix_acl && n.acl_offered {
        n.flags |= InitFlags::POSIX_ACL | InitFlags::DONT_MASK;
    } else {
        n.conn.posix_acl = false;
    }
    if n.conn.export_support && n.export_offered {
        n.flags -= InitFlags::NO_EXPORT_SUPPORT;
        n.flags |= InitFlags::EXPORT_SUPPORT;
    } else {
        n.conn.export_support = false;
    }
    if n.conn.posix_locks && n.posix_locks_offered {
        n.flags |= InitFlags::POSIX_LOCKS;
    } else {
        n.conn.posix_locks = false;
    }
    // flock locks through the server only with POSIX locks there too (one lock table).
    if n.conn.flock_locks && n.conn.posix_locks && n.flock_offered {
        n.flags |= InitFlags::FLOCK_LOCKS;
    } else {
        n.conn.flock_locks = false;
    }
    let bits = n.flags.bits();
    n.out.flags = bits as u32;
    n.out.flags2 = (bits >> 32) as u32;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> InitParams {
        InitParams {
            max_write: 1 << 20,
            max_readahead: 1 << 20,
            max_background: 64,
            congestion_threshold: 48,
            writeback_cache: false,
            passthrough: true,
            over_io_uring: false,
            default_permissions: true,
            readdirplus_auto: false,
        }
    }

    #[test]
    fn negotiates_intersection() {
        let all = InitFlags::all().bits();
        let arg = FuseInitIn {
            major: 7,
            minor: 45,
            max_readahead: 131072,
            flags: all as u32,
            flags2: (all >> 32) as u32,
            unused: [0; 11],
        };
        let n = negotiate(&arg, &params()).unwrap();
        assert!(n.flags.contains(InitFlags::PASSTHROUGH));
        assert!(!n.flags.contains(InitFlags::POSIX_LOCKS));
        assert_eq!(n.out.max_stack_depth, 1);
        assert_eq!(n.out.max_pages, 256);
        assert_eq!(n.out.max_readahead, 131072);
        assert!(n.flags.contains(InitFlags::DO_READDIRPLUS) && !n.flags.contains(InitFlags::READDIRPLUS_AUTO));
        let mut p = params();
        p.readdirplus_auto = true;
        assert!(negotiate(&arg, &p).unwrap().flags.contains(InitFlags::READDIRPLUS_AUTO));
        let mut p = params();
        p.writeback_cache = true;
        let n = negotiate(&arg, &p).unwrap();
        assert!(!n.flags.contains(InitFlags::PASSTHROUGH));
    }

    #[test]
    fn posix_acl_is_an_opt_in_with_default_permissions() {
        let all = InitFlags::all().bits();
        let arg =
            FuseInitIn { major: 7, minor: 45, flags: all as u32, flags2: (all >> 32) as u32, ..Default::default() };
        let acl = InitFlags::POSIX_ACL | InitFlags::DONT_MASK;
        // Not asked for: neither flag goes out.
        let mut n = negotiate(&arg, &params()).unwrap();
        apply_conn(&mut n);
        assert!(!n.flags.intersects(acl) && !n.conn.posix_acl);
        // Asked for: both.
        let mut n = negotiate(&arg, &params()).unwrap();
        n.conn.posix_acl = true;
        apply_conn(&mut n);
        assert!(n.flags.contains(acl) && n.conn.posix_acl);
        assert_ne!(n.out.flags & InitFlags::POSIX_ACL.bits() as u32, 0);
        // Without default_permissions the kernel would switch it on: refused.
        let mut p = params();
        p.default_permissions = false;
        let mut n = negotiate(&arg, &p).unwrap();
        n.conn.posix_acl = true;
        apply_conn(&mut n);
        assert!(!n.flags.intersects(acl) && !n.conn.posix_acl);
    }

    #[test]
    fn export_support_is_an_opt_in() {
        let all = InitFlags::all().bits();
        let arg =
            FuseInitIn { major: 7, minor: 45, flags: all as u32, flags2: (all >> 32) as u32, ..Default::default() };
        let mut n = negotiate(&arg, &params()).unwrap();
        apply_conn(&mut n);
        assert!(n.flags.contains(InitFlags::NO_EXPORT_SUPPORT) && !n.flags.contains(InitFlags::EXPORT_SUPPORT));
        let mut n = negotiate(&arg, &params()).unwrap();
        n.conn.export_support = true;
        apply_conn(&mut n);
        assert!(n.flags.contains(InitFlags::EXPORT_SUPPORT) && !n.flags.contains(InitFlags::NO_EXPORT_SUPPORT));
        assert!(n.conn.export_support);
        // Not offered by the kernel: stays off.
        let offered = all & !InitFlags::EXPORT_SUPPORT.bits();
        let arg = FuseInitIn { flags: offered as u32, flags2: (offered >> 32) as u32, ..arg };
        let mut n = negotiate(&arg, &params()).unwrap();
        n.conn.export_support = true;
        apply_conn(&mut n);
        assert!(!n.flags.contains(InitFlags::EXPORT_SUPPORT) && !n.conn.export_support);
    }

    #[test]
    fn locks_are_opt_ins() {
        let all = InitFlags::all().bits();
        let arg =
            FuseInitIn { major: 7, minor: 45, flags: all as u32, flags2: (all >> 32) as u32, ..Default::default() };
        let locks = InitFlags::POSIX_LOCKS | InitFlags::FLOCK_LOCKS;
        // Not asked for (the passthrough server): the kernel keeps locks locally.
        let mut n = negotiate(&arg, &params()).unwrap();
        apply_conn(&mut n);
        assert!(!n.flags.intersects(locks) && !n.conn.posix_locks && !n.conn.flock_locks);
        // flock alone is refused: one lock table in the server or none.
        let mut n = negotiate(&arg, &params()).unwrap();
        n.conn.flock_locks = true;
        apply_conn(&mut n);
        assert!(!n.flags.intersects(locks) && !n.conn.flock_locks);
        // Both asked for: both go out.
        let mut n = negotiate(&arg, &params()).unwrap();
        n.conn.posix_locks = true;
        n.conn.flock_locks = true;
        apply_conn(&mut n);
        assert!(n.flags.contains(locks) && n.conn.posix_locks && n.conn.flock_locks);
        assert_ne!(n.out.flags & InitFlags::POSIX_LOCKS.bits() as u32, 0);
        // Not offered by the kernel: stays off.
        let offered = all & !locks.bits();
        let arg = FuseInitIn { flags: offered as u32, flags2: (offered >> 32) as u32, ..arg };
        let mut n = negotiate(&arg, &params()).unwrap();
        n.conn.posix_locks = true;
        apply_conn(&mut n);
        assert!(!n.flags.intersects(locks) && !n.conn.posix_locks);
    }

    #[test]
    fn old_kernel_refused() {
        let arg = FuseInitIn { major: 7, minor: 20, ..Default::default() };
        assert_eq!(negotiate(&arg, &params()).unwrap_err(), Errno(libc::EPROTO));
    }
}
