//! The agent's state on disk, one directory per sandbox and per template under the data
//! directory, each with a JSON record written atomically (temporary file, fsync, rename). A
//! restarted agent reads them back to adopt its VMs; sandbox records are readable by root only
//! (they hold envd access tokens).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use wrenn_vmm::accel::Accel;
use wrenn_vmm::{MachineSpec, SnapshotFiles, VmProcess};

use crate::error::AgentError;

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Starting,
    Running,
    Pausing,
    Paused,
    Resuming,
    Failed,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Pausing => "pausing",
            SandboxState::Paused => "paused",
            SandboxState::Resuming => "resuming",
            SandboxState::Failed => "failed",
        }
    }
}

/// Everything the agent knows of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub sandbox_id: String,
    pub template_id: String,
    pub state: SandboxState,
    /// The network slot while the VM runs.
    pub slot: Option<u32>,
    /// The VMM process while it runs.
    pub vm: Option<VmProcess>,
    pub machine: MachineSpec,
    pub created_at_ms: i64,
    pub env_vars: BTreeMap<String, String>,
    pub access_token: Option<String>,
    pub allow_internet: bool,
    pub metadata: BTreeMap<String, String>,
    pub error: Option<String>,
    /// The sandbox's own snapshot while paused.
    pub snapshot: Option<SnapshotFiles>,
}

/// A template: a booted image, prepared and snapshotted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub template_id: String,
    /// The machine snapshotted (its disk is the template's frozen disk).
    pub machine: MachineSpec,
    pub accel: Accel,
    pub snapshot: SnapshotFiles,
    pub created_at_ms: i64,
    pub image_key: String,
    pub envd_version: String,
    pub build_ms: u64,
}

/// The records under the data directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

const SANDBOX_FILE: &str = "sandbox.json";
const TEMPLATE_FILE: &str = "template.json";

impl Store {
    pub fn open(root: &Path) -> Result<Self, AgentError> {
        for dir in ["sandboxes", "templates"] {
            std::fs::create_dir_all(root.join(dir)).map_err(|error| {
                AgentError::internal(&format!("creating {}", root.join(dir).display()), error)
            })?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.root.join("sandboxes").join(id)
    }

    pub fn template_dir(&self, id: &str) -> PathBuf {
        self.root.join("templates").join(id)
    }

    pub fn save_sandbox(&self, record: &SandboxRecord) -> Result<(), AgentError> {
        write_atomically(
            &self.sandbox_dir(&record.sandbox_id).join(SANDBOX_FILE),
            record,
            0o600,
        )
    }

    pub fn save_template(&self, record: &TemplateRecord) -> Result<(), AgentError> {
        write_atomically(
            &self.template_dir(&record.template_id).join(TEMPLATE_FILE),
            record,
            0o644,
        )
    }

    /// Every sandbox record, and the directories that hold none (leftovers to remove).
    pub fn load_sandboxes(&self) -> (Vec<SandboxRecord>, Vec<PathBuf>) {
        load_all(&self.root.join("sandboxes"), SANDBOX_FILE)
    }

    /// Every template record, and the directories that hold none.
    pub fn load_templates(&self) -> (Vec<TemplateRecord>, Vec<PathBuf>) {
        load_all(&self.root.join("templates"), TEMPLATE_FILE)
    }
}

fn load_all<T: DeserializeOwned>(dir: &Path, file: &str) -> (Vec<T>, Vec<PathBuf>) {
    let mut records = Vec::new();
    let mut strays = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (records, strays);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let record = std::fs::read(path.join(file))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<T>(&bytes).ok());
        match record {
            Some(record) => records.push(record),
            None => strays.push(path),
        }
    }
    (records, strays)
}

fn write_atomically(path: &Path, value: &impl Serialize, mode: u32) -> Result<(), AgentError> {
    let dir = path.parent().expect("records live in a directory");
    std::fs::create_dir_all(dir)
        .map_err(|error| AgentError::internal(&format!("creating {}", dir.display()), error))?;
    let temp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).expect("records serialise");
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    written.map_err(|error| AgentError::internal(&format!("writing {}", path.display()), error))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> SandboxRecord {
        SandboxRecord {
            sandbox_id: id.into(),
            template_id: "base".into(),
            state: SandboxState::Running,
            slot: Some(3),
            vm: None,
            machine: MachineSpec {
                kernel: "/k".into(),
                initrd: None,
                cmdline: String::new(),
                disk: "/d".into(),
                memory_mib: 512,
                vcpus: 1,
                netns: None,
                tap: "tap0".into(),
                mac: "02:00:00:00:00:01".into(),
            },
            created_at_ms: 1,
            env_vars: BTreeMap::new(),
            access_token: Some("secret".into()),
            allow_internet: false,
            metadata: BTreeMap::new(),
            error: None,
            snapshot: None,
        }
    }

    #[test]
    fn records_round_trip_and_stray_directories_are_listed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save_sandbox(&record("a")).unwrap();
        std::fs::create_dir_all(store.sandbox_dir("half")).unwrap();
        let (records, strays) = store.load_sandboxes();
        assert_eq!(records, vec![record("a")]);
        assert_eq!(strays, vec![store.sandbox_dir("half")]);
        let mode = std::fs::metadata(store.sandbox_dir("a").join(SANDBOX_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "records with tokens are root-only");
    }
}
