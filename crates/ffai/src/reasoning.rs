//! The reasoning of thinking models' ordinary answers: the block a model writes before
//! its answer (Qwen3 and DeepSeek-R1's `<think>` … `</think>`, gpt-oss's analysis
//! message), split from the answer's content, whole ([`split`]) or while the answer
//! streams ([`ReasoningStream`]). Which block to look for is a [`Reasoning`], judged from
//! the chat template and the rendered prompt ([`crate::tools::ToolTemplate::detect`],
//! then [`crate::tools::ToolTemplate::for_prompt`]).
//!
//! The rules, the same whole and streamed:
//! - No block at the start of the output: it is all content.
//! - A block: its text without the tags, newlines at both ends taken off (as Qwen3's
//!   template does when it renders an earlier turn's reasoning), is the reasoning; what
//!   follows the block is the content, less the newlines that open it (`<think>`
//!   blocks) or the `<|start|>assistant<|channel|>final<|message|>` header of the final
//!   message (gpt-oss, whose answers may also start with that header and no analysis).
//! - An output that ends inside its block (cut off by the token limit) is all reasoning
//!   and has no content (`None`; the server answers `"content": null`, as vLLM does).

use crate::tools::Reasoning;

/// Headers of gpt-oss's final message, taken off the start of the content.
const FINAL_HEADERS: &[&str] = &[
    "<|start|>assistant<|channel|>final<|message|>",
    "<|channel|>final<|message|>",
];

/// A whole output split into its reasoning (None when it has no block) and its content
/// (None when it ended inside its block), by the rules of the module's documentation.
pub fn split(reasoning: Reasoning, text: &str) -> (Option<&str>, Option<&str>) {
    let Some((open, close)) = reasoning.tags() else {
        return (None, Some(text));
    };
    let Some(body) = text.strip_prefix(open) else {
        // No block (or only the start of an opening tag, cut off): all content.
        let skip = lead(reasoning, text, false, true).unwrap_or(0);
        return (None, Some(&text[skip..]));
    };
    match body.find(close) {
        Some(at) => {
            let rest = &body[at + close.len()..];
            let skip = lead(reasoning, rest, true, true).unwrap_or(0);
            (Some(body[..at].trim_matches('\n')), Some(&rest[skip..]))
        }
        None => (Some(body.trim_matches('\n')), None),
    }
}

/// How many bytes at the start of `rest` (what follows the block, or the whole output
/// when `after_block` is false) are not content; None while that cannot be told yet
/// (`rest` so far may grow into more of them). `at_end`: `rest` is all there is.
fn lead(reasoning: Reasoning, rest: &str, after_block: bool, at_end: bool) -> Option<usize> {
    match reasoning {
        Reasoning::None => Some(0),
        Reasoning::Think | Reasoning::ThinkOpen => {
            if !after_block {
                return Some(0);
            }
            let n = rest.len() - rest.trim_start_matches('\n').len();
            (n < rest.len() || at_end).then_some(n)
        }
        Reasoning::Analysis => {
            if let Some(h) = FINAL_HEADERS.iter().find(|h| rest.starts_with(**h)) {
                return Some(h.len());
            }
            let maybe = FINAL_HEADERS.iter().any(|h| h.starts_with(rest));
            (at_end || !maybe).then_some(0)
        }
    }
}

/// What one piece of a streamed output adds to its reasoning and to its content (either
/// may be empty; the reasoning comes first).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    pub reasoning: String,
    pub content: String,
}

/// Where a stream is in its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// At the start: the output may still begin with the opening tag.
    Opening,
    /// Inside the block; `begun` once some of its text went out (before that, newlines
    /// that open it are dropped).
    Inside { begun: bool },
    /// After the block (or at the start of an output without one): text that is not
    /// content (see [`lead`]) may come first.
    Lead { after_block: bool },
    /// Everything from here on is content.
    Answer,
}

/// Splits an output into reasoning and content as it streams in pieces of any size: what
/// each [`ReasoningStream::push`] gives out is final, and all the pieces it and
/// [`ReasoningStream::finish`] give, joined, are what [`split`] gives for the whole
/// output. Text that may yet turn out to be a tag (a closing tag split across tokens),
/// or newlines that may end the block, are held back until the next piece tells.
#[derive(Debug, Clone)]
pub struct ReasoningStream {
    reasoning: Reasoning,
    /// Text received and not given out yet.
    held: String,
    phase: Phase,
}

impl ReasoningStream {
    pub fn new(reasoning: Reasoning) -> ReasoningStream {
        ReasoningStream {
            reasoning,
            held: String::new(),
            phase: Phase::Opening,
        }
    }

    /// The next piece of the output.
    pub fn push(&mut self, text: &str) -> Delta {
        self.held.push_str(text);
        self.advance(false)
    }

    /// The output is over: what was held back.
    pub fn finish(&mut self) -> Delta {
        self.advance(true)
    }

    /// The output so far ends inside its reasoning block (after [`ReasoningStream::finish`]:
    /// it ended there, and has no content).
    pub fn inside(&self) -> bool {
        matches!(self.phase, Phase::Inside { .. })
    }

    fn advance(&mut self, at_end: bool) -> Delta {
        let mut d = Delta::default();
        loop {
            match self.phase {
                Phase::Opening => {
                    let Some((open, _)) = self.reasoning.tags() else {
                        self.phase = Phase::Answer;
                        continue;
                    };
                    if self.held.starts_with(open) {
                        self.held.drain(..open.len());
                        self.phase = Phase::Inside { begun: false };
                    } else if open.starts_with(self.held.as_str()) && !at_end {
                        return d;
                    } else {
                        self.phase = Phase::Lead { after_block: false };
                    }
                }
                Phase::Inside { begun } => {
                    let close = self.reasoning.tags().map_or("", |t| t.1);
                    let (end, closed) = match self.held.find(close) {
                        Some(at) => (at, true),
                        None if at_end => (self.held.len(), false),
                        None => (self.held.len() - partial_tag(&self.held, close), false),
                    };
                    // Newlines before the end of what is known are held: they may end
                    // the block.
                    let kept = self.held[..end].trim_end_matches('\n');
                    let text = if begun { kept } else { kept.trim_start_matches('\n') };
                    d.reasoning.push_str(text);
                    let begun = begun || !text.is_empty();
                    let kept = kept.len();
                    if closed {
                        self.held.drain(..end + close.len());
                        self.phase = Phase::Lead { after_block: true };
                    } else {
                        if at_end {
                            self.held.clear();
                        } else {
                            self.held.drain(..kept);
                        }
                        self.phase = Phase::Inside { begun };
                        return d;
                    }
                }
                Phase::Lead { after_block } => match lead(self.reasoning, &self.held, after_block, at_end) {
                    None => return d,
                    Some(n) => {
                        self.held.drain(..n);
                        self.phase = Phase::Answer;
                    }
                },
                Phase::Answer => {
                    d.content.push_str(&self.held);
                    self.held.clear();
                    return d;
                }
            }
        }
    }
}

/// The length of the longest end of `text` that is the start of `tag` (but not all of
/// it): what may be a tag split across pieces. Tags are ASCII, so the cut is at a
/// character boundary.
fn partial_tag(text: &str, tag: &str) -> usize {
    let (t, g) = (text.as_bytes(), tag.as_bytes());
    (1..g.len().min(t.len() + 1))
        .rev()
        .find(|&k| t.ends_with(&g[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outputs as models write them (Qwen3, DeepSeek-R1 after its prompt's opened
    /// `<think>\n`, gpt-oss), with their expected reasoning and content.
    fn recorded() -> Vec<(Reasoning, &'static str, Option<&'static str>, Option<&'static str>)> {
        vec![
            (
                Reasoning::Think,
                "<think>\nThe user asks for the capital of France. That is Paris.\n</think>\n\nThe capital of France is **Paris**.",
                Some("The user asks for the capital of France. That is Paris."),
                Some("The capital of France is **Paris**."),
            ),
            // Thinking skipped: an empty block.
            (Reasoning::Think, "<think>\n\n</think>\n\nHi!", Some(""), Some("Hi!")),
            // No block at all, and text that only looks like the start of one.
            (Reasoning::Think, "Paris.\n<think>x</think>", None, Some("Paris.\n<think>x</think>")),
            (Reasoning::Think, "<thought>", None, Some("<thought>")),
            (Reasoning::Think, "<th", None, Some("<th")),
            (Reasoning::Think, "", None, Some("")),
            // Cut off inside the block: all reasoning, no content.
            (Reasoning::Think, "<think>\nLet me count: 1, 2,\n\n</th", Some("Let me count: 1, 2,\n\n</th"), None),
            (Reasoning::Think, "<think>", Some(""), None),
            // Newlines inside the block are kept; a second block is content.
            (
                Reasoning::Think,
                "<think>a\n\nb \n</think>\n\n\nc\n<think>d</think>",
                Some("a\n\nb "),
                Some("c\n<think>d</think>"),
            ),
            // Multi-byte text next to the tags.
            (Reasoning::Think, "<think>é😀</think>ü", Some("é😀"), Some("ü")),
            (
                Reasoning::ThinkOpen,
                "Okay, the user greets me. I should greet back.\n</think>\n\nHello! How can I help?",
                Some("Okay, the user greets me. I should greet back."),
                Some("Hello! How can I help?"),
            ),
            (Reasoning::ThinkOpen, "Hmm, <think> is just text here", Some("Hmm, <think> is just text here"), None),
            (Reasoning::ThinkOpen, "", Some(""), None),
            (Reasoning::ThinkOpen, "</think>", Some(""), Some("")),
            (
                Reasoning::Analysis,
                "<|channel|>analysis<|message|>User asks capital of France. Answer: Paris.<|end|><|start|>assistant<|channel|>final<|message|>The capital of France is Paris.",
                Some("User asks capital of France. Answer: Paris."),
                Some("The capital of France is Paris."),
            ),
            (
                Reasoning::Analysis,
                "<|channel|>final<|message|>Paris.",
                None,
                Some("Paris."),
            ),
            (
                Reasoning::Analysis,
                "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather",
                Some("Need the weather."),
                Some("<|start|>assistant<|channel|>commentary to=functions.get_weather"),
            ),
            (Reasoning::Analysis, "<|channel|>analysis<|message|>Thinking <|end", Some("Thinking <|end"), None),
            (Reasoning::None, "<think>x</think>y", None, Some("<think>x</think>y")),
        ]
    }

    #[test]
    fn whole_outputs_split_into_reasoning_and_content() {
        for (r, out, reasoning, content) in recorded() {
            assert_eq!(split(r, out), (reasoning, content), "{r:?} {out:?}");
        }
    }

    /// The stream's pieces for `out` cut at `cuts`, joined, and whether it ended inside.
    fn streamed(r: Reasoning, out: &str, cuts: &[usize]) -> (String, String, bool) {
        let mut s = ReasoningStream::new(r);
        let (mut reasoning, mut content) = (String::new(), String::new());
        let mut from = 0;
        for &at in cuts.iter().chain([out.len()].iter()) {
            let d = s.push(&out[from..at]);
            reasoning.push_str(&d.reasoning);
            content.push_str(&d.content);
            from = at;
        }
        let d = s.finish();
        reasoning.push_str(&d.reasoning);
        content.push_str(&d.content);
        (reasoning, content, s.inside())
    }

    #[test]
    fn streams_cut_anywhere_join_to_the_whole_split() {
        for (r, out, _, _) in recorded() {
            let (reasoning, content) = split(r, out);
            let want = (
                reasoning.unwrap_or("").to_string(),
                content.unwrap_or("").to_string(),
                content.is_none(),
            );
            let bounds: Vec<usize> = (1..out.len()).filter(|&i| out.is_char_boundary(i)).collect();
            // One piece, a cut at every boundary, every single character a piece, and
            // every pair of cuts.
            assert_eq!(streamed(r, out, &[]), want, "{r:?} {out:?} whole");
            assert_eq!(streamed(r, out, &bounds), want, "{r:?} {out:?} per character");
            for (i, &a) in bounds.iter().enumerate() {
                assert_eq!(streamed(r, out, &[a]), want, "{r:?} {out:?} cut at {a}");
                for &b in &bounds[i + 1..] {
                    assert_eq!(streamed(r, out, &[a, b]), want, "{r:?} {out:?} cut at {a}, {b}");
                }
            }
        }
    }

    #[test]
    fn a_stream_gives_out_reasoning_before_the_block_closes() {
        let mut s = ReasoningStream::new(Reasoning::Think);
        assert_eq!(s.push("<thi").reasoning, "");
        assert_eq!(s.push("nk>\nStep one.\n").reasoning, "Step one.");
        assert!(s.inside());
        // A closing tag split across pieces is held back, then dropped.
        assert_eq!(
            s.push("Step two.</thi"),
            Delta {
                reasoning: "\nStep two.".into(),
                content: "".into()
            }
        );
        assert_eq!(
            s.push("nk>\n\nDone"),
            Delta {
                reasoning: "".into(),
                content: "Done".into()
            }
        );
        assert!(!s.inside());
        assert_eq!(s.push(" now.").content, " now.");
        assert_eq!(s.finish(), Delta::default());
    }

    #[test]
    fn partial_tags_are_the_ends_that_start_a_tag() {
        assert_eq!(partial_tag("abc</th", "</think>"), 4);
        assert_eq!(partial_tag("abc<", "</think>"), 1);
        assert_eq!(partial_tag("abc</think>", "</think>"), 0);
        assert_eq!(partial_tag("", "</think>"), 0);
        assert_eq!(partial_tag("é", "</think>"), 0);
    }
}
