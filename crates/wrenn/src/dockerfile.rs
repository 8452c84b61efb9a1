//! A Dockerfile read as a template build, as E2B's SDKs read one (`from_dockerfile`): `FROM`
//! names what the build starts from; `RUN`, `ENV` (and `ARG` with its default), `WORKDIR` and
//! `USER` become steps; `CMD` or `ENTRYPOINT` the start command. Lines continue with `\`,
//! `#` starts a comment, `EXPOSE`, `LABEL`, `VOLUME`, `MAINTAINER`, `STOPSIGNAL`,
//! `HEALTHCHECK` and `SHELL` are ignored. `COPY` (and `ADD` of local files) becomes one COPY
//! step a source, with `--chown` as its owner and `--chmod` as its mode; its files are packed
//! from the context directory when the build is sent. Only one stage; no `--from`, globs or
//! URLs.

use anyhow::bail;

/// A Dockerfile's build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DockerfileBuild {
    /// What `FROM` names.
    pub from: String,
    /// `(type, args)` of each step, as E2B's `TemplateStep` has them.
    pub steps: Vec<(String, Vec<String>)>,
    pub start_cmd: Option<String>,
    /// Each COPY step's source, relative to the context, in step order.
    pub copies: Vec<String>,
}

/// The instructions of a Dockerfile: `(line number, keyword upper-cased, the rest)`, with
/// continuations joined and comments left out.
fn instructions(text: &str) -> Vec<(usize, String, String)> {
    let mut found = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if pending.is_none() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        if pending.is_some() && line.starts_with('#') {
            continue;
        }
        let (start, mut joined) = pending.take().unwrap_or((index + 1, String::new()));
        match line.strip_suffix('\\') {
            Some(head) => {
                joined.push_str(head);
                joined.push(' ');
                pending = Some((start, joined));
            }
            None => {
                joined.push_str(line);
                found.push((start, joined));
            }
        }
    }
    if let Some(last) = pending {
        found.push(last);
    }
    found
        .into_iter()
        .filter_map(|(number, text)| {
            let text = text.trim().to_string();
            let (keyword, rest) = text.split_once(char::is_whitespace).unwrap_or((&text, ""));
            (!keyword.is_empty()).then(|| {
                (
                    number,
                    keyword.to_ascii_uppercase(),
                    rest.trim().to_string(),
                )
            })
        })
        .collect()
}

/// A JSON array of strings (`["a", "b"]`, Docker's exec form), if `text` is one.
fn exec_form(text: &str) -> Option<Vec<String>> {
    if !text.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(text).ok()
}

/// Shell-quotes one word.
fn quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// An instruction's command as one shell line (the exec form's words quoted).
fn command(text: &str) -> String {
    match exec_form(text) {
        Some(words) => words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" "),
        None => text.to_string(),
    }
}

/// `ENV`'s pairs: `A=1 B="two words"`, or the old `A value with spaces`.
fn env_pairs(text: &str) -> anyhow::Result<Vec<String>> {
    let words = shell_words(text)?;
    if !words.is_empty() && !words[0].contains('=') {
        // The old form, `ENV NAME the rest`: the rest as written.
        let (name, value) = text
            .trim()
            .split_once(char::is_whitespace)
            .unwrap_or((text.trim(), ""));
        let name = shell_words(name)?.join("");
        if value.trim().is_empty() {
            bail!("{name} has no value (ENV NAME=value, or ENV NAME value)");
        }
        return Ok(vec![name, value.trim().to_string()]);
    }
    let mut pairs = Vec::new();
    for word in words {
        let Some((name, value)) = word.split_once('=') else {
            bail!("{word:?} is not NAME=value");
        };
        pairs.push(name.to_string());
        pairs.push(value.to_string());
    }
    Ok(pairs)
}

/// Splits `text` into words as a shell would for `ENV`: quotes group, `\` escapes.
fn shell_words(text: &str) -> anyhow::Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (q, '\\') if q != Some('\'') => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
                in_word = true;
            }
            (_, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        bail!("an unclosed quote in {text:?}");
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// A `COPY`'s steps: `(source, [source, destination, owner, mode])` for each source.
fn copy_steps(text: &str) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let mut words = match exec_form(text) {
        Some(words) => words,
        None => shell_words(text)?,
    };
    let (mut owner, mut mode) = (String::new(), String::new());
    while let Some(flag) = words.first().filter(|w| w.starts_with("--")).cloned() {
        words.remove(0);
        match flag.split_once('=') {
            Some(("--chown", value)) => owner = value.to_string(),
            Some(("--chmod", value)) => {
                let parsed = u32::from_str_radix(value, 8)
                    .map_err(|_| anyhow::anyhow!("--chmod={value} is not an octal mode"))?;
                mode = format!("{parsed:04o}");
            }
            _ => bail!("{flag} is not supported (only --chown and --chmod)"),
        }
    }
    if words.len() < 2 {
        bail!("takes at least a source and a destination");
    }
    let destination = words.pop().expect("two words");
    if words.len() > 1 && !destination.ends_with('/') {
        bail!("with several sources the destination must end with /");
    }
    words
        .into_iter()
        .map(|source| {
            if source.contains("://") {
                bail!("{source}: only files of the context are copied, not URLs");
            }
            if source.contains(['*', '?', '[']) {
                bail!("{source}: globs are not supported by wrenn template build yet");
            }
            let relative = std::path::Path::new(&source);
            if relative.is_absolute()
                || relative
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                bail!("{source} is not within the build's context");
            }
            let args = vec![
                source.clone(),
                destination.clone(),
                owner.clone(),
                mode.clone(),
            ];
            Ok((source, args))
        })
        .collect()
}

/// Reads a Dockerfile's build.
pub fn parse(text: &str) -> anyhow::Result<DockerfileBuild> {
    let mut build = DockerfileBuild::default();
    let mut entrypoint: Option<String> = None;
    let mut cmd: Option<String> = None;
    for (line, keyword, rest) in instructions(text) {
        let at = |what: String| anyhow::anyhow!("Dockerfile line {line} ({keyword}): {what}");
        let step = |kind: &str, args: Vec<String>| (kind.to_string(), args);
        match keyword.as_str() {
            "FROM" => {
                if !build.from.is_empty() {
                    return Err(at("only one stage is supported".into()));
                }
                let words: Vec<&str> = rest.split_whitespace().collect();
                match words.as_slice() {
                    [name] | [name, _, _] => build.from = name.to_string(),
                    _ => return Err(at("takes one name (and AS stage)".into())),
                }
            }
            _ if build.from.is_empty() => return Err(at("comes before FROM".into())),
            "RUN" if rest.is_empty() => return Err(at("has no command".into())),
            "RUN" => build.steps.push(step("RUN", vec![command(&rest)])),
            "ENV" => {
                let pairs = env_pairs(&rest).map_err(|e| at(e.to_string()))?;
                build.steps.push(step("ENV", pairs));
            }
            "ARG" => {
                let (name, value) = rest.split_once('=').unwrap_or((&rest, ""));
                let value = shell_words(value).map_err(|e| at(e.to_string()))?.join(" ");
                build
                    .steps
                    .push(step("ENV", vec![name.trim().to_string(), value]));
            }
            "WORKDIR" | "USER" if rest.is_empty() => return Err(at("needs a value".into())),
            "WORKDIR" => build.steps.push(step("WORKDIR", vec![rest.clone()])),
            "USER" => build.steps.push(step("USER", vec![rest.clone()])),
            "CMD" => cmd = Some(command(&rest)),
            "ENTRYPOINT" => entrypoint = Some(command(&rest)),
            "COPY" | "ADD" => {
                for (source, args) in copy_steps(&rest).map_err(|e| at(e.to_string()))? {
                    build.copies.push(source);
                    build.steps.push(step("COPY", args));
                }
            }
            "EXPOSE" | "LABEL" | "VOLUME" | "MAINTAINER" | "STOPSIGNAL" | "HEALTHCHECK"
            | "SHELL" | "ONBUILD" => {}
            _ => return Err(at("an instruction wrenn does not know".into())),
        }
    }
    if build.from.is_empty() {
        bail!("the Dockerfile has no FROM");
    }
    build.start_cmd = match (entrypoint, cmd) {
        (Some(entrypoint), Some(cmd)) => Some(format!("{entrypoint} {cmd}")),
        (entrypoint, cmd) => entrypoint.or(cmd),
    };
    Ok(build)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_dockerfile_becomes_steps_and_a_start_command() {
        let text = r#"
# a comment
FROM base AS build
ARG VERSION=1.2
ENV A=1 B="two words" \
    C=three
ENV OLD value with spaces
WORKDIR /app
RUN echo one && \
    echo two
RUN ["python3", "-c", "print('hi')"]
USER root
EXPOSE 8000
ENTRYPOINT ["python3", "-m"]
CMD ["http.server", "8000"]
"#;
        let build = parse(text).unwrap();
        assert_eq!(build.from, "base");
        assert_eq!(
            build.steps,
            vec![
                ("ENV".into(), strings(&["VERSION", "1.2"])),
                (
                    "ENV".into(),
                    strings(&["A", "1", "B", "two words", "C", "three"])
                ),
                ("ENV".into(), strings(&["OLD", "value with spaces"])),
                ("WORKDIR".into(), strings(&["/app"])),
                ("RUN".into(), strings(&["echo one &&  echo two"])),
                ("RUN".into(), strings(&["python3 -c 'print('\\''hi'\\'')'"])),
                ("USER".into(), strings(&["root"])),
            ]
        );
        assert_eq!(
            build.start_cmd.as_deref(),
            Some("python3 -m http.server 8000")
        );
        let copying = parse("FROM base\nCOPY --chown=user --chmod=755 a.txt dir /srv/\n").unwrap();
        assert_eq!(copying.copies, ["a.txt", "dir"]);
        assert_eq!(
            copying.steps[1],
            ("COPY".into(), strings(&["dir", "/srv/", "user", "0755"]))
        );
    }

    #[test]
    fn what_wrenn_cannot_build_is_refused_with_its_line() {
        for (text, said) in [
            ("RUN x", "line 1 (RUN): comes before FROM"),
            (
                "FROM base\nCOPY a",
                "line 2 (COPY): takes at least a source",
            ),
            (
                "FROM base\nCOPY ../a /b",
                "is not within the build's context",
            ),
            ("FROM base\nCOPY *.py /b/", "globs are not supported"),
            ("FROM base\nCOPY --from=x a /b", "--from=x is not supported"),
            ("FROM base\nCOPY a b /c", "must end with /"),
            ("FROM base\nFROM other", "line 2 (FROM): only one stage"),
            ("FROM base\nRUN", "line 2 (RUN): has no command"),
            ("FROM base\nENV A=\"x", "line 2 (ENV): an unclosed quote"),
            ("FROM base\nFOO bar", "an instruction wrenn does not know"),
            ("FROM base\nENV \"é\"", "line 2 (ENV)"),
            ("# nothing", "has no FROM"),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(said), "{text:?}: {error}");
        }
    }
}
