//! Containing the `tokenizers` crate.
//!
//! The crate indexes, slices and unwraps freely on data it was given (a merge shorter than
//! `continuing_subword_prefix`, a corrupt SentencePiece charsmap, a regex that exhausts
//! Oniguruma's backtracking limit all panic). `hf_check` rejects every such input we know
//! of before the crate sees it; this is the second line: every call into the crate runs
//! under [`contain`], so a panic we did not foresee becomes an `Err` instead of taking the
//! process (a server encoding a request) down.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, Result};

/// Runs `f`, turning a panic that escapes it into an `Err` naming `what`.
///
/// `AssertUnwindSafe` is sound here in the sense that matters: the closures only read our
/// own state, and the `tokenizers` objects they touch keep their mutable state (the BPE
/// and Unigram word caches) behind locks that are taken with `try_read`/`try_write`, so a
/// poisoned lock is treated as a cache miss rather than observed half-written.
pub(crate) fn contain<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        Error::new(format!("{what}: the tokenizers library panicked: {}", one_line(&msg)))
    })
}

/// `msg` with every run of whitespace (newlines included) made one space, and cut to a
/// length that fits a log line.
pub(crate) fn one_line(msg: &str) -> String {
    const MAX_CHARS: usize = 300;
    let mut out = String::new();
    for (i, word) in msg.split_whitespace().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(word);
        if out.chars().count() > MAX_CHARS {
            let cut: String = out.chars().take(MAX_CHARS).collect();
            return cut + "...";
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error() {
        let e = contain("encoding", || -> u32 { panic!("index out of\nbounds") }).unwrap_err();
        assert_eq!(
            e.to_string(),
            "encoding: the tokenizers library panicked: index out of bounds"
        );
        let e = contain("loading", || -> u32 { panic!("{}", String::from("formatted")) }).unwrap_err();
        assert!(e.to_string().ends_with("panicked: formatted"), "{e}");
        assert_eq!(contain("x", || 7).unwrap(), 7);
    }

    #[test]
    fn long_messages_are_cut() {
        let s = one_line(&"word ".repeat(1000));
        assert!(s.len() < 320 && s.ends_with("..."), "{s}");
        assert!(!one_line("a\nb\r\n\tc").contains('\n'));
    }
}
