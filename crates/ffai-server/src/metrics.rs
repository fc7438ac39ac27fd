//! Counters and histograms the server keeps itself, and the Prometheus text of `/metrics`
//! (which adds the engine's own gauges and counters).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use ffai::engine::EngineStats;

/// Upper bounds (seconds) of the time-to-first-token buckets.
const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Upper bounds (seconds) of the time-per-output-token buckets.
const TPOT_BUCKETS: &[f64] = &[0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5];

/// A Prometheus histogram with fixed buckets.
struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last entry counts values above every bound.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

struct Inner {
    /// Finished requests by HTTP status.
    by_status: BTreeMap<u16, u64>,
    ttft: Histogram,
    tpot: Histogram,
}

/// The server's own measurements, shared by every handler.
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                by_status: BTreeMap::new(),
                ttft: Histogram::new(TTFT_BUCKETS),
                tpot: Histogram::new(TPOT_BUCKETS),
            }),
        }
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves counters that are still valid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn count_request(&self, status: u16) {
        *self.lock().by_status.entry(status).or_default() += 1;
    }

    /// One sequence's timings: seconds to its first token, and the mean seconds between
    /// later tokens (when it had more than one).
    pub fn observe_sequence(&self, ttft: Option<f64>, tpot: Option<f64>) {
        let mut m = self.lock();
        if let Some(t) = ttft {
            m.ttft.observe(t);
        }
        if let Some(t) = tpot {
            m.tpot.observe(t);
        }
    }

    /// The Prometheus text exposition of everything, engine statistics included.
    pub fn render(&self, engine: &EngineStats) -> String {
        let mut out = String::with_capacity(4096);
        let mut scalar = |name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        scalar(
            "ffai_requests_running",
            "gauge",
            "Sequences running in the engine.",
            engine.running as f64,
        );
        scalar(
            "ffai_requests_waiting",
            "gauge",
            "Sequences queued for the engine.",
            engine.waiting as f64,
        );
        scalar(
            "ffai_kv_cache_usage_ratio",
            "gauge",
            "Fraction of the KV cache blocks in use (0..1).",
            engine.kv_usage,
        );
        let s = &engine.scheduler;
        scalar(
            "ffai_prompt_tokens_total",
            "counter",
            "Prompt tokens admitted.",
            s.prompt_tokens as f64,
        );
        scalar(
            "ffai_generation_tokens_total",
            "counter",
            "Tokens generated.",
            s.generated_tokens as f64,
        );
        scalar(
            "ffai_prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens served from the prefix cache.",
            s.prefix_hit_tokens as f64,
        );
        scalar(
            "ffai_preemptions_total",
            "counter",
            "Sequences preempted and recomputed.",
            s.preemptions as f64,
        );
        let m = self.lock();
        let _ = writeln!(
            out,
            "# HELP ffai_requests_total HTTP requests answered, by status.\n# TYPE ffai_requests_total counter"
        );
        for (status, n) in &m.by_status {
            let _ = writeln!(out, "ffai_requests_total{{status=\"{status}\"}} {n}");
        }
        m.ttft.render(
            &mut out,
            "ffai_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token.",
        );
        m.tpot.render(
            &mut out,
            "ffai_time_per_output_token_seconds",
            "Mean seconds between a sequence's generated tokens after the first.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_text() {
        let m = Metrics::default();
        m.observe_sequence(Some(0.02), Some(0.5));
        m.observe_sequence(Some(100.0), None);
        m.count_request(200);
        let t = m.render(&EngineStats::default());
        assert!(
            t.contains("ffai_time_to_first_token_seconds_bucket{le=\"0.025\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("ffai_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2\n"),
            "{t}"
        );
        assert!(t.contains("ffai_time_per_output_token_seconds_count 1\n"), "{t}");
        assert!(t.contains("ffai_requests_total{status=\"200\"} 1\n"), "{t}");
    }
}
