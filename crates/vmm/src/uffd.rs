//! The userfaultfd page server of Firecracker restores (issue #18, its first part): Firecracker,
//! loading a snapshot with the `Uffd` memory backend, maps the guest's memory anonymously,
//! registers it with a userfaultfd, connects to a Unix socket the host agent listens on and sends
//! one message: the JSON list of its regions ([`GuestRegionUffdMapping`]) with the userfaultfd
//! attached (`SCM_RIGHTS`). From then on every first touch of a guest page stops the vCPU until the
//! server copies the page in from the snapshot's memory file (`UFFDIO_COPY`), or maps the zero
//! page (`UFFDIO_ZEROPAGE`) where the file has a hole. After the handshake a prefetcher copies in
//! every page not yet touched, in a recorded order when one is given, sequentially otherwise, on a
//! thread of its own, so later touches never wait; a fault never waits for it.
//!
//! A balloon's `madvise(MADV_DONTNEED)` reaches the server as `UFFD_EVENT_REMOVE`: those pages are
//! the guest's zeros from then on (served as zero pages, never prefetched). While such an event is
//! unread the kernel refuses copies with `EAGAIN`; a fault so refused is tried again after the
//! events are read. A copy that finds the page present (`EEXIST`: the prefetcher was first) wakes
//! the faulting thread instead.
//!
//! If the server fails, Firecracker would hang on its next fault for ever: the server kills it
//! (its pid comes from the socket's `SO_PEERCRED`). It stops by itself when Firecracker exits.
//! Facts from `../shared/spec/firecracker.md` §1.6 and the kernel's `linux/userfaultfd.h`.

use std::collections::VecDeque;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::layers::MemoryImage;

/// `UFFDIO_API`, `UFFDIO_REGISTER`, `UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_WAKE`: the kernel's
/// ioctl numbers (`_IOWR(0xAA, n, struct …)`, `_IOR` for `WAKE`).
pub mod ioctl {
    pub const UFFD_API: u64 = 0xAA;
    pub const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
    pub const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
    pub const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
    pub const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
    pub const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;
    /// `UFFDIO_REGISTER_MODE_MISSING`.
    pub const REGISTER_MODE_MISSING: u64 = 1;
    /// `UFFD_FEATURE_EVENT_REMOVE`.
    pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
    pub const EVENT_PAGEFAULT: u8 = 0x12;
    pub const EVENT_REMOVE: u8 = 0x15;

    /// `struct uffdio_api`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct Api {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }

    /// `struct uffdio_range`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct Range {
        pub start: u64,
        pub len: u64,
    }

    /// `struct uffdio_register`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct Register {
        pub range: Range,
        pub mode: u64,
        pub ioctls: u64,
    }

    /// `struct uffdio_copy`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct Copy {
        pub dst: u64,
        pub src: u64,
        pub len: u64,
        pub mode: u64,
        pub copy: i64,
    }

    /// `struct uffdio_zeropage`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct ZeroPage {
        pub range: Range,
        pub mode: u64,
        pub zeropage: i64,
    }

    /// `struct uffd_msg`: the event, then 24 bytes whose meaning depends on it (a page fault's
    /// flags and address; a removal's start and end).
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct Message {
        pub event: u8,
        pub reserved1: u8,
        pub reserved2: u16,
        pub reserved3: u32,
        pub arg: [u64; 3],
    }
}

/// One region of guest memory, as Firecracker (1.16.1's `GuestRegionUffdMapping`) describes it.
/// Page sizes are in bytes in both fields; `page_size_kib` is the older name (deprecated, still
/// sent), and the only one before 1.12.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    /// Where the region starts in Firecracker's address space.
    pub base_host_virt_addr: u64,
    /// Its length in bytes.
    pub size: u64,
    /// Where its contents start in the memory file.
    pub offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<u64>,
}

impl GuestRegionUffdMapping {
    /// The region's page size in bytes: 4 KiB, or 2 MiB (hugetlbfs).
    pub fn page_bytes(&self) -> Result<u64, UffdError> {
        let size = match (self.page_size, self.page_size_kib) {
            (Some(a), Some(b)) if a != b => {
                return Err(UffdError::Handshake(format!(
                    "a region gives two page sizes, {a} and {b}"
                )));
            }
            (Some(size), _) | (None, Some(size)) => size,
            (None, None) => {
                return Err(UffdError::Handshake("a region gives no page size".into()));
            }
        };
        if size != 4096 && size != 2 << 20 {
            return Err(UffdError::Handshake(format!(
                "page size {size} is neither 4 KiB nor 2 MiB"
            )));
        }
        Ok(size)
    }

    fn contains(&self, address: u64) -> bool {
        address >= self.base_host_virt_addr && address - self.base_host_virt_addr < self.size
    }
}

/// What can go wrong serving a restore's memory.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Firecracker's handshake: {0}")]
    Handshake(String),
    #[error("the memory file: {0}")]
    Memory(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UffdError {
    let what = what.into();
    move |source| UffdError::Io { what, source }
}

/// In which order the prefetcher copies pages in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Prefetch {
    /// Not at all: pages come in as the guest touches them.
    None,
    /// Region by region, page by page.
    #[default]
    Sequential,
    /// These memory-file offsets first (the order a template's first run touched its pages),
    /// then every other page sequentially.
    Recorded(Vec<u64>),
}

/// How a page server runs.
#[derive(Debug, Clone)]
pub struct PageServerOptions {
    /// How long it waits for Firecracker to connect and send its regions.
    pub handshake_timeout: Duration,
    pub prefetch: Prefetch,
    /// Set by the caller to stop waiting for the handshake (the VMM failed its load and will
    /// never connect).
    pub abandon: Option<Arc<AtomicBool>>,
    /// A file created once the prefetcher has every page in (a restarted agent reads it: the
    /// VM no longer needs a page server, but for a balloon's removals).
    pub resident_marker: Option<PathBuf>,
}

impl Default for PageServerOptions {
    fn default() -> Self {
        PageServerOptions {
            handshake_timeout: Duration::from_secs(10),
            prefetch: Prefetch::Sequential,
            abandon: None,
            resident_marker: None,
        }
    }
}

/// What a page server has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageServerStats {
    /// Faults answered with the file's page, and with the zero page.
    pub faults_served: u64,
    pub zero_faults: u64,
    /// Pages the prefetcher copied in (a page a fault brought first is not counted).
    pub pages_prefetched: u64,
    /// `UFFD_EVENT_REMOVE` ranges (a balloon's).
    pub removals: u64,
    /// From the handshake until the prefetcher had every page in, once it has.
    pub resident_after: Option<Duration>,
}

/// A page server bound to its socket, before Firecracker connects.
#[derive(Debug)]
pub struct PageServer {
    listener: UnixListener,
    socket: SocketFile,
    memory: Arc<MemoryImage>,
}

/// The listening socket's path, removed when this is dropped: whether the handshake succeeds,
/// fails or never comes, and when a server is dropped unused, no socket file is left.
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl PageServer {
    /// Listens on `socket` (which must not exist; owner-only) to serve `memory_file`.
    pub fn bind(socket: &Path, memory_file: &Path) -> Result<Self, UffdError> {
        Self::bind_for(socket, memory_file, None)
    }

    /// As [`PageServer::bind`], the socket owned by `owner` (uid, gid): the unprivileged
    /// user Firecracker runs as must be able to connect to it.
    pub fn bind_for(
        socket: &Path,
        memory_file: &Path,
        owner: Option<(u32, u32)>,
    ) -> Result<Self, UffdError> {
        let memory = Arc::new(
            MemoryImage::open(memory_file).map_err(|error| UffdError::Memory(error.to_string()))?,
        );
        let listener =
            UnixListener::bind(socket).map_err(io(format!("listening on {}", socket.display())))?;
        let socket = SocketFile(socket.to_path_buf());
        std::fs::set_permissions(
            &socket.0,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .map_err(io(format!("restricting {}", socket.0.display())))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(&socket.0, Some(uid), Some(gid))
                .map_err(io(format!("handing {} to its VMM", socket.0.display())))?;
        }
        Ok(PageServer {
            listener,
            socket,
            memory,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket.0
    }

    /// Waits for Firecracker's handshake, then serves its faults and prefetches on threads of
    /// its own. A handshake that is malformed or describes memory the file does not have kills
    /// the peer and fails; so does one that does not come within the timeout (no peer to kill).
    pub fn serve(self, options: PageServerOptions) -> Result<RunningPageServer, UffdError> {
        let deadline = Instant::now() + options.handshake_timeout;
        let stream = accept_until(&self.listener, deadline, options.abandon.as_deref())?;
        let peer = peer_pid(&stream);
        let handshake = receive_handshake(&stream, deadline).and_then(|(regions, uffd)| {
            check_regions(&regions, self.memory.len())?;
            Ok((regions, uffd))
        });
        let (regions, uffd) = match handshake {
            Ok(handshake) => handshake,
            Err(error) => {
                kill_peer(peer, &error);
                return Err(error);
            }
        };
        drop(self.socket);
        let shared = Arc::new(Shared {
            uffd,
            regions,
            memory: self.memory,
            peer,
            removed: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            failed: Mutex::new(None),
            faults_served: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            pages_prefetched: AtomicU64::new(0),
            removals: AtomicU64::new(0),
            resident_after: Mutex::new(None),
            started: Instant::now(),
        });
        let (stop_read, stop_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|errno| io("making the stop pipe")(errno.into()))?;
        let pidfd = peer.and_then(pidfd_open);
        let faults = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("uffd-faults".into())
                .spawn(move || serve_faults(&shared, &stop_read, pidfd.as_ref()))
                .map_err(io("starting the fault thread"))?
        };
        let prefetcher = match options.prefetch {
            Prefetch::None => None,
            order => {
                let shared = shared.clone();
                let marker = options.resident_marker.clone();
                Some(
                    std::thread::Builder::new()
                        .name("uffd-prefetch".into())
                        .spawn(move || {
                            prefetch(&shared, &order);
                            let resident = shared.resident_after.lock().expect("stats lock");
                            if let (Some(_), Some(marker)) = (*resident, marker) {
                                let _ = std::fs::write(marker, b"");
                            }
                        })
                        .map_err(io("starting the prefetcher"))?,
                )
            }
        };
        // Firecracker never writes on the socket again, nor closes it; nor do we until the end.
        Ok(RunningPageServer {
            shared,
            stop: Some(stop_write),
            faults: Some(faults),
            prefetcher,
            _stream: stream,
        })
    }
}

/// A page server serving a restored VM; dropping it stops it.
#[derive(Debug)]
pub struct RunningPageServer {
    shared: Arc<Shared>,
    stop: Option<OwnedFd>,
    faults: Option<std::thread::JoinHandle<()>>,
    prefetcher: Option<std::thread::JoinHandle<()>>,
    _stream: UnixStream,
}

impl RunningPageServer {
    pub fn stats(&self) -> PageServerStats {
        let shared = &self.shared;
        PageServerStats {
            faults_served: shared.faults_served.load(Ordering::Relaxed),
            zero_faults: shared.zero_faults.load(Ordering::Relaxed),
            pages_prefetched: shared.pages_prefetched.load(Ordering::Relaxed),
            removals: shared.removals.load(Ordering::Relaxed),
            resident_after: *shared.resident_after.lock().expect("stats lock"),
        }
    }

    /// The peer's pid, as the socket gave it.
    pub fn peer(&self) -> Option<i32> {
        self.shared.peer
    }

    /// Why the server stopped serving, if it failed (it killed the peer then).
    pub fn failure(&self) -> Option<String> {
        self.shared.failed.lock().expect("failure lock").clone()
    }

    /// Whether the fault thread still runs (it ends when the peer exits, fails, or is stopped).
    pub fn is_serving(&self) -> bool {
        self.faults
            .as_ref()
            .is_some_and(|thread| !thread.is_finished())
    }

    /// Stops serving, waits for both threads, and returns what was done.
    pub fn stop(mut self) -> PageServerStats {
        self.stop_threads();
        self.stats()
    }

    fn stop_threads(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Closing the pipe's write end wakes the fault thread's poll.
        self.stop.take();
        for thread in [self.faults.take(), self.prefetcher.take()]
            .into_iter()
            .flatten()
        {
            let _ = thread.join();
        }
    }
}

impl Drop for RunningPageServer {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

#[derive(Debug)]
struct Shared {
    uffd: OwnedFd,
    regions: Vec<GuestRegionUffdMapping>,
    memory: Arc<MemoryImage>,
    peer: Option<i32>,
    /// Address ranges the guest gave back (`UFFD_EVENT_REMOVE`): zeros from then on.
    removed: Mutex<Vec<(u64, u64)>>,
    stopping: AtomicBool,
    failed: Mutex<Option<String>>,
    faults_served: AtomicU64,
    zero_faults: AtomicU64,
    pages_prefetched: AtomicU64,
    removals: AtomicU64,
    resident_after: Mutex<Option<Duration>>,
    started: Instant,
}

/// How one attempt to place a page ended.
enum Placed {
    Done,
    /// Already there (`EEXIST`).
    Present,
    /// Refused while an event is unread (`EAGAIN`): try again after reading events.
    Later,
    /// The VM's memory is gone (`ESRCH`, `ENOENT`: Firecracker exited).
    Gone,
}

impl Shared {
    fn region_of(&self, address: u64) -> Option<&GuestRegionUffdMapping> {
        self.regions.iter().find(|region| region.contains(address))
    }

    fn is_removed(&self, address: u64) -> bool {
        self.removed
            .lock()
            .expect("removed lock")
            .iter()
            .any(|&(start, end)| address >= start && address < end)
    }

    /// Whether `len` bytes at `address` (in `region`) are the guest's zeros: a hole of the
    /// file or a range the guest gave back.
    fn is_zero(&self, region: &GuestRegionUffdMapping, address: u64, len: u64) -> bool {
        let offset = region.offset + (address - region.base_host_virt_addr);
        self.is_removed(address) || self.memory.is_zero(offset, len)
    }

    /// Places `len` bytes of whole pages at `address` (in `region`), all of them zeros or all of
    /// them the file's: how it ended, and how many bytes were placed before it did.
    fn place_range(
        &self,
        region: &GuestRegionUffdMapping,
        address: u64,
        len: u64,
        zero: bool,
    ) -> Result<(Placed, u64), std::io::Error> {
        let page = region.page_bytes().unwrap_or(4096);
        let offset = region.offset + (address - region.base_host_virt_addr);
        // The zero page exists only for 4 KiB pages; huge pages are copied (a hole reads as
        // zeros through the mapping).
        let (result, done) = if zero && page == 4096 {
            let mut request = ioctl::ZeroPage {
                range: ioctl::Range {
                    start: address,
                    len,
                },
                ..Default::default()
            };
            // SAFETY: UFFDIO_ZEROPAGE with a properly sized, initialised request that lives
            // across the call; the range is whole pages of a region the peer registered.
            let result =
                unsafe { libc::ioctl(self.uffd.as_raw_fd(), ioctl::UFFDIO_ZEROPAGE, &mut request) };
            (result, request.zeropage)
        } else if zero {
            let zeros = vec![0u8; len as usize];
            self.copy(address, zeros.as_ptr() as u64, len)
        } else if let Some(source) = self.memory.contiguous(offset, len) {
            self.copy(address, source as u64, len)
        } else {
            // Stored in several places (a huge page over blocks of several layers): gathered.
            let mut gathered = vec![0u8; len as usize];
            self.memory.read_at(offset, &mut gathered);
            self.copy(address, gathered.as_ptr() as u64, len)
        };
        if result == 0 {
            return Ok((Placed::Done, len));
        }
        let error = std::io::Error::last_os_error();
        // On an error the kernel reports the bytes placed before it (or the negated error).
        let placed = u64::try_from(done).unwrap_or(0).min(len);
        match error.raw_os_error() {
            Some(libc::EEXIST) => Ok((Placed::Present, placed)),
            Some(libc::EAGAIN) => Ok((Placed::Later, placed)),
            Some(libc::ESRCH) | Some(libc::ENOENT) => Ok((Placed::Gone, placed)),
            _ => Err(error),
        }
    }

    /// `UFFDIO_COPY`: the ioctl's result, and the bytes it reports copied.
    fn copy(&self, address: u64, source: u64, len: u64) -> (libc::c_int, i64) {
        let mut request = ioctl::Copy {
            dst: address,
            src: source,
            len,
            ..Default::default()
        };
        // SAFETY: UFFDIO_COPY with a properly sized request; `source` points at `len` readable
        // bytes (the file's mapping or a buffer the caller holds across the call).
        let result =
            unsafe { libc::ioctl(self.uffd.as_raw_fd(), ioctl::UFFDIO_COPY, &mut request) };
        (result, request.copy)
    }

    /// Wakes the threads waiting on the page at `address` (it was already there).
    fn wake(&self, address: u64, len: u64) {
        let mut range = ioctl::Range {
            start: address,
            len,
        };
        // SAFETY: UFFDIO_WAKE with a properly sized range; no memory is written.
        unsafe {
            libc::ioctl(self.uffd.as_raw_fd(), ioctl::UFFDIO_WAKE, &mut range);
        }
    }

    fn fail(&self, reason: String) {
        tracing::error!(%reason, peer = ?self.peer, "the page server failed: its VMM is killed");
        *self.failed.lock().expect("failure lock") = Some(reason.clone());
        self.stopping.store(true, Ordering::SeqCst);
        kill_peer(self.peer, &reason);
    }
}

/// How long the fault thread looks for the next fault without sleeping after one.
const FAULT_SPIN: Duration = Duration::from_micros(100);

/// The fault thread: reads events until stopped, the peer exits or something fails.
fn serve_faults(shared: &Shared, stop: &OwnedFd, pidfd: Option<&OwnedFd>) {
    let mut deferred: VecDeque<u64> = VecDeque::new();
    let mut messages = [ioctl::Message::default(); 64];
    let mut last_fault = Instant::now() - FAULT_SPIN;
    while !shared.stopping.load(Ordering::SeqCst) {
        let mut fds = vec![
            nix::poll::PollFd::new(shared.uffd.as_fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(stop.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        if let Some(pidfd) = pidfd {
            fds.push(nix::poll::PollFd::new(
                pidfd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            ));
        }
        // Deferred faults are retried soon even without a new event; right after a fault the
        // next is looked for without sleeping (a guest's faults come in streams, and a
        // sleeping thread's wake-up costs more than the copy).
        let timeout = if last_fault.elapsed() < FAULT_SPIN {
            0u16
        } else if deferred.is_empty() {
            1000
        } else {
            1
        };
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(timeout)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => return shared.fail(format!("polling the userfaultfd: {errno}")),
        }
        let ready = |fd: &nix::poll::PollFd| fd.revents().is_some_and(|events| !events.is_empty());
        if ready(&fds[1]) || fds.get(2).is_some_and(ready) {
            return; // Stopped, or the VMM exited.
        }
        // Every event first: a removal must be known before a fault in its range is served.
        loop {
            // SAFETY: reads whole `uffd_msg`s into a buffer of exactly that type and size.
            let read = unsafe {
                libc::read(
                    shared.uffd.as_raw_fd(),
                    messages.as_mut_ptr() as *mut libc::c_void,
                    std::mem::size_of_val(&messages),
                )
            };
            if read < 0 {
                let error = std::io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    _ => return shared.fail(format!("reading the userfaultfd: {error}")),
                }
            }
            if read == 0 {
                return;
            }
            let count = read as usize / std::mem::size_of::<ioctl::Message>();
            for message in &messages[..count] {
                match message.event {
                    ioctl::EVENT_PAGEFAULT => {
                        last_fault = Instant::now();
                        deferred.push_back(message.arg[1]);
                    }
                    ioctl::EVENT_REMOVE => {
                        let (start, end) = (message.arg[0], message.arg[1]);
                        shared
                            .removed
                            .lock()
                            .expect("removed lock")
                            .push((start, end));
                        shared.removals.fetch_add(1, Ordering::Relaxed);
                    }
                    // Not asked for (fork, remap, unmap): nothing to do.
                    _ => {}
                }
            }
        }
        // Then the faults, oldest first; one refused for now waits for the next round.
        let mut later = VecDeque::new();
        while let Some(address) = deferred.pop_front() {
            let Some(region) = shared.region_of(address) else {
                return shared.fail(format!(
                    "a fault at {address:#x}, outside every region the VMM gave"
                ));
            };
            let page = region.page_bytes().unwrap_or(4096);
            let aligned = address & !(page - 1);
            // Zeros or the file's bytes, decided once: the page placed and the count agree.
            let zero = shared.is_zero(region, aligned, page);
            match shared
                .place_range(region, aligned, page, zero)
                .map(|(placed, _)| placed)
            {
                Ok(Placed::Done) => {
                    let counter = if zero {
                        &shared.zero_faults
                    } else {
                        &shared.faults_served
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Placed::Present) => shared.wake(aligned, page),
                Ok(Placed::Later) => later.push_back(address),
                Ok(Placed::Gone) => return,
                Err(error) => {
                    return shared.fail(format!("serving the fault at {aligned:#x}: {error}"));
                }
            }
        }
        deferred = later;
    }
}

/// The most the prefetcher places with one ioctl.
const PREFETCH_RUN: u64 = 1 << 20;

/// The prefetcher: every page not yet present, in `order`; a page a fault (or a removal) got to
/// first is skipped.
fn prefetch(shared: &Shared, order: &Prefetch) {
    let mut pages: Vec<(usize, u64)> = Vec::new();
    let recorded: &[u64] = match order {
        Prefetch::Recorded(offsets) => offsets,
        _ => &[],
    };
    let mut seen = std::collections::HashSet::new();
    for &offset in recorded {
        if let Some((index, region)) = shared
            .regions
            .iter()
            .enumerate()
            .find(|(_, region)| offset >= region.offset && offset - region.offset < region.size)
        {
            let page = region.page_bytes().unwrap_or(4096);
            let address = region.base_host_virt_addr + ((offset - region.offset) & !(page - 1));
            if seen.insert(address) {
                pages.push((index, address));
            }
        }
    }
    for (index, region) in shared.regions.iter().enumerate() {
        let page = region.page_bytes().unwrap_or(4096);
        let mut address = region.base_host_virt_addr;
        while address < region.base_host_virt_addr + region.size {
            if !seen.contains(&address) {
                pages.push((index, address));
            }
            address += page;
        }
    }
    // Consecutive pages of one kind (the file's, or zeros) go in one copy of up to
    // PREFETCH_RUN bytes: one ioctl per page would cost more than the copying.
    let mut at = 0;
    while at < pages.len() {
        let (index, start) = pages[at];
        let region = &shared.regions[index];
        let page = region.page_bytes().unwrap_or(4096);
        at += 1;
        if shared.is_removed(start) {
            continue;
        }
        let zero = shared.is_zero(region, start, page);
        // A run of the file's bytes stays where they are stored together (one layer's run).
        let offset = region.offset + (start - region.base_host_virt_addr);
        let stored_until = shared.memory.run_end(offset);
        let mut len = page;
        while at < pages.len()
            && len < PREFETCH_RUN
            && pages[at] == (index, start + len)
            && !shared.is_removed(start + len)
            && shared.is_zero(region, start + len, page) == zero
            && (zero || offset + len + page <= stored_until)
        {
            len += page;
            at += 1;
        }
        let (mut address, end) = (start, start + len);
        while address < end {
            if shared.stopping.load(Ordering::SeqCst) {
                return;
            }
            match shared.place_range(region, address, end - address, zero) {
                Ok((Placed::Done, placed)) => {
                    shared
                        .pages_prefetched
                        .fetch_add(placed / page, Ordering::Relaxed);
                    address += placed;
                }
                // A page a fault brought first: the ones before it are in; go on after it.
                Ok((Placed::Present, placed)) => {
                    shared
                        .pages_prefetched
                        .fetch_add(placed / page, Ordering::Relaxed);
                    address += placed + page;
                }
                // A removal is being read by the fault thread: a moment, then again (the range
                // may be zeros now).
                Ok((Placed::Later, placed)) => {
                    shared
                        .pages_prefetched
                        .fetch_add(placed / page, Ordering::Relaxed);
                    address += placed;
                    std::thread::sleep(Duration::from_micros(100));
                    if shared.is_removed(address) {
                        address += page;
                    }
                }
                Ok((Placed::Gone, _)) => return,
                // The fault thread reports failures; the prefetcher only stops.
                Err(error) => {
                    tracing::warn!(%error, address, "the prefetcher stopped");
                    return;
                }
            }
        }
    }
    *shared.resident_after.lock().expect("stats lock") = Some(shared.started.elapsed());
}

fn check_regions(regions: &[GuestRegionUffdMapping], file_len: u64) -> Result<(), UffdError> {
    if regions.is_empty() {
        return Err(UffdError::Handshake("no memory regions".into()));
    }
    for region in regions {
        let page = region.page_bytes()?;
        if region.size == 0
            || region.base_host_virt_addr % page != 0
            || region.size % page != 0
            || region.offset % page != 0
        {
            return Err(UffdError::Handshake(format!(
                "region {region:?} is not whole pages of {page} bytes"
            )));
        }
        if region
            .offset
            .checked_add(region.size)
            .is_none_or(|end| end > file_len)
        {
            return Err(UffdError::Handshake(format!(
                "region {region:?} ends beyond the memory file ({file_len} bytes)"
            )));
        }
    }
    Ok(())
}

fn accept_until(
    listener: &UnixListener,
    deadline: Instant,
    abandon: Option<&AtomicBool>,
) -> Result<UnixStream, UffdError> {
    listener
        .set_nonblocking(true)
        .map_err(io("making the listener non-blocking"))?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .map_err(io("making the connection blocking"))?;
                return Ok(stream);
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(UffdError::Handshake(
                        "the VMM did not connect in time".into(),
                    ));
                }
                if abandon.is_some_and(|flag| flag.load(Ordering::SeqCst)) {
                    return Err(UffdError::Handshake(
                        "abandoned: the VMM will not connect".into(),
                    ));
                }
                let mut fds = [nix::poll::PollFd::new(
                    listener.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let wait = left.as_millis().min(50) as u16;
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(wait));
            }
            Err(error) => return Err(io("accepting the VMM's connection")(error)),
        }
    }
}

/// Reads the regions and the userfaultfd: bytes until they parse as the JSON list, one
/// descriptor with them.
fn receive_handshake(
    stream: &UnixStream,
    deadline: Instant,
) -> Result<(Vec<GuestRegionUffdMapping>, OwnedFd), UffdError> {
    const MAX_HANDSHAKE: usize = 1 << 20;
    let mut bytes = Vec::new();
    let mut uffd: Option<OwnedFd> = None;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(UffdError::Handshake(
                "the regions and the userfaultfd did not come in time".into(),
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(io("setting the handshake's deadline"))?;
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let received = nix::sys::socket::recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let message = match received {
            Ok(message) => message,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => {
                return Err(UffdError::Handshake(
                    "the regions and the userfaultfd did not come in time".into(),
                ));
            }
            Err(errno) => return Err(io("receiving the handshake")(errno.into())),
        };
        let length = message.bytes;
        if let Ok(controls) = message.cmsgs() {
            for control in controls {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = control {
                    for fd in fds {
                        // SAFETY: the kernel just gave us this descriptor (SCM_RIGHTS); nothing
                        // else owns it.
                        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                        if uffd.is_none() {
                            uffd = Some(owned);
                        }
                    }
                }
            }
        }
        if length == 0 {
            return Err(UffdError::Handshake(
                "the VMM closed the socket before its regions".into(),
            ));
        }
        bytes.extend_from_slice(&chunk[..length]);
        if bytes.len() > MAX_HANDSHAKE {
            return Err(UffdError::Handshake("more than 1 MiB of regions".into()));
        }
        match serde_json::from_slice::<Vec<GuestRegionUffdMapping>>(&bytes) {
            Ok(regions) => {
                return match uffd {
                    Some(uffd) => Ok((regions, uffd)),
                    None => Err(UffdError::Handshake(
                        "the regions came without a userfaultfd".into(),
                    )),
                };
            }
            Err(error) if error.is_eof() => continue,
            Err(error) => {
                return Err(UffdError::Handshake(format!(
                    "the regions are not Firecracker's JSON: {error}"
                )));
            }
        }
    }
}

fn peer_pid(stream: &UnixStream) -> Option<i32> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|credentials| credentials.pid())
        .filter(|pid| *pid > 0)
}

/// A descriptor that becomes readable when `pid` exits.
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a descriptor the kernel just returned, owned by nothing else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Kills the VMM that would otherwise hang on its next fault. Never this process.
fn kill_peer(peer: Option<i32>, reason: &dyn std::fmt::Display) {
    let Some(pid) = peer.filter(|pid| *pid != std::process::id() as i32) else {
        return;
    };
    tracing::warn!(pid, %reason, "killing the VMM whose memory cannot be served");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Firecracker's side of the protocol, for the tests and `wrenn-bench uffd`, which play it
/// against a real page server: a userfaultfd made as Firecracker makes it, anonymous memory
/// registered with it, and the one handshake message.
pub mod peer {
    use super::*;

    /// A userfaultfd as Firecracker makes it: non-blocking, close-on-exec, with removals
    /// reported (`UFFD_FEATURE_EVENT_REMOVE`).
    pub fn userfaultfd() -> std::io::Result<OwnedFd> {
        // SAFETY: userfaultfd(2) takes flags and returns a new descriptor or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the descriptor the kernel just returned, owned by nothing else.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let mut api = ioctl::Api {
            api: ioctl::UFFD_API,
            features: ioctl::FEATURE_EVENT_REMOVE,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API with a properly sized request.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), ioctl::UFFDIO_API, &mut api) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(uffd)
    }

    /// `len` bytes of fresh anonymous memory registered with `uffd` for missing pages; its
    /// address. It stays mapped for the life of the process (as a VMM's guest memory does).
    pub fn register_anonymous(uffd: &OwnedFd, len: u64) -> std::io::Result<u64> {
        // SAFETY: a fresh anonymous private mapping; the kernel picks the address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let mut register = ioctl::Register {
            range: ioctl::Range {
                start: base as u64,
                len,
            },
            mode: ioctl::REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER of the mapping just made, with a properly sized request.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), ioctl::UFFDIO_REGISTER, &mut register) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(base as u64)
    }

    /// Connects to the page server at `socket` and sends the regions' JSON with `uffd`; the
    /// connection is to be kept open, as Firecracker keeps it.
    pub fn send_handshake(
        socket: &Path,
        regions: &[GuestRegionUffdMapping],
        uffd: &OwnedFd,
    ) -> std::io::Result<UnixStream> {
        let stream = UnixStream::connect(socket)?;
        let json = serde_json::to_vec(regions).map_err(std::io::Error::other)?;
        let fds = [uffd.as_raw_fd()];
        nix::sys::socket::sendmsg::<()>(
            stream.as_raw_fd(),
            &[std::io::IoSlice::new(&json)],
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .map_err(std::io::Error::from)?;
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(page_size: Option<u64>, page_size_kib: Option<u64>) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: 0x7f00_0000_0000,
            size: 2 << 20,
            offset: 0,
            page_size,
            page_size_kib,
        }
    }

    #[test]
    fn firecrackers_region_json_is_read_with_either_page_size_field() {
        let regions: Vec<GuestRegionUffdMapping> = serde_json::from_str(
            r#"[{"base_host_virt_addr":139637976727552,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096}]"#,
        )
        .unwrap();
        assert_eq!(regions[0].page_bytes().unwrap(), 4096);
        assert_eq!(regions[0].size, 134217728);
        // Before 1.12, `page_size_kib` alone (in bytes despite its name).
        assert_eq!(region(None, Some(2 << 20)).page_bytes().unwrap(), 2 << 20);
        assert!(region(None, None).page_bytes().is_err());
        assert!(region(Some(4096), Some(8192)).page_bytes().is_err());
        assert!(region(Some(1024), None).page_bytes().is_err());
    }

    #[test]
    fn regions_must_be_whole_pages_inside_the_file() {
        let good = region(Some(4096), None);
        check_regions(&[good], 2 << 20).unwrap();
        assert!(
            check_regions(&[good], (2 << 20) - 4096).is_err(),
            "past the end"
        );
        assert!(check_regions(&[], 2 << 20).is_err());
        let odd = GuestRegionUffdMapping { size: 4097, ..good };
        assert!(check_regions(&[odd], 2 << 20).is_err());
        let overflowing = GuestRegionUffdMapping {
            offset: u64::MAX - 4095,
            ..good
        };
        assert!(check_regions(&[overflowing], 2 << 20).is_err());
    }

    #[test]
    fn holes_are_found_and_data_is_not() {
        use std::fs::File;
        use std::io::Write;
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let mut file = File::create(&path).unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 4 << 20).unwrap();
        file.flush().unwrap();
        drop(file);
        let memory = MemoryImage::open(&path).unwrap();
        assert!(!memory.is_zero(4 << 20, 4096));
        // A filesystem may round data ranges out, never in: far from the data, holes.
        let data = crate::layers::data_ranges(&File::open(&path).unwrap(), 8 << 20).unwrap();
        if data.len() == 1 && data[0] != (0, 8 << 20) {
            assert!(memory.is_zero(0, 4096));
            assert!(memory.is_zero(7 << 20, 4096));
        }
    }
}
