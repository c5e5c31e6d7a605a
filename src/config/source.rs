//! Where the configuration comes from, and the problems found before any option is validated:
//! the TOML file (syntax and type errors, each located by file, line, column and option path,
//! every one found at once), and placeholder values copied from the repository's templates
//! (`replace-me`, `sk_live_…`), refused whether they come from the file or the environment.
//!
//! It does not validate option values: that is `validate` in the parent module.

use std::ops::Range;
use std::path::Path;

use serde_path_to_error::Segment;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::file::{Env, FileConfig};
use super::Problems;

/// At most this many type errors are reported for one file (each costs a deserialization).
const MAX_FILE_ERRORS: usize = 32;

/// Parse `text`, read from `path`, into the file structs. Every syntax error is reported; when
/// the syntax is sound, every option of the wrong type or name is reported (each is set aside
/// and the rest deserialized again). `None` when anything was reported.
pub(super) fn parse_file(path: &Path, text: &str, problems: &mut Problems) -> Option<FileConfig> {
    let file = path.display().to_string();
    let (mut root, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in &syntax {
            problems.push(
                locate(&file, text, e.span()),
                e.message().trim_end().to_string(),
            );
        }
        return None;
    }
    let mut failed = false;
    for _ in 0..MAX_FILE_ERRORS {
        let de = toml::de::Deserializer::from(root.clone());
        match serde_path_to_error::deserialize::<_, FileConfig>(de) {
            Ok(config) => return if failed { None } else { Some(config) },
            Err(e) => {
                failed = true;
                let segments: Vec<Segment> = e.path().iter().cloned().collect();
                let option = e.path().to_string();
                let inner = e.into_inner();
                let at = locate(&file, text, inner.span());
                let field = if option == "." {
                    at
                } else {
                    format!("{at}: {option}")
                };
                problems.push(field, inner.message().trim_end().to_string());
                if !set_aside(&mut root, &segments) {
                    return None;
                }
            }
        }
    }
    None
}

/// `file:line:column` of the start of `span` (1-based, columns in characters), or just the
/// file when the parser gave no position.
fn locate(file: &str, text: &str, span: Option<Range<usize>>) -> String {
    let Some(span) = span else {
        return file.to_string();
    };
    let start = span.start.min(text.len());
    let before = text.get(..start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    format!("{file}:{line}:{column}")
}

/// Remove the innermost table entry on `path` (the option in error, or the table or array
/// holding the element in error), so deserializing again finds the next problem. `false` when
/// nothing could be removed (an error about the document itself).
fn set_aside(root: &mut Spanned<DeTable<'_>>, path: &[Segment]) -> bool {
    let Some(last_key) = path.iter().rposition(|s| matches!(s, Segment::Map { .. })) else {
        return false;
    };
    let Segment::Map { key } = &path[last_key] else {
        return false;
    };
    let mut table: &mut DeTable<'_> = root.get_mut();
    let mut i = 0;
    while i < last_key {
        let next = match &path[i] {
            Segment::Map { key } => table.get_mut(key.as_str()).map(Spanned::get_mut),
            _ => return false,
        };
        let mut value = match next {
            Some(v) => v,
            None => return false,
        };
        // Descend through array indices to the next table.
        while let Some(Segment::Seq { index }) = path.get(i + 1) {
            value = match value {
                DeValue::Array(items) => match items.get_mut(*index) {
                    Some(item) => item.get_mut(),
                    None => return false,
                },
                _ => return false,
            };
            i += 1;
        }
        table = match value {
            DeValue::Table(t) => t,
            _ => return false,
        };
        i += 1;
    }
    table.remove(key.as_str()).is_some()
}

/// Markers of the placeholder values the repository ships (deploy/.env.example, the Kubernetes
/// secret template, README snippets); a value containing one was never filled in.
const PLACEHOLDER_MARKERS: &[&str] = &[
    "replace-me",
    "replace_me",
    "replaceme",
    "change-me",
    "change_me",
    "changeme",
    "placeholder",
    "\u{2026}", // "…", as in the README's `sk_live_…`
];

/// The marker `value` contains, if it is a placeholder.
pub fn placeholder_marker(value: &str) -> Option<&'static str> {
    let lower = value.to_ascii_lowercase();
    PLACEHOLDER_MARKERS
        .iter()
        .copied()
        .find(|m| lower.contains(m))
}

/// Refuse placeholder values in the options and variables that carry credentials or name a
/// deployment's own service, naming the variable when the environment set it (or its `_FILE`
/// form), else the option. `config` is the file with the environment applied.
pub(super) fn refuse_placeholders(config: &FileConfig, env: &dyn Env, problems: &mut Problems) {
    let clerk = config.clerk.as_ref();
    let checks: [(&str, &str, Vec<&str>); 6] = [
        (
            "API_KEY_ENCRYPTION_SECRET",
            "keys.encryption_secret",
            config
                .keys
                .encryption_secret
                .iter()
                .map(String::as_str)
                .collect(),
        ),
        (
            "API_KEY_ENCRYPTION_SECRET_PREVIOUS",
            "keys.previous_encryption_secrets",
            config
                .keys
                .previous_encryption_secrets
                .iter()
                .map(String::as_str)
                .collect(),
        ),
        (
            "CLERK_SECRET_KEY",
            "clerk.secret_key",
            clerk
                .and_then(|c| c.secret_key.as_deref())
                .into_iter()
                .collect(),
        ),
        (
            "CLERK_PUBLISHABLE_KEY",
            "clerk.publishable_key",
            clerk
                .and_then(|c| c.publishable_key.as_deref())
                .into_iter()
                .collect(),
        ),
        (
            "TWENTY_API_KEY",
            "keys.fallback_api_key",
            config
                .keys
                .fallback_api_key
                .iter()
                .map(String::as_str)
                .collect(),
        ),
        (
            "REDIS_URL",
            "redis.url",
            config.redis.url.iter().map(String::as_str).collect(),
        ),
    ];
    for (var, option, values) in checks {
        let Some(marker) = values.iter().find_map(|v| placeholder_marker(v)) else {
            continue;
        };
        let file_var = format!("{var}_FILE");
        let name = if env.var(var).is_some() {
            var.to_string()
        } else if env.var(&file_var).is_some() {
            file_var
        } else {
            option.to_string()
        };
        problems.push(
            name,
            format!(
                "is still the template's placeholder (contains {marker:?}): set the real value"
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;

    fn problems_of(text: &str) -> Vec<String> {
        let mut problems = Problems::default();
        let parsed = parse_file(Path::new("keygate.toml"), text, &mut problems);
        assert!(parsed.is_none() || problems.0.is_empty());
        problems
            .0
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect()
    }

    #[test]
    fn a_type_error_names_file_line_column_and_option() {
        let text = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n[server]\nthreads = \"two\"\n";
        assert_eq!(
            problems_of(text),
            ["keygate.toml:5:11: server.threads: invalid type: string \"two\", expected usize"]
        );
    }

    #[test]
    fn every_type_error_and_unknown_option_is_reported_at_once() {
        let text = "[server]\nthreads = \"two\"\nlisten = 8080\n\n[keys]\ncache_ttl_secs = -1\ncolour = \"blue\"\n\n[[issuers]]\nissuer = \"https://a.example\"\nalgorithms = \"RS256\"\n";
        let found = problems_of(text);
        for expected in [
            "keygate.toml:2:11: server.threads:",
            "keygate.toml:3:10: server.listen:",
            "keygate.toml:6:18: keys.cache_ttl_secs:",
            "keygate.toml:7:1: keys.colour: unknown field `colour`",
            "keygate.toml:11:14: issuers[0].algorithms:",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(expected)),
                "{expected} not in {found:#?}"
            );
        }
        assert_eq!(found.len(), 5, "{found:#?}");
    }

    #[test]
    fn every_syntax_error_names_its_line() {
        let found = problems_of("[server\nthreads = 1\n\n[keys]\ncache_ttl_secs = = 3\n");
        assert!(
            found.iter().any(|p| p.starts_with("keygate.toml:1:")),
            "{found:#?}"
        );
        assert!(
            found.iter().any(|p| p.starts_with("keygate.toml:5:")),
            "{found:#?}"
        );
    }

    #[test]
    fn a_sound_file_parses() {
        let mut problems = Problems::default();
        let parsed = parse_file(
            Path::new("k.toml"),
            "[server]\nthreads = 2\n",
            &mut problems,
        );
        assert!(problems.0.is_empty(), "{problems}");
        assert_eq!(parsed.map(|f| f.server.threads), Some(2));
    }

    #[test]
    fn placeholders_are_refused_naming_the_variable_or_option() {
        let mut config: FileConfig = toml::from_str(
            "[clerk]\nsecret_key = \"sk_live_replace-me\"\n[redis]\nurl = \"redis://:replace-me@redis.example.internal:6379/0\"\n",
        )
        .expect("parses");
        let mut env: HashMap<String, String> = HashMap::new();
        env.insert("REDIS_URL".into(), "x".into());
        let mut problems = Problems::default();
        refuse_placeholders(&config, &env, &mut problems);
        let fields: Vec<&str> = problems.0.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["clerk.secret_key", "REDIS_URL"]);
        config.clerk = None;
        config.redis.url = Some("redis://redis:6379/0".into());
        config.keys.encryption_secret = Some("\u{2026}".into());
        let mut problems = Problems::default();
        refuse_placeholders(&config, &env, &mut problems);
        let fields: Vec<&str> = problems.0.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["keys.encryption_secret"]);
    }
}
