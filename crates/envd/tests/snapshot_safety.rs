//! Snapshot safety and connection hygiene of the real envd binary: `/snapshot/prepare` closes
//! idle connections, the first `/init` after it closes the connections from before it and keeps
//! the later ones; header-read and idle timeouts close stuck and idle connections but never a
//! long process stream.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Envd, run, start_request, start_stream};
use http::HeaderMap;
use wrenn_connect::Codec;
use wrenn_connect::client::HttpVersion;

/// A raw keep-alive HTTP/1.1 connection.
struct RawConnection(TcpStream);

impl RawConnection {
    fn open(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        RawConnection(stream)
    }

    /// Sends `GET /health` and reads the 204 (which has no body).
    fn health(&mut self) -> std::io::Result<()> {
        self.0
            .write_all(b"GET /health HTTP/1.1\r\nHost: envd\r\n\r\n")?;
        let mut response = Vec::new();
        let mut byte = [0u8; 1];
        while !response.ends_with(b"\r\n\r\n") {
            if self.0.read(&mut byte)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed",
                ));
            }
            response.push(byte[0]);
        }
        assert!(
            response.starts_with(b"HTTP/1.1 204"),
            "{}",
            String::from_utf8_lossy(&response)
        );
        Ok(())
    }

    /// Whether envd closed the connection (within `wait`).
    fn closed_by_peer(&mut self, wait: Duration) -> bool {
        self.0.set_read_timeout(Some(wait)).unwrap();
        let mut buffer = [0u8; 4096];
        loop {
            match self.0.read(&mut buffer) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

fn open_connections(pid: u32) -> usize {
    // Established TCP sockets of envd, from its descriptors.
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn prepare_and_restore_close_exactly_the_old_connections() {
    let envd = Envd::start();
    let mut idle = RawConnection::open(envd.port);
    idle.health().unwrap();

    // A streaming connection from before the snapshot: a long-running process's output.
    let client = envd.client(HttpVersion::Http1, Codec::Json);
    let sleep = start_request("/bin/sleep", &["30"]);
    let mut stream = start_stream(&client, &sleep, &HeaderMap::new()).await;
    assert!(stream.message().await.unwrap().is_ok());

    let began = Instant::now();
    let reply = envd.request("POST", "/snapshot/prepare", &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // Not a speed target (`wrenn-bench envd` measures it): the prepare must not wait for the
    // streaming process, which runs 30 s.
    assert!(
        began.elapsed() < Duration::from_secs(15),
        "/snapshot/prepare waited {:?}",
        began.elapsed()
    );
    assert_eq!(reply.json()["closedConnections"], 1, "{}", reply.text());
    assert!(
        idle.closed_by_peer(Duration::from_secs(2)),
        "the idle connection survived /snapshot/prepare"
    );

    // -- the VM would be paused, snapshotted and restored here --

    // A connection made after the restore (e.g. a readiness poll) is kept.
    let mut after = RawConnection::open(envd.port);
    after.health().unwrap();
    // /init on a new connection closes the old stream, keeps itself and the later connection.
    let mut init = RawConnection::open(envd.port);
    init.0
        .write_all(b"POST /init HTTP/1.1\r\nHost: envd\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    let mut head = [0u8; 12];
    init.0.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 204");
    let mut rest = [0u8; 512];
    let _ = init.0.read(&mut rest);
    match tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the old stream was not closed")
    {
        Some(Err(_)) | None => {}
        Some(Ok(message)) => panic!("the old stream goes on: {message:?}"),
    }
    after
        .health()
        .expect("a connection from after the restore was closed");
    init.health().expect("the /init connection was closed");
    let mut later = RawConnection::open(envd.port);
    later.health().unwrap();
    // A second /init is an ordinary one: nothing more is closed.
    assert_eq!(envd.request("POST", "/init", &[], "{}").await.status, 204);
    after
        .health()
        .expect("a later /init closed a live connection");
}

#[tokio::test]
async fn header_read_and_idle_timeouts_spare_long_streams() {
    let envd = Envd::start_with(&[
        "--header-read-timeout-secs",
        "1",
        "--idle-timeout-secs",
        "1",
    ]);

    let mut half = RawConnection::open(envd.port);
    half.0.write_all(b"GET /health HTTP/1.1\r\nHo").unwrap();
    assert!(
        half.closed_by_peer(Duration::from_secs(5)),
        "a half-sent header kept the connection"
    );

    let mut idle = RawConnection::open(envd.port);
    idle.health().unwrap();
    let began = Instant::now();
    assert!(
        idle.closed_by_peer(Duration::from_secs(5)),
        "an idle connection was not closed"
    );
    assert!(
        began.elapsed() >= Duration::from_millis(900),
        "closed before the idle timeout"
    );

    // Silent for three idle timeouts, then output: the stream must survive.
    let client = envd.client(HttpVersion::Http1, Codec::Json);
    let late_output = start_request("/bin/sh", &["-c", "sleep 3; echo done"]);
    let out = run(&client, &late_output, &HeaderMap::new()).await;
    assert!(out.error.is_none(), "the stream was cut: {:?}", out.error);
    assert!(out.end.is_some());
    assert_eq!(out.stdout, b"done\n");
}

#[tokio::test]
async fn prepare_with_many_idle_connections_leaves_none() {
    let envd = Envd::start();
    let baseline = open_connections(envd.pid());
    let mut connections: Vec<_> = (0..100).map(|_| RawConnection::open(envd.port)).collect();
    for connection in &mut connections {
        connection.health().unwrap();
    }
    let reply = envd.request("POST", "/snapshot/prepare", &[], "").await;
    assert_eq!(reply.json()["closedConnections"], 100);
    for connection in &mut connections {
        assert!(connection.closed_by_peer(Duration::from_secs(2)));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    // envd holds only the sockets it had before the connections came.
    drop(connections);
    while open_connections(envd.pid()) > baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // At most the baseline: a connection of the start-up health check may still have been open
    // when the baseline was counted.
    let remaining = open_connections(envd.pid());
    assert!(
        remaining <= baseline,
        "envd kept sockets open: {remaining} now, {baseline} before the connections came"
    );
}

#[tokio::test]
async fn orphans_are_reaped() {
    let envd = Envd::start_with(&["--subreaper"]);
    let client = envd.client(HttpVersion::Http1, Codec::Json);
    // The shell exits at once; its background children are re-parented to envd and die later.
    let script = "sleep 2 >/dev/null 2>&1 & echo $!; sleep 3 >/dev/null 2>&1 & echo $!; exit 0";
    let out = run(
        &client,
        &start_request("/bin/sh", &["-c", script]),
        &HeaderMap::new(),
    )
    .await;
    assert!(out.error.is_none(), "{:?}", out.error);
    let orphans: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|pid| pid.parse().unwrap())
        .collect();
    assert_eq!(
        orphans.len(),
        2,
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    // With --subreaper they are envd's children now (without it, they would go to this
    // machine's init, and envd would reap nothing).
    for orphan in &orphans {
        let status = std::fs::read_to_string(format!("/proc/{orphan}/status")).unwrap();
        let parent = status
            .lines()
            .find_map(|line| line.strip_prefix("PPid:"))
            .map(|pid| pid.trim().parse::<u32>().unwrap());
        assert_eq!(parent, Some(envd.pid()), "orphan {orphan}'s parent");
    }
    // Wait until both have exited and been reaped: gone from /proc, no zombie left.
    let deadline = Instant::now() + Duration::from_secs(20);
    while orphans
        .iter()
        .any(|orphan| std::path::Path::new(&format!("/proc/{orphan}")).exists())
    {
        assert!(
            Instant::now() < deadline,
            "orphans not reaped: {:?}, zombies: {:?}",
            orphans,
            wrenn_envd::reaper::zombie_children(envd.pid())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(wrenn_envd::reaper::zombie_children(envd.pid()).is_empty());
    // And they really were envd's to reap: a process of envd's own still reports its exit.
    let out = run(
        &client,
        &start_request("/bin/false", &[]),
        &HeaderMap::new(),
    )
    .await;
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.end.map(|end| end.exit_code), Some(1));
}
