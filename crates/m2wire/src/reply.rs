//! Reply messages to mongrel2: `UUID SP LEN ":" ID *(SP ID) "," SP BODY`.
//!
//! mongrel2 silently drops a reply it cannot parse (and stalls the handler task 100 ms), so
//! everything it would drop is refused here instead, where the caller can log it.

use std::fmt;

use crate::netstring::push_decimal;
use crate::request::{valid_sender, ConnId};

/// mongrel2's `limits.handler_targets` default: more ids and the whole message is dropped.
pub const MAX_TARGETS: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    BadUuid,
    NoTargets,
    TooManyTargets(usize),
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::BadUuid => write!(f, "reply UUID must be [A-Za-z0-9-]+"),
            ReplyError::NoTargets => write!(f, "reply addressed to no connection"),
            ReplyError::TooManyTargets(n) => {
                write!(
                    f,
                    "reply addressed to {n} connections; mongrel2 accepts {MAX_TARGETS}"
                )
            }
        }
    }
}

impl std::error::Error for ReplyError {}

/// Appends the reply header `UUID LEN:IDS, ` to `out`; the body is appended after it.
/// Streaming writers build this once per request and reuse it for every chunk.
pub fn encode_prefix(out: &mut Vec<u8>, uuid: &[u8], ids: &[ConnId]) -> Result<(), ReplyError> {
    if !valid_sender(uuid) {
        return Err(ReplyError::BadUuid);
    }
    if ids.is_empty() {
        return Err(ReplyError::NoTargets);
    }
    if ids.len() > MAX_TARGETS {
        return Err(ReplyError::TooManyTargets(ids.len()));
    }
    let mut list = Vec::with_capacity(ids.len() * 6);
    for (i, &id) in ids.iter().enumerate() {
        if i > 0 {
            list.push(b' ');
        }
        push_decimal(&mut list, id);
    }
    out.extend_from_slice(uuid);
    out.push(b' ');
    push_decimal(out, list.len() as u64);
    out.push(b':');
    out.extend_from_slice(&list);
    out.extend_from_slice(b", ");
    Ok(())
}

/// A complete reply: `body` goes verbatim to each connection.
pub fn encode_reply(uuid: &[u8], ids: &[ConnId], body: &[u8]) -> Result<Vec<u8>, ReplyError> {
    let mut out = Vec::with_capacity(uuid.len() + 16 + body.len());
    encode_prefix(&mut out, uuid, ids)?;
    out.extend_from_slice(body);
    Ok(out)
}

/// The 0-length reply: mongrel2 closes each connection after what is queued for it.
pub fn encode_close(uuid: &[u8], ids: &[ConnId]) -> Result<Vec<u8>, ReplyError> {
    encode_reply(uuid, ids, b"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encodes_the_canonical_forms() {
        assert_eq!(
            encode_reply(b"ab-1", &[42], b"hi").unwrap(),
            b"ab-1 2:42, hi"
        );
        assert_eq!(
            encode_reply(b"u", &[48, 49, 50], b"x").unwrap(),
            b"u 8:48 49 50, x"
        );
        assert_eq!(encode_close(b"u", &[7]).unwrap(), b"u 1:7, ");
    }

    #[test]
    fn refuses_what_mongrel2_would_drop() {
        assert_eq!(encode_reply(b"a_b", &[1], b""), Err(ReplyError::BadUuid));
        assert_eq!(encode_reply(b"a.b", &[1], b""), Err(ReplyError::BadUuid));
        assert_eq!(encode_reply(b"", &[1], b""), Err(ReplyError::BadUuid));
        assert_eq!(encode_reply(b"u", &[], b""), Err(ReplyError::NoTargets));
        let ids: Vec<ConnId> = (0..129).collect();
        assert_eq!(
            encode_reply(b"u", &ids, b""),
            Err(ReplyError::TooManyTargets(129))
        );
        assert!(encode_reply(b"u", &ids[..128], b"").is_ok());
    }

    proptest! {
        /// The id list's netstring length is exact, as mongrel2's parser demands.
        #[test]
        fn id_list_length_is_exact(ids in proptest::collection::vec(any::<u32>(), 1..128), body in proptest::collection::vec(any::<u8>(), 0..50)) {
            let ids: Vec<ConnId> = ids.into_iter().map(ConnId::from).collect();
            let msg = encode_reply(b"uuid-1", &ids, &body).unwrap();
            let rest = &msg[b"uuid-1 ".len()..];
            let (list, after) = crate::netstring::split(rest, 0).unwrap();
            let parsed: Vec<ConnId> = std::str::from_utf8(list).unwrap().split(' ').map(|s| s.parse().unwrap()).collect();
            prop_assert_eq!(parsed, ids);
            prop_assert_eq!(&after[..1], b" ");
            prop_assert_eq!(&after[1..], &body[..]);
        }
    }
}
