//! Times candidate decode products (`cuda_mv_variants.cu`) against q8x.cu's kernels on
//! the matrix shapes of a Llama-3-8B decode step, one activation row, and checks each
//! candidate's output against the current kernel's. A tool for the GPU machine, not a
//! test: `cargo build --release --example cuda_mv_bench`, then run the binary there.
//!
//! Each shape is allocated in enough copies (≥ 256 MiB in all) that the launches, which
//! rotate over the copies, read device memory rather than the 50 MB L2. Times are the
//! median of 5 runs of 40 launches, with CUDA events around each run.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

const ITERS: usize = 40;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn f16(&mut self, lo: f32, hi: f32) -> [u8; 2] {
        half::f16::from_f32(lo + (hi - lo) * self.unit())
            .to_bits()
            .to_le_bytes()
    }
    fn bytes(&mut self, out: &mut Vec<u8>, n: usize) {
        for _ in 0..n {
            out.push(self.next() as u8);
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Ty {
    Q4_0,
    Q4K,
    Q6K,
    F16,
}

impl Ty {
    fn row_bytes(self, cols: usize) -> usize {
        match self {
            Ty::Q4_0 => cols / 32 * 18,
            Ty::Q4K => cols / 256 * 144,
            Ty::Q6K => cols / 256 * 210,
            Ty::F16 => cols * 2,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Ty::Q4_0 => "Q4_0",
            Ty::Q4K => "Q4_K",
            Ty::Q6K => "Q6_K",
            Ty::F16 => "F16",
        }
    }
}

/// Random weights with finite scales.
fn matrix(rng: &mut Rng, ty: Ty, rows: usize, cols: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(rows * ty.row_bytes(cols));
    for _ in 0..rows {
        match ty {
            Ty::Q4_0 => {
                for _ in 0..cols / 32 {
                    m.extend_from_slice(&rng.f16(-0.02, 0.02));
                    rng.bytes(&mut m, 16);
                }
            }
            Ty::Q4K => {
                for _ in 0..cols / 256 {
                    m.extend_from_slice(&rng.f16(0.0005, 0.002));
                    m.extend_from_slice(&rng.f16(0.0005, 0.002));
                    rng.bytes(&mut m, 140);
                }
            }
            Ty::Q6K => {
                for _ in 0..cols / 256 {
                    rng.bytes(&mut m, 208);
                    m.extend_from_slice(&rng.f16(0.0005, 0.002));
                }
            }
            Ty::F16 => {
                for _ in 0..cols {
                    m.extend_from_slice(&rng.f16(-0.05, 0.05));
                }
            }
        }
    }
    m
}

fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

struct Ctx {
    stream: Arc<CudaStream>,
    module: Arc<cudarc::driver::CudaModule>,
}

enum A {
    U(u32),
    P(u64),
}

impl Ctx {
    fn f(&self, name: &str) -> CudaFunction {
        self.module
            .load_function(name)
            .unwrap_or_else(|e| panic!("kernel {name}: {e}"))
    }
    fn launch(&self, f: &CudaFunction, grid: u32, block: u32, args: &[A]) {
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                A::U(v) => b.arg(v),
                A::P(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: each call site passes the kernel's parameters in the order and types of
        // its signature in the .cu source, with addresses of live allocations large
        // enough for the launch.
        unsafe { b.launch(cfg) }.expect("launch");
    }
    /// Median microseconds per launch of `go(copy)` over the copies.
    fn time(&self, copies: usize, go: &dyn Fn(usize)) -> f64 {
        for c in 0..copies.min(3) {
            go(c);
        }
        let mut runs = Vec::new();
        for _ in 0..5 {
            let a = self
                .stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .expect("event");
            for i in 0..ITERS {
                go(i % copies);
            }
            let b = self
                .stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .expect("event");
            b.synchronize().expect("sync");
            runs.push(a.elapsed_ms(&b).expect("elapsed") as f64 * 1e3 / ITERS as f64);
        }
        runs.sort_by(f64::total_cmp);
        runs[2]
    }
}

fn main() {
    let ctx = CudaContext::new(0).expect("a CUDA device");
    let stream = ctx.default_stream();
    let src = format!(
        "{}\n{}",
        include_str!("../src/cuda/q8x.cu"),
        include_str!("cuda_mv_variants.cu")
    );
    let ptx = ffai_kernels::cuda::compile("mv_bench", &src, "sm_90").expect("NVRTC");
    let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).expect("module");
    let c = Ctx { stream, module };
    let s = &c.stream;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);

    // The read ceiling: 1 GiB streamed once per launch.
    {
        let n16 = (1usize << 30) / 16;
        let buf = s.alloc_zeros::<u8>(n16 * 16).expect("alloc");
        let sink = s.alloc_zeros::<u32>(1).expect("alloc");
        let f = c.f("read_ceiling");
        let (pb, ps) = (ptr(&buf, s), ptr(&sink, s));
        let us = c.time(1, &|_| {
            c.launch(&f, 132 * 16, 256, &[A::P(pb), A::P(n16 as u64), A::P(ps)])
        });
        println!(
            "read ceiling: {:.0} GB/s (1 GiB in {us:.1} us)",
            (n16 * 16) as f64 / us / 1e3
        );
    }

    let shapes = [
        ("qkv", 6144usize, 4096usize),
        ("o", 4096, 4096),
        ("gate_up", 28672, 4096),
        ("down", 4096, 14336),
        ("lm_head", 128256, 4096),
    ];
    println!("| type | shape | kernel | us | GB/s | max |diff| / max |ref| |");
    println!("|---|---|---|---:|---:|---:|");
    for ty in [Ty::Q4_0, Ty::Q4K, Ty::Q6K, Ty::F16] {
        for &(label, rows, cols) in &shapes {
            let rb = ty.row_bytes(cols);
            let bytes = rows * rb;
            let copies = ((256usize << 20) / bytes).clamp(1, 16);
            let host = matrix(&mut rng, ty, rows, cols);
            let mats: Vec<CudaSlice<u8>> = (0..copies)
                .map(|_| {
                    let mut m = host.clone();
                    m.extend_from_slice(&[0u8; 64]);
                    s.clone_htod(&m).expect("upload")
                })
                .collect();
            let mp: Vec<u64> = mats.iter().map(|m| ptr(m, s)).collect();
            let x: Vec<f32> = (0..cols).map(|_| rng.unit() * 2.0 - 1.0).collect();
            let xd_dev = s.clone_htod(&x).expect("upload");
            let xq = s.alloc_zeros::<u8>(cols).expect("alloc");
            let xdq = s.alloc_zeros::<f32>(cols / 32).expect("alloc");
            let xs = s.alloc_zeros::<i32>(cols / 32).expect("alloc");
            let mut y = s.alloc_zeros::<f32>(rows).expect("alloc");
            let poison = vec![f32::NAN; rows];
            let (px, pq, pd, ps, py) = (ptr(&xd_dev, s), ptr(&xq, s), ptr(&xdq, s), ptr(&xs, s), ptr(&y, s));
            let kq = ty == Ty::Q4K || ty == Ty::Q6K;
            if ty != Ty::F16 {
                let qf = c.f(if kq { "quantize_q8x256" } else { "quantize_q8x32" });
                c.launch(
                    &qf,
                    cols.div_ceil(256) as u32,
                    256,
                    &[A::P(px), A::P(pq), A::P(pd), A::P(ps), A::U(cols as u32)],
                );
            }
            let base = match ty {
                Ty::Q4_0 => "mv_q8x_q4_0",
                Ty::Q4K => "mv_q8x_q4_k",
                Ty::Q6K => "mv_q8x_q6_k",
                Ty::F16 => "mv_half_f16",
            };
            // (kernel, rows per block, threads, parts-style signature)
            let base1 = format!("{base}_n1");
            let mut cands: Vec<(&str, usize, u32, bool)> = vec![(base, 4, 128, true), (&base1, 4, 128, true)];
            match ty {
                Ty::Q4_0 => cands.extend([
                    ("vq4_0_w2", 4, 128, false),
                    ("vq4_0_w4", 4, 128, false),
                    ("vq4_0_w8", 4, 128, false),
                    ("vq4_0_p2", 8, 128, false),
                    ("vq4_0_p4", 8, 128, false),
                    ("vq4_0_cta", 1, 128, false),
                    ("vq4_0_s2", 4, 128, false),
                    ("vq4_0_s4", 4, 128, false),
                ]),
                Ty::Q4K => cands.push(("mv_q8x_q4_k_u1_n1", 4, 128, true)),
                Ty::Q6K => cands.push(("mv_q8x_q6_k_u2_n1", 4, 128, true)),
                Ty::F16 => cands.extend([("vf16_w8", 4, 128, false), ("vf16_cta", 1, 128, false)]),
            }
            let mut reference: Option<Vec<f32>> = None;
            for (name, per_block, threads, parts) in cands {
                if name.starts_with("vq4_0_s") && rb % 16 != 0 {
                    continue;
                }
                let f = c.f(name);
                let grid = rows.div_ceil(per_block) as u32;
                let go = |i: usize| {
                    let args: Vec<A> = if parts {
                        let mut a = vec![A::P(mp[i]), A::P(0), A::P(0), A::P(py), A::P(0), A::P(0)];
                        a.extend([A::U(rows as u32), A::U(0), A::U(0), A::P(rb as u64)]);
                        if ty == Ty::F16 {
                            a.push(A::P(px));
                        } else {
                            a.extend([A::P(pq), A::P(pd), A::P(ps)]);
                        }
                        a.extend([A::U(cols as u32), A::U(1)]);
                        a
                    } else if ty == Ty::F16 {
                        vec![
                            A::P(mp[i]),
                            A::P(rb as u64),
                            A::P(px),
                            A::P(py),
                            A::U(rows as u32),
                            A::U(cols as u32),
                        ]
                    } else {
                        vec![
                            A::P(mp[i]),
                            A::P(rb as u64),
                            A::P(pq),
                            A::P(pd),
                            A::P(py),
                            A::U(rows as u32),
                            A::U(cols as u32),
                        ]
                    };
                    c.launch(&f, grid, threads, &args);
                };
                s.memcpy_htod(&poison, &mut y).expect("poison");
                go(0);
                let out = s.clone_dtoh(&y).expect("download");
                let us = c.time(copies, &go);
                let diff = match &reference {
                    None => {
                        reference = Some(out);
                        0.0
                    }
                    Some(r) => {
                        let m = r.iter().fold(0f32, |a, v| a.max(v.abs()));
                        let d = r.iter().zip(&out).fold(0f32, |a, (p, q)| a.max((p - q).abs()));
                        if out.iter().any(|v| !v.is_finite()) {
                            f32::NAN
                        } else {
                            d / m
                        }
                    }
                };
                println!(
                    "| {} | {label} {rows}x{cols} | {name} | {us:.1} | {:.0} | {diff:.1e} |",
                    ty.name(),
                    bytes as f64 / us / 1e3
                );
            }
        }
    }
}
