//! Running the external tools of a build (apt-get, debootstrap, chroot, mkfs.ext4): output goes
//! to the build log and feeds the progress line; a failure reports its most telling lines.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;

use crate::error::ImageError;
use crate::progress::Progress;

/// Checks that a program is on PATH, naming the Debian package that provides it if not.
pub fn require_tool(program: &'static str, package: &'static str) -> Result<(), ImageError> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    if found {
        Ok(())
    } else {
        Err(ImageError::MissingTool { program, package })
    }
}

/// Runs `command`, appending its output to `log` and showing its latest line as progress.
pub fn run(
    step: &str,
    mut command: Command,
    log: &Path,
    progress: &mut Progress,
) -> Result<(), ImageError> {
    let mut log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|error| {
            ImageError::io(
                format!("opening the build log {}", log.display()),
                log,
                error,
            )
        })?;
    let _ = writeln!(log_file, "\n### {step}: {command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| not_started(step, &command, error))?;
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        readers.push(forward_lines(stdout, lines_tx.clone()));
    }
    if let Some(stderr) = child.stderr.take() {
        readers.push(forward_lines(stderr, lines_tx.clone()));
    }
    drop(lines_tx);
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut errors: Vec<String> = Vec::new();
    for line in lines_rx {
        let _ = writeln!(log_file, "{line}");
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if trimmed.starts_with("E:")
            || trimmed.starts_with("error")
            || trimmed.contains("No space left")
        {
            errors.push(trimmed.to_string());
        }
        progress.update(trimmed);
        tail.push_back(trimmed.to_string());
        if tail.len() > 6 {
            tail.pop_front();
        }
    }
    for reader in readers {
        let _ = reader.join();
    }
    let status = child.wait().map_err(|error| ImageError::Io {
        context: format!("{step}: waiting for {:?}", command.get_program()),
        source: error,
    })?;
    if status.success() {
        return Ok(());
    }
    let _ = writeln!(log_file, "### {step} failed: {status}");
    let summary = if errors.is_empty() {
        tail.into_iter().collect::<Vec<_>>().join(" | ")
    } else {
        errors.join(" | ")
    };
    let summary = if summary.contains("No space left") {
        format!("the disk is full: {summary}")
    } else if summary.is_empty() {
        "it printed nothing".to_string()
    } else {
        summary
    };
    Err(ImageError::Command {
        step: step.to_string(),
        status: status.to_string(),
        summary,
        log: log.to_path_buf(),
    })
}

/// Runs `command` and returns its standard output (for short queries like `apt-cache`).
pub fn output(step: &str, mut command: Command) -> Result<String, ImageError> {
    let result = command
        .stdin(Stdio::null())
        .output()
        .map_err(|error| not_started(step, &command, error))?;
    if !result.status.success() {
        let stderr = String::from_utf8_lossy(&result.stderr);
        return Err(ImageError::Invalid(format!(
            "{step} failed ({}): {}",
            result.status,
            stderr.trim()
        )));
    }
    Ok(String::from_utf8_lossy(&result.stdout).into_owned())
}

fn forward_lines(
    stream: impl std::io::Read + Send + 'static,
    lines: mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).replace('\r', "");
            if lines.send(line).is_err() {
                break;
            }
        }
    })
}

/// The error of a command that could not be started.
fn not_started(step: &str, command: &Command, error: std::io::Error) -> ImageError {
    ImageError::Io {
        context: format!("{step}: starting {:?}", command.get_program()),
        source: error,
    }
}
