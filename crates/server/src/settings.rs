//! mongrel2's `settings`, typed, with their defaults, plus the few of our own; every key we
//! do not implement is named in a warning at start, never silently ignored.

use std::collections::BTreeMap;
use std::time::Duration;

/// What the front end reads from the settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `limits.content_length`: larger bodies (and chunked ones that grow past it) are
    /// spooled to `upload.temp_store`, or refused with 413 without one.
    pub content_length: u64,
    /// `limits.buffer_size`: the largest request head.
    pub buffer_size: usize,
    /// `limits.header_count`.
    pub header_count: usize,
    /// `limits.handler_targets`: most ids in one reply.
    pub handler_targets: usize,
    /// `upload.temp_store`: a mkstemp template inside the chroot.
    pub temp_store: Option<String>,
    /// `upload.temp_store_mode`, octal text.
    pub temp_store_mode: u32,
    /// `download.flow_control`: credits to handlers as bytes reach the client.
    pub flow_control: bool,
    /// `server.daemonize`.
    pub daemonize: bool,
    /// `no_clobber_xff`: keep a client's X-Forwarded-For.
    pub no_clobber_xff: bool,
    /// `disable.access_logging`.
    pub access_logging: bool,
    /// `net.tcp_keepalive`.
    pub tcp_keepalive: bool,
    /// Ours: bytes queued for one client before it is dropped as too slow (mongrel2 drops
    /// it at 16 handler messages, whatever their size).
    pub client_buffer: usize,
    /// Ours: a request head must arrive whole within this (slowloris).
    pub header_timeout: Duration,
    /// Ours: a request body must make progress within this.
    pub body_timeout: Duration,
    /// Ours: an idle keep-alive connection is closed after this.
    pub keepalive_timeout: Duration,
    /// Ours: a client that takes nothing of its response for this long is dropped.
    pub write_timeout: Duration,
    /// Ours: a request for a handler that nobody serves waits this long for one to connect
    /// (a restart of either side), then is answered 503.
    pub handler_wait: Duration,
    /// Ours: a handler request without a reply by then is answered 504.
    pub handler_timeout: Duration,
    /// Ours: handlers are pinged this often, and one silent for 3 of these stops getting
    /// requests.
    pub handler_heartbeat: Duration,
}

/// Keys mongrel2 reads that need nothing from us (its coroutine stacks, its reaper, which
/// our timeouts replace, its libzmq threads).
const NOTHING_TO_DO: &[&str] = &[
    "limits.connection_stack_size",
    "limits.handler_stack",
    "limits.fdtask_stack",
    "limits.dir_send_buffer",
    "limits.dir_max_path",
    "limits.mime_ext_len",
    "limits.url_path",
    "limits.host_name",
    "limits.tick_timer",
    "limits.min_ping",
    "limits.min_read_rate",
    "limits.min_write_rate",
    "limits.kill_limit",
    "limits.client_read_retries",
    "limits.proxy_read_retries",
    "limits.proxy_read_retries_warn",
    "superpoll.max_fd",
    "superpoll.hot_dividend",
    "zeromq.threads",
    "request.relaxed",
    "control_port",
];

impl Settings {
    /// Reads `raw`; the warnings name keys that are not implemented, or malformed values
    /// (then the default is used).
    pub fn from_map(raw: &BTreeMap<String, String>) -> (Settings, Vec<String>) {
        let mut warnings = Vec::new();
        let mut num = |key: &str, default: u64| -> u64 {
            match raw.get(key) {
                None => default,
                Some(v) => v.trim().parse().unwrap_or_else(|_| {
                    warnings.push(format!(
                        "setting {key}={v:?} is not a number: using {default}"
                    ));
                    default
                }),
            }
        };
        let secs = |n: u64| Duration::from_secs(n);
        let settings = Settings {
            content_length: num("limits.content_length", 20480),
            buffer_size: num("limits.buffer_size", 4096) as usize,
            header_count: num("limits.header_count", 1280).clamp(1, 100_000) as usize,
            handler_targets: num("limits.handler_targets", 128) as usize,
            temp_store: raw.get("upload.temp_store").cloned(),
            temp_store_mode: 0,
            flow_control: num("download.flow_control", 0) == 1,
            daemonize: num("server.daemonize", 1) != 0,
            no_clobber_xff: num("no_clobber_xff", 0) == 1,
            access_logging: num("disable.access_logging", 0) != 1,
            tcp_keepalive: num("net.tcp_keepalive", 0) == 1,
            client_buffer: num("limits.client_buffer", 8 << 20) as usize,
            header_timeout: secs(num("limits.header_timeout", 10)),
            body_timeout: secs(num("limits.body_timeout", 30)),
            keepalive_timeout: secs(num("limits.keepalive_timeout", 60)),
            write_timeout: secs(num("limits.write_timeout", 60)),
            handler_wait: Duration::from_millis(num("limits.handler_wait_ms", 2000)),
            handler_timeout: secs(num("limits.handler_timeout", 120)),
            handler_heartbeat: Duration::from_millis(num("limits.handler_heartbeat_ms", 500)),
        };
        let mode = raw.get("upload.temp_store_mode").map(String::as_str);
        let temp_store_mode = match mode.map(|m| u32::from_str_radix(m.trim(), 8)) {
            None => 0o600,
            Some(Ok(m)) if m <= 0o777 => m,
            Some(_) => {
                warnings.push(format!(
                    "setting upload.temp_store_mode={:?} is not an octal mode: using 0600",
                    mode.unwrap_or_default()
                ));
                0o600
            }
        };
        let known = [
            "limits.content_length",
            "limits.buffer_size",
            "limits.header_count",
            "limits.handler_targets",
            "upload.temp_store",
            "upload.temp_store_mode",
            "download.flow_control",
            "server.daemonize",
            "no_clobber_xff",
            "disable.access_logging",
            "net.tcp_keepalive",
            "limits.client_buffer",
            "limits.header_timeout",
            "limits.body_timeout",
            "limits.keepalive_timeout",
            "limits.write_timeout",
            "limits.handler_timeout",
            "limits.handler_wait_ms",
            "limits.handler_heartbeat_ms",
        ];
        for key in raw.keys() {
            if !known.contains(&key.as_str()) && !NOTHING_TO_DO.contains(&key.as_str()) {
                warnings.push(format!("setting {key} is not implemented: ignored"));
            }
        }
        if raw.get("upload.stream").is_some_and(|v| v.trim() == "1") {
            warnings.push("upload.stream=1 is not implemented: bodies over limits.content_length are spooled to upload.temp_store".into());
        }
        (
            Settings {
                temp_store_mode,
                ..settings
            },
            warnings,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_values_and_warnings() {
        let (s, w) = Settings::from_map(&BTreeMap::new());
        assert_eq!(
            (s.content_length, s.buffer_size, s.temp_store_mode),
            (20480, 4096, 0o600)
        );
        assert!(s.daemonize && !s.flow_control && w.is_empty());
        let raw: BTreeMap<String, String> = [
            ("limits.content_length", "1024"),
            ("upload.temp_store_mode", "0640"),
            ("download.flow_control", "1"),
            ("limits.min_ping", "0"),
            ("ssl.ca_chain", "x"),
            ("limits.buffer_size", "big"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (s, w) = Settings::from_map(&raw);
        assert_eq!(
            (s.content_length, s.temp_store_mode, s.buffer_size),
            (1024, 0o640, 4096)
        );
        assert!(s.flow_control);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w.iter().any(|m| m.contains("ssl.ca_chain")));
        assert!(w.iter().any(|m| m.contains("limits.buffer_size")));
    }
}
