//! The page server against the kernel's real userfaultfd: this process plays Firecracker (it
//! maps guest memory anonymously, registers it with a userfaultfd, and sends the regions' JSON with
//! the descriptor over the server's socket exactly as Firecracker does), then reads the memory from
//! several threads. Needs the right to create a userfaultfd (root here); without it the tests say
//! so and pass, unless WRENN_REQUIRE_PREREQUISITES=1.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use wrenn_vmm::uffd::{
    GuestRegionUffdMapping, PageServer, PageServerOptions, Prefetch, RunningPageServer, peer,
};

const PAGE: u64 = 4096;

/// A userfaultfd as Firecracker makes it, or `None` with the reason printed when this machine
/// does not allow one.
fn userfaultfd() -> Option<OwnedFd> {
    match peer::userfaultfd() {
        Ok(uffd) => Some(uffd),
        Err(error) => {
            let message = format!("no userfaultfd here ({error}): the page server tests need root");
            if std::env::var("WRENN_REQUIRE_PREREQUISITES").as_deref() == Ok("1") {
                panic!("{message}");
            }
            eprintln!("skipped: {message}");
            None
        }
    }
}

/// The byte at `offset` of the memory file's data pages.
fn pattern(offset: u64) -> u8 {
    let page = offset / PAGE;
    (page.wrapping_mul(131) ^ (offset % PAGE).wrapping_mul(7) ^ 0x5a) as u8 | 1
}

/// A 12 MiB memory file: data everywhere but two 1 MiB holes, [2, 3) MiB and [9, 10) MiB.
fn memory_file(path: &Path) -> Vec<bool> {
    let file = std::fs::File::create(path).unwrap();
    let total = 12u64 << 20;
    file.set_len(total).unwrap();
    let mut is_data = Vec::new();
    for page in 0..total / PAGE {
        let offset = page * PAGE;
        let hole = (2 << 20..3 << 20).contains(&offset) || (9 << 20..10 << 20).contains(&offset);
        is_data.push(!hole);
        if !hole {
            let bytes: Vec<u8> = (offset..offset + PAGE).map(pattern).collect();
            file.write_all_at(&bytes, offset).unwrap();
        }
    }
    file.sync_all().unwrap();
    is_data
}

/// Guest memory as Firecracker lays it out: two regions, 8 MiB from the file's start and 4 MiB
/// after it.
struct Guest {
    regions: Vec<GuestRegionUffdMapping>,
    _uffd: OwnedFd,
}

impl Guest {
    fn new(uffd: OwnedFd) -> Guest {
        let regions = [(0u64, 8u64 << 20), (8 << 20, 4 << 20)]
            .into_iter()
            .map(|(offset, size)| GuestRegionUffdMapping {
                base_host_virt_addr: peer::register_anonymous(&uffd, size).unwrap(),
                size,
                offset,
                page_size: Some(PAGE),
                page_size_kib: Some(PAGE),
            })
            .collect();
        Guest {
            regions,
            _uffd: uffd,
        }
    }

    /// Connects to the server and sends the handshake: the JSON, the descriptor with it.
    fn handshake(&self, socket: &Path) -> UnixStream {
        peer::send_handshake(socket, &self.regions, &self._uffd).unwrap()
    }

    /// Every page's (address, file offset), region by region.
    fn pages(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .flat_map(|region| {
                (0..region.size / PAGE).map(move |page| {
                    (
                        region.base_host_virt_addr + page * PAGE,
                        region.offset + page * PAGE,
                    )
                })
            })
            .collect()
    }

    /// Reads every page from `threads` threads, each starting elsewhere, and checks each
    /// against the file (zeros in holes and in `zeroed`).
    fn read_all(&self, threads: usize, is_data: &[bool], zeroed: &[(u64, u64)]) {
        let pages = self.pages();
        std::thread::scope(|scope| {
            for thread in 0..threads {
                let pages = &pages;
                scope.spawn(move || {
                    let start = thread * pages.len() / threads;
                    for index in 0..pages.len() {
                        let (address, offset) = pages[(start + index) % pages.len()];
                        // SAFETY: a page of the registered mapping, alive for the test; the
                        // page server fills it on first touch.
                        let bytes = unsafe {
                            std::slice::from_raw_parts(address as *const u8, PAGE as usize)
                        };
                        let zero = !is_data[(offset / PAGE) as usize]
                            || zeroed.iter().any(|&(a, b)| address >= a && address < b);
                        for (at, byte) in bytes.iter().enumerate() {
                            let expected = if zero { 0 } else { pattern(offset + at as u64) };
                            assert_eq!(
                                *byte, expected,
                                "byte {at} of the page at file offset {offset:#x}"
                            );
                        }
                    }
                });
            }
        });
    }
}

fn serve(
    socket: &Path,
    memory: &Path,
    prefetch: Prefetch,
) -> std::thread::JoinHandle<RunningPageServer> {
    let server = PageServer::bind(socket, memory).unwrap();
    let resident_marker = Some(socket.with_extension("resident"));
    std::thread::spawn(move || {
        server
            .serve(PageServerOptions {
                handshake_timeout: Duration::from_secs(10),
                prefetch,
                resident_marker,
                ..PageServerOptions::default()
            })
            .unwrap()
    })
}

#[test]
fn faults_from_several_threads_get_the_files_pages_and_zeros_where_it_has_none() {
    let Some(uffd) = userfaultfd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let memory = dir.path().join("memory");
    let is_data = memory_file(&memory);
    let socket = dir.path().join("uffd.sock");
    let guest = Guest::new(uffd);
    let server = serve(&socket, &memory, Prefetch::None);
    let _stream = guest.handshake(&socket);
    let server = server.join().unwrap();
    assert!(
        !socket.exists(),
        "the socket goes once the handshake is done"
    );

    guest.read_all(4, &is_data, &[]);
    let stats = server.stats();
    let total = guest.pages().len() as u64;
    assert_eq!(
        stats.faults_served + stats.zero_faults,
        total,
        "each page placed once, whichever thread touched it first: {stats:?}"
    );
    assert_eq!(stats.pages_prefetched, 0);
    // The two 1 MiB holes went as zero pages (where the filesystem reports holes, as ext4,
    // XFS and tmpfs do; elsewhere as the file's zeros).
    assert!(
        stats.zero_faults == 512 || stats.zero_faults == 0,
        "{stats:?}"
    );

    // A balloon gives back 1 MiB of data: the guest reads zeros there from then on.
    let region = guest.regions[0];
    let start = region.base_host_virt_addr + (4 << 20);
    let end = start + (1 << 20);
    // SAFETY: a range of the registered mapping; its pages are dropped and fault again.
    let done = unsafe { libc::madvise(start as *mut libc::c_void, 1 << 20, libc::MADV_DONTNEED) };
    assert_eq!(done, 0);
    guest.read_all(2, &is_data, &[(start, end)]);
    let after = server.stats();
    assert!(after.removals >= 1, "{after:?}");
    assert_eq!(after.zero_faults - stats.zero_faults, 256, "{after:?}");
    assert!(server.is_serving());
    assert_eq!(server.failure(), None);
    server.stop();
}

#[test]
fn the_prefetcher_brings_every_page_in_and_faults_still_get_theirs() {
    let Some(uffd) = userfaultfd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let memory = dir.path().join("memory");
    let is_data = memory_file(&memory);
    let socket = dir.path().join("uffd.sock");
    let guest = Guest::new(uffd);
    // Some pages first (a recorded order), then the rest.
    let recorded = vec![11 << 20, 5 << 20, 0, 5 << 20];
    let server = serve(&socket, &memory, Prefetch::Recorded(recorded));
    let _stream = guest.handshake(&socket);
    let server = server.join().unwrap();
    // Threads read while the prefetcher runs.
    guest.read_all(3, &is_data, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let marker = socket.with_extension("resident");
    while server.stats().resident_after.is_none() || !marker.exists() {
        assert!(Instant::now() < deadline, "{:?}", server.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = server.stats();
    let total = guest.pages().len() as u64;
    assert_eq!(
        stats.pages_prefetched + stats.faults_served + stats.zero_faults,
        total,
        "{stats:?}"
    );
    assert!(stats.pages_prefetched > 0, "{stats:?}");
    // Everything is present: reading again faults nothing.
    guest.read_all(2, &is_data, &[]);
    assert_eq!(server.stats().faults_served, stats.faults_served);
    server.stop();
}

/// Run as a separate process by the next test: a VMM that sends a broken handshake, then waits.
#[test]
fn broken_vmm_helper() {
    let Ok(socket) = std::env::var("WRENN_UFFD_TEST_PEER_SOCKET") else {
        return; // Only as the next test's child.
    };
    let stream = UnixStream::connect(&socket).unwrap();
    let fds = [0];
    nix::sys::socket::sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(b"[{\"this is\": not Firecracker's JSON")],
        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_handshake_the_server_cannot_serve_kills_the_vmm_that_sent_it() {
    if userfaultfd().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let memory = dir.path().join("memory");
    memory_file(&memory);
    let socket = dir.path().join("uffd.sock");
    let server = PageServer::bind(&socket, &memory).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "broken_vmm_helper", "--nocapture"])
        .env("WRENN_UFFD_TEST_PEER_SOCKET", &socket)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let error = server.serve(PageServerOptions::default()).unwrap_err();
    assert!(
        error.to_string().contains("not Firecracker's JSON"),
        "{error}"
    );
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(
        !socket.exists(),
        "the socket is removed after a failed handshake"
    );

    // Nobody connects: the wait ends at its deadline.
    let socket = dir.path().join("lonely.sock");
    let server = PageServer::bind(&socket, &memory).unwrap();
    let error = server
        .serve(PageServerOptions {
            handshake_timeout: Duration::from_millis(300),
            prefetch: Prefetch::None,
            ..PageServerOptions::default()
        })
        .unwrap_err();
    assert!(
        error.to_string().contains("did not connect in time"),
        "{error}"
    );
    assert!(!socket.exists(), "the socket is removed when nobody came");
    // A wait the caller abandons (the VMM failed its load) ends long before its deadline.
    let socket = dir.path().join("abandoned.sock");
    let server = PageServer::bind(&socket, &memory).unwrap();
    let abandon = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let waiting = std::thread::spawn({
        let abandon = abandon.clone();
        move || {
            server.serve(PageServerOptions {
                handshake_timeout: Duration::from_secs(600),
                prefetch: Prefetch::None,
                abandon: Some(abandon),
                resident_marker: None,
            })
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    abandon.store(true, std::sync::atomic::Ordering::SeqCst);
    let error = waiting.join().unwrap().unwrap_err();
    assert!(error.to_string().contains("abandoned"), "{error}");
    assert!(!socket.exists());
    // A server dropped unused leaves no socket either.
    let socket = dir.path().join("unused.sock");
    drop(PageServer::bind(&socket, &memory).unwrap());
    assert!(!socket.exists());
}
