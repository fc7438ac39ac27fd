//! GGUF reader (versions 2 and 3), written by hand because no maintained crate parses
//! GGUF with the bounds checking we need on untrusted files.
//!
//! Layout (all little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata
//! count, the metadata key/value pairs, the tensor infos (name, n_dims, dims, ggml type,
//! offset relative to the data section), then padding to `general.alignment` (default
//! 32) and the tensor data. Every count, length and offset is checked against the bytes
//! actually present before anything is allocated from it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ffai_kernels::backend::HostBytes;
use ffai_kernels::quant::WeightType;

use crate::error::{Error, Result};
use crate::{bail, ensure};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// One metadata value. Arrays hold values of a single type.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// Any integer type that fits in u64 (negative values do not).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v as i64),
            MetaValue::I16(v) => Some(v as i64),
            MetaValue::I32(v) => Some(v as i64),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short rendering for `inspect`: long arrays are summarised.
    pub fn summary(&self) -> String {
        match self {
            MetaValue::String(s) if s.len() > 80 => {
                format!("{:?}… ({} bytes)", &s[..s.floor_char_boundary(60)], s.len())
            }
            MetaValue::String(s) => format!("{s:?}"),
            MetaValue::Array(a) if a.len() > 8 => format!("[{} values]", a.len()),
            MetaValue::Array(a) => {
                let parts: Vec<String> = a.iter().map(|v| v.summary()).collect();
                format!("[{}]", parts.join(", "))
            }
            MetaValue::Bool(b) => b.to_string(),
            MetaValue::F32(v) => v.to_string(),
            MetaValue::F64(v) => v.to_string(),
            other => other.as_i64().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub ty: WeightType,
    /// Row-major shape, outermost first (ggml lists dims innermost first; we reverse).
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

/// A parsed GGUF file backed by a read-only memory map.
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    data: Arc<memmap2::Mmap>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let ctx = || format!("reading GGUF {}", path.display());
        let file = std::fs::File::open(path).map_err(|e| Error::new(e.to_string()).context(ctx()))?;
        // SAFETY: the map is read-only and private to this process; every access goes
        // through bounds-checked slices. Truncating the file while it is mapped is outside
        // what we can defend against (the same contract as any mmap-based loader).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::new(e.to_string()).context(ctx()))?;
        Self::parse(Arc::new(map)).map_err(|e| e.context(ctx()))
    }

    fn parse(data: Arc<memmap2::Mmap>) -> Result<GgufFile> {
        let bytes: &[u8] = &data;
        let mut r = Reader {
            buf: bytes,
            pos: 0,
            elements: 0,
        };
        let magic = r.take(4)?;
        ensure!(magic == MAGIC, "not a GGUF file (bad magic {:02x?})", magic);
        let version = r.u32()?;
        ensure!(
            version == 2 || version == 3,
            "unsupported GGUF version {version} (ffai reads versions 2 and 3)"
        );
        let n_tensors = r.u64()?;
        let n_meta = r.u64()?;
        // Each metadata pair takes at least 8 (key len) + 4 (type) + 1 bytes; each tensor
        // info at least 8 + 4 + 8 + 4 + 8. Anything larger than the file can hold is a lie.
        ensure!(
            n_meta <= (r.remaining() / 13) as u64,
            "metadata count {n_meta} exceeds what the file can hold"
        );
        ensure!(
            n_tensors <= (r.remaining() / 32) as u64,
            "tensor count {n_tensors} exceeds what the file can hold"
        );

        let mut metadata = BTreeMap::new();
        for _ in 0..n_meta {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0).map_err(|e| e.context(format!("metadata {key:?}")))?;
            metadata.insert(key, value);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => {
                let a = v
                    .as_u64()
                    .ok_or_else(|| Error::new("general.alignment is not an integer"))?;
                ensure!(
                    a > 0 && a.is_power_of_two() && a <= 1 << 20,
                    "invalid general.alignment {a}"
                );
                a
            }
        };

        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            ensure!(
                (1..=MAX_DIMS).contains(&n_dims),
                "tensor {name:?}: {n_dims} dimensions (1..={MAX_DIMS} allowed)"
            );
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64()?);
            }
            let ty_id = r.u32()?;
            let offset = r.u64()?;
            raw.push((name, dims, ty_id, offset));
        }
        let data_start = align_up(r.pos as u64, alignment).ok_or_else(|| Error::new("data offset overflows"))?;
        ensure!(
            data_start <= bytes.len() as u64,
            "file ends before its tensor data section"
        );
        let data_len = bytes.len() as u64 - data_start;

        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ty_id, offset) in raw {
            let ty = WeightType::from_ggml(ty_id)
                .ok_or_else(|| Error::new(format!("tensor {name:?}: unsupported ggml type id {ty_id}")))?;
            let mut n_elems: u64 = 1;
            for &d in &dims {
                ensure!(d > 0, "tensor {name:?}: zero-sized dimension");
                n_elems = n_elems
                    .checked_mul(d)
                    .ok_or_else(|| Error::new(format!("tensor {name:?}: dimensions {dims:?} overflow")))?;
            }
            ensure!(
                n_elems <= data_len.saturating_mul(8),
                "tensor {name:?}: dimensions {dims:?} exceed the file"
            );
            let row = usize::try_from(dims[0]).map_err(|_| Error::new(format!("tensor {name:?}: row too long")))?;
            let row_bytes = ty.row_bytes(row).ok_or_else(|| {
                Error::new(format!(
                    "tensor {name:?}: row length {row} is not a multiple of the {} block size {}",
                    ty.name(),
                    ty.block_len()
                ))
            })? as u64;
            let n_bytes = row_bytes
                .checked_mul(n_elems / dims[0])
                .ok_or_else(|| Error::new(format!("tensor {name:?}: size overflows")))?;
            ensure!(
                offset % alignment == 0,
                "tensor {name:?}: offset {offset} is not aligned to {alignment}"
            );
            let end = offset
                .checked_add(n_bytes)
                .ok_or_else(|| Error::new(format!("tensor {name:?}: offset overflows")))?;
            ensure!(
                end <= data_len,
                "tensor {name:?}: data [{offset}, {end}) lies past the end of the file ({data_len} data bytes)"
            );
            let shape = dims.iter().rev().map(|&d| d as usize).collect();
            tensors.push(TensorInfo {
                name,
                ty,
                shape,
                offset: (data_start + offset) as usize,
                n_bytes: n_bytes as usize,
            });
        }
        Ok(GgufFile {
            version,
            metadata,
            tensors,
            alignment,
            data,
        })
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.as_u64())
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(|v| v.as_f64())
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.as_bool())
    }

    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of one tensor, sharing the memory map.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> HostBytes {
        HostBytes::new(self.data.clone(), t.offset, t.n_bytes)
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Array elements read so far, against [`MAX_METADATA_ELEMENTS`].
    elements: u64,
}

/// Arrays of arrays are legal GGUF, but nothing real nests deeply.
const MAX_NESTING: u32 = 4;
/// Array elements the whole metadata may hold. Each becomes a `MetaValue` of ~32 bytes
/// whatever its size in the file (a byte array would take 32× the file), so the count is
/// bounded rather than left to the file size: the largest real vocabularies hold about
/// 1.3M elements (262k tokens, scores and types, 515k merges); 16M is 512 MiB at most.
pub const MAX_METADATA_ELEMENTS: u64 = 1 << 24;

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!(
                "file is truncated (needed {n} bytes at offset {}, {} left)",
                self.pos,
                self.remaining()
            );
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        ensure!(
            len <= self.remaining() as u64,
            "string length {len} at offset {} exceeds the file",
            self.pos
        );
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::new(format!("string at offset {} is not UTF-8", self.pos)))
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.arr::<1>()?[0]),
            1 => MetaValue::I8(self.arr::<1>()?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.arr()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.arr()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.arr()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.arr()?)),
            7 => match self.arr::<1>()?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => bail!("invalid bool byte {b}"),
            },
            8 => MetaValue::String(self.string()?),
            9 => {
                ensure!(depth < MAX_NESTING, "arrays nested too deeply");
                let elem_ty = self.u32()?;
                let count = self.u64()?;
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => bail!("unknown array element type {t}"),
                };
                ensure!(
                    count <= (self.remaining() / min_size) as u64,
                    "array of {count} elements at offset {} exceeds the file",
                    self.pos
                );
                self.elements = self.elements.saturating_add(count);
                ensure!(
                    self.elements <= MAX_METADATA_ELEMENTS,
                    "metadata arrays hold more than {MAX_METADATA_ELEMENTS} elements in all"
                );
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.arr()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.arr()?)),
            t => bail!("unknown metadata value type {t}"),
        })
    }
}

/// Builds GGUF bytes in memory; used by tests (and later by `convert`).
#[derive(Default)]
pub struct GgufWriter {
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<(String, WeightType, Vec<usize>, Vec<u8>)>,
}

impl GgufWriter {
    pub fn to_bytes(&self) -> Vec<u8> {
        let infos: Vec<(String, WeightType, Vec<usize>, usize)> = self
            .tensors
            .iter()
            .map(|(name, ty, shape, data)| (name.clone(), *ty, shape.clone(), data.len()))
            .collect();
        let (mut out, offsets) = header_bytes(&self.metadata, &infos);
        let start = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(start + off as usize, 0);
            out.extend_from_slice(data);
        }
        out
    }
}

/// The bytes of a GGUF v3 header (metadata and tensor infos, padded to the data
/// section) for tensors of the given names, types, row-major shapes and byte sizes, laid
/// out back to back in that order at the default alignment, plus each tensor's offset
/// inside the data section. For writers that stream the data after it.
pub fn header_bytes(
    metadata: &[(String, MetaValue)],
    tensors: &[(String, WeightType, Vec<usize>, usize)],
) -> (Vec<u8>, Vec<u64>) {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        write_str(&mut out, k);
        write_value(&mut out, v, true);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    for (name, ty, shape, n_bytes) in tensors {
        write_str(&mut out, name);
        out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for &d in shape.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&ty.ggml_id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = align_up(offset + *n_bytes as u64, DEFAULT_ALIGNMENT).expect("tensor sizes fit in u64");
    }
    let start = align_up(out.len() as u64, DEFAULT_ALIGNMENT).expect("header fits in u64") as usize;
    out.resize(start, 0);
    (out, offsets)
}

/// Bytes of padding after a tensor of `n_bytes` bytes (see [`header_bytes`]).
pub fn padding_after(n_bytes: usize) -> usize {
    (DEFAULT_ALIGNMENT as usize - n_bytes % DEFAULT_ALIGNMENT as usize) % DEFAULT_ALIGNMENT as usize
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn write_value(out: &mut Vec<u8>, v: &MetaValue, with_type: bool) {
    if with_type {
        out.extend_from_slice(&type_id(v).to_le_bytes());
    }
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => write_str(out, s),
        MetaValue::Array(items) => {
            let elem = items.first().map(type_id).unwrap_or(4);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                write_value(out, it, false);
            }
        }
    }
}

impl GgufFile {
    /// Parses GGUF bytes already in memory (tests, fuzzing).
    pub fn from_bytes(bytes: &[u8]) -> Result<GgufFile> {
        let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1))?;
        map[..bytes.len()].copy_from_slice(bytes);
        let map = map.make_read_only()?;
        // An anonymous map of len(bytes).max(1): parse only the real bytes' worth.
        if bytes.is_empty() {
            bail!("file is empty");
        }
        Self::parse(Arc::new(map))
    }
}
