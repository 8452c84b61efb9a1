//! The agent's state on disk, one directory per sandbox and per template under the data
//! directory, each with a JSON record written atomically (temporary file, fsync, rename). A
//! restarted agent reads them back to adopt its VMs. Everything here is root's alone: records,
//! disks and memory files are 0600 in 0700 directories (records hold envd access tokens; disks
//! and memory hold whatever the sandbox had). A record that cannot be read is never deleted:
//! its directory is moved to `quarantine/` with the disk and snapshot it holds.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use wrenn_vmm::accel::Accel;
use wrenn_vmm::{MachineSpec, SnapshotFiles, VmProcess};

use crate::error::AgentError;

pub use wrenn_agent_api::SandboxState;
use wrenn_agent_api::network::EgressSettings;

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
    /// Its egress rules (what `allow_internet` leaves open, they narrow).
    #[serde(default, skip_serializing_if = "EgressSettings::is_empty")]
    pub egress: EgressSettings,
    /// Its certificate authority, made when its rules first had header transforms (the
    /// guest trusts it from then on; its key stays here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_ca: Option<crate::egress::transform::SandboxCa>,
    pub metadata: BTreeMap<String, String>,
    pub error: Option<String>,
    /// The sandbox's own snapshot while paused (`None` for a pause that kept only the disk).
    pub snapshot: Option<SnapshotFiles>,
    /// Paused without its memory: the disk alone was kept, and a resume boots from it.
    #[serde(default)]
    pub disk_only: bool,
    /// The templates its disk's chain stands on besides its own template, oldest first: the
    /// checkpoints taken of it (snapshots, forks), whose layers its disk's top is over. They
    /// are kept while it exists.
    #[serde(default)]
    pub layered_on: Vec<String>,
}

impl SandboxRecord {
    /// Whether its disk or its template is `template_id`'s.
    pub fn stands_on(&self, template_id: &str) -> bool {
        self.template_id == template_id || self.layered_on.iter().any(|id| id == template_id)
    }
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
    /// The template it was built from (whose disk is below its own), if any.
    #[serde(default)]
    pub parent: Option<String>,
    /// The user and directory its sandboxes' commands run as and in (the build's last USER
    /// and WORKDIR); the base image's when `None`.
    #[serde(default)]
    pub default_user: Option<String>,
    #[serde(default)]
    pub default_workdir: Option<String>,
    /// The command its build left running in it.
    #[serde(default)]
    pub start_cmd: Option<String>,
    /// What its build was made of (source, steps, files, commands, size), hashed: a build of
    /// the same takes this template's files instead of running again.
    #[serde(default)]
    pub build_key: Option<String>,
    /// The SHA-256 of its files that were hashed (for the template store), by file name in
    /// its directory.
    #[serde(default)]
    pub digests: BTreeMap<String, String>,
    /// The SHA-256 of the store's blobs its pull made the disk layers it then pointed at their
    /// neighbours from (their bytes differ now in the backing file's name), by file name: a
    /// later pull of the same blob copies the layer and points it anew.
    #[serde(default)]
    pub pulled_digests: BTreeMap<String, String>,
    /// Whether the template store has it (it was put there, or pulled from there): such a
    /// template may be removed from the host when its cache is full.
    #[serde(default)]
    pub stored: bool,
    /// Its build's steps whose disks its chain keeps, for later builds that share their first
    /// steps (E2B's layer cache), step 0 being where the build started.
    #[serde(default)]
    pub steps: Vec<StepLayer>,
    /// The environment variables its sandboxes start with (a create's own come on top): a
    /// checkpoint's are its sandbox's.
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    /// A checkpoint of a sandbox taken for its forks (or a checkpoint whose memory could not be
    /// written): removed from the host as soon as no sandbox or template stands on it.
    #[serde(default)]
    pub ephemeral: bool,
    /// The sandbox it is a checkpoint of, if it is one.
    #[serde(default)]
    pub source_sandbox: Option<String>,
}

/// A build step's result kept in a template: the disk as the step left it (a layer of the
/// template's chain, frozen as the step ended) and what the steps had set by then. A later
/// build whose first steps are the same starts from it instead of running them again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepLayer {
    /// What the build was made of up to this step, hashed (its source, then every step with
    /// its arguments and files).
    pub key: String,
    /// The step's number (0: the source, before any step).
    pub step: usize,
    /// How many layers of the template's disk chain, counted from its base, make the disk as
    /// the step left it (a template's chain keeps its order when it is copied, put in the
    /// store or pulled, but not its files' names).
    pub layers: usize,
    pub user: String,
    pub workdir: String,
    pub envs: BTreeMap<String, String>,
}

impl TemplateRecord {
    /// The template as its host reports it to the control plane.
    pub fn report(&self) -> wrenn_agent_api::join::TemplateReport {
        wrenn_agent_api::join::TemplateReport {
            disk_size_mb: self.disk_size_mb(),
            template_id: self.template_id.clone(),
            memory_mib: self.machine.memory_mib,
            vcpus: self.machine.vcpus,
            envd_version: self.envd_version.clone(),
            image_key: self.image_key.clone(),
            created_at_ms: self.created_at_ms,
            memory_mapped: self.snapshot.ram.is_some(),
        }
    }

    /// The size of the template's root filesystem, the raw image at the bottom of its disk's
    /// chain (a sandbox's disk may grow to it), in MiB; 0 if it cannot be read.
    pub fn disk_size_mb(&self) -> u64 {
        wrenn_vmm::qcow2::chain(&self.machine.disk)
            .ok()
            .and_then(|layers| layers.last().cloned())
            .and_then(|base| std::fs::metadata(base.path).ok())
            .map(|m| m.len() >> 20)
            .unwrap_or(0)
    }
}

/// The records under the data directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

const SANDBOX_FILE: &str = "sandbox.json";
pub(crate) const TEMPLATE_FILE: &str = "template.json";

impl Store {
    pub fn open(root: &Path) -> Result<Self, AgentError> {
        for dir in [
            root.to_path_buf(),
            root.join("sandboxes"),
            root.join("templates"),
        ] {
            private_dir(&dir)?;
            // An older agent made them world-readable: tighten them.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |error| AgentError::internal(&format!("protecting {}", dir.display()), error),
            )?;
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
            0o600,
        )
    }

    /// Every sandbox record, and the directories that hold none (a create that never wrote
    /// its record: leftovers to remove). Directories whose record cannot be read are
    /// quarantined.
    pub fn load_sandboxes(&self) -> (Vec<SandboxRecord>, Vec<PathBuf>) {
        self.load_all("sandboxes", SANDBOX_FILE)
    }

    /// Every template record, and the directories that hold none (unfinished builds).
    pub fn load_templates(&self) -> (Vec<TemplateRecord>, Vec<PathBuf>) {
        self.load_all("templates", TEMPLATE_FILE)
    }

    /// Where unreadable records go, with everything beside them.
    pub fn quarantine_dir(&self) -> PathBuf {
        self.root.join("quarantine")
    }

    fn load_all<T: DeserializeOwned>(&self, kind: &str, file: &str) -> (Vec<T>, Vec<PathBuf>) {
        let mut records = Vec::new();
        let mut strays = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.root.join(kind)) else {
            return (records, strays);
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let bytes = match std::fs::read(path.join(file)) {
                Ok(bytes) => bytes,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    strays.push(path);
                    continue;
                }
                Err(error) => {
                    self.quarantine(kind, &path, &error.to_string());
                    continue;
                }
            };
            match serde_json::from_slice::<T>(&bytes) {
                Ok(record) => records.push(record),
                Err(error) => self.quarantine(kind, &path, &error.to_string()),
            }
        }
        (records, strays)
    }

    /// Moves a directory whose record is unreadable out of the way, whole.
    fn quarantine(&self, kind: &str, path: &Path, reason: &str) {
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = self.quarantine_dir().join(format!(
            "{kind}-{name}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
        ));
        let moved = private_dir(&self.quarantine_dir())
            .map_err(|error| error.to_string())
            .and_then(|()| std::fs::rename(path, &target).map_err(|error| error.to_string()));
        match moved {
            Ok(()) => tracing::error!(
                record = %path.display(),
                quarantined = %target.display(),
                reason,
                "a record could not be read: its directory was quarantined, nothing was deleted"
            ),
            Err(error) => tracing::error!(
                record = %path.display(),
                reason,
                %error,
                "a record could not be read and could not be quarantined: left where it is"
            ),
        }
    }
}

/// Creates a directory (and its parents) as 0700.
pub fn private_dir(dir: &Path) -> Result<(), AgentError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|error| AgentError::internal(&format!("creating {}", dir.display()), error))
}

/// Makes a file root's alone (0600).
pub fn private_file(file: &Path) -> Result<(), AgentError> {
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))
        .map_err(|error| AgentError::internal(&format!("protecting {}", file.display()), error))
}

/// Writes `value` as JSON to `path` with `mode`: to a temporary file beside it, synced,
/// renamed over it, and the directory (made 0700 if missing) synced.
pub fn write_atomically(path: &Path, value: &impl Serialize, mode: u32) -> Result<(), AgentError> {
    let bytes = serde_json::to_vec_pretty(value).expect("records serialise");
    write_bytes_atomically(path, &bytes, mode)
}

/// Writes `bytes` to `path` whole or not at all (a temporary beside it, synced, renamed), with
/// `mode`; its directory is made private if missing.
pub fn write_bytes_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AgentError> {
    let dir = path.parent().expect("records live in a directory");
    private_dir(dir)?;
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        // The rename itself is durable only once the directory is.
        std::fs::File::open(dir)?.sync_all()
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
                vmm_user: None,
                memory: Default::default(),
            },
            created_at_ms: 1,
            env_vars: BTreeMap::new(),
            access_token: Some("secret".into()),
            allow_internet: false,
            egress: EgressSettings::default(),
            egress_ca: None,
            metadata: BTreeMap::new(),
            error: None,
            snapshot: None,
            disk_only: false,
            layered_on: Vec::new(),
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

    #[test]
    fn an_unreadable_record_is_quarantined_with_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save_sandbox(&record("good")).unwrap();
        let broken = store.sandbox_dir("broken");
        std::fs::create_dir_all(&broken).unwrap();
        std::fs::write(
            broken.join(SANDBOX_FILE),
            b"{\"sandbox_id\": \"broken\", trunc",
        )
        .unwrap();
        std::fs::write(broken.join("disk.qcow2"), b"the paused disk").unwrap();
        std::fs::write(broken.join("memory.snap"), b"the paused memory").unwrap();
        let (records, strays) = store.load_sandboxes();
        assert_eq!(records, vec![record("good")]);
        assert!(strays.is_empty(), "a broken record is no stray: {strays:?}");
        assert!(!broken.exists());
        let quarantined: Vec<_> = std::fs::read_dir(store.quarantine_dir())
            .unwrap()
            .flatten()
            .map(|entry| entry.path())
            .collect();
        assert_eq!(quarantined.len(), 1);
        let name = quarantined[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with("sandboxes-broken-"), "{name}");
        assert_eq!(
            std::fs::read(quarantined[0].join("disk.qcow2")).unwrap(),
            b"the paused disk"
        );
        assert!(quarantined[0].join("memory.snap").is_file());
    }

    #[test]
    fn directories_are_private_even_when_an_older_agent_made_them_open() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("agent");
        std::fs::create_dir_all(root.join("templates")).unwrap();
        std::fs::set_permissions(
            root.join("templates"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let store = Store::open(&root).unwrap();
        store.save_sandbox(&record("a")).unwrap();
        for path in [
            root.clone(),
            root.join("templates"),
            root.join("sandboxes"),
            store.sandbox_dir("a"),
        ] {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", path.display());
        }
    }
}
