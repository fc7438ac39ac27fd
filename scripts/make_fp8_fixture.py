#!/usr/bin/env python3
"""Make a tiny fine-grained FP8 checkpoint, and its exact f32 reference, from a parity
fixture (tests/fixtures/parity/<name>).

Every 2-D linear weight (`*_proj.weight`, expert `w1/w2/w3`) except those listed in
--keep (left as stored, and named in modules_to_not_convert) is quantized as the
released FP8 checkpoints are: per 128x128 block, scale = amax / 448, each element
w / scale rounded to the nearest E4M3 value (ties to the even code). Writes

  <out>/<name>_fp8/   config.json with quantization_config {quant_method: fp8,
                      fmt: e4m3, activation_scheme: dynamic, weight_block_size:
                      [128, 128], modules_to_not_convert}, model.safetensors with
                      each quantized weight as F8_E4M3 plus `X.weight_scale_inv` F32
  <out>/<name>_fp8_ref/  the same model with each quantized weight replaced by its
                      exact dequantized values (code value * scale, in f32), as F32

Standard library only (no numpy / torch): the files are small.

  python3 scripts/make_fp8_fixture.py --src tests/fixtures/parity/qwen3 --out tests/fixtures/fp8
  python3 scripts/make_fp8_fixture.py --src tests/fixtures/parity/qwen3 --out tests/fixtures/fp8 \
      --name qwen3_b32x48 --block 32,48 --keep ""

The second uses small, uneven blocks (several per matrix, partial ones at the edges)
and quantizes lm_head too, so block indexing is exercised on a 64-wide model.

--fuse-experts first stores a MoE model's per-expert matrices the way transformers 5
does, as fused 3-D parameters: `mlp.experts.gate_up_proj` [experts, 2*ffn, hidden]
(each expert's gate rows, then its up rows) and `mlp.experts.down_proj` [experts,
hidden, ffn]. Each expert's slice is quantized as a 2-D weight is, and the scales are
`X_scale_inv` [experts, ceil(rows/bo), ceil(cols/bi)] (transformers' FP8 experts):

  python3 scripts/make_fp8_fixture.py --src tests/fixtures/parity/qwen3_moe --out tests/fixtures/fp8 \
      --name qwen3_moe_b16 --block 16,16
  python3 scripts/make_fp8_fixture.py --src tests/fixtures/parity/qwen3_moe --out tests/fixtures/fp8 \
      --name qwen3_moe_fused_b16 --block 16,16 --fuse-experts

With 16-row blocks (ffn = 16) no block spans a gate and an up row, so the fused
checkpoint holds exactly the codes and scales of the per-expert one.
"""

import argparse
import bisect
import json
import math
import os
import re
import shutil
import struct
from array import array

BLOCK = [128, 128]
E4M3_MAX = 448.0


def e4m3_value(code):
    """The value of an E4M3 code from the format's definition (NaN for S.1111.111)."""
    s = -1.0 if code & 0x80 else 1.0
    e = (code >> 3) & 0xF
    m = code & 7
    if e == 15 and m == 7:
        return math.nan
    if e == 0:
        return s * (m / 8.0) * 2.0**-6
    return s * (1.0 + m / 8.0) * 2.0 ** (e - 7)


# Non-negative finite codes 0x00..0x7E are increasing in value.
POS_CODES = list(range(0x7F))
POS_VALUES = [e4m3_value(c) for c in POS_CODES]


def to_e4m3(x):
    """Nearest E4M3 code to x (|x| <= 448 here), ties to the even code."""
    a = min(abs(x), E4M3_MAX)
    i = bisect.bisect_left(POS_VALUES, a)
    if i == len(POS_VALUES):
        c = 0x7E
    elif POS_VALUES[i] == a or i == 0:
        c = i
    else:
        lo, hi = POS_VALUES[i - 1], POS_VALUES[i]
        if a - lo < hi - a:
            c = i - 1
        elif hi - a < a - lo:
            c = i
        else:
            c = i - 1 if (i - 1) % 2 == 0 else i
    if x < 0 and c != 0:
        c |= 0x80
    return c


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    meta = header.pop("__metadata__", None)
    tensors = {}
    for name, t in header.items():
        a, b = t["data_offsets"]
        tensors[name] = (t["dtype"], t["shape"], body[a:b])
    return tensors, meta


def write_safetensors(path, tensors, meta=None):
    header = {}
    if meta:
        header["__metadata__"] = meta
    off = 0
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name in sorted(tensors):
            f.write(tensors[name][2])


def quantize(shape, raw):
    """Returns (codes bytes, scales [sr, sc] list of f32, dequantized f32 array)."""
    rows, cols = shape
    bo, bi = BLOCK
    w = array("f")
    w.frombytes(raw)
    sr, sc = -(-rows // bo), -(-cols // bi)
    scales = []
    for br in range(sr):
        for bc in range(sc):
            amax = 0.0
            for r in range(br * bo, min(rows, (br + 1) * bo)):
                for c in range(bc * bi, min(cols, (bc + 1) * bi)):
                    amax = max(amax, abs(w[r * cols + c]))
            scales.append(f32(amax / E4M3_MAX) if amax > 0 else 1.0)
    codes = bytearray(rows * cols)
    deq = array("f", bytes(4 * rows * cols))
    for r in range(rows):
        for c in range(cols):
            s = scales[(r // bo) * sc + c // bi]
            code = to_e4m3(w[r * cols + c] / s)
            codes[r * cols + c] = code
            # The exact product (a 4-bit significand times an f32) rounded once to f32,
            # as ffai computes it.
            deq[r * cols + c] = f32(e4m3_value(code) * s)
    return bytes(codes), [sr, sc], array("f", scales), deq


LINEAR = re.compile(r"(_proj|\.w[123]|lm_head)\.weight$")
FUSED = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def fuse_experts(tensors):
    """Replaces per-expert `P.E.{gate,up,down}_proj.weight` by transformers 5's fused
    `P.gate_up_proj` [E, 2*ffn, hidden] (gate rows first) and `P.down_proj` [E, hidden, ffn]."""
    groups = {}
    for tname in list(tensors):
        m = PER_EXPERT.match(tname)
        if m:
            groups.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = tensors.pop(tname)
    for prefix, parts in groups.items():
        n = 1 + max(e for e, _ in parts)
        gate_up, down = b"", b""
        for e in range(n):
            (dg, sg, rg), (du, su, ru), (dd, sd, rd) = (parts[(e, k)] for k in ("gate", "up", "down"))
            assert dg == du == dd == "F32" and sg == su, (prefix, e)
            gate_up += rg + ru
            down += rd
        tensors[prefix + ".gate_up_proj"] = ("F32", [n, 2 * sg[0], sg[1]], gate_up)
        tensors[prefix + ".down_proj"] = ("F32", [n] + sd, down)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--keep", default="lm_head", help="comma-separated modules left unquantized")
    ap.add_argument("--block", default="128,128", help="scale block: rows,cols")
    ap.add_argument("--name", help="output name (default: the source directory's)")
    ap.add_argument("--fuse-experts", action="store_true", help="store experts as fused 3-D parameters")
    args = ap.parse_args()
    BLOCK[:] = [int(b) for b in args.block.split(",")]
    name = args.name or os.path.basename(os.path.normpath(args.src))
    keep = [k for k in args.keep.split(",") if k]
    tensors, meta = read_safetensors(os.path.join(args.src, "model.safetensors"))
    if args.fuse_experts:
        fuse_experts(tensors)
    fp8, ref = {}, {}
    quantized = []
    for tname, (dtype, shape, raw) in tensors.items():
        base = tname[: -len(".weight")] if tname.endswith(".weight") else tname
        if FUSED.search(tname) and len(shape) == 3 and not any(base.endswith("." + k) for k in keep):
            # One 2-D quantization per expert, stacked.
            assert dtype == "F32", f"{tname}: {dtype}"
            n, rows, cols = shape
            per = 4 * rows * cols
            codes, scales, deq = b"", array("f"), array("f")
            for e in range(n):
                c, sshape, s, d = quantize([rows, cols], raw[e * per : (e + 1) * per])
                codes += c
                scales += s
                deq += d
            fp8[tname] = ("F8_E4M3", shape, codes)
            fp8[tname + "_scale_inv"] = ("F32", [n] + sshape, scales.tobytes())
            ref[tname] = ("F32", shape, deq.tobytes())
            quantized.append(tname)
        elif LINEAR.search(tname) and len(shape) == 2 and not any(base == k or base.endswith("." + k) for k in keep):
            assert dtype == "F32", f"{tname}: {dtype}"
            codes, sshape, scales, deq = quantize(shape, raw)
            fp8[tname] = ("F8_E4M3", shape, codes)
            fp8[base + ".weight_scale_inv"] = ("F32", sshape, scales.tobytes())
            ref[tname] = ("F32", shape, deq.tobytes())
            quantized.append(tname)
        else:
            fp8[tname] = (dtype, shape, raw)
            ref[tname] = (dtype, shape, raw)
    with open(os.path.join(args.src, "config.json")) as f:
        config = json.load(f)
    for sub, ts, qc in [
        (f"{name}_fp8", fp8, True),
        (f"{name}_fp8_ref", ref, False),
    ]:
        d = os.path.join(args.out, sub)
        os.makedirs(d, exist_ok=True)
        c = dict(config)
        if qc:
            c["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": list(BLOCK),
                "modules_to_not_convert": keep,
            }
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(c, f, indent=2)
            f.write("\n")
        write_safetensors(os.path.join(d, "model.safetensors"), ts, meta)
    print(f"{name}: {len(quantized)} weights quantized to FP8 e4m3, block {BLOCK[0]}x{BLOCK[1]}")


if __name__ == "__main__":
    main()
