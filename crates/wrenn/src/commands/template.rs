//! `wrenn template`: the templates of a control plane. `build` reads a Dockerfile (see
//! [`crate::dockerfile`]), builds it through the template build API and shows its log live with a
//! progress line; `list`, `delete`, `tags`, `tag` and `untag` manage what was built.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::connection::Connection;
use crate::output::{Column, print_list};

#[derive(Debug, Args)]
pub struct TemplateArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: TemplateCommand,
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// The templates sandboxes can be created from.
    List,
    /// Build a template from a Dockerfile. FROM names a template (`FROM base`, or one of the
    /// team's) or else an image in a registry (`FROM python:3.12`, `FROM ghcr.io/org/app:v1`),
    /// whose steps then start as root in / and whose sandboxes as `user` in /home/user unless
    /// the Dockerfile says otherwise (as E2B's SDKs read a Dockerfile).
    Build(BuildArgs),
    /// Delete a template of the team (refused while a sandbox of it exists).
    Delete {
        /// Its name or id.
        template: String,
    },
    /// A template's tags and the builds they name.
    Tags {
        /// Its name or id.
        template: String,
    },
    /// Point tags at the build `name:tag` (or `name`) names.
    Tag {
        /// `name:tag` or `name`.
        target: String,
        #[arg(required = true)]
        tags: Vec<String>,
    },
    /// Remove tags from a template.
    Untag {
        /// Its name.
        template: String,
        #[arg(required = true)]
        tags: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The Dockerfile.
    #[arg(short = 'f', long = "file", default_value = "Dockerfile")]
    file: PathBuf,
    /// The template's name (`name` or `name:tag`).
    #[arg(long)]
    name: String,
    /// vCPUs of its sandboxes [default: its FROM template's].
    #[arg(long)]
    cpu: Option<u32>,
    /// Memory of its sandboxes in MiB [default: its FROM template's].
    #[arg(long)]
    memory: Option<u32>,
    /// The command its sandboxes start with (instead of the Dockerfile's CMD/ENTRYPOINT).
    #[arg(long)]
    start_cmd: Option<String>,
    /// A command run until it exits 0 before the snapshot is taken.
    #[arg(long)]
    ready_cmd: Option<String>,
    /// The directory COPY's sources are in [default: the Dockerfile's].
    #[arg(long)]
    context: Option<PathBuf>,
}

pub async fn run(args: TemplateArgs) -> anyhow::Result<()> {
    let TemplateArgs {
        connection,
        command,
    } = args;
    let api = connection.api()?;
    match command {
        TemplateCommand::List => {
            let templates = api.templates().await?;
            let columns: [Column<wrenn_api::Template>; 7] = [
                ("template", |t| t.template_id.clone()),
                ("name", |t| t.aliases.join(", ")),
                ("status", |t| t.build_status.clone()),
                ("cpus", |t| t.cpu_count.to_string()),
                ("memory", |t| format!("{} MiB", t.memory_mb)),
                ("envd", |t| t.envd_version.clone()),
                ("updated", |t| t.updated_at.clone()),
            ];
            print_list(&templates, connection.json, &columns)
        }
        TemplateCommand::Build(build) => build_template(&connection, build).await,
        TemplateCommand::Delete { template } => {
            api.delete_template(&template).await?;
            if !connection.json {
                println!("deleted template {template}");
            }
            Ok(())
        }
        TemplateCommand::Tags { template } => {
            let tags = api.template_tags(&template).await?;
            let columns: [Column<wrenn_api::TemplateTag>; 3] = [
                ("tag", |t| t.tag.clone()),
                ("build", |t| t.build_id.clone()),
                ("tagged", |t| t.created_at.clone()),
            ];
            print_list(&tags, connection.json, &columns)
        }
        TemplateCommand::Tag { target, tags } => {
            let assigned = api
                .assign_tags(&wrenn_api::AssignTags { target, tags })
                .await?;
            if connection.json {
                println!("{}", serde_json::to_string_pretty(&assigned)?);
            } else {
                println!(
                    "tagged build {} as {}",
                    assigned.build_id,
                    assigned.tags.join(", ")
                );
            }
            Ok(())
        }
        TemplateCommand::Untag { template, tags } => {
            api.remove_tags(&wrenn_api::RemoveTags {
                name: template.clone(),
                tags,
            })
            .await?;
            if !connection.json {
                println!("untagged {template}");
            }
            Ok(())
        }
    }
}

/// How often a build's status is read.
const POLL: Duration = Duration::from_millis(300);

async fn build_template(connection: &Connection, args: BuildArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let dockerfile = crate::dockerfile::parse(&text)?;
    let api = connection.api()?;
    let requested = api
        .request_build(&wrenn_api::TemplateBuildRequest {
            name: Some(args.name.clone()),
            cpu_count: args.cpu,
            memory_mb: args.memory,
            ..Default::default()
        })
        .await?;
    // Each COPY's files, packed from the context and uploaded unless the control plane has them.
    let context = match args.context.clone() {
        Some(context) => context,
        None => args
            .file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    let mut hashes = Vec::new();
    for source in &dockerfile.copies {
        let tar = pack(&context, source)?;
        let hash = sha256_hex(&tar);
        let link = api.template_files(&requested.template_id, &hash).await?;
        match link.url {
            Some(url) if !link.present => {
                if !connection.json {
                    println!("uploading {source} ({} KiB)", tar.len().div_ceil(1024));
                }
                api.upload_files(&url, tar.into()).await?;
            }
            _ => {}
        }
        hashes.push(hash);
    }
    let mut hashes = hashes.into_iter();
    let from_image = !names_a_template(&api, &dockerfile.from).await?;
    let mut steps = dockerfile.steps.clone();
    if from_image {
        let sets = |kind: &str| steps.iter().any(|(step, _)| step == kind);
        let (user_set, workdir_set) = (sets("USER"), sets("WORKDIR"));
        let step = |kind: &str, arg: &str| (kind.to_string(), vec![arg.to_string()]);
        steps.splice(0..0, [step("USER", "root"), step("WORKDIR", "/")]);
        if !user_set {
            steps.push(step("USER", "user"));
        }
        if !workdir_set {
            steps.push(step("WORKDIR", "/home/user"));
        }
    }
    let (from_template, from_image) = if from_image {
        (None, Some(dockerfile.from.clone()))
    } else {
        (Some(dockerfile.from.clone()), None)
    };
    let start = wrenn_api::TemplateBuildStart {
        from_template,
        from_image,
        steps: steps
            .iter()
            .map(|(kind, args)| wrenn_api::TemplateStep {
                kind: kind.clone(),
                args: args.clone(),
                files_hash: (kind == "COPY").then(|| hashes.next()).flatten(),
                ..Default::default()
            })
            .collect(),
        start_cmd: args.start_cmd.or(dockerfile.start_cmd),
        ready_cmd: args.ready_cmd,
        ..Default::default()
    };
    api.start_build(&requested.template_id, &requested.build_id, &start)
        .await
        .with_context(|| format!("starting the build FROM {}", dockerfile.from))?;
    let started = Instant::now();
    let total = steps.len();
    let progress = !connection.json && std::io::stderr().is_terminal();
    let mut seen = 0;
    let info = loop {
        let info = api
            .build_status(&requested.template_id, &requested.build_id, seen)
            .await?;
        seen += info.log_entries.len();
        if progress && !info.log_entries.is_empty() {
            // Clear the progress line before the log lines it sat under.
            eprint!("\r\x1b[2K");
        }
        if !connection.json {
            for entry in &info.log_entries {
                let step = entry.step.as_deref().unwrap_or("");
                println!("[{step:>8}] {}", entry.message);
            }
        }
        let ended = matches!(info.status.as_str(), "ready" | "error");
        if ended && info.log_entries.is_empty() {
            break info;
        }
        if progress {
            let step = info
                .log_entries
                .iter()
                .rev()
                .find_map(|e| e.step.clone())
                .unwrap_or_default();
            eprint!(
                "\r\x1b[2K{} {}: step {step} of {total}, {} s",
                info.status,
                args.name,
                started.elapsed().as_secs()
            );
            let _ = std::io::stderr().flush();
        }
        if !ended {
            tokio::time::sleep(POLL).await;
        }
    };
    if progress {
        eprint!("\r\x1b[2K");
    }
    if connection.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    }
    if info.status == "error" {
        let why = info
            .reason
            .map(|reason| reason.message)
            .unwrap_or_else(|| "the build failed".into());
        anyhow::bail!("the build of {} failed: {why}", args.name);
    }
    if !connection.json {
        println!(
            "built {} (template {}, build {}) in {} s",
            args.name,
            requested.template_id,
            requested.build_id,
            started.elapsed().as_secs()
        );
    }
    Ok(())
}

/// Whether a Dockerfile's FROM names a template (`base`, or a template the team can list by
/// id or name) rather than a registry's image: a name with a registry or a path in it is an
/// image.
async fn names_a_template(api: &wrenn_api::client::Client, from: &str) -> anyhow::Result<bool> {
    if from.contains('/') {
        return Ok(false);
    }
    let name = from.split(':').next().unwrap_or(from);
    if name == "base" {
        return Ok(true);
    }
    let templates = api.templates().await?;
    Ok(templates.iter().any(|template| {
        template.template_id == name || template.aliases.iter().any(|alias| alias == name)
    }))
}

/// `source` (a file, a link or a directory, under `context`) packed as a gzipped tar whose
/// member names are relative to `context`, links kept as links.
fn pack(context: &std::path::Path, source: &str) -> anyhow::Result<Vec<u8>> {
    let path = context.join(source);
    let metadata = std::fs::symlink_metadata(&path)
        .with_context(|| format!("COPY {source}: {} is not there", path.display()))?;
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut archive = tar::Builder::new(encoder);
    archive.follow_symlinks(false);
    let name = std::path::Path::new(source.trim_end_matches('/'));
    if metadata.is_dir() {
        archive
            .append_dir_all(name, &path)
            .with_context(|| format!("packing {}", path.display()))?;
    } else {
        archive
            .append_path_with_name(&path, name)
            .with_context(|| format!("packing {}", path.display()))?;
    }
    let encoder = archive.into_inner().context("packing the files")?;
    encoder.finish().context("compressing the files")
}

/// SHA-256 in lowercase hex.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
