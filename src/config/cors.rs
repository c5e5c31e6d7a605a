//! `[cors]`: the browser origins allowed to call keygate.

use std::time::Duration;

use url::Url;

use super::file::CorsFile;
use super::parse::secs;
use super::Problems;

#[derive(Debug, Clone)]
pub struct CorsSettings {
    pub allowed_origins: Vec<String>,
    pub allow_any_origin: bool,
    pub max_age: Duration,
}

impl CorsSettings {
    /// Validate `[cors]`: each origin is `*` or a bare origin.
    pub(crate) fn from_file(f: &CorsFile, problems: &mut Problems) -> CorsSettings {
        let mut allowed_origins = Vec::new();
        let mut allow_any_origin = false;
        for o in &f.allowed_origins {
            if o == "*" {
                allow_any_origin = true;
                continue;
            }
            match Url::parse(o) {
                Ok(u) if u.origin().is_tuple() && (u.path() == "/" || u.path().is_empty()) => {
                    allowed_origins.push(u.origin().ascii_serialization())
                }
                _ => problems.push(
                    "cors.allowed_origins",
                    format!("{o:?} is not an origin like https://app.example.com"),
                ),
            }
        }
        CorsSettings {
            allowed_origins,
            allow_any_origin,
            max_age: secs(f.max_age_secs),
        }
    }
}
