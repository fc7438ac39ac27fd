//! The recurrent mixers' ops on the CPU backend against naive f64 oracles: the causal
//! depthwise convolution carried across steps, the Mamba 2 scan (one-step and chunked
//! pieces, any cut of a sequence into steps), the gated RMSNorm, and batch invariance
//! (a sequence's rows give the same bits whatever else the step holds).

use ffai_kernels::backend::{Backend, GroupLayout, SeqRows, StepLayout};
use ffai_kernels::cpu::CpuBackend;
use ffai_kernels::ssm::{GdnShape, SsmShape};

/// A tiny deterministic generator (xorshift), values in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

const BS: u32 = 4096;

/// A step of `pieces` = (sequence index, first position, rows), each sequence in state slot
/// `slot_of(seq)`.
fn layout(pieces: &[(usize, usize, usize)], slots: &[u32], n_slots: u32) -> StepLayout {
    let mut l = StepLayout {
        n_state_slots: n_slots,
        ..Default::default()
    };
    let mut g = GroupLayout {
        block_size: BS,
        n_blocks: 64,
        window: 0,
        ..Default::default()
    };
    for &(seq, p0, n) in pieces {
        let first = l.positions.len() as u32;
        l.positions.extend((p0..p0 + n).map(|p| p as u32));
        g.slots.extend((p0..p0 + n).map(|p| seq as u32 * BS + p as u32));
        g.seqs.push(SeqRows {
            first_row: first,
            n_rows: n as u32,
            table_start: g.block_tables.len() as u32,
            table_len: 1,
        });
        g.block_tables.push(seq as u32);
        l.state_slots.push(slots[seq]);
    }
    l.groups.push(g);
    l
}

fn naive_conv(x: &[f32], t_len: usize, ch: usize, k: usize, w: &[f32], bias: &[f32], silu: bool) -> Vec<f64> {
    let mut out = vec![0f64; t_len * ch];
    for t in 0..t_len {
        for c in 0..ch {
            let mut acc = bias[c] as f64;
            for j in 0..k {
                let q = t as isize - (k as isize - 1) + j as isize;
                if q >= 0 {
                    acc += w[j * ch + c] as f64 * x[q as usize * ch + c] as f64;
                }
            }
            if silu {
                acc = acc / (1.0 + (-acc).exp());
            }
            out[t * ch + c] = acc;
        }
    }
    out
}

/// Runs each sequence's `cuts` (row counts per step) through one op call per step, every
/// step holding one piece of every sequence that still has rows; returns the outputs per
/// sequence, row-major.
#[allow(clippy::too_many_arguments)]
fn run_steps(
    b: &CpuBackend,
    lens: &[usize],
    cuts: &[Vec<usize>],
    slots: &[u32],
    n_slots: u32,
    width_in: usize,
    width_out: usize,
    inputs: &[Vec<f32>],
    mut op: impl FnMut(&Vec<f32>, usize, &ffai_kernels::cpu::CpuStep, &mut Vec<f32>),
) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = lens.iter().map(|&l| vec![0f32; l * width_out]).collect();
    let mut done = vec![0usize; lens.len()];
    let mut next_cut = vec![0usize; lens.len()];
    let mut step = b.new_step(1024, 16, 64, 1);
    loop {
        let mut pieces = Vec::new();
        for s in 0..lens.len() {
            if let Some(&n) = cuts[s].get(next_cut[s]) {
                pieces.push((s, done[s], n));
            }
        }
        if pieces.is_empty() {
            break;
        }
        let l = layout(&pieces, slots, n_slots);
        b.write_step(&l, &mut step).unwrap();
        let rows = l.positions.len();
        let mut x = Vec::with_capacity(rows * width_in);
        for &(s, p0, n) in &pieces {
            x.extend_from_slice(&inputs[s][p0 * width_in..(p0 + n) * width_in]);
        }
        let mut y = vec![0f32; rows * width_out];
        op(&x, rows, &step, &mut y);
        let mut r = 0;
        for &(s, p0, n) in &pieces {
            outs[s][p0 * width_out..(p0 + n) * width_out].copy_from_slice(&y[r * width_out..(r + n) * width_out]);
            r += n;
            done[s] += n;
            next_cut[s] += 1;
        }
    }
    outs
}

#[test]
fn conv_step_matches_naive_across_steps() {
    let b = CpuBackend::new(2);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for &(ch, k, silu) in &[(24usize, 3usize, false), (40, 4, true), (8, 1, false)] {
        let lens = [37usize, 9, 70];
        let cuts = vec![vec![5, 1, 1, 20, 10], vec![1; 9], vec![64, 6]];
        let inputs: Vec<Vec<f32>> = lens.iter().map(|&l| rng.vec(l * ch, 1.0)).collect();
        let w = rng.vec(k * ch, 0.7);
        let bias = rng.vec(ch, 0.2);
        let (wb, bb) = (b.upload(&w), b.upload(&bias));
        // Slots out of order, and stale garbage in them: position 0 must start from zeros.
        let slots = [2u32, 0, 1];
        let mut state = rng.vec(3 * (k - 1) * ch, 5.0);
        let outs = run_steps(&b, &lens, &cuts, &slots, 3, ch, ch, &inputs, |x, n, step, y| {
            b.conv_step(x, n, ch, k, &wb, Some(&bb), silu, &mut state, step, y);
        });
        for (s, &l) in lens.iter().enumerate() {
            let want = naive_conv(&inputs[s], l, ch, k, &w, &bias, silu);
            let err = outs[s]
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-5, "conv ch {ch} k {k} seq {s}: max error {err}");
            // The state holds the last k - 1 inputs.
            let slot = slots[s] as usize * (k - 1) * ch;
            for r in 0..k - 1 {
                let t = l - (k - 1) + r;
                assert_eq!(
                    &state[slot + r * ch..slot + (r + 1) * ch],
                    &inputs[s][t * ch..(t + 1) * ch]
                );
            }
        }
    }
}

/// The scan by its definition, one row at a time in f64.
fn naive_scan(xbc: &[f32], dt: &[f32], t_len: usize, sh: &SsmShape, a: &[f32], d: &[f32], dtb: &[f32]) -> Vec<f64> {
    let (h_n, hd, ns, g_n) = (sh.heads, sh.head_dim, sh.state, sh.groups);
    let width = sh.row_width();
    let mut s = vec![0f64; h_n * hd * ns];
    let mut out = vec![0f64; t_len * h_n * hd];
    for t in 0..t_len {
        let row = &xbc[t * width..(t + 1) * width];
        for h in 0..h_n {
            let g = h / (h_n / g_n);
            let raw = (dt[t * h_n + h] + dtb[h]) as f64;
            let dtv = if raw > 20.0 { raw } else { raw.exp().ln_1p() };
            let dtv = dtv.clamp(sh.dt_min as f64, sh.dt_max as f64);
            let decay = (dtv * a[h] as f64).exp();
            for e in 0..hd {
                let x = row[h * hd + e] as f64;
                let mut y = 0f64;
                for n in 0..ns {
                    let bv = row[h_n * hd + g * ns + n] as f64;
                    let cv = row[h_n * hd + g_n * ns + g * ns + n] as f64;
                    let v = &mut s[(h * hd + e) * ns + n];
                    *v = *v * decay + dtv * x * bv;
                    y += *v * cv;
                }
                out[t * h_n * hd + h * hd + e] = y + d[h] as f64 * x;
            }
        }
    }
    out
}

fn scan_case(sh: SsmShape, lens: &[usize], cuts: &[Vec<usize>], seed: u64) -> (Vec<Vec<f32>>, Vec<Vec<f64>>) {
    let b = CpuBackend::new(2);
    let mut rng = Rng(seed);
    let width = sh.row_width();
    // Each sequence's data from its own generator: a sequence is the same in any batch.
    let per_seq = |s: usize| Rng(seed ^ (0x5851_f42d_4c95_7f2d_u64.wrapping_mul(s as u64 + 1)));
    let inputs: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(s, &l)| per_seq(s).vec(l * width, 1.0))
        .collect();
    let dts: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(s, &l)| {
            let mut r = per_seq(s);
            r.vec(l * width, 1.0);
            r.vec(l * sh.heads, 1.0)
        })
        .collect();
    let a: Vec<f32> = (0..sh.heads).map(|h| -(0.2 + 0.3 * h as f32)).collect();
    let d = rng.vec(sh.heads, 1.0);
    let dtb: Vec<f32> = (0..sh.heads).map(|_| rng.next() - 1.0).collect();
    let (ab, db, dtbb) = (b.upload(&a), b.upload(&d), b.upload(&dtb));
    let n_slots = lens.len() as u32 + 1;
    let slots: Vec<u32> = (0..lens.len() as u32).map(|s| n_slots - 1 - s).collect();
    let mut state = rng.vec(n_slots as usize * sh.slot_len(), 3.0);
    // The dt rows travel beside x/B/C: append them to each input row and split in the op.
    let joined: Vec<Vec<f32>> = (0..lens.len())
        .map(|s| {
            (0..lens[s])
                .flat_map(|t| {
                    inputs[s][t * width..(t + 1) * width]
                        .iter()
                        .chain(&dts[s][t * sh.heads..(t + 1) * sh.heads])
                        .copied()
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .collect();
    let wj = width + sh.heads;
    let outs = run_steps(
        &b,
        lens,
        cuts,
        &slots,
        n_slots,
        wj,
        sh.heads * sh.head_dim,
        &joined,
        |x, n, step, y| {
            let mut xbc = Vec::with_capacity(n * width);
            let mut dt = Vec::with_capacity(n * sh.heads);
            for t in 0..n {
                xbc.extend_from_slice(&x[t * wj..t * wj + width]);
                dt.extend_from_slice(&x[t * wj + width..(t + 1) * wj]);
            }
            b.ssm_scan_step(&xbc, &dt, &ab, &db, &dtbb, n, &sh, &mut state, step, y);
        },
    );
    let want = (0..lens.len())
        .map(|s| naive_scan(&inputs[s], &dts[s], lens[s], &sh, &a, &d, &dtb))
        .collect();
    (outs, want)
}

const SHAPE: SsmShape = SsmShape {
    heads: 4,
    head_dim: 8,
    groups: 2,
    state: 16,
    chunk: 16,
    dt_min: 0.0,
    dt_max: f32::INFINITY,
};

#[test]
fn ssm_scan_matches_the_recurrence_over_any_cut() {
    let lens = [70usize, 33, 5];
    // Chunked pieces crossing chunk boundaries, single rows (the recurrence), a piece that
    // starts mid-chunk after single rows.
    let cuts = vec![vec![40, 1, 1, 28], vec![1, 1, 1, 30], vec![5]];
    for sh in [
        SHAPE,
        SsmShape {
            chunk: 64,
            dt_min: 0.05,
            dt_max: 0.4,
            ..SHAPE
        },
        SsmShape {
            groups: 1,
            chunk: 1,
            ..SHAPE
        },
    ] {
        let (got, want) = scan_case(sh, &lens, &cuts, 0x1234_5678);
        for s in 0..lens.len() {
            let scale = want[s].iter().fold(1.0f64, |m, v| m.max(v.abs()));
            let err = got[s]
                .iter()
                .zip(&want[s])
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(err / scale < 2e-5, "{sh:?} seq {s}: max error {err} (scale {scale})");
        }
    }
}

#[test]
fn ssm_scan_is_batch_invariant() {
    // Sequence 0 cut the same way, alone and beside others: the same bits.
    let alone = scan_case(SHAPE, &[50], &[vec![20, 30]], 77).0;
    let lens = [50usize, 64, 3];
    let (batched, _) = scan_case(SHAPE, &lens, &[vec![20, 30], vec![1, 63], vec![3]], 77);
    assert!(alone[0] == batched[0], "sequence 0 differs alone and in a batch");
}

#[test]
fn rms_norm_gated_matches_naive() {
    let b = CpuBackend::new(2);
    let mut rng = Rng(42);
    let (n, d) = (5, 48);
    for group in [48, 16, 8] {
        let x = rng.vec(n * d, 2.0);
        let z = rng.vec(n * d, 3.0);
        let w = rng.vec(d, 1.0);
        let mut got = x.clone();
        b.rms_norm_gated(&mut got, &z, &w, 1e-5, n, group, false);
        for t in 0..n {
            for g0 in (0..d).step_by(group) {
                let y: Vec<f64> = (g0..g0 + group)
                    .map(|c| {
                        let zz = z[t * d + c] as f64;
                        x[t * d + c] as f64 * zz / (1.0 + (-zz).exp())
                    })
                    .collect();
                let ms = y.iter().map(|v| v * v).sum::<f64>() / group as f64;
                for (i, c) in (g0..g0 + group).enumerate() {
                    let want = y[i] / (ms + 1e-5).sqrt() * w[c] as f64;
                    let e = (got[t * d + c] as f64 - want).abs();
                    assert!(
                        e < 1e-5 * (1.0 + want.abs()),
                        "group {group} row {t} col {c}: {} vs {want}",
                        got[t * d + c]
                    );
                }
            }
        }
    }
}

#[test]
fn copy_slot_and_mul() {
    let b = CpuBackend::new(1);
    let mut s: Vec<f32> = (0..12).map(|i| i as f32).collect();
    b.copy_slot(&mut s, 4, 2, 0);
    assert_eq!(&s[..4], &[8.0, 9.0, 10.0, 11.0]);
    assert_eq!(&s[4..8], &[4.0, 5.0, 6.0, 7.0]);
    let mut x = vec![1.0, 2.0, 3.0];
    b.mul(&mut x, &vec![2.0, 0.5, -1.0], 3);
    assert_eq!(x, vec![2.0, 1.0, -3.0]);
    let mut r = vec![-2.0, 0.0, 1.5, 3.0];
    b.relu_sq(&mut r, 3);
    assert_eq!(r, vec![0.0, 0.0, 2.25, 3.0], "relu_sq over the first 3 only");
}

#[test]
fn a_layout_with_bad_state_slots_is_refused() {
    let b = CpuBackend::new(1);
    let mut step = b.new_step(64, 4, 8, 1);
    let mut l = layout(&[(0, 0, 3), (1, 0, 2)], &[1, 1], 2);
    assert!(b
        .write_step(&l, &mut step)
        .unwrap_err()
        .contains("used by two sequences"));
    l.state_slots = vec![0, 2];
    assert!(b.write_step(&l, &mut step).unwrap_err().contains("outside the 2 slots"));
    l.state_slots = vec![0];
    assert!(b
        .write_step(&l, &mut step)
        .unwrap_err()
        .contains("1 recurrent-state slots for 2"));
    l.state_slots = vec![1, 0];
    b.write_step(&l, &mut step).unwrap();
}

/// The gated delta rule by its definition, in f64, one head's rows.
#[allow(clippy::too_many_arguments)]
fn naive_gdn(qkv: &[f32], b: &[f32], a: &[f32], t_len: usize, sh: &GdnShape, a_neg: &[f32], dtb: &[f32]) -> Vec<f64> {
    let (dk, dv, vh, kh_n) = (sh.k_dim, sh.v_dim, sh.v_heads, sh.k_heads);
    let width = sh.row_width();
    let mut s = vec![0f64; vh * dk * dv];
    let mut out = vec![0f64; t_len * vh * dv];
    for t in 0..t_len {
        let row = &qkv[t * width..(t + 1) * width];
        for h in 0..vh {
            let kh = h / (vh / kh_n);
            let q: Vec<f64> = row[kh * dk..(kh + 1) * dk].iter().map(|&x| x as f64).collect();
            let k: Vec<f64> = row[kh_n * dk + kh * dk..kh_n * dk + (kh + 1) * dk]
                .iter()
                .map(|&x| x as f64)
                .collect();
            let v = &row[2 * kh_n * dk + h * dv..2 * kh_n * dk + (h + 1) * dv];
            let nq = 1.0 / (q.iter().map(|x| x * x).sum::<f64>() + 1e-6).sqrt() / (dk as f64).sqrt();
            let nk = 1.0 / (k.iter().map(|x| x * x).sum::<f64>() + 1e-6).sqrt();
            let beta = 1.0 / (1.0 + (-(b[t * vh + h] as f64)).exp());
            let x = (a[t * vh + h] + dtb[h]) as f64;
            let g = a_neg[h] as f64 * if x > 20.0 { x } else { x.exp().ln_1p() };
            let st = &mut s[h * dk * dv..(h + 1) * dk * dv];
            st.iter_mut().for_each(|e| *e *= g.exp());
            for j in 0..dv {
                let kv: f64 = (0..dk).map(|i| st[i * dv + j] * k[i] * nk).sum();
                let delta = (v[j] as f64 - kv) * beta;
                for i in 0..dk {
                    st[i * dv + j] += k[i] * nk * delta;
                }
                out[t * vh * dv + h * dv + j] = (0..dk).map(|i| st[i * dv + j] * q[i] * nq).sum();
            }
        }
    }
    out
}

#[test]
fn gated_delta_rule_matches_its_definition_over_any_cut() {
    let b = CpuBackend::new(2);
    let sh = GdnShape {
        k_heads: 2,
        v_heads: 4,
        k_dim: 8,
        v_dim: 6,
    };
    let lens = [40usize, 7, 1];
    let cuts = vec![vec![17, 1, 1, 21], vec![1; 7], vec![1]];
    let mut rng = Rng(0xdead_beef);
    let width = sh.row_width();
    let wj = width + 2 * sh.v_heads;
    let inputs: Vec<Vec<f32>> = lens.iter().map(|&l| rng.vec(l * wj, 1.0)).collect();
    let a_neg: Vec<f32> = (0..sh.v_heads).map(|h| -(0.3 + 0.4 * h as f32)).collect();
    let dtb = rng.vec(sh.v_heads, 1.0);
    let (anb, dtbb) = (b.upload(&a_neg), b.upload(&dtb));
    let slots = [1u32, 3, 0];
    let mut state = rng.vec(4 * sh.slot_len(), 2.0);
    let vh = sh.v_heads;
    let outs = run_steps(
        &b,
        &lens,
        &cuts,
        &slots,
        4,
        wj,
        vh * sh.v_dim,
        &inputs,
        |x, n, step, y| {
            let (mut qkv, mut bb, mut aa) = (Vec::new(), Vec::new(), Vec::new());
            for t in 0..n {
                qkv.extend_from_slice(&x[t * wj..t * wj + width]);
                bb.extend_from_slice(&x[t * wj + width..t * wj + width + vh]);
                aa.extend_from_slice(&x[t * wj + width + vh..(t + 1) * wj]);
            }
            b.gdn_step(&qkv, &bb, &aa, &anb, &dtbb, n, &sh, &mut state, step, y);
        },
    );
    for (s, &l) in lens.iter().enumerate() {
        let x = &inputs[s];
        let (mut qkv, mut bb, mut aa) = (Vec::new(), Vec::new(), Vec::new());
        for t in 0..l {
            qkv.extend_from_slice(&x[t * wj..t * wj + width]);
            bb.extend_from_slice(&x[t * wj + width..t * wj + width + vh]);
            aa.extend_from_slice(&x[t * wj + width + vh..(t + 1) * wj]);
        }
        let want = naive_gdn(&qkv, &bb, &aa, l, &sh, &a_neg, &dtb);
        let err = outs[s]
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-5, "sequence {s}: max error {err}");
    }
}

#[test]
fn norm_first_gated_norm_and_sigmoid_gate() {
    let b = CpuBackend::new(1);
    let mut rng = Rng(9);
    let (n, d, group) = (3, 16, 8);
    let x = rng.vec(n * d, 2.0);
    let z = rng.vec(n * d, 2.0);
    let w = rng.vec(d, 1.0);
    let mut got = x.clone();
    b.rms_norm_gated(&mut got, &z, &w, 1e-6, n, group, true);
    for t in 0..n {
        for g0 in (0..d).step_by(group) {
            let ms = (g0..g0 + group).map(|c| (x[t * d + c] as f64).powi(2)).sum::<f64>() / group as f64;
            for c in g0..g0 + group {
                let zz = z[t * d + c] as f64;
                let want = w[c] as f64 * x[t * d + c] as f64 / (ms + 1e-6).sqrt() * zz / (1.0 + (-zz).exp());
                assert!((got[t * d + c] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()));
            }
        }
    }
    let mut y = vec![2.0f32, -1.0];
    b.sigmoid_mul(&mut y, &vec![0.0, 100.0], 2);
    assert_eq!(y, vec![1.0, -1.0]);
}
