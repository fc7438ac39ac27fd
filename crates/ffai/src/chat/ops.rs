//! The template language's operators, checked before they run.
//!
//! minijinja evaluates `+`, `~`, `*`, comparisons, `in`, item lookups, slices and map
//! literals inside its VM with no hook, and several of them can allocate or walk without
//! bound (a string doubled per step, a list repeated 2**62 times, `==` on values whose
//! parts are shared, hashing a namespace that contains itself). [`super::compile`]
//! rewrites each such instruction into a call of one of the functions here
//! (`__ffai_<op>`), which checks its operands against [`super::limits`] and then performs
//! the original operation: natively where minijinja's public `Value` API gives exactly the
//! same result, otherwise by running the original instruction in a nested VM on the same
//! environment, so errors and undefined-value handling stay minijinja's own.
//!
//! Every check returns the work the operation will do (bytes made, parts walked), which
//! the caller charges against the render's work budget; the same checks hold constant
//! folding at compile time to the smallest render's limits.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use minijinja::machinery::{Instruction, Instructions, Vm};
use minijinja::value::{Object, ObjectRepr, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State};

use super::limits::{self, MAX_ITEMS};

/// Names of the functions the rewritten templates call. A template may not use any
/// variable, macro or function name with this prefix (it could shadow them).
pub(super) const RESERVED_PREFIX: &str = "__ffai_";

/// An operation a rewritten instruction calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    /// `Add`: `+`.
    Add,
    /// `StringConcat`: `~`.
    Concat,
    /// `Mul`: `*`.
    Mul,
    /// `Eq`, `Ne`, `Lt`, `Lte`, `Gt`, `Gte`.
    Cmp(Cmp),
    /// `In`: `value in container`.
    In,
    /// `GetItem`: `container[key]`.
    GetItem,
    /// `Slice`: `value[start:stop:step]`.
    Slice,
    /// `BuildMap(n)`: a map literal with computed keys.
    BuildMap,
    /// `CallMethod("changed", n)`: `loop.changed(..)` compares its arguments with the
    /// previous call's.
    Changed,
    /// The operands of a `CompareAndPreserve` (a chained comparison `a < b < c`), checked
    /// and handed back for the original instruction.
    CheckChained(Cmp),
    /// The lists of an `UnpackLists` (`f(*args)`), which pushes every item on the stack,
    /// counted and handed back.
    CheckSplat,
    /// The maps of a `MergeKwargs` (`f(**kwargs)`), which copies every entry, counted and
    /// handed back.
    CheckKwargsSplat,
}

/// A comparison, also `in` (`In`, `NotIn`) in chained comparisons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cmp {
    Eq,
    Ne,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
}

const ALL_CMPS: [Cmp; 7] = [Cmp::Eq, Cmp::Ne, Cmp::Lt, Cmp::Lte, Cmp::Gt, Cmp::Gte, Cmp::In];

impl Cmp {
    fn symbol(self) -> &'static str {
        match self {
            Cmp::Eq => "`==`",
            Cmp::Ne => "`!=`",
            Cmp::Lt => "`<`",
            Cmp::Lte => "`<=`",
            Cmp::Gt => "`>`",
            Cmp::Gte => "`>=`",
            Cmp::In => "`in`",
        }
    }
}

impl Op {
    /// The global function the rewritten instruction calls.
    pub(super) fn function(self) -> &'static str {
        match self {
            Op::Add => "__ffai_add",
            Op::Concat => "__ffai_concat",
            Op::Mul => "__ffai_mul",
            Op::Cmp(Cmp::Eq) => "__ffai_eq",
            Op::Cmp(Cmp::Ne) => "__ffai_ne",
            Op::Cmp(Cmp::Lt) => "__ffai_lt",
            Op::Cmp(Cmp::Lte) => "__ffai_lte",
            Op::Cmp(Cmp::Gt) => "__ffai_gt",
            Op::Cmp(Cmp::Gte) => "__ffai_gte",
            Op::Cmp(Cmp::In) | Op::In => "__ffai_in",
            Op::GetItem => "__ffai_getitem",
            Op::Slice => "__ffai_slice",
            Op::BuildMap => "__ffai_map",
            Op::Changed => "__ffai_changed",
            Op::CheckChained(Cmp::Eq) => "__ffai_check_eq",
            Op::CheckChained(Cmp::Ne) => "__ffai_check_ne",
            Op::CheckChained(Cmp::Lt) => "__ffai_check_lt",
            Op::CheckChained(Cmp::Lte) => "__ffai_check_lte",
            Op::CheckChained(Cmp::Gt) => "__ffai_check_gt",
            Op::CheckChained(Cmp::Gte) => "__ffai_check_gte",
            Op::CheckChained(Cmp::In) => "__ffai_check_in",
            Op::CheckSplat => "__ffai_check_splat",
            Op::CheckKwargsSplat => "__ffai_check_kwargs_splat",
        }
    }

    /// The original instruction and its operand count, for the operations that run it in
    /// a nested VM.
    fn original(self) -> Option<(Instruction<'static>, usize)> {
        Some(match self {
            Op::Add => (Instruction::Add, 2),
            Op::Concat => (Instruction::StringConcat, 2),
            Op::Mul => (Instruction::Mul, 2),
            Op::Cmp(Cmp::Eq) => (Instruction::Eq, 2),
            Op::Cmp(Cmp::Ne) => (Instruction::Ne, 2),
            Op::Cmp(Cmp::Lt) => (Instruction::Lt, 2),
            Op::Cmp(Cmp::Lte) => (Instruction::Lte, 2),
            Op::Cmp(Cmp::Gt) => (Instruction::Gt, 2),
            Op::Cmp(Cmp::Gte) => (Instruction::Gte, 2),
            Op::Cmp(Cmp::In) | Op::In => (Instruction::In, 2),
            Op::GetItem => (Instruction::GetItem, 2),
            Op::Slice => (Instruction::Slice, 4),
            Op::BuildMap | Op::Changed | Op::CheckChained(_) | Op::CheckSplat | Op::CheckKwargsSplat => return None,
        })
    }
}

/// Registers every operator function on `env`.
pub(super) fn install(env: &mut Environment<'static>) {
    let mut ops = vec![
        Op::Add,
        Op::Concat,
        Op::Mul,
        Op::In,
        Op::GetItem,
        Op::Slice,
        Op::BuildMap,
        Op::Changed,
        Op::CheckSplat,
        Op::CheckKwargsSplat,
    ];
    for cmp in ALL_CMPS {
        if cmp != Cmp::In {
            ops.push(Op::Cmp(cmp));
        }
        ops.push(Op::CheckChained(cmp));
    }
    for op in ops {
        env.add_global(op.function(), Value::from_object(Operator::new(op)));
    }
}

/// One operator function: the check, then the operation.
struct Operator {
    op: Op,
    /// `Lookup` of each operand, then the original instruction: run in a nested VM where
    /// the public `Value` API cannot reproduce minijinja's own semantics exactly.
    original: Option<Instructions<'static>>,
}

impl fmt::Debug for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.op.function())
    }
}

/// The names the nested VM looks operands up by.
const OPERAND_NAMES: [&str; 4] = ["a", "b", "c", "d"];

impl Operator {
    fn new(op: Op) -> Operator {
        let original = op.original().map(|(instr, n)| {
            let mut code = Instructions::new("<operator>", "");
            for name in &OPERAND_NAMES[..n] {
                code.add(Instruction::Lookup(name));
            }
            code.add(instr);
            code
        });
        Operator { op, original }
    }

    /// Runs the original instruction on `args` in a nested VM. It has no location of its
    /// own, so an error gets the template's location from the calling VM.
    fn run_original(&self, state: &State, args: &[Value]) -> Result<Value, Error> {
        let Some(code) = &self.original else {
            return Err(Error::new(ErrorKind::InvalidOperation, "operator has no original"));
        };
        let root = Value::from_object(Operands(args.to_vec()));
        let mut sink = String::new();
        let mut out = minijinja::machinery::make_string_output(&mut sink);
        let (value, _) = Vm::new(state.env()).eval(code, root, &BTreeMap::new(), &mut out, AutoEscape::None)?;
        value.ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "operator left no value"))
    }
}

/// The operands of a nested evaluation, looked up as `a`, `b`, `c`, `d`.
#[derive(Debug)]
struct Operands(Vec<Value>);

impl Object for Operands {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.get_value_by_str(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        let i = OPERAND_NAMES.iter().position(|n| *n == key)?;
        self.0.get(i).cloned()
    }
}

fn arity(args: &[Value], n: usize) -> Result<(), Error> {
    if args.len() != n {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("operator expects {n} operands, got {}", args.len()),
        ));
    }
    Ok(())
}

impl Object for Operator {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn call(self: &Arc<Self>, state: &State<'_, '_>, args: &[Value]) -> Result<Value, Error> {
        match self.op {
            Op::Add => {
                arity(args, 2)?;
                let (l, r) = (&args[0], &args[1]);
                limits::spend(check_add(l, r)?)?;
                if let (ValueKind::String, ValueKind::String) = (l.kind(), r.kind()) {
                    // minijinja's `+` on two strings: `[a, b].concat()`
                    return Ok(Value::from([str_of(l), str_of(r)].concat()));
                }
                self.run_original(state, args)
            }
            Op::Concat => {
                arity(args, 2)?;
                let (l, r) = (&args[0], &args[1]);
                limits::spend(check_concat(l, r)?)?;
                if l.is_undefined() || r.is_undefined() {
                    // The VM checks undefined operands first (strict mode fails).
                    return self.run_original(state, args);
                }
                // minijinja's `~`: `format!("{left}{right}")`
                Ok(Value::from(format!("{l}{r}")))
            }
            Op::Mul => {
                arity(args, 2)?;
                limits::spend(check_mul(&args[0], &args[1])?)?;
                self.run_original(state, args)
            }
            Op::Cmp(cmp) => {
                arity(args, 2)?;
                let (l, r) = (&args[0], &args[1]);
                limits::spend(check_compare(cmp, l, r)?)?;
                if l.is_undefined() || r.is_undefined() {
                    return self.run_original(state, args);
                }
                // minijinja's comparison operators: `Value::from(a OP b)`
                Ok(Value::from(match cmp {
                    Cmp::Eq => l == r,
                    Cmp::Ne => l != r,
                    Cmp::Lt => l < r,
                    Cmp::Lte => l <= r,
                    Cmp::Gt => l > r,
                    Cmp::Gte => l >= r,
                    // `Op::Cmp(Cmp::In)` is not registered: `in` is `Op::In`.
                    Cmp::In => return self.run_original(state, args),
                }))
            }
            Op::In => {
                arity(args, 2)?;
                let (value, container) = (&args[0], &args[1]);
                limits::spend(check_in(value, container)?)?;
                if let (ValueKind::String, ValueKind::String) = (container.kind(), value.kind()) {
                    // minijinja's `in` on two strings: `str::contains`
                    return Ok(Value::from(str_of(container).contains(str_of(value))));
                }
                self.run_original(state, args)
            }
            Op::GetItem => {
                arity(args, 2)?;
                let (container, key) = (&args[0], &args[1]);
                limits::spend(check_get_item(container, key)?)?;
                if container.is_undefined() {
                    return self.run_original(state, args);
                }
                // For a defined container the VM pushes the item, or undefined when there
                // is none, under every undefined behavior; an invalid item is an error,
                // which the original reports.
                let item = container.get_item(key)?;
                if item.kind() == ValueKind::Invalid {
                    return self.run_original(state, args);
                }
                Ok(item)
            }
            Op::Slice => {
                arity(args, 4)?;
                limits::spend(check_slice(&args[0])?)?;
                let sliced = self.run_original(state, args)?;
                snapshot_slice(&args[0], sliced)
            }
            Op::BuildMap => {
                if !args.len().is_multiple_of(2) {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "map literal needs key-value pairs",
                    ));
                }
                let mut work = 0usize;
                for key in args.iter().step_by(2) {
                    work = work.saturating_add(check_key(key, "map literal key")?);
                }
                limits::spend(work)?;
                // `BuildMap` inserts the pairs in order into minijinja's map type, as
                // collecting pairs into a `Value` does.
                Ok(args.chunks(2).map(|kv| (kv[0].clone(), kv[1].clone())).collect())
            }
            Op::Changed => {
                let Some((object, rest)) = args.split_first() else {
                    return Err(Error::new(ErrorKind::InvalidOperation, "method call without an object"));
                };
                // `loop.changed(..)` compares the arguments with the previous call's.
                let mut work = 0usize;
                for v in rest {
                    work = work.saturating_add(walk_object(v, "loop.changed argument")?);
                }
                limits::spend(work)?;
                object.call_method(state, "changed", rest)
            }
            Op::CheckChained(cmp) => {
                arity(args, 2)?;
                let (l, r) = (&args[0], &args[1]);
                let work = match cmp {
                    Cmp::In => check_in(l, r)?,
                    cmp => check_compare(cmp, l, r)?,
                };
                limits::spend(work)?;
                // `UnpackList` pushes the items in reverse, leaving them as they were.
                Ok(Value::from(vec![r.clone(), l.clone()]))
            }
            Op::CheckSplat | Op::CheckKwargsSplat => {
                // Each item is pushed on the stack; each entry copied into a new map.
                let per_item = if self.op == Op::CheckSplat {
                    1
                } else {
                    limits::MAP_ENTRY_WORK
                };
                let mut work = args.len();
                for v in args {
                    // Anything else fails in the original instruction.
                    if is_list(v.kind()) || v.kind() == ValueKind::Map {
                        let n = item_count(v, "`*` or `**` argument")?;
                        work = work.saturating_add(n.saturating_mul(per_item));
                    }
                }
                limits::spend(work)?;
                Ok(Value::from(args.iter().rev().cloned().collect::<Vec<_>>()))
            }
        }
    }
}

// ---- the checks ----

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn is_list(kind: ValueKind) -> bool {
    matches!(kind, ValueKind::Seq | ValueKind::Iterable)
}

fn is_object(kind: ValueKind) -> bool {
    matches!(
        kind,
        ValueKind::Map | ValueKind::Seq | ValueKind::Iterable | ValueKind::Plain
    )
}

/// A string result of `n` bytes: at most the cap (nothing bigger can ever be printed).
fn string_result(what: &str, n: usize) -> Result<usize, Error> {
    let cap = limits::cap();
    if n > cap {
        return Err(limits::result_too_big(what, n, cap));
    }
    Ok(n)
}

/// A list result of `n` items (`None`: more than `usize`): at most [`MAX_ITEMS`].
fn list_result(what: &str, n: Option<usize>) -> Result<usize, Error> {
    match n {
        Some(n) if n <= MAX_ITEMS => Ok(n),
        n => Err(limits::too_many(what, n)),
    }
}

/// The number of items of a list (walking at most one more than [`MAX_ITEMS`] when its
/// length is not known).
fn item_count(v: &Value, what: &str) -> Result<usize, Error> {
    if let Some(n) = v.len() {
        return Ok(n);
    }
    let n = v.try_iter()?.take(MAX_ITEMS + 1).count();
    if n > MAX_ITEMS {
        return Err(limits::too_many(what, None));
    }
    Ok(n)
}

/// Walks an object operand (bounded in size and depth; a value that contains itself is
/// refused for its depth); scalars cost their bytes.
fn walk_object(v: &Value, what: &str) -> Result<usize, Error> {
    if is_object(v.kind()) {
        limits::walk(v, what)
    } else {
        Ok(1 + v.as_str().map_or(0, str::len))
    }
}

/// A key that will be hashed (and compared with colliding keys).
pub(super) fn check_key(key: &Value, what: &str) -> Result<usize, Error> {
    walk_object(key, what)
}

/// `l + r`: two strings make a string, two lists a lazy list of both.
pub(super) fn check_add(l: &Value, r: &Value) -> Result<usize, Error> {
    match (l.kind(), r.kind()) {
        (ValueKind::String, ValueKind::String) => string_result("`+`", str_of(l).len() + str_of(r).len()),
        (a, b) if is_list(a) && is_list(b) => {
            let n = item_count(l, "`+`")?.checked_add(item_count(r, "`+`")?);
            // Lazy, but minijinja copies the items once a chain of concatenations is
            // 32 deep (`MergeSeq::MAX_DEPTH`): a 32nd of the items, amortized.
            list_result("`+`", n).map(|n| 1 + n / 32)
        }
        _ => Ok(1),
    }
}

/// `l ~ r`: both printed into one string.
pub(super) fn check_concat(l: &Value, r: &Value) -> Result<usize, Error> {
    let cap = limits::cap();
    let a = limits::printed_len_within(l, cap).map_err(|e| e.error("`~`"))?;
    let b = limits::printed_len_within(r, cap - a).map_err(|e| e.error("`~`"))?;
    Ok(a + b)
}

/// `l * r`: a string or a list repeated, or numbers. The operands are picked as
/// minijinja's `mul` picks them.
pub(super) fn check_mul(l: &Value, r: &Value) -> Result<usize, Error> {
    let string = l.as_str().map(|s| (s, r)).or_else(|| r.as_str().map(|s| (s, l)));
    if let Some((s, n)) = string {
        // Not a count: minijinja refuses it without allocating.
        let Some(n) = n.as_usize() else { return Ok(1) };
        return string_result("`*`", s.len().saturating_mul(n));
    }
    let seq = if is_object(l.kind()) {
        Some((l, r))
    } else if is_object(r.kind()) {
        Some((r, l))
    } else {
        None
    };
    if let Some((seq, n)) = seq.filter(|(seq, _)| is_list(seq.kind())) {
        // Not a count, or a list without a length: minijinja refuses it.
        let (Some(n), Some(len)) = (n.as_usize(), seq.len()) else {
            return Ok(1);
        };
        // Lazy: what reads it later pays for what it reads.
        return list_result("`*`", len.checked_mul(n)).map(|_| 1);
    }
    Ok(1)
}

/// `l OP r`: two objects are walked in step, so both must be bounded (a value with shared
/// parts can be exponentially bigger than its memory, one containing itself endless);
/// anything else compares in constant time, strings in their length.
pub(super) fn check_compare(cmp: Cmp, l: &Value, r: &Value) -> Result<usize, Error> {
    if is_object(l.kind()) && is_object(r.kind()) {
        let what = format!("{} operand", cmp.symbol());
        let a = limits::walk(l, &what)?;
        return Ok(a.saturating_add(limits::walk(r, &what)?));
    }
    let a = l.as_str().map_or(0, str::len);
    let b = r.as_str().map_or(0, str::len);
    Ok(1 + a.min(b))
}

/// `value in container`: a substring search, a hashed lookup, or every item compared
/// with the value.
pub(super) fn check_in(value: &Value, container: &Value) -> Result<usize, Error> {
    if let Some(s) = container.as_str() {
        let needle = match value.as_str() {
            Some(v) => v.len(),
            // minijinja prints a non-string value to search for it
            None => limits::printed_len_within(value, limits::cap()).map_err(|e| e.error("`in` operand"))?,
        };
        return Ok(1 + s.len() + needle);
    }
    match container.kind() {
        ValueKind::Map => check_key(value, "`in` operand"),
        ValueKind::Seq | ValueKind::Iterable => {
            // Comparing an item with the value costs at most the value's size (lists are
            // compared in step, maps by key count first, then key by key), so the value
            // must be bounded but the items need not be walked.
            let per_item = walk_object(value, "`in` operand")?;
            let n = item_count(container, "`in` container")?;
            Ok(1 + n.saturating_mul(per_item))
        }
        _ => Ok(1),
    }
}

/// `container[key]`: a hashed key, a string walked by character, or a lazy list walked
/// up to the index.
pub(super) fn check_get_item(container: &Value, key: &Value) -> Result<usize, Error> {
    let key_work = check_key(key, "`[]` key")?;
    let walk = match container.kind() {
        ValueKind::String => container.as_str().map_or(0, str::len),
        ValueKind::Iterable => match key.as_i64() {
            Some(i) if i >= 0 => (i as u64).min(container.len().unwrap_or(MAX_ITEMS) as u64) as usize,
            Some(_) => container.len().unwrap_or(0),
            None => 0,
        },
        _ => 0,
    };
    Ok(key_work.saturating_add(walk))
}

/// `value[start:stop:step]`: a string is walked by character; a list is sliced lazily
/// and then collected once by [`snapshot_slice`].
fn check_slice(value: &Value) -> Result<usize, Error> {
    Ok(match value.kind() {
        ValueKind::String => 1 + str_of(value).len(),
        k if is_list(k) => 1 + item_count(value, "`[:]`")?,
        _ => 1,
    })
}

/// minijinja slices a list lazily: every later use (each `if`, `length`, iteration)
/// walks the source again, and with a negative step copies all of it, at a cost no
/// limit sees. The slice's items are collected once here into an iterable with the same
/// items and the same stated length, so later uses cost what they read.
fn snapshot_slice(source: &Value, sliced: Value) -> Result<Value, Error> {
    if !is_list(source.kind()) || sliced.kind() != ValueKind::Iterable {
        return Ok(sliced);
    }
    let Some(n) = sliced.len() else {
        return Ok(sliced);
    };
    let items: Vec<Value> = sliced.try_iter()?.take(n.saturating_add(1)).collect();
    if items.len() != n {
        return Ok(sliced);
    }
    limits::spend(n)?;
    Ok(Value::make_object_iterable(items, |items| {
        Box::new(items.iter().cloned())
    }))
}
