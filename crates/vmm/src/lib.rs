//! The virtual machine monitors wrenn drives, behind one trait chosen at run time: the sandbox
//! manager boots, pauses, snapshots, restores, resumes and destroys VMs without knowing which VMM
//! runs them. QEMU ([`qemu::Qemu`], over QMP) runs everywhere, with KVM or under software
//! emulation; Firecracker ([`firecracker::Firecracker`], over its API socket, restores served by
//! the page server of [`uffd`] from [`layers`]) where KVM runs. [`new`] makes the one a host
//! runs, by its [`VmmKind`].

pub mod accel;
pub mod console;
pub mod firecracker;
pub mod launch;
pub mod layers;
pub mod memory;
pub mod process;
pub mod qcow2;
pub mod qemu;
pub mod qmp;
pub mod uffd;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

wrenn_core::named_enum! {
    /// Which VMM runs a host's VMs (`--vmm`).
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum VmmKind {
        /// QEMU over QMP: KVM where it can, software emulation (TCG) elsewhere.
        #[default]
        Qemu = "qemu",
        /// Firecracker over its API socket: KVM only; restores served by the page server.
        Firecracker = "firecracker",
    }
}

impl std::str::FromStr for VmmKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        VmmKind::from_name(name).ok_or_else(|| {
            let known: Vec<&str> = VmmKind::ALL.iter().map(|k| k.as_str()).collect();
            format!("unknown VMM {name:?}: use {}", known.join(" or "))
        })
    }
}

/// The VMM of `kind`, running `binary` with `accel`.
pub fn new(kind: VmmKind, binary: &Path, accel: accel::Accel) -> Arc<dyn Vmm> {
    match kind {
        VmmKind::Qemu => Arc::new(qemu::Qemu::new(binary, accel)),
        VmmKind::Firecracker => Arc::new(firecracker::Firecracker::new(
            binary,
            firecracker::FirecrackerOptions::default(),
        )),
    }
}

/// A boxed future of a VMM operation (the trait is used as `dyn Vmm`).
pub type VmmFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, VmmError>> + Send + 'a>>;

/// What a VMM operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM refused {command}: {message}")]
    Refused { command: String, message: String },
    #[error("the VMM process exited: {0}")]
    Exited(String),
    #[error("{operation} did not finish within {seconds} s")]
    Timeout { operation: String, seconds: u64 },
    #[error("{0}")]
    Invalid(String),
}

impl VmmError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VmmError::Io {
            context: context.into(),
            source,
        }
    }
}

/// The machine a VM is: what it boots, its disk, memory, CPUs and network attachment. A restore
/// needs the same machine as the snapshot was taken from (only paths may differ).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// The VM's disk (a qcow2 overlay for QEMU).
    pub disk: PathBuf,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Network namespace the VMM runs in (its tap is there), if any.
    pub netns: Option<String>,
    /// Tap device name (inside `netns`).
    pub tap: String,
    /// The guest NIC's MAC address: fixed, so a restored guest finds its NIC unchanged.
    pub mac: String,
    /// The user the VMM runs as (root when none; see [`launch`]).
    #[serde(default)]
    pub vmm_user: Option<launch::VmmUser>,
    /// Where its memory is (a descriptor of the agent's: never recorded).
    #[serde(skip)]
    pub memory: GuestMemory,
}

/// Where a VM's memory is (see [`memory`]).
#[derive(Debug, Clone, Default)]
pub enum GuestMemory {
    /// The VMM's own anonymous memory: what a boot gets, and what a restore gets of a snapshot
    /// whose stream holds the memory.
    #[default]
    Anonymous,
    /// This memory file, written through by the guest (a template's VM): a snapshot of the VM
    /// holds its device state only and writes the file beside it ([`SnapshotFiles::ram`]).
    Shared(std::sync::Arc<std::os::fd::OwnedFd>),
    /// This sealed memory file, mapped copy-on-write: the memory of a restore of a snapshot
    /// whose RAM is in a file (its [`SnapshotFiles::ram`], loaded by [`memory::load`]).
    Private(std::sync::Arc<std::os::fd::OwnedFd>),
}

impl PartialEq for GuestMemory {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (GuestMemory::Anonymous, GuestMemory::Anonymous) => true,
            (GuestMemory::Shared(a), GuestMemory::Shared(b))
            | (GuestMemory::Private(a), GuestMemory::Private(b)) => std::sync::Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for GuestMemory {}

/// A running VMM process, as recorded on disk so a restarted agent can find it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProcess {
    /// Which backend runs it ("qemu").
    pub backend: String,
    pub pid: u32,
    /// The process's start time in clock ticks since boot (tells a reused PID apart).
    pub start_time: u64,
    /// The VM's working directory: control socket, console log, VMM log.
    pub workdir: PathBuf,
    /// The VMM's control socket (QMP for QEMU).
    pub control_socket: PathBuf,
}

impl VmProcess {
    /// The guest's serial console (its newest part; see [`console`]).
    pub fn console_log(&self) -> PathBuf {
        self.workdir.join("console.log")
    }
    /// The socket the VMM serves the console on.
    pub fn console_socket(&self) -> PathBuf {
        self.workdir.join("console.sock")
    }
    /// The VMM's own standard output and error.
    pub fn vmm_log(&self) -> PathBuf {
        self.workdir.join("vmm.log")
    }
    /// Whether this very process (not a reused PID) is still running.
    pub fn is_alive(&self) -> bool {
        process::is_running(self.pid, self.start_time)
    }

    /// The same process after its working directory was renamed to `workdir` (its sockets
    /// and logs move with the directory; the VMM keeps what it opened).
    pub fn moved_to(&self, workdir: &Path) -> VmProcess {
        let socket = self
            .control_socket
            .strip_prefix(&self.workdir)
            .map(Path::to_path_buf)
            .or_else(|_| self.control_socket.file_name().map(PathBuf::from).ok_or(()))
            .unwrap_or_default();
        VmProcess {
            workdir: workdir.to_path_buf(),
            control_socket: workdir.join(socket),
            ..self.clone()
        }
    }
}

/// The files of a memory snapshot (the disk is the VM's own file, frozen with it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFiles {
    /// Device state, and the guest's memory unless [`SnapshotFiles::ram`] holds it.
    pub memory: PathBuf,
    pub bytes: u64,
    /// The guest's memory, when the VM's was a memory file ([`GuestMemory::Shared`]): a
    /// restore maps it ([`GuestMemory::Private`]) instead of reading it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<PathBuf>,
    /// Whether the VM's memory was a memory object of its own rather than the VMM's
    /// built-in (as a VM restored from a memory file's is): a restore must lay it out the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory_object: bool,
}

/// What a VM uses of the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUse {
    /// Resident memory of the VMM process, guest memory touched included.
    pub rss_bytes: u64,
    /// CPU time used by the VMM process (user + system), in milliseconds.
    pub cpu_millis: u64,
}

/// A virtual machine monitor.
pub trait Vmm: Send + Sync + std::fmt::Debug {
    /// The backend's name, recorded with each VM ("qemu").
    fn name(&self) -> &'static str;

    /// Boots a fresh VM and returns once the VMM runs it (not once the guest is ready).
    fn boot<'a>(&'a self, machine: &'a MachineSpec, workdir: &'a Path) -> VmmFuture<'a, VmProcess>;

    /// Starts a VM from a snapshot taken of the same machine and resumes it: the two halves
    /// below, the VMM destroyed if the second fails.
    fn restore<'a>(
        &'a self,
        machine: &'a MachineSpec,
        snapshot: &'a SnapshotFiles,
        workdir: &'a Path,
    ) -> VmmFuture<'a, VmProcess> {
        Box::pin(async move {
            let vm = self.start_restore(machine, snapshot, workdir).await?;
            match self.finish_restore(&vm, snapshot).await {
                Ok(()) => Ok(vm),
                Err(error) => {
                    let _ = self.destroy(&vm).await;
                    Err(error)
                }
            }
        })
    }

    /// The first half of [`Vmm::restore`]: starts a VMM for `machine` that waits for a
    /// snapshot laid out as `snapshot` is (QEMU at `-incoming defer`), no guest running yet.
    /// A warm pool keeps such VMMs ready, so a create pays only the second half.
    fn start_restore<'a>(
        &'a self,
        machine: &'a MachineSpec,
        snapshot: &'a SnapshotFiles,
        workdir: &'a Path,
    ) -> VmmFuture<'a, VmProcess>;

    /// The second half: loads `snapshot` into a VMM that [`Vmm::start_restore`] started for
    /// it (or for a snapshot of the same layout) and runs the guest. On an error the VMM is
    /// left running for the caller to destroy.
    fn finish_restore<'a>(
        &'a self,
        vm: &'a VmProcess,
        snapshot: &'a SnapshotFiles,
    ) -> VmmFuture<'a, ()>;

    /// Stops the guest's CPUs (its memory and devices stay).
    fn pause<'a>(&'a self, vm: &'a VmProcess) -> VmmFuture<'a, ()>;

    /// Starts the guest's CPUs again.
    fn resume<'a>(&'a self, vm: &'a VmProcess) -> VmmFuture<'a, ()>;

    /// Writes a paused VM's memory and device state to `memory_file`; the disk is flushed.
    fn snapshot<'a>(
        &'a self,
        vm: &'a VmProcess,
        memory_file: &'a Path,
    ) -> VmmFuture<'a, SnapshotFiles>;

    /// The description of a snapshot written completely at `memory_file` whose description
    /// was lost (its VMM's agent ended before it recorded it): a snapshot of a sandbox, whose
    /// memory is in the file (a VM writing through a memory file is a template's build, which
    /// is not recovered but made again).
    fn written_snapshot(&self, memory_file: &Path) -> Result<SnapshotFiles, VmmError> {
        let bytes = std::fs::metadata(memory_file)
            .map_err(|error| VmmError::io(format!("reading {}", memory_file.display()), error))?
            .len();
        Ok(SnapshotFiles {
            memory: memory_file.to_path_buf(),
            bytes,
            ram: None,
            memory_object: false,
        })
    }

    /// Whether [`Vmm::layer_disk`] works with this VMM.
    fn can_layer_disk(&self) -> bool {
        false
    }

    /// Whether a VM's disk must be one raw file (Firecracker's), not a qcow2 chain (QEMU's).
    fn needs_raw_disk(&self) -> bool {
        false
    }

    /// Whether VMs can run with their memory in a memory file ([`GuestMemory::Shared`] and
    /// [`GuestMemory::Private`]; QEMU's), rather than keeping it themselves.
    fn maps_memory_files(&self) -> bool {
        true
    }

    /// Freezes a running VM's disk as it is now: `overlay`, a new qcow2 image whose header
    /// names the disk's current top as its backing file, becomes the layer the VM writes to,
    /// and the old top is written no more (a build keeps it as its step's layer; a checkpoint
    /// as its template's disk; see [`Vmm::seal_layers`]). The VM's own caches are flushed
    /// first; the guest's are the caller's to sync. On an error the VM may
    /// be writing to either file: it must not be snapshotted as a template.
    fn layer_disk<'a>(&'a self, vm: &'a VmProcess, overlay: &'a Path) -> VmmFuture<'a, ()> {
        let _ = (vm, overlay);
        Box::pin(async move {
            Err(VmmError::Invalid(format!(
                "{} cannot freeze a running VM's disk",
                self.name()
            )))
        })
    }

    /// Makes every layer of a running VM's disk but its top read-only in the VMM (after
    /// [`Vmm::layer_disk`]), giving up their write locks: other VMs may then open them while
    /// this one runs.
    fn seal_layers<'a>(&'a self, vm: &'a VmProcess) -> VmmFuture<'a, ()> {
        let _ = vm;
        Box::pin(async { Ok(()) })
    }

    /// Ends the VM and its VMM process (gracefully if it answers, killed otherwise).
    fn destroy<'a>(&'a self, vm: &'a VmProcess) -> VmmFuture<'a, ()>;

    /// Checks that a VM recorded earlier still runs and answers its control socket.
    fn adopt<'a>(&'a self, vm: &'a VmProcess) -> VmmFuture<'a, ()>;

    /// What the VM uses now.
    fn usage(&self, vm: &VmProcess) -> Result<ResourceUse, VmmError> {
        process::usage(vm.pid)
            .ok_or_else(|| VmmError::Exited(format!("process {} is gone", vm.pid)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_chosen_by_name_and_make_their_vmm() {
        for kind in VmmKind::ALL {
            assert_eq!(kind.as_str().parse::<VmmKind>(), Ok(kind));
            let vmm = new(kind, Path::new("/nonexistent"), accel::Accel::Tcg);
            assert_eq!(vmm.name(), kind.as_str());
        }
        let refused = "firecracker-ish".parse::<VmmKind>().unwrap_err();
        assert!(refused.contains("use qemu"), "{refused}");
    }
}
