//! `wrenn-bench build`: template builds through a `wrenn agent serve` of its own (#14's
//! numbers): a three-step template built from a template (a cold boot on the parent's disk,
//! the steps through envd, the snapshot), and the first create from the built template beside
//! a create from its parent.

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

/// Runs one build to its end: how long it took.
async fn build(agent: &BenchAgent, template_id: &str) -> anyhow::Result<Duration> {
    let request = pb::RunTemplateBuildRequest {
        template_id: template_id.into(),
        from_template: "bench".into(),
        steps: steps(),
        ..Default::default()
    };
    let started = Instant::now();
    let mut stream = agent
        .client()
        .call_streaming::<host_agent::RunTemplateBuild>(&request, &HeaderMap::new())
        .await?;
    while let Some(event) = stream.message().await {
        if let Some(pb::run_template_build_event::Event::Template(_)) = event?.event {
            return Ok(started.elapsed());
        }
    }
    anyhow::bail!("the build of {template_id} ended without a template")
}

pub async fn run(args: BuildBenchArgs) -> anyhow::Result<()> {
    let agent = BenchAgent::start(&args.guest)?;
    eprintln!("building the parent template (one cold boot) ...");
    let _: pb::BuildTemplateResponse = agent
        .call::<host_agent::BuildTemplate>(&pb::BuildTemplateRequest {
            template_id: "bench".into(),
            memory_mib: args.guest.memory_mib,
            vcpus: 1,
            ..Default::default()
        })
        .await?;
    let (mut builds, mut first_creates, mut parent_creates) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        eprintln!("build {} of {} ...", run + 1, args.runs);
        let template = format!("three-{run}");
        builds.push(build(&agent, &template).await.context("the build")?);
        // Creates from the new template and from its parent alternate.
        let id = format!("first-{run}");
        first_creates.push(agent.create_from(&template, id.clone()).await?);
        agent.destroy(id).await?;
        let id = format!("parent-{run}");
        parent_creates.push(agent.create_from("bench", id.clone()).await?);
        agent.destroy(id).await?;
    }
    let builds = latency(&builds);
    let first_creates = latency(&first_creates);
    let parent_creates = latency(&parent_creates);
    if args.guest.json {
        println!(
            "{}",
            serde_json::json!({
                "three_step_build": builds, "first_create_from_built": first_creates,
                "create_from_parent": parent_creates,
            })
        );
    } else {
        println!(
            "{}",
            latency_table(&[
                ("three-step build from a template (cold)", &builds),
                ("first create from the built template", &first_creates),
                ("create from its parent", &parent_creates),
            ])
        );
    }
    Ok(())
}
