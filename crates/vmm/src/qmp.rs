//! A small client of the QEMU Machine Protocol: newline-delimited JSON over a Unix socket. It
//! reads the greeting, negotiates capabilities, then runs one command at a time, matching each
//! answer by id and keeping the asynchronous events that arrive in between.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::VmmError;

/// The longest QMP message read (QEMU's answers to our commands are far shorter).
pub const MAX_MESSAGE_BYTES: u64 = 1 << 20;

/// How long one QMP command may take before the VMM counts as hung.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    /// Events received while waiting for answers, oldest first.
    pub events: Vec<Value>,
}

impl QmpClient {
    /// Connects to a QMP socket and enters command mode.
    pub async fn connect(socket: &Path) -> Result<Self, VmmError> {
        let stream = UnixStream::connect(socket).await.map_err(|error| {
            VmmError::io(format!("connecting to QMP at {}", socket.display()), error)
        })?;
        let (read, writer) = stream.into_split();
        let mut client = QmpClient {
            reader: BufReader::new(read),
            writer,
            next_id: 1,
            events: Vec::new(),
        };
        let greeting = client.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(VmmError::Invalid(format!("not a QMP greeting: {greeting}")));
        }
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// Connects, retrying while the socket is not there yet (a VMM that just started).
    pub async fn connect_when_ready(socket: &Path, within: Duration) -> Result<Self, VmmError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match Self::connect(socket).await {
                Ok(client) => return Ok(client),
                Err(error) if tokio::time::Instant::now() >= deadline => return Err(error),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let (id, line) = self.request(command, arguments);
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|error| VmmError::io(format!("sending QMP {command}"), error))?;
        self.answer(id, command).await
    }

    /// Hands the VMM an open file as `name` (QMP `getfd`, the descriptor passed with
    /// SCM_RIGHTS), for `fd:<name>` migrations: the VMM then needs neither a path it can open nor
    /// a shell to run (its seccomp filter forbids both).
    pub async fn send_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), VmmError> {
        self.execute_with_fd("getfd", Some(json!({ "fdname": name })), fd)
            .await
            .map(|_| ())
    }

    /// Runs a command with an open file passed along (SCM_RIGHTS), as `getfd` and `add-fd`
    /// take theirs, and returns its `return` value.
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, VmmError> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let (id, line) = self.request(command, arguments);
        let stream: &UnixStream = self.writer.as_ref();
        let fds = [fd.as_raw_fd()];
        loop {
            stream
                .writable()
                .await
                .map_err(|error| VmmError::io("waiting to send a descriptor over QMP", error))?;
            let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
                let iov = [std::io::IoSlice::new(line.as_bytes())];
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &iov,
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(count) if count == line.len() => break,
                Ok(count) => {
                    return Err(VmmError::Invalid(format!(
                        "QMP {command} was sent short ({count} of {} bytes)",
                        line.len()
                    )));
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(VmmError::io("sending a descriptor over QMP", error)),
            }
        }
        self.answer(id, command).await
    }

    fn request(&mut self, command: &str, arguments: Option<Value>) -> (u64, String) {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        (id, line)
    }

    async fn answer(&mut self, id: u64, command: &str) -> Result<Value, VmmError> {
        let answer = tokio::time::timeout(COMMAND_TIMEOUT, async {
            loop {
                let message = self.read_message().await?;
                if message.get("event").is_some() {
                    self.events.push(message);
                    continue;
                }
                if message.get("id").and_then(Value::as_u64) == Some(id) {
                    return Ok(message);
                }
            }
        })
        .await
        .map_err(|_| VmmError::Timeout {
            operation: format!("QMP {command}"),
            seconds: COMMAND_TIMEOUT.as_secs(),
        })??;
        if let Some(error) = answer.get("error") {
            return Err(VmmError::Refused {
                command: command.to_string(),
                message: error
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no description")
                    .to_string(),
            });
        }
        Ok(answer.get("return").cloned().unwrap_or(Value::Null))
    }

    /// The VM's run state (`running`, `paused`, `inmigrate`, `postmigrate`, …).
    pub async fn status(&mut self) -> Result<String, VmmError> {
        let status = self.execute("query-status", None).await?;
        Ok(status
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }

    async fn read_message(&mut self) -> Result<Value, VmmError> {
        // A VMM is the guest's first step out: a line of QMP is read up to a bound, never
        // without end.
        let mut line = String::new();
        let read = (&mut self.reader)
            .take(MAX_MESSAGE_BYTES)
            .read_line(&mut line)
            .await
            .map_err(|error| VmmError::io("reading from QMP", error))?;
        if read == 0 {
            return Err(VmmError::Exited("QMP connection closed".into()));
        }
        if !line.ends_with('\n') && read as u64 >= MAX_MESSAGE_BYTES {
            return Err(VmmError::Invalid(format!(
                "a QMP message longer than {} KiB",
                MAX_MESSAGE_BYTES / 1024
            )));
        }
        serde_json::from_str(&line)
            .map_err(|error| VmmError::Invalid(format!("QMP sent invalid JSON ({error}): {line}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted QMP peer: greets, answers capabilities, sends an event, then answers by id.
    async fn fake_peer(listener: UnixListener) {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        while let Some(line) = lines.next_line().await.unwrap() {
            let request: Value = serde_json::from_str(&line).unwrap();
            let id = request["id"].clone();
            let answer = match request["execute"].as_str().unwrap() {
                "qmp_capabilities" => json!({ "return": {}, "id": id }),
                "query-status" => {
                    write
                        .write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\n")
                        .await
                        .unwrap();
                    json!({ "return": { "status": "paused", "running": false }, "id": id })
                }
                other => {
                    json!({ "error": { "class": "CommandNotFound", "desc": format!("The command {other} has not been found") }, "id": id })
                }
            };
            write
                .write_all(format!("{answer}\n").as_bytes())
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn commands_are_answered_by_id_and_events_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(fake_peer(listener));
        let mut client = QmpClient::connect(&socket).await.unwrap();
        assert_eq!(client.status().await.unwrap(), "paused");
        assert_eq!(client.events.len(), 1);
        let error = client.execute("no-such-thing", None).await.unwrap_err();
        assert!(error.to_string().contains("has not been found"), "{error}");
    }

    #[tokio::test]
    async fn an_endless_line_is_refused_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let block = vec![b'x'; 64 * 1024];
            while stream.write_all(&block).await.is_ok() {}
        });
        let error = QmpClient::connect(&socket).await.unwrap_err();
        assert!(
            error.to_string().contains("longer than 1024 KiB"),
            "{error}"
        );
    }
}
