//! Memory-mapped, fully validated reading of GGUF files (versions 2 and 3, little-endian).
//!
//! Layout (ggml `docs/gguf.md`; the `gguf` Python package's `gguf_reader.py` reads the same way):
//!
//! ```text
//! "GGUF" | u32 version | u64 tensor_count | u64 kv_count
//! kv_count    x (string key, u32 value type, value)
//! tensor_count x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)
//! zero padding up to a multiple of `general.alignment` (default 32)  <- the data section starts here
//! tensor data: each tensor at data_start + offset, offsets multiples of the alignment
//! ```
//!
//! Strings are a u64 byte length then UTF-8 without a terminator; arrays are a u32 element type, a u64
//! count, then the elements. Version 3 only added big-endian files, which are refused here.
//!
//! Everything is checked before it is used: every count and length against the bytes that remain (so a
//! corrupt count cannot make us allocate), every tensor against the file length, the alignment and the
//! other tensors. Departures from llama.cpp's loader: nested arrays are accepted (the Python package
//! writes them), and tensor data need not be packed in tensor order, only aligned and non-overlapping.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{GgufError, Result};
use crate::metadata::{Metadata, MetadataArray, MetadataValue, ValueType};
use crate::quants::dequantize;
use crate::types::GgmlType;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// ggml tensors have at most this many dimensions (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays in arrays accepted, so a hostile file cannot exhaust the stack.
const MAX_ARRAY_DEPTH: usize = 16;
/// Fewest bytes one tensor info can take: name length, n_dims, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;
/// Fewest bytes one key/value pair can take: key length, value type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;

/// Where and what one tensor is. Dimensions come in two orders:
/// `ne()` is ggml's, as stored in the file: `ne[0]` is the innermost, contiguous dimension;
/// `shape()` is the reverse, the row-major order numpy and PyTorch use. A PyTorch weight of shape
/// `[out_features, in_features]` is stored with `ne = [in_features, out_features]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    name: String,
    ggml_type: GgmlType,
    ne: Vec<usize>,
    offset: u64,
    n_elements: usize,
    n_bytes: usize,
    file_offset: usize,
}

impl TensorInfo {
    /// The tensor's name (`blk.0.attn_kv_a_mqa.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How the data is stored.
    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// Dimensions in ggml order, innermost first, as stored in the file.
    pub fn ne(&self) -> &[usize] {
        &self.ne
    }

    /// Dimensions in row-major order, outermost first (numpy / PyTorch shape).
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().copied().collect()
    }

    /// Number of elements (1 for a tensor with no dimensions).
    pub fn n_elements(&self) -> usize {
        self.n_elements
    }

    /// Number of bytes of data.
    pub fn n_bytes(&self) -> usize {
        self.n_bytes
    }

    /// Offset of the data from the start of the data section, as stored in the file.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Offset of the data from the start of the file.
    pub fn file_offset(&self) -> usize {
        self.file_offset
    }
}

/// A tensor's description with its bytes, borrowed from the memory map (no copy).
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// Name, type and dimensions.
    pub info: &'a TensorInfo,
    /// The raw data: `info.n_bytes()` bytes of `info.ggml_type()` blocks.
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// The values as f32, row-major (ggml order flattened: `ne[0]` varies fastest).
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        dequantize(self.info.ggml_type, self.data, self.info.n_elements)
    }
}

/// An open GGUF file: its metadata and tensor infos parsed and checked, its data memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl GgufFile {
    /// Opens, maps and validates a GGUF file; any inconsistency is an error naming the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io_err = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(io_err)?;
        // SAFETY: the map is read-only; a file modified while it is open is the user's responsibility,
        // as with every mmap-based loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        let header = parse(&path, &mmap)?;
        Ok(Self {
            path,
            mmap: Arc::new(mmap),
            version: header.version,
            alignment: header.alignment,
            data_offset: header.data_offset,
            metadata: header.metadata,
            tensors: header.tensors,
            by_name: header.by_name,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file's memory map, shared: tensor bytes live at [`TensorInfo::file_offset`], and
    /// holders of the map keep weights usable without copying after this `GgufFile` is dropped.
    pub fn shared_map(&self) -> Arc<Mmap> {
        Arc::clone(&self.mmap)
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the data section and of every tensor's data.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Byte offset of the data section in the file.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// The metadata key/value pairs.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The tensor infos in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Every tensor with its data, in file order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorView<'_>> {
        self.tensors.iter().map(|info| self.view(info))
    }

    /// The tensor called `name`, or an error naming it and the file.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        match self.by_name.get(name) {
            Some(&i) => Ok(self.view(&self.tensors[i])),
            None => Err(GgufError::MissingTensor {
                path: self.path.clone(),
                name: name.to_owned(),
            }),
        }
    }

    /// Whether a tensor called `name` exists.
    pub fn contains_tensor(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Only called with this file's own infos, whose byte ranges `parse` checked against the file length.
    fn view<'a>(&'a self, info: &'a TensorInfo) -> TensorView<'a> {
        TensorView {
            info,
            data: &self.mmap[info.file_offset..info.file_offset + info.n_bytes],
        }
    }
}

/// What the header says, after validation.
struct Header {
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

/// A tensor info as read, before its type and placement are checked.
struct RawTensorInfo {
    name: String,
    ne: Vec<usize>,
    type_id: u32,
    offset: u64,
}

/// Parses and validates everything but the tensor values themselves.
fn parse(path: &Path, bytes: &[u8]) -> Result<Header> {
    let mut cur = Cursor {
        path,
        bytes,
        pos: 0,
    };
    let magic = cur.take(4, || "the magic".into())?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic {
            path: path.to_path_buf(),
            found: magic.to_vec(),
        });
    }
    let version = cur.u32(|| "the version".into())?;
    if version != 2 && version != 3 {
        let reason = if version & 0xFFFF == 0 {
            "it looks like a big-endian file (or a corrupt one); tiefsee reads little-endian GGUF only"
        } else if version == 1 {
            "GGUF v1 (32-bit counts) is obsolete; convert the model again"
        } else {
            "tiefsee reads versions 2 and 3"
        };
        return Err(GgufError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
            reason,
        });
    }
    let tensor_count = cur.u64(|| "the tensor count".into())?;
    let kv_count = cur.u64(|| "the metadata count".into())?;

    let kv_count = cur.count(kv_count, MIN_KV_BYTES, || "the metadata".into())?;
    let mut entries = Vec::with_capacity(kv_count);
    for i in 0..kv_count {
        let key = cur.string(|| format!("the key of metadata entry {i}"))?;
        let type_id = cur.u32(|| format!("the type of metadata key {key:?}"))?;
        let value = read_value(&mut cur, type_id, &key)?;
        entries.push((key, value));
    }
    let metadata = Metadata::new(path.to_path_buf(), entries)?;
    let alignment = alignment(path, &metadata)?;

    let tensor_count = cur.count(tensor_count, MIN_TENSOR_INFO_BYTES, || {
        "the tensor infos".into()
    })?;
    let mut raw = Vec::with_capacity(tensor_count);
    for i in 0..tensor_count {
        raw.push(read_tensor_info(&mut cur, i)?);
    }

    // The data section starts at the next multiple of the alignment; its padding may be absent from a
    // file without tensor data, so only the tensors' own ranges are checked against the file length.
    let data_offset = cur.pos.next_multiple_of(alignment);
    let mut tensors = Vec::with_capacity(raw.len());
    let mut by_name = HashMap::with_capacity(raw.len());
    for r in raw {
        if by_name.insert(r.name.clone(), tensors.len()).is_some() {
            return Err(GgufError::DuplicateTensor {
                path: path.to_path_buf(),
                name: r.name,
            });
        }
        tensors.push(place_tensor(path, r, alignment, data_offset, bytes.len())?);
    }
    check_no_overlap(path, &tensors)?;
    Ok(Header {
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
        by_name,
    })
}

/// `general.alignment` if present (a u32 power of two, as llama.cpp requires), else the default.
fn alignment(path: &Path, metadata: &Metadata) -> Result<usize> {
    let bad = |found: String| GgufError::BadAlignment {
        path: path.to_path_buf(),
        found,
    };
    match metadata.get("general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(MetadataValue::U32(a)) if a.is_power_of_two() => {
            usize::try_from(*a).map_err(|_| bad(a.to_string()))
        }
        Some(MetadataValue::U32(a)) => Err(bad(a.to_string())),
        Some(other) => Err(bad(format!("a {}", other.type_description()))),
    }
}

fn read_tensor_info(cur: &mut Cursor<'_>, i: usize) -> Result<RawTensorInfo> {
    let name = cur.string(|| format!("the name of tensor {i}"))?;
    let n_dims = cur.u32(|| format!("the dimension count of tensor {name:?}"))?;
    if n_dims as usize > MAX_DIMS {
        return Err(GgufError::InvalidTensor {
            path: cur.path.to_path_buf(),
            tensor: name,
            reason: format!("it has {n_dims} dimensions, ggml allows at most {MAX_DIMS}"),
        });
    }
    let mut ne = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        let n = cur.u64(|| format!("dimension {d} of tensor {name:?}"))?;
        let n = usize::try_from(n).map_err(|_| GgufError::InvalidTensor {
            path: cur.path.to_path_buf(),
            tensor: name.clone(),
            reason: format!("dimension {d} is {n}, too large for this machine"),
        })?;
        ne.push(n);
    }
    let type_id = cur.u32(|| format!("the type of tensor {name:?}"))?;
    let offset = cur.u64(|| format!("the data offset of tensor {name:?}"))?;
    Ok(RawTensorInfo {
        name,
        ne,
        type_id,
        offset,
    })
}

/// Checks a tensor's type, its row length against the block size, its size, alignment and bounds.
fn place_tensor(
    path: &Path,
    raw: RawTensorInfo,
    alignment: usize,
    data_offset: usize,
    file_len: usize,
) -> Result<TensorInfo> {
    let invalid = |reason: String| GgufError::InvalidTensor {
        path: path.to_path_buf(),
        tensor: raw.name.clone(),
        reason,
    };
    let ggml_type = GgmlType::from_id(raw.type_id).ok_or_else(|| GgufError::UnsupportedType {
        path: path.to_path_buf(),
        tensor: raw.name.clone(),
        id: raw.type_id,
    })?;
    let row = raw.ne.first().copied().unwrap_or(1);
    if !row.is_multiple_of(ggml_type.block_size()) {
        return Err(invalid(format!(
            "its rows have {row} elements, not a multiple of the {ggml_type} block size {}",
            ggml_type.block_size()
        )));
    }
    let n_elements = raw
        .ne
        .iter()
        .try_fold(1usize, |acc, &n| acc.checked_mul(n))
        .ok_or_else(|| {
            invalid(format!(
                "its dimensions {:?} overflow the element count",
                raw.ne
            ))
        })?;
    let n_bytes = ggml_type.bytes_for(n_elements).ok_or_else(|| {
        invalid(format!(
            "{n_elements} {ggml_type} elements overflow the byte count"
        ))
    })?;
    if !raw.offset.is_multiple_of(alignment as u64) {
        return Err(GgufError::UnalignedTensor {
            path: path.to_path_buf(),
            tensor: raw.name,
            offset: raw.offset,
            alignment: alignment as u64,
        });
    }
    // u128 cannot overflow here: every term is below 2^64.
    let start = data_offset as u128 + u128::from(raw.offset);
    let end = start + n_bytes as u128;
    if end > file_len as u128 {
        return Err(GgufError::TensorOutOfBounds {
            path: path.to_path_buf(),
            tensor: raw.name,
            start: u64::try_from(start).unwrap_or(u64::MAX),
            end: u64::try_from(end).unwrap_or(u64::MAX),
            file_len: file_len as u64,
        });
    }
    Ok(TensorInfo {
        name: raw.name,
        ggml_type,
        ne: raw.ne,
        offset: raw.offset,
        n_elements,
        n_bytes,
        // start <= end <= file_len, so it fits.
        file_offset: start as usize,
    })
}

/// No two tensors may share a byte (empty tensors share none).
fn check_no_overlap(path: &Path, tensors: &[TensorInfo]) -> Result<()> {
    let mut ranges: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    ranges.sort_by_key(|t| t.file_offset);
    for pair in ranges.windows(2) {
        if pair[0].file_offset + pair[0].n_bytes > pair[1].file_offset {
            return Err(GgufError::OverlappingTensors {
                path: path.to_path_buf(),
                first: pair[0].name.clone(),
                second: pair[1].name.clone(),
            });
        }
    }
    Ok(())
}

fn read_value(cur: &mut Cursor<'_>, type_id: u32, key: &str) -> Result<MetadataValue> {
    let ty = cur.value_type(type_id, key)?;
    let what = || format!("the value of metadata key {key:?}");
    Ok(match ty {
        ValueType::U8 => MetadataValue::U8(u8::from_le_bytes(cur.array(what)?)),
        ValueType::I8 => MetadataValue::I8(i8::from_le_bytes(cur.array(what)?)),
        ValueType::U16 => MetadataValue::U16(u16::from_le_bytes(cur.array(what)?)),
        ValueType::I16 => MetadataValue::I16(i16::from_le_bytes(cur.array(what)?)),
        ValueType::U32 => MetadataValue::U32(u32::from_le_bytes(cur.array(what)?)),
        ValueType::I32 => MetadataValue::I32(i32::from_le_bytes(cur.array(what)?)),
        ValueType::F32 => MetadataValue::F32(f32::from_le_bytes(cur.array(what)?)),
        // Any non-zero byte is true, as llama.cpp and the Python package read it.
        ValueType::Bool => MetadataValue::Bool(cur.array::<1>(what)?[0] != 0),
        ValueType::String => MetadataValue::String(cur.string(what)?),
        ValueType::Array => MetadataValue::Array(read_array(cur, key, 0)?),
        ValueType::U64 => MetadataValue::U64(u64::from_le_bytes(cur.array(what)?)),
        ValueType::I64 => MetadataValue::I64(i64::from_le_bytes(cur.array(what)?)),
        ValueType::F64 => MetadataValue::F64(f64::from_le_bytes(cur.array(what)?)),
    })
}

/// Reads an array body (element type, count, elements) at nesting `depth`.
fn read_array(cur: &mut Cursor<'_>, key: &str, depth: usize) -> Result<MetadataArray> {
    let what = || format!("an array in metadata key {key:?}");
    let elem_id = cur.u32(what)?;
    let elem = cur.value_type(elem_id, key)?;
    let n = cur.u64(what)?;
    // Strings take at least their length, nested arrays their element type and count.
    let min_size = match elem {
        ValueType::String => 8,
        ValueType::Array => 12,
        fixed => fixed.fixed_size().unwrap_or(1),
    };
    let n = cur.count(n, min_size as u64, what)?;
    Ok(match elem {
        ValueType::U8 => MetadataArray::U8(cur.take(n as u64, what)?.to_vec()),
        ValueType::I8 => MetadataArray::I8(cur.values(n, what, i8::from_le_bytes)?),
        ValueType::U16 => MetadataArray::U16(cur.values(n, what, u16::from_le_bytes)?),
        ValueType::I16 => MetadataArray::I16(cur.values(n, what, i16::from_le_bytes)?),
        ValueType::U32 => MetadataArray::U32(cur.values(n, what, u32::from_le_bytes)?),
        ValueType::I32 => MetadataArray::I32(cur.values(n, what, i32::from_le_bytes)?),
        ValueType::F32 => MetadataArray::F32(cur.values(n, what, f32::from_le_bytes)?),
        ValueType::Bool => MetadataArray::Bool(cur.values(n, what, |[b]: [u8; 1]| b != 0)?),
        ValueType::U64 => MetadataArray::U64(cur.values(n, what, u64::from_le_bytes)?),
        ValueType::I64 => MetadataArray::I64(cur.values(n, what, i64::from_le_bytes)?),
        ValueType::F64 => MetadataArray::F64(cur.values(n, what, f64::from_le_bytes)?),
        ValueType::String => MetadataArray::String(
            (0..n)
                .map(|i| cur.string(|| format!("string {i} of metadata key {key:?}")))
                .collect::<Result<_>>()?,
        ),
        ValueType::Array => {
            if depth + 1 >= MAX_ARRAY_DEPTH {
                return Err(cur.corrupt(format!(
                    "metadata key {key:?} nests arrays more than {MAX_ARRAY_DEPTH} deep"
                )));
            }
            MetadataArray::Array(
                (0..n)
                    .map(|_| read_array(cur, key, depth + 1))
                    .collect::<Result<_>>()?,
            )
        }
    })
}

/// A read position in the file that refuses to read past its end.
struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn truncated(&self, what: String, needed: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what,
            offset: self.pos as u64,
            needed,
            available: self.remaining() as u64,
        }
    }

    fn corrupt(&self, reason: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            offset: self.pos as u64,
            reason,
        }
    }

    /// The next `n` bytes.
    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8]> {
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => {
                let out = &self.bytes[self.pos..self.pos + n];
                self.pos += n;
                Ok(out)
            }
            _ => Err(self.truncated(what(), n)),
        }
    }

    fn array<const N: usize>(&mut self, what: impl FnOnce() -> String) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }

    /// `n` consecutive little-endian values of `N` bytes each.
    fn values<T, const N: usize>(
        &mut self,
        n: usize,
        what: impl FnOnce() -> String,
        from_le: fn([u8; N]) -> T,
    ) -> Result<Vec<T>> {
        let bytes = self.take(n.saturating_mul(N) as u64, what)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                from_le(a)
            })
            .collect())
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length-prefixed UTF-8 string.
    fn string(&mut self, what: impl Fn() -> String) -> Result<String> {
        let len = self.u64(&what)?;
        let start = self.pos;
        let bytes = self.take(len, &what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| GgufError::Corrupt {
            path: self.path.to_path_buf(),
            offset: start as u64,
            reason: format!("{} is not valid UTF-8: {e}", what()),
        })
    }

    /// Checks that `n` items of at least `min_size` bytes each can fit in what remains.
    fn count(&self, n: u64, min_size: u64, what: impl FnOnce() -> String) -> Result<usize> {
        let needed = n.saturating_mul(min_size);
        if needed > self.remaining() as u64 {
            return Err(self.truncated(format!("{} ({n} entries)", what()), needed));
        }
        // n * min_size fits in the file, so n fits in usize.
        Ok(n as usize)
    }

    fn value_type(&self, id: u32, key: &str) -> Result<ValueType> {
        ValueType::from_id(id).ok_or_else(|| {
            self.corrupt(format!(
                "metadata key {key:?} has unknown value type id {id}"
            ))
        })
    }
}
