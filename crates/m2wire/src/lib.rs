//! The mongrel2 handler wire protocol, as spoken by mongrel2 1.12.
//!
//! Pure code: byte slices in, structures or bytes out, no I/O. Everything a gateway or a
//! mongrel2-compatible front end needs to agree with mongrel2 byte for byte lives here:
//!
//! * [`netstring`] and [`tnetstring`]: the framing both directions use;
//! * [`json`]: mongrel2's JSON headers, which are not always valid JSON, parsed leniently;
//! * [`request`]: request messages (`UUID ID PATH HEADERS BODY`) and what kind they are;
//! * [`reply`]: reply messages (`UUID LEN:IDS, BODY`) to one or many connections;
//! * [`encode`]: request and notice messages, as a front end writes them.

pub mod encode;
pub mod error;
pub mod headers;
pub mod json;
pub mod netstring;
pub mod reply;
pub mod request;
pub mod tnetstring;

pub use encode::{encode_notice, encode_request, Notice};
pub use error::WireError;
pub use headers::{HeaderValue, Headers};
pub use reply::{
    encode_close, encode_ctl, encode_prefix, encode_reply, Reply, ReplyError, MAX_TARGETS,
};
pub use request::{
    find_header, is_notice, parse_address, raw_headers, ConnId, HeaderEncoding, MessageKind,
    Request, UploadMarker,
};
