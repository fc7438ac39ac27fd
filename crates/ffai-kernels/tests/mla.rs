//! `attention_mla_step` (multi-head latent attention over one shared KV head whose value
//! is a prefix of its key) against a naive f64 oracle, for two sequences in one mixed
//! step (many spans and blocks, a window, soft-capping, f16 and f32 pools, head counts
//! that take one and several work units), and bit-for-bit batch invariance: a sequence's
//! rows alone give the bits they gave inside the mixed step, on 1 or 3 threads. Also
//! `copy_rows` and `attention_step` with a value prefix through the same pool.

use ffai_kernels::backend::{AttnShape, Backend, GroupLayout, SeqRows, StepLayout};
use ffai_kernels::cpu::CpuBackend;

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    heads: usize,
    hd: usize,
    vd: usize,
    window: usize,
    softcap: f32,
    kv_f32: bool,
}

/// One sequence: its positions' keys `[len][hd]` (rounded to f16 when the pool is f16,
/// so the oracle reads what the kernel reads), queries `[len][heads * hd]`, and its
/// blocks (scattered, so neighbouring positions are not neighbours in the pool).
struct Seq {
    kv: Vec<f32>,
    q: Vec<f32>,
    blocks: Vec<u32>,
}

const BS: usize = 8;

fn layout(seqs: &[&Seq], ranges: &[(usize, usize)], window: usize, n_blocks: usize) -> StepLayout {
    let mut g = GroupLayout {
        block_size: BS as u32,
        n_blocks: n_blocks as u32,
        window: window as u32,
        ..Default::default()
    };
    let mut positions = Vec::new();
    for (s, &(p0, p1)) in seqs.iter().zip(ranges) {
        g.seqs.push(SeqRows {
            first_row: positions.len() as u32,
            n_rows: (p1 - p0) as u32,
            table_start: g.block_tables.len() as u32,
            table_len: s.blocks.len() as u32,
        });
        g.block_tables.extend_from_slice(&s.blocks);
        for p in p0..p1 {
            positions.push(p as u32);
            g.slots.push(s.blocks[p / BS] * BS as u32 + (p % BS) as u32);
        }
    }
    StepLayout {
        positions,
        groups: vec![g],
        ..Default::default()
    }
}

fn oracle(c: &Case, s: &Seq, p: usize) -> Vec<f64> {
    let scale = 1.0 / (c.hd as f64).sqrt();
    let lo = if c.window == 0 {
        0
    } else {
        (p + 1).saturating_sub(c.window)
    };
    let mut out = vec![0f64; c.heads * c.vd];
    for h in 0..c.heads {
        let q = &s.q[(p * c.heads + h) * c.hd..][..c.hd];
        let scores: Vec<f64> = (lo..=p)
            .map(|j| {
                let k = &s.kv[j * c.hd..][..c.hd];
                let mut x = q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale;
                if c.softcap > 0.0 {
                    let cap = c.softcap as f64;
                    x = cap * (x / cap).tanh();
                }
                x
            })
            .collect();
        let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        for (j, w) in (lo..=p).zip(&e) {
            for d in 0..c.vd {
                out[h * c.vd + d] += w / sum * s.kv[j * c.hd + d] as f64;
            }
        }
    }
    out
}

fn round_f16(x: &mut [f32]) {
    for v in x {
        *v = half::f16::from_f32(*v).to_f32();
    }
}

/// Runs `ranges` of `seqs` as one step on a backend of `threads` threads whose pool
/// already holds (or gets, in this step) their K rows; returns the outputs.
fn run(
    c: &Case,
    b: &CpuBackend,
    pool: &mut ffai_kernels::cpu::KvCache,
    seqs: &[&Seq],
    ranges: &[(usize, usize)],
    n_blocks: usize,
) -> Vec<f32> {
    let lay = layout(seqs, ranges, c.window, n_blocks);
    let n = lay.positions.len();
    let mut step = b.new_step(n, seqs.len(), 64, 1);
    b.write_step(&lay, &mut step).unwrap();
    let (mut kv, mut q) = (Vec::new(), Vec::new());
    for (s, &(p0, p1)) in seqs.iter().zip(ranges) {
        kv.extend_from_slice(&s.kv[p0 * c.hd..p1 * c.hd]);
        q.extend_from_slice(&s.q[p0 * c.heads * c.hd..p1 * c.heads * c.hd]);
    }
    let shape = AttnShape {
        n_heads: c.heads,
        n_kv_heads: 1,
        head_dim: c.hd,
        cap: 0,
        window: c.window,
        scale: 1.0 / (c.hd as f32).sqrt(),
        softcap: c.softcap,
    };
    b.kv_write_step(pool, &kv, n, &step, 0, &shape);
    let mut out = vec![f32::NAN; n * c.heads * c.vd];
    b.attention_mla_step(&q, pool, n, &step, 0, &shape, c.vd, &mut out);
    out
}

fn check(c: Case) {
    let mut r = Rng(c.heads as u64 * 1000 + c.hd as u64);
    let (la, lb) = (150usize, 37usize);
    let mut mk = |len: usize, blocks: Vec<u32>| {
        let mut kv = r.vec(len * c.hd);
        if !c.kv_f32 {
            round_f16(&mut kv);
        }
        let q = r.vec(len * c.heads * c.hd).iter().map(|x| x * 3.0).collect();
        Seq { kv, q, blocks }
    };
    // 19 + 5 blocks of 8 positions, interleaved in a pool of 30.
    let a = mk(la, (0..19).map(|i| (i * 3 % 29) as u32).collect());
    let bseq = mk(lb, vec![2, 5, 8, 11, 29]);
    let n_blocks = 30;
    let oracle_check = |out: &[f32], s: &Seq, p0: usize, p1: usize, row0: usize| {
        let w = c.heads * c.vd;
        for p in p0..p1 {
            let want = oracle(&c, s, p);
            let got = &out[(row0 + p - p0) * w..][..w];
            for (g, o) in got.iter().zip(&want) {
                assert!((*g as f64 - o).abs() < 2e-5, "{c:?}: position {p}: {g} vs oracle {o}");
            }
        }
    };
    for threads in [1, 3] {
        let b = CpuBackend::with_options(threads, false, c.kv_f32).with_attn_span(32);
        let mut pool = b.alloc_kv_pages(n_blocks, BS, 1, c.hd);
        // Prefill A's first 140 and B's first 30 in one step; then a mixed step of A's
        // last 10 (a chunk) and B's last 7 one row at a time alongside.
        let first = run(&c, &b, &mut pool, &[&a, &bseq], &[(0, 140), (0, 30)], n_blocks);
        oracle_check(&first, &a, 0, 140, 0);
        oracle_check(&first, &bseq, 0, 30, 140);
        let mixed = run(&c, &b, &mut pool, &[&a, &bseq], &[(140, 150), (30, 37)], n_blocks);
        oracle_check(&mixed, &a, 140, 150, 0);
        oracle_check(&mixed, &bseq, 30, 37, 10);
        // The same rows again, each sequence alone (its K rows rewritten in place with
        // the same values): the same bits.
        let w = c.heads * c.vd;
        let alone_a = run(&c, &b, &mut pool, &[&a], &[(140, 150)], n_blocks);
        assert_eq!(
            alone_a,
            mixed[..10 * w],
            "{c:?}: A alone differs from A in the mixed step"
        );
        for p in 30..37 {
            let one = run(&c, &b, &mut pool, &[&bseq], &[(p, p + 1)], n_blocks);
            let i = 10 + p - 30;
            assert_eq!(one, mixed[i * w..(i + 1) * w], "{c:?}: B's row {p} alone differs");
        }
    }
}

#[test]
fn latent_attention_matches_oracle_and_is_batch_invariant() {
    for c in [
        // DeepSeek-like: value = the latent (32), key = latent + rope part (8).
        Case {
            heads: 6,
            hd: 40,
            vd: 32,
            window: 0,
            softcap: 0.0,
            kv_f32: true,
        },
        // 16 heads: two work units of 8; f16 pool.
        Case {
            heads: 16,
            hd: 40,
            vd: 32,
            window: 0,
            softcap: 0.0,
            kv_f32: false,
        },
        // Odd widths (the portable score path), a window crossing blocks, soft-cap.
        Case {
            heads: 5,
            hd: 36,
            vd: 30,
            window: 21,
            softcap: 5.0,
            kv_f32: true,
        },
        // 12 heads: units of 6; value as wide as the key.
        Case {
            heads: 12,
            hd: 24,
            vd: 24,
            window: 0,
            softcap: 0.0,
            kv_f32: false,
        },
    ] {
        check(c);
    }
}

#[test]
fn copy_rows_moves_column_ranges() {
    let b = CpuBackend::new(1);
    let src: Vec<f32> = (0..30).map(|x| x as f32).collect();
    let mut dst = vec![-1f32; 4 * 6];
    // Columns 2..5 of 3 rows of 10 -> columns 1..4 of rows of 6.
    b.copy_rows(&src, 10, 2, &mut dst, 6, 1, 3, 3);
    for r in 0..4 {
        for col in 0..6 {
            let want = if r < 3 && (1..4).contains(&col) {
                (r * 10 + 2 + col - 1) as f32
            } else {
                -1.0
            };
            assert_eq!(dst[r * 6 + col], want, "row {r} column {col}");
        }
    }
}
