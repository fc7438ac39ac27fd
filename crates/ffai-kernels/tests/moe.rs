//! The mixture-of-experts ops of the CPU backend (`moe_route`, `moe_matmuls`,
//! `moe_combine`, and `clamp`) against naive oracles written here: routing against an
//! f64 softmax and a full sort, the expert products against f64 dot products of the
//! dequantized weights (and, bit for bit, against the dense `matmul` of the same expert
//! on the same row: gathering must not change a row's arithmetic), the combine against
//! an f64 weighted sum.

use ffai_kernels::backend::{Backend, HostBytes};
use ffai_kernels::cpu::{CpuBackend, CpuMatrix};
use ffai_kernels::ops;
use ffai_kernels::quant::{self, WeightType};

struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn f(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
}

/// Naive routing: f64 softmax, experts sorted by probability (stable: lower index first
/// among equals), the first k, renormalised in f64.
fn oracle_route(logits: &[f32], k: usize, renorm: bool) -> (Vec<usize>, Vec<f64>) {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let e: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
    let s: f64 = e.iter().sum();
    let p: Vec<f64> = e.iter().map(|x| x / s).collect();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap());
    let ids: Vec<usize> = idx[..k].to_vec();
    let mut w: Vec<f64> = ids.iter().map(|&i| p[i]).collect();
    if renorm {
        let s: f64 = w.iter().sum();
        w.iter_mut().for_each(|x| *x /= s);
    }
    (ids, w)
}

#[test]
fn route_matches_softmax_topk_oracle() {
    let b = CpuBackend::new(2);
    let mut r = Rng(7);
    for &(n, ne, k) in &[(1, 4, 2), (5, 8, 2), (40, 64, 8), (3, 128, 8), (2, 6, 6)] {
        for renorm in [false, true] {
            let logits: Vec<f32> = (0..n * ne).map(|_| 4.0 * r.f()).collect();
            let (mut ids, mut w) = (b.alloc(n * k), b.alloc(n * k));
            b.moe_route(
                &logits,
                n,
                ne,
                k,
                &ops::MoeRouting::softmax(renorm),
                None,
                None,
                &mut ids,
                &mut w,
            );
            for t in 0..n {
                let (oi, ow) = oracle_route(&logits[t * ne..(t + 1) * ne], k, renorm);
                for j in 0..k {
                    assert_eq!(ids[t * k + j] as usize, oi[j], "n{n} e{ne} k{k} row {t} slot {j}");
                    let d = (w[t * k + j] as f64 - ow[j]).abs();
                    assert!(d <= 1e-6 * (1.0 + ow[j]), "weight {} vs {}", w[t * k + j], ow[j]);
                }
                if renorm {
                    let s: f32 = w[t * k..(t + 1) * k].iter().sum();
                    assert!((s - 1.0).abs() < 1e-6);
                }
            }
        }
    }
}

/// Gemma 4's per-expert scale multiplies each chosen expert's weight after the
/// renormalisation, and never changes the choice.
#[test]
fn route_expert_scale_matches_the_oracle() {
    let b = CpuBackend::new(2);
    let mut r = Rng(11);
    let (n, ne, k) = (24, 16, 4);
    let logits: Vec<f32> = (0..n * ne).map(|_| 4.0 * r.f()).collect();
    let scale: Vec<f32> = (0..ne).map(|e| 0.25 + 0.125 * e as f32).collect();
    let (mut ids, mut w) = (b.alloc(n * k), b.alloc(n * k));
    let routing = ops::MoeRouting::softmax(true);
    b.moe_route(&logits, n, ne, k, &routing, None, Some(&scale), &mut ids, &mut w);
    for t in 0..n {
        let (oi, ow) = oracle_route(&logits[t * ne..(t + 1) * ne], k, true);
        for j in 0..k {
            assert_eq!(ids[t * k + j] as usize, oi[j], "row {t} slot {j}");
            let want = ow[j] * scale[oi[j]] as f64;
            let d = (w[t * k + j] as f64 - want).abs();
            assert!(
                d <= 1e-6 * (1.0 + want),
                "row {t} slot {j}: weight {} vs {want}",
                w[t * k + j]
            );
        }
    }
}

#[test]
fn route_ties_go_to_the_lower_index_and_nan_picks_valid_experts() {
    let b = CpuBackend::new(1);
    let logits = [0.5f32, 1.0, 1.0, 0.5, 1.0, -2.0];
    let (mut ids, mut w) = (b.alloc(4), b.alloc(4));
    b.moe_route(
        &logits.to_vec(),
        1,
        6,
        4,
        &ops::MoeRouting::softmax(false),
        None,
        None,
        &mut ids,
        &mut w,
    );
    assert_eq!(ids, vec![1.0, 2.0, 4.0, 0.0]);
    // A NaN logit makes every probability NaN (as in torch): the ids stay distinct
    // valid experts, so the expert products never index outside the table.
    let logits = [0.5f32, f32::NAN, 1.0, 0.5];
    b.moe_route(
        &logits.to_vec(),
        1,
        4,
        3,
        &ops::MoeRouting::softmax(true),
        None,
        None,
        &mut ids,
        &mut w,
    );
    let mut got: Vec<usize> = ids[..3].iter().map(|&i| i as usize).collect();
    got.sort();
    got.dedup();
    assert!(got.len() == 3 && got.iter().all(|&i| i < 4), "{ids:?}");
    // Equal logits: the first k experts, each 1/n.
    let mut ids = b.alloc(2);
    let mut w = b.alloc(2);
    b.moe_route(
        &vec![0.25f32; 4],
        1,
        4,
        2,
        &ops::MoeRouting::softmax(false),
        None,
        None,
        &mut ids,
        &mut w,
    );
    assert_eq!(ids, vec![0.0, 1.0]);
    assert!((w[0] - 0.25).abs() < 1e-7 && (w[1] - 0.25).abs() < 1e-7);
}

fn random_mat(b: &CpuBackend, ty: WeightType, rows: usize, cols: usize, r: &mut Rng) -> (CpuMatrix, Vec<f32>) {
    let rb = ty.row_bytes(cols).unwrap();
    let mut bytes = vec![0u8; rows * rb];
    let mut deq = vec![0f32; rows * cols];
    for row in 0..rows {
        let src = r.vec(cols);
        quant::quantize_row(ty, &src, &mut bytes[row * rb..(row + 1) * rb]).unwrap();
        quant::dequantize_row(
            ty,
            &bytes[row * rb..(row + 1) * rb],
            &mut deq[row * cols..(row + 1) * cols],
        );
    }
    (b.matrix(ty, rows, cols, HostBytes::from_vec(bytes)), deq)
}

#[test]
fn expert_products_read_the_selected_experts_and_match_dense_matmul_bitwise() {
    for threads in [1, 3] {
        let b = CpuBackend::new(threads);
        for ty in [WeightType::F32, WeightType::F16, WeightType::Q8_0, WeightType::Q4_0] {
            let mut r = Rng(11);
            let (ne, k, cols, f) = (6usize, 2usize, 256usize, 48usize);
            let (gm, gdeq): (Vec<CpuMatrix>, Vec<Vec<f32>>) =
                (0..ne).map(|_| random_mat(&b, ty, f, cols, &mut r)).unzip();
            let (um, _): (Vec<CpuMatrix>, Vec<Vec<f32>>) = (0..ne).map(|_| random_mat(&b, ty, f, cols, &mut r)).unzip();
            for n in [1usize, 3, 37, 70] {
                let x = r.vec(n * cols);
                // Two distinct experts per token; experts 0..5 all used once n >= 5, expert 5 never.
                let ids: Vec<f32> = (0..n * k).map(|s| ((s / k * 3 + (s % k) * 2) % 5) as f32).collect();
                let (mut og, mut ou) = (b.alloc(n * k * f), b.alloc(n * k * f));
                b.moe_matmuls(&[&gm, &um], &x, false, &ids, n, k, &mut [&mut og, &mut ou]);
                for s in 0..n * k {
                    let (t, e) = (s / k, ids[s] as usize);
                    let xr = &x[t * cols..(t + 1) * cols];
                    // Bitwise: the dense product of this expert on this row alone.
                    let mut dense = b.alloc(f);
                    b.matmul(&gm[e], &xr.to_vec(), 1, &mut dense);
                    assert_eq!(&og[s * f..(s + 1) * f], &dense[..], "{ty:?} n{n} t{threads} slot {s}");
                    b.matmul(&um[e], &xr.to_vec(), 1, &mut dense);
                    assert_eq!(&ou[s * f..(s + 1) * f], &dense[..], "{ty:?} n{n} slot {s} (up)");
                    // Oracle: f64 over the dequantized weights, within the 8-bit
                    // activation rounding for quantized types.
                    let tol = if ty.is_quantized() { 2e-2 } else { 1e-4 };
                    for row in 0..f {
                        let wrow = &gdeq[e][row * cols..(row + 1) * cols];
                        let want: f64 = wrow.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let mag: f64 = wrow.iter().zip(xr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                        let got = og[s * f + row] as f64;
                        assert!((got - want).abs() <= tol * mag, "{ty:?}: {got} vs {want}");
                    }
                }
            }
        }
    }
}

#[test]
fn down_products_read_each_slots_own_row() {
    let b = CpuBackend::new(2);
    let mut r = Rng(3);
    let (ne, k, f, h) = (4usize, 3usize, 64usize, 32usize);
    let (ms, deq): (Vec<CpuMatrix>, Vec<Vec<f32>>) =
        (0..ne).map(|_| random_mat(&b, WeightType::F32, h, f, &mut r)).unzip();
    let n = 9;
    let x = r.vec(n * k * f);
    let ids: Vec<f32> = (0..n * k).map(|s| ((s / k + s % k) % ne) as f32).collect();
    let mut out = b.alloc(n * k * h);
    b.moe_matmuls(&[&ms], &x, true, &ids, n, k, &mut [&mut out]);
    for s in 0..n * k {
        let e = ids[s] as usize;
        for row in 0..h {
            let want: f64 = (0..f).map(|c| deq[e][row * f + c] as f64 * x[s * f + c] as f64).sum();
            assert!((out[s * h + row] as f64 - want).abs() < 1e-4, "slot {s} row {row}");
        }
    }
}

#[test]
fn combine_is_the_weighted_sum_of_the_slots() {
    let b = CpuBackend::new(2);
    let mut r = Rng(5);
    for &(n, k, d) in &[(1, 2, 8), (7, 8, 64), (300, 4, 256)] {
        let ys = r.vec(n * k * d);
        let w = r.vec(n * k);
        let mut out = b.alloc(n * d);
        b.moe_combine(&ys, &w, n, k, d, &mut out);
        for t in 0..n {
            for i in 0..d {
                let want: f64 = (0..k)
                    .map(|j| w[t * k + j] as f64 * ys[(t * k + j) * d + i] as f64)
                    .sum();
                assert!((out[t * d + i] as f64 - want).abs() < 1e-5, "n{n} row {t} elem {i}");
            }
        }
    }
}

#[test]
fn clamp_limits_every_element() {
    let b = CpuBackend::new(1);
    let mut x = vec![-3.0f32, -0.5, 0.0, 2.5, 9.0, 1.0];
    b.clamp(&mut x, -1.0, 2.0, 5);
    assert_eq!(x, vec![-1.0, -0.5, 0.0, 2.0, 2.0, 1.0]);
    let mut y = vec![0f32; 3];
    ops::moe_combine(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[0.5, 2.0], &mut y);
    assert_eq!(y, vec![8.5, 11.0, 13.5]);
}

/// GPT-OSS's clamped SwiGLU against an f64 oracle of transformers' `_apply_gate`, over
/// values on both sides of the clamp (|x| up to 12, limit 7), lengths that cross the
/// parallel threshold.
#[test]
fn swiglu_clamped_matches_transformers_formula() {
    let (alpha, limit) = (1.702f32, 7.0f32);
    let mut r = Rng(31);
    for (threads, len) in [(1, 37), (3, 70_001)] {
        let b = CpuBackend::new(threads);
        let gate: Vec<f32> = r.vec(len).iter().map(|x| x * 12.0).collect();
        let up: Vec<f32> = r.vec(len).iter().map(|x| x * 12.0).collect();
        let mut g = b.upload(&gate);
        b.swiglu_clamped(&mut g, &b.upload(&up), alpha, limit, len);
        let mut got = vec![0f32; len];
        b.download(&g, 0..len, &mut got);
        let mut clamped = 0;
        for i in 0..len {
            let x = (gate[i] as f64).min(limit as f64);
            let u = (up[i] as f64).clamp(-(limit as f64), limit as f64);
            clamped += (gate[i] > limit || up[i].abs() > limit) as usize;
            let want = (u + 1.0) * x / (1.0 + (-(alpha as f64) * x).exp());
            assert!(
                (got[i] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "element {i}: gate {} up {}: got {}, want {want}",
                gate[i],
                up[i],
                got[i]
            );
        }
        assert!(clamped > len / 4, "the inputs must exercise the clamp");
    }
}

/// Each slot gets its own expert's bias row, whatever the other slots hold.
#[test]
fn moe_add_bias_adds_each_slots_expert_row() {
    let b = CpuBackend::new(2);
    let (ne, d, slots) = (5, 7, 9);
    let mut r = Rng(5);
    let biases = r.vec(ne * d);
    let x0 = r.vec(slots * d);
    let ids: Vec<f32> = [4, 0, 2, 2, 1, 4, 3, 0, 1].iter().map(|&e| e as f32).collect();
    let mut x = b.upload(&x0);
    b.moe_add_bias(&mut x, &b.upload(&biases), &b.upload(&ids), slots, d);
    let mut got = vec![0f32; slots * d];
    b.download(&x, 0..slots * d, &mut got);
    for s in 0..slots {
        let e = ids[s] as usize;
        for c in 0..d {
            assert_eq!(got[s * d + c], x0[s * d + c] + biases[e * d + c], "slot {s} column {c}");
        }
    }
}

/// GPT-OSS routes by a softmax over the top-k logits only; the renormalised top-k of a
/// softmax over all experts is the same distribution (the common factor cancels).
#[test]
fn renormalised_route_is_a_softmax_over_the_topk_logits() {
    let mut r = Rng(77);
    for _ in 0..200 {
        let logits: Vec<f32> = r.vec(32).iter().map(|x| x * 6.0).collect();
        let k = 4;
        let (mut ids, mut w) = (vec![0f32; k], vec![0f32; k]);
        ops::moe_route(&logits, true, &mut ids, &mut w);
        let top: Vec<f64> = ids.iter().map(|&i| logits[i as usize] as f64).collect();
        let m = top.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = top.iter().map(|x| (x - m).exp()).sum();
        for j in 0..k {
            let want = (top[j] - m).exp() / z;
            assert!((w[j] as f64 - want).abs() < 1e-6, "slot {j}: {} vs {want}", w[j]);
        }
    }
}

/// Naive group-limited routing (DeepSeek): f64 scores (softmax or sigmoid), choice scores
/// with the bias, groups scored by their max or the sum of their two best choice scores,
/// the best `topk_groups` groups kept (stable sort), the k best kept experts by choice
/// score; weights the unbiased scores, renormalised, scaled.
fn oracle_grouped(logits: &[f32], bias: Option<&[f32]>, r: &ops::MoeRouting, k: usize) -> (Vec<usize>, Vec<f64>) {
    let ne = logits.len();
    let p: Vec<f64> = match r.scoring {
        ops::MoeScoring::Softmax => {
            let max = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let e: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        }
        ops::MoeScoring::Sigmoid => logits.iter().map(|&x| 1.0 / (1.0 + (-(x as f64)).exp())).collect(),
    };
    let c: Vec<f64> = (0..ne).map(|e| p[e] + bias.map_or(0.0, |b| b[e] as f64)).collect();
    let gs = ne / r.n_groups;
    let gscore: Vec<f64> = (0..r.n_groups)
        .map(|g| {
            let mut v: Vec<f64> = c[g * gs..(g + 1) * gs].to_vec();
            v.sort_by(|a, b| b.partial_cmp(a).unwrap());
            match r.group_score {
                ops::GroupScore::Max => v[0],
                ops::GroupScore::TopTwoSum => v[0] + v.get(1).copied().unwrap_or(0.0),
            }
        })
        .collect();
    let mut gi: Vec<usize> = (0..r.n_groups).collect();
    gi.sort_by(|&a, &b| gscore[b].partial_cmp(&gscore[a]).unwrap());
    let kept = &gi[..r.topk_groups];
    let mut idx: Vec<usize> = (0..ne).filter(|e| kept.contains(&(e / gs))).collect();
    idx.sort_by(|&a, &b| c[b].partial_cmp(&c[a]).unwrap());
    let ids = idx[..k].to_vec();
    let mut w: Vec<f64> = ids.iter().map(|&i| p[i]).collect();
    if r.renormalize {
        let s: f64 = w.iter().sum();
        w.iter_mut().for_each(|x| *x /= s);
    }
    w.iter_mut().for_each(|x| *x *= r.scale as f64);
    (ids, w)
}

#[test]
fn grouped_routes_match_the_naive_oracle() {
    let b = CpuBackend::new(2);
    let mut r = Rng(99);
    let (n, ne, k) = (40, 32, 6);
    for (scoring, group_score, biased, renormalize) in [
        (ops::MoeScoring::Sigmoid, ops::GroupScore::TopTwoSum, true, true),
        (ops::MoeScoring::Sigmoid, ops::GroupScore::TopTwoSum, false, false),
        (ops::MoeScoring::Softmax, ops::GroupScore::Max, false, false),
        (ops::MoeScoring::Softmax, ops::GroupScore::Max, true, true),
    ] {
        let routing = ops::MoeRouting {
            scoring,
            renormalize,
            scale: 2.5,
            n_groups: 8,
            topk_groups: 3,
            group_score,
        };
        routing.check(ne, k).unwrap();
        let logits: Vec<f32> = r.vec(n * ne).iter().map(|x| x * 4.0).collect();
        // A bias large enough to change choices (sigmoid scores lie in 0..1).
        let bias: Vec<f32> = r.vec(ne).iter().map(|x| x * 0.5).collect();
        let bias_buf = biased.then(|| bias.clone());
        let (mut ids, mut w) = (vec![0f32; n * k], vec![0f32; n * k]);
        b.moe_route(&logits, n, ne, k, &routing, bias_buf.as_ref(), None, &mut ids, &mut w);
        let mut bias_mattered = false;
        for t in 0..n {
            let row = &logits[t * ne..(t + 1) * ne];
            let (oi, ow) = oracle_grouped(row, biased.then_some(&bias[..]), &routing, k);
            let got: Vec<usize> = ids[t * k..(t + 1) * k].iter().map(|&x| x as usize).collect();
            assert_eq!(got, oi, "{routing:?} row {t}");
            for (g, o) in w[t * k..(t + 1) * k].iter().zip(&ow) {
                assert!((*g as f64 - o).abs() < 1e-5, "{routing:?} row {t}: weight {g} vs {o}");
            }
            // The bias bites: without it the oracle picks other experts somewhere.
            if biased {
                let (plain, _) = oracle_grouped(row, None, &routing, k);
                bias_mattered |= plain != oi;
            }
        }
        assert!(!biased || bias_mattered, "{routing:?}: the bias never changed a choice");
        let ungrouped = ops::MoeRouting {
            n_groups: 1,
            topk_groups: 1,
            ..routing
        };
        let differs = (0..n).any(|t| {
            let row = &logits[t * ne..(t + 1) * ne];
            oracle_grouped(row, None, &ungrouped, k).0 != oracle_grouped(row, None, &routing, k).0
        });
        assert!(differs, "{routing:?}: the group limit never changed a choice");
    }
    // Rules that cannot pick k experts are refused.
    let bad = ops::MoeRouting {
        n_groups: 8,
        topk_groups: 1,
        ..ops::MoeRouting::softmax(false)
    };
    assert!(bad.check(32, 6).is_err(), "1 group of 4 cannot hold 6");
    assert!(
        ops::MoeRouting { n_groups: 5, ..bad }.check(32, 2).is_err(),
        "32 experts in 5 groups"
    );
}
