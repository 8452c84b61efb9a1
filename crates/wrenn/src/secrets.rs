//! Secrets the commands take (agent tokens, join tokens, API keys, the database URL): on the
//! command line, in an environment variable, or in a file (`--…-file PATH`), so that they need
//! not show in `ps` or shell history. A file's content is the secret, trailing newline removed.

use std::path::Path;

use anyhow::Context;

/// The secret `flag` names: given as a value (flag or environment variable) or in `file`; at
/// most one of the two.
pub fn resolve(
    flag: &str,
    value: Option<String>,
    file: Option<&Path>,
) -> anyhow::Result<Option<String>> {
    let value = value.filter(|v| !v.is_empty());
    match (value, file) {
        (Some(_), Some(_)) => anyhow::bail!(
            "{flag} is given twice: pass {flag} (or its environment variable) or {flag}-file, not both"
        ),
        (Some(value), None) => Ok(Some(value)),
        (None, Some(file)) => read(flag, file).map(Some),
        (None, None) => Ok(None),
    }
}

/// The secret in `file` (for `flag`'s messages): its content without the trailing line end;
/// an empty file is an error. A file others may read is used, with a warning.
pub fn read(flag: &str, file: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{flag}-file: reading {}", file.display()))?;
    let secret = text.trim_end_matches(['\n', '\r']).to_string();
    anyhow::ensure!(
        !secret.trim().is_empty(),
        "{flag}-file: {} is empty",
        file.display()
    );
    if let Ok(metadata) = std::fs::metadata(file)
        && metadata.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %file.display(),
            "{flag}-file is readable by other users: chmod 600 it"
        );
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_comes_from_one_place_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(
            resolve("--token", None, Some(&file)).unwrap().as_deref(),
            Some("s3cret")
        );
        assert_eq!(
            resolve("--token", Some("given".into()), None)
                .unwrap()
                .as_deref(),
            Some("given")
        );
        assert_eq!(resolve("--token", Some(String::new()), None).unwrap(), None);
        let both = resolve("--token", Some("given".into()), Some(&file)).unwrap_err();
        assert!(both.to_string().contains("not both"), "{both}");
        std::fs::write(&file, "\n").unwrap();
        assert!(
            resolve("--token", None, Some(&file))
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        let missing = resolve("--token", None, Some(&dir.path().join("nope"))).unwrap_err();
        assert!(
            format!("{missing:#}").contains("--token-file"),
            "{missing:#}"
        );
    }
}
