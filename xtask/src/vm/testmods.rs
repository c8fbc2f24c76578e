//! Test modules built at test time against each VM kernel's own headers: Debian's
//! `linux-headers-<abi>-cloud-amd64`, `linux-headers-<abi>-common` and `linux-kbuild-*`
//! packages, fetched through the project's private apt (as the kernels are, apt.rs), unpacked
//! under target/vm/kbuild/<series>/, and the kernel's own kbuild run on this host:
//!
//! - the host's gcc builds for every kernel (6.12's headers ask for gcc-14, which bookworm
//!   lacks: `CONFIG_CC_HAS_MIN_FUNCTION_ALIGNMENT` is switched off on the command line, the
//!   only gcc-14 flag an out-of-tree module meets), and module BTF is skipped (no pahole);
//! - kbuild programs linked against a newer glibc than the host's (trixie's modpost and
//!   objtool need GLIBC_2.38) run through that release's own dynamic loader and libraries,
//!   unpacked beside them from the same archive.
//!
//! The sources are tests/vm/modules (kmt_plain, kmt_hide, kmt_big); the results, with
//! kmt_plain.ko.xz, go into the initramfs at /usr/lib/kmodmon-test/<release>/.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::{
    apt::{self, Apt, Candidate},
    kernels::{Kernel, MATRIX, select},
};
use crate::util::{output, run, workspace_root};

/// The module sources, relative to the workspace root.
const SOURCES: &str = "tests/vm/modules";
/// What is built (and shipped with kmt_plain.ko.xz).
pub const MODULES: [&str; 3] = ["kmt_plain", "kmt_hide", "kmt_big"];
/// Bump to rebuild cached results.
const STAMP: &str = "testmods-1";

/// Builds (or finds cached) the test modules for `kernel`; returns (name in the VM, file).
pub fn build(kernel: &Kernel, vm_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let out = vm_dir.join("build/testmods").join(&kernel.series);
    let src = workspace_root().join(SOURCES);
    let stamp = format!(
        "{STAMP} {} {}\n{}",
        kernel.release,
        kernel.version,
        sources_key(&src)?
    );
    let files = || -> Vec<(String, PathBuf)> {
        let mut v: Vec<(String, PathBuf)> = MODULES
            .iter()
            .map(|m| (format!("{m}.ko"), out.join(format!("{m}.ko"))))
            .collect();
        v.push(("kmt_plain.ko.xz".into(), out.join("kmt_plain.ko.xz")));
        v
    };
    if fs::read_to_string(out.join("stamp")).ok().as_deref() == Some(stamp.as_str())
        && files().iter().all(|(_, p)| p.is_file())
    {
        return Ok(files());
    }
    let headers = headers(kernel, vm_dir)?;
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    for e in fs::read_dir(&src).with_context(|| format!("reading {}", src.display()))? {
        let p = e?.path();
        if let Some(name) = p.file_name() {
            fs::copy(&p, out.join(name))?;
        }
    }
    eprintln!("xtask vm: building test modules for {}", kernel.label());
    run(Command::new("make")
        .arg("-C")
        .arg(&headers)
        .arg(format!("M={}", out.display()))
        .args([
            "CC=gcc",
            "HOSTCC=gcc",
            "CROSS_COMPILE=",
            "CONFIG_CC_HAS_MIN_FUNCTION_ALIGNMENT=",
            "CONFIG_DEBUG_INFO_BTF_MODULES=",
            "-j2",
        ]))
    .with_context(|| format!("building the test modules against {}", headers.display()))?;
    run(Command::new("xz")
        .args(["-k", "-f", "--check=crc32", "--lzma2=dict=1MiB"])
        .arg(out.join("kmt_plain.ko")))
    .context("xz (apt-get install xz-utils)")?;
    fs::write(out.join("stamp"), stamp)?;
    Ok(files())
}

fn sources_key(src: &Path) -> Result<String> {
    let mut names: Vec<(String, u64)> = Vec::new();
    for e in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let e = e?;
        let len = fs::read(e.path())?
            .iter()
            .map(|&b| u64::from(b))
            .sum::<u64>();
        names.push((e.file_name().to_string_lossy().into_owned(), len));
    }
    names.sort();
    Ok(format!("{names:?}"))
}

/// The kernel's headers directory (what `make -C` takes), fetched and prepared once.
fn headers(kernel: &Kernel, vm_dir: &Path) -> Result<PathBuf> {
    let base = vm_dir.join("kbuild").join(&kernel.series);
    let root = base.join("root");
    let flavour = format!("linux-headers-{}", kernel.release);
    let dir = root.join("usr/src").join(&flavour);
    let ready = base.join("ready");
    if fs::read_to_string(&ready).ok().as_deref() == Some(kernel.version.as_str()) && dir.is_dir() {
        return Ok(dir);
    }
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&root)?;
    let apt = Apt::new(vm_dir.join("apt"));
    let abi = kernel
        .release
        .strip_suffix("-cloud-amd64")
        .with_context(|| format!("unexpected kernel release {}", kernel.release))?;
    let suite = select(&kernel.series)?.suite;
    let in_suite = |c: &Candidate| c.suite == suite || c.suite == format!("{suite}-security");
    if apt.madison(std::slice::from_ref(&flavour))?.is_empty() {
        // Lists not there yet (kernels came from the cache): read them.
        let suites: Vec<&str> = MATRIX.iter().map(|s| s.suite).collect();
        apt.update(&apt::sources_list(&apt::system_mirror(), &suites))?;
    }
    let exact = |name: &str| -> Result<Candidate> {
        apt.madison(&[name.to_string()])?
            .into_iter()
            .find(|c| c.version == kernel.version)
            .with_context(|| format!("no {name} {} in the archive", kernel.version))
    };
    let mut wanted = vec![
        exact(&flavour)?,
        exact(&format!("linux-headers-{abi}-common"))?,
    ];
    // 6.12 names kbuild after the ABI, 5.10 and 6.1 after the series; the newest of the
    // kernel's own suite serves (kbuild's programs do not change within a series).
    let kbuild: Vec<Candidate> = apt
        .madison(&[
            format!("linux-kbuild-{abi}"),
            format!("linux-kbuild-{}", kernel.series),
        ])?
        .into_iter()
        .filter(in_suite)
        .collect();
    wanted.push(
        apt::newest_first(kbuild)?
            .into_iter()
            .next()
            .with_context(|| format!("no linux-kbuild package for {} in {suite}", kernel.series))?,
    );
    let debs = base.join("debs");
    for c in &wanted {
        eprintln!("xtask vm: fetching {} {}", c.package, c.version);
        let deb = apt.download(c, &debs)?;
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    }
    // The flavour's Makefile includes the common one by its absolute path.
    let mk = dir.join("Makefile");
    let text = fs::read_to_string(&mk)?;
    fs::write(
        &mk,
        text.replace("/usr/src/", &format!("{}/", root.join("usr/src").display())),
    )?;
    wrap_newer_glibc(&root, &apt, suite, &base)?;
    let _ = fs::remove_dir_all(&debs);
    fs::write(&ready, &kernel.version)?;
    Ok(dir)
}

/// "2.36" from `getconf GNU_LIBC_VERSION` ("glibc 2.36").
fn host_glibc() -> Result<(u32, u32)> {
    let v = output(Command::new("getconf").arg("GNU_LIBC_VERSION"))?;
    parse_version(v.split_whitespace().last().unwrap_or_default())
        .with_context(|| format!("cannot read the host's glibc version from {v:?}"))
}

fn parse_version(s: &str) -> Option<(u32, u32)> {
    let mut it = s.split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The newest GLIBC_x.y symbol version an ELF file needs.
fn needs_glibc(file: &Path) -> Option<(u32, u32)> {
    let text = output(Command::new("objdump").arg("-T").arg(file)).ok()?;
    text.split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(parse_version)
        .max()
}

fn is_elf(p: &Path) -> bool {
    fs::read(p).is_ok_and(|b| b.starts_with(b"\x7fELF"))
}

fn elf_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            elf_files(&p, out);
        } else if m.is_file() && is_elf(&p) {
            out.push(p);
        }
    }
}

/// Runs kbuild programs that need a newer glibc than the host's through their own release's
/// loader and libraries.
fn wrap_newer_glibc(root: &Path, apt: &Apt, suite: &str, base: &Path) -> Result<()> {
    let host = host_glibc()?;
    let mut elves = Vec::new();
    elf_files(&root.join("usr/lib"), &mut elves);
    let newer: Vec<PathBuf> = elves
        .into_iter()
        .filter(|p| needs_glibc(p).is_some_and(|v| v > host))
        .collect();
    if newer.is_empty() {
        return Ok(());
    }
    let runtime = base.join("runtime");
    let debs = base.join("debs");
    for group in [
        &["libc6"][..],
        &["libelf1t64", "libelf1"],
        &["zlib1g"],
        &["libzstd1"],
    ] {
        let cands: Vec<Candidate> = apt
            .madison(&group.iter().map(|s| s.to_string()).collect::<Vec<_>>())?
            .into_iter()
            .filter(|c| c.suite == suite || c.suite == format!("{suite}-security"))
            .collect();
        let Some(c) = apt::newest_first(cands)?.into_iter().next() else {
            bail!(
                "no {} in {suite} to run its kbuild programs with",
                group.join("/")
            );
        };
        let deb = apt.download(&c, &debs)?;
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&runtime))?;
    }
    let libs = runtime.join("usr/lib/x86_64-linux-gnu");
    let loader = libs.join("ld-linux-x86-64.so.2");
    if !loader.is_file() {
        bail!("{suite}'s libc6 has no {}", loader.display());
    }
    for bin in newer {
        let real = bin.with_extension("real-glibc");
        fs::rename(&bin, &real)?;
        fs::write(
            &bin,
            format!(
                "#!/bin/sh\n# {suite}'s glibc: this program needs a newer one than the host's.\nexec '{}' --library-path '{}' '{}' \"$@\"\n",
                loader.display(),
                libs.display(),
                real.display()
            ),
        )?;
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
        eprintln!("xtask vm: {} runs with {suite}'s glibc", bin.display());
    }
    Ok(())
}

/// kmt-load (tests/vm/tools/kmt-load.c), static: the module syscalls with nothing in between.
pub fn build_loader(vm_dir: &Path) -> Result<PathBuf> {
    let src = workspace_root().join("tests/vm/tools/kmt-load.c");
    let out = vm_dir.join("build/kmt-load");
    let m = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    if out.is_file() && m(&out) > m(&src) {
        return Ok(out);
    }
    fs::create_dir_all(vm_dir.join("build"))?;
    run(Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(&out)
        .arg(&src))
    .context("compiling tests/vm/tools/kmt-load.c (apt-get install gcc libc6-dev)")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_versions_compare_numerically() {
        assert_eq!(parse_version("2.36"), Some((2, 36)));
        assert!(parse_version("2.38").unwrap() > parse_version("2.4").unwrap());
        assert_eq!(parse_version("x"), None);
    }
}
