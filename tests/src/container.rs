//! Real OCI containers with runc and a busybox-static rootfs.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

pub struct Bundle {
    pub dir: tempfile::TempDir,
    pub name: String,
}

impl Bundle {
    /// A bundle whose rootfs holds busybox (with sh, insmod, rmmod, sleep) and `files`.
    pub fn new(
        name: &str,
        cgroups_path: &str,
        env: &[&str],
        args: &[&str],
        files: &[(&str, &[u8])],
    ) -> Bundle {
        let dir = tempfile::tempdir().expect("tempdir");
        let rootfs = dir.path().join("rootfs");
        let bin = rootfs.join("bin");
        std::fs::create_dir_all(&bin).expect("mkdir rootfs/bin");
        std::fs::copy(busybox(), bin.join("busybox")).expect("copy busybox");
        for applet in ["sh", "insmod", "rmmod", "modprobe", "sleep", "cat", "env"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet symlink");
        }
        for (path, content) in files {
            let p = rootfs.join(path.trim_start_matches('/'));
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).expect("mkdir");
            }
            std::fs::write(p, content).expect("write rootfs file");
        }
        let out = Command::new("runc")
            .arg("spec")
            .current_dir(dir.path())
            .output()
            .expect("runc spec");
        assert!(out.status.success(), "runc spec: {out:?}");
        let cfg_path = dir.path().join("config.json");
        let mut cfg: Value =
            serde_json::from_slice(&std::fs::read(&cfg_path).expect("read config"))
                .expect("parse config");
        cfg["process"]["terminal"] = Value::Bool(false);
        cfg["process"]["args"] = args.iter().map(|a| Value::from(*a)).collect();
        if let Some(e) = cfg["process"]["env"].as_array_mut() {
            e.extend(env.iter().map(|v| Value::from(*v)));
        }
        cfg["root"]["readonly"] = Value::Bool(false);
        cfg["linux"]["cgroupsPath"] = Value::from(cgroups_path);
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).expect("json"))
            .expect("write config");
        Bundle {
            dir,
            name: name.to_string(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Adds OCI annotations to the bundle's config.json (as a CRI runtime records them).
    pub fn annotate(&self, pairs: &[(&str, &str)]) {
        let cfg_path = self.path().join("config.json");
        let mut cfg: Value =
            serde_json::from_slice(&std::fs::read(&cfg_path).expect("read config"))
                .expect("parse config");
        if !cfg["annotations"].is_object() {
            cfg["annotations"] = Value::Object(Default::default());
        }
        for (k, v) in pairs {
            cfg["annotations"][*k] = Value::from(*v);
        }
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).expect("json"))
            .expect("write config");
    }

    /// `runc run` in the foreground; returns when the container exits.
    pub fn run(&self) -> Output {
        let out = Command::new("runc")
            .args(["run", "--bundle"])
            .arg(self.path())
            .arg(&self.name)
            .output()
            .expect("runc run");
        let _ = Command::new("runc")
            .args(["delete", "-f", &self.name])
            .output();
        out
    }
}

fn busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("busybox-static is not installed: `cargo xtask setup` installs it")
}

/// A random 64-hex container ID.
pub fn random_id() -> String {
    let mut bytes = [0u8; 32];
    getrandom(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("read /dev/urandom");
}
