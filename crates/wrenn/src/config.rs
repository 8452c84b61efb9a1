//! One layered configuration for every command: defaults, then a TOML file, then the
//! environment, then flags, each above the one before.
//!
//! The file is `--config FILE`, else `WRENN_CONFIG`, else `/etc/wrenn/wrenn.toml` when it
//! exists. Its sections are the commands (`[up]`, `[server]`, `[agent.serve]`, and `[cli]` for
//! the settings every client command shares: `api-url`, `api-key-file`…, and a section named
//! after a client command, `[sandbox]`, for its own), its keys the commands' flags by their
//! long names (`api-listen = "0.0.0.0:3000"`, `quota-running = 20`, `no-internet = true`,
//! lists for repeatable flags). Before the command line is parsed, [`layer`] reads the section
//! of the command being run, checks every key against that command's flags and every value with
//! the flag's own parser, and puts them on the command line ahead of the user's flags, leaving
//! out those the environment or the command line already set; so clap's precedence (flag, then
//! environment, then default) with the file's values as flags that a flag or a variable
//! overrides. An unknown key, a bad value or a malformed file is an error naming the file, the
//! line and the setting. `wrenn config show COMMAND…` prints the effective settings of a
//! command, where each came from, secrets masked ([`show`]).

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::CommandFactory;

/// Where the configuration is read from when neither `--config` nor `WRENN_CONFIG` names it.
pub const DEFAULT_PATH: &str = "/etc/wrenn/wrenn.toml";

/// The section of settings every client command shares.
const CLIENT_SECTION: &str = "cli";

/// A command line with the configuration file's settings in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layered {
    /// The command line to parse.
    pub args: Vec<OsString>,
    /// The file read, if any.
    pub file: Option<PathBuf>,
    /// The flags (long names) the file set.
    pub from_file: BTreeSet<String>,
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not valid TOML: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}:{line}: {setting}: {reason}", path.display())]
    Setting {
        path: PathBuf,
        line: usize,
        setting: String,
        reason: String,
    },
}

/// `--config FILE` or `--config=FILE` taken out of `args`, else `WRENN_CONFIG`, else
/// [`DEFAULT_PATH`] when it exists.
fn config_path(args: &mut Vec<OsString>, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let mut found = None;
    let mut index = 1;
    while index < args.len() {
        let arg = args[index].to_string_lossy().into_owned();
        if arg == "--" {
            break;
        }
        if arg == "--config" && index + 1 < args.len() {
            found = Some(PathBuf::from(args.remove(index + 1)));
            args.remove(index);
            continue;
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            found = Some(PathBuf::from(path));
            args.remove(index);
            continue;
        }
        index += 1;
    }
    found
        .or_else(|| {
            env("WRENN_CONFIG")
                .filter(|path| !path.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| {
            Some(PathBuf::from(DEFAULT_PATH)).filter(|path| path.try_exists().unwrap_or(true))
        })
}

/// The command line's definition with its global flags given to every subcommand.
fn built_command() -> clap::Command {
    let mut command = crate::Cli::command();
    command.build();
    command
}

/// The subcommands `args` names, in order (`["agent", "serve"]`), and where its flags start.
fn command_path(command: &clap::Command, args: &[OsString]) -> (Vec<String>, usize) {
    let mut names = Vec::new();
    let mut current = command;
    let mut index = 1;
    while index < args.len() {
        let word = args[index].to_string_lossy();
        if word.starts_with('-') {
            break;
        }
        match current.find_subcommand(word.as_ref()) {
            Some(sub) => {
                names.push(sub.get_name().to_string());
                current = sub;
                index += 1;
            }
            None => break,
        }
    }
    (names, index)
}

/// The command `names` leads to.
fn subcommand<'a>(command: &'a clap::Command, names: &[String]) -> &'a clap::Command {
    names.iter().fold(command, |current, name| {
        current.find_subcommand(name).unwrap_or(current)
    })
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A TOML value as the flag's words: one for a scalar, one each for an array's items.
fn words_of(value: &toml_edit::Value) -> Result<Vec<String>, String> {
    let scalar = |value: &toml_edit::Value| -> Result<String, String> {
        match value {
            toml_edit::Value::String(text) => Ok(text.value().clone()),
            toml_edit::Value::Integer(number) => Ok(number.value().to_string()),
            toml_edit::Value::Float(number) => Ok(number.value().to_string()),
            toml_edit::Value::Boolean(flag) => Ok(flag.value().to_string()),
            toml_edit::Value::Datetime(at) => Ok(at.value().to_string()),
            toml_edit::Value::Array(_) | toml_edit::Value::InlineTable(_) => {
                Err("a list may hold strings, numbers and booleans only".into())
            }
        }
    };
    match value {
        toml_edit::Value::Array(items) => items.iter().map(scalar).collect(),
        toml_edit::Value::InlineTable(_) => Err("a table is not a setting's value".into()),
        other => scalar(other).map(|word| vec![word]),
    }
}

/// Whether an argument takes no value (a switch such as `--no-internet`).
fn is_switch(arg: &clap::Arg) -> bool {
    matches!(
        arg.get_action(),
        clap::ArgAction::SetTrue | clap::ArgAction::SetFalse | clap::ArgAction::Count
    )
}

/// Whether the user's flags (from `start`) give `--long`.
fn given(args: &[OsString], start: usize, long: &str) -> bool {
    let flag = format!("--{long}");
    let with_value = format!("--{long}=");
    args[start..].iter().any(|arg| {
        let arg = arg.to_string_lossy();
        arg == flag || arg.starts_with(&with_value)
    })
}

/// `args` with the configuration file's settings of the command they run put in (see the
/// module's documentation); `env` reads the environment.
pub fn layer(
    mut args: Vec<OsString>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Layered, ConfigError> {
    let Some(path) = config_path(&mut args, env) else {
        return Ok(Layered {
            args,
            ..Layered::default()
        });
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let document =
        toml_edit::Document::parse(text.as_str()).map_err(|error| ConfigError::Syntax {
            path: path.clone(),
            message: error.to_string().trim().replace('\n', " "),
        })?;
    let root = document.as_table();
    let command = built_command();
    let (names, flags_at) = command_path(&command, &args);
    let leaf = subcommand(&command, &names);
    let setting_error = |span: Option<std::ops::Range<usize>>, setting: String, reason: String| {
        ConfigError::Setting {
            path: path.clone(),
            line: span.map_or(1, |span| line_of(&text, span.start)),
            setting,
            reason,
        }
    };
    // Every section must name a command (a typo in one would otherwise go unnoticed).
    check_sections(&command, root, &setting_error)?;
    // The sections that apply, each above the one before: the client commands' shared one,
    // then each command's on the way to the one run (`[sandbox]`, `[sandbox.list]`). Only the
    // last is strict: the others hold settings of some of their subcommands.
    let mut sections: Vec<(String, &toml_edit::Table, bool)> = Vec::new();
    let is_client = leaf
        .get_arguments()
        .any(|arg| arg.get_long() == Some("api-url"));
    if is_client && let Some(shared) = root.get(CLIENT_SECTION).and_then(|item| item.as_table()) {
        sections.push((CLIENT_SECTION.to_string(), shared, false));
    }
    let mut table = Some(root);
    for (depth, name) in names.iter().enumerate() {
        table = table
            .and_then(|table| table.get(name))
            .and_then(|item| item.as_table());
        if let Some(own) = table {
            let strict = depth + 1 == names.len();
            sections.push((names[..=depth].join("."), own, strict));
        }
    }
    // A later section's setting replaces an earlier one's: read them from the last.
    sections.reverse();
    let mut inserted: Vec<OsString> = Vec::new();
    let mut from_file = BTreeSet::new();
    for (section, table, strict) in sections {
        for (key, item) in table.iter() {
            let span = table.key(key).and_then(toml_edit::Key::span);
            let setting = format!("{section}.{key}");
            if item.is_table() {
                // A nested command's own section (`[agent.serve]` under `[agent]`).
                continue;
            }
            let Some(value) = item.as_value() else {
                continue;
            };
            let Some(arg) = leaf.get_arguments().find(|arg| arg.get_long() == Some(key)) else {
                if !strict {
                    // A shared setting this command has no flag for.
                    continue;
                }
                return Err(setting_error(
                    span,
                    setting,
                    format!("wrenn {} has no --{key}", names.join(" ")),
                ));
            };
            let words = words_of(value)
                .map_err(|reason| setting_error(span.clone(), setting.clone(), reason))?;
            // The environment and the command line are above the file.
            let in_env = arg
                .get_env()
                .and_then(OsStr::to_str)
                .is_some_and(|name| env(name).is_some());
            if in_env || given(&args, flags_at, key) || from_file.contains(key) {
                continue;
            }
            if is_switch(arg) {
                match words.as_slice() {
                    [word] if word == "true" => inserted.push(format!("--{key}").into()),
                    [word] if word == "false" => {}
                    _ => {
                        return Err(setting_error(
                            span,
                            setting,
                            format!("--{key} is a switch: give true or false"),
                        ));
                    }
                }
                from_file.insert(key.to_string());
                continue;
            }
            let repeatable = matches!(arg.get_action(), clap::ArgAction::Append);
            if words.len() > 1 && !repeatable {
                return Err(setting_error(
                    span,
                    setting,
                    format!("--{key} takes one value, not a list"),
                ));
            }
            for word in &words {
                if let Some(error) = bad_value(leaf, key, word) {
                    return Err(setting_error(span, setting, clap_reason(&error, word)));
                }
                // One word, `--key=value`: a value that starts with `-` stays a value.
                inserted.push(format!("--{key}={word}").into());
            }
            from_file.insert(key.to_string());
        }
    }
    let mut layered: Vec<OsString> = args[..flags_at].to_vec();
    layered.extend(inserted);
    layered.extend(args[flags_at..].iter().cloned());
    Ok(Layered {
        args: layered,
        file: Some(path),
        from_file,
    })
}

/// The sections of `root` that name no command.
fn check_sections(
    command: &clap::Command,
    root: &toml_edit::Table,
    error: &dyn Fn(Option<std::ops::Range<usize>>, String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    fn walk(
        command: &clap::Command,
        table: &toml_edit::Table,
        prefix: &str,
        error: &dyn Fn(Option<std::ops::Range<usize>>, String, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        for (key, item) in table.iter() {
            let Some(inner) = item.as_table() else {
                if prefix.is_empty() {
                    return Err(error(
                        table.key(key).and_then(toml_edit::Key::span),
                        key.to_string(),
                        "a setting outside any section: put it under its command's, e.g. [server]"
                            .into(),
                    ));
                }
                continue;
            };
            let name = if prefix.is_empty() {
                key.to_string()
            } else {
                format!("{prefix}.{key}")
            };
            if prefix.is_empty() && key == CLIENT_SECTION {
                continue;
            }
            match command.find_subcommand(key) {
                Some(sub) => walk(sub, inner, &name, error)?,
                None => {
                    return Err(error(
                        inner.span().or_else(|| table.key(key).and_then(toml_edit::Key::span)),
                        name,
                        "no such command: sections are commands ([up], [server], [agent.serve], [cli], [sandbox]…)".into(),
                    ));
                }
            }
        }
        Ok(())
    }
    walk(command, root, "", error)
}

/// What the flag's own parser says of `word` as the value of `--long` of `command`, when it
/// refuses it (the command's other requirements aside).
fn bad_value(command: &clap::Command, long: &str, word: &str) -> Option<clap::Error> {
    let parsed = command
        .clone()
        .no_binary_name(true)
        .try_get_matches_from([format!("--{long}={word}")]);
    match parsed {
        Err(error)
            if matches!(
                error.kind(),
                clap::error::ErrorKind::InvalidValue
                    | clap::error::ErrorKind::ValueValidation
                    | clap::error::ErrorKind::InvalidUtf8
            ) =>
        {
            Some(error)
        }
        _ => None,
    }
}

/// What clap says of a bad value, in a line.
fn clap_reason(error: &clap::Error, word: &str) -> String {
    let rendered = error.to_string();
    let first = rendered
        .lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("invalid value")
        .trim()
        .trim_start_matches("error: ")
        .to_string();
    if first.contains(word) {
        first
    } else {
        format!("{word:?}: {first}")
    }
}

/// Whether a flag's value is a secret, shown masked: a flag clap hides the variable of, or one
/// named a token, secret, password or key.
fn is_secret(arg: &clap::Arg) -> bool {
    let long = arg.get_long().unwrap_or_default();
    arg.is_hide_env_values_set()
        || ["token", "secret", "password", "api-key", "database-url"]
            .iter()
            .any(|word| long.ends_with(word))
}

/// One effective setting.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Setting {
    pub name: String,
    pub value: String,
    /// `flag`, `environment (NAME)`, `file`, `default`, or `unset`.
    pub source: String,
}

/// The effective settings of the command `command` (its words and flags, as it would be run),
/// with the configuration `layered` found, secrets masked.
pub fn effective(
    command: &[String],
    config_file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Vec<Setting>, Option<PathBuf>), anyhow::Error> {
    let mut args: Vec<OsString> = vec!["wrenn".into()];
    if let Some(path) = config_file {
        args.push("--config".into());
        args.push(path.into());
    }
    args.extend(command.iter().map(OsString::from));
    let layered = layer(args, env)?;
    let cli = built_command();
    let (names, _) = command_path(&cli, &layered.args);
    anyhow::ensure!(
        !names.is_empty(),
        "name a command: wrenn config show server (or up, agent serve, sandbox list…)"
    );
    let matches = cli.clone().try_get_matches_from(&layered.args)?;
    let mut leaf_matches = &matches;
    for name in &names {
        if let Some(sub) = leaf_matches.subcommand_matches(name) {
            leaf_matches = sub;
        }
    }
    let leaf = subcommand(&cli, &names);
    let mut settings = Vec::new();
    for arg in leaf.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version" | "config") {
            continue;
        }
        let id = arg.get_id().as_str();
        let raw: Vec<String> = leaf_matches
            .get_raw(id)
            .map(|values| {
                values
                    .map(|value| value.to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let source = match leaf_matches.value_source(id) {
            Some(clap::parser::ValueSource::CommandLine) if layered.from_file.contains(long) => {
                "file".to_string()
            }
            Some(clap::parser::ValueSource::CommandLine) => "flag".into(),
            Some(clap::parser::ValueSource::EnvVariable) => format!(
                "environment ({})",
                arg.get_env()
                    .map(|name| name.to_string_lossy())
                    .unwrap_or_default()
            ),
            Some(clap::parser::ValueSource::DefaultValue) => "default".into(),
            _ => "unset".into(),
        };
        let value = if raw.is_empty() {
            String::new()
        } else if is_secret(arg) {
            "********".into()
        } else {
            raw.join(", ")
        };
        settings.push(Setting {
            name: long.to_string(),
            value,
            source,
        });
    }
    settings.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((settings, layered.file))
}

/// `wrenn config show COMMAND…`: the table (or JSON) of [`effective`].
pub fn show(command: &[String], config_file: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let env = |name: &str| std::env::var(name).ok();
    let (settings, file) = effective(command, config_file, &env)?;
    if json {
        return crate::output::print_json(&serde_json::json!({
            "file": file,
            "settings": settings,
        }));
    }
    match &file {
        Some(file) => println!("configuration file: {}", file.display()),
        None => println!("configuration file: none ({DEFAULT_PATH} does not exist)"),
    }
    let rows = settings
        .into_iter()
        .map(|setting| vec![setting.name, setting.value, setting.source])
        .collect();
    println!(
        "{}",
        crate::output::table(&["setting", "value", "from"], rows)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("wrenn.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn args(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn strings(layered: &Layered) -> Vec<String> {
        layered
            .args
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_files_settings_come_before_the_users_flags_which_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "[server]\napi-listen = \"0.0.0.0:3000\"\nquota-running = 7\nno-internet = true\n",
        );
        let config = path.to_string_lossy().into_owned();
        let layered = layer(
            args(&[
                "wrenn",
                "--config",
                &config,
                "server",
                "--quota-running",
                "9",
            ]),
            &no_env,
        )
        .unwrap();
        assert_eq!(
            strings(&layered),
            [
                "wrenn",
                "server",
                "--api-listen=0.0.0.0:3000",
                "--no-internet",
                "--quota-running",
                "9"
            ]
        );
        let (settings, _) = effective(
            &["server".into(), "--quota-running".into(), "9".into()],
            Some(&path),
            &no_env,
        )
        .unwrap();
        let find = |name: &str| settings.iter().find(|s| s.name == name).unwrap().clone();
        assert_eq!(find("quota-running").value, "9");
        assert_eq!(find("quota-running").source, "flag");
        assert_eq!(find("api-listen").value, "0.0.0.0:3000");
        assert_eq!(find("api-listen").source, "file");
        assert_eq!(find("quota-paused").source, "default");
    }

    #[test]
    fn a_setting_the_environment_gives_is_left_to_it_and_secrets_are_masked() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "[server]\njoin-token = \"from-the-file\"\nmetrics-token = \"m\"\n",
        );
        let config = path.to_string_lossy().into_owned();
        let env = |name: &str| (name == "WRENN_JOIN_TOKEN").then(|| "from-the-env".to_string());
        let layered = layer(args(&["wrenn", "--config", &config, "server"]), &env).unwrap();
        assert_eq!(strings(&layered), ["wrenn", "server", "--metrics-token=m"]);
        let (settings, file) = effective(&["server".into()], Some(&path), &no_env).unwrap();
        assert_eq!(file.as_deref(), Some(path.as_path()));
        for name in ["join-token", "metrics-token"] {
            let secret = settings.iter().find(|s| s.name == name).unwrap();
            assert_eq!(
                (secret.value.as_str(), secret.source.as_str()),
                ("********", "file")
            );
        }
    }

    #[test]
    fn a_bad_value_is_reported_with_its_file_line_and_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "# the fleet's control plane\n[server]\napi-listen = \"0.0.0.0:3000\"\nquota-running = \"many\"\n",
        );
        let config = path.to_string_lossy().into_owned();
        let error = layer(args(&["wrenn", "--config", &config, "server"]), &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with(&format!("{config}:4: server.quota-running: ")),
            "{error}"
        );
        assert!(error.contains("many"), "{error}");
    }

    #[test]
    fn unknown_settings_sections_and_malformed_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "[server]\nquota-runing = 3\n",
                ":2: server.quota-runing: wrenn server has no --quota-runing",
            ),
            ("[servr]\nquota-running = 3\n", ":1: servr: no such command"),
            (
                "quota-running = 3\n",
                ":1: quota-running: a setting outside any section",
            ),
            (
                "[server]\nno-internet = \"yes\"\n",
                ":2: server.no-internet: --no-internet is a switch",
            ),
            (
                "[server]\napi-listen = [\"a\", \"b\"]\n",
                ":2: server.api-listen: --api-listen takes one value",
            ),
            (
                "[server]\nquota-running = -3\n",
                ":2: server.quota-running: invalid value '-3'",
            ),
            ("[server\n", "not valid TOML"),
        ];
        for (text, expected) in cases {
            let path = write(dir.path(), text);
            let config = path.to_string_lossy().into_owned();
            let error = layer(args(&["wrenn", "--config", &config, "server"]), &no_env)
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn client_commands_share_the_cli_section_and_agents_have_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "[cli]\napi-url = \"http://cp:3000\"\n\n[agent.serve]\nhost-name = \"host-2\"\n\n[sandbox]\njson = true\n",
        );
        let config = path.to_string_lossy().into_owned();
        let listed = layer(
            args(&["wrenn", "--config", &config, "sandbox", "list"]),
            &no_env,
        )
        .unwrap();
        assert!(strings(&listed).contains(&"--api-url=http://cp:3000".to_string()));
        let agent = layer(
            args(&["wrenn", "--config", &config, "agent", "serve"]),
            &no_env,
        )
        .unwrap();
        assert_eq!(
            strings(&agent),
            ["wrenn", "agent", "serve", "--host-name=host-2"]
        );
        // WRENN_CONFIG names the file when --config does not.
        let env = |name: &str| (name == "WRENN_CONFIG").then(|| config.clone());
        let by_env = layer(args(&["wrenn", "agent", "serve"]), &env).unwrap();
        assert_eq!(by_env.args, agent.args);
    }
}
