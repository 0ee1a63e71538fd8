//! Dir routes: a static file, or a redirect, 404, 304, 412 or 416, queued for the client.

use std::time::SystemTime;

use super::Hub;
use crate::conn::{AfterBody, Conn, Phase, Sink};
use crate::dir::{self, Conditions, FileFacts, Plan, Resolved};
use crate::http::body::Decoder;
use crate::http::request::{Framing, Head};
use crate::http::Status;

impl Hub {
    pub(super) fn serve_dir(
        &mut self,
        conn: &mut Conn,
        head: &Head,
        d: usize,
        key: &str,
        prefix_len: usize,
    ) {
        let has_body = head.framing != Framing::Length(0);
        if head.method() != b"GET" && head.method() != b"HEAD" {
            return self.refuse(
                conn,
                Status::METHOD_NOT_ALLOWED,
                has_body,
                "Allow: GET, HEAD\r\n",
            );
        }
        let path = head.path();
        let rest = &path[prefix_len.min(path.len())..];
        // A prefix without a trailing slash matches whole segments only (mongrel2 served
        // `/st2a.txt` from route `/st2`), and the bare prefix is the directory.
        // The literal prefix decides (a pattern route's key goes on past it).
        let prefix = &key.as_bytes()[..prefix_len.min(key.len())];
        let resolved = if !prefix.ends_with(b"/") && rest.is_empty() {
            Resolved::AddSlash
        } else if !prefix.ends_with(b"/") && !rest.starts_with(b"/") {
            Resolved::NotFound
        } else {
            self.dirs[d].resolve(rest)
        };
        match resolved {
            Resolved::NotFound => return self.refuse(conn, Status::NOT_FOUND, has_body, ""),
            Resolved::AddSlash => {
                conn.push(dir::redirect_with_slash(path, head.query()));
                if let Some(log) = conn.log.as_mut() {
                    log.status = 301;
                }
            }
            Resolved::File {
                path: file_path,
                file,
                meta,
            } => {
                let facts = FileFacts::from_metadata(&meta);
                let conditions = Conditions {
                    method_is_head: head.is_head(),
                    if_match: head.header(b"if-match"),
                    if_none_match: head.header(b"if-none-match"),
                    if_modified_since: head.header(b"if-modified-since"),
                    if_unmodified_since: head.header(b"if-unmodified-since"),
                    range: head.header(b"range"),
                    if_range: head.header(b"if-range"),
                };
                let plan = dir::plan(&conditions, &facts);
                let ctype = self.dirs[d]
                    .content_type(&self.mime, &file_path)
                    .to_string();
                let keep_alive = conn.keep_alive && !has_body;
                conn.push(dir::head(
                    &plan,
                    &facts,
                    &ctype,
                    keep_alive,
                    SystemTime::now(),
                ));
                let status = match plan {
                    Plan::Full => 200,
                    Plan::Partial { .. } => 206,
                    Plan::NotModified => 304,
                    Plan::PreconditionFailed => 412,
                    Plan::RangeNotSatisfiable => 416,
                };
                if !head.is_head() {
                    match plan {
                        Plan::Full if facts.size > 0 => conn.push_file(file, 0, facts.size),
                        Plan::Partial {
                            start,
                            end_inclusive,
                        } => conn.push_file(file, start, end_inclusive + 1),
                        Plan::PreconditionFailed | Plan::RangeNotSatisfiable => {
                            conn.push(dir::error_body(&plan).to_vec())
                        }
                        _ => {}
                    }
                }
                if let Some(log) = conn.log.as_mut() {
                    log.status = status;
                }
            }
        }
        self.finish_log(conn);
        conn.phase = if has_body {
            // The response is queued; the body is read and dropped, then the connection
            // closes (the response said so).
            conn.keep_alive = false;
            let decoder = match head.framing {
                Framing::Chunked => Decoder::chunked(),
                Framing::Length(n) => Decoder::length(n),
            };
            Phase::Body {
                decoder,
                sink: Sink::Discard,
                then: AfterBody::Nothing,
            }
        } else if conn.keep_alive {
            Phase::Head
        } else {
            Phase::Closing
        };
    }
}
