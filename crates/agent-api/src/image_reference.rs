//! Image references as Docker reads them: `[registry/]repository[:tag][@digest]`, where a
//! first part with a dot or a port (or `localhost`) names the registry, and anything else is on
//! Docker Hub (`python` is `docker.io/library/python:latest`).

use std::fmt;

/// Docker Hub's name in references, and the host its registry API is served from.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    /// The registry as written (`docker.io`, `localhost:5000`, `ghcr.io`).
    pub registry: String,
    /// The repository inside it (`library/python`, `team/app`).
    pub repository: String,
    /// The tag (`latest` when neither tag nor digest is given).
    pub tag: Option<String>,
    /// `sha256:<64 hex>`, when the reference pins one.
    pub digest: Option<String>,
}

impl ImageReference {
    /// Parses `text`, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<ImageReference, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("the image name is empty".into());
        }
        if text.len() > 1024 {
            return Err("the image name is longer than 1024 characters".into());
        }
        let (name_and_tag, digest) = match text.split_once('@') {
            Some((name, digest)) => (name, Some(digest.to_string())),
            None => (text, None),
        };
        if let Some(digest) = &digest {
            check_digest(digest)?;
        }
        // A tag is after the last colon of the last path part (a colon before a slash is a
        // registry's port).
        let last_slash = name_and_tag.rfind('/').map_or(0, |at| at + 1);
        let (name, tag) = match name_and_tag[last_slash..].rfind(':') {
            Some(at) => (
                &name_and_tag[..last_slash + at],
                Some(name_and_tag[last_slash + at + 1..].to_string()),
            ),
            None => (name_and_tag, None),
        };
        if let Some(tag) = &tag {
            let valid = !tag.is_empty()
                && tag.len() <= 128
                && !tag.starts_with(['.', '-'])
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !valid {
                return Err(format!(
                    "{text:?}: the tag {tag:?} is not a valid tag (letters, digits, '_', '.', '-')"
                ));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let valid_part = |part: &str| {
            !part.is_empty()
                && part.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && part.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        };
        if !repository.split('/').all(valid_part) {
            return Err(format!(
                "{text:?}: a repository name is lower-case letters, digits and '.', '_', '-' \
                 between slashes"
            ));
        }
        let valid_registry = registry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if !valid_registry {
            return Err(format!("{text:?}: {registry:?} is not a registry's name"));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(ImageReference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host (and port) the registry's API answers on.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What a manifest is asked for by: the digest when pinned, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Checks that `digest` is `sha256:` and 64 lower-case hex digits (the only algorithm taken).
pub fn check_digest(digest: &str) -> Result<(), String> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "{digest:?} is not a sha256 digest (sha256: and 64 hex digits)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ImageReference {
        ImageReference::parse(text).unwrap()
    }

    #[test]
    fn docker_hub_names_get_its_registry_and_library() {
        let python = parse("python");
        assert_eq!(python.registry, "docker.io");
        assert_eq!(python.api_host(), "registry-1.docker.io");
        assert_eq!(python.repository, "library/python");
        assert_eq!(python.tag.as_deref(), Some("latest"));
        assert_eq!(python.to_string(), "docker.io/library/python:latest");
        let user = parse("e2bdev/base:1.2");
        assert_eq!(user.repository, "e2bdev/base");
        assert_eq!(user.tag.as_deref(), Some("1.2"));
    }

    #[test]
    fn a_dot_a_port_or_localhost_names_the_registry() {
        let local = parse("localhost:5000/tests/busybox:v1");
        assert_eq!(local.api_host(), "localhost:5000");
        assert_eq!(local.repository, "tests/busybox");
        assert_eq!(local.tag.as_deref(), Some("v1"));
        let ip = parse("127.0.0.1:5001/private");
        assert_eq!(ip.registry, "127.0.0.1:5001");
        assert_eq!(ip.tag.as_deref(), Some("latest"));
        let ghcr = parse("ghcr.io/org/app");
        assert_eq!(ghcr.registry, "ghcr.io");
        assert_eq!(ghcr.repository, "org/app");
        let pinned = parse(&format!("ghcr.io/org/app@sha256:{}", "a".repeat(64)));
        assert_eq!(pinned.tag, None);
        assert!(pinned.manifest_reference().starts_with("sha256:"));
    }

    #[test]
    fn bad_references_say_why() {
        for (bad, said) in [
            ("", "empty"),
            ("Python", "lower-case"),
            ("python:", "not a valid tag"),
            ("python:-x", "not a valid tag"),
            ("python@sha256:abc", "not a sha256 digest"),
            ("a//b", "lower-case"),
            ("reg.io/a b", "lower-case"),
        ] {
            let error = ImageReference::parse(bad).unwrap_err();
            assert!(error.contains(said), "{bad:?}: {error}");
        }
    }
}
