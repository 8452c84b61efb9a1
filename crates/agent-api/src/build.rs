//! Template builds as the control plane asks them of a host: what a build is made of
//! ([`TemplateBuild`], its [`BuildStep`]s, E2B's step types) and the log it streams
//! ([`BuildLog`]), with their forms on the agent's Connect API.

use std::collections::BTreeMap;
use std::time::Duration;

use wrenn_proto::agent as pb;

/// How long a build may take when its caller sets no deadline.
pub const DEFAULT_BUILD_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// The most a build's COPY files may weigh in all (they travel in its request).
pub const MAX_BUILD_FILES_BYTES: usize = 256 << 20;

/// A step's type, as E2B's `TemplateStep.type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// `args`: the command, then the user to run it as (optional).
    Run,
    /// `args`: name, value, name, value… (for the build's later steps and commands).
    Env,
    /// `args`: the directory later steps run in (made if missing).
    Workdir,
    /// `args`: the user later steps run as.
    User,
    /// `args`: source, destination, owner, mode (from the files the client uploaded).
    Copy,
}

impl StepKind {
    /// The kind E2B's name says (`RUN`, `ENV`…), upper case as the SDKs send it.
    pub fn from_name(name: &str) -> Option<StepKind> {
        Some(match name {
            "RUN" => StepKind::Run,
            "ENV" => StepKind::Env,
            "WORKDIR" => StepKind::Workdir,
            "USER" => StepKind::User,
            "COPY" => StepKind::Copy,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            StepKind::Run => "RUN",
            StepKind::Env => "ENV",
            StepKind::Workdir => "WORKDIR",
            StepKind::User => "USER",
            StepKind::Copy => "COPY",
        }
    }
}

/// One step of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildStep {
    pub kind: StepKind,
    pub args: Vec<String>,
    /// COPY: the hash of the uploaded files.
    pub files_hash: Option<String>,
    /// Run even if a cached layer matches.
    pub force: bool,
}

impl BuildStep {
    /// The step as a log line shows it (`RUN pip install numpy`).
    pub fn describe(&self) -> String {
        let mut text = self.kind.name().to_string();
        match self.kind {
            StepKind::Env => {
                for pair in self.args.chunks(2) {
                    text.push_str(&format!(" {}={}", pair[0], pair.get(1).map_or("", |v| v)));
                }
            }
            StepKind::Run => {
                text.push(' ');
                text.push_str(self.args.first().map_or("", |c| c));
                if let Some(user) = self.args.get(1).filter(|u| !u.is_empty()) {
                    text.push_str(&format!(" (as {user})"));
                }
            }
            _ => {
                for arg in self.args.iter().filter(|a| !a.is_empty()) {
                    text.push(' ');
                    text.push_str(arg);
                }
            }
        }
        text
    }

    /// Whether the step's arguments are what its type takes: a message saying what is wrong if
    /// not (`number` is its 1-based place).
    pub fn check(&self, number: usize) -> Result<(), String> {
        let name = self.kind.name();
        let wrong = |what: &str| Err(format!("step {number} ({name}): {what}"));
        let nonempty_first = self.args.first().is_some_and(|a| !a.is_empty());
        match self.kind {
            StepKind::Run if !nonempty_first || self.args.len() > 2 => {
                wrong("takes a command and an optional user")
            }
            StepKind::Env if self.args.is_empty() || !self.args.len().is_multiple_of(2) => {
                wrong("takes name and value pairs")
            }
            StepKind::Env if self.args.chunks(2).any(|pair| !valid_env_name(&pair[0])) => {
                wrong("a variable name must be letters, digits and '_', not starting with a digit")
            }
            StepKind::Workdir | StepKind::User if !nonempty_first || self.args.len() != 1 => {
                wrong("takes one non-empty argument")
            }
            StepKind::Copy if self.args.len() < 2 || self.args.len() > 4 || !nonempty_first => {
                wrong("takes a source, a destination, an owner and a mode")
            }
            StepKind::Copy if self.args[1].is_empty() => wrong("has no destination"),
            StepKind::Copy if self.files_hash.is_none() => {
                wrong("names no uploaded files (filesHash)")
            }
            StepKind::Copy
                if self.args.get(3).is_some_and(|mode| {
                    !mode.is_empty() && u32::from_str_radix(mode, 8).is_err()
                }) =>
            {
                wrong("its mode must be octal (e.g. 0644)")
            }
            _ => Ok(()),
        }
    }
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A registry's image a build starts from (E2B's `fromImage`, with `fromImageRegistry`).
#[derive(Clone, PartialEq, Eq)]
pub struct ImageSource {
    /// `[registry/]repository[:tag][@digest]`, as Docker reads it.
    pub reference: String,
    /// A login for the registry.
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageSource")
            .field("reference", &self.reference)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "(hidden)"))
            .finish()
    }
}

/// A build: a new template from an existing one or from a registry's image, its steps, and the
/// commands its sandboxes start with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateBuild {
    pub template_id: String,
    /// The host's template it starts from; with `from_image`, the template whose kernel and
    /// guest files (envd, init) the image gets.
    pub from_template: String,
    pub from_image: Option<ImageSource>,
    /// Run every step even when the host has a template built of the same (E2B's `force`; a
    /// step's own `force` does it too).
    pub force: bool,
    pub steps: Vec<BuildStep>,
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
    /// The VM's size; the parent's when `None`.
    pub memory_mib: Option<u32>,
    pub vcpus: Option<u32>,
    pub deadline: Duration,
    /// What COPY steps copy: a tar (gzipped or not) for each `files_hash`.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Whether the build's VM may reach public addresses.
    pub allow_internet: bool,
    /// Who may share the build's cache (a team): cached steps and builds are taken only from
    /// builds of the same scope.
    pub cache_scope: String,
}

fn nonempty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

/// A build as the agent's Connect API carries it: an unknown step type is an error naming it.
impl TryFrom<pb::RunTemplateBuildRequest> for TemplateBuild {
    type Error = String;

    fn try_from(request: pb::RunTemplateBuildRequest) -> Result<Self, String> {
        let pb::RunTemplateBuildRequest {
            template_id,
            from_template,
            steps,
            start_cmd,
            ready_cmd,
            memory_mib,
            vcpus,
            deadline_ms,
            files,
            allow_internet,
            from_image,
            registry_username,
            registry_password,
            force,
            cache_scope,
        } = request;
        let steps = steps
            .into_iter()
            .enumerate()
            .map(|(index, step)| {
                let pb::BuildStep {
                    r#type,
                    args,
                    files_hash,
                    force,
                } = step;
                let kind = StepKind::from_name(&r#type).ok_or_else(|| {
                    format!(
                        "step {}: unknown type {type:?} (RUN, COPY, ENV, WORKDIR and USER are known)",
                        index + 1,
                        type = r#type
                    )
                })?;
                Ok(BuildStep {
                    kind,
                    args,
                    files_hash: nonempty(files_hash),
                    force,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(TemplateBuild {
            template_id,
            from_template,
            steps,
            start_cmd: nonempty(start_cmd),
            ready_cmd: nonempty(ready_cmd),
            memory_mib: (memory_mib > 0).then_some(memory_mib),
            vcpus: (vcpus > 0).then_some(vcpus),
            deadline: crate::timeout_from_millis(deadline_ms).unwrap_or(DEFAULT_BUILD_DEADLINE),
            files: files.into_iter().collect(),
            allow_internet,
            force,
            cache_scope,
            from_image: nonempty(from_image).map(|reference| ImageSource {
                reference,
                username: nonempty(registry_username),
                password: nonempty(registry_password),
            }),
        })
    }
}

impl From<TemplateBuild> for pb::RunTemplateBuildRequest {
    fn from(build: TemplateBuild) -> Self {
        let TemplateBuild {
            template_id,
            from_template,
            steps,
            start_cmd,
            ready_cmd,
            memory_mib,
            vcpus,
            deadline,
            files,
            allow_internet,
            from_image,
            force,
            cache_scope,
        } = build;
        let (from_image, registry_username, registry_password) = match from_image {
            Some(image) => (
                image.reference,
                image.username.unwrap_or_default(),
                image.password.unwrap_or_default(),
            ),
            None => Default::default(),
        };
        pb::RunTemplateBuildRequest {
            template_id,
            from_template,
            steps: steps
                .into_iter()
                .map(|step| pb::BuildStep {
                    r#type: step.kind.name().into(),
                    args: step.args,
                    files_hash: step.files_hash.unwrap_or_default(),
                    force: step.force,
                })
                .collect(),
            start_cmd: start_cmd.unwrap_or_default(),
            ready_cmd: ready_cmd.unwrap_or_default(),
            memory_mib: memory_mib.unwrap_or(0),
            vcpus: vcpus.unwrap_or(0),
            deadline_ms: u32::try_from(deadline.as_millis()).unwrap_or(u32::MAX),
            files: files.into_iter().collect(),
            allow_internet,
            from_image,
            registry_username,
            registry_password,
            force,
            cache_scope,
        }
    }
}

/// How much a log line matters, as E2B's build logs grade it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn name(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }

    pub fn from_name(name: &str) -> Option<LogLevel> {
        Some(match name {
            "debug" => LogLevel::Debug,
            "info" => LogLevel::Info,
            "warn" => LogLevel::Warn,
            "error" => LogLevel::Error,
            _ => return None,
        })
    }
}

/// One line of a build's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildLog {
    pub timestamp_ms: i64,
    pub level: LogLevel,
    pub message: String,
    /// The 1-based step it belongs to, `base` or `finalize`.
    pub step: Option<String>,
}

impl BuildLog {
    /// A line stamped now.
    pub fn now(level: LogLevel, step: Option<String>, message: impl Into<String>) -> BuildLog {
        BuildLog {
            timestamp_ms: wrenn_core::now_ms(),
            level,
            message: message.into(),
            step,
        }
    }
}

impl From<BuildLog> for pb::BuildLogEntry {
    fn from(log: BuildLog) -> Self {
        pb::BuildLogEntry {
            timestamp_unix_ms: log.timestamp_ms,
            level: log.level.name().into(),
            message: log.message,
            step: log.step.unwrap_or_default(),
        }
    }
}

impl From<pb::BuildLogEntry> for BuildLog {
    fn from(entry: pb::BuildLogEntry) -> Self {
        BuildLog {
            timestamp_ms: entry.timestamp_unix_ms,
            level: LogLevel::from_name(&entry.level).unwrap_or(LogLevel::Info),
            message: entry.message,
            step: nonempty(entry.step),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(kind: StepKind, args: &[&str]) -> BuildStep {
        BuildStep {
            kind,
            args: args.iter().map(|a| a.to_string()).collect(),
            files_hash: None,
            force: false,
        }
    }

    #[test]
    fn a_build_crosses_the_connect_api_unchanged() {
        let build = TemplateBuild {
            template_id: "t1".into(),
            from_template: "base".into(),
            steps: vec![
                step(StepKind::Run, &["echo hi", "root"]),
                BuildStep {
                    files_hash: Some("abc".into()),
                    force: true,
                    ..step(StepKind::Copy, &["a", "/b", "", "0644"])
                },
            ],
            start_cmd: Some("serve".into()),
            ready_cmd: None,
            memory_mib: Some(768),
            vcpus: None,
            deadline: Duration::from_secs(90),
            files: BTreeMap::from([("abc".into(), b"tar".to_vec())]),
            allow_internet: true,
            force: true,
            cache_scope: "team-a".into(),
            from_image: Some(ImageSource {
                reference: "localhost:5000/app:v1".into(),
                username: Some("ci".into()),
                password: Some("secret".into()),
            }),
        };
        assert!(
            !format!("{build:?}").contains("secret"),
            "the password is not in Debug"
        );
        let request = pb::RunTemplateBuildRequest::from(build.clone());
        assert_eq!(TemplateBuild::try_from(request).unwrap(), build);

        let mut unknown = pb::RunTemplateBuildRequest::from(build);
        unknown.steps[1].r#type = "ADD".into();
        let error = TemplateBuild::try_from(unknown).unwrap_err();
        assert!(error.contains("step 2: unknown type \"ADD\""), "{error}");
    }

    #[test]
    fn steps_are_checked_by_their_type() {
        assert!(step(StepKind::Run, &["ls"]).check(1).is_ok());
        assert!(step(StepKind::Env, &["A", "1", "B_2", ""]).check(1).is_ok());
        for (bad, said) in [
            (step(StepKind::Run, &[]), "step 3 (RUN): takes a command"),
            (step(StepKind::Run, &["", "root"]), "takes a command"),
            (step(StepKind::Env, &["A"]), "name and value pairs"),
            (step(StepKind::Env, &["1A", "x"]), "a variable name"),
            (step(StepKind::Workdir, &[]), "one non-empty argument"),
            (step(StepKind::User, &["a", "b"]), "one non-empty argument"),
            (step(StepKind::Copy, &["a"]), "a source, a destination"),
            (
                step(StepKind::Copy, &["a", "/b"]),
                "names no uploaded files",
            ),
        ] {
            let error = bad.check(3).unwrap_err();
            assert!(error.contains(said), "{error}");
        }
        assert_eq!(
            step(StepKind::Env, &["A", "1", "B", "2"]).describe(),
            "ENV A=1 B=2"
        );
        assert_eq!(
            step(StepKind::Run, &["make", "root"]).describe(),
            "RUN make (as root)"
        );
    }
}
