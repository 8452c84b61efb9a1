//! `wrenn-bench build`: template builds through a `wrenn agent serve` of its own (#14's
//! numbers): a three-step template built from a template (a cold boot on the parent's disk,
//! the steps through envd, the snapshot), and the first create from the built template beside
//! a create from its parent; the same build again, which takes the first one's files; and the
//! build with its third step changed, whose first two steps come from the layer cache. With
//! `--image`, also builds from a registry's image: once with its layers pulled (the pull's rate
//! from the agent's log), once with them in the host's blob cache, and with other steps, which
//! take the root filesystem the first made. With `--store`, the builds are put in a template
//! store, and a second agent with no template pulls each for its first create (the pull's time
//! and rate), then creates again.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use http::HeaderMap;
use wrenn_proto::agent as pb;
use wrenn_proto::agent::host_agent;

use super::sandbox::{BenchAgent, GuestArgs, latency, latency_table};

#[derive(Debug, Args)]
pub struct BuildBenchArgs {
    /// Builds measured.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// An image to build from too (its registry reached as the agent's `--insecure-registry`
    /// or `WRENN_INSECURE_REGISTRIES` allows).
    #[arg(long)]
    image: Option<String>,
    /// A template store (a directory, or s3://BUCKET/PREFIX with the AWS_* environment): the
    /// builds are put there, and a second agent with no template at all pulls the first and
    /// creates from it.
    #[arg(long)]
    store: Option<String>,
    #[command(flatten)]
    guest: GuestArgs,
}

/// The three steps built each time.
fn steps() -> Vec<pb::BuildStep> {
    let step = |kind: &str, args: &[&str]| pb::BuildStep {
        r#type: kind.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    vec![
        step("RUN", &["echo one > /home/user/one.txt"]),
        step("ENV", &["SECOND", "two"]),
        step(
            "RUN",
            &["python3 -c 'import os; print(os.environ[\"SECOND\"])' > two.txt"],
        ),
    ]
}

/// Runs one build to its end: how long it took, and its log.
/// `force` runs every step even when the host has a template built of the same.
async fn build(
    agent: &BenchAgent,
    template_id: &str,
    from_image: Option<&str>,
    force: bool,
) -> anyhow::Result<(Duration, Vec<String>)> {
    let steps = if from_image.is_some() {
        vec![run_step("echo built > /tmp/built.txt")]
    } else {
        steps()
    };
    build_steps(agent, template_id, from_image, force, steps).await
}

fn run_step(script: &str) -> pb::BuildStep {
    pb::BuildStep {
        r#type: "RUN".into(),
        args: vec![script.into()],
        ..Default::default()
    }
}

/// Runs one build of `steps` to its end: how long it took, and its log.
async fn build_steps(
    agent: &BenchAgent,
    template_id: &str,
    from_image: Option<&str>,
    force: bool,
    steps: Vec<pb::BuildStep>,
) -> anyhow::Result<(Duration, Vec<String>)> {
    let request = pb::RunTemplateBuildRequest {
        template_id: template_id.into(),
        from_template: "bench".into(),
        from_image: from_image.unwrap_or_default().into(),
        force,
        steps,
        ..Default::default()
    };
    let started = Instant::now();
    let mut stream = agent
        .client()
        .call_streaming::<host_agent::RunTemplateBuild>(&request, &HeaderMap::new())
        .await?;
    let mut log = Vec::new();
    while let Some(event) = stream.message().await {
        match event?.event {
            Some(pb::run_template_build_event::Event::Template(_)) => {
                return Ok((started.elapsed(), log));
            }
            Some(pb::run_template_build_event::Event::Log(line)) => log.push(line.message),
            None => {}
        }
    }
    anyhow::bail!("the build of {template_id} ended without a template; its log: {log:?}")
}

/// How long each step's freeze took (sync, stop, new layer, resume), from the build's log.
fn freeze_times(log: &[String]) -> Vec<Duration> {
    log.iter()
        .filter_map(|line| {
            let ms = line
                .strip_prefix("its disk kept for later builds (")?
                .strip_suffix(" ms)")?;
            ms.parse().ok().map(Duration::from_millis)
        })
        .collect()
}

/// The pull rates (MiB/s) the agent logged for the layers it fetched, and their MiB.
fn pull_rates(log: &[String]) -> Vec<(f64, f64)> {
    log.iter()
        .filter(|line| line.starts_with("layer ") && line.ends_with("MiB/s)"))
        .filter_map(|line| {
            let (_, after) = line.split_once(": ")?;
            let mib: f64 = after.split(' ').next()?.parse().ok()?;
            let rate = line.rsplit_once('(')?.1.split(' ').next()?.parse().ok()?;
            Some((mib, rate))
        })
        .collect()
}

pub async fn run(args: BuildBenchArgs) -> anyhow::Result<()> {
    let store_args: Vec<String> = match &args.store {
        Some(location) => vec!["--template-store".into(), location.clone()],
        None => Vec::new(),
    };
    let agent = BenchAgent::start_with(&args.guest, "wbs", 1000, &store_args)?;
    agent.build_template(args.guest.memory_mib).await?;
    let (mut builds, mut first_creates, mut parent_creates) = (Vec::new(), Vec::new(), Vec::new());
    let mut freezes = Vec::new();
    for run in 0..args.runs {
        eprintln!("build {} of {} ...", run + 1, args.runs);
        let template = format!("three-{run}");
        let (took, log) = build(&agent, &template, None, true)
            .await
            .context("the build")?;
        builds.push(took);
        freezes.extend(freeze_times(&log));
        // Creates from the new template and from its parent alternate.
        let id = format!("first-{run}");
        first_creates.push(agent.create_from(&template, id.clone()).await?);
        agent.destroy(id).await?;
        let id = format!("parent-{run}");
        parent_creates.push(agent.create_from("bench", id.clone()).await?);
        agent.destroy(id).await?;
    }
    // The same three steps again: the host has a template built of the same.
    let mut cached_builds = Vec::new();
    for run in 0..args.runs {
        let template = format!("three-cached-{run}");
        cached_builds.push(build(&agent, &template, None, false).await?.0);
    }
    // The first two steps again with another third: they come from the layer cache, only
    // the third runs.
    let mut resumed_builds = Vec::new();
    for run in 0..args.runs {
        let mut changed = steps();
        changed[2] = run_step(&format!("echo changed-{run} > three.txt"));
        let (took, log) = build_steps(
            &agent,
            &format!("three-resumed-{run}"),
            None,
            false,
            changed,
        )
        .await?;
        anyhow::ensure!(
            log.iter()
                .any(|line| line.starts_with("cached: steps 1 to 2 ")),
            "the build did not start from step 2's layer: {log:?}"
        );
        resumed_builds.push(took);
    }
    // From an image: the first build pulls its layers, the others (forced) find them in the
    // cache; then builds with other steps take the root filesystem the first made.
    let (mut pulled, mut cached, mut image_creates, mut rates) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut image_rootfs_cached = Vec::new();
    if let Some(image) = &args.image {
        for run in 0..args.runs.max(2) {
            eprintln!("build {} from {image} ...", run + 1);
            let template = format!("image-{run}");
            let (took, log) = build(&agent, &template, Some(image), true)
                .await
                .context("the build from the image")?;
            if run == 0 {
                rates = pull_rates(&log);
                pulled.push(took);
            } else {
                cached.push(took);
            }
            let id = format!("image-first-{run}");
            image_creates.push(agent.create_from(&template, id.clone()).await?);
            agent.destroy(id).await?;
        }
        for run in 0..args.runs {
            let (took, log) = build_steps(
                &agent,
                &format!("image-other-{run}"),
                Some(image),
                false,
                vec![run_step(&format!("echo other-{run} > /tmp/other.txt"))],
            )
            .await?;
            anyhow::ensure!(
                log.iter()
                    .any(|line| line.starts_with("taking the root filesystem made from this image")),
                "the build did not take the image's root filesystem: {log:?}"
            );
            image_rootfs_cached.push(took);
        }
    }
    // Through the store: a second host with no template pulls each built one for its first
    // create, then creates from it again.
    // The first pull finds nothing on the second host; the later ones find their base's
    // files there (the first brought them) and fetch only their own.
    let (mut pulls, mut pulled_creates, mut local_creates) = (Vec::new(), Vec::new(), Vec::new());
    let (mut template_mib, mut stored_mib) = (0.0, 0.0);
    if let Some(location) = &args.store {
        let puller = BenchAgent::start_with(&args.guest, "wbp", 1100, &store_args)?;
        let store = wrenn_agent::template_store::TemplateStore::open(location)?;
        for run in 0..args.runs {
            let template = format!("three-{run}");
            let artifact = store
                .artifact(&template)
                .await?
                .context("the build is not in the store")?;
            if run == 0 {
                template_mib = artifact.size() as f64 / f64::from(1 << 20);
                stored_mib = store.stored_bytes(&artifact).await? as f64 / f64::from(1 << 20);
            }
            let started = Instant::now();
            let created: pb::CreateSandboxResponse = puller
                .call::<host_agent::CreateSandbox>(&pb::CreateSandboxRequest {
                    template_id: template.clone(),
                    sandbox_id: format!("pulled-{run}"),
                    ..Default::default()
                })
                .await?;
            pulled_creates.push(started.elapsed());
            pulls.push(Duration::from_millis(created.pull_ms));
            puller.destroy(format!("pulled-{run}")).await?;
            let id = format!("pulled-again-{run}");
            local_creates.push(puller.create_from(&template, id.clone()).await?);
            puller.destroy(id).await?;
        }
    }
    let builds = latency(&builds);
    let first_creates = latency(&first_creates);
    let parent_creates = latency(&parent_creates);
    let cached_builds = latency(&cached_builds);
    let resumed_builds = latency(&resumed_builds);
    let freezes = latency(&freezes);
    let mut rows = vec![
        ("three-step build from a template (cold)", builds.clone()),
        (
            "  a step's disk frozen for the layer cache",
            freezes.clone(),
        ),
        ("the same build again (fully cached)", cached_builds.clone()),
        (
            "its third step changed (steps 1-2 cached)",
            resumed_builds.clone(),
        ),
        (
            "first create from the built template",
            first_creates.clone(),
        ),
        ("create from its parent", parent_creates.clone()),
    ];
    if args.image.is_some() {
        rows.push(("build from an image, layers pulled", latency(&pulled)));
        rows.push(("build from an image, layers in the cache", latency(&cached)));
        rows.push((
            "build from an image, other steps (its rootfs cached)",
            latency(&image_rootfs_cached),
        ));
        rows.push((
            "first create from an image's template",
            latency(&image_creates),
        ));
    }
    let cold_pull = pulls.first().copied();
    if args.store.is_some() {
        rows.push((
            "second host: first pull (nothing there)",
            latency(&pulls[..pulls.len().min(1)]),
        ));
        rows.push((
            "second host: first create (that pull included)",
            latency(&pulled_creates[..pulled_creates.len().min(1)]),
        ));
        if pulls.len() > 1 {
            rows.push((
                "second host: pull of a later build (its base there)",
                latency(&pulls[1..]),
            ));
            rows.push((
                "second host: first create of it (pull included)",
                latency(&pulled_creates[1..]),
            ));
        }
        rows.push(("second host: create once pulled", latency(&local_creates)));
    }
    let pull_mib_per_s = cold_pull.map(|pull| template_mib / pull.as_secs_f64().max(0.001));
    let pulled_mib: f64 = rates.iter().map(|(mib, _)| mib).sum();
    if args.guest.json {
        println!(
            "{}",
            serde_json::json!({
                "three_step_build": builds, "three_step_build_cached": cached_builds,
                "three_step_build_last_changed": resumed_builds,
                "step_freeze": freezes,
                "first_create_from_built": first_creates,
                "create_from_parent": parent_creates,
                "store": args.store.as_ref().map(|_| serde_json::json!({
                    "template_mib": template_mib, "stored_mib": stored_mib,
                    "pulls": latency(&pulls), "first_pull_mib_per_s": pull_mib_per_s,
                    "first_create_pulled": latency(&pulled_creates),
                    "create_once_pulled": latency(&local_creates),
                })),
                "image": args.image.as_ref().map(|_| serde_json::json!({
                    "build_pulled": latency(&pulled), "build_cached": latency(&cached),
                    "build_rootfs_cached": latency(&image_rootfs_cached),
                    "first_create": latency(&image_creates),
                    "layers": rates.iter().map(|(mib, rate)| serde_json::json!({"mib": mib, "mib_per_s": rate})).collect::<Vec<_>>(),
                })),
            })
        );
    } else {
        let rows: Vec<_> = rows.iter().map(|(name, stats)| (*name, stats)).collect();
        println!("{}", latency_table(&rows));
        if let (Some(rate), Some(pull)) = (pull_mib_per_s, cold_pull) {
            println!(
                "first pull by the second host: {template_mib:.0} MiB of template \
                 ({stored_mib:.0} MiB compressed in the store) in {} ms: {rate:.1} MiB/s of \
                 template, {:.1} MiB/s from the store",
                pull.as_millis(),
                stored_mib / pull.as_secs_f64().max(0.001)
            );
        }
        if !rates.is_empty() {
            let rates: Vec<String> = rates
                .iter()
                .map(|(mib, rate)| format!("{mib:.1} MiB at {rate:.1} MiB/s"))
                .collect();
            println!(
                "image layers pulled: {pulled_mib:.1} MiB ({})",
                rates.join(", ")
            );
        }
    }
    Ok(())
}
