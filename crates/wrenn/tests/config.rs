//! The layered configuration through the `wrenn` binary: a file's settings under the
//! environment and the flags (`wrenn config show`), and a bad value stopping a command with
//! the file, line and setting named.

use std::process::Command;

fn wrenn() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wrenn"));
    command
        .env_remove("WRENN_CONFIG")
        .env_remove("WRENN_JOIN_TOKEN");
    command
}

#[test]
fn config_show_gives_each_settings_value_and_source_flag_over_environment_over_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wrenn.toml");
    std::fs::write(
        &file,
        "[server]\napi-listen = \"0.0.0.0:3000\"\nquota-running = 7\nquota-paused = 8\njoin-token = \"in-the-file\"\n",
    )
    .unwrap();
    let shown = wrenn()
        .args(["config", "show", "--json", "server", "--quota-paused", "9"])
        .env("WRENN_CONFIG", &file)
        .env("WRENN_JOIN_TOKEN", "in-the-environment")
        .output()
        .unwrap();
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["file"], file.to_string_lossy().as_ref());
    let setting = |name: &str| -> (String, String) {
        let found = shown["settings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {shown}"));
        (
            found["value"].as_str().unwrap().to_string(),
            found["source"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(
        setting("api-listen"),
        ("0.0.0.0:3000".into(), "file".into())
    );
    assert_eq!(setting("quota-running"), ("7".into(), "file".into()));
    assert_eq!(setting("quota-paused"), ("9".into(), "flag".into()));
    assert_eq!(
        setting("join-token"),
        ("********".into(), "environment (WRENN_JOIN_TOKEN)".into())
    );
    assert_eq!(setting("create-burst"), ("50".into(), "default".into()));
    assert!(!shown.to_string().contains("in-the-"), "no secret is shown");
}

#[test]
fn a_bad_value_in_the_file_stops_the_command_naming_the_file_line_and_setting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wrenn.toml");
    std::fs::write(
        &file,
        "[server]\napi-listen = \"0.0.0.0:3000\"\n\ndown-after-ms = \"soon\"\n",
    )
    .unwrap();
    let run = wrenn()
        .arg("--config")
        .arg(&file)
        .args(["server", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!run.status.success());
    let said = String::from_utf8_lossy(&run.stderr);
    let expected = format!("{}:4: server.down-after-ms: ", file.display());
    assert!(said.contains(&expected), "{said}");
    assert!(said.contains("soon"), "{said}");
    assert!(!dir.path().join("data").exists(), "nothing was started");
}

#[test]
fn the_example_configuration_is_valid_for_the_commands_it_configures() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/wrenn.toml");
    for command in [&["server"][..], &["agent", "serve"], &["sandbox", "list"]] {
        let shown = wrenn()
            .arg("--config")
            .arg(&example)
            .args(["config", "show", "--json"])
            .args(command)
            .output()
            .unwrap();
        assert!(
            shown.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&shown.stderr)
        );
        let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
        let from_file = shown["settings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["source"] == "file")
            .count();
        assert!(from_file >= 2, "{command:?}: {shown}");
    }
}
