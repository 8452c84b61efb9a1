//! The sandbox's certificate authority in the guest's trust store (`/init`'s `caBundle`).
//!
//! The host agent makes an authority per sandbox whose egress rules set headers on its
//! HTTPS requests; the guest must trust it. envd writes it where Debian keeps local
//! authorities (so `update-ca-certificates`, run later by anyone, keeps it) and into the
//! system bundle itself, as one marked block that a later `/init` replaces (a fork or a
//! sandbox started from a snapshot has an authority of its own). Both writes are atomic (a
//! temporary file renamed over the old): a reader sees the old bundle or the new, never half.
//! An `/init` with the authority already installed changes nothing.

use std::io;
use std::path::{Path, PathBuf};

/// Where the authority goes.
#[derive(Debug, Clone)]
pub struct TrustStore {
    /// The authority alone.
    pub ca_file: PathBuf,
    /// The system bundle (every authority, PEM), which OpenSSL, curl and Python read.
    pub bundle: PathBuf,
}

impl Default for TrustStore {
    fn default() -> Self {
        TrustStore {
            ca_file: PathBuf::from("/usr/local/share/ca-certificates/wrenn-sandbox-ca.crt"),
            bundle: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
        }
    }
}

const BEGIN: &str = "# wrenn sandbox authority: begin\n";
const END: &str = "# wrenn sandbox authority: end\n";
/// The largest `caBundle` taken.
pub const MAX_BUNDLE_BYTES: usize = 64 * 1024;

/// Why a `caBundle` was not installed.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("caBundle is not PEM certificates: {0}")]
    Invalid(&'static str),
    #[error("writing {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Checks that `pem` is one or more PEM certificates and nothing else.
fn validate(pem: &str) -> Result<(), TrustError> {
    if pem.len() > MAX_BUNDLE_BYTES {
        return Err(TrustError::Invalid("over 64 KiB"));
    }
    let mut inside = false;
    let mut certificates = 0;
    for line in pem.lines().map(str::trim_end) {
        match line {
            "-----BEGIN CERTIFICATE-----" if !inside => inside = true,
            "-----END CERTIFICATE-----" if inside => {
                inside = false;
                certificates += 1;
            }
            "" if !inside => {}
            _ if inside
                && line
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')) => {}
            _ => return Err(TrustError::Invalid("a line outside a certificate block")),
        }
    }
    if inside {
        return Err(TrustError::Invalid("a certificate block is not closed"));
    }
    if certificates == 0 {
        return Err(TrustError::Invalid("no certificate"));
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in its directory, renamed over it.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), TrustError> {
    let failed = |source| TrustError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(failed)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.wrenn-{}", std::process::id()));
    let written = (|| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written.map_err(failed)
}

/// `bundle` without a block an earlier install added.
fn without_block(bundle: &str) -> String {
    match (bundle.find(BEGIN), bundle.find(END)) {
        (Some(begin), Some(end)) if end > begin => {
            format!("{}{}", &bundle[..begin], &bundle[end + END.len()..])
        }
        _ => bundle.to_string(),
    }
}

/// What [`install`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    /// Whether anything was written (the same authority again writes nothing).
    pub changed: bool,
    /// Whether the system bundle holds it (a guest without one, another distribution's
    /// layout, gets none made: a bundle of the authority alone would distrust everything else).
    pub in_bundle: bool,
}

/// The variables that point runtimes with trust stores of their own at the authority: Node
/// always (it adds the file to its own roots), Python's requests only when the system bundle
/// holds it (the variable replaces requests' roots).
pub fn variables(store: &TrustStore, installed: Installed) -> Vec<(String, String)> {
    let mut variables = vec![(
        "NODE_EXTRA_CA_CERTS".to_string(),
        store.ca_file.display().to_string(),
    )];
    if installed.in_bundle {
        variables.push((
            "REQUESTS_CA_BUNDLE".to_string(),
            store.bundle.display().to_string(),
        ));
    }
    variables
}

/// Installs `pem` as the sandbox's authority (replacing an earlier one).
pub fn install(store: &TrustStore, pem: &str) -> Result<Installed, TrustError> {
    validate(pem)?;
    let mut pem = pem.trim().to_string();
    pem.push('\n');
    let block = format!("{BEGIN}{pem}{END}");
    let bundle_exists = store.bundle.exists();
    if std::fs::read_to_string(&store.ca_file).is_ok_and(|current| current == pem)
        && (!bundle_exists
            || std::fs::read_to_string(&store.bundle).is_ok_and(|bundle| bundle.contains(&block)))
    {
        return Ok(Installed {
            changed: false,
            in_bundle: bundle_exists,
        });
    }
    write_atomically(&store.ca_file, pem.as_bytes())?;
    if !bundle_exists {
        return Ok(Installed {
            changed: true,
            in_bundle: false,
        });
    }
    // A bundle that is a link (to another distribution's store) is written where it leads.
    let bundle_path = std::fs::canonicalize(&store.bundle).unwrap_or(store.bundle.clone());
    let current = std::fs::read_to_string(&bundle_path).map_err(|source| TrustError::Io {
        path: bundle_path.clone(),
        source,
    })?;
    let mut bundle = without_block(&current);
    if !bundle.is_empty() && !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(&block);
    write_atomically(&bundle_path, bundle.as_bytes())?;
    Ok(Installed {
        changed: true,
        in_bundle: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUOne=\n-----END CERTIFICATE-----\n";
    const TWO: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUTwo=\n-----END CERTIFICATE-----\n";

    fn store(dir: &Path) -> TrustStore {
        TrustStore {
            ca_file: dir.join("local/wrenn.crt"),
            bundle: dir.join("certs/bundle.crt"),
        }
    }

    #[test]
    fn the_authority_joins_the_bundle_once_and_a_new_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        std::fs::write(&store.bundle, "SYSTEM ROOTS\n").unwrap();
        assert_eq!(
            install(&store, ONE).unwrap(),
            Installed {
                changed: true,
                in_bundle: true
            }
        );
        assert_eq!(std::fs::read_to_string(&store.ca_file).unwrap(), ONE);
        let bundle = std::fs::read_to_string(&store.bundle).unwrap();
        assert_eq!(bundle, format!("SYSTEM ROOTS\n{BEGIN}{ONE}{END}"));
        // Again: nothing changes.
        assert!(!install(&store, ONE).unwrap().changed);
        // A new authority replaces the old; the system's roots stay.
        assert!(install(&store, TWO).unwrap().changed);
        let bundle = std::fs::read_to_string(&store.bundle).unwrap();
        assert_eq!(bundle, format!("SYSTEM ROOTS\n{BEGIN}{TWO}{END}"));
        assert!(!bundle.contains("UOne"));
        // No temporary file is left behind.
        assert_eq!(
            std::fs::read_dir(dir.path().join("certs")).unwrap().count(),
            1
        );
    }

    /// A guest without the bundle (another distribution) gets the authority's own file, no
    /// bundle of it alone, and only the variable that adds to a runtime's roots.
    #[test]
    fn no_bundle_is_made_where_the_guest_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let installed = install(&store, ONE).unwrap();
        assert!(installed.changed && !installed.in_bundle);
        assert!(store.ca_file.exists() && !store.bundle.exists());
        let names: Vec<String> = variables(&store, installed)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, ["NODE_EXTRA_CA_CERTS"]);
        assert!(!install(&store, ONE).unwrap().changed);
    }

    #[test]
    fn what_is_not_pem_certificates_is_refused_and_nothing_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        for bad in [
            "",
            "hello",
            "-----BEGIN CERTIFICATE-----\nabc\n",
            "-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\nrm -rf /\n",
            "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n",
        ] {
            assert!(
                matches!(install(&store, bad), Err(TrustError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert!(!store.ca_file.exists() && !store.bundle.exists());
        let huge = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            "A".repeat(MAX_BUNDLE_BYTES)
        );
        assert!(install(&store, &huge).is_err());
    }
}
