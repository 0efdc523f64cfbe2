// SPDX-License-Identifier: GPL-2.0
/*
 * ringfs offload accounting: what the kernel answered by itself and what fell back to the
 * server, for ONE FUSE mount (selected by its device number, set by the loader).
 *
 * - fuse:fuse_request_send / fuse:fuse_request_end: requests that reached the server
 *   (fallbacks), per opcode, with the kernel-side round trip (send -> end) as a histogram.
 * - tp_btf/sys_enter + tp_btf/sys_exit (optional, "demand tracing"): system calls that landed
 *   on the mount, classified into the operations the kernel could answer from its caches.
 *   fd-based calls are attributed through current->files->fdt->fd[fd]->f_inode->i_sb->s_dev;
 *   stat-family calls by the device in the stat buffer after success; open-family calls by the
 *   returned fd; other path-based calls (readlink, getxattr, access) by the path: absolute
 *   paths by prefix against the mount point, relative ones by the directory fd (or cwd).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "ringfs.h"

char LICENSE[] SEC("license") = "GPL";

/* Set by the loader before loading. */
const volatile __u32 target_kdev = 0;     /* sb->s_dev / fuse connection (kernel encoding) */
const volatile __u64 target_udev = 0;     /* st_dev as stat(2) reports it (user encoding) */
const volatile __u32 target_major = 0;
const volatile __u32 target_minor = 0;
const volatile char mountpoint[RINGFS_PATH_MAX] = {};
const volatile __u32 mountpoint_len = 0;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RINGFS_OPCODES);
	__type(key, __u32);
	__type(value, struct ringfs_op);
} fallbacks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ringfs_demand);
} demand SEC(".maps");

struct pending {
	__u64 ts;
	__u32 opcode;
	__u32 pad;
};

/* Requests sent and not yet ended, by unique (LRU: a missed end cannot leak entries). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct pending);
} inflight SEC(".maps");

struct call {
	long live; /* 1 while a call on the mount is stashed, 0 otherwise */
	long nr;
	__u64 passthrough; /* read/write family: the file found at entry passes through */
	unsigned long args[5];
};

/* Syscall arguments stashed at entry, in the calling thread's local storage: a get is a few
 * loads (no hashing, no lock), which keeps sys_exit cheap for every other call on the machine. */
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

/* Tracepoint records (offsets from /sys/kernel/tracing/events/fuse/ * /format). */
struct send_args {
	__u64 common;
	__u32 connection;
	__u32 pad0;
	__u64 unique;
	__u32 opcode;
	__u32 len;
};

struct end_args {
	__u64 common;
	__u32 connection;
	__u32 pad0;
	__u64 unique;
	__u32 len;
	__s32 error;
};

SEC("tracepoint/fuse/fuse_request_send")
int fuse_send(struct send_args *ctx)
{
	if (ctx->connection != target_kdev)
		return 0;
	__u32 op = ctx->opcode;
	if (op >= RINGFS_OPCODES)
		op = RINGFS_OPCODES - 1;
	struct ringfs_op *s = bpf_map_lookup_elem(&fallbacks, &op);
	if (s)
		s->count++;
	struct pending p = { .ts = bpf_ktime_get_ns(), .opcode = op };
	__u64 unique = ctx->unique;
	bpf_map_update_elem(&inflight, &unique, &p, BPF_ANY);
	return 0;
}

SEC("tracepoint/fuse/fuse_request_end")
int fuse_end(struct end_args *ctx)
{
	if (ctx->connection != target_kdev)
		return 0;
	__u64 unique = ctx->unique;
	struct pending *p = bpf_map_lookup_elem(&inflight, &unique);
	if (!p)
		return 0;
	__u64 ns = bpf_ktime_get_ns() - p->ts;
	__u32 op = p->opcode;
	bpf_map_delete_elem(&inflight, &unique);
	struct ringfs_op *s = bpf_map_lookup_elem(&fallbacks, &op);
	if (!s)
		return 0;
	if (ctx->error < 0)
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

static __always_inline struct ringfs_demand *demand_slot(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&demand, &zero);
}

static __always_inline void count(int class)
{
	struct ringfs_demand *d = demand_slot();
	if (d && class >= 0 && class < RINGFS_CLASSES)
		d->calls[class]++;
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

static __always_inline int fd_on_mount(long fd)
{
	return file_on_mount(fd) != NULL;
}

/* A FUSE file whose I/O the kernel passes through to a backing file. */
static __always_inline int is_passthrough(struct file *f)
{
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

/* Attributes a path-based call: absolute paths by prefix, relative ones by dirfd or cwd. */
static __always_inline int path_on_mount(long dirfd, const char *upath)
{
	__u32 zero = 0;
	struct path_buf *pb = bpf_map_lookup_elem(&scratch, &zero);
	if (!pb || !upath)
		return 0;
	long n = bpf_probe_read_user_str(pb->path, sizeof(pb->path), upath);
	if (n <= 0)
		return 0;
	if (pb->path[0] != '/') {
		if (dirfd == -100 /* AT_FDCWD */)
			return cwd_on_mount();
		return fd_on_mount(dirfd);
	}
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

/* x86_64 syscall numbers. */
#define NR_read 0
#define NR_write 1
#define NR_open 2
#define NR_stat 4
#define NR_fstat 5
#define NR_lstat 6
#define NR_pread64 17
#define NR_pwrite64 18
#define NR_readv 19
#define NR_writev 20
#define NR_access 21
#define NR_creat 85
#define NR_readlink 89
#define NR_getxattr 191
#define NR_lgetxattr 192
#define NR_fgetxattr 193
#define NR_getdents64 217
#define NR_openat 257
#define NR_newfstatat 262
#define NR_readlinkat 267
#define NR_faccessat 269
#define NR_preadv 295
#define NR_pwritev 296
#define NR_preadv2 327
#define NR_pwritev2 328
#define NR_statx 332
#define NR_openat2 437
#define NR_faccessat2 439

static __always_inline int interesting(long nr)
{
	switch (nr) {
	case NR_read: case NR_write: case NR_open: case NR_stat: case NR_fstat: case NR_lstat:
	case NR_pread64: case NR_pwrite64: case NR_readv: case NR_writev: case NR_access:
	case NR_creat: case NR_readlink: case NR_getxattr: case NR_lgetxattr: case NR_fgetxattr:
	case NR_getdents64: case NR_openat: case NR_newfstatat: case NR_readlinkat:
	case NR_faccessat: case NR_preadv: case NR_pwritev: case NR_preadv2: case NR_pwritev2:
	case NR_statx: case NR_openat2: case NR_faccessat2:
		return 1;
	}
	return 0;
}

/* Decides at entry whether the call concerns the mount, so that the common case (any other
 * file system) costs a switch and at most one fd-table walk or path prefix check, and no map
 * update. */
static __always_inline int enter_on_mount(long nr, unsigned long *a)
{
	switch (nr) {
	case NR_getdents64: case NR_fstat: case NR_fgetxattr:
		return fd_on_mount(a[0]);
	case NR_stat: case NR_lstat: case NR_open: case NR_creat: case NR_readlink:
	case NR_getxattr: case NR_lgetxattr: case NR_access:
		return path_on_mount(-100, (const char *)a[0]);
	case NR_newfstatat:
		if (a[3] & 0x1000 /* AT_EMPTY_PATH */)
			return fd_on_mount(a[0]) || path_on_mount(a[0], (const char *)a[1]);
		return path_on_mount(a[0], (const char *)a[1]);
	case NR_statx:
		if (a[2] & 0x1000)
			return fd_on_mount(a[0]) || path_on_mount(a[0], (const char *)a[1]);
		return path_on_mount(a[0], (const char *)a[1]);
	case NR_openat: case NR_openat2: case NR_readlinkat: case NR_faccessat: case NR_faccessat2:
		return path_on_mount(a[0], (const char *)a[1]);
	}
	return 0;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(sys_enter, struct pt_regs *regs, long id)
{
	if (!interesting(id))
		return 0;
	unsigned long args[5];
	args[0] = regs->di;
	args[1] = regs->si;
	args[2] = regs->dx;
	args[3] = regs->r10;
	args[4] = regs->r8;
	struct file *f = NULL;
	switch (id) {
	case NR_read: case NR_pread64: case NR_readv: case NR_preadv: case NR_preadv2:
	case NR_write: case NR_pwrite64: case NR_writev: case NR_pwritev: case NR_pwritev2:
		/* The file is looked up once, here: sys_exit only adds up. */
		f = file_on_mount(args[0]);
		if (!f)
			return 0;
		break;
	default:
		if (!enter_on_mount(id, args))
			return 0;
	}
	struct call *c = bpf_task_storage_get(&calls, bpf_get_current_task_btf(), 0,
					      BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!c)
		return 0;
	c->nr = id;
	c->passthrough = f ? is_passthrough(f) : 0;
	for (int i = 0; i < 5; i++)
		c->args[i] = args[i];
	c->live = 1;
	return 0;
}

/* st_dev at offset 0 of struct stat (x86_64). */
static __always_inline int stat_buf_on_mount(unsigned long ubuf)
{
	__u64 dev = 0;
	if (bpf_probe_read_user(&dev, sizeof(dev), (void *)ubuf))
		return 0;
	return dev == target_udev;
}

/* stx_dev_major / stx_dev_minor at offsets 136 / 140 of struct statx. */
static __always_inline int statx_buf_on_mount(unsigned long ubuf)
{
	__u32 mm[2] = {};
	if (bpf_probe_read_user(mm, sizeof(mm), (void *)(ubuf + 136)))
		return 0;
	return mm[0] == target_major && mm[1] == target_minor;
}

/* One read or write on the mount: the call, and its bytes (also as passthrough bytes). */
static __always_inline void count_io(struct ringfs_demand *d, int class, long ret, __u64 passthrough,
				     __u64 *bytes, __u64 *pt_bytes)
{
	d->calls[class]++;
	if (ret > 0) {
		*bytes += ret;
		if (passthrough)
			*pt_bytes += ret;
	}
}

SEC("tp_btf/sys_exit")
int BPF_PROG(sys_exit, struct pt_regs *regs, long ret)
{
	/* Only calls that sys_enter may have stashed: skip the map for everything else. */
	if (!interesting(regs->orig_ax))
		return 0;
	struct call *cp = bpf_task_storage_get(&calls, bpf_get_current_task_btf(), 0, 0);
	if (!cp || !cp->live)
		return 0;
	struct call c = *cp;
	cp->live = 0;
	struct ringfs_demand *d;
	switch (c.nr) {
	case NR_read: case NR_pread64: case NR_readv: case NR_preadv: case NR_preadv2:
		d = demand_slot();
		if (d)
			count_io(d, RINGFS_READ, ret, c.passthrough, &d->read_bytes, &d->passthrough_read_bytes);
		break;
	case NR_write: case NR_pwrite64: case NR_writev: case NR_pwritev: case NR_pwritev2:
		d = demand_slot();
		if (d)
			count_io(d, RINGFS_WRITE, ret, c.passthrough, &d->write_bytes, &d->passthrough_write_bytes);
		break;
	case NR_getdents64:
		if (fd_on_mount(c.args[0]))
			count(RINGFS_READDIR);
		break;
	case NR_fstat:
		if (fd_on_mount(c.args[0]))
			count(RINGFS_GETATTR);
		break;
	case NR_fgetxattr:
		if (fd_on_mount(c.args[0]))
			count(RINGFS_GETXATTR);
		break;
	case NR_stat: case NR_lstat:
		if (ret == 0 && stat_buf_on_mount(c.args[1])) {
			count(RINGFS_LOOKUP);
			count(RINGFS_GETATTR);
		}
		break;
	case NR_newfstatat:
		if (ret == 0 && stat_buf_on_mount(c.args[2])) {
			if (!(c.args[3] & 0x1000 /* AT_EMPTY_PATH */))
				count(RINGFS_LOOKUP);
			count(RINGFS_GETATTR);
		}
		break;
	case NR_statx:
		if (ret == 0 && statx_buf_on_mount(c.args[4])) {
			if (!(c.args[2] & 0x1000 /* AT_EMPTY_PATH */))
				count(RINGFS_LOOKUP);
			count(RINGFS_GETATTR);
		}
		break;
	case NR_open: case NR_creat: case NR_openat: case NR_openat2:
		/* The path resolved into the mount at entry; the new fd confirms it. */
		if (ret >= 0 && fd_on_mount(ret)) {
			count(RINGFS_LOOKUP);
			count(RINGFS_OPEN);
		}
		break;
	/* Path-based calls whose path was found to lead into the mount at entry. */
	case NR_readlink: case NR_readlinkat:
		count(RINGFS_LOOKUP);
		count(RINGFS_READLINK);
		break;
	case NR_getxattr: case NR_lgetxattr:
		count(RINGFS_LOOKUP);
		count(RINGFS_GETXATTR);
		break;
	case NR_access: case NR_faccessat: case NR_faccessat2:
		count(RINGFS_LOOKUP);
		count(RINGFS_ACCESS);
		break;
	}
	return 0;
}
