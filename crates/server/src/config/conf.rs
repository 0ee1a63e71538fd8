//! m2sh's `.conf` language (server reference §1.1), parsed straight into [`Config`].
//!
//! Lexer and grammar are m2sh's, with deliberate differences: a capitalised name is a variable
//! unless `(` follows (m2sh rejects `Main = Server(...)`), and what m2sh lets through into the
//! database (a missing or unknown attribute, a value of the wrong type, a `default_host` naming no
//! host, reassigned variables, duplicate keys) is an error with its position. `mimetypes` are
//! kept, where m2sh 1.12.2 drops them.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::rc::Rc;

use anyhow::Context;

use super::{Config, Dir, Handler, Host, Protocol, Proxy, Route, Server, Target};

/// Deeper than any real config: refused so that a hostile file cannot overflow the stack.
const MAX_DEPTH: usize = 64;

/// A syntax or model error at a 1-based line and column (counted in characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

impl std::error::Error for ConfError {}

/// Parses the text of a `.conf` file.
pub fn parse(text: &str) -> Result<Config, ConfError> {
    let (vars, end) = Parser::new(lex(text)?).file()?;
    build(&vars, end)
}

/// Reads and parses a `.conf` file; errors name the file.
pub fn load(path: &Path) -> anyhow::Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&text).with_context(|| path.display().to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    line: usize,
    column: usize,
}

fn err(pos: Pos, message: impl Into<String>) -> ConfError {
    ConfError {
        line: pos.line,
        column: pos.column,
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// The raw text between the quotes: backslashes are kept, as m2sh keeps them.
    Str(String),
    /// The digits as written, so that a setting like `0640` keeps its leading zero.
    Num(String),
    Ident(String),
    Punct(char),
    Eof,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Str(s) => format!("the string '{s}'"),
            Tok::Num(n) => format!("the number {n}"),
            Tok::Ident(name) => format!("the name {name}"),
            Tok::Punct(c) => format!("'{c}'"),
            Tok::Eof => "the end of the file".to_string(),
        }
    }
}

/// All tokens with their positions, ending with [`Tok::Eof`].
fn lex(text: &str) -> Result<Vec<(Tok, Pos)>, ConfError> {
    let mut cur = Cursor {
        chars: text.chars().peekable(),
        pos: Pos { line: 1, column: 1 },
    };
    let mut toks = Vec::new();
    loop {
        cur.skip_blanks();
        let pos = cur.pos;
        let Some(c) = cur.peek() else {
            toks.push((Tok::Eof, pos));
            return Ok(toks);
        };
        let tok = match c {
            '\'' | '"' => Tok::Str(cur.string(c)?),
            '0'..='9' => Tok::Num(cur.take_while(|c| c.is_ascii_digit())),
            c if c.is_ascii_alphabetic() || c == '_' => {
                Tok::Ident(cur.take_while(|c| c.is_ascii_alphanumeric() || c == '_'))
            }
            '=' | '(' | ')' | '[' | ']' | '{' | '}' | ',' | ':' => {
                cur.bump();
                Tok::Punct(c)
            }
            other => return Err(err(pos, format!("unexpected character {other:?}"))),
        };
        toks.push((tok, pos));
    }
}

struct Cursor<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    pos: Pos,
}

impl Cursor<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.pos.line += 1;
            self.pos.column = 1;
        } else {
            self.pos.column += 1;
        }
        Some(c)
    }

    /// Skips white space and `#` comments.
    fn skip_blanks(&mut self) {
        while let Some(c) = self.peek() {
            if c == '#' {
                while self.peek().is_some_and(|c| c != '\n') {
                    self.bump();
                }
            } else if c.is_whitespace() {
                self.bump();
            } else {
                break;
            }
        }
    }

    fn take_while(&mut self, accept: impl Fn(char) -> bool) -> String {
        let mut taken = String::new();
        while let Some(c) = self.peek().filter(|&c| accept(c)) {
            taken.push(c);
            self.bump();
        }
        taken
    }

    /// A string opened by `quote`, whose text is returned raw: a backslash only stops the next
    /// character from closing the string.
    fn string(&mut self, quote: char) -> Result<String, ConfError> {
        let start = self.pos;
        let unterminated = || err(start, "unterminated string");
        self.bump();
        let mut text = String::new();
        loop {
            match self.bump().ok_or_else(unterminated)? {
                c if c == quote => return Ok(text),
                '\\' => {
                    text.push('\\');
                    text.push(self.bump().ok_or_else(unterminated)?);
                }
                c => text.push(c),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parser

/// A value as written and where it starts; shared (`Rc`) by every use of a variable.
struct Expr {
    pos: Pos,
    kind: Kind,
}

enum Kind {
    Str(String),
    Num(String),
    List(Vec<Rc<Expr>>),
    Dict(Vec<Entry>),
    Object(Object),
}

impl Kind {
    fn describe(&self) -> String {
        match self {
            Kind::Str(s) => format!("the string '{s}'"),
            Kind::Num(n) => format!("the number {n}"),
            Kind::List(_) => "a list".to_string(),
            Kind::Dict(_) => "a dict".to_string(),
            Kind::Object(o) => format!("a {}(...)", o.class.name()),
        }
    }
}

/// A dict item or a class attribute.
struct Entry {
    key: String,
    pos: Pos,
    value: Rc<Expr>,
}

struct Object {
    class: Class,
    attrs: Vec<Entry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Server,
    Host,
    Handler,
    Dir,
    Proxy,
    Filter,
    Xrequest,
}

impl Class {
    /// Class names are case-insensitive in m2sh (`config_file.c:209-220`).
    fn from_name(name: &str) -> Option<Class> {
        Some(match name.to_ascii_lowercase().as_str() {
            "server" => Class::Server,
            "host" => Class::Host,
            "handler" => Class::Handler,
            "dir" => Class::Dir,
            "proxy" => Class::Proxy,
            "filter" => Class::Filter,
            "xrequest" => Class::Xrequest,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Class::Server => "Server",
            Class::Host => "Host",
            Class::Handler => "Handler",
            Class::Dir => "Dir",
            Class::Proxy => "Proxy",
            Class::Filter => "Filter",
            Class::Xrequest => "Xrequest",
        }
    }

    fn attributes(self) -> &'static [&'static str] {
        match self {
            Class::Server => &[
                "uuid",
                "name",
                "access_log",
                "error_log",
                "pid_file",
                "chroot",
                "default_host",
                "bind_addr",
                "port",
                "use_ssl",
                "control_port",
                "hosts",
                "filters",
                "xrequests",
            ],
            Class::Host => &["name", "matching", "routes"],
            Class::Handler => &[
                "send_spec",
                "send_ident",
                "recv_spec",
                "recv_ident",
                "raw_payload",
                "protocol",
            ],
            Class::Dir => &["base", "index_file", "default_ctype", "cache_ttl"],
            Class::Proxy => &["addr", "port"],
            Class::Filter | Class::Xrequest => &["name", "settings"],
        }
    }
}

struct Parser {
    toks: Vec<(Tok, Pos)>,
    /// Never moves past the final `Eof`, so indexing cannot fail.
    at: usize,
    depth: usize,
    vars: HashMap<String, Rc<Expr>>,
}

impl Parser {
    fn new(toks: Vec<(Tok, Pos)>) -> Self {
        Parser {
            toks,
            at: 0,
            depth: 0,
            vars: HashMap::new(),
        }
    }

    fn advance(&mut self) -> (Tok, Pos) {
        let tok = self.toks[self.at].clone();
        if self.at + 1 < self.toks.len() {
            self.at += 1;
        }
        tok
    }

    fn peek_is(&self, punct: char) -> bool {
        self.toks[self.at].0 == Tok::Punct(punct)
    }

    fn eat(&mut self, punct: char) -> bool {
        let found = self.peek_is(punct);
        if found {
            self.advance();
        }
        found
    }

    fn expect(&mut self, punct: char, after: &str) -> Result<(), ConfError> {
        match self.advance() {
            (Tok::Punct(c), _) if c == punct => Ok(()),
            (tok, pos) => Err(err(
                pos,
                format!("expected '{punct}' after {after}, found {}", tok.describe()),
            )),
        }
    }

    /// `{ IDENT "=" expr }`: the top-level variables, and where the file ends.
    fn file(mut self) -> Result<(HashMap<String, Rc<Expr>>, Pos), ConfError> {
        loop {
            match self.advance() {
                (Tok::Eof, end) => return Ok((self.vars, end)),
                (Tok::Ident(name), pos) => {
                    if self.vars.contains_key(&name) {
                        return Err(err(pos, format!("{name} is assigned twice")));
                    }
                    self.expect('=', &name)?;
                    let value = self.expr()?;
                    self.vars.insert(name, value);
                }
                (tok, pos) => {
                    let found = tok.describe();
                    return Err(err(pos, format!("expected a variable name, found {found}")));
                }
            }
        }
    }

    fn expr(&mut self) -> Result<Rc<Expr>, ConfError> {
        let (tok, pos) = self.advance();
        let kind = match tok {
            Tok::Str(s) => Kind::Str(s),
            Tok::Num(n) => Kind::Num(n),
            Tok::Ident(name) if self.peek_is('(') => {
                Kind::Object(self.nested(pos, |p| p.object(&name, pos))?)
            }
            Tok::Ident(name) => return self.variable(&name, pos),
            Tok::Punct('[') => Kind::List(self.nested(pos, Self::list)?),
            Tok::Punct('{') => Kind::Dict(self.nested(pos, Self::dict)?),
            tok => {
                return Err(err(
                    pos,
                    format!("expected a value, found {}", tok.describe()),
                ));
            }
        };
        Ok(Rc::new(Expr { pos, kind }))
    }

    /// Runs `parse` one nesting level deeper, refusing absurd depths before the stack does.
    fn nested<T>(
        &mut self,
        pos: Pos,
        parse: impl FnOnce(&mut Self) -> Result<T, ConfError>,
    ) -> Result<T, ConfError> {
        if self.depth == MAX_DEPTH {
            return Err(err(pos, "values are nested too deeply"));
        }
        self.depth += 1;
        let parsed = parse(self);
        self.depth -= 1;
        parsed
    }

    /// Only earlier top-level assignments can be referred to, so no cycle can form.
    fn variable(&self, name: &str, pos: Pos) -> Result<Rc<Expr>, ConfError> {
        self.vars.get(name).cloned().ok_or_else(|| {
            err(
                pos,
                format!("unknown variable {name} (assign it before using it)"),
            )
        })
    }

    /// `Class "(" { IDENT "=" expr [","] } ")"`, the class name already read.
    fn object(&mut self, class_name: &str, pos: Pos) -> Result<Object, ConfError> {
        let class = Class::from_name(class_name).ok_or_else(|| {
            err(
                pos,
                format!(
                    "unknown class {class_name} (expected Server, Host, Handler, Dir, Proxy, \
                     Filter or Xrequest)"
                ),
            )
        })?;
        self.advance();
        let mut attrs: Vec<Entry> = Vec::new();
        loop {
            match self.advance() {
                (Tok::Punct(')'), _) => return Ok(Object { class, attrs }),
                (Tok::Ident(key), at) => {
                    if attrs.iter().any(|a| a.key == key) {
                        let class = class.name();
                        return Err(err(at, format!("{key} is given twice in {class}(...)")));
                    }
                    self.expect('=', &key)?;
                    let value = self.expr()?;
                    attrs.push(Entry {
                        key,
                        pos: at,
                        value,
                    });
                    self.eat(',');
                }
                (tok, at) => {
                    let (class, found) = (class.name(), tok.describe());
                    return Err(err(
                        at,
                        format!("expected ')' or an attribute after {class}(..., found {found}"),
                    ));
                }
            }
        }
    }

    /// `"[" { expr [","] } "]"`, the `[` already read.
    fn list(&mut self) -> Result<Vec<Rc<Expr>>, ConfError> {
        let mut items = Vec::new();
        while !self.eat(']') {
            items.push(self.expr()?);
            self.eat(',');
        }
        Ok(items)
    }

    /// `"{" { QSTRING ":" expr [","] } "}"`, the `{` already read.
    fn dict(&mut self) -> Result<Vec<Entry>, ConfError> {
        let mut entries: Vec<Entry> = Vec::new();
        loop {
            match self.advance() {
                (Tok::Punct('}'), _) => return Ok(entries),
                (Tok::Str(key), at) => {
                    if entries.iter().any(|e| e.key == key) {
                        return Err(err(at, format!("the key '{key}' appears twice")));
                    }
                    self.expect(':', &format!("'{key}'"))?;
                    let value = self.expr()?;
                    entries.push(Entry {
                        key,
                        pos: at,
                        value,
                    });
                    self.eat(',');
                }
                (tok, at) => {
                    let found = tok.describe();
                    return Err(err(
                        at,
                        format!("expected a quoted key or '}}', found {found}"),
                    ));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// From values to the model

fn build(vars: &HashMap<String, Rc<Expr>>, end: Pos) -> Result<Config, ConfError> {
    let servers = vars
        .get("servers")
        .ok_or_else(|| err(end, "the file has no `servers = [...]`"))?;
    Ok(Config {
        servers: list(servers, "servers")?
            .iter()
            .map(|e| server(Attrs::of(e, Class::Server, "servers")?))
            .collect::<Result<_, _>>()?,
        settings: vars
            .get("settings")
            .map(|e| settings(e))
            .transpose()?
            .unwrap_or_default(),
        mimetypes: vars
            .get("mimetypes")
            .map(|e| mimetypes(e))
            .transpose()?
            .unwrap_or_default(),
    })
}

/// A class instance's attributes, checked against the class's list when made.
struct Attrs<'a> {
    class: Class,
    pos: Pos,
    entries: &'a [Entry],
}

impl<'a> Attrs<'a> {
    /// The attributes of `e`, which must be an instance of `class`; `place` says where it is.
    fn of(e: &'a Expr, class: Class, place: &str) -> Result<Self, ConfError> {
        match &e.kind {
            Kind::Object(o) if o.class == class => Self::new(o, e.pos),
            _ => Err(wrong(e, place, &format!("a {}(...)", class.name()))),
        }
    }

    fn new(o: &'a Object, pos: Pos) -> Result<Self, ConfError> {
        let allowed = o.class.attributes();
        match o.attrs.iter().find(|a| !allowed.contains(&a.key.as_str())) {
            Some(a) => Err(err(
                a.pos,
                format!(
                    "{} has no attribute {} (it takes {})",
                    o.class.name(),
                    a.key,
                    allowed.join(", ")
                ),
            )),
            None => Ok(Attrs {
                class: o.class,
                pos,
                entries: &o.attrs,
            }),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Expr> {
        self.entries
            .iter()
            .find(|a| a.key == key)
            .map(|a| &*a.value)
    }

    /// `Class.key`, naming the attribute in errors.
    fn what(&self, key: &str) -> String {
        format!("{}.{key}", self.class.name())
    }

    /// The required attribute `key`, converted by `conv`.
    fn req<T>(
        &self,
        key: &str,
        conv: impl Fn(&'a Expr, &str) -> Result<T, ConfError>,
    ) -> Result<T, ConfError> {
        match self.get(key) {
            Some(e) => conv(e, &self.what(key)),
            None => Err(err(
                self.pos,
                format!(
                    "{}(...) lacks the required attribute {key}",
                    self.class.name()
                ),
            )),
        }
    }

    /// The optional attribute `key`, converted by `conv`, or `default`.
    fn or<T>(
        &self,
        key: &str,
        default: T,
        conv: impl Fn(&'a Expr, &str) -> Result<T, ConfError>,
    ) -> Result<T, ConfError> {
        match self.get(key) {
            Some(e) => conv(e, &self.what(key)),
            None => Ok(default),
        }
    }
}

fn wrong(e: &Expr, what: &str, want: &str) -> ConfError {
    err(
        e.pos,
        format!("{what} must be {want}, not {}", e.kind.describe()),
    )
}

fn string(e: &Expr, what: &str) -> Result<String, ConfError> {
    match &e.kind {
        Kind::Str(s) => Ok(s.clone()),
        _ => Err(wrong(e, what, "a quoted string")),
    }
}

fn number(e: &Expr, what: &str) -> Result<u64, ConfError> {
    match &e.kind {
        Kind::Num(n) => n
            .parse()
            .map_err(|_| err(e.pos, format!("{what} {n} is too large"))),
        _ => Err(wrong(e, what, "a number")),
    }
}

fn port(e: &Expr, what: &str) -> Result<u16, ConfError> {
    let n = number(e, what)?;
    u16::try_from(n)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| err(e.pos, format!("{what} must be a port (1-65535), not {n}")))
}

fn flag(e: &Expr, what: &str) -> Result<bool, ConfError> {
    Ok(number(e, what)? != 0)
}

/// m2sh sets `raw_payload` when the number's text starts with `1` (`config_file.c:97-105`).
fn raw_payload(e: &Expr, what: &str) -> Result<bool, ConfError> {
    match &e.kind {
        Kind::Num(n) => Ok(n.starts_with('1')),
        _ => Err(wrong(e, what, "a number")),
    }
}

/// mongrel2 silently treats any other value as `json`; here it is a mistake.
fn protocol(e: &Expr, what: &str) -> Result<Protocol, ConfError> {
    match string(e, what)?.as_str() {
        "json" => Ok(Protocol::Json),
        "tnetstring" => Ok(Protocol::Tnetstring),
        other => Err(err(
            e.pos,
            format!("{what} must be 'json' or 'tnetstring', not '{other}'"),
        )),
    }
}

/// mongrel2 refuses a Dir whose base lacks the trailing `/` (`src/dir.c:202`).
fn dir_base(e: &Expr, what: &str) -> Result<String, ConfError> {
    let base = string(e, what)?;
    if base.ends_with('/') {
        Ok(base)
    } else {
        Err(err(e.pos, format!("{what} '{base}' must end with '/'")))
    }
}

fn list<'e>(e: &'e Expr, what: &str) -> Result<&'e [Rc<Expr>], ConfError> {
    match &e.kind {
        Kind::List(items) => Ok(items),
        _ => Err(wrong(e, what, "a list [...]")),
    }
}

fn dict<'e>(e: &'e Expr, what: &str) -> Result<&'e [Entry], ConfError> {
    match &e.kind {
        Kind::Dict(entries) => Ok(entries),
        _ => Err(wrong(e, what, "a dict {...}")),
    }
}

fn server(a: Attrs<'_>) -> Result<Server, ConfError> {
    let server = Server {
        uuid: a.req("uuid", string)?,
        name: a.or("name", String::new(), string)?,
        access_log: a.req("access_log", string)?,
        error_log: a.req("error_log", string)?,
        pid_file: a.req("pid_file", string)?,
        chroot: a.or("chroot", String::new(), string)?,
        default_host: a.req("default_host", string)?,
        bind_addr: a.or("bind_addr", "0.0.0.0".to_string(), string)?,
        port: a.req("port", port)?,
        use_ssl: a.or("use_ssl", false, flag)?,
        control_port: a.or("control_port", String::new(), string)?,
        hosts: a
            .req("hosts", list)?
            .iter()
            .map(|e| host(Attrs::of(e, Class::Host, "Server.hosts")?))
            .collect::<Result<_, _>>()?,
        plugins: [
            plugins(&a, "filters", Class::Filter)?,
            plugins(&a, "xrequests", Class::Xrequest)?,
        ]
        .concat(),
    };
    if !server.hosts.iter().any(|h| h.name == server.default_host) {
        let pos = a.get("default_host").map_or(a.pos, |e| e.pos);
        let names: Vec<&str> = server.hosts.iter().map(|h| h.name.as_str()).collect();
        return Err(err(
            pos,
            format!(
                "default_host '{}' is not the name of one of the server's hosts ({})",
                server.default_host,
                names.join(", ")
            ),
        ));
    }
    Ok(server)
}

/// The names of the `Filter`s or `Xrequest`s listed in `key`: not supported, but reported.
fn plugins(a: &Attrs<'_>, key: &str, class: Class) -> Result<Vec<String>, ConfError> {
    let Some(e) = a.get(key) else {
        return Ok(Vec::new());
    };
    let place = a.what(key);
    list(e, &place)?
        .iter()
        .map(|e| {
            let plugin = Attrs::of(e, class, &place)?;
            plugin.req("settings", dict)?;
            plugin.req("name", string)
        })
        .collect()
}

fn host(a: Attrs<'_>) -> Result<Host, ConfError> {
    let name = a.req("name", string)?;
    Ok(Host {
        matching: a.or("matching", name.clone(), string)?,
        routes: a
            .req("routes", dict)?
            .iter()
            .map(route)
            .collect::<Result<_, _>>()?,
        name,
    })
}

fn route(entry: &Entry) -> Result<Route, ConfError> {
    let what = format!("the route '{}'", entry.key);
    Ok(Route {
        path: entry.key.clone(),
        target: target(&entry.value, &what)?,
    })
}

fn target(e: &Expr, what: &str) -> Result<Target, ConfError> {
    match &e.kind {
        Kind::Object(o) if o.class == Class::Handler => {
            handler(Attrs::new(o, e.pos)?).map(Target::Handler)
        }
        Kind::Object(o) if o.class == Class::Dir => dir(Attrs::new(o, e.pos)?).map(Target::Dir),
        Kind::Object(o) if o.class == Class::Proxy => {
            proxy(Attrs::new(o, e.pos)?).map(Target::Proxy)
        }
        _ => Err(wrong(e, what, "a Handler(...), Dir(...) or Proxy(...)")),
    }
}

fn handler(a: Attrs<'_>) -> Result<Handler, ConfError> {
    Ok(Handler {
        send_spec: a.req("send_spec", string)?,
        send_ident: a.req("send_ident", string)?,
        recv_spec: a.req("recv_spec", string)?,
        recv_ident: a.req("recv_ident", string)?,
        raw_payload: a.or("raw_payload", false, raw_payload)?,
        protocol: a.or("protocol", Protocol::Json, protocol)?,
    })
}

fn dir(a: Attrs<'_>) -> Result<Dir, ConfError> {
    Ok(Dir {
        base: a.req("base", dir_base)?,
        index_file: a.req("index_file", string)?,
        default_ctype: a.req("default_ctype", string)?,
        cache_ttl: a.or("cache_ttl", 0, number)?,
    })
}

fn proxy(a: Attrs<'_>) -> Result<Proxy, ConfError> {
    Ok(Proxy {
        addr: a.req("addr", string)?,
        port: a.req("port", port)?,
    })
}

/// Numbers keep their text: mongrel2 reads every setting as text (`atoi` for numbers).
fn settings(e: &Expr) -> Result<BTreeMap<String, String>, ConfError> {
    dict(e, "settings")?
        .iter()
        .map(|entry| match &entry.value.kind {
            Kind::Str(text) | Kind::Num(text) => Ok((entry.key.clone(), text.clone())),
            _ => Err(wrong(
                &entry.value,
                &format!("the setting '{}'", entry.key),
                "a string or a number",
            )),
        })
        .collect()
}

/// mongrel2 refuses extensions without the leading `.` (`src/mime.c`).
fn mimetypes(e: &Expr) -> Result<BTreeMap<String, String>, ConfError> {
    dict(e, "mimetypes")?
        .iter()
        .map(|entry| -> Result<(String, String), ConfError> {
            if !entry.key.starts_with('.') {
                return Err(err(
                    entry.pos,
                    format!("the mimetype key '{}' must start with '.'", entry.key),
                ));
            }
            let what = format!("mimetypes['{}']", entry.key);
            Ok((entry.key.clone(), string(&entry.value, &what)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The minimal config of protocol reference §7.2, verbatim.
    const MINIMAL: &str = r##"
app = Handler(send_spec='tcp://127.0.0.1:9997', send_ident='1b1d2b8e-0a3c-4a6e-9f00-000000000001',
              recv_spec='tcp://127.0.0.1:9996', recv_ident='', protocol='tnetstring')
main = Server(uuid="f400bf85-4538-4f7a-8908-67e313d515c2",
              access_log="/logs/access.log", error_log="/logs/error.log",
              chroot="./", pid_file="/run/mongrel2.pid",
              default_host="localhost", name="main", bind_addr="127.0.0.1", port=6767,
              hosts=[Host(name="localhost", routes={
                  '/': app,
                  '/static/': Dir(base='static/', index_file='index.html', default_ctype='text/plain')})])
settings = {"limits.content_length": 20480,          # keep >= limits.buffer_size (4096)!
            "upload.temp_store": "/tmp/upload.XXXXXX", # inside chroot => ./tmp/upload.XXXXXX
            "upload.temp_store_mode": "0640",
            "server.daemonize": 0}
servers = [main]
"##;

    /// A one-server config: `h` is a Handler, `routes` the inside of the routes dict and
    /// `extra` more Server attributes.
    fn config(extra: &str, routes: &str) -> String {
        format!(
            "h = Handler(send_spec='tcp://127.0.0.1:1', send_ident='id',\n\
             recv_spec='tcp://127.0.0.1:2', recv_ident='')\n\
             servers = [Server(uuid='u', access_log='/a', error_log='/e', pid_file='/p',\n\
             default_host='localhost', port=80 {extra}\n\
             hosts=[Host(name='localhost', routes={{{routes}}})])]\n"
        )
    }

    fn routes(text: &str) -> Vec<Route> {
        let mut config = parse(text).expect("config should parse");
        config.servers.remove(0).hosts.remove(0).routes
    }

    fn parse_err(text: &str) -> ConfError {
        parse(text).expect_err("config should be refused")
    }

    fn test_handler() -> Handler {
        Handler {
            send_spec: "tcp://127.0.0.1:1".to_string(),
            send_ident: "id".to_string(),
            recv_spec: "tcp://127.0.0.1:2".to_string(),
            recv_ident: String::new(),
            raw_payload: false,
            protocol: Protocol::Json,
        }
    }

    #[test]
    fn minimal_config_parses_to_the_model() {
        let handler = Handler {
            send_spec: "tcp://127.0.0.1:9997".to_string(),
            send_ident: "1b1d2b8e-0a3c-4a6e-9f00-000000000001".to_string(),
            recv_spec: "tcp://127.0.0.1:9996".to_string(),
            recv_ident: String::new(),
            raw_payload: false,
            protocol: Protocol::Tnetstring,
        };
        let dir = Dir {
            base: "static/".to_string(),
            index_file: "index.html".to_string(),
            default_ctype: "text/plain".to_string(),
            cache_ttl: 0,
        };
        let expected = Config {
            servers: vec![Server {
                hosts: vec![Host {
                    name: "localhost".to_string(),
                    matching: "localhost".to_string(),
                    routes: vec![
                        Route {
                            path: "/".to_string(),
                            target: Target::Handler(handler),
                        },
                        Route {
                            path: "/static/".to_string(),
                            target: Target::Dir(dir),
                        },
                    ],
                }],
                plugins: Vec::new(),
                ..crate::config::example_server()
            }],
            settings: [
                ("limits.content_length", "20480"),
                ("upload.temp_store", "/tmp/upload.XXXXXX"),
                ("upload.temp_store_mode", "0640"),
                ("server.daemonize", "0"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            mimetypes: BTreeMap::new(),
        };
        assert_eq!(parse(MINIMAL), Ok(expected));
    }

    #[test]
    fn a_variable_can_serve_several_routes() {
        let routes = routes(&config("", "'/a': h, '/b': h"));
        assert_eq!(routes.len(), 2);
        for route in &routes {
            assert_eq!(route.target, Target::Handler(test_handler()));
        }
    }

    #[test]
    fn routes_keep_file_order_and_exact_keys() {
        let routes = routes(&config("", "'/z': h, '/a': h, '@chat': h, '/m/': h"));
        let paths: Vec<&str> = routes.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["/z", "/a", "@chat", "/m/"]);
    }

    #[test]
    fn comments_are_skipped_but_not_inside_strings() {
        let text = "# a comment\n\
                    h = Handler(send_spec='a#b', # trailing\n\
                    send_ident='', recv_spec='', recv_ident='') # after\n\
                    servers = [] # none\n";
        assert_eq!(parse(text).map(|c| c.servers), Ok(Vec::new()));
        let routes = routes(&config(
            "# x\n",
            "# y\n'/': Dir(base='a#/', index_file='i',\n\
             default_ctype='t') # z\n",
        ));
        assert!(matches!(&routes[0].target, Target::Dir(d) if d.base == "a#/"));
    }

    #[test]
    fn backslashes_are_kept_raw() {
        let routes = routes(&config("", r#"'/x/(\d+)$': h, "/esc\"q\\d": h"#));
        assert_eq!(routes[0].path.as_bytes(), br"/x/(\d+)$");
        assert_eq!(routes[1].path.as_bytes(), br#"/esc\"q\\d"#);
        assert_eq!(routes[1].path.len(), 10);
    }

    #[test]
    fn commas_are_optional() {
        let text = "h = Handler(send_spec='a' send_ident='b' recv_spec='c' recv_ident='')\n\
                    servers = [Server(uuid='u' access_log='/a' error_log='/e' pid_file='/p'\n\
                    default_host='x' port=80 hosts=[Host(name='x' routes={'/': h '/b': h})])]\n\
                    settings = {\"a\": 1 \"b\": \"2\"}";
        let config = parse(text).expect("config should parse");
        assert_eq!(config.servers[0].hosts[0].routes.len(), 2);
        assert_eq!(config.settings.len(), 2);
    }

    #[test]
    fn class_names_are_case_insensitive() {
        let routes = routes(&config(
            "",
            "'/': DIR(base='s/', index_file='i', default_ctype='t'), \
             '/p': proxy(addr='127.0.0.1', port=8080)",
        ));
        assert!(matches!(routes[0].target, Target::Dir(_)));
        assert_eq!(
            routes[1].target,
            Target::Proxy(Proxy {
                addr: "127.0.0.1".to_string(),
                port: 8080
            })
        );
    }

    #[test]
    fn a_capitalised_variable_is_a_variable() {
        let text = "Web = Handler(send_spec='a', send_ident='b', recv_spec='c', recv_ident='')\n\
                    Main = Server(uuid='u', access_log='/a', error_log='/e', pid_file='/p',\n\
                    default_host='x', port=80, hosts=[Host(name='x', routes={'/': Web})])\n\
                    servers = [Main]";
        let config = parse(text).expect("config should parse");
        assert_eq!(config.servers[0].uuid, "u");
        assert!(matches!(
            config.servers[0].hosts[0].routes[0].target,
            Target::Handler(_)
        ));
    }

    #[test]
    fn defaults_follow_mongrel2() {
        let config = parse(&config("", "'/': h")).expect("config should parse");
        let server = &config.servers[0];
        assert_eq!((server.name.as_str(), server.chroot.as_str()), ("", ""));
        assert_eq!(server.bind_addr, "0.0.0.0");
        assert!(!server.use_ssl);
        assert_eq!(server.control_port, "");
        assert_eq!(server.hosts[0].matching, "localhost");
    }

    #[test]
    fn raw_payload_is_set_by_a_leading_1() {
        for (value, expected) in [("1", true), ("10", true), ("0", false), ("2", false)] {
            let routes = routes(&config(
                "",
                &format!(
                    "'/': Handler(send_spec='a', send_ident='', recv_spec='b', recv_ident='', \
                     raw_payload={value})"
                ),
            ));
            assert!(
                matches!(&routes[0].target, Target::Handler(h) if h.raw_payload == expected),
                "raw_payload={value}"
            );
        }
    }

    #[test]
    fn a_missing_required_attribute_is_an_error() {
        let e = parse_err("servers = [Server(uuid='u')]");
        assert_eq!(
            e.to_string(),
            "line 1, column 12: Server(...) lacks the required attribute access_log"
        );
        let e = parse_err(&config(
            "",
            "'/s/': Dir(base='s/', default_ctype='text/plain')",
        ));
        assert_eq!(e.line, 5);
        assert!(e
            .message
            .contains("Dir(...) lacks the required attribute index_file"));
    }

    #[test]
    fn unknown_names_are_errors() {
        let e = parse_err(&config("", "'/': nothere"));
        assert!(e.message.contains("unknown variable nothere"), "{e}");
        let e = parse_err(&config("", "'/': Handlr(send_spec='a')"));
        assert!(e.message.contains("unknown class Handlr"), "{e}");
        let e = parse_err(&config(
            "",
            "'/': Dir(base='s/', index_file='i', default_ctype='t', cache_tll=5)",
        ));
        assert!(e.message.contains("Dir has no attribute cache_tll"), "{e}");
        let e = parse_err("servers = [main]\nmain = 1");
        assert!(e.message.contains("unknown variable main"), "{e}");
    }

    #[test]
    fn wrong_types_and_values_are_errors() {
        let e = parse_err(&config("", "'/': h").replace("port=80", "port='80'"));
        assert!(e.message.contains("Server.port must be a number"), "{e}");
        let e = parse_err(&config("", "'/': h").replace("port=80", "port=65536"));
        assert!(e.message.contains("Server.port must be a port"), "{e}");
        let e = parse_err(&config("", "'/': h").replace("send_ident='id'", "send_ident=1"));
        assert!(
            e.message
                .contains("Handler.send_ident must be a quoted string"),
            "{e}"
        );
        let e = parse_err(&config(
            "",
            "'/': Dir(base='s', index_file='i', default_ctype='t')",
        ));
        assert!(e.message.contains("must end with '/'"), "{e}");
        let e = parse_err(&config(
            "",
            "'/': Handler(send_spec='a', send_ident='', recv_spec='b', recv_ident='', \
             protocol='tnetstrings')",
        ));
        assert!(e.message.contains("'json' or 'tnetstring'"), "{e}");
        let e = parse_err(&config("", "'/': 'not a target'"));
        assert!(
            e.message.contains("the route '/' must be a Handler(...)"),
            "{e}"
        );
        let e = parse_err("servers = [Host(name='x', routes={})]");
        assert!(e.message.contains("servers must be a Server(...)"), "{e}");
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = parse_err("a = 'open");
        assert_eq!((e.line, e.column), (1, 5));
        let e = parse_err("a = Handler(send_spec='x' ;");
        assert_eq!((e.line, e.column), (1, 27));
        let e = parse_err("a = Handler(send_spec='x'");
        assert!(
            e.message
                .starts_with("expected ')' or an attribute after Handler("),
            "{e}"
        );
        let e = parse_err("a = 1\na = 2\nservers = []");
        assert_eq!(e.to_string(), "line 2, column 1: a is assigned twice");
        let e = parse_err("settings = {}");
        assert!(e.message.contains("servers"), "{e}");
        let deep = format!("servers = {}{}", "[".repeat(1000), "]".repeat(1000));
        assert!(parse_err(&deep).message.contains("nested too deeply"));
    }

    #[test]
    fn default_host_must_name_a_host() {
        let text = config("", "'/': h").replace("default_host='localhost'", "default_host='web'");
        let e = parse_err(&text);
        assert!(
            e.message.contains("default_host 'web' is not the name"),
            "{e}"
        );
    }

    #[test]
    fn settings_and_mimetypes_are_read() {
        let text = format!(
            "{}settings = {{\"limits.content_length\": 20480, \"mode\": 0640, \"s\": \"x\"}}\n\
             mimetypes = {{\".wasm\": \"application/wasm\", \".txt\": \"text/plain; charset=utf-8\"}}\n",
            config("", "'/': h")
        );
        let config = parse(&text).expect("config should parse");
        let settings: Vec<(&str, &str)> = config
            .settings
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            settings,
            [
                ("limits.content_length", "20480"),
                ("mode", "0640"),
                ("s", "x")
            ]
        );
        assert_eq!(config.mimetypes[".wasm"], "application/wasm");
        assert_eq!(config.mimetypes[".txt"], "text/plain; charset=utf-8");
        let e = parse_err("servers = []\nmimetypes = {\"txt\": \"text/plain\"}");
        assert!(e.message.contains("must start with '.'"), "{e}");
        let e = parse_err("servers = []\nsettings = {\"a\": [1]}");
        assert!(
            e.message
                .contains("the setting 'a' must be a string or a number"),
            "{e}"
        );
    }

    #[test]
    fn filters_and_xrequests_become_plugins() {
        let extra = "filters=[Filter(name='/f/null.so', settings={})]\n\
                     xrequests=[Xrequest(name='/x/sendfile.so', settings={\"a\": 1})]";
        let config = parse(&config(extra, "'/': h")).expect("config should parse");
        assert_eq!(config.servers[0].plugins, ["/f/null.so", "/x/sendfile.so"]);
        let e = parse_err(&self::config(
            "filters=[Filter(name='/f/null.so')]",
            "'/': h",
        ));
        assert!(
            e.message
                .contains("Filter(...) lacks the required attribute settings"),
            "{e}"
        );
    }
}
