//! The QEMU backend: `qemu-system-x86_64` (`-M pc`, virtio-pci disk and NIC on the sandbox's tap)
//! driven over QMP. A snapshot is QMP `stop` plus a migration into a file; a restore starts QEMU
//! with `-incoming defer`, feeds it the file, and `cont`s. QEMU runs in the sandbox's network
//! namespace (`ip netns exec`), in a process group of its own so it outlives an agent restart.
//!
//! QEMU runs under its seccomp sandbox (`-sandbox on`, with obsolete system calls, privilege
//! changes, process spawning and resource control denied): a guest that breaks out of the
//! device models still cannot start a program. So migrations go through descriptors the agent
//! opens and hands over QMP (`fd:` URIs), never an `exec:` shell. The console goes to a socket
//! the agent copies into a bounded log ([`crate::console`]).

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;

use crate::accel::Accel;
use crate::launch::{HandedFd, Launch};
use crate::qcow2::Layer;
use crate::qmp::QmpClient;
use crate::{
    GuestMemory, MachineSpec, SnapshotFiles, VmProcess, Vmm, VmmError, VmmFuture, process,
};

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

/// The start of every QEMU command line wrenn writes: the accelerator and the CPU model that
/// goes with it, a `pc` machine without default devices, user configuration or window, that
/// does not reboot (a guest's end is QEMU's), with `memory_mib` of memory and `vcpus` CPUs.
pub fn machine_arguments(accel: Accel, memory_mib: u32, vcpus: u32) -> Vec<OsString> {
    let accelerator: &[&str] = match accel {
        Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
        Accel::Tcg => &["-accel", "tcg,tb-size=64", "-cpu", "max"],
    };
    let machine = [
        "-M",
        "pc",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
    ];
    let size = [
        "-m".to_string(),
        memory_mib.to_string(),
        "-smp".to_string(),
        vcpus.to_string(),
    ];
    accelerator
        .iter()
        .chain(&machine)
        .map(OsString::from)
        .chain(size.into_iter().map(OsString::from))
        .collect()
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

    /// The command line for a machine whose disk is `layers` (top first; see
    /// [`crate::qcow2::chain`]); `restoring` (the snapshot a restore loads) adds
    /// `-incoming defer` and lays the memory out as the snapshot's was. Every file and socket
    /// is a descriptor the agent hands over (see [`HandedFd`]); `workdir` only names the
    /// process (`-name`), so that a restarted agent can tell its VMMs apart.
    pub fn arguments(
        &self,
        machine: &MachineSpec,
        workdir: &Path,
        restoring: Option<&SnapshotFiles>,
        layers: &[Layer],
    ) -> Vec<OsString> {
        let name = workdir.display().to_string().replace(',', ",,");
        let mut args = vec![OsString::from("-name"), OsString::from(name)];
        args.extend(machine_arguments(
            self.accel,
            machine.memory_mib,
            machine.vcpus,
        ));
        let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
        push(&[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=qmp,fd={},server=on,wait=off",
                HandedFd::Qmp.number()
            ),
            "-mon",
            "chardev=qmp,mode=control",
        ]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=console,fd={},server=on,wait=off",
                HandedFd::Console.number()
            ),
            "-serial",
            "chardev:console",
        ]);
        // Memory as an object of its own (`ram0`) when it is a file, or when a snapshot of a
        // VM whose memory was one is restored: a migration finds memory by the object's name.
        let size = format!("size={}M", machine.memory_mib);
        let object = match &machine.memory {
            GuestMemory::Anonymous if restoring.is_some_and(|snapshot| snapshot.memory_object) => {
                Some(format!("memory-backend-ram,id=ram0,{size}"))
            }
            GuestMemory::Anonymous => None,
            GuestMemory::Shared(_) | GuestMemory::Private(_) => Some(format!(
                "memory-backend-file,id=ram0,{size},mem-path={},share={}",
                HandedFd::Memory.proc_path(),
                if matches!(machine.memory, GuestMemory::Shared(_)) {
                    "on"
                } else {
                    "off"
                }
            )),
        };
        if let Some(object) = object {
            push(&["-object", &object, "-machine", "memory-backend=ram0"]);
        }
        push(&["-kernel", &HandedFd::Kernel.proc_path()]);
        if machine.initrd.is_some() {
            push(&["-initrd", &HandedFd::Initrd.proc_path()]);
        }
        push(&["-append", &machine.cmdline]);
        // The disk's layers, base first, each a descriptor in an fd set of its own: QEMU opens
        // no backing file by the name in an image's header.
        for (depth, layer) in layers.iter().enumerate().rev() {
            let fd = HandedFd::Disk(depth).number();
            let node = if depth == 0 {
                "disk0".to_string()
            } else {
                format!("layer{depth}")
            };
            let mut blockdev = format!(
                "driver={},node-name={node},file.driver=file,file.filename=/dev/fdset/{fd}",
                layer.format
            );
            if depth > 0 {
                blockdev.push_str(",read-only=on,file.read-only=on");
            }
            if layer.format == "qcow2" && depth + 1 < layers.len() {
                blockdev.push_str(&format!(",backing=layer{}", depth + 1));
            }
            push(&[
                "-add-fd",
                &format!("fd={fd},set={fd}"),
                "-blockdev",
                &blockdev,
            ]);
        }
        push(&["-device", "virtio-blk-pci,drive=disk0"]);
        push(&[
            "-netdev",
            &format!("tap,id=net0,fd={}", HandedFd::Tap.number()),
            "-device",
            &format!("virtio-net-pci,netdev=net0,mac={}", machine.mac),
        ]);
        if restoring.is_some() {
            push(&["-incoming", "defer"]);
        }
        args
    }

    async fn spawn(
        &self,
        machine: &MachineSpec,
        workdir: &Path,
        restoring: Option<&SnapshotFiles>,
    ) -> Result<VmProcess, VmmError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(workdir)
            .map_err(|error| VmmError::io(format!("creating {}", workdir.display()), error))?;
        let socket = workdir.join("qmp.sock");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(workdir.join("vmm.log"))
            .map_err(|error| VmmError::io("opening the VMM log", error))?;
        let log_err = log
            .try_clone()
            .map_err(|error| VmmError::io("opening the VMM log", error))?;
        let layers = crate::qcow2::chain(&machine.disk)?;
        let launch = Launch::prepare(machine, workdir, &layers, self.accel)?;
        let mut command = std::process::Command::new(&self.binary);
        command
            .args(self.arguments(machine, workdir, restoring, &layers))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        launch.apply(&mut command);
        let mut child = command
            .spawn()
            .map_err(|error| VmmError::io(format!("starting {}", self.binary.display()), error))?;
        // The child has its copies; the agent keeps none of the VM's descriptors.
        drop(launch);
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
            Ok(_) => {
                crate::console::capture(vm.console_socket(), vm.console_log());
                Ok(vm)
            }
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
    // Only the end is read: the VMM writes its log, and a VMM is not trusted to keep it small.
    let bytes = (|| -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open(path)?;
        let length = file.metadata()?.len();
        file.seek(SeekFrom::Start(length.saturating_sub(64 * 1024)))?;
        let mut bytes = Vec::new();
        file.take(64 * 1024).read_to_end(&mut bytes)?;
        Ok(bytes)
    })()
    .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.is_empty() {
        return "it logged nothing".into();
    }
    // A console log is the guest's text: short, and escaped before it reaches a log or an error.
    let start = tail.chars().count().saturating_sub(300);
    tail.chars()
        .skip(start)
        .flat_map(char::escape_debug)
        .collect()
}

/// Hands QEMU the snapshot's file as the descriptor `snapshot` and starts `command` (`migrate`
/// to write it, `migrate-incoming` to load it) on that descriptor.
async fn start_migration(
    qmp: &mut QmpClient,
    command: &str,
    file: std::os::fd::BorrowedFd<'_>,
) -> Result<(), VmmError> {
    qmp.send_fd("snapshot", file).await?;
    qmp.execute(command, Some(json!({ "uri": "fd:snapshot" })))
        .await?;
    Ok(())
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

/// Puts `overlay` on top of the disk of a stopped VM (QMP `blockdev-snapshot`): handed over as
/// a descriptor in an fd set of its own (the VMM opens no path), added as a node without a
/// backing file, then made the top with the current top under it.
async fn add_top_layer(qmp: &mut QmpClient, overlay: &Path) -> Result<(), VmmError> {
    let blocks = qmp.execute("query-block", None).await?;
    let top = blocks
        .as_array()
        .and_then(|devices| {
            devices.iter().find_map(|device| {
                device
                    .get("inserted")?
                    .get("node-name")?
                    .as_str()
                    .map(str::to_string)
            })
        })
        .ok_or_else(|| VmmError::Invalid("the VM has no disk to layer".into()))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(overlay)
        .map_err(|error| VmmError::io(format!("opening {}", overlay.display()), error))?;
    let added = qmp.execute_with_fd("add-fd", None, file.as_fd()).await?;
    drop(file);
    let fdset = added
        .get("fdset-id")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| VmmError::Invalid(format!("QMP add-fd answered {added}")))?;
    // Fd sets are never removed from a VM's QEMU once used, so their ids name nodes uniquely.
    let node = format!("step{fdset}");
    let layered = async {
        qmp.execute(
            "blockdev-add",
            Some(json!({
                "driver": "qcow2",
                "node-name": node,
                "file": { "driver": "file", "filename": format!("/dev/fdset/{fdset}") },
                "backing": null,
            })),
        )
        .await?;
        let snapshot = qmp
            .execute(
                "blockdev-snapshot",
                Some(json!({ "node": top, "overlay": node })),
            )
            .await;
        if snapshot.is_err() {
            let _ = qmp
                .execute("blockdev-del", Some(json!({ "node-name": node })))
                .await;
        }
        snapshot.map(drop)
    }
    .await;
    if layered.is_err() {
        let _ = qmp
            .execute("remove-fd", Some(json!({ "fdset-id": fdset })))
            .await;
    }
    layered
}

/// Makes `node`, a layer the VM writes no more (the backing of a newer top), read-only in the
/// VMM of process `pid`, and closes the read-write descriptor it was opened with: the file's
/// write lock goes with it, so that other VMMs may open the layer (a checkpoint's sandboxes)
/// while this one runs. The VM must be running: QEMU closes a removed descriptor only then.
async fn reopen_read_only(qmp: &mut QmpClient, node: &str, pid: u32) -> Result<(), VmmError> {
    let graph = qmp.execute("x-debug-query-block-graph", None).await?;
    let nodes = graph.get("nodes").and_then(serde_json::Value::as_array);
    let edges = graph.get("edges").and_then(serde_json::Value::as_array);
    let (Some(nodes), Some(edges)) = (nodes, edges) else {
        return Err(VmmError::Invalid(format!("QMP's block graph is {graph}")));
    };
    let id_of = |name: &str| {
        nodes
            .iter()
            .find_map(|n| (n.get("name")?.as_str()? == name).then(|| n.get("id")?.as_u64())?)
    };
    let name_of = |id: u64| {
        nodes.iter().find_map(|n| {
            (n.get("id")?.as_u64()? == id).then(|| n.get("name")?.as_str().map(str::to_string))?
        })
    };
    let node_id = id_of(node).ok_or_else(|| VmmError::Invalid(format!("no block node {node}")))?;
    let child = |edge: &str| {
        edges.iter().find_map(|e| {
            (e.get("parent")?.as_u64()? == node_id && e.get("name")?.as_str()? == edge)
                .then(|| name_of(e.get("child")?.as_u64()?))?
        })
    };
    let file = child("file").ok_or_else(|| VmmError::Invalid(format!("{node} has no file")))?;
    let backing = child("backing");
    let named = qmp
        .execute("query-named-block-nodes", Some(json!({ "flat": true })))
        .await?;
    let fdset = named
        .as_array()
        .and_then(|all| {
            all.iter().find_map(|n| {
                (n.get("node-name")?.as_str()? == file).then(|| n.get("file")?.as_str())?
            })
        })
        .and_then(|name| name.strip_prefix("/dev/fdset/"))
        .and_then(|id| id.parse::<u64>().ok())
        .ok_or_else(|| VmmError::Invalid(format!("{node}'s file is not an fd set's")))?;
    let fdsets = qmp.execute("query-fdsets", None).await?;
    let writable: Vec<u64> = fdsets
        .as_array()
        .and_then(|sets| {
            sets.iter()
                .find(|set| set.get("fdset-id").and_then(serde_json::Value::as_u64) == Some(fdset))
        })
        .and_then(|set| set.get("fds")?.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|fd| fd.get("fd")?.as_u64())
        .collect();
    // The same file, opened anew read-only through the VMM's own descriptor.
    let path = format!(
        "/proc/{pid}/fd/{}",
        writable
            .first()
            .ok_or_else(|| VmmError::Invalid(format!("fd set {fdset} is empty")))?
    );
    let read_only = std::fs::File::open(&path)
        .map_err(|error| VmmError::io(format!("opening {path}"), error))?;
    qmp.execute_with_fd(
        "add-fd",
        Some(json!({ "fdset-id": fdset })),
        read_only.as_fd(),
    )
    .await?;
    drop(read_only);
    qmp.execute(
        "blockdev-reopen",
        Some(json!({ "options": [{
            "driver": "qcow2",
            "node-name": node,
            "file": file,
            "backing": backing,
            "read-only": true,
        }] })),
    )
    .await?;
    for fd in writable {
        qmp.execute("remove-fd", Some(json!({ "fdset-id": fdset, "fd": fd })))
            .await?;
    }
    Ok(())
}

/// Whether migrations leave out memory the VM shares with a file (`x-ignore-shared`): a
/// stream written with it is loaded only with it.
async fn set_ignore_shared(qmp: &mut QmpClient, on: bool) -> Result<(), VmmError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": on }] })),
    )
    .await?;
    Ok(())
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
        Box::pin(self.spawn(machine, workdir, None))
    }

    fn start_restore<'a>(
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
            match (&snapshot.ram, &machine.memory) {
                (Some(_), GuestMemory::Private(_)) | (None, GuestMemory::Anonymous) => {}
                (Some(ram), _) => {
                    return Err(VmmError::Invalid(format!(
                        "the snapshot's memory is {}: the restore must map it",
                        ram.display()
                    )));
                }
                (None, _) => {
                    return Err(VmmError::Invalid(
                        "the snapshot holds its memory: a restore cannot map a memory file".into(),
                    ));
                }
            }
            let vm = self.spawn(machine, workdir, Some(snapshot)).await?;
            // The stream of a snapshot whose memory is a file leaves that memory out (as it
            // was written): set before the VMM waits, so the load has nothing left to set.
            let ignore_shared = async {
                let mut qmp = self.qmp(&vm).await?;
                set_ignore_shared(&mut qmp, snapshot.ram.is_some()).await
            };
            match ignore_shared.await {
                Ok(()) => Ok(vm),
                Err(error) => {
                    let _ = self.destroy(&vm).await;
                    Err(error)
                }
            }
        })
    }

    fn finish_restore<'a>(
        &'a self,
        vm: &'a VmProcess,
        snapshot: &'a SnapshotFiles,
    ) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            let mut qmp = self.qmp(vm).await?;
            let memory = std::fs::File::open(&snapshot.memory).map_err(|error| {
                VmmError::io(format!("opening {}", snapshot.memory.display()), error)
            })?;
            start_migration(&mut qmp, "migrate-incoming", memory.as_fd()).await?;
            drop(memory);
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
            Ok(())
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
            // Guest memory holds the sandbox's secrets: readable by root only.
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)
                .map_err(|error| VmmError::io(format!("creating {}", temp.display()), error))?;
            qmp.execute(
                "migrate-set-parameters",
                Some(json!({ "max-bandwidth": 64u64 << 30 })),
            )
            .await?;
            // A memory file the VM writes through is left out of the stream, and written
            // beside it.
            let memdevs = qmp.execute("query-memdev", None).await?;
            let memdevs = memdevs.as_array().cloned().unwrap_or_default();
            let memory_object = !memdevs.is_empty();
            let shared = memdevs.iter().any(|memdev| {
                memdev.get("share").and_then(serde_json::Value::as_bool) == Some(true)
            });
            set_ignore_shared(&mut qmp, shared).await?;
            let written = async {
                start_migration(&mut qmp, "migrate", file.as_fd()).await?;
                wait_for(
                    &mut qmp,
                    "writing the snapshot",
                    SNAPSHOT_TIMEOUT,
                    migration_state,
                    "query-migrate",
                )
                .await
            }
            .await;
            if shared {
                let _ = set_ignore_shared(&mut qmp, false).await;
            }
            if let Err(error) = written {
                let _ = std::fs::remove_file(&temp);
                return Err(error);
            }
            file.sync_all()
                .map_err(|error| VmmError::io("flushing the snapshot", error))?;
            drop(file);
            let ram = if shared {
                let ram = memory_file.with_extension("ram");
                // The VMM's own descriptor of the file (the agent's may be gone).
                let path = format!("/proc/{}/fd/{}", vm.pid, HandedFd::Memory.number());
                let memory: std::os::fd::OwnedFd = std::fs::File::open(&path)
                    .map_err(|error| VmmError::io(format!("opening {path}"), error))?
                    .into();
                let saved = tokio::task::spawn_blocking({
                    let ram = ram.clone();
                    move || crate::memory::save(&memory, &ram)
                })
                .await
                .map_err(|error| VmmError::Invalid(format!("saving the memory: {error}")))?;
                if let Err(error) = saved {
                    let _ = std::fs::remove_file(&temp);
                    return Err(error);
                }
                Some(ram)
            } else {
                None
            };
            std::fs::rename(&temp, memory_file)
                .map_err(|error| VmmError::io("putting the snapshot in place", error))?;
            if let Some(dir) = memory_file.parent() {
                let _ = std::fs::File::open(dir).and_then(|dir| dir.sync_all());
            }
            let bytes = std::fs::metadata(memory_file).map(|m| m.len()).unwrap_or(0);
            Ok(SnapshotFiles {
                memory: memory_file.to_path_buf(),
                bytes,
                ram,
                memory_object,
            })
        })
    }

    fn written_snapshot(&self, memory_file: &Path) -> Result<SnapshotFiles, VmmError> {
        use std::io::Read;
        let read = |error| VmmError::io(format!("reading {}", memory_file.display()), error);
        let file = std::fs::File::open(memory_file).map_err(read)?;
        let bytes = file.metadata().map_err(read)?.len();
        // The stream names its memory blocks before their pages: QEMU's built-in memory is
        // `pc.ram`, an object's has the object's name.
        let mut head = Vec::new();
        file.take(1 << 20).read_to_end(&mut head).map_err(read)?;
        let builtin = head.windows(7).any(|window| window == b"\x06pc.ram");
        let named = head.windows(5).any(|window| window == b"\x04ram0");
        if builtin == named {
            return Err(VmmError::Invalid(format!(
                "{} is not a QEMU snapshot wrenn wrote",
                memory_file.display()
            )));
        }
        Ok(SnapshotFiles {
            memory: memory_file.to_path_buf(),
            bytes,
            ram: None,
            memory_object: named,
        })
    }

    fn can_layer_disk(&self) -> bool {
        true
    }

    fn layer_disk<'a>(&'a self, vm: &'a VmProcess, overlay: &'a Path) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            let mut qmp = self.qmp(vm).await?;
            // Stopping drains and flushes every layer: the old top is whole on its file.
            let was_running = qmp.status().await? == "running";
            if was_running {
                qmp.execute("stop", None).await?;
            }
            let layered = add_top_layer(&mut qmp, overlay).await;
            if was_running {
                let resumed = qmp.execute("cont", None).await;
                layered?;
                resumed?;
                Ok(())
            } else {
                layered
            }
        })
    }

    fn seal_layers<'a>(&'a self, vm: &'a VmProcess) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            let mut qmp = self.qmp(vm).await?;
            let top = qmp
                .execute("query-block", None)
                .await?
                .as_array()
                .and_then(|devices| {
                    devices.iter().find_map(|device| {
                        device
                            .get("inserted")?
                            .get("node-name")?
                            .as_str()
                            .map(str::to_string)
                    })
                })
                .ok_or_else(|| VmmError::Invalid("the VM has no disk".into()))?;
            let named = qmp
                .execute("query-named-block-nodes", Some(json!({ "flat": true })))
                .await?;
            let writable: Vec<String> = named
                .as_array()
                .map(|nodes| {
                    nodes
                        .iter()
                        .filter(|n| {
                            n.get("drv").and_then(serde_json::Value::as_str) == Some("qcow2")
                        })
                        .filter(|n| n.get("ro").and_then(serde_json::Value::as_bool) == Some(false))
                        .filter_map(|n| n.get("node-name")?.as_str().map(str::to_string))
                        .filter(|name| *name != top)
                        .collect()
                })
                .unwrap_or_default();
            for node in writable {
                reopen_read_only(&mut qmp, &node, vm.pid).await?;
            }
            Ok(())
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
            // The console of a VM started by an earlier agent: copied again from now on.
            crate::console::capture(vm.console_socket(), vm.console_log());
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
            vmm_user: None,
            memory: GuestMemory::Anonymous,
        }
    }

    #[test]
    fn command_line_is_complete() {
        command_line_names_every_device_and_the_incoming_mode();
    }

    fn layers() -> Vec<Layer> {
        vec![
            Layer {
                path: "/d/disk.qcow2".into(),
                format: "qcow2",
            },
            Layer {
                path: "/t/disk.qcow2".into(),
                format: "qcow2",
            },
            Layer {
                path: "/t/rootfs.ext4".into(),
                format: "raw",
            },
        ]
    }

    fn snapshot(ram: bool, memory_object: bool) -> SnapshotFiles {
        SnapshotFiles {
            memory: "/s/memory.snap".into(),
            bytes: 1,
            ram: ram.then(|| "/s/memory.ram".into()),
            memory_object,
        }
    }

    fn joined_with(
        qemu: &Qemu,
        machine: &MachineSpec,
        restoring: Option<&SnapshotFiles>,
    ) -> String {
        qemu.arguments(machine, Path::new("/w,1"), restoring, &layers())
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn joined(qemu: &Qemu, incoming: bool) -> String {
        let snapshot = snapshot(false, false);
        qemu.arguments(
            &machine(),
            Path::new("/w,1"),
            incoming.then_some(&snapshot),
            &layers(),
        )
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect::<Vec<_>>()
        .join(" ")
    }

    fn command_line_names_every_device_and_the_incoming_mode() {
        let joined = joined(&Qemu::new("qemu-system-x86_64", Accel::Tcg), true);
        assert!(joined.starts_with("-name /w,,1 "), "{joined}");
        assert!(
            joined.contains("-accel tcg,tb-size=64 -cpu max"),
            "{joined}"
        );
        assert!(joined.contains("-m 512 -smp 1"));
        assert!(joined.contains("virtio-net-pci,netdev=net0,mac=02:fc:00:00:00:05"));
        assert!(joined.contains("-netdev tap,id=net0,fd=7"));
        assert!(
            joined.contains("socket,id=qmp,fd=3,server=on,wait=off -mon chardev=qmp,mode=control")
        );
        assert!(joined.contains("-kernel /proc/self/fd/5 -initrd /proc/self/fd/6"));
        assert!(joined.ends_with("-incoming defer"));
        let boot = joined_kvm();
        assert!(!boot.contains("-incoming"));
        assert!(boot.contains("-cpu host"));
    }

    fn joined_kvm() -> String {
        joined(&Qemu::new("q", Accel::Kvm), false)
    }

    #[test]
    fn the_disk_chain_is_built_base_first_from_handed_descriptors() {
        let joined = joined(&Qemu::new("q", Accel::Tcg), false);
        let base = joined
            .find("-add-fd fd=11,set=11 -blockdev driver=raw,node-name=layer2,file.driver=file,file.filename=/dev/fdset/11,read-only=on,file.read-only=on")
            .expect(&joined);
        let template = joined
            .find("-add-fd fd=10,set=10 -blockdev driver=qcow2,node-name=layer1,file.driver=file,file.filename=/dev/fdset/10,read-only=on,file.read-only=on,backing=layer2")
            .expect(&joined);
        let top = joined
            .find("-add-fd fd=9,set=9 -blockdev driver=qcow2,node-name=disk0,file.driver=file,file.filename=/dev/fdset/9,backing=layer1 ")
            .expect(&joined);
        assert!(base < template && template < top);
        assert!(joined.contains("-device virtio-blk-pci,drive=disk0"));
        // No path of the agent's reaches QEMU but its name.
        assert!(
            !joined.contains("/d/") && !joined.contains("/t/"),
            "{joined}"
        );
    }

    #[test]
    fn memory_is_a_named_object_when_it_is_a_file_or_restores_one() {
        let qemu = Qemu::new("q", Accel::Tcg);
        // Booted and restored classically: QEMU's built-in memory.
        assert!(!joined(&qemu, false).contains("memory-backend"));
        assert!(!joined(&qemu, true).contains("memory-backend"));
        let file = std::sync::Arc::new(crate::memory::create("args", 1 << 20).unwrap());
        let shared = MachineSpec {
            memory: GuestMemory::Shared(file.clone()),
            ..machine()
        };
        let booted = joined_with(&qemu, &shared, None);
        assert!(
            booted.contains("-object memory-backend-file,id=ram0,size=512M,mem-path=/proc/self/fd/8,share=on -machine memory-backend=ram0"),
            "{booted}"
        );
        let mapped = MachineSpec {
            memory: GuestMemory::Private(file),
            ..machine()
        };
        let restored = joined_with(&qemu, &mapped, Some(&snapshot(true, true)));
        assert!(
            restored.contains(
                "memory-backend-file,id=ram0,size=512M,mem-path=/proc/self/fd/8,share=off"
            ),
            "{restored}"
        );
        assert!(restored.ends_with("-incoming defer"));
        // A snapshot of a VM that mapped a file holds its memory, under the object's name.
        let resumed = joined_with(&qemu, &machine(), Some(&snapshot(false, true)));
        assert!(
            resumed.contains(
                "-object memory-backend-ram,id=ram0,size=512M -machine memory-backend=ram0"
            ),
            "{resumed}"
        );
    }

    #[test]
    fn qemu_runs_sandboxed_with_its_console_on_a_socket() {
        let joined = joined(&Qemu::new("q", Accel::Tcg), false);
        assert!(joined.contains(
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        ));
        assert!(
            joined.contains("socket,id=console,fd=4,server=on,wait=off -serial chardev:console")
        );
        assert!(!joined.contains("exec:"));
    }

    #[test]
    fn log_tails_are_short_and_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(
            &log,
            format!("boot\n{}\nlast \u{1b}[2J line\n", "x".repeat(5000)),
        )
        .unwrap();
        let tail = log_tail(&log);
        assert!(tail.chars().count() <= 400, "{}", tail.len());
        assert!(tail.ends_with("last \\u{1b}[2J line"), "{tail}");
        assert_eq!(log_tail(&dir.path().join("none")), "it logged nothing");
    }
}
