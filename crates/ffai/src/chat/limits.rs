//! Limits on rendering a chat template.
//!
//! A template comes from a model's files and the messages from whoever talks to the
//! model, so neither is trusted: compiling and rendering must end, and end with a
//! one-line `Err` rather than an abort, a stack overflow or a process that eats all
//! memory. What is bounded:
//!
//! - **steps**: minijinja's fuel ([`MAX_RENDER_STEPS`]) ends loops that run too long.
//! - **nesting**: minijinja's recursion limit ([`MAX_RECURSION`]) ends deep recursive
//!   macros and recursive `for` loops; the render runs on a thread of its own with a
//!   stack ([`RENDER_STACK_BYTES`]) deep enough for the deepest value the step limit lets
//!   a template build (dropping such a value recurses). Compiling runs on such a thread
//!   too, and refuses syntax trees nested deeper than [`MAX_TEMPLATE_NESTING`].
//! - **output**: everything written, `{{ ... }}` and template text alike, captured output
//!   (`{% set %}` blocks, macro results) included, counts against a cap that grows with
//!   the input ([`OUTPUT_BASE_BYTES`], [`OUTPUT_BYTES_PER_INPUT_BYTE`]) before it is
//!   written.
//! - **per call**: every filter, test, function and Python method that would allocate in
//!   proportion to a number the template picks (an indent, a width, a count) or to the
//!   size of a value it turns into text checks that size first, before allocating: many
//!   of them allocate in one go, long before fuel or the output cap could notice. Those
//!   that compare, hash or copy values (the comparison tests, `dictsort`, `dict`,
//!   `namespace`, a map's `get`) are held to the same bounds as the operators below.
//! - **operators**: `chat::compile` compiles templates through minijinja's machinery and
//!   turns every operator that could allocate or walk without bound (`+`, `~`, `*`,
//!   comparisons, `in`, item lookups, slices, map literals, `*args` and `**kwargs`
//!   splats, `loop.changed`) into a call of a checked function (`chat::ops`) that
//!   performs the original operation after its check: a string result at most the output cap, a list at most [`MAX_ITEMS`] items,
//!   operands that are compared, hashed or searched at most the cap in size and
//!   [`MAX_VALUE_DEPTH`] levels deep (a value with shared parts, `[x, x]`, is
//!   exponentially bigger than its memory; a namespace that contains itself is endless
//!   and is refused). Constant expressions, which minijinja folds while compiling, are
//!   checked the same way under the limits of the smallest render.
//! - **work**: fuel counts steps, not what a step costs; the bytes those builtins and
//!   operators make and the items and parts they walk add up against a budget
//!   ([`WORK_PER_OUTPUT_BYTE`] per byte of the output cap), so `map` or a loop cannot
//!   repeat a big but allowed call forever.
//!
//! Left to fuel alone, as each step costs little: numeric operators (`-`, `/`, `//`, `%`,
//! `**`, unary `-`; integers are at most 128 bits), attribute lookups, building list and
//! keyword literals (a step per item), and iterating (a step per item). One exception:
//! the truth, length and iteration of a namespace collect its keys, at most as many as
//! the template has distinct attribute names (tens of thousands in a 1 MiB template), so
//! a loop testing such a namespace costs that many per step.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::panic::{catch_unwind, AssertUnwindSafe};

use minijinja::value::{from_args, Rest, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State};

/// Largest template source accepted. Real chat templates, tool-use instructions included,
/// are tens of KiB; a MiB leaves ample room while keeping compile time and memory small.
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;

/// Instructions one render may execute (minijinja's fuel). Measured with the templates in
/// tests/fixtures/chat: a message costs 23–68 steps (Qwen3 with reasoning and Mistral are
/// the heaviest), a render ~100 more, so this allows over ten thousand messages (far past
/// any context window) while ending a runaway loop in a fraction of a second. It also bounds
/// how deeply a template can nest values (about a level per step), which sets
/// [`RENDER_STACK_BYTES`].
pub const MAX_RENDER_STEPS: u64 = 1_000_000;

/// minijinja's recursion limit, in its units: a frame per `for`/`with`/`if` scope, a
/// macro call costs its caller's depth plus 4, an include 10. Its own default (500) is
/// also its maximum without the `stacker` feature; real templates nest a few levels, and
/// recursive macros (used to print nested JSON schemas) a few dozen.
pub const MAX_RECURSION: usize = 500;

/// The output cap is this many bytes plus [`OUTPUT_BYTES_PER_INPUT_BYTE`] per byte of
/// input (messages and tools as JSON, plus the special tokens). A template adds its own
/// text (turn markers, system prompts, tool instructions: a few KiB, hence the base) and
/// may print the input more than once (`tojson` with indentation, `ensure_ascii` escapes
/// of 2–3× size, content both in a macro's captured output and where the macro's result
/// is printed, which both count); 8× the input covers that with room to spare.
pub const OUTPUT_BASE_BYTES: usize = 1 << 20;
/// See [`OUTPUT_BASE_BYTES`].
pub const OUTPUT_BYTES_PER_INPUT_BYTE: usize = 8;

/// The bytes of text the checked builtins may make, plus the list items they may walk,
/// in one render, per byte of the output cap. A real template handles each part of its
/// input a few times (trims it, splits off reasoning, dumps tool calls): measured on a
/// 4000-turn conversation, the fixture templates use at most 0.12 per byte of the cap.
/// Eight leaves ample room, while `map` over a hundred thousand items, or a loop
/// repeating a big call, stops after a bounded amount of work (about half a second of
/// CPU at the smallest cap).
pub const WORK_PER_OUTPUT_BYTE: usize = 8;

/// Work charged for each map entry copied (by `dict`, `namespace` or a `**` splat):
/// hashing it into a new table costs about what copying a few dozen bytes does.
pub(super) const MAP_ENTRY_WORK: usize = 32;

/// Largest indentation `tojson(indent=..)` and `indent(width)` accept: the indent is
/// repeated on every line, so it multiplies the size of the text. Real templates use 2 or 4.
pub const MAX_INDENT: usize = 64;

/// Largest width or precision a `format` / `str.format` / `%` spec may ask for (`%5d`,
/// `{:>10}`, `%.3f`): padding is allocated in one go. Templates pad dates and numbers to
/// a handful of columns.
pub const MAX_FORMAT_WIDTH: usize = 256;

/// Most items a filter or method may take from a list or build into one (`list`, `sort`,
/// `batch`, `slice`, `join`, ...). minijinja's `range` stops at the same number; a list
/// longer than this can only come from a template multiplying or chaining lists, since
/// no real conversation has a hundred thousand messages or tools.
pub const MAX_ITEMS: usize = 100_000;

/// Deepest nesting of lists and maps a filter will print, dump as JSON or walk. JSON
/// from the outside is limited to 128 levels by serde_json's parser; the rest leaves
/// room for the lists and maps a template wraps around it.
pub const MAX_VALUE_DEPTH: usize = 256;

/// Deepest nesting of a template's syntax tree (statements and expressions; a chain
/// `a + b + c` or `x|f|g` nests a level per operator or filter). minijinja parses such
/// chains in a loop, so the template size alone allows half a million levels, but
/// compiles and drops the tree recursively and re-evaluates constant subexpressions at
/// every level. Real templates nest a few dozen levels.
pub const MAX_TEMPLATE_NESTING: usize = 512;

/// Stack of the thread a render (or a compile) runs on. minijinja recurses through Rust
/// frames for macro calls and when it drops nested values (comparing and printing them
/// recurses too, but the operators and filters refuse values nested deeper than
/// [`MAX_VALUE_DEPTH`]); a template can nest values about one level per step. Measured: a
/// level costs up to ~460 bytes (comparing nested lists; dropping is ~60), so the deepest
/// value [`MAX_RENDER_STEPS`] allows needs ~450 MiB; this leaves twice that. Compiling
/// drops a syntax tree of up to half a million levels (one refused for its depth). The
/// stack is reserved address space: only the pages a render touches are backed by memory,
/// and they are returned when the thread ends.
pub const RENDER_STACK_BYTES: usize = 1 << 30;

/// Extra bytes one format spec may produce beyond its argument: [`MAX_FORMAT_WIDTH`] of
/// padding or precision, plus the integer digits of the largest f64 (309) with grouping
/// separators.
const FORMAT_SPEC_SLACK: usize = 2 * MAX_FORMAT_WIDTH + 512;

/// What a render in progress on this thread may still write.
#[derive(Clone, Copy)]
struct Budget {
    cap: usize,
    /// Bytes printed so far, captured output included.
    emitted: usize,
    /// Bytes made and items walked by the checked builtins so far.
    work: usize,
    exceeded: bool,
}

thread_local! {
    static BUDGET: Cell<Option<Budget>> = const { Cell::new(None) };
}

/// The output cap for this input.
pub(super) fn output_cap(input_bytes: usize) -> usize {
    OUTPUT_BASE_BYTES.saturating_add(input_bytes.saturating_mul(OUTPUT_BYTES_PER_INPUT_BYTE))
}

/// The output cap of the render in progress; also the most any single value a filter
/// or operator builds may take, since no value bigger than the whole output is of any use.
pub(super) fn cap() -> usize {
    BUDGET.get().map_or(OUTPUT_BASE_BYTES, |b| b.cap)
}

/// Counts `n` more bytes of output (captured or not) against the cap.
fn charge(n: usize) -> Result<(), Error> {
    let Some(mut b) = BUDGET.get() else {
        return Ok(());
    };
    b.emitted = b.emitted.saturating_add(n);
    let over = b.emitted > b.cap;
    b.exceeded |= over;
    BUDGET.set(Some(b));
    if over {
        return Err(limit(format!("output exceeds the limit of {} bytes", b.cap)));
    }
    Ok(())
}

/// Counts `n` more units of work (bytes made, items walked) by a builtin or an operator.
pub(super) fn spend(n: usize) -> Result<(), Error> {
    let Some(mut b) = BUDGET.get() else {
        return Ok(());
    };
    b.work = b.work.saturating_add(n);
    BUDGET.set(Some(b));
    let most = b.cap.saturating_mul(WORK_PER_OUTPUT_BYTE);
    if b.work > most {
        return Err(limit(format!(
            "filters, methods and operators made or walked more than the limit of {most} bytes and items"
        )));
    }
    Ok(())
}

fn limit(msg: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg)
}

/// How a guarded render ended.
pub(super) enum Outcome<T> {
    Done(T),
    /// A template error; `output_exceeded` when the output cap ended it.
    Failed {
        error: Error,
        output_exceeded: bool,
    },
    /// minijinja panicked (caught); the payload's message.
    Panicked(String),
    /// No thread could be started for the render.
    NoThread(String),
}

/// Runs `f` with a budget of its own (`cap` bytes of output, the work that allows), then
/// restores the budget of the render in progress: compiling holds constant folding to
/// the limits of the smallest render, whatever the render it is part of.
pub(super) fn with_budget<T>(cap: usize, f: impl FnOnce() -> T) -> T {
    let saved = BUDGET.replace(Some(Budget {
        cap,
        emitted: 0,
        work: 0,
        exceeded: false,
    }));
    let result = f();
    BUDGET.set(saved);
    result
}

/// Runs `f` (a render) on a thread with a [`RENDER_STACK_BYTES`] stack, with output
/// counted against `cap` and panics caught.
pub(super) fn run<T: Send>(cap: usize, f: impl FnOnce() -> Result<T, Error> + Send) -> Outcome<T> {
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name("chat-template".into())
            .stack_size(RENDER_STACK_BYTES)
            .spawn_scoped(scope, move || {
                BUDGET.set(Some(Budget {
                    cap,
                    emitted: 0,
                    work: 0,
                    exceeded: false,
                }));
                let result = catch_unwind(AssertUnwindSafe(f));
                let exceeded = BUDGET.get().is_some_and(|b| b.exceeded);
                BUDGET.set(None);
                match result {
                    Ok(Ok(v)) => Outcome::Done(v),
                    Ok(Err(error)) => Outcome::Failed {
                        error,
                        output_exceeded: exceeded,
                    },
                    Err(payload) => Outcome::Panicked(panic_message(payload.as_ref())),
                }
            });
        match spawned {
            // The closure catches panics itself; a failed join can only be a panic while
            // reading the payload, reported the same way.
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|p| Outcome::Panicked(panic_message(p.as_ref()))),
            Err(e) => Outcome::NoThread(e.to_string()),
        }
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let msg = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    };
    msg.lines().next().unwrap_or_default().to_owned()
}

/// Describes a minijinja error that a limit of this module caused (anywhere in its chain
/// of causes), naming the limit.
pub(super) fn describe_limit(e: &Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(mj) = err.downcast_ref::<Error>() {
            if mj.kind() == ErrorKind::OutOfFuel {
                return Some(format!("rendering exceeded the limit of {MAX_RENDER_STEPS} steps"));
            }
            if mj.detail() == Some("recursion limit exceeded") {
                return Some(format!("nesting exceeded the recursion limit of {MAX_RECURSION}"));
            }
        }
        cur = err.source();
    }
    None
}

// ---- sizes of values ----

/// Why a value was refused.
pub(super) enum Oversize {
    /// Nested deeper than [`MAX_VALUE_DEPTH`].
    Deep,
    /// Would print more bytes than allowed.
    Big,
}

impl Oversize {
    /// The error for `what` (the filter or place), naming the limit.
    pub(super) fn error(self, what: &str) -> Error {
        match self {
            Oversize::Deep => limit(format!(
                "{what}: value nested deeper than the limit of {MAX_VALUE_DEPTH} levels"
            )),
            Oversize::Big => limit(format!("{what} would exceed the limit of {} bytes", cap())),
        }
    }
}

/// A `fmt::Write` that fails once more than `limit` bytes were written; it keeps the text
/// only when given a buffer.
struct Bounded<'a> {
    buf: Option<&'a mut String>,
    len: usize,
    limit: usize,
}

impl fmt::Write for Bounded<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if s.len() > self.limit - self.len {
            return Err(fmt::Error);
        }
        self.len += s.len();
        if let Some(buf) = self.buf.as_mut() {
            buf.push_str(s);
        }
        Ok(())
    }
}

fn is_scalar(v: &Value) -> bool {
    matches!(
        v.kind(),
        ValueKind::Undefined | ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::String
    )
}

/// Checks that `v` nests at most [`MAX_VALUE_DEPTH`] levels and that its parts and the
/// bytes of its strings add up to at most `limit` (a lower bound of its printed size),
/// without recursing and without visiting more than `limit` parts: a value whose parts
/// are shared (`[x, x]`, `[s] * n`) can be exponentially bigger than the memory it takes.
/// Returns the number of parts visited.
fn check_shape(v: &Value, limit: usize) -> Result<usize, Oversize> {
    measure(v, limit).map(|(parts, _)| parts)
}

/// Walks `v` as an operator that compares, hashes or searches it will: at most the cap
/// in parts and string bytes, at most [`MAX_VALUE_DEPTH`] levels (a value that contains
/// itself is endless, and comparing or hashing it recurses until the stack overflows).
/// Returns that size, the work the operator will do; an error names `what`.
pub(super) fn walk(v: &Value, what: &str) -> Result<usize, Error> {
    measure(v, cap()).map(|(_, size)| size).map_err(|e| e.error(what))
}

/// [`check_shape`]'s walk; returns the parts visited and their size (parts plus string
/// bytes).
fn measure(v: &Value, limit: usize) -> Result<(usize, usize), Oversize> {
    if is_scalar(v) {
        return Ok((1, 1 + v.as_str().map_or(0, str::len)));
    }
    let mut stack = vec![(0usize, v.clone())];
    let mut size = 0usize;
    let mut parts = 0usize;
    while let Some((depth, v)) = stack.pop() {
        parts += 1;
        size = size.saturating_add(1 + v.as_str().map_or(0, str::len));
        if size > limit {
            return Err(Oversize::Big);
        }
        if depth > MAX_VALUE_DEPTH {
            return Err(Oversize::Deep);
        }
        let room = limit - size + 1;
        match v.kind() {
            ValueKind::Seq | ValueKind::Iterable => {
                if let Ok(iter) = v.try_iter() {
                    stack.extend(iter.take(room).map(|item| (depth + 1, item)));
                }
            }
            ValueKind::Map => {
                if let Ok(keys) = v.try_iter() {
                    for key in keys.take(room) {
                        let item = v.get_item(&key).unwrap_or_default();
                        stack.push((depth + 1, key));
                        stack.push((depth + 1, item));
                    }
                }
            }
            _ => {}
        }
        if stack.len() > room {
            return Err(Oversize::Big);
        }
    }
    Ok((parts, size))
}

/// The length of `v` printed (`{{ v }}`) if at most `limit` bytes.
pub(super) fn printed_len_within(v: &Value, limit: usize) -> Result<usize, Oversize> {
    if let Some(s) = v.as_str() {
        return if s.len() <= limit {
            Ok(s.len())
        } else {
            Err(Oversize::Big)
        };
    }
    check_shape(v, limit)?;
    let mut w = Bounded {
        buf: None,
        len: 0,
        limit,
    };
    write!(w, "{v}").map_err(|_| Oversize::Big)?;
    Ok(w.len)
}

/// The length of `v` printed, at most the cap; else an error naming `what`.
fn printed_len(v: &Value, what: &str) -> Result<usize, Error> {
    printed_len_within(v, cap()).map_err(|e| e.error(what))
}

/// Writes `args` into a string of at most the cap, or fails naming `what`.
fn format_bounded(args: fmt::Arguments<'_>, what: &str) -> Result<String, Error> {
    let mut s = String::new();
    let mut w = Bounded {
        buf: Some(&mut s),
        len: 0,
        limit: cap(),
    };
    w.write_fmt(args).map_err(|_| Oversize::Big.error(what))?;
    Ok(s)
}

/// `v` as text (a string as is, anything else printed), at most the cap.
fn text_of<'a>(v: &'a Value, what: &str) -> Result<Cow<'a, str>, Error> {
    if let Some(s) = v.as_str() {
        printed_len(v, what)?;
        return Ok(Cow::Borrowed(s));
    }
    check_shape(v, cap()).map_err(|e| e.error(what))?;
    format_bounded(format_args!("{v}"), what).map(Cow::Owned)
}

/// Arguments a filter will turn into text: each must print within the cap.
fn guard_text_args(args: &[Value], what: &str) -> Result<(), Error> {
    for a in args.iter().filter(|a| !a.is_kwargs()) {
        spend(printed_len(a, what)?)?;
    }
    Ok(())
}

/// A list argument a filter will walk: at most [`MAX_ITEMS`] items, whose contents add
/// up to at most the cap (a filter may copy or transform every item: `[s] * n` shares
/// one string `n` times, `map('upper')` would make `n` copies).
///
/// The list is collected here (at most one item over the limit is ever taken) and the
/// filter gets that copy: a lazy list's stated length can be wrong (minijinja computes
/// `len * n` for `list * n` without checking for overflow), and a lazy list may be
/// expensive to walk more than once.
fn guard_items(v: &mut Value, what: &str) -> Result<(), Error> {
    if !matches!(v.kind(), ValueKind::Seq | ValueKind::Iterable) {
        return Ok(());
    }
    if let Some(n) = v.len().filter(|&n| n > MAX_ITEMS) {
        return Err(too_many(what, Some(n)));
    }
    let items: Vec<Value> = v.try_iter()?.take(MAX_ITEMS + 1).collect();
    if items.len() > MAX_ITEMS {
        return Err(too_many(what, None));
    }
    let items = Value::from(items);
    let parts = check_shape(&items, cap()).map_err(|e| match e {
        Oversize::Big => limit(format!(
            "{what}: the list's contents exceed the limit of {} bytes",
            cap()
        )),
        deep => deep.error(what),
    })?;
    spend(parts)?;
    *v = items;
    Ok(())
}

/// A string given to a filter that walks lists is walked by character: as many items as
/// characters, except for `reverse` and `last`, which make a string.
fn guard_string_items(v: &Value, what: &str) -> Result<(), Error> {
    let Some(s) = v.as_str() else {
        return Ok(());
    };
    spend(s.len())?;
    if !matches!(what, "reverse" | "last") && s.chars().take(MAX_ITEMS + 1).count() > MAX_ITEMS {
        return Err(too_many(what, None));
    }
    Ok(())
}

/// The pieces `s` would split into must be at most [`MAX_ITEMS`] (each piece is a value
/// of its own, several times the size of a short piece).
fn guard_split(s: &str, sep: Option<&str>, max_splits: Option<usize>, what: &str) -> Result<(), Error> {
    let pieces = match sep {
        None => s.split_whitespace().take(MAX_ITEMS + 1).count(),
        Some("") => s.chars().count() + 2,
        Some(sep) => s.matches(sep).take(MAX_ITEMS + 1).count() + 1,
    };
    let pieces = max_splits.map_or(pieces, |m| pieces.min(m.saturating_add(1)));
    if pieces > MAX_ITEMS {
        return Err(too_many(what, None));
    }
    spend(s.len().saturating_add(pieces))
}

pub(super) fn too_many(what: &str, n: Option<usize>) -> Error {
    match n {
        Some(n) => limit(format!("{what}: {n} items exceed the limit of {MAX_ITEMS}")),
        None => limit(format!("{what}: more items than the limit of {MAX_ITEMS}")),
    }
}

/// A number argument that sizes an allocation (an indent, a count): at most `max`.
fn guard_number(v: Option<&Value>, what: &str, max: usize) -> Result<(), Error> {
    let Some(v) = v else { return Ok(()) };
    if v.kind() != ValueKind::Number {
        return Ok(()); // not a number: the filter itself rejects it
    }
    match i128::try_from(v.clone()) {
        Ok(n) if n <= max as i128 => Ok(()),
        _ => Err(limit(format!("{what} {v} exceeds the limit of {max}"))),
    }
}

fn kwarg(args: &[Value], name: &str) -> Option<Value> {
    let kw = args.last().filter(|a| a.is_kwargs())?;
    kw.get_item(&Value::from(name)).ok().filter(|v| !v.is_undefined())
}

fn positional(args: &[Value]) -> usize {
    args.iter().filter(|a| !a.is_kwargs()).count()
}

// ---- the environment ----

/// Sets the limits on `env` and replaces every builtin that could allocate without bound
/// with a checked version of itself.
pub(super) fn install(env: &mut Environment<'static>) {
    env.set_fuel(Some(MAX_RENDER_STEPS));
    env.set_recursion_limit(MAX_RECURSION);
    env.set_formatter(formatter);
    env.set_unknown_method_callback(method_callback);
    // Debug info (the variables in scope, attached to errors) only shows in `{:#}`, which
    // ffai does not print; off, an error from a nested evaluation (see `ops`) does not
    // carry the nested VM's.
    env.set_debug(false);
    // Prints the whole render state with no bound; not part of Jinja2 (so no template
    // written for transformers uses it).
    env.remove_global("debug");
    // The template language's operators, which the compiled templates call.
    super::ops::install(env);

    use minijinja::filters as f;

    // Filters that turn their arguments into text: linear in that text, which must print
    // within the cap first (a value built with shared parts prints exponentially big).
    for (name, orig) in [
        ("safe", Value::from_function(f::safe)),
        ("escape", Value::from_function(f::escape)),
        ("e", Value::from_function(f::escape)),
        ("lower", Value::from_function(f::lower)),
        ("upper", Value::from_function(f::upper)),
        ("title", Value::from_function(f::title)),
        ("capitalize", Value::from_function(f::capitalize)),
        ("trim", Value::from_function(f::trim)),
        ("string", Value::from_function(f::string)),
    ] {
        env.add_filter(name, move |state: &State, args: Rest<Value>| {
            guard_text_args(&args, name)?;
            orig.call(state, &args)
        });
    }

    // Filters that split a string: at most MAX_ITEMS pieces.
    let split = Value::from_function(f::split);
    env.add_filter("split", move |state: &State, args: Rest<Value>| {
        if let Some(s) = args.first().and_then(|v| v.as_str()) {
            let sep = args
                .get(1)
                .filter(|v| !v.is_none() && !v.is_kwargs())
                .and_then(|v| v.as_str());
            let max = args.get(2).and_then(|v| v.as_usize());
            guard_split(s, sep, max, "split")?;
        }
        split.call(state, &args)
    });
    let lines = Value::from_function(f::lines);
    env.add_filter("lines", move |state: &State, args: Rest<Value>| {
        if let Some(s) = args.first().and_then(|v| v.as_str()) {
            guard_split(s, Some("\n"), None, "lines")?;
        }
        lines.call(state, &args)
    });

    // Filters that walk a list: at most MAX_ITEMS items.
    for (name, orig) in [
        ("list", Value::from_function(f::list)),
        ("sort", Value::from_function(f::sort)),
        ("unique", Value::from_function(f::unique)),
        ("reverse", Value::from_function(f::reverse)),
        ("last", Value::from_function(f::last)),
        ("map", Value::from_function(f::map)),
        ("select", Value::from_function(f::select)),
        ("reject", Value::from_function(f::reject)),
        ("selectattr", Value::from_function(f::selectattr)),
        ("rejectattr", Value::from_function(f::rejectattr)),
        ("groupby", Value::from_function(f::groupby)),
        ("sum", Value::from_function(f::sum)),
        ("min", Value::from_function(f::min)),
        ("max", Value::from_function(f::max)),
    ] {
        env.add_filter(name, move |state: &State, args: Rest<Value>| {
            let mut args = args.0;
            if let Some(first) = args.first_mut() {
                guard_string_items(first, name)?;
                guard_items(first, name)?;
            }
            orig.call(state, &args)
        });
    }
    // Filters and tests that read a whole string (minijinja counts characters for length;
    // a number is parsed from all of it).
    for (name, orig) in [
        ("length", Value::from_function(f::length)),
        ("count", Value::from_function(f::length)),
        ("int", Value::from_function(f::int)),
        ("float", Value::from_function(f::float)),
    ] {
        env.add_filter(name, move |state: &State, args: Rest<Value>| {
            spend(args.first().and_then(|v| v.as_str()).map_or(0, str::len))?;
            orig.call(state, &args)
        });
    }
    for (name, orig) in [
        ("lower", Value::from_function(minijinja::tests::is_lower)),
        ("upper", Value::from_function(minijinja::tests::is_upper)),
    ] {
        env.add_test(name, move |state: &State, args: Rest<Value>| {
            spend(args.first().and_then(|v| v.as_str()).map_or(0, str::len))?;
            orig.call(state, &args)
        });
    }

    // batch/slice allocate `count` slots (or lists) up front.
    for (name, orig) in [
        ("batch", Value::from_function(f::batch)),
        ("slice", Value::from_function(f::slice)),
    ] {
        env.add_filter(name, move |state: &State, args: Rest<Value>| {
            let mut args = args.0;
            guard_number(args.get(1), &format!("{name} count"), MAX_ITEMS)?;
            if let Some(first) = args.first_mut() {
                guard_items(first, name)?;
            }
            orig.call(state, &args)
        });
    }

    let indent = Value::from_function(f::indent);
    env.add_filter("indent", move |state: &State, args: Rest<Value>| {
        let width = args
            .get(1)
            .filter(|v| !v.is_kwargs())
            .cloned()
            .or_else(|| kwarg(&args, "width"));
        guard_number(width.as_ref(), "indent width", MAX_INDENT)?;
        guard_text_args(&args, "indent")?;
        if let Some(text) = args.first() {
            let text = text_of(text, "indent")?;
            let w = width.and_then(|w| w.as_usize()).unwrap_or(4);
            let lines = text.bytes().filter(|&b| b == b'\n').count() + 1;
            check_result_len("indent", text.len().saturating_add(lines.saturating_mul(w)))?;
        }
        indent.call(state, &args)
    });

    let replace = Value::from_function(f::replace);
    env.add_filter("replace", move |state: &State, args: Rest<Value>| {
        guard_text_args(&args, "replace")?;
        if positional(&args) >= 3 {
            let s = text_of(&args[0], "replace")?;
            let from = text_of(&args[1], "replace")?;
            let to = text_of(&args[2], "replace")?;
            check_result_len("replace", replaced_len(&s, &from, &to, None))?;
        }
        replace.call(state, &args)
    });

    let format = Value::from_function(f::format);
    env.add_filter("format", move |state: &State, args: Rest<Value>| {
        if let Some(fmt) = args.first().and_then(|v| v.as_str()) {
            let escape = if args[0].is_safe() { 6 } else { 1 };
            guard_format(fmt, &args[1..], Style::Printf, escape)?;
        }
        format.call(state, &args)
    });

    let join = Value::from_function(f::join);
    env.add_filter("join", move |state: &State, args: Rest<Value>| {
        let mut args = args.0;
        if let Some(first) = args.first_mut() {
            guard_items(first, "join")?;
        }
        let joiner = match args.get(1).filter(|v| !v.is_kwargs()) {
            Some(j) => printed_len(j, "join")?,
            None => 0,
        };
        let escape = if matches!(state.auto_escape(), AutoEscape::None) {
            1
        } else {
            6
        };
        if let Some(items) = args.first() {
            if matches!(items.kind(), ValueKind::Seq | ValueKind::Iterable) {
                guard_joined(items, joiner, escape, "join")?;
            } else {
                printed_len(items, "join")?;
            }
        }
        join.call(state, &args)
    });

    env.add_filter("chain", chain);
    env.add_filter("zip", zip);
    env.add_filter("pprint", pprint);

    let startingwith = Value::from_function(minijinja::tests::is_startingwith);
    env.add_test("startingwith", move |state: &State, args: Rest<Value>| {
        guard_text_args(&args, "startingwith")?;
        startingwith.call(state, &args)
    });
    let endingwith = Value::from_function(minijinja::tests::is_endingwith);
    env.add_test("endingwith", move |state: &State, args: Rest<Value>| {
        guard_text_args(&args, "endingwith")?;
        endingwith.call(state, &args)
    });
    let is_in = Value::from_function(minijinja::tests::is_in);
    env.add_test("in", move |state: &State, args: Rest<Value>| {
        let mut args = args.0;
        if let Some(container) = args.get_mut(1) {
            guard_items(container, "in")?;
        }
        if let Some(s) = args.get(1).and_then(|c| c.as_str()) {
            spend(s.len())?;
            guard_text_args(&args[..1], "in")?;
        }
        is_in.call(state, &args)
    });

    // Comparison tests compare like the operators do: two objects are walked in step.
    use super::ops::Cmp;
    for (name, cmp, orig) in [
        ("eq", Cmp::Eq, Value::from_function(minijinja::tests::is_eq)),
        ("equalto", Cmp::Eq, Value::from_function(minijinja::tests::is_eq)),
        ("==", Cmp::Eq, Value::from_function(minijinja::tests::is_eq)),
        ("ne", Cmp::Ne, Value::from_function(minijinja::tests::is_ne)),
        ("!=", Cmp::Ne, Value::from_function(minijinja::tests::is_ne)),
        ("lt", Cmp::Lt, Value::from_function(minijinja::tests::is_lt)),
        ("lessthan", Cmp::Lt, Value::from_function(minijinja::tests::is_lt)),
        ("<", Cmp::Lt, Value::from_function(minijinja::tests::is_lt)),
        ("le", Cmp::Lte, Value::from_function(minijinja::tests::is_le)),
        ("<=", Cmp::Lte, Value::from_function(minijinja::tests::is_le)),
        ("gt", Cmp::Gt, Value::from_function(minijinja::tests::is_gt)),
        ("greaterthan", Cmp::Gt, Value::from_function(minijinja::tests::is_gt)),
        (">", Cmp::Gt, Value::from_function(minijinja::tests::is_gt)),
        ("ge", Cmp::Gte, Value::from_function(minijinja::tests::is_ge)),
        (">=", Cmp::Gte, Value::from_function(minijinja::tests::is_ge)),
    ] {
        env.add_test(name, move |state: &State, args: Rest<Value>| {
            if let [a, b, ..] = &args[..] {
                spend(super::ops::check_compare(cmp, a, b)?)?;
            }
            orig.call(state, &args)
        });
    }

    // dict and namespace copy every entry of the map they are given (a template growing a
    // map by copying it per step takes quadratic time).
    for (name, orig) in [
        ("dict", Value::from_function(minijinja::functions::dict)),
        ("namespace", Value::from_function(minijinja::functions::namespace)),
    ] {
        env.add_function(name, move |state: &State, args: Rest<Value>| {
            let mut entries = 0usize;
            for a in args.iter().filter(|a| a.kind() == ValueKind::Map) {
                entries = entries.saturating_add(a.len().unwrap_or(0));
            }
            if entries > MAX_ITEMS {
                return Err(too_many(name, Some(entries)));
            }
            spend(entries.saturating_mul(MAP_ENTRY_WORK))?;
            orig.call(state, &args)
        });
    }

    // dictsort compares keys or values while sorting.
    let dictsort = Value::from_function(f::dictsort);
    env.add_filter("dictsort", move |state: &State, args: Rest<Value>| {
        if let Some(map) = args.first().filter(|m| m.kind() == ValueKind::Map) {
            if let Some(n) = map.len().filter(|&n| n > MAX_ITEMS) {
                return Err(too_many("dictsort", Some(n)));
            }
            let parts = check_shape(map, cap()).map_err(|e| match e {
                Oversize::Big => limit(format!(
                    "dictsort: the map's contents exceed the limit of {} bytes",
                    cap()
                )),
                deep => deep.error("dictsort"),
            })?;
            spend(parts)?;
        }
        dictsort.call(state, &args)
    });
}

fn check_result_len(what: &str, n: usize) -> Result<(), Error> {
    let cap = cap();
    if n > cap {
        return Err(result_too_big(what, n, cap));
    }
    spend(n)
}

pub(super) fn result_too_big(what: &str, n: usize, cap: usize) -> Error {
    limit(format!(
        "{what} result would be {n} bytes, over the limit of {cap} bytes"
    ))
}

/// The length of `s` with `from` replaced by `to` (at most `count` times).
fn replaced_len(s: &str, from: &str, to: &str, count: Option<usize>) -> usize {
    let n = if from.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(from).count()
    };
    let n = count.map_or(n, |c| c.min(n));
    (s.len() - n * from.len()).saturating_add(n.saturating_mul(to.len()))
}

/// The items of a list joined with a `joiner_len`-byte separator must print within the
/// cap (`escape`: how much escaping may grow the text).
fn guard_joined(items: &Value, joiner_len: usize, escape: usize, what: &str) -> Result<(), Error> {
    let cap = cap();
    let mut total = 0usize;
    for (i, item) in items.try_iter()?.enumerate() {
        if i > 0 {
            total = total.saturating_add(joiner_len);
        }
        let left = cap.saturating_sub(total) / escape;
        let n = match printed_len_within(&item, left) {
            Ok(n) => n,
            Err(Oversize::Deep) => return Err(Oversize::Deep.error(what)),
            Err(Oversize::Big) => return Err(limit(format!("{what} result would exceed the limit of {cap} bytes"))),
        };
        total = total.saturating_add(n.saturating_mul(escape));
        if total > cap {
            return Err(result_too_big(what, total, cap));
        }
    }
    spend(total)
}

#[derive(Clone, Copy, PartialEq)]
enum Style {
    Printf,
    StrFormat,
}

/// Checks a `format` call before it runs: every width and precision in the format
/// string at most [`MAX_FORMAT_WIDTH`], every argument printable within the cap, and the
/// most the result could be (each spec printing the largest argument, padded) within it.
fn guard_format(fmt: &str, args: &[Value], style: Style, escape: usize) -> Result<(), Error> {
    let specs = format_specs(fmt, style)?;
    let cap = cap();
    let mut largest = 0usize;
    for a in args.iter().filter(|a| !a.is_kwargs()) {
        largest = largest.max(printed_len(a, "format argument")?);
    }
    if let Some(kw) = args.last().filter(|a| a.is_kwargs()) {
        for key in kw.try_iter()? {
            let v = kw.get_item(&key)?;
            largest = largest.max(printed_len(&v, "format argument")?);
        }
    }
    let per_spec = largest.saturating_mul(escape).saturating_add(FORMAT_SPEC_SLACK);
    let most = fmt.len().saturating_add(specs.saturating_mul(per_spec));
    if most > cap {
        return Err(result_too_big("format", most, cap));
    }
    spend(most)
}

/// Counts the replacement fields of a format string (an upper bound) and checks every
/// number in their specs (widths, precisions; a digit used as fill too, harmlessly).
fn format_specs(fmt: &str, style: Style) -> Result<usize, Error> {
    let b = fmt.as_bytes();
    let mut specs = 0;
    let mut i = 0;
    while i < b.len() {
        match (style, b[i]) {
            (Style::Printf, b'%') => {
                i += 1;
                if b.get(i) == Some(&b'%') {
                    i += 1;
                    continue;
                }
                specs += 1;
                if b.get(i) == Some(&b'(') {
                    // a mapping key: its digits are a name, not a width
                    while i < b.len() && b[i] != b')' {
                        i += 1;
                    }
                }
                let start = i;
                // up to the conversion type: a letter other than a length modifier
                let is_type = |c: u8| c.is_ascii_alphabetic() && !matches!(c, b'h' | b'l' | b'L');
                while i < b.len() && !is_type(b[i]) {
                    i += 1;
                }
                check_spec_numbers(&fmt[start..i])?;
            }
            (Style::StrFormat, b'{') => {
                i += 1;
                if b.get(i) == Some(&b'{') {
                    i += 1;
                    continue;
                }
                specs += 1;
                // the field name (digits there are an argument index or a key)
                let mut in_brackets = false;
                while i < b.len() && (in_brackets || !matches!(b[i], b':' | b'}')) {
                    match b[i] {
                        b'[' => in_brackets = true,
                        b']' => in_brackets = false,
                        _ => {}
                    }
                    i += 1;
                }
                let start = i;
                while i < b.len() && b[i] != b'}' {
                    i += 1;
                }
                check_spec_numbers(&fmt[start..i])?;
            }
            _ => i += 1,
        }
    }
    Ok(specs)
}

fn check_spec_numbers(spec: &str) -> Result<(), Error> {
    for run in spec.split(|c: char| !c.is_ascii_digit()).filter(|r| !r.is_empty()) {
        let n = run.trim_start_matches('0');
        if n.len() > 9 || n.parse::<usize>().unwrap_or(0) > MAX_FORMAT_WIDTH {
            return Err(limit(format!(
                "format width or precision {run} exceeds the limit of {MAX_FORMAT_WIDTH}"
            )));
        }
    }
    Ok(())
}

/// `chain`, collected here (at most [`MAX_ITEMS`] items): minijinja's lazy version lets
/// a template chain a list with itself over and over, doubling its length per step.
fn chain(value: Value, others: Rest<Value>) -> Result<Value, Error> {
    let all: Vec<Value> = std::iter::once(value).chain(others.0).collect();
    if all.iter().all(|v| v.kind() == ValueKind::Map) {
        // like minijinja's merged dict: keys in sorted order, the last map with a key wins
        let mut map = std::collections::BTreeMap::new();
        for m in &all {
            for key in m.try_iter()? {
                let v = m.get_item(&key)?;
                if v.is_undefined() {
                    continue;
                }
                map.insert(key, v);
                if map.len() > MAX_ITEMS {
                    return Err(too_many("chain", None));
                }
            }
        }
        spend(map.len())?;
        return Ok(Value::from(map));
    }
    let mut items = Vec::new();
    for v in &all {
        for item in v.try_iter()? {
            if items.len() >= MAX_ITEMS {
                return Err(too_many("chain", None));
            }
            items.push(item);
        }
    }
    spend(items.len())?;
    Ok(Value::from(items))
}

/// `zip`, collected here (at most [`MAX_ITEMS`] tuples): zipping lazily lets a template
/// zip a list with itself over and over, doubling the work per item per step.
fn zip(value: Value, others: Rest<Value>) -> Result<Value, Error> {
    let all: Vec<Value> = std::iter::once(value).chain(others.0).collect();
    let mut iters = Vec::with_capacity(all.len());
    for v in &all {
        iters.push(v.try_iter().map_err(|_| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("zip filter argument must be iterable, got {}", v.kind()),
            )
        })?);
    }
    let mut rows = Vec::new();
    'rows: loop {
        let mut row = Vec::with_capacity(iters.len());
        for it in &mut iters {
            match it.next() {
                Some(v) => row.push(v),
                None => break 'rows,
            }
        }
        if rows.len() >= MAX_ITEMS {
            return Err(too_many("zip", None));
        }
        rows.push(Value::from(row));
    }
    spend(rows.len().saturating_mul(all.len()))?;
    Ok(Value::from(rows))
}

/// `pprint`: minijinja's pretty debug print, within the cap.
fn pprint(value: &Value) -> Result<String, Error> {
    check_shape(value, cap()).map_err(|e| e.error("pprint"))?;
    let text = format_bounded(format_args!("{value:#?}"), "pprint")?;
    spend(text.len())?;
    Ok(text)
}

/// Prints `{{ value }}` as minijinja's default formatter does, counting the bytes against
/// the output cap first (output captured by `{% set %}` blocks and macros included).
fn formatter(out: &mut Output, state: &State, value: &Value) -> Result<(), Error> {
    let escaping = !matches!(state.auto_escape(), AutoEscape::None) && !value.is_safe();
    // HTML and JSON escaping turn a byte into at most six.
    let factor = if escaping { 6 } else { 1 };
    let left = BUDGET.get().map_or(usize::MAX, |b| b.cap.saturating_sub(b.emitted));
    match printed_len_within(value, left / factor) {
        Ok(n) => charge(n * factor)?,
        Err(Oversize::Deep) => return Err(Oversize::Deep.error("output")),
        // more than is left: fails, naming the cap
        Err(Oversize::Big) => {
            charge(usize::MAX)?;
            return Err(Oversize::Big.error("output"));
        }
    }
    minijinja::escape_formatter(out, state, value)
}

// ---- Python methods (minijinja-contrib's pycompat) ----

/// minijinja-contrib's Python methods, with the ones that can allocate without bound
/// checked first.
fn method_callback(state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        // Every string method reads (and most copy) the whole string.
        spend(s.len())?;
        match method {
            "replace" => {
                let (from, to, count): (&str, &str, Option<i32>) = from_args(args)?;
                let count = count.and_then(|c| usize::try_from(c).ok());
                check_result_len("replace", replaced_len(s, from, to, count))?;
            }
            "format" => guard_format(s, args, Style::StrFormat, 1)?,
            "split" => {
                let (sep, max): (Option<&str>, Option<i64>) = from_args(args)?;
                let max = max.and_then(|m| usize::try_from(m).ok());
                guard_split(s, sep, max, "split")?;
            }
            "splitlines" => guard_split(s, Some("\n"), None, "splitlines")?,
            "join" => {
                let (items,): (&Value,) = from_args(args)?;
                let mut items = items.clone();
                guard_items(&mut items, "join")?;
                guard_joined(&items, s.len(), 1, "join")?;
                return minijinja_contrib::pycompat::unknown_method_callback(state, value, method, &[items]);
            }
            // pycompat's count loops forever on an empty substring; Python counts the
            // positions between characters.
            "count" => {
                let (what,): (&str,) = from_args(args)?;
                let n = if what.is_empty() {
                    s.chars().count() + 1
                } else {
                    s.matches(what).count()
                };
                return Ok(Value::from(n));
            }
            "startswith" | "endswith" => {
                if let Some(first) = args.first() {
                    let mut first = first.clone();
                    guard_items(&mut first, method)?;
                    let mut args = args.to_vec();
                    args[0] = first;
                    return minijinja_contrib::pycompat::unknown_method_callback(state, value, method, &args);
                }
            }
            _ => {}
        }
    } else if value.kind() == ValueKind::Seq && method == "count" {
        let mut v = value.clone();
        guard_items(&mut v, "count")?;
    } else if value.kind() == ValueKind::Map && method == "get" {
        // The key is hashed (and compared with colliding keys).
        if let Some(key) = args.first() {
            spend(super::ops::check_key(key, "get key")?)?;
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

// ---- helpers for chat.rs's own functions ----

/// `v` as text for an error message or a format string, at most the cap.
pub(super) fn bounded_text(v: &Value, what: &str) -> Result<String, Error> {
    text_of(v, what).map(Cow::into_owned)
}

/// Checks a `tojson` indent (a count of spaces or a string).
pub(super) fn check_indent(n: i128) -> Result<(), Error> {
    if n > MAX_INDENT as i128 {
        return Err(limit(format!("tojson indent {n} exceeds the limit of {MAX_INDENT}")));
    }
    Ok(())
}

/// The most bytes `tojson` may produce: the cap.
pub(super) fn json_budget() -> usize {
    cap()
}

/// Counts the bytes `tojson` made against the work budget.
pub(super) fn json_made(n: usize) -> Result<(), Error> {
    spend(n)
}

pub(super) fn json_too_big() -> Error {
    limit(format!("tojson output exceeds the limit of {} bytes", cap()))
}

pub(super) fn json_too_deep() -> Error {
    limit(format!(
        "tojson: value nested deeper than the limit of {MAX_VALUE_DEPTH} levels"
    ))
}

/// Checks a result about to be built: at most the cap.
pub(super) fn check_len(what: &str, n: usize) -> Result<(), Error> {
    check_result_len(what, n)
}
