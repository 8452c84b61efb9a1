//! The attacker's suite: code inside real guests (QEMU, software emulation here) tries to reach
//! what it was not given, and each attempt sits beside the legitimate path to the same target,
//! which must still work. Covered: another sandbox's guest and its host-side address, the host's
//! ports (agent API, sandbox proxy, any listener) on every host address, the MMDS (only its own
//! identity), a spoofed source address, a machine outside the host routing to a slot, a console
//! flood, a metadata-token flood, and a corrupt record at agent start.
//!
//! Needs root, QEMU and the built image; see `support::prerequisites`.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use support::*;
use wrenn_agent::network::Slot;
use wrenn_proto::agent as pb;

/// A listener on every host address that answers "victim": what a guest must not reach.
fn victim_listener() -> u16 {
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.write_all(b"victim\n");
        }
    });
    port
}

/// The host's main address (the source of its default route, else its first global one).
fn host_address() -> Ipv4Addr {
    let route = Command::new("ip")
        .args(["-4", "route", "get", "1.1.1.1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&route.stdout).into_owned();
    let from_route = text
        .split_whitespace()
        .skip_while(|word| *word != "src")
        .nth(1)
        .and_then(|address| address.parse().ok());
    from_route.unwrap_or_else(|| {
        let addresses = Command::new("ip")
            .args(["-4", "-o", "addr", "show", "scope", "global"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&addresses.stdout)
            .split_whitespace()
            .skip_while(|word| *word != "inet")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next()?.parse().ok())
            .expect("the host has an IPv4 address")
    })
}

fn reachable_from_host(address: Ipv4Addr, port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from((address, port)), Duration::from_secs(3)).is_ok()
}

fn slot_of(sandbox: &pb::Sandbox) -> Slot {
    let address: SocketAddr = sandbox.envd_address.parse().unwrap();
    let std::net::IpAddr::V4(address) = address.ip() else {
        panic!("an IPv4 slot address")
    };
    Slot::new("wiso", Slot::index_of_address(address).unwrap())
}

/// Runs TCP probes from inside a sandbox, all at once: `name → open`.
async fn probe(sandbox: &pb::Sandbox, targets: &[(&str, String, u16)]) -> HashMap<String, bool> {
    let mut script = String::from(
        "probe() { if timeout 4 bash -c \"exec 3<>/dev/tcp/$2/$3\" 2>/dev/null; then echo \"$1=open\"; else echo \"$1=closed\"; fi; }\n",
    );
    for (name, address, port) in targets {
        script.push_str(&format!("probe {name} {address} {port} &\n"));
    }
    script.push_str("wait\n");
    let ran = run(sandbox, None, &script).await;
    let results: HashMap<String, bool> = ran
        .stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, state)| (name.to_string(), state == "open"))
        .collect();
    assert_eq!(results.len(), targets.len(), "probes ran: {ran:?}");
    results
}

/// The packets the last rule (the DROP) of a host chain has counted.
fn drops_of(chain: &str) -> u64 {
    let output = Command::new("iptables")
        .args(["-L", chain, "-v", "-x", "-n"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains("DROP"))
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A network namespace playing a machine on the host's network, routed to the slot addresses
/// through the host.
struct Outsider;

impl Outsider {
    const NETNS: &str = "wiso-outside";

    fn new() -> Outsider {
        Self::remove();
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().unwrap();
            assert!(status.success(), "ip {args:?}");
        };
        ip(&["netns", "add", Self::NETNS]);
        ip(&[
            "link",
            "add",
            "wisoout0",
            "type",
            "veth",
            "peer",
            "name",
            "wisoout1",
            "netns",
            Self::NETNS,
        ]);
        ip(&["addr", "add", "10.250.77.1/30", "dev", "wisoout0"]);
        ip(&["link", "set", "wisoout0", "up"]);
        ip(&[
            "-n",
            Self::NETNS,
            "addr",
            "add",
            "10.250.77.2/30",
            "dev",
            "wisoout1",
        ]);
        ip(&["-n", Self::NETNS, "link", "set", "wisoout1", "up"]);
        ip(&[
            "-n",
            Self::NETNS,
            "route",
            "add",
            "10.200.0.0/15",
            "via",
            "10.250.77.1",
        ]);
        Outsider
    }

    fn connects(&self, address: &str, port: u16) -> bool {
        Command::new("ip")
            .args(["netns", "exec", Self::NETNS, "timeout", "4", "bash", "-c"])
            .arg(format!("exec 3<>/dev/tcp/{address}/{port}"))
            .status()
            .unwrap()
            .success()
    }

    fn remove() {
        let _ = Command::new("ip")
            .args(["link", "del", "wisoout0"])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", Self::NETNS])
            .status();
    }
}

impl Drop for Outsider {
    fn drop(&mut self) {
        Self::remove();
    }
}

/// A sandbox `id` of the base template with internet access.
async fn create_online(agent: &Agent, id: &str) -> pb::Sandbox {
    agent
        .create_from(pb::CreateSandboxRequest {
            template_id: "base".into(),
            sandbox_id: id.into(),
            allow_internet_access: true,
            ..Default::default()
        })
        .await
}

/// `/proc/<pid>/status` of the QEMU running `sandbox` (found by the name it is given).
fn vmm_status(agent: &Agent, sandbox: &str) -> String {
    let workdir = agent.data_dir().join("sandboxes").join(sandbox).join("vm");
    let marker = workdir.display().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|byte| *byte == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.contains("qemu-system")) && args.contains(&marker) {
            return std::fs::read_to_string(entry.path().join("status")).unwrap();
        }
    }
    panic!("no QEMU runs {sandbox}");
}

/// The metadata service as guests address it.
const MMDS: &str = "http://169.254.169.254";

const MMDS_TOKEN: &str = "curl -s -m 5 -X PUT -H 'X-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token";

/// A guest script that prints the instance id the MMDS gives it (with a fresh session token).
fn mmds_identity_script() -> String {
    format!(
        "t=$({MMDS_TOKEN}); curl -s -m 5 -H \"X-metadata-token: $t\" http://169.254.169.254/instanceID"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_reach_nothing_they_were_not_given() {
    let Some(_image) = prerequisites() else {
        return;
    };
    // Forwarding on, so that what stops a packet below is the firewall, not the host's routing.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
    let host = host_address();
    let victim = victim_listener();
    // The agent listens on every address, and the host's main address is opened to guests in
    // the namespaces: only the host's own chain stands between a guest and the host.
    let mut agent = Agent::start_on(
        "0.0.0.0",
        "wiso",
        1600,
        vec!["--guest-open-range".into(), format!("{host}/32")],
    );
    agent.build_template("base").await;
    let (a, b) = tokio::join!(
        create_online(&agent, "iso-a"),
        create_online(&agent, "iso-b")
    );
    let (slot_a, slot_b) = (slot_of(&a), slot_of(&b));

    // Each VM's QEMU runs as a user of its own (the default uid base + its slot), without
    // capabilities, under no_new_privs and a seccomp filter.
    for (sandbox, slot) in [("iso-a", &slot_a), ("iso-b", &slot_b)] {
        let status = vmm_status(&agent, sandbox);
        let uid = wrenn_agent::manager::DEFAULT_VMM_UID_BASE + slot.index;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_else(|| panic!("{name} missing from {status}"))
                .to_string()
        };
        assert_eq!(
            field("Uid:"),
            format!("{uid}\t{uid}\t{uid}\t{uid}"),
            "{sandbox}"
        );
        assert_eq!(
            field("Gid:"),
            format!("{uid}\t{uid}\t{uid}\t{uid}"),
            "{sandbox}"
        );
        assert_eq!(field("Groups:"), "", "{sandbox}");
        assert_eq!(field("CapEff:"), "0000000000000000", "{sandbox}");
        assert_eq!(field("CapPrm:"), "0000000000000000", "{sandbox}");
        assert_eq!(field("NoNewPrivs:"), "1", "{sandbox}");
        assert_eq!(field("Seccomp:"), "2", "{sandbox}");
    }

    // No IPv6 in a slot: off on the guest's tap and on the veth, no address on either.
    for slot in [&slot_a, &slot_b] {
        for interface in ["tap0", slot.veth_guest.as_str()] {
            let off = Command::new("ip")
                .args(["netns", "exec", &slot.netns, "cat"])
                .arg(format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6"))
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&off.stdout).trim(),
                "1",
                "{interface}"
            );
        }
        let addresses = Command::new("ip")
            .args(["-n", &slot.netns, "-6", "addr"])
            .output()
            .unwrap();
        assert!(
            addresses.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&addresses.stdout)
        );
    }

    // B serves a port; the host reaches it and B's envd (the legitimate path).
    run_expecting(
        &b,
        "nohup python3 -m http.server 8000 --bind 0.0.0.0 >/dev/null 2>&1 & sleep 0.1; echo started",
        "started",
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !reachable_from_host(slot_b.address, 8000) {
        assert!(
            std::time::Instant::now() < deadline,
            "B's server never answered the host"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(reachable_from_host(slot_b.address, 49983));
    for address in [host, slot_a.host_ip, slot_b.host_ip] {
        assert!(
            reachable_from_host(address, victim),
            "host → {address}:{victim}"
        );
        assert!(
            reachable_from_host(address, agent.api_port),
            "host → {address} API"
        );
    }

    // A attacks.
    let targets = [
        ("b_envd", slot_b.address.to_string(), 49983),
        ("b_server", slot_b.address.to_string(), 8000),
        ("b_hostside_victim", slot_b.host_ip.to_string(), victim),
        ("b_hostside_api", slot_b.host_ip.to_string(), agent.api_port),
        ("own_hostside_victim", slot_a.host_ip.to_string(), victim),
        (
            "own_hostside_api",
            slot_a.host_ip.to_string(),
            agent.api_port,
        ),
        (
            "own_hostside_proxy",
            slot_a.host_ip.to_string(),
            agent.proxy_port,
        ),
        ("host_victim", host.to_string(), victim),
        ("host_api", host.to_string(), agent.api_port),
        ("host_proxy", host.to_string(), agent.proxy_port),
        ("host_mmds_direct", host.to_string(), agent.mmds_port),
    ];
    let input_drops = drops_of("wrenn-in-wiso");
    let results = probe(&a, &targets).await;
    let open: Vec<&String> = results
        .iter()
        .filter(|(_, open)| **open)
        .map(|(name, _)| name)
        .collect();
    assert!(open.is_empty(), "sandbox A reached {open:?}");
    // The opened range let A's packets to the host's main address through the namespace: the
    // host's own chain is what dropped them.
    assert!(
        drops_of("wrenn-in-wiso") > input_drops,
        "the host chain never saw A's packets"
    );

    // The MMDS answers A with A's identity only.
    run_expecting(&a, &mmds_identity_script(), "\"iso-a\"").await;
    // The MMDS V2 session protocol, as a guest meets it: a token needs a TTL of 1 to 21600 s,
    // reads need a live token of the guest's own, and a token stops working when its TTL ends.
    let session = run(
        &a,
        None,
        &format!(
            "code() {{ curl -s -m 5 -o /dev/null -w '%{{http_code}}' \"$@\"; }}; \
             echo ttl0=$(code -X PUT -H 'X-metadata-token-ttl-seconds: 0' {MMDS}/latest/api/token); \
             echo ttl-too-long=$(code -X PUT -H 'X-metadata-token-ttl-seconds: 21601' {MMDS}/latest/api/token); \
             echo no-ttl=$(code -X PUT {MMDS}/latest/api/token); \
             echo no-token=$(code {MMDS}/instanceID); \
             echo forged=$(code -H 'X-metadata-token: forged' {MMDS}/instanceID); \
             echo post=$(code -X POST {MMDS}/latest/api/token); \
             short=$(curl -s -m 5 -X PUT -H 'X-metadata-token-ttl-seconds: 1' {MMDS}/latest/api/token); \
             long=$(curl -s -m 5 -X PUT -H 'X-metadata-token-ttl-seconds: 60' {MMDS}/latest/api/token); \
             echo short=$(code -H \"X-metadata-token: $short\" {MMDS}/instanceID); \
             for i in $(seq 60); do \
               [ $(code -H \"X-metadata-token: $short\" {MMDS}/instanceID) = 401 ] && break; sleep 0.5; \
             done; \
             echo short-later=$(code -H \"X-metadata-token: $short\" {MMDS}/instanceID); \
             echo long-later=$(code -H \"X-metadata-token: $long\" {MMDS}/instanceID); \
             echo unknown-key=$(code -H \"X-metadata-token: $long\" {MMDS}/nothing); \
             echo token=$long"
        ),
    )
    .await;
    let (answers, token) = session.stdout.trim().rsplit_once("\ntoken=").unwrap();
    assert_eq!(
        answers,
        "ttl0=400\nttl-too-long=400\nno-ttl=400\nno-token=401\nforged=401\npost=405\n\
         short=200\nshort-later=401\nlong-later=200\nunknown-key=404",
        "{session:?}"
    );
    // A's live token is worth nothing from B's slot.
    run_expecting(
        &b,
        &format!("curl -s -m 5 -o /dev/null -w '%{{http_code}}' -H 'X-metadata-token: {token}' {MMDS}/instanceID"),
        "401",
    )
    .await;

    // A spoofed source address gets nothing, even from the MMDS; the real one still works.
    let spoofed = run(
        &a,
        None,
        &format!(
            "sudo ip addr add 169.254.0.99/32 dev eth0 && \
             if {MMDS_TOKEN} --interface 169.254.0.99 >/dev/null; then echo spoof=open; else echo spoof=closed; fi; \
             sudo ip addr del 169.254.0.99/32 dev eth0; \
             if [ -n \"$({MMDS_TOKEN})\" ]; then echo real=open; fi"
        ),
    )
    .await;
    assert_eq!(spoofed.stdout, "spoof=closed\nreal=open\n", "{spoofed:?}");

    // A machine outside the host that routes to the slots gets nothing; the host still does.
    let outsider = Outsider::new();
    assert!(
        outsider.connects("10.250.77.1", victim),
        "the outsider reaches the host"
    );
    let forward_drops = drops_of("wrenn-fwd-wiso");
    for (address, port) in [
        (slot_b.address, 49983),
        (slot_b.address, 8000),
        (slot_a.address, 49983),
    ] {
        assert!(
            !outsider.connects(&address.to_string(), port),
            "the outsider reached {address}:{port}"
        );
        assert!(
            reachable_from_host(address, port),
            "host → {address}:{port}"
        );
    }
    assert!(
        drops_of("wrenn-fwd-wiso") > forward_drops,
        "the host's forward chain never saw the outsider's packets"
    );
    drop(outsider);

    // A floods its MMDS with token requests while B asks for its own metadata.
    let flood = run(
        &a,
        None,
        "python3 - <<'EOF'\nimport http.client\nc = http.client.HTTPConnection('169.254.169.254', 80, timeout=10)\nfor _ in range(3000):\n    c.request('PUT', '/latest/api/token', headers={'X-metadata-token-ttl-seconds': '60'})\n    c.getresponse().read()\nprint('flooded')\nEOF",
    );
    let neighbour = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        run(&b, None, &mmds_identity_script()).await
    };
    let (flood, neighbour) = tokio::join!(flood, neighbour);
    assert_eq!(flood.stdout.trim(), "flooded", "{flood:?}");
    assert_eq!(neighbour.stdout.trim(), "\"iso-b\"", "{neighbour:?}");

    // A floods its console: the log stays under its cap and keeps the newest output. An
    // emulated serial port carries some 100 KB/s under software emulation, so the flood here
    // lasts 30 s (a few MiB, several times the cap); `wrenn_vmm::console`'s own test pushes
    // 200 MiB through the same copy.
    run_expecting(
        &a,
        "sudo sh -c 'timeout 30 sh -c \"tr \\\"\\\\000\\\" x < /dev/zero > /dev/ttyS0\"; echo console-flood-done > /dev/ttyS0'; echo done",
        "done",
    )
    .await;
    let vm_dir = agent.data_dir().join("sandboxes/iso-a/vm");
    let log = vm_dir.join("console.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read(&log).unwrap_or_default();
        let marker = b"console-flood-done";
        if text.windows(marker.len()).any(|w| w == marker) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the flood's end never reached the log"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let size = |path: std::path::PathBuf| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let total = size(log.clone()) + size(vm_dir.join("console.log.1"));
    assert!(
        total <= wrenn_vmm::console::CONSOLE_LOG_CAP,
        "console logs hold {total} bytes"
    );
    assert!(size(vm_dir.join("console.log.1")) > 0, "the log rotated");

    // A corrupt record at start is quarantined with its disk, not deleted.
    for sandbox in ["iso-a", "iso-b"] {
        let _: pb::DestroySandboxResponse = agent.destroy(sandbox).await.expect("DestroySandbox");
    }
    let broken = agent.data_dir().join("sandboxes/broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("sandbox.json"), b"{\"sandbox_id\": \"bro").unwrap();
    std::fs::write(broken.join("disk.qcow2"), b"paused disk").unwrap();
    agent.stop();
    agent.spawn();
    assert!(!broken.exists());
    let quarantined: Vec<_> = std::fs::read_dir(agent.data_dir().join("quarantine"))
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .collect();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert_eq!(
        std::fs::read(quarantined[0].join("disk.qcow2")).unwrap(),
        b"paused disk"
    );

    // Nothing of the agent is left: no slot, no host chain.
    agent.stop();
    let rules = Command::new("iptables").arg("-S").output().unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        !rules.contains("wrenn-in-wiso") && !rules.contains("wrenn-fwd-wiso"),
        "{rules}"
    );
    assert_eq!(agent.leftovers(), Vec::<String>::new());
    // The unreadable record stays where it was put, for a person to look at.
    assert!(quarantined[0].is_dir());
}
