//! Reply messages to mongrel2: `UUID SP LEN ":" ID *(SP ID) "," SP BODY`.
//!
//! mongrel2 silently drops a reply it cannot parse (and stalls the handler task 100 ms), so
//! everything it would drop is refused here instead, where the caller can log it.

use std::fmt;

use crate::error::WireError;
use crate::netstring::{push_decimal, write, write_framed};
use crate::request::{parse_conn_id, valid_sender, ConnId};

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
    encode_prefix_of(out, uuid, ids, b"")
}

/// An extended reply, `UUID LEN:X IDS, [ctl, {key: value...}]`: a command to the front
/// end rather than bytes for the clients (mongrel2's `ctl` replies).
pub fn encode_ctl(
    uuid: &[u8],
    ids: &[ConnId],
    args: &[(&[u8], &[u8])],
) -> Result<Vec<u8>, ReplyError> {
    let mut out = Vec::with_capacity(uuid.len() + 64);
    encode_prefix_of(&mut out, uuid, ids, b"X ")?;
    write_framed(&mut out, b']', |list| {
        write(list, b"ctl");
        write_framed(list, b'}', |dict| {
            for (key, value) in args {
                write(dict, key);
                write(dict, value);
            }
        });
    });
    Ok(out)
}

fn encode_prefix_of(
    out: &mut Vec<u8>,
    uuid: &[u8],
    ids: &[ConnId],
    mark: &[u8],
) -> Result<(), ReplyError> {
    if !valid_sender(uuid) {
        return Err(ReplyError::BadUuid);
    }
    if ids.is_empty() {
        return Err(ReplyError::NoTargets);
    }
    if ids.len() > MAX_TARGETS {
        return Err(ReplyError::TooManyTargets(ids.len()));
    }
    out.extend_from_slice(uuid);
    out.push(b' ');
    write_framed(out, b',', |list| {
        list.extend_from_slice(mark);
        for (i, &id) in ids.iter().enumerate() {
            if i > 0 {
                list.push(b' ');
            }
            push_decimal(list, id);
        }
    });
    out.push(b' ');
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

/// A reply as a front end receives it. `ids` is the raw id list (`42`, `48 49 50`);
/// [`Reply::ids`] walks it. Extended replies (`X` first) carry a tnetstring command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply<'a> {
    pub uuid: &'a [u8],
    pub extended: bool,
    ids: &'a [u8],
    pub body: &'a [u8],
}

impl<'a> Reply<'a> {
    /// Parses mongrel2's reply grammar exactly (what it would drop is refused): a UUID of
    /// `[A-Za-z0-9-]+`, an exact netstring length, ids separated by at most one space, at
    /// most [`MAX_TARGETS`] of them, then `, ` and the body.
    pub fn parse(msg: &'a [u8]) -> Result<Reply<'a>, WireError> {
        let space = msg
            .iter()
            .position(|&b| b == b' ')
            .ok_or(WireError::at(0, "no space after the reply UUID"))?;
        let uuid = &msg[..space];
        if !valid_sender(uuid) {
            return Err(WireError::at(0, "reply UUID must be [A-Za-z0-9-]+"));
        }
        let (list, rest) = crate::netstring::split(&msg[space + 1..], space + 1)?;
        let body = rest.strip_prefix(b" ").ok_or(WireError::at(
            msg.len() - rest.len(),
            "no space after the id list",
        ))?;
        let (extended, ids) = match list.strip_prefix(b"X ") {
            Some(ids) => (true, ids),
            None => (false, list),
        };
        let reply = Reply {
            uuid,
            extended,
            ids,
            body,
        };
        let mut count = 0;
        for id in ids.split(|&b| b == b' ') {
            match (id.is_empty(), count) {
                // One trailing space is allowed, as mongrel2 allows it.
                (true, n) if n > 0 && ids.ends_with(b" ") && !ids.ends_with(b"  ") => {}
                _ if parse_conn_id(id).is_none() => {
                    return Err(WireError::at(space + 1, "malformed connection id list"))
                }
                _ => count += 1,
            }
        }
        if count > MAX_TARGETS {
            return Err(WireError::at(space + 1, "more than 128 connection ids"));
        }
        Ok(reply)
    }

    /// The connection ids, in the order given.
    pub fn ids(&self) -> impl Iterator<Item = ConnId> + 'a {
        self.ids.split(|&b| b == b' ').filter_map(parse_conn_id)
    }
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
    fn a_ctl_reply_is_an_extended_reply_mongrel2_would_read() {
        let msg = encode_ctl(b"u", &[42], &[(b"done", b"close")]).unwrap();
        assert_eq!(&msg[..], b"u 4:X 42, 25:3:ctl,15:4:done,5:close,}]");
        let reply = Reply::parse(&msg).unwrap();
        assert!(reply.extended);
        assert_eq!(reply.ids().collect::<Vec<_>>(), [42]);
        assert_eq!(reply.body, b"25:3:ctl,15:4:done,5:close,}]");
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

    #[test]
    fn parses_what_mongrel2_accepts_and_nothing_else() {
        let r = Reply::parse(b"ab-1 2:42, hi").unwrap();
        assert_eq!(
            (r.uuid, r.extended, r.body),
            (&b"ab-1"[..], false, &b"hi"[..])
        );
        assert_eq!(r.ids().collect::<Vec<_>>(), [42]);
        let r = Reply::parse(b"u 8:48 49 50, ").unwrap();
        assert_eq!(r.ids().collect::<Vec<_>>(), [48, 49, 50]);
        assert_eq!(r.body, b"");
        let r = Reply::parse(b"u 3:59 , X").unwrap();
        assert_eq!(r.ids().collect::<Vec<_>>(), [59]);
        let r = Reply::parse(b"u 4:X 10, 3:ctl,}]").unwrap();
        assert!(r.extended);
        assert_eq!(r.ids().collect::<Vec<_>>(), [10]);
        for bad in [
            &b"u 2:57,X"[..],
            b"u 3:58, X",
            b"u 5:1  2, X",
            b"a_b 1:1, X",
            b"u 0:, X",
            b"u 1:a, X",
            b"nospace",
        ] {
            assert!(
                Reply::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let ids: Vec<ConnId> = (1..=129).collect();
        assert!(Reply::parse(&encode_reply(b"u", &ids[..128], b"").unwrap()).is_ok());
        let many = [&b"u "[..], &{
            let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            let list = list.join(" ");
            format!("{}:{}, ", list.len(), list).into_bytes()
        }]
        .concat();
        assert!(Reply::parse(&many).is_err());
    }

    proptest! {
        /// What we encode, we parse back.
        #[test]
        fn encode_then_parse(ids in proptest::collection::vec(any::<u32>(), 1..128), body in proptest::collection::vec(any::<u8>(), 0..50)) {
            let ids: Vec<ConnId> = ids.into_iter().map(ConnId::from).collect();
            let msg = encode_reply(b"uuid-1", &ids, &body).unwrap();
            let r = Reply::parse(&msg).unwrap();
            prop_assert_eq!(r.ids().collect::<Vec<_>>(), ids);
            prop_assert_eq!(r.body, &body[..]);
        }

        /// Arbitrary bytes never panic the parser.
        #[test]
        fn never_panics(msg in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Reply::parse(&msg).map(|r| r.ids().count());
        }

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
