//! Flags more than one command takes, declared once: [`HostFlags`], how a host agent runs its
//! VMs and network slots (`wrenn agent serve` and `wrenn up`).

use clap::Args;
use wrenn_agent::network::SlotConfig;
use wrenn_vmm::accel::AccelSetting;

/// How the host agent runs VMs and their network slots.
#[derive(Debug, Clone, Args)]
pub struct HostFlags {
    /// The VMM that runs the VMs: qemu (KVM or software emulation) or firecracker (KVM only;
    /// its kernel from `wrenn image firecracker-kernel`).
    #[arg(long, default_value = "qemu")]
    pub vmm: wrenn_vmm::VmmKind,
    /// The Firecracker binary `--vmm firecracker` runs (built from
    /// github.com/firecracker-microvm/firecracker; see docs/architecture.md).
    #[arg(long, default_value = "firecracker")]
    pub firecracker: std::path::PathBuf,
    /// auto (probe KVM, fall back to TCG), kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: AccelSetting,
    /// Prefix of network namespace and interface names (1 to 6 lowercase letters or digits).
    #[arg(long, default_value = "wrenn")]
    pub slot_prefix: String,
    /// First network slot index (agents sharing a machine use disjoint ranges).
    #[arg(long, default_value_t = 1)]
    pub first_slot: u32,
    /// How many network slots (so how many running sandboxes) the host has.
    #[arg(long, default_value_t = 256)]
    pub slots: u32,
    /// Port of the metadata service guests reach as 169.254.169.254:80.
    #[arg(long, default_value_t = 49991)]
    pub mmds_port: u16,
    /// A range closed to guests by default (private, link-local, CGNAT, …) that guests with
    /// internet access may reach (repeat for more; e.g. an internal package mirror's network).
    /// The host's own addresses stay closed whatever this says.
    #[arg(long = "guest-open-range", value_name = "CIDR")]
    pub guest_open_ranges: Vec<wrenn_agent::firewall::Ipv4Cidr>,
    /// The resolver sandboxes with domain rules are answered from (`ip:port`); default: the
    /// host's first `nameserver` in /etc/resolv.conf.
    #[arg(long = "egress-dns", value_name = "IP:PORT")]
    pub egress_dns: Option<std::net::SocketAddr>,
    /// Certificate authorities (a PEM file) the agent trusts, besides the host's store, when it
    /// opens TLS to a destination whose requests a sandbox's header transforms change (an
    /// internal service with a private authority).
    #[arg(long = "egress-ca-file", value_name = "PEM")]
    pub egress_ca_file: Option<std::path::PathBuf>,
    /// Each VM's VMM (QEMU or Firecracker) runs as uid and gid BASE + its slot index (numeric,
    /// no account needed; keep the range unused on this host). 0 runs it as root: for debugging
    /// only, or for Firecracker on a host whose /dev/net/tun or /dev/kvm only root may open.
    #[arg(long, default_value_t = wrenn_agent::manager::DEFAULT_VMM_UID_BASE)]
    pub vmm_uid_base: u32,
    /// A registry (`host[:port]`) that template builds from images reach over plain HTTP, and
    /// may reach on a private address (repeat, or separate with commas). Any other registry is
    /// reached over HTTPS, on public addresses only.
    #[arg(
        long = "insecure-registry",
        value_name = "HOST[:PORT]",
        env = "WRENN_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,
    /// The most disk the host's cache of image layers takes, in MiB (the layers used least
    /// recently go first).
    #[arg(long, default_value_t = 10240)]
    pub image_cache_mib: u64,
    /// The template store, where template builds are put and templates this host lacks are
    /// pulled from: a directory, or s3://BUCKET[/PREFIX] (credentials, region and endpoint from
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP).
    /// Hosts of a fleet share one. `wrenn up` keeps one in its data directory unless told;
    /// `wrenn agent serve` has none unless told.
    #[arg(
        long,
        env = "WRENN_TEMPLATE_STORE",
        value_name = "DIR|s3://BUCKET/PREFIX"
    )]
    pub template_store: Option<String>,
    /// The most disk templates from the store take on this host, in MiB: past it, the least
    /// recently used that nothing stands on are removed (the store keeps them).
    #[arg(long, default_value_t = 20480)]
    pub template_cache_mib: u64,
    /// Templates keep the guest's memory in the snapshot's stream, read whole by every
    /// restore, instead of a memory file their sandboxes map and share (the default).
    #[arg(long, env = "WRENN_CLASSIC_MEMORY")]
    pub classic_memory: bool,
    /// VMMs kept started and waiting for each template created from in the last ten minutes,
    /// so that a create only loads the snapshot (0: every create starts its VMM).
    #[arg(long, env = "WRENN_WARM_POOL", default_value_t = wrenn_agent::manager::DEFAULT_WARM_POOL)]
    pub warm_pool: u32,
    /// The warm pool starts no VMM while the host has less memory available than this (MiB),
    /// and stops its VMMs meanwhile.
    #[arg(long, default_value_t = wrenn_agent::manager::DEFAULT_WARM_POOL_MIN_FREE_MIB)]
    pub warm_pool_min_free_mib: u64,
    /// How often each running sandbox's CPU, memory, disk and network are sampled and its
    /// console read, in seconds (fractions allowed, at least 0.1).
    #[arg(long, env = "WRENN_SAMPLE_INTERVAL", default_value_t = 5.0, value_parser = crate::flags::seconds_at_least_a_tenth)]
    pub sample_interval: f64,
}

/// A `--sample-interval`: a number of seconds, at least 0.1.
pub fn seconds_at_least_a_tenth(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if (0.1..=3600.0).contains(&seconds) => Ok(seconds),
        _ => Err(format!(
            "{text:?} is not a number of seconds from 0.1 to 3600"
        )),
    }
}

impl HostFlags {
    /// The network slots these flags describe.
    pub fn slot_config(&self) -> SlotConfig {
        SlotConfig {
            prefix: self.slot_prefix.clone(),
            first_index: self.first_slot,
            capacity: self.slots,
            mmds_port: self.mmds_port,
            opened_ranges: self.guest_open_ranges.clone(),
            upstream_dns: self.egress_dns,
            egress_authorities: self.egress_ca_file.clone(),
        }
    }
}
