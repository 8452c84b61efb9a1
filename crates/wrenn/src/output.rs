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

/// A column of a listing: its header, and the text of an item's cell.
pub type Column<T> = (&'static str, fn(&T) -> String);

/// Prints `items` as pretty JSON with `json`, else as a table with a column of each of
/// `columns` and a row per item.
pub fn print_list<T: Serialize>(
    items: &[T],
    json: bool,
    columns: &[Column<T>],
) -> anyhow::Result<()> {
    if json {
        return print_json(&items);
    }
    println!("{}", list_table(items, columns));
    Ok(())
}

/// The table of [`print_list`]: a column of each of `columns`, a row per item.
fn list_table<T>(items: &[T], columns: &[Column<T>]) -> comfy_table::Table {
    let header: Vec<&str> = columns.iter().map(|(header, _)| *header).collect();
    let rows = items
        .iter()
        .map(|item| columns.iter().map(|(_, cell)| cell(item)).collect())
        .collect();
    table(&header, rows)
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
    fn a_listing_has_a_column_of_each_column_and_a_row_of_each_item() {
        let columns: [Column<(u32, &str)>; 2] = [
            ("number", |item| item.0.to_string()),
            ("name", |item| item.1.to_uppercase()),
        ];
        let listing = list_table(&[(1, "one"), (2, "two")], &columns);
        let header: Vec<String> = listing
            .header()
            .unwrap()
            .cell_iter()
            .map(|c| c.content())
            .collect();
        assert_eq!(header, ["number", "name"]);
        let rows: Vec<Vec<String>> = listing
            .row_iter()
            .map(|row| row.cell_iter().map(|c| c.content()).collect())
            .collect();
        assert_eq!(rows, [["1", "ONE"], ["2", "TWO"]]);
    }

    #[test]
    fn pairs_read_back_as_words() {
        let pairs = parse_pairs(&["b=2".into(), "a=1".into()], "x").unwrap();
        assert_eq!(pairs_text(&pairs), "a=1 b=2");
    }
}
