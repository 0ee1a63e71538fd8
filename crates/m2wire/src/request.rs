//! Request messages from mongrel2: `UUID SP ID SP PATH SP HEADERS BODY`.
//!
//! HEADERS is a netstring of JSON text (`protocol='json'`) or a tnetstring dict
//! (`protocol='tnetstring'`); the tag byte after the payload tells which. BODY is always a
//! `,`-terminated netstring.

use std::borrow::Cow;

use crate::error::WireError;
use crate::headers::{HeaderValue, Headers};
use crate::{json, netstring, tnetstring};

/// A mongrel2 connection id: global to the mongrel2 process, one per client connection.
pub type ConnId = u64;

/// Which encoding the headers came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderEncoding {
    Json,
    Tnetstring,
}

/// One parsed request message. Borrows from the message bytes.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The handler's `send_ident`, the first field of every message.
    pub sender: &'a [u8],
    pub conn_id: ConnId,
    /// The raw request path (not percent-decoded), or `@*` for notifications.
    pub path: &'a [u8],
    pub headers: Headers<'a>,
    pub encoding: HeaderEncoding,
    pub body: &'a [u8],
}

/// What a message is, as far as a WSGI gateway is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// An HTTP request (possibly one half of a temp-file upload: see [`Request::upload`]).
    Http,
    /// `@*` with `{"type":"disconnect"}`: the client went away. Unreliable and duplicated.
    Disconnect,
    /// `@*` with `{"type":"credits"}` (`download.flow_control=1`).
    Credits,
    /// Any other `@*` notification.
    OtherNotification,
    WebSocketHandshake,
    WebSocketFrame,
    /// `@route` JSON-socket messages and XML-socket messages.
    Socket,
    /// A request or continuation of `upload.stream=1` (credit-based streaming upload).
    UploadStream,
}

/// The temp-file upload headers of a request, structurally checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadMarker<'a> {
    None,
    /// `x-mongrel2-upload-start` alone: mongrel2 is spooling the body to this path.
    Start(&'a [u8]),
    /// Start and done naming the same path: the body is complete in that file.
    Done(&'a [u8]),
    /// A done header without a start, or the two disagreeing: never genuine.
    Mismatched,
}

const UPLOAD_START: &[u8] = b"x-mongrel2-upload-start";
const UPLOAD_DONE: &[u8] = b"x-mongrel2-upload-done";

/// The sender and connection id of a message, read without parsing the rest: lets a gateway
/// answer a malformed message with a 400 when at least the address is intact.
pub fn parse_address(msg: &[u8]) -> Option<(&[u8], ConnId)> {
    let mut fields = msg.splitn(3, |&b| b == b' ');
    let sender = fields.next()?;
    let id = parse_conn_id(fields.next()?)?;
    fields.next()?;
    valid_sender(sender).then_some((sender, id))
}

/// Whether a message is one of mongrel2's own notices about a connection (disconnect,
/// download credits: path `@*`) rather than a client's request. Read without parsing.
pub fn is_notice(msg: &[u8]) -> bool {
    msg.splitn(4, |&b| b == b' ').nth(2) == Some(b"@*")
}

/// The raw header section of a message (JSON text or a tnetstring dict's payload), found
/// without parsing it: lets a router look for one header name cheaply.
pub fn raw_headers(msg: &[u8]) -> Option<&[u8]> {
    header_section(msg).map(|(payload, _)| payload)
}

/// The first value of header `name`, found without building the header map when the
/// headers are a tnetstring dict (JSON values may be escaped: those are parsed in full).
pub fn find_header<'a>(msg: &'a [u8], name: &[u8]) -> Option<Cow<'a, [u8]>> {
    match header_section(msg)? {
        (dict, b'}') => tnetstring::find_in_dict(dict, name).map(Cow::Borrowed),
        _ => Request::parse(msg)
            .ok()?
            .header(name)
            .map(|v| Cow::Owned(v.to_vec())),
    }
}

/// The header netstring's payload and tag (`}` for a tnetstring dict, `,` for JSON text).
fn header_section(msg: &[u8]) -> Option<(&[u8], u8)> {
    let rest = msg.splitn(4, |&b| b == b' ').nth(3)?;
    let base = msg.len() - rest.len();
    netstring::split_tagged(rest, base)
        .ok()
        .map(|(payload, tag, _)| (payload, tag))
}

pub(crate) fn parse_conn_id(digits: &[u8]) -> Option<ConnId> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0, |n: ConnId, &d| n * 10 + ConnId::from(d - b'0')),
    )
}

/// mongrel2 only accepts replies whose UUID is `[A-Za-z0-9-]+`; a sender outside that set
/// could never be answered.
pub(crate) fn valid_sender(sender: &[u8]) -> bool {
    !sender.is_empty()
        && sender
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-')
}

impl<'a> Request<'a> {
    pub fn parse(msg: &'a [u8]) -> Result<Request<'a>, WireError> {
        let space = |from: usize, what| {
            msg[from..]
                .iter()
                .position(|&b| b == b' ')
                .map(|p| from + p)
                .ok_or(WireError::at(from, what))
        };
        let sender_end = space(0, "no space after the sender UUID")?;
        let sender = &msg[..sender_end];
        if !valid_sender(sender) {
            return Err(WireError::at(
                0,
                "sender UUID has characters outside [A-Za-z0-9-]",
            ));
        }
        let id_end = space(sender_end + 1, "no space after the connection id")?;
        let conn_id = parse_conn_id(&msg[sender_end + 1..id_end]).ok_or(WireError::at(
            sender_end + 1,
            "connection id is not a decimal number",
        ))?;
        let path_end = space(id_end + 1, "no space after the path")?;
        let path = &msg[id_end + 1..path_end];
        if path.is_empty() {
            return Err(WireError::at(id_end + 1, "empty path"));
        }

        let headers_at = path_end + 1;
        let (payload, tag, rest) = netstring::split_tagged(&msg[headers_at..], headers_at)?;
        let payload_at = headers_at + (msg.len() - headers_at - rest.len() - 1 - payload.len());
        let (headers, encoding) = match tag {
            b',' => (
                json::parse_header_object(payload, payload_at)?,
                HeaderEncoding::Json,
            ),
            b'}' => (
                tnetstring::parse_header_dict(payload, payload_at)?,
                HeaderEncoding::Tnetstring,
            ),
            _ => {
                return Err(WireError::at(
                    headers_at,
                    "headers are neither JSON nor a tnetstring dict",
                ))
            }
        };

        let body_at = msg.len() - rest.len();
        let (body, trailing) = netstring::split(rest, body_at)?;
        if !trailing.is_empty() {
            return Err(WireError::at(
                msg.len() - trailing.len(),
                "bytes after the body",
            ));
        }
        Ok(Request {
            sender,
            conn_id,
            path,
            headers,
            encoding,
            body,
        })
    }

    /// The first value of a header (exact name: client headers are lower case, mongrel2's
    /// own keys such as `METHOD` upper case).
    pub fn header(&self, name: &[u8]) -> Option<&[u8]> {
        self.headers.first(name)
    }

    pub fn kind(&self) -> MessageKind {
        if self.path == b"@*" {
            let body = json::parse_header_object(self.body, 0).ok();
            return match body.as_ref().and_then(|b| b.first(b"type")) {
                Some(b"disconnect") => MessageKind::Disconnect,
                Some(b"credits") => MessageKind::Credits,
                _ => MessageKind::OtherNotification,
            };
        }
        if self.headers.get(b"UPLOAD_STREAM").is_some() {
            return MessageKind::UploadStream;
        }
        match self.header(b"METHOD") {
            Some(b"WEBSOCKET_HANDSHAKE") => MessageKind::WebSocketHandshake,
            Some(b"WEBSOCKET") => MessageKind::WebSocketFrame,
            Some(b"JSON") | Some(b"XML") => MessageKind::Socket,
            _ => MessageKind::Http,
        }
    }

    pub fn upload(&self) -> UploadMarker<'_> {
        // mongrel2 replaces any client value when it really spools a body, so a genuine
        // marker is always single; a repeated one came from a client.
        let single = |name: &[u8]| match self.headers.get(name) {
            None => Ok(None),
            Some(HeaderValue::Many(values)) if values.len() > 1 => Err(()),
            Some(value) => Ok(value.first()),
        };
        match (single(UPLOAD_START), single(UPLOAD_DONE)) {
            (Ok(None), Ok(None)) => UploadMarker::None,
            (Ok(Some(start)), Ok(None)) => UploadMarker::Start(start),
            (Ok(Some(start)), Ok(Some(done))) if start == done => UploadMarker::Done(done),
            _ => UploadMarker::Mismatched,
        }
    }

    /// Whether the request says it carries a body the way mongrel2 reads it: a
    /// `content-length` in 1..=i32::MAX (mongrel2 parses it into a C `int`; anything larger
    /// is 0 or negative to it), or, without one, `transfer-encoding: chunked`. A genuine
    /// temp-file upload always does.
    pub fn declares_body(&self) -> bool {
        match self.header(b"content-length") {
            Some(_) => self
                .content_length()
                .is_some_and(|n| n > 0 && n <= i32::MAX as u64),
            None => self
                .headers
                .get(b"transfer-encoding")
                .and_then(|v| v.first())
                .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"chunked")),
        }
    }

    /// The declared `content-length`, if present and a number.
    pub fn content_length(&self) -> Option<u64> {
        std::str::from_utf8(self.header(b"content-length")?)
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const JSON_GET: &[u8] = br#"1b1d2b8e-0a3c-4a6e-9f00-000000000001 32 /handler/sub/path 304:{"PATH":"/handler/sub/path","x-forwarded-for":"127.0.0.1","accept":"*/*","user-agent":"lab","host":"localhost","METHOD":"GET","VERSION":"HTTP/1.1","URI":"/handler/sub/path?a=1&b=two%20x&a=3","QUERY":"a=1&b=two%20x&a=3","FRAGMENT":"frag","PATTERN":"/handler","URL_SCHEME":"http","REMOTE_ADDR":"127.0.0.1"},0:,"#;
    const TNET_POST: &[u8] = b"2b2d2b8e-0a3c-4a6e-9f00-000000000002 35 /tnet/form 270:11:REMOTE_ADDR,9:127.0.0.1,6:METHOD,4:POST,10:URL_SCHEME,4:http,7:PATTERN,5:/tnet,3:URI,10:/tnet/form,7:VERSION,8:HTTP/1.1,4:PATH,10:/tnet/form,4:host,9:localhost,14:content-length,2:27,12:content-type,33:application/x-www-form-urlencoded,15:x-forwarded-for,9:127.0.0.1,}27:name=J%C3%B6rg&x=1+2&empty=,";

    #[test]
    fn parses_captured_json_request() {
        let req = Request::parse(JSON_GET).unwrap();
        assert_eq!(req.sender, b"1b1d2b8e-0a3c-4a6e-9f00-000000000001");
        assert_eq!(req.conn_id, 32);
        assert_eq!(req.path, b"/handler/sub/path");
        assert_eq!(req.encoding, HeaderEncoding::Json);
        assert_eq!(req.header(b"QUERY"), Some(&b"a=1&b=two%20x&a=3"[..]));
        assert_eq!(req.body, b"");
        assert_eq!(req.kind(), MessageKind::Http);
        assert_eq!(req.upload(), UploadMarker::None);
        assert!(!req.declares_body());
    }

    #[test]
    fn parses_captured_tnetstring_request() {
        let req = Request::parse(TNET_POST).unwrap();
        assert_eq!(req.encoding, HeaderEncoding::Tnetstring);
        assert_eq!(req.header(b"METHOD"), Some(&b"POST"[..]));
        assert_eq!(req.body, b"name=J%C3%B6rg&x=1+2&empty=");
        assert_eq!(req.content_length(), Some(27));
        assert!(req.declares_body());
    }

    /// A JSON-protocol message with correct netstring lengths.
    fn json_msg(addr: &str, headers: &str, body: &str) -> Vec<u8> {
        let mut msg = format!("{addr} ").into_bytes();
        crate::netstring::write(&mut msg, headers.as_bytes());
        crate::netstring::write(&mut msg, body.as_bytes());
        msg
    }

    #[test]
    fn classifies_notifications_and_sockets() {
        let disconnect = b"2b2d 112 @* 16:6:METHOD,4:JSON,}21:{\"type\":\"disconnect\"},";
        assert_eq!(
            Request::parse(disconnect).unwrap().kind(),
            MessageKind::Disconnect
        );
        let credits = json_msg(
            "5b5d 1 @*",
            r#"{"METHOD":"JSON","DOWNLOAD_CREDITS":"1067"}"#,
            r#"{"type":"credits"}"#,
        );
        assert_eq!(
            Request::parse(&credits).unwrap().kind(),
            MessageKind::Credits
        );
        let chat = json_msg(
            "1b1d 109 @chat",
            r#"{"PATH":"@chat","METHOD":"JSON","PATTERN":"@chat"}"#,
            r#"{"type":"join"}"#,
        );
        assert_eq!(Request::parse(&chat).unwrap().kind(), MessageKind::Socket);
        let ws = json_msg(
            "1b1d 107 /ws",
            r#"{"PATH":"/ws","METHOD":"WEBSOCKET","FLAGS":"0x81"}"#,
            "pp",
        );
        assert_eq!(
            Request::parse(&ws).unwrap().kind(),
            MessageKind::WebSocketFrame
        );
        let stream = json_msg("1b1d 1 /up", r#"{"UPLOAD_STREAM":"3000"}"#, "abc");
        assert_eq!(
            Request::parse(&stream).unwrap().kind(),
            MessageKind::UploadStream
        );
    }

    #[test]
    fn reads_upload_markers() {
        let start = json_msg(
            "u 68 /up",
            r#"{"content-length":"5000","x-mongrel2-upload-start":"/tmp/upload.kX28Qe"}"#,
            "",
        );
        let req = Request::parse(&start).unwrap();
        assert_eq!(req.upload(), UploadMarker::Start(b"/tmp/upload.kX28Qe"));
        assert!(req.declares_body());
        let done = json_msg(
            "u 68 /up",
            r#"{"x-mongrel2-upload-start":"/tmp/up.a","x-mongrel2-upload-done":"/tmp/up.a"}"#,
            "",
        );
        assert_eq!(
            Request::parse(&done).unwrap().upload(),
            UploadMarker::Done(b"/tmp/up.a")
        );
        let mismatch = json_msg(
            "u 68 /up",
            r#"{"x-mongrel2-upload-start":"/tmp/up.a","x-mongrel2-upload-done":"/tmp/up.b"}"#,
            "",
        );
        assert_eq!(
            Request::parse(&mismatch).unwrap().upload(),
            UploadMarker::Mismatched
        );
        let done_only = json_msg(
            "u 68 /up",
            r#"{"x-mongrel2-upload-done":"/etc/passwd"}"#,
            "",
        );
        assert_eq!(
            Request::parse(&done_only).unwrap().upload(),
            UploadMarker::Mismatched
        );
        let repeated = json_msg(
            "u 68 /up",
            r#"{"x-mongrel2-upload-start":["/tmp/up.a","/etc/passwd"],"x-mongrel2-upload-done":"/tmp/up.a"}"#,
            "",
        );
        assert_eq!(
            Request::parse(&repeated).unwrap().upload(),
            UploadMarker::Mismatched
        );
        let chunked = json_msg("u 68 /up", r#"{"transfer-encoding":"Chunked"}"#, "");
        assert!(Request::parse(&chunked).unwrap().declares_body());
    }

    #[test]
    fn rejects_malformed_messages_but_keeps_the_address() {
        let bad = b"1b1d 32 /p 5:{\"a\",0:,";
        assert!(Request::parse(bad).is_err());
        assert_eq!(parse_address(bad), Some((&b"1b1d"[..], 32)));
        assert!(Request::parse(b"bad_uuid 1 /p 2:{},0:,").is_err());
        assert!(Request::parse(b"u x /p 2:{},0:,").is_err());
        assert!(Request::parse(b"u 1 /p 2:{},0:,extra").is_err());
        assert!(Request::parse(b"u 1 /p 2:{}]0:,").is_err());
        assert!(parse_address(b"u 1").is_none());
    }

    #[test]
    fn tells_notices_from_requests() {
        let disconnect = json_msg("u 7 @*", r#"{"METHOD":"JSON"}"#, r#"{"type":"disconnect"}"#);
        assert!(is_notice(&disconnect));
        assert!(!is_notice(&json_msg("u 7 /@*", "{}", "")));
        assert!(!is_notice(b"u 7 @*x 2:{},0:,"));
        assert!(!is_notice(b"u 7"));
    }

    proptest! {
        #[test]
        fn never_panics(input in proptest::collection::vec(any::<u8>(), 0..120)) {
            if let Ok(req) = Request::parse(&input) {
                let _ = (req.kind(), req.upload(), req.declares_body());
            }
            let _ = (parse_address(&input), is_notice(&input));
        }

        #[test]
        fn body_round_trips(body in proptest::collection::vec(any::<u8>(), 0..200), id in 0u64..u32::MAX as u64) {
            let mut msg = format!("abc-123 {id} /x 2:{{}},").into_bytes();
            crate::netstring::write(&mut msg, &body);
            let req = Request::parse(&msg).unwrap();
            prop_assert_eq!(req.body, &body[..]);
            prop_assert_eq!(req.conn_id, id);
        }
    }

    #[test]
    fn raw_headers_without_parsing() {
        assert_eq!(
            raw_headers(b"u 1 /p 11:{\"A\":\"b c\"},2:hi,"),
            Some(&b"{\"A\":\"b c\"}"[..])
        );
        assert_eq!(
            raw_headers(b"u 1 /p 8:1:A,1:b,}0:,"),
            Some(&b"1:A,1:b,"[..])
        );
        assert_eq!(raw_headers(b"u 1 /p 99:short"), None);
        assert_eq!(raw_headers(b"u 1"), None);
    }
}
