//! Tests of `ffai_kernels::quant` against
//! * a deliberately naive oracle written here from the ggml block layouts
//!   (one element at a time, reading single bits out of the block),
//! * gguf-py (fixtures made by `fixtures/make_quant_fixture.py`; gguf-py has
//!   no Q8_K, which is checked against the oracle only),
//! * round-trip error bounds for the quantizers.

use ffai_kernels::quant::{dequantize_row, dot_row, quantize_row, WeightType};
use half::{bf16, f16};

const QUANTIZED: [WeightType; 8] = [
    WeightType::Q4_0,
    WeightType::Q4_1,
    WeightType::Q5_0,
    WeightType::Q5_1,
    WeightType::Q8_0,
    WeightType::Q4K,
    WeightType::Q5K,
    WeightType::Q6K,
];

/// The types added after the first set: their quantizers are tested on their own.
const LOWBIT: [WeightType; 6] = [
    WeightType::Q2K,
    WeightType::Q3K,
    WeightType::Q8K,
    WeightType::IQ4NL,
    WeightType::IQ4XS,
    WeightType::MXFP4,
];

// ------------------------------------------------------------------ PRNG

/// SplitMix64: tiny, deterministic, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn byte(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Roughly normal (sum of uniforms), mean 0, sd 1.
    fn normal(&mut self) -> f32 {
        (0..12).map(|_| self.unit()).sum::<f32>() - 6.0
    }
}

// ---------------------------------------------------------------- oracle
//
// Straight from the layout description: element `i` of a block is assembled
// bit by bit, with no shared code with the module.

/// Bit `k` of a little-endian byte string (bit 0 = LSB of byte 0).
fn bit(bytes: &[u8], k: usize) -> u32 {
    ((bytes[k / 8] >> (k % 8)) & 1) as u32
}

/// `count` bits starting at bit `start`, least significant first.
fn bits(bytes: &[u8], start: usize, count: usize) -> u32 {
    let mut v = 0;
    for k in 0..count {
        v |= bit(bytes, start + k) << k;
    }
    v
}

/// IEEE binary16 from its fields, computed in f64.
fn f16_value(h: u32) -> f32 {
    let sign = if h >> 15 == 1 { -1.0f64 } else { 1.0 };
    let exp = ((h >> 10) & 0x1F) as i32;
    let man = (h & 0x3FF) as f64;
    let mag = match exp {
        0 => man * 2f64.powi(-24),
        31 if man == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1024.0 + man) * 2f64.powi(e - 25),
    };
    (sign * mag) as f32
}

/// bfloat16 (8-bit exponent, 7-bit mantissa) from its fields, in f64.
fn bf16_value(h: u32) -> f32 {
    let sign = if h >> 15 == 1 { -1.0f64 } else { 1.0 };
    let exp = ((h >> 7) & 0xFF) as i32;
    let man = (h & 0x7F) as f64;
    let mag = match exp {
        0 => man * 2f64.powi(-133),
        255 if man == 0.0 => f64::INFINITY,
        255 => f64::NAN,
        e => (128.0 + man) * 2f64.powi(e - 134),
    };
    (sign * mag) as f32
}

/// The f16 stored at byte offset `at` of a block.
fn f16_at(block: &[u8], at: usize) -> f32 {
    f16_value(bits(block, at * 8, 16))
}

/// 4-bit value stored for element `i` in a 16-byte Q4_x/Q5_x nibble array at
/// byte `at`: element i < 16 is the low nibble of byte i, else the high
/// nibble of byte i - 16.
fn legacy_nibble(block: &[u8], at: usize, i: usize) -> u32 {
    bits(block, (at + i % 16) * 8 + 4 * (i / 16), 4)
}

/// Q4_K/Q5_K 6-bit (scale, min) of sub-block `s`; the 12 bytes start at 4.
fn kq_scale_min(block: &[u8], s: usize) -> (u32, u32) {
    let byte = |k: usize| (4 + k) * 8;
    if s < 4 {
        (bits(block, byte(s), 6), bits(block, byte(s + 4), 6))
    } else {
        let sc = bits(block, byte(s + 4), 4) | (bits(block, byte(s - 4) + 6, 2) << 4);
        let mn = bits(block, byte(s + 4) + 4, 4) | (bits(block, byte(s) + 6, 2) << 4);
        (sc, mn)
    }
}

/// Q4_K/Q5_K: the low 4 bits of element `i` from the nibble area at `at`.
/// Element i sits in byte 32·(i/64) + i%32, low nibble for even sub-blocks.
fn kq_nibble(block: &[u8], at: usize, i: usize) -> u32 {
    let byte = at + 32 * (i / 64) + i % 32;
    bits(block, byte * 8 + 4 * ((i / 32) % 2), 4)
}

/// Q6_K sub-block `s` scale (signed byte at 192 + s).
fn q6k_scale(block: &[u8], s: usize) -> i32 {
    bits(block, (192 + s) * 8, 8) as u8 as i8 as i32
}

/// Q6_K 6-bit level of element `i` (before the -32 offset).
fn q6k_level(block: &[u8], i: usize) -> u32 {
    let (n, k, l) = (i / 128, (i % 128) / 32, i % 32);
    let low = bits(block, (64 * n + l + 32 * (k % 2)) * 8 + 4 * (k / 2), 4);
    let high = bits(block, (128 + 32 * n + l) * 8 + 2 * k, 2);
    low | (high << 4)
}

/// The IQ4 codebook (IQ4_NL, IQ4_XS), a fact of the format.
const IQ4_LEVELS: [i32; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// Q2_K / Q3_K: the 2 low bits of element `i = 128n + 32j + l` in the 64-byte
/// area at `at`: bits 2j, 2j+1 of byte 32n + l.
fn two_bit_level(block: &[u8], at: usize, i: usize) -> u32 {
    bits(block, (at + 32 * (i / 128) + i % 32) * 8 + 2 * ((i % 128) / 32), 2)
}

/// Q3_K 6-bit scale of sub-block `s` (offset 32 not removed); 12 bytes at 96.
fn q3k_scale(block: &[u8], s: usize) -> u32 {
    let low = if s < 8 {
        bits(block, (96 + s) * 8, 4)
    } else {
        bits(block, (96 + s - 8) * 8 + 4, 4)
    };
    low | (bits(block, (96 + 8 + s % 4) * 8 + 2 * (s / 4), 2) << 4)
}

/// IQ4_XS 6-bit scale of sub-block `s` (offset 32 not removed).
fn iq4xs_scale(block: &[u8], s: usize) -> u32 {
    bits(block, (4 + s / 2) * 8 + 4 * (s % 2), 4) | (bits(block, 16 + 2 * s, 2) << 4)
}

/// MXFP4 element from its E8M0 exponent and E2M1 code, in f64: sign bit 3,
/// magnitude index bits 0..3 into 0, 0.5, 1, 1.5, 2, 3, 4, 6; scale 2^(e-127).
/// Code 8 ("-0") decodes to +0, as in ggml.
fn mxfp4_value(e: u32, code: u32) -> f32 {
    const MAG: [f64; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    let m = MAG[(code & 7) as usize] * 2f64.powi(e as i32 - 127);
    (if code & 8 != 0 && m != 0.0 { -m } else { m }) as f32
}

/// Element `i` of one block, in the same f32 operation order as ggml.
fn oracle_element(ty: WeightType, block: &[u8], i: usize) -> f32 {
    match ty {
        WeightType::F32 => f32::from_bits(bits(block, 0, 32)),
        WeightType::F16 => f16_value(bits(block, 0, 16)),
        WeightType::BF16 => bf16_value(bits(block, 0, 16)),
        WeightType::Q4_0 => {
            let q = legacy_nibble(block, 2, i) as i32 - 8;
            q as f32 * f16_at(block, 0)
        }
        WeightType::Q4_1 => {
            let q = legacy_nibble(block, 4, i);
            q as f32 * f16_at(block, 0) + f16_at(block, 2)
        }
        WeightType::Q5_0 => {
            let q = legacy_nibble(block, 6, i) | (bit(block, 2 * 8 + i) << 4);
            (q as i32 - 16) as f32 * f16_at(block, 0)
        }
        WeightType::Q5_1 => {
            let q = legacy_nibble(block, 8, i) | (bit(block, 4 * 8 + i) << 4);
            q as f32 * f16_at(block, 0) + f16_at(block, 2)
        }
        WeightType::Q8_0 => {
            let q = bits(block, (2 + i) * 8, 8) as u8 as i8;
            q as f32 * f16_at(block, 0)
        }
        WeightType::Q4K => {
            let (sc, mn) = kq_scale_min(block, i / 32);
            let q = kq_nibble(block, 16, i);
            (f16_at(block, 0) * sc as f32) * q as f32 - f16_at(block, 2) * mn as f32
        }
        WeightType::Q5K => {
            let (sc, mn) = kq_scale_min(block, i / 32);
            let q = kq_nibble(block, 48, i) | (bit(block, (16 + i % 32) * 8 + i / 32) << 4);
            (f16_at(block, 0) * sc as f32) * q as f32 - f16_at(block, 2) * mn as f32
        }
        WeightType::Q6K => {
            let q = q6k_level(block, i) as i32 - 32;
            (f16_at(block, 208) * q6k_scale(block, i / 16) as f32) * q as f32
        }
        WeightType::Q2K => {
            let (sc, mn) = (bits(block, (i / 16) * 8, 4), bits(block, (i / 16) * 8 + 4, 4));
            let q = two_bit_level(block, 16, i);
            (f16_at(block, 80) * sc as f32) * q as f32 - f16_at(block, 82) * mn as f32
        }
        WeightType::Q3K => {
            // A clear high bit (bit i / 32 of hmask[i % 32]) means "minus 4".
            let high = bit(block, (i % 32) * 8 + i / 32) as i32;
            let q = two_bit_level(block, 32, i) as i32 - 4 * (1 - high);
            (f16_at(block, 108) * (q3k_scale(block, i / 16) as i32 - 32) as f32) * q as f32
        }
        WeightType::Q8K => {
            let q = bits(block, (4 + i) * 8, 8) as u8 as i8;
            f32::from_bits(bits(block, 0, 32)) * q as f32
        }
        WeightType::IQ4NL => f16_at(block, 0) * IQ4_LEVELS[legacy_nibble(block, 2, i) as usize] as f32,
        WeightType::IQ4XS => {
            let s = i / 32;
            let k = bits(block, (8 + 16 * s + i % 16) * 8 + 4 * ((i % 32) / 16), 4);
            (f16_at(block, 0) * (iq4xs_scale(block, s) as i32 - 32) as f32) * IQ4_LEVELS[k as usize] as f32
        }
        WeightType::MXFP4 => mxfp4_value(bits(block, 0, 8), legacy_nibble(block, 1, i)),
        // Not in `WeightType::ALL`; tests/affine.rs has its own oracle.
        WeightType::Affine { .. } => unreachable!("affine rows are tested in tests/affine.rs"),
    }
}

fn oracle_row(ty: WeightType, row: &[u8], n: usize) -> Vec<f32> {
    let (bl, bb) = (ty.block_len(), ty.block_bytes());
    (0..n)
        .map(|e| {
            let b = e / bl;
            oracle_element(ty, &row[b * bb..(b + 1) * bb], e % bl)
        })
        .collect()
}

/// Byte offsets of the f16 scale/min fields in one block.
fn f16_fields(ty: WeightType) -> &'static [usize] {
    match ty {
        WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => &[0],
        WeightType::Q4_1 | WeightType::Q5_1 | WeightType::Q4K | WeightType::Q5K => &[0, 2],
        WeightType::Q6K => &[208],
        WeightType::Q2K => &[80, 82],
        WeightType::Q3K => &[108],
        WeightType::IQ4NL | WeightType::IQ4XS => &[0],
        WeightType::F32 | WeightType::F16 | WeightType::BF16 | WeightType::Q8K | WeightType::MXFP4 => &[],
        WeightType::Affine { .. } => unreachable!("affine rows are tested in tests/affine.rs"),
    }
}

/// A sane finite f16 field value: mostly uniform in ±0.05, sometimes zero or tiny.
fn random_field(rng: &mut Rng) -> f16 {
    match rng.below(16) {
        0 => f16::ZERO,
        1 => f16::from_bits(1 + rng.below(0x3FF) as u16), // subnormal
        _ => f16::from_f32(rng.uniform(-0.05, 0.05)),
    }
}

/// Random bytes (every bit pattern of the quants is valid) with the f16
/// fields replaced by sane values.
fn random_row(rng: &mut Rng, ty: WeightType, n: usize) -> Vec<u8> {
    let mut row: Vec<u8> = (0..ty.row_bytes(n).unwrap()).map(|_| rng.byte()).collect();
    for block in row.chunks_exact_mut(ty.block_bytes()) {
        for &at in f16_fields(ty) {
            block[at..at + 2].copy_from_slice(&random_field(rng).to_bits().to_le_bytes());
        }
        match ty {
            // Q8_K's scale is an f32.
            WeightType::Q8K => block[0..4].copy_from_slice(&random_field(rng).to_f32().to_le_bytes()),
            // MXFP4: scales 2^-28 ..= 2^8, sometimes the subnormal ones.
            WeightType::MXFP4 => {
                block[0] = if rng.below(16) == 0 {
                    rng.below(2) as u8
                } else {
                    100 + rng.below(36) as u8
                }
            }
            _ => {}
        }
    }
    row
}

/// Random finite values of a float type, stored.
fn random_float_row(rng: &mut Rng, ty: WeightType, n: usize) -> Vec<u8> {
    let vals: Vec<f32> = (0..n)
        .map(|_| rng.normal() * 10f32.powf(rng.uniform(-3.0, 3.0)))
        .collect();
    let mut row = vec![0u8; ty.row_bytes(n).unwrap()];
    quantize_row(ty, &vals, &mut row).unwrap();
    row
}

/// Bitwise equality, except that any NaN matches any NaN.
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn lengths(ty: WeightType) -> Vec<usize> {
    if ty.is_quantized() {
        [1, 2, 3, 7].iter().map(|b| b * ty.block_len()).collect()
    } else {
        vec![0, 1, 5, 63, 64, 65, 130, 257, 1000]
    }
}

// ------------------------------------------------------------------ tests

/// dequantize_row is bitwise identical to the naive oracle on random
/// well-formed rows of every type (floats from raw random bit patterns).
#[test]
fn dequantize_matches_naive_oracle() {
    let mut rng = Rng(1);
    for ty in WeightType::ALL {
        for n in lengths(ty) {
            for rep in 0..4 {
                let row = random_row(&mut rng, ty, n);
                let want = oracle_row(ty, &row, n);
                let mut got = vec![f32::NAN; n];
                dequantize_row(ty, &row, &mut got);
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        same(g, w),
                        "{ty} n={n} rep={rep} elem {i}: got {g:e} ({:#x}), oracle {w:e} ({:#x})",
                        g.to_bits(),
                        w.to_bits()
                    );
                }
            }
        }
    }
}

/// The oracle itself decodes a few hand-built blocks to hand-computed values
/// (guards against the oracle and the module sharing a misreading).
#[test]
fn oracle_decodes_hand_built_blocks() {
    // Q4_0, d = 0.5: byte j = 0x?? -> element j low nibble, j+16 high nibble.
    let mut b = vec![0u8; 18];
    b[0..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
    b[2] = 0xF0; // element 0 -> 0, element 16 -> 15
    b[17] = 0x9A; // element 15 -> 10, element 31 -> 9
    let v = oracle_row(WeightType::Q4_0, &b, 32);
    assert_eq!((v[0], v[16], v[15], v[31], v[1]), (-4.0, 3.5, 1.0, 0.5, -4.0));

    // Q5_1, d = 1, m = -16: qh bit i is bit 4 of element i.
    let mut b = vec![0u8; 24];
    b[0..2].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
    b[2..4].copy_from_slice(&f16::from_f32(-16.0).to_bits().to_le_bytes());
    b[4..8].copy_from_slice(&(1u32 << 31 | 1 << 3).to_le_bytes());
    b[8 + 15] = 0x70; // element 31 low bits 7
    b[8 + 3] = 0x02; // element 3 low bits 2
    let v = oracle_row(WeightType::Q5_1, &b, 32);
    assert_eq!((v[31], v[3], v[0]), (23.0 - 16.0, 18.0 - 16.0, -16.0));

    // Q4_K: d = 1, dmin = 1; sub-block 5: scale 0b10_0011 = 35, min 0b01_0100 = 20.
    let mut b = vec![0u8; 144];
    b[0..2].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
    b[2..4].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
    b[4 + 1] = 0b10 << 6; // high bits of scale 5
    b[4 + 5] = 0b01 << 6; // high bits of min 5
    b[4 + 9] = 0x43; // low nibble: scale 5 low = 3, high nibble: min 5 low = 4
                     // element 160 (sub-block 5 = odd, group 2, l = 0): high nibble of byte 16 + 64.
    b[16 + 64] = 0x70;
    let v = oracle_row(WeightType::Q4K, &b, 256);
    assert_eq!(v[160], 35.0 * 7.0 - 20.0);
    assert_eq!(v[161], -20.0);

    // Q6_K: d = 2, scale of sub-block 13 = -3; element 13*16 = 208 -> n=1, k=2, l=16.
    let mut b = vec![0u8; 210];
    b[208..210].copy_from_slice(&f16::from_f32(2.0).to_bits().to_le_bytes());
    b[192 + 13] = (-3i8) as u8;
    b[64 + 16] = 0xB0; // k = 2 -> high nibble of ql[64 + 16] = 11
    b[128 + 32 + 16] = 0b10 << 4; // k = 2 -> bits 4,5 of qh[32 + 16] = 2
    let v = oracle_row(WeightType::Q6K, &b, 256);
    assert_eq!(v[208], 2.0 * -3.0 * ((11 | (2 << 4)) as f32 - 32.0));
}

// ---------------------------------------------------------------- fixture

struct Record {
    ty: WeightType,
    quantize: bool,
    stored: Vec<u8>,
    values: Vec<f32>,
}

fn read_fixture() -> Vec<Record> {
    let mut recs = parse_fixture(include_bytes!("fixtures/quant_fixture.bin"));
    recs.extend(parse_fixture(include_bytes!("fixtures/quant_fixture_lowbit.bin")));
    recs
}

fn parse_fixture(data: &[u8]) -> Vec<Record> {
    assert_eq!(&data[..8], b"FFAIQFX1", "bad fixture magic");
    let mut pos = 8;
    let u32_at = |pos: &mut usize| {
        let v = u32::from_le_bytes(data[*pos..*pos + 4].try_into().unwrap());
        *pos += 4;
        v
    };
    let count = u32_at(&mut pos);
    let mut out = Vec::new();
    for _ in 0..count {
        let id = u32_at(&mut pos);
        let dir = u32_at(&mut pos);
        let n = u32_at(&mut pos) as usize;
        let nb = u32_at(&mut pos) as usize;
        let ty = WeightType::from_ggml(id).unwrap_or_else(|| panic!("fixture type id {id}"));
        let stored = data[pos..pos + nb].to_vec();
        pos += nb;
        let values = data[pos..pos + 4 * n]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        pos += 4 * n;
        assert!(dir <= 1);
        out.push(Record {
            ty,
            quantize: dir == 1,
            stored,
            values,
        });
    }
    assert_eq!(pos, data.len(), "trailing bytes in fixture");
    out
}

/// gguf-py's dequantization of random blocks equals ours bit for bit (and the
/// oracle's), for every quantized type and F16/BF16.
#[test]
fn dequantize_matches_gguf_py_fixture() {
    let recs = read_fixture();
    let mut seen = Vec::new();
    for r in recs.iter().filter(|r| !r.quantize) {
        assert_eq!(r.ty.row_bytes(r.values.len()), Some(r.stored.len()));
        let mut got = vec![f32::NAN; r.values.len()];
        dequantize_row(r.ty, &r.stored, &mut got);
        let oracle = oracle_row(r.ty, &r.stored, r.values.len());
        for (i, &want) in r.values.iter().enumerate() {
            // Stated tolerance: 1e-6 relative; in practice all are bit-exact.
            let exact = same(got[i], want);
            let close = (got[i] - want).abs() <= 1e-6 * want.abs();
            assert!(exact || close, "{} elem {i}: ours {:e}, gguf-py {want:e}", r.ty, got[i]);
            assert!(
                exact,
                "{} elem {i}: ours {:e} not bit-exact with gguf-py {want:e}",
                r.ty, got[i]
            );
            assert!(
                same(oracle[i], want),
                "{} elem {i}: oracle {:e}, gguf-py {want:e}",
                r.ty,
                oracle[i]
            );
        }
        seen.push(r.ty);
    }
    for ty in QUANTIZED
        .iter()
        .chain(&LOWBIT)
        .chain(&[WeightType::F16, WeightType::BF16])
    {
        if *ty == WeightType::Q8K {
            continue; // not in gguf-py
        }
        assert!(seen.contains(ty), "fixture lacks a dequantize record for {ty}");
    }
}

/// Our reference quantizers produce exactly gguf-py's (= ggml's reference)
/// bytes for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16 and BF16.
#[test]
fn quantize_matches_gguf_py_fixture() {
    let recs = read_fixture();
    let mut seen = Vec::new();
    for r in recs.iter().filter(|r| r.quantize) {
        let mut got = vec![0u8; r.stored.len()];
        quantize_row(r.ty, &r.values, &mut got).unwrap();
        let bb = r.ty.block_bytes();
        for (b, (g, w)) in got.chunks(bb).zip(r.stored.chunks(bb)).enumerate() {
            assert_eq!(
                g,
                w,
                "{} block {b}: input {:?}",
                r.ty,
                &r.values[b * r.ty.block_len()..(b + 1) * r.ty.block_len()]
            );
        }
        seen.push(r.ty);
    }
    for ty in [
        WeightType::Q4_0,
        WeightType::Q4_1,
        WeightType::Q5_0,
        WeightType::Q5_1,
        WeightType::Q8_0,
        WeightType::MXFP4,
        WeightType::F16,
        WeightType::BF16,
    ] {
        assert!(seen.contains(&ty), "fixture lacks a quantize record for {ty}");
    }
}

// -------------------------------------------------------------------- dot

/// dot_row equals an f64 dot of the oracle-decoded row with x, within
/// |a - b| <= 1e-5 · Σ|w_i x_i| + 1e-6 (f32 accumulation only), for every type.
#[test]
fn dot_row_matches_oracle_dot() {
    let mut rng = Rng(2);
    for ty in WeightType::ALL {
        for n in lengths(ty) {
            for rep in 0..3 {
                let row = if ty.is_quantized() {
                    random_row(&mut rng, ty, n)
                } else {
                    random_float_row(&mut rng, ty, n)
                };
                let x: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
                let w = oracle_row(ty, &row, n);
                let exact: f64 = w.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mag: f64 = w.iter().zip(&x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                let got = dot_row(ty, &row, &x) as f64;
                let tol = 1e-5 * mag + 1e-6;
                assert!(
                    (got - exact).abs() <= tol,
                    "{ty} n={n} rep={rep}: dot {got} vs {exact} (tol {tol})"
                );
            }
        }
    }
}

/// dot_row matches a plain sum over dequantize_row's output with special x:
/// a one-hot x picks out exactly one weight (no rounding at all).
#[test]
fn dot_row_one_hot_picks_single_weight() {
    let mut rng = Rng(3);
    for ty in WeightType::ALL {
        let n = 2 * ty.block_len().max(64) + if ty.is_quantized() { 0 } else { 3 };
        let row = if ty.is_quantized() {
            random_row(&mut rng, ty, n)
        } else {
            random_float_row(&mut rng, ty, n)
        };
        let mut w = vec![0.0; n];
        dequantize_row(ty, &row, &mut w);
        for _ in 0..20 {
            let k = rng.below(n);
            let mut x = vec![0.0f32; n];
            x[k] = 1.0;
            assert_eq!(dot_row(ty, &row, &x), w[k], "{ty} one-hot at {k}");
        }
    }
}

// -------------------------------------------------------------- quantize

/// Test inputs: several "styles" of data, `n` values each.
fn quant_inputs(rng: &mut Rng, n: usize, style: usize) -> Vec<f32> {
    let amp = 10f32.powf(rng.uniform(-3.0, 2.0));
    match style {
        // row-wide normal
        0 => (0..n).map(|_| rng.normal() * amp).collect(),
        // per-32 chunk amplitude and offset (all-positive / all-negative chunks)
        1 => {
            let mut v = Vec::with_capacity(n);
            while v.len() < n {
                let a = 10f32.powf(rng.uniform(-4.0, 2.0));
                let off = a * rng.uniform(-2.0, 2.0);
                for _ in 0..32 {
                    v.push(off + a * rng.uniform(-1.0, 1.0));
                }
            }
            v.truncate(n);
            v
        }
        // sparse spikes on zeros
        2 => (0..n)
            .map(|_| if rng.below(10) == 0 { rng.normal() * amp } else { 0.0 })
            .collect(),
        // tiny values (scales in f16's subnormal range)
        _ => (0..n).map(|_| rng.normal() * 1e-7).collect(),
    }
}

/// Quantize then dequantize; returns the decoded row and the stored bytes.
fn round_trip(ty: WeightType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut q = vec![0u8; ty.row_bytes(x.len()).unwrap()];
    quantize_row(ty, x, &mut q).unwrap_or_else(|e| panic!("{ty}: {e}"));
    let mut y = vec![0.0; x.len()];
    dequantize_row(ty, &q, &mut y);
    (q, y)
}

/// Per-element round-trip bound for the legacy formats, derived from ggml's
/// scale choice: the stored scale must be f16(d_ref) and the error at most
/// half a step, plus the f16 rounding of the scale/min, plus the clipped
/// top level of the symmetric formats (which can cost up to one step).
fn check_legacy_block(ty: WeightType, x: &[f32], block: &[u8], y: &[f32], ctx: &str) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let slack = 1e-6 * amax;
    let d16 = f16_at(block, 0);
    match ty {
        WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => {
            let (levels_below, top): (f32, f32) = match ty {
                WeightType::Q4_0 => (8.0, 7.0),
                WeightType::Q5_0 => (16.0, 15.0),
                _ => (127.0, 127.0),
            };
            let d = if ty == WeightType::Q8_0 {
                amax / 127.0
            } else {
                let signed = x.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0);
                signed / -levels_below
            };
            assert_eq!(d16.to_bits(), f16::from_f32(d).to_f32().to_bits(), "{ctx}: scale");
            for (i, (&xv, &yv)) in x.iter().zip(y).enumerate() {
                let t = if d != 0.0 { xv / d } else { 0.0 };
                let clip = if ty == WeightType::Q8_0 {
                    0.0
                } else {
                    (t - (top + 0.5)).max(0.0)
                };
                let allowed = d.abs() * (0.5 + clip) + levels_below * (d - d16).abs() + slack;
                assert!(
                    (xv - yv).abs() <= allowed,
                    "{ctx} elem {i}: {xv} -> {yv}, allowed {allowed}"
                );
            }
        }
        _ => {
            let levels = if ty == WeightType::Q4_1 { 15.0 } else { 31.0 };
            let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (hi - lo) / levels;
            let m16 = f16_at(block, 2);
            assert_eq!(d16.to_bits(), f16::from_f32(d).to_f32().to_bits(), "{ctx}: scale");
            assert_eq!(m16, f16::from_f32(lo).to_f32(), "{ctx}: min");
            for (i, (&xv, &yv)) in x.iter().zip(y).enumerate() {
                let allowed = 0.5 * d + levels * (d - d16).abs() + (lo - m16).abs() + slack;
                assert!(
                    (xv - yv).abs() <= allowed,
                    "{ctx} elem {i}: {xv} -> {yv}, allowed {allowed}"
                );
            }
        }
    }
}

/// K-quants: each element is within half a *stored* sub-block step of the
/// input (so the stored range covers every input), plus f32 rounding.
/// Returns the largest error seen.
fn check_kquant_block(ty: WeightType, x: &[f32], block: &[u8], y: &[f32], ctx: &str) -> f32 {
    let mut worst = 0.0f32;
    for (i, (&xv, &yv)) in x.iter().zip(y).enumerate() {
        let (step, shift, levels) = match ty {
            WeightType::Q6K => (f16_at(block, 208) * q6k_scale(block, i / 16) as f32, 0.0, 32.0),
            _ => {
                let (sc, mn) = kq_scale_min(block, i / 32);
                let levels = if ty == WeightType::Q4K { 15.0 } else { 31.0 };
                (f16_at(block, 0) * sc as f32, f16_at(block, 2) * mn as f32, levels)
            }
        };
        assert!(step >= 0.0, "{ctx} elem {i}: negative step {step}");
        let allowed = 0.5 * step + 4.0 * f32::EPSILON * (xv.abs() + shift + levels * step) + 1e-30;
        let err = (xv - yv).abs();
        assert!(
            err <= allowed,
            "{ctx} elem {i}: {xv} -> {yv}, step {step}, allowed {allowed}"
        );
        worst = worst.max(err);
    }
    worst
}

/// quantize_row → dequantize_row stays within each format's step, for every
/// quantized type, several data styles and row lengths.
#[test]
fn quantize_round_trip_within_step() {
    let mut rng = Rng(4);
    for ty in QUANTIZED {
        for blocks in [1, 3, 8] {
            let n = blocks * ty.block_len();
            for style in 0..4 {
                for rep in 0..3 {
                    let x = quant_inputs(&mut rng, n, style);
                    let (q, y) = round_trip(ty, &x);
                    let (bl, bb) = (ty.block_len(), ty.block_bytes());
                    for b in 0..blocks {
                        let ctx = format!("{ty} n={n} style={style} rep={rep} block {b}");
                        let (xs, ys, blk) = (
                            &x[b * bl..(b + 1) * bl],
                            &y[b * bl..(b + 1) * bl],
                            &q[b * bb..(b + 1) * bb],
                        );
                        if matches!(ty, WeightType::Q4K | WeightType::Q5K | WeightType::Q6K) {
                            check_kquant_block(ty, xs, blk, ys, &ctx);
                        } else {
                            check_legacy_block(ty, xs, blk, ys, &ctx);
                        }
                    }
                }
            }
        }
    }
}

/// The K-quant scale choice is not wasteful: on uniform data in [-a, a] the
/// worst error stays below 0.6 of an ideal step 2a / levels.
#[test]
fn kquant_round_trip_is_tight_on_uniform_data() {
    let mut rng = Rng(5);
    for (ty, levels) in [
        (WeightType::Q4K, 15.0),
        (WeightType::Q5K, 31.0),
        (WeightType::Q6K, 63.0),
    ] {
        for rep in 0..20 {
            let a = 10f32.powf(rng.uniform(-3.0, 3.0));
            let x: Vec<f32> = (0..4 * 256).map(|_| rng.uniform(-a, a)).collect();
            let (_, y) = round_trip(ty, &x);
            let worst = x.iter().zip(&y).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            let limit = 0.6 * 2.0 * a / levels;
            assert!(worst <= limit, "{ty} rep={rep} a={a}: worst error {worst} > {limit}");
        }
    }
}

/// Hand-made edge cases: zeros and constants, mixed magnitudes inside one
/// super-block, non-finite input, scale overflow, bad lengths.
#[test]
fn quantize_edge_cases() {
    for ty in QUANTIZED {
        let n = 2 * ty.block_len();
        let (_, y) = round_trip(ty, &vec![0.0; n]);
        assert!(y.iter().all(|&v| v == 0.0), "{ty}: zeros must stay zero");

        for c in [1.0f32, -2.5, 1e-3, 300.0] {
            let x = vec![c; n];
            let (q, y) = round_trip(ty, &x);
            for (b, blk) in q.chunks(ty.block_bytes()).enumerate() {
                let r = b * ty.block_len()..(b + 1) * ty.block_len();
                let ctx = format!("{ty} constant {c}");
                if matches!(ty, WeightType::Q4K | WeightType::Q5K | WeightType::Q6K) {
                    check_kquant_block(ty, &x[r.clone()], blk, &y[r], &ctx);
                } else {
                    check_legacy_block(ty, &x[r.clone()], blk, &y[r], &ctx);
                }
            }
        }

        // Sub-blocks of wildly different magnitude in one (super-)block.
        let mut rng = Rng(6);
        let x: Vec<f32> = (0..n)
            .map(|i| rng.uniform(-1.0, 1.0) * if (i / 16) % 3 == 0 { 1e3 } else { 1e-4 })
            .collect();
        let (q, y) = round_trip(ty, &x);
        for (b, blk) in q.chunks(ty.block_bytes()).enumerate() {
            let r = b * ty.block_len()..(b + 1) * ty.block_len();
            let ctx = format!("{ty} mixed magnitudes");
            if matches!(ty, WeightType::Q4K | WeightType::Q5K | WeightType::Q6K) {
                check_kquant_block(ty, &x[r.clone()], blk, &y[r], &ctx);
            } else {
                check_legacy_block(ty, &x[r.clone()], blk, &y[r], &ctx);
            }
        }

        let mut dst = vec![0u8; ty.row_bytes(n).unwrap()];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = vec![0.5f32; n];
            x[n / 2 + 1] = bad;
            assert!(quantize_row(ty, &x, &mut dst).is_err(), "{ty}: {bad} must be rejected");
        }
        assert!(
            quantize_row(ty, &vec![1e30; n], &mut dst).is_err(),
            "{ty}: f16 scale overflow must be rejected"
        );
        assert!(
            quantize_row(ty, &vec![-1e30; n], &mut dst).is_err(),
            "{ty}: f16 scale overflow must be rejected"
        );
        assert!(
            quantize_row(ty, &vec![0.0; n + 1], &mut dst).is_err(),
            "{ty}: partial block"
        );
        assert!(
            quantize_row(ty, &vec![0.0; n], &mut dst[1..]).is_err(),
            "{ty}: short dst"
        );
        let mut long = vec![0u8; dst.len() + 1];
        assert!(quantize_row(ty, &vec![0.0; n], &mut long).is_err(), "{ty}: long dst");
    }
}

/// F32 round-trips bit-exactly; F16 and BF16 store exactly half's
/// round-to-nearest-even conversion and decode exactly half's widening.
#[test]
fn float_quantize_is_bit_exact_with_half() {
    let mut rng = Rng(7);
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        65519.99,
        65520.0,
        1e30,
        -1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        6e-8,
        3e-8,
        1e-40,
        -1e-40,
        f32::MAX,
        f32::MIN_POSITIVE,
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
    ];
    while x.len() < 1000 {
        x.push(f32::from_bits(rng.next_u64() as u32));
        x.push(rng.normal() * 10f32.powf(rng.uniform(-10.0, 6.0)));
    }
    for ty in [WeightType::F32, WeightType::F16, WeightType::BF16] {
        for n in [0, 1, 63, 64, 65, x.len()] {
            let (q, y) = round_trip(ty, &x[..n]);
            for (i, &v) in x[..n].iter().enumerate() {
                let (want_bits, back): (u32, f32) = match ty {
                    WeightType::F32 => (v.to_bits(), v),
                    WeightType::F16 => (f16::from_f32(v).to_bits() as u32, f16::from_f32(v).to_f32()),
                    _ => (bf16::from_f32(v).to_bits() as u32, bf16::from_f32(v).to_f32()),
                };
                let stored = bits(&q, i * 8 * ty.block_bytes(), 8 * ty.block_bytes());
                assert_eq!(stored, want_bits, "{ty} elem {i} ({v:e}) stored bits");
                assert!(same(y[i], back), "{ty} elem {i} ({v:e}): decoded {} vs {back}", y[i]);
                if !v.is_nan() && ty == WeightType::F32 {
                    assert_eq!(y[i].to_bits(), v.to_bits());
                }
            }
        }
    }
}

// ----------------------------------------------------------- type table

#[test]
fn type_table_and_row_bytes() {
    // (type, ggml id, name, block_len, block_bytes, quantized)
    let table = [
        (WeightType::F32, 0, "F32", 1, 4, false),
        (WeightType::F16, 1, "F16", 1, 2, false),
        (WeightType::BF16, 30, "BF16", 1, 2, false),
        (WeightType::Q4_0, 2, "Q4_0", 32, 18, true),
        (WeightType::Q4_1, 3, "Q4_1", 32, 20, true),
        (WeightType::Q5_0, 6, "Q5_0", 32, 22, true),
        (WeightType::Q5_1, 7, "Q5_1", 32, 24, true),
        (WeightType::Q8_0, 8, "Q8_0", 32, 34, true),
        (WeightType::Q4K, 12, "Q4_K", 256, 144, true),
        (WeightType::Q5K, 13, "Q5_K", 256, 176, true),
        (WeightType::Q6K, 14, "Q6_K", 256, 210, true),
        (WeightType::Q2K, 10, "Q2_K", 256, 84, true),
        (WeightType::Q3K, 11, "Q3_K", 256, 110, true),
        (WeightType::Q8K, 15, "Q8_K", 256, 292, true),
        (WeightType::IQ4NL, 20, "IQ4_NL", 32, 18, true),
        (WeightType::IQ4XS, 23, "IQ4_XS", 256, 136, true),
        (WeightType::MXFP4, 39, "MXFP4", 32, 17, true),
    ];
    assert_eq!(table.len(), WeightType::ALL.len());
    for (i, &(ty, id, name, bl, bb, quantized)) in table.iter().enumerate() {
        assert_eq!(WeightType::ALL[i], ty, "ALL order");
        assert_eq!(ty.ggml_id(), id, "{name} id");
        assert_eq!(WeightType::from_ggml(id), Some(ty), "{name} from id");
        assert_eq!(ty.name(), name);
        assert_eq!(ty.to_string(), name);
        assert_eq!(ty.block_len(), bl, "{name} block_len");
        assert_eq!(ty.block_bytes(), bb, "{name} block_bytes");
        assert_eq!(ty.is_quantized(), quantized, "{name} is_quantized");

        assert_eq!(ty.row_bytes(0), Some(0));
        assert_eq!(ty.row_bytes(bl), Some(bb));
        assert_eq!(ty.row_bytes(4096), Some(4096 / bl * bb), "{name} row of 4096");
        assert_eq!(ty.row_bytes(14336), Some(14336 / bl * bb), "{name} row of 14336");
        if bl > 1 {
            for n in [1, bl - 1, bl + 1, 3 * bl + 7, usize::MAX] {
                assert_eq!(ty.row_bytes(n), None, "{name} row of {n} is not whole blocks");
            }
        }
        // Overflow is possible only where a block has more bytes than elements.
        let huge = usize::MAX / bl * bl;
        if bb > bl {
            let fits = usize::MAX / bb * bl;
            assert_eq!(
                ty.row_bytes(fits),
                Some(usize::MAX / bb * bb),
                "{name}: largest fitting row"
            );
            assert_eq!(ty.row_bytes(fits + bl), None, "{name}: first overflowing row");
            assert_eq!(ty.row_bytes(huge), None, "{name}: overflow must be None");
        } else {
            assert_eq!(ty.row_bytes(huge), Some(huge / bl * bb), "{name}: largest row fits");
        }
    }
    for id in (0..64).chain([100, 1000, u32::MAX]) {
        match WeightType::from_ggml(id) {
            Some(ty) => assert_eq!(ty.ggml_id(), id),
            None => assert!(!table.iter().any(|t| t.1 == id), "id {id} should be known"),
        }
    }
    for unknown in [4, 5, 9, 16, 17, 18, 19, 21, 22, 29, 31, 40, u32::MAX] {
        assert_eq!(WeightType::from_ggml(unknown), None, "id {unknown}");
    }
}

#[test]
#[should_panic(expected = "Q4_0 row of 32 elements must be Some(18) bytes, got 17")]
fn dequantize_row_panics_on_length_mismatch() {
    let mut out = vec![0.0; 32];
    dequantize_row(WeightType::Q4_0, &[0u8; 17], &mut out);
}

#[test]
#[should_panic(expected = "Q8_0 row of 31 elements must be None bytes, got 34")]
fn dot_row_panics_on_length_mismatch() {
    dot_row(WeightType::Q8_0, &[0u8; 34], &[0.0; 31]);
}

// ------------------------------------------------------ low-bit types

/// The oracle itself on hand-built blocks of the later types.
#[test]
fn oracle_decodes_hand_built_lowbit_blocks() {
    // Q2_K, d = 1, dmin = 0.5; sub-block 11 (n = 1, j = 1, upper 16): scale 5, min 3.
    // Element 128 + 32 + 20 = 180 has its 2 bits at bits 2,3 of qs[32 + 20].
    let mut b = vec![0u8; 84];
    b[80..82].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
    b[82..84].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
    b[11] = 0x35;
    b[16 + 32 + 20] = 0b10 << 2;
    let v = oracle_row(WeightType::Q2K, &b, 256);
    assert_eq!((v[180], v[181]), (5.0 * 2.0 - 1.5, -1.5));

    // Q3_K, d = 2; sub-block 9 scale u = 0b10_0110 = 38 (-> 6): low nibble is the high
    // nibble of scales[1], top bits are bits 4,5 of scales[8 + 1]. Element 150
    // (n = 1, j = 0, l = 22): low bits 3 at bits 0,1 of qs[32 + 22]; high bit
    // (bit 4 of hmask[22]) clear -> 3 - 4 = -1. Element 151: high bit set, low 1 -> 1.
    let mut b = vec![0u8; 110];
    b[108..110].copy_from_slice(&f16::from_f32(2.0).to_bits().to_le_bytes());
    b[96 + 1] = 0x60;
    b[96 + 9] = 0b10 << 4;
    b[32 + 32 + 22] = 3;
    b[32 + 32 + 23] = 1;
    b[23] = 1 << 4;
    let v = oracle_row(WeightType::Q3K, &b, 256);
    assert_eq!((v[150], v[151]), (-12.0, 12.0)); // d · 6 · (∓1)

    // IQ4_XS, d = 0.5; sub-block 3 scale u = 0b01_1111 = 31 (-> -1): low nibble is
    // the high nibble of scales_l[1], top bits are bits 6,7 of scales_h.
    // Element 96 + 16 + 2 = 114: high nibble of qs[48 + 2] = 15 -> 113.
    let mut b = vec![0u8; 136];
    b[0..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
    b[2] = 0b01 << 6;
    b[4 + 1] = 0xF0;
    b[8 + 48 + 2] = 0xF0;
    let v = oracle_row(WeightType::IQ4XS, &b, 256);
    assert_eq!((v[114], v[98]), (-0.5 * 113.0, -0.5 * -127.0));

    // MXFP4, e = 128 (scale 2): code 0xD = -(index 5 = 3) -> -6; code 8 -> +0.
    let mut b = vec![0u8; 17];
    b[0] = 128;
    b[1 + 4] = 0x8D;
    let v = oracle_row(WeightType::MXFP4, &b, 32);
    assert_eq!((v[4], v[20].to_bits(), v[0]), (-6.0, 0, 0.0));
}

/// For a codebook type: element `i` of `block` decodes to one of its candidate
/// values, and that one is (one of) the nearest to `x[i]`. Returns the
/// sub-scale each element was decoded with.
fn assert_nearest(ty: WeightType, x: &[f32], block: &[u8], y: &[f32], ctx: &str) -> Vec<f32> {
    let mut scales = Vec::new();
    for (i, (&xv, &yv)) in x.iter().zip(y).enumerate() {
        let cands: Vec<f32> = match ty {
            WeightType::IQ4NL => IQ4_LEVELS.iter().map(|&k| f16_at(block, 0) * k as f32).collect(),
            WeightType::IQ4XS => {
                let dl = f16_at(block, 0) * (iq4xs_scale(block, i / 32) as i32 - 32) as f32;
                IQ4_LEVELS.iter().map(|&k| dl * k as f32).collect()
            }
            _ => (0..16).map(|c| mxfp4_value(bits(block, 0, 8), c)).collect(),
        };
        scales.push(match ty {
            WeightType::IQ4NL => f16_at(block, 0),
            WeightType::IQ4XS => f16_at(block, 0) * (iq4xs_scale(block, i / 32) as i32 - 32) as f32,
            _ => mxfp4_value(bits(block, 0, 8), 1),
        });
        assert!(cands.contains(&yv), "{ctx} elem {i}: {yv} is no codebook value");
        let best = cands.iter().fold(f32::INFINITY, |m, &c| m.min((xv - c).abs()));
        assert!(
            (xv - yv).abs() <= best,
            "{ctx} elem {i}: {xv} -> {yv}, but a codebook value is {best} away"
        );
    }
    scales
}

/// Round-trip bounds of the later types' quantizers on one block.
fn check_lowbit_block(ty: WeightType, x: &[f32], block: &[u8], y: &[f32], ctx: &str) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let slop = |v: f32| 4.0 * f32::EPSILON * v + 1e-30;
    match ty {
        WeightType::Q2K => {
            // Asymmetric levels 0..=3: within half a stored step (the stored range covers the sub-block).
            for (i, (&xv, &yv)) in x.iter().zip(y).enumerate() {
                let s = i / 16;
                let step = f16_at(block, 80) * bits(block, s * 8, 4) as f32;
                let shift = f16_at(block, 82) * bits(block, s * 8 + 4, 4) as f32;
                let allowed = 0.5 * step + slop(xv.abs() + shift + 3.0 * step);
                assert!(
                    (xv - yv).abs() <= allowed,
                    "{ctx} elem {i}: {xv} -> {yv}, allowed {allowed}"
                );
            }
        }
        WeightType::Q3K => {
            // Signed levels -4..=3 with the largest element at -4: half a step,
            // except values past level 3.5 on the other side, clipped to 3.
            for (i, (&xv, &yv)) in x.iter().zip(y).enumerate() {
                let step = f16_at(block, 108) * (q3k_scale(block, i / 16) as i32 - 32) as f32;
                let t = if step != 0.0 { xv / step } else { 0.0 };
                assert!(t.abs() <= 4.0 * (1.0 + 1e-6), "{ctx} elem {i}: {xv} is {t} steps out");
                let allowed = step.abs() * (0.5 + (t - 3.5).max(0.0)) + slop(xv.abs() + 4.0 * step.abs());
                assert!(
                    (xv - yv).abs() <= allowed,
                    "{ctx} elem {i}: {xv} -> {yv}, allowed {allowed}"
                );
            }
        }
        WeightType::Q8K => {
            let d = f32::from_bits(bits(block, 0, 32));
            assert_eq!(d, amax / 127.0, "{ctx}: scale");
            for (k, q16) in block[4..260].chunks(16).enumerate() {
                let want: i32 = q16.iter().map(|&b| b as i8 as i32).sum();
                assert_eq!(
                    bits(block, (260 + 2 * k) * 8, 16) as u16 as i16 as i32,
                    want,
                    "{ctx}: sum {k}"
                );
            }
            for (i, (&xv, &yv)) in x.iter().zip(y).enumerate() {
                let allowed = 0.5 * d + slop(xv.abs());
                assert!(
                    (xv - yv).abs() <= allowed,
                    "{ctx} elem {i}: {xv} -> {yv}, allowed {allowed}"
                );
            }
        }
        WeightType::IQ4NL | WeightType::IQ4XS => {
            let scales = assert_nearest(ty, x, block, y, ctx);
            let group = 32;
            for (g, (xs, ss)) in x.chunks(group).zip(scales.chunks(group)).enumerate() {
                let gmax = xs.iter().fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let dl = ss[0];
                // The scale covers the group (its largest element fits at -127) and is
                // not much larger than needed: f16 rounding (IQ4_NL) or one super-scale
                // unit (IQ4_XS).
                let need = gmax.abs() / 127.0;
                assert!(dl.abs() >= need * (1.0 - 1e-6), "{ctx} group {g}: scale {dl} < {need}");
                let spare = if ty == WeightType::IQ4NL {
                    need * 2f32.powi(-10) + 2f32.powi(-24)
                } else {
                    f16_at(block, 0)
                };
                assert!(
                    dl.abs() <= need + spare * (1.0 + 1e-6),
                    "{ctx} group {g}: scale {dl} > {need} + {spare}"
                );
                if gmax != 0.0 {
                    assert!(dl * gmax < 0.0, "{ctx} group {g}: the largest element must map to -127");
                }
                // Hence (the codebook's gaps are at most 24, and the far end 113 is 14
                // short of 127): every element within 14 sub-scale units.
                for (i, (&xv, &yv)) in xs.iter().zip(&y[g * group..]).enumerate() {
                    let allowed = 14.0 * dl.abs() + slop(xv.abs());
                    assert!((xv - yv).abs() <= allowed, "{ctx} elem {}: {xv} -> {yv}", g * group + i);
                }
            }
        }
        _ => {
            assert_nearest(ty, x, block, y, ctx);
            // Shared exponent: the largest element is in [4, 8) units of 2^(e-127).
            let e = bits(block, 0, 8) as i32;
            if amax > 0.0 {
                let unit = 2f64.powi(e - 127);
                let r = amax as f64 / unit;
                assert!((4.0..8.0).contains(&r), "{ctx}: e = {e}, amax = {amax} is {r} units");
            } else {
                assert_eq!(e, 0, "{ctx}: zero block");
            }
        }
    }
}

fn check_lowbit_row(ty: WeightType, x: &[f32], ctx: &str) -> Vec<f32> {
    let (q, y) = round_trip(ty, x);
    let (bl, bb) = (ty.block_len(), ty.block_bytes());
    for (b, blk) in q.chunks(bb).enumerate() {
        let r = b * bl..(b + 1) * bl;
        check_lowbit_block(ty, &x[r.clone()], blk, &y[r], &format!("{ctx} block {b}"));
    }
    y
}

/// quantize_row → dequantize_row of the later types meets each one's bound
/// (half a step; nearest codebook value with a covering scale; MXFP4's
/// reference exponent) on every data style.
#[test]
fn lowbit_quantize_round_trip_within_bounds() {
    let mut rng = Rng(40);
    for ty in LOWBIT {
        for blocks in [1, 3, 8] {
            let n = blocks * ty.block_len();
            for style in 0..4 {
                for rep in 0..3 {
                    let x = quant_inputs(&mut rng, n, style);
                    check_lowbit_row(ty, &x, &format!("{ty} n={n} style={style} rep={rep}"));
                }
            }
        }
    }
}

/// Scale choices are not wasteful: on uniform data in [-a, a] the worst Q2_K
/// error stays below 0.6 of an ideal step 2a/3, Q3_K's below 1.05 of its
/// signed step a/4 (one step for the clipped top level, plus scale rounding).
#[test]
fn lowbit_kquant_round_trip_is_tight_on_uniform_data() {
    let mut rng = Rng(41);
    for rep in 0..20 {
        let a = 10f32.powf(rng.uniform(-3.0, 3.0));
        let x: Vec<f32> = (0..4 * 256).map(|_| rng.uniform(-a, a)).collect();
        for (ty, limit) in [
            (WeightType::Q2K, 0.6 * 2.0 * a / 3.0),
            (WeightType::Q3K, 1.05 * a / 4.0),
        ] {
            let (_, y) = round_trip(ty, &x);
            let worst = x.iter().zip(&y).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= limit, "{ty} rep={rep} a={a}: worst error {worst} > {limit}");
        }
    }
}

/// The IQ4 codebook is worth having: on normal data IQ4_NL's RMS error is
/// below Q4_0's (same 4.5 bits per weight, uniform levels).
#[test]
fn iq4nl_beats_q4_0_on_normal_data() {
    let mut rng = Rng(42);
    let x: Vec<f32> = (0..32 * 512).map(|_| rng.normal()).collect();
    let rms = |ty| {
        let (_, y) = round_trip(ty, &x);
        (x.iter().zip(&y).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
    };
    let (nl, q40) = (rms(WeightType::IQ4NL), rms(WeightType::Q4_0));
    println!("RMS error on N(0,1): IQ4_NL {nl:.5}, Q4_0 {q40:.5}");
    assert!(nl < q40, "IQ4_NL {nl} vs Q4_0 {q40}");
}

/// Zeros, constants, mixed magnitudes, non-finite input, scale overflow and bad
/// lengths for the later types.
#[test]
fn lowbit_quantize_edge_cases() {
    for ty in LOWBIT {
        let n = 2 * ty.block_len().max(64);
        let (_, y) = round_trip(ty, &vec![0.0; n]);
        assert!(y.iter().all(|&v| v == 0.0), "{ty}: zeros must stay zero");
        for c in [1.0f32, -2.5, 1e-3, 300.0, 0.75] {
            check_lowbit_row(ty, &vec![c; n], &format!("{ty} constant {c}"));
        }
        let mut rng = Rng(43);
        let x: Vec<f32> = (0..n)
            .map(|i| rng.uniform(-1.0, 1.0) * if (i / 16) % 3 == 0 { 1e3 } else { 1e-4 })
            .collect();
        check_lowbit_row(ty, &x, &format!("{ty} mixed magnitudes"));

        let mut dst = vec![0u8; ty.row_bytes(n).unwrap()];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = vec![0.5f32; n];
            x[n / 2 + 1] = bad;
            assert!(quantize_row(ty, &x, &mut dst).is_err(), "{ty}: {bad} must be rejected");
        }
        for big in [1e30f32, -1e30] {
            let r = quantize_row(ty, &vec![big; n], &mut dst);
            if matches!(ty, WeightType::Q8K | WeightType::MXFP4) {
                // f32 / E8M0 scales hold these.
                assert!(r.is_ok(), "{ty}: {big}");
                check_lowbit_row(ty, &vec![big; n], &format!("{ty} {big}"));
            } else {
                assert!(r.is_err(), "{ty}: f16 scale overflow must be rejected");
            }
        }
        assert!(
            quantize_row(ty, &vec![0.0; n + 1], &mut dst).is_err(),
            "{ty}: partial block"
        );
        assert!(
            quantize_row(ty, &vec![0.0; n], &mut dst[1..]).is_err(),
            "{ty}: short dst"
        );
    }
}
