//! Configuration problems: every problem is collected and reported together, each naming the
//! option or the variable that caused it.

use std::fmt;

/// One problem in the configuration, naming what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The option (`upstream.url`) or variable (`KEYGATE_UPSTREAM`) at fault.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Every problem found, in the order found.
#[derive(Debug, Default, Clone)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Record a problem.
    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration problem(s):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  - {}: {}", p.field, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}
