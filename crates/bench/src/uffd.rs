//! `wrenn-bench uffd`: the userfaultfd page server of Firecracker restores (issue #18). This
//! process plays Firecracker against a real `wrenn_vmm::uffd::PageServer` and the kernel's real
//! userfaultfd: how many 4 KiB faults a second the server's one fault thread answers (one thread
//! touching every page of a region in turn, each touch a fault and its answer), and how fast the
//! prefetcher brings a whole guest's memory in, against a plain copy of the same bytes from the
//! same file into fresh memory in the same run (the floor); faults from several touchers at once;
//! and the layered memory files snapshots keep: the disk a guest's memory takes when it touched
//! part of it, a Diff's layer, and faults served through the layers. Needs root (a userfaultfd).

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
    /// Threads touching pages at once in the several-touchers measure.
    #[arg(long, default_value_t = 4)]
    touchers: usize,
    /// Memory the guest of the layered-file measure touched (of --memory-mib), in MiB.
    #[arg(long, default_value_t = 100)]
    touched_mib: u64,
    /// Memory it changed before its Diff snapshot, in MiB.
    #[arg(long, default_value_t = 10)]
    changed_mib: u64,
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
    touchers: usize,
    /// The same with `touchers` threads touching at once.
    several_touchers_faults_per_second: Vec<f64>,
    /// Faults answered per second from a layered memory file (base + one layer).
    layered_faults_per_second: Vec<f64>,
    touched_mib: u64,
    changed_mib: u64,
    /// On-disk bytes of the base (header + layer) of a guest that touched `touched_mib`.
    base_disk_bytes: u64,
    /// On-disk bytes of the Diff's header and layer.
    diff_disk_bytes: u64,
    /// Seconds to write the base from a Full memory file, and the Diff's layer.
    base_write_seconds: f64,
    diff_write_seconds: f64,
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

    let layered = layered_files(dir.path(), args)?;
    let mut report = UffdReport {
        memory_mib: args.memory_mib,
        fault_mib: args.fault_mib,
        faults_per_second: Vec::new(),
        touchers: args.touchers.max(1),
        several_touchers_faults_per_second: Vec::new(),
        layered_faults_per_second: Vec::new(),
        touched_mib: args.touched_mib,
        changed_mib: layered.changed_bytes >> 20,
        base_disk_bytes: layered.base_disk_bytes,
        diff_disk_bytes: layered.diff_disk_bytes,
        base_write_seconds: layered.base_write.as_secs_f64(),
        diff_write_seconds: layered.diff_write.as_secs_f64(),
        prefetch_gib_per_second: Vec::new(),
        copy_gib_per_second: Vec::new(),
    };
    for run in 0..args.runs {
        eprintln!("run {} of {} ...", run + 1, args.runs);
        let socket = dir.path().join(format!("faults-{run}.sock"));
        let (pages, took) = fault_run(&socket, &memory, args.fault_mib << 20, 1)?;
        report
            .faults_per_second
            .push(pages as f64 / took.as_secs_f64());
        let socket = dir.path().join(format!("touchers-{run}.sock"));
        let (pages, took) = fault_run(&socket, &memory, args.fault_mib << 20, report.touchers)?;
        report
            .several_touchers_faults_per_second
            .push(pages as f64 / took.as_secs_f64());
        let socket = dir.path().join(format!("layered-{run}.sock"));
        let fault_bytes = (args.fault_mib << 20).min(layered.touched_run_bytes);
        let (pages, took) = fault_run(&socket, &layered.diff_header, fault_bytes, 1)?;
        report
            .layered_faults_per_second
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
        &format!("faults answered, {} touchers", report.touchers),
        &report.several_touchers_faults_per_second,
        "pages/s",
        0,
    ));
    out.add_row(row(
        "faults answered through 2 layers, one toucher",
        &report.layered_faults_per_second,
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
    println!(
        "layered memory of a {} MiB guest that touched {} MiB: base {:.1} MiB on disk (written in {:.2} s); a Diff after changing {} MiB: {:.1} MiB (in {:.2} s)",
        args.memory_mib,
        args.touched_mib,
        report.base_disk_bytes as f64 / (1 << 20) as f64,
        report.base_write_seconds,
        report.changed_mib,
        report.diff_disk_bytes as f64 / (1 << 20) as f64,
        report.diff_write_seconds,
    );
    Ok(())
}

struct LayeredFiles {
    base_disk_bytes: u64,
    diff_disk_bytes: u64,
    base_write: Duration,
    diff_write: Duration,
    diff_header: std::path::PathBuf,
    /// How much of the memory's start the guest touched without a gap (the fault runs' span).
    touched_run_bytes: u64,
    /// How much the Diff changed (pages of the touched ones, every 7th page at most).
    changed_bytes: u64,
}

/// Bytes a file takes on disk (its allocated blocks).
fn disk_bytes(path: &std::path::Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// A guest of `memory_mib` that touched `touched_mib` (scattered pages, then the rest zeros),
/// as Firecracker's Full snapshot writes it (every page, zeros too), kept as a layered base; then
/// `changed_mib` of it changed, written as a Diff (the dirtied pages in a sparse file) and kept as
/// a layer.
fn layered_files(dir: &std::path::Path, args: &UffdBenchArgs) -> anyhow::Result<LayeredFiles> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use wrenn_vmm::layers;
    anyhow::ensure!(
        args.touched_mib <= args.memory_mib && args.changed_mib <= args.touched_mib,
        "--changed-mib ≤ --touched-mib ≤ --memory-mib"
    );
    let bytes = args.memory_mib << 20;
    let pages = bytes / PAGE;
    let touched_pages = (args.touched_mib << 20) / PAGE;
    // Half the touched pages in one run at the start (a kernel, page tables), half scattered.
    let run = touched_pages / 2;
    let mut touched = vec![false; pages as usize];
    for page in 0..run {
        touched[page as usize] = true;
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut count = run;
    while count < touched_pages {
        let page = next() % pages;
        if !touched[page as usize] {
            touched[page as usize] = true;
            count += 1;
        }
    }
    eprintln!(
        "writing a {} MiB Full memory file that touched {} MiB ...",
        args.memory_mib, args.touched_mib
    );
    let full = dir.join("full.mem");
    let mut writer = std::io::BufWriter::new(std::fs::File::create(&full)?);
    let zero = vec![0u8; PAGE as usize];
    let mut page_bytes = vec![0u8; PAGE as usize];
    for page in 0..pages {
        if touched[page as usize] {
            for (at, byte) in page_bytes.iter_mut().enumerate() {
                *byte = (page as usize ^ at) as u8 | 1;
            }
            writer.write_all(&page_bytes)?;
        } else {
            writer.write_all(&zero)?;
        }
    }
    writer.into_inner()?.sync_all()?;
    let base_header = dir.join("base.header");
    let base_layer = dir.join("base.layer");
    let started = Instant::now();
    layers::write_base(
        &full,
        bytes,
        layers::DEFAULT_BLOCK_BYTES,
        &base_header,
        &base_layer,
    )?;
    let base_write = started.elapsed();
    std::fs::remove_file(&full)?;

    let changed_pages = (args.changed_mib << 20) / PAGE;
    let diff = dir.join("diff.mem");
    let file = std::fs::File::create(&diff)?;
    file.set_len(bytes)?;
    let mut changed = 0;
    let mut page = 0;
    while changed < changed_pages && page < pages {
        if touched[page as usize] {
            for (at, byte) in page_bytes.iter_mut().enumerate() {
                *byte = (page as usize + at) as u8 | 2;
            }
            file.write_all_at(&page_bytes, page * PAGE)?;
            changed += 1;
        }
        page += 7;
    }
    file.sync_all()?;
    let diff_header = dir.join("diff.header");
    let diff_layer = dir.join("diff.layer");
    let started = Instant::now();
    layers::write_layer(
        &base_header,
        &diff,
        layers::Changed::DataOnly,
        &diff_header,
        &diff_layer,
        layers::DEFAULT_MAX_LAYERS,
    )?;
    let diff_write = started.elapsed();
    std::fs::remove_file(&diff)?;
    Ok(LayeredFiles {
        base_disk_bytes: disk_bytes(&base_header)? + disk_bytes(&base_layer)?,
        diff_disk_bytes: disk_bytes(&diff_header)? + disk_bytes(&diff_layer)?,
        base_write,
        diff_write,
        diff_header,
        touched_run_bytes: (run * PAGE).max(PAGE),
        changed_bytes: changed * PAGE,
    })
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
    touchers: usize,
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
    let touchers = touchers.max(1) as u64;
    let started = Instant::now();
    // Each toucher reads every `touchers`-th page: their faults arrive at once.
    let sums: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..touchers)
            .map(|first| {
                scope.spawn(move || {
                    let mut sum = 0u64;
                    let mut page = first;
                    while page < pages {
                        let address = region.base_host_virt_addr + page * PAGE;
                        // SAFETY: a page of the registered mapping; the read faults and the
                        // server fills it.
                        sum = sum.wrapping_add(unsafe {
                            std::ptr::read_volatile(address as *const u8)
                        } as u64);
                        page += touchers;
                    }
                    sum
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).collect()
    });
    let took = started.elapsed();
    let stats = server.stop();
    let sum: u64 = sums.iter().sum();
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
