//! How a VMM process starts confined. The agent (root) opens everything the VM needs (its
//! control and console sockets, kernel, initrd, every disk layer, and its tap in the sandbox's
//! network namespace) and hands the VMM those descriptors at fixed numbers ([`HandedFd`]). The
//! child then joins the namespace, gives up root for the VM's own user and group (no
//! supplementary groups but `/dev/kvm`'s when KVM is used, no capabilities, `no_new_privs`) and
//! executes the VMM, whose seccomp filter then forbids it to start programs. A VMM broken into by
//! its guest so holds nothing but its own VM's descriptors: it can open none of the agent's
//! files, another VM's disk, or a socket of the host's namespace. It runs in a session of its
//! own, so that it outlives the agent whatever signals reach the agent's process group.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::accel::Accel;
use crate::qcow2::Layer;
use crate::{GuestMemory, MachineSpec, VmmError};

/// The unprivileged identity a VMM runs as (numeric: it needs no entry in `/etc/passwd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmUser {
    pub uid: u32,
    pub gid: u32,
}

/// The descriptors a VMM is handed, by the number it finds each at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandedFd {
    /// The listening QMP socket.
    Qmp,
    /// The listening console socket.
    Console,
    Kernel,
    Initrd,
    /// The tap, attached in the sandbox's namespace.
    Tap,
    /// The memory file the guest's memory is (see [`crate::memory`]), when it is one.
    Memory,
    /// A disk layer, 0 being the top (the VM's own, writable).
    Disk(usize),
}

impl HandedFd {
    pub fn number(self) -> RawFd {
        match self {
            HandedFd::Qmp => 3,
            HandedFd::Console => 4,
            HandedFd::Kernel => 5,
            HandedFd::Initrd => 6,
            HandedFd::Tap => 7,
            HandedFd::Memory => 8,
            HandedFd::Disk(depth) => 9 + depth as RawFd,
        }
    }

    /// A path that opens the handed file again (for options that take only a path). The
    /// kernel checks the file's own mode then, but no directory on the way to it.
    pub fn proc_path(self) -> String {
        format!("/proc/self/fd/{}", self.number())
    }
}

/// Descriptors above this number are the parent's copies, moved out of the way of the
/// numbers the child gets them at.
const HIGH_FD: RawFd = 100;

/// What a VMM is started with, opened by the agent.
#[derive(Debug)]
pub struct Launch {
    /// (the agent's copy, the number the VMM finds it at).
    handed: Vec<(OwnedFd, RawFd)>,
    netns: Option<OwnedFd>,
    /// The tap to attach for the VMM (QEMU's); Firecracker attaches its own.
    tap: Option<TapRequest>,
    user: Option<VmmUser>,
    groups: Vec<libc::gid_t>,
}

/// The TUNSETIFF request for the VM's tap.
#[derive(Clone, Copy)]
struct TapRequest(libc::ifreq);

impl std::fmt::Debug for TapRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TapRequest")
    }
}

// SAFETY: an ifreq is plain data (a name and a union of integers; no pointer in the variant
// used here), built once and only read afterwards.
unsafe impl Send for TapRequest {}
// SAFETY: as above.
unsafe impl Sync for TapRequest {}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let context = context.into();
    move |error| VmmError::io(context, error)
}

/// A copy of `fd` at a number of at least [`HIGH_FD`], close-on-exec.
fn high(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one or -1.
    let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, HIGH_FD) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `copy` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Binds a listening unix socket at `path` (root's only) for the VMM to serve.
fn listener(path: &Path) -> Result<OwnedFd, VmmError> {
    let _ = std::fs::remove_file(path);
    let socket = std::os::unix::net::UnixListener::bind(path)
        .map_err(io(format!("binding {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("protecting {}", path.display())))?;
    Ok(OwnedFd::from(socket))
}

impl Launch {
    /// Opens what the QEMU VM of `machine` needs; its sockets are bound in `workdir`.
    pub fn prepare(
        machine: &MachineSpec,
        workdir: &Path,
        layers: &[Layer],
        accel: Accel,
    ) -> Result<Self, VmmError> {
        let sockets = vec![
            (listener(&workdir.join("qmp.sock"))?, HandedFd::Qmp),
            (listener(&workdir.join("console.sock"))?, HandedFd::Console),
        ];
        Self::prepare_with(machine, sockets, layers, accel, true)
    }

    /// Opens what the Firecracker VM of `machine` needs: kernel, initrd and disk, which it
    /// opens again by their `/proc/self/fd` paths (the same in every Firecracker process: a
    /// snapshot names them, and restores anywhere). Firecracker binds its API socket and
    /// attaches its tap (by name, in the namespace) itself.
    pub fn prepare_firecracker(machine: &MachineSpec, disk: &Layer) -> Result<Self, VmmError> {
        Self::prepare_with(
            machine,
            Vec::new(),
            std::slice::from_ref(disk),
            Accel::Kvm,
            false,
        )
    }

    fn prepare_with(
        machine: &MachineSpec,
        sockets: Vec<(OwnedFd, HandedFd)>,
        layers: &[Layer],
        accel: Accel,
        attach_tap: bool,
    ) -> Result<Self, VmmError> {
        let mut handed = sockets;
        handed.push((
            std::fs::File::open(&machine.kernel)
                .map_err(io(format!("opening {}", machine.kernel.display())))?
                .into(),
            HandedFd::Kernel,
        ));
        if let Some(initrd) = &machine.initrd {
            handed.push((
                std::fs::File::open(initrd)
                    .map_err(io(format!("opening {}", initrd.display())))?
                    .into(),
                HandedFd::Initrd,
            ));
        }
        match &machine.memory {
            GuestMemory::Anonymous => {}
            GuestMemory::Shared(memory) | GuestMemory::Private(memory) => handed.push((
                memory
                    .try_clone()
                    .map_err(io("handing over the memory file"))?,
                HandedFd::Memory,
            )),
        }
        if layers.len() >= (HIGH_FD - HandedFd::Disk(0).number()) as usize {
            return Err(VmmError::Invalid(format!(
                "a disk of {} layers is more than a VMM is handed",
                layers.len()
            )));
        }
        for (depth, layer) in layers.iter().enumerate() {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(depth == 0)
                .open(&layer.path)
                .map_err(io(format!("opening the disk {}", layer.path.display())))?;
            handed.push((file.into(), HandedFd::Disk(depth)));
        }
        let handed = handed
            .into_iter()
            .map(|(fd, at)| Ok((high(fd)?, at.number())))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(io("moving the VM's descriptors"))?;
        let netns = match &machine.netns {
            Some(name) => Some(
                std::fs::File::open(Path::new("/run/netns").join(name))
                    .map_err(io(format!("opening the network namespace {name}")))?
                    .into(),
            ),
            None => None,
        };
        // SAFETY: an all-zero ifreq is a valid value (an empty name, zero flags).
        let mut tap: libc::ifreq = unsafe { std::mem::zeroed() };
        let name = machine.tap.as_bytes();
        if name.is_empty() || name.len() >= tap.ifr_name.len() || name.contains(&0) {
            return Err(VmmError::Invalid(format!(
                "{:?} is not a network interface name",
                machine.tap
            )));
        }
        for (slot, byte) in tap.ifr_name.iter_mut().zip(name) {
            *slot = *byte as libc::c_char;
        }
        // As QEMU opens a tap itself: no packet information, with virtio-net headers (a
        // snapshot taken with them must find them again).
        tap.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        let mut groups = Vec::new();
        if accel == Accel::Kvm {
            use std::os::unix::fs::MetadataExt;
            if let Ok(kvm) = std::fs::metadata("/dev/kvm") {
                groups.push(kvm.gid());
            }
        }
        Ok(Self {
            handed,
            netns,
            tap: attach_tap.then_some(TapRequest(tap)),
            user: machine.vmm_user,
            groups,
        })
    }

    /// Sets up the child of `command` as the module says.
    pub fn apply(&self, command: &mut std::process::Command) {
        let handed: Vec<(RawFd, RawFd)> = self
            .handed
            .iter()
            .map(|(fd, at)| (fd.as_raw_fd(), *at))
            .collect();
        let netns = self.netns.as_ref().map(|fd| fd.as_raw_fd());
        let tap = self.tap;
        let user = self.user;
        let groups = self.groups.clone();
        // SAFETY: the closure runs in the forked child before exec and makes only system calls
        // (no allocation, no locks): everything it reads was built before the fork, and the
        // descriptors it uses stay open in the parent until the spawn returns.
        unsafe {
            command.pre_exec(move || confine(netns, tap.as_ref(), &handed, user, &groups));
        }
    }
}

fn check(result: libc::c_int) -> std::io::Result<libc::c_int> {
    if result < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// The child's side (see [`Launch::apply`]): async-signal-safe calls only.
fn confine(
    netns: Option<RawFd>,
    tap: Option<&TapRequest>,
    handed: &[(RawFd, RawFd)],
    user: Option<VmmUser>,
    groups: &[libc::gid_t],
) -> std::io::Result<()> {
    // SAFETY: plain system calls on descriptors this process holds and on values built before
    // the fork; each result is checked.
    unsafe {
        // A session of its own: no signal meant for the agent's terminal or process group
        // reaches the VM, and the agent's death does not make its group an orphan (which
        // would bring a stopped VMM SIGHUP): the VM outlives the agent, to be adopted.
        check(libc::setsid())?;
        if let Some(netns) = netns {
            check(libc::setns(netns, libc::CLONE_NEWNET))?;
        }
        // The tap is attached here, in the sandbox's namespace, while still root.
        if let Some(tap) = tap {
            let tun = check(libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC,
            ))?;
            check(libc::ioctl(
                tun,
                libc::TUNSETIFF,
                &tap.0 as *const libc::ifreq,
            ))?;
            let tun_high = check(libc::fcntl(tun, libc::F_DUPFD_CLOEXEC, HIGH_FD))?;
            libc::close(tun);
            check(libc::dup2(tun_high, HandedFd::Tap.number()))?;
        }
        // Every source is at HIGH_FD or above and every target below it, so no dup2 here
        // overwrites a source, and each target comes out without close-on-exec.
        for (source, target) in handed {
            check(libc::dup2(*source, *target))?;
        }
        if let Some(user) = user {
            check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            check(libc::setresgid(user.gid, user.gid, user.gid))?;
            check(libc::setresuid(user.uid, user.uid, user.uid))?;
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handed_numbers_are_fixed_low_and_distinct() {
        let all = [
            HandedFd::Qmp,
            HandedFd::Console,
            HandedFd::Kernel,
            HandedFd::Initrd,
            HandedFd::Tap,
            HandedFd::Memory,
            HandedFd::Disk(0),
            HandedFd::Disk(15),
        ];
        let numbers: std::collections::HashSet<RawFd> = all.iter().map(|fd| fd.number()).collect();
        assert_eq!(numbers.len(), all.len());
        assert!(numbers.iter().all(|n| *n >= 3 && *n < HIGH_FD));
        assert_eq!(HandedFd::Kernel.proc_path(), "/proc/self/fd/5");
    }
}
