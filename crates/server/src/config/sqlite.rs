//! The `config.sqlite` that `m2sh load` writes (server reference §1.2), read with mongrel2's type
//! strictness (`src/config/db.c:108-138`): a NULL or wrongly typed value in a column the server
//! needs is an error naming table, row and column, never a default. m2sh writes NULL for every
//! required attribute a `.conf` lacked, so that is the usual cause.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, Params, Row};

use super::{Config, Dir, Handler, Host, Protocol, Proxy, Route, Server, Target};

/// Reads every server with its hosts, routes and targets, plus the global settings and the
/// mimetype table.
pub fn load(path: &Path) -> anyhow::Result<Config> {
    // Checked first: sqlite's own "unable to open database file" does not say why.
    if !path.exists() {
        bail!("{}: no such file (written by `m2sh load`)", path.display());
    }
    let db = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open {} read-only", path.display()))?;
    read(&db).with_context(|| path.display().to_string())
}

/// In mongrel2's order: settings, mimetypes, then the servers.
fn read(db: &Connection) -> anyhow::Result<Config> {
    Ok(Config {
        settings: settings(db)?,
        mimetypes: mimetypes(db)?,
        servers: each(db, "server", SERVER_SQL, (), |c| server(db, c))?,
    })
}

const SERVER_SQL: &str = "SELECT id, uuid, name, access_log, error_log, pid_file, chroot, \
     default_host, bind_addr, port, use_ssl, control_port FROM server ORDER BY id";

/// One row of `table`, named by its id in errors.
struct Cells<'r, 's> {
    table: &'static str,
    id: i64,
    row: &'r Row<'s>,
}

impl<'r, 's> Cells<'r, 's> {
    fn new(table: &'static str, row: &'r Row<'s>) -> anyhow::Result<Self> {
        match row.get_ref("id")? {
            ValueRef::Integer(id) => Ok(Cells { table, id, row }),
            other => bail!("{table}: a row has a {} id", other.data_type()),
        }
    }

    /// The text in `col`, or `None` for NULL.
    fn optional_text(&self, col: &str) -> anyhow::Result<Option<String>> {
        match self.row.get_ref(col)? {
            ValueRef::Null => Ok(None),
            ValueRef::Text(bytes) => String::from_utf8(bytes.to_vec())
                .map(Some)
                .map_err(|_| anyhow!("{}: column {col} is not UTF-8", self.name())),
            other => Err(self.wrong(col, "TEXT", other)),
        }
    }

    fn text(&self, col: &str) -> anyhow::Result<String> {
        self.optional_text(col)?.ok_or_else(|| self.null(col))
    }

    fn int(&self, col: &str) -> anyhow::Result<i64> {
        match self.row.get_ref(col)? {
            ValueRef::Integer(n) => Ok(n),
            ValueRef::Null => Err(self.null(col)),
            other => Err(self.wrong(col, "INTEGER", other)),
        }
    }

    fn port(&self, col: &str) -> anyhow::Result<u16> {
        let n = self.int(col)?;
        u16::try_from(n)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| anyhow!("{}: {col} {n} is not a port (1-65535)", self.name()))
    }

    /// `table row id`, how errors start.
    fn name(&self) -> String {
        format!("{} row {}", self.table, self.id)
    }

    fn null(&self, col: &str) -> anyhow::Error {
        anyhow!(
            "{}: column {col} is NULL (the .conf lacked it?)",
            self.name()
        )
    }

    fn wrong(&self, col: &str, want: &str, got: ValueRef<'_>) -> anyhow::Error {
        let got = got.data_type();
        anyhow!("{}: column {col} should be {want}, not {got}", self.name())
    }
}

/// Runs `sql` and converts each row of `table` with `convert`.
fn each<T>(
    db: &Connection,
    table: &'static str,
    sql: &str,
    params: impl Params,
    mut convert: impl FnMut(&Cells<'_, '_>) -> anyhow::Result<T>,
) -> anyhow::Result<Vec<T>> {
    let mut stmt = db
        .prepare(sql)
        .with_context(|| format!("cannot read table {table}"))?;
    let mut rows = stmt
        .query(params)
        .with_context(|| format!("cannot read table {table}"))?;
    let mut converted = Vec::new();
    while let Some(row) = rows.next()? {
        converted.push(convert(&Cells::new(table, row)?)?);
    }
    Ok(converted)
}

/// The row of `table` with `id`, if there is one.
fn one<T>(
    db: &Connection,
    table: &'static str,
    sql: &str,
    id: i64,
    convert: fn(&Cells<'_, '_>) -> anyhow::Result<T>,
) -> anyhow::Result<Option<T>> {
    Ok(each(db, table, sql, [id], convert)?.pop())
}

/// A key written twice is kept the first time, as `Setting_add` does.
fn settings(db: &Connection) -> anyhow::Result<BTreeMap<String, String>> {
    let sql = "SELECT id, key, value FROM setting ORDER BY id";
    let pairs = each(db, "setting", sql, (), |c| {
        Ok((c.text("key")?, c.text("value")?))
    })?;
    let mut settings = BTreeMap::new();
    for (key, value) in pairs {
        match settings.entry(key) {
            Entry::Vacant(slot) => {
                slot.insert(value);
            }
            Entry::Occupied(slot) => {
                tracing::warn!(
                    "setting {} appears twice: the first one is used",
                    slot.key()
                );
            }
        }
    }
    Ok(settings)
}

/// mongrel2 refuses to start on a duplicate extension or one without the leading `.`
/// (`src/mime.c:56-64`).
fn mimetypes(db: &Connection) -> anyhow::Result<BTreeMap<String, String>> {
    let sql = "SELECT id, extension, mimetype FROM mimetype ORDER BY id";
    let rows = each(db, "mimetype", sql, (), |c| {
        let extension = c.text("extension")?;
        if !extension.starts_with('.') {
            bail!(
                "{}: extension '{extension}' does not start with '.'",
                c.name()
            );
        }
        Ok((c.name(), extension, c.text("mimetype")?))
    })?;
    let mut mimetypes = BTreeMap::new();
    for (row, extension, mimetype) in rows {
        match mimetypes.entry(extension) {
            Entry::Vacant(slot) => {
                slot.insert(mimetype);
            }
            Entry::Occupied(slot) => bail!("{row}: extension {} appears twice", slot.key()),
        }
    }
    Ok(mimetypes)
}

/// `name` may be NULL: m2sh writes NULL when the `.conf` omits it, and mongrel2 never reads it.
fn server(db: &Connection, c: &Cells<'_, '_>) -> anyhow::Result<Server> {
    let server = Server {
        uuid: c.text("uuid")?,
        name: c.optional_text("name")?.unwrap_or_default(),
        access_log: c.text("access_log")?,
        error_log: c.text("error_log")?,
        pid_file: c.text("pid_file")?,
        chroot: c.text("chroot")?,
        default_host: c.text("default_host")?,
        bind_addr: c.text("bind_addr")?,
        port: c.port("port")?,
        use_ssl: c.int("use_ssl")? != 0,
        control_port: c.text("control_port")?,
        hosts: each(db, "host", HOST_SQL, [c.id], |h| host(db, h))?,
        plugins: plugins(db, c.id)?,
    };
    // mongrel2 refuses to start without it (`src/config/config.c:319`).
    if !server.hosts.iter().any(|h| h.name == server.default_host) {
        bail!(
            "{}: default_host '{}' is not the name of one of its hosts",
            c.name(),
            server.default_host
        );
    }
    Ok(server)
}

const HOST_SQL: &str = "SELECT id, name, matching FROM host WHERE server_id = ?1 ORDER BY id";

fn host(db: &Connection, c: &Cells<'_, '_>) -> anyhow::Result<Host> {
    let sql = "SELECT id, path, target_id, target_type FROM route WHERE host_id = ?1 ORDER BY id";
    Ok(Host {
        name: c.text("name")?,
        matching: c.text("matching")?,
        routes: each(db, "route", sql, [c.id], |r| {
            Ok(Route {
                path: r.text("path")?,
                target: target(db, r)?,
            })
        })?,
    })
}

fn target(db: &Connection, route: &Cells<'_, '_>) -> anyhow::Result<Target> {
    let id = route.int("target_id")?;
    let kind = route.text("target_type")?;
    let target = match kind.as_str() {
        "handler" => one(db, "handler", HANDLER_SQL, id, handler)?.map(Target::Handler),
        "dir" => one(db, "directory", DIR_SQL, id, dir)?.map(Target::Dir),
        "proxy" => one(db, "proxy", PROXY_SQL, id, proxy)?.map(Target::Proxy),
        other => bail!(
            "{}: target_type '{other}' is not handler, dir or proxy",
            route.name()
        ),
    };
    target.ok_or_else(|| anyhow!("{}: its {kind} {id} does not exist", route.name()))
}

const HANDLER_SQL: &str = "SELECT id, send_spec, send_ident, recv_spec, recv_ident, \
     raw_payload, protocol FROM handler WHERE id = ?1";
const DIR_SQL: &str =
    "SELECT id, base, index_file, default_ctype, cache_ttl FROM directory WHERE id = ?1";
const PROXY_SQL: &str = "SELECT id, addr, port FROM proxy WHERE id = ?1";

fn handler(c: &Cells<'_, '_>) -> anyhow::Result<Handler> {
    Ok(Handler {
        send_spec: c.text("send_spec")?,
        send_ident: c.text("send_ident")?,
        recv_spec: c.text("recv_spec")?,
        recv_ident: c.text("recv_ident")?,
        raw_payload: c.int("raw_payload")? != 0,
        protocol: protocol(c)?,
    })
}

/// mongrel2 takes anything but `tnetstring` as `json` (`src/config/config.c:78`); a database
/// that works with it must work here, so other values are only warned about.
fn protocol(c: &Cells<'_, '_>) -> anyhow::Result<Protocol> {
    Ok(match c.text("protocol")?.as_str() {
        "tnetstring" => Protocol::Tnetstring,
        "json" => Protocol::Json,
        other => {
            tracing::warn!(
                "{}: protocol '{other}' taken as json, as mongrel2 does",
                c.name()
            );
            Protocol::Json
        }
    })
}

/// mongrel2 refuses a base without the trailing `/` (`src/dir.c:202`).
fn dir(c: &Cells<'_, '_>) -> anyhow::Result<Dir> {
    let base = c.text("base")?;
    if !base.ends_with('/') {
        bail!("{}: base '{base}' must end with '/'", c.name());
    }
    let cache_ttl = c.int("cache_ttl")?;
    Ok(Dir {
        base,
        index_file: c.text("index_file")?,
        default_ctype: c.text("default_ctype")?,
        cache_ttl: u64::try_from(cache_ttl)
            .map_err(|_| anyhow!("{}: cache_ttl {cache_ttl} is negative", c.name()))?,
    })
}

fn proxy(c: &Cells<'_, '_>) -> anyhow::Result<Proxy> {
    Ok(Proxy {
        addr: c.text("addr")?,
        port: c.port("port")?,
    })
}

/// Names of the server's filters, then its xrequests. Older databases lack these tables
/// (`src/config/config.sql` has no `xrequest`).
fn plugins(db: &Connection, server_id: i64) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for (table, sql) in [
        (
            "filter",
            "SELECT id, name FROM filter WHERE server_id = ?1 ORDER BY id",
        ),
        (
            "xrequest",
            "SELECT id, name FROM xrequest WHERE server_id = ?1 ORDER BY id",
        ),
    ] {
        if has_table(db, table)? {
            names.extend(each(db, table, sql, [server_id], |c| c.text("name"))?);
        }
    }
    Ok(names)
}

fn has_table(db: &Connection, table: &str) -> anyhow::Result<bool> {
    let sql = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1";
    let count: i64 = db.query_row(sql, [table], |row| row.get(0))?;
    Ok(count > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// m2sh 1.12.2's DDL (`tools/m2sh/src/constants.c`), as `sqlite3 config.sqlite .schema`
    /// prints it after `m2sh load`.
    const DDL: &str = r#"
CREATE TABLE server (id INTEGER PRIMARY KEY,
    uuid TEXT,
    access_log TEXT,
    error_log TEXT,
    chroot TEXT DEFAULT '/var/www',
    pid_file TEXT,
    control_port TEXT DEFAULT '',
    default_host TEXT,
    name TEXT DEFAULT '',
    bind_addr TEXT DEFAULT "0.0.0.0",
    port INTEGER,
    use_ssl INTEGER default 0);
CREATE TABLE host (id INTEGER PRIMARY KEY,
    server_id INTEGER,
    maintenance BOOLEAN DEFAULT 0,
    name TEXT,
    matching TEXT);
CREATE TABLE handler (id INTEGER PRIMARY KEY,
    send_spec TEXT,
    send_ident TEXT,
    recv_spec TEXT,
    recv_ident TEXT,
   raw_payload INTEGER DEFAULT 0,
   protocol TEXT DEFAULT 'json');
CREATE TABLE proxy (id INTEGER PRIMARY KEY,
    addr TEXT,
    port INTEGER);
CREATE TABLE directory (id INTEGER PRIMARY KEY,   base TEXT,   index_file TEXT,   default_ctype TEXT,   cache_ttl INTEGER DEFAULT 0);
CREATE TABLE route (id INTEGER PRIMARY KEY,
    path TEXT,
    reversed BOOLEAN DEFAULT 0,
    host_id INTEGER,
    target_id INTEGER,
    target_type TEXT);
CREATE TABLE setting (id INTEGER PRIMARY KEY, key TEXT, value TEXT);
CREATE TABLE statistic (id SERIAL,
    other_type TEXT,
    other_id INTEGER,
    name TEXT,
    sum REAL,
    sumsq REAL,
    n INTEGER,
    min REAL,
    max REAL,
    mean REAL,
    sd REAL,
    primary key (other_type, other_id, name));
CREATE TABLE mimetype (id INTEGER PRIMARY KEY, mimetype TEXT, extension TEXT);
CREATE TABLE filter (id INTEGER PRIMARY KEY,
    server_id INTEGER,
    name TEXT,
    settings TEXT);
CREATE TABLE xrequest (id INTEGER PRIMARY KEY,
    server_id INTEGER,
    name TEXT,
    settings TEXT);
CREATE TABLE log(id INTEGER PRIMARY KEY,
    who TEXT,
    what TEXT,
    location TEXT,
    happened_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    how TEXT,
    why TEXT);
"#;

    /// The rows `m2sh load` writes for a server with a handler, a Dir and a Proxy route, two
    /// settings and two mimetypes (the real table has 857), and a filter.
    const ROWS: &str = "
INSERT INTO server VALUES (1, 'f400bf85-4538-4f7a-8908-67e313d515c2', '/logs/access.log',
    '/logs/error.log', './', '/run/mongrel2.pid', '', 'localhost', 'main', '127.0.0.1', 6767, 0);
INSERT INTO host VALUES (1, 1, 0, 'localhost', 'localhost');
INSERT INTO handler VALUES (1, 'tcp://127.0.0.1:9997', 'ident', 'tcp://127.0.0.1:9996', '', 0,
    'tnetstring');
INSERT INTO directory VALUES (1, 'static/', 'index.html', 'text/plain', 0);
INSERT INTO proxy VALUES (1, '127.0.0.1', 8080);
INSERT INTO route VALUES (1, '/', 0, 1, 1, 'handler');
INSERT INTO route VALUES (2, '/x/(\\d+)$', 0, 1, 1, 'handler');
INSERT INTO route VALUES (3, '/static/', 0, 1, 1, 'dir');
INSERT INTO route VALUES (4, '/p/', 0, 1, 1, 'proxy');
INSERT INTO setting VALUES (1, 'server.daemonize', '0');
INSERT INTO setting VALUES (2, 'limits.content_length', 20480);
INSERT INTO mimetype VALUES (1, 'text/html', '.html');
INSERT INTO mimetype VALUES (2, 'text/plain', '.txt');
INSERT INTO filter VALUES (1, 1, '/f/null.so', '0:}');
";

    /// A database in a fresh directory, built by `sql` after the DDL.
    fn database(sql: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.sqlite");
        let db = Connection::open(&path).expect("create the database");
        db.execute_batch(DDL).expect("DDL");
        db.execute_batch(sql).expect("rows");
        (dir, path)
    }

    fn load_err(sql: &str) -> String {
        let (_dir, path) = database(sql);
        format!("{:#}", load(&path).expect_err("database should be refused"))
    }

    fn strings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_what_m2sh_load_writes() {
        let (_dir, path) = database(ROWS);
        let handler = Target::Handler(Handler {
            send_spec: "tcp://127.0.0.1:9997".to_string(),
            send_ident: "ident".to_string(),
            recv_spec: "tcp://127.0.0.1:9996".to_string(),
            recv_ident: String::new(),
            raw_payload: false,
            protocol: Protocol::Tnetstring,
        });
        let route = |path: &str, target: &Target| Route {
            path: path.to_string(),
            target: target.clone(),
        };
        let dir = Target::Dir(Dir {
            base: "static/".to_string(),
            index_file: "index.html".to_string(),
            default_ctype: "text/plain".to_string(),
            cache_ttl: 0,
        });
        let proxy = Target::Proxy(Proxy {
            addr: "127.0.0.1".to_string(),
            port: 8080,
        });
        let expected = Config {
            servers: vec![Server {
                hosts: vec![Host {
                    name: "localhost".to_string(),
                    matching: "localhost".to_string(),
                    routes: vec![
                        route("/", &handler),
                        route(r"/x/(\d+)$", &handler),
                        route("/static/", &dir),
                        route("/p/", &proxy),
                    ],
                }],
                plugins: vec!["/f/null.so".to_string()],
                ..crate::config::example_server()
            }],
            settings: strings(&[
                ("server.daemonize", "0"),
                ("limits.content_length", "20480"),
            ]),
            mimetypes: strings(&[(".html", "text/html"), (".txt", "text/plain")]),
        };
        assert_eq!(load(&path).expect("database should load"), expected);
    }

    #[test]
    fn a_null_column_is_an_error() {
        let e = load_err(&format!("{ROWS}UPDATE directory SET index_file = NULL;"));
        assert!(
            e.contains("directory row 1: column index_file is NULL (the .conf lacked it?)"),
            "{e}"
        );
    }

    #[test]
    fn a_server_without_a_name_is_fine() {
        let (_dir, path) = database(&format!("{ROWS}UPDATE server SET name = NULL;"));
        let config = load(&path).expect("database should load");
        assert_eq!(config.servers[0].name, "");
    }

    #[test]
    fn wrong_types_and_values_are_errors() {
        let e = load_err(&format!("{ROWS}UPDATE server SET port = 'eighty';"));
        assert!(
            e.contains("server row 1: column port should be INTEGER, not Text"),
            "{e}"
        );
        let e = load_err(&format!("{ROWS}UPDATE proxy SET port = 70000;"));
        assert!(e.contains("proxy row 1: port 70000 is not a port"), "{e}");
        let e = load_err(&format!("{ROWS}UPDATE host SET name = 'web';"));
        assert!(
            e.contains("default_host 'localhost' is not the name"),
            "{e}"
        );
        let e = load_err(&format!(
            "{ROWS}UPDATE route SET target_id = 9 WHERE id = 3;"
        ));
        assert!(e.contains("route row 3: its dir 9 does not exist"), "{e}");
        let e = load_err(&format!(
            "{ROWS}INSERT INTO mimetype VALUES (3, 'text/x', '.txt');"
        ));
        assert!(
            e.contains("mimetype row 3: extension .txt appears twice"),
            "{e}"
        );
    }

    #[test]
    fn older_databases_without_plugin_tables_load() {
        let (_dir, path) = database(&format!("{ROWS}DROP TABLE filter; DROP TABLE xrequest;"));
        let config = load(&path).expect("database should load");
        assert!(config.servers[0].plugins.is_empty());
    }

    #[test]
    fn a_missing_file_is_an_error_and_is_not_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.sqlite");
        let e = load(&path).expect_err("no database");
        assert!(format!("{e:#}").contains("no such file"), "{e:#}");
        assert!(!path.exists());
    }
}
