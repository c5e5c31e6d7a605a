//! The one route decision: which kind of route a request path is on, compared the way
//! upstreams compare paths.
//!
//! Upstreams do not agree on what a path means: Express matches case-insensitively and ignores
//! a trailing slash, the Node Twenty MCP server serves every URL that *starts with* `/mcp`,
//! nginx, Go and Python merge repeated slashes and decode percent-escapes, servlet containers
//! drop `;params` from each segment. A policy that compares the raw path with `==` is skipped
//! by any of those spellings. So the path is classified once, here, on its *normal form*:
//!
//! 1. refused outright (400) when it holds a backslash, an encoded `/` or `\`, or a `.`/`..`
//!    segment — raw, percent-encoded, or hidden behind `;params` (`..;`);
//! 2. otherwise each segment is percent-decoded, cut at its first `;`, ASCII-lowercased, and
//!    empty segments are dropped (repeated slashes merged; a trailing slash kept as one).
//!
//! On that normal form: a path that *starts with* an MCP path (string prefix: `/mcpx`,
//! `/mcp.json`, `/mcp/` all count) is MCP and is inspected exactly like the canonical path;
//! `/api/keys` (and `/api/keys/`) is keygate's vault; any other path under `/api/keys/` is
//! keygate's too and answered 404 — never proxied. Every policy (scope rules, tool budgets,
//! rate-rule `paths`, session-token paths, MCP inspection) reads this decision and the normal
//! form, never the raw path.
//!
//! It owns the route table; the normal form itself is [`crate::paths`]'s, shared with the
//! configuration so that configured paths and request paths go through the very same function.
//! It does not answer anything itself.

use std::borrow::Cow;

pub use crate::paths::{normal_config_path, normalize, PathRefused, KEYS_PATH};

/// What a request path is, once normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// `/api/keys`, answered from the vault.
    Keys,
    /// Under `/api/keys/`: keygate's namespace, answered 404.
    KeysOther,
    /// Starts with an MCP path: MCP POST bodies are inspected.
    Mcp,
    /// Anything else the upstream serves.
    Other,
}

/// A request path's decision: its kind and its normal form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified<'a> {
    pub kind: PathKind,
    /// The normal form every policy compares against (borrowed when the path already is one).
    pub normal: Cow<'a, str>,
}

impl Classified<'_> {
    /// Whether the normal form equals `prefix` or lies below it as a whole segment
    /// (`prefix` must itself be a normal form, see [`normal_config_path`]).
    pub fn under(&self, prefix: &str) -> bool {
        under(&self.normal, prefix)
    }

    /// Whether the normal form starts with `prefix` as a string: the way an upstream that
    /// routes "every path starting with" decides.
    pub fn starts_with(&self, prefix: &str) -> bool {
        self.normal.starts_with(prefix)
    }
}

fn under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The route table, compiled from configuration at startup.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// MCP paths in normal form.
    mcp: Vec<String>,
    /// Whether `/api/keys` is keygate's (the vault is enabled).
    keys: bool,
}

impl Routes {
    /// `mcp_paths` must already be normal forms (see [`normal_config_path`]).
    pub fn new(mcp_paths: &[String], keys: bool) -> Self {
        Self {
            mcp: mcp_paths.to_vec(),
            keys,
        }
    }

    /// Classify a request path (the path of the request target, without its query).
    pub fn classify<'a>(&self, path: &'a str) -> Result<Classified<'a>, PathRefused> {
        let normal = normalize(path)?;
        let kind = if self.keys && under(&normal, KEYS_PATH) {
            if normal.len() <= KEYS_PATH.len() + 1 {
                PathKind::Keys
            } else {
                PathKind::KeysOther
            }
        } else if self.mcp.iter().any(|p| normal.starts_with(p.as_str())) {
            PathKind::Mcp
        } else {
            PathKind::Other
        };
        Ok(Classified { kind, normal })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Routes {
        Routes::new(&["/mcp".to_string()], true)
    }

    fn kind(path: &str) -> Result<PathKind, PathRefused> {
        routes().classify(path).map(|c| c.kind)
    }

    #[test]
    fn every_spelling_an_upstream_serves_as_mcp_is_mcp() {
        for p in [
            "/mcp",
            "/mcp/",
            "//mcp",
            "/MCP",
            "/Mcp",
            "/mcpx",
            "/mcp;x",
            "/mcp%20",
            "/mcp.json",
            "/mcp//",
            "/%6dcp",
            "/%6Dcp",
            "/m%63p",
            "///mcp",
            "/;x/mcp",
            "/mcp/sub",
            "/MCP;jsessionid=1",
        ] {
            assert_eq!(kind(p), Ok(PathKind::Mcp), "{p}");
        }
        for p in [
            "/", "/health", "/mc", "/m%63", "/x/mcp", "/api/mcp", "/m;cp",
        ] {
            assert_eq!(kind(p), Ok(PathKind::Other), "{p}");
        }
    }

    #[test]
    fn the_vault_namespace_is_keygates() {
        for p in [
            "/api/keys",
            "/api/keys/",
            "/API/Keys",
            "//api//keys",
            "/api/keys;x",
        ] {
            assert_eq!(kind(p), Ok(PathKind::Keys), "{p}");
        }
        for p in [
            "/api/keys/x",
            "/api/keys/x/y",
            "/api/keys//x",
            "/api/KEYS/%78",
        ] {
            assert_eq!(kind(p), Ok(PathKind::KeysOther), "{p}");
        }
        assert_eq!(kind("/api/keysx"), Ok(PathKind::Other));
        // Without a vault the path is the upstream's.
        let no_vault = Routes::new(&["/mcp".to_string()], false);
        assert_eq!(
            no_vault.classify("/api/keys").map(|c| c.kind),
            Ok(PathKind::Other)
        );
    }

    #[test]
    fn dot_segments_and_encoded_separators_are_refused() {
        for p in [
            "/api/keys/../mcp",
            "/api/keys/..;/mcp",
            "/api/keys/.;x/mcp",
            "/api/keys/%2e%2E/mcp",
            "/api/keys/./x",
            "/api%2Fkeys",
            "/api/keys/..",
            "/api/keys/.%2e/mcp",
            "/api%5ckeys",
            "/api\\keys",
            "/..",
        ] {
            assert_eq!(kind(p), Err(PathRefused), "{p}");
        }
        for p in [
            "/api/keys/v1.2/x..y",
            "/api/keys/.../x",
            "/x/%2e%2e%2e",
            "/100%25/x",
        ] {
            assert!(kind(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn canonical_paths_are_borrowed_and_others_normalised() {
        assert!(matches!(normalize("/mcp"), Ok(Cow::Borrowed("/mcp"))));
        assert_eq!(normalize("//A//b/").as_deref(), Ok("/a/b/"));
        assert_eq!(normalize("/a;x/b;y").as_deref(), Ok("/a/b"));
        assert_eq!(normalize("/%41%zz%4").as_deref(), Ok("/a%zz%4"));
        // Double encoding is read the way a twice-decoding upstream reads it.
        assert_eq!(normalize("/%256Dcp").as_deref(), Ok("/mcp"));
        assert_eq!(normalize("/a%252fb"), Err(PathRefused));
        assert_eq!(normalize("/%25252525252541"), Err(PathRefused));
        assert_eq!(normalize("").as_deref(), Ok("/"));
        assert_eq!(normalize("*").as_deref(), Ok("/*"));
    }

    #[test]
    fn configured_paths_are_normal_forms_without_a_trailing_slash() {
        assert_eq!(normal_config_path("/MCP/").as_deref(), Some("/mcp"));
        assert_eq!(normal_config_path("/").as_deref(), Some("/"));
        assert_eq!(normal_config_path("mcp"), None);
        assert_eq!(normal_config_path("/a/../b"), None);
        assert_eq!(normal_config_path("/a?x"), None);
        let c = routes().classify("/Mcp/Sub").expect("path");
        assert!(c.under("/mcp") && c.under("/mcp/sub") && !c.under("/mc"));
        assert!(c.starts_with("/mc"));
    }

    /// Models of how upstreams decide that a path is `/mcp` (or lies under `/api/keys`).
    mod upstreams {
        fn decode(p: &str) -> String {
            let b = p.as_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            while i < b.len() {
                let hex = |c: u8| (c as char).to_digit(16);
                if b[i] == b'%' && i + 2 < b.len() {
                    if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                }
                out.push(b[i]);
                i += 1;
            }
            String::from_utf8_lossy(&out).into_owned()
        }

        /// Merge slashes and resolve dot segments, as nginx, Go's `path.Clean` and Python do.
        fn clean(p: &str) -> String {
            let mut segs: Vec<&str> = Vec::new();
            for s in p.split('/') {
                match s {
                    "" | "." => {}
                    ".." => {
                        segs.pop();
                    }
                    s => segs.push(s),
                }
            }
            format!("/{}", segs.join("/"))
        }

        fn strip_params(p: &str) -> String {
            p.split('/')
                .map(|s| s.split(';').next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("/")
        }

        /// Every way one of the modelled upstreams would read `raw`.
        pub fn readings(raw: &str) -> Vec<String> {
            vec![
                // Node/Express: raw path, case-insensitive.
                raw.to_ascii_lowercase(),
                // nginx: decode, then clean.
                clean(&decode(raw)),
                // Go / Python: clean the raw path.
                clean(raw),
                // Servlet containers: drop ;params, decode, clean.
                clean(&decode(&strip_params(raw))),
                // Express after a proxy that decodes and lowercases.
                clean(&decode(raw)).to_ascii_lowercase(),
            ]
        }
    }

    fn path_strategy() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let piece = prop::sample::select(vec![
            "/",
            "//",
            "mcp",
            "MCP",
            "Mc",
            "m",
            "c",
            "p",
            "%6d",
            "%6D",
            "%63",
            "%70",
            "%2e",
            "%2E",
            ".",
            "..",
            ";",
            ";x",
            "x",
            "%20",
            "%2f",
            "%5c",
            "\\",
            "api",
            "keys",
            "KEYS",
            "%",
            "%zz",
            "%4",
            "/api/keys",
            "/mcp",
        ]);
        prop::collection::vec(piece, 0..8).prop_map(|v| format!("/{}", v.concat()))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

        /// For any path: if some upstream would serve it as MCP, keygate inspects it as MCP or
        /// refuses it; if some upstream would read it as the vault's namespace, keygate answers
        /// it itself or refuses it.
        #[test]
        fn what_an_upstream_serves_as_mcp_is_inspected(path in path_strategy()) {
            let decided = routes().classify(&path);
            let readings = upstreams::readings(&path);
            if readings.iter().any(|r| r.starts_with("/mcp")) {
                proptest::prop_assert!(
                    matches!(decided, Err(PathRefused) | Ok(Classified { kind: PathKind::Mcp, .. })),
                    "{path:?} read as {readings:?}, decided {decided:?}"
                );
            }
            if readings.iter().any(|r| under(r.trim_end_matches(';'), KEYS_PATH)) {
                proptest::prop_assert!(
                    matches!(
                        decided,
                        Err(PathRefused)
                            | Ok(Classified { kind: PathKind::Keys | PathKind::KeysOther, .. })
                    ),
                    "{path:?} read as {readings:?}, decided {decided:?}"
                );
            }
        }

        /// The normal form is a fixed point, and any string at all is decided without panic.
        #[test]
        fn normal_forms_are_stable(path in path_strategy(), any in "\\PC{0,64}") {
            if let Ok(n) = normalize(&path) {
                let again = normalize(&n).map(|c| c.into_owned());
                proptest::prop_assert_eq!(again, Ok(n.into_owned()));
            }
            let _ = routes().classify(&any);
        }
    }
}
