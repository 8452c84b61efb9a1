//! The guest's serial console, kept in a bounded log. The VMM serves the console on a unix
//! socket (QEMU's chardev in server mode, which drops the output while nobody listens, so a
//! guest never stalls on it); [`capture`] reads it and writes `console.log`, moving it to
//! `console.log.1` whenever it reaches half of [`CONSOLE_LOG_CAP`]. So a guest that floods its
//! console (`cat /dev/zero > /dev/ttyS0`) costs the host at most that much disk. Firecracker
//! writes the console on its standard output: a FIFO, copied the same way ([`capture_fifo`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The most disk one VM's console takes: `console.log` and `console.log.1` together.
pub const CONSOLE_LOG_CAP: u64 = 1 << 20;

/// The console log's older half.
pub fn previous_log(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Copies the console served at `socket` into `log` (rotated as the module says) until the VMM
/// closes it. Runs on a task of its own; an agent that restarts calls it again for the VMs it
/// adopts.
pub fn capture(socket: PathBuf, log: PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(error) = copy_rotating(&socket, &log).await {
            tracing::debug!(%error, socket = %socket.display(), "console capture ended");
        }
    })
}

async fn open_log(log: &Path) -> std::io::Result<(tokio::fs::File, u64)> {
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .await?;
    let size = file.metadata().await?.len();
    Ok((file, size))
}

/// Copies the console written into the FIFO at `fifo` (Firecracker's standard output, made
/// non-blocking so that a full FIFO drops output rather than stalling the guest) into `log`, as
/// [`capture`] does, until every writer has closed it (the VMM exited).
pub fn capture_fifo(fifo: PathBuf, log: PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let copied = async {
            let receiver = tokio::net::unix::pipe::OpenOptions::new().open_receiver(&fifo)?;
            copy_stream_rotating(receiver, &log).await
        };
        if let Err(error) = copied.await {
            tracing::debug!(%error, fifo = %fifo.display(), "console capture ended");
        }
    })
}

async fn copy_rotating(socket: &Path, log: &Path) -> std::io::Result<()> {
    let stream = {
        let mut tries = 0;
        loop {
            match tokio::net::UnixStream::connect(socket).await {
                Ok(stream) => break stream,
                Err(error) if tries >= 50 => return Err(error),
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    };
    copy_stream_rotating(stream, log).await
}

async fn copy_stream_rotating(
    mut stream: impl tokio::io::AsyncRead + Unpin,
    log: &Path,
) -> std::io::Result<()> {
    let half = CONSOLE_LOG_CAP / 2;
    let (mut file, mut size) = open_log(log).await?;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return file.flush().await;
        }
        let mut chunk = &buffer[..read];
        while !chunk.is_empty() {
            if size >= half {
                file.flush().await?;
                tokio::fs::rename(log, previous_log(log)).await?;
                (file, size) = open_log(log).await?;
            }
            let room = (half - size) as usize;
            let (now, later) = chunk.split_at(room.min(chunk.len()));
            file.write_all(now).await?;
            size += now.len() as u64;
            chunk = later;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_flood_keeps_the_log_under_its_cap_and_the_newest_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("console.sock");
        let log = dir.path().join("console.log");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let capture = capture(socket, log.clone());
        let (mut guest, _) = listener.accept().await.unwrap();
        let block = vec![b'x'; 1 << 20];
        for _ in 0..200 {
            guest.write_all(&block).await.unwrap();
        }
        guest.write_all(b"the end\n").await.unwrap();
        drop(guest);
        capture.await.unwrap();
        let current = std::fs::read(&log).unwrap();
        let previous = std::fs::metadata(previous_log(&log)).unwrap().len();
        assert!(current.len() as u64 + previous <= CONSOLE_LOG_CAP);
        assert!(current.ends_with(b"the end\n"));
        assert_eq!(previous, CONSOLE_LOG_CAP / 2);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&log).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
