//! `wrenn-bench uffd`: the userfaultfd page server of Firecracker restores (issue #18). This
//! process plays Firecracker against a real `wrenn_vmm::uffd::PageServer` and the kernel's real
//! userfaultfd: how many 4 KiB faults a second the server's one fault thread answers (one thread
//! touching every page of a region in turn, each touch a fault and its answer), and how fast the
//! prefetcher brings a whole guest's memory in, against a plain copy of the same bytes from the
//! same file into fresh memory in the same run (the floor). Needs root (a userfaultfd).

use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use wrenn_vmm::uffd::{GuestRegionUffdMapping, PageServer, PageServerOptions, Prefetch, peer};

use super::report::{median, table};

const PAGE: u64 = 4096;

#[derive(Debug, Args)]
pub struct UffdBenchArgs {
    /// Guest memory the prefetcher brings in (and the copy copies), in MiB.
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    /// Memory touched page by page to measure faults, in MiB.
    #[arg(long, default_value_t = 256)]
    fault_mib: u64,
    /// Runs of each measure.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct UffdReport {
    memory_mib: u64,
    fault_mib: u64,
    /// Faults answered per second, each run.
    faults_per_second: Vec<f64>,
    /// GiB per second, each run.
    prefetch_gib_per_second: Vec<f64>,
    copy_gib_per_second: Vec<f64>,
}

pub async fn run(args: UffdBenchArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || measure(&args))
        .await
        .map_err(|error| anyhow::anyhow!("the benchmark thread: {error}"))?
}

fn measure(args: &UffdBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.memory_mib >= args.fault_mib && args.fault_mib > 0 && args.runs > 0,
        "--fault-mib must be between 1 and --memory-mib, --runs at least 1"
    );
    peer::userfaultfd().map_err(|error| {
        anyhow::anyhow!("no userfaultfd ({error}): run wrenn-bench uffd as root")
    })?;
    let dir = tempfile::tempdir()?;
    let memory = dir.path().join("memory");
    let bytes = args.memory_mib << 20;
    eprintln!("writing a {} MiB memory file ...", args.memory_mib);
    write_memory_file(&memory, bytes)?;

    let mut report = UffdReport {
        memory_mib: args.memory_mib,
        fault_mib: args.fault_mib,
        faults_per_second: Vec::new(),
        prefetch_gib_per_second: Vec::new(),
        copy_gib_per_second: Vec::new(),
    };
    for run in 0..args.runs {
        eprintln!("run {} of {} ...", run + 1, args.runs);
        let socket = dir.path().join(format!("faults-{run}.sock"));
        let (pages, took) = fault_run(&socket, &memory, args.fault_mib << 20)?;
        report
            .faults_per_second
            .push(pages as f64 / took.as_secs_f64());
        let socket = dir.path().join(format!("prefetch-{run}.sock"));
        let took = prefetch_run(&socket, &memory, bytes)?;
        report
            .prefetch_gib_per_second
            .push(gib(bytes) / took.as_secs_f64());
        let took = copy_run(&memory, bytes)?;
        report
            .copy_gib_per_second
            .push(gib(bytes) / took.as_secs_f64());
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut out = table(vec!["measure", "runs", "median", "min", "max"]);
    let row = |name: &str, samples: &[f64], unit: &str, decimals: usize| {
        let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
        let max = samples.iter().copied().fold(0.0, f64::max);
        let show = |value: f64| format!("{value:.decimals$} {unit}");
        vec![
            name.to_string(),
            samples.len().to_string(),
            show(median(samples)),
            show(min),
            show(max),
        ]
    };
    out.add_row(row(
        &format!("faults answered, one toucher ({} MiB)", args.fault_mib),
        &report.faults_per_second,
        "pages/s",
        0,
    ));
    out.add_row(row(
        &format!("prefetch of {} MiB", args.memory_mib),
        &report.prefetch_gib_per_second,
        "GiB/s",
        2,
    ));
    out.add_row(row(
        &format!("plain copy of {} MiB (the floor)", args.memory_mib),
        &report.copy_gib_per_second,
        "GiB/s",
        2,
    ));
    println!("{out}");
    println!(
        "prefetch at {:.0} % of the plain copy's rate (medians)",
        100.0 * median(&report.prefetch_gib_per_second) / median(&report.copy_gib_per_second)
    );
    Ok(())
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// A memory file with no zero page (every page is data, so every fault copies).
fn write_memory_file(path: &std::path::Path, bytes: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut page = vec![0u8; PAGE as usize];
    for index in 0..bytes / PAGE {
        for (at, byte) in page.iter_mut().enumerate() {
            *byte = (index as usize ^ at) as u8 | 1;
        }
        file.write_all(&page)?;
    }
    file.into_inner()?.sync_all()?;
    Ok(())
}

/// Guest memory of `bytes` registered with a new userfaultfd, as one region at the file's start.
fn guest(bytes: u64) -> anyhow::Result<(std::os::fd::OwnedFd, GuestRegionUffdMapping)> {
    let uffd = peer::userfaultfd()?;
    let region = GuestRegionUffdMapping {
        base_host_virt_addr: peer::register_anonymous(&uffd, bytes)?,
        size: bytes,
        offset: 0,
        page_size: Some(PAGE),
        page_size_kib: Some(PAGE),
    };
    Ok((uffd, region))
}

fn unmap(region: &GuestRegionUffdMapping) {
    // SAFETY: the mapping `peer::register_anonymous` made for this run, no longer used.
    unsafe {
        libc::munmap(
            region.base_host_virt_addr as *mut libc::c_void,
            region.size as usize,
        );
    }
}

/// One thread touches every page of `bytes` of guest memory: the pages, and the time it took.
fn fault_run(
    socket: &std::path::Path,
    memory: &std::path::Path,
    bytes: u64,
) -> anyhow::Result<(u64, Duration)> {
    let (uffd, region) = guest(bytes)?;
    let server = PageServer::bind(socket, memory)?;
    let serving = std::thread::spawn(move || {
        server.serve(PageServerOptions {
            prefetch: Prefetch::None,
            ..PageServerOptions::default()
        })
    });
    let _stream = peer::send_handshake(socket, &[region], &uffd)?;
    let server = serving
        .join()
        .map_err(|_| anyhow::anyhow!("the page server's thread panicked"))??;
    let pages = bytes / PAGE;
    let started = Instant::now();
    let mut sum = 0u64;
    for page in 0..pages {
        let address = region.base_host_virt_addr + page * PAGE;
        // SAFETY: a page of the registered mapping; the read faults and the server fills it.
        sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(address as *const u8) } as u64);
    }
    let took = started.elapsed();
    let stats = server.stop();
    anyhow::ensure!(
        stats.faults_served == pages && sum > 0,
        "the server answered {} faults of {pages}",
        stats.faults_served
    );
    unmap(&region);
    Ok((pages, took))
}

/// The prefetcher brings `bytes` in with nobody touching them: the time until all are resident.
fn prefetch_run(
    socket: &std::path::Path,
    memory: &std::path::Path,
    bytes: u64,
) -> anyhow::Result<Duration> {
    let (uffd, region) = guest(bytes)?;
    let server = PageServer::bind(socket, memory)?;
    let serving = std::thread::spawn(move || server.serve(PageServerOptions::default()));
    let _stream = peer::send_handshake(socket, &[region], &uffd)?;
    let server = serving
        .join()
        .map_err(|_| anyhow::anyhow!("the page server's thread panicked"))??;
    let deadline = Instant::now() + Duration::from_secs(600);
    let took = loop {
        if let Some(took) = server.stats().resident_after {
            break took;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the prefetch did not end: {:?}",
            server.stats()
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let stats = server.stop();
    anyhow::ensure!(
        stats.pages_prefetched == bytes / PAGE,
        "prefetched {} pages of {}",
        stats.pages_prefetched,
        bytes / PAGE
    );
    unmap(&region);
    Ok(took)
}

/// A plain copy of the file's first `bytes` (mapped, in the page cache) into fresh memory.
fn copy_run(memory: &std::path::Path, bytes: u64) -> anyhow::Result<Duration> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(memory)?;
    // SAFETY: a private read-only mapping of a file held open, checked, unmapped below.
    let source = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes as usize,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_POPULATE,
            file.as_raw_fd(),
            0,
        )
    };
    anyhow::ensure!(source != libc::MAP_FAILED, "mapping the memory file");
    let mut target = vec![0u8; 0];
    target.reserve_exact(bytes as usize);
    let started = Instant::now();
    // SAFETY: `source` maps `bytes` readable bytes; `target` has room for as many, and the
    // two do not overlap; the length is set after the copy has initialised them.
    unsafe {
        std::ptr::copy_nonoverlapping(source as *const u8, target.as_mut_ptr(), bytes as usize);
        target.set_len(bytes as usize);
    }
    let took = started.elapsed();
    std::hint::black_box(&target);
    // SAFETY: the mapping made above, unmapped once.
    unsafe {
        libc::munmap(source, bytes as usize);
    }
    Ok(took)
}
