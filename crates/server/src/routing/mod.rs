//! Routing: which Host serves a request, and which of its routes.
//!
//! mongrel2's rules as its manual documents them, with the lookup bugs of its implementation
//! fixed (reference §10, #4 to #7):
//!
//! * **Host name.** The Host header up to its port (`example.com:80` is `example.com`,
//!   `[::1]:80` is `[::1]`), surrounding blanks dropped, compared case-insensitively (ASCII).
//! * **Plain host** (its `matching` has no `)`): selected when the name equals `matching`, or
//!   ends with `.` + `matching`. So `foo.example.com` selects `example.com`, but neither
//!   `badexample.com` nor `com` does. An equal name beats any suffix; among suffixes the
//!   longest `matching` wins; ties go to the first host configured. An empty `matching`
//!   selects nothing.
//! * **Pattern host** (its `matching` has a `)`): the text after the last `)` is a literal
//!   suffix (compared as above, without a dot boundary) and `matching[..=last ')'] + "$"` must
//!   match the rest of the name, bytes as sent. It ranks with suffix matches, by the length of
//!   its literal suffix.
//! * No Host header, or no host selected: the default host.
//! * **Routes.** A key splits at its first `(` into a literal prefix and a pattern
//!   ([`pattern`]). Candidates are the routes whose prefix starts the raw path (byte-wise: no
//!   decoding, no query, no dot segments), tried from the longest prefix to the shortest; for one
//!   prefix, its pattern routes in configuration order, then its plain route. A plain route
//!   matches whenever its prefix does; a pattern route when its pattern matches the path after
//!   the prefix (anchored at the start; a trailing `$` anchors the end). The first match wins.
//! * Unlike mongrel2, a failing pattern falls back to shorter prefixes (mongrel2 answers 404),
//!   and a path that only starts a key (`/a` against `/app`) does not match it (mongrel2 picks
//!   `/app`, even with a `/` route).
//! * A pattern that runs out of its step budget is a non-match, and is logged.
//! * Keys starting with `@` (JSON sockets) match only a path equal to the whole key.

pub mod pattern;

/// One `Host` of the configuration, as the router needs it.
#[derive(Debug, Clone)]
pub struct HostSpec<T> {
    pub name: String,
    /// What the Host header is matched against (see the module doc).
    pub matching: String,
    /// Route keys exactly as configured, with their targets.
    pub routes: Vec<(String, T)>,
}

/// The hosts of one server, checked once and ready for lookups.
#[derive(Debug)]
pub struct Router<T> {
    hosts: Vec<Host<T>>,
    /// Index into `hosts`.
    default: usize,
}

/// The route chosen for a request.
#[derive(Debug)]
pub struct Matched<'a, T> {
    /// The chosen Host's name.
    pub host: &'a str,
    /// The route key exactly as configured: mongrel2 sends it as `PATTERN`.
    pub key: &'a str,
    /// Length of the key's literal prefix (before its first `(`): what Dir routes strip.
    pub prefix_len: usize,
    pub target: &'a T,
}

#[derive(Debug)]
struct Host<T> {
    name: String,
    select: Select,
    /// One group per literal prefix, longest prefix first.
    groups: Vec<Group<T>>,
    /// `@` keys, matched by equality.
    sockets: Vec<Route<T>>,
}

/// How a Host header selects a host.
#[derive(Debug)]
enum Select {
    /// Empty `matching`: reachable only as the default host.
    Never,
    Name(String),
    Pattern {
        /// `matching[..=last ')']` + `$`.
        pattern: Vec<u8>,
        suffix: String,
    },
}

/// The routes sharing one literal prefix.
#[derive(Debug)]
struct Group<T> {
    prefix: String,
    /// In configuration order.
    patterns: Vec<Route<T>>,
    plain: Option<Route<T>>,
}

#[derive(Debug)]
struct Route<T> {
    key: String,
    target: T,
}

impl<T> Router<T> {
    /// Checks every pattern here, so lookups never meet a malformed one. Errors name the bad
    /// host or route. If two hosts share `default_host`'s name, the first is the default.
    pub fn new(hosts: Vec<HostSpec<T>>, default_host: &str) -> Result<Router<T>, String> {
        let default = hosts
            .iter()
            .position(|h| h.name == default_host)
            .ok_or_else(|| format!("default_host '{default_host}' names no host"))?;
        let hosts = hosts
            .into_iter()
            .map(Host::new)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Router { hosts, default })
    }

    /// `host_header`: the raw Host header value if any; `path`: the raw request path (no
    /// query). `None`: no route of the selected host matches (a 404).
    pub fn route(&self, host_header: Option<&[u8]>, path: &[u8]) -> Option<Matched<'_, T>> {
        let host = self.select(host_header);
        if let Some(route) = host.sockets.iter().find(|r| r.key.as_bytes() == path) {
            return Some(host.matched(route, route.key.len()));
        }
        for group in &host.groups {
            let Some(rest) = path.strip_prefix(group.prefix.as_bytes()) else {
                continue;
            };
            for route in &group.patterns {
                let route_pattern = &route.key.as_bytes()[group.prefix.len()..];
                match pattern::matches(route_pattern, rest) {
                    Some(true) => return Some(host.matched(route, group.prefix.len())),
                    Some(false) => {}
                    None => tracing::warn!(
                        host = %host.name,
                        route = %route.key,
                        path = %String::from_utf8_lossy(path),
                        "route pattern gave up (step budget spent): treated as no match"
                    ),
                }
            }
            if let Some(route) = &group.plain {
                return Some(host.matched(route, group.prefix.len()));
            }
        }
        None
    }

    fn select(&self, host_header: Option<&[u8]>) -> &Host<T> {
        let mut best: Option<(&Host<T>, usize)> = None;
        if let Some(name) = host_header.map(host_name) {
            for host in &self.hosts {
                if let Some(rank) = host.rank(name) {
                    if best.is_none_or(|(_, r)| rank > r) {
                        best = Some((host, rank));
                    }
                }
            }
        }
        match best {
            Some((host, _)) => host,
            None => &self.hosts[self.default],
        }
    }
}

impl<T> Host<T> {
    fn new(spec: HostSpec<T>) -> Result<Host<T>, String> {
        let HostSpec {
            name,
            matching,
            routes,
        } = spec;
        let select = Select::new(&matching)
            .map_err(|e| format!("host '{name}': matching '{matching}': {e}"))?;
        let mut groups: Vec<Group<T>> = Vec::new();
        let mut sockets: Vec<Route<T>> = Vec::new();
        for (key, target) in routes {
            if key.starts_with('@') {
                if sockets.iter().any(|r| r.key == key) {
                    return Err(duplicate(&name, &key));
                }
                sockets.push(Route { key, target });
                continue;
            }
            let prefix_len = key.find('(').unwrap_or(key.len());
            pattern::check(&key.as_bytes()[prefix_len..])
                .map_err(|e| format!("host '{name}': route '{key}': {e}"))?;
            let prefix = &key[..prefix_len];
            let i = match groups.iter().position(|g| g.prefix == prefix) {
                Some(i) => i,
                None => {
                    groups.push(Group {
                        prefix: prefix.to_owned(),
                        patterns: Vec::new(),
                        plain: None,
                    });
                    groups.len() - 1
                }
            };
            let group = &mut groups[i];
            if prefix_len == key.len() {
                if group.plain.is_some() {
                    return Err(duplicate(&name, &key));
                }
                group.plain = Some(Route { key, target });
            } else {
                if group.patterns.iter().any(|r| r.key == key) {
                    return Err(duplicate(&name, &key));
                }
                group.patterns.push(Route { key, target });
            }
        }
        groups.sort_by_key(|g| std::cmp::Reverse(g.prefix.len()));
        Ok(Host {
            name,
            select,
            groups,
            sockets,
        })
    }

    /// How well this host fits a Host name (port stripped); higher wins, `None` does not fit.
    fn rank(&self, name: &[u8]) -> Option<usize> {
        match &self.select {
            Select::Never => None,
            Select::Name(matching) if name.eq_ignore_ascii_case(matching.as_bytes()) => {
                Some(usize::MAX)
            }
            Select::Name(matching) => strip_suffix_ignore_case(name, matching.as_bytes())?
                .ends_with(b".")
                .then_some(matching.len()),
            Select::Pattern { pattern, suffix } => {
                let rest = strip_suffix_ignore_case(name, suffix.as_bytes())?;
                match pattern::matches(pattern, rest) {
                    Some(true) => Some(suffix.len()),
                    Some(false) => None,
                    None => {
                        tracing::warn!(
                            host = %self.name,
                            header = %String::from_utf8_lossy(name),
                            "host pattern gave up (step budget spent): treated as no match"
                        );
                        None
                    }
                }
            }
        }
    }

    fn matched<'a>(&'a self, route: &'a Route<T>, prefix_len: usize) -> Matched<'a, T> {
        Matched {
            host: &self.name,
            key: &route.key,
            prefix_len,
            target: &route.target,
        }
    }
}

impl Select {
    fn new(matching: &str) -> Result<Select, String> {
        if matching.is_empty() {
            return Ok(Select::Never);
        }
        let Some(last) = matching.rfind(')') else {
            return Ok(Select::Name(matching.to_owned()));
        };
        let mut anchored = matching.as_bytes()[..=last].to_vec();
        anchored.push(b'$');
        pattern::check(&anchored)?;
        Ok(Select::Pattern {
            pattern: anchored,
            suffix: matching[last + 1..].to_owned(),
        })
    }
}

fn duplicate(host: &str, key: &str) -> String {
    format!("host '{host}': route '{key}' is configured twice")
}

/// The Host header without its port; an IPv6 literal keeps its brackets.
fn host_name(header: &[u8]) -> &[u8] {
    let header = header.trim_ascii();
    let end = if header.starts_with(b"[") {
        header.iter().position(|&b| b == b']').map(|i| i + 1)
    } else {
        header.iter().position(|&b| b == b':')
    };
    &header[..end.unwrap_or(header.len())]
}

/// `name` without `suffix` (compared ASCII case-insensitively), if it ends with it.
fn strip_suffix_ignore_case<'n>(name: &'n [u8], suffix: &[u8]) -> Option<&'n [u8]> {
    let cut = name.len().checked_sub(suffix.len())?;
    let (rest, tail) = name.split_at(cut);
    tail.eq_ignore_ascii_case(suffix).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, matching: &str, keys: &[&str]) -> HostSpec<usize> {
        HostSpec {
            name: name.to_owned(),
            matching: matching.to_owned(),
            routes: keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.to_string(), i))
                .collect(),
        }
    }

    fn one_host(keys: &[&str]) -> Router<usize> {
        Router::new(vec![spec("main", "main.test", keys)], "main").expect("valid config")
    }

    fn key<'a>(router: &'a Router<usize>, path: &str) -> Option<&'a str> {
        router.route(None, path.as_bytes()).map(|m| m.key)
    }

    /// (host name, key) chosen for a Host header and a path.
    fn at<'a>(
        router: &'a Router<usize>,
        host: Option<&str>,
        path: &str,
    ) -> Option<(&'a str, &'a str)> {
        router
            .route(host.map(str::as_bytes), path.as_bytes())
            .map(|m| (m.host, m.key))
    }

    fn host<'a>(router: &'a Router<usize>, header: Option<&str>) -> &'a str {
        at(router, header, "/").expect("every host has '/'").0
    }

    /// The host of the reference's §2.3 table.
    const REFERENCE_ROUTES: &[&str] = &[
        "/",
        "/app",
        "/app/(.*).json",
        "/users",
        "/x/(\\d+)$",
        "/x/(\\a+)",
        "/img/(.*.jpg)",
        "/exact()$",
        "/lit.dot/",
    ];

    #[test]
    fn reference_table_with_documented_semantics() {
        let r = one_host(REFERENCE_ROUTES);
        let cases = [
            ("/", Some("/")),
            ("/a", Some("/")),
            ("/ap", Some("/")),
            ("/app", Some("/app")),
            ("/apple", Some("/app")),
            ("/app/", Some("/app")),
            ("/app/x", Some("/app")),
            ("/app/x.txt", Some("/app")),
            ("/app/x.json", Some("/app/(.*).json")),
            ("/app/x.jsonX", Some("/app/(.*).json")),
            ("/app%2Fx.json", Some("/app")),
            ("/us", Some("/")),
            ("/users", Some("/users")),
            ("/usersX", Some("/users")),
            ("/users/1", Some("/users")),
            ("/x/123", Some("/x/(\\d+)$")),
            ("/x/abc", Some("/x/(\\a+)")),
            ("/x/abc1", Some("/x/(\\a+)")),
            ("/x/", Some("/")),
            ("/x/123a", Some("/")),
            ("/x/1b", Some("/")),
            ("/img/a.jpg", Some("/img/(.*.jpg)")),
            ("/img", Some("/")),
            ("/img/", Some("/")),
            ("/exact", Some("/exact()$")),
            ("/exactX", Some("/")),
            ("/exact/", Some("/")),
            ("/lit.dot/x", Some("/lit.dot/")),
            ("/litXdot/x", Some("/")),
            ("/st%61tic", Some("/")),
            ("*", None),
            ("foo", None),
            ("http://localhost/x", None),
            ("", None),
        ];
        for (path, want) in cases {
            assert_eq!(key(&r, path), want, "path {path}");
            if let Some(m) = r.route(None, path.as_bytes()) {
                assert_eq!(REFERENCE_ROUTES[*m.target], m.key, "path {path}");
                assert_eq!(m.host, "main");
            }
        }
    }

    #[test]
    fn prefix_len_is_the_literal_prefix_of_the_chosen_route() {
        let r = one_host(REFERENCE_ROUTES);
        for (path, want) in [
            ("/app/x.json", 5),
            ("/app/x", 4),
            ("/x/123", 3),
            ("/a", 1),
            ("/exact", 6),
            ("/lit.dot/x", 9),
        ] {
            let m = r.route(None, path.as_bytes()).expect("routed");
            assert_eq!(m.prefix_len, want, "path {path}");
        }
    }

    #[test]
    fn without_a_root_route_short_paths_match_nothing() {
        let r = one_host(&["/handler", "/ws"]);
        for path in ["/h", "/hand", "/", "/w", "/x"] {
            assert_eq!(key(&r, path), None, "path {path}");
        }
        assert_eq!(key(&r, "/ws"), Some("/ws"));
        assert_eq!(key(&r, "/ws/x"), Some("/ws"));
        assert_eq!(key(&r, "/handler"), Some("/handler"));
    }

    #[test]
    fn pattern_routes_go_before_the_plain_route_of_their_prefix() {
        for keys in [["/p/", "/p/(\\d+)$"], ["/p/(\\d+)$", "/p/"]] {
            let r = one_host(&keys);
            assert_eq!(key(&r, "/p/12"), Some("/p/(\\d+)$"));
            assert_eq!(key(&r, "/p/ab"), Some("/p/"));
            assert_eq!(key(&r, "/p/"), Some("/p/"));
        }
    }

    #[test]
    fn pattern_routes_of_one_prefix_go_in_configuration_order() {
        let r = one_host(&["/f/(.*)", "/f/(\\d+)"]);
        assert_eq!(key(&r, "/f/1"), Some("/f/(.*)"));
        let r = one_host(&["/f/(\\d+)", "/f/(.*)"]);
        assert_eq!(key(&r, "/f/1"), Some("/f/(\\d+)"));
        assert_eq!(key(&r, "/f/x"), Some("/f/(.*)"));
    }

    #[test]
    fn failing_patterns_fall_back_to_shorter_prefixes() {
        let r = one_host(&["/a/", "/a/b/(\\d+)$", "/a/b/c/(\\d+)$"]);
        assert_eq!(key(&r, "/a/b/c/x"), Some("/a/"));
        assert_eq!(key(&r, "/a/b/c/1"), Some("/a/b/c/(\\d+)$"));
        assert_eq!(key(&r, "/a/b/1"), Some("/a/b/(\\d+)$"));
        assert_eq!(key(&r, "/a/b/1x"), Some("/a/"));
        assert_eq!(key(&r, "/b"), None);
    }

    #[test]
    fn a_pattern_out_of_budget_does_not_match() {
        let r = one_host(&["/", "/slow/(.*.*.*.*.*.*x)"]);
        let path = format!("/slow/{}", "a".repeat(4000));
        assert_eq!(key(&r, &path), Some("/"));
        assert_eq!(key(&r, "/slow/ax"), Some("/slow/(.*.*.*.*.*.*x)"));
    }

    #[test]
    fn socket_keys_match_only_themselves() {
        let r = one_host(&["/", "@chat"]);
        assert_eq!(key(&r, "@chat"), Some("@chat"));
        assert_eq!(r.route(None, b"@chat").map(|m| m.prefix_len), Some(5));
        assert_eq!(key(&r, "@chatroom"), None);
        assert_eq!(key(&r, "@cha"), None);
        assert_eq!(key(&r, "/@chat"), Some("/"));
    }

    #[test]
    fn routes_come_from_the_selected_host_only() {
        let r = Router::new(
            vec![
                spec("default", "default.test", &["/"]),
                spec("example.com", "example.com", &["/app"]),
            ],
            "default",
        )
        .expect("valid config");
        assert_eq!(at(&r, Some("example.com"), "/x"), None);
        assert_eq!(
            at(&r, Some("example.com"), "/app/1"),
            Some(("example.com", "/app"))
        );
        assert_eq!(at(&r, Some("other"), "/x"), Some(("default", "/")));
        assert_eq!(at(&r, None, "/app"), Some(("default", "/")));
    }

    fn hosts_router() -> Router<usize> {
        Router::new(
            vec![
                spec("default", "default.test", &["/"]),
                spec("example.com", "example.com", &["/"]),
                spec("api", "api.example.com", &["/"]),
                spec("pat", "(\\a+).pat.test", &["/"]),
                spec("v6", "[::1]", &["/"]),
                spec("nameless", "", &["/"]),
            ],
            "default",
        )
        .expect("valid config")
    }

    #[test]
    fn host_selection() {
        let r = hosts_router();
        let cases = [
            (None, "default"),
            (Some("example.com"), "example.com"),
            (Some("example.com:7901"), "example.com"),
            (Some("foo.example.com"), "example.com"),
            (Some("EXAMPLE.COM"), "example.com"),
            (Some("Foo.Example.Com:80"), "example.com"),
            (Some(" example.com "), "example.com"),
            (Some("badexample.com"), "default"),
            (Some("com"), "default"),
            (Some("ample.com"), "default"),
            (Some("example.com.evil"), "default"),
            (Some(""), "default"),
            (Some(":80"), "default"),
            (Some("api.example.com"), "api"),
            (Some("x.api.example.com"), "api"),
            (Some("xapi.example.com"), "example.com"),
            (Some("[::1]:80"), "v6"),
            (Some("[::1]"), "v6"),
            (Some("[::2]:80"), "default"),
            (Some("[::1"), "default"),
            (Some("default.test"), "default"),
        ];
        for (header, want) in cases {
            assert_eq!(host(&r, header), want, "Host {header:?}");
        }
    }

    #[test]
    fn pattern_hosts() {
        let r = hosts_router();
        for (header, want) in [
            ("a.pat.test", "pat"),
            ("abc.pat.test:8080", "pat"),
            ("A.PAT.TEST", "pat"),
            ("1.pat.test", "default"),
            (".pat.test", "default"),
            ("pat.test", "default"),
            ("a1.pat.test", "default"),
            ("a.b.pat.test", "default"),
        ] {
            assert_eq!(host(&r, Some(header)), want, "Host {header}");
        }
    }

    #[test]
    fn a_pattern_host_ranks_by_its_literal_suffix() {
        let r = Router::new(
            vec![
                spec("plain", "example.com", &["/"]),
                spec("pat", "(\\a+).example.com", &["/"]),
            ],
            "plain",
        )
        .expect("valid config");
        assert_eq!(host(&r, Some("foo.example.com")), "pat");
        assert_eq!(host(&r, Some("foo1.example.com")), "plain");
        assert_eq!(host(&r, Some("example.com")), "plain");
    }

    #[test]
    fn exact_beats_suffix_and_longer_suffix_beats_shorter_in_any_order() {
        let mut specs = vec![
            spec("short", "example.com", &["/"]),
            spec("long", "api.example.com", &["/"]),
            spec("exact", "x.api.example.com", &["/"]),
        ];
        for _ in 0..2 {
            let r = Router::new(specs.clone(), "short").expect("valid config");
            assert_eq!(host(&r, Some("x.api.example.com")), "exact");
            assert_eq!(host(&r, Some("y.x.api.example.com")), "exact");
            assert_eq!(host(&r, Some("y.api.example.com")), "long");
            assert_eq!(host(&r, Some("y.example.com")), "short");
            specs.reverse();
        }
    }

    fn rejected(hosts: Vec<HostSpec<usize>>, default_host: &str) -> String {
        Router::new(hosts, default_host).expect_err("config must be rejected")
    }

    #[test]
    fn new_rejects_bad_configs() {
        let e = rejected(vec![spec("main", "main.test", &["/", "/a/([x"])], "main");
        assert!(e.contains("'main'") && e.contains("'/a/([x'"), "{e}");
        let e = rejected(vec![spec("main", "main.test", &["/a/(x\\"])], "main");
        assert!(e.contains("'main'") && e.contains("/a/(x"), "{e}");
        let e = rejected(vec![spec("bad", "([x).test", &["/"])], "bad");
        assert!(e.contains("'bad'"), "{e}");
        let e = rejected(vec![spec("main", "main.test", &["/"])], "nope");
        assert!(e.contains("'nope'"), "{e}");
        rejected(Vec::new(), "main");
        let e = rejected(vec![spec("main", "main.test", &["/a", "/b", "/a"])], "main");
        assert!(e.contains("'main'") && e.contains("'/a'"), "{e}");
        let e = rejected(vec![spec("main", "m", &["/x/(\\d+)", "/x/(\\d+)"])], "main");
        assert!(e.contains("/x/("), "{e}");
        let e = rejected(vec![spec("main", "m", &["@chat", "@chat"])], "main");
        assert!(e.contains("'@chat'"), "{e}");
    }

    #[test]
    fn new_accepts_shared_prefixes_and_keys_repeated_across_hosts() {
        Router::new(
            vec![
                spec("a", "a.test", &["/p/", "/p/(\\d+)", "/p/(\\a+)"]),
                spec("b", "b.test", &["/p/", "/p/(\\d+)"]),
            ],
            "a",
        )
        .expect("valid config");
    }
}
