//! Request headers as mongrel2 sends them: names mapped to one string or a list of strings
//! (a repeated header arrives as a list, in arrival order). Values are bytes: mongrel2
//! passes non-UTF-8 through untouched.

use std::borrow::Cow;

/// A header value: borrowed from the message where no unescaping was needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue<'a> {
    One(Cow<'a, [u8]>),
    Many(Vec<Cow<'a, [u8]>>),
}

impl<'a> HeaderValue<'a> {
    /// The first value: what a single-valued header such as `content-length` means.
    pub fn first(&self) -> Option<&[u8]> {
        match self {
            HeaderValue::One(v) => Some(v),
            HeaderValue::Many(vs) => vs.first().map(|v| &v[..]),
        }
    }

    /// All values, joined by `sep` (CGI joins repeated headers with `, `, cookies with `; `).
    pub fn joined(&self, sep: &[u8]) -> Cow<'_, [u8]> {
        match self {
            HeaderValue::One(v) => Cow::Borrowed(v),
            HeaderValue::Many(vs) if vs.len() == 1 => Cow::Borrowed(&vs[0]),
            HeaderValue::Many(vs) => Cow::Owned(vs.join(sep)),
        }
    }
}

/// Header names with their values, in message order. Lookups are linear: a request has a
/// dozen or two headers, where a scan beats hashing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers<'a> {
    entries: Vec<(Cow<'a, [u8]>, HeaderValue<'a>)>,
}

impl<'a> Headers<'a> {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Headers {
            entries: Vec::with_capacity(n),
        }
    }

    pub(crate) fn push(&mut self, name: Cow<'a, [u8]>, value: HeaderValue<'a>) {
        self.entries.push((name, value));
    }

    /// The value under exactly this name (mongrel2 lower-cases client header names and
    /// upper-cases its own, so an exact match is the right test).
    pub fn get(&self, name: &[u8]) -> Option<&HeaderValue<'a>> {
        self.entries
            .iter()
            .find(|(n, _)| n.as_ref() == name)
            .map(|(_, v)| v)
    }

    /// The first value under this name.
    pub fn first(&self, name: &[u8]) -> Option<&[u8]> {
        self.get(name).and_then(HeaderValue::first)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &HeaderValue<'a>)> {
        self.entries.iter().map(|(n, v)| (n.as_ref(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
