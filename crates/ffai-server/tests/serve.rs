//! The real server on 127.0.0.1 (an OS-chosen port) with the real SmolLM2 model, driven
//! over HTTP by a small hand-written HTTP/1.1 client. Every wait is bounded in time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ffai::engine::{Engine, EngineConfig};
use ffai::{LoadOptions, Model};
use ffai_server::{ReasoningParser, ServerOptions};
use serde_json::{json, Value};

const NAME: &str = "smollm2-test";

/// The fetched SmolLM2 checkpoint; missing, the test fails (CI fetches it first).
fn model_path() -> PathBuf {
    let dir = std::env::var_os("FFAI_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/ffai/models"));
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh first",
        p.display()
    );
    p
}

struct Setup {
    /// The model to serve (default: SmolLM2's GGUF file).
    model: Option<PathBuf>,
    max_seqs: usize,
    max_queue: usize,
    api_key: Option<&'static str>,
    grace: Duration,
    cors: Vec<String>,
    reasoning_parser: ReasoningParser,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            model: None,
            max_seqs: 4,
            max_queue: 16,
            api_key: None,
            grace: Duration::from_secs(10),
            cors: Vec::new(),
            reasoning_parser: ReasoningParser::Auto,
        }
    }
}

/// A running server: its address, a switch to stop it, and its end.
struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    ended: std::sync::mpsc::Receiver<std::io::Result<()>>,
}

/// Loads the model (one engine per server, one CPU thread each: test servers run side by
/// side on small machines), and serves it from a thread with its own runtime.
fn start(s: Setup) -> Server {
    let model = Model::load(
        &s.model.clone().unwrap_or_else(model_path).display().to_string(),
        &LoadOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = EngineConfig::for_model(&*model.lm, 1024, s.max_seqs, 256, None).unwrap();
    let engine = Arc::new(Engine::start(Arc::new(model), cfg).unwrap());
    let opts = ServerOptions {
        served_model_name: NAME.into(),
        api_key: s.api_key.map(String::from),
        max_queue: s.max_queue,
        shutdown_grace: s.grace,
        cors_origins: s.cors,
        reasoning_parser: s.reasoning_parser,
    };
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (end_tx, ended) = std::sync::mpsc::channel();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let r = ffai_server::serve(listener, engine, opts, async move {
                let _ = stop_rx.await;
            })
            .await;
            let _ = end_tx.send(r);
        });
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    Server {
        addr,
        stop: Some(stop),
        ended,
    }
}

/// The server most tests share (never stopped; the test process ends it).
fn shared() -> SocketAddr {
    static S: OnceLock<SocketAddr> = OnceLock::new();
    *S.get_or_init(|| {
        let mut s = start(Setup::default());
        std::mem::forget(s.stop.take());
        std::mem::forget(s.ended);
        s.addr
    })
}

/// One HTTP response.
struct Resp {
    status: u16,
    /// Header lines, names lowercased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    /// The `data:` payloads of a server-sent-event body.
    fn events(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(String::from)
            .collect()
    }
    /// Asserts the OpenAI error shape and the status.
    fn assert_error(&self, status: u16) {
        assert_eq!(self.status, status, "{}", self.body);
        let e = &self.json()["error"];
        assert!(e["message"].is_string() && e["type"].is_string(), "{}", self.body);
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{}", self.body);
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn send_head(s: &mut TcpStream, method: &str, path: &str, headers: &[(&str, &str)], len: usize) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n"
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
}

/// Sends one request and reads the whole response (the server closes the connection).
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut s = connect(addr);
    send_head(&mut s, method, path, headers, body.len());
    s.write_all(body.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse(&raw)
}

fn get(addr: SocketAddr, path: &str) -> Resp {
    http(addr, "GET", path, &[], "")
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    http(addr, "POST", path, &[], &body.to_string())
}

fn parse(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of the response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

/// Decodes a chunked transfer-encoded body.
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

/// A metric's value from `/metrics` text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

fn chat_body(extra: Value) -> Value {
    let mut b = json!({
        "model": NAME,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// The text of a chat stream's content deltas (checking the role comes first and the
/// stream ends with [DONE]).
fn chat_stream_text(r: &Resp) -> (String, Vec<Value>) {
    assert_eq!(r.status, 200, "{}", r.body);
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{}", r.body);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(String::from))
        .collect();
    (text, chunks)
}

#[test]
fn health_models_tokenize_detokenize() {
    let a = shared();
    let r = get(a, "/health");
    assert_eq!(r.status, 200);
    let r = get(a, "/v1/models");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["id"], NAME);
    assert_eq!(r.json()["object"], "list");

    let r = post(a, "/tokenize", &json!({"content": "Hello world"}));
    assert_eq!(r.status, 200, "{}", r.body);
    let tokens = r.json()["tokens"].clone();
    assert!(!tokens.as_array().unwrap().is_empty());
    let r = post(a, "/detokenize", &json!({ "tokens": tokens }));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["content"], "Hello world");

    post(a, "/detokenize", &json!({"tokens": [4_000_000_000u64]})).assert_error(400);
    post(a, "/detokenize", &json!({"tokens": "x"})).assert_error(400);
    post(a, "/tokenize", &json!({"content": 3})).assert_error(400);
    get(a, "/nowhere").assert_error(404);
}

#[test]
fn completions_greedy_are_deterministic() {
    let a = shared();
    let body =
        json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "unknown_field": {"x": 1}});
    let r1 = post(a, "/v1/completions", &body);
    assert_eq!(r1.status, 200, "{}", r1.body);
    let j = r1.json();
    assert_eq!(j["object"], "text_completion");
    assert_eq!(j["model"], NAME);
    assert!(j["id"].as_str().unwrap().starts_with("cmpl-"));
    assert!(j["created"].is_u64());
    let choice = &j["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "length");
    let u = &j["usage"];
    assert_eq!(u["completion_tokens"], 8);
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + 8
    );
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());
    let text = choice["text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    let r2 = post(a, "/v1/completions", &body);
    assert_eq!(r2.json()["choices"][0]["text"], text.as_str());

    // The same prompt as token ids gives the same text.
    let ids = post(a, "/tokenize", &json!({"content": "The capital of France is"})).json()["tokens"].clone();
    let r3 = post(
        a,
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(r3.status, 200, "{}", r3.body);
    assert_eq!(r3.json()["usage"]["prompt_tokens"], u["prompt_tokens"]);
    assert_eq!(r3.json()["choices"][0]["text"], text.as_str());

    // Streamed: the chunks' text is the same text.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let rs = post(a, "/v1/completions", &sb);
    assert_eq!(rs.status, 200);
    assert!(rs.header("content-type").unwrap().starts_with("text/event-stream"));
    let events = rs.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut streamed = String::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "text_completion");
        streamed.push_str(c["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(streamed, text);
}

#[test]
fn chat_whole_and_streamed_agree() {
    let a = shared();
    let r = post(a, "/v1/chat/completions", &chat_body(json!({})));
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["object"], "chat.completion");
    assert!(j["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let msg = &j["choices"][0]["message"];
    assert_eq!(msg["role"], "assistant");
    let text = msg["content"].as_str().unwrap().to_string();
    assert!(!text.is_empty());

    // Content as a list of text parts renders the same conversation.
    let parts = chat_body(
        json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]}),
    );
    let r = post(a, "/v1/chat/completions", &parts);
    assert_eq!(r.json()["choices"][0]["message"]["content"], text.as_str());

    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body(json!({"stream": true, "stream_options": {"include_usage": true}})),
    );
    let (streamed, chunks) = chat_stream_text(&r);
    assert_eq!(streamed, text);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["total_tokens"], j["usage"]["total_tokens"]);
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], j["choices"][0]["finish_reason"]);
}

#[test]
fn stop_strings_cut_the_text() {
    let a = shared();
    let body = json!({"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0});
    let full = post(a, "/v1/completions", &body).json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    // A stop string from the middle of the answer (likely across token boundaries).
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 8, "{full:?}");
    let stop: String = chars[4..7].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    for stop_field in [json!(stop), json!(["never-appears", stop])] {
        let mut b = body.clone();
        b["stop"] = stop_field;
        let r = post(a, "/v1/completions", &b);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["choices"][0]["text"], cut);
        assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");
    }
}

#[test]
fn n_choices_and_seeds() {
    let a = shared();
    let body = chat_body(json!({"n": 2, "temperature": 1.0, "seed": 7, "max_tokens": 10}));
    let r1 = post(a, "/v1/chat/completions", &body);
    assert_eq!(r1.status, 200, "{}", r1.body);
    let texts = |r: &Resp| -> Vec<String> {
        r.json()["choices"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                assert_eq!(c["index"], i);
                c["message"]["content"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let t1 = texts(&r1);
    assert_eq!(t1.len(), 2);
    // The same seed gives the same choices.
    let r2 = post(a, "/v1/chat/completions", &body);
    assert_eq!(texts(&r2), t1);
    // Streamed with n = 2: each index gets its own deltas, equal to the whole answer.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let rs = post(a, "/v1/chat/completions", &sb);
    let mut streamed = [String::new(), String::new()];
    let events = rs.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        let ch = &c["choices"][0];
        if let Some(t) = ch["delta"]["content"].as_str() {
            streamed[ch["index"].as_u64().unwrap() as usize].push_str(t);
        }
    }
    assert_eq!(streamed.to_vec(), t1);
}

#[test]
fn bad_requests_are_openai_errors() {
    let a = shared();
    let chat = "/v1/chat/completions";
    http(a, "POST", chat, &[], "{not json").assert_error(400);
    http(a, "POST", chat, &[], "[1, 2]").assert_error(400);
    post(a, chat, &chat_body(json!({"max_tokens": "ten"}))).assert_error(400);
    post(a, chat, &chat_body(json!({"max_tokens": 1_000_000_000}))).assert_error(400);
    post(a, chat, &chat_body(json!({"temperature": -1}))).assert_error(400);
    post(a, chat, &chat_body(json!({"n": 1000}))).assert_error(400);
    post(a, chat, &chat_body(json!({"stop": 5}))).assert_error(400);
    post(a, chat, &chat_body(json!({"messages": []}))).assert_error(400);
    post(a, chat, &chat_body(json!({"messages": "hi"}))).assert_error(400);
    let r = post(a, chat, &chat_body(json!({"model": "gpt-4"})));
    r.assert_error(404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    // A prompt longer than the context (1024 here).
    let long: Vec<u32> = vec![1; 1100];
    let r = post(a, "/v1/completions", &json!({"prompt": long, "max_tokens": 4}));
    r.assert_error(400);
    assert_eq!(r.json()["error"]["param"], "prompt");
    post(a, "/v1/completions", &json!({"prompt": [999_999_999], "max_tokens": 4})).assert_error(400);
    post(a, "/v1/completions", &json!({"max_tokens": 4})).assert_error(400);

    // A body over 16 MiB is refused from its length, before it is read.
    let mut s = connect(a);
    send_head(&mut s, "POST", chat, &[], 17 << 20);
    let _ = s.write_all(b"{\"messages\": ");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse(&raw).assert_error(413);

    // The server still serves.
    assert_eq!(post(a, chat, &chat_body(json!({"max_tokens": 2}))).status, 200);
}

#[test]
fn metrics_text() {
    let a = shared();
    assert_eq!(
        post(a, "/v1/chat/completions", &chat_body(json!({"max_tokens": 3}))).status,
        200
    );
    let r = get(a, "/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    for name in [
        "ffai_requests_running",
        "ffai_requests_waiting",
        "ffai_prompt_tokens_total",
        "ffai_generation_tokens_total",
        "ffai_prefix_cache_hit_tokens_total",
        "ffai_kv_cache_usage_ratio",
        "ffai_time_to_first_token_seconds_count",
        "ffai_time_per_output_token_seconds_count",
    ] {
        metric(&r.body, name);
    }
    assert!(metric(&r.body, "ffai_generation_tokens_total") >= 3.0);
    assert!(metric(&r.body, "ffai_time_to_first_token_seconds_count") >= 1.0);
    assert!(r.body.contains("ffai_requests_total{status=\"200\"}"), "{}", r.body);
    assert!(r.body.contains("ffai_time_to_first_token_seconds_bucket{le=\"+Inf\"}"));
}

#[test]
fn api_key() {
    let s = start(Setup {
        api_key: Some("sekrit"),
        max_seqs: 1,
        ..Default::default()
    });
    let a = s.addr;
    assert_eq!(get(a, "/health").status, 200);
    let r = get(a, "/v1/models");
    r.assert_error(401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    http(a, "GET", "/v1/models", &[("Authorization", "Bearer wrong")], "").assert_error(401);
    http(a, "GET", "/metrics", &[("Authorization", "sekrit")], "").assert_error(401);
    let body = json!({"prompt": "Hi", "max_tokens": 2}).to_string();
    http(a, "POST", "/v1/completions", &[], &body).assert_error(401);
    assert_eq!(
        http(a, "GET", "/v1/models", &[("Authorization", "Bearer sekrit")], "").status,
        200
    );
    let r = http(
        a,
        "POST",
        "/v1/completions",
        &[("Authorization", "Bearer sekrit")],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Opens a streaming request and reads until `events` data events have come; the
/// caller drops the connection mid-answer.
fn open_stream(a: SocketAddr, body: &Value, events: usize) -> TcpStream {
    let mut s = connect(a);
    let b = body.to_string();
    send_head(&mut s, "POST", "/v1/completions", &[], b.len());
    s.write_all(b.as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&got).matches("data: ").count() < events {
        assert!(Instant::now() < deadline, "no events in time");
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    s
}

/// Polls `/metrics` until nothing runs or waits; panics after `limit`.
fn wait_idle(a: SocketAddr, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let m = get(a, "/metrics").body;
        if metric(&m, "ffai_requests_running") == 0.0 && metric(&m, "ffai_requests_waiting") == 0.0 {
            return t.elapsed();
        }
        assert!(t.elapsed() < limit, "still busy after {limit:?}:\n{m}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn full_server_429_and_disconnect_cancels() {
    // One running and one queued sequence fill this server.
    let s = start(Setup {
        max_seqs: 1,
        max_queue: 1,
        ..Default::default()
    });
    let a = s.addr;
    // Counting goes on and on: without cancellation these would run to max_tokens.
    let long = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 900, "temperature": 0, "stream": true});
    let first = open_stream(a, &long, 2);
    let second = {
        let mut s = connect(a);
        let b = long.to_string();
        send_head(&mut s, "POST", "/v1/completions", &[], b.len());
        s.write_all(b.as_bytes()).unwrap();
        s
    };
    // Wait until the engine queues the second (the first runs), then a third is refused.
    let t = Instant::now();
    while metric(&get(a, "/metrics").body, "ffai_requests_waiting") < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the second request was never queued"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = post(a, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    r.assert_error(429);
    assert_eq!(r.header("retry-after"), Some("1"));
    post(a, "/v1/chat/completions", &chat_body(json!({"n": 2, "max_tokens": 2}))).assert_error(429);

    // Clients leave mid-answer: their sequences are cancelled, not run to the end.
    drop(first);
    drop(second);
    let took = wait_idle(a, Duration::from_secs(10));
    eprintln!("idle {took:?} after the clients left");
    let m = get(a, "/metrics").body;
    assert!(metric(&m, "ffai_generation_tokens_total") < 600.0, "{m}");
    // A client of a whole (non-streamed) answer that leaves cancels it too.
    let mut c = connect(a);
    let b = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 900, "temperature": 0}).to_string();
    send_head(&mut c, "POST", "/v1/completions", &[], b.len());
    c.write_all(b.as_bytes()).unwrap();
    let t = Instant::now();
    while metric(&get(a, "/metrics").body, "ffai_requests_running") < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the request never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(c);
    wait_idle(a, Duration::from_secs(10));
    let m = get(a, "/metrics").body;
    assert!(metric(&m, "ffai_generation_tokens_total") < 900.0, "{m}");
    assert!(m.contains("ffai_requests_total{status=\"499\"} 1"), "{m}");

    // The places are free again.
    let r = post(a, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(m.contains("ffai_requests_total{status=\"429\"} 2"), "{m}");
}

#[test]
fn graceful_shutdown_cancels_within_the_grace_period() {
    let mut s = start(Setup {
        max_seqs: 2,
        grace: Duration::from_millis(500),
        ..Default::default()
    });
    let a = s.addr;
    let long = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 900, "temperature": 0, "stream": true});
    let mut stream = open_stream(a, &long, 2);
    let t = Instant::now();
    s.stop.take().unwrap().send(()).unwrap();
    // The stream ends (cancelled after the grace period) with [DONE].
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(String::from_utf8_lossy(&rest).contains("data: [DONE]"));
    let r = s.ended.recv_timeout(Duration::from_secs(15)).unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // Nothing listens any more.
    assert!(TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_err());
}

/// 64 concurrent streaming clients, two requests each, on a server of 64 sequences: every
/// request completes, each text equals the same request's answer alone on an idle server
/// (greedy and seeded alike: the engine's batch invariance), and afterwards nothing runs
/// or waits and the KV usage is back to its idle value.
#[test]
fn sixty_four_streaming_clients_match_their_solo_answers_and_leak_nothing() {
    let server = start(Setup {
        max_seqs: 64,
        max_queue: 64,
        ..Default::default()
    });
    let a = server.addr;
    let idle_kv = metric(&get(a, "/metrics").body, "ffai_kv_cache_usage_ratio");
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity";
    let words: Vec<&str> = text.split(' ').collect();
    let bodies: Vec<Value> = (0..128)
        .map(|i| {
            let prompt = words[i % 7..(i % 7) + 3 + i % 20].join(" ");
            json!({
                "model": NAME,
                "prompt": prompt,
                "max_tokens": 8,
                "temperature": if i % 2 == 0 { 0.0 } else { 0.8 },
                "seed": i,
                "stream": true,
            })
        })
        .collect();
    let streamed_text = |r: &Resp| -> String {
        assert_eq!(r.status, 200, "{}", r.body);
        let events = r.events();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{}", r.body);
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .filter_map(|c| c["choices"].get(0)?["text"].as_str().map(String::from))
            .collect()
    };
    // Alone, one at a time.
    let solo: Vec<String> = bodies
        .iter()
        .map(|b| streamed_text(&post(a, "/v1/completions", b)))
        .collect();
    // 64 clients at once, each sending its two requests one after the other.
    let bodies = Arc::new(bodies);
    let t = Instant::now();
    let clients: Vec<_> = (0..64)
        .map(|c| {
            let bodies = bodies.clone();
            std::thread::spawn(move || {
                [c, c + 64]
                    .iter()
                    .map(|&i| {
                        let r = post(a, "/v1/completions", &bodies[i]);
                        (i, r)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut done = 0;
    for h in clients {
        for (i, r) in h.join().unwrap() {
            assert_eq!(
                streamed_text(&r),
                solo[i],
                "request {i}: the text under load differs from alone"
            );
            done += 1;
        }
    }
    assert_eq!(done, 128);
    assert!(
        t.elapsed() < Duration::from_secs(120),
        "the load took {:?}",
        t.elapsed()
    );
    wait_idle(a, Duration::from_secs(10));
    let m = get(a, "/metrics").body;
    assert_eq!(metric(&m, "ffai_kv_cache_usage_ratio"), idle_kv, "{m}");
    drop(server);
}

/// Log-probabilities, whole and streamed, chat and completions: the chosen token's
/// log-probability is the top one's under greedy decoding, every value is <= 0, the top
/// lists are sorted, the streamed ones equal the whole ones; penalties change a greedy
/// answer that repeats itself.
#[test]
fn logprobs_and_penalties() {
    let a = shared();
    let body = chat_body(json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 6}));
    let r = post(a, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    let content = j["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert_eq!(content.len() as u64, j["usage"]["completion_tokens"].as_u64().unwrap());
    let mut text = String::new();
    for e in &content {
        let lp = e["logprob"].as_f64().unwrap();
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{e}");
        assert!(lp <= 0.0 && lp > -50.0, "{e}");
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], e["token"], "{e}");
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
        assert!(top
            .windows(2)
            .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()));
        text.push_str(e["token"].as_str().unwrap());
    }
    assert_eq!(text, j["choices"][0]["message"]["content"].as_str().unwrap());
    // Streamed: the same entries, in order.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let (_, chunks) = chat_stream_text(&post(a, "/v1/chat/completions", &sb));
    let streamed: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed, content);
    // Completions: parallel lists and byte offsets.
    let r = post(
        a,
        "/v1/completions",
        &json!({"model": NAME, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "logprobs": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let lp = &r.json()["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), lp["token_logprobs"].as_array().unwrap().len());
    assert_eq!(tokens.len(), lp["top_logprobs"].as_array().unwrap().len());
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    // A strong frequency penalty changes a greedy answer that repeats tokens.
    let rep = |extra: Value| {
        let mut b = json!({"model": NAME, "prompt": "one one one one one one one", "max_tokens": 12, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let r = post(a, "/v1/completions", &b);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let plain = rep(json!({}));
    assert_eq!(plain, rep(json!({"frequency_penalty": 0})));
    assert_ne!(
        plain,
        rep(json!({"frequency_penalty": 2, "presence_penalty": 2})),
        "{plain:?}"
    );
}

/// With `--cors-origin`, a browser's preflight is answered without the API key and the
/// listed origin is echoed; other origins get no CORS header. Without it, none at all.
#[test]
fn cors_preflight_and_origins() {
    let server = start(Setup {
        max_seqs: 1,
        max_queue: 1,
        api_key: Some("k"),
        cors: vec!["http://app.test".into()],
        ..Default::default()
    });
    let a = server.addr;
    let pre = http(
        a,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("Origin", "http://app.test"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "authorization,content-type"),
        ],
        "",
    );
    assert!(pre.status < 300, "preflight: {} {}", pre.status, pre.body);
    assert_eq!(pre.header("access-control-allow-origin"), Some("http://app.test"));
    let ok = http(
        a,
        "GET",
        "/v1/models",
        &[("Origin", "http://app.test"), ("Authorization", "Bearer k")],
        "",
    );
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("access-control-allow-origin"), Some("http://app.test"));
    let other = http(
        a,
        "GET",
        "/v1/models",
        &[("Origin", "http://evil.test"), ("Authorization", "Bearer k")],
        "",
    );
    assert_eq!(other.header("access-control-allow-origin"), None);
    // The shared server has no CORS origins.
    let plain = http(shared(), "GET", "/v1/models", &[("Origin", "http://app.test")], "");
    assert_eq!(plain.header("access-control-allow-origin"), None);
    drop(server);
}

/// `run_loading` listens before the model is ready: 503 everywhere (`/health` too) while
/// the load runs, and a failed load ends the server with the load's error.
#[test]
fn loading_answers_503_and_a_failed_load_ends_the_server() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let opts = ServerOptions {
        served_model_name: NAME.into(),
        api_key: None,
        max_queue: 1,
        shutdown_grace: Duration::from_secs(1),
        cors_origins: Vec::new(),
        reasoning_parser: ReasoningParser::Auto,
    };
    let server = std::thread::spawn(move || {
        ffai_server::run_loading(
            move || {
                let _ = go_rx.recv_timeout(Duration::from_secs(60));
                Err("no such model".to_string())
            },
            opts,
            4,
            "127.0.0.1",
            port,
        )
    });
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t = Instant::now();
    let health = loop {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            drop(s);
            break get(addr, "/health");
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the server never listened");
        std::thread::sleep(Duration::from_millis(20));
    };
    health.assert_error(503);
    post(addr, "/v1/completions", &json!({"prompt": "hi"})).assert_error(503);
    go_tx.send(()).unwrap();
    let r = server.join().unwrap();
    assert_eq!(r, Err("no such model".to_string()));
}

#[test]
fn response_format_constrains_chat_and_completions() {
    let a = shared();
    let schema = json!({"type": "object", "properties": {
        "city": {"enum": ["Paris", "Lyon"]},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
      "required": ["city", "population"], "additionalProperties": false});
    let rf = json!({"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": true}});
    for temperature in [0.0, 0.9] {
        let r = post(
            a,
            "/v1/chat/completions",
            &chat_body(json!({"response_format": rf, "max_tokens": 64, "temperature": temperature, "seed": 4})),
        );
        assert_eq!(r.status, 200);
        let j = r.json();
        let text = j["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(["Paris", "Lyon"].contains(&v["city"].as_str().unwrap()), "{text}");
        assert!(v["population"].is_u64(), "{text}");
        assert_eq!(j["choices"][0]["finish_reason"], "stop", "{text}");
    }
    // Streamed: the deltas join into the same JSON as the whole answer.
    let whole = post(
        a,
        "/v1/chat/completions",
        &chat_body(json!({"response_format": rf, "max_tokens": 64})),
    );
    let streamed = post(
        a,
        "/v1/chat/completions",
        &chat_body(json!({"response_format": rf, "max_tokens": 64, "stream": true})),
    );
    let (text, _) = chat_stream_text(&streamed);
    assert_eq!(whole.json()["choices"][0]["message"]["content"].as_str().unwrap(), text);
    // Completions, with a regex.
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "The answer is", "max_tokens": 16, "temperature": 0,
                "response_format": {"type": "regex", "regex": " (yes|no)\\."}}),
    );
    let t = r.json()["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(t == " yes." || t == " no.", "{t:?}");
    // Bad formats are 400s naming the field, and the server keeps serving.
    for bad in [
        json!({"type": "xml"}),
        json!({"type": "json_schema"}),
        json!({"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}),
        json!({"type": "regex", "regex": "(unclosed"}),
    ] {
        let r = post(a, "/v1/chat/completions", &chat_body(json!({"response_format": bad})));
        r.assert_error(400);
    }
    assert_eq!(
        post(a, "/v1/chat/completions", &chat_body(json!({"max_tokens": 2}))).status,
        200
    );
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]}},
              "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {
            "name": "search",
            "description": "Search the web.",
            "parameters": {"type": "object", "properties": {
                "query": {"type": "string", "maxLength": 30}},
              "required": ["query"], "additionalProperties": false}}}
    ])
}

/// Checks a chat answer's tool calls against the offered tools' schemas; returns them as
/// (name, arguments).
fn checked_calls(message: &Value, tools: &Value) -> Vec<(String, String)> {
    let calls = message["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {message}"));
    assert!(!calls.is_empty(), "{message}");
    let mut ids = std::collections::HashSet::new();
    calls
        .iter()
        .map(|c| {
            assert_eq!(c["type"], "function", "{c}");
            let id = c["id"].as_str().unwrap();
            assert!(id.starts_with("call_") && ids.insert(id.to_string()), "{message}");
            let name = c["function"]["name"].as_str().unwrap().to_string();
            let args = c["function"]["arguments"].as_str().unwrap().to_string();
            let schema = tools
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["function"]["name"] == name.as_str())
                .unwrap_or_else(|| panic!("unknown function {name}"))["function"]["parameters"]
                .clone();
            let parsed: Value = serde_json::from_str(&args).unwrap_or_else(|e| panic!("{e}: {args}"));
            assert!(jsonschema::validator_for(&schema).unwrap().is_valid(&parsed), "{args}");
            (name, args)
        })
        .collect()
}

/// A chat stream's content and tool calls (name, joined arguments by index), and its
/// finish reason; the first tool chunk of a call carries its id, type and name.
fn stream_tool_calls(r: &Resp) -> (String, Vec<(String, String)>, String) {
    let (text, calls, finish, _) = stream_tool_calls_counted(r);
    (text, calls, finish)
}

/// [`stream_tool_calls`] and how many chunks carried each call's arguments.
fn stream_tool_calls_counted(r: &Resp) -> (String, Vec<(String, String)>, String, Vec<usize>) {
    let mut fragments: Vec<usize> = Vec::new();
    let (text, chunks) = chat_stream_text(r);
    let mut calls: Vec<(String, String)> = Vec::new();
    let mut finish = String::new();
    for c in &chunks {
        let choice = &c["choices"][0];
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
        for tc in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let k = tc["index"].as_u64().unwrap() as usize;
            if k == calls.len() {
                assert!(tc["id"].as_str().unwrap().starts_with("call_"), "{tc}");
                assert_eq!(tc["type"], "function");
                calls.push((tc["function"]["name"].as_str().unwrap().to_string(), String::new()));
                fragments.push(0);
            }
            let a = tc["function"]["arguments"].as_str().unwrap_or("");
            calls[k].1.push_str(a);
            fragments[k] += usize::from(!a.is_empty());
        }
    }
    (text, calls, finish, fragments)
}

#[test]
fn forced_tool_calls_parse_validate_and_stream_the_same() {
    let a = shared();
    let tools = weather_tools();
    let ask = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    for (choice, only) in [
        (
            json!({"type": "function", "function": {"name": "get_weather"}}),
            Some("get_weather"),
        ),
        (
            json!({"type": "function", "function": {"name": "search"}}),
            Some("search"),
        ),
        (json!("required"), None),
    ] {
        for (temperature, parallel) in [(0.0, false), (0.8, true)] {
            let body = chat_body(json!({"messages": ask, "tools": tools, "tool_choice": choice,
                "parallel_tool_calls": parallel, "max_tokens": 120, "temperature": temperature, "seed": 3}));
            let r = post(a, "/v1/chat/completions", &body);
            assert_eq!(r.status, 200, "{}", r.body);
            let j = r.json();
            let choice0 = &j["choices"][0];
            assert_eq!(choice0["finish_reason"], "tool_calls", "{}", r.body);
            assert_eq!(choice0["message"]["content"], Value::Null, "{}", r.body);
            let calls = checked_calls(&choice0["message"], &tools);
            // One call unless "required" with parallel calls allowed.
            if !parallel || only.is_some() {
                assert_eq!(calls.len(), 1, "{}", r.body);
            }
            if let Some(name) = only {
                assert!(calls.iter().all(|(n, _)| n == name), "{}", r.body);
            }
            // Streamed: the same calls (fresh ids), no content, finish "tool_calls".
            let mut sb = body.clone();
            sb["stream"] = json!(true);
            let (text, streamed, finish, fragments) = stream_tool_calls_counted(&post(a, "/v1/chat/completions", &sb));
            assert_eq!((text.as_str(), finish.as_str()), ("", "tool_calls"));
            assert_eq!(streamed, calls);
            // A forced call's arguments go out as they are generated, not in one piece at
            // the end (every call here has at least one field: several tokens).
            assert!(fragments.iter().all(|&f| f > 1), "{fragments:?}");
        }
    }
}

#[test]
fn tool_choice_auto_and_none() {
    let a = shared();
    let tools = weather_tools();
    let ask = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    let plain = post(a, "/v1/chat/completions", &chat_body(json!({"messages": ask})));
    let none = post(
        a,
        "/v1/chat/completions",
        &chat_body(json!({"messages": ask, "tools": tools, "tool_choice": "none"})),
    );
    let auto = post(
        a,
        "/v1/chat/completions",
        &chat_body(json!({"messages": ask, "tools": tools, "max_tokens": 60})),
    );
    // "none" offers nothing: the same prompt and answer as no tools; "auto" offers them.
    assert_eq!(none.status, 200, "{}", none.body);
    assert_eq!(
        none.json()["usage"]["prompt_tokens"],
        plain.json()["usage"]["prompt_tokens"]
    );
    assert_eq!(
        none.json()["choices"][0]["message"],
        plain.json()["choices"][0]["message"]
    );
    let (pn, pa) = (
        plain.json()["usage"]["prompt_tokens"].as_u64().unwrap(),
        auto.json()["usage"]["prompt_tokens"].as_u64().unwrap(),
    );
    assert!(pa > pn + 50, "{pn} {pa}");
    // Whatever "auto" chose, streaming gives the same content and calls.
    let whole = auto.json()["choices"][0].clone();
    let mut sb = chat_body(json!({"messages": ask, "tools": tools, "max_tokens": 60, "stream": true}));
    sb["stream"] = json!(true);
    let (text, calls, finish) = stream_tool_calls(&post(a, "/v1/chat/completions", &sb));
    assert_eq!(whole["finish_reason"], finish.as_str());
    assert_eq!(whole["message"]["content"].as_str().unwrap_or(""), text);
    let whole_calls: Vec<(String, String)> = match whole["message"]["tool_calls"].as_array() {
        None => Vec::new(),
        Some(_) => checked_calls(&whole["message"], &tools),
    };
    assert_eq!(whole_calls, calls);
}

#[test]
fn tool_results_round_trip() {
    let a = shared();
    let tools = weather_tools();
    // The model's own call, answered by the tool, continues the conversation.
    let first = post(
        a,
        "/v1/chat/completions",
        &chat_body(
            json!({"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 120}),
        ),
    );
    let msg = first.json()["choices"][0]["message"].clone();
    let call = msg["tool_calls"][0].clone();
    let convo = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        msg,
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature\": 21, \"sky\": \"clear\"}"},
    ]);
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body(json!({"messages": convo, "tools": tools, "max_tokens": 24})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert!(["stop", "length", "tool_calls"].contains(&j["choices"][0]["finish_reason"].as_str().unwrap()));
    // The call and its result are in the prompt: more tokens than the question alone by
    // at least the tool result's.
    let q = post(
        a,
        "/v1/chat/completions",
        &chat_body(
            json!({"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": tools, "max_tokens": 1}),
        ),
    );
    let (pq, pr) = (
        q.json()["usage"]["prompt_tokens"].as_u64().unwrap(),
        j["usage"]["prompt_tokens"].as_u64().unwrap(),
    );
    assert!(pr > pq + 20, "{pq} {pr}");
    // Arguments given as a string that is no JSON object are refused.
    let mut bad = convo.clone();
    bad[1]["tool_calls"][0]["function"]["arguments"] = json!("{not json");
    post(
        a,
        "/v1/chat/completions",
        &chat_body(json!({"messages": bad, "tools": tools})),
    )
    .assert_error(400);
}

#[test]
fn bad_tools_are_400s() {
    let a = shared();
    let ok = weather_tools();
    let f =
        |name: Value, params: Value| json!([{"type": "function", "function": {"name": name, "parameters": params}}]);
    let deep = (0..40).fold(
        json!({"type": "object"}),
        |v, _| json!({"type": "object", "properties": {"x": v}}),
    );
    let many: Vec<Value> = (0..200)
        .map(|i| json!({"type": "function", "function": {"name": format!("f{i}")}}))
        .collect();
    for (extra, param) in [
        (json!({"tools": "x"}), "tools"),
        (json!({"tools": [1]}), "tools"),
        (json!({"tools": [{"type": "code_interpreter"}]}), "tools"),
        (json!({"tools": f(json!("bad name!"), json!({}))}), "tools"),
        (json!({"tools": f(json!(""), json!({}))}), "tools"),
        (json!({"tools": f(json!("x".repeat(65)), json!({}))}), "tools"),
        (json!({"tools": [ok[0], ok[0]]}), "tools"),
        (json!({"tools": f(json!("f"), json!("schema"))}), "tools"),
        (
            json!({"tools": f(json!("f"), json!({"type": "no-such-type"}))}),
            "tools",
        ),
        (json!({"tools": f(json!("f"), deep)}), "tools"),
        (json!({"tools": many}), "tools"),
        (
            json!({"tools": ok, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (json!({"tools": ok, "tool_choice": "always"}), "tool_choice"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": ok, "tool_choice": "required", "response_format": {"type": "json_object"}}),
            "tool_choice",
        ),
        (
            json!({"tools": ok, "parallel_tool_calls": "yes"}),
            "parallel_tool_calls",
        ),
        (json!({"messages": [{"role": "tool", "content": "x"}]}), "messages"),
        (
            json!({"messages": [{"role": "assistant", "content": null, "tool_calls": {"x": 1}}]}),
            "messages",
        ),
    ] {
        let r = post(a, "/v1/chat/completions", &chat_body(extra.clone()));
        r.assert_error(400);
        assert_eq!(r.json()["error"]["param"], param, "{extra}: {}", r.body);
        assert!(
            !r.json()["error"]["message"].as_str().unwrap().contains('\n'),
            "{}",
            r.body
        );
    }
    let r = post(a, "/v1/completions", &json!({"prompt": "hi", "tools": ok}));
    r.assert_error(400);
    // Still serving.
    assert_eq!(
        post(a, "/v1/chat/completions", &chat_body(json!({"max_tokens": 2}))).status,
        200
    );
}

#[test]
fn forced_calls_keep_to_the_declared_parameters() {
    // No "additionalProperties": a forced call still names only declared parameters (the
    // grammar closes the object), so it ends as a call, not at the token limit.
    let a = shared();
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}]);
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body(
            json!({"messages": [{"role": "user", "content": "Weather in Paris and Rome?"}],
            "tools": tools, "tool_choice": "required", "max_tokens": 100}),
        ),
    );
    let j = r.json();
    assert_eq!(j["choices"][0]["finish_reason"], "tool_calls", "{}", r.body);
    for (_, args) in checked_calls(&j["choices"][0]["message"], &tools) {
        let args: Value = serde_json::from_str(&args).unwrap();
        assert!(args.as_object().unwrap().keys().all(|k| k == "city"), "{args}");
    }
}

/// SmolLM2 as an 8-bit HF directory speaking through a Qwen3 "thinking" template (Qwen3's,
/// with the generation prompt opening `<think>` as the Thinking-2507 templates do; the
/// `<|im_start|>` turn tokens are SmolLM2's too): a forced call must reason first.
fn thinking_model() -> PathBuf {
    thinking_model_in("thinking")
}

/// [`thinking_model`] in a directory of its own, named by `tag`.
fn thinking_model_in(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ffai-serve-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = ffai::convert::ConvertOptions {
        target: ffai::convert::Target::Affine(8),
        quantizer: ffai::convert::Quantizer::MinMax,
        ..Default::default()
    };
    ffai::convert::convert(&model_path(), &dir, &opts, &mut |_, _, _| {}).unwrap();
    let qwen3 = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat/qwen3.jinja"),
    )
    .unwrap();
    let opened = qwen3.replace(
        "'<|im_start|>assistant\\n' }}",
        "'<|im_start|>assistant\\n<think>\\n' }}",
    );
    assert_ne!(opened, qwen3);
    std::fs::write(dir.join("chat_template.jinja"), opened).unwrap();
    dir
}

#[test]
fn forced_calls_after_reasoning_leave_it_out_whole_and_streamed() {
    let model = thinking_model();
    let mut server = start(Setup {
        model: Some(model.clone()),
        ..Default::default()
    });
    let a = server.addr;
    let tools = weather_tools();
    let ask = json!([{"role": "user", "content": "What is the weather in Paris? Think first."}]);
    let mut called = 0;
    for seed in 0..6 {
        let body = chat_body(json!({"messages": ask, "tools": tools, "tool_choice": "required",
            "parallel_tool_calls": false, "max_tokens": 120, "temperature": if seed == 0 { 0.0 } else { 1.0 },
            "seed": seed}));
        let r = post(a, "/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        let j = r.json();
        let c = &j["choices"][0];
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        let sr = post(a, "/v1/chat/completions", &sb);
        let (text, streamed, finish) = stream_tool_calls(&sr);
        // The reasoning is in neither the content nor the calls, whole or streamed: it is
        // the message's `reasoning_content`, and streamed as that delta, the same text.
        assert_eq!(text, "", "{}", r.body);
        assert_eq!(finish, c["finish_reason"].as_str().unwrap(), "{}", r.body);
        let (_, chunks) = chat_stream_text(&sr);
        let streamed_reasoning: String = chunks
            .iter()
            .filter_map(|ch| ch["choices"][0]["delta"]["reasoning_content"].as_str())
            .collect();
        let reasoning = c["message"]["reasoning_content"].as_str().unwrap_or("");
        assert_eq!(streamed_reasoning, reasoning, "{}", r.body);
        // The prompt opened the block, so every answer has one (the model closes it or
        // is cut off inside it) and it is never the call's text.
        assert!(
            c["message"].get("reasoning_content").is_some(),
            "no reasoning_content: {}",
            r.body
        );
        assert!(!reasoning.contains("</think>"), "{}", r.body);
        if c["finish_reason"] == "tool_calls" {
            called += 1;
            assert_eq!(c["message"]["content"], Value::Null, "{}", r.body);
            let calls = checked_calls(&c["message"], &tools);
            assert_eq!(calls.len(), 1, "{}", r.body);
            assert_eq!(streamed, calls);
        } else {
            // Cut off inside the block: nothing of it is the answer.
            assert_eq!(c["finish_reason"], "length", "{}", r.body);
            assert_eq!(c["message"]["content"], "", "{}", r.body);
            assert!(streamed.is_empty());
        }
    }
    assert!(called > 0, "no request closed its reasoning and called");
    if let Some(stop) = server.stop.take() {
        let _ = stop.send(());
    }
    let _ = std::fs::remove_dir_all(model);
}

/// The thinking template's reasoning parsed off ordinary answers, whole and streamed, and
/// `chat_template_kwargs` reaching the template: `{"enable_thinking": false}` closes the
/// opened block in the prompt (more prompt tokens), so the answer is all content. The
/// prompt opens the block and SmolLM2 never closes it, so without the switch a short
/// answer is all reasoning. The same requests to a server with `--reasoning-parser none`
/// give the raw text as content. Bad `chat_template_kwargs` are 400s, and the server
/// goes on serving.
#[test]
fn reasoning_parser_and_chat_template_kwargs() {
    let model = thinking_model_in("reasoning");
    let mut auto = start(Setup {
        model: Some(model.clone()),
        ..Default::default()
    });
    let mut none = start(Setup {
        model: Some(model.clone()),
        reasoning_parser: ReasoningParser::None,
        ..Default::default()
    });
    let ask = json!([{"role": "user", "content": "Tell me a story about the sea."}]);
    let plain = chat_body(json!({"messages": ask, "max_tokens": 10}));
    let off = chat_body(json!({"messages": ask, "max_tokens": 10,
        "chat_template_kwargs": {"enable_thinking": false}}));

    // The raw answers, as a server without the parser gives them.
    let raw = post(none.addr, "/v1/chat/completions", &plain);
    assert_eq!(raw.status, 200, "{}", raw.body);
    let raw = raw.json();
    let raw_text = raw["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(raw["choices"][0]["message"].get("reasoning_content").is_none(), "{raw}");
    assert!(!raw_text.contains("</think>"), "{raw}");
    let raw_off = post(none.addr, "/v1/chat/completions", &off).json();

    // Thinking on: the output never left the opened block, so it is all reasoning and
    // the content is null.
    let r = post(auto.addr, "/v1/chat/completions", &plain);
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    let m = &j["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], raw_text.trim_matches('\n'), "{j}");
    assert_eq!(m["content"], Value::Null, "{j}");
    let on_prompt = j["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(on_prompt, raw["usage"]["prompt_tokens"].as_u64().unwrap());

    // Streamed: the same reasoning as `delta.reasoning_content` fragments (more than one:
    // it goes out as it is written), no content.
    let mut sb = plain.clone();
    sb["stream"] = json!(true);
    let sr = post(auto.addr, "/v1/chat/completions", &sb);
    let (content, chunks) = chat_stream_text(&sr);
    assert_eq!(content, "", "{}", sr.body);
    let fragments: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["reasoning_content"].as_str())
        .collect();
    assert_eq!(fragments.concat(), raw_text.trim_matches('\n'), "{}", sr.body);
    assert!(fragments.len() > 1, "{}", sr.body);

    // Thinking off through chat_template_kwargs: the prompt holds the closed, empty block
    // (more tokens), and the answer is all content, as the raw server gives it.
    let r = post(auto.addr, "/v1/chat/completions", &off);
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    let m = &j["choices"][0]["message"];
    assert!(m.get("reasoning_content").is_none(), "{j}");
    assert_eq!(m["content"], raw_off["choices"][0]["message"]["content"], "{j}");
    let off_prompt = j["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(off_prompt > on_prompt, "{off_prompt} <= {on_prompt}");
    let mut sb = off.clone();
    sb["stream"] = json!(true);
    let (content, _) = chat_stream_text(&post(auto.addr, "/v1/chat/completions", &sb));
    assert_eq!(content, m["content"].as_str().unwrap());

    // Tools offered, not forced: the block is split off before calls are read (kept as
    // written, as a forced call's is); without the parser it is the content.
    let with_tools = chat_body(json!({"messages": ask, "max_tokens": 10, "tools": weather_tools()}));
    let raw = post(none.addr, "/v1/chat/completions", &with_tools).json();
    let raw_text = raw["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!raw_text.contains("</think>"), "{raw}");
    let j = post(auto.addr, "/v1/chat/completions", &with_tools).json();
    assert_eq!(j["choices"][0]["message"]["reasoning_content"], raw_text, "{j}");
    assert_eq!(j["choices"][0]["message"]["content"], "", "{j}");

    // Bad extra variables: one-line 400s naming the field; then the server still answers.
    for (extra, needle) in [
        (json!({"chat_template_kwargs": [1]}), "must be an object"),
        (json!({"chat_template_kwargs": "enable_thinking"}), "must be an object"),
        (
            json!({"chat_template_kwargs": {"messages": []}}),
            "may not set \"messages\"",
        ),
        (
            json!({"chat_template_kwargs": {"eos_token": "x"}}),
            "may not set \"eos_token\"",
        ),
        (json!({"reasoning_effort": 3}), "reasoning_effort"),
    ] {
        let mut b = plain.clone();
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let r = post(auto.addr, "/v1/chat/completions", &b);
        r.assert_error(400);
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains(needle) && !msg.contains('\n'), "{extra}: {msg}");
    }
    let r = post(
        auto.addr,
        "/v1/completions",
        &json!({"model": NAME, "prompt": "Hi", "max_tokens": 2, "chat_template_kwargs": {}}),
    );
    r.assert_error(400);
    let r = post(auto.addr, "/v1/chat/completions", &off);
    assert_eq!(r.status, 200, "{}", r.body);

    for s in [&mut auto, &mut none] {
        if let Some(stop) = s.stop.take() {
            let _ = stop.send(());
        }
    }
    let _ = std::fs::remove_dir_all(model);
}
