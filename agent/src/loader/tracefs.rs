//! Tracepoint record layouts from tracefs `format` files.

use std::path::{Path, PathBuf};

const TRACEFS_CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("tracefs is not mounted (looked in {}); mount it with `mount -t tracefs tracefs /sys/kernel/tracing`", TRACEFS_CANDIDATES.join(", "))]
    NoTracefs,
    #[error("tracepoint {category}/{name} does not exist on this kernel")]
    Missing { category: String, name: String },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tracepoint {tracepoint}: field `{field}` is at offset {actual:?}, the probe reads offset {expected}")]
    Mismatch {
        tracepoint: String,
        field: String,
        expected: usize,
        actual: Option<usize>,
    },
}

pub fn tracefs_root() -> Result<&'static Path, FormatError> {
    TRACEFS_CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| p.join("events").is_dir())
        .ok_or(FormatError::NoTracefs)
}

/// Offset of `field` in a tracepoint format file's text.
pub fn field_offset(format: &str, field: &str) -> Option<usize> {
    format.lines().find_map(|line| {
        let mut decl = None;
        let mut offset = None;
        for part in line.trim().split(';') {
            let part = part.trim();
            if let Some(d) = part.strip_prefix("field:") {
                decl = Some(d);
            } else if let Some(o) = part.strip_prefix("offset:") {
                offset = o.parse().ok();
            }
        }
        // The declaration ends with the name, possibly followed by an array suffix.
        let name = decl?.rsplit([' ', '*']).next()?;
        let name = name.split('[').next()?;
        (name == field).then_some(offset).flatten()
    })
}

/// Checks that each `(field, offset)` the probe reads matches the running kernel.
pub fn check_fields(
    category: &str,
    name: &str,
    fields: &[(&str, usize)],
) -> Result<(), FormatError> {
    let dir = tracefs_root()?.join("events").join(category).join(name);
    if !dir.is_dir() {
        return Err(FormatError::Missing {
            category: category.into(),
            name: name.into(),
        });
    }
    let path = dir.join("format");
    let text =
        std::fs::read_to_string(&path).map_err(|source| FormatError::Read { path, source })?;
    for &(field, expected) in fields {
        let actual = field_offset(&text, field);
        if actual != Some(expected) {
            return Err(FormatError::Mismatch {
                tracepoint: format!("{category}/{name}"),
                field: field.into(),
                expected,
                actual,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "name: inet_sock_set_state\nID: 2287\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;\n\
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;\n";

    #[test]
    fn finds_offsets() {
        assert_eq!(field_offset(SAMPLE, "skaddr"), Some(8));
        assert_eq!(field_offset(SAMPLE, "newstate"), Some(20));
        assert_eq!(field_offset(SAMPLE, "saddr_v6"), Some(40));
        assert_eq!(field_offset(SAMPLE, "common_type"), Some(0));
        assert_eq!(field_offset(SAMPLE, "state"), None);
        assert_eq!(field_offset("garbage;;offset:x", "x"), None);
    }
}
