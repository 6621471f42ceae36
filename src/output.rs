//! Output for people and scripts: tables (comfy-table) and JSON.

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use serde::Serialize;

/// A table with a title line above it, in the look of the original's output.
pub struct TitledTable {
    title: String,
    table: Table,
}

impl TitledTable {
    pub fn new(title: &str, headers: &[&str]) -> Self {
        let mut table = Table::new();
        table
            .load_preset(UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header(headers.to_vec());
        TitledTable {
            title: title.to_string(),
            table,
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.table.add_row(cells);
    }
}

impl std::fmt::Display for TitledTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.title)?;
        write!(f, "{}", self.table)
    }
}

/// Pretty JSON for scripts; serialization of our own row types cannot fail.
pub fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// An optional cell: empty when absent.
pub fn cell(value: Option<&str>) -> String {
    value.unwrap_or("").to_string()
}
