//! Choosing QEMU's accelerator. `/dev/kvm` existing does not mean KVM runs a stock guest (on
//! these machines a nested hypervisor accepts `KVM_CREATE_VM` and then never runs the guest), so
//! `auto` boots a tiny guest under KVM with a short deadline and falls back to TCG (software
//! emulation) when it prints nothing. The result is cached in a file.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The accelerator setting: `auto`, `kvm` or `tcg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelSetting {
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelSetting {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(format!(
                "unknown accelerator {other:?}: use auto, kvm or tcg"
            )),
        }
    }
}

/// The accelerator a VM runs with. A snapshot restores only under the one it was taken with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How long the probe guest has to print its first kernel line under KVM.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(8);

#[derive(Debug, Serialize, Deserialize)]
struct CachedProbe {
    kernel: PathBuf,
    qemu: PathBuf,
    kvm_works: bool,
}

/// Resolves a setting to an accelerator; `auto` probes (or reads the cached probe).
pub async fn resolve(
    setting: AccelSetting,
    qemu: &Path,
    kernel: &Path,
    cache_file: Option<&Path>,
) -> Accel {
    match setting {
        AccelSetting::Kvm => return Accel::Kvm,
        AccelSetting::Tcg => return Accel::Tcg,
        AccelSetting::Auto => {}
    }
    if !Path::new("/dev/kvm").exists() {
        tracing::info!("no /dev/kvm: using TCG (software emulation)");
        return Accel::Tcg;
    }
    if let Some(cached) = cache_file
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| serde_json::from_str::<CachedProbe>(&text).ok())
        .filter(|cached| cached.kernel == kernel && cached.qemu == qemu)
    {
        return if cached.kvm_works {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
    }
    let kvm_works = probe_kvm(qemu, kernel).await;
    if kvm_works {
        tracing::info!("KVM runs a guest: using it");
    } else {
        tracing::warn!(
            "/dev/kvm exists but a probe guest printed nothing within {PROBE_DEADLINE:?} under KVM: using TCG (software emulation, much slower)"
        );
    }
    if let Some(path) = cache_file {
        let record = CachedProbe {
            kernel: kernel.to_path_buf(),
            qemu: qemu.to_path_buf(),
            kvm_works,
        };
        let _ = std::fs::write(path, serde_json::to_string(&record).unwrap_or_default());
    }
    if kvm_works { Accel::Kvm } else { Accel::Tcg }
}

/// Boots `kernel` under KVM with no root and no init: a working KVM prints the kernel banner
/// within moments, then the guest panics and QEMU exits (`-no-reboot`).
pub async fn probe_kvm(qemu: &Path, kernel: &Path) -> bool {
    let Ok(dir) = tempdir() else { return false };
    let console = dir.join("console.log");
    let child = tokio::process::Command::new(qemu)
        .args(crate::qemu::machine_arguments(Accel::Kvm, 128, 1))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 root=/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else {
        let _ = std::fs::remove_dir_all(&dir);
        return false;
    };
    let deadline = tokio::time::Instant::now() + PROBE_DEADLINE;
    let mut works = false;
    while tokio::time::Instant::now() < deadline {
        if std::fs::read_to_string(&console).is_ok_and(|text| text.contains("Linux version")) {
            works = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            works =
                std::fs::read_to_string(&console).is_ok_and(|text| text.contains("Linux version"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    works
}

fn tempdir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("wrenn-kvm-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_refuse_unknown_names() {
        assert_eq!("auto".parse::<AccelSetting>().unwrap(), AccelSetting::Auto);
        assert_eq!("tcg".parse::<AccelSetting>().unwrap(), AccelSetting::Tcg);
        assert!(
            "hvf"
                .parse::<AccelSetting>()
                .unwrap_err()
                .contains("auto, kvm or tcg")
        );
    }

    #[tokio::test]
    async fn explicit_settings_do_not_probe() {
        let nowhere = Path::new("/nonexistent");
        assert_eq!(
            resolve(AccelSetting::Tcg, nowhere, nowhere, None).await,
            Accel::Tcg
        );
        assert_eq!(
            resolve(AccelSetting::Kvm, nowhere, nowhere, None).await,
            Accel::Kvm
        );
    }
}
