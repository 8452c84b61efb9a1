//! cgroups v2 for user processes (as E2B's envd does): a `user` group for commands and a `ptys`
//! group for terminals under envd's cgroup root, so that their resource use can be read and
//! they can be frozen around a pause (frozen by `/snapshot/prepare`, thawed by `/init`).
//!
//! Used only where a cgroup v2 hierarchy is mounted and writable; otherwise envd says so once
//! and runs without. Controllers (`cpu`, `memory`, `pids`, `io`) are enabled for the children
//! where the hierarchy allows it; freezing needs none.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// cgroup2's filesystem magic number (statfs `f_type`).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The groups envd puts processes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    User,
    Ptys,
}

impl Group {
    fn name(self) -> &'static str {
        match self {
            Group::User => "user",
            Group::Ptys => "ptys",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("'{0}' is not on a cgroup v2 filesystem")]
    NotCgroup2(PathBuf),
    #[error("cannot set up cgroup '{path}': {source}")]
    Setup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// envd's cgroups.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
}

/// Resource use of one group (fields absent where the controller is not enabled).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct GroupUsage {
    pub cpu_usage_usec: Option<u64>,
    pub memory_current: Option<u64>,
    pub pids_current: Option<u64>,
    pub frozen: bool,
}

/// Resource use of envd's groups.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CgroupUsage {
    pub user: GroupUsage,
    pub ptys: GroupUsage,
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| { s.filesystem_type().0 } == CGROUP2_SUPER_MAGIC)
}

impl Cgroups {
    /// Creates (or reuses) `root` and its `user` and `ptys` groups.
    pub fn setup(root: &Path) -> Result<Cgroups, CgroupError> {
        let parent = root.parent().unwrap_or(Path::new("/"));
        if !is_cgroup2(parent) && !is_cgroup2(root) {
            return Err(CgroupError::NotCgroup2(parent.to_owned()));
        }
        let setup_error = |path: &Path| {
            let path = path.to_owned();
            move |source| CgroupError::Setup { path, source }
        };
        std::fs::create_dir_all(root).map_err(setup_error(root))?;
        // Best effort: the parent may not delegate the controllers, or may hold processes.
        if let Ok(available) = std::fs::read_to_string(root.join("cgroup.controllers")) {
            for controller in ["cpu", "memory", "pids", "io"] {
                if available.split_whitespace().any(|c| c == controller) {
                    let _ = std::fs::write(
                        root.join("cgroup.subtree_control"),
                        format!("+{controller}"),
                    );
                }
            }
        }
        for group in [Group::User, Group::Ptys] {
            let path = root.join(group.name());
            std::fs::create_dir_all(&path).map_err(setup_error(&path))?;
        }
        Ok(Cgroups {
            root: root.to_owned(),
        })
    }

    pub fn path(&self, group: Group) -> PathBuf {
        self.root.join(group.name())
    }

    /// Freezes (or thaws) every user process and terminal.
    pub fn set_frozen(&self, frozen: bool) -> std::io::Result<()> {
        for group in [Group::User, Group::Ptys] {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .open(self.path(group).join("cgroup.freeze"))?;
            file.write_all(if frozen { b"1" } else { b"0" })?;
        }
        Ok(())
    }

    /// Whether a group has reached the frozen state.
    pub fn is_frozen(&self, group: Group) -> bool {
        std::fs::read_to_string(self.path(group).join("cgroup.events"))
            .is_ok_and(|events| events.lines().any(|l| l.trim() == "frozen 1"))
    }

    pub fn usage(&self) -> CgroupUsage {
        CgroupUsage {
            user: self.group_usage(Group::User),
            ptys: self.group_usage(Group::Ptys),
        }
    }

    fn group_usage(&self, group: Group) -> GroupUsage {
        let path = self.path(group);
        let read_number = |file: &str| {
            std::fs::read_to_string(path.join(file))
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
        };
        let cpu_usage_usec = std::fs::read_to_string(path.join("cpu.stat"))
            .ok()
            .and_then(|stat| {
                stat.lines().find_map(|l| {
                    l.strip_prefix("usage_usec ")
                        .and_then(|v| v.trim().parse().ok())
                })
            });
        GroupUsage {
            cpu_usage_usec,
            memory_current: read_number("memory.current"),
            pids_current: read_number("pids.current"),
            frozen: self.is_frozen(group),
        }
    }
}
