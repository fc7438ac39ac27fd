//! Layer-boundary taps for `ffai inspect --layer-trace` (or FFAI_LAYER_TRACE=1 /
//! FFAI_LAYER_TRACE=0,1,5). Off, a tap is one predictable branch: no readback, no
//! formatting, no allocation.

use ffai_kernels::backend::Backend;

#[derive(Clone, Debug, Default)]
pub struct Tap {
    pub enabled: bool,
    /// Only these layers (embedding/final taps always print when enabled).
    pub layers: Option<Vec<usize>>,
    /// Also print each line to stderr as it is recorded.
    pub echo: bool,
    pub lines: Vec<String>,
}

impl Tap {
    /// The tap the environment asks for: FFAI_LAYER_TRACE unset or "0" = off; "1" = all
    /// layers; a comma list = those layers. Lines go to stderr.
    pub fn from_env() -> Tap {
        match std::env::var("FFAI_LAYER_TRACE") {
            Ok(v) if !v.is_empty() && v != "0" => {
                let layers = if v == "1" || v == "all" {
                    None
                } else {
                    Some(v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
                };
                Tap {
                    enabled: true,
                    layers,
                    echo: true,
                    lines: Vec::new(),
                }
            }
            _ => Tap::default(),
        }
    }

    pub fn layers(layers: Option<Vec<usize>>) -> Tap {
        Tap {
            enabled: true,
            layers,
            echo: false,
            lines: Vec::new(),
        }
    }

    /// Records statistics of `buf[..len]` at a boundary. `layer` None = a model-level tap.
    #[inline]
    pub fn boundary<B: Backend>(&mut self, b: &B, buf: &B::Buf, len: usize, label: &str, layer: Option<usize>) {
        if !self.enabled {
            return;
        }
        self.record(b, buf, len, label, layer);
    }

    #[cold]
    fn record<B: Backend>(&mut self, b: &B, buf: &B::Buf, len: usize, label: &str, layer: Option<usize>) {
        if let (Some(l), Some(sel)) = (layer, &self.layers) {
            if !sel.contains(&l) {
                return;
            }
        }
        let mut host = vec![0f32; len];
        b.download(buf, 0..len, &mut host);
        let line = format!("{} {}", tag(label, layer), stats(&host));
        if self.echo {
            eprintln!("{line}");
        }
        self.lines.push(line);
    }
}

fn tag(label: &str, layer: Option<usize>) -> String {
    match layer {
        Some(l) => format!("[L{l} {label}]"),
        None => format!("[{label}]"),
    }
}

/// `n=.. min=.. max=.. nan=.. inf=.. first=[..]` over finite values.
pub fn stats(v: &[f32]) -> String {
    let (mut min, mut max, mut nan, mut inf) = (f32::INFINITY, f32::NEG_INFINITY, 0usize, 0usize);
    for &x in v {
        if x.is_nan() {
            nan += 1;
        } else if x.is_infinite() {
            inf += 1;
        } else {
            min = min.min(x);
            max = max.max(x);
        }
    }
    let first: Vec<String> = v.iter().take(4).map(|x| format!("{x:.4}")).collect();
    format!(
        "n={} min={min:.4} max={max:.4} nan={nan} inf={inf} first=[{}]",
        v.len(),
        first.join(", ")
    )
}
