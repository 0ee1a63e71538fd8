//! mongrel2's pattern language: Lua's matcher without captures, with `\` as the escape
//! character (`src/pattern.c`).
//!
//! Patterns come from the admin but inputs from clients, and the matcher backtracks, so a
//! pattern like `.*.*.*x` costs polynomial time in the input length. Every match therefore
//! runs on a step budget and reports `None` when it runs out; the caller treats that as no
//! match. Patterns are validated once with [`check`], so matching never meets a malformed one
//! (and if it did, it would answer "no match", never panic).

/// Steps (pattern items tried, input bytes scanned) one match may spend: about a millisecond
/// at most, and several times what a sane route needs on a path of a few KiB.
const STEP_BUDGET: usize = 100_000;

/// Nesting of the backtracking recursion; each level consumes a quantified pattern item, so
/// only absurd patterns get near it, and it keeps the stack bounded for those.
const MAX_DEPTH: usize = 256;

/// Whether `pattern` matches a prefix of `input` (anchored at the start only; a trailing `$`
/// anchors the end). `None`: the step budget ran out before an answer.
pub fn matches(pattern: &[u8], input: &[u8]) -> Option<bool> {
    let mut matcher = Matcher {
        pat: pattern,
        src: input,
        steps: 0,
    };
    matcher.match_at(0, 0, 0).ok().map(|end| end.is_some())
}

/// Rejects what Lua would raise an error on (and mongrel2 reads out of bounds on): a trailing
/// `\`, an unclosed `[`, `\b` without its two characters, `\f` without a `[set]`.
pub fn check(pattern: &[u8]) -> Result<(), String> {
    let mut p = 0;
    while let Some(&c) = pattern.get(p) {
        let next = pattern.get(p + 1).copied();
        p = match (c, next) {
            (b'(' | b')', _) => p + 1,
            (b'\\', Some(b'b')) => {
                if pattern.len() < p + 4 {
                    return Err(format!("\\b at byte {p} needs two characters"));
                }
                p + 4
            }
            (b'\\', Some(b'f')) => {
                if pattern.get(p + 2) != Some(&b'[') {
                    return Err(format!("\\f at byte {p} must be followed by a [set]"));
                }
                class_end(pattern, p + 2).ok_or_else(|| malformed(pattern, p + 2))?
            }
            _ => {
                let ep = class_end(pattern, p).ok_or_else(|| malformed(pattern, p))?;
                match pattern.get(ep) {
                    Some(b'?' | b'*' | b'+' | b'-') => ep + 1,
                    _ => ep,
                }
            }
        };
    }
    Ok(())
}

fn malformed(pattern: &[u8], p: usize) -> String {
    if pattern.get(p) == Some(&b'\\') {
        format!("pattern ends with '\\' (byte {p})")
    } else {
        format!("'[' at byte {p} is never closed")
    }
}

/// The budget ran out.
struct Exhausted;

struct Matcher<'a> {
    pat: &'a [u8],
    src: &'a [u8],
    steps: usize,
}

impl Matcher<'_> {
    fn spend(&mut self, n: usize) -> Result<(), Exhausted> {
        self.steps = self.steps.saturating_add(n);
        if self.steps > STEP_BUDGET {
            Err(Exhausted)
        } else {
            Ok(())
        }
    }

    /// Lua's `match`: where in the input a match of `pat[p..]` starting at `s` ends.
    /// Invariant: `s <= src.len()` and `p <= pat.len()`.
    fn match_at(
        &mut self,
        mut s: usize,
        mut p: usize,
        depth: usize,
    ) -> Result<Option<usize>, Exhausted> {
        if depth > MAX_DEPTH {
            return Err(Exhausted);
        }
        let pat = self.pat;
        loop {
            self.spend(1)?;
            let Some(&c) = pat.get(p) else {
                return Ok(Some(s));
            };
            match (c, pat.get(p + 1).copied()) {
                (b'(' | b')', _) => p += 1,
                (b'$', None) => return Ok((s == self.src.len()).then_some(s)),
                (b'\\', Some(b'b')) => match self.balance(s, p + 2)? {
                    Some(end) => {
                        s = end;
                        p += 4;
                    }
                    None => return Ok(None),
                },
                (b'\\', Some(b'f')) => {
                    p += 2;
                    if pat.get(p) != Some(&b'[') {
                        return Ok(None);
                    }
                    let Some(ep) = class_end(pat, p) else {
                        return Ok(None);
                    };
                    let set = &pat[p..ep];
                    let previous = if s == 0 { 0 } else { self.src[s - 1] };
                    let current = self.src.get(s).copied().unwrap_or(0);
                    if in_set(previous, set) || !in_set(current, set) {
                        return Ok(None);
                    }
                    p = ep;
                }
                _ => {
                    let Some(ep) = class_end(pat, p) else {
                        return Ok(None);
                    };
                    let item = &pat[p..ep];
                    let m = self.src.get(s).is_some_and(|&b| single_match(b, item));
                    match pat.get(ep) {
                        Some(b'?') => {
                            if m {
                                if let Some(end) = self.match_at(s + 1, ep + 1, depth + 1)? {
                                    return Ok(Some(end));
                                }
                            }
                            p = ep + 1;
                        }
                        Some(b'*') => return self.max_expand(s, item, ep + 1, depth),
                        Some(b'+') if m => return self.max_expand(s + 1, item, ep + 1, depth),
                        Some(b'+') => return Ok(None),
                        Some(b'-') => return self.min_expand(s, item, ep + 1, depth),
                        _ if m => {
                            s += 1;
                            p = ep;
                        }
                        _ => return Ok(None),
                    }
                }
            }
        }
    }

    /// Greedy repetition of `item` from `s`, then the rest of the pattern from `p`.
    fn max_expand(
        &mut self,
        s: usize,
        item: &[u8],
        p: usize,
        depth: usize,
    ) -> Result<Option<usize>, Exhausted> {
        let src = self.src;
        let rest = src.get(s..).unwrap_or_default();
        let n = rest.iter().take_while(|&&b| single_match(b, item)).count();
        self.spend(n)?;
        for i in (0..=n).rev() {
            if let Some(end) = self.match_at(s + i, p, depth + 1)? {
                return Ok(Some(end));
            }
        }
        Ok(None)
    }

    /// Lazy repetition of `item` from `s`, then the rest of the pattern from `p`.
    fn min_expand(
        &mut self,
        mut s: usize,
        item: &[u8],
        p: usize,
        depth: usize,
    ) -> Result<Option<usize>, Exhausted> {
        loop {
            if let Some(end) = self.match_at(s, p, depth + 1)? {
                return Ok(Some(end));
            }
            match self.src.get(s) {
                Some(&b) if single_match(b, item) => s += 1,
                _ => return Ok(None),
            }
        }
    }

    /// `\bxy` with `x y` at `pat[p..p + 2]`: where the balanced run starting at `s` ends.
    fn balance(&mut self, s: usize, p: usize) -> Result<Option<usize>, Exhausted> {
        let src = self.src;
        let (Some(&open), Some(&close)) = (self.pat.get(p), self.pat.get(p + 1)) else {
            return Ok(None);
        };
        if src.get(s) != Some(&open) {
            return Ok(None);
        }
        let mut depth = 1usize;
        for (i, &b) in src.iter().enumerate().skip(s + 1) {
            if b == close {
                depth -= 1;
                if depth == 0 {
                    self.spend(i - s)?;
                    return Ok(Some(i + 1));
                }
            } else if b == open {
                depth += 1;
            }
        }
        self.spend(src.len() - s)?;
        Ok(None)
    }
}

/// Lua's `classEnd`: the index just past the single item starting at `p`; `None` when the
/// item is malformed (trailing `\`, unclosed `[`). As in Lua, the first byte of a set is a
/// member even if it is `]` (`[]]`, `[^]]`).
fn class_end(pat: &[u8], p: usize) -> Option<usize> {
    match *pat.get(p)? {
        b'\\' => {
            pat.get(p + 1)?;
            Some(p + 2)
        }
        b'[' => {
            let mut q = p + 1;
            if pat.get(q) == Some(&b'^') {
                q += 1;
            }
            loop {
                let c = *pat.get(q)?;
                q += 1;
                if c == b'\\' && q < pat.len() {
                    q += 1;
                }
                if *pat.get(q)? == b']' {
                    return Some(q + 1);
                }
            }
        }
        _ => Some(p + 1),
    }
}

/// Whether input byte `c` matches one item (`.`, `\x`, `[set]` or a literal byte).
fn single_match(c: u8, item: &[u8]) -> bool {
    match item {
        [b'.'] => true,
        [b'\\', class] => class_match(c, *class),
        [b'[', ..] => in_set(c, item),
        [literal] => *literal == c,
        _ => false,
    }
}

/// `\a`-style classes in the C locale (bytes >= 0x80 are in no class); an upper-case letter
/// negates; any other byte stands for itself.
fn class_match(c: u8, class: u8) -> bool {
    let res = match class.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        // C's isspace also counts the vertical tab, Rust's is_ascii_whitespace does not.
        b's' => c.is_ascii_whitespace() || c == 0x0b,
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        b'z' => c == 0,
        _ => return class == c,
    };
    res == class.is_ascii_lowercase()
}

/// Lua's `matchbracketclass`; `set` is the whole `[...]`, brackets included.
fn in_set(c: u8, set: &[u8]) -> bool {
    let end = set.len().saturating_sub(1);
    let (mut i, found) = if set.get(1) == Some(&b'^') {
        (2, false)
    } else {
        (1, true)
    };
    while i < end {
        let b = set[i];
        if b == b'\\' {
            i += 1;
            if set.get(i).is_some_and(|&class| class_match(c, class)) {
                return found;
            }
        } else if set.get(i + 1) == Some(&b'-') && i + 2 < end {
            if b <= c && c <= set[i + 2] {
                return found;
            }
            i += 2;
        } else if b == c {
            return found;
        }
        i += 1;
    }
    !found
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(pattern: &str, input: &[u8]) -> bool {
        check(pattern.as_bytes()).expect("test pattern is well-formed");
        matches(pattern.as_bytes(), input).expect("within budget")
    }

    #[test]
    fn any_byte() {
        assert!(m(".", b"x"));
        assert!(m(".", b"\xff"));
        assert!(m(".", b"\0"));
        assert!(!m(".", b""));
        assert!(m("..", b"ab"));
        assert!(!m("..", b"a"));
    }

    #[test]
    fn anchored_at_start_only() {
        assert!(!m("b", b"ab"));
        assert!(m("a", b"abc"));
        assert!(m("", b"anything"));
        assert!(m("", b""));
    }

    #[test]
    fn classes() {
        let cases: &[(&str, &[u8], &[u8])] = &[
            ("\\a", b"aZ", b"1_ \xe9"),
            ("\\c", b"\0\x1f\x7f\n", b"a \x80"),
            ("\\d", b"09", b"a/:"),
            ("\\l", b"az", b"AZ1"),
            ("\\p", b"!/:@[`{~", b"a0 \x7f"),
            ("\\s", b" \t\n\x0b\x0c\r", b"a\0"),
            ("\\u", b"AZ", b"az1"),
            ("\\w", b"a0Z", b"_ -"),
            ("\\x", b"09afAF", b"gG"),
            ("\\z", b"\0", b"0a"),
        ];
        for &(class, yes, no) in cases {
            let negated = class.to_ascii_uppercase();
            for &b in yes {
                assert!(m(class, &[b]), "{class} should match {b:#x}");
                assert!(!m(&negated, &[b]), "{negated} should not match {b:#x}");
            }
            for &b in no {
                assert!(!m(class, &[b]), "{class} should not match {b:#x}");
                assert!(m(&negated, &[b]), "{negated} should match {b:#x}");
            }
            assert!(!m(class, b""));
            assert!(!m(&negated, b""));
        }
    }

    #[test]
    fn escaped_literals() {
        assert!(m("\\.", b"."));
        assert!(!m("\\.", b"x"));
        assert!(m("\\\\", b"\\"));
        assert!(m("\\(x\\)", b"(x)"));
        assert!(m("\\$", b"$"));
        assert!(m("\\*", b"*"));
        assert!(m("a\\-", b"a-"));
        assert!(m("\\1", b"1"));
    }

    #[test]
    fn sets() {
        assert!(m("[abc]", b"b"));
        assert!(!m("[abc]", b"d"));
        assert!(m("[^abc]", b"d"));
        assert!(!m("[^abc]", b"a"));
        assert!(!m("[^abc]", b""));
        assert!(m("[a-z]", b"q"));
        assert!(!m("[a-z]", b"Q"));
        assert!(m("[0-9A-F]+$", b"09AF"));
        assert!(m("[\\d_]", b"_"));
        assert!(m("[\\d_]", b"7"));
        assert!(!m("[\\d_]", b"a"));
        assert!(m("[^\\d]", b"a"));
        assert!(m("[a-]", b"-"));
        assert!(!m("[a-]", b"b"));
        assert!(m("[]]", b"]"));
        assert!(m("[^]]", b"a"));
        assert!(!m("[^]]", b"]"));
        assert!(m("[\\]]", b"]"));
        assert!(m("[.]", b"."));
        assert!(!m("[.]", b"x"));
    }

    #[test]
    fn quantifiers() {
        assert!(m("a*b", b"b"));
        assert!(m("a*b", b"aaab"));
        assert!(!m("a*b", b"aaac"));
        assert!(m("a*$", b"aaa"));
        assert!(m("a+b", b"aab"));
        assert!(!m("a+b", b"b"));
        assert!(!m("a+", b""));
        assert!(m("a-b", b"aab"));
        assert!(m("a-", b""));
        assert!(m(".-x$", b"axbx"));
        assert!(!m(".-x$", b"axb"));
        assert!(m("ab?c", b"ac"));
        assert!(m("ab?c", b"abc"));
        assert!(!m("ab?c", b"abbc"));
        assert!(m("[ab]*c", b"abbac"));
        assert!(m("\\d+\\.\\d+$", b"12.5"));
    }

    #[test]
    fn dollar_only_at_the_end() {
        assert!(m("a$", b"a"));
        assert!(!m("a$", b"ab"));
        assert!(m("$", b""));
        assert!(!m("$", b"x"));
        assert!(m("a$b", b"a$b"));
        assert!(!m("a$b", b"ab"));
        assert!(m("$$", b"$"));
        assert!(m("$)", b"$"));
    }

    #[test]
    fn parentheses_are_skipped() {
        assert!(m("(a)(b)", b"ab"));
        assert!(m("()$", b""));
        assert!(!m("()$", b"x"));
        // A quantifier after `)` is a literal: parentheses cannot group.
        assert!(m("(ab)*", b"ab*"));
        assert!(!m("(ab)*", b"abab"));
    }

    #[test]
    fn caret_is_literal() {
        assert!(m("^a", b"^a"));
        assert!(!m("^a", b"a"));
    }

    #[test]
    fn balanced() {
        assert!(m("\\b{}", b"{a{b}c}d"));
        assert!(m("\\b{}$", b"{a{b}c}"));
        assert!(!m("\\b{}$", b"{a{b}c}d"));
        assert!(!m("\\b{}", b"{a{b}"));
        assert!(!m("\\b{}", b"a{}"));
        assert!(!m("\\b{}", b""));
        assert!(m("\\b()x", b"(a(b))x"));
        assert!(m(".-\\b<>$", b"ab<c<d>>"));
    }

    #[test]
    fn frontier() {
        assert!(m("\\f[\\a]abc", b"abc"));
        assert!(m(".-\\f[\\d]\\d+$", b"ab12"));
        assert!(!m(".-\\f[\\d]\\d+$", b"ab"));
        assert!(!m("a\\f[\\a]", b"ab"));
        // At the end of the input the next byte counts as NUL, as in Lua 5.1.
        assert!(m("a\\f[\\z]", b"a"));
        assert!(!m("a\\f[\\z]", b"ab"));
    }

    #[test]
    fn reference_examples() {
        assert!(m("(.*).json", b"x.json"));
        assert!(m("(.*).json", b"x.jsonX"));
        assert!(!m("(.*).json", b"x.txt"));
        assert!(m("(\\d+)$", b"123"));
        assert!(!m("(\\d+)$", b"123a"));
        assert!(m("(\\a+)", b"abc1"));
        assert!(!m("(\\a+)", b"1abc"));
        assert!(m("(.*.jpg)", b"a.jpg"));
    }

    #[test]
    fn check_accepts_well_formed() {
        for p in [
            "",
            "abc",
            "(.*).json",
            "(\\d+)$",
            "[a-z]*",
            "[^]]",
            "[\\]]",
            "\\b()",
            "\\f[a]x",
            "\\\\",
            "a$b",
            "(",
            ")",
        ] {
            assert_eq!(check(p.as_bytes()), Ok(()), "{p}");
        }
    }

    #[test]
    fn check_rejects_malformed() {
        for p in [
            "[abc", "a\\", "\\", "\\ba", "\\b", "\\fa", "\\f", "\\f[a", "[a\\]", "[^]", "[", "x[^",
            "[a]*\\",
        ] {
            assert!(check(p.as_bytes()).is_err(), "{p}");
        }
    }

    #[test]
    fn linear_work_fits_the_budget() {
        let input = vec![b'a'; 4000];
        assert_eq!(matches(b"(.*)x", &input), Some(false));
        assert_eq!(matches(b"(.*)a$", &input), Some(true));
        assert_eq!(matches(b"(.-)b", &input), Some(false));
    }

    #[test]
    fn pathological_pattern_gives_up() {
        let input = vec![b'a'; 4000];
        let started = std::time::Instant::now();
        assert_eq!(matches(b"(.*.*.*.*.*.*x)", &input), None);
        assert_eq!(matches(b"(.-.-.-.-.-.-x)", &input), None);
        // Generous bound: only catches a budget that does not bite at all.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn deep_recursion_gives_up() {
        // Each `a?` that matches nests one level deeper.
        let pattern = "a?".repeat(1000);
        let input = vec![b'a'; 1000];
        assert_eq!(matches(pattern.as_bytes(), &input), None);
        assert_eq!(matches(pattern.as_bytes(), b"b"), Some(true));
    }

    proptest! {
        #[test]
        fn literal_patterns_match_exactly_their_prefixes(
            lit in "[a-zA-Z0-9]{0,8}",
            input in "[a-zA-Z0-9]{0,12}",
            tail in "[a-zA-Z0-9]{0,4}",
        ) {
            prop_assert_eq!(
                matches(lit.as_bytes(), input.as_bytes()),
                Some(input.starts_with(&lit))
            );
            let extended = format!("{lit}{tail}");
            prop_assert_eq!(matches(lit.as_bytes(), extended.as_bytes()), Some(true));
        }

        #[test]
        fn arbitrary_patterns_never_panic(
            pattern in proptest::collection::vec(any::<u8>(), 0..16),
            input in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let _ = check(&pattern);
            let _ = matches(&pattern, &input);
        }
    }
}
