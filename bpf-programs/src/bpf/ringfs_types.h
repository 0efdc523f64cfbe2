/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The kernel types ringfs.bpf.c reads, reduced to the members it uses: CO-RE (compile once, run
 * everywhere). Every record is declared with preserve_access_index, so each member access is
 * recorded as a relocation by name and the loader fixes its offset (and load size) against the
 * running kernel's BTF (vmlinux, plus the fuse module's BTF when FUSE is a module). Nothing
 * here depends on the build machine's kernel: the order, the offsets and the other members of
 * these structs do not matter, only the names and the kinds of the members below.
 *
 * A member or type a kernel lacks is caught by bpf_core_field_exists()/bpf_core_type_exists()
 * in the programs (the counter that needs it is off on that kernel); an unguarded access to a
 * missing one makes the loader poison the instruction, and the verifier rejects just the
 * program containing it (the loader names it).
 *
 * Arch: pt_regs is declared for the __TARGET_ARCH the build passes (x86 or arm64).
 */
#ifndef RINGFS_TYPES_H
#define RINGFS_TYPES_H
/* This header stands in for a generated vmlinux.h: bpf_tracing.h then names the kernel's
 * pt_regs members (di, ip, ...), not user space's (rdi, rip). */
#define __VMLINUX_H__

#include <linux/types.h>
#include <linux/bpf.h>

typedef __u32 dev_t;
typedef __u32 u32;
typedef __u64 u64;

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

#if defined(__TARGET_ARCH_x86)
struct pt_regs {
	unsigned long r10;
	unsigned long dx;
	unsigned long si;
	unsigned long di;
	unsigned long orig_ax;
	unsigned long ip;
};
/* The syscall number at sys_exit; a page fault's error code (with the ip, it names a fault). */
#define RINGFS_REGS_NR(r) ((r)->orig_ax)
#define RINGFS_REGS_NR_CORE(r) BPF_CORE_READ((r), orig_ax)
#elif defined(__TARGET_ARCH_arm64)
struct user_pt_regs {
	__u64 regs[31];
	__u64 sp;
	__u64 pc;
	__u64 pstate;
};
struct pt_regs {
	union {
		struct user_pt_regs user_regs;
		struct {
			__u64 regs[31];
			__u64 sp;
			__u64 pc;
			__u64 pstate;
		};
	};
	__u64 orig_x0;
	__s32 syscallno;
};
#define RINGFS_REGS_NR(r) ((r)->syscallno)
#define RINGFS_REGS_NR_CORE(r) BPF_CORE_READ((r), syscallno)
#else
#error "ringfs eBPF: unsupported __TARGET_ARCH (x86 and arm64 only)"
#endif

struct super_block {
	dev_t s_dev;
};

struct inode {
	struct super_block *i_sb;
};

struct dentry {
	struct super_block *d_sb;
};

struct path {
	struct dentry *dentry;
};

struct file {
	struct inode *f_inode;
	unsigned int f_mode;
	void *private_data;
};

/* 6.8+: the file a passthrough mapping maps; user_path is the FUSE file's path. */
struct backing_file {
	struct file file;
	struct path user_path;
};

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
};

struct files_struct {
	struct fdtable *fdt;
};

struct fs_struct {
	struct path pwd;
};

struct mm_struct;

struct task_struct {
	unsigned int flags;
	struct files_struct *files;
	struct fs_struct *fs;
	struct mm_struct *mm;
	void *worker_private; /* 5.19+: struct io_worker of an io_uring worker thread */
};

struct address_space {
	struct inode *host;
};

struct vm_area_struct {
	struct file *vm_file;
};

/* io_uring (5.x/6.x layouts differ; CO-RE finds the members by name). */
struct io_wq_work {
	/* only its place in io_kiocb matters */
};

struct io_worker {
	struct io_wq_work *cur_work;
};

struct io_cqe {
	__s32 res;
	union {
		__u32 flags;
		int fd;
	};
};

struct io_uring_cqe {
	__s32 res;
};

struct io_kiocb {
	struct file *file;
	__u8 opcode;
	__u64 flags; /* io_req_flags_t: u64 since 6.10, unsigned int before (read as 32 bits) */
	struct io_cqe cqe;
	struct io_wq_work work; /* only its offset is used */
};

struct io_ring_ctx;

/* FUSE (in vmlinux when FUSE is built in, in the fuse module's BTF otherwise). */
struct fuse_in_header {
	__u32 len;
	__u32 opcode;
	__u64 unique;
};

struct fuse_out_header {
	__u32 len;
	__s32 error;
};

struct fuse_conn {
	dev_t dev;
};

struct fuse_mount {
	struct fuse_conn *fc;
};

struct fuse_req {
	struct {
		struct fuse_in_header h;
	} in;
	struct {
		struct fuse_out_header h;
	} out;
	struct fuse_mount *fm;
};

/* 6.9+: the backing file of a passthrough open. */
struct fuse_file {
	struct file *passthrough;
};

#pragma clang attribute pop

/* UAPI values (stable across kernels). */
#define IORING_OP_READV 1
#define IORING_OP_WRITEV 2
#define IORING_OP_READ_FIXED 4
#define IORING_OP_WRITE_FIXED 5
#define IORING_OP_READ 22
#define IORING_OP_WRITE 23
#define IORING_OP_READ_MULTISHOT 49
#define IORING_OP_READV_FIXED 60
#define IORING_OP_WRITEV_FIXED 61
/* REQ_F_FIXED_FILE is bit 0 (= IOSQE_FIXED_FILE_BIT) in every kernel with io_uring. */
#define REQ_F_FIXED_FILE 1U

#endif
