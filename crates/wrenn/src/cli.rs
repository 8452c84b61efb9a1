//! `wrenn sandbox …`, `wrenn template list` and `wrenn host list`: the CLI over a control plane.
//! Lifecycle calls go to its REST API (the E2B routes, `X-API-KEY`); `exec`, `shell` and `cp`
//! reach the sandbox's envd through the edge proxy (routing by the `E2b-Sandbox-*` headers), as
//! the SDKs do. Output is a table by default and JSON with `--json`; `exec` and `shell` exit with
//! the command's exit code.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use http::Method;
use serde_json::{Value, json};
use wrenn_connect::Codec;
use wrenn_connect::client::{ConnectClient, HttpVersion};
use wrenn_proto::process as pb;

/// Where the control plane is, and who is asking.
#[derive(Debug, Args, Clone)]
pub struct Connection {
    /// The control plane's REST API.
    #[arg(
        long,
        global = true,
        env = "WRENN_API_URL",
        default_value = "http://127.0.0.1:3000"
    )]
    api_url: String,
    /// The edge proxy (for exec, shell and cp).
    #[arg(
        long,
        global = true,
        env = "WRENN_SANDBOX_URL",
        default_value = "http://127.0.0.1:3001"
    )]
    sandbox_url: String,
    /// An API key [default: $E2B_API_KEY, else the key `wrenn up` wrote to
    /// /var/lib/wrenn/cp/initial-api-key].
    #[arg(long, global = true, env = "WRENN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// A file holding the API key.
    #[arg(long, global = true, env = "WRENN_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct SandboxArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: SandboxCommand,
}

#[derive(Debug, Args)]
pub struct TemplateArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: TemplateCommand,
}

#[derive(Debug, Args)]
pub struct HostArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: HostCommand,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox from a template.
    Create {
        #[arg(default_value = "base")]
        template: String,
        /// Seconds until it is killed (or paused with --auto-pause).
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// KEY=VALUE metadata (repeatable).
        #[arg(long = "metadata", value_name = "KEY=VALUE")]
        metadata: Vec<String>,
        /// KEY=VALUE environment variables (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Require an access token for envd (returned, and used by exec, shell and cp).
        #[arg(long)]
        secure: bool,
        /// Pause instead of kill on timeout.
        #[arg(long)]
        auto_pause: bool,
    },
    /// List sandboxes (every page).
    List {
        /// running, paused or both (comma-separated).
        #[arg(long, default_value = "running,paused")]
        state: String,
        /// KEY=VALUE metadata every listed sandbox has (repeatable).
        #[arg(long = "metadata", value_name = "KEY=VALUE")]
        metadata: Vec<String>,
    },
    /// Show one sandbox.
    Info { id: String },
    /// Run a command in a sandbox (through bash -l, like the SDKs); exits with its code.
    Exec {
        id: String,
        /// The command and its arguments (after `--`).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
        #[arg(long, default_value = "user")]
        user: String,
        #[arg(long)]
        cwd: Option<String>,
        /// KEY=VALUE environment variables (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
    },
    /// An interactive shell in a sandbox, on a PTY.
    Shell {
        id: String,
        #[arg(long, default_value = "user")]
        user: String,
        #[arg(long, default_value = "/bin/bash")]
        shell: String,
    },
    /// Copy a file in or out: `cp ./local ID:/path` or `cp ID:/path ./local`.
    Cp {
        source: String,
        destination: String,
        #[arg(long, default_value = "user")]
        user: String,
    },
    /// Pause a running sandbox (memory, processes and files kept).
    Pause { id: String },
    /// Resume a paused sandbox.
    Resume {
        id: String,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Kill a sandbox.
    Kill { id: String },
    /// Set a sandbox's timeout, from now.
    Timeout { id: String, seconds: u64 },
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// The templates sandboxes can be created from.
    List,
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// The fleet's hosts, their state and capacity.
    List,
    /// Forget a host that is down, for good, with its sandboxes: a new agent may then take
    /// its name (the old one's identity no longer counts).
    Forget { name: String },
}

const DEFAULT_KEY_FILE: &str = crate::paths::INITIAL_KEY_FILE;

impl Connection {
    fn key(&self) -> anyhow::Result<String> {
        if let Some(key) = crate::secrets::resolve(
            "--api-key",
            self.api_key.clone(),
            self.api_key_file.as_deref(),
        )? {
            return Ok(key);
        }
        if let Ok(key) = std::env::var("E2B_API_KEY")
            && !key.is_empty()
        {
            return Ok(key);
        }
        std::fs::read_to_string(DEFAULT_KEY_FILE)
            .map(|key| key.trim().to_string())
            .map_err(|_| {
                anyhow::anyhow!(
                    "no API key: pass --api-key or --api-key-file, set WRENN_API_KEY or E2B_API_KEY, or run where `wrenn up` wrote {DEFAULT_KEY_FILE}"
                )
            })
    }

    /// A REST call: the JSON answer of a 2xx, else an error with the API's message.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(Value, http::HeaderMap)> {
        let key = self.key()?;
        let url = format!("{}{path}", self.api_url.trim_end_matches('/'));
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let response = wrenn_connect::plain::call(
            method.clone(),
            &url,
            &[("x-api-key", &key), ("content-type", "application/json")],
            body,
            Duration::from_secs(300),
        )
        .await?;
        let value: Value = if response.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&response.body)
                .unwrap_or_else(|_| Value::String(response.text()))
        };
        if !response.status.is_success() {
            let message = value["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| response.text());
            bail!("{method} {path}: {} ({message})", response.status);
        }
        Ok((value, response.headers))
    }

    fn proxy_authority(&self) -> anyhow::Result<String> {
        let url = self.sandbox_url.trim_end_matches('/');
        url.strip_prefix("http://")
            .map(str::to_string)
            .with_context(|| format!("--sandbox-url {url:?} must be http://host:port"))
    }

    /// envd's access token of a sandbox, if it has one.
    async fn access_token(&self, id: &str) -> anyhow::Result<Option<String>> {
        let (detail, _) = self
            .call(Method::GET, &format!("/sandboxes/{id}"), None)
            .await?;
        Ok(detail["envdAccessToken"].as_str().map(str::to_string))
    }

    /// A Connect client for a sandbox's envd, through the proxy.
    async fn envd(&self, id: &str) -> anyhow::Result<(ConnectClient, http::HeaderMap)> {
        let token = self.access_token(id).await?;
        let client = ConnectClient::new(
            format!("http://{}", self.proxy_authority()?),
            HttpVersion::Http1,
            Codec::Json,
        )
        .with_header("e2b-sandbox-id", id)
        .with_header("e2b-sandbox-port", &wrenn_proto::ENVD_PORT.to_string());
        let mut headers = http::HeaderMap::new();
        if let Some(token) = token {
            headers.insert("x-access-token", token.parse()?);
        }
        Ok((client, headers))
    }
}

fn pairs(values: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    values
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{what} {pair:?} is not KEY=VALUE"))
        })
        .collect()
}

fn basic_user(user: &str) -> anyhow::Result<http::HeaderValue> {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
    Ok(format!("Basic {encoded}").parse()?)
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    table
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn metadata_text(value: &Value) -> String {
    value
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", text(v)))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn print_sandboxes(sandboxes: &[Value], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(sandboxes)?);
        return Ok(());
    }
    let rows = sandboxes
        .iter()
        .map(|s| {
            vec![
                text(&s["sandboxID"]),
                text(&s["templateID"]),
                text(&s["state"]),
                text(&s["startedAt"]),
                text(&s["endAt"]),
                format!("{} / {} MiB", text(&s["cpuCount"]), text(&s["memoryMB"])),
                metadata_text(&s["metadata"]),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "id",
                "template",
                "state",
                "started",
                "ends",
                "cpus / memory",
                "metadata"
            ],
            rows
        )
    );
    Ok(())
}

/// Shell-quotes one word for bash.
fn quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

pub async fn sandbox(args: SandboxArgs) -> anyhow::Result<()> {
    let SandboxArgs {
        connection,
        command,
    } = args;
    let json = connection.json;
    match command {
        SandboxCommand::Create {
            template,
            timeout,
            metadata,
            env,
            secure,
            auto_pause,
        } => {
            let body = json!({
                "templateID": template,
                "timeout": timeout,
                "metadata": pairs(&metadata, "metadata")?,
                "envVars": pairs(&env, "--env")?,
                "secure": secure,
                "autoPause": auto_pause,
            });
            let (created, _) = connection
                .call(Method::POST, "/sandboxes", Some(body))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&created)?);
            } else {
                let mut rows = vec![
                    vec!["id".to_string(), text(&created["sandboxID"])],
                    vec!["template".to_string(), text(&created["templateID"])],
                    vec!["envd".to_string(), text(&created["envdVersion"])],
                ];
                if let Some(token) = created["envdAccessToken"].as_str() {
                    rows.push(vec!["access token".to_string(), token.to_string()]);
                }
                println!("{}", table(&["sandbox", ""], rows));
            }
        }
        SandboxCommand::List { state, metadata } => {
            let mut query = format!("state={}", percent_encode(&state));
            let filter = pairs(&metadata, "metadata")?;
            if !filter.is_empty() {
                let joined = filter
                    .iter()
                    .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
                    .collect::<Vec<_>>()
                    .join("&");
                query.push_str(&format!("&metadata={}", percent_encode(&joined)));
            }
            let mut all = Vec::new();
            let mut next: Option<String> = None;
            loop {
                let path = match &next {
                    Some(token) => format!("/v2/sandboxes?{query}&limit=100&nextToken={token}"),
                    None => format!("/v2/sandboxes?{query}&limit=100"),
                };
                let (page, headers) = connection.call(Method::GET, &path, None).await?;
                all.extend(page.as_array().cloned().unwrap_or_default());
                next = headers
                    .get("x-next-token")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if next.is_none() {
                    break;
                }
            }
            print_sandboxes(&all, json)?;
        }
        SandboxCommand::Info { id } => {
            let (detail, _) = connection
                .call(Method::GET, &format!("/sandboxes/{id}"), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&detail)?);
            } else {
                let rows = detail
                    .as_object()
                    .map(|fields| {
                        fields
                            .iter()
                            .map(|(k, v)| {
                                let shown = if k == "metadata" {
                                    metadata_text(v)
                                } else {
                                    text(v)
                                };
                                vec![k.clone(), shown]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                println!("{}", table(&["field", "value"], rows));
            }
        }
        SandboxCommand::Exec {
            id,
            command,
            user,
            cwd,
            env,
        } => {
            let script = command
                .iter()
                .map(|w| quote(w))
                .collect::<Vec<_>>()
                .join(" ");
            let code = exec(&connection, &id, &user, cwd, pairs(&env, "--env")?, &script).await?;
            std::io::stdout().flush()?;
            std::process::exit(code);
        }
        SandboxCommand::Shell { id, user, shell } => {
            let code = shell_session(&connection, &id, &user, &shell).await?;
            std::process::exit(code);
        }
        SandboxCommand::Cp {
            source,
            destination,
            user,
        } => {
            copy(&connection, &source, &destination, &user).await?;
        }
        SandboxCommand::Pause { id } => {
            connection
                .call(Method::POST, &format!("/sandboxes/{id}/pause"), None)
                .await?;
            report(json, &id, "paused");
        }
        SandboxCommand::Resume { id, timeout } => {
            connection
                .call(
                    Method::POST,
                    &format!("/sandboxes/{id}/resume"),
                    Some(json!({ "timeout": timeout })),
                )
                .await?;
            report(json, &id, "running");
        }
        SandboxCommand::Kill { id } => {
            connection
                .call(Method::DELETE, &format!("/sandboxes/{id}"), None)
                .await?;
            report(json, &id, "killed");
        }
        SandboxCommand::Timeout { id, seconds } => {
            connection
                .call(
                    Method::POST,
                    &format!("/sandboxes/{id}/timeout"),
                    Some(json!({ "timeout": seconds })),
                )
                .await?;
            if json {
                println!("{}", json!({ "sandboxID": id, "timeout": seconds }));
            } else {
                println!("{id}: ends in {seconds} s");
            }
        }
    }
    Ok(())
}

fn report(json: bool, id: &str, state: &str) {
    if json {
        println!("{}", json!({ "sandboxID": id, "state": state }));
    } else {
        println!("{id}: {state}");
    }
}

fn percent_encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Runs `script` with `bash -l -c`, streaming its output: its exit code.
async fn exec(
    connection: &Connection,
    id: &str,
    user: &str,
    cwd: Option<String>,
    envs: BTreeMap<String, String>,
    script: &str,
) -> anyhow::Result<i32> {
    let (envd, mut headers) = connection.envd(id).await?;
    headers.insert("authorization", basic_user(user)?);
    let request = pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), script.into()],
            envs: envs.into_iter().collect(),
            cwd,
        }),
        stdin: Some(false),
        ..Default::default()
    };
    let mut stream = envd
        .call_streaming::<wrenn_proto::process::process::Start>(&request, &headers)
        .await
        .with_context(|| format!("starting the command in {id}"))?;
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    while let Some(message) = stream.message().await {
        use pb::process_event::{Event, data_event::Output};
        match message?.event.and_then(|e| e.event) {
            Some(Event::Data(data)) => match data.output {
                Some(Output::Stdout(bytes)) | Some(Output::Pty(bytes)) => {
                    stdout.write_all(&bytes)?;
                    stdout.flush()?;
                }
                Some(Output::Stderr(bytes)) => {
                    stderr.write_all(&bytes)?;
                    stderr.flush()?;
                }
                None => {}
            },
            Some(Event::End(end)) => {
                // A plain non-zero exit is the exit code's to tell; anything else is said.
                if !end.exited {
                    let why = end.error.filter(|e| !e.is_empty()).unwrap_or(end.status);
                    eprintln!("wrenn: the command did not exit normally: {why}");
                }
                return Ok(end.exit_code);
            }
            _ => {}
        }
    }
    bail!("the command's stream ended without an exit code (the sandbox went away?)")
}

/// The terminal's size, if stdin is one.
fn terminal_size() -> Option<(u16, u16)> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the valid, exclusively borrowed `size`;
    // fd 0 is only read.
    let result = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut size) };
    (result == 0 && size.ws_col > 0).then_some((size.ws_col, size.ws_row))
}

/// Puts the terminal in raw mode until dropped.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter() -> RawMode {
        use nix::sys::termios;
        let stdin = std::io::stdin();
        let Ok(original) = termios::tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = original.clone();
        termios::cfmakeraw(&mut raw);
        if termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw).is_err() {
            return RawMode(None);
        }
        RawMode(Some(original))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(original) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                original,
            );
        }
    }
}

fn pty_of(size: (u16, u16)) -> pb::Pty {
    pb::Pty {
        size: Some(pb::pty::Size {
            cols: u32::from(size.0),
            rows: u32::from(size.1),
        }),
    }
}

/// An interactive shell on a PTY: keys go in with SendInput, the terminal's size follows
/// SIGWINCH. Without a terminal, stdin is sent as typed and its end as Ctrl-D.
async fn shell_session(
    connection: &Connection,
    id: &str,
    user: &str,
    shell: &str,
) -> anyhow::Result<i32> {
    use std::io::IsTerminal;
    use tokio::io::AsyncReadExt;
    let (envd, mut headers) = connection.envd(id).await?;
    headers.insert("authorization", basic_user(user)?);
    let interactive = std::io::stdin().is_terminal();
    let size = terminal_size().unwrap_or((80, 24));
    let request = pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: shell.into(),
            args: vec!["-l".into()],
            envs: [(
                "TERM".to_string(),
                std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
            )]
            .into(),
            cwd: None,
        }),
        pty: Some(pty_of(size)),
        ..Default::default()
    };
    let mut stream = envd
        .call_streaming::<wrenn_proto::process::process::Start>(&request, &headers)
        .await
        .with_context(|| format!("starting a shell in {id}"))?;
    use pb::process_event::{Event, data_event::Output};
    let pid = loop {
        match stream.message().await {
            Some(message) => {
                if let Some(Event::Start(start)) = message?.event.and_then(|e| e.event) {
                    break start.pid;
                }
            }
            None => bail!("the shell ended before it started"),
        }
    };
    let selector = pb::ProcessSelector {
        selector: Some(pb::process_selector::Selector::Pid(pid)),
    };
    let _raw = interactive.then(RawMode::enter);

    // Keys (or piped input) to the PTY.
    let input_client = envd.clone();
    let input_headers = headers.clone();
    let input_selector = selector.clone();
    let input = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buffer = vec![0u8; 4096];
        loop {
            let read = stdin.read(&mut buffer).await.unwrap_or(0);
            let bytes = if read == 0 {
                vec![4u8]
            } else {
                buffer[..read].to_vec()
            };
            let request = pb::SendInputRequest {
                process: Some(input_selector.clone()),
                input: Some(pb::ProcessInput {
                    input: Some(pb::process_input::Input::Pty(bytes)),
                }),
            };
            let sent: Result<pb::SendInputResponse, _> = input_client
                .call::<wrenn_proto::process::process::SendInput>(&request, &input_headers)
                .await;
            if sent.is_err() || read == 0 {
                return;
            }
        }
    });
    // The terminal's size to the PTY.
    let resize = interactive.then(|| {
        let client = envd.clone();
        let headers = headers.clone();
        let selector = selector.clone();
        tokio::spawn(async move {
            let Ok(mut changes) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while changes.recv().await.is_some() {
                if let Some(size) = terminal_size() {
                    let request = pb::UpdateRequest {
                        process: Some(selector.clone()),
                        pty: Some(pty_of(size)),
                    };
                    let _: Result<pb::UpdateResponse, _> = client
                        .call::<wrenn_proto::process::process::Update>(&request, &headers)
                        .await;
                }
            }
        })
    });
    let mut stdout = std::io::stdout();
    let mut code = None;
    while let Some(message) = stream.message().await {
        match message?.event.and_then(|e| e.event) {
            Some(Event::Data(data)) => {
                if let Some(Output::Pty(bytes) | Output::Stdout(bytes) | Output::Stderr(bytes)) =
                    data.output
                {
                    stdout.write_all(&bytes)?;
                    stdout.flush()?;
                }
            }
            Some(Event::End(end)) => {
                code = Some(end.exit_code);
                break;
            }
            _ => {}
        }
    }
    input.abort();
    if let Some(resize) = resize {
        resize.abort();
    }
    code.context("the shell's stream ended without an exit code (the sandbox went away?)")
}

/// `ID:/path` → (ID, /path).
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()) && path.starts_with('/'))
        .then_some((id, path))
}

async fn copy(
    connection: &Connection,
    source: &str,
    destination: &str,
    user: &str,
) -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    let started = Instant::now();
    let authority = connection.proxy_authority()?;
    let (moved, what) = match (remote(source), remote(destination)) {
        (None, Some((id, path))) => {
            let local = Path::new(source);
            let file = tokio::fs::File::open(local)
                .await
                .with_context(|| format!("reading {}", local.display()))?;
            let length = file.metadata().await?.len();
            let token = connection.access_token(id).await?;
            let body = http_body_util::StreamBody::new(futures_util::StreamExt::map(
                tokio_util::io::ReaderStream::new(file),
                |chunk| chunk.map(hyper::body::Frame::data),
            ));
            let mut request = http::Request::post(format!(
                "/files?path={}&username={}",
                percent_encode(path),
                percent_encode(user)
            ))
            .header("host", &authority)
            .header("content-type", "application/octet-stream")
            .header("content-length", length)
            .header("e2b-sandbox-id", id)
            .header("e2b-sandbox-port", wrenn_proto::ENVD_PORT);
            if let Some(token) = token {
                request = request.header("x-access-token", token);
            }
            let response = send(&authority, request.body(body)?).await?;
            let status = response.status();
            let answer = response.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                bail!(
                    "uploading to {id}:{path}: {status}: {}",
                    String::from_utf8_lossy(&answer).trim()
                );
            }
            (length, format!("{source} → {id}:{path}"))
        }
        (Some((id, path)), None) => {
            let token = connection.access_token(id).await?;
            let mut request = http::Request::get(format!(
                "/files?path={}&username={}",
                percent_encode(path),
                percent_encode(user)
            ))
            .header("host", &authority)
            .header("e2b-sandbox-id", id)
            .header("e2b-sandbox-port", wrenn_proto::ENVD_PORT);
            if let Some(token) = token {
                request = request.header("x-access-token", token);
            }
            let response = send(
                &authority,
                request.body(http_body_util::Empty::<bytes::Bytes>::new())?,
            )
            .await?;
            let status = response.status();
            let mut body = response.into_body();
            if !status.is_success() {
                let answer = body.collect().await?.to_bytes();
                bail!(
                    "downloading {id}:{path}: {status}: {}",
                    String::from_utf8_lossy(&answer).trim()
                );
            }
            let mut target = PathBuf::from(destination);
            if target.is_dir() {
                target.push(
                    Path::new(path)
                        .file_name()
                        .context("the remote path names no file")?,
                );
            }
            // Written beside the target and renamed: an interrupted copy leaves no half file.
            let partial = target.with_file_name(format!(
                ".{}.wrenn-partial",
                target
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("download")
            ));
            let mut file = tokio::fs::File::create(&partial)
                .await
                .with_context(|| format!("writing {}", partial.display()))?;
            let mut bytes = 0u64;
            let outcome: anyhow::Result<()> = async {
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame?.into_data() {
                        bytes += data.len() as u64;
                        tokio::io::AsyncWriteExt::write_all(&mut file, &data).await?;
                    }
                }
                file.sync_all().await?;
                Ok(())
            }
            .await;
            if let Err(error) = outcome {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(error.context(format!("downloading {id}:{path}")));
            }
            tokio::fs::rename(&partial, &target).await?;
            (bytes, format!("{id}:{path} → {}", target.display()))
        }
        _ => bail!(
            "cp copies between this machine and a sandbox: `cp ./file ID:/path` or `cp ID:/path ./file`"
        ),
    };
    let seconds = started.elapsed().as_secs_f64();
    if connection.json {
        println!(
            "{}",
            json!({ "copied": what, "bytes": moved, "seconds": seconds })
        );
    } else {
        println!("{what}: {moved} bytes in {seconds:.2} s");
    }
    Ok(())
}

async fn send<B>(
    authority: &str,
    request: http::Request<B>,
) -> anyhow::Result<http::Response<hyper::body::Incoming>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("connecting to the proxy at {authority}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender.send_request(request).await?)
}

pub async fn templates(args: TemplateArgs) -> anyhow::Result<()> {
    let TemplateArgs {
        connection,
        command,
    } = args;
    let TemplateCommand::List = command;
    let (templates, _) = connection.call(Method::GET, "/templates", None).await?;
    let list = templates.as_array().cloned().unwrap_or_default();
    if connection.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let rows = list
        .iter()
        .map(|t| {
            vec![
                text(&t["templateID"]),
                text(&t["cpuCount"]),
                format!("{} MiB", text(&t["memoryMB"])),
                format!("{} MiB", text(&t["diskSizeMB"])),
                text(&t["envdVersion"]),
                text(&t["createdAt"]),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &["template", "cpus", "memory", "disk", "envd", "built"],
            rows
        )
    );
    Ok(())
}

pub async fn hosts(args: HostArgs) -> anyhow::Result<()> {
    let HostArgs {
        connection,
        command,
    } = args;
    if let HostCommand::Forget { name } = command {
        let path = format!(
            "/hosts/{}",
            percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC)
        );
        let (forgotten, _) = connection.call(Method::DELETE, &path, None).await?;
        if connection.json {
            println!("{forgotten}");
        } else {
            println!(
                "forgot host {name} and its {} sandboxes",
                text(&forgotten["sandboxes"])
            );
        }
        return Ok(());
    }
    let (fleet, _) = connection.call(Method::GET, "/hosts", None).await?;
    if connection.json {
        println!("{}", serde_json::to_string_pretty(&fleet)?);
        return Ok(());
    }
    let hosts = fleet["hosts"].as_array().cloned().unwrap_or_default();
    let rows = hosts
        .iter()
        .map(|h| {
            let report = &h["report"];
            let templates = report["templates"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .map(|t| text(&t["templateId"]))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![
                text(&h["name"]),
                text(&h["state"]),
                if h["embedded"] == true {
                    "embedded".to_string()
                } else {
                    text(&h["apiURL"])
                },
                format!(
                    "{} / {}",
                    text(&report["slotsInUse"]),
                    text(&report["slotsTotal"])
                ),
                format!(
                    "{} / {}",
                    text(&report["sandboxesRunning"]),
                    text(&report["sandboxesPaused"])
                ),
                // Software emulation is a weaker boundary than KVM: the table says so.
                match report["accel"].as_str() {
                    Some("tcg") => "tcg (software emulation)".to_string(),
                    _ => text(&report["accel"]),
                },
                format!(
                    "{:.1} GiB",
                    report["memoryAvailableBytes"].as_u64().unwrap_or(0) as f64
                        / (1u64 << 30) as f64
                ),
                templates,
                text(&h["lastHeartbeatAt"]),
            ]
        })
        .collect();
    println!("placement: {}", text(&fleet["placement"]));
    println!(
        "{}",
        table(
            &[
                "host",
                "state",
                "agent",
                "slots used",
                "running / paused",
                "accel",
                "memory free",
                "templates",
                "last heartbeat"
            ],
            rows
        )
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_bash_only_when_needed() {
        assert_eq!(quote("python3"), "python3");
        assert_eq!(quote("print(1)"), "'print(1)'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn remote_paths_name_a_sandbox_and_an_absolute_path() {
        assert_eq!(remote("abc123:/tmp/x"), Some(("abc123", "/tmp/x")));
        assert_eq!(remote("./local"), None);
        assert_eq!(remote("abc:relative"), None);
        assert_eq!(remote("C:/windows"), Some(("C", "/windows")));
    }

    #[test]
    fn pairs_must_be_key_value() {
        assert_eq!(pairs(&["a=b=c".into()], "x").unwrap()["a"], "b=c");
        assert!(
            pairs(&["nokey".into()], "--env")
                .unwrap_err()
                .to_string()
                .contains("--env")
        );
    }
}
