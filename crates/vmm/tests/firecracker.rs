//! The Firecracker backend against a real Firecracker, when one is given: `FIRECRACKER_BIN` (a
//! Firecracker built from its public source; none is committed) and `FIRECRACKER_KERNEL` (an
//! uncompressed x86_64 `vmlinux`). Skipped, saying so, otherwise (as in CI: no registry has
//! Firecracker). Needs root (a network namespace and a tap) and `/dev/kvm`.
//!
//! It drives the whole control flow: boot, pause, a Full snapshot kept as a layered memory file,
//! destroy; a restore into a new process and directory with the memory served by the page server
//! over userfaultfd, resume, pause, a Diff snapshot kept as a second layer, destroy; and checks
//! that no Firecracker process, socket or FIFO is left. It does not need the guest to get far:
//! on a host whose KVM cannot run the guest well, the VMM's side is what is exercised.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use wrenn_vmm::firecracker::api::FirecrackerClient;
use wrenn_vmm::firecracker::{Firecracker, FirecrackerOptions};
use wrenn_vmm::launch::VmmUser;
use wrenn_vmm::layers::LayerHeader;
use wrenn_vmm::{GuestMemory, MachineSpec, VmProcess, Vmm};

struct Prerequisites {
    binary: PathBuf,
    kernel: PathBuf,
}

fn prerequisites() -> Option<Prerequisites> {
    let missing = |what: &str| {
        eprintln!("SKIPPED: the real-Firecracker test needs {what}");
        None
    };
    let Some(binary) = std::env::var_os("FIRECRACKER_BIN").map(PathBuf::from) else {
        return missing(
            "FIRECRACKER_BIN (a firecracker binary built from github.com/firecracker-microvm/firecracker)",
        );
    };
    let Some(kernel) = std::env::var_os("FIRECRACKER_KERNEL").map(PathBuf::from) else {
        return missing("FIRECRACKER_KERNEL (an uncompressed x86_64 vmlinux)");
    };
    if !binary.is_file() || !kernel.is_file() {
        panic!(
            "FIRECRACKER_BIN {} or FIRECRACKER_KERNEL {} is not a file",
            binary.display(),
            kernel.display()
        );
    }
    if !nix::unistd::geteuid().is_root() {
        return missing("root (a network namespace and a tap)");
    }
    if !Path::new("/dev/kvm").exists() {
        return missing("/dev/kvm");
    }
    Some(Prerequisites { binary, kernel })
}

/// The VM's own user, as the agent runs it (numeric; no account needed), where the host lets
/// an unprivileged Firecracker open `/dev/net/tun` (mode 0666, as Debian makes it) and
/// `/dev/kvm` (0660 with its group handed, or 0666); root otherwise, saying so.
fn vm_user(uid: u32) -> Option<VmmUser> {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &str| {
        std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0)
    };
    let (tun, kvm) = (mode("/dev/net/tun"), mode("/dev/kvm"));
    if tun & 0o006 == 0o006 && kvm & 0o060 == 0o060 {
        Some(VmmUser { uid, gid: uid })
    } else {
        eprintln!(
            "Firecracker runs as root here: /dev/net/tun is {tun:o} and /dev/kvm {kvm:o}, which an \
             unprivileged VMM cannot open"
        );
        None
    }
}

/// A network namespace with a tap `tap0` the VM's user may attach, removed when dropped.
struct Namespace(String);

impl Namespace {
    fn new(user: Option<VmmUser>) -> Namespace {
        let name = format!("wrenn-fct{}", std::process::id());
        let ip = |arguments: &[&str]| {
            let status = Command::new("ip").args(arguments).status().unwrap();
            assert!(status.success(), "ip {arguments:?}");
        };
        ip(&["netns", "add", &name]);
        let namespace = Namespace(name.clone());
        let uid = user.map_or(0, |user| user.uid).to_string();
        ip(&[
            "-n", &name, "tuntap", "add", "dev", "tap0", "mode", "tap", "user", &uid, "vnet_hdr",
        ]);
        ip(&["-n", &name, "link", "set", "tap0", "up"]);
        namespace
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn state(vm: &VmProcess) -> String {
    let runtime = tokio::runtime::Handle::current();
    let client = FirecrackerClient::new(&vm.control_socket);
    tokio::task::block_in_place(|| runtime.block_on(client.describe_instance()))
        .unwrap()
        .state
}

fn sockets_in(directory: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    let mut pending = vec![directory.to_path_buf()];
    while let Some(directory) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_socket() || kind.is_fifo() {
                found.push(entry.path());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_snapshot_restore_through_the_page_server_diff_and_destroy() {
    let Some(prerequisites) = prerequisites() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    // The VM's own user, as the agent runs it (numeric; no account needed).
    let user = vm_user(64_900);
    let namespace = Namespace::new(user);
    // Directories the VM's user must pass through to reach its own.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o711)).unwrap();

    let disk = root.path().join("rootfs.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let machine = MachineSpec {
        kernel: prerequisites.kernel.clone(),
        initrd: None,
        cmdline: "console=ttyS0 reboot=k panic=1 pci=off".into(),
        disk: disk.clone(),
        memory_mib: 128,
        vcpus: 1,
        netns: Some(namespace.0.clone()),
        tap: "tap0".into(),
        mac: "02:fc:00:00:00:05".into(),
        vmm_user: user,
        memory: GuestMemory::Anonymous,
    };
    let firecracker = Firecracker::new(&prerequisites.binary, FirecrackerOptions::default());

    // Boot, pause, Full snapshot, destroy.
    let first = root.path().join("first");
    let vm = firecracker.boot(&machine, &first).await.unwrap();
    assert_eq!(state(&vm), "Running");
    firecracker.pause(&vm).await.unwrap();
    assert_eq!(state(&vm), "Paused");
    let snapshots = root.path().join("snapshots");
    std::fs::create_dir(&snapshots).unwrap();
    let full = firecracker
        .snapshot(&vm, &snapshots.join("full.state"))
        .await
        .unwrap();
    let header = LayerHeader::read(full.ram.as_ref().unwrap()).unwrap();
    assert_eq!(header.generation, 0);
    assert_eq!(header.memory_bytes, 128 << 20);
    eprintln!(
        "Full snapshot: state {} bytes, memory {} of {} blocks stored",
        std::fs::metadata(&full.memory).unwrap().len(),
        header.stored_blocks(),
        header.blocks()
    );
    firecracker.destroy(&vm).await.unwrap();
    assert!(!vm.is_alive());

    // Restore into a new process, directory and disk, memory served by the page server.
    let second_disk = root.path().join("rootfs-2.raw");
    std::fs::copy(&disk, &second_disk).unwrap();
    let restored_machine = MachineSpec {
        disk: second_disk,
        ..machine.clone()
    };
    let second = root.path().join("second");
    let vm = firecracker
        .restore(&restored_machine, &full, &second)
        .await
        .unwrap();
    assert_eq!(state(&vm), "Running");
    let stats = firecracker
        .page_server_stats(&vm)
        .expect("a page server for the restore");
    eprintln!("page server after the restore: {stats:?}");
    // The prefetcher brings every page in; the marker says so.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !second.join("memory-resident").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            firecracker.page_server_stats(&vm)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = firecracker.page_server_stats(&vm).unwrap();
    eprintln!("page server once resident: {stats:?}");
    assert_eq!(
        stats.pages_prefetched + stats.faults_served + stats.zero_faults,
        (128 << 20) / 4096,
        "{stats:?}"
    );

    // Pause, Diff snapshot: a second layer over the first.
    firecracker.pause(&vm).await.unwrap();
    let diff = firecracker
        .snapshot(&vm, &snapshots.join("diff.state"))
        .await
        .unwrap();
    let diff_header = LayerHeader::read(diff.ram.as_ref().unwrap()).unwrap();
    assert_eq!(diff_header.generation, 1);
    assert!(diff_header.layers.len() <= 2, "{diff_header:?}");
    eprintln!(
        "Diff snapshot: {} layers, new layer {} bytes",
        diff_header.layers.len(),
        std::fs::metadata(wrenn_vmm::layers::layer_path(
            &snapshots.join("diff.state"),
            1
        ))
        .unwrap()
        .len()
    );
    firecracker.destroy(&vm).await.unwrap();
    assert!(!vm.is_alive());

    // The Diff restores too; paused again, its snapshot goes where it came from (as a sandbox
    // paused twice): a third generation over the two, the parent's layers kept.
    let third = root.path().join("third");
    let vm = firecracker
        .restore(&restored_machine, &diff, &third)
        .await
        .unwrap();
    assert_eq!(state(&vm), "Running");
    firecracker.pause(&vm).await.unwrap();
    let again = firecracker
        .snapshot(&vm, &snapshots.join("diff.state"))
        .await
        .unwrap();
    let again_header = LayerHeader::read(again.ram.as_ref().unwrap()).unwrap();
    assert_eq!(again_header.generation, 2);
    for layer in again_header.layer_paths(again.ram.as_ref().unwrap()) {
        assert!(layer.is_file(), "{} is gone", layer.display());
    }
    firecracker.destroy(&vm).await.unwrap();
    let fourth = root.path().join("fourth");
    let vm = firecracker
        .restore(&restored_machine, &again, &fourth)
        .await
        .unwrap();
    assert_eq!(state(&vm), "Running");
    firecracker.destroy(&vm).await.unwrap();

    // Nothing is left: no process, no socket, no FIFO.
    assert!(!vm.is_alive());
    let left = sockets_in(root.path());
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A load that Firecracker refuses (a state file that is not one) fails with its fault message,
/// and leaves neither the process nor the page server's socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_load_reports_firecrackers_reason_and_leaves_nothing() {
    let Some(prerequisites) = prerequisites() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let user = vm_user(64_901);
    let namespace = Namespace::new(user);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let disk = root.path().join("rootfs.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let machine = MachineSpec {
        kernel: prerequisites.kernel.clone(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
        disk,
        memory_mib: 128,
        vcpus: 1,
        netns: Some(namespace.0.clone()),
        tap: "tap0".into(),
        mac: "02:fc:00:00:00:05".into(),
        vmm_user: user,
        memory: GuestMemory::Anonymous,
    };
    let memory = root.path().join("memory");
    std::fs::write(&memory, vec![1u8; 128 << 20]).unwrap();
    let header = root.path().join("bogus.header");
    wrenn_vmm::layers::write_base(
        &memory,
        128 << 20,
        4096,
        &header,
        &root.path().join("bogus.layer"),
    )
    .unwrap();
    let state_file = root.path().join("bogus.state");
    std::fs::write(&state_file, b"not a snapshot").unwrap();
    let snapshot = wrenn_vmm::SnapshotFiles {
        memory: state_file,
        bytes: 14,
        ram: Some(header),
        memory_object: false,
    };
    let firecracker = Firecracker::new(&prerequisites.binary, FirecrackerOptions::default());
    let error = firecracker
        .restore(&machine, &snapshot, &root.path().join("vm"))
        .await
        .unwrap_err()
        .to_string();
    eprintln!("refused: {error}");
    assert!(error.contains("snapshot"), "{error}");
    let left = sockets_in(root.path());
    assert!(left.is_empty(), "left behind: {left:?}");
}
