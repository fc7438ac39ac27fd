//! Hostile chat templates and messages: every allocation bomb, endless loop, deep
//! recursion and oversized output ends in a one-line `Err` naming the limit it hit, never
//! an abort, a hang or a stack overflow; the real templates of tests/fixtures/chat render
//! as before.

mod common;

use common::{fixtures, ChatCase as Case};

use ffai::chat::limits::{
    MAX_FORMAT_WIDTH, MAX_INDENT, MAX_ITEMS, MAX_RECURSION, MAX_RENDER_STEPS, MAX_TEMPLATE_BYTES, MAX_TEMPLATE_NESTING,
    MAX_VALUE_DEPTH, OUTPUT_BASE_BYTES, OUTPUT_BYTES_PER_INPUT_BYTE, WORK_PER_OUTPUT_BYTE,
};
use ffai::chat::{ChatTemplate, Message, RenderOptions, TemplateSource};

const ORIGIN: &str = "chat template from GGUF tokenizer.chat_template: ";

fn user_hi() -> Vec<Message> {
    vec![Message::user("hi")]
}

fn render_with(src: &str, messages: &[Message]) -> ffai::Result<String> {
    ChatTemplate::new(src, TemplateSource::Gguf)?.render(messages, &RenderOptions::default())
}

fn render(src: &str) -> ffai::Result<String> {
    render_with(src, &user_hi())
}

/// The output cap for `messages` and default options, by the documented formula.
fn cap_for(messages: &[Message]) -> usize {
    OUTPUT_BASE_BYTES + OUTPUT_BYTES_PER_INPUT_BYTE * serde_json::to_string(messages).unwrap().len()
}

/// The render of `src` fails with a one-line error naming the template and containing
/// every one of `wants`.
#[track_caller]
fn assert_err_with(src: &str, messages: &[Message], wants: &[&str]) {
    let msg = match render_with(src, messages) {
        Ok(out) => panic!("{src}: rendered {} bytes instead of failing", out.len()),
        Err(e) => e.to_string(),
    };
    assert!(!msg.contains('\n'), "{src}: error is not one line: {msg:?}");
    assert!(
        msg.starts_with(ORIGIN),
        "{src}: error does not name the template: {msg:?}"
    );
    for w in wants {
        assert!(msg.contains(w), "{src}: error {msg:?} lacks {w:?}");
    }
}

#[track_caller]
fn assert_err(src: &str, wants: &[&str]) {
    assert_err_with(src, &user_hi(), wants)
}

fn output_limit() -> String {
    format!("output exceeds the limit of {} bytes", cap_for(&user_hi()))
}

fn items_limit() -> String {
    format!("exceed the limit of {MAX_ITEMS}")
}

fn more_items_limit() -> String {
    format!("more items than the limit of {MAX_ITEMS}")
}

fn steps_limit() -> String {
    format!("rendering exceeded the limit of {MAX_RENDER_STEPS} steps")
}

fn recursion_limit() -> String {
    format!("nesting exceeded the recursion limit of {MAX_RECURSION}")
}

#[test]
fn tojson_indent_and_size_are_bounded() {
    let indent = format!("tojson indent 100000000000 exceeds the limit of {MAX_INDENT}");
    assert_err("{{ 0|tojson(indent=100000000000) }}", &[&indent]);
    assert_err("{{ 0|tojson(false, 100000000000) }}", &[&indent]);
    assert_err(
        "{{ [1]|tojson(indent=' ' * 1000) }}",
        &[&format!("tojson indent 1000 exceeds the limit of {MAX_INDENT}")],
    );
    // The limit itself is fine.
    assert_eq!(
        render(&format!("{{{{ [1]|tojson(indent={MAX_INDENT}) }}}}")).unwrap(),
        format!("[\n{}1\n]", " ".repeat(MAX_INDENT))
    );
    assert_err(
        "{{ [1]|tojson(separators=[1, 2]) }}",
        &["separators must be a pair of strings"],
    );
    // 100k lines of 64 spaces: over the output cap while dumping, not after.
    let too_big = format!("tojson output exceeds the limit of {} bytes", cap_for(&user_hi()));
    assert_err("{{ (range(100000)|list)|tojson(indent=64) }}", &[&too_big]);
    // A long lazy list (one string shared 100k times) ends at the budget too.
    assert_err("{{ (['x' * 100] * 100000)|tojson }}", &[&too_big]);
    // A value nested deeper than the limit.
    let deep = format!(
        "{{% set ns = namespace(x=[]) %}}{{% for i in range({}) %}}{{% set ns.x = [ns.x] %}}{{% endfor %}}{{{{ ns.x|tojson }}}}",
        MAX_VALUE_DEPTH + 10
    );
    assert_err(
        &deep,
        &[&format!(
            "tojson: value nested deeper than the limit of {MAX_VALUE_DEPTH} levels"
        )],
    );
}

#[test]
fn string_and_list_repetition_are_bounded() {
    // A constant is folded while compiling, under the limits of the smallest render...
    let folded = |n: u64| format!("`*` result would be {n} bytes, over the limit of {OUTPUT_BASE_BYTES} bytes");
    assert_err("{{ 'ab' * 100000000000 }}", &[&folded(200_000_000_000)]);
    assert_err("{{ 'a' * 20000000 }}", &[&folded(20_000_000)]);
    assert_err("{{ ('a' * 20000000)|upper }}", &[&folded(20_000_000)]);
    // ...and a computed one at run time: no string bigger than the whole output may be.
    let cap = cap_for(&user_hi());
    assert_err(
        "{% set n = 20000000 %}{{ ('a' * n)|upper }}",
        &[&format!(
            "`*` result would be 20000000 bytes, over the limit of {cap} bytes"
        )],
    );

    // `list * n` is lazy, and at most MAX_ITEMS long.
    let many = format!("`*`: 1000000000000000 items exceed the limit of {MAX_ITEMS}");
    assert_err("{{ ([1] * 1000000000000000)|list }}", &[&many]);
    assert_err("{% set n = 1000000000000000 %}{{ ([1] * n)|list }}", &[&many]);
    // Every filter that walks a list takes at most MAX_ITEMS items (such a list can now
    // only come from the input).
    let long: Vec<Message> = (0..=MAX_ITEMS).map(|_| Message::user("")).collect();
    for filter in [
        "list",
        "sort",
        "unique",
        "reverse",
        "last",
        "map('string')",
        "select",
        "reject",
        "selectattr('x')",
        "rejectattr('x')",
        "groupby('x')",
        "sum",
        "min",
        "max",
        "join",
        "batch(2)",
        "slice(2)",
    ] {
        let src = format!("{{{{ messages|{filter} }}}}");
        assert_err_with(&src, &long, &[&items_limit()]);
    }
    // minijinja computes `len * n` without checking for overflow: [1, 2] * 2**63 would
    // claim to be empty while yielding 2**64 items.
    assert_err("{{ ([1, 2] * 9223372036854775808)|list }}", &[&more_items_limit()]);
    // One string shared by 100k items is 10 GB once each item is copied.
    assert_err(
        "{{ (['x' * 100000] * 100000)|map('upper')|list }}",
        &[&format!(
            "map: the list's contents exceed the limit of {} bytes",
            cap_for(&user_hi())
        )],
    );
    // Walking a long list in a loop runs out of steps.
    assert_err(
        "{% for x in [1] * 100000 %}{% for y in [1] * 100000 %}{% endfor %}{% endfor %}",
        &[&steps_limit()],
    );
    assert_err("{{ 1 is in ([1] * 1000000000000000) }}", &[&items_limit()]);
    assert_err("{{ 'a'.startswith(['b'] * 1000000000000000) }}", &[&items_limit()]);
}

#[test]
fn range_is_capped_and_loops_run_out_of_steps() {
    // minijinja's own cap on range: 100k elements.
    assert_err("{{ range(1000000000000)|list }}", &["range has too many elements"]);
    assert_err(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        &[&steps_limit()],
    );
}

#[test]
fn padding_filters_are_bounded_or_absent() {
    let width = format!("indent width 100000000000 exceeds the limit of {MAX_INDENT}");
    assert_err("{{ 'a\nb'|indent(100000000000) }}", &[&width]);
    assert_err("{{ 'a\nb'|indent(width=100000000000) }}", &[&width]);
    assert_err(
        "{{ ('a\n' * 100000)|indent(64, true) }}",
        &["indent result would be", "over the limit of"],
    );
    assert_eq!(render("{{ 'a\nb'|indent(2) }}").unwrap(), "a\n  b");

    // Jinja2 filters minijinja does not have: unknown, so nothing to bound.
    for f in [
        "center(100000000000)",
        "ljust(100000000000)",
        "rjust(100000000000)",
        "zfill(100000000000)",
        "truncate(100000000000)",
        "wordwrap(100000000000)",
        "random",
        "filesizeformat",
        "urlencode",
        "xmlattr",
        "wordcount",
        "striptags",
    ] {
        assert_err(&format!("{{{{ 'a'|{f} }}}}"), &["unknown filter"]);
    }
    // Python string methods minijinja-contrib does not have.
    for m in ["center", "ljust", "rjust", "zfill", "expandtabs"] {
        assert_err(&format!("{{{{ 'a'.{m}(100000000000) }}}}"), &["unknown method"]);
    }
    // Globals that do not exist, and minijinja's `debug` (which prints the whole state).
    for g in ["lipsum(100000000000)", "cycler(1)", "joiner()", "debug()"] {
        assert_err(&format!("{{{{ {g} }}}}"), &["unknown function"]);
    }
}

#[test]
fn format_widths_are_bounded() {
    let width = |n: &str| format!("format width or precision {n} exceeds the limit of {MAX_FORMAT_WIDTH}");
    assert_err("{{ '%1000000000000s'|format(1) }}", &[&width("1000000000000")]);
    assert_err("{{ '%.1000000000f'|format(1.5) }}", &[&width("1000000000")]);
    assert_err("{{ '%(a)1000000000s'|format({'a': 1}) }}", &[&width("1000000000")]);
    assert_err("{{ '{:>1000000000}'.format(1) }}", &[&width("1000000000")]);
    assert_err("{{ '{:.1000000000f}'.format(1.5) }}", &[&width("1000000000")]);
    assert_err(
        "{{ '{0:x>99999999999999999999}'.format(1) }}",
        &[&width("99999999999999999999")],
    );
    // A spec printing a big argument many times.
    assert_err(
        "{{ ('{0}' * 2000).format('x' * 1000) }}",
        &["format result would be", "over the limit of"],
    );
    // Jinja's `%` operator on strings is not supported by minijinja at all.
    assert_err("{{ '%1000000000s' % 1 }}", &["operator"]);
    // Ordinary formatting still works.
    assert_eq!(
        render(
            "{{ '%5d|%-4s|%.2f'|format(42, 'ab', 3.14159) }}/{{ '{:>5}|{:.2f}|{name}'.format(42, 3.14159, name='n') }}"
        )
        .unwrap(),
        "   42|ab  |3.14/   42|3.14|n"
    );
}

#[test]
fn join_replace_split_and_count_are_bounded() {
    let cap = format!("the limit of {} bytes", cap_for(&user_hi()));
    assert_err(
        "{{ (range(100000)|list)|join('x' * 100) }}",
        &["join result would", &cap],
    );
    assert_err(
        "{{ ('x' * 100).join(range(100000)|list) }}",
        &["join result would", &cap],
    );
    assert_err(
        "{{ ('a' * 1000)|replace('', 'b' * 10000) }}",
        &["replace result would be", "over the limit of"],
    );
    assert_err(
        "{{ ('a' * 1000).replace('a', 'b' * 10000) }}",
        &["replace result would be", "over the limit of"],
    );
    assert_err("{{ ('a' * 200000)|split('')|length }}", &[&more_items_limit()]);
    assert_err("{{ ('a' * 200000).split('a')|length }}", &[&more_items_limit()]);
    assert_err("{{ ('\n' * 200000).splitlines()|length }}", &[&more_items_limit()]);
    // Ordinary use is unchanged; `count('')` used to loop forever.
    assert_eq!(
        render("{{ ['a', 'b']|join(', ') }}|{{ '-'.join(['a', 'b']) }}|{{ 'a-b'|replace('-', '+') }}|{{ 'a-b-c'.replace('-', '+', 1) }}|{{ 'a b  c'.split()|join(',') }}|{{ 'abc'.count('') }}|{{ 'aaaa'.count('aa') }}")
            .unwrap(),
        "a, b|a-b|a+b|a+b-c|a,b,c|4|2"
    );
}

#[test]
fn batch_and_slice_counts_are_bounded() {
    let count = |f: &str| format!("{f} count 1000000000000 exceeds the limit of {MAX_ITEMS}");
    assert_err("{{ [1]|batch(1000000000000) }}", &[&count("batch")]);
    assert_err("{{ [1]|batch(1000000000000, 'x') }}", &[&count("batch")]);
    assert_err("{{ [1, 2, 3]|slice(1000000000000) }}", &[&count("slice")]);
    assert_eq!(
        render("{{ [1, 2, 3]|batch(2, 0)|list }}|{{ [1, 2, 3]|slice(2)|list }}").unwrap(),
        "[[1, 2], [3, 0]]|[[1, 2], [3]]"
    );
}

#[test]
fn values_that_double_per_step_are_refused() {
    // `chain` with itself doubles a list per step.
    assert_err(
        "{% set ns = namespace(x=[1]) %}{% for i in range(40) %}{% set ns.x = ns.x|chain(ns.x) %}{% endfor %}",
        &[&format!("chain: {}", more_items_limit())],
    );
    // `[x, x]` shares its parts: 64 steps print 2**64 times bigger.
    let shared = "{% set ns = namespace(x=[1]) %}{% for i in range(64) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}";
    assert_err(&format!("{shared}{{{{ ns.x }}}}"), &[&output_limit()]);
    let cap = cap_for(&user_hi());
    for (f, what) in [("string", "string"), ("pprint", "pprint")] {
        assert_err(
            &format!("{shared}{{{{ ns.x|{f} }}}}"),
            &[what, &format!("the limit of {cap} bytes")],
        );
    }
    assert_err(&format!("{shared}{{{{ ns.x|tojson }}}}"), &["tojson output exceeds"]);
    assert_err(
        &format!("{shared}{{{{ '%s'|format(ns.x) }}}}"),
        &["format argument would exceed"],
    );
    assert_err(
        &format!("{shared}{{{{ raise_exception(ns.x) }}}}"),
        &["raise_exception message would exceed"],
    );
    // zip of a list with itself, likewise.
    let zipped = "{% set ns = namespace(x=[1]) %}{% for i in range(64) %}{% set ns.x = ns.x|zip(ns.x) %}{% endfor %}";
    assert_err(&format!("{zipped}{{{{ ns.x }}}}"), &[&output_limit()]);
}

#[test]
fn output_is_capped_captured_output_included() {
    assert_err(
        "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
        &[&output_limit()],
    );
    // Template text (not an expression) is caught by the writer.
    let raw = format!("{{% for i in range(100000) %}}{}{{% endfor %}}", "x".repeat(100));
    assert_err(&raw, &[&output_limit()]);
    // Output captured and never printed still counts.
    assert_err(
        "{% set s %}{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}{% endset %}ok",
        &[&output_limit()],
    );
    // A macro doubling its captured output per level.
    assert_err(
        "{% macro f(n) %}{% if n > 0 %}{% set s = f(n - 1) %}{{ s }}{{ s }}{% else %}x{% endif %}{% endmacro %}{% set r = f(60) %}{{ r|length }}",
        &[&output_limit()],
    );

    // The cap grows with the input: a 3 MB message renders, even printed several times...
    let big = [Message::user("é".repeat(1_500_000))];
    let out = ChatTemplate::fallback("chatml")
        .unwrap()
        .render(&big, &RenderOptions::default())
        .unwrap();
    assert_eq!(out.len(), 3_000_000 + "<|im_start|>user\n<|im_end|>\n".len());
    let x2 = "{% for i in range(2) %}{{ messages[0].content|tojson(ensure_ascii=true) }}{% endfor %}";
    assert_eq!(render_with(x2, &big).unwrap().len(), 2 * (6 * 1_500_000 + 2));
    // ...but not without bound.
    let x20 = "{% for i in range(20) %}{{ messages[0].content }}{% endfor %}";
    assert_err_with(
        x20,
        &big,
        &[&format!("output exceeds the limit of {} bytes", cap_for(&big))],
    );
}

#[test]
fn repeated_allowed_work_runs_out_of_budget() {
    let work = format!(
        "filters, methods and operators made or walked more than the limit of {} bytes and items",
        WORK_PER_OUTPUT_BYTE * cap_for(&user_hi())
    );
    // Each call is allowed (20 kB), fifty thousand of them are not (1 GB).
    assert_err(
        "{{ (['a'] * 50000)|map('replace', '', 'b' * 10000)|list|length }}",
        &[&work],
    );
    assert_err(
        "{% set s = 'x' * 500000 %}{% for i in range(100000) %}{% set t = s|upper %}{% endfor %}",
        &[&work],
    );
    // Each test walks the whole list: 10**10 comparisons.
    assert_err(
        "{% set big = range(100000)|list %}{{ big|select('in', big)|list|length }}",
        &[&work],
    );
    // Reading a big string once per step: fuel alone would allow 10**12 bytes.
    assert_err(
        "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{{ s.count('y') }}{% endfor %}",
        &[&work],
    );
    assert_err(
        "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{{ s|length }}{% endfor %}",
        &[&work],
    );
    assert_err("{{ ('x' * 200000)|list|length }}", &[&more_items_limit()]);
    assert_eq!(
        render("{{ 'abc'|list|join(',') }}|{{ 'abc'|reverse }}|{{ 'abc'|length }}").unwrap(),
        "a,b,c|cba|3"
    );
}

#[test]
fn recursion_is_bounded() {
    let limit = recursion_limit();
    assert_err("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", &[&limit]);
    assert_err("{% macro f(s) %}{{ f(s ~ 'x') }}{% endmacro %}{{ f('') }}", &[&limit]);
    assert_err("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}", &[&limit]);
    assert_err("{% for x in [1] recursive %}{{ loop([x, x]) }}{% endfor %}", &[&limit]);
    // Other templates would not be compiled under the limits; chat templates have none.
    let unsupported = "include, import and extends are not supported in chat templates";
    assert_err("{% include 'chat_template' %}", &[unsupported]);
    assert_err("{% import 'chat_template' as m %}", &[unsupported]);
    assert_err("{% from 'chat_template' import f %}", &[unsupported]);
    assert_err("{% extends 'chat_template' %}", &[unsupported]);
    // Recursion a real template might do (printing a nested schema) is fine.
    let nested = "{% macro show(v) %}{% if v is mapping %}({% for k, x in v|items %}{{ k }}={{ show(x) }}{% endfor %}){% else %}{{ v }}{% endif %}{% endmacro %}\
        {% set ns = namespace(v=1) %}{% for i in range(30) %}{% set ns.v = {'k': ns.v} %}{% endfor %}{{ show(ns.v) }}";
    assert_eq!(
        render(nested).unwrap(),
        format!("{}1{}", "(k=".repeat(30), ")".repeat(30))
    );
}

#[test]
fn deep_values_neither_print_nor_overflow_the_stack() {
    let build = |depth: usize| {
        // 50 levels per step of the loop, 50 being well inside the parser's nesting limit.
        format!(
            "{{% set ns = namespace(x=[]) %}}{{% for i in range({}) %}}{{% set ns.x = {}ns.x{} %}}{{% endfor %}}",
            depth / 50,
            "[".repeat(50),
            "]".repeat(50)
        )
    };
    let deep = format!("value nested deeper than the limit of {MAX_VALUE_DEPTH} levels");
    let shallow = build(MAX_VALUE_DEPTH * 2);
    assert_err(&format!("{shallow}{{{{ ns.x }}}}"), &[&format!("output: {deep}")]);
    assert_err(
        &format!("{shallow}{{{{ ns.x|string }}}}"),
        &[&format!("string: {deep}")],
    );
    assert_err(&format!("{shallow}{{{{ [ns.x]|sort }}}}"), &[&format!("sort: {deep}")]);
    // 100k levels: comparing or printing such a value recurses per level in minijinja,
    // so the operators refuse it...
    let deep_value = build(100_000);
    assert_err(
        &format!("{deep_value}{{{{ ns.x == [ns.x] }}}}"),
        &[&format!("`==` operand: {deep}")],
    );
    assert_err(&format!("{deep_value}{{{{ ns.x ~ '' }}}}"), &[&format!("`~`: {deep}")]);
    // ...and dropping it, which would overflow an ordinary 8 MiB stack, happens on the
    // render's own thread, which has room.
    assert_eq!(render(&format!("{deep_value}{{{{ ns.x|length }}}}")).unwrap(), "1");
}

/// `src` fails, quickly, naming the limit (and the process survives: an abort or an
/// exhausted memory would end the whole test binary).
#[track_caller]
fn assert_err_fast(src: &str, wants: &[&str]) {
    let start = std::time::Instant::now();
    assert_err(src, wants);
    let took = start.elapsed();
    assert!(took.as_secs() < 10, "{src}: took {took:?}");
}

#[test]
fn string_and_list_operators_are_bounded() {
    let cap = cap_for(&user_hi());
    // Doubling a string per step (2**64 bytes after 64 steps).
    let doubling = |op: &str| {
        format!("{{% set ns = namespace(s='x') %}}{{% for i in range(64) %}}{{% set ns.s = ns.s {op} ns.s %}}{{% endfor %}}")
    };
    assert_err_fast(&doubling("~"), &[&format!("`~` would exceed the limit of {cap} bytes")]);
    assert_err_fast(
        &doubling("+"),
        &["`+` result would be", &format!("over the limit of {cap} bytes")],
    );
    // Doubling a list per step.
    assert_err_fast(
        "{% set ns = namespace(x=[1]) %}{% for i in range(64) %}{% set ns.x = ns.x + ns.x %}{% endfor %}",
        &[&format!("`+`: 131072 items exceed the limit of {MAX_ITEMS}")],
    );
    // Repetition, folded while compiling or computed at run time.
    assert_err_fast(
        "{{ 'x' * 10**8 }}",
        &[&format!(
            "`*` result would be 100000000 bytes, over the limit of {OUTPUT_BASE_BYTES} bytes"
        )],
    );
    assert_err_fast(
        "{% set n = 10**8 %}{{ 'x' * n }}",
        &[&format!(
            "`*` result would be 100000000 bytes, over the limit of {cap} bytes"
        )],
    );
    let huge = format!("`*`: 4611686018427387904 items exceed the limit of {MAX_ITEMS}");
    for use_it in ["l|length", "l == l", "1 in l", "l[5]", "l[1:]", "l + [1]"] {
        assert_err_fast(&format!("{{% set l = [1] * 2**62 %}}{{{{ {use_it} }}}}"), &[&huge]);
        assert_err_fast(
            &format!("{{% set n = 2**62 %}}{{% set l = [1] * n %}}{{{{ {use_it} }}}}"),
            &[&huge],
        );
    }
    // What the limits allow still works.
    assert_eq!(
        render("{{ ('ab' * 3) ~ '|' ~ ([1, 2] * 2)|join(',') ~ '|' ~ ([1] + [2])|length ~ '|' ~ 'x' + 'y' }}").unwrap(),
        "ababab|1,2,1,2|2|xy"
    );
}

#[test]
fn a_namespace_containing_itself_is_refused() {
    let cyclic = "{% set a = namespace() %}{% set a.me = a %}{% set b = namespace() %}{% set b.me = b %}";
    let deep = format!("value nested deeper than the limit of {MAX_VALUE_DEPTH} levels");
    for (expr, what) in [
        ("a == b", "`==` operand"),
        ("a != b", "`!=` operand"),
        ("a < b", "`<` operand"),
        ("a == a", "`==` operand"),
        ("a == b == a", "`==` operand"),
        ("a ~ ''", "`~`"),
        ("'' ~ a", "`~`"),
        ("a in [b]", "`in` operand"),
        ("a in {}", "`in` operand"),
        ("a in 'text'", "`in` operand"),
        ("{a: 1}", "map literal key"),
        ("{}[a]", "`[]` key"),
        ("{'k': 1}.get(a)", "get key"),
        ("a is eq(b)", "`==` operand"),
        ("{'x': a, 'y': b}|dictsort(by='value')", "dictsort"),
        ("a|string", "string"),
    ] {
        assert_err_fast(&format!("{cyclic}{{{{ {expr} }}}}"), &[&format!("{what}: {deep}")]);
    }
    assert_err_fast(
        &format!("{cyclic}{{% for i in [1, 2] %}}{{{{ loop.changed(a) }}}}{{% endfor %}}"),
        &[&format!("loop.changed argument: {deep}")],
    );
}

#[test]
fn comparing_values_with_shared_parts_is_bounded() {
    // 64 steps make values that print 2**64 times bigger than their memory.
    let shared = "{% set ns = namespace(x=[1], y=[1]) %}{% for i in range(64) %}{% set ns.x = [ns.x, ns.x] %}{% set ns.y = [ns.y, ns.y] %}{% endfor %}";
    let cap = cap_for(&user_hi());
    for (expr, what) in [
        ("ns.x == ns.y", "`==` operand"),
        ("ns.x != ns.y", "`!=` operand"),
        ("ns.x < ns.y", "`<` operand"),
        ("ns.x >= ns.y", "`>=` operand"),
        ("ns.x < ns.y < ns.x", "`<` operand"),
        ("ns.x in [ns.y]", "`in` operand"),
        ("ns.x in 'text'", "`in` operand"),
        ("ns.x in {}", "`in` operand"),
        ("{}[ns.x]", "`[]` key"),
        ("{ns.x: 1}", "map literal key"),
        ("ns.x ~ ''", "`~`"),
        ("ns.x is eq(ns.y)", "`==` operand"),
    ] {
        assert_err_fast(
            &format!("{shared}{{{{ {expr} }}}}"),
            &[&format!("{what} would exceed the limit of {cap} bytes")],
        );
    }
    // Looking for a small value costs what comparing with it costs.
    assert_eq!(render(&format!("{shared}{{{{ [1] in ns.x }}}}")).unwrap(), "False");
    // Small values compare as always.
    assert_eq!(
        render("{% set x = [[1], [1]] %}{{ x == [[1], [1]] }}|{{ [1] in x }}|{{ x < [[2]] }}").unwrap(),
        "True|True|True"
    );
}

#[test]
fn template_text_counts_against_the_output_cap() {
    let text = "x".repeat(10_000);
    let limit = output_limit();
    // Printed, captured and never printed, or captured by a macro.
    assert_err_fast(
        &format!("{{% for i in range(100000) %}}{text}{{% endfor %}}"),
        &[&limit],
    );
    assert_err_fast(
        &format!("{{% set s %}}{{% for i in range(100000) %}}{text}{{% endfor %}}{{% endset %}}ok"),
        &[&limit],
    );
    assert_err_fast(
        &format!(
            "{{% macro m() %}}{{% for i in range(100000) %}}{text}{{% endfor %}}{{% endmacro %}}{{% set s = m() %}}ok"
        ),
        &[&limit],
    );
    // Text still renders as written, in every auto-escape mode.
    assert_eq!(
        render("a<b>&{% autoescape true %}<i>{{ '<' }}</i>{% endautoescape %}").unwrap(),
        "a<b>&<i>&lt;</i>"
    );
}

#[test]
fn deep_or_costly_syntax_is_refused_while_compiling() {
    let nested = format!("template nested deeper than the limit of {MAX_TEMPLATE_NESTING} levels");
    // minijinja parses chains in a loop but compiles and drops them recursively: 100k
    // levels used to overflow the stack of the caller of `ChatTemplate::new`.
    for chain in ["+x", "|trim", ".a", "[0]", "~'a'"] {
        assert_err_fast(&format!("{{{{ x{} }}}}", chain.repeat(100_000)), &[&nested]);
    }
    // A constant subexpression is folded again at every level above it that does not
    // fold: quadratic, and refused past the work budget of the smallest render.
    let fold = format!(
        "constant expressions take more than the limit of {} steps to fold",
        WORK_PER_OUTPUT_BYTE * OUTPUT_BASE_BYTES
    );
    assert_err_fast(&"{{ 'x' * 1000000 }}".repeat(20), &[&fold]);
    // A chain just inside the nesting limit compiles (its folding fails at the bottom,
    // so every level is tried) and runs as before.
    let chain = format!("{{{{ none{} }}}}", "+1".repeat(MAX_TEMPLATE_NESTING - 10));
    assert_err_fast(
        &chain,
        &["tried to use + operator on unsupported types none and number"],
    );
    // Names the compiled template uses for its checked operators are reserved.
    assert_err(
        "{% set __ffai_add = 1 %}",
        &["names starting with __ffai_ are reserved"],
    );
    assert_err("{{ __ffai_add(1, 2) }}", &["names starting with __ffai_ are reserved"]);
}

#[test]
fn lazy_lists_are_not_walked_again_and_again() {
    // Each lookup walks a lazy list up to the index: counted as work.
    let work = format!(
        "filters, methods and operators made or walked more than the limit of {} bytes and items",
        WORK_PER_OUTPUT_BYTE * cap_for(&user_hi())
    );
    assert_err_fast(
        "{% set l = [1] * 100000 %}{% for i in range(100000) %}{{ l[99999] }}{% endfor %}",
        &[&work],
    );
    // A reversed slice is collected once, not on every test of its truth.
    assert_err_fast(
        "{% set r = (range(100000)|list)[::-1] %}{% for i in range(100000) %}{% for j in range(10) %}{% if r %}{% endif %}{% endfor %}{% endfor %}",
        &[&steps_limit()],
    );
    // A splat pushes every item of its list (or copies every entry of its map): counted
    // as work.
    assert_err_fast(
        "{% set big = range(100000)|list %}{% for i in range(100000) %}{{ loop.cycle(*big) }}{% endfor %}",
        &[&work],
    );
    let keys: serde_json::Map<String, serde_json::Value> =
        (0..100_000).map(|i| (format!("k{i}"), serde_json::json!(i))).collect();
    let opts = RenderOptions {
        tools: Some(serde_json::Value::Object(keys)),
        ..RenderOptions::default()
    };
    let splat = "{% for i in range(100000) %}{{ loop.cycle(**tools) is none }}{% endfor %}";
    let start = std::time::Instant::now();
    let err = ChatTemplate::new(splat, TemplateSource::Gguf)
        .unwrap()
        .render(&user_hi(), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("filters, methods and operators made or walked more than"),
        "{err}"
    );
    assert!(start.elapsed().as_secs() < 10);
    // So does copying a map per step.
    assert_err_fast(
        "{% set ns = namespace(d={}) %}{% for i in range(100000) %}{% set ns.d = dict(ns.d, **{'k' ~ i: i}) %}{% endfor %}",
        &[&work],
    );
    assert_eq!(
        render("{% set r = [1, 2, 3][::-1] %}{{ r|length }}|{{ r[0] }}|{{ r|join(',') }}|{{ r is iterable }}|{{ [1, 2, 3, 4][1::2]|list }}").unwrap(),
        "3|3|3,2,1|True|[2, 4]"
    );
}

#[test]
fn panics_become_one_line_errors() {
    // minijinja 2.24 divides by the argument count of loop.cycle().
    assert_err(
        "{% for x in [1] %}{{ loop.cycle() }}{% endfor %}",
        &["rendering panicked"],
    );
}

#[test]
fn template_size_is_capped() {
    let src = "x".repeat(MAX_TEMPLATE_BYTES + 1);
    let err = ChatTemplate::new(&src, TemplateSource::Gguf).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{ORIGIN}{} bytes exceed the limit of {MAX_TEMPLATE_BYTES} bytes",
            MAX_TEMPLATE_BYTES + 1
        )
    );
    // Nesting too deep for the parser is a syntax error, not a stack overflow.
    let nested = format!("{{{{ {}1{} }}}}", "(".repeat(10_000), ")".repeat(10_000));
    let err = ChatTemplate::new(&nested, TemplateSource::Gguf)
        .unwrap_err()
        .to_string();
    assert!(err.contains("syntax error"), "{err}");
}

#[test]
fn message_content_is_data() {
    // Template syntax in a message is printed, not run.
    let text = "{{ 'a' * 100000000000 }}{% for i in range(100000) %}{% endfor %}";
    assert_eq!(
        render_with("{{ messages[0].content }}", &[Message::user(text)]).unwrap(),
        text
    );
    // Deeply nested JSON parts (as deep as serde_json parses) dump fine.
    let mut part = serde_json::json!("x");
    for _ in 0..120 {
        part = serde_json::json!([part]);
    }
    let msgs = [Message {
        content: ffai::chat::Content::Parts(vec![serde_json::json!({"type": "text", "text": part})]),
        ..Message::user("")
    }];
    let out = render_with("{{ messages|tojson }}", &msgs).unwrap();
    // the list of messages, the list of parts, then the 120 levels
    assert_eq!(out.matches('[').count(), 122);
}

#[test]
fn real_templates_render_as_before_and_at_length() {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    let mut templates = std::collections::BTreeMap::new();
    let mut checked = 0;
    for c in &cases {
        let tmpl = templates.entry(c.template.clone()).or_insert_with(|| {
            let path = fixtures().join(format!("{}.jinja", c.template));
            let src = std::fs::read_to_string(&path).unwrap();
            ChatTemplate::new(&src, TemplateSource::ChatTemplateJinja(path)).unwrap()
        });
        // Cases with today's date are compared in chat_template.rs.
        let (Some(want), None) = (&c.expected, &c.today_format) else {
            continue;
        };
        let opts = RenderOptions {
            add_generation_prompt: c.add_generation_prompt,
            bos_token: c.bos_token.clone(),
            eos_token: c.eos_token.clone(),
            tools: c.tools.clone(),
            enable_thinking: c.enable_thinking,
            extra: Vec::new(),
        };
        let got = tmpl.render(&c.messages, &opts).unwrap();
        assert_eq!(&got, want, "{}/{}", c.template, c.case);
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} cases compared");

    // A long conversation (4000 turns of a few KiB) stays inside every limit.
    let turns: Vec<Message> = (0..4000)
        .map(|i| {
            let text = format!("turn {i} {}", "lorem ipsum ".repeat(200));
            if i % 2 == 0 {
                Message::user(text)
            } else {
                Message::assistant(text)
            }
        })
        .collect();
    for (name, tmpl) in &templates {
        let out = tmpl
            .render(&turns, &RenderOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(out.contains("turn 3999 lorem"), "{name}");
    }
}
