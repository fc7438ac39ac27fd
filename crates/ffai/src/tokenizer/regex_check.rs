//! A structural check of the regexes a tokenizer.json hands to Oniguruma (Split
//! pre-tokenizers, Replace normalizers), run before the `tokenizers` crate compiles them.
//!
//! Oniguruma backtracks. A pattern with a repeated group that itself repeats or
//! alternates (`(a+)+`, `(a|aa)*`, `(a?){30}`) can take exponential time on a short
//! input, and every request runs the pattern. Real tokenizer regexes never repeat such a
//! group: they are alternations of simple pieces (`\s+(?!\S)`, `\p{N}{1,3}`, the
//! optional `(?i:'s|'t|...)?`). So the rule is the classic "star height one" test: a group
//! repeated more than once may not contain a quantifier or a `|`. Backreferences,
//! subexpression calls, conditionals and absence operators are refused outright, and
//! counted repetitions are bounded.
//!
//! The scan follows Oniguruma's syntax closely enough to find every group, class and
//! quantifier; where the two could disagree (`[]...]`), the pattern is refused.

use super::limits::{MAX_PATTERN_BYTES, MAX_REGEX_REPEAT};
use crate::error::{Error, Result};

#[derive(Clone, Copy, PartialEq)]
struct Frame {
    /// Some quantifier occurs inside (at any depth).
    has_quant: bool,
    /// Some `|` occurs inside (at any depth).
    has_alt: bool,
    /// A lookaround: matches no characters whatever it contains.
    zero_width: bool,
    /// Some finished `|` branch can match the empty string.
    alt_empty: bool,
    /// Every element of the current branch so far can match the empty string.
    branch_empty: bool,
    /// `branch_empty` before the last element, for a quantifier that makes it optional.
    before_last: bool,
}

impl Frame {
    fn new(zero_width: bool) -> Frame {
        Frame {
            has_quant: false,
            has_alt: false,
            zero_width,
            alt_empty: false,
            branch_empty: true,
            before_last: true,
        }
    }

    /// Appends an element that can (or cannot) match the empty string.
    fn push(&mut self, empty: bool) {
        self.before_last = self.branch_empty;
        self.branch_empty &= empty;
    }

    /// Whether the whole group can match the empty string.
    fn can_be_empty(&self) -> bool {
        self.zero_width || self.alt_empty || self.branch_empty
    }
}

/// `Ok` if `re` is short, free of the constructs that make backtracking blow up, and
/// cannot match the empty string (the crate would split or replace at every position,
/// inside multi-byte characters too, and its offset bookkeeping then panics).
pub(crate) fn check_regex(field: &str, re: &str) -> Result<()> {
    super::limits::check_len(field, re, MAX_PATTERN_BYTES)?;
    scan(re).map_err(|why| Error::new(format!("{field}: regex {}: {why}", short(re))))
}

/// The pattern quoted, cut to a readable length.
fn short(re: &str) -> String {
    const MAX_CHARS: usize = 60;
    if re.chars().count() <= MAX_CHARS {
        format!("{re:?}")
    } else {
        let head: String = re.chars().take(MAX_CHARS).collect();
        format!("{head:?}...")
    }
}

/// What the last atom was, for the quantifier that may follow it.
#[derive(Clone, Copy, PartialEq)]
enum Last {
    /// Nothing to quantify (start of a group, after `|`).
    Nothing,
    /// A single character, class or escape.
    Atom,
    /// A group that just closed, with what it contains.
    Group(Frame),
    /// An atom that already carries a quantifier.
    Quantified,
}

fn scan(re: &str) -> std::result::Result<(), String> {
    let b = re.as_bytes();
    let mut stack: Vec<Frame> = vec![Frame::new(false)];
    let mut last = Last::Nothing;
    let mut i = 0;
    while i < b.len() {
        let frame = stack.last_mut().expect("the root frame stays");
        match b[i] {
            b'\\' => {
                let (next, empty) = escape(b, i)?;
                frame.push(empty);
                last = Last::Atom;
                i = next;
            }
            b'[' => {
                i = class_end(b, i)?;
                frame.push(false);
                last = Last::Atom;
            }
            b'(' => match group_open(b, i)? {
                GroupOpen::Group(next, zero_width) => {
                    stack.push(Frame::new(zero_width));
                    last = Last::Nothing;
                    i = next;
                }
                // `(?i)`, `(?#...)`: no group, nothing to quantify.
                GroupOpen::Skip(next) => i = next,
            },
            b')' => {
                if stack.len() < 2 {
                    return Err("unbalanced ')'".into());
                }
                let inner = stack.pop().expect("checked above");
                let parent = stack.last_mut().expect("the root frame stays");
                parent.has_quant |= inner.has_quant;
                parent.has_alt |= inner.has_alt;
                parent.push(inner.can_be_empty());
                last = Last::Group(inner);
                i += 1;
            }
            b'|' => {
                frame.has_alt = true;
                frame.alt_empty |= frame.branch_empty;
                frame.branch_empty = true;
                frame.before_last = true;
                last = Last::Nothing;
                i += 1;
            }
            b'*' | b'+' | b'?' | b'{' => {
                let Some((min, max, next)) = quantifier(b, i)? else {
                    // A `{` that does not start an interval is a literal.
                    frame.push(false);
                    last = Last::Atom;
                    i += 1;
                    continue;
                };
                match last {
                    Last::Nothing => return Err(format!("quantifier at byte {i} has nothing to repeat")),
                    Last::Quantified => return Err(format!("quantifier at byte {i} repeats a repetition")),
                    Last::Group(inner) if max > 1 && (inner.has_quant || inner.has_alt) => {
                        return Err(format!(
                        "the group repeated at byte {i} contains a {}; nested repetition can backtrack exponentially",
                        if inner.has_quant { "quantifier" } else { "'|'" }
                    ))
                    }
                    _ => {}
                }
                frame.has_quant = true;
                if min == 0 {
                    // The last element may now match nothing.
                    frame.branch_empty = frame.before_last;
                }
                last = Last::Quantified;
                i = next;
            }
            // Anchors match no characters.
            b'^' | b'$' => {
                frame.push(true);
                last = Last::Atom;
                i += 1;
            }
            _ => {
                frame.push(false);
                last = Last::Atom;
                i += 1;
            }
        }
    }
    if stack.len() != 1 {
        return Err("unclosed '('".into());
    }
    if stack[0].can_be_empty() {
        return Err("can match the empty string".into());
    }
    Ok(())
}

/// The end of the escape starting at `b[i] == '\\'`, and whether it can match nothing
/// (the zero-width assertions).
fn escape(b: &[u8], i: usize) -> std::result::Result<(usize, bool), String> {
    let Some(&e) = b.get(i + 1) else {
        return Err("ends in a lone backslash".into());
    };
    match e {
        b'1'..=b'9' | b'k' => Err(format!("backreference at byte {i}")),
        b'g' => Err(format!("subexpression call at byte {i}")),
        // `\p{L}`, `\x{263a}`: skip the braces so `{` is not read as an interval.
        b'p' | b'P' | b'x' | b'o' if b.get(i + 2) == Some(&b'{') => match b[i + 3..].iter().position(|&c| c == b'}') {
            Some(p) => Ok((i + 3 + p + 1, false)),
            None => Err(format!("unclosed '{{' after \\{} at byte {i}", e as char)),
        },
        // Word and text boundaries, the search start, "keep": zero width.
        b'b' | b'B' | b'A' | b'z' | b'Z' | b'G' | b'K' | b'y' | b'Y' => Ok((i + 2, true)),
        // Any other escape stands for one character, class or sequence; a multi-byte
        // character after the backslash is skipped whole.
        _ => Ok((i + 1 + utf8_len(e), false)),
    }
}

fn utf8_len(lead: u8) -> usize {
    match lead {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

/// The end of the character class starting at `b[i] == '['` (classes nest in Oniguruma:
/// `[\p{L}&&[^\p{Han}]]`, `[[:alpha:]]`).
fn class_end(b: &[u8], i: usize) -> std::result::Result<usize, String> {
    let mut depth = 0usize;
    let mut j = i;
    while j < b.len() {
        match b[j] {
            b'\\' => {
                j += 1 + b.get(j + 1).map_or(1, |&e| utf8_len(e));
                continue;
            }
            b'[' => {
                depth += 1;
                // Oniguruma reads a `]` right after `[` or `[^` as a literal or as an empty
                // class depending on what follows; refuse rather than guess.
                let mut k = j + 1;
                if b.get(k) == Some(&b'^') {
                    k += 1;
                }
                if b.get(k) == Some(&b']') {
                    return Err(format!("']' right after '[' at byte {j}"));
                }
            }
            b']' => {
                depth -= 1;
                if depth == 0 {
                    return Ok(j + 1);
                }
            }
            _ => {}
        }
        j += 1;
    }
    Err(format!("unclosed '[' at byte {i}"))
}

enum GroupOpen {
    /// A group starts; its contents begin at this index. The flag marks lookarounds.
    Group(usize, bool),
    /// An inline option or comment, fully consumed up to this index.
    Skip(usize),
}

fn group_open(b: &[u8], i: usize) -> std::result::Result<GroupOpen, String> {
    let group = |next| GroupOpen::Group(next, false);
    if b.get(i + 1) != Some(&b'?') {
        return Ok(group(i + 1));
    }
    let k = i + 2;
    match b.get(k) {
        Some(b':' | b'>') => Ok(group(k + 1)),
        Some(b'=' | b'!') => Ok(GroupOpen::Group(k + 1, true)),
        Some(b'<') => match b.get(k + 1) {
            Some(b'=' | b'!') => Ok(GroupOpen::Group(k + 2, true)),
            // `(?<name>...)`
            _ => name_end(b, k + 1, b'>').map(group),
        },
        Some(b'\'') => name_end(b, k + 1, b'\'').map(group),
        Some(b'P') if b.get(k + 1) == Some(&b'<') => name_end(b, k + 2, b'>').map(group),
        Some(b'#') => match b[k..].iter().position(|&c| c == b')') {
            Some(p) => Ok(GroupOpen::Skip(k + p + 1)),
            None => Err(format!("unclosed comment at byte {i}")),
        },
        Some(b'(') => Err(format!("conditional at byte {i}")),
        Some(b'~') => Err(format!("absence operator at byte {i}")),
        Some(c) if c.is_ascii_alphabetic() || *c == b'-' => {
            // Options: `(?i)` applies to the rest of the group, `(?i:...)` opens one.
            let mut j = k;
            while j < b.len() && (b[j].is_ascii_alphabetic() || b[j] == b'-') {
                j += 1;
            }
            match b.get(j) {
                Some(b')') => Ok(GroupOpen::Skip(j + 1)),
                Some(b':') => Ok(group(j + 1)),
                _ => Err(format!("unsupported group syntax at byte {i}")),
            }
        }
        _ => Err(format!("unsupported group syntax at byte {i}")),
    }
}

/// After a group name starting at `start`, closed by `close`.
fn name_end(b: &[u8], start: usize, close: u8) -> std::result::Result<usize, String> {
    let mut j = start;
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
        j += 1;
    }
    if j > start && b.get(j) == Some(&close) {
        Ok(j + 1)
    } else {
        Err(format!("malformed group name at byte {start}"))
    }
}

/// The quantifier at `b[i]`: its smallest and largest repeat counts (`u32::MAX` for
/// unbounded) and where it ends, lazy `?` included. `None` for a `{` that is not an
/// interval.
fn quantifier(b: &[u8], i: usize) -> std::result::Result<Option<(u32, u32, usize)>, String> {
    let (min, max, mut next) = match b[i] {
        b'?' => (0, 1, i + 1),
        b'*' => (0, u32::MAX, i + 1),
        b'+' => (1, u32::MAX, i + 1),
        _ => {
            let Some((lo, hi, next)) = interval(b, i) else {
                return Ok(None);
            };
            for n in [lo, hi].into_iter().flatten() {
                if n > u64::from(MAX_REGEX_REPEAT) {
                    return Err(format!(
                        "repetition count {n} at byte {i} is above the limit of {MAX_REGEX_REPEAT}"
                    ));
                }
            }
            // Checked above: a bound fits in u32. No upper bound (`{n,}`) is unbounded.
            (lo.unwrap_or(0) as u32, hi.map_or(u32::MAX, |h| h as u32), next)
        }
    };
    // `*?`, `+?`, `??`, `{n,m}?` are lazy; `*+`, `++`, `?+` possessive. Both are still one
    // repetition. (`{n,m}+` is not possessive in Oniguruma syntax but a second
    // repetition; it is left for the caller to refuse.)
    if b.get(next) == Some(&b'?') || (b[i] != b'{' && b.get(next) == Some(&b'+')) {
        next += 1;
    }
    Ok(Some((min, max, next)))
}

/// `{n}`, `{n,}`, `{,m}`, `{n,m}` at `b[i]`: (n, m, index after `}`); `{n}` is (n, n)
/// and `{n,}` is (n, None).
fn interval(b: &[u8], i: usize) -> Option<(Option<u64>, Option<u64>, usize)> {
    let mut j = i + 1;
    let number = |j: &mut usize| -> Option<u64> {
        let start = *j;
        let mut n: u64 = 0;
        while *j < b.len() && b[*j].is_ascii_digit() {
            // Saturates: anything this large is refused by the caller anyway.
            n = n.saturating_mul(10).saturating_add(u64::from(b[*j] - b'0'));
            *j += 1;
        }
        (*j > start).then_some(n)
    };
    let lo = number(&mut j);
    let hi = if b.get(j) == Some(&b',') {
        j += 1;
        number(&mut j)
    } else {
        lo
    };
    if b.get(j) != Some(&b'}') || (lo.is_none() && hi.is_none()) {
        return None;
    }
    Some((lo, hi, j + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word regexes of real tokenizers (GPT-2, Llama 3 / cl100k, Qwen 2, GPT-4o
    /// o200k, DeepSeek V3, Kimi K2, BLOOM) must pass.
    #[test]
    fn real_patterns_pass() {
        for re in [
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            r"[!\x22#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}",
            r" ?[^(\s|[.,!?…。，、।۔،])]+",
            r"[0-9][0-9][0-9]",
            r"\p{N}",
            r"(?<word>\w+)(?=\s)|[[:alpha:]]+|\x{263a}{2}|a{,3}b|x{",
            r"a?b|(?:c?)d|\s*x|(?=a)a|^a|a{0,2}b{1,2}",
        ] {
            check_regex("re", re).unwrap_or_else(|e| panic!("{re}: {e}"));
        }
    }

    #[test]
    fn catastrophic_patterns_are_refused() {
        for (re, why) in [
            ("(a+)+$", "contains a quantifier"),
            ("(?:a|aa)*b", "contains a '|'"),
            ("(a?){30}a{30}", "contains a quantifier"),
            ("((ab)*c)+", "contains a quantifier"),
            ("(?:x(?:a|b)y)+", "contains a '|'"),
            ("a{1,3}+", "repeats a repetition"),
            ("a**", "repeats a repetition"),
            (r"(a)\1", "backreference"),
            (r"(?<n>a)\k<n>", "backreference"),
            (r"(?<n>a|\g<n>)", "subexpression call"),
            ("(?(1)a|b)", "conditional"),
            ("(?~abc)", "absence operator"),
            ("a{1000}", "above the limit of 256"),
            ("a{2,99999999999999999999}", "above the limit"),
            ("[]a]", "right after '['"),
            ("[^]a]", "right after '['"),
            ("(ab", "unclosed '('"),
            ("ab)", "unbalanced"),
            ("[ab", "unclosed '['"),
            (r"\p{L", "unclosed"),
            ("", "empty string"),
            ("x*", "empty string"),
            (r"\s*|a", "empty string"),
            ("a|(?:b|)", "empty string"),
            ("(?=a)", "empty string"),
            (r"\b", "empty string"),
            ("a?b?", "empty string"),
            ("(?:ab)?", "empty string"),
            ("a{0,3}", "empty string"),
            ("^$", "empty string"),
            ("*a", "nothing to repeat"),
            ("x\\", "lone backslash"),
        ] {
            let e = check_regex("pre_tokenizer.pattern", re).expect_err(re).to_string();
            assert!(
                e.contains(why) && e.starts_with("pre_tokenizer.pattern: regex"),
                "{re}: {e}"
            );
        }
        let long = "a".repeat(MAX_PATTERN_BYTES + 1);
        assert!(check_regex("f", &long)
            .unwrap_err()
            .to_string()
            .contains("limit of 4096"));
    }

    #[test]
    fn optional_groups_may_alternate() {
        // `?` repeats at most once: no nesting to blow up.
        check_regex("f", "(?:a|b)?(?:c+)?d").unwrap();
        check_regex("f", "(?:abc){2,5}").unwrap();
        assert!(check_regex("f", "(?:a|b){2}").is_err());
    }
}
