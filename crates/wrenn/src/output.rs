//! How the CLI shows what it got: a table by default, pretty JSON with `--json`.

use std::collections::BTreeMap;

use serde::Serialize;

/// A table with `header` and `rows`, in the CLI's one style.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    table
}

/// Prints `value` as pretty JSON.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Metadata as `key=value` words.
pub fn pairs_text(pairs: &BTreeMap<String, String>) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `KEY=VALUE` arguments as a map; `what` names the flag in the error.
pub fn parse_pairs(values: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    values
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("{what} {pair:?} is not KEY=VALUE"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_must_be_key_value() {
        assert_eq!(parse_pairs(&["a=b=c".into()], "x").unwrap()["a"], "b=c");
        assert!(
            parse_pairs(&["nokey".into()], "--env")
                .unwrap_err()
                .to_string()
                .contains("--env")
        );
    }

    #[test]
    fn pairs_read_back_as_words() {
        let pairs = parse_pairs(&["b=2".into(), "a=1".into()], "x").unwrap();
        assert_eq!(pairs_text(&pairs), "a=1 b=2");
    }
}
