//! Compiles the C eBPF programs with clang against the running kernel's BTF.
//!
//! `vmlinux.h` is generated with `bpftool btf dump file /sys/kernel/btf/vmlinux format c`.
//! When clang, bpftool or the kernel's BTF is missing, an empty object is written instead and
//! `RINGFS_BPF_UNAVAILABLE` tells the loader why, so `cargo check`/`build` still work and the
//! server reports "eBPF accounting unavailable" at run time.

use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &["ringfs"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let src = PathBuf::from("src/bpf");
    println!("cargo:rerun-if-changed=src/bpf/ringfs.h");
    for p in PROGRAMS {
        println!("cargo:rerun-if-changed=src/bpf/{p}.bpf.c");
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    let reason = build(&src, &out).err();
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

fn build(src: &std::path::Path, out: &std::path::Path) -> Result<(), String> {
    let vmlinux = out.join("vmlinux.h");
    let btf = "/sys/kernel/btf/vmlinux";
    if !std::path::Path::new(btf).exists() {
        return Err(format!("{btf} is missing (kernel built without BTF)"));
    }
    let dump = Command::new("bpftool")
        .args(["btf", "dump", "file", btf, "format", "c"])
        .output()
        .map_err(|e| format!("bpftool not runnable ({e}); install Debian's bpftool"))?;
    if !dump.status.success() {
        return Err(format!("bpftool btf dump failed: {}", String::from_utf8_lossy(&dump.stderr).trim()));
    }
    std::fs::write(&vmlinux, &dump.stdout).map_err(|e| format!("writing vmlinux.h: {e}"))?;
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    for p in PROGRAMS {
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", "-Wall", "-Wno-unused-function"])
            .arg("-I")
            .arg(out)
            .arg("-I")
            .arg(src)
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
