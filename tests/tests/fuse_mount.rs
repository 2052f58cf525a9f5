//! nbdfuse + loop device + ext4: a real filesystem on an evsd volume.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use evsd_e2e::*;

/// Tears down (in reverse order) whatever was set up, even on panic.
#[derive(Default)]
struct Guard {
    nbdfuse: Option<Child>,
    fuse_dir: Option<PathBuf>,
    loopdev: Option<String>,
    mounted: Option<PathBuf>,
}

impl Guard {
    // Each record is cleared only once its command succeeded: when one fails (the test
    // panics), Drop still takes the mount, loop device or FUSE mount down.
    fn umount(&mut self) {
        if let Some(m) = &self.mounted {
            run("umount", &[m.as_os_str()]);
            self.mounted = None;
        }
    }
    fn detach_loop(&mut self) {
        if let Some(l) = &self.loopdev {
            run("losetup", &["-d", l.as_str()]);
            self.loopdev = None;
        }
    }
    fn unmount_fuse(&mut self) {
        if let Some(dir) = &self.fuse_dir {
            run("fusermount3", &["-u", dir.to_str().unwrap()]);
            self.fuse_dir = None;
        }
        if let Some(mut c) = self.nbdfuse.take() {
            // nbdfuse exits by itself once unmounted.
            let ok = wait_until(Duration::from_secs(20), || {
                c.try_wait().ok().flatten().is_some()
            });
            if !ok {
                let _ = c.kill();
                let _ = c.wait();
                panic!("nbdfuse did not exit after fusermount3 -u");
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        if let Some(l) = self.loopdev.take() {
            let _ = Command::new("losetup").args(["-d", &l]).status();
        }
        if let Some(dir) = self.fuse_dir.take() {
            let _ = Command::new("fusermount3").arg("-u").arg(&dir).status();
            let _ = Command::new("fusermount3").arg("-uz").arg(&dir).status();
        }
        if let Some(mut c) = self.nbdfuse.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn files() -> Vec<(String, Vec<u8>)> {
    let mut rng = Prng::new(42);
    let mut v = Vec::new();
    for (i, size) in [0usize, 1, 4095, 4096, 65537, 1 << 20, 3 << 20, 12345]
        .iter()
        .enumerate()
    {
        v.push((format!("file-{i}.bin"), rng.bytes(*size)));
    }
    v
}

fn mount_and_check(uri: &str) {
    require_root("fuse_mount");
    for t in [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "sync",
    ] {
        require_tool(t);
    }
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: this test needs FUSE"
    );
    let tmp = tempdir();
    let fuse_dir = tmp.path().join("fuse");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&fuse_dir).unwrap();
    fs::create_dir(&mnt).unwrap();
    let pidfile = tmp.path().join("nbdfuse.pid");
    let log = fs::File::create(tmp.path().join("nbdfuse.log")).unwrap();

    let mut g = Guard::default();
    let child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(&fuse_dir)
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn nbdfuse");
    g.nbdfuse = Some(child);
    g.fuse_dir = Some(fuse_dir.clone());
    let nbdfile = fuse_dir.join("nbd");
    let up = wait_until(Duration::from_secs(20), || {
        fs::metadata(&pidfile).map(|m| m.len() > 0).unwrap_or(false) && nbdfile.exists()
    });
    assert!(
        up,
        "nbdfuse did not come up: {}",
        fs::read_to_string(tmp.path().join("nbdfuse.log")).unwrap_or_default()
    );
    assert_eq!(
        fs::metadata(&nbdfile).unwrap().len(),
        256 * MIB,
        "FUSE file size"
    );

    let dev = run_stdout("losetup", &["-f", "--show", nbdfile.to_str().unwrap()])
        .trim()
        .to_string();
    assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
    g.loopdev = Some(dev.clone());

    run("mkfs.ext4", &["-q", "-F", &dev]);
    run("mount", &[dev.as_str(), mnt.to_str().unwrap()]);
    g.mounted = Some(mnt.clone());
    let files = files();
    fs::create_dir(mnt.join("sub")).unwrap();
    for (name, data) in &files {
        fs::write(mnt.join("sub").join(name), data).unwrap();
    }
    run("sync", &[] as &[&str]);
    g.umount();

    // fsck must find a clean filesystem, then remount and compare.
    run("e2fsck", &["-f", "-n", &dev]);
    run("mount", &[dev.as_str(), mnt.to_str().unwrap()]);
    g.mounted = Some(mnt.clone());
    assert_files(&mnt, "after remount");
    g.umount();
    g.detach_loop();
    g.unmount_fuse();
}

#[test]
fn ext4_on_nbdfuse_loop_device() {
    let mut d = Daemon::start(DaemonOpts::new().volume("fs:256M"));
    mount_and_check(&d.unix_uri("fs"));
    // The filesystem is still intact on the volume after a daemon restart.
    d.restart();
    require_tool("nbdcopy");
    let tmp = tempdir();
    let img = tmp.path().join("fs.img");
    run("nbdcopy", &[&d.tcp_uri("fs"), img.to_str().unwrap()]);
    run("e2fsck", &["-f", "-n", img.to_str().unwrap()]);
    // And its files, read from what the restarted daemon serves (not from any cache of the
    // first mount's loop device or FUSE file).
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut g = Guard::default();
    run(
        "mount",
        &[
            "-o",
            "loop,ro",
            img.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ],
    );
    g.mounted = Some(mnt.clone());
    assert_files(&mnt, "in the image copied after the restart");
    g.umount();
}

/// Every file of [`files`] is under `mnt/sub` with its content.
fn assert_files(mnt: &Path, when: &str) {
    for (name, data) in &files() {
        let got = fs::read(mnt.join("sub").join(name)).unwrap();
        assert!(
            got == *data,
            "{name}: content differs {when} ({} vs {} bytes)",
            got.len(),
            data.len()
        );
    }
}
