//! Claim maps: where an issuer's tokens carry the facts keygate authorizes on (user id, org
//! id, org role, roles, email, `email_verified`, scopes), as `[clerk.claims]` and
//! `[issuers.claims]` set them. Reading a token with a map is `auth::claims`'s.
//!
//! A path names a claim or a value nested in objects. Written as a string, segments are
//! separated by `.`; a segment that itself contains a `.` (a namespaced claim such as
//! `https://example.com/org`) is written in double quotes, inside which `\"` and `\\` stand
//! for `"` and `\`: `"https://example.com/org".id`. Written as a TOML array, each element is one
//! segment, taken literally: `["https://example.com/org", "id"]`.

/// A parsed claim path: one or more object member names, outermost first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPath(Vec<String>);

/// Why a claim path as written in the configuration is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("is empty")]
    Empty,
    #[error("has an empty segment (two dots, or a dot at either end)")]
    EmptySegment,
    #[error("has an unterminated quoted segment")]
    Unterminated,
    #[error("has text right after a quoted segment (expected '.' or the end)")]
    AfterQuote,
    #[error("has a quote inside an unquoted segment (quote the whole segment)")]
    StrayQuote,
    #[error("has an invalid escape (inside quotes only \\\" and \\\\ are escapes)")]
    BadEscape,
}

impl ClaimPath {
    /// Parse the string syntax (see the module doc).
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        if raw.is_empty() {
            return Err(PathError::Empty);
        }
        let mut segments = Vec::new();
        let mut chars = raw.chars().peekable();
        loop {
            let mut segment = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next() {
                        None => return Err(PathError::Unterminated),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => segment.push(c),
                            _ => return Err(PathError::BadEscape),
                        },
                        Some(c) => segment.push(c),
                    }
                }
                match chars.peek() {
                    None | Some('.') => {}
                    Some(_) => return Err(PathError::AfterQuote),
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == '.' {
                        break;
                    }
                    if c == '"' {
                        return Err(PathError::StrayQuote);
                    }
                    segment.push(c);
                    chars.next();
                }
            }
            if segment.is_empty() {
                return Err(PathError::EmptySegment);
            }
            segments.push(segment);
            match chars.next() {
                None => return Ok(Self(segments)),
                Some(_dot) => {
                    if chars.peek().is_none() {
                        return Err(PathError::EmptySegment);
                    }
                }
            }
        }
    }

    /// A path from literal segments (the array syntax).
    pub fn from_segments(segments: Vec<String>) -> Result<Self, PathError> {
        if segments.is_empty() {
            return Err(PathError::Empty);
        }
        if segments.iter().any(String::is_empty) {
            return Err(PathError::EmptySegment);
        }
        Ok(Self(segments))
    }

    /// The segments, outermost first.
    pub fn segments(&self) -> &[String] {
        &self.0
    }

    /// The path in the string syntax: a segment holding `.` or `"` (or `\`, or starting with
    /// a quote) is quoted.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            if s.contains(['.', '"', '\\']) {
                out.push('"');
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            } else {
                out.push_str(s);
            }
        }
        out
    }
}

impl std::fmt::Display for ClaimPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

/// Where one issuer's tokens carry each fact; `None`: the built-in reading (see
/// `auth::claims::MappedClaims::read`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimMap {
    pub user_id: Option<ClaimPath>,
    pub org_id: Option<ClaimPath>,
    pub org_role: Option<ClaimPath>,
    pub roles: Option<ClaimPath>,
    pub email: Option<ClaimPath>,
    pub email_verified: Option<ClaimPath>,
    pub scopes: Option<ClaimPath>,
}

impl ClaimMap {
    /// Whether tokens mapped this way can carry roles (a role rule can ever match).
    pub fn maps_roles(&self, builtin_roles: bool) -> bool {
        builtin_roles || self.roles.is_some() || self.org_role.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(raw: &str) -> ClaimPath {
        ClaimPath::parse(raw).expect("path")
    }

    #[test]
    fn paths_parse_plain_dotted_and_quoted_segments() {
        assert_eq!(p("org_id").segments(), ["org_id"]);
        assert_eq!(
            p("realm_access.roles").segments(),
            ["realm_access", "roles"]
        );
        assert_eq!(
            p("\"https://example.com/org\".id").segments(),
            ["https://example.com/org", "id"]
        );
        assert_eq!(p(r#""a\"b\\c""#).segments(), ["a\"b\\c"]);
        for (bad, err) in [
            ("", PathError::Empty),
            ("a..b", PathError::EmptySegment),
            (".a", PathError::EmptySegment),
            ("a.", PathError::EmptySegment),
            ("\"a", PathError::Unterminated),
            ("\"a\"b", PathError::AfterQuote),
            ("a\"b\"", PathError::StrayQuote),
            ("\"a\\x\"", PathError::BadEscape),
            ("\"\"", PathError::EmptySegment),
        ] {
            assert_eq!(ClaimPath::parse(bad), Err(err), "{bad:?}");
        }
    }
}

/// Property tests over the claim-path syntax.
#[cfg(test)]
mod prop {
    use proptest::prelude::*;

    use super::ClaimPath;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any list of non-empty segments survives rendering and parsing unchanged.
        #[test]
        fn rendered_paths_parse_back(segments in prop::collection::vec("[a-z./\"\\\\:_-]{1,8}", 1..5)) {
            let path = ClaimPath::from_segments(segments.clone()).expect("non-empty");
            let parsed = ClaimPath::parse(&path.render());
            prop_assert_eq!(parsed.as_ref().map(ClaimPath::segments), Ok(segments.as_slice()));
        }

        /// Any text is decided without a panic; a parsed path has only non-empty segments.
        #[test]
        fn any_text_is_decided(raw in "\\PC{0,24}") {
            if let Ok(path) = ClaimPath::parse(&raw) {
                prop_assert!(path.segments().iter().all(|s| !s.is_empty()));
                prop_assert_eq!(ClaimPath::parse(&path.render()), Ok(path));
            }
        }
    }
}
