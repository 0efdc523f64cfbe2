/* Structures shared by the eBPF programs (ringfs.bpf.c) and their loader (src/lib.rs).
 * Keep the layouts in sync with the #[repr(C)] mirrors in src/lib.rs. */
#ifndef RINGFS_H
#define RINGFS_H

#define RINGFS_OPCODES 64        /* FUSE opcodes are < 54; the rest is slack */
#define RINGFS_BUCKETS 24        /* latency buckets: [0] < 1 us, [i] < 2^i us, last = rest */
#define RINGFS_CLASSES 9         /* demand classes, see enum ringfs_class */
#define RINGFS_PATH_MAX 256

enum ringfs_class {
	RINGFS_LOOKUP = 0,
	RINGFS_GETATTR = 1,
	RINGFS_OPEN = 2,
	RINGFS_READ = 3,
	RINGFS_WRITE = 4,
	RINGFS_READDIR = 5,
	RINGFS_READLINK = 6,
	RINGFS_GETXATTR = 7,
	RINGFS_ACCESS = 8,
};

/* Per opcode: requests that reached the server (one slot per CPU, summed by the loader). */
struct ringfs_op {
	__u64 count;
	__u64 errors;
	__u64 latency_sum_ns;
	__u64 buckets[RINGFS_BUCKETS];
};

/* Demand: syscalls that landed on this mount, by class, plus data bytes. */
struct ringfs_demand {
	__u64 calls[RINGFS_CLASSES];
	__u64 read_bytes;
	__u64 write_bytes;
	__u64 passthrough_read_bytes;  /* of which on files the kernel passes through */
	__u64 passthrough_write_bytes;
};

#endif
