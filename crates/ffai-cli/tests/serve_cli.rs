//! `ffai serve` as a process: it listens where it says, answers, logs one line per
//! request, and exits 0 on SIGTERM and SIGINT. (The HTTP API itself is tested in
//! crates/ffai-server/tests/serve.rs.)

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{ffai, smollm2};

/// One GET over loopback; the status line and body.
fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[cfg(unix)]
#[test]
fn serve_answers_and_exits_0_on_signals() {
    for signal in ["TERM", "INT"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ffai"))
            .args(["serve", "-m", &smollm2(), "--port", "0", "--threads", "1"])
            .args([
                "--context",
                "512",
                "--max-sequences",
                "2",
                "--served-model-name",
                "tiny",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Stderr lines, read on a thread so waits stay bounded.
        let (tx, rx) = mpsc::channel::<String>();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let addr: SocketAddr = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no \"serving\" line; stderr so far: {lines:?}"));
            lines.push(line.clone());
            if let Some(rest) = line.split(" on http://").nth(1) {
                break rest.split(' ').next().unwrap().parse().unwrap();
            }
        };
        assert!(get(addr, "/health").starts_with("HTTP/1.1 200"));
        let models = get(addr, "/v1/models");
        assert!(models.contains("\"id\":\"tiny\""), "{models}");

        let killed = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let t = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "ffai serve did not stop on SIG{signal}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        lines.extend(rx.try_iter());
        assert!(status.success(), "SIG{signal}: {status:?}; stderr: {lines:?}");
        assert!(
            lines.iter().any(|l| l.contains("GET /health 200")),
            "no log line: {lines:?}"
        );
    }
}

#[test]
fn serve_refuses_bad_flags() {
    let out = ffai(&["serve", "-m", &smollm2(), "--port", "0", "--max-queue", "999999999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-queue"));
    let out = ffai(&["serve", "-m", &smollm2(), "--port", "0", "--max-sequences", "0"]);
    assert_eq!(out.status.code(), Some(1));
}
