//! Dir routes: static files with mongrel2's behaviour minus its bugs (reference §4, §10), plus
//! single byte ranges. Only decisions live here; the caller does the socket I/O.

use std::ffi::OsStr;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::mime::MimeTypes;

const SERVER: &str = "wsgid";

/// One Dir route's target directory.
#[derive(Debug, Clone)]
pub struct DirRoute {
    /// Canonical, so that containment is a component-wise prefix test on canonical paths.
    base: PathBuf,
    index_file: String,
    default_ctype: String,
}

/// What a request path names under a Dir route.
#[derive(Debug)]
pub enum Resolved {
    /// A regular file inside the base; `path` is canonical (symlinks resolved, as mongrel2
    /// picks the Content-Type from the real path), `meta` comes from the open descriptor.
    File {
        path: PathBuf,
        file: File,
        meta: Box<Metadata>,
    },
    /// A directory asked for without its trailing slash: answer with `redirect_with_slash`.
    AddSlash,
    NotFound,
}

impl DirRoute {
    /// Call inside the chroot: the base is canonicalized once, here. A `default_ctype` with
    /// control characters is refused, as it would break the response head.
    pub fn new(base: &Path, index_file: &str, default_ctype: &str) -> io::Result<DirRoute> {
        let base = base.canonicalize()?;
        if !base.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("Dir base {} is not a directory", base.display()),
            ));
        }
        if default_ctype.chars().any(char::is_control) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("Dir default_ctype {default_ctype:?} holds control characters"),
            ));
        }
        Ok(DirRoute {
            base,
            index_file: index_file.to_string(),
            default_ctype: default_ctype.to_string(),
        })
    }

    /// Maps `rest`, the raw request path after the route's literal prefix (no query), to a
    /// file. No lexical `..` handling at all: a `..` segment is refused rather than climbed,
    /// and containment is then checked on the canonical path of what was actually opened.
    /// `rest` must start at a segment boundary (the router's job): this function cannot tell
    /// `/st2a.txt` under prefix `/st2` (bug #3) from `a.txt` under prefix `/static/`.
    pub fn resolve(&self, rest: &[u8]) -> Resolved {
        let wants_dir = rest.is_empty() || rest.ends_with(b"/");
        let mut joined = self.base.clone();
        for raw in rest.split(|&b| b == b'/') {
            let Some(segment) = decode_segment(raw) else {
                return Resolved::NotFound;
            };
            match segment.as_slice() {
                b"" | b"." => {}
                b".." => return Resolved::NotFound,
                name => joined.push(OsStr::from_bytes(name)),
            }
        }
        if wants_dir {
            joined.push(&self.index_file);
        }
        self.open_inside(&joined, wants_dir)
            .unwrap_or(Resolved::NotFound)
    }

    /// Opens first, then proves that the opened object is the one the canonical path inside
    /// the base names (same dev/ino), so a symlink swapped between the two steps is refused.
    fn open_inside(&self, joined: &Path, wants_dir: bool) -> Option<Resolved> {
        // O_NONBLOCK: opening a FIFO must not wait for a writer. O_NOCTTY: a terminal device
        // must not become our controlling terminal.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(joined)
            .ok()?;
        let meta = file.metadata().ok()?;
        let canonical = joined.canonicalize().ok()?;
        // Path::starts_with compares whole components: `static2` is not inside `static`.
        if !canonical.starts_with(&self.base) {
            return None;
        }
        let named = std::fs::metadata(&canonical).ok()?;
        if named.dev() != meta.dev() || named.ino() != meta.ino() {
            return None;
        }
        if meta.is_file() {
            Some(Resolved::File {
                path: canonical,
                file,
                meta: Box::new(meta),
            })
        } else if meta.is_dir() && !wants_dir {
            Some(Resolved::AddSlash)
        } else {
            // Directories with a slash (no listings), FIFOs, sockets, devices.
            None
        }
    }

    pub fn content_type<'a>(&'a self, mime: &'a MimeTypes, path: &Path) -> &'a str {
        path.file_name()
            .and_then(|name| mime.lookup(name.as_bytes()))
            .unwrap_or(self.default_ctype.as_str())
    }
}

/// Decodes one path segment. `None` for a malformed escape, and for bytes that must never
/// reach the file system inside a name: NUL (a C string would end there, bug #2), and `/` or
/// `\` whether raw or escaped (an encoded separator must not become one).
fn decode_segment(raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = if raw[i] == b'%' {
            let hi = hex_value(*raw.get(i + 1)?)?;
            let lo = hex_value(*raw.get(i + 2)?)?;
            i += 3;
            (hi << 4) | lo
        } else {
            i += 1;
            raw[i - 1]
        };
        if matches!(b, 0 | b'/' | b'\\') {
            return None;
        }
        out.push(b);
    }
    Some(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The request headers that decide between 200, 206, 304, 412 and 416 (raw values).
#[derive(Debug, Clone, Copy, Default)]
pub struct Conditions<'a> {
    pub method_is_head: bool,
    pub if_match: Option<&'a [u8]>,
    pub if_none_match: Option<&'a [u8]>,
    pub if_modified_since: Option<&'a [u8]>,
    pub if_unmodified_since: Option<&'a [u8]>,
    pub range: Option<&'a [u8]>,
    pub if_range: Option<&'a [u8]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileFacts {
    pub size: u64,
    pub mtime: SystemTime,
    /// `st_mtime`: validators compare whole seconds, as HTTP dates carry no more.
    pub mtime_secs: i64,
    pub inode: u64,
}

impl FileFacts {
    /// From the `meta` of `Resolved::File` (an fstat of the served descriptor).
    pub fn from_metadata(meta: &Metadata) -> FileFacts {
        FileFacts {
            size: meta.len(),
            mtime: meta.modified().unwrap_or(UNIX_EPOCH),
            mtime_secs: meta.mtime(),
            inode: meta.ino(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Full,
    Partial { start: u64, end_inclusive: u64 },
    NotModified,
    PreconditionFailed,
    RangeNotSatisfiable,
}

/// The response for a GET or HEAD of an existing file, in RFC 9110 §13.2.2 order.
/// Reads the clock only to ignore If-Modified-Since dates in the future.
pub fn plan(c: &Conditions, f: &FileFacts) -> Plan {
    plan_at(c, f, SystemTime::now())
}

fn plan_at(c: &Conditions, f: &FileFacts, now: SystemTime) -> Plan {
    let ours = opaque_tag(f);
    let ours = ours.as_bytes();
    if let Some(value) = c.if_match {
        if !tags_match(value, ours, true) {
            return Plan::PreconditionFailed;
        }
    } else if let Some(date) = c.if_unmodified_since.and_then(http_date_secs) {
        if f.mtime_secs > date {
            return Plan::PreconditionFailed;
        }
    }
    if let Some(value) = c.if_none_match {
        if tags_match(value, ours, false) {
            return Plan::NotModified;
        }
    } else if let Some(date) = c.if_modified_since.and_then(http_date_secs) {
        if date <= unix_secs(now) && f.mtime_secs <= date {
            return Plan::NotModified;
        }
    }
    // Range is defined for GET only (RFC 9110 §14.2).
    if c.method_is_head {
        return Plan::Full;
    }
    let Some(range) = c.range else {
        return Plan::Full;
    };
    if let Some(value) = c.if_range {
        if !if_range_holds(value, f, ours) {
            return Plan::Full;
        }
    }
    range_plan(range, f.size)
}

/// Strong and quoted, unlike mongrel2's (bug #8), so that clients compare it as RFC 9110 says.
pub fn etag(f: &FileFacts) -> String {
    format!("\"{}\"", opaque_tag(f))
}

fn opaque_tag(f: &FileFacts) -> String {
    format!("{:x}-{:x}", f.mtime_secs, f.size)
}

/// Whether an If-Match / If-None-Match value (`*` or a list of entity-tags) names our
/// representation. A strong comparison never matches a weak tag; malformed elements never
/// match.
fn tags_match(value: &[u8], ours: &[u8], strong: bool) -> bool {
    let value = value.trim_ascii();
    if value == b"*" {
        return true;
    }
    let mut rest = value;
    while let Some(start) = rest.iter().position(|&b| !matches!(b, b' ' | b'\t' | b',')) {
        rest = &rest[start..];
        let (weak, tag) = match rest.strip_prefix(b"W/") {
            Some(tag) => (true, tag),
            None => (false, rest),
        };
        let Some(quoted) = tag.strip_prefix(b"\"") else {
            rest = match rest.iter().position(|&b| b == b',') {
                Some(comma) => &rest[comma..],
                None => &[],
            };
            continue;
        };
        let Some(end) = quoted.iter().position(|&b| b == b'"') else {
            return false;
        };
        if quoted[..end] == *ours && !(strong && weak) {
            return true;
        }
        rest = &quoted[end + 1..];
    }
    false
}

/// If-Range (RFC 9110 §13.1.5): an entity-tag must match strongly, a date must be exactly
/// Last-Modified.
fn if_range_holds(value: &[u8], f: &FileFacts, ours: &[u8]) -> bool {
    let value = value.trim_ascii();
    if value.starts_with(b"W/") {
        return false;
    }
    if let Some(quoted) = value.strip_prefix(b"\"") {
        return quoted.strip_suffix(b"\"") == Some(ours);
    }
    http_date_secs(value) == Some(f.mtime_secs)
}

/// A `bytes=` Range with exactly one range-spec. Anything else is ignored (200), which RFC
/// 9110 §14.2 allows, so multiple ranges never need multipart bodies.
fn range_plan(value: &[u8], size: u64) -> Plan {
    let value = value.trim_ascii();
    if value.len() < 6 || !value[..6].eq_ignore_ascii_case(b"bytes=") {
        return Plan::Full;
    }
    let mut specs = value[6..]
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|spec| !spec.is_empty());
    let (Some(spec), None) = (specs.next(), specs.next()) else {
        return Plan::Full;
    };
    let Some(dash) = spec.iter().position(|&b| b == b'-') else {
        return Plan::Full;
    };
    let (first, last) = (&spec[..dash], &spec[dash + 1..]);
    if first.is_empty() {
        let Some(suffix) = digits(last) else {
            return Plan::Full;
        };
        if suffix == 0 || size == 0 {
            return Plan::RangeNotSatisfiable;
        }
        return Plan::Partial {
            start: size.saturating_sub(suffix),
            end_inclusive: size - 1,
        };
    }
    let Some(start) = digits(first) else {
        return Plan::Full;
    };
    let end = if last.is_empty() {
        u64::MAX
    } else {
        match digits(last) {
            Some(end) if end >= start => end,
            _ => return Plan::Full,
        }
    };
    if start >= size {
        return Plan::RangeNotSatisfiable;
    }
    Plan::Partial {
        start,
        end_inclusive: end.min(size - 1),
    }
}

/// Saturates rather than failing: an over-long last-pos still means "to the end".
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, &d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

/// Any of the three HTTP date formats; `None` when unparsable, so the header is ignored.
fn http_date_secs(value: &[u8]) -> Option<i64> {
    let date = httpdate::parse_http_date(std::str::from_utf8(value).ok()?).ok()?;
    i64::try_from(date.duration_since(UNIX_EPOCH).ok()?.as_secs()).ok()
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// httpdate panics outside 1970..=9999, and a file's mtime can be anything.
fn http_date(t: SystemTime) -> String {
    const LAST: Duration = Duration::from_secs(253_402_300_799);
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    httpdate::fmt_http_date(UNIX_EPOCH + since.min(LAST))
}

/// The short text/plain body of a 412 or 416; empty for the other plans.
pub fn error_body(plan: &Plan) -> &'static [u8] {
    match plan {
        Plan::PreconditionFailed => &b"Precondition Failed"[..],
        Plan::RangeNotSatisfiable => &b"Range Not Satisfiable"[..],
        Plan::Full | Plan::Partial { .. } | Plan::NotModified => &b""[..],
    }
}

/// The response head for `plan`, with a fresh Date (mongrel2 reused stale ones, bug #9).
/// `Connection: close` only when the caller really closes afterwards (bug #11).
pub fn head(
    plan: &Plan,
    facts: &FileFacts,
    content_type: &str,
    keep_alive: bool,
    now: SystemTime,
) -> Vec<u8> {
    let status = match plan {
        Plan::Full => "200 OK",
        Plan::Partial { .. } => "206 Partial Content",
        Plan::NotModified => "304 Not Modified",
        Plan::PreconditionFailed => "412 Precondition Failed",
        Plan::RangeNotSatisfiable => "416 Range Not Satisfiable",
    };
    let mut h = Vec::with_capacity(320);
    h.extend_from_slice(b"HTTP/1.1 ");
    h.extend_from_slice(status.as_bytes());
    h.extend_from_slice(b"\r\n");
    push_header(&mut h, "Date", &http_date(now));
    push_header(&mut h, "Server", SERVER);
    let validators = |h: &mut Vec<u8>| {
        push_header(h, "Last-Modified", &http_date(facts.mtime));
        push_header(h, "ETag", &etag(facts));
    };
    match *plan {
        Plan::Full => {
            push_header(&mut h, "Content-Type", content_type);
            push_header(&mut h, "Content-Length", &facts.size.to_string());
            validators(&mut h);
            push_header(&mut h, "Accept-Ranges", "bytes");
        }
        Plan::Partial {
            start,
            end_inclusive,
        } => {
            let length = end_inclusive.saturating_sub(start).saturating_add(1);
            push_header(&mut h, "Content-Type", content_type);
            push_header(&mut h, "Content-Length", &length.to_string());
            push_header(
                &mut h,
                "Content-Range",
                &format!("bytes {start}-{end_inclusive}/{}", facts.size),
            );
            validators(&mut h);
            push_header(&mut h, "Accept-Ranges", "bytes");
        }
        Plan::NotModified => validators(&mut h),
        Plan::PreconditionFailed => {
            push_header(&mut h, "Content-Type", "text/plain");
            push_header(
                &mut h,
                "Content-Length",
                &error_body(plan).len().to_string(),
            );
        }
        Plan::RangeNotSatisfiable => {
            push_header(&mut h, "Content-Type", "text/plain");
            push_header(
                &mut h,
                "Content-Length",
                &error_body(plan).len().to_string(),
            );
            push_header(&mut h, "Content-Range", &format!("bytes */{}", facts.size));
        }
    }
    if !keep_alive {
        push_header(&mut h, "Connection", "close");
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// The 301 for a directory asked without its trailing slash. The Location is an absolute
/// path, not mongrel2's `//Host<URI>/` with the query before the slash (bug #10). Leading
/// slashes collapse to one and unsafe bytes are escaped, so the Location can neither become
/// a scheme-relative URL to another host nor break the head.
pub fn redirect_with_slash(raw_path: &[u8], query: Option<&[u8]>) -> Vec<u8> {
    let start = raw_path
        .iter()
        .position(|&b| b != b'/')
        .unwrap_or(raw_path.len());
    let mut location = vec![b'/'];
    push_escaped(&mut location, &raw_path[start..]);
    if !location.ends_with(b"/") {
        location.push(b'/');
    }
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        location.push(b'?');
        push_escaped(&mut location, query);
    }
    let mut h = b"HTTP/1.1 301 Moved Permanently\r\n".to_vec();
    push_header(&mut h, "Date", &http_date(SystemTime::now()));
    push_header(&mut h, "Server", SERVER);
    h.extend_from_slice(b"Location: ");
    h.extend_from_slice(&location);
    h.extend_from_slice(b"\r\n");
    push_header(&mut h, "Content-Length", "0");
    h.extend_from_slice(b"\r\n");
    h
}

/// Percent-escapes controls, space, non-ASCII and `\` (which browsers read as `/`).
fn push_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b <= b' ' || b >= 0x7f || b == b'\\' {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        } else {
            out.push(b);
        }
    }
}

fn push_header(h: &mut Vec<u8>, name: &str, value: &str) {
    h.extend_from_slice(name.as_bytes());
    h.extend_from_slice(b": ");
    h.extend_from_slice(value.as_bytes());
    h.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Read;
    use std::os::unix::fs::symlink;

    /// `root/static` is the base; `root/static2` and `root/secret.txt` are outside it.
    fn tree() -> (tempfile::TempDir, DirRoute, PathBuf) {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        let s = r.join("static");
        std::fs::create_dir(&s).expect("mkdir static");
        std::fs::create_dir(s.join("sub")).expect("mkdir sub");
        std::fs::create_dir(s.join("emptydir")).expect("mkdir emptydir");
        std::fs::create_dir(r.join("static2")).expect("mkdir static2");
        std::fs::write(s.join("index.html"), "index\n").expect("write");
        std::fs::write(s.join("a.txt"), "hello a\n").expect("write");
        std::fs::write(s.join("sub/b.txt"), "b\n").expect("write");
        std::fs::write(r.join("static2/secret.txt"), "sibling\n").expect("write");
        std::fs::write(r.join("secret.txt"), "secret\n").expect("write");
        symlink("a.txt", s.join("link_in.txt")).expect("symlink");
        symlink("sub", s.join("subln")).expect("symlink");
        symlink("../secret.txt", s.join("link_out.txt")).expect("symlink");
        symlink("../static2", s.join("sib")).expect("symlink");
        let route = DirRoute::new(&s, "index.html", "application/octet-stream").expect("route");
        let base = s.canonicalize().expect("canonicalize");
        (root, route, base)
    }

    fn served(route: &DirRoute, rest: &[u8]) -> Option<PathBuf> {
        match route.resolve(rest) {
            Resolved::File { path, .. } => Some(path),
            Resolved::AddSlash | Resolved::NotFound => None,
        }
    }

    fn not_found(route: &DirRoute, rest: &[u8]) -> bool {
        matches!(route.resolve(rest), Resolved::NotFound)
    }

    #[test]
    fn index_file() {
        let (_root, route, base) = tree();
        assert_eq!(served(&route, b""), Some(base.join("index.html")));
        assert_eq!(served(&route, b"/"), Some(base.join("index.html")));
        assert_eq!(served(&route, b"./"), Some(base.join("index.html")));
    }

    #[test]
    fn plain_files_and_harmless_spellings() {
        let (_root, route, base) = tree();
        let cases: &[&[u8]] = &[
            b"a.txt",
            b"/a.txt",
            b"//a.txt",
            b"./a.txt",
            b"/./a.txt",
            b"%61.txt",
            b"%2e/a.txt",
        ];
        for &rest in cases {
            assert_eq!(
                served(&route, rest),
                Some(base.join("a.txt")),
                "{}",
                String::from_utf8_lossy(rest)
            );
        }
        assert_eq!(served(&route, b"sub/b.txt"), Some(base.join("sub/b.txt")));
    }

    #[test]
    fn served_file_is_open_and_described() {
        let (_root, route, _base) = tree();
        let Resolved::File { mut file, meta, .. } = route.resolve(b"a.txt") else {
            panic!("a.txt not served");
        };
        let mut body = String::new();
        file.read_to_string(&mut body).expect("read");
        assert_eq!(body, "hello a\n");
        assert!(meta.is_file());
        let facts = FileFacts::from_metadata(&meta);
        assert_eq!(facts.size, 8);
        assert_eq!(facts.inode, meta.ino());
    }

    #[test]
    fn traversal_and_smuggling_refused() {
        let (_root, route, _base) = tree();
        let cases: &[&[u8]] = &[
            b"../secret.txt",
            b"/../secret.txt",
            b"%2e%2e/secret.txt",
            b"%2E%2E/secret.txt",
            b".%2e/secret.txt",
            b"..%2fsecret.txt",
            b"..%2Fsecret.txt",
            b"..%2fstatic2/secret.txt",
            b"../static2/secret.txt",
            b"sub/../a.txt",
            b"sub%2fb.txt",
            b"sub%5cb.txt",
            b"sub\\b.txt",
            b"a.txt%00.html",
            b"a.txt%00",
            b"a.txt\0",
            b"%zz.txt",
            b"a.txt%2",
            b"a.txt%",
        ];
        for &rest in cases {
            assert!(not_found(&route, rest), "{}", String::from_utf8_lossy(rest));
        }
    }

    #[test]
    fn missing_and_not_a_directory() {
        let (_root, route, _base) = tree();
        assert!(not_found(&route, b"missing.txt"));
        assert!(not_found(&route, b"a.txt/"));
        assert!(not_found(&route, b"a.txt/x"));
    }

    #[test]
    fn symlinks_inside_base_are_followed() {
        let (_root, route, base) = tree();
        assert_eq!(served(&route, b"link_in.txt"), Some(base.join("a.txt")));
        assert_eq!(served(&route, b"subln/b.txt"), Some(base.join("sub/b.txt")));
    }

    #[test]
    fn symlinks_out_of_base_are_refused() {
        let (_root, route, _base) = tree();
        assert!(not_found(&route, b"link_out.txt"));
        // A string prefix test would accept `.../static2` as inside `.../static` (bug #1).
        assert!(not_found(&route, b"sib/secret.txt"));
        assert!(not_found(&route, b"sib"));
        assert!(not_found(&route, b"sib/"));
    }

    #[test]
    fn directories() {
        let (_root, route, _base) = tree();
        let cases: &[&[u8]] = &[b"sub", b"/sub", b"emptydir", b"subln", b"sub/.", b"."];
        for &rest in cases {
            assert!(
                matches!(route.resolve(rest), Resolved::AddSlash),
                "{}",
                String::from_utf8_lossy(rest)
            );
        }
        // No index and no listings.
        assert!(not_found(&route, b"emptydir/"));
        assert!(not_found(&route, b"sub/"));
    }

    #[test]
    fn special_files_refused_without_blocking() {
        let (_root, route, base) = tree();
        let status = std::process::Command::new("mkfifo")
            .arg(base.join("pipe"))
            .status()
            .expect("run mkfifo");
        assert!(status.success());
        assert!(not_found(&route, b"pipe"));
    }

    #[test]
    fn base_through_a_symlink_and_base_must_be_a_directory() {
        let (root, _route, base) = tree();
        let alias = root.path().join("alias");
        symlink(&base, &alias).expect("symlink");
        let route = DirRoute::new(&alias, "index.html", "text/plain").expect("route");
        assert_eq!(served(&route, b"a.txt"), Some(base.join("a.txt")));
        assert!(DirRoute::new(&base.join("a.txt"), "index.html", "text/plain").is_err());
        assert!(DirRoute::new(&root.path().join("nope"), "index.html", "text/plain").is_err());
        assert!(DirRoute::new(&base, "index.html", "text/plain\r\nX: y").is_err());
    }

    #[test]
    fn content_type_from_name_or_default() {
        let (_root, route, base) = tree();
        let mime = MimeTypes::new(&BTreeMap::new());
        assert_eq!(
            route.content_type(&mime, &base.join("UP.TXT")),
            "text/plain"
        );
        assert_eq!(route.content_type(&mime, &base.join("x.css")), "text/css");
        assert_eq!(
            route.content_type(&mime, &base.join("README")),
            "application/octet-stream"
        );
    }

    const MTIME: i64 = 784_111_777; // Sun, 06 Nov 1994 08:49:37 GMT
    const IMF: &[u8] = b"Sun, 06 Nov 1994 08:49:37 GMT";

    fn at(secs: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).expect("after 1970"))
    }

    fn date(secs: i64) -> Vec<u8> {
        httpdate::fmt_http_date(at(secs)).into_bytes()
    }

    fn facts(size: u64) -> FileFacts {
        FileFacts {
            size,
            mtime: at(MTIME),
            mtime_secs: MTIME,
            inode: 7,
        }
    }

    /// The plan for a 100-byte file at `MTIME`, a million seconds later.
    fn p(c: Conditions) -> Plan {
        plan_at(&c, &facts(100), at(MTIME + 1_000_000))
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn tag() -> Vec<u8> {
        etag(&facts(100)).into_bytes()
    }

    #[test]
    fn etag_is_quoted_hex() {
        assert_eq!(etag(&facts(100)), format!("\"{MTIME:x}-64\""));
        let f = FileFacts {
            size: 8,
            mtime: at(0x6b0e_2a92),
            mtime_secs: 0x6b0e_2a92,
            inode: 1,
        };
        assert_eq!(etag(&f), "\"6b0e2a92-8\"");
    }

    #[test]
    fn unconditional() {
        assert_eq!(p(Conditions::default()), Plan::Full);
    }

    #[test]
    fn if_match() {
        let ours = tag();
        let weak = cat(&[b"W/", &ours]);
        let list = cat(&[b"\"nope\", ", &ours]);
        let unquoted = &ours[1..ours.len() - 1];
        let im = |v: &[u8]| {
            p(Conditions {
                if_match: Some(v),
                ..Conditions::default()
            })
        };
        assert_eq!(im(&ours), Plan::Full);
        assert_eq!(im(b"*"), Plan::Full);
        assert_eq!(im(b" * "), Plan::Full);
        assert_eq!(im(&list), Plan::Full);
        assert_eq!(im(&weak), Plan::PreconditionFailed);
        assert_eq!(im(b"\"nope\""), Plan::PreconditionFailed);
        assert_eq!(im(unquoted), Plan::PreconditionFailed);
        assert_eq!(im(b""), Plan::PreconditionFailed);
        assert_eq!(im(b"garbage, \"also-nope\""), Plan::PreconditionFailed);
    }

    #[test]
    fn if_unmodified_since() {
        let ius = |v: &[u8]| {
            p(Conditions {
                if_unmodified_since: Some(v),
                ..Conditions::default()
            })
        };
        assert_eq!(ius(&date(MTIME - 1)), Plan::PreconditionFailed);
        assert_eq!(ius(IMF), Plan::Full);
        assert_eq!(ius(&date(MTIME + 1)), Plan::Full);
        assert_eq!(ius(b"yesterday"), Plan::Full);
        // Ignored when If-Match is present.
        let ours = tag();
        let old = date(MTIME - 1);
        let both = Conditions {
            if_match: Some(&ours),
            if_unmodified_since: Some(&old),
            ..Conditions::default()
        };
        assert_eq!(p(both), Plan::Full);
    }

    #[test]
    fn if_none_match() {
        let ours = tag();
        let weak = cat(&[b"W/", &ours]);
        let list = cat(&[b"\"a\",W/\"b\" ,  ", &ours, b", \"c\""]);
        let with_comma = cat(&[b"\"x,y\", ", &ours]);
        let unquoted = &ours[1..ours.len() - 1];
        let inm = |v: &[u8]| {
            p(Conditions {
                if_none_match: Some(v),
                ..Conditions::default()
            })
        };
        assert_eq!(inm(&ours), Plan::NotModified);
        assert_eq!(inm(&weak), Plan::NotModified);
        assert_eq!(inm(&list), Plan::NotModified);
        assert_eq!(inm(&with_comma), Plan::NotModified);
        assert_eq!(inm(b"*"), Plan::NotModified);
        assert_eq!(inm(b"\"other\""), Plan::Full);
        assert_eq!(inm(b"W/\"other\", \"more\""), Plan::Full);
        assert_eq!(inm(unquoted), Plan::Full);
        // A failed If-None-Match makes If-Modified-Since irrelevant (mongrel2 checked it).
        let c = Conditions {
            if_none_match: Some(b"\"other\""),
            if_modified_since: Some(IMF),
            ..Conditions::default()
        };
        assert_eq!(p(c), Plan::Full);
    }

    #[test]
    fn if_modified_since() {
        let ims = |v: &[u8]| {
            p(Conditions {
                if_modified_since: Some(v),
                ..Conditions::default()
            })
        };
        assert_eq!(ims(IMF), Plan::NotModified);
        assert_eq!(ims(b"Sunday, 06-Nov-94 08:49:37 GMT"), Plan::NotModified);
        assert_eq!(ims(b"Sun Nov  6 08:49:37 1994"), Plan::NotModified);
        assert_eq!(ims(&date(MTIME - 1)), Plan::Full);
        assert_eq!(ims(&date(MTIME + 10)), Plan::NotModified);
        assert_eq!(ims(&date(MTIME + 1_000_000)), Plan::NotModified);
        assert_eq!(ims(&date(MTIME + 1_000_001)), Plan::Full);
        assert_eq!(ims(b"not a date"), Plan::Full);
        assert_eq!(ims(b"\xff"), Plan::Full);
    }

    #[test]
    fn precondition_order() {
        let ours = tag();
        let c = Conditions {
            if_match: Some(b"\"nope\""),
            if_none_match: Some(&ours),
            ..Conditions::default()
        };
        assert_eq!(p(c), Plan::PreconditionFailed);
        let c = Conditions {
            if_none_match: Some(&ours),
            range: Some(b"bytes=0-9"),
            ..Conditions::default()
        };
        assert_eq!(p(c), Plan::NotModified);
    }

    fn ranged(v: &[u8]) -> Plan {
        p(Conditions {
            range: Some(v),
            ..Conditions::default()
        })
    }

    fn part(start: u64, end_inclusive: u64) -> Plan {
        Plan::Partial {
            start,
            end_inclusive,
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(ranged(b"bytes=0-9"), part(0, 9));
        assert_eq!(ranged(b"bytes=5-"), part(5, 99));
        assert_eq!(ranged(b"bytes=-3"), part(97, 99));
        assert_eq!(ranged(b"bytes=-300"), part(0, 99));
        assert_eq!(ranged(b"bytes=90-200"), part(90, 99));
        assert_eq!(ranged(b"bytes=99-99"), part(99, 99));
        assert_eq!(ranged(b"BYTES=0-0"), part(0, 0));
        assert_eq!(ranged(b" bytes= 0-9 "), part(0, 9));
        assert_eq!(ranged(b"bytes=0-9,"), part(0, 9));
        assert_eq!(ranged(b"bytes=0-99999999999999999999999"), part(0, 99));
    }

    #[test]
    fn ranges_ignored() {
        let cases: &[&[u8]] = &[
            b"bytes=10-5",
            b"bytes=0-1,5-6",
            b"bytes=0-1, -5",
            b"items=0-9",
            b"bytes=",
            b"bytes=-",
            b"bytes=abc",
            b"bytes=5",
            b"bytes=1-2-3",
            b"bytes=+1-2",
            b"bytes",
        ];
        for &v in cases {
            assert_eq!(ranged(v), Plan::Full, "{}", String::from_utf8_lossy(v));
        }
        let head = Conditions {
            method_is_head: true,
            range: Some(b"bytes=0-9"),
            ..Conditions::default()
        };
        assert_eq!(p(head), Plan::Full);
    }

    #[test]
    fn ranges_unsatisfiable() {
        assert_eq!(ranged(b"bytes=100-"), Plan::RangeNotSatisfiable);
        assert_eq!(ranged(b"bytes=150-160"), Plan::RangeNotSatisfiable);
        assert_eq!(ranged(b"bytes=-0"), Plan::RangeNotSatisfiable);
        let empty = Conditions {
            range: Some(b"bytes=0-"),
            ..Conditions::default()
        };
        let now = at(MTIME + 1_000_000);
        assert_eq!(plan_at(&empty, &facts(0), now), Plan::RangeNotSatisfiable);
        let suffix = Conditions {
            range: Some(b"bytes=-5"),
            ..Conditions::default()
        };
        assert_eq!(plan_at(&suffix, &facts(0), now), Plan::RangeNotSatisfiable);
    }

    #[test]
    fn if_range() {
        let ours = tag();
        let weak = cat(&[b"W/", &ours]);
        let later = date(MTIME + 1);
        let ir = |if_range: &[u8], range: &[u8]| {
            p(Conditions {
                range: Some(range),
                if_range: Some(if_range),
                ..Conditions::default()
            })
        };
        assert_eq!(ir(&ours, b"bytes=0-9"), part(0, 9));
        assert_eq!(ir(IMF, b"bytes=0-9"), part(0, 9));
        assert_eq!(ir(b"\"other\"", b"bytes=0-9"), Plan::Full);
        assert_eq!(ir(&weak, b"bytes=0-9"), Plan::Full);
        assert_eq!(ir(&later, b"bytes=0-9"), Plan::Full);
        assert_eq!(ir(b"garbage", b"bytes=0-9"), Plan::Full);
        assert_eq!(ir(b"\"", b"bytes=0-9"), Plan::Full);
        // A failed If-Range drops the Range before it can be found unsatisfiable.
        assert_eq!(ir(b"\"other\"", b"bytes=500-"), Plan::Full);
        // Without a Range, If-Range means nothing.
        let c = Conditions {
            if_range: Some(b"\"other\""),
            ..Conditions::default()
        };
        assert_eq!(p(c), Plan::Full);
    }

    fn head_text(plan: Plan, keep_alive: bool) -> String {
        let now = at(MTIME + 60);
        String::from_utf8(head(&plan, &facts(100), "text/plain", keep_alive, now))
            .expect("ascii head")
    }

    #[test]
    fn head_200() {
        let h = head_text(Plan::Full, true);
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"), "{h}");
        assert!(
            h.contains("\r\nDate: Sun, 06 Nov 1994 08:50:37 GMT\r\n"),
            "{h}"
        );
        assert!(h.contains("\r\nServer: wsgid\r\n"), "{h}");
        assert!(h.contains("\r\nContent-Type: text/plain\r\n"), "{h}");
        assert!(h.contains("\r\nContent-Length: 100\r\n"), "{h}");
        assert!(
            h.contains("\r\nLast-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\n"),
            "{h}"
        );
        assert!(
            h.contains(&format!("\r\nETag: \"{MTIME:x}-64\"\r\n")),
            "{h}"
        );
        assert!(h.contains("\r\nAccept-Ranges: bytes\r\n"), "{h}");
        assert!(!h.contains("Connection"), "{h}");
        assert!(h.ends_with("\r\n\r\n"), "{h}");
        assert_eq!(h.matches("\r\n\r\n").count(), 1, "{h}");
    }

    #[test]
    fn head_206() {
        let h = head_text(part(0, 9), true);
        assert!(h.starts_with("HTTP/1.1 206 Partial Content\r\n"), "{h}");
        assert!(h.contains("\r\nContent-Range: bytes 0-9/100\r\n"), "{h}");
        assert!(h.contains("\r\nContent-Length: 10\r\n"), "{h}");
        let h = head_text(part(97, 99), true);
        assert!(h.contains("\r\nContent-Range: bytes 97-99/100\r\n"), "{h}");
        assert!(h.contains("\r\nContent-Length: 3\r\n"), "{h}");
    }

    #[test]
    fn head_304_412_416() {
        let h = head_text(Plan::NotModified, true);
        assert!(h.starts_with("HTTP/1.1 304 Not Modified\r\n"), "{h}");
        assert!(h.contains("\r\nETag: "), "{h}");
        assert!(h.contains("\r\nLast-Modified: "), "{h}");
        assert!(h.contains("\r\nDate: "), "{h}");
        assert!(!h.contains("Content-Length"), "{h}");

        let h = head_text(Plan::PreconditionFailed, true);
        assert!(h.starts_with("HTTP/1.1 412 Precondition Failed\r\n"), "{h}");
        let body = error_body(&Plan::PreconditionFailed);
        assert!(
            h.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
            "{h}"
        );
        assert!(h.contains("\r\nContent-Type: text/plain\r\n"), "{h}");

        let h = head_text(Plan::RangeNotSatisfiable, true);
        assert!(
            h.starts_with("HTTP/1.1 416 Range Not Satisfiable\r\n"),
            "{h}"
        );
        assert!(h.contains("\r\nContent-Range: bytes */100\r\n"), "{h}");
        let body = error_body(&Plan::RangeNotSatisfiable);
        assert!(
            h.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
            "{h}"
        );
        assert!(error_body(&Plan::Full).is_empty());
    }

    #[test]
    fn head_close_only_when_closing() {
        let h = head_text(Plan::NotModified, false);
        assert!(h.ends_with("\r\nConnection: close\r\n\r\n"), "{h}");
    }

    #[test]
    fn head_survives_out_of_range_mtimes() {
        let mut f = facts(1);
        f.mtime = UNIX_EPOCH - Duration::from_secs(86_400);
        f.mtime_secs = -86_400;
        let h = head(&Plan::Full, &f, "text/plain", true, SystemTime::now());
        let h = String::from_utf8(h).expect("ascii head");
        assert!(
            h.contains("\r\nLast-Modified: Thu, 01 Jan 1970 00:00:00 GMT\r\n"),
            "{h}"
        );
        assert!(h.contains("\r\nETag: \"fffffffffffeae80-1\"\r\n"), "{h}");
        f.mtime = UNIX_EPOCH + Duration::from_secs(300_000_000_000);
        let h = head(&Plan::Full, &f, "text/plain", true, SystemTime::now());
        let h = String::from_utf8(h).expect("ascii head");
        assert!(h.contains(" 9999 23:59:59 GMT\r\n"), "{h}");
    }

    fn redirect_text(path: &[u8], query: Option<&[u8]>) -> String {
        String::from_utf8(redirect_with_slash(path, query)).expect("ascii head")
    }

    #[test]
    fn redirect() {
        let h = redirect_text(b"/static/sub", None);
        assert!(h.starts_with("HTTP/1.1 301 Moved Permanently\r\n"), "{h}");
        assert!(h.contains("\r\nLocation: /static/sub/\r\n"), "{h}");
        assert!(h.contains("\r\nContent-Length: 0\r\n"), "{h}");
        assert!(h.ends_with("\r\n\r\n"), "{h}");
        let h = redirect_text(b"/static/sub", Some(b"x=1&y=%20"));
        assert!(
            h.contains("\r\nLocation: /static/sub/?x=1&y=%20\r\n"),
            "{h}"
        );
        let h = redirect_text(b"/static/sub", Some(b""));
        assert!(h.contains("\r\nLocation: /static/sub/\r\n"), "{h}");
    }

    #[test]
    fn redirect_stays_on_this_host_and_in_the_head() {
        let h = redirect_text(b"//evil.example/sub", None);
        assert!(h.contains("\r\nLocation: /evil.example/sub/\r\n"), "{h}");
        let h = redirect_text(b"/\\evil.example", None);
        assert!(h.contains("\r\nLocation: /%5Cevil.example/\r\n"), "{h}");
        let h = redirect_text(b"/a\r\nX: y", Some(b"q\n"));
        assert!(h.contains("\r\nLocation: /a%0D%0AX:%20y/?q%0A\r\n"), "{h}");
        let h = redirect_text(b"/caf\xc3\xa9", None);
        assert!(h.contains("\r\nLocation: /caf%C3%A9/\r\n"), "{h}");
        let h = redirect_text(b"", None);
        assert!(h.contains("\r\nLocation: /\r\n"), "{h}");
    }
}
