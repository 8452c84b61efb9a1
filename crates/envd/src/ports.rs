//! The port subsystem: makes TCP servers that a user started on loopback inside the guest
//! reachable from outside it, on the guest's external address at the same port, without
//! spawning helper processes that could be orphaned.
//!
//! A scanner reads `/proc/net/tcp` and `/proc/net/tcp6` every scan interval and finds ports that
//! are listened on only on loopback; each gets an in-process forwarder (listen on
//! `<external>:<port>`, copy bytes both ways to the loopback server). A forwarder goes when its
//! server does. [`PortSubsystem::stop`] cancels the scanner, every forwarder and every forwarded
//! connection, and waits until all of them have ended and closed their sockets; it runs before a
//! snapshot (a half-forwarded connection would come back as a zombie) and `start` after the
//! restore.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A listening socket found in `/proc/net/tcp*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub address: IpAddr,
    pub port: u16,
}

/// Parses the listening sockets of a `/proc/net/tcp` or `/proc/net/tcp6` table.
pub fn parse_listeners(table: &str) -> Vec<Listener> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 4 || fields[3] != LISTEN {
                return None;
            }
            let (address, port) = fields[1].split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let address = match address.len() {
                8 => IpAddr::V4(Ipv4Addr::from(
                    u32::from_str_radix(address, 16).ok()?.swap_bytes(),
                )),
                32 => {
                    let mut bytes = [0u8; 16];
                    for (i, word) in (0..4).map(|i| &address[i * 8..i * 8 + 8]).enumerate() {
                        let word = u32::from_str_radix(word, 16).ok()?.swap_bytes();
                        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
                    }
                    IpAddr::V6(Ipv6Addr::from(bytes))
                }
                _ => return None,
            };
            Some(Listener { address, port })
        })
        .collect()
}

/// The ports to forward: listened on on loopback, and neither on every address (already
/// reachable) nor on the external address (already reachable, or our own forwarder).
pub fn ports_to_forward(listeners: &[Listener], external: IpAddr) -> BTreeSet<u16> {
    let reachable: BTreeSet<u16> = listeners
        .iter()
        .filter(|l| l.address.is_unspecified() || l.address == external)
        .map(|l| l.port)
        .collect();
    listeners
        .iter()
        .filter(|l| l.address.is_loopback() && !reachable.contains(&l.port))
        .map(|l| l.port)
        .collect()
}

fn scan() -> Vec<Listener> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| parse_listeners(&table))
        .collect()
}

/// Settings of the port subsystem.
#[derive(Debug, Clone)]
pub struct PortConfig {
    /// The guest's external address; `None` turns forwarding off.
    pub external: Option<IpAddr>,
    pub scan_interval: Duration,
}

#[derive(Debug)]
struct Running {
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// The scanner and forwarders, with a start/stop lifecycle.
#[derive(Debug)]
pub struct PortSubsystem {
    config: PortConfig,
    running: tokio::sync::Mutex<Option<Running>>,
    forwarded: std::sync::Arc<Mutex<BTreeSet<u16>>>,
}

impl PortSubsystem {
    pub fn new(config: PortConfig) -> Self {
        PortSubsystem {
            config,
            running: tokio::sync::Mutex::new(None),
            forwarded: Default::default(),
        }
    }

    /// The ports forwarded right now.
    pub fn forwarded_ports(&self) -> Vec<u16> {
        self.forwarded
            .lock()
            .expect("forwarded lock")
            .iter()
            .copied()
            .collect()
    }

    /// Whether the scanner runs.
    pub async fn is_running(&self) -> bool {
        self.running.lock().await.is_some()
    }

    /// Starts scanning and forwarding (no-op when running or turned off).
    pub async fn start(&self) {
        let Some(external) = self.config.external else {
            return;
        };
        let mut running = self.running.lock().await;
        if running.is_some() {
            return;
        }
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(scanner(
            external,
            self.config.scan_interval,
            cancel.clone(),
            tasks.clone(),
            self.forwarded.clone(),
        ));
        *running = Some(Running { cancel, tasks });
        tracing::info!(%external, "port forwarding started");
    }

    /// Stops scanning and forwarding, and returns once every task has ended and every socket it
    /// opened is closed.
    pub async fn stop(&self) {
        let Some(running) = self.running.lock().await.take() else {
            return;
        };
        running.cancel.cancel();
        running.tasks.close();
        running.tasks.wait().await;
        self.forwarded.lock().expect("forwarded lock").clear();
        tracing::info!("port forwarding stopped");
    }

    pub async fn restart(&self) {
        self.stop().await;
        self.start().await;
    }
}

async fn scanner(
    external: IpAddr,
    interval: Duration,
    cancel: CancellationToken,
    tasks: TaskTracker,
    forwarded: std::sync::Arc<Mutex<BTreeSet<u16>>>,
) {
    let mut forwarders: HashMap<u16, CancellationToken> = HashMap::new();
    let mut failed: BTreeSet<u16> = BTreeSet::new();
    loop {
        let listeners = tokio::task::spawn_blocking(scan).await.unwrap_or_default();
        let wanted = ports_to_forward(&listeners, external);
        forwarders.retain(|port, token| {
            let keep = wanted.contains(port) && !token.is_cancelled();
            if !keep {
                token.cancel();
            }
            keep
        });
        failed.retain(|port| wanted.contains(port));
        for port in &wanted {
            if forwarders.contains_key(port) {
                continue;
            }
            let target_ip = if listeners
                .iter()
                .any(|l| l.port == *port && l.address == IpAddr::V4(Ipv4Addr::LOCALHOST))
            {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            };
            match TcpListener::bind(SocketAddr::new(external, *port)).await {
                Ok(listener) => {
                    tracing::info!(port, "forwarding a loopback port");
                    let token = cancel.child_token();
                    tasks.spawn(forward(
                        listener,
                        SocketAddr::new(target_ip, *port),
                        token.clone(),
                        tasks.clone(),
                    ));
                    forwarders.insert(*port, token);
                }
                Err(error) => {
                    if failed.insert(*port) {
                        tracing::warn!(port, %error, "cannot forward a loopback port");
                    }
                }
            }
        }
        *forwarded.lock().expect("forwarded lock") = forwarders.keys().copied().collect();
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

async fn forward(
    listener: TcpListener,
    target: SocketAddr,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((mut inbound, _)) = accepted else {
            continue;
        };
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            tokio::select! {
                () = cancel.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000:C2CF 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:1F90 0100007F:A000 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
   3: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
   4: 1500FEA9:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5 1 0 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000
   1: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000
";

    #[test]
    fn parses_ipv4_and_ipv6_listeners() {
        let v4 = parse_listeners(TCP);
        assert_eq!(v4.len(), 4, "the established connection is skipped");
        assert_eq!(
            v4[0],
            Listener {
                address: "127.0.0.1".parse().unwrap(),
                port: 8080
            }
        );
        assert_eq!(
            v4[1],
            Listener {
                address: "0.0.0.0".parse().unwrap(),
                port: 49871
            }
        );
        assert_eq!(v4[3].address, "169.254.0.21".parse::<IpAddr>().unwrap());
        let v6 = parse_listeners(TCP6);
        assert_eq!(
            v6[0],
            Listener {
                address: "::1".parse().unwrap(),
                port: 3000
            }
        );
        assert!(v6[1].address.is_unspecified());
    }

    #[test]
    fn forwards_only_loopback_only_ports() {
        let mut listeners = parse_listeners(TCP);
        listeners.extend(parse_listeners(TCP6));
        let external: IpAddr = "169.254.0.21".parse().unwrap();
        // 8080 and 3000 are loopback-only; 22 is also on the external address; 49871 on all.
        assert_eq!(
            ports_to_forward(&listeners, external),
            BTreeSet::from([8080, 3000])
        );
    }

    #[tokio::test]
    async fn forwards_and_stops_without_leaking() {
        // A loopback server on 127.0.0.1, "external" address 127.0.0.2 (also loopback, but
        // forwarded-to only by us).
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = server.accept().await {
                tokio::spawn(async move {
                    let (mut reader, mut writer) = socket.split();
                    let _ = tokio::io::copy(&mut reader, &mut writer).await;
                });
            }
        });
        let external: IpAddr = "127.0.0.2".parse().unwrap();
        let ports = PortSubsystem::new(PortConfig {
            external: Some(external),
            scan_interval: Duration::from_millis(20),
        });
        let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let before = fds();
        for round in 0..100 {
            ports.start().await;
            if round % 20 == 0 {
                // Really forwarded: an echo through the external address.
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                let mut stream = loop {
                    if let Ok(stream) = TcpStream::connect((external, port)).await {
                        break stream;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "port {port} never forwarded"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                };
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                stream.write_all(b"ping").await.unwrap();
                let mut reply = [0u8; 4];
                stream.read_exact(&mut reply).await.unwrap();
                assert_eq!(&reply, b"ping");
                assert!(ports.forwarded_ports().contains(&port));
            }
            ports.stop().await;
            assert!(!ports.is_running().await);
            assert!(
                TcpStream::connect((external, port)).await.is_err(),
                "forwarder outlived stop"
            );
        }
        // Sockets of forwarded connections and listeners are all closed.
        assert!(
            fds() <= before + 2,
            "descriptors leaked: {before} before, {} after",
            fds()
        );
    }
}
