//! The systemd units of `deploy/systemd/` pass `systemd-analyze verify` (with their
//! `/usr/local/bin/wrenn` pointed at the binary built here, which verify wants to find), and
//! keep what running as a service rests on: an agent's stop ends the agent alone, so its VMs
//! live on for the next agent to adopt; the control plane runs unprivileged.

use std::path::{Path, PathBuf};

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd")
}

fn units() -> Vec<PathBuf> {
    let mut units: Vec<PathBuf> = std::fs::read_dir(units_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "service"))
        .collect();
    units.sort();
    units
}

/// A unit's `Key=value` lines of its `[Service]` section.
fn service_settings(text: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut settings = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service
            && !line.starts_with('#')
            && let Some((key, value)) = line.split_once('=')
        {
            settings.push((key.to_string(), value.to_string()));
        }
    }
    settings
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    settings
        .iter()
        .find(|(name, _)| name == key)
        .map(|(_, value)| value.as_str())
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        wrenn_testkit::missing_prerequisite(
            "the systemd units' check",
            "systemd-analyze is not installed (Debian's systemd package)",
        );
        return;
    }
    let units = units();
    assert_eq!(units.len(), 3, "{units:?}");
    let work = tempfile::tempdir().unwrap();
    for unit in &units {
        let text = std::fs::read_to_string(unit).unwrap();
        assert!(
            text.contains("ExecStart=/usr/local/bin/wrenn "),
            "{}",
            unit.display()
        );
        let here = text.replace("/usr/local/bin/wrenn", env!("CARGO_BIN_EXE_wrenn"));
        let copy = work.path().join(unit.file_name().unwrap());
        std::fs::write(&copy, here).unwrap();
        let verified = std::process::Command::new(analyze)
            .args(["verify", "--man=no"])
            .arg(&copy)
            .env("SYSTEMD_LOG_LEVEL", "warning")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&verified.stderr).to_string()
            + &String::from_utf8_lossy(&verified.stdout);
        // Only what concerns the unit itself (not the host's other units, which verify also
        // loads and may find fault with).
        let about_it: Vec<&str> = said
            .lines()
            .filter(|line| line.contains(copy.file_name().unwrap().to_str().unwrap()))
            .collect();
        assert!(
            verified.status.success() && about_it.is_empty(),
            "{}: {said}",
            unit.display()
        );
    }
}

#[test]
fn agents_stop_alone_and_the_control_plane_runs_unprivileged() {
    for unit in units() {
        let name = unit.file_name().unwrap().to_string_lossy().into_owned();
        let settings = service_settings(&std::fs::read_to_string(&unit).unwrap());
        assert_eq!(setting(&settings, "Restart"), Some("on-failure"), "{name}");
        assert_eq!(setting(&settings, "KillSignal"), Some("SIGTERM"), "{name}");
        if name == "wrenn-server.service" {
            assert_eq!(setting(&settings, "User"), Some("wrenn"));
            assert_eq!(setting(&settings, "NoNewPrivileges"), Some("yes"));
            assert_eq!(
                setting(&settings, "KillMode"),
                None,
                "the whole cgroup goes"
            );
        } else {
            // The VMMs of its sandboxes live on for the next agent to adopt.
            assert_eq!(setting(&settings, "KillMode"), Some("process"), "{name}");
        }
    }
    let users = std::fs::read_to_string(units_dir().join("wrenn.sysusers")).unwrap();
    assert!(users.lines().any(|line| line.starts_with("u wrenn ")));
}
