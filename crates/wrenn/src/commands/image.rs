//! `wrenn image …`: build the guest image (kernel, initramfs, base rootfs with envd), check one,
//! or build the Firecracker guest kernel from its recipe.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use wrenn_image::progress::{Progress, format_bytes};
use wrenn_image::{BuildOptions, BuildOutcome, Manifest};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the base image (cached by stage; a no-op when nothing changed).
    Build(BuildArgs),
    /// Verify an image directory: files, hashes, envd version, kernel modules.
    Check(CheckArgs),
    /// Build the Firecracker guest kernel (vmlinux) from Debian's linux-source: tens of minutes.
    FirecrackerKernel(FirecrackerKernelArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Where the image goes [default: <cache>/images/base].
    #[arg(long, env = "WRENN_IMAGE_DIR")]
    out: Option<PathBuf>,
    /// Cache of build stages [default: $WRENN_CACHE_DIR or ~/.cache/wrenn].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// The static envd to put in the image [default: beside this binary, or the static build].
    #[arg(long, env = "WRENN_ENVD_BIN")]
    envd: Option<PathBuf>,
    /// Debian mirror for debootstrap and apt.
    #[arg(long, default_value = wrenn_image::DEFAULT_MIRROR)]
    mirror: String,
    /// Free space in the root filesystem beyond its files, in MiB.
    #[arg(long, default_value_t = 1024)]
    headroom_mib: u64,
    /// Re-assemble even if every input is unchanged.
    #[arg(long)]
    force: bool,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The image directory [default: <cache>/images/base].
    #[arg(env = "WRENN_IMAGE_DIR")]
    dir: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct FirecrackerKernelArgs {
    /// Where the vmlinux goes.
    #[arg(long, default_value = crate::paths::KERNEL_DIR)]
    out: PathBuf,
}

pub fn run(command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Build(args) => build(args),
        ImageCommand::Check(args) => check(args),
        ImageCommand::FirecrackerKernel(args) => firecracker_kernel(args),
    }
}

fn build(args: BuildArgs) -> anyhow::Result<()> {
    let cache_dir = args
        .cache_dir
        .unwrap_or_else(wrenn_image::default_cache_dir);
    let image_dir = args.out.unwrap_or_else(|| cache_dir.join("images/base"));
    let envd_binary = match args.envd {
        Some(path) => path,
        None => find_static_envd()?,
    };
    let options = BuildOptions {
        image_dir,
        cache_dir,
        envd_binary,
        expected_envd_version: wrenn_envd::ENVD_VERSION.to_string(),
        mirror: args.mirror,
        headroom_mib: args.headroom_mib,
        force: args.force,
    };
    let mut progress = Progress::stderr();
    let outcome = wrenn_image::build(&options, &mut progress)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(outcome.manifest())?);
    } else {
        let state = match &outcome {
            BuildOutcome::UpToDate(_) => "up to date",
            BuildOutcome::Built(_) => "built",
        };
        print_manifest(&options.image_dir, outcome.manifest(), state);
    }
    Ok(())
}

fn print_manifest(dir: &Path, manifest: &Manifest, state: &str) {
    let mut table = crate::output::table(&[], Vec::new());
    table.set_header(["image", "value"]);
    table.add_row(["directory".to_string(), dir.display().to_string()]);
    table.add_row(["state".to_string(), state.to_string()]);
    table.add_row(["built at".to_string(), manifest.built_at.clone()]);
    table.add_row([
        "kernel".to_string(),
        format!(
            "{} {} ({})",
            manifest.kernel.package, manifest.kernel.package_version, manifest.kernel.release
        ),
    ]);
    table.add_row(["envd".to_string(), manifest.envd.version.clone()]);
    table.add_row([
        "rootfs".to_string(),
        format!(
            "Debian {}, {} packages",
            manifest.rootfs.suite,
            manifest.rootfs.packages.len()
        ),
    ]);
    for (name, file) in &manifest.files {
        table.add_row([
            name.clone(),
            format!(
                "{} ({} on disk), blake3 {}…",
                format_bytes(file.size),
                format_bytes(file.allocated),
                &file.blake3[..12]
            ),
        ]);
    }
    println!("{table}");
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let dir = args.dir.unwrap_or_else(wrenn_image::default_image_dir);
    let problems = wrenn_image::check(&dir, wrenn_envd::ENVD_VERSION)?;
    if args.json {
        let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
        println!(
            "{}",
            serde_json::json!({ "image": dir, "ok": problems.is_empty(), "problems": list })
        );
    } else if problems.is_empty() {
        println!("{}: ok", dir.display());
    } else {
        println!("{}: {} problem(s)", dir.display(), problems.len());
        for problem in &problems {
            println!("  - {problem}");
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        std::process::exit(1)
    }
}

fn firecracker_kernel(args: FirecrackerKernelArgs) -> anyhow::Result<()> {
    let work = tempfile::tempdir().context("creating a working directory")?;
    let script = work.path().join("build.sh");
    std::fs::write(&script, wrenn_image::recipe::FIRECRACKER_KERNEL_BUILD)?;
    let fragment = work.path().join("microvm.config");
    std::fs::write(&fragment, wrenn_image::recipe::FIRECRACKER_KERNEL_CONFIG)?;
    let status = std::process::Command::new("bash")
        .arg(&script)
        .arg(&args.out)
        .env("WRENN_KERNEL_FRAGMENT", &fragment)
        .status()
        .context("running the Firecracker kernel recipe")?;
    anyhow::ensure!(
        status.success(),
        "the Firecracker kernel recipe failed ({status})"
    );
    Ok(())
}

/// The static envd: beside this binary, or where scripts/build-envd.sh puts it.
pub fn find_static_envd() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [
        dir.join("envd"),
        dir.join("../x86_64-unknown-linux-gnu/release/envd"),
        dir.join("../../x86_64-unknown-linux-gnu/release/envd"),
    ];
    candidates
        .iter()
        .find(|path| path.is_file() && is_static(path))
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no static envd found beside {} (build one with scripts/build-envd.sh, or pass --envd)",
                exe.display()
            )
        })
}

fn is_static(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|bytes| !bytes.windows(12).any(|w| w == b"/lib64/ld-li"))
}
