//! `wrenn sandbox exec` and `wrenn sandbox shell`: a command or an interactive shell in a
//! sandbox, over envd's process service through the edge proxy.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Context, bail};
use wrenn_proto::process as pb;

use crate::connection::{Connection, basic_user};

/// Shell-quotes one word for bash.
pub fn quote(word: &str) -> String {
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

/// envd's `Start` of `script` under `bash -l -c`, as the SDKs run commands, its stdin closed.
pub fn bash_request(
    script: &str,
    cwd: Option<String>,
    envs: BTreeMap<String, String>,
) -> pb::StartRequest {
    pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), script.into()],
            envs: envs.into_iter().collect(),
            cwd,
        }),
        stdin: Some(false),
        ..Default::default()
    }
}

/// Runs `script` with `bash -l -c`, streaming its output: its exit code.
pub async fn exec(
    connection: &Connection,
    id: &str,
    user: &str,
    cwd: Option<String>,
    envs: BTreeMap<String, String>,
    script: &str,
) -> anyhow::Result<i32> {
    let (envd, mut headers) = connection.envd(id).await?;
    headers.insert("authorization", basic_user(user)?);
    let request = bash_request(script, cwd, envs);
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
pub async fn shell_session(
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
}
