/* Structures shared by the eBPF programs (ringfs.bpf.c) and their loader (src/lib.rs).
 * Keep the layouts in sync with the #[repr(C)] mirrors in src/lib.rs. */
#ifndef RINGFS_H
#define RINGFS_H

#define RINGFS_OPCODES 64        /* FUSE opcodes are < 54; the rest is slack */
#define RINGFS_BUCKETS 24        /* latency buckets: [0] < 1 us, [i] < 2^i us, last = rest */
#define RINGFS_PATH_MAX 256

/* The cause a request is charged to: the class of the system call (or page fault, or io_uring
 * operation) the sending task was executing on this mount. Order = `Class::ALL` in src/lib.rs. */
enum ringfs_class {
	RINGFS_BACKGROUND = 0,   /* no user call behind it: kernel threads, the server's own
				  * context, FORGET/RELEASE/INTERRUPT... */
	RINGFS_UNTRACED = 1,     /* demand tracing off: the cause is not known */
	RINGFS_UNCLASSIFIED = 2, /* a user task, but no classified call on the mount */
	RINGFS_STAT = 3,
	RINGFS_OPEN = 4,
	RINGFS_CREATE = 5,
	RINGFS_MKDIR = 6,
	RINGFS_UNLINK = 7,
	RINGFS_RENAME = 8,
	RINGFS_LINK = 9,
	RINGFS_SETATTR = 10,
	RINGFS_READ = 11,
	RINGFS_WRITE = 12,
	RINGFS_READDIR = 13,
	RINGFS_READLINK = 14,
	RINGFS_XATTR = 15,
	RINGFS_ACCESS = 16,
	RINGFS_FSYNC = 17,
	RINGFS_CLOSE = 18,
	RINGFS_OTHER = 19,       /* statfs, fallocate, lseek, flock, fcntl, ioctl, chdir */
	RINGFS_MMAP = 20,        /* user page faults on a mapping of the mount's files */
	RINGFS_SPLICE = 21,      /* sendfile, splice, copy_file_range */
	RINGFS_IO_URING = 22,    /* io_uring reads and writes of the mount's files */
	RINGFS_CLASSES = 23,
};

/* Byte counters of a class: [direction][path]. */
#define RINGFS_DIR_READ 0
#define RINGFS_DIR_WRITE 1
#define RINGFS_PATH_MOUNT 0       /* returned by the calls on the mount */
#define RINGFS_PATH_PASSTHROUGH 1 /* of which on files the kernel passes through */
#define RINGFS_PATH_SERVER 2      /* data of READ replies / WRITE requests the server served */

/* Per opcode: requests that reached the server (one slot per CPU, summed by the loader). */
struct ringfs_op {
	__u64 count;
	__u64 errors;
	__u64 latency_sum_ns;
	__u64 buckets[RINGFS_BUCKETS];
};

/* Per class (one slot per CPU). */
struct ringfs_class_stats {
	__u64 calls;               /* calls that reached the mount (demand), failed or not */
	__u64 calls_with_fallback; /* of those, calls that caused at least one request */
	__u64 bytes[2][3];         /* [RINGFS_DIR_*][RINGFS_PATH_*] */
	__u64 requests[RINGFS_OPCODES]; /* requests caused, by opcode */
};

#endif
