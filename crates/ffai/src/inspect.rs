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
    /// When set, every linear layer's input is read back and its per-column mean square
    /// accumulated (calibration for `convert`; see [`crate::importance`]).
    pub importance: Option<InputSquares>,
}

/// Per linear-layer input site (`"L3.attn_in"`, `"head_in"`, ...): the sum over tokens of
/// each input column's square, and the token count.
#[derive(Clone, Debug, Default)]
pub struct InputSquares {
    pub sites: std::collections::BTreeMap<String, (Vec<f64>, usize)>,
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
                    importance: None,
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
            importance: None,
        }
    }

    /// Records the input of a linear layer (`rows` tokens of `cols` values) at `site`
    /// when importance collection is on; otherwise one branch.
    #[inline]
    pub fn linear_input<B: Backend>(
        &mut self,
        b: &B,
        buf: &B::Buf,
        rows: usize,
        cols: usize,
        site: &str,
        layer: Option<usize>,
    ) {
        if self.importance.is_some() {
            self.accumulate(b, buf, rows, cols, site, layer);
        }
    }

    #[cold]
    fn accumulate<B: Backend>(
        &mut self,
        b: &B,
        buf: &B::Buf,
        rows: usize,
        cols: usize,
        site: &str,
        layer: Option<usize>,
    ) {
        let Some(imp) = &mut self.importance else { return };
        let mut host = vec![0f32; rows * cols];
        b.download(buf, 0..rows * cols, &mut host);
        let key = match layer {
            Some(l) => format!("L{l}.{site}"),
            None => site.to_string(),
        };
        let (sums, n) = imp.sites.entry(key).or_insert_with(|| (vec![0.0; cols], 0));
        for row in host.chunks_exact(cols) {
            for (s, &x) in sums.iter_mut().zip(row) {
                *s += x as f64 * x as f64;
            }
        }
        *n += rows;
    }

    /// Records statistics of `buf[..len]` at a boundary. `layer` None = a model-level tap.
    #[inline]
    /// Whether this tap reads activations (prints or collects importance): such steps
    /// cannot be recorded and replayed as a GPU graph.
    pub fn is_active(&self) -> bool {
        self.enabled || self.importance.is_some()
    }

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
