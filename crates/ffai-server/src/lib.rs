//! `ffai serve`: an OpenAI-compatible HTTP server (axum on tokio) over ffai's threaded
//! batching [`Engine`].
//!
//! Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions` (both with server-sent-event streaming), `POST /tokenize`,
//! `POST /detokenize` and `GET /metrics` (Prometheus text).
//!
//! How a generation request flows: the handler parses and checks the body, tokenizes (on
//! the blocking pool: tokenizing and rendering a chat template take real time), reserves
//! one place per choice in the server's bounded admission count (full: 429), and submits
//! one engine sequence per choice. Each sequence's blocking [`RequestHandle`] is drained on
//! tokio's blocking pool by a forwarder that hands its events to the async side through a
//! channel; when the client goes away the channel closes, the forwarder drops the handle,
//! and the engine cancels the sequence at its next step. The async runtime never blocks.
//!
//! [`RequestHandle`]: ffai::engine::RequestHandle

mod api;
mod error;
mod metrics;
mod request;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::FutureExt;

use ffai::engine::Engine;
use ffai::generate::GenerationParameters;

pub use error::ApiError;
pub use request::MAX_N;

/// Request bodies larger than this are refused with 413 before they are read whole.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// How the server presents itself and what it admits.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The model id clients name (`model`) and `/v1/models` lists.
    pub served_model_name: String,
    /// When set, every endpoint but `/health` needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Sequences that may wait beyond the engine's `max_seqs` running ones; past both,
    /// requests get 429.
    pub max_queue: usize,
    /// After the shutdown signal, how long requests in flight may take to finish before
    /// they are cancelled.
    pub shutdown_grace: Duration,
    /// Browser origins allowed to call the API (CORS); empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// Whether chat answers of thinking models have their reasoning block split off
    /// (`--reasoning-parser`).
    pub reasoning_parser: ReasoningParser,
}

/// What the server does with the reasoning block a thinking model writes before an
/// ordinary chat answer (a forced tool call's is always split off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReasoningParser {
    /// Leave it in the content.
    None,
    /// Where the chat template teaches one (Qwen3 and DeepSeek-R1's `<think>` blocks,
    /// gpt-oss's analysis message) and the rendered prompt leaves room for it: the
    /// message's `reasoning_content`, and the rest its `content` (see `ffai::reasoning`).
    #[default]
    Auto,
}

impl std::str::FromStr for ReasoningParser {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(ReasoningParser::None),
            "auto" => Ok(ReasoningParser::Auto),
            other => Err(format!("unknown reasoning parser \"{other}\" (known: none, auto)")),
        }
    }
}

/// What every handler shares.
pub(crate) struct AppState {
    engine: Arc<Engine>,
    opts: ServerOptions,
    /// The model's default generation parameters (requests override them).
    defaults: GenerationParameters,
    /// Most sequences held at once: the engine's running slots plus the queue.
    capacity: usize,
    /// Sequences submitted and not yet finished (see [`Slot`]).
    in_flight: Arc<AtomicUsize>,
    metrics: metrics::Metrics,
    /// Unix time the server started (the `created` of `/v1/models`).
    started: u64,
    next_id: AtomicU64,
}

/// One admitted sequence's place in the admission count, given back on drop.
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AppState {
    /// Takes `n` places at once, or none when fewer than `n` are free.
    fn reserve(&self, n: usize) -> Option<Vec<Slot>> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur + n <= self.capacity).then_some(cur + n)
            })
            .ok()?;
        Some((0..n).map(|_| Slot(self.in_flight.clone())).collect())
    }

    /// A fresh response id with `prefix` (`chatcmpl`, `cmpl`): the start time and a
    /// counter, unique within one server.
    fn new_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:08x}", self.started)
    }

    /// Counts a finished request and writes its log line.
    fn finish_request(&self, method: &Method, path: &str, status: u16, tokens: Option<Tokens>, started: Instant) {
        self.metrics.count_request(status);
        // The path is the client's; keep the line one short line whatever it sent.
        let path: String = path.chars().take(200).collect();
        let tokens = match tokens {
            Some(t) => format!(" prompt_tokens={} completion_tokens={}", t.prompt, t.completion),
            None => String::new(),
        };
        eprintln!(
            "ffai serve: {method} {path} {status}{tokens} {:.3}s",
            started.elapsed().as_secs_f64()
        );
    }
}

/// Token counts a handler attaches to its response for the log line.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tokens {
    pub prompt: usize,
    pub completion: usize,
}

/// Marks a streamed response: its log line is written when the stream ends.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoggedLater;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The routes, over a running engine.
pub fn router(engine: Arc<Engine>, opts: ServerOptions) -> Router {
    let capacity = engine.config().max_seqs.saturating_add(opts.max_queue);
    let state = Arc::new(AppState {
        defaults: engine.model().default_parameters(),
        engine,
        opts,
        capacity,
        in_flight: Arc::new(AtomicUsize::new(0)),
        metrics: metrics::Metrics::default(),
        started: unix_now(),
        next_id: AtomicU64::new(0),
    });
    // Everything but /health sits behind the API key (when one is set).
    let protected = Router::new()
        .route("/v1/models", get(api::models))
        .route("/v1/completions", post(api::completions))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/tokenize", post(api::tokenize))
        .route("/detokenize", post(api::detokenize))
        .route("/metrics", get(api::metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    let cors = cors_layer(&state.opts.cors_origins);
    let app = Router::new()
        .route("/health", get(api::health))
        .merge(protected)
        .fallback(api::no_route)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(refuse_large_bodies))
        .layer(middleware::from_fn_with_state(state.clone(), log_request))
        .with_state(state);
    // Outermost, so a browser's preflight (OPTIONS) is answered before the API key check.
    match cors {
        Some(c) => app.layer(c),
        None => app,
    }
}

/// Whether `origin` can be a CORS origin (`*`, or a valid header value such as
/// `http://localhost:3000`).
pub fn check_cors_origin(origin: &str) -> Result<(), String> {
    if origin == "*" || (!origin.is_empty() && origin.parse::<axum::http::HeaderValue>().is_ok()) {
        Ok(())
    } else {
        Err(format!("{origin:?} is not a valid origin"))
    }
}

/// CORS for the listed origins (`*` allows any), or None when none are listed.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse::<axum::http::HeaderValue>().ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
    )
}

/// Logs and counts every request (streams log themselves when they end). A request whose
/// client leaves before the answer is logged and counted as 499 (nginx's "client closed
/// request"), since its handler is dropped unfinished.
async fn log_request(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let mut pending = Pending {
        st: st.clone(),
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        started: Instant::now(),
        answered: false,
    };
    let resp = next.run(req).await;
    pending.answered = true;
    if resp.extensions().get::<LoggedLater>().is_none() {
        let tokens = resp.extensions().get::<Tokens>().copied();
        st.finish_request(
            &pending.method,
            &pending.path,
            resp.status().as_u16(),
            tokens,
            pending.started,
        );
    }
    resp
}

/// A request being handled; logged as 499 if dropped before it is answered.
struct Pending {
    st: Arc<AppState>,
    method: Method,
    path: String,
    started: Instant,
    answered: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.answered {
            self.st
                .finish_request(&self.method, &self.path, 499, None, self.started);
        }
    }
}

/// 413 at once for a body whose declared length is over the limit. (Bodies without a
/// length, chunked, are cut off by `DefaultBodyLimit` as they are read: 413 after
/// `MAX_BODY_BYTES`, never buffered whole.)
async fn refuse_large_bodies(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return ApiError::with_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        )
        .into_response();
    }
    next.run(req).await
}

/// 401 unless the request carries `Authorization: Bearer KEY` (when a key is set).
async fn require_api_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.opts.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Compares two secrets in time independent of where they first differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves `engine` on `listener` until `shutdown` completes; then stops accepting, gives
/// requests in flight `opts.shutdown_grace` to finish, cancels what still runs (shutting
/// the engine down) and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = opts.shutdown_grace;
    let app = router(engine.clone(), opts);
    let signal = shutdown.shared();
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(signal.clone())
        .into_future();
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return r,
        () = signal => {}
    }
    // No new connections now; let what runs finish, within the grace period.
    if let Ok(r) = tokio::time::timeout(grace, &mut server).await {
        return r;
    }
    eprintln!("ffai serve: cancelling the requests still running");
    let e = engine.clone();
    // Cancels every sequence; their streams then end, and so do the connections.
    let _ = tokio::task::spawn_blocking(move || e.shutdown()).await;
    tokio::time::timeout(Duration::from_secs(5), &mut server)
        .await
        .unwrap_or(Ok(()))
}

/// While the model loads: `/health` and every other path answer 503 (OpenAI-shaped), so
/// orchestrators see the server up but not ready.
fn loading_response() -> Response {
    ApiError::with_status(StatusCode::SERVICE_UNAVAILABLE, "the model is still loading").into_response()
}

/// As [`run`], but listening before the model is loaded: `load` runs on a blocking thread
/// and, until it returns, every request gets 503 (`/health` included); then the routes of
/// [`router`] serve. A failed load ends the server with its error. `capacity` bounds the
/// runtime's blocking threads (one per sequence in flight).
pub fn run_loading<F>(load: F, opts: ServerOptions, capacity: usize, host: &str, port: u16) -> Result<(), String>
where
    F: FnOnce() -> Result<Arc<Engine>, String> + Send + 'static,
{
    use tower::ServiceExt;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(capacity.saturating_add(64))
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let name = opts.served_model_name.clone();
    let grace = opts.shutdown_grace;
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .map_err(|e| format!("cannot listen on {host}:{port}: {e}"))?;
        let addr: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
        eprintln!("ffai serve: loading the model; until it is ready, http://{addr} answers 503");
        let app: Arc<std::sync::OnceLock<Router>> = Arc::default();
        let engine: Arc<std::sync::OnceLock<Arc<Engine>>> = Arc::default();
        let front = {
            let app = app.clone();
            Router::new().fallback(move |req: Request| {
                let app = app.clone();
                async move {
                    match app.get() {
                        Some(r) => r.clone().oneshot(req).await.into_response(),
                        None => loading_response(),
                    }
                }
            })
        };
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
        {
            let (app, engine) = (app.clone(), engine.clone());
            tokio::task::spawn_blocking(move || match load() {
                Ok(e) => {
                    let _ = app.set(router(e.clone(), opts));
                    let _ = engine.set(e);
                    eprintln!("ffai serve: serving \"{name}\" on http://{addr} (Ctrl-C to stop)");
                }
                Err(m) => {
                    let _ = failed_tx.send(m);
                }
            });
        }
        let failed = Arc::new(std::sync::Mutex::new(None::<String>));
        let stop = {
            let failed = failed.clone();
            async move {
                tokio::select! {
                    () = shutdown_signal() => {}
                    Ok(m) = failed_rx => {
                        if let Ok(mut f) = failed.lock() {
                            *f = Some(m);
                        }
                    }
                }
            }
        }
        .shared();
        let server = axum::serve(listener, front)
            .with_graceful_shutdown(stop.clone())
            .into_future();
        tokio::pin!(server);
        tokio::select! {
            r = &mut server => r.map_err(|e| format!("server error: {e}"))?,
            () = stop => {
                if tokio::time::timeout(grace, &mut server).await.is_err() {
                    eprintln!("ffai serve: cancelling the requests still running");
                    if let Some(e) = engine.get().cloned() {
                        let _ = tokio::task::spawn_blocking(move || e.shutdown()).await;
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(5), &mut server).await;
                }
            }
        }
        if let Some(e) = engine.get().cloned() {
            let _ = tokio::task::spawn_blocking(move || e.shutdown()).await;
        }
        if let Some(m) = failed.lock().ok().and_then(|mut f| f.take()) {
            return Err(m);
        }
        eprintln!("ffai serve: stopped");
        Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Runs the server on its own tokio runtime until SIGINT or SIGTERM, then shuts it and
/// the engine down. For the `ffai serve` command.
pub fn run(engine: Arc<Engine>, opts: ServerOptions, host: &str, port: u16) -> Result<(), String> {
    let capacity = engine.config().max_seqs.saturating_add(opts.max_queue);
    run_loading(move || Ok(engine), opts, capacity, host, port)
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No signal handling here: never complete.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
