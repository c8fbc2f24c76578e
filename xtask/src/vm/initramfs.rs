//! The VM's initramfs, as concatenated cpio newc archives (the kernel unpacks them in order):
//!
//! 1. userland (target/vm/initramfs/userland.cpio): busybox-static with its applets, kmod's
//!    tools, runc, crun, iptables-legacy with its xtables modules, auditd/auditctl, their shared
//!    libraries (found with ldd), /init and a read-only rootfs for runc containers;
//!    rebuilt only when its inputs change;
//! 2. modules (target/vm/kernels/<series>/modules.cpio): the kernel's /lib/modules tree;
//! 3. payload: kmodmon (static) and the test binaries; rebuilt when they change;
//! 4. the run: the script to run, the scenario library and its environment.
//!
//! Nothing is compressed: under TCG, decompressing costs more boot time than copying
//! (measured: +1.0 s for the 6.1 module tree gzipped, +0.45 s raw).
//!
//! The root is merged-/usr, like Debian's: /bin, /sbin, /lib and /lib64 link into /usr.
use std::{
    collections::{BTreeMap, HashSet},
    fs,
    hash::{DefaultHasher, Hash, Hasher},
    io::{BufWriter, Write},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::{cpio, kernels::Kernel};

/// PID 1 of the VM.
const INIT: &str = include_str!("init.sh");
/// Bump when the layout below changes, so cached archives are rebuilt.
const LAYOUT_VERSION: u32 = 2;
/// Where runc containers find their (read-only) root.
pub const CONTAINER_ROOTFS: &str = "containers/rootfs";

/// Host programs in the userland part: (path, Debian package to install when missing).
const REQUIRED: &[(&str, &str)] = &[
    ("/bin/busybox", "busybox-static"),
    ("/usr/bin/kmod", "kmod"),
    ("/usr/sbin/modprobe", "kmod"),
    ("/usr/sbin/insmod", "kmod"),
    ("/usr/sbin/rmmod", "kmod"),
    ("/usr/sbin/lsmod", "kmod"),
    ("/usr/sbin/depmod", "kmod"),
    ("/usr/sbin/modinfo", "kmod"),
    ("/usr/sbin/runc", "runc"),
    ("/usr/bin/crun", "crun"),
    ("/usr/sbin/iptables-legacy", "iptables"),
    ("/usr/sbin/iptables-legacy-save", "iptables"),
    ("/usr/sbin/iptables-legacy-restore", "iptables"),
    ("/usr/sbin/auditd", "auditd"),
    ("/usr/sbin/auditctl", "auditd"),
];
/// iptables' extensions, loaded with dlopen (ldd cannot see them).
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// Maps a host path to its place in the merged-/usr root: "/lib/x/y" → "usr/lib/x/y".
pub fn merged_usr(path: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    if let Some(first) = parts.first()
        && ["bin", "sbin", "lib", "lib64"].contains(&first.as_str())
    {
        parts.insert(0, "usr".to_string());
    }
    parts.join("/")
}

/// Shared libraries `ldd` lists for an ELF file (none for static binaries).
fn ldd(path: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(path)
        .output()
        .context("could not run ldd (apt-get install libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable" / "statically linked"
        return Ok(Vec::new());
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", path.display()))
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("library {} not found", name.trim());
                }
                rest.split(" (").next().unwrap_or("").trim()
            }
            None => line.split(" (").next().unwrap_or("").trim(),
        };
        if target.starts_with('/') {
            libs.push(PathBuf::from(target));
        }
    }
    Ok(libs)
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// Copies host files (following symlink chains, adding ldd dependencies) into an archive.
struct HostCopier<W: Write> {
    cpio: cpio::Writer<W>,
    seen: HashSet<PathBuf>,
}

impl<W: Write> HostCopier<W> {
    fn add(&mut self, host: &Path) -> Result<()> {
        if !self.seen.insert(host.to_path_buf()) {
            return Ok(());
        }
        let dest = merged_usr(host);
        let meta =
            fs::symlink_metadata(host).with_context(|| format!("reading {}", host.display()))?;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(host)?;
            let target_str = target
                .to_str()
                .with_context(|| format!("non-UTF-8 link {}", host.display()))?;
            if !self.cpio.contains(&dest) {
                self.cpio.symlink(&dest, target_str)?;
            }
            let resolved = match host.parent() {
                Some(parent) if target.is_relative() => parent.join(&target),
                _ => target,
            };
            return self.add(&resolved);
        }
        if meta.is_dir() {
            for entry in fs::read_dir(host)? {
                self.add(&entry?.path())?;
            }
            return Ok(());
        }
        if !self.cpio.contains(&dest) {
            let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
            self.cpio.file(&dest, meta.permissions().mode(), &data)?;
        }
        if is_elf(host) {
            for lib in ldd(host)? {
                self.add(&lib)?;
            }
        }
        Ok(())
    }
}

/// Cache key of a set of files: path, size and mtime of each, plus extra text.
fn stamp(paths: &[PathBuf], extra: &str) -> String {
    let mut h = DefaultHasher::new();
    LAYOUT_VERSION.hash(&mut h);
    extra.hash(&mut h);
    for p in paths {
        p.hash(&mut h);
        if let Ok(m) = fs::metadata(p) {
            (m.len(), m.mtime(), m.mtime_nsec()).hash(&mut h);
        }
    }
    format!("{:016x}", h.finish())
}

/// Writes `out` with `build` unless `out.stamp` holds `key`; returns `out`.
fn cached(out: &Path, key: &str, build: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let stamp_file = out.with_extension("stamp");
    if out.is_file() && fs::read_to_string(&stamp_file).ok().as_deref() == Some(key) {
        return Ok(out.to_path_buf());
    }
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    // Unique: another xtask may be building the same part right now.
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    build(&tmp).with_context(|| format!("building {}", out.display()))?;
    fs::rename(&tmp, out)?;
    fs::write(&stamp_file, key)?;
    Ok(out.to_path_buf())
}

fn create(path: &Path) -> Result<cpio::Writer<BufWriter<fs::File>>> {
    let f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    Ok(cpio::Writer::new(BufWriter::with_capacity(1 << 20, f)))
}

/// Part 1: the kernel-independent userland.
pub fn userland(dir: &Path) -> Result<PathBuf> {
    let mut missing = Vec::new();
    for (path, package) in REQUIRED {
        if !Path::new(path).exists() && !missing.contains(package) {
            missing.push(*package);
        }
    }
    if !missing.is_empty() {
        bail!(
            "the VM initramfs needs programs from these Debian packages: {}\n  run: cargo xtask setup (or apt-get install {})",
            missing.join(" "),
            missing.join(" ")
        );
    }
    let mut inputs: Vec<PathBuf> = REQUIRED.iter().map(|(p, _)| PathBuf::from(p)).collect();
    inputs.push(XTABLES_DIR.into());
    inputs.push("/lib/x86_64-linux-gnu/libc.so.6".into());
    inputs.push("/etc/audit/auditd.conf".into());
    let key = stamp(&inputs, INIT);
    cached(&dir.join("userland.cpio"), &key, |out| {
        let mut cpio = create(out)?;
        for (link, target) in [
            ("bin", "usr/bin"),
            ("sbin", "usr/sbin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            cpio.dir(target, 0o755)?;
            cpio.symlink(link, target)?;
        }
        for d in [
            "proc",
            "sys",
            "dev",
            "run",
            "tmp",
            "mnt",
            "root",
            "etc/modprobe.d",
            "etc/audit/plugins.d",
            "var/log/audit",
            "kmodmon",
        ] {
            cpio.dir(d, if d == "tmp" { 0o1777 } else { 0o755 })?;
        }
        cpio.symlink("var/run", "/run")?;
        cpio.file("init", 0o755, INIT.as_bytes())?;
        cpio.file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )?;
        cpio.file(
            "etc/group",
            0o644,
            b"root:x:0:\nadm:x:4:\nnogroup:x:65534:\n",
        )?;
        cpio.file("etc/hostname", 0o644, b"kmodmon-vm\n")?;
        container_rootfs(&mut cpio)?;
        let mut copier = HostCopier {
            cpio,
            seen: HashSet::new(),
        };
        for (path, _) in REQUIRED {
            copier.add(Path::new(path))?;
        }
        copier.add(Path::new(XTABLES_DIR))?;
        if Path::new("/etc/audit/auditd.conf").is_file() {
            copier.add(Path::new("/etc/audit/auditd.conf"))?;
        }
        let mut cpio = copier.cpio;
        busybox_applets(&mut cpio)?;
        cpio.finish()?;
        Ok(())
    })
}

/// The root of runc containers: empty mount points and merged-/usr links; the container
/// config bind-mounts the VM's /usr over its usr (see tests/vm/lib.sh).
fn container_rootfs<W: Write>(cpio: &mut cpio::Writer<W>) -> Result<()> {
    let root = CONTAINER_ROOTFS;
    for d in [
        "usr", "proc", "sys", "dev", "tmp", "run", "etc", "root", "mnt",
    ] {
        cpio.dir(&format!("{root}/{d}"), 0o755)?;
    }
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        cpio.symlink(&format!("{root}/{link}"), target)?;
    }
    cpio.file(
        &format!("{root}/etc/passwd"),
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n",
    )?;
    cpio.file(&format!("{root}/etc/group"), 0o644, b"root:x:0:\n")?;
    Ok(())
}

/// Links every busybox applet that no real program already provides.
fn busybox_applets<W: Write>(cpio: &mut cpio::Writer<W>) -> Result<()> {
    let out = Command::new("/bin/busybox").arg("--list-full").output()?;
    if !out.status.success() {
        bail!("busybox --list-full failed");
    }
    let list = String::from_utf8_lossy(&out.stdout);
    let mut count = 0;
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let dest = merged_usr(&Path::new("/").join(applet));
        let name = applet.rsplit('/').next().unwrap_or(applet);
        // kmod's modprobe in /usr/sbin must not be shadowed by busybox's in /usr/bin either.
        let taken = ["usr/bin", "usr/sbin"]
            .iter()
            .any(|d| cpio.contains(&format!("{d}/{name}")));
        if !taken {
            cpio.symlink(&dest, "/usr/bin/busybox")?;
            count += 1;
        }
    }
    if count < 50 {
        bail!("busybox lists only {count} applets: is busybox-static installed?");
    }
    Ok(())
}

/// Part 2: the kernel's module tree at /lib/modules/<release>.
pub fn modules(kernel: &Kernel) -> Result<PathBuf> {
    let dep = kernel.modules_dir().join("modules.dep");
    let key = stamp(&[dep], &kernel.release);
    cached(&kernel.dir.join("modules.cpio"), &key, |out| {
        let mut cpio = create(out)?;
        let base = kernel.modules_root();
        add_tree(&mut cpio, &base, &kernel.modules_dir())?;
        cpio.finish()?;
        Ok(())
    })
}

/// Adds `dir` (below `base`) as usr/<path relative to base>.
fn add_tree<W: Write>(cpio: &mut cpio::Writer<W>, base: &Path, dir: &Path) -> Result<()> {
    let rel = dir.strip_prefix(base).unwrap_or(dir);
    let dest = merged_usr(&Path::new("/").join(rel));
    cpio.dir(&dest, 0o755)?;
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let meta = entry.metadata()?;
        let dest = merged_usr(&Path::new("/").join(path.strip_prefix(base).unwrap_or(&path)));
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&path)?;
            cpio.symlink(&dest, &target.to_string_lossy())?;
        } else if meta.is_dir() {
            add_tree(cpio, base, &path)?;
        } else {
            cpio.file(&dest, meta.permissions().mode(), &fs::read(&path)?)?;
        }
    }
    Ok(())
}

/// Part 3: programs built by the project: (path in the VM, host file).
pub fn payload(dir: &Path, files: &BTreeMap<String, PathBuf>) -> Result<PathBuf> {
    let paths: Vec<PathBuf> = files.values().cloned().collect();
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    let key = stamp(&paths, &names.join(","));
    cached(&dir.join("payload.cpio"), &key, |out| {
        let mut cpio = create(out)?;
        for (dest, host) in files {
            let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
            cpio.file(dest, 0o755, &data)?;
        }
        cpio.finish()?;
        Ok(())
    })
}

/// Part 4: the script to run (/kmodmon/run.sh), the scenario library (/kmodmon/lib.sh) and
/// an environment file (/kmodmon/env, sourced by /init).
pub fn run_part(script: &[u8], lib: &[u8], env: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut cpio = cpio::Writer::new(Vec::new());
    cpio.file("kmodmon/run.sh", 0o755, script)?;
    cpio.file("kmodmon/lib.sh", 0o644, lib)?;
    let mut env_text = String::new();
    for (k, v) in env {
        env_text.push_str(&format!("export {k}='{}'\n", v.replace('\'', "'\\''")));
    }
    cpio.file("kmodmon/env", 0o644, env_text.as_bytes())?;
    Ok(cpio.finish()?)
}

/// Concatenates the parts into one initrd file.
pub fn assemble(parts: &[PathBuf], run: &[u8], out: &Path) -> Result<()> {
    let mut w = BufWriter::with_capacity(
        1 << 20,
        fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
    );
    for p in parts {
        let mut f = fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        std::io::copy(&mut f, &mut w)?;
    }
    w.write_all(run)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_usr_moves_top_dirs_under_usr() {
        assert_eq!(
            merged_usr(Path::new("/lib/x86_64-linux-gnu/libc.so.6")),
            "usr/lib/x86_64-linux-gnu/libc.so.6"
        );
        assert_eq!(
            merged_usr(Path::new("/lib64/ld-linux-x86-64.so.2")),
            "usr/lib64/ld-linux-x86-64.so.2"
        );
        assert_eq!(
            merged_usr(Path::new("/usr/sbin/../bin/kmod")),
            "usr/bin/kmod"
        );
        assert_eq!(
            merged_usr(Path::new("/etc/audit/auditd.conf")),
            "etc/audit/auditd.conf"
        );
        assert_eq!(merged_usr(Path::new("/library/x")), "library/x");
    }

    #[test]
    fn ldd_output_gives_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibkmod.so.2 => /lib/x86_64-linux-gnu/libkmod.so.2 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libkmod.so.2"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        let err = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(err.to_string().contains("libfoo.so.1"));
    }

    #[test]
    fn run_part_quotes_the_environment() {
        let bytes = run_part(b"echo hi\n", b"", &[("NAME", "it's".to_string())]).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("export NAME='it'\\''s'\n"), "{text}");
        assert_eq!(bytes.len() % 512, 0);
    }

    #[test]
    fn cached_rebuilds_only_when_the_key_changes() {
        let dir = std::env::temp_dir().join(format!("kmodmon-xtask-cache-{}", std::process::id()));
        let out = dir.join("part.cpio");
        let mut builds = 0;
        for key in ["a", "a", "b"] {
            cached(&out, key, |p| {
                builds += 1;
                Ok(fs::write(p, key)?)
            })
            .unwrap();
        }
        assert_eq!(builds, 2);
        assert_eq!(fs::read_to_string(&out).unwrap(), "b");
        let _ = fs::remove_dir_all(&dir);
    }
}
