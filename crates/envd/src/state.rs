//! envd's shared state: the sandbox session set by `/init` (access token, default user and
//! working directory, sandbox-wide environment variables) and the long-lived services
//! (accounts, processes, watchers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use crate::fs::watch::WatcherRegistry;
use crate::metrics::CpuSampler;
use crate::mmds::{MmdsClient, SandboxMetadata};
use crate::paths::{self, PathError};
use crate::ports::{PortConfig, PortSubsystem};
use crate::process::ProcessManager;
use crate::server::ConnectionTracker;
use crate::users::{Accounts, User, UserError};

/// The version as a literal, for `concat!` (the binary's marker and `--version`).
#[macro_export]
macro_rules! envd_version {
    () => {
        "0.6.4"
    };
}

/// The version envd reports: the E2B envd version whose SDK feature gates this envd meets in
/// full (every gate of `e2b` 2.63's `envd/versions.py` and `versions.ts` up to 0.6.4).
pub const ENVD_VERSION: &str = envd_version!();

/// Prefix of the marker that image tooling finds in the binary to learn its version without
/// running it; the version and a NUL follow it.
pub const VERSION_MARKER_PREFIX: &[u8] = b"wrenn-envd-protocol-version=";

/// Kept in the binary's read-only data whether or not anything reads it.
#[used]
static VERSION_MARKER: [u8; VERSION_MARKER_PREFIX.len() + envd_version!().len() + 1] =
    *concat_bytes_marker();

const fn concat_bytes_marker()
-> &'static [u8; VERSION_MARKER_PREFIX.len() + envd_version!().len() + 1] {
    match concat!("wrenn-envd-protocol-version=", envd_version!(), "\0")
        .as_bytes()
        .as_array()
    {
        Some(marker) => marker,
        None => panic!("marker length"),
    }
}

/// The user calls run as when neither the call nor `/init` names one, if the account exists
/// (as in E2B's templates, whose SDK code expects `/home/user`).
pub const DEFAULT_USER: &str = "user";
/// The user calls run as when neither the call nor `/init` names one and [`DEFAULT_USER`]
/// does not exist.
pub const FALLBACK_USER: &str = "root";

/// Settings fixed at start-up.
#[derive(Debug, Clone)]
pub struct EnvdConfig {
    /// The largest Connect message accepted.
    pub max_message_bytes: usize,
    /// Whether `/init` may set the system clock.
    pub sync_clock: bool,
    /// Forwarding of loopback-only ports to the external address.
    pub ports: PortConfig,
    /// The metadata service (`host:port`); `None` outside Firecracker-like VMs.
    pub mmds_address: Option<String>,
    /// Where the sandbox identity files go (`<run_dir>/wrenn`, `<run_dir>/e2b`).
    pub run_dir: PathBuf,
    /// envd's cgroup v2 root; `None` runs without cgroups.
    pub cgroup_root: Option<PathBuf>,
    /// Where `/init`'s `caBundle` goes.
    pub trust_store: crate::trust::TrustStore,
}

impl Default for EnvdConfig {
    fn default() -> Self {
        EnvdConfig {
            max_message_bytes: wrenn_connect::DEFAULT_MAX_MESSAGE_BYTES,
            sync_clock: true,
            ports: PortConfig {
                external: None,
                scan_interval: std::time::Duration::from_secs(1),
            },
            mmds_address: None,
            run_dir: PathBuf::from("/run"),
            cgroup_root: None,
            trust_store: crate::trust::TrustStore::default(),
        }
    }
}

/// What `/init` sets.
#[derive(Debug, Clone, Default)]
pub struct Session {
    pub access_token: Option<String>,
    pub default_user: Option<String>,
    pub default_workdir: Option<PathBuf>,
    pub env_vars: BTreeMap<String, String>,
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct Envd {
    pub config: EnvdConfig,
    pub accounts: Accounts,
    pub processes: ProcessManager,
    pub watchers: WatcherRegistry,
    pub cpu: Mutex<CpuSampler>,
    /// Every open connection (snapshot safety).
    pub connections: std::sync::Arc<ConnectionTracker>,
    pub ports: PortSubsystem,
    pub mmds: Option<MmdsClient>,
    pub cgroups: Option<crate::cgroups::Cgroups>,
    /// The sandbox identity read from MMDS.
    identity: RwLock<Option<SandboxMetadata>>,
    /// How many identities `/init` gave: a metadata read begun before the newest one (a read
    /// in flight when the template was snapshotted, finishing in a restored clone) is stale.
    identities_given: std::sync::atomic::AtomicU64,
    session: RwLock<Session>,
    /// Serialises `/init` calls.
    pub init_lock: tokio::sync::Mutex<()>,
    /// The timestamp (unix ns) of the newest `/init` applied.
    pub last_init_ns: Mutex<i64>,
    /// envd's own PATH, handed to the processes it starts.
    path_env: Option<String>,
}

impl Envd {
    pub fn new(config: EnvdConfig) -> Self {
        Envd::with_accounts(config, Accounts::default())
    }

    pub fn with_accounts(config: EnvdConfig, accounts: Accounts) -> Self {
        Envd {
            ports: PortSubsystem::new(config.ports.clone()),
            mmds: config.mmds_address.as_deref().map(MmdsClient::new),
            cgroups: config.cgroup_root.as_deref().and_then(|root| {
                match crate::cgroups::Cgroups::setup(root) {
                    Ok(cgroups) => Some(cgroups),
                    Err(error) => {
                        tracing::warn!(%error, "running without cgroups");
                        None
                    }
                }
            }),
            identity: RwLock::new(None),
            identities_given: std::sync::atomic::AtomicU64::new(0),
            connections: std::sync::Arc::default(),
            config,
            accounts,
            processes: ProcessManager::default(),
            watchers: WatcherRegistry::default(),
            cpu: Mutex::new(CpuSampler::default()),
            session: RwLock::new(Session::default()),
            init_lock: tokio::sync::Mutex::new(()),
            last_init_ns: Mutex::new(i64::MIN),
            path_env: std::env::var("PATH").ok(),
        }
    }

    pub fn session(&self) -> Session {
        self.read_session(Session::clone)
    }

    /// What `read` takes from the session (under its lock).
    fn read_session<T>(&self, read: impl FnOnce(&Session) -> T) -> T {
        read(&self.session.read().expect("session lock"))
    }

    pub fn update_session(&self, update: impl FnOnce(&mut Session)) {
        update(&mut self.session.write().expect("session lock"));
    }

    pub fn access_token(&self) -> Option<String> {
        self.read_session(|session| session.access_token.clone())
    }

    pub fn path_env(&self) -> Option<&str> {
        self.path_env.as_deref()
    }

    /// The user a call runs as: the one it names, else the session's default (from `/init`),
    /// else `user` when that account exists, else root.
    pub fn user(&self, requested: Option<&str>) -> Result<User, UserError> {
        if let Some(name) = requested {
            return self.accounts.user(name);
        }
        match self.read_session(|session| session.default_user.clone()) {
            Some(name) => self.accounts.user(&name),
            None => self
                .accounts
                .user(DEFAULT_USER)
                .or_else(|_| self.accounts.user(FALLBACK_USER)),
        }
    }

    /// Resolves a client's path for `user` (see [`paths::resolve`]).
    pub fn resolve_path(&self, path: &str, user: &User) -> Result<PathBuf, PathError> {
        let workdir = self.default_workdir();
        paths::resolve(path, &user.home, workdir.as_deref())
    }

    /// The working directory of a process that names none.
    pub fn default_cwd(&self, user: &User) -> PathBuf {
        self.default_workdir().unwrap_or_else(|| user.home.clone())
    }

    /// The working directory `/init` set, if any.
    fn default_workdir(&self) -> Option<PathBuf> {
        self.read_session(|session| session.default_workdir.clone())
    }

    /// The sandbox-wide environment variables of processes.
    pub fn sandbox_env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::from([("E2B_SANDBOX".to_owned(), "true".to_owned())]);
        if let Some(identity) = self.identity.read().expect("identity lock").as_ref() {
            env.insert("E2B_SANDBOX_ID".to_owned(), identity.sandbox_id.clone());
            env.insert("E2B_TEMPLATE_ID".to_owned(), identity.template_id.clone());
        }
        env.extend(self.read_session(|session| session.env_vars.clone()));
        env
    }
}

impl Envd {
    /// Records the sandbox identity `metadata` (from `source`) and writes its files, when it
    /// differs from the one recorded.
    pub fn set_identity(&self, metadata: &SandboxMetadata, source: &str) {
        self.set_identity_unless_given_since(metadata, source, None);
    }

    /// [`Envd::set_identity`], unless `/init` gave an identity since the count was
    /// `given_before` (then `false`, and nothing changes).
    fn set_identity_unless_given_since(
        &self,
        metadata: &SandboxMetadata,
        source: &str,
        given_before: Option<u64>,
    ) -> bool {
        use std::sync::atomic::Ordering;
        let mut identity = self.identity.write().expect("identity lock");
        if given_before.is_some_and(|before| self.identities_given.load(Ordering::SeqCst) != before)
        {
            return false;
        }
        if source == "/init" {
            self.identities_given.fetch_add(1, Ordering::SeqCst);
        }
        if identity.as_ref() != Some(metadata) {
            if let Err(error) = crate::mmds::write_identity(&self.config.run_dir, metadata) {
                tracing::warn!(%error, "could not write the sandbox identity files");
            }
            tracing::info!(sandbox = %metadata.sandbox_id, template = %metadata.template_id, source, "sandbox identity");
            *identity = Some(metadata.clone());
        }
        true
    }
}

/// Whether `path` is an existing directory.
pub fn is_dir(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_dir())
}

impl Envd {
    /// Reads the metadata service (when there is one) within `deadline`; on success records the
    /// sandbox identity and writes its files. `None` without MMDS or when it does not answer.
    pub async fn refresh_identity(&self, deadline: std::time::Duration) -> Option<SandboxMetadata> {
        let mmds = self.mmds.as_ref()?;
        let given_before = self
            .identities_given
            .load(std::sync::atomic::Ordering::SeqCst);
        match mmds.fetch(deadline).await {
            Ok(metadata) => {
                if !self.set_identity_unless_given_since(&metadata, "MMDS", Some(given_before)) {
                    tracing::info!(sandbox = %metadata.sandbox_id, "a metadata read begun before the last /init's identity is dropped");
                    return None;
                }
                Some(metadata)
            }
            Err(error) => {
                tracing::debug!(%error, "MMDS unavailable");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "root:x:0:0:root:/root:/bin/bash\n";
    const USER: &str = "user:x:1000:1000::/home/user:/bin/bash\n";
    const OTHER: &str = "other:x:1001:1001::/home/other:/bin/sh\n";

    /// An envd whose account database is `passwd` (in a temporary directory kept alive with it).
    fn envd_with(passwd: &str) -> (Envd, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("passwd"), passwd).unwrap();
        std::fs::write(dir.path().join("group"), "").unwrap();
        let accounts = Accounts::new(dir.path().join("passwd"), dir.path().join("group"));
        (Envd::with_accounts(EnvdConfig::default(), accounts), dir)
    }

    #[test]
    fn a_metadata_read_begun_before_an_inits_identity_does_not_undo_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = EnvdConfig {
            run_dir: dir.path().to_owned(),
            ..EnvdConfig::default()
        };
        let envd = Envd::with_accounts(
            config,
            Accounts::new(dir.path().join("passwd"), dir.path().join("group")),
        );
        let identity = |id: &str| SandboxMetadata {
            sandbox_id: id.into(),
            template_id: "base".into(),
            ..Default::default()
        };
        let sandbox_id = |envd: &Envd| envd.sandbox_env().get("E2B_SANDBOX_ID").cloned();
        // The template's build: its /init, then a metadata read still in flight at the snapshot.
        envd.set_identity(&identity("template-base"), "/init");
        let in_flight = envd
            .identities_given
            .load(std::sync::atomic::Ordering::SeqCst);
        // The restored clone's /init gives its own identity...
        envd.set_identity(&identity("sbx1"), "/init");
        // ...and the old read, finishing now, changes nothing.
        assert!(!envd.set_identity_unless_given_since(
            &identity("template-base"),
            "MMDS",
            Some(in_flight)
        ));
        assert_eq!(sandbox_id(&envd).as_deref(), Some("sbx1"));
        // A read begun after it is taken.
        let now = envd
            .identities_given
            .load(std::sync::atomic::Ordering::SeqCst);
        assert!(envd.set_identity_unless_given_since(&identity("sbx1"), "MMDS", Some(now)));
    }

    /// Asserts that `envd`'s default user is `name`, that its processes start in `cwd`, and
    /// that `relative` resolves to `resolved` for it; returns the user.
    fn assert_defaults(envd: &Envd, name: &str, cwd: &str, relative: &str, resolved: &str) -> User {
        let user = envd.user(None).unwrap();
        assert_eq!(user.name, name);
        assert_eq!(envd.default_cwd(&user), PathBuf::from(cwd));
        assert_eq!(
            envd.resolve_path(relative, &user).unwrap(),
            PathBuf::from(resolved)
        );
        user
    }

    #[test]
    fn default_user_is_user_when_the_account_exists() {
        let (envd, _dir) = envd_with(&format!("{ROOT}{USER}{OTHER}"));
        assert_defaults(
            &envd,
            DEFAULT_USER,
            "/home/user",
            "notes/a.txt",
            "/home/user/notes/a.txt",
        );
        // A named user wins over the default.
        assert_eq!(envd.user(Some("root")).unwrap().name, "root");
        assert_eq!(
            envd.user(Some("ghost")),
            Err(UserError::UnknownUser("ghost".into()))
        );
    }

    #[test]
    fn default_user_falls_back_to_root_without_user() {
        let (envd, _dir) = envd_with(&format!("{ROOT}{OTHER}"));
        assert_defaults(&envd, FALLBACK_USER, "/root", "a.txt", "/root/a.txt");
    }

    #[test]
    fn init_names_the_default_user_and_workdir() {
        let (envd, _dir) = envd_with(&format!("{ROOT}{USER}{OTHER}"));
        envd.update_session(|session| {
            session.default_user = Some("other".into());
            session.default_workdir = Some("/srv".into());
        });
        // Relative paths stay relative to the home; only an empty path means the workdir.
        let user = assert_defaults(&envd, "other", "/srv", "a.txt", "/home/other/a.txt");
        assert_eq!(envd.resolve_path("", &user).unwrap(), PathBuf::from("/srv"));
        // A default user /init named that does not exist is an error, not a silent fallback.
        envd.update_session(|session| session.default_user = Some("gone".into()));
        assert_eq!(envd.user(None), Err(UserError::UnknownUser("gone".into())));
    }
}
