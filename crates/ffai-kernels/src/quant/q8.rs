//! Integer dot products of quantized weight rows with 8-bit quantized activations.
//!
//! Instead of decoding every weight to `f32` (what [`dot_row`](super::dot_row)
//! does), the activation vector is quantized once per token to signed bytes with one
//! `f32` scale per block, and each weight block is multiplied with it in integer
//! arithmetic; only one scale multiply per block (per sub-block for the K-quants)
//! is done in floating point. This is the scheme ggml uses; the code here is our own.
//!
//! # Activation formats ([`ActFormat`])
//!
//! | weight types | activation blocks |
//! |--------------|-------------------|
//! | Q4_0, Q5_0, Q8_0 | [`ActFormat::Q8_0`]: 32 × `i8` + `d: f32` (+ `Σq: i32`, for the zero points) |
//! | Q4_1, Q5_1, Affine (MLX) | [`ActFormat::Q8_1`]: as Q8_0 plus `s = d · Σq` (`f32`), for the weights' min / bias term |
//! | Q4_K, Q5_K, Q6_K | [`ActFormat::Q8K`]: 256 × `i8` + `d: f32` + 16 × `i16` sums of 16 consecutive `q` |
//! | Q2_K, Q3_K, Q8_K, IQ4_XS | [`ActFormat::Q8K`] (kernels in `q8/lowbit.rs`, `q8/avx2/lowbit.rs`) |
//! | IQ4_NL, MXFP4 | [`ActFormat::Q8_0`] (portable kernels in `q8/lowbit.rs`; on x86 the legacy kernels, as codebook kinds) |
//! | F32, F16, BF16 | [`ActFormat::F32`]: a plain `f32` copy; [`dot_row_q8`] then just calls [`dot_row`](super::dot_row) |
//!
//! Every block of `x` is quantized symmetrically: `amax = max |x|`, `d = amax / 127`,
//! `q = round_ties_even(x · 127 / amax)` (so `q ∈ [-127, 127]`; never -128, which
//! the AVX2 kernels rely on). An all-zero block gets `d = 0`, `q = 0`. A block with a
//! NaN or infinite element gets `d = NaN`, `q = 0`, so any dot with it is NaN (as the
//! `f32` path would give). Blocks so tiny that `127 / amax` overflows are handled
//! exactly (an extra power-of-two prescale), so subnormal activations work.
//! Relative to the unquantized activation, each element is off by at most
//! `d / 2 = amax / 254` — about 0.4 % of the block's largest magnitude.
//!
//! # Entry points
//!
//! * [`dot_row_q8`]: one row, one token.
//! * [`dot_rows_q8`]: a block of consecutive rows, one token (decode). Same results
//!   as per-row calls, with the checks and the dispatch paid once per call (worth
//!   ~20 % on 576-element rows).
//! * [`dot_row_q8_multi`]: one row, several tokens (prefill). Each weight block is
//!   decoded once per tile of up to 8 tokens.
//! * [`dot_rows_q8_multi`]: a block of consecutive rows, several tokens (prefill GEMM
//!   tile). Blocked over rows and tokens for the legacy types; same results as
//!   per-row [`dot_row_q8_multi`] calls.
//!
//! # Implementations
//!
//! Four implementations exist, chosen at run time (the fastest the CPU has, capped by
//! [`force_q8_level`] and by the environment variable [`CPU_LEVEL_ENV`],
//! `FFAI_CPU_LEVEL`; [`q8_backend_name`] says which runs):
//! * `"avx512vnni"`: x86-64 with AVX-512 F/BW/VL/VNNI (plus AVX2, FMA, F16C): the
//!   AVX2 kernels with `vpdpbusd` / `vpdpwssd` (EVEX, 256-bit vectors), built twice: with
//!   GFNI where the CPU has it (packed nibbles split by one `vgf2p8affineqb`) and without,
//!   bit-identical (`allow_gfni` lets tests run the plain build on a CPU with GFNI);
//! * `"avxvnni"`: the same kernels in the VEX AVX-VNNI encoding;
//! * `"avx2"`: x86-64 with AVX2, FMA and F16C (`vpmaddubsw` / `vpmaddwd`);
//! * `"portable"`: plain Rust, used elsewhere or when [`force_portable`]`(true)`.
//!
//! The affine (MLX) types run their own kernels (`affine.rs`) on the same levels; their
//! VNNI builds take 8-bit levels unsigned, so for 8 bits they round differently from AVX2
//! (the same exact integers, other `f32` terms), unlike the GGUF types. On the AVX-512
//! level their prefill goes through [`TokenTile`] like the legacy types (blocks of 16 rows
//! × 32 tokens, `vnni/avx512/wide.rs`), bit-identical to their row kernels.
//!
//! All quantize activations to **identical bytes** (the x86 levels share the AVX2
//! quantizer) and compute **identical integer dot products** per block (sub-block
//! for the K-quants). The VNNI kernels produce the AVX2 kernels' per-lane integer
//! sums and share their `f32` code, so their results are bit-identical to AVX2. The
//! x86 paths and the portable one differ only in how the per-block `f32` terms are combined. The
//! portable path adds `(d_w · d_x) · isum` block by block, sequentially. The AVX2 path
//! keeps 8 lanes per token: for the 32-element formats (the legacy ones, IQ4_NL and
//! MXFP4) lane `k` accumulates blocks `k, k + 8, …` (one FMA per 8 blocks), for the
//! K-quants and the Q8_K low-bit types each lane holds a partial
//! integer sum of every super-block; the lanes are added at the end. The difference
//! is ordinary `f32` rounding, a few ulps of `Σ_blocks |term|` (the tests allow
//! `1e-5 · Σ|w·x|`, with min terms counted separately).
//!
//! Within one implementation, [`dot_row_q8_multi`], [`dot_rows_q8`] and [`dot_rows_q8_multi`] are
//! bit-identical to calling [`dot_row_q8`] token by token / row by row: every token's
//! arithmetic is the same sequence of operations whatever tile it is processed in.
//!
//! # Threads
//!
//! [`QuantizedActs`] is `Send + Sync`; any number of threads may call the dot
//! functions on one shared `&QuantizedActs`. To quantize token rows in parallel,
//! call [`QuantizedActs::prepare`] once, then [`QuantizedActs::writer`] and hand the
//! (`Sync`) [`ActsWriter`] to the threads: each calls
//! [`ActsWriter::quantize_rows`] for its own token range. Overlapping ranges are
//! caught at run time (every token row can be claimed once per writer; a second
//! claim panics), so the API is safe.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use super::{dot_row, WeightType, QK, QK_K};

/// Legacy block kinds, the const-generic parameter of every level's legacy kernels.
const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q5_0: u8 = 2;
const Q5_1: u8 = 3;
const Q8_0: u8 = 4;
/// IQ4_NL, run by the x86 legacy kernels as a kind of its own: an `f16` scale and 32
/// 4-bit indices into the IQ4_NL codebook (signed levels, like Q8_0's).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const NL4: u8 = 5;
/// MXFP4, likewise: an E8M0 scale byte and 32 4-bit E2M1 codes (signed levels).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const FP4: u8 = 6;

/// Bytes per block of legacy kind `k`.
const fn legacy_bytes(k: u8) -> usize {
    match k {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        Q5_1 => 24,
        NL4 => 18,
        FP4 => 17,
        _ => 34,
    }
}

/// True for the legacy kinds whose levels are signed (Q8_0 and the codebook kinds).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const fn signed_levels(k: u8) -> bool {
    matches!(k, Q8_0 | NL4 | FP4)
}

mod affine;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod lowbit;
mod portable;
#[cfg(target_arch = "x86_64")]
mod vnni;

/// Sums of `q` kept per Q8_K super-block (one per 16 elements).
const KSUMS: usize = QK_K / 16;

/// The activation block format a weight type's integer dot wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActFormat {
    /// Plain `f32` copy (float weight types: no integer path).
    F32,
    /// 32 × `i8`, `d: f32`.
    Q8_0,
    /// 32 × `i8`, `d: f32`, `s = d · Σq: f32`.
    Q8_1,
    /// 256 × `i8`, `d: f32`, 16 × `i16` partial sums of 16 elements.
    Q8K,
}

impl ActFormat {
    /// The format [`dot_row_q8`] needs for weights of type `ty`.
    pub const fn for_weight(ty: WeightType) -> ActFormat {
        match ty {
            WeightType::F32 | WeightType::F16 | WeightType::BF16 => ActFormat::F32,
            WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => ActFormat::Q8_0,
            // Affine: the per-32 `s = d · Σq` serve the bias term (groups are whole 32s).
            WeightType::Q4_1 | WeightType::Q5_1 | WeightType::Affine { .. } => ActFormat::Q8_1,
            WeightType::Q4K | WeightType::Q5K | WeightType::Q6K => ActFormat::Q8K,
            WeightType::Q2K | WeightType::Q3K | WeightType::Q8K | WeightType::IQ4XS => ActFormat::Q8K,
            WeightType::IQ4NL | WeightType::MXFP4 => ActFormat::Q8_0,
        }
    }

    /// Elements per block (1 for `F32`).
    pub const fn block_len(self) -> usize {
        match self {
            ActFormat::F32 => 1,
            ActFormat::Q8_0 | ActFormat::Q8_1 => QK,
            ActFormat::Q8K => QK_K,
        }
    }
}

/// True when `ty` has an integer-dot path (every quantized type).
pub fn has_q8_path(ty: WeightType) -> bool {
    ty.is_quantized()
}

// ----------------------------------------------------------------- dispatch

/// Which implementation runs: `UNKNOWN` until the first call detects the CPU.
static ACTIVE: AtomicU8 = AtomicU8::new(UNKNOWN);
/// The highest implementation allowed, set by [`force_q8_level`] (a `Q8Level` as `u8`).
static CAP: AtomicU8 = AtomicU8::new(Q8Level::Best as u8);
const UNKNOWN: u8 = 0;
const PORTABLE: u8 = 1;
#[cfg(target_arch = "x86_64")]
const AVX2: u8 = 2;
#[cfg(target_arch = "x86_64")]
const AVXVNNI: u8 = 3;
#[cfg(target_arch = "x86_64")]
const AVX512VNNI: u8 = 4;

/// The most capable implementation [`force_q8_level`] allows. Each level falls back to
/// the next lower one the CPU supports: `Avx512Vnni` → `AvxVnni` → `Avx2` → `Portable`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Q8Level {
    /// Plain Rust ([`q8_backend_name`] `"portable"`).
    Portable = 1,
    /// AVX2 + FMA + F16C (`"avx2"`).
    Avx2 = 2,
    /// AVX-VNNI on 256-bit vectors (`"avxvnni"`).
    AvxVnni = 3,
    /// AVX-512 VNNI + VL on 256-bit vectors (`"avx512vnni"`).
    Avx512Vnni = 4,
    /// Whatever is fastest on this CPU (the default).
    Best = 255,
}

impl Q8Level {
    /// The levels a name can give, lowest first.
    pub const NAMED: [Q8Level; 4] = [Q8Level::Portable, Q8Level::Avx2, Q8Level::AvxVnni, Q8Level::Avx512Vnni];

    /// The level's name: what [`q8_backend_name`] says when it runs, `"best"` for [`Q8Level::Best`].
    pub fn name(self) -> &'static str {
        match self {
            Q8Level::Portable => "portable",
            Q8Level::Avx2 => "avx2",
            Q8Level::AvxVnni => "avxvnni",
            Q8Level::Avx512Vnni => "avx512vnni",
            Q8Level::Best => "best",
        }
    }

    /// The level named `s` (one of [`Q8Level::name`]'s names, any case).
    pub fn parse(s: &str) -> Option<Q8Level> {
        let s = s.trim().to_ascii_lowercase();
        Q8Level::NAMED
            .into_iter()
            .chain([Q8Level::Best])
            .find(|l| l.name() == s)
    }
}

/// The environment variable that caps the CPU kernels' level for the whole process:
/// `portable`, `avx2`, `avxvnni`, `avx512vnni` or `best` (the default when unset or
/// empty). Read once, at the first kernel call. The level that runs is the best this CPU
/// has at or below both this cap and [`force_q8_level`]'s, so tests that walk the levels
/// stay inside it. Meant for CI (the portable and AVX2 legs of scripts/test.sh) and for
/// reproducing another machine's arithmetic.
pub const CPU_LEVEL_ENV: &str = "FFAI_CPU_LEVEL";

/// The cap [`CPU_LEVEL_ENV`] sets ([`Q8Level::Best`] when unset), or an error naming the
/// value when it names no level. Read once per process.
pub fn env_level() -> Result<Q8Level, String> {
    static ENV: std::sync::OnceLock<Result<Q8Level, String>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| match std::env::var_os(CPU_LEVEL_ENV) {
        None => Ok(Q8Level::Best),
        Some(v) if v.is_empty() => Ok(Q8Level::Best),
        Some(v) => v.to_str().and_then(Q8Level::parse).ok_or_else(|| {
            format!(
                "{CPU_LEVEL_ENV}={}: expected portable, avx2, avxvnni, avx512vnni or best",
                v.to_string_lossy()
            )
        }),
    })
    .clone()
}

/// The cap in force from the environment; a bad value runs the portable kernels (the
/// CLI refuses one before any kernel runs, see [`env_level`]) after one warning.
fn env_cap() -> u8 {
    match env_level() {
        Ok(l) => l as u8,
        Err(e) => {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                eprintln!("warning: {e}; running the portable kernels");
            }
            PORTABLE
        }
    }
}

/// Makes every following call use at most implementation `level` (the best the CPU
/// supports at or below it and at or below [`CPU_LEVEL_ENV`]'s cap). Global; meant for
/// tests and benchmarks (calls already running on other threads finish on the
/// implementation they chose).
pub fn force_q8_level(level: Q8Level) {
    CAP.store(level as u8, Ordering::SeqCst);
    ACTIVE.store(UNKNOWN, Ordering::SeqCst);
}

/// Makes every following call use the portable implementation (`true`) or the
/// fastest one the CPU supports (`false`, the default): `force_q8_level(Portable)` /
/// `force_q8_level(Best)`.
pub fn force_portable(on: bool) {
    force_q8_level(if on { Q8Level::Portable } else { Q8Level::Best });
}

/// The best implementation this CPU supports, at most `cap` and the environment's cap.
fn detect(cap: u8) -> u8 {
    let cap = cap.min(env_cap());
    #[cfg(target_arch = "x86_64")]
    {
        if cap >= AVX512VNNI && vnni::avx512::detected() {
            return AVX512VNNI;
        }
        if cap >= AVXVNNI && vnni::avx::detected() {
            return AVXVNNI;
        }
        if cap >= AVX2 && avx2::detected() {
            return AVX2;
        }
    }
    let _ = cap;
    PORTABLE
}

/// The implementation that dots weights of type `ty`: the active one, except for the
/// low-bit types with Q8_K activations (Q2_K, Q3_K, Q8_K, IQ4_XS), which have portable
/// kernels (`lowbit.rs`) and AVX2 ones (`avx2/lowbit.rs`) that the VNNI levels share.
/// (IQ4_NL and MXFP4 have portable kernels in `lowbit.rs` and run every x86 level's
/// legacy kernels, as kinds `NL4` and `FP4`.)
#[inline]
fn level_for(ty: WeightType) -> u8 {
    let a = active();
    if !lowbit::handles(ty) || a == PORTABLE {
        return a;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::lowbit::handles(ty) {
        return AVX2;
    }
    a
}

/// The implementation to use now (one relaxed load once known).
#[inline]
fn active() -> u8 {
    match ACTIVE.load(Ordering::Relaxed) {
        UNKNOWN => {
            let a = detect(CAP.load(Ordering::SeqCst));
            // Only fill in an unknown state: a concurrent `force_q8_level` wins.
            let _ = ACTIVE.compare_exchange(UNKNOWN, a, Ordering::SeqCst, Ordering::Relaxed);
            a
        }
        a => a,
    }
}

/// True when AVX2 kernels may run now: the CPU has AVX2, FMA and F16C and the
/// level is not forced to [`Q8Level::Portable`]. (True on every VNNI level too, which
/// implies AVX2.) For other modules' AVX2 kernels that follow the same switch.
pub fn avx2_allowed() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        active() >= AVX2
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when 512-bit kernels may run now: the level in force is AVX-512 VNNI (detected,
/// not forced lower). Other modules' AVX-512 kernels follow this switch, so forcing
/// [`Q8Level::Avx2`] runs their 256-bit versions for comparison.
pub fn avx512_allowed() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        active() == AVX512VNNI
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Allows (`true`, the default) or forbids the AVX-512 level's GFNI build of its kernels
/// (bit-identical to the plain build, which runs when the CPU lacks GFNI). Global; for
/// tests that compare the two builds on a CPU with GFNI.
#[doc(hidden)]
pub fn allow_gfni(on: bool) {
    #[cfg(target_arch = "x86_64")]
    vnni::avx512::gfni::allow(on);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = on;
}

/// The implementation calls run on now: `"avx512vnni"`, `"avxvnni"`, `"avx2"` or
/// `"portable"`.
pub fn q8_backend_name() -> &'static str {
    match active() {
        #[cfg(target_arch = "x86_64")]
        AVX512VNNI => "avx512vnni",
        #[cfg(target_arch = "x86_64")]
        AVXVNNI => "avxvnni",
        #[cfg(target_arch = "x86_64")]
        AVX2 => "avx2",
        _ => "portable",
    }
}

// ------------------------------------------------------------ activations

/// Read-only view of the quantized activations, shared by both implementations.
/// Token `t`, block `b`: `qs[t·cols + b·block ..][..block]`, `d[t·nblk + b]`,
/// `s[t·nblk + b]` (Q8_1), `qsum[t·nblk + b]` (Q8_0, Q8_1), `bsums[(t·nblk + b)·16 ..][..16]`
/// (Q8_K).
#[derive(Clone, Copy)]
struct View<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
    qsum: &'a [i32],
    bsums: &'a [i16],
    cols: usize,
    nblk: usize,
}

/// Token activations quantized for one weight type's integer dot.
///
/// Owns its buffers and reuses them: after the first call at a given (or larger)
/// `n · cols`, [`quantize`](Self::quantize) / [`prepare`](Self::prepare) never allocate.
#[derive(Debug)]
pub struct QuantizedActs {
    fmt: ActFormat,
    n: usize,
    cols: usize,
    /// Quants, `n · cols` of them starting at `qs_off` (which 32-byte aligns them).
    qs: Vec<i8>,
    qs_off: usize,
    d: Vec<f32>,
    s: Vec<f32>,
    /// Q8_0 / Q8_1: `Σq` of every block (lets the kernels take zero points out exactly).
    qsum: Vec<i32>,
    bsums: Vec<i16>,
    /// `F32` format: the activations themselves.
    xf: Vec<f32>,
    /// One flag per token row, for [`ActsWriter`]'s disjointness check.
    claimed: Vec<AtomicBool>,
}

impl Default for QuantizedActs {
    fn default() -> Self {
        Self::new()
    }
}

/// Grows `v` to at least `len` elements; never shrinks it (so its buffer never moves
/// once it is big enough).
fn grow<T: Clone + Default>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

impl QuantizedActs {
    /// An empty set (no tokens); allocates nothing.
    pub fn new() -> Self {
        QuantizedActs {
            fmt: ActFormat::F32,
            n: 0,
            cols: 0,
            qs: Vec::new(),
            qs_off: 0,
            d: Vec::new(),
            s: Vec::new(),
            qsum: Vec::new(),
            bsums: Vec::new(),
            xf: Vec::new(),
            claimed: Vec::new(),
        }
    }

    /// Sizes the buffers for `n` tokens of `cols` elements in `ty`'s activation format,
    /// without quantizing anything (the rows are left as they were; fill them with
    /// [`quantize_rows`](Self::quantize_rows) or a [`writer`](Self::writer)).
    ///
    /// Panics when `cols` is not a whole number of `ty`'s blocks.
    pub fn prepare(&mut self, ty: WeightType, n: usize, cols: usize) {
        assert!(
            ty.row_bytes(cols).is_some(),
            "{ty}: {cols} columns are not a whole number of {}-element blocks",
            ty.block_len()
        );
        let fmt = ActFormat::for_weight(ty);
        let len = n.checked_mul(cols).expect("activation size overflows usize");
        let nblk = cols / fmt.block_len();
        self.fmt = fmt;
        self.n = n;
        self.cols = cols;
        match fmt {
            ActFormat::F32 => grow(&mut self.xf, len),
            _ => {
                grow(&mut self.qs, len + 31);
                // Start the quants on a 32-byte boundary (rows are whole blocks, so
                // every block is aligned too). Only speed depends on this.
                self.qs_off = (self.qs.as_ptr() as usize).wrapping_neg() % 32;
                grow(&mut self.d, n * nblk);
                if fmt != ActFormat::Q8K {
                    grow(&mut self.qsum, n * nblk);
                }
                if fmt == ActFormat::Q8_1 {
                    grow(&mut self.s, n * nblk);
                }
                if fmt == ActFormat::Q8K {
                    grow(&mut self.bsums, n * nblk * KSUMS);
                }
            }
        }
        if self.claimed.len() < n {
            self.claimed.resize_with(n, || AtomicBool::new(false));
        }
    }

    /// Quantizes `n` token rows of `x` (`[n, cols]` row-major, at least `n · cols`
    /// values) for weight type `ty`, reusing the buffers.
    pub fn quantize(&mut self, ty: WeightType, x: &[f32], n: usize, cols: usize) {
        self.prepare(ty, n, cols);
        self.quantize_rows(x, 0..n);
    }

    /// Quantizes token rows `rows` of `x` (the whole `[n, cols]` matrix given to
    /// [`prepare`](Self::prepare); only those rows are read). Call `prepare` first.
    pub fn quantize_rows(&mut self, x: &[f32], rows: Range<usize>) {
        self.writer().quantize_rows(x, rows);
    }

    /// A handle that lets several threads quantize *disjoint* token rows at once
    /// (see the module docs). Call [`prepare`](Self::prepare) first. While the
    /// writer lives, `self` is mutably borrowed, so nobody can read half-written rows.
    pub fn writer(&mut self) -> ActsWriter<'_> {
        for c in &mut self.claimed[..self.n] {
            *c.get_mut() = false;
        }
        let (n, cols, fmt) = (self.n, self.cols, self.fmt);
        let nblk = cols / fmt.block_len();
        ActsWriter {
            fmt,
            n,
            cols,
            nblk,
            qs: self.qs[self.qs_off..].as_mut_ptr(),
            d: self.d.as_mut_ptr(),
            s: self.s.as_mut_ptr(),
            qsum: self.qsum.as_mut_ptr(),
            bsums: self.bsums.as_mut_ptr(),
            xf: self.xf.as_mut_ptr(),
            claimed: &self.claimed[..n],
            _borrow: std::marker::PhantomData,
        }
    }

    /// The activation format held.
    pub fn format(&self) -> ActFormat {
        self.fmt
    }

    /// Number of token rows.
    pub fn tokens(&self) -> usize {
        self.n
    }

    /// Elements per token row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Blocks per token row (`cols` for the `F32` format).
    fn nblk(&self) -> usize {
        self.cols / self.fmt.block_len()
    }

    /// Token `t`'s quants (`cols` values; empty for the `F32` format).
    pub fn token_quants(&self, t: usize) -> &[i8] {
        assert!(t < self.n, "token {t} of {}", self.n);
        if self.fmt == ActFormat::F32 {
            return &[];
        }
        &self.qs[self.qs_off + t * self.cols..][..self.cols]
    }

    /// Token `t`'s block scales `d` (one per block; empty for the `F32` format).
    pub fn token_scales(&self, t: usize) -> &[f32] {
        assert!(t < self.n, "token {t} of {}", self.n);
        if self.fmt == ActFormat::F32 {
            return &[];
        }
        &self.d[t * self.nblk()..][..self.nblk()]
    }

    /// Token `t`'s `s = d · Σq` per block (Q8_1 only; empty otherwise).
    pub fn token_block_sums(&self, t: usize) -> &[f32] {
        assert!(t < self.n, "token {t} of {}", self.n);
        if self.fmt != ActFormat::Q8_1 {
            return &[];
        }
        &self.s[t * self.nblk()..][..self.nblk()]
    }

    /// Token `t`'s `Σq` per block (Q8_0 and Q8_1; empty otherwise).
    pub fn token_block_qsums(&self, t: usize) -> &[i32] {
        assert!(t < self.n, "token {t} of {}", self.n);
        if !matches!(self.fmt, ActFormat::Q8_0 | ActFormat::Q8_1) {
            return &[];
        }
        &self.qsum[t * self.nblk()..][..self.nblk()]
    }

    /// Token `t`'s sums of 16 consecutive quants (Q8_K only, 16 per super-block;
    /// empty otherwise).
    pub fn token_sums16(&self, t: usize) -> &[i16] {
        assert!(t < self.n, "token {t} of {}", self.n);
        if self.fmt != ActFormat::Q8K {
            return &[];
        }
        &self.bsums[t * self.nblk() * KSUMS..][..self.nblk() * KSUMS]
    }

    /// Token `t`'s activations as stored for the `F32` format (empty otherwise).
    pub fn token_f32(&self, t: usize) -> &[f32] {
        assert!(t < self.n, "token {t} of {}", self.n);
        if self.fmt != ActFormat::F32 {
            return &[];
        }
        &self.xf[t * self.cols..][..self.cols]
    }

    /// Buffer addresses and capacities, for tests that check nothing reallocates.
    #[doc(hidden)]
    pub fn buffer_fingerprint(&self) -> [(usize, usize); 6] {
        [
            (self.qsum.as_ptr() as usize, self.qsum.capacity()),
            (self.qs.as_ptr() as usize, self.qs.capacity()),
            (self.d.as_ptr() as usize, self.d.capacity()),
            (self.s.as_ptr() as usize, self.s.capacity()),
            (self.bsums.as_ptr() as usize, self.bsums.capacity()),
            (self.xf.as_ptr() as usize, self.xf.capacity()),
        ]
    }

    fn view(&self) -> View<'_> {
        let nblk = self.nblk();
        View {
            qs: &self.qs[self.qs_off..][..self.n * self.cols],
            d: &self.d[..self.n * nblk],
            s: if self.fmt == ActFormat::Q8_1 {
                &self.s[..self.n * nblk]
            } else {
                &[]
            },
            qsum: if matches!(self.fmt, ActFormat::Q8_0 | ActFormat::Q8_1) {
                &self.qsum[..self.n * nblk]
            } else {
                &[]
            },
            bsums: if self.fmt == ActFormat::Q8K {
                &self.bsums[..self.n * nblk * KSUMS]
            } else {
                &[]
            },
            cols: self.cols,
            nblk,
        }
    }
}

/// Lets threads quantize disjoint token rows of one [`QuantizedActs`] in parallel.
/// Obtained from [`QuantizedActs::writer`]; `Sync`, so share it by reference.
pub struct ActsWriter<'a> {
    fmt: ActFormat,
    n: usize,
    cols: usize,
    nblk: usize,
    qs: *mut i8,
    d: *mut f32,
    s: *mut f32,
    qsum: *mut i32,
    bsums: *mut i16,
    xf: *mut f32,
    claimed: &'a [AtomicBool],
    _borrow: std::marker::PhantomData<&'a mut QuantizedActs>,
}

// SAFETY: the raw pointers point into buffers exclusively borrowed (`&'a mut`) for the
// writer's lifetime; `quantize_rows` writes only token rows it has claimed through the
// atomic flags, each of which can be claimed once, so no two threads ever touch the
// same elements and nobody reads them until the borrow ends.
unsafe impl Send for ActsWriter<'_> {}
// SAFETY: as above.
unsafe impl Sync for ActsWriter<'_> {}

impl ActsWriter<'_> {
    /// Quantizes token rows `rows` of `x` (the whole `[n, cols]` matrix; only those
    /// rows are read). Panics if a row in `rows` was already quantized through this
    /// writer (by any thread), if `rows` runs past `n`, or if `x` is too short.
    pub fn quantize_rows(&self, x: &[f32], rows: Range<usize>) {
        assert!(
            rows.start <= rows.end && rows.end <= self.n,
            "token rows {rows:?} outside 0..{}",
            self.n
        );
        assert!(
            x.len() >= rows.end * self.cols,
            "activations hold {} values, token rows up to {} need {}",
            x.len(),
            rows.end,
            rows.end * self.cols
        );
        for t in rows {
            assert!(
                !self.claimed[t].swap(true, Ordering::AcqRel),
                "token row {t} quantized twice through one writer"
            );
            let xr = &x[t * self.cols..(t + 1) * self.cols];
            let (cols, nblk) = (self.cols, self.nblk);
            // SAFETY: row `t < n` was claimed just now and never before by this writer,
            // so no other thread writes (or reads) these ranges; the buffers were sized
            // by `prepare` for `n` rows of this format (the offsets below are the same
            // as `View`'s), and stay borrowed for the writer's lifetime.
            unsafe {
                match self.fmt {
                    ActFormat::F32 => {
                        std::slice::from_raw_parts_mut(self.xf.add(t * cols), cols).copy_from_slice(xr);
                    }
                    ActFormat::Q8_0 | ActFormat::Q8_1 => {
                        let q = std::slice::from_raw_parts_mut(self.qs.add(t * cols), cols);
                        let d = std::slice::from_raw_parts_mut(self.d.add(t * nblk), nblk);
                        let qs = std::slice::from_raw_parts_mut(self.qsum.add(t * nblk), nblk);
                        let s = if self.fmt == ActFormat::Q8_1 {
                            Some(std::slice::from_raw_parts_mut(self.s.add(t * nblk), nblk))
                        } else {
                            None
                        };
                        quantize_q8_row(xr, q, d, qs, s);
                    }
                    ActFormat::Q8K => {
                        let q = std::slice::from_raw_parts_mut(self.qs.add(t * cols), cols);
                        let d = std::slice::from_raw_parts_mut(self.d.add(t * nblk), nblk);
                        let bs = std::slice::from_raw_parts_mut(self.bsums.add(t * nblk * KSUMS), nblk * KSUMS);
                        quantize_q8k_row(xr, q, d, bs);
                    }
                }
            }
        }
    }
}

/// The quantization step of a block whose largest magnitude is `amax`:
/// `q = round_ties_even((x · m1) · m2)`, `x ≈ q · d`.
///
/// Both implementations use exactly these scalars and this operation order, so
/// they produce identical bytes. `m2` is 1 except for blocks so small that
/// `127 / amax` overflows; those are first scaled up by 2^100 (exact).
#[derive(Clone, Copy)]
struct Step {
    d: f32,
    m1: f32,
    m2: f32,
}

impl Step {
    /// `amax` must be `max |x|` with NaN above infinity above every finite value
    /// (the order of the IEEE bit patterns without sign), so it is NaN or infinite
    /// exactly when some element is.
    #[inline]
    fn new(amax: f32) -> Option<Step> {
        if !amax.is_finite() {
            return None;
        }
        if amax == 0.0 {
            return Some(Step {
                d: 0.0,
                m1: 0.0,
                m2: 0.0,
            });
        }
        let d = amax / 127.0;
        let id = 127.0 / amax;
        if id.is_finite() {
            Some(Step { d, m1: id, m2: 1.0 })
        } else {
            const UP: f32 = (1u128 << 100) as f32;
            Some(Step {
                d,
                m1: UP,
                m2: 127.0 / (amax * UP),
            })
        }
    }
}

/// Q4_K / Q5_K's 12 packed scale bytes as `(scales, mins)`: byte `j` of each
/// little-endian `u64` is sub-block `j`'s 6-bit value (layout in `kquant.rs`).
#[inline(always)]
fn k_scales(s: &[u8; 12]) -> (u64, u64) {
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (w0, w1, w2) = (w(0), w(1), w(2));
    let sc_lo = w0 & 0x3F3F_3F3F;
    let mn_lo = w1 & 0x3F3F_3F3F;
    let sc_hi = (w2 & 0x0F0F_0F0F) | (((w0 >> 6) & 0x0303_0303) << 4);
    let mn_hi = ((w2 >> 4) & 0x0F0F_0F0F) | (((w1 >> 6) & 0x0303_0303) << 4);
    (
        u64::from(sc_lo) | (u64::from(sc_hi) << 32),
        u64::from(mn_lo) | (u64::from(mn_hi) << 32),
    )
}

/// Quantizes one token row into Q8_0 blocks with their `Σq` (and `s = d·Σq` when `s`
/// is given).
fn quantize_q8_row(x: &[f32], q: &mut [i8], d: &mut [f32], qsum: &mut [i32], s: Option<&mut [f32]>) {
    #[cfg(target_arch = "x86_64")]
    if active() >= AVX2 {
        // SAFETY: the AVX2/FMA/F16C features were detected at run time (every level
        // from AVX2 up requires them).
        unsafe { avx2::quantize_q8_row(x, q, d, qsum, s) };
        return;
    }
    portable::quantize_q8_row(x, q, d, qsum, s);
}

/// Quantizes one token row into Q8_K super-blocks.
fn quantize_q8k_row(x: &[f32], q: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
    #[cfg(target_arch = "x86_64")]
    if active() >= AVX2 {
        // SAFETY: the AVX2/FMA/F16C features were detected at run time (every level
        // from AVX2 up requires them).
        unsafe { avx2::quantize_q8k_row(x, q, d, bsums) };
        return;
    }
    portable::quantize_q8k_row(x, q, d, bsums);
}

// --------------------------------------------------------------------- dots

/// A tile of tokens of a [`QuantizedActs`] laid out once for [`dot_rows_q8_tile`]: on
/// the AVX-512 level, the activations of the legacy kinds, the MLX affine types and the
/// K-quants transposed or paired the way the blocked kernels want them, so that a thread dotting many blocks of rows against the
/// same tokens prepares them once instead of once per block. Elsewhere it only records
/// the token range (and `dot_rows_q8_tile` is [`dot_rows_q8_multi`]).
///
/// Reusable: [`prepare`](Self::prepare) only allocates when a larger tile is first
/// needed. A tile describes the activations as they were when it was prepared; prepare
/// it again after quantizing new ones.
#[derive(Debug, Default)]
pub struct TokenTile {
    ty: Option<WeightType>,
    tokens: Range<usize>,
    n: usize,
    cols: usize,
    /// Prepared records (empty when the kind or level has none); `off` 64-aligns them.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    buf: Vec<u8>,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    off: usize,
    prepared: bool,
}

impl TokenTile {
    pub fn new() -> TokenTile {
        TokenTile::default()
    }

    /// Lays out tokens `tokens` of `acts` (quantized for `ty`) for [`dot_rows_q8_tile`].
    /// Panics on a format mismatch or tokens outside `acts`.
    pub fn prepare(&mut self, ty: WeightType, acts: &QuantizedActs, tokens: Range<usize>) {
        assert!(
            ActFormat::for_weight(ty) == acts.fmt,
            "{ty} weights need {:?} activations, these are {:?}",
            ActFormat::for_weight(ty),
            acts.fmt
        );
        assert!(
            tokens.start <= tokens.end && tokens.end <= acts.n,
            "tokens {tokens:?} outside 0..{}",
            acts.n
        );
        self.ty = Some(ty);
        self.n = acts.n;
        self.cols = acts.cols;
        self.tokens = tokens.clone();
        self.prepared = false;
        #[cfg(target_arch = "x86_64")]
        if active() == AVX512VNNI && vnni::avx512::wide::tile_kind(ty) && !tokens.is_empty() {
            let view = acts.view();
            let len = vnni::avx512::wide::tile_bytes(ty, tokens.len(), view.nblk);
            grow(&mut self.buf, len + 63);
            self.off = (self.buf.as_ptr() as usize).wrapping_neg() % 64;
            // SAFETY: the level's features were detected; `ty` is a tile kind, the
            // format matches and the tokens lie inside `acts` (asserted above); the
            // buffer holds `len` bytes from `off`.
            unsafe {
                vnni::avx512::wide::prepare_tile(ty, view, tokens.start, tokens.len(), &mut self.buf[self.off..][..len])
            };
            self.prepared = true;
        }
    }

    /// The tokens this tile covers.
    pub fn tokens(&self) -> Range<usize> {
        self.tokens.clone()
    }
}

/// `out[r · n + j] = dot_row_q8(ty, row r, acts, tile.tokens().start + j)` for every row
/// of `rows` and the `n` tokens of `tile` (prepared from `acts` for `ty`), exactly as
/// [`dot_rows_q8_multi`] computes them (bit-identical). Panics on a mismatch.
pub fn dot_rows_q8_tile(ty: WeightType, rows: &[u8], acts: &QuantizedActs, tile: &TokenTile, out: &mut [f32]) {
    assert!(
        tile.ty == Some(ty) && tile.n == acts.n && tile.cols == acts.cols,
        "token tile prepared for other activations"
    );
    #[cfg(target_arch = "x86_64")]
    if tile.prepared && active() == AVX512VNNI {
        let rb = ty.row_bytes(acts.cols).unwrap_or(0);
        assert!(
            rb > 0 && rows.len().is_multiple_of(rb),
            "{ty}: rows of {} elements need a multiple of {rb} bytes, got {}",
            acts.cols,
            rows.len()
        );
        let ntok = tile.tokens.len();
        assert_eq!(
            out.len(),
            rows.len() / rb * ntok,
            "output length must equal rows × tokens"
        );
        let nblk = acts.view().nblk;
        let len = vnni::avx512::wide::tile_bytes(ty, ntok, nblk);
        // SAFETY: the features were detected (the level is active); the tile was
        // prepared for this kind, these activations' shape and `ntok` tokens (checked
        // above), so its `len` bytes hold every record the kernel reads; rows are whole
        // and `out` is rows × tokens.
        unsafe { vnni::avx512::wide::dot_rows_tile(ty, rows, rb, nblk, &tile.buf[tile.off..][..len], ntok, out) };
        return;
    }
    dot_rows_q8_multi(ty, rows, acts, tile.tokens.clone(), out);
}

/// Checks that `row` of type `ty` can be dotted with `acts`' tokens `tokens`.
#[inline]
fn check(ty: WeightType, row: &[u8], acts: &QuantizedActs, tokens: &Range<usize>) {
    assert!(
        ActFormat::for_weight(ty) == acts.fmt,
        "{ty} weights need {:?} activations, these are {:?}",
        ActFormat::for_weight(ty),
        acts.fmt
    );
    assert!(
        ty.row_bytes(acts.cols) == Some(row.len()),
        "{ty} row of {} elements must be {:?} bytes, got {}",
        acts.cols,
        ty.row_bytes(acts.cols),
        row.len()
    );
    assert!(
        tokens.start <= tokens.end && tokens.end <= acts.n,
        "tokens {tokens:?} outside 0..{}",
        acts.n
    );
}

/// Dot of one stored weight row of type `ty` with token `t` of `acts`, which must have
/// been quantized for `ty`'s [`ActFormat`] with `cols` = the row's element count.
///
/// For F32/F16/BF16 this is [`dot_row`](super::dot_row) on the stored `f32` copy.
/// Panics on a format, length or token mismatch.
pub fn dot_row_q8(ty: WeightType, row: &[u8], acts: &QuantizedActs, t: usize) -> f32 {
    check(ty, row, acts, &(t..t + 1));
    if !ty.is_quantized() {
        return dot_row(ty, row, acts.token_f32(t));
    }
    let mut out = [0.0f32];
    // The one-token kernel `dot_rows` runs is the one `dot_multi` runs for a single
    // token, so the results are identical.
    dot_rows_dispatch(ty, row, row.len(), acts.view(), t, &mut out);
    out[0]
}

/// `out[j] = dot_row_q8(ty, row, acts, tokens.start + j)` for every token of
/// `tokens` (`out.len() == tokens.len()`), decoding each weight block once for a
/// tile of tokens. Bit-identical to the token-by-token calls.
pub fn dot_row_q8_multi(ty: WeightType, row: &[u8], acts: &QuantizedActs, tokens: Range<usize>, out: &mut [f32]) {
    check(ty, row, acts, &tokens);
    assert_eq!(out.len(), tokens.len(), "output length must equal the token count");
    if !ty.is_quantized() {
        for (o, t) in out.iter_mut().zip(tokens) {
            *o = dot_row(ty, row, acts.token_f32(t));
        }
        return;
    }
    let view = acts.view();
    let t0 = tokens.start;
    if let WeightType::Affine { bits, group } = ty {
        affine::dot_rows_multi(bits, group, row, row.len(), view, t0, out, active());
        return;
    }
    match level_for(ty) {
        // SAFETY (the x86 arms): the level's features were detected at run time;
        // `check` verified the row length against `acts.cols`, the format, and that
        // `tokens` lie inside the buffers `view` covers, which is what the kernels index.
        #[cfg(target_arch = "x86_64")]
        AVX512VNNI => unsafe {
            if vnni::avx512::gfni::enabled() {
                vnni::avx512::gfni::dot_multi(ty, row, view, t0, out)
            } else {
                vnni::avx512::dot_multi(ty, row, view, t0, out)
            }
        },
        #[cfg(target_arch = "x86_64")]
        AVXVNNI => unsafe { vnni::avx::dot_multi(ty, row, view, t0, out) },
        #[cfg(target_arch = "x86_64")]
        AVX2 => unsafe { avx2::dot_multi(ty, row, view, t0, out) },
        _ => portable::dot_multi(ty, row, view, t0, out),
    }
}

/// `out[i] = dot_row_q8(ty, row i, acts, t)` for `out.len()` consecutive stored rows
/// (`rows` holds exactly that many rows of `acts.cols()` elements): the matrix-vector
/// product of a block of rows, with the argument checks and dispatch paid once.
/// Bit-identical to the per-row calls.
pub fn dot_rows_q8(ty: WeightType, rows: &[u8], acts: &QuantizedActs, t: usize, out: &mut [f32]) {
    let rb = ty.row_bytes(acts.cols).unwrap_or(0);
    assert_eq!(
        rows.len(),
        out.len() * rb,
        "{ty}: {} rows of {} elements need {} bytes",
        out.len(),
        acts.cols,
        out.len() * rb
    );
    if out.is_empty() {
        return;
    }
    check(ty, &rows[..rb], acts, &(t..t + 1));
    if !ty.is_quantized() {
        for (o, row) in out.iter_mut().zip(rows.chunks_exact(rb)) {
            *o = dot_row(ty, row, acts.token_f32(t));
        }
        return;
    }
    dot_rows_dispatch(ty, rows, rb, acts.view(), t, out);
}

/// `out[i] = row i · token t` on the active implementation, for `out.len()` rows of
/// `rb` bytes. The callers have run `check` (format, row length, token `t`) for the
/// first row; every row has the same length.
#[inline]
fn dot_rows_dispatch(ty: WeightType, rows: &[u8], rb: usize, view: View<'_>, t: usize, out: &mut [f32]) {
    debug_assert_eq!(rows.len(), rb * out.len());
    if let WeightType::Affine { bits, group } = ty {
        affine::dot_rows(bits, group, rows, rb, view, t, out, active());
        return;
    }
    match level_for(ty) {
        // SAFETY (the x86 arms): the level's features were detected at run time; every
        // row has the length `check` verified for the first, the format matches and
        // token `t` exists.
        #[cfg(target_arch = "x86_64")]
        AVX512VNNI => unsafe {
            if vnni::avx512::gfni::enabled() {
                vnni::avx512::gfni::dot_rows(ty, rows, rb, view, t, out)
            } else {
                vnni::avx512::dot_rows(ty, rows, rb, view, t, out)
            }
        },
        #[cfg(target_arch = "x86_64")]
        AVXVNNI => unsafe { vnni::avx::dot_rows(ty, rows, rb, view, t, out) },
        #[cfg(target_arch = "x86_64")]
        AVX2 => unsafe { avx2::dot_rows(ty, rows, rb, view, t, out) },
        _ => {
            for (o, row) in out.iter_mut().zip(rows.chunks_exact(rb)) {
                portable::dot_multi(ty, row, view, t, std::slice::from_mut(o));
            }
        }
    }
}

/// `out[r · n + j] = dot_row_q8(ty, row r, acts, tokens.start + j)` for the
/// `R = rows.len() / row_bytes` consecutive stored rows in `rows` and the
/// `n = tokens.len()` tokens (`out.len() == R · n`, row-major): a prefill GEMM tile.
///
/// On the x86 levels the legacy types (Q4_0, Q4_1, Q5_0, Q5_1; Q8_0 on the VNNI
/// levels) run a blocked kernel: up to 16 rows × 16 tokens per pass, each chunk of 8
/// weight blocks decoded and transposed once per 16 tokens, each token's chunk of
/// activations transposed once per 16 rows, so the per-block integer dots need no
/// horizontal sums. The other types (and the portable level) run
/// [`dot_row_q8_multi`] row by row. Pass 16 rows (or more) at a time for full speed. Bit-identical to
/// [`dot_row_q8_multi`] / [`dot_row_q8`] per (row, token) within each implementation.
pub fn dot_rows_q8_multi(ty: WeightType, rows: &[u8], acts: &QuantizedActs, tokens: Range<usize>, out: &mut [f32]) {
    let rb = ty.row_bytes(acts.cols).unwrap_or(0);
    assert!(
        rb > 0 && rows.len().is_multiple_of(rb),
        "{ty}: rows of {} elements need a multiple of {rb} bytes, got {}",
        acts.cols,
        rows.len()
    );
    let nrows = rows.len() / rb;
    assert_eq!(
        out.len(),
        nrows * tokens.len(),
        "output length must equal rows × tokens"
    );
    if nrows == 0 {
        return;
    }
    check(ty, &rows[..rb], acts, &tokens);
    if tokens.is_empty() {
        return;
    }
    if !ty.is_quantized() {
        for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(tokens.len())) {
            dot_row_q8_multi(ty, row, acts, tokens.clone(), o);
        }
        return;
    }
    let view = acts.view();
    let t0 = tokens.start;
    if let WeightType::Affine { bits, group } = ty {
        affine::dot_rows_multi(bits, group, rows, rb, view, t0, out, active());
        return;
    }
    match level_for(ty) {
        // SAFETY (the x86 arms): the level's features were detected at run time; every
        // row has the length `check` verified for the first, the format matches, the
        // tokens lie inside the buffers `view` covers, and `out` is rows × tokens long.
        #[cfg(target_arch = "x86_64")]
        AVX512VNNI => unsafe {
            if vnni::avx512::gfni::enabled() {
                vnni::avx512::gfni::dot_rows_multi(ty, rows, rb, view, t0, out)
            } else {
                vnni::avx512::dot_rows_multi(ty, rows, rb, view, t0, out)
            }
        },
        #[cfg(target_arch = "x86_64")]
        AVXVNNI => unsafe { vnni::avx::dot_rows_multi(ty, rows, rb, view, t0, out) },
        #[cfg(target_arch = "x86_64")]
        AVX2 => unsafe { avx2::dot_rows_multi(ty, rows, rb, view, t0, out) },
        _ => {
            for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(tokens.len())) {
                portable::dot_multi(ty, row, view, t0, o);
            }
        }
    }
}
