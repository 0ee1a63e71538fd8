//! Responses the server writes itself: errors, `100 Continue`.

use std::time::SystemTime;

use super::Status;

pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A complete short response: `status` with its reason as a text body. `close` adds
/// `Connection: close`, and then the caller really closes; `extra` holds header lines
/// (`Retry-After: 1\r\n`).
pub fn error(status: Status, close: bool, extra: &str) -> Vec<u8> {
    let reason = status.reason();
    format!(
        "HTTP/1.1 {} {reason}\r\nDate: {}\r\nServer: wsgid\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}{extra}\r\n{reason}\n",
        status.0,
        httpdate::fmt_http_date(SystemTime::now()),
        reason.len() + 1,
        if close { "Connection: close\r\n" } else { "" },
    )
    .into_bytes()
}
