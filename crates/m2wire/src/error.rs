use std::fmt;

/// Why a message from mongrel2 could not be parsed. Carries the offset so a log line can
/// point at the byte that broke the grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    pub offset: usize,
    pub reason: &'static str,
}

impl WireError {
    pub(crate) fn at(offset: usize, reason: &'static str) -> Self {
        WireError { offset, reason }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.reason, self.offset)
    }
}

impl std::error::Error for WireError {}
