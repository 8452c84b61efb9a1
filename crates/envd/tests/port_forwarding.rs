//! Port forwarding across a real network boundary: envd runs in a network namespace of its own
//! (made by the test, with a veth pair to the test's namespace); a server bound to 127.0.0.1
//! inside it becomes reachable at the namespace's external address, and stops being reachable
//! while a snapshot is prepared. Needs root and `ip`: without them skipped with a message, or
//! failed where `WRENN_REQUIRE_PREREQUISITES=1` (see `wrenn_testkit::missing_prerequisite`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A network namespace joined to ours by a veth pair, removed on drop.
struct Namespace {
    name: String,
    host_side: String,
}

const HOST_ADDRESS: &str = "169.254.77.1";
const GUEST_ADDRESS: &str = "169.254.77.2";

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

impl Namespace {
    fn create() -> Option<Namespace> {
        let id = std::process::id() % 100_000;
        let name = format!("wrenn-pf-{id}");
        let host_side = format!("wpf{id}h");
        let guest_side = format!("wpf{id}g");
        let namespace = Namespace {
            name: name.clone(),
            host_side: host_side.clone(),
        };
        let ok = ip(&["netns", "add", &name])
            && ip(&[
                "link",
                "add",
                &host_side,
                "type",
                "veth",
                "peer",
                "name",
                &guest_side,
            ])
            && ip(&["link", "set", &guest_side, "netns", &name])
            && ip(&[
                "addr",
                "add",
                &format!("{HOST_ADDRESS}/30"),
                "dev",
                &host_side,
            ])
            && ip(&["link", "set", &host_side, "up"])
            && ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{GUEST_ADDRESS}/30"),
                "dev",
                &guest_side,
            ])
            && ip(&["-n", &name, "link", "set", &guest_side, "up"])
            && ip(&["-n", &name, "link", "set", "lo", "up"]);
        ok.then_some(namespace)
    }

    fn spawn(&self, program: &str, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        ip(&["link", "del", &self.host_side]);
        ip(&["netns", "del", &self.name]);
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn reachable(port: u16) -> bool {
    TcpStream::connect_timeout(
        &format!("{GUEST_ADDRESS}:{port}").parse().unwrap(),
        Duration::from_millis(300),
    )
    .is_ok()
}

/// Waits up to 10 s until `condition` holds; panics naming `what` otherwise.
fn wait_until(what: &str, condition: impl FnMut() -> bool) {
    common::wait_for(what, Duration::from_secs(10), condition);
}

fn post(port: u16, path: &str, body: &str) -> String {
    let mut stream = TcpStream::connect((GUEST_ADDRESS, port)).unwrap();
    write!(stream, "POST {path} HTTP/1.1\r\nHost: envd\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

#[test]
fn loopback_server_in_a_namespace_is_reachable_from_outside() {
    const WHAT: &str = "the port forwarding test";
    if !common::is_root() || Command::new("ip").arg("-V").output().is_err() {
        wrenn_testkit::missing_prerequisite(
            WHAT,
            "making a network namespace needs root and iproute2 (`ip`)",
        );
        return;
    }
    let Some(namespace) = Namespace::create() else {
        wrenn_testkit::missing_prerequisite(
            WHAT,
            "could not create a network namespace with a veth pair here",
        );
        return;
    };
    let envd_port = 49983;
    let server_port = 8765;
    let _envd = Killed(namespace.spawn(
        env!("CARGO_BIN_EXE_envd"),
        &[
            "--port",
            &envd_port.to_string(),
            "--no-clock-sync",
            "--forward-address",
            GUEST_ADDRESS,
            "--port-scan-interval-ms",
            "100",
        ],
    ));
    wait_until("envd answers", || reachable(envd_port));
    // A server bound only to the namespace's loopback.
    let _server = Killed(namespace.spawn(
        "python3",
        &[
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &server_port.to_string(),
        ],
    ));
    wait_until("the loopback server is forwarded", || {
        reachable(server_port)
    });
    let mut stream = TcpStream::connect((GUEST_ADDRESS, server_port)).unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");

    // Preparing a snapshot stops forwarding; the /init after the restore brings it back.
    for _ in 0..3 {
        assert!(post(envd_port, "/snapshot/prepare", "").starts_with("HTTP/1.1 200"));
        assert!(
            !reachable(server_port),
            "still forwarded after /snapshot/prepare"
        );
        assert!(post(envd_port, "/init", "{}").starts_with("HTTP/1.1 204"));
        wait_until("forwarding resumes", || reachable(server_port));
    }
}
