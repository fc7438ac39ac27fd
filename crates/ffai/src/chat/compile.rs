//! Compiles a chat template with minijinja's machinery, rewriting what minijinja would
//! run without a hook so that it runs under [`super::limits`].
//!
//! minijinja's own `Template::render` is not used: its VM evaluates the template
//! language's operators, and writes template text, with nothing this crate can check. The
//! steps here are those of minijinja's `CompiledTemplate::new` and `Template::render`,
//! with checks and one rewrite in between:
//!
//! 1. `parse` (transformers' whitespace settings).
//! 2. [`check_nesting`]: minijinja parses `a + b + c ...`, `x|f|g ...` and `a.b.c ...` in
//!    loops, so a 1 MiB template can nest half a million levels; compiling and dropping
//!    the tree recurse per level, and constant folding re-evaluates each level's subtree
//!    (quadratic time). Trees deeper than [`limits::MAX_TEMPLATE_NESTING`] are refused,
//!    walking them without recursion.
//! 3. [`check_folding`]: the code generator folds constant expressions (`'x' * 10**8`,
//!    `[1] * 2**62`) while compiling, with no hook. Every expression it would fold is
//!    evaluated first here, bottom-up and once, each operation checked like at run time
//!    under the budget of the smallest render (its output cap
//!    [`limits::OUTPUT_BASE_BYTES`], its work); the folding work the generator will then
//!    do, re-evaluation included, must fit that work budget too.
//! 4. minijinja's `CodeGenerator`.
//! 5. [`rewrite`]: every instruction that could allocate or walk without bound becomes a
//!    call of a checked function of [`super::ops`] (1:1, so fuel is counted as before;
//!    chained comparisons and splats, which leave more than one value, get their operands
//!    checked and handed back before the original instruction: two more steps each).
//!    Template text (`EmitRaw`), which the VM writes straight to the output, becomes
//!    `LoadConst` + `Emit` (a step more) so that it goes through the counting formatter
//!    like `{{ ... }}` output (captured text included); the fixture templates, which
//!    write their text with `{{ '...' }}`, take exactly the steps they took before.
//!    Jump targets and macro offsets are moved to the new positions; each new
//!    instruction keeps its original's line and span, so errors point where they did.
//!    `include`, `import` and `extends` are refused: they would load templates that were
//!    not rewritten, and chat templates do not use them.
//! 6. [`render`]: minijinja's VM runs the rewritten instructions, with the environment's
//!    fuel, recursion limit and formatter, into a string.

use std::collections::{BTreeMap, HashMap};

use minijinja::machinery::ast::{self, CallArg, Expr, Spanned, Stmt};
use minijinja::machinery::{
    make_string_output, parse, CodeGenerator, Instruction, Instructions, Span, Vm, WhitespaceConfig,
};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};

use super::limits;
use super::ops::{self, Cmp, Op, RESERVED_PREFIX};

/// transformers' Jinja environment: `trim_blocks` and `lstrip_blocks` on, a single
/// trailing newline dropped.
const WHITESPACE: WhitespaceConfig = WhitespaceConfig {
    keep_trailing_newline: false,
    lstrip_blocks: true,
    trim_blocks: true,
};

/// A template's rewritten instructions, borrowing its name and source.
pub(super) struct Compiled<'s> {
    instructions: Instructions<'s>,
    blocks: BTreeMap<&'s str, Instructions<'s>>,
}

/// Parses, checks, compiles and rewrites `source`. Runs on a thread with a deep stack
/// (the syntax tree is dropped recursively even when it is refused for its depth).
pub(super) fn compile<'s>(name: &'s str, source: &'s str) -> Result<Compiled<'s>, Error> {
    let tree = parse(source, name, SyntaxConfig, WHITESPACE)?;
    check_nesting(&tree, name)?;
    limits::with_budget(limits::OUTPUT_BASE_BYTES, || check_folding(&tree, name))?;
    let mut generator = CodeGenerator::new(name, source);
    generator.compile_stmt(&tree);
    let (instructions, blocks) = generator.finish();
    drop(tree);
    let (instructions, _) = rewrite(&instructions)?;
    let mut rewritten = BTreeMap::new();
    for (block, code) in &blocks {
        rewritten.insert(*block, rewrite(code)?.0);
    }
    Ok(Compiled {
        instructions,
        blocks: rewritten,
    })
}

/// Runs a compiled template as minijinja's `Template::render` would (the same VM, root
/// context and initial auto-escaping) and returns its output. Everything written went
/// through the environment's formatter, which counts it against the output cap.
pub(super) fn render<'a>(env: &'a Environment<'a>, compiled: &'a Compiled<'a>, root: Value) -> Result<String, Error> {
    let mut text = String::new();
    {
        let mut out = make_string_output(&mut text);
        let auto_escape = minijinja::default_auto_escape_callback(compiled.instructions.name());
        let (_, state) = Vm::new(env).eval(&compiled.instructions, root, &compiled.blocks, &mut out, auto_escape)?;
        // The state (every variable) is dropped here, on the render thread, whose stack is
        // deep enough for any value the template built.
        drop(state);
    }
    if text.len() > limits::cap() {
        // Cannot happen (every write was counted first); kept as a last line.
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("output exceeds the limit of {} bytes", limits::cap()),
        ));
    }
    Ok(text)
}

/// " (in NAME:LINE)", as minijinja appends to errors that know their location.
fn location(name: &str, span: Option<Span>) -> String {
    match span {
        Some(span) => format!(" (in {name}:{})", span.start_line),
        None => String::new(),
    }
}

fn error_at(detail: String, name: &str, span: Option<Span>) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("{detail}{}", location(name, span)))
}

/// A check's error, with the location appended to its message.
fn locate(e: Error, name: &str, span: Span) -> Error {
    let detail = e.detail().unwrap_or_default().to_owned();
    Error::new(e.kind(), format!("{detail}{}", location(name, Some(span))))
}

// ---- the syntax tree ----

/// A node of the syntax tree.
#[derive(Clone, Copy)]
enum Node<'a, 's> {
    Stmt(&'a Stmt<'s>),
    Expr(&'a Expr<'s>),
}

fn push_args<'a, 's>(args: &'a [CallArg<'s>], out: &mut Vec<Node<'a, 's>>) {
    for arg in args {
        match arg {
            CallArg::Pos(e) | CallArg::Kwarg(_, e) | CallArg::PosSplat(e) | CallArg::KwargSplat(e) => {
                out.push(Node::Expr(e))
            }
        }
    }
}

fn push_macro<'a, 's>(m: &'a ast::Macro<'s>, out: &mut Vec<Node<'a, 's>>) {
    out.extend(m.args.iter().map(Node::Expr));
    out.extend(m.defaults.iter().map(Node::Expr));
    out.extend(m.body.iter().map(Node::Stmt));
}

/// The children of a node. The matches have no wildcard arm: a node kind added by a
/// minijinja upgrade must be looked at here.
fn children<'a, 's>(node: Node<'a, 's>, out: &mut Vec<Node<'a, 's>>) {
    match node {
        Node::Stmt(stmt) => match stmt {
            Stmt::Template(t) => out.extend(t.children.iter().map(Node::Stmt)),
            Stmt::EmitExpr(e) => out.push(Node::Expr(&e.expr)),
            Stmt::EmitRaw(_) => {}
            Stmt::ForLoop(f) => {
                out.push(Node::Expr(&f.target));
                out.push(Node::Expr(&f.iter));
                out.extend(f.filter_expr.iter().map(Node::Expr));
                out.extend(f.body.iter().map(Node::Stmt));
                out.extend(f.else_body.iter().map(Node::Stmt));
            }
            Stmt::IfCond(i) => {
                out.push(Node::Expr(&i.expr));
                out.extend(i.true_body.iter().map(Node::Stmt));
                out.extend(i.false_body.iter().map(Node::Stmt));
            }
            Stmt::WithBlock(w) => {
                for (target, value) in &w.assignments {
                    out.push(Node::Expr(target));
                    out.push(Node::Expr(value));
                }
                out.extend(w.body.iter().map(Node::Stmt));
            }
            Stmt::Set(s) => {
                out.push(Node::Expr(&s.target));
                out.push(Node::Expr(&s.expr));
            }
            Stmt::SetBlock(s) => {
                out.push(Node::Expr(&s.target));
                out.extend(s.filter.iter().map(Node::Expr));
                out.extend(s.body.iter().map(Node::Stmt));
            }
            Stmt::AutoEscape(a) => {
                out.push(Node::Expr(&a.enabled));
                out.extend(a.body.iter().map(Node::Stmt));
            }
            Stmt::FilterBlock(f) => {
                out.push(Node::Expr(&f.filter));
                out.extend(f.body.iter().map(Node::Stmt));
            }
            Stmt::Block(b) => out.extend(b.body.iter().map(Node::Stmt)),
            Stmt::Import(i) => {
                out.push(Node::Expr(&i.expr));
                out.push(Node::Expr(&i.name));
            }
            Stmt::FromImport(f) => {
                out.push(Node::Expr(&f.expr));
                for (name, alias) in &f.names {
                    out.push(Node::Expr(name));
                    out.extend(alias.iter().map(Node::Expr));
                }
            }
            Stmt::Extends(e) => out.push(Node::Expr(&e.name)),
            Stmt::Include(i) => out.push(Node::Expr(&i.name)),
            Stmt::Macro(m) => push_macro(m, out),
            Stmt::CallBlock(c) => {
                out.push(Node::Expr(&c.call.expr));
                push_args(&c.call.args, out);
                push_macro(&c.macro_decl, out);
            }
            Stmt::Continue(_) | Stmt::Break(_) => {}
            Stmt::Do(d) => {
                out.push(Node::Expr(&d.call.expr));
                push_args(&d.call.args, out);
            }
        },
        Node::Expr(expr) => match expr {
            Expr::Var(_) | Expr::Const(_) => {}
            Expr::Slice(s) => {
                out.push(Node::Expr(&s.expr));
                out.extend(s.start.iter().map(Node::Expr));
                out.extend(s.stop.iter().map(Node::Expr));
                out.extend(s.step.iter().map(Node::Expr));
            }
            Expr::UnaryOp(u) => out.push(Node::Expr(&u.expr)),
            Expr::BinOp(b) => {
                out.push(Node::Expr(&b.left));
                out.push(Node::Expr(&b.right));
            }
            Expr::Compare(c) => {
                out.push(Node::Expr(&c.expr));
                out.extend(c.ops.iter().map(|op| Node::Expr(&op.expr)));
            }
            Expr::IfExpr(i) => {
                out.push(Node::Expr(&i.test_expr));
                out.push(Node::Expr(&i.true_expr));
                out.extend(i.false_expr.iter().map(Node::Expr));
            }
            Expr::Filter(f) => {
                out.extend(f.expr.iter().map(Node::Expr));
                push_args(&f.args, out);
            }
            Expr::Test(t) => {
                out.push(Node::Expr(&t.expr));
                push_args(&t.args, out);
            }
            Expr::GetAttr(g) => out.push(Node::Expr(&g.expr)),
            Expr::GetItem(g) => {
                out.push(Node::Expr(&g.expr));
                out.push(Node::Expr(&g.subscript_expr));
            }
            Expr::Call(c) => {
                out.push(Node::Expr(&c.expr));
                push_args(&c.args, out);
            }
            Expr::List(l) => out.extend(l.items.iter().map(Node::Expr)),
            Expr::Map(m) => {
                out.extend(m.keys.iter().map(Node::Expr));
                out.extend(m.values.iter().map(Node::Expr));
            }
        },
    }
}

/// Refuses a syntax tree nested deeper than [`limits::MAX_TEMPLATE_NESTING`], walking it
/// without recursion.
fn check_nesting(tree: &Stmt<'_>, name: &str) -> Result<(), Error> {
    let mut stack = vec![(Node::Stmt(tree), 0usize)];
    let mut kids = Vec::new();
    while let Some((node, depth)) = stack.pop() {
        if depth > limits::MAX_TEMPLATE_NESTING {
            let span = match node {
                Node::Expr(e) => Some(e.span()),
                Node::Stmt(_) => None,
            };
            return Err(error_at(
                format!(
                    "template nested deeper than the limit of {} levels",
                    limits::MAX_TEMPLATE_NESTING
                ),
                name,
                span,
            ));
        }
        children(node, &mut kids);
        stack.extend(kids.drain(..).map(|k| (k, depth + 1)));
    }
    Ok(())
}

// ---- constant folding ----

/// What minijinja's `Expr::as_const` makes of an expression, and its cost.
#[derive(Clone)]
struct Folded {
    value: Option<Value>,
    /// The work of one `as_const` of this expression: the nodes it visits, plus the bytes
    /// made and parts walked by the operations it performs.
    cost: usize,
}

/// Evaluates every expression the code generator would fold, as it would, checking each
/// operation first.
struct Folder<'n> {
    name: &'n str,
    /// By node address: each expression is evaluated once here (the generator itself
    /// re-evaluates a subtree at every level above it that does not fold).
    memo: HashMap<usize, Folded>,
    /// The generator's folding work, modelled.
    total: usize,
}

fn konst<'s>(value: Value) -> Expr<'s> {
    Expr::Const(Spanned::new(ast::Const { value }, Span::default()))
}

/// Folds a tree as the code generator will; the folding work must fit the work budget
/// of the smallest render.
fn check_folding(tree: &Stmt<'_>, name: &str) -> Result<(), Error> {
    let mut folder = Folder {
        name,
        memo: HashMap::new(),
        total: 0,
    };
    folder.visit(Node::Stmt(tree))
}

impl Folder<'_> {
    /// Follows the code generator: it tries to fold every expression it compiles, and
    /// compiles the parts of one that does not fold.
    fn visit(&mut self, node: Node<'_, '_>) -> Result<(), Error> {
        if let Node::Expr(e) = node {
            let folded = self.fold(e)?;
            self.total = self.total.saturating_add(folded.cost);
            let most = limits::WORK_PER_OUTPUT_BYTE * limits::OUTPUT_BASE_BYTES;
            if self.total > most {
                return Err(error_at(
                    format!("constant expressions take more than the limit of {most} steps to fold"),
                    self.name,
                    Some(e.span()),
                ));
            }
            if folded.value.is_some() {
                return Ok(());
            }
        }
        let mut kids = Vec::new();
        children(node, &mut kids);
        for kid in kids {
            self.visit(kid)?;
        }
        Ok(())
    }

    /// `e.as_const()`, computed from the children's values with each operation checked.
    /// Mirrors `as_const`: which expressions fold, which operands it evaluates, and in
    /// what order; the operation itself is minijinja's (`as_const` of a node whose
    /// operands are the constants).
    fn fold(&mut self, e: &Expr<'_>) -> Result<Folded, Error> {
        let key = e as *const Expr<'_> as usize;
        if let Some(f) = self.memo.get(&key) {
            return Ok(f.clone());
        }
        let span = e.span();
        let folded = match e {
            Expr::Const(c) => Folded {
                value: Some(c.value.clone()),
                cost: 1,
            },
            // Literals of constants: as big as their text.
            Expr::List(l) => Folded {
                value: l.as_const(),
                cost: 1 + l.items.len(),
            },
            Expr::Map(m) => Folded {
                value: m.as_const(),
                cost: 1 + 2 * m.keys.len(),
            },
            Expr::UnaryOp(u) => {
                let inner = self.fold(&u.expr)?;
                // A copy: `UnaryOpKind` is not `Copy` (clippy does not see that).
                #[allow(clippy::needless_match)]
                let op = match u.op {
                    ast::UnaryOpKind::Not => ast::UnaryOpKind::Not,
                    ast::UnaryOpKind::Neg => ast::UnaryOpKind::Neg,
                };
                Folded {
                    value: inner.value.and_then(|v| {
                        Expr::UnaryOp(Spanned::new(ast::UnaryOp { op, expr: konst(v) }, span)).as_const()
                    }),
                    cost: inner.cost + 1,
                }
            }
            Expr::BinOp(b) => {
                let l = self.fold(&b.left)?;
                let r = self.fold(&b.right)?;
                let mut cost = 1 + l.cost + r.cost;
                let value = match (l.value, r.value) {
                    (Some(l), Some(r)) => {
                        let work = check_binop(b.op, &l, &r).map_err(|err| locate(err, self.name, span))?;
                        cost = cost.saturating_add(work);
                        let node = ast::BinOp {
                            op: b.op,
                            left: konst(l),
                            right: konst(r),
                        };
                        Expr::BinOp(Spanned::new(node, span)).as_const()
                    }
                    _ => None,
                };
                Folded { value, cost }
            }
            Expr::Compare(c) => {
                // `as_const` stops at the first operand that is not constant and at the
                // first comparison that is false.
                let first = self.fold(&c.expr)?;
                let mut cost = 1 + first.cost;
                let mut value = None;
                if let Some(mut left) = first.value {
                    value = Some(Value::from(true));
                    for op in &c.ops {
                        let right = self.fold(&op.expr)?;
                        cost = cost.saturating_add(right.cost);
                        let Some(right) = right.value else {
                            value = None;
                            break;
                        };
                        let work = check_compare(op.op, &left, &right).map_err(|err| locate(err, self.name, span))?;
                        cost = cost.saturating_add(work);
                        let node = ast::Compare {
                            expr: konst(left),
                            ops: vec![ast::CompareOp {
                                op: op.op,
                                expr: konst(right.clone()),
                            }],
                        };
                        match Expr::Compare(Spanned::new(node, span)).as_const() {
                            Some(v) if v.is_true() => {}
                            other => {
                                value = other;
                                break;
                            }
                        }
                        left = right;
                    }
                }
                Folded { value, cost }
            }
            Expr::Var(_)
            | Expr::Slice(_)
            | Expr::IfExpr(_)
            | Expr::Filter(_)
            | Expr::Test(_)
            | Expr::GetAttr(_)
            | Expr::GetItem(_)
            | Expr::Call(_) => Folded { value: None, cost: 1 },
        };
        self.memo.insert(key, folded.clone());
        Ok(folded)
    }
}

/// The run-time check of a binary operator minijinja folds.
fn check_binop(op: ast::BinOpKind, l: &Value, r: &Value) -> Result<usize, Error> {
    use ast::BinOpKind as K;
    match op {
        K::Add => ops::check_add(l, r),
        K::Concat => ops::check_concat(l, r),
        K::Mul => ops::check_mul(l, r),
        K::Eq => ops::check_compare(Cmp::Eq, l, r),
        K::Ne => ops::check_compare(Cmp::Ne, l, r),
        K::Lt => ops::check_compare(Cmp::Lt, l, r),
        K::Lte => ops::check_compare(Cmp::Lte, l, r),
        K::Gt => ops::check_compare(Cmp::Gt, l, r),
        K::Gte => ops::check_compare(Cmp::Gte, l, r),
        // `l in r`
        K::In => ops::check_in(l, r),
        // numbers (anything else fails in constant time), or one operand picked
        K::Sub | K::Div | K::FloorDiv | K::Rem | K::Pow | K::ScAnd | K::ScOr => Ok(1),
    }
}

/// The run-time check of one comparison of a chain minijinja folds.
fn check_compare(op: ast::CompareOpKind, l: &Value, r: &Value) -> Result<usize, Error> {
    use ast::CompareOpKind as K;
    match op {
        K::Eq => ops::check_compare(Cmp::Eq, l, r),
        K::Ne => ops::check_compare(Cmp::Ne, l, r),
        K::Lt => ops::check_compare(Cmp::Lt, l, r),
        K::Lte => ops::check_compare(Cmp::Lte, l, r),
        K::Gt => ops::check_compare(Cmp::Gt, l, r),
        K::Gte => ops::check_compare(Cmp::Gte, l, r),
        K::In | K::NotIn => ops::check_in(l, r),
    }
}

// ---- the instruction rewrite ----

fn call<'s>(op: Op, args: u16) -> Instruction<'s> {
    Instruction::CallFunction(op.function(), Some(args))
}

/// The comparison a `CompareAndPreserve` performs. minijinja does not export the type of
/// its operand, so it is read from its `Debug` name; an unknown one is refused.
fn chained_cmp(op: &impl std::fmt::Debug) -> Option<Cmp> {
    Some(match format!("{op:?}").as_str() {
        "Eq" => Cmp::Eq,
        "Ne" => Cmp::Ne,
        "Lt" => Cmp::Lt,
        "Lte" => Cmp::Lte,
        "Gt" => Cmp::Gt,
        "Gte" => Cmp::Gte,
        "In" | "NotIn" => Cmp::In,
        _ => return None,
    })
}

/// The instructions that replace `code[pc]`, jump targets moved by `target`.
fn expand<'s>(
    code: &Instructions<'s>,
    pc: u32,
    target: &dyn Fn(u32) -> Result<u32, Error>,
    out: &mut Vec<Instruction<'s>>,
) -> Result<(), Error> {
    let name = code.name();
    let here = || code.get_span(pc);
    let reserved = |var: &str| -> Result<(), Error> {
        if var.starts_with(RESERVED_PREFIX) {
            return Err(error_at(
                format!("names starting with {RESERVED_PREFIX} are reserved"),
                name,
                here(),
            ));
        }
        Ok(())
    };
    let Some(instr) = code.get(pc) else {
        return Ok(());
    };
    // No wildcard arm: an instruction added by a minijinja upgrade must be looked at here.
    match instr.clone() {
        // Template text goes through the formatter, which counts it; a safe string is
        // written as is in every auto-escape mode, as raw text is.
        Instruction::EmitRaw(text) => {
            out.push(Instruction::LoadConst(Value::from_safe_string(text.to_owned())));
            out.push(Instruction::Emit);
        }
        Instruction::Add => out.push(call(Op::Add, 2)),
        Instruction::StringConcat => out.push(call(Op::Concat, 2)),
        Instruction::Mul => out.push(call(Op::Mul, 2)),
        Instruction::Eq => out.push(call(Op::Cmp(Cmp::Eq), 2)),
        Instruction::Ne => out.push(call(Op::Cmp(Cmp::Ne), 2)),
        Instruction::Lt => out.push(call(Op::Cmp(Cmp::Lt), 2)),
        Instruction::Lte => out.push(call(Op::Cmp(Cmp::Lte), 2)),
        Instruction::Gt => out.push(call(Op::Cmp(Cmp::Gt), 2)),
        Instruction::Gte => out.push(call(Op::Cmp(Cmp::Gte), 2)),
        Instruction::In => out.push(call(Op::In, 2)),
        Instruction::GetItem => out.push(call(Op::GetItem, 2)),
        Instruction::Slice => out.push(call(Op::Slice, 4)),
        Instruction::BuildMap(pairs) => {
            let args = pairs
                .checked_mul(2)
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| error_at(format!("map literal with {pairs} entries is too long"), name, here()))?;
            out.push(call(Op::BuildMap, args));
        }
        // A chained comparison pushes its right operand back: its operands are checked
        // and handed back, then the original instruction runs.
        Instruction::CompareAndPreserve(op) => {
            let cmp =
                chained_cmp(&op).ok_or_else(|| error_at(format!("unsupported comparison {op:?}"), name, here()))?;
            out.push(call(Op::CheckChained(cmp), 2));
            out.push(Instruction::UnpackList(2));
            out.push(Instruction::CompareAndPreserve(op));
        }
        // Splats push every item on the stack (or copy every entry): counted first, then
        // handed back for the original instruction.
        Instruction::UnpackLists(lists) => {
            let n = u16::try_from(lists).map_err(|_| error_at("too many `*` arguments".into(), name, here()))?;
            out.push(call(Op::CheckSplat, n));
            out.push(Instruction::UnpackList(lists));
            out.push(Instruction::UnpackLists(lists));
        }
        Instruction::MergeKwargs(maps) => {
            let n = u16::try_from(maps).map_err(|_| error_at("too many `**` arguments".into(), name, here()))?;
            out.push(call(Op::CheckKwargsSplat, n));
            out.push(Instruction::UnpackList(maps));
            out.push(Instruction::MergeKwargs(maps));
        }
        Instruction::CallMethod("changed", args) => {
            out.push(Instruction::CallFunction(Op::Changed.function(), args));
        }
        Instruction::Jump(t) => out.push(Instruction::Jump(target(t)?)),
        Instruction::JumpIfFalse(t) => out.push(Instruction::JumpIfFalse(target(t)?)),
        Instruction::JumpIfFalseOrPop(t) => out.push(Instruction::JumpIfFalseOrPop(target(t)?)),
        Instruction::JumpIfTrueOrPop(t) => out.push(Instruction::JumpIfTrueOrPop(target(t)?)),
        Instruction::Iterate(t) => out.push(Instruction::Iterate(target(t)?)),
        Instruction::BuildMacro(macro_name, offset, flags) => {
            reserved(macro_name)?;
            out.push(Instruction::BuildMacro(macro_name, target(offset)?, flags));
        }
        // They would load templates that were not compiled here.
        Instruction::Include(_) | Instruction::LoadBlocks | Instruction::ExportLocals => {
            return Err(error_at(
                "include, import and extends are not supported in chat templates".into(),
                name,
                here(),
            ));
        }
        // Variable names: a template's own could shadow the operator functions.
        instr @ (Instruction::Lookup(var)
        | Instruction::StoreLocal(var)
        | Instruction::Enclose(var)
        | Instruction::CallFunction(var, _)) => {
            reserved(var)?;
            out.push(instr);
        }
        // Bounded by themselves, by fuel, or by the checked filters and functions they
        // call. (`Sub`, `Div`, `IntDiv`, `Rem`, `Pow` and `Neg` work on numbers: an
        // integer result that does not fit 128 bits is an error.)
        instr @ (Instruction::GetAttr(_)
        | Instruction::SetAttr(_)
        | Instruction::LoadConst(_)
        | Instruction::BuildKwargs(_)
        | Instruction::BuildList(_)
        | Instruction::UnpackList(_)
        | Instruction::Sub
        | Instruction::Div
        | Instruction::IntDiv
        | Instruction::Rem
        | Instruction::Pow
        | Instruction::Neg
        | Instruction::Not
        | Instruction::ApplyFilter(..)
        | Instruction::PerformTest(..)
        | Instruction::Emit
        | Instruction::PushLoop(_)
        | Instruction::PushWith
        | Instruction::PushDidNotIterate
        | Instruction::PopFrame
        | Instruction::PopLoopFrame
        | Instruction::PushAutoEscape
        | Instruction::PopAutoEscape
        | Instruction::BeginCapture(_)
        | Instruction::EndCapture
        | Instruction::CallMethod(..)
        | Instruction::CallObject(_)
        | Instruction::DupTop
        | Instruction::DiscardTop
        | Instruction::FastSuper
        | Instruction::FastRecurse
        | Instruction::Swap
        | Instruction::CallBlock(_)
        | Instruction::Return
        | Instruction::IsUndefined
        | Instruction::GetClosure) => out.push(instr),
    }
    Ok(())
}

/// Adds `instr` with the line and span `old[pc]` has, so that lookups by position give
/// the same answers as before.
fn push_located<'s>(new: &mut Instructions<'s>, instr: Instruction<'s>, old: &Instructions<'s>, pc: u32) {
    match (old.get_span(pc), old.get_line(pc)) {
        (Some(span), _) => new.add_with_span(instr, span),
        (None, Some(line)) => new.add_with_line(instr, u16::try_from(line).unwrap_or(u16::MAX)),
        (None, None) => new.add(instr),
    };
}

/// Rewrites one instruction stream (see the module comment). Also returns where each old
/// instruction's replacement starts (and, last, the new length).
fn rewrite<'s>(old: &Instructions<'s>) -> Result<(Instructions<'s>, Vec<u32>), Error> {
    let n = u32::try_from(old.len()).map_err(|_| Error::new(ErrorKind::InvalidOperation, "template too long"))?;
    let mut starts = Vec::with_capacity(old.len() + 1);
    let mut group = Vec::new();
    let mut next = 0u32;
    for pc in 0..n {
        starts.push(next);
        group.clear();
        expand(old, pc, &|t| Ok(t), &mut group)?;
        next += group.len() as u32;
    }
    starts.push(next);
    let moved = |t: u32| {
        starts
            .get(t as usize)
            .copied()
            .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, format!("jump target {t} out of range")))
    };
    let mut new = Instructions::new(old.name(), old.source());
    for pc in 0..n {
        group.clear();
        expand(old, pc, &moved, &mut group)?;
        for instr in group.drain(..) {
            push_located(&mut new, instr, old, pc);
        }
    }
    Ok((new, starts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat")
    }

    /// The original instructions of a template (as minijinja compiles it).
    fn original<'s>(name: &'s str, source: &'s str) -> Instructions<'s> {
        let tree = parse(source, name, SyntaxConfig, WHITESPACE).unwrap();
        let mut generator = CodeGenerator::new(name, source);
        generator.compile_stmt(&tree);
        generator.finish().0
    }

    #[test]
    fn rewrite_keeps_every_location_and_moves_every_target() {
        let mut checked = 0;
        for entry in std::fs::read_dir(fixtures()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "jinja") {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            let old = original("t", &source);
            let (new, starts) = rewrite(&old).unwrap();
            assert_eq!(*starts.last().unwrap() as usize, new.len());
            for pc in 0..old.len() as u32 {
                for i in starts[pc as usize]..starts[pc as usize + 1] {
                    assert_eq!(new.get_line(i), old.get_line(pc), "{path:?} {pc}");
                    assert_eq!(new.get_span(i), old.get_span(pc), "{path:?} {pc}");
                }
                // A jump lands on the first instruction of its target's replacement.
                let target = |instr: &Instruction| match instr {
                    Instruction::Jump(t)
                    | Instruction::JumpIfFalse(t)
                    | Instruction::JumpIfFalseOrPop(t)
                    | Instruction::JumpIfTrueOrPop(t)
                    | Instruction::Iterate(t)
                    | Instruction::BuildMacro(_, t, _) => Some(*t),
                    _ => None,
                };
                if let Some(t) = target(old.get(pc).unwrap()) {
                    let first = starts[pc as usize];
                    assert_eq!(target(new.get(first).unwrap()), Some(starts[t as usize]));
                }
            }
            checked += 1;
        }
        assert!(checked >= 7, "{checked} templates");
    }

    #[test]
    fn compare_and_preserve_names_are_known() {
        // Every chained comparison compiles (an unknown `Debug` name would be refused).
        for op in ["==", "!=", "<", "<=", ">", ">=", "in", "not in"] {
            let source = format!("{{{{ a {op} b {op} c }}}}");
            compile("t", &source).unwrap_or_else(|e| panic!("{op}: {e}"));
        }
    }
}
