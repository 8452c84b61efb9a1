//! The QEMU backend: `qemu-system-x86_64` (`-M pc`, virtio-pci disk and NIC on the sandbox's tap)
//! driven over QMP. A snapshot is QMP `stop` plus a migration into a file; a restore starts QEMU
//! with `-incoming defer`, feeds it the file, and `cont`s. QEMU runs in the sandbox's network
//! namespace (`ip netns exec`), in a process group of its own so it outlives an agent restart.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;

use crate::accel::Accel;
use crate::qmp::QmpClient;
use crate::{MachineSpec, SnapshotFiles, VmProcess, Vmm, VmmError, VmmFuture, process};

/// How long a new QEMU may take to open its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long loading a snapshot may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long writing a snapshot may take.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

/// QEMU, with the accelerator chosen for this host.
#[derive(Debug, Clone)]
pub struct Qemu {
    binary: PathBuf,
    accel: Accel,
}

impl Qemu {
    pub fn new(binary: impl Into<PathBuf>, accel: Accel) -> Self {
        Self {
            binary: binary.into(),
            accel,
        }
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The command line for a machine; `incoming` adds `-incoming defer` (a restore).
    pub fn arguments(
        &self,
        machine: &MachineSpec,
        workdir: &Path,
        incoming: bool,
    ) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => push(&["-accel", "tcg,tb-size=64", "-cpu", "max"]),
        }
        push(&[
            "-M",
            "pc",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ]);
        push(&[
            "-m",
            &machine.memory_mib.to_string(),
            "-smp",
            &machine.vcpus.to_string(),
        ]);
        let path = |p: &Path| p.display().to_string();
        push(&[
            "-chardev",
            &format!(
                "file,id=console,path={},append=on",
                path(&workdir.join("console.log"))
            ),
            "-serial",
            "chardev:console",
        ]);
        push(&["-kernel", &path(&machine.kernel)]);
        if let Some(initrd) = &machine.initrd {
            push(&["-initrd", &path(initrd)]);
        }
        push(&["-append", &machine.cmdline]);
        push(&[
            "-drive",
            &format!(
                "file={},if=none,id=disk0,format=qcow2,cache=writeback",
                path(&machine.disk)
            ),
            "-device",
            "virtio-blk-pci,drive=disk0",
        ]);
        push(&[
            "-netdev",
            &format!("tap,id=net0,ifname={},script=no,downscript=no", machine.tap),
            "-device",
            &format!("virtio-net-pci,netdev=net0,mac={}", machine.mac),
        ]);
        push(&[
            "-qmp",
            &format!(
                "unix:{},server=on,wait=off",
                path(&workdir.join("qmp.sock"))
            ),
        ]);
        if incoming {
            push(&["-incoming", "defer"]);
        }
        args
    }

    async fn spawn(
        &self,
        machine: &MachineSpec,
        workdir: &Path,
        incoming: bool,
    ) -> Result<VmProcess, VmmError> {
        std::fs::create_dir_all(workdir)
            .map_err(|error| VmmError::io(format!("creating {}", workdir.display()), error))?;
        let socket = workdir.join("qmp.sock");
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(workdir.join("vmm.log"))
            .map_err(|error| VmmError::io("opening the VMM log", error))?;
        let log_err = log
            .try_clone()
            .map_err(|error| VmmError::io("opening the VMM log", error))?;
        let mut command = match &machine.netns {
            Some(namespace) => {
                let mut command = std::process::Command::new("ip");
                command.args(["netns", "exec", namespace]).arg(&self.binary);
                command
            }
            None => std::process::Command::new(&self.binary),
        };
        command
            .args(self.arguments(machine, workdir, incoming))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        let mut child = command
            .spawn()
            .map_err(|error| VmmError::io(format!("starting {}", self.binary.display()), error))?;
        let pid = child.id();
        // Reaps QEMU when it exits while this process is its parent.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let start_time = process::start_time(pid).unwrap_or(0);
        let vm = VmProcess {
            backend: "qemu".into(),
            pid,
            start_time,
            workdir: workdir.to_path_buf(),
            control_socket: socket.clone(),
        };
        match QmpClient::connect_when_ready(&socket, START_TIMEOUT).await {
            Ok(_) => Ok(vm),
            Err(error) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                Err(VmmError::Exited(format!(
                    "QEMU did not start ({error}): {}",
                    log_tail(&vm.vmm_log())
                )))
            }
        }
    }

    async fn qmp(&self, vm: &VmProcess) -> Result<QmpClient, VmmError> {
        if !vm.is_alive() {
            return Err(VmmError::Exited(format!(
                "QEMU (pid {}) is not running: {}",
                vm.pid,
                log_tail(&vm.vmm_log())
            )));
        }
        QmpClient::connect_when_ready(&vm.control_socket, Duration::from_secs(5)).await
    }
}

/// The last lines of a log, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.is_empty() {
        "it logged nothing".into()
    } else {
        tail
    }
}

/// Quotes a path for the shell QEMU's `exec:` migration runs.
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

async fn wait_for(
    qmp: &mut QmpClient,
    operation: &str,
    timeout: Duration,
    mut done: impl FnMut(&serde_json::Value) -> Option<Result<(), String>>,
    command: &str,
) -> Result<(), VmmError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let answer = qmp.execute(command, None).await?;
        match done(&answer) {
            Some(Ok(())) => return Ok(()),
            Some(Err(message)) => {
                return Err(VmmError::Refused {
                    command: operation.to_string(),
                    message,
                });
            }
            None => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(VmmError::Timeout {
                operation: operation.to_string(),
                seconds: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn migration_state(answer: &serde_json::Value) -> Option<Result<(), String>> {
    match answer.get("status").and_then(serde_json::Value::as_str) {
        Some("completed") => Some(Ok(())),
        Some("failed") | Some("cancelled") => Some(Err(answer
            .get("error-desc")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("migration failed")
            .to_string())),
        _ => None,
    }
}

impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn boot<'a>(&'a self, machine: &'a MachineSpec, workdir: &'a Path) -> VmmFuture<'a, VmProcess> {
        Box::pin(self.spawn(machine, workdir, false))
    }

    fn restore<'a>(
        &'a self,
        machine: &'a MachineSpec,
        snapshot: &'a SnapshotFiles,
        workdir: &'a Path,
    ) -> VmmFuture<'a, VmProcess> {
        Box::pin(async move {
            if !snapshot.memory.is_file() {
                return Err(VmmError::Invalid(format!(
                    "the snapshot {} is missing",
                    snapshot.memory.display()
                )));
            }
            let vm = self.spawn(machine, workdir, true).await?;
            let result = async {
                let mut qmp = self.qmp(&vm).await?;
                qmp.execute(
                    "migrate-incoming",
                    Some(json!({ "uri": format!("exec:cat {}", shell_quote(&snapshot.memory)) })),
                )
                .await?;
                wait_for(
                    &mut qmp,
                    "loading the snapshot",
                    RESTORE_TIMEOUT,
                    |status| match status.get("status").and_then(serde_json::Value::as_str) {
                        Some("inmigrate") => None,
                        Some("paused") | Some("running") => Some(Ok(())),
                        Some(other) => Some(Err(format!("the guest is {other} after loading"))),
                        None => None,
                    },
                    "query-status",
                )
                .await?;
                if qmp.status().await? != "running" {
                    qmp.execute("cont", None).await?;
                }
                Ok::<_, VmmError>(())
            }
            .await;
            match result {
                Ok(()) => Ok(vm),
                Err(error) => {
                    let _ = self.destroy(&vm).await;
                    Err(error)
                }
            }
        })
    }

    fn pause<'a>(&'a self, vm: &'a VmProcess) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            self.qmp(vm).await?.execute("stop", None).await?;
            Ok(())
        })
    }

    fn resume<'a>(&'a self, vm: &'a VmProcess) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            self.qmp(vm).await?.execute("cont", None).await?;
            Ok(())
        })
    }

    fn snapshot<'a>(
        &'a self,
        vm: &'a VmProcess,
        memory_file: &'a Path,
    ) -> VmmFuture<'a, SnapshotFiles> {
        Box::pin(async move {
            let mut qmp = self.qmp(vm).await?;
            let status = qmp.status().await?;
            if status != "paused" {
                return Err(VmmError::Invalid(format!(
                    "a snapshot needs a paused VM; this one is {status}"
                )));
            }
            let temp = memory_file.with_extension("partial");
            let _ = std::fs::remove_file(&temp);
            qmp.execute(
                "migrate-set-parameters",
                Some(json!({ "max-bandwidth": 64u64 << 30 })),
            )
            .await?;
            qmp.execute(
                "migrate",
                Some(json!({ "uri": format!("exec:cat > {}", shell_quote(&temp)) })),
            )
            .await?;
            wait_for(
                &mut qmp,
                "writing the snapshot",
                SNAPSHOT_TIMEOUT,
                migration_state,
                "query-migrate",
            )
            .await?;
            // Guest memory holds the sandbox's secrets: readable by root only.
            std::fs::set_permissions(&temp, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|error| VmmError::io("protecting the snapshot", error))?;
            std::fs::rename(&temp, memory_file)
                .map_err(|error| VmmError::io("putting the snapshot in place", error))?;
            let bytes = std::fs::metadata(memory_file).map(|m| m.len()).unwrap_or(0);
            Ok(SnapshotFiles {
                memory: memory_file.to_path_buf(),
                bytes,
            })
        })
    }

    fn destroy<'a>(&'a self, vm: &'a VmProcess) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            if vm.is_alive() {
                if let Ok(Ok(mut qmp)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    QmpClient::connect(&vm.control_socket),
                )
                .await
                {
                    let _ = tokio::time::timeout(Duration::from_secs(1), qmp.execute("quit", None))
                        .await;
                }
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                while vm.is_alive() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if vm.is_alive() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(vm.pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                    while vm.is_alive() && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            if vm.is_alive() {
                return Err(VmmError::Invalid(format!(
                    "QEMU (pid {}) would not die",
                    vm.pid
                )));
            }
            let _ = std::fs::remove_file(&vm.control_socket);
            Ok(())
        })
    }

    fn adopt<'a>(&'a self, vm: &'a VmProcess) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            let mut qmp = self.qmp(vm).await?;
            qmp.status().await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineSpec {
        MachineSpec {
            kernel: "/k/vmlinuz".into(),
            initrd: Some("/k/initrd.img".into()),
            cmdline: "console=ttyS0".into(),
            disk: "/d/disk.qcow2".into(),
            memory_mib: 512,
            vcpus: 1,
            netns: Some("ns-1".into()),
            tap: "tap0".into(),
            mac: "02:fc:00:00:00:05".into(),
        }
    }

    #[test]
    fn command_line_names_every_device_and_the_incoming_mode() {
        let qemu = Qemu::new("qemu-system-x86_64", Accel::Tcg);
        let args: Vec<String> = qemu
            .arguments(&machine(), Path::new("/w"), true)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(
            joined.contains("-accel tcg,tb-size=64 -cpu max"),
            "{joined}"
        );
        assert!(joined.contains("-m 512 -smp 1"));
        assert!(joined.contains("file=/d/disk.qcow2,if=none,id=disk0,format=qcow2"));
        assert!(joined.contains("virtio-net-pci,netdev=net0,mac=02:fc:00:00:00:05"));
        assert!(joined.contains("tap,id=net0,ifname=tap0,script=no,downscript=no"));
        assert!(joined.contains("unix:/w/qmp.sock,server=on,wait=off"));
        assert!(joined.ends_with("-incoming defer"));
        let boot = Qemu::new("q", Accel::Kvm).arguments(&machine(), Path::new("/w"), false);
        assert!(!boot.iter().any(|a| a == "-incoming"));
        assert!(boot.iter().any(|a| a == "host"));
    }

    #[test]
    fn paths_are_quoted_for_the_migration_shell() {
        assert_eq!(shell_quote(Path::new("/a b/c")), "'/a b/c'");
        assert_eq!(shell_quote(Path::new("/it's")), "'/it'\\''s'");
    }
}
