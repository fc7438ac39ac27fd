//! The official `openai` Python client (installed by scripts/test.sh) against a real
//! `ffai serve` on loopback: models, chat whole and streamed with usage, completions, and
//! errors as the client's exception types (tests/openai_client.py). A missing Python or
//! `openai` package fails the test.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::smollm2;

#[test]
fn the_openai_python_client_works_against_ffai_serve() {
    let mut server = Command::new(env!("CARGO_BIN_EXE_ffai"))
        .args(["serve", "-m", &smollm2(), "--port", "0", "--threads", "2"])
        .args([
            "--context",
            "1024",
            "--max-sequences",
            "4",
            "--served-model-name",
            "smol",
        ])
        .args(["--api-key", "test-key"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = server.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let addr: SocketAddr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("ffai serve printed no address");
        if let Some(rest) = line.split(" on http://").nth(1) {
            break rest.split(' ').next().unwrap().parse().unwrap();
        }
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/openai_client.py");
    let mut py = Command::new("python3")
        .args([script, &format!("http://{addr}/v1")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    // Bounded: the client has a 60 s timeout per call; the whole script gets 180 s.
    let t = Instant::now();
    let status = loop {
        if let Some(s) = py.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(180) {
            let _ = py.kill();
            let _ = server.kill();
            panic!("the openai client script did not finish in 180 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = py.wait_with_output().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        status.success() && stdout.trim_end().ends_with("ok"),
        "openai client failed ({status}):\n{stdout}\n{stderr}"
    );
}
