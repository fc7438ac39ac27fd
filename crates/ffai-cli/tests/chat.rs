//! `ffai chat` in a real pseudo-terminal, on the real SmolLM2 checkpoint (greedy): what
//! a person typing at it would see.

use std::path::PathBuf;
use std::process::Command;

use rexpect::process::wait::WaitStatus;
use rexpect::reader::Options;
use rexpect::session::PtySession;

fn smollm2() -> String {
    let dir = std::env::var_os("FFAI_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/ffai/models"));
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh first",
        p.display()
    );
    p.display().to_string()
}

fn spawn_chat(max_tokens: &str) -> PtySession {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ffai"));
    cmd.args([
        "chat",
        "-m",
        &smollm2(),
        "--temperature",
        "0",
        "--max-tokens",
        max_tokens,
    ]);
    rexpect::spawn_with_options(
        cmd,
        Options {
            timeout_ms: Some(60_000),
            strip_ansi_escape_codes: true,
        },
    )
    .expect("spawning ffai chat in a pty")
}

/// One turn's stats line: (prompt tokens, computed, reused, reply tokens, whole line).
struct Stats {
    prompt: usize,
    computed: usize,
    reused: usize,
    reply: usize,
    line: String,
}

/// Types `line` at the prompt, waits for the answer's stats line, and returns the
/// streamed answer (what the screen showed between the typed line and the stats).
fn turn(p: &mut PtySession, line: &str) -> (String, Stats) {
    p.exp_string("> ").expect("the prompt marker");
    p.send_line(line).unwrap();
    let (before, stats) = p
        .exp_regex(
            r"\[prompt \d+ tokens: \d+ computed, \d+ reused, [0-9.]+ tok/s \| reply \d+ tokens, [0-9.]+ tok/s[^\]]*\]",
        )
        .expect("a stats line after the answer");
    // The terminal echoes the typed line first; the answer follows it.
    let at = before
        .find(line)
        .unwrap_or_else(|| panic!("typed line not echoed: {before:?}"));
    let answer = before[at + line.len()..].trim().to_string();
    (answer, parse_stats(&stats))
}

fn parse_stats(line: &str) -> Stats {
    let nums: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter(|w| !w.is_empty() && !w.contains('.'))
        .map(|w| w.parse().unwrap())
        .collect();
    // prompt N, computed C, reused R, (tok/s is a decimal and skipped), reply T.
    assert!(nums.len() >= 4, "{line}");
    Stats {
        prompt: nums[0],
        computed: nums[1],
        reused: nums[2],
        reply: nums[3],
        line: line.to_string(),
    }
}

fn assert_exit_0(p: &mut PtySession) {
    p.exp_eof().expect("ffai chat to end");
    match p.process().wait() {
        Ok(WaitStatus::Exited(_, code)) => assert_eq!(code, 0, "exit code"),
        other => panic!("ffai chat did not exit cleanly: {other:?}"),
    }
}

#[test]
fn two_turns_stream_answers_and_the_second_reuses_the_first() {
    let mut p = spawn_chat("24");
    let (a1, s1) = turn(&mut p, "Name a color.");
    assert!(!a1.is_empty(), "empty first answer");
    assert_eq!((s1.computed, s1.reused), (s1.prompt, 0), "{}", s1.line);
    assert!(s1.reply > 0 && s1.reply <= 24, "{}", s1.line);
    let (a2, s2) = turn(&mut p, "Name another one.");
    assert!(!a2.is_empty(), "empty second answer");
    // Turn 2's prompt is the whole conversation, but only its tail was computed.
    assert!(s2.prompt > s1.prompt + s1.reply.min(1), "{} / {}", s1.line, s2.line);
    assert!(s2.computed < s2.prompt, "{}", s2.line);
    assert!(
        s2.reused >= s1.prompt,
        "turn 2 reused less than turn 1's prompt: {}",
        s2.line
    );
    assert_eq!(s2.computed + s2.reused, s2.prompt);
    p.exp_string("> ").unwrap();
    p.send_line("/exit").unwrap();
    assert_exit_0(&mut p);
}

#[test]
fn reset_forgets_the_conversation_and_ctrl_d_exits() {
    let mut p = spawn_chat("16");
    let (_, s1) = turn(&mut p, "Name a color.");
    p.exp_string("> ").unwrap();
    p.send_line("/reset").unwrap();
    p.exp_string("(conversation cleared)").unwrap();
    // The same first message again: a fresh conversation of the same length, all
    // computed (the cache was cleared too).
    let (a, s2) = turn(&mut p, "Name a color.");
    assert!(!a.is_empty());
    assert_eq!(s2.prompt, s1.prompt, "{} / {}", s1.line, s2.line);
    assert_eq!((s2.computed, s2.reused), (s2.prompt, 0), "{}", s2.line);
    p.exp_string("> ").unwrap();
    p.send_control('d').unwrap();
    assert_exit_0(&mut p);
}

#[test]
fn ctrl_c_clears_the_line_and_stops_an_answer_but_not_the_program() {
    let mut p = spawn_chat("2000");
    p.exp_string("> ").unwrap();
    // Ctrl-C at the prompt drops the half-typed line, so the next line is all the
    // message: its prompt is as long as the same message sent after /reset below.
    p.send("half a thought").unwrap();
    p.flush().unwrap();
    p.exp_string("half a thought").unwrap();
    p.send_control('c').unwrap();
    let (_, s0) = turn(&mut p, "Name a color.");
    p.exp_string("> ").unwrap();
    p.send_line("/reset").unwrap();
    p.exp_string("(conversation cleared)").unwrap();
    let (_, s0_again) = turn(&mut p, "Name a color.");
    assert_eq!(s0.prompt, s0_again.prompt, "{} / {}", s0.line, s0_again.line);

    // Greedy SmolLM2 tells this story until max tokens (2000, ~30 s): Ctrl-C once it
    // streams stops it.
    p.exp_string("> ").unwrap();
    let ask = "Write a very long story about a dragon.";
    p.send_line(ask).unwrap();
    p.exp_string(ask).unwrap();
    p.exp_regex(r"\S+\s+\S+\s+\S+").expect("the answer to start streaming");
    p.send_control('c').unwrap();
    let (_, stats) = p
        .exp_regex(r"\[prompt [^\]]*\]")
        .expect("a stats line after the stopped answer");
    let s1 = parse_stats(&stats);
    assert!(s1.line.contains("interrupted"), "{}", s1.line);
    assert!(s1.reply > 0 && s1.reply < 2000, "{}", s1.line);
    // The program goes on, and the stopped answer stays in the conversation: the next
    // prompt holds it, reused from the cache rather than recomputed.
    let (a2, s2) = turn(&mut p, "Thanks.");
    assert!(!a2.is_empty());
    assert!(s2.prompt > s1.prompt + s1.reply / 2, "{} / {}", s1.line, s2.line);
    assert!(s2.reused >= s1.prompt, "{}", s2.line);
    p.exp_string("> ").unwrap();
    p.send_line("/exit").unwrap();
    assert_exit_0(&mut p);
}

#[test]
fn piped_stdin_needs_no_terminal() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ffai"))
        .args(["chat", "-m", &smollm2(), "--temperature", "0", "--max-tokens", "12"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Name a color.\nName another one.\n")
        .unwrap();
    // End of input ends the program.
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    let stats: Vec<Stats> = err
        .lines()
        .filter(|l| l.starts_with("[prompt"))
        .map(parse_stats)
        .collect();
    assert_eq!(stats.len(), 2, "{err}");
    assert!(stats[1].reused >= stats[0].prompt, "{err}");
    // No escape codes when nothing is a terminal; one answer line per turn.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains('\x1b') && !err.contains('\x1b'), "{text}{err}");
    assert!(text.lines().filter(|l| !l.trim().is_empty()).count() >= 2, "{text}");
}

#[test]
fn generate_json_reports_reasoning_and_answer_apart() {
    let out = Command::new(env!("CARGO_BIN_EXE_ffai"))
        .args(["generate", "-m", &smollm2(), "--chat", "-p", "Name a color."])
        .args(["--temperature", "0", "--max-tokens", "8", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // SmolLM2 does not think: all of it is answer.
    assert_eq!(j["reasoning"], "");
    assert_eq!(j["answer"], j["text"]);
    assert_eq!(j["reasoning_tokens"], 0);
    assert_eq!(j["answer_tokens"], j["generated_ids"].as_array().unwrap().len());
}

const WEATHER_TOOLS: &str = r#"[{"type": "function", "function": {"name": "get_weather",
  "description": "The current weather in a city.",
  "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"]}}},
 {"type": "function", "function": {"name": "search", "description": "Search the web.",
  "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 30}},
    "required": ["query"]}}}]"#;

/// `ffai chat --tools` with stdin piped: (exit success, stdout, stderr).
fn chat_with_tools(tools: &str, extra: &[&str], input: &str) -> (bool, String, String) {
    use std::io::Write;
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ffai-chat-tools-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tools.json");
    std::fs::write(&file, tools).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ffai"))
        .args(["chat", "-m", &smollm2(), "--temperature", "0", "--max-tokens", "60"])
        .arg("--tools")
        .arg(&file)
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The program may exit (a bad flag) before reading anything.
    let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The calls shown on stdout: (name, arguments as JSON).
fn shown_calls(stdout: &str) -> Vec<(String, serde_json::Value)> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("[tool call] "))
        .map(|l| {
            let (name, args) = l.split_once(' ').unwrap();
            (
                name.to_string(),
                serde_json::from_str(args).unwrap_or_else(|e| panic!("{l}: {e}")),
            )
        })
        .collect()
}

#[test]
fn chat_with_tools_shows_forced_calls_and_reads_their_results() {
    // A named function is called once; "required" may make parallel calls (greedy
    // SmolLM2 makes two), each result its own line.
    let result = "{\"temp_c\": 21, \"sky\": \"clear\"}\n";
    for (choice, name, results) in [("get_weather", "get_weather", 1), ("required", "", 2)] {
        let input = format!("What is the weather in Paris?\n{}", result.repeat(results));
        let (ok, out, err) = chat_with_tools(WEATHER_TOOLS, &["--tool-choice", choice], &input);
        assert!(ok, "{choice}: {err}");
        let calls = shown_calls(&out);
        // The forced first reply is a call (the named one), with arguments valid for
        // its schema.
        assert!(!calls.is_empty(), "{choice}: {out}");
        let (called, args) = &calls[0];
        if !name.is_empty() {
            assert_eq!(called, name, "{out}");
        }
        match called.as_str() {
            "get_weather" => assert!(args["city"].is_string(), "{out}"),
            "search" => assert!(args["query"].is_string(), "{out}"),
            other => panic!("{choice}: called {other}: {out}"),
        }
        assert_eq!(args.as_object().unwrap().len(), 1, "{out}");
        // Its result was asked for and read, and the model went on from it: a second
        // reply reusing the first prompt's cache.
        let asked = err.lines().filter(|l| l.starts_with("(the result of ")).count();
        assert!(asked >= calls.len().min(results), "{err}");
        assert!(
            err.contains(&format!("(the result of {called}: one line of text or JSON)")),
            "{err}"
        );
        let stats: Vec<Stats> = err
            .lines()
            .filter(|l| l.starts_with("[prompt"))
            .map(parse_stats)
            .collect();
        assert!(stats.len() >= 2, "{choice}: {err}");
        assert!(stats[1].prompt > stats[0].prompt, "{err}");
        assert!(stats[1].reused >= stats[0].prompt, "{err}");
        // No raw call syntax on the screen.
        assert!(!out.contains("<tool_call>"), "{out}");
    }
    // "none": no tools offered, a plain answer.
    let (ok, out, err) = chat_with_tools(WEATHER_TOOLS, &["--tool-choice", "none"], "Name a color.\n");
    assert!(ok, "{err}");
    assert!(shown_calls(&out).is_empty(), "{out}");
    assert_eq!(err.lines().filter(|l| l.starts_with("[prompt")).count(), 1, "{err}");
}

#[test]
fn chat_with_bad_tools_is_a_one_line_error() {
    for (tools, extra, want) in [
        ("[{\"type\": \"function\"", &[][..], "invalid JSON"),
        ("{\"tools\": []}", &[][..], "\"tools\" must be a list"),
        ("[]", &[][..], "the list is empty"),
        (
            "[{\"type\": \"function\", \"function\": {\"name\": \"a b\"}}]",
            &[][..],
            "tools[0].function.name",
        ),
        (
            "[{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {\"type\": \"no-such-type\"}}}]",
            &[][..],
            "tools[0] (\"f\")",
        ),
        (
            WEATHER_TOOLS,
            &["--tool-choice", "nope"][..],
            "\"nope\", which is not in \"tools\"",
        ),
        (
            WEATHER_TOOLS,
            &["--tool-choice", "required", "--json-object"][..],
            "cannot be combined",
        ),
    ] {
        let (ok, out, err) = chat_with_tools(tools, extra, "hello\n");
        assert!(!ok, "{tools} {extra:?}: {out}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{tools} {extra:?}: {err}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(want),
            "{tools} {extra:?}: {err}"
        );
    }
    // A missing file, and a choice without tools.
    for args in [
        &["--tools", "/nonexistent/tools.json"][..],
        &["--tool-choice", "required"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ffai"))
            .args(["chat", "-m", &smollm2()])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
}
