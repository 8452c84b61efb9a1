//! The guest's user accounts, read from `/etc/passwd` and `/etc/group`.
//!
//! envd is a static binary, so it reads the files itself instead of going through glibc's NSS
//! (which a static binary cannot load). The parsed tables are cached and re-read when either
//! file's modification time changes, so users added while envd runs are found.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

/// A user account: what a process running as it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: String,
    /// Supplementary groups, the primary group included.
    pub groups: Vec<u32>,
}

#[cfg(test)]
impl User {
    /// A user for tests: `name` with `uid`, `home` and `groups` (the first its primary group),
    /// and no shell.
    pub(crate) fn for_tests(
        name: &str,
        uid: u32,
        home: impl Into<PathBuf>,
        groups: Vec<u32>,
    ) -> User {
        User {
            name: name.to_owned(),
            uid,
            gid: groups[0],
            home: home.into(),
            shell: String::new(),
            groups,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("user '{0}' does not exist")]
    UnknownUser(String),
    #[error("reading the account database: {0}")]
    Database(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
    shell: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// The entries of an account file (`/etc/passwd`, `/etc/group`: `name:password:id:...`) that
/// are no comment and have at least `min_fields` fields, a name and a numeric id: each one's
/// name, id and fields.
fn records(text: &str, min_fields: usize) -> impl Iterator<Item = (String, u32, Vec<&str>)> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(move |line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < min_fields || fields[0].is_empty() {
                return None;
            }
            let id = fields[2].parse().ok()?;
            Some((fields[0].to_owned(), id, fields))
        })
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    records(text, 7)
        .filter_map(|(name, uid, fields)| {
            Some(PasswdEntry {
                name,
                uid,
                gid: fields[3].parse().ok()?,
                home: fields[5].to_owned(),
                shell: fields[6].to_owned(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    records(text, 4)
        .map(|(name, gid, fields)| GroupEntry {
            name,
            gid,
            members: fields[3]
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect(),
        })
        .collect()
}

#[derive(Debug, Default)]
struct Tables {
    stamp: Option<(Option<SystemTime>, Option<SystemTime>)>,
    users: Vec<PasswdEntry>,
    groups: Vec<GroupEntry>,
    user_names: HashMap<u32, String>,
    group_names: HashMap<u32, String>,
}

/// The account database, cached.
#[derive(Debug, Clone)]
pub struct Accounts {
    passwd_path: PathBuf,
    group_path: PathBuf,
    tables: Arc<RwLock<Tables>>,
}

impl Default for Accounts {
    fn default() -> Self {
        Accounts::new("/etc/passwd", "/etc/group")
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Accounts {
    pub fn new(passwd_path: impl Into<PathBuf>, group_path: impl Into<PathBuf>) -> Self {
        Accounts {
            passwd_path: passwd_path.into(),
            group_path: group_path.into(),
            tables: Arc::default(),
        }
    }

    fn refresh(&self) -> Result<(), UserError> {
        let stamp = (modified(&self.passwd_path), modified(&self.group_path));
        if self.tables.read().expect("account tables lock").stamp == Some(stamp) {
            return Ok(());
        }
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map_err(|e| UserError::Database(format!("{}: {e}", path.display())))
        };
        let users = parse_passwd(&read(&self.passwd_path)?);
        // A missing /etc/group only loses supplementary groups and names.
        let groups = parse_group(&read(&self.group_path).unwrap_or_default());
        let mut tables = self.tables.write().expect("account tables lock");
        tables.user_names = users.iter().map(|u| (u.uid, u.name.clone())).collect();
        tables.group_names = groups.iter().map(|g| (g.gid, g.name.clone())).collect();
        tables.users = users;
        tables.groups = groups;
        tables.stamp = Some(stamp);
        Ok(())
    }

    /// Looks a user up by name.
    pub fn user(&self, name: &str) -> Result<User, UserError> {
        self.refresh()?;
        let tables = self.tables.read().expect("account tables lock");
        let entry = tables
            .users
            .iter()
            .find(|u| u.name == name)
            .ok_or_else(|| UserError::UnknownUser(name.to_owned()))?;
        let mut groups = vec![entry.gid];
        for group in &tables.groups {
            if group.members.iter().any(|m| m == name) && !groups.contains(&group.gid) {
                groups.push(group.gid);
            }
        }
        Ok(User {
            name: entry.name.clone(),
            uid: entry.uid,
            gid: entry.gid,
            home: PathBuf::from(if entry.home.is_empty() {
                "/"
            } else {
                &entry.home
            }),
            shell: entry.shell.clone(),
            groups,
        })
    }

    /// The name of a uid, or the number as text when it has none (like `ls -l`).
    pub fn user_name(&self, uid: u32) -> String {
        self.name_of(uid, |tables| &tables.user_names)
    }

    /// The name of a gid, or the number as text when it has none.
    pub fn group_name(&self, gid: u32) -> String {
        self.name_of(gid, |tables| &tables.group_names)
    }

    /// The name `names` gives `id`, or the number as text when it has none.
    fn name_of(&self, id: u32, names: impl FnOnce(&Tables) -> &HashMap<u32, String>) -> String {
        let _ = self.refresh();
        let tables = self.tables.read().expect("account tables lock");
        names(&tables)
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # comment\n\
        user:x:1000:1000:,,,:/home/user:/bin/bash\n\
        broken line\n\
        nohome:x:1001:1001:::/bin/sh\n";
    const GROUP: &str = "root:x:0:\nuser:x:1000:\nsudo:x:27:user,other\ndocker:x:999: user \n";

    #[test]
    fn parses_passwd_and_skips_bad_lines() {
        let users = parse_passwd(PASSWD);
        assert_eq!(users.len(), 3);
        assert_eq!(users[1].name, "user");
        assert_eq!(users[2].home, "");
        assert_eq!(users[1].uid, 1000);
        assert_eq!(users[1].home, "/home/user");
    }

    #[test]
    fn lookup_collects_supplementary_groups() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("passwd"), PASSWD).unwrap();
        std::fs::write(dir.path().join("group"), GROUP).unwrap();
        let accounts = Accounts::new(dir.path().join("passwd"), dir.path().join("group"));
        let user = accounts.user("user").unwrap();
        assert_eq!(user.groups, vec![1000, 27, 999]);
        assert_eq!(user.home, PathBuf::from("/home/user"));
        assert_eq!(
            accounts.user("ghost"),
            Err(UserError::UnknownUser("ghost".into()))
        );
        assert_eq!(accounts.user_name(1000), "user");
        assert_eq!(accounts.user_name(4242), "4242");
        assert_eq!(accounts.group_name(27), "sudo");
    }

    #[test]
    fn picks_up_new_users() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        std::fs::write(&passwd, "root:x:0:0:root:/root:/bin/bash\n").unwrap();
        let accounts = Accounts::new(&passwd, dir.path().join("group"));
        assert!(accounts.user("late").is_err());
        std::fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/bash\nlate:x:5:5::/l:/bin/sh\n",
        )
        .unwrap();
        // Make sure the modification time moves even on coarse-grained filesystems.
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&passwd)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(accounts.user("late").unwrap().uid, 5);
    }
}
