//! The Firecracker backend of the [`Vmm`] trait: Firecracker processes driven over their API
//! socket ([`api`]), restored from snapshots whose memory the agent serves through userfaultfd
//! ([`crate::uffd`]) out of layered memory files ([`crate::layers`]).
//!
//! **Launch.** Firecracker runs in the sandbox's network namespace as the VM's own user, confined
//! as QEMU is ([`crate::launch`]: a session of its own, no capabilities, `no_new_privs`; its own
//! seccomp filter on top). It is handed the kernel, initrd and disk as descriptors at fixed
//! numbers and opens them by their `/proc/self/fd/N` paths: these symbolic links are the same in
//! every Firecracker process, so a snapshot, which records the paths its VM was booted with,
//! restores on any host and into any slot, as long as the restoring process is handed the new
//! sandbox's disk at the same number. The tap has the same name (`tap0`) in every slot's
//! namespace. The jailer is not used: its chroot, namespaces and privilege drop are what the
//! launch does already (see docs/architecture.md).
//!
//! **Files.** The VM's directory (root's) holds `vmm.log` (Firecracker's standard error),
//! `console.fifo` (its standard output: the guest's serial console, copied into `console.log`
//! by [`crate::console::capture_fifo`]) and the records below; its `vmm/` subdirectory belongs to
//! the VM's user and holds what Firecracker itself creates or opens by path: the API socket,
//! its log, the snapshot it writes, the state it loads and the page server's socket. Whatever the
//! agent reads back from `vmm/` is opened without following links and must be a regular file of
//! the VM's user: a VMM broken into by its guest cannot make the agent read or write another
//! file through it.
//!
//! **Snapshots.** A booted VM's snapshot is a Full one: Firecracker writes all guest memory,
//! which is kept as a layered memory file's base (its non-zero blocks). A VM restored from such a
//! snapshot is loaded with dirty-page tracking, and its own snapshot is a Diff: only the pages
//! written since the load, kept as one more layer over its parent's (merged past
//! [`crate::layers::DEFAULT_MAX_LAYERS`]). `SnapshotFiles::memory` is Firecracker's device state,
//! `SnapshotFiles::ram` the layered memory's header.
//!
//! **Restores.** A restore starts a fresh Firecracker ([`Vmm::start_restore`]: a warm pool may
//! keep some ready), then loads the snapshot with the `Uffd` memory backend: the agent's page
//! server answers Firecracker's handshake, serves faults and prefetches the rest; the server
//! lives in the agent for as long as the VM, and kills Firecracker if it fails. Once every page
//! is in, `memory-resident` is written in the VM's directory: an agent that restarts adopts a
//! restored VM only then (before it, nobody would serve its next fault).

pub mod api;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::{
    Action, BootSource, Drive, EntropyDevice, FirecrackerClient, MachineConfig, MemoryBackend,
    MemoryBackendType, NetworkInterface, Request, SnapshotCreate, SnapshotLoad, SnapshotType,
    VmState,
};

use crate::launch::{HandedFd, Launch};
use crate::qcow2::Layer;
use crate::uffd::{PageServer, PageServerOptions, Prefetch, RunningPageServer};
use crate::{
    GuestMemory, MachineSpec, SnapshotFiles, VmProcess, Vmm, VmmError, VmmFuture, process,
};

/// How long a new Firecracker may take to serve its API.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long Firecracker may take to connect to the page server during a load.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The guest's network device and root drive, by Firecracker's ids.
const NET_ID: &str = "eth0";
const ROOT_DRIVE_ID: &str = "rootfs";

/// The Firecracker backend.
#[derive(Debug)]
pub struct Firecracker {
    binary: PathBuf,
    options: FirecrackerOptions,
    /// The page servers of restored VMs, by (pid, start time).
    served: Mutex<HashMap<(u32, u64), RunningPageServer>>,
}

/// How the backend runs its VMs.
#[derive(Debug, Clone)]
pub struct FirecrackerOptions {
    /// Whether a restored VM's memory is prefetched after its load (else pages come in only as
    /// the guest touches them).
    pub prefetch: bool,
    /// How many layers a memory snapshot may have before they are merged.
    pub max_layers: usize,
    /// Firecracker's own log level.
    pub log_level: api::LogLevel,
}

impl Default for FirecrackerOptions {
    fn default() -> Self {
        FirecrackerOptions {
            prefetch: true,
            max_layers: crate::layers::DEFAULT_MAX_LAYERS,
            log_level: api::LogLevel::Warning,
        }
    }
}

/// The paths of one VM's files.
#[derive(Debug, Clone)]
struct VmFiles {
    workdir: PathBuf,
}

impl VmFiles {
    fn new(workdir: &Path) -> Self {
        VmFiles {
            workdir: workdir.to_path_buf(),
        }
    }
    /// The VM user's directory.
    fn own(&self) -> PathBuf {
        self.workdir.join("vmm")
    }
    fn api_socket(&self) -> PathBuf {
        self.own().join("api.sock")
    }
    fn firecracker_log(&self) -> PathBuf {
        self.own().join("firecracker.log")
    }
    fn console_fifo(&self) -> PathBuf {
        self.workdir.join("console.fifo")
    }
    fn uffd_socket(&self) -> PathBuf {
        self.own().join("uffd.sock")
    }
    /// Where the state a load reads is copied for Firecracker.
    fn load_state(&self) -> PathBuf {
        self.own().join("load.state")
    }
    fn written_state(&self) -> PathBuf {
        self.own().join("snapshot.state")
    }
    fn written_memory(&self) -> PathBuf {
        self.own().join("snapshot.mem")
    }
    /// The memory header the VM was restored from (its snapshots are Diffs over it).
    fn memory_parent(&self) -> PathBuf {
        self.workdir.join("memory-parent")
    }
    /// Written once a restored VM's memory is all in.
    fn memory_resident(&self) -> PathBuf {
        self.workdir.join("memory-resident")
    }
    /// The user the VM runs as, recorded for the agent's later checks.
    fn vmm_user(&self) -> PathBuf {
        self.workdir.join("vmm-user")
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let context = context.into();
    move |error| VmmError::io(context, error)
}

/// The last lines of a file the VM's user may have replaced: read without following a link, and
/// only a regular file.
fn tail_of(path: &Path) -> String {
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    else {
        return String::new();
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return String::new();
    }
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::Read::take(&file, 1 << 20), &mut text);
    let lines: Vec<&str> = text.lines().rev().take(8).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Opens a file Firecracker wrote in the VM user's directory: no link followed, a regular file,
/// owned by `owner` when the VM runs as a user of its own.
fn open_written(path: &Path, owner: Option<u32>) -> Result<std::fs::File, VmmError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(io(format!("opening {}", path.display())))?;
    let metadata = file
        .metadata()
        .map_err(io(format!("reading {}", path.display())))?;
    if !metadata.is_file() || owner.is_some_and(|uid| metadata.uid() != uid) {
        return Err(VmmError::Invalid(format!(
            "{} is not a file the VMM wrote",
            path.display()
        )));
    }
    Ok(file)
}

/// A path that opens the very file `file` is (this process's descriptor), for functions that
/// take paths.
fn fd_path(file: &std::fs::File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Creates `path` afresh (whatever was there, link or not, is removed first) for the VM's user
/// to read, with `bytes` in it.
fn place_for_vmm(path: &Path, bytes: &[u8], owner: Option<(u32, u32)>) -> Result<(), VmmError> {
    use std::io::Write;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io(format!("clearing {}", path.display()))(error)),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(format!("creating {}", path.display())))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
            .map_err(io(format!("handing {} to its VMM", path.display())))?;
    }
    file.write_all(bytes)
        .map_err(io(format!("writing {}", path.display())))
}

impl Firecracker {
    pub fn new(binary: impl Into<PathBuf>, options: FirecrackerOptions) -> Self {
        Firecracker {
            binary: binary.into(),
            options,
            served: Mutex::new(HashMap::new()),
        }
    }

    /// The command line: the API socket, an id, and Firecracker's own log (in the VM user's
    /// directory, which Firecracker opens itself).
    pub fn arguments(&self, workdir: &Path) -> Vec<String> {
        let files = VmFiles::new(workdir);
        let id: String = workdir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(64)
            .collect();
        let level = serde_json::to_value(self.options.log_level)
            .ok()
            .and_then(|value| value.as_str().map(str::to_owned))
            .unwrap_or_else(|| "Warning".into());
        vec![
            "--api-sock".into(),
            files.api_socket().display().to_string(),
            "--id".into(),
            if id.is_empty() { "wrenn".into() } else { id },
            "--log-path".into(),
            files.firecracker_log().display().to_string(),
            "--level".into(),
            level,
        ]
    }

    /// Starts a Firecracker process for `machine` in `workdir`, its API answering.
    async fn spawn(&self, machine: &MachineSpec, workdir: &Path) -> Result<VmProcess, VmmError> {
        if !matches!(machine.memory, GuestMemory::Anonymous) {
            return Err(VmmError::Invalid(
                "Firecracker keeps the guest's memory itself: memory files are QEMU's".into(),
            ));
        }
        let files = VmFiles::new(workdir);
        let owner = machine.vmm_user.map(|user| (user.uid, user.gid));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(workdir)
            .map_err(io(format!("creating {}", workdir.display())))?;
        // The VM's user passes through (to its own directory) but lists nothing; the files here
        // are root's alone. Every directory above must let it pass too.
        if owner.is_some() {
            let absolute =
                std::path::absolute(workdir).map_err(io("resolving the VM's directory"))?;
            for directory in absolute.ancestors() {
                let_pass(directory)?;
            }
        }
        // The VM user's directory, made afresh: nothing an earlier process left is trusted.
        let own = files.own();
        if own.exists() {
            std::fs::remove_dir_all(&own).map_err(io(format!("clearing {}", own.display())))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&own)
            .map_err(io(format!("creating {}", own.display())))?;
        for stale in [files.memory_parent(), files.memory_resident()] {
            let _ = std::fs::remove_file(stale);
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(&own, Some(uid), Some(gid))
                .map_err(io(format!("handing {} to its VMM", own.display())))?;
            std::os::unix::fs::lchown(&machine.disk, Some(uid), Some(gid))
                .map_err(io(format!("handing {} to its VMM", machine.disk.display())))?;
            std::fs::write(files.vmm_user(), format!("{uid} {gid}\n"))
                .map_err(io("recording the VM's user"))?;
        }
        // The console: a FIFO whose write end (Firecracker's standard output) never blocks.
        let fifo = files.console_fifo();
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(|errno| io(format!("making {}", fifo.display()))(errno.into()))?;
        let console = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .map_err(io(format!("opening {}", fifo.display())))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(workdir.join("vmm.log"))
            .map_err(io("opening the VMM log"))?;
        let disk = Layer {
            path: machine.disk.clone(),
            format: "raw",
        };
        let launch = Launch::prepare_firecracker(machine, &disk)?;
        let mut command = std::process::Command::new(&self.binary);
        command
            .args(self.arguments(workdir))
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(log);
        launch.apply(&mut command);
        let mut child = command
            .spawn()
            .map_err(io(format!("starting {}", self.binary.display())))?;
        drop(launch);
        let pid = child.id();
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let vm = VmProcess {
            backend: "firecracker".into(),
            pid,
            start_time: process::start_time(pid).unwrap_or(0),
            workdir: workdir.to_path_buf(),
            control_socket: files.api_socket(),
        };
        crate::console::capture_fifo(fifo, vm.console_log());
        let client = FirecrackerClient::new(&vm.control_socket);
        let ready = async {
            let deadline = tokio::time::Instant::now() + START_TIMEOUT;
            loop {
                match client.describe_instance().await {
                    Ok(_) => return Ok(()),
                    Err(error) if !vm.is_alive() || tokio::time::Instant::now() >= deadline => {
                        return Err(error);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        };
        match ready.await {
            Ok(()) => Ok(vm),
            Err(error) => {
                kill_and_wait(&vm).await;
                Err(VmmError::Exited(format!(
                    "Firecracker did not start ({error}): {}",
                    self.log_tail(&vm)
                )))
            }
        }
    }

    fn log_tail(&self, vm: &VmProcess) -> String {
        let files = VmFiles::new(&vm.workdir);
        let own = tail_of(&files.firecracker_log());
        let stderr = crate::qemu::log_tail(&vm.vmm_log());
        [own, stderr]
            .into_iter()
            .filter(|text| !text.is_empty())
            .collect::<Vec<_>>()
            .join(" | ")
    }

    fn client(&self, vm: &VmProcess) -> Result<FirecrackerClient, VmmError> {
        if !vm.is_alive() {
            return Err(VmmError::Exited(format!(
                "Firecracker (pid {}) is not running: {}",
                vm.pid,
                self.log_tail(vm)
            )));
        }
        Ok(FirecrackerClient::new(&vm.control_socket))
    }

    /// Runs `request`, adding Firecracker's log to a refusal or a lost process.
    async fn send(&self, vm: &VmProcess, request: Request) -> Result<(), VmmError> {
        let client = self.client(vm)?;
        match client.apply(request).await {
            Ok(()) => Ok(()),
            Err(error) if !vm.is_alive() => Err(VmmError::Exited(format!(
                "{error}; Firecracker exited: {}",
                self.log_tail(vm)
            ))),
            Err(error) => Err(error),
        }
    }

    /// The boot configuration of `machine`, in the order Firecracker takes it.
    pub fn boot_requests(machine: &MachineSpec) -> Vec<Request> {
        vec![
            Request::PutMachineConfig(MachineConfig {
                vcpu_count: machine.vcpus,
                mem_size_mib: machine.memory_mib,
                smt: Some(false),
                // Diff snapshots of the restored VMs need the pages written since their load.
                track_dirty_pages: true,
                huge_pages: None,
            }),
            Request::PutBootSource(BootSource {
                kernel_image_path: HandedFd::Kernel.proc_path(),
                boot_args: Some(machine.cmdline.clone()),
                initrd_path: machine
                    .initrd
                    .as_ref()
                    .map(|_| HandedFd::Initrd.proc_path()),
            }),
            Request::PutDrive(Drive {
                drive_id: ROOT_DRIVE_ID.into(),
                is_root_device: true,
                path_on_host: HandedFd::Disk(0).proc_path(),
                is_read_only: false,
                partuuid: None,
                // The guest's flushes reach the disk file: a snapshot's disk is consistent.
                cache_type: Some(api::CacheType::Writeback),
                io_engine: None,
                rate_limiter: None,
            }),
            Request::PutNetworkInterface(NetworkInterface {
                iface_id: NET_ID.into(),
                host_dev_name: machine.tap.clone(),
                guest_mac: Some(machine.mac.clone()),
                mtu: None,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            }),
            Request::PutEntropy(EntropyDevice::default()),
            Request::Action(Action::InstanceStart),
        ]
    }

    /// The VM's page server, if this agent serves one for it.
    pub fn page_server_stats(&self, vm: &VmProcess) -> Option<crate::uffd::PageServerStats> {
        self.served
            .lock()
            .expect("page servers lock")
            .get(&(vm.pid, vm.start_time))
            .map(RunningPageServer::stats)
    }

    fn owner_of(vm: &VmProcess) -> Option<(u32, u32)> {
        let text = std::fs::read_to_string(VmFiles::new(&vm.workdir).vmm_user()).ok()?;
        let mut parts = text.split_whitespace().map(str::parse::<u32>);
        match (parts.next(), parts.next()) {
            (Some(Ok(uid)), Some(Ok(gid))) => Some((uid, gid)),
            _ => None,
        }
    }

    /// Loads `snapshot` into the fresh Firecracker `vm` with its memory served by a page server,
    /// then resumes it.
    async fn load(&self, vm: &VmProcess, snapshot: &SnapshotFiles) -> Result<(), VmmError> {
        let files = VmFiles::new(&vm.workdir);
        let owner = Self::owner_of(vm);
        let Some(ram) = &snapshot.ram else {
            return Err(VmmError::Invalid(format!(
                "{} has no memory file: it is not a Firecracker snapshot",
                snapshot.memory.display()
            )));
        };
        let state = std::fs::read(&snapshot.memory)
            .map_err(io(format!("reading {}", snapshot.memory.display())))?;
        place_for_vmm(&files.load_state(), &state, owner)?;
        let socket = files.uffd_socket();
        let _ = std::fs::remove_file(&socket);
        let server = PageServer::bind_for(&socket, ram, owner)
            .map_err(|error| VmmError::Invalid(format!("serving {}: {error}", ram.display())))?;
        let abandon = Arc::new(AtomicBool::new(false));
        let options = PageServerOptions {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            prefetch: if self.options.prefetch {
                Prefetch::Sequential
            } else {
                Prefetch::None
            },
            abandon: Some(abandon.clone()),
            resident_marker: Some(files.memory_resident()),
        };
        let serving = tokio::task::spawn_blocking(move || server.serve(options));
        let loaded = self
            .send(
                vm,
                Request::LoadSnapshot(SnapshotLoad {
                    snapshot_path: files.load_state().display().to_string(),
                    mem_backend: MemoryBackend {
                        backend_type: MemoryBackendType::Uffd,
                        backend_path: socket.display().to_string(),
                    },
                    track_dirty_pages: true,
                    resume_vm: false,
                    network_overrides: Vec::new(),
                    clock_realtime: None,
                }),
            )
            .await;
        if loaded.is_err() {
            abandon.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let served = serving
            .await
            .map_err(|error| VmmError::Invalid(format!("the page server: {error}")))?;
        loaded?;
        let server =
            served.map_err(|error| VmmError::Invalid(format!("the page server: {error}")))?;
        self.served
            .lock()
            .expect("page servers lock")
            .insert((vm.pid, vm.start_time), server);
        let _ = std::fs::remove_file(files.load_state());
        std::fs::write(files.memory_parent(), ram.display().to_string())
            .map_err(io("recording the VM's memory"))?;
        self.send(vm, Request::PatchVm(VmState::Resumed)).await
    }
}

/// Turns the memory Firecracker wrote at `written` into a layered memory file beside
/// `memory_file`: a base, or a layer over `parent`.
fn keep_memory(
    max_layers: usize,
    written: &Path,
    owner: Option<u32>,
    parent: Option<&Path>,
    memory_file: &Path,
) -> Result<PathBuf, VmmError> {
    let file = open_written(written, owner)?;
    let len = file
        .metadata()
        .map_err(io(format!("reading {}", written.display())))?
        .len();
    let source = fd_path(&file);
    let header = memory_file.with_extension("header");
    // Each generation's layer has a name of its own: a header replaced in place (a sandbox
    // paused again) still names its parent's layers, which must not be overwritten.
    let generation = match parent {
        Some(parent) => {
            crate::layers::LayerHeader::read(parent)
                .map_err(|error| VmmError::Invalid(format!("reading the VM's memory: {error}")))?
                .generation
                + 1
        }
        None => 0,
    };
    let layer = crate::layers::layer_path(memory_file, generation);
    let kept = match parent {
        Some(parent) => crate::layers::write_layer(
            parent,
            &source,
            crate::layers::Changed::DataOnly,
            &header,
            &layer,
            max_layers,
        ),
        None => crate::layers::write_base(
            &source,
            len,
            crate::layers::DEFAULT_BLOCK_BYTES,
            &header,
            &layer,
        ),
    };
    let kept =
        kept.map_err(|error| VmmError::Invalid(format!("keeping the snapshot's memory: {error}")))?;
    crate::layers::remove_unnamed_layers(memory_file, &kept);
    Ok(header)
}

/// Lets every user pass through `directory` (`o+x`: not list it, nor read what it holds but
/// what is itself open to them), for an unprivileged Firecracker to reach its own directory.
fn let_pass(directory: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::PermissionsExt;
    let metadata =
        std::fs::metadata(directory).map_err(io(format!("reading {}", directory.display())))?;
    let mode = metadata.permissions().mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(
            directory,
            std::fs::Permissions::from_mode((mode & 0o7777) | 0o001),
        )
        .map_err(io(format!(
            "letting the VMM pass through {}",
            directory.display()
        )))?;
    }
    Ok(())
}

/// Kills a Firecracker process and waits (up to 5 s) for it to be gone.
async fn kill_and_wait(vm: &VmProcess) {
    if vm.is_alive() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(vm.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while vm.is_alive() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Vmm for Firecracker {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    fn boot<'a>(&'a self, machine: &'a MachineSpec, workdir: &'a Path) -> VmmFuture<'a, VmProcess> {
        Box::pin(async move {
            let vm = self.spawn(machine, workdir).await?;
            for request in Self::boot_requests(machine) {
                if let Err(error) = self.send(&vm, request).await {
                    let _ = self.destroy(&vm).await;
                    return Err(error);
                }
            }
            Ok(vm)
        })
    }

    fn needs_raw_disk(&self) -> bool {
        true
    }

    fn maps_memory_files(&self) -> bool {
        false
    }

    fn start_restore<'a>(
        &'a self,
        machine: &'a MachineSpec,
        snapshot: &'a SnapshotFiles,
        workdir: &'a Path,
    ) -> VmmFuture<'a, VmProcess> {
        Box::pin(async move {
            for file in std::iter::once(&snapshot.memory).chain(snapshot.ram.as_ref()) {
                if !file.is_file() {
                    return Err(VmmError::Invalid(format!(
                        "the snapshot's {} is missing",
                        file.display()
                    )));
                }
            }
            self.spawn(machine, workdir).await
        })
    }

    fn finish_restore<'a>(
        &'a self,
        vm: &'a VmProcess,
        snapshot: &'a SnapshotFiles,
    ) -> VmmFuture<'a, ()> {
        Box::pin(self.load(vm, snapshot))
    }

    fn pause<'a>(&'a self, vm: &'a VmProcess) -> VmmFuture<'a, ()> {
        Box::pin(self.send(vm, Request::PatchVm(VmState::Paused)))
    }

    fn resume<'a>(&'a self, vm: &'a VmProcess) -> VmmFuture<'a, ()> {
        Box::pin(self.send(vm, Request::PatchVm(VmState::Resumed)))
    }

    fn snapshot<'a>(
        &'a self,
        vm: &'a VmProcess,
        memory_file: &'a Path,
    ) -> VmmFuture<'a, SnapshotFiles> {
        Box::pin(async move {
            let client = self.client(vm)?;
            let state = client.describe_instance().await?.state;
            if state != "Paused" {
                return Err(VmmError::Invalid(format!(
                    "a snapshot needs a paused VM; this one is {state}"
                )));
            }
            let files = VmFiles::new(&vm.workdir);
            let owner = Self::owner_of(vm);
            let parent = std::fs::read_to_string(files.memory_parent())
                .ok()
                .map(|text| PathBuf::from(text.trim()))
                .filter(|path| path.is_file());
            for stale in [files.written_state(), files.written_memory()] {
                let _ = std::fs::remove_file(stale);
            }
            self.send(
                vm,
                Request::CreateSnapshot(SnapshotCreate {
                    snapshot_type: if parent.is_some() {
                        SnapshotType::Diff
                    } else {
                        SnapshotType::Full
                    },
                    snapshot_path: files.written_state().display().to_string(),
                    mem_file_path: files.written_memory().display().to_string(),
                }),
            )
            .await?;
            let kept = tokio::task::spawn_blocking({
                let files = files.clone();
                let parent = parent.clone();
                let memory_file = memory_file.to_path_buf();
                let max_layers = self.options.max_layers;
                move || -> Result<(PathBuf, u64), VmmError> {
                    let uid = owner.map(|(uid, _)| uid);
                    let header = keep_memory(
                        max_layers,
                        &files.written_memory(),
                        uid,
                        parent.as_deref(),
                        &memory_file,
                    )?;
                    let state = open_written(&files.written_state(), uid)?;
                    let mut bytes = Vec::new();
                    std::io::Read::read_to_end(
                        &mut std::io::Read::take(&state, 64 << 20),
                        &mut bytes,
                    )
                    .map_err(io("reading the snapshot's state"))?;
                    let partial = memory_file.with_extension("partial");
                    std::fs::write(&partial, &bytes)
                        .and_then(|()| std::fs::File::open(&partial)?.sync_all())
                        .and_then(|()| std::fs::rename(&partial, &memory_file))
                        .map_err(io(format!("writing {}", memory_file.display())))?;
                    Ok((header, bytes.len() as u64))
                }
            })
            .await
            .map_err(|error| VmmError::Invalid(format!("keeping the snapshot: {error}")))?;
            for written in [files.written_state(), files.written_memory()] {
                let _ = std::fs::remove_file(written);
            }
            let (header, state_bytes) = kept?;
            // The snapshot cleared the dirty log: the next one is a Diff over this one.
            std::fs::write(files.memory_parent(), header.display().to_string())
                .map_err(io("recording the VM's memory"))?;
            let layer_bytes = crate::layers::LayerHeader::read(&header)
                .ok()
                .and_then(|read| read.layer_paths(&header).pop())
                .and_then(|newest| std::fs::metadata(newest).ok())
                .map_or(0, |m| m.len());
            Ok(SnapshotFiles {
                memory: memory_file.to_path_buf(),
                bytes: state_bytes + layer_bytes,
                ram: Some(header),
                memory_object: false,
            })
        })
    }

    fn written_snapshot(&self, memory_file: &Path) -> Result<SnapshotFiles, VmmError> {
        let header = memory_file.with_extension("header");
        if !crate::layers::is_header(&header) {
            return Err(VmmError::Invalid(format!(
                "{} has no memory header beside it",
                memory_file.display()
            )));
        }
        let bytes = std::fs::metadata(memory_file)
            .map_err(io(format!("reading {}", memory_file.display())))?
            .len();
        Ok(SnapshotFiles {
            memory: memory_file.to_path_buf(),
            bytes,
            ram: Some(header),
            memory_object: false,
        })
    }

    fn destroy<'a>(&'a self, vm: &'a VmProcess) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            kill_and_wait(vm).await;
            let server = self
                .served
                .lock()
                .expect("page servers lock")
                .remove(&(vm.pid, vm.start_time));
            if let Some(server) = server {
                let _ = tokio::task::spawn_blocking(move || server.stop()).await;
            }
            if vm.is_alive() {
                return Err(VmmError::Invalid(format!(
                    "Firecracker (pid {}) would not die",
                    vm.pid
                )));
            }
            let files = VmFiles::new(&vm.workdir);
            for socket in [
                files.api_socket(),
                files.uffd_socket(),
                files.console_fifo(),
            ] {
                let _ = std::fs::remove_file(socket);
            }
            Ok(())
        })
    }

    fn adopt<'a>(&'a self, vm: &'a VmProcess) -> VmmFuture<'a, ()> {
        Box::pin(async move {
            let files = VmFiles::new(&vm.workdir);
            let served_here = self
                .served
                .lock()
                .expect("page servers lock")
                .contains_key(&(vm.pid, vm.start_time));
            if files.memory_parent().exists() && !files.memory_resident().exists() && !served_here {
                return Err(VmmError::Invalid(
                    "the VM was restored and its memory was not all in when its page server \
                     ended: nobody can serve its next fault"
                        .into(),
                ));
            }
            self.client(vm)?.describe_instance().await?;
            crate::console::capture_fifo(files.console_fifo(), vm.console_log());
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineSpec {
        MachineSpec {
            kernel: "/k/vmlinux".into(),
            initrd: None,
            cmdline: "console=ttyS0 reboot=k panic=1".into(),
            disk: "/d/rootfs.raw".into(),
            memory_mib: 512,
            vcpus: 2,
            netns: Some("wrenn-s1".into()),
            tap: "tap0".into(),
            mac: "02:fc:00:00:00:05".into(),
            vmm_user: None,
            memory: GuestMemory::Anonymous,
        }
    }

    #[test]
    fn boot_names_only_stable_paths_and_starts_last() {
        let requests = Firecracker::boot_requests(&machine());
        let bodies: Vec<String> = requests
            .iter()
            .filter_map(|r| r.body())
            .map(|b| b.to_string())
            .collect();
        let all = bodies.join(" ");
        // No host path reaches the snapshot: only the handed descriptors' links.
        assert!(
            !all.contains("/k/vmlinux") && !all.contains("/d/rootfs.raw"),
            "{all}"
        );
        assert!(
            all.contains("/proc/self/fd/5") && all.contains("/proc/self/fd/9"),
            "{all}"
        );
        assert!(all.contains("\"track_dirty_pages\":true"), "{all}");
        assert_eq!(
            requests.last(),
            Some(&Request::Action(Action::InstanceStart))
        );
    }

    #[test]
    fn arguments_name_the_vm_users_directory() {
        let firecracker = Firecracker::new("/usr/bin/firecracker", FirecrackerOptions::default());
        let arguments = firecracker.arguments(Path::new("/var/lib/wrenn/vms/sbx_1.x"));
        assert_eq!(
            arguments,
            [
                "--api-sock",
                "/var/lib/wrenn/vms/sbx_1.x/vmm/api.sock",
                "--id",
                "sbx-1-x",
                "--log-path",
                "/var/lib/wrenn/vms/sbx_1.x/vmm/firecracker.log",
                "--level",
                "Warning"
            ]
        );
    }

    #[test]
    fn files_the_vmm_replaced_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("secret");
        std::fs::write(&target, b"root's").unwrap();
        let link = dir.path().join("snapshot.mem");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open_written(&link, None).is_err());
        assert_eq!(tail_of(&link), "");
        // A file of another owner than the VM's user is refused too.
        let uid = std::fs::metadata(&target).unwrap().uid();
        assert!(open_written(&target, Some(uid + 1)).is_err());
        assert!(open_written(&target, Some(uid)).is_ok());
        // A file placed for the VMM replaces a link rather than writing through it.
        place_for_vmm(&link, b"state", None).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"root's");
        assert_eq!(std::fs::read(&link).unwrap(), b"state");
    }
}
