// SPDX-License-Identifier: GPL-2.0
/*
 * ringfs offload accounting: what the kernel answered by itself and what fell back to the
 * server, for ONE FUSE mount (selected by its device number, set by the loader), by cause.
 *
 * - tp_btf/fuse_request_send, tp_btf/fuse_request_end: requests that reached the server
 *   (fallbacks), per opcode, with the kernel-side round trip (send -> end) as a histogram, and
 *   per cause: the class of the call the sending task was executing on this mount (see
 *   `cause`), or `background` when no user call is behind the request. raw_tp/ twins of both
 *   (fuse_send_raw, fuse_end_raw) for kernels where tp_btf cannot attach (FUSE as a module).
 * - tp_btf/sys_enter + tp_btf/sys_exit ("demand tracing", optional): system calls on the mount.
 *   At entry a call is matched to the mount (fd calls through current->files, path calls by
 *   the path: absolute paths by prefix against the mount point, relative ones by the directory
 *   fd or the cwd), classified, and stashed in task-local storage; requests the task sends
 *   meanwhile are charged to that class; at exit the call is counted (demand, failed or not),
 *   with whether it caused a request, and its bytes.
 * - tp_btf/page_fault_user (with demand tracing): user page faults on a mapping of the mount's
 *   files (directly, or through the backing file of a passthrough mapping) are `mmap` calls.
 * - tp_btf/io_uring_complete (with demand tracing): io_uring reads and writes of the mount's
 *   files are `io_uring` calls; requests sent by io_uring's worker threads are charged to them.
 */
#include "ringfs_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "ringfs.h"
#include "ringfs_syscalls.h"

char LICENSE[] SEC("license") = "GPL";

/* Set by the loader before loading. */
const volatile __u32 target_kdev = 0;     /* sb->s_dev / fuse connection (kernel encoding) */
const volatile __u32 server_tgid = 0;     /* the ringfs server process */
const volatile __u32 demand_tracing = 0;  /* the syscall/fault/io_uring programs are attached */
const volatile char mountpoint[RINGFS_PATH_MAX] = {};
const volatile __u32 mountpoint_len = 0;

#define PF_IO_WORKER 0x00000010
#define PF_KTHREAD 0x00200000
#define FMODE_BACKING (1U << 24)

/* FUSE opcodes. */
#define FUSE_FORGET 2
#define FUSE_READ 15
#define FUSE_WRITE 16
#define FUSE_RELEASE 18
#define FUSE_INIT 26
#define FUSE_RELEASEDIR 29
#define FUSE_INTERRUPT 36
#define FUSE_DESTROY 38
#define FUSE_NOTIFY_REPLY 41
#define FUSE_BATCH_FORGET 42

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RINGFS_OPCODES);
	__type(key, __u32);
	__type(value, struct ringfs_op);
} fallbacks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RINGFS_CLASSES);
	__type(key, __u32);
	__type(value, struct ringfs_class_stats);
} classes SEC(".maps");

struct pending {
	__u64 ts;
	__u32 opcode;
	__u32 class;
};

/* Requests sent and not yet ended, by unique (LRU: a missed end cannot leak entries). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct pending);
} inflight SEC(".maps");

/* io_uring requests (struct io_kiocb *) that made an io_uring worker send a FUSE request,
 * until their completion counts them. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} uring_fell SEC(".maps");

/* io: which side of a data call is on the mount. */
#define IO_IN 1          /* the file read from */
#define IO_IN_PT 2       /* ... passes through */
#define IO_OUT 4         /* the file written to */
#define IO_OUT_PT 8      /* ... passes through */

struct call {
	__u32 live;       /* 1 while a call on the mount is stashed */
	__u32 class;
	__u32 fell_back;  /* the stashed call caused a request */
	__u32 io;
	/* The call's path could not be read at entry (its page not yet faulted in): it is
	 * stashed anyway; a request it sends proves it is on the mount, else sys_exit checks
	 * the path again (the kernel has read it by then). */
	__u32 unverified;
	__u32 pad;
	long nr;
	unsigned long args[4];
	/* The last user page fault on a mapping of the mount: requests sent while the task is
	 * still in it (same user ip and error code in its pt_regs) are charged to mmap. */
	__u64 fault_ip;
	__u64 fault_err;
	__u32 fault_live;
	__u32 fault_fell;
	__u32 fault_counted;
	__u32 pad2;
	/* The io_uring request this task submitted last: requests sent while io_uring_enter
	 * issues it inline are charged to it. */
	__u64 uring_req;
};

/* The stash, in the calling thread's local storage: a get is a few loads (no hashing, no lock),
 * which keeps sys_exit cheap for every other call on the machine. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct call);
} calls SEC(".maps");

struct path_buf {
	char path[RINGFS_PATH_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct path_buf);
} scratch SEC(".maps");

static __always_inline struct ringfs_class_stats *class_slot(__u32 class)
{
	if (class >= RINGFS_CLASSES)
		class = RINGFS_UNCLASSIFIED;
	return bpf_map_lookup_elem(&classes, &class);
}


#define AT_FDCWD -100
#define O_CREAT 0100
#define O_TMPFILE_BIT 020000000

/* The calls the programs classify (everything else costs sys_enter/sys_exit one switch). */
static __always_inline int interesting(long nr)
{
	switch (nr) {
	case NR_read: case NR_write: case NR_open: case NR_close: case NR_stat: case NR_fstat:
	case NR_lstat: case NR_lseek: case NR_ioctl: case NR_pread64: case NR_pwrite64:
	case NR_readv: case NR_writev: case NR_access: case NR_sendfile: case NR_fcntl:
	case NR_flock: case NR_fsync: case NR_fdatasync: case NR_truncate: case NR_ftruncate:
	case NR_getdents: case NR_chdir: case NR_fchdir: case NR_rename: case NR_mkdir:
	case NR_rmdir: case NR_creat: case NR_link: case NR_unlink: case NR_symlink:
	case NR_readlink: case NR_chmod: case NR_fchmod: case NR_chown: case NR_fchown:
	case NR_lchown: case NR_utime: case NR_mknod: case NR_statfs: case NR_fstatfs:
	case NR_setxattr: case NR_lsetxattr: case NR_fsetxattr: case NR_getxattr:
	case NR_lgetxattr: case NR_fgetxattr: case NR_listxattr: case NR_llistxattr:
	case NR_flistxattr: case NR_removexattr: case NR_lremovexattr: case NR_fremovexattr:
	case NR_getdents64: case NR_utimes: case NR_openat: case NR_mkdirat: case NR_mknodat:
	case NR_fchownat: case NR_futimesat: case NR_newfstatat: case NR_unlinkat:
	case NR_renameat: case NR_linkat: case NR_symlinkat: case NR_readlinkat:
	case NR_fchmodat: case NR_faccessat: case NR_splice: case NR_sync_file_range:
	case NR_utimensat: case NR_fallocate: case NR_preadv: case NR_pwritev:
	case NR_renameat2: case NR_copy_file_range: case NR_preadv2: case NR_pwritev2:
	case NR_statx: case NR_openat2: case NR_faccessat2: case NR_fchmodat2:
	case NR_setxattrat: case NR_getxattrat: case NR_listxattrat: case NR_removexattrat:
		return 1;
	}
	return 0;
}

/* The file behind fd of the current task if it lives on the target mount, else NULL. */
static __always_inline struct file *file_on_mount(long fd)
{
	if (fd < 0)
		return NULL;
	/* BTF-typed loads (no helper calls) down to the fd array. */
	struct task_struct *task = bpf_get_current_task_btf();
	struct files_struct *files = task->files;
	if (!files)
		return NULL;
	struct fdtable *fdt = files->fdt;
	if (!fdt)
		return NULL;
	unsigned int max = fdt->max_fds;
	if ((unsigned long)fd >= max)
		return NULL;
	struct file **arr = fdt->fd;
	struct file *f = NULL;
	bpf_core_read(&f, sizeof(f), &arr[fd]);
	if (!f)
		return NULL;
	dev_t dev = BPF_CORE_READ(f, f_inode, i_sb, s_dev);
	return dev == target_kdev ? f : NULL;
}

static __noinline int fd_on_mount(long fd)
{
	return file_on_mount(fd) != NULL;
}

/* A FUSE file whose I/O the kernel passes through to a backing file. */
static __always_inline int is_passthrough(struct file *f)
{
	/* Kernels before 6.9 (or whose fuse BTF the loader cannot see) have no passthrough. */
	if (!bpf_core_field_exists(struct fuse_file, passthrough))
		return 0;
	struct fuse_file *ff = BPF_CORE_READ(f, private_data);
	if (!ff)
		return 0;
	return BPF_CORE_READ(ff, passthrough) != NULL;
}

/* Is the current task's working directory on the target mount? */
static __always_inline int cwd_on_mount(void)
{
	struct task_struct *task = bpf_get_current_task_btf();
	dev_t dev = BPF_CORE_READ(task, fs, pwd.dentry, d_sb, s_dev);
	return dev == target_kdev;
}

/* "/proc/self/fd/N" or "/dev/fd/N" (glibc reaches a file by its fd that way, e.g. fchmodat
 * with AT_SYMLINK_NOFOLLOW on an O_PATH fd, as tar does for every directory): N, else -1. */
static __always_inline long proc_fd(const char *p)
{
	int at;
	if (p[1] == 'p' && p[2] == 'r' && p[3] == 'o' && p[4] == 'c' && p[5] == '/' && p[6] == 's' &&
	    p[7] == 'e' && p[8] == 'l' && p[9] == 'f' && p[10] == '/' && p[11] == 'f' && p[12] == 'd' &&
	    p[13] == '/')
		at = 14;
	else if (p[1] == 'd' && p[2] == 'e' && p[3] == 'v' && p[4] == '/' && p[5] == 'f' && p[6] == 'd' &&
		 p[7] == '/')
		at = 8;
	else
		return -1;
	long fd = 0;
	int digits = 0;
	for (int i = 0; i < 8; i++) {
		char ch = p[(at + i) & (RINGFS_PATH_MAX - 1)];
		if (ch < '0' || ch > '9')
			break;
		fd = fd * 10 + (ch - '0');
		digits++;
	}
	return digits ? fd : -1;
}

/* Attributes a path argument: absolute paths by prefix, relative ones (and the empty path of
 * AT_EMPTY_PATH, and a NULL path as utimensat takes it) by dirfd or cwd. 1: on the mount,
 * 0: not, -1: unreadable (a user page not faulted in yet; tracepoints cannot fault). */
static __noinline int path_on_mount(long dirfd, const char *upath)
{
	__u32 zero = 0;
	struct path_buf *pb = bpf_map_lookup_elem(&scratch, &zero);
	if (!pb)
		return 0;
	long n = upath ? bpf_probe_read_user_str(pb->path, sizeof(pb->path), upath) : 1;
	if (n < 0)
		return -1;
	if (n == 0)
		return 0;
	if (!upath || pb->path[0] != '/') {
		if ((int)dirfd == AT_FDCWD)
			return cwd_on_mount();
		return file_on_mount(dirfd) != NULL;
	}
	long fd = proc_fd(pb->path);
	if (fd >= 0)
		return file_on_mount(fd) != NULL;
	__u32 len = mountpoint_len;
	if (len == 0 || len >= RINGFS_PATH_MAX || (long)len >= n)
		return 0;
	for (int i = 0; i < RINGFS_PATH_MAX; i++) {
		if (i >= len)
			break;
		if (pb->path[i] != mountpoint[i])
			return 0;
	}
	char next = pb->path[len & (RINGFS_PATH_MAX - 1)];
	return next == '/' || next == 0;
}

/* A data call's side: IO_IN/IO_OUT (and the passthrough bit) when fd is on the mount. */
static __always_inline __u32 side(long fd, __u32 on, __u32 pt)
{
	struct file *f = file_on_mount(fd);
	if (!f)
		return 0;
	return is_passthrough(f) ? (on | pt) : on;
}

static __always_inline int open_class(__u64 flags)
{
	return (flags & (O_CREAT | O_TMPFILE_BIT)) ? RINGFS_CREATE : RINGFS_OPEN;
}

/* The class of a call if it concerns the mount, else -1; *io gets the data sides. Decided at
 * entry so the common case (any other file system) costs a switch and at most one fd-table
 * walk or path prefix check, and no map update. */
static __always_inline int maybe(int r, __u32 *unverified)
{
	if (r < 0) {
		*unverified = 1;
		return 1;
	}
	return r;
}

#define path_on_mount(d, p) maybe(path_on_mount((d), (p)), unverified)

static __noinline int classify(long nr, unsigned long *a, __u32 *io, __u32 *unverified)
{
	const char *p0 = (const char *)a[0];
	const char *p1 = (const char *)a[1];
	switch (nr) {
	case NR_read: case NR_pread64: case NR_readv: case NR_preadv: case NR_preadv2:
		*io = side(a[0], IO_IN, IO_IN_PT);
		return *io ? RINGFS_READ : -1;
	case NR_write: case NR_pwrite64: case NR_writev: case NR_pwritev: case NR_pwritev2:
		*io = side(a[0], IO_OUT, IO_OUT_PT);
		return *io ? RINGFS_WRITE : -1;
	case NR_sendfile: /* (out_fd, in_fd, ...) */
		*io = side(a[1], IO_IN, IO_IN_PT) | side(a[0], IO_OUT, IO_OUT_PT);
		return *io ? RINGFS_SPLICE : -1;
	case NR_splice: case NR_copy_file_range: /* (fd_in, off_in, fd_out, ...) */
		*io = side(a[0], IO_IN, IO_IN_PT) | side(a[2], IO_OUT, IO_OUT_PT);
		return *io ? RINGFS_SPLICE : -1;
	case NR_fstat:
		return fd_on_mount(a[0]) ? RINGFS_STAT : -1;
	case NR_fgetxattr: case NR_fsetxattr: case NR_flistxattr: case NR_fremovexattr:
		return fd_on_mount(a[0]) ? RINGFS_XATTR : -1;
	case NR_getdents: case NR_getdents64:
		return fd_on_mount(a[0]) ? RINGFS_READDIR : -1;
	case NR_fchmod: case NR_fchown: case NR_ftruncate:
		return fd_on_mount(a[0]) ? RINGFS_SETATTR : -1;
	case NR_fsync: case NR_fdatasync: case NR_sync_file_range:
		return fd_on_mount(a[0]) ? RINGFS_FSYNC : -1;
	case NR_close:
		return fd_on_mount(a[0]) ? RINGFS_CLOSE : -1;
	case NR_fstatfs: case NR_fallocate: case NR_lseek: case NR_flock: case NR_fcntl:
	case NR_ioctl: case NR_fchdir:
		return fd_on_mount(a[0]) ? RINGFS_OTHER : -1;
	case NR_stat: case NR_lstat:
		return path_on_mount(AT_FDCWD, p0) ? RINGFS_STAT : -1;
	case NR_open:
		return path_on_mount(AT_FDCWD, p0) ? open_class(a[1]) : -1;
	case NR_creat: case NR_mknod:
		return path_on_mount(AT_FDCWD, p0) ? RINGFS_CREATE : -1;
	case NR_mkdir:
		return path_on_mount(AT_FDCWD, p0) ? RINGFS_MKDIR : -1;
	case NR_unlink: case NR_rmdir:
		return path_on_mount(AT_FDCWD, p0) ? RINGFS_UNLINK : -1;
	case NR_readlink:
		return path_on_mount(AT_FDCWD, p0) ? RINGFS_READLINK : -1;
	case NR_getxattr: case NR_lgetxattr: case NR_setxattr: case NR_lsetxattr:
	case NR_listxattr: case NR_llistxattr: case NR_removexattr: case NR_lremovexattr:
		return path_on_mount(AT_FDCWD, p0) ? RINGFS_XATTR : -1;
	case NR_access:
		return path_on_mount(AT_FDCWD, p0) ? RINGFS_ACCESS : -1;
	case NR_chmod: case NR_chown: case NR_lchown: case NR_truncate: case NR_utime:
	case NR_utimes:
		return path_on_mount(AT_FDCWD, p0) ? RINGFS_SETATTR : -1;
	case NR_statfs: case NR_chdir:
		return path_on_mount(AT_FDCWD, p0) ? RINGFS_OTHER : -1;
	case NR_newfstatat: case NR_statx:
		return path_on_mount(a[0], p1) ? RINGFS_STAT : -1;
	case NR_openat:
		return path_on_mount(a[0], p1) ? open_class(a[2]) : -1;
	case NR_openat2: {
		if (!path_on_mount(a[0], p1))
			return -1;
		__u64 flags = 0; /* struct open_how starts with the flags */
		bpf_probe_read_user(&flags, sizeof(flags), (void *)a[2]);
		return open_class(flags);
	}
	case NR_mknodat:
		return path_on_mount(a[0], p1) ? RINGFS_CREATE : -1;
	case NR_mkdirat:
		return path_on_mount(a[0], p1) ? RINGFS_MKDIR : -1;
	case NR_unlinkat:
		return path_on_mount(a[0], p1) ? RINGFS_UNLINK : -1;
	case NR_readlinkat:
		return path_on_mount(a[0], p1) ? RINGFS_READLINK : -1;
	case NR_faccessat: case NR_faccessat2:
		return path_on_mount(a[0], p1) ? RINGFS_ACCESS : -1;
	case NR_fchmodat: case NR_fchmodat2: case NR_fchownat: case NR_futimesat:
	case NR_utimensat:
		return path_on_mount(a[0], p1) ? RINGFS_SETATTR : -1;
	case NR_setxattrat: case NR_getxattrat: case NR_listxattrat: case NR_removexattrat:
		return path_on_mount(a[0], p1) ? RINGFS_XATTR : -1;
	/* Two names: the call reached the mount when either does. */
	case NR_rename:
		return path_on_mount(AT_FDCWD, p0) || path_on_mount(AT_FDCWD, p1) ? RINGFS_RENAME : -1;
	case NR_renameat: case NR_renameat2:
		return path_on_mount(a[0], p1) || path_on_mount(a[2], (const char *)a[3]) ? RINGFS_RENAME
											: -1;
	case NR_link:
		return path_on_mount(AT_FDCWD, p0) || path_on_mount(AT_FDCWD, p1) ? RINGFS_LINK : -1;
	case NR_linkat:
		return path_on_mount(a[0], p1) || path_on_mount(a[2], (const char *)a[3]) ? RINGFS_LINK
											: -1;
	case NR_symlink: /* (target, linkpath): only the new name is resolved */
		return path_on_mount(AT_FDCWD, p1) ? RINGFS_LINK : -1;
	case NR_symlinkat: /* (target, newdirfd, linkpath) */
		return path_on_mount(a[1], (const char *)a[2]) ? RINGFS_LINK : -1;
	}
	return -1;
}

#undef path_on_mount

SEC("tp_btf/sys_enter")
int BPF_PROG(sys_enter, struct pt_regs *regs, long id)
{
	if (!interesting(id))
		return 0;
	unsigned long args[4];
	args[0] = PT_REGS_PARM1_SYSCALL(regs);
	args[1] = PT_REGS_PARM2_SYSCALL(regs);
	args[2] = PT_REGS_PARM3_SYSCALL(regs);
	args[3] = PT_REGS_PARM4_SYSCALL(regs);
	__u32 io = 0, unverified = 0;
	int class = classify(id, args, &io, &unverified);
	if (class < 0)
		return 0;
	struct call *c = bpf_task_storage_get(&calls, bpf_get_current_task_btf(), 0,
					      BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!c)
		return 0;
	c->class = class;
	c->io = io;
	c->fell_back = 0;
	c->unverified = unverified;
	if (unverified) {
		c->nr = id;
		for (int i = 0; i < 4; i++)
			c->args[i] = args[i];
	}
	c->live = 1;
	return 0;
}

static __always_inline void add_bytes(struct ringfs_class_stats *s, int dir, long n, int pt)
{
	if (n <= 0)
		return;
	s->bytes[dir & 1][RINGFS_PATH_MOUNT] += n;
	if (pt)
		s->bytes[dir & 1][RINGFS_PATH_PASSTHROUGH] += n;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(sys_exit, struct pt_regs *regs, long ret)
{
	/* Only calls that sys_enter may have stashed: skip the map for everything else. */
	if (!interesting(RINGFS_REGS_NR(regs)))
		return 0;
	struct call *cp = bpf_task_storage_get(&calls, bpf_get_current_task_btf(), 0, 0);
	if (!cp || !cp->live)
		return 0;
	__u32 class = cp->class, io = cp->io, fell = cp->fell_back;
	cp->live = 0;
	cp->fell_back = 0;
	if (cp->unverified && !fell) {
		/* The path was unreadable at entry and no request proved the call ours: the
		 * kernel has copied the path in by now, so look again. */
		unsigned long args[4];
		for (int i = 0; i < 4; i++)
			args[i] = cp->args[i];
		__u32 io2 = 0, unverified = 0;
		if (classify(cp->nr, args, &io2, &unverified) < 0 || unverified)
			return 0;
	}
	struct ringfs_class_stats *s = class_slot(class);
	if (!s)
		return 0;
	s->calls++;
	if (fell)
		s->calls_with_fallback++;
	/* Bytes: a call moves ret bytes out of its input and into its output. */
	if (io & IO_IN)
		add_bytes(s, RINGFS_DIR_READ, ret, io & IO_IN_PT);
	if (io & IO_OUT)
		add_bytes(s, RINGFS_DIR_WRITE, ret, io & IO_OUT_PT);
	return 0;
}

/* ---- page faults ----
 *
 * A fault on a mapping of the mount's files reaches filemap_map_pages (fault-around) and/or
 * filemap_fault with the file's mapping: both tracepoints count the fault once (the task's
 * pt_regs, user ip and error code, identify it; page_fault_user opens a new one). A
 * passthrough mapping maps the backing file instead, so those faults are found from the
 * faulting address's vma (bpf_find_vma), for threads that made a call on the mount (the
 * open of the mapped file does); the lookup gives up when the mm's lock is contended. */

static __always_inline void count_fault(struct call *c, __u64 ip, __u64 err)
{
	c->fault_ip = ip;
	c->fault_err = err;
	c->fault_fell = 0;
	c->fault_counted = 1;
	c->fault_live = 1;
	struct ringfs_class_stats *s = class_slot(RINGFS_MMAP);
	if (s)
		s->calls++;
}

struct fault_ctx {
	int backing;
};

static long fault_vma(struct task_struct *task, struct vm_area_struct *vma, void *data)
{
	struct fault_ctx *fc = data;
	if (!bpf_core_type_exists(struct backing_file))
		return 0; /* before 6.8: no backing files, no passthrough mappings */
	struct file *f = vma->vm_file;
	/* A passthrough mapping: the vma maps the backing file, whose user path is ours. */
	if (f && (BPF_CORE_READ(f, f_mode) & FMODE_BACKING)) {
		struct backing_file *bf = container_of(f, struct backing_file, file);
		if (BPF_CORE_READ(bf, user_path.dentry, d_sb, s_dev) == target_kdev)
			fc->backing = 1;
	}
	return 0;
}

SEC("tp_btf/page_fault_user")
int BPF_PROG(page_fault_user, unsigned long address, struct pt_regs *regs, unsigned long error_code)
{
	struct task_struct *task = bpf_get_current_task_btf();
	/* Only threads that made a call on the mount (opening the file they map creates their
	 * storage) go further: every other fault on the machine costs one lookup. */
	struct call *c = bpf_task_storage_get(&calls, task, 0, 0);
	if (!c)
		return 0;
	/* A new fault: the filemap tracepoints count it if it is on the mount. */
	c->fault_ip = PT_REGS_IP(regs);
	c->fault_err = RINGFS_REGS_NR(regs);
	c->fault_counted = 0;
	c->fault_fell = 0;
	c->fault_live = 1;
	struct fault_ctx fc = {};
	if (!task->mm || bpf_find_vma(task, address, fault_vma, &fc, 0) || !fc.backing)
		return 0;
	count_fault(c, PT_REGS_IP(regs), RINGFS_REGS_NR(regs));
	return 0;
}

static __always_inline void file_fault(struct address_space *mapping)
{
	if (BPF_CORE_READ(mapping, host, i_sb, s_dev) != target_kdev)
		return;
	struct task_struct *task = bpf_get_current_task_btf();
	if (task->flags & PF_KTHREAD)
		return;
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	if (!regs)
		return;
	__u64 ip = PT_REGS_IP_CORE(regs), err = RINGFS_REGS_NR_CORE(regs);
	struct call *c = bpf_task_storage_get(&calls, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!c)
		return;
	if (c->fault_live && c->fault_counted && c->fault_ip == ip && c->fault_err == err)
		return; /* the same fault, seen by the other tracepoint */
	count_fault(c, ip, err);
}

SEC("tp_btf/mm_filemap_map_pages")
int BPF_PROG(filemap_map_pages, struct address_space *mapping, unsigned long start, unsigned long end)
{
	file_fault(mapping);
	return 0;
}

SEC("tp_btf/mm_filemap_fault")
int BPF_PROG(filemap_fault, struct address_space *mapping, unsigned long index)
{
	file_fault(mapping);
	return 0;
}

/* ---- io_uring ---- */

SEC("tp_btf/io_uring_submit_req")
int BPF_PROG(uring_submit, struct io_kiocb *req)
{
	/* The server's own rings (backing I/O, FUSE commands) never touch the mount. */
	if ((bpf_get_current_pid_tgid() >> 32) == server_tgid)
		return 0;
	struct task_struct *task = bpf_get_current_task_btf();
	struct call *c = bpf_task_storage_get(&calls, task, 0, 0);
	if (!c) {
		/* A thread that never made a call on the mount: only a request on one of the
		 * mount's files (by fd; the file is not assigned yet) is worth a stash. Requests on
		 * registered files of such threads are not marked. */
		__u32 flags = 0; /* io_req_flags_t is 64 bits since 6.10: the low word has bit 0 */
		bpf_core_read(&flags, sizeof(flags), &req->flags);
		if (flags & REQ_F_FIXED_FILE)
			return 0;
		if (!file_on_mount(req->cqe.fd))
			return 0;
		c = bpf_task_storage_get(&calls, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
		if (!c)
			return 0;
	}
	c->uring_req = (__u64)req;
	return 0;
}

static __always_inline void mark_uring(__u64 req)
{
	__u32 one = 1;
	if (req)
		bpf_map_update_elem(&uring_fell, &req, &one, BPF_ANY);
}

SEC("tp_btf/io_uring_complete")
int BPF_PROG(uring_complete, struct io_ring_ctx *ring, void *vreq, struct io_uring_cqe *cqe)
{
	struct io_kiocb *req = vreq;
	if (!req)
		return 0;
	__u8 op = BPF_CORE_READ(req, opcode);
	int dir;
	switch (op) {
	case IORING_OP_READV: case IORING_OP_READ_FIXED: case IORING_OP_READ:
	case IORING_OP_READ_MULTISHOT: case IORING_OP_READV_FIXED:
		dir = RINGFS_DIR_READ;
		break;
	case IORING_OP_WRITEV: case IORING_OP_WRITE_FIXED: case IORING_OP_WRITE:
	case IORING_OP_WRITEV_FIXED:
		dir = RINGFS_DIR_WRITE;
		break;
	default:
		return 0;
	}
	struct file *f = BPF_CORE_READ(req, file);
	if (!f || BPF_CORE_READ(f, f_inode, i_sb, s_dev) != target_kdev)
		return 0;
	struct ringfs_class_stats *s = class_slot(RINGFS_IO_URING);
	if (!s)
		return 0;
	s->calls++;
	__u64 key = (__u64)req;
	if (bpf_map_lookup_elem(&uring_fell, &key)) {
		s->calls_with_fallback++;
		bpf_map_delete_elem(&uring_fell, &key);
	}
	/* The result from the request itself: the tracepoint's own arguments after req differ
	 * between kernels (a cqe pointer since 6.3, its fields before). */
	add_bytes(s, dir, BPF_CORE_READ(req, cqe.res), is_passthrough(f));
	return 0;
}

/* ---- requests that reached the server ---- */

/* The cause of a request the current task is sending. */
static __always_inline __u32 cause(__u32 op)
{
	switch (op) {
	case FUSE_FORGET: case FUSE_BATCH_FORGET: case FUSE_RELEASE: case FUSE_RELEASEDIR:
	case FUSE_INTERRUPT: case FUSE_INIT: case FUSE_DESTROY: case FUSE_NOTIFY_REPLY:
		/* Sent on the kernel's schedule: at the last reference, not by a call. */
		return RINGFS_BACKGROUND;
	}
	struct task_struct *task = bpf_get_current_task_btf();
	unsigned int flags = task->flags;
	if (flags & PF_KTHREAD)
		return RINGFS_BACKGROUND; /* readahead/writeback workers, ... */
	if ((bpf_get_current_pid_tgid() >> 32) == server_tgid)
		return RINGFS_BACKGROUND; /* queued requests flushed as the server answers */
	if (flags & PF_IO_WORKER) {
		/* An io_uring worker (io-wq or SQPOLL): mark the io_uring request it runs, so its
		 * completion counts as a call with a fallback. */
		if (bpf_core_field_exists(struct task_struct, worker_private)) {
			struct io_worker *w = task->worker_private;
			struct io_wq_work *work = BPF_CORE_READ(w, cur_work);
			if (work)
				mark_uring((__u64)work - bpf_core_field_offset(struct io_kiocb, work));
		}
		return RINGFS_IO_URING;
	}
	if (!demand_tracing)
		return RINGFS_UNTRACED;
	struct call *c = bpf_task_storage_get(&calls, task, 0, 0);
	if (c && c->live) {
		c->fell_back = 1;
		return c->class;
	}
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	if (!regs)
		return RINGFS_UNCLASSIFIED;
	__u64 ip = PT_REGS_IP_CORE(regs);
	__u64 orig = RINGFS_REGS_NR_CORE(regs);
	if (c && c->fault_live && ip == c->fault_ip && orig == c->fault_err) {
		if (!c->fault_fell) {
			c->fault_fell = 1;
			struct ringfs_class_stats *s = class_slot(RINGFS_MMAP);
			if (s)
				s->calls_with_fallback++;
		}
		return RINGFS_MMAP;
	}
	if (orig == NR_io_uring_enter) {
		/* Issued inline by io_uring_enter (a non-blocking attempt starts readahead). */
		if (c)
			mark_uring(c->uring_req);
		return RINGFS_IO_URING;
	}
	return RINGFS_UNCLASSIFIED;
}

/* The fuse programs come twice: tp_btf (the default) and raw_tp, attached by tracepoint name,
 * where tp_btf cannot be (FUSE built as a module: its tracepoints' BTF ids are the module's,
 * which the loader cannot pass) or when the configuration asks for it. Both read the request
 * through BPF_CORE_READ (a probe read with CO-RE offsets), which a raw_tp's untyped argument
 * needs; the bodies are the same. */
static __always_inline int on_send(const struct fuse_req *req)
{
	if (BPF_CORE_READ(req, fm, fc, dev) != target_kdev)
		return 0;
	__u32 op = BPF_CORE_READ(req, in.h.opcode);
	if (op >= RINGFS_OPCODES)
		op = RINGFS_OPCODES - 1;
	struct ringfs_op *s = bpf_map_lookup_elem(&fallbacks, &op);
	if (s)
		s->count++;
	__u32 class = cause(op);
	struct ringfs_class_stats *cs = class_slot(class);
	if (cs) {
		cs->requests[op & (RINGFS_OPCODES - 1)]++;
		__u32 len = BPF_CORE_READ(req, in.h.len);
		/* WRITE carries its data after fuse_in_header (40) and fuse_write_in (40). */
		if (op == FUSE_WRITE && len > 80)
			cs->bytes[RINGFS_DIR_WRITE][RINGFS_PATH_SERVER] += len - 80;
	}
	struct pending p = { .ts = bpf_ktime_get_ns(), .opcode = op, .class = class };
	__u64 unique = BPF_CORE_READ(req, in.h.unique);
	bpf_map_update_elem(&inflight, &unique, &p, BPF_ANY);
	return 0;
}

static __always_inline int on_end(const struct fuse_req *req)
{
	if (BPF_CORE_READ(req, fm, fc, dev) != target_kdev)
		return 0;
	__u64 unique = BPF_CORE_READ(req, in.h.unique);
	struct pending *p = bpf_map_lookup_elem(&inflight, &unique);
	if (!p)
		return 0;
	__u64 ns = bpf_ktime_get_ns() - p->ts;
	__u32 op = p->opcode, class = p->class;
	bpf_map_delete_elem(&inflight, &unique);
	int error = BPF_CORE_READ(req, out.h.error);
	__u32 len = BPF_CORE_READ(req, out.h.len);
	/* READ replies carry their data after fuse_out_header (16). */
	if (op == FUSE_READ && error == 0 && len > 16) {
		struct ringfs_class_stats *cs = class_slot(class);
		if (cs)
			cs->bytes[RINGFS_DIR_READ][RINGFS_PATH_SERVER] += len - 16;
	}
	struct ringfs_op *s = bpf_map_lookup_elem(&fallbacks, &op);
	if (!s)
		return 0;
	if (error < 0)
		s->errors++;
	s->latency_sum_ns += ns;
	__u64 us = ns / 1000;
	__u32 b = 0;
	/* bucket b holds latencies < 2^b microseconds (b = 0: under 1 us). */
	for (int i = 0; i < RINGFS_BUCKETS - 1; i++) {
		if (us < (1ULL << i))
			break;
		b = i + 1;
	}
	if (b >= RINGFS_BUCKETS)
		b = RINGFS_BUCKETS - 1;
	s->buckets[b]++;
	return 0;
}

SEC("tp_btf/fuse_request_send")
int BPF_PROG(fuse_send, const struct fuse_req *req)
{
	return on_send(req);
}

SEC("tp_btf/fuse_request_end")
int BPF_PROG(fuse_end, const struct fuse_req *req)
{
	return on_end(req);
}

SEC("raw_tp/fuse_request_send")
int BPF_PROG(fuse_send_raw, const struct fuse_req *req)
{
	return on_send(req);
}

SEC("raw_tp/fuse_request_end")
int BPF_PROG(fuse_end_raw, const struct fuse_req *req)
{
	return on_end(req);
}
