//! File-name extension → Content-Type, for Dir routes.
//!
//! The built-in table is our own (modern registered types, e.g. `.js` → `text/javascript`);
//! the config's `mimetypes` add to it or replace entries, unlike mongrel2, whose `mimetypes`
//! deleted the built-ins (bug #15).

use std::collections::{BTreeMap, HashMap};

/// Types without a charset parameter, as mongrel2 sends them: a file's encoding is unknown.
const BUILT_IN: &[(&str, &str)] = &[
    // Documents and web text.
    (".html", "text/html"),
    (".htm", "text/html"),
    (".xhtml", "application/xhtml+xml"),
    (".css", "text/css"),
    (".js", "text/javascript"),
    (".mjs", "text/javascript"),
    (".cjs", "text/javascript"),
    (".json", "application/json"),
    (".map", "application/json"),
    (".jsonld", "application/ld+json"),
    (".geojson", "application/geo+json"),
    (".webmanifest", "application/manifest+json"),
    (".xml", "application/xml"),
    (".xsl", "application/xslt+xml"),
    (".xslt", "application/xslt+xml"),
    (".dtd", "application/xml-dtd"),
    (".rss", "application/rss+xml"),
    (".atom", "application/atom+xml"),
    (".txt", "text/plain"),
    (".text", "text/plain"),
    (".csv", "text/csv"),
    (".tsv", "text/tab-separated-values"),
    (".md", "text/markdown"),
    (".markdown", "text/markdown"),
    (".vtt", "text/vtt"),
    (".ics", "text/calendar"),
    (".vcf", "text/vcard"),
    (".rtf", "application/rtf"),
    (".pdf", "application/pdf"),
    (".ps", "application/postscript"),
    (".eps", "application/postscript"),
    (".epub", "application/epub+zip"),
    // Images.
    (".svg", "image/svg+xml"),
    (".png", "image/png"),
    (".apng", "image/apng"),
    (".jpg", "image/jpeg"),
    (".jpeg", "image/jpeg"),
    (".gif", "image/gif"),
    (".webp", "image/webp"),
    (".avif", "image/avif"),
    (".jxl", "image/jxl"),
    (".heic", "image/heic"),
    (".ico", "image/vnd.microsoft.icon"),
    (".bmp", "image/bmp"),
    (".tif", "image/tiff"),
    (".tiff", "image/tiff"),
    // Fonts.
    (".woff", "font/woff"),
    (".woff2", "font/woff2"),
    (".ttf", "font/ttf"),
    (".otf", "font/otf"),
    (".eot", "application/vnd.ms-fontobject"),
    // Audio.
    (".mp3", "audio/mpeg"),
    (".ogg", "audio/ogg"),
    (".oga", "audio/ogg"),
    (".opus", "audio/ogg"),
    (".wav", "audio/wav"),
    (".flac", "audio/flac"),
    (".aac", "audio/aac"),
    (".m4a", "audio/mp4"),
    (".weba", "audio/webm"),
    (".mid", "audio/midi"),
    (".midi", "audio/midi"),
    // Video.
    (".mp4", "video/mp4"),
    (".m4v", "video/mp4"),
    (".webm", "video/webm"),
    (".ogv", "video/ogg"),
    (".mov", "video/quicktime"),
    (".avi", "video/x-msvideo"),
    (".mkv", "video/x-matroska"),
    (".mpeg", "video/mpeg"),
    (".mpg", "video/mpeg"),
    (".3gp", "video/3gpp"),
    (".m3u8", "application/vnd.apple.mpegurl"),
    // Office formats.
    (".doc", "application/msword"),
    (
        ".docx",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ),
    (".xls", "application/vnd.ms-excel"),
    (
        ".xlsx",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ),
    (".ppt", "application/vnd.ms-powerpoint"),
    (
        ".pptx",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ),
    (".odt", "application/vnd.oasis.opendocument.text"),
    (".ods", "application/vnd.oasis.opendocument.spreadsheet"),
    (".odp", "application/vnd.oasis.opendocument.presentation"),
    // Archives, packages and binaries.
    (".zip", "application/zip"),
    (".gz", "application/gzip"),
    (".tgz", "application/gzip"),
    (".tar", "application/x-tar"),
    (".bz2", "application/x-bzip2"),
    (".xz", "application/x-xz"),
    (".zst", "application/zstd"),
    (".7z", "application/x-7z-compressed"),
    (".rar", "application/vnd.rar"),
    (".jar", "application/java-archive"),
    (".apk", "application/vnd.android.package-archive"),
    (".deb", "application/vnd.debian.binary-package"),
    (".rpm", "application/x-rpm"),
    (".dmg", "application/x-apple-diskimage"),
    (".iso", "application/x-iso9660-image"),
    (".torrent", "application/x-bittorrent"),
    (".wasm", "application/wasm"),
    (".exe", "application/octet-stream"),
    (".msi", "application/octet-stream"),
    (".bin", "application/octet-stream"),
    // Source and configuration: plain text so that browsers show them rather than run or
    // download them.
    (".sh", "text/plain"),
    (".py", "text/plain"),
    (".rb", "text/plain"),
    (".pl", "text/plain"),
    (".c", "text/plain"),
    (".h", "text/plain"),
    (".cc", "text/plain"),
    (".cpp", "text/plain"),
    (".hpp", "text/plain"),
    (".rs", "text/plain"),
    (".go", "text/plain"),
    (".java", "text/plain"),
    (".diff", "text/plain"),
    (".patch", "text/plain"),
    (".ini", "text/plain"),
    (".conf", "text/plain"),
    (".cfg", "text/plain"),
    (".log", "text/plain"),
    (".yaml", "application/yaml"),
    (".yml", "application/yaml"),
    (".toml", "application/toml"),
];

/// Extension table keyed by the lower-cased suffix, leading dot included.
#[derive(Debug, Clone)]
pub struct MimeTypes {
    types: HashMap<Vec<u8>, String>,
}

impl MimeTypes {
    /// The built-in table plus `overrides` (keys like `".txt"`; a missing dot is added).
    /// Overrides whose type is empty or holds control characters are skipped with a warning,
    /// as they would break the response head.
    pub fn new(overrides: &BTreeMap<String, String>) -> MimeTypes {
        let mut types: HashMap<Vec<u8>, String> = BUILT_IN
            .iter()
            .map(|&(ext, ctype)| (ext.as_bytes().to_vec(), ctype.to_string()))
            .collect();
        for (ext, ctype) in overrides {
            let ext = ext.trim().to_ascii_lowercase();
            let ctype = ctype.trim();
            if ext.is_empty()
                || ext == "."
                || ctype.is_empty()
                || ctype.chars().any(char::is_control)
            {
                tracing::warn!(ext = %ext, ctype = %ctype, "mimetypes: entry ignored");
                continue;
            }
            let key = if ext.starts_with('.') {
                ext
            } else {
                format!(".{ext}")
            };
            types.insert(key.into_bytes(), ctype.to_string());
        }
        MimeTypes { types }
    }

    /// The type of the longest known extension suffix of the name's last component,
    /// compared case-insensitively, so that `.tar.gz` can beat `.gz` and `UP.TXT` is text.
    pub fn lookup(&self, file_name: &[u8]) -> Option<&str> {
        let start = file_name
            .iter()
            .rposition(|&b| b == b'/')
            .map_or(0, |slash| slash + 1);
        let name = file_name[start..].to_ascii_lowercase();
        // The earliest dot gives the longest suffix.
        name.iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'.')
            .find_map(|(i, _)| self.types.get(&name[i..]))
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin() -> MimeTypes {
        MimeTypes::new(&BTreeMap::new())
    }

    #[test]
    fn common_types() {
        let m = builtin();
        assert_eq!(m.lookup(b"index.html"), Some("text/html"));
        assert_eq!(m.lookup(b"app.js"), Some("text/javascript"));
        assert_eq!(m.lookup(b"font.otf"), Some("font/otf"));
        assert_eq!(m.lookup(b"a.woff2"), Some("font/woff2"));
        assert_eq!(m.lookup(b"pic.jpeg"), Some("image/jpeg"));
        assert_eq!(m.lookup(b"mod.wasm"), Some("application/wasm"));
        assert!(BUILT_IN.len() >= 90);
    }

    #[test]
    fn case_insensitive() {
        let m = builtin();
        assert_eq!(m.lookup(b"UP.TXT"), Some("text/plain"));
        assert_eq!(m.lookup(b"Photo.JpG"), Some("image/jpeg"));
    }

    #[test]
    fn unknown_or_no_extension() {
        let m = builtin();
        assert_eq!(m.lookup(b"README"), None);
        assert_eq!(m.lookup(b"file.unknownext"), None);
        assert_eq!(m.lookup(b"trailingdot."), None);
        assert_eq!(m.lookup(b""), None);
        assert_eq!(m.lookup(b"\xff\xfe.bin"), Some("application/octet-stream"));
    }

    #[test]
    fn only_the_last_component_counts() {
        let m = builtin();
        assert_eq!(m.lookup(b"/srv/site.html/README"), None);
        assert_eq!(m.lookup(b"/srv/dir.d/a.css"), Some("text/css"));
    }

    #[test]
    fn longest_suffix_wins() {
        let mut o = BTreeMap::new();
        o.insert(".tar.gz".to_string(), "application/x-gtar".to_string());
        let m = MimeTypes::new(&o);
        assert_eq!(m.lookup(b"dist.tar.gz"), Some("application/x-gtar"));
        assert_eq!(m.lookup(b"DIST.TAR.GZ"), Some("application/x-gtar"));
        assert_eq!(m.lookup(b"data.gz"), Some("application/gzip"));
        assert_eq!(m.lookup(b"a.b.gz"), Some("application/gzip"));
    }

    #[test]
    fn overrides_add_and_replace() {
        let mut o = BTreeMap::new();
        o.insert(".JS".to_string(), "application/x-javascript".to_string());
        o.insert("foo".to_string(), "application/x-foo".to_string());
        o.insert(".bad".to_string(), "text/plain\r\nX-Evil: 1".to_string());
        o.insert(".empty".to_string(), " ".to_string());
        let m = MimeTypes::new(&o);
        assert_eq!(m.lookup(b"a.js"), Some("application/x-javascript"));
        assert_eq!(m.lookup(b"a.foo"), Some("application/x-foo"));
        assert_eq!(m.lookup(b"a.bad"), None);
        assert_eq!(m.lookup(b"a.empty"), None);
        assert_eq!(m.lookup(b"a.css"), Some("text/css"));
    }

    #[test]
    fn table_is_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for &(ext, ctype) in BUILT_IN {
            assert!(ext.starts_with('.') && ext.len() > 1, "{ext}");
            assert_eq!(ext, ext.to_ascii_lowercase(), "{ext}");
            assert!(ctype.contains('/'), "{ctype}");
            assert!(seen.insert(ext), "duplicate {ext}");
        }
    }
}
