//! Composing a process's environment, in E2B's order (later entries win): `PATH` (envd's own),
//! `HOME`, `USER`, `LOGNAME`, then the sandbox-wide variables (set by `/init`, plus
//! `E2B_SANDBOX=true` and the sandbox identity), then the variables of the request itself.

use std::collections::BTreeMap;

use crate::users::User;

/// The `PATH` given to processes when envd itself has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The environment of a process run as `user`.
pub fn compose(
    envd_path: Option<&str>,
    user: &User,
    sandbox_vars: &BTreeMap<String, String>,
    request_vars: &std::collections::HashMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert(
        "PATH".to_owned(),
        envd_path.unwrap_or(DEFAULT_PATH).to_owned(),
    );
    env.insert("HOME".to_owned(), user.home.to_string_lossy().into_owned());
    env.insert("USER".to_owned(), user.name.clone());
    env.insert("LOGNAME".to_owned(), user.name.clone());
    for (key, value) in sandbox_vars {
        env.insert(key.clone(), value.clone());
    }
    for (key, value) in request_vars {
        env.insert(key.clone(), value.clone());
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::PathBuf;

    fn user() -> User {
        User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            home: PathBuf::from("/home/user"),
            shell: "/bin/bash".into(),
            groups: vec![1000],
        }
    }

    #[test]
    fn later_layers_win() {
        let sandbox = BTreeMap::from([
            ("E2B_SANDBOX".to_owned(), "true".to_owned()),
            ("HOME".to_owned(), "/sandbox-home".to_owned()),
            ("A".to_owned(), "sandbox".to_owned()),
        ]);
        let request = HashMap::from([("A".to_owned(), "request".to_owned())]);
        let env = compose(Some("/bin"), &user(), &sandbox, &request);
        assert_eq!(env["PATH"], "/bin");
        assert_eq!(env["USER"], "user");
        assert_eq!(env["LOGNAME"], "user");
        assert_eq!(env["HOME"], "/sandbox-home");
        assert_eq!(env["A"], "request");
        assert_eq!(env["E2B_SANDBOX"], "true");
    }

    #[test]
    fn default_path_when_envd_has_none() {
        let env = compose(None, &user(), &BTreeMap::new(), &HashMap::new());
        assert_eq!(env["PATH"], DEFAULT_PATH);
        assert_eq!(env["HOME"], "/home/user");
    }
}
