//! `wrenn-bench slots`: what the sandbox firewall of issue #11 costs, against the rules before
//! it, in one run (interleaved, so both see the same machine): the time to make a network slot
//! (namespace, veth, tap, NAT and firewall) and the time to open a slot's egress (what a create
//! with internet access adds to the lease). Needs root; uses slot indexes 950 and 951.

use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use wrenn_agent::firewall::{self, Egress};
use wrenn_agent::network::{self, Slot};

use super::report::{ms, table};
use super::sandbox::{Latency, latency};

#[derive(Debug, Args)]
pub struct SlotsBenchArgs {
    /// Slots made with each rule set.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    #[arg(long)]
    json: bool,
}

/// The namespace rules before issue #11 (commit b2df443), kept here only as the baseline of this
/// benchmark: FORWARD accepted by default, the whole host-side address open to the guest.
fn legacy_rules(slot: &Slot, mmds_port: u16) -> String {
    format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -i {guest_side} -d {address}/32 -j DNAT --to-destination {guest}
-A PREROUTING -i tap0 -d {mmds}/32 -p tcp --dport 80 -j DNAT --to-destination {host_ip}:{mmds_port}
-A POSTROUTING -o {guest_side} -s {guest}/32 -j SNAT --to-source {address}
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:wrenn-egress - [0:0]
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i tap0 -d {host_ip}/32 -j ACCEPT
-A FORWARD -i tap0 -j wrenn-egress
-A wrenn-egress -j DROP
COMMIT
",
        guest_side = slot.veth_guest,
        address = slot.address,
        host_ip = slot.host_ip,
        guest = network::GUEST_IP,
        mmds = network::MMDS_IP,
    )
}

/// A slot as the agent made one before issue #11.
fn create_legacy(slot: &Slot, mmds_port: u16) -> anyhow::Result<()> {
    network::create_slot_with(slot, |ns| {
        network::add_tap(ns)?;
        network::in_namespace(ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"], None)?;
        network::in_namespace(
            ns,
            "iptables-restore",
            &[],
            Some(&legacy_rules(slot, mmds_port)),
        )
    })?;
    Ok(())
}

fn open_legacy(slot: &Slot) -> anyhow::Result<()> {
    network::in_namespace(&slot.netns, "iptables", &["-F", "wrenn-egress"], None)?;
    network::in_namespace(
        &slot.netns,
        "iptables",
        &["-A", "wrenn-egress", "-j", "ACCEPT"],
        None,
    )?;
    Ok(())
}

fn open_current(slot: &Slot) -> anyhow::Result<()> {
    let egress = Egress::Internet {
        resolver: firewall::DEFAULT_GUEST_RESOLVER,
        opened: Vec::new(),
        lists: firewall::AddressLists::default(),
        proxied: None,
        ca: None,
    };
    network::in_namespace(
        &slot.netns,
        "iptables-restore",
        &["--noflush"],
        Some(&firewall::egress_update(&egress)),
    )?;
    Ok(())
}

#[derive(Debug, Serialize)]
struct Report {
    create_before: Latency,
    create_now: Latency,
    open_egress_before: Latency,
    open_egress_now: Latency,
}

fn timed(work: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    work()?;
    Ok(started.elapsed())
}

pub async fn run(args: SlotsBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::Uid::effective().is_root(),
        "wrenn-bench slots makes network namespaces: run it as root"
    );
    let legacy = Slot::new("wbslot", 950);
    let current = Slot::new("wbslot", 951);
    let mmds_port = 9;
    let report = tokio::task::spawn_blocking(move || -> anyhow::Result<Report> {
        let mut samples: [Vec<Duration>; 4] = Default::default();
        let mut outcome = Ok(());
        for _ in 0..args.runs {
            let round = (|| -> anyhow::Result<()> {
                samples[0].push(timed(|| create_legacy(&legacy, mmds_port))?);
                samples[1].push(timed(|| {
                    Ok(network::create_slot_blocking(&current, mmds_port)?)
                })?);
                samples[2].push(timed(|| open_legacy(&legacy))?);
                samples[3].push(timed(|| open_current(&current))?);
                Ok(())
            })();
            network::delete_slot_blocking(&legacy);
            network::delete_slot_blocking(&current);
            if round.is_err() {
                outcome = round;
                break;
            }
        }
        outcome?;
        Ok(Report {
            create_before: latency(&samples[0]),
            create_now: latency(&samples[1]),
            open_egress_before: latency(&samples[2]),
            open_egress_now: latency(&samples[3]),
        })
    })
    .await??;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut table = table([
        "measure",
        "runs",
        "before #11 p50",
        "now p50",
        "before p95",
        "now p95",
        "change (p50)",
    ]);
    for (name, before, now) in [
        ("make a slot", &report.create_before, &report.create_now),
        (
            "open egress",
            &report.open_egress_before,
            &report.open_egress_now,
        ),
    ] {
        let quantiles = [before.p50_ms, now.p50_ms, before.p95_ms, now.p95_ms];
        let change = format!("{:+.0} %", (now.p50_ms / before.p50_ms - 1.0) * 100.0);
        let head = [name.to_string(), before.runs.to_string()];
        table.add_row(
            head.into_iter()
                .chain(quantiles.map(|q| ms(q, 1)))
                .chain([change]),
        );
    }
    println!("{table}");
    Ok(())
}
