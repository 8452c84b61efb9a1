//! Template builds from a template the host has, or from a registry's image made a root
//! filesystem first ([`super::from_image`]) ([`Manager::run_build`]): a VM booted on a new
//! copy-on-write layer over the parent's disk (or the image's), the steps run through envd as E2B runs them (RUN
//! as the current user in the current directory with the build's ENV; WORKDIR made if missing;
//! USER checked to exist), the start command started in the background and the ready command
//! run until it exits 0, then prepared and snapshotted like any template. The new template's
//! sandboxes start as its last USER in its last WORKDIR, its start command running.
//!
//! COPY takes the files its client uploaded (a tar for each `filesHash`, carried with the
//! build): the tar is written into the guest through envd, unpacked as root in a stage, then
//! owned, moded and moved as E2B does ([`copy_step`]).
//!
//! A build streams its log as it goes. One that fails (the step, its exit code and the end of
//! its output are in the error), is cancelled (its caller hung up) or runs past its deadline
//! leaves no VM, network slot or file behind.

use std::collections::BTreeMap;

use tokio::sync::mpsc::UnboundedSender;
use wrenn_agent_api::build::{BuildLog, BuildStep, LogLevel, StepKind, TemplateBuild};
use wrenn_connect::Codec;
use wrenn_connect::client::{ConnectClient, HttpVersion};
use wrenn_proto::process as pb;

use super::templates::{TemplateSource, VmDisk, VmWork};
use super::*;
use crate::store::StepLayer;

/// The user and directory a build from a template starts in when the parent names none (the
/// base image's).
pub const DEFAULT_USER: &str = "user";
pub const DEFAULT_WORKDIR: &str = "/home/user";
/// How many of a failed command's last output lines its error carries.
const FAILED_OUTPUT_LINES: usize = 20;
/// The longest log line kept whole.
const MAX_LOG_LINE: usize = 4096;
/// How long one run of the ready command may take.
const READY_CMD_TRY: Duration = Duration::from_secs(30);
/// The pause between runs of the ready command.
const READY_CMD_INTERVAL: Duration = Duration::from_millis(500);

/// Where a build is, as its log lines name it.
fn base() -> Option<String> {
    Some("base".into())
}
fn finalize() -> Option<String> {
    Some("finalize".into())
}

/// The most lines a build logs; past it one line says so, and the rest are dropped (a failed
/// step's error still carries the end of its output).
pub const MAX_LOG_LINES: usize = 20_000;

/// Sends build log lines (a caller that went away is not an error: the build's end is).
#[derive(Debug, Clone)]
pub struct BuildLogger {
    logs: UnboundedSender<BuildLog>,
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl BuildLogger {
    pub fn new(logs: UnboundedSender<BuildLog>) -> BuildLogger {
        BuildLogger {
            logs,
            sent: Default::default(),
        }
    }

    pub(super) fn log(&self, level: LogLevel, step: Option<String>, message: impl Into<String>) {
        let sent = self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let line = match sent.cmp(&MAX_LOG_LINES) {
            std::cmp::Ordering::Less => BuildLog::now(level, step, message),
            std::cmp::Ordering::Equal => BuildLog::now(
                LogLevel::Warn,
                step,
                format!("the log stops here: a build logs at most {MAX_LOG_LINES} lines"),
            ),
            std::cmp::Ordering::Greater => return,
        };
        let _ = self.logs.send(line);
    }
}

/// What the steps have set so far.
#[derive(Debug, Clone)]
struct StepState {
    user: String,
    workdir: String,
    envs: BTreeMap<String, String>,
}

impl Manager {
    /// Builds `build.template_id` from `build.from_template` (see the module's documentation),
    /// its log to `logs`; `stop` cancels it.
    pub async fn run_build(
        &self,
        build: TemplateBuild,
        logs: UnboundedSender<BuildLog>,
        stop: CancellationToken,
    ) -> Result<TemplateRecord, AgentError> {
        let logger = BuildLogger::new(logs);
        validate_id("template", &build.template_id)?;
        for (index, step) in build.steps.iter().enumerate() {
            step.check(index + 1).map_err(AgentError::InvalidArgument)?;
            if let Some(hash) = &step.files_hash
                && step.kind == StepKind::Copy
                && !build.files.contains_key(hash)
            {
                return Err(AgentError::InvalidArgument(format!(
                    "step {} (COPY): the build carries no files {hash}",
                    index + 1
                )));
            }
            if step.kind == StepKind::Copy {
                let refused = |why: String| {
                    AgentError::InvalidArgument(format!("step {} (COPY): {why}", index + 1))
                };
                let source = copy_source(&step.args[0]).map_err(refused)?;
                let files = step
                    .files_hash
                    .as_ref()
                    .and_then(|hash| build.files.get(hash))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                check_copy_files(files, &source).map_err(refused)?;
            }
        }
        // The parent stays on the host for the build's length.
        let _creating = self.creating_from(&build.from_template);
        let (parent, pulled_in) = self.template_or_pull(&build.from_template).await?;
        if !pulled_in.is_zero() {
            logger.log(
                LogLevel::Info,
                base(),
                format!(
                    "pulled {} from the template store in {} ms",
                    build.from_template,
                    pulled_in.as_millis()
                ),
            );
        }
        let memory_mib = build.memory_mib.unwrap_or(parent.machine.memory_mib);
        let vcpus = build.vcpus.unwrap_or(parent.machine.vcpus);
        // The deadline stops the build as a hang-up would.
        let deadline = stop.child_token();
        let timer = {
            let deadline = deadline.clone();
            let after = build.deadline;
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                deadline.cancel();
            })
        };
        let from = match &build.from_image {
            Some(image) => format!("the image {}", image.reference),
            None => build.from_template.clone(),
        };
        logger.log(
            LogLevel::Info,
            base(),
            format!(
                "building {} from {from} ({memory_mib} MiB, {vcpus} vCPU)",
                build.template_id
            ),
        );
        let forced = build.force || build.steps.iter().any(|step| step.force);
        let result = async {
            let pulled = match &build.from_image {
                Some(image) => Some(self.pull_image(image, &logger, &deadline).await?),
                None => None,
            };
            let source_key = match &pulled {
                Some(pulled) => format!(
                    "image {} with the guest of {} ({})",
                    pulled.manifest_digest, parent.template_id, parent.created_at_ms
                ),
                None => format!("template {} ({})", parent.template_id, parent.created_at_ms),
            };
            let key = build_key(&build, &source_key, memory_mib, vcpus);
            if !forced && let Some(cached) = self.template_built_as(&key) {
                log_cached_steps(&logger, &build, build.steps.len());
                logger.log(
                    LogLevel::Info,
                    finalize(),
                    format!(
                        "cached: the same build as template {}, whose files it takes \
                         (force the build or a step to run them again)",
                        cached.template_id
                    ),
                );
                return self.clone_template(&build.template_id, &cached).await;
            }
            let keys = step_keys(&build, &source_key);
            // A forced step runs again, and every one after it.
            let deepest = (!build.force).then(|| {
                build
                    .steps
                    .iter()
                    .position(|step| step.force)
                    .unwrap_or(build.steps.len())
            });
            let resumed = deepest
                .and_then(|deepest| self.deepest_step_layer(&keys, deepest, pulled.is_some()));
            // The template whose layers the build takes stays meanwhile (it cannot be
            // removed while a build or create from it is in flight).
            let _taking_from = resumed
                .as_ref()
                .map(|(from, _)| self.creating_from(&from.template_id));
            // It may have gone between the lookup and the guard: the build then runs its steps.
            let resumed = resumed.and_then(|(from, layer)| {
                let from_id = from.template_id.clone();
                let inherited: Vec<StepLayer> = from
                    .steps
                    .iter()
                    .filter(|kept| kept.step <= layer.step)
                    .cloned()
                    .collect();
                let from_dir = self.store.template_dir(&from_id);
                match TemplateSource::layers_of(from, layer.layers, from_dir) {
                    Ok(source) => Some((source, from_id, layer, inherited)),
                    Err(error) => {
                        tracing::warn!(template = %from_id, %error, "a cached step's layers could not be taken: the steps run");
                        None
                    }
                }
            });
            let (source, state, skip, inherited, _staging) = match (resumed, pulled) {
                (Some((source, from_id, layer, inherited)), _) => {
                    log_cached_steps(&logger, &build, layer.step);
                    logger.log(
                        LogLevel::Info,
                        base(),
                        if layer.step == 0 {
                            format!(
                                "taking the root filesystem made from this image for template \
                                 {from_id}"
                            )
                        } else {
                            format!(
                                "cached: steps 1 to {} as template {from_id}'s build left them",
                                layer.step
                            )
                        },
                    );
                    let state = StepState {
                        user: layer.user,
                        workdir: layer.workdir,
                        envs: layer.envs,
                    };
                    (source, state, layer.step, inherited, None)
                }
                (None, Some(pulled)) => {
                    let made = self
                        .rootfs_from_image(&build.template_id, pulled, &parent, &logger, &deadline)
                        .await?;
                    let state = StepState {
                        user: made.user,
                        workdir: made.workdir,
                        envs: made.envs,
                    };
                    (made.source, state, 0, Vec::new(), Some(made.staging))
                }
                (None, None) => {
                    let state = StepState {
                        user: parent
                            .default_user
                            .clone()
                            .unwrap_or_else(|| DEFAULT_USER.into()),
                        workdir: parent
                            .default_workdir
                            .clone()
                            .unwrap_or_else(|| DEFAULT_WORKDIR.into()),
                        envs: BTreeMap::new(),
                    };
                    (
                        TemplateSource::Template(Box::new(parent.clone())),
                        state,
                        0,
                        Vec::new(),
                        None,
                    )
                }
            };
            let work = BuildWork {
                build: &build,
                logger: &logger,
                stop: &deadline,
                state: std::sync::Mutex::new(state),
                key,
                keys,
                skip,
                kept: std::sync::Mutex::new(KeptLayers {
                    steps: inherited,
                    keeping: true,
                }),
            };
            self.make_template(
                &build.template_id,
                source,
                memory_mib,
                vcpus,
                DEFAULT_BOOT_TIMEOUT,
                build.allow_internet,
                &work,
            )
            .await
        }
        .await;
        timer.abort();
        let stopped_by_deadline = deadline.is_cancelled() && !stop.is_cancelled();
        match result {
            Ok(record) => {
                logger.log(
                    LogLevel::Info,
                    finalize(),
                    format!(
                        "template {} built in {} ms",
                        record.template_id, record.build_ms
                    ),
                );
                if self.template_store.is_some() {
                    logger.log(
                        LogLevel::Info,
                        finalize(),
                        "putting the template in the store",
                    );
                    match self.push_template(&record.template_id, &stop).await {
                        Ok(moved) => logger.log(
                            LogLevel::Info,
                            finalize(),
                            format!(
                                "stored: {} new files, {} MiB ({} MiB compressed)",
                                moved.files,
                                moved.bytes >> 20,
                                moved.stored_bytes >> 20
                            ),
                        ),
                        Err(error) => {
                            // A template only this host has would be lost with it: the build
                            // fails whole.
                            let _ = self.remove_template(&record.template_id);
                            if let AgentError::Cancelled(_) = error {
                                return Err(AgentError::Cancelled(format!(
                                    "the build of {} was cancelled",
                                    build.template_id
                                )));
                            }
                            return Err(AgentError::Internal(format!(
                                "the template was built, but could not be put in the template \
                                 store: {error}"
                            )));
                        }
                    }
                    self.trim_template_cache(Some(&record.template_id));
                }
                Ok(record)
            }
            Err(_) if stopped_by_deadline => Err(AgentError::DeadlineExceeded(format!(
                "the build of {} ran past its deadline of {} s",
                build.template_id,
                build.deadline.as_secs()
            ))),
            Err(_) if stop.is_cancelled() => Err(AgentError::Cancelled(format!(
                "the build of {} was cancelled",
                build.template_id
            ))),
            Err(error) => {
                // Past the cap too: the end of a build is always in its log.
                let _ = logger
                    .logs
                    .send(BuildLog::now(LogLevel::Error, None, error.to_string()));
                Err(error)
            }
        }
    }
}

/// Logs the build's first `through` steps as cached (not run).
fn log_cached_steps(logger: &BuildLogger, build: &TemplateBuild, through: usize) {
    for (index, step) in build.steps.iter().take(through).enumerate() {
        logger.log(
            LogLevel::Info,
            Some((index + 1).to_string()),
            format!(
                "[{}/{}] {} (cached)",
                index + 1,
                build.steps.len(),
                step.describe()
            ),
        );
    }
}

/// A build's work inside its VM.
struct BuildWork<'a> {
    build: &'a TemplateBuild,
    logger: &'a BuildLogger,
    stop: &'a CancellationToken,
    state: std::sync::Mutex<StepState>,
    /// What the build is made of, hashed ([`build_key`]).
    key: String,
    /// What the build is made of up to each step, hashed ([`step_keys`]).
    keys: Vec<String>,
    /// The steps its source's layers have run already.
    skip: usize,
    kept: std::sync::Mutex<KeptLayers>,
}

/// The steps whose disks a build's chain keeps so far.
struct KeptLayers {
    steps: Vec<StepLayer>,
    /// False once a step's disk could not be kept: the later ones cannot be either.
    keeping: bool,
}

/// The longest disk chain a build adds step layers to (a deeper chain still builds, its later
/// steps kept only with the whole build); sandboxes and builds on the template add theirs
/// below [`wrenn_vmm::qcow2::MAX_LAYERS`].
const MAX_STEP_CHAIN: usize = 24;

impl BuildWork<'_> {
    fn state(&self) -> StepState {
        self.state.lock().expect("build state").clone()
    }

    fn keep(&self, step: usize, layers: usize) {
        let state = self.state();
        self.kept
            .lock()
            .expect("kept layers")
            .steps
            .push(StepLayer {
                key: self.keys[step].clone(),
                step,
                layers,
                user: state.user,
                workdir: state.workdir,
                envs: state.envs,
            });
    }

    fn stop_keeping(&self, number: usize, why: String) {
        let mut kept = self.kept.lock().expect("kept layers");
        if kept.keeping {
            kept.keeping = false;
            self.logger.log(
                LogLevel::Warn,
                Some(number.to_string()),
                format!("this step and the later ones are not kept for later builds: {why}"),
            );
        }
    }

    /// Keeps the disk as step `number` left it, for later builds that share the steps so far:
    /// frozen as a layer of the chain when the step may have written to it, the layer below
    /// when it only changed the steps' state. A disk this VMM cannot freeze, or whose chain is
    /// at its cap, is logged and the build goes on; a freeze that fails fails the build.
    async fn keep_step(
        &self,
        number: usize,
        step: &BuildStep,
        address: SocketAddr,
        disk: &VmDisk<'_>,
    ) -> Result<(), AgentError> {
        let below = {
            let kept = self.kept.lock().expect("kept layers");
            if !kept.keeping {
                return Ok(());
            }
            kept.steps.last().map(|last| last.layers)
        };
        let Some(below) = below else {
            self.stop_keeping(number, "the disk before it was not kept".into());
            return Ok(());
        };
        if matches!(step.kind, StepKind::Env | StepKind::User) {
            self.keep(number, below);
            return Ok(());
        }
        if !disk.can_freeze() {
            self.stop_keeping(
                number,
                "this host's VMM cannot freeze a running VM's disk".into(),
            );
            return Ok(());
        }
        let chain = disk.layers_below_top()? + 1;
        if chain + 1 > MAX_STEP_CHAIN {
            self.stop_keeping(
                number,
                format!(
                    "the disk's chain has {chain} layers, and a build adds to {MAX_STEP_CHAIN}"
                ),
            );
            return Ok(());
        }
        let started = Instant::now();
        let synced = run_command(
            address,
            "root",
            "/",
            &BTreeMap::new(),
            "sync",
            &BuildLogger::new(tokio::sync::mpsc::unbounded_channel().0),
            None,
            self.stop,
        )
        .await?;
        if synced.exit_code != 0 {
            self.stop_keeping(
                number,
                format!("sync in the guest exited with code {}", synced.exit_code),
            );
            return Ok(());
        }
        // A freeze that failed half-way leaves the VM's disk in doubt: the build fails.
        let layers = disk.freeze(&format!("step-{number}.qcow2")).await?;
        self.keep(number, layers);
        self.logger.log(
            LogLevel::Debug,
            Some(number.to_string()),
            format!(
                "its disk kept for later builds ({} ms)",
                started.elapsed().as_millis()
            ),
        );
        Ok(())
    }
}

#[async_trait::async_trait]
impl VmWork for BuildWork<'_> {
    fn stop(&self) -> Option<&CancellationToken> {
        Some(self.stop)
    }

    fn build_key(&self) -> Option<String> {
        Some(self.key.clone())
    }

    fn booted(&self, took: Duration) {
        self.logger.log(
            LogLevel::Info,
            base(),
            format!("the VM is up ({} ms)", took.as_millis()),
        );
    }

    fn step_layers(&self) -> Vec<StepLayer> {
        self.kept.lock().expect("kept layers").steps.clone()
    }

    async fn in_guest(
        &self,
        address: SocketAddr,
        disk: &VmDisk<'_>,
    ) -> Result<TemplateDefaults, AgentError> {
        let total = self.build.steps.len();
        // Step 0 (the source) is kept unless the source is a kept step itself.
        if self.kept.lock().expect("kept layers").steps.is_empty() {
            self.keep(0, disk.layers_below_top()?);
        }
        for (index, step) in self.build.steps.iter().enumerate().skip(self.skip) {
            let number = index + 1;
            let label = Some(number.to_string());
            self.logger.log(
                LogLevel::Info,
                label.clone(),
                format!("[{number}/{total}] {}", step.describe()),
            );
            let state = self.state.lock().expect("build state").clone();
            let next = if step.kind == StepKind::Copy {
                copy_step(
                    address,
                    step,
                    number,
                    state,
                    self.build,
                    self.logger,
                    self.stop,
                )
                .await?
            } else {
                run_step(address, step, number, state, self.logger, self.stop).await?
            };
            *self.state.lock().expect("build state") = next;
            self.keep_step(number, step, address, disk).await?;
        }
        let state = self.state.lock().expect("build state").clone();
        if let Some(start_cmd) = &self.build.start_cmd {
            self.logger
                .log(LogLevel::Info, finalize(), format!("starting: {start_cmd}"));
            start_in_background(address, &state, start_cmd).await?;
        }
        if let Some(ready_cmd) = &self.build.ready_cmd {
            self.logger.log(
                LogLevel::Info,
                finalize(),
                format!("waiting until it is ready: {ready_cmd}"),
            );
            wait_until_ready(address, &state, ready_cmd, self.logger, self.stop).await?;
        }
        // What the steps wrote reaches the disk: a template built from this one boots from
        // its disk alone.
        let synced = run_command(
            address,
            "root",
            "/",
            &BTreeMap::new(),
            "sync",
            self.logger,
            finalize(),
            self.stop,
        )
        .await?;
        if synced.exit_code != 0 {
            return Err(AgentError::Internal(format!(
                "sync in the guest exited with code {}",
                synced.exit_code
            )));
        }
        self.logger
            .log(LogLevel::Info, finalize(), "taking the snapshot");
        Ok(TemplateDefaults {
            user: Some(state.user),
            workdir: Some(state.workdir),
            start_cmd: self.build.start_cmd.clone(),
        })
    }
}

/// What a build is made of, hashed (SHA-256, hex): who may share it (its cache scope), where
/// it starts (`source`: the parent
/// template as made, or the image's manifest digest with the template giving the guest's
/// files), the VM's size and network, every step with its arguments and, for COPY, its files'
/// bytes, and the start and ready commands. Two builds of one key make the same template.
fn build_key(build: &TemplateBuild, source: &str, memory_mib: u32, vcpus: u32) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut part = |text: &[u8]| hash_part(&mut hasher, text);
    part(b"wrenn-build-v1");
    part(build.cache_scope.as_bytes());
    part(source.as_bytes());
    part(
        format!(
            "{memory_mib} MiB, {vcpus} vCPU, internet {}",
            build.allow_internet
        )
        .as_bytes(),
    );
    for step in &build.steps {
        hash_step(&mut hasher, build, step);
    }
    let mut part = |text: &[u8]| hash_part(&mut hasher, text);
    part(build.start_cmd.as_deref().unwrap_or("").as_bytes());
    part(build.ready_cmd.as_deref().unwrap_or("").as_bytes());
    format!("{:x}", hasher.finalize())
}

/// What a build is made of up to each step, hashed (SHA-256, hex): at 0 who may share it
/// (its cache scope), where it starts and its network, then each step added (its kind, arguments and, for COPY, its files' bytes).
/// Builds that share a step's key leave the same disk and state after it, whatever their size
/// or their other steps.
fn step_keys(build: &TemplateBuild, source: &str) -> Vec<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hash_part(&mut hasher, b"wrenn-step-v1");
    hash_part(&mut hasher, build.cache_scope.as_bytes());
    hash_part(&mut hasher, source.as_bytes());
    hash_part(
        &mut hasher,
        format!("internet {}", build.allow_internet).as_bytes(),
    );
    let mut keys = vec![format!("{:x}", hasher.finalize())];
    for step in &build.steps {
        let mut hasher = Sha256::new();
        hash_part(&mut hasher, keys.last().expect("a key").as_bytes());
        hash_step(&mut hasher, build, step);
        keys.push(format!("{:x}", hasher.finalize()));
    }
    keys
}

/// Adds `text` to a key, its length first (so that parts cannot run into each other).
fn hash_part(hasher: &mut sha2::Sha256, text: &[u8]) {
    use sha2::Digest;
    hasher.update((text.len() as u64).to_le_bytes());
    hasher.update(text);
}

/// Adds a step to a key: its kind, its arguments and, for COPY, its files' bytes hashed.
fn hash_step(hasher: &mut sha2::Sha256, build: &TemplateBuild, step: &BuildStep) {
    use sha2::{Digest, Sha256};
    hash_part(hasher, step.kind.name().as_bytes());
    hash_part(hasher, &(step.args.len() as u64).to_le_bytes());
    for arg in &step.args {
        hash_part(hasher, arg.as_bytes());
    }
    let files = step
        .files_hash
        .as_ref()
        .and_then(|hash| build.files.get(hash))
        .map(|bytes| format!("{:x}", Sha256::digest(bytes)))
        .unwrap_or_default();
    hash_part(hasher, files.as_bytes());
}

impl Manager {
    /// The deepest step layer of this host's templates whose key is the build's at its step,
    /// up to step `deepest` (the newest template's when several are as deep); step 0 (the
    /// source itself) only for builds from an image, whose root filesystem it saves making.
    fn deepest_step_layer(
        &self,
        keys: &[String],
        deepest: usize,
        from_image: bool,
    ) -> Option<(TemplateRecord, StepLayer)> {
        let templates = self.templates.lock().expect("templates lock");
        templates
            .values()
            .flat_map(|template| template.steps.iter().map(move |layer| (template, layer)))
            .filter(|(_, layer)| {
                layer.step <= deepest
                    && (layer.step > 0 || from_image)
                    && keys.get(layer.step) == Some(&layer.key)
            })
            .max_by_key(|(template, layer)| (layer.step, template.created_at_ms))
            .map(|(template, layer)| (template.clone(), layer.clone()))
    }

    /// A template of this host built as `key` says, if one is (the newest).
    fn template_built_as(&self, key: &str) -> Option<TemplateRecord> {
        self.templates
            .lock()
            .expect("templates lock")
            .values()
            .filter(|template| template.build_key.as_deref() == Some(key))
            .max_by_key(|template| template.created_at_ms)
            .cloned()
    }
}

/// What a template's sandboxes start with.
#[derive(Debug, Clone, Default)]
pub struct TemplateDefaults {
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub start_cmd: Option<String>,
}

/// Runs one step: the state after it.
async fn run_step(
    address: SocketAddr,
    step: &BuildStep,
    number: usize,
    mut state: StepState,
    logger: &BuildLogger,
    stop: &CancellationToken,
) -> Result<StepState, AgentError> {
    let label = Some(number.to_string());
    let failed = |what: String| {
        AgentError::FailedPrecondition(format!("step {number} ({}): {what}", step.describe()))
    };
    match step.kind {
        StepKind::Run => {
            let user = step
                .args
                .get(1)
                .filter(|u| !u.is_empty())
                .cloned()
                .unwrap_or_else(|| state.user.clone());
            let ran = run_command(
                address,
                &user,
                &state.workdir,
                &state.envs,
                &step.args[0],
                logger,
                label,
                stop,
            )
            .await?;
            if ran.exit_code != 0 {
                return Err(failed(format!(
                    "exited with code {}{}",
                    ran.exit_code,
                    ran.output_tail()
                )));
            }
        }
        StepKind::Env => {
            for pair in step.args.chunks(2) {
                state.envs.insert(pair[0].clone(), pair[1].clone());
            }
        }
        StepKind::Workdir => {
            let path = resolve(&state.workdir, &step.args[0]);
            // Made as root, then given to the current user when it made it.
            let script = format!(
                "if [ ! -d {dir} ]; then mkdir -p {dir} && chown {user}: {dir}; fi",
                dir = quote(&path),
                user = quote(&state.user)
            );
            let ran = run_command(
                address,
                "root",
                "/",
                &BTreeMap::new(),
                &script,
                logger,
                label,
                stop,
            )
            .await?;
            if ran.exit_code != 0 {
                return Err(failed(format!(
                    "cannot make the directory{}",
                    ran.output_tail()
                )));
            }
            state.workdir = path;
        }
        StepKind::User => {
            let user = &step.args[0];
            let script = format!("id -u {} >/dev/null", quote(user));
            let ran = run_command(
                address,
                "root",
                "/",
                &BTreeMap::new(),
                &script,
                logger,
                label,
                stop,
            )
            .await?;
            if ran.exit_code != 0 {
                return Err(failed(format!("there is no user {user:?} in the template")));
            }
            state.user = user.clone();
        }
        StepKind::Copy => return Err(failed("is run by copy_step".into())),
    }
    Ok(state)
}

/// The part of a COPY's source to take from the uploaded files: the source up to its first
/// component with a glob (the client sent only what the glob matched), relative to the build's
/// context; `.` for all of it.
fn copy_source(source: &str) -> Result<String, String> {
    let mut kept = Vec::new();
    for part in source.split('/') {
        if part.contains(['*', '?', '[']) {
            break;
        }
        match part {
            "" | "." => {}
            ".." => return Err(format!("the source {source:?} leaves the build's context")),
            part => kept.push(part),
        }
    }
    if source.starts_with('/') {
        return Err(format!(
            "the source {source:?} is not within the build's context"
        ));
    }
    Ok(if kept.is_empty() {
        ".".into()
    } else {
        kept.join("/")
    })
}

/// Checks, before any VM starts, that a COPY's uploaded files are a tar (gzipped or not) that
/// has `source` (a path relative to the build's context, `.` for all of it).
fn check_copy_files(files: &[u8], source: &str) -> Result<(), String> {
    let reader: Box<dyn std::io::Read + '_> = if files.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(files))
    } else {
        Box::new(files)
    };
    let not_a_tar =
        |error: std::io::Error| format!("its uploaded files are not a tar archive: {error}");
    let mut archive = tar::Archive::new(reader);
    let mut entries = 0usize;
    let mut found = source == ".";
    for entry in archive.entries().map_err(not_a_tar)? {
        let entry = entry.map_err(not_a_tar)?;
        entries += 1;
        if found {
            continue;
        }
        let path = entry.path().map_err(not_a_tar)?;
        let path = path.to_string_lossy();
        let path = path.trim_start_matches("./").trim_end_matches('/');
        found = path == source
            || path
                .strip_prefix(source)
                .is_some_and(|rest| rest.starts_with('/'));
    }
    if entries == 0 {
        return Err("its uploaded files are an empty archive".into());
    }
    if !found {
        return Err(format!("{source} is not in its uploaded files"));
    }
    Ok(())
}

/// COPY: the step's files into the guest (`src`, `dest`, owner, mode), as E2B copies: owner
/// and mode set first (the owner is the current user when none is given, a bare `u` meaning
/// `u`'s own group), a directory's contents merged into `dest`, a file moved to `dest` (into
/// it when it ends with `/` or is a directory), links kept as links.
#[allow(clippy::too_many_arguments)]
async fn copy_step(
    address: SocketAddr,
    step: &BuildStep,
    number: usize,
    state: StepState,
    build: &TemplateBuild,
    logger: &BuildLogger,
    stop: &CancellationToken,
) -> Result<StepState, AgentError> {
    let failed = |what: String| {
        AgentError::FailedPrecondition(format!("step {number} ({}): {what}", step.describe()))
    };
    let hash = step.files_hash.as_deref().unwrap_or_default();
    let tar = build
        .files
        .get(hash)
        .cloned()
        .ok_or_else(|| failed(format!("the build carries no files {hash}")))?;
    let source = copy_source(&step.args[0]).map_err(failed)?;
    let raw_destination = &step.args[1];
    let destination = resolve(&state.workdir, raw_destination);
    let owner = match step.args.get(2).filter(|o| !o.is_empty()) {
        Some(owner) if owner.contains(':') => owner.clone(),
        Some(owner) => format!("{owner}:"),
        None => format!("{}:", state.user),
    };
    let mode = step.args.get(3).filter(|m| !m.is_empty());
    let archive = format!("/tmp/wrenn-copy-{number}.tar");
    tokio::select! {
        uploaded = envd_client::upload_as_root(address, &archive, tar, Duration::from_secs(300)) => uploaded?,
        () = stop.cancelled() => return Err(AgentError::Cancelled("the build was stopped".into())),
    }
    let chmod = match mode {
        Some(mode) => format!(
            "if [ -d \"$src\" ] && [ ! -L \"$src\" ]; then chmod -R {m} \"$src\"; elif [ ! -L \"$src\" ]; then chmod {m} \"$src\"; fi",
            m = quote(mode)
        ),
        None => String::new(),
    };
    let into_directory = raw_destination.ends_with('/');
    let script = format!(
        r#"set -eu
archive={archive}
stage=$(mktemp -d /tmp/wrenn-copy.XXXXXX)
trap 'rm -rf "$stage" "$archive"' EXIT
tar -xf "$archive" -C "$stage" --no-same-owner
src="$stage"/{source}
if [ ! -e "$src" ] && [ ! -L "$src" ]; then
  echo "{shown_source} is not in the uploaded files" >&2
  exit 1
fi
chown -R -h {owner} "$src"
{chmod}
dest={destination}
if [ -d "$src" ] && [ ! -L "$src" ]; then
  mkdir -p "$dest"
  # Its entries, so that the destination directory itself keeps its owner and mode.
  find "$src" -mindepth 1 -maxdepth 1 -exec cp -a {{}} "$dest"/ \;
elif [ {into_directory} = true ] || {{ [ -d "$dest" ] && [ ! -L "$dest" ]; }}; then
  mkdir -p "$dest"
  mv "$src" "$dest"/
else
  mkdir -p "$(dirname "$dest")"
  mv -T "$src" "$dest"
fi
"#,
        archive = quote(&archive),
        source = quote(&source),
        shown_source = step.args[0].replace(['"', '$', '`', '\\'], "_"),
        owner = quote(&owner),
        destination = quote(&destination),
    );
    let ran = run_command(
        address,
        "root",
        "/",
        &BTreeMap::new(),
        &script,
        logger,
        Some(number.to_string()),
        stop,
    )
    .await?;
    if ran.exit_code != 0 {
        return Err(failed(format!(
            "exited with code {}{}",
            ran.exit_code,
            ran.output_tail()
        )));
    }
    Ok(state)
}

/// `path` from `workdir`, as a shell's `cd` takes it.
fn resolve(workdir: &str, path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", workdir.trim_end_matches('/'))
    }
}

/// Shell-quotes one word.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// A finished command: its exit code and its last lines of output.
struct Ran {
    exit_code: i32,
    tail: std::collections::VecDeque<String>,
}

impl Ran {
    fn output_tail(&self) -> String {
        if self.tail.is_empty() {
            String::new()
        } else {
            let lines: Vec<&str> = self.tail.iter().map(String::as_str).collect();
            format!("; its output ended with:\n{}", lines.join("\n"))
        }
    }
}

/// envd's process service in the guest at `address`, as `user`.
fn envd_client(address: SocketAddr, user: &str) -> (ConnectClient, http::HeaderMap) {
    use base64::Engine;
    let client = ConnectClient::new(
        format!("http://{address}"),
        HttpVersion::Http1,
        Codec::Proto,
    )
    .with_connect_timeout(Duration::from_secs(5));
    let mut headers = http::HeaderMap::new();
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
    if let Ok(value) = format!("Basic {encoded}").parse() {
        headers.insert(http::header::AUTHORIZATION, value);
    }
    (client, headers)
}

fn bash(script: &str, workdir: &str, envs: &BTreeMap<String, String>) -> pb::StartRequest {
    pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), script.into()],
            envs: envs.clone().into_iter().collect(),
            cwd: Some(workdir.into()),
        }),
        stdin: Some(false),
        ..Default::default()
    }
}

/// Runs `script` with `bash -l -c` in the guest, each line of its output logged under `step`
/// as it comes; `stop` ends it (an error).
#[allow(clippy::too_many_arguments)]
async fn run_command(
    address: SocketAddr,
    user: &str,
    workdir: &str,
    envs: &BTreeMap<String, String>,
    script: &str,
    logger: &BuildLogger,
    step: Option<String>,
    stop: &CancellationToken,
) -> Result<Ran, AgentError> {
    let (client, headers) = envd_client(address, user);
    let request = bash(script, workdir, envs);
    let run = async {
        let mut stream = client
            .call_streaming::<pb::process::Start>(&request, &headers)
            .await
            .map_err(|error| envd_error(user, workdir, error))?;
        let mut lines = LineSplitter::default();
        let mut tail = std::collections::VecDeque::new();
        let mut keep = |line: String| {
            logger.log(LogLevel::Info, step.clone(), line.clone());
            if tail.len() == FAILED_OUTPUT_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        };
        while let Some(message) = stream.message().await {
            use pb::process_event::{Event, data_event::Output};
            let message = message.map_err(|error| envd_error(user, workdir, error))?;
            match message.event.and_then(|e| e.event) {
                Some(Event::Data(data)) => {
                    if let Some(
                        Output::Stdout(bytes) | Output::Stderr(bytes) | Output::Pty(bytes),
                    ) = data.output
                    {
                        lines.push(&bytes).into_iter().for_each(&mut keep);
                    }
                }
                Some(Event::End(end)) => {
                    lines.finish().into_iter().for_each(&mut keep);
                    let exit_code = if end.exited { end.exit_code } else { -1 };
                    return Ok(Ran { exit_code, tail });
                }
                _ => {}
            }
        }
        Err(AgentError::Internal(
            "the command's stream ended without an exit code (the VM went away?)".into(),
        ))
    };
    tokio::select! {
        ran = run => ran,
        () = stop.cancelled() => Err(AgentError::Cancelled("the build was stopped".into())),
    }
}

/// An envd error as the build reports it.
fn envd_error(user: &str, workdir: &str, error: wrenn_connect::ConnectError) -> AgentError {
    AgentError::FailedPrecondition(format!(
        "envd refused to run it as {user:?} in {workdir:?}: {}",
        error.message
    ))
}

/// Starts `start_cmd` and leaves it running (envd keeps a process whose caller went away).
async fn start_in_background(
    address: SocketAddr,
    state: &StepState,
    start_cmd: &str,
) -> Result<(), AgentError> {
    let (client, headers) = envd_client(address, &state.user);
    let request = bash(start_cmd, &state.workdir, &state.envs);
    let mut stream = client
        .call_streaming::<pb::process::Start>(&request, &headers)
        .await
        .map_err(|error| envd_error(&state.user, &state.workdir, error))?;
    // The first event says it started; the stream is then let go.
    match tokio::time::timeout(Duration::from_secs(30), stream.message()).await {
        Ok(Some(Ok(_))) => Ok(()),
        Ok(Some(Err(error))) => Err(envd_error(&state.user, &state.workdir, error)),
        Ok(None) | Err(_) => Err(AgentError::FailedPrecondition(
            "the start command did not start".into(),
        )),
    }
}

/// Runs `ready_cmd` until it exits 0, or the build is stopped.
async fn wait_until_ready(
    address: SocketAddr,
    state: &StepState,
    ready_cmd: &str,
    logger: &BuildLogger,
    stop: &CancellationToken,
) -> Result<(), AgentError> {
    let mut tries = 0u32;
    loop {
        tries += 1;
        let quiet = BuildLogger::new(tokio::sync::mpsc::unbounded_channel().0);
        // Bounded in the guest too, so that a run that hangs leaves no process in the snapshot.
        let bounded = format!(
            "timeout -k 5 {} bash -c {}",
            READY_CMD_TRY.as_secs(),
            quote(ready_cmd)
        );
        let once = run_command(
            address,
            &state.user,
            &state.workdir,
            &state.envs,
            &bounded,
            &quiet,
            finalize(),
            stop,
        );
        match tokio::time::timeout(READY_CMD_TRY + Duration::from_secs(10), once).await {
            Ok(Ok(ran)) if ran.exit_code == 0 => {
                logger.log(
                    LogLevel::Info,
                    finalize(),
                    format!("ready after {tries} run(s) of the ready command"),
                );
                return Ok(());
            }
            Ok(Ok(ran)) => logger.log(
                LogLevel::Debug,
                finalize(),
                format!("not ready yet (exit code {})", ran.exit_code),
            ),
            Ok(Err(error)) => return Err(error),
            Err(_) => logger.log(
                LogLevel::Debug,
                finalize(),
                format!("not ready yet (the ready command ran past {READY_CMD_TRY:?})"),
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(READY_CMD_INTERVAL) => {}
            () = stop.cancelled() => {
                return Err(AgentError::Cancelled("the build was stopped".into()));
            }
        }
    }
}

/// Splits a byte stream into lines (invalid UTF-8 replaced, a line cut at [`MAX_LOG_LINE`]).
#[derive(Debug, Default)]
struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                lines.push(Self::text(std::mem::take(&mut self.partial)));
            } else if self.partial.len() < MAX_LOG_LINE {
                self.partial.push(byte);
            }
        }
        lines
    }

    fn finish(&mut self) -> Vec<String> {
        if self.partial.is_empty() {
            Vec::new()
        } else {
            vec![Self::text(std::mem::take(&mut self.partial))]
        }
    }

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8_lossy(&bytes)
            .trim_end_matches('\r')
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_split_into_lines_across_chunks() {
        let mut splitter = LineSplitter::default();
        assert_eq!(splitter.push(b"one\ntw"), ["one"]);
        assert_eq!(splitter.push(b"o\r\nthree"), ["two"]);
        assert_eq!(splitter.finish(), ["three"]);
        assert!(splitter.finish().is_empty());
        let long = vec![b'x'; MAX_LOG_LINE + 10];
        assert_eq!(splitter.push(&long), Vec::<String>::new());
        assert_eq!(splitter.push(b"\n")[0].len(), MAX_LOG_LINE);
    }

    #[test]
    fn copy_sources_stop_at_their_glob_and_stay_in_the_context() {
        assert_eq!(copy_source("app/src").unwrap(), "app/src");
        assert_eq!(copy_source("./app/*.py").unwrap(), "app");
        assert_eq!(copy_source("*.txt").unwrap(), ".");
        assert_eq!(copy_source(".").unwrap(), ".");
        assert!(copy_source("../secrets").is_err());
        assert!(copy_source("/etc/passwd").is_err());
    }

    fn build_of(steps: Vec<BuildStep>, files: &[(&str, &[u8])]) -> TemplateBuild {
        TemplateBuild {
            template_id: "t".into(),
            from_template: "base".into(),
            from_image: None,
            force: false,
            steps,
            start_cmd: None,
            ready_cmd: None,
            memory_mib: None,
            vcpus: None,
            deadline: Duration::from_secs(60),
            files: files
                .iter()
                .map(|(hash, bytes)| (hash.to_string(), bytes.to_vec()))
                .collect(),
            allow_internet: false,
            cache_scope: String::new(),
        }
    }

    fn step_of(kind: StepKind, args: &[&str], files_hash: Option<&str>) -> BuildStep {
        BuildStep {
            kind,
            args: args.iter().map(|arg| arg.to_string()).collect(),
            files_hash: files_hash.map(str::to_string),
            force: false,
        }
    }

    #[test]
    fn step_keys_are_shared_by_builds_up_to_their_first_difference() {
        let run = |script: &str| step_of(StepKind::Run, &[script], None);
        let copy = step_of(StepKind::Copy, &["app", "/app"], Some("h"));
        let first = build_of(vec![run("a"), copy.clone(), run("b")], &[("h", b"one")]);
        let keys = step_keys(&first, "template base (1)");
        assert_eq!(keys.len(), 4, "the source's key, then one per step");
        assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 4);

        // The same first steps, whatever comes after, the start command or the VM's size.
        let mut longer = build_of(vec![run("a"), copy.clone(), run("c")], &[("h", b"one")]);
        longer.start_cmd = Some("serve".into());
        longer.memory_mib = Some(4096);
        let other = step_keys(&longer, "template base (1)");
        assert_eq!(keys[..3], other[..3]);
        assert_ne!(keys[3], other[3]);

        // The COPY's bytes count, not the hash its client named them by.
        let changed = step_keys(
            &build_of(vec![run("a"), copy.clone(), run("b")], &[("h", b"two")]),
            "template base (1)",
        );
        assert_eq!(keys[..2], changed[..2]);
        assert_ne!(keys[2], changed[2]);
        assert_ne!(keys[3], changed[3]);

        // Another source, network or scope (team) is another build from the start.
        let rebuilt_base = step_keys(&first, "template base (2)");
        assert!(keys.iter().zip(&rebuilt_base).all(|(a, b)| a != b));
        let mut other_team = first.clone();
        other_team.cache_scope = "team-b".into();
        let theirs = step_keys(&other_team, "template base (1)");
        assert!(keys.iter().zip(&theirs).all(|(a, b)| a != b));
        assert_ne!(
            build_key(&first, "template base (1)", 512, 1),
            build_key(&other_team, "template base (1)", 512, 1)
        );
        let mut online = first.clone();
        online.allow_internet = true;
        assert_ne!(keys[0], step_keys(&online, "template base (1)")[0]);
        // Arguments cannot run into each other.
        let split = step_keys(
            &build_of(vec![step_of(StepKind::Env, &["AB", "C"], None)], &[]),
            "s",
        );
        let moved = step_keys(
            &build_of(vec![step_of(StepKind::Env, &["A", "BC"], None)], &[]),
            "s",
        );
        assert_ne!(split[1], moved[1]);
    }

    #[test]
    fn copy_files_are_checked_before_any_vm_starts() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(5);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header.clone(), "app/main.py", &b"print"[..])
            .unwrap();
        builder
            .append_data(&mut header, "./notes.txt", &b"notes"[..])
            .unwrap();
        let plain = builder.into_inner().unwrap();
        let mut gzipped = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gzipped, &plain).unwrap();
        let gzipped = gzipped.finish().unwrap();
        for files in [&plain, &gzipped] {
            for source in [".", "app", "app/main.py", "notes.txt"] {
                assert_eq!(check_copy_files(files, source), Ok(()), "{source}");
            }
            let missing = check_copy_files(files, "ap").unwrap_err();
            assert_eq!(missing, "ap is not in its uploaded files");
            assert!(check_copy_files(files, "src").is_err());
        }
        let garbage = check_copy_files(b"not a tar at all, as anyone can see", ".").unwrap_err();
        assert!(
            garbage.starts_with("its uploaded files are not a tar archive"),
            "{garbage}"
        );
        let truncated = check_copy_files(&gzipped[..gzipped.len() / 2], "app").unwrap_err();
        assert!(truncated.contains("not a tar archive"), "{truncated}");
        assert!(
            check_copy_files(&[0u8; 1024], ".").is_err(),
            "an empty archive"
        );
    }

    #[test]
    fn workdirs_resolve_as_cd_does() {
        assert_eq!(resolve("/home/user", "app"), "/home/user/app");
        assert_eq!(resolve("/", "app"), "/app");
        assert_eq!(resolve("/home/user", "/srv"), "/srv");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
