//! `[log]`: the log format and level.

use std::str::FromStr;

use super::file::LogFile;
use super::parse::NotAChoice;
use super::Problems;

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub json: bool,
    pub level: String,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = NotAChoice;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(NotAChoice::new(other, "\"text\" or \"json\"")),
        }
    }
}

impl LogSettings {
    /// Validate `[log]`.
    pub(crate) fn from_file(f: &LogFile, problems: &mut Problems) -> LogSettings {
        let format = f.format.parse().unwrap_or_else(|e: NotAChoice| {
            problems.push("log.format (KEYGATE_LOG_FORMAT)", e.to_string());
            LogFormat::Text
        });
        LogSettings {
            json: format == LogFormat::Json,
            level: f.level.clone(),
        }
    }
}
