//! Compiles the C eBPF programs with clang, CO-RE: against the checked-in type header
//! `src/bpf/ringfs_types.h` (only the members the programs read), so the object does not depend
//! on the build machine's kernel: no `/sys/kernel/btf`, no bpftool. The loader relocates every
//! member access against the running kernel's BTF.
//!
//! The target architecture (`CARGO_CFG_TARGET_ARCH`) picks `__TARGET_ARCH_*` (pt_regs layout)
//! and the system call table (`src/bpf/ringfs_syscalls.h`); only x86_64 and aarch64 are
//! supported, any other target stops the build with a message. When clang, libbpf's headers or
//! the kernel's UAPI headers (linux-libc-dev) are missing, an empty object is written instead and `RINGFS_BPF_UNAVAILABLE` tells the loader
//! why, so `cargo check`/`build` still work and the server reports "eBPF accounting unavailable"
//! at run time.

use std::path::{Path, PathBuf};
use std::process::Command;

const PROGRAMS: &[&str] = &["ringfs"];
const HEADERS: &[&str] = &["ringfs.h", "ringfs_types.h", "ringfs_syscalls.h"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let src = PathBuf::from("src/bpf");
    for h in HEADERS {
        println!("cargo:rerun-if-changed=src/bpf/{h}");
    }
    for p in PROGRAMS {
        println!("cargo:rerun-if-changed=src/bpf/{p}.bpf.c");
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let target_arch = match arch.as_str() {
        "x86_64" => "x86",
        "aarch64" => "arm64",
        other => panic!(
            "ringfs's eBPF programs support x86_64 and aarch64 targets only (their system call \
             numbers and pt_regs layout are per architecture); this target is `{other}`"
        ),
    };
    let reason = build(&src, &out, target_arch).err();
    match &reason {
        Some(r) => {
            println!("cargo:warning=eBPF programs not built: {r}");
            for p in PROGRAMS {
                std::fs::write(out.join(format!("{p}.bpf.o")), b"").expect("write stub object");
            }
            println!("cargo:rustc-env=RINGFS_BPF_UNAVAILABLE={r}");
        }
        None => println!("cargo:rustc-env=RINGFS_BPF_UNAVAILABLE="),
    }
}

/// The directory holding `asm/types.h` for `<linux/types.h>` (Debian: multiarch).
fn asm_include() -> Option<PathBuf> {
    if Path::new("/usr/include/asm/types.h").exists() {
        return None;
    }
    let dirs = std::fs::read_dir("/usr/include").ok()?;
    dirs.flatten().map(|e| e.path()).find(|p| p.join("asm/types.h").exists())
}

fn build(src: &Path, out: &Path, target_arch: &str) -> Result<(), String> {
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        return Err("libbpf's headers (/usr/include/bpf/bpf_helpers.h) are missing: install Debian's libbpf-dev".into());
    }
    if !Path::new("/usr/include/linux/bpf.h").exists() {
        return Err(
            "the kernel's UAPI headers (/usr/include/linux/bpf.h) are missing: install Debian's linux-libc-dev".into(),
        );
    }
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    for p in PROGRAMS {
        let mut cmd = Command::new(&clang);
        cmd.args(["-O2", "-g", "-target", "bpf", "-Wall", "-Wno-unused-function"])
            .arg(format!("-D__TARGET_ARCH_{target_arch}"))
            .arg("-I")
            .arg(src);
        if let Some(dir) = asm_include() {
            cmd.arg("-idirafter").arg(dir);
        }
        let status = cmd
            .arg("-c")
            .arg(src.join(format!("{p}.bpf.c")))
            .arg("-o")
            .arg(out.join(format!("{p}.bpf.o")))
            .status()
            .map_err(|e| format!("{clang} not runnable ({e}); install Debian's clang and libbpf-dev"))?;
        if !status.success() {
            return Err(format!("{clang} failed on {p}.bpf.c"));
        }
    }
    Ok(())
}
