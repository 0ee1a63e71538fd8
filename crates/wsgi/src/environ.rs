//! The PEP 3333 environ, built from a mongrel2 request.
//!
//! Strings are "native strings" holding latin-1 decoded bytes, as PEP 3333 requires, so no
//! header or path byte is lost or rejected. Constant keys come from a template dict built
//! once per worker and copied per request.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;

use m2wire::Request;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};
use pyo3::{ffi, intern};

use crate::response::SERVER;

/// The environ keys that are the same for every request of a worker.
pub struct EnvironTemplate {
    dict: Py<PyDict>,
    default_server_name: String,
    /// Peers whose X-Forwarded-Proto and -For are believed (gunicorn's
    /// `--forwarded-allow-ips`); `None` trusts every peer.
    trusted_proxies: Option<Vec<Vec<u8>>>,
    /// `HTTP_*` keys by header name, made once: a key is then an interned string with its
    /// hash computed, not an allocation and a decode per header per request.
    /// Seeded (the names are the client's) but faster than SipHash: looked up for every
    /// header of every request.
    http_keys: RefCell<HashMap<Vec<u8>, Py<PyString>, foldhash::fast::RandomState>>,
}

/// Most header names whose keys are kept (clients choose names: the cache must not grow
/// without bound).
const MAX_HTTP_KEYS: usize = 256;

impl EnvironTemplate {
    pub fn new(
        py: Python<'_>,
        errors: Bound<'_, PyAny>,
        file_wrapper: Bound<'_, PyAny>,
        forwarded_allow_ips: &[String],
    ) -> PyResult<Self> {
        let dict = PyDict::new(py);
        dict.set_item("wsgi.version", PyTuple::new(py, [1, 0])?)?;
        dict.set_item("wsgi.errors", errors)?;
        dict.set_item("wsgi.multithread", false)?;
        dict.set_item("wsgi.multiprocess", true)?;
        dict.set_item("wsgi.run_once", false)?;
        dict.set_item("wsgi.file_wrapper", file_wrapper)?;
        // The body is always delimited (a length, or a de-chunked upload file): reading
        // wsgi.input to its end is safe, which frameworks need for chunked requests.
        dict.set_item("wsgi.input_terminated", true)?;
        dict.set_item("SERVER_SOFTWARE", SERVER)?;
        dict.set_item("SCRIPT_NAME", "")?;
        dict.set_item("QUERY_STRING", "")?;
        let default_server_name = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        let trusted_proxies = (!forwarded_allow_ips.iter().any(|a| a == "*")).then(|| {
            forwarded_allow_ips
                .iter()
                .map(|a| a.as_bytes().to_vec())
                .collect()
        });
        Ok(EnvironTemplate {
            dict: dict.unbind(),
            default_server_name,
            trusted_proxies,
            http_keys: RefCell::default(),
        })
    }

    /// The environ key of a client header (see `cgi_name`).
    fn http_key<'py>(&self, py: Python<'py>, name: &[u8]) -> Option<Bound<'py, PyString>> {
        if let Some(key) = self.http_keys.borrow().get(name) {
            return Some(key.bind(py).clone());
        }
        let cgi = cgi_name(name)?;
        let mut keys = self.http_keys.borrow_mut();
        if keys.len() >= MAX_HTTP_KEYS {
            // Not interned: newer Pythons never free interned strings.
            return Some(PyString::new(py, &cgi));
        }
        let key = PyString::intern(py, &cgi);
        keys.insert(name.to_vec(), key.clone().unbind());
        Some(key)
    }
}

impl EnvironTemplate {
    fn trusts(&self, peer: &[u8]) -> bool {
        self.trusted_proxies
            .as_ref()
            .is_none_or(|list| list.iter().any(|a| a == peer))
    }
}

/// Facts about the body that the message headers alone do not give.
pub struct BodyInfo<'a> {
    /// The CONTENT_LENGTH to report: the declared one, or a chunked upload's file size.
    pub content_length: Option<u64>,
    /// Where a spooled upload lives on this host (exposed as `wsgid.upload_path`).
    pub upload_path: Option<&'a std::path::Path>,
}

/// Latin-1 bytes to a Python str: every byte maps to one code point, nothing can fail.
fn latin1<'py>(py: Python<'py>, bytes: &[u8]) -> Bound<'py, PyString> {
    // SAFETY: PyUnicode_DecodeLatin1 reads exactly `len` bytes from `ptr` and returns a new
    // reference, or NULL only on allocation failure, which `from_owned_ptr` turns into a panic
    // as PyO3 does for every allocation failure.
    unsafe {
        let ptr = ffi::PyUnicode_DecodeLatin1(
            bytes.as_ptr().cast(),
            bytes.len() as ffi::Py_ssize_t,
            std::ptr::null(),
        );
        Bound::from_owned_ptr(py, ptr).cast_into_unchecked()
    }
}

/// Splits the raw request path at the route pattern: `(SCRIPT_NAME, PATH_INFO)`, both raw.
/// Only a plain prefix mounts the app, and only at a segment boundary (mongrel2 also routes
/// `/handlerX` and `/h` to a `/handler` route); a regex pattern mounts at ''.
pub fn split_script_name<'a>(path: &'a [u8], pattern: Option<&[u8]>) -> (&'a [u8], &'a [u8]) {
    let Some(pattern) = pattern else {
        return (b"", path);
    };
    let is_regex = pattern.iter().any(|b| b"()[]*+?$^%\\|".contains(b));
    let prefix = pattern.strip_suffix(b"/").unwrap_or(pattern);
    if is_regex || prefix.is_empty() || !path.starts_with(prefix) {
        return (b"", path);
    }
    let rest = &path[prefix.len()..];
    if rest.is_empty() || rest[0] == b'/' {
        (&path[..prefix.len()], rest)
    } else {
        (b"", path)
    }
}

/// Percent-decoding of a path; malformed escapes stay as they are.
pub fn percent_decode(input: &[u8]) -> Cow<'_, [u8]> {
    if !input.contains(&b'%') {
        return Cow::Borrowed(input);
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' && i + 2 < input.len() {
            if let (Some(h), Some(l)) = (hex(input[i + 1]), hex(input[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    Cow::Owned(out)
}

/// SERVER_NAME and SERVER_PORT from a Host header (`name`, `name:port`, `[v6]:port`); a
/// port that is not a number is the client's nonsense, replaced by the scheme's port.
pub fn server_name_port<'a>(host: &'a [u8], default_port: &'a [u8]) -> (&'a [u8], &'a [u8]) {
    let (name, port) = split_host(host, default_port);
    if port.iter().all(u8::is_ascii_digit) {
        (name, port)
    } else {
        (name, default_port)
    }
}

fn split_host<'a>(host: &'a [u8], default_port: &'a [u8]) -> (&'a [u8], &'a [u8]) {
    if host.first() == Some(&b'[') {
        if let Some(end) = host.iter().position(|&b| b == b']') {
            let port = host[end + 1..].strip_prefix(b":").filter(|p| !p.is_empty());
            return (&host[..=end], port.unwrap_or(default_port));
        }
    }
    match host.iter().rposition(|&b| b == b':') {
        Some(i) if i + 1 < host.len() => (&host[..i], &host[i + 1..]),
        Some(i) => (&host[..i], default_port),
        None => (host, default_port),
    }
}

/// The CGI name of a client header (`user-agent` → `HTTP_USER_AGENT`), or `None` for
/// headers that have their own keys or must not reach the app: mongrel2's upper-case keys,
/// upload markers, and names with `_`, which would alias a dashed name (header spoofing).
pub fn cgi_name(name: &[u8]) -> Option<String> {
    // The body reaches the app de-chunked, with a CONTENT_LENGTH: a Transfer-Encoding
    // left in the environ makes frameworks (Werkzeug) ignore that length and read nothing.
    if name == b"content-type"
        || name == b"content-length"
        || name == b"transfer-encoding"
        || name.starts_with(b"x-mongrel2-")
        || name.is_empty()
        || !name
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return None;
    }
    let mut key = String::with_capacity(5 + name.len());
    key.push_str("HTTP_");
    key.extend(name.iter().map(|&b| match b {
        b'-' => '_',
        other => other.to_ascii_uppercase() as char,
    }));
    Some(key)
}

/// Builds the environ for one request.
pub fn build<'py>(
    py: Python<'py>,
    template: &EnvironTemplate,
    req: &Request<'_>,
    input: Bound<'py, PyAny>,
    body: &BodyInfo<'_>,
) -> PyResult<Bound<'py, PyDict>> {
    let env = template.dict.bind(py).copy()?;
    let h = |name: &[u8]| req.header(name);
    env.set_item(intern!(py, "wsgi.input"), input)?;
    env.set_item(
        intern!(py, "REQUEST_METHOD"),
        latin1(py, h(b"METHOD").unwrap_or(b"GET")),
    )?;
    // Behind a trusted front end, its X-Forwarded-* say what the client used; from any
    // other peer they are the client's word and are ignored.
    let peer = h(b"REMOTE_ADDR");
    let proxied = peer.is_some_and(|p| template.trusts(p));
    let forwarded_proto = h(b"x-forwarded-proto")
        .filter(|_| proxied)
        .map(|p| p.trim_ascii())
        .filter(|p| p.eq_ignore_ascii_case(b"https") || p.eq_ignore_ascii_case(b"http"));
    let scheme: &[u8] = match forwarded_proto {
        Some(p) if p.eq_ignore_ascii_case(b"https") => b"https",
        Some(_) => b"http",
        None => h(b"URL_SCHEME").unwrap_or(b"http"),
    };
    env.set_item(intern!(py, "wsgi.url_scheme"), latin1(py, scheme))?;
    env.set_item(
        intern!(py, "SERVER_PROTOCOL"),
        latin1(py, h(b"VERSION").unwrap_or(b"HTTP/1.1")),
    )?;

    let path = h(b"PATH").unwrap_or(req.path);
    let (script, path_info) = split_script_name(path, h(b"PATTERN"));
    if !script.is_empty() {
        env.set_item(
            intern!(py, "SCRIPT_NAME"),
            latin1(py, &percent_decode(script)),
        )?;
    }
    env.set_item(
        intern!(py, "PATH_INFO"),
        latin1(py, &percent_decode(path_info)),
    )?;
    if let Some(query) = h(b"QUERY") {
        env.set_item(intern!(py, "QUERY_STRING"), latin1(py, query))?;
    }
    if let Some(uri) = h(b"URI") {
        env.set_item(intern!(py, "REQUEST_URI"), latin1(py, uri))?;
    }
    // The client is the last address the trusted front end appended.
    let forwarded_for = h(b"x-forwarded-for")
        .filter(|_| proxied)
        .and_then(|v| v.rsplit(|&b| b == b',').next())
        .map(|a| a.trim_ascii())
        .filter(|a| !a.is_empty());
    if let Some(addr) = forwarded_for.or(peer) {
        env.set_item(intern!(py, "REMOTE_ADDR"), latin1(py, addr))?;
    }

    let default_port: &[u8] = if scheme == b"https" { b"443" } else { b"80" };
    let (name, port) = match h(b"host") {
        Some(host) => server_name_port(host, default_port),
        None => (template.default_server_name.as_bytes(), default_port),
    };
    env.set_item(intern!(py, "SERVER_NAME"), latin1(py, name))?;
    env.set_item(intern!(py, "SERVER_PORT"), latin1(py, port))?;

    if let Some(ctype) = h(b"content-type") {
        env.set_item(intern!(py, "CONTENT_TYPE"), latin1(py, ctype))?;
    }
    if let Some(length) = body.content_length {
        env.set_item(intern!(py, "CONTENT_LENGTH"), length.to_string())?;
    }
    if let Some(path) = body.upload_path {
        env.set_item(intern!(py, "wsgid.upload_path"), path.as_os_str())?;
    }

    for (name, value) in req.headers.iter() {
        if let Some(key) = template.http_key(py, name) {
            let sep: &[u8] = if name == b"cookie" { b"; " } else { b", " };
            env.set_item(key, latin1(py, &value.joined(sep)))?;
        }
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_at_plain_prefixes_only() {
        assert_eq!(
            split_script_name(b"/app/x/y", Some(b"/app")),
            (&b"/app"[..], &b"/x/y"[..])
        );
        assert_eq!(
            split_script_name(b"/app/x", Some(b"/app/")),
            (&b"/app"[..], &b"/x"[..])
        );
        assert_eq!(
            split_script_name(b"/app", Some(b"/app")),
            (&b"/app"[..], &b""[..])
        );
        assert_eq!(
            split_script_name(b"/appX/y", Some(b"/app")),
            (&b""[..], &b"/appX/y"[..])
        );
        assert_eq!(
            split_script_name(b"/a", Some(b"/app")),
            (&b""[..], &b"/a"[..])
        );
        assert_eq!(split_script_name(b"/x", Some(b"/")), (&b""[..], &b"/x"[..]));
        assert_eq!(
            split_script_name(b"/pat/x.json", Some(b"/pat/(.*).json")),
            (&b""[..], &b"/pat/x.json"[..])
        );
        assert_eq!(split_script_name(b"/x", None), (&b""[..], &b"/x"[..]));
    }

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(
            percent_decode(b"/so%20me/special%3f/user%40path").as_ref(),
            b"/so me/special?/user@path"
        );
        assert_eq!(percent_decode(b"/caf%C3%A9").as_ref(), "/café".as_bytes());
        assert_eq!(percent_decode(b"/bad%zz%4").as_ref(), b"/bad%zz%4");
        assert_eq!(percent_decode(b"/%41").as_ref(), b"/A");
        assert_eq!(percent_decode(b"%").as_ref(), b"%");
    }

    #[test]
    fn splits_host_headers() {
        assert_eq!(
            server_name_port(b"localhost:6767", b"80"),
            (&b"localhost"[..], &b"6767"[..])
        );
        assert_eq!(
            server_name_port(b"example.org", b"443"),
            (&b"example.org"[..], &b"443"[..])
        );
        assert_eq!(
            server_name_port(b"[::1]:8080", b"80"),
            (&b"[::1]"[..], &b"8080"[..])
        );
        assert_eq!(
            server_name_port(b"[::1]", b"80"),
            (&b"[::1]"[..], &b"80"[..])
        );
        assert_eq!(
            server_name_port(b"host:", b"80"),
            (&b"host"[..], &b"80"[..])
        );
    }

    #[test]
    fn names_headers_per_cgi() {
        assert_eq!(cgi_name(b"user-agent").as_deref(), Some("HTTP_USER_AGENT"));
        assert_eq!(
            cgi_name(b"x-requested-with").as_deref(),
            Some("HTTP_X_REQUESTED_WITH")
        );
        assert_eq!(cgi_name(b"content-type"), None);
        assert_eq!(cgi_name(b"METHOD"), None);
        assert_eq!(cgi_name(b"x_spoof"), None);
        assert_eq!(cgi_name(b"x-mongrel2-upload-start"), None);
    }
}
