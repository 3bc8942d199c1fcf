//! The reference tables in `docs/` are Markdown that people read and tests
//! check: each crate's tests compare the rows with the code's own defaults, so
//! the documentation cannot drift from it. This crate only reads the tables
//! and the binaries' `--help`; what a row must equal is each test's business.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// One table row, by column name (the header's text, lower case).
pub type Row = BTreeMap<String, String>;

/// The rows of the first table under the heading whose text is `heading`.
/// Panics (failing the test) when there is no such heading or table.
pub fn table(markdown: &str, heading: &str) -> Vec<Row> {
    let mut lines =
        markdown.lines().skip_while(|line| line.trim_start_matches('#').trim() != heading || !line.starts_with('#'));
    assert!(lines.next().is_some(), "no heading {heading:?}");
    let mut table = lines
        .take_while(|line| !line.starts_with('#'))
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .map(cells);
    let header: Vec<String> = table.next().unwrap_or_else(|| panic!("no table under {heading:?}"));
    table
        .skip(1) // the |---| line
        .map(|row| header.iter().map(|h| h.to_lowercase()).zip(row).collect())
        .collect()
}

/// A row's cells, trimmed; `\|` is a pipe inside a cell.
fn cells(line: &str) -> Vec<String> {
    const PIPE: char = '\u{0}';
    let line = line.replace("\\|", &PIPE.to_string());
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|cell| cell.trim().replace(PIPE, "|")).collect()
}

/// The text of a cell's first code span (`` `60000` (60 s) `` gives `60000`).
pub fn code(cell: &str) -> Option<&str> {
    let start = cell.find('`')? + 1;
    let len = cell[start..].find('`')?;
    Some(&cell[start..start + len])
}

/// A command-line flag as `--help` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    pub name: String,
    pub env: Option<String>,
    pub default: Option<String>,
}

/// The flags `binary --help` lists (clap's long help), without `--help` and `--version`.
/// The binary runs with an empty environment, so no variable shows as a value.
pub fn help_flags(binary: &Path) -> Vec<Flag> {
    let output = Command::new(binary).arg("--help").env_clear().output().expect("running --help");
    assert!(output.status.success(), "{} --help failed", binary.display());
    let help = String::from_utf8(output.stdout).expect("--help is UTF-8");
    let bracketed = |text: &str, key: &str| {
        let start = text.find(&format!("[{key}: "))? + key.len() + 3;
        let len = text[start..].find(']')?;
        Some(text[start..start + len].trim_end_matches('=').to_owned())
    };
    let mut flags = Vec::new();
    let mut lines = help.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(name) = line.split_whitespace().find(|word| word.starts_with("--")) else { continue };
        let name = name.trim_end_matches(',').to_owned();
        if name == "--help" || name == "--version" {
            continue;
        }
        // The description, with its [env: ...] and [default: ...], is on the lines below.
        let mut text = String::new();
        while let Some(next) = lines.next_if(|next| !next.trim_start().starts_with('-')) {
            text.push_str(next);
        }
        flags.push(Flag { env: bracketed(&text, "env"), default: bracketed(&text, "default"), name });
    }
    flags
}

/// Fails unless the table under `heading` lists exactly `binary`'s flags, each
/// with the same environment variable and default. Columns: `flag`, `env`,
/// `default`; a default without a code span means "none".
pub fn assert_flags_documented(binary: &Path, markdown: &str, heading: &str) {
    let documented: Vec<Flag> = table(markdown, heading)
        .iter()
        .map(|row| Flag {
            name: code(&row["flag"]).unwrap_or_else(|| panic!("{row:?} names no flag")).to_owned(),
            env: code(&row["env"]).map(str::to_owned),
            default: code(&row["default"]).map(str::to_owned),
        })
        .collect();
    let actual = help_flags(binary);
    let binary = binary.display();
    for flag in &actual {
        let row = documented.iter().find(|row| row.name == flag.name);
        assert_eq!(row, Some(flag), "{binary} {}: the table under {heading:?} says otherwise", flag.name);
    }
    for row in &documented {
        assert!(
            actual.iter().any(|flag| flag.name == row.name),
            "{}: under {heading:?}, not a flag of {binary}",
            row.name
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# Title\n\ntext\n\n## Flags\n\nsome words\n\n\
        | flag | default | meaning |\n|---|---|---|\n| `--a` | `1` (one) | a \\| b |\n| `--b` | none | c |\n\n## Next\n";

    #[test]
    fn a_table_is_read_by_its_heading() {
        let rows = table(DOC, "Flags");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["flag"], "`--a`");
        assert_eq!(code(&rows[0]["default"]), Some("1"));
        assert_eq!(rows[0]["meaning"], "a | b");
        assert_eq!(code(&rows[1]["default"]), None);
    }
}
