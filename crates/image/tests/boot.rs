//! Boots the built base image under QEMU (TCG here; KVM where it works) with its network on a
//! tap device in a namespace of the test's own, waits for envd's `/health`, runs commands through
//! envd's process service (Python, `sudo -u user`), and powers the guest off cleanly.
//!
//! Needs the image (`wrenn image build`, which `scripts/test.sh` runs first), QEMU and root. When
//! one is missing the test says so and passes, unless `WRENN_REQUIRE_PREREQUISITES=1` (set by
//! scripts/test.sh), where it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wrenn_connect::Codec;
use wrenn_connect::client::{ConnectClient, HttpVersion};
use wrenn_image::Manifest;
use wrenn_testkit::{Ran, as_user, run_script};
use wrenn_vmm::accel::Accel;

const GUEST: &str = "169.254.0.21";
const TAP_ADDRESS: &str = "169.254.0.22/30";

fn image_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("WRENN_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(wrenn_image::default_image_dir);
    wrenn_testkit::vm_prerequisites(dir, "the boot test")
}

/// A network namespace with `tap0` at the guest's gateway address, deleted on drop.
struct TapNamespace {
    name: String,
}

impl TapNamespace {
    fn create() -> TapNamespace {
        let name = format!("wrenn-boot-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let namespace = TapNamespace { name };
        namespace.ip(&["netns", "add", &namespace.name], false);
        namespace.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"], true);
        namespace.ip(&["addr", "add", TAP_ADDRESS, "dev", "tap0"], true);
        namespace.ip(&["link", "set", "tap0", "up"], true);
        namespace.ip(&["link", "set", "lo", "up"], true);
        namespace
    }

    fn ip(&self, args: &[&str], inside: bool) {
        let mut command = Command::new("ip");
        if inside {
            command.args(["-n", &self.name]);
        }
        let status = command.args(args).status().expect("running ip");
        assert!(status.success(), "ip {args:?} failed");
    }

    /// Runs `work` on a thread that has entered the namespace, with a runtime of its own.
    fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
    ) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let namespace = std::fs::File::open(&path).expect("opening the namespace");
            nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(work())
        })
        .join()
        .expect("the namespace thread panicked")
    }
}

impl Drop for TapNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A QEMU process, killed on drop if still running.
struct Qemu {
    child: Child,
    console: PathBuf,
}

impl Qemu {
    fn boot(image: &Path, manifest: &Manifest, namespace: &TapNamespace, work: &Path) -> Qemu {
        let overlay = work.join("disk.qcow2");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(image.join("rootfs.ext4"))
            .arg(&overlay)
            .status()
            .unwrap();
        assert!(status.success(), "qemu-img create failed");
        let console = work.join("console.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &namespace.name, "qemu-system-x86_64"])
            .args(wrenn_vmm::qemu::machine_arguments(Accel::Tcg, 512, 1))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(image.join("vmlinuz"))
            .arg("-initrd")
            .arg(image.join("initrd.img"))
            .arg("-append")
            .arg(&manifest.kernel.cmdline)
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
            .args(["-netdev", "tap,id=net0,ifname=tap0,script=no,downscript=no"])
            .args(["-device", "virtio-net-pci,netdev=net0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting QEMU");
        Qemu { child, console }
    }

    fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `script` as `user` through the guest's envd.
async fn run(client: &ConnectClient, user: &str, script: &str) -> Ran {
    run_script(client, &as_user(user, None), script).await
}

async fn wait_for_health(deadline: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let url = format!("http://{GUEST}:{}/health", wrenn_image::ENVD_PORT);
    while started.elapsed() < deadline {
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            let stream = tokio::net::TcpStream::connect((GUEST, wrenn_image::ENVD_PORT)).await?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(std::io::Error::other)?;
            tokio::spawn(connection);
            let request = http::Request::get(&url)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let response = sender
                .send_request(request)
                .await
                .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>(response.status())
        })
        .await;
        if let Ok(Ok(status)) = attempt
            && status.is_success()
        {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("envd did not answer /health within {deadline:?}"))
}

#[test]
fn base_image_boots_runs_commands_through_envd_and_powers_off() {
    let Some(image) = image_dir() else { return };
    let manifest = Manifest::read(&image).expect("reading the manifest");
    let work = tempfile::tempdir().unwrap();
    let namespace = TapNamespace::create();
    let mut qemu = Qemu::boot(&image, &manifest, &namespace, work.path());

    let health = namespace.run(|| Box::pin(wait_for_health(Duration::from_secs(240))));
    if let Err(reason) = health {
        panic!("{reason}; guest console:\n{}", qemu.console_tail());
    }
    let (python, sudo, release) = namespace.run(|| {
        Box::pin(async {
            let url = format!("http://{GUEST}:{}", wrenn_image::ENVD_PORT);
            let client = ConnectClient::new(url, HttpVersion::Http1, Codec::Json);
            let python = run(&client, "user", "python3 -c 'print(1+1)'").await;
            let sudo = run(&client, "user", "sudo -u user id; sudo id -u; echo $HOME").await;
            let release = run(
                &client,
                "root",
                "uname -r; cat /proc/1/comm; ls /sys/fs/cgroup/wrenn",
            )
            .await;
            (python, sudo, release)
        })
    });
    assert_eq!(python.stdout, "2\n", "python3 in the guest: {python:?}");
    assert_eq!(python.exit_code, Some(0));
    assert!(
        sudo.stdout.starts_with("uid=1000(user) gid=1000(user)") && sudo.stdout.contains("(sudo)"),
        "sudo -u user id: {sudo:?}"
    );
    assert!(
        sudo.stdout.contains("\n0\n/home/user\n"),
        "passwordless sudo and home: {sudo:?}"
    );
    let mut lines = release.stdout.lines();
    assert_eq!(
        lines.next(),
        Some(manifest.kernel.release.as_str()),
        "{release:?}"
    );
    assert_eq!(lines.next(), Some("envd"), "envd is PID 1: {release:?}");
    assert!(
        release.stdout.contains("user"),
        "envd's cgroups exist: {release:?}"
    );

    // A clean shutdown: envd (PID 1) ends everything, remounts / read-only and powers off.
    namespace.run(|| {
        Box::pin(async {
            let url = format!("http://{GUEST}:{}", wrenn_image::ENVD_PORT);
            let client = ConnectClient::new(url, HttpVersion::Http1, Codec::Json);
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                run(&client, "user", "sudo poweroff"),
            )
            .await;
        })
    });
    let status = qemu.wait_exit(Duration::from_secs(60));
    let console = std::fs::read_to_string(&qemu.console).unwrap_or_default();
    assert!(
        status.is_some_and(|status| status.success()),
        "QEMU did not exit cleanly after poweroff ({status:?}); console:\n{}",
        qemu.console_tail()
    );
    assert!(
        console.contains("reboot: Power down"),
        "no power-down in the console:\n{console}"
    );
    assert!(!console.contains("Kernel panic"), "{console}");
    // The root filesystem was left clean: journal flushed, no recovery needed on the next mount.
    let raw = work.path().join("disk.raw");
    let converted = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(work.path().join("disk.qcow2"))
        .arg(&raw)
        .status()
        .unwrap();
    assert!(converted.success());
    let header = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&raw)
        .output()
        .unwrap();
    let header = String::from_utf8_lossy(&header.stdout);
    let state = header
        .lines()
        .find(|line| line.starts_with("Filesystem state:"))
        .unwrap_or("");
    assert!(
        state.ends_with(" clean"),
        "root filesystem state after poweroff: {state:?}"
    );
    let features = header
        .lines()
        .find(|line| line.starts_with("Filesystem features:"))
        .unwrap_or("");
    assert!(!features.contains("needs_recovery"), "{features}");
}
