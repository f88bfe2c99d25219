//! Writing GGUF v3 files: metadata and tensor infos first, then tensor data streamed to disk.
//!
//! The byte layout is the one `gguf.GGUFWriter` (the Python package) produces, padding included (each
//! tensor's data is padded to the alignment, the last one too), so given the same keys, tensors and
//! order the output is byte-identical to that package's and its `GGUFReader` reads it back unchanged.
//!
//! Usage: declare everything on a [`GgufWriter`], [`GgufWriter::create`] the file (this writes the
//! header), then hand each tensor's bytes to the returned [`TensorDataWriter`] in declaration order,
//! whole or in parts, and [`TensorDataWriter::finish`]. Only the header and the current part are in
//! memory, so a model larger than RAM can be written tensor by tensor.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{GgufError, Result};
use crate::metadata::{MetadataArray, MetadataValue};
use crate::reader::{DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use crate::types::GgmlType;

/// The GGUF version written.
const VERSION: u32 = 3;

/// A tensor declared for writing.
#[derive(Debug, Clone)]
struct PlannedTensor {
    name: String,
    /// ggml order, innermost first.
    ne: Vec<usize>,
    ggml_type: GgmlType,
    n_bytes: usize,
}

/// Collects metadata and tensor declarations for a new GGUF file.
#[derive(Debug, Clone, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<PlannedTensor>,
}

impl GgufWriter {
    /// An empty file description.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata key, written in the order added. `general.alignment` (a u32 power of two) also
    /// sets the alignment of the data, as in llama.cpp and the Python package.
    pub fn set(&mut self, key: impl Into<String>, value: MetadataValue) -> Result<()> {
        let key = key.into();
        if self.metadata.iter().any(|(k, _)| *k == key) {
            return Err(GgufError::InvalidWrite(format!(
                "metadata key {key:?} is set twice"
            )));
        }
        if key == "general.alignment"
            && !matches!(value, MetadataValue::U32(a) if a.is_power_of_two())
        {
            return Err(GgufError::InvalidWrite(format!(
                "general.alignment must be a u32 power of two, got {value:?}"
            )));
        }
        self.metadata.push((key, value));
        Ok(())
    }

    /// Declares a tensor with its row-major `shape` (outermost first, as PyTorch; stored reversed as
    /// ggml's `ne`). The innermost dimension must be a whole number of `ggml_type` blocks.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        ggml_type: GgmlType,
    ) -> Result<()> {
        let name = name.into();
        let invalid =
            |reason: String| GgufError::InvalidWrite(format!("tensor {name:?}: {reason}"));
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(invalid("declared twice".into()));
        }
        if shape.len() > MAX_DIMS {
            return Err(invalid(format!(
                "{} dimensions, ggml allows at most {MAX_DIMS}",
                shape.len()
            )));
        }
        let ne: Vec<usize> = shape.iter().rev().copied().collect();
        let row = ne.first().copied().unwrap_or(1);
        if !row.is_multiple_of(ggml_type.block_size()) {
            return Err(invalid(format!(
                "rows of {row} elements are not a whole number of {ggml_type} blocks of {}",
                ggml_type.block_size()
            )));
        }
        let n_bytes = shape
            .iter()
            .try_fold(1usize, |acc, &n| acc.checked_mul(n))
            .and_then(|n| ggml_type.bytes_for(n))
            .ok_or_else(|| invalid(format!("shape {shape:?} is too large")))?;
        self.tensors.push(PlannedTensor {
            name,
            ne,
            ggml_type,
            n_bytes,
        });
        Ok(())
    }

    /// Creates the file and writes the header (metadata, tensor infos, padding); tensor data follows
    /// through the returned writer.
    pub fn create(self, path: impl AsRef<Path>) -> Result<TensorDataWriter> {
        let path = path.as_ref().to_path_buf();
        let alignment = match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, MetadataValue::U32(a))) => *a as usize,
            _ => DEFAULT_ALIGNMENT,
        };
        let io_err = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::create(&path).map_err(io_err)?;
        let mut out = BufWriter::new(file);
        let header_len =
            write_header(&mut out, &self.metadata, &self.tensors, alignment).map_err(io_err)?;
        write_padding(&mut out, header_len, alignment).map_err(io_err)?;
        Ok(TensorDataWriter {
            out,
            path,
            tensors: self.tensors,
            alignment,
            next: 0,
            written: 0,
        })
    }
}

/// Streams tensor data into a file whose header is written; see the module documentation.
pub struct TensorDataWriter {
    out: BufWriter<File>,
    path: PathBuf,
    tensors: Vec<PlannedTensor>,
    alignment: usize,
    /// Index of the tensor being written.
    next: usize,
    /// Bytes of that tensor written so far.
    written: usize,
}

impl TensorDataWriter {
    /// Writes all of tensor `name`'s data; tensors come in the order they were declared.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let t = self.expect_next(name)?;
        if self.written != 0 || data.len() != t.n_bytes {
            return Err(GgufError::InvalidWrite(format!(
                "tensor {name:?} ({}, ne {:?}) takes {} bytes, got {}{}",
                t.ggml_type,
                t.ne,
                t.n_bytes,
                data.len(),
                if self.written != 0 {
                    " after a partial write"
                } else {
                    ""
                }
            )));
        }
        self.write_tensor_part(name, data)
    }

    /// Writes the next part of tensor `name`'s data; the tensor is complete when all its bytes are in.
    pub fn write_tensor_part(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let n_bytes = self.expect_next(name)?.n_bytes;
        if self.written + data.len() > n_bytes {
            return Err(GgufError::InvalidWrite(format!(
                "tensor {name:?} takes {n_bytes} bytes, {} already written, {} more given",
                self.written,
                data.len()
            )));
        }
        let io_err = |source| GgufError::Io {
            path: self.path.clone(),
            source,
        };
        self.out.write_all(data).map_err(io_err)?;
        self.written += data.len();
        if self.written == n_bytes {
            write_padding(&mut self.out, n_bytes, self.alignment).map_err(io_err)?;
            self.next += 1;
            self.written = 0;
        }
        Ok(())
    }

    /// Checks that every declared tensor was written and flushes the file.
    pub fn finish(mut self) -> Result<()> {
        if let Some(t) = self.tensors.get(self.next) {
            return Err(GgufError::InvalidWrite(format!(
                "{}: tensor {:?} was not (completely) written",
                self.path.display(),
                t.name
            )));
        }
        self.out.flush().map_err(|source| GgufError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// The tensor due next, which must be `name`.
    fn expect_next(&self, name: &str) -> Result<&PlannedTensor> {
        match self.tensors.get(self.next) {
            Some(t) if t.name == name => Ok(t),
            Some(t) => Err(GgufError::InvalidWrite(format!(
                "tensor {:?} is due next (tensors are written in declaration order), got {name:?}",
                t.name
            ))),
            None => Err(GgufError::InvalidWrite(format!(
                "tensor {name:?}: all declared tensors are already written"
            ))),
        }
    }
}

/// Writes everything before the data section; returns the number of bytes written.
fn write_header(
    out: &mut impl Write,
    metadata: &[(String, MetadataValue)],
    tensors: &[PlannedTensor],
    alignment: usize,
) -> std::io::Result<usize> {
    let mut buf = Vec::new();
    buf.extend_from_slice(&GGUF_MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut buf, key);
        buf.extend_from_slice(&value.value_type().id().to_le_bytes());
        put_value(&mut buf, value);
    }
    let mut offset = 0usize;
    for t in tensors {
        put_string(&mut buf, &t.name);
        buf.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
        for &n in &t.ne {
            buf.extend_from_slice(&(n as u64).to_le_bytes());
        }
        buf.extend_from_slice(&t.ggml_type.id().to_le_bytes());
        buf.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.n_bytes.next_multiple_of(alignment);
    }
    out.write_all(&buf)?;
    Ok(buf.len())
}

/// Zero bytes from `len` up to the next multiple of `alignment`.
fn write_padding(out: &mut impl Write, len: usize, alignment: usize) -> std::io::Result<()> {
    let pad = len.next_multiple_of(alignment) - len;
    out.write_all(&vec![0u8; pad])
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, value: &MetadataValue) {
    match value {
        MetadataValue::U8(v) => buf.push(*v),
        MetadataValue::I8(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::Bool(v) => buf.push(u8::from(*v)),
        MetadataValue::String(s) => put_string(buf, s),
        MetadataValue::Array(a) => put_array(buf, a),
        MetadataValue::U64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F64(v) => buf.extend_from_slice(&v.to_le_bytes()),
    }
}

/// An array body: element type, count, elements.
fn put_array(buf: &mut Vec<u8>, array: &MetadataArray) {
    buf.extend_from_slice(&array.element_type().id().to_le_bytes());
    buf.extend_from_slice(&(array.len() as u64).to_le_bytes());
    match array {
        MetadataArray::U8(v) => buf.extend_from_slice(v),
        MetadataArray::I8(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        MetadataArray::U16(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        MetadataArray::I16(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        MetadataArray::U32(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        MetadataArray::I32(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        MetadataArray::F32(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        MetadataArray::Bool(v) => v.iter().for_each(|&x| buf.push(u8::from(x))),
        MetadataArray::String(v) => v.iter().for_each(|s| put_string(buf, s)),
        MetadataArray::Array(v) => v.iter().for_each(|a| put_array(buf, a)),
        MetadataArray::U64(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        MetadataArray::I64(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        MetadataArray::F64(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
    }
}
