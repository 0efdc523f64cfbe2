/* SPDX-License-Identifier: GPL-2.0 */
/* System call numbers of the calls ringfs.bpf.c classifies, per target architecture (the build
 * passes __TARGET_ARCH_x86 or __TARGET_ARCH_arm64 from CARGO_CFG_TARGET_ARCH). arm64 (the
 * generic table) has no legacy path calls (open, stat, mkdir, ...), only their *at forms: those
 * names get distinct negative numbers no system call has, so their cases never match.
 * src/lib.rs tests both tables against the kernel's UAPI headers when they are installed. */
#ifndef RINGFS_SYSCALLS_H
#define RINGFS_SYSCALLS_H

#if defined(__TARGET_ARCH_x86)
#define NR_read 0
#define NR_write 1
#define NR_open 2
#define NR_close 3
#define NR_stat 4
#define NR_fstat 5
#define NR_lstat 6
#define NR_lseek 8
#define NR_ioctl 16
#define NR_pread64 17
#define NR_pwrite64 18
#define NR_readv 19
#define NR_writev 20
#define NR_access 21
#define NR_sendfile 40
#define NR_fcntl 72
#define NR_flock 73
#define NR_fsync 74
#define NR_fdatasync 75
#define NR_truncate 76
#define NR_ftruncate 77
#define NR_getdents 78
#define NR_chdir 80
#define NR_fchdir 81
#define NR_rename 82
#define NR_mkdir 83
#define NR_rmdir 84
#define NR_creat 85
#define NR_link 86
#define NR_unlink 87
#define NR_symlink 88
#define NR_readlink 89
#define NR_chmod 90
#define NR_fchmod 91
#define NR_chown 92
#define NR_fchown 93
#define NR_lchown 94
#define NR_utime 132
#define NR_mknod 133
#define NR_statfs 137
#define NR_fstatfs 138
#define NR_setxattr 188
#define NR_lsetxattr 189
#define NR_fsetxattr 190
#define NR_getxattr 191
#define NR_lgetxattr 192
#define NR_fgetxattr 193
#define NR_listxattr 194
#define NR_llistxattr 195
#define NR_flistxattr 196
#define NR_removexattr 197
#define NR_lremovexattr 198
#define NR_fremovexattr 199
#define NR_getdents64 217
#define NR_utimes 235
#define NR_openat 257
#define NR_mkdirat 258
#define NR_mknodat 259
#define NR_fchownat 260
#define NR_futimesat 261
#define NR_newfstatat 262
#define NR_unlinkat 263
#define NR_renameat 264
#define NR_linkat 265
#define NR_symlinkat 266
#define NR_readlinkat 267
#define NR_fchmodat 268
#define NR_faccessat 269
#define NR_splice 275
#define NR_sync_file_range 277
#define NR_utimensat 280
#define NR_fallocate 285
#define NR_preadv 295
#define NR_pwritev 296
#define NR_renameat2 316
#define NR_copy_file_range 326
#define NR_preadv2 327
#define NR_pwritev2 328
#define NR_statx 332
#define NR_io_uring_enter 426
#define NR_openat2 437
#define NR_faccessat2 439
#define NR_fchmodat2 452
#define NR_setxattrat 463
#define NR_getxattrat 464
#define NR_listxattrat 465
#define NR_removexattrat 466
#elif defined(__TARGET_ARCH_arm64)
#define NR_read 63
#define NR_write 64
#define NR_open (-1001) /* none on arm64 */
#define NR_close 57
#define NR_stat (-1002) /* none on arm64 */
#define NR_fstat 80
#define NR_lstat (-1003) /* none on arm64 */
#define NR_lseek 62
#define NR_ioctl 29
#define NR_pread64 67
#define NR_pwrite64 68
#define NR_readv 65
#define NR_writev 66
#define NR_access (-1004) /* none on arm64 */
#define NR_sendfile 71
#define NR_fcntl 25
#define NR_flock 32
#define NR_fsync 82
#define NR_fdatasync 83
#define NR_truncate 45
#define NR_ftruncate 46
#define NR_getdents (-1005) /* none on arm64 */
#define NR_chdir 49
#define NR_fchdir 50
#define NR_rename (-1006) /* none on arm64 */
#define NR_mkdir (-1007) /* none on arm64 */
#define NR_rmdir (-1008) /* none on arm64 */
#define NR_creat (-1009) /* none on arm64 */
#define NR_link (-1010) /* none on arm64 */
#define NR_unlink (-1011) /* none on arm64 */
#define NR_symlink (-1012) /* none on arm64 */
#define NR_readlink (-1013) /* none on arm64 */
#define NR_chmod (-1014) /* none on arm64 */
#define NR_fchmod 52
#define NR_chown (-1015) /* none on arm64 */
#define NR_fchown 55
#define NR_lchown (-1016) /* none on arm64 */
#define NR_utime (-1017) /* none on arm64 */
#define NR_mknod (-1018) /* none on arm64 */
#define NR_statfs 43
#define NR_fstatfs 44
#define NR_setxattr 5
#define NR_lsetxattr 6
#define NR_fsetxattr 7
#define NR_getxattr 8
#define NR_lgetxattr 9
#define NR_fgetxattr 10
#define NR_listxattr 11
#define NR_llistxattr 12
#define NR_flistxattr 13
#define NR_removexattr 14
#define NR_lremovexattr 15
#define NR_fremovexattr 16
#define NR_getdents64 61
#define NR_utimes (-1019) /* none on arm64 */
#define NR_openat 56
#define NR_mkdirat 34
#define NR_mknodat 33
#define NR_fchownat 54
#define NR_futimesat (-1020) /* none on arm64 */
#define NR_newfstatat 79
#define NR_unlinkat 35
#define NR_renameat 38
#define NR_linkat 37
#define NR_symlinkat 36
#define NR_readlinkat 78
#define NR_fchmodat 53
#define NR_faccessat 48
#define NR_splice 76
#define NR_sync_file_range 84
#define NR_utimensat 88
#define NR_fallocate 47
#define NR_preadv 69
#define NR_pwritev 70
#define NR_renameat2 276
#define NR_copy_file_range 285
#define NR_preadv2 286
#define NR_pwritev2 287
#define NR_statx 291
#define NR_io_uring_enter 426
#define NR_openat2 437
#define NR_faccessat2 439
#define NR_fchmodat2 452
#define NR_setxattrat 463
#define NR_getxattrat 464
#define NR_listxattrat 465
#define NR_removexattrat 466
#else
#error "ringfs eBPF: unsupported __TARGET_ARCH (x86 and arm64 only)"
#endif

#endif
