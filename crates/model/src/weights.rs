//! Checked, memory-mapped access to a Hugging Face checkpoint's safetensors files.
//!
//! A folder holds either one `model.safetensors` or shards listed by `model.safetensors.index.json`.
//! Every file is validated when opened (a truncated file is an error naming it), and every tensor
//! is checked for name and shape when fetched. The matrices of linear maps in f32, f16 or bf16, and
//! those of DeepSeek's FP8 release (e4m3 weights with a `weight_scale_inv` per 128x128 block), are
//! multiplied in place by `tiefsee_kernels` ([`Checkpoint::get_quantized`]); other tensors are
//! converted to f32 (FP8 ones dequantized with their scales, [`Checkpoint::get`]).
//! A GGUF file can stand in for the folder ([`Checkpoint::from_gguf`]): its tensors are served under
//! the same names.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::SafeTensors;
use tiefsee_gguf::GgmlType;
use tiefsee_kernels::{QMatrix, WeightBytes};

use crate::error::{ModelError, Result};
use crate::gguf::tensors::GgufTensors;

/// Where one tensor lives: which file, at which bytes, with which stored dtype and shape.
#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The tensors of a checkpoint folder, memory-mapped and indexed by name.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Arc<Mmap>)>,
    tensors: HashMap<String, TensorEntry>,
    /// Tensors held in memory instead of files (trainable variables), served without a copy.
    in_memory: HashMap<String, Tensor>,
    /// Tensors of a GGUF file, under checkpoint names.
    gguf: Option<GgufTensors>,
    fp8_block_size: Option<[usize; 2]>,
    device: Device,
}

impl Checkpoint {
    /// Opens `model.safetensors` or the shards of `model.safetensors.index.json` in `dir`.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_paths(dir, &index)?
        } else {
            return Err(ModelError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json here",
                ),
            });
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (file_idx, path) in paths.into_iter().enumerate() {
            let io_err = |source| ModelError::Io {
                path: path.clone(),
                source,
            };
            let file = std::fs::File::open(&path).map_err(io_err)?;
            // SAFETY: the map is read-only; a checkpoint modified while it is open is the user's
            // responsibility, as with every mmap-based loader.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Safetensors {
                file: path.clone(),
                reason: e.to_string(),
            })?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                let entry = TensorEntry {
                    file: file_idx,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + view.data().len(),
                };
                tensors.insert(name, entry);
            }
            files.push((path, Arc::new(mmap)));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            tensors,
            in_memory: HashMap::new(),
            gguf: None,
            fp8_block_size: None,
            device: device.clone(),
        })
    }

    /// A checkpoint over the tensors of a GGUF file (see [`crate::gguf`]).
    pub fn from_gguf(tensors: GgufTensors, device: &Device) -> Self {
        Self {
            dir: tensors.file().path().to_path_buf(),
            files: Vec::new(),
            tensors: HashMap::new(),
            in_memory: HashMap::new(),
            gguf: Some(tensors),
            fp8_block_size: None,
            device: device.clone(),
        }
    }

    /// The GGUF tensors behind this checkpoint, if it is a GGUF file.
    pub fn gguf(&self) -> Option<&GgufTensors> {
        self.gguf.as_ref()
    }

    /// A checkpoint of f32 tensors already in memory, e.g. the variables of a model being trained:
    /// `get` returns them as they are, so gradients flow back to them.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, device: &Device) -> Self {
        Self {
            dir: PathBuf::from("(in memory)"),
            files: Vec::new(),
            tensors: HashMap::new(),
            in_memory: tensors,
            gguf: None,
            fp8_block_size: None,
            device: device.clone(),
        }
    }

    /// Declares the checkpoint as DeepSeek's FP8 release with scales per block of this shape.
    pub fn with_fp8_block_size(mut self, block: Option<[usize; 2]>) -> Self {
        self.fp8_block_size = block;
        self
    }

    /// The device tensors are loaded onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the checkpoint holds a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
            || self.in_memory.contains_key(name)
            || self.gguf.as_ref().is_some_and(|g| g.contains(name))
    }

    /// Names of all tensors, for counting parameters and finding unexpected ones.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors
            .keys()
            .chain(self.in_memory.keys())
            .map(String::as_str)
            .chain(self.gguf.iter().flat_map(|g| g.names()))
    }

    /// Bytes a tensor takes as stored (quantized blocks for a GGUF, FP8 bytes for an FP8 checkpoint).
    pub fn stored_bytes(&self, name: &str) -> Option<usize> {
        if let Some(t) = self.in_memory.get(name) {
            return Some(t.elem_count() * t.dtype().size_in_bytes());
        }
        if let Some(e) = self.tensors.get(name) {
            return Some(e.end - e.start);
        }
        self.gguf.as_ref().and_then(|g| g.stored_bytes(name))
    }

    /// Stored shape of a tensor, if present.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        match self.in_memory.get(name) {
            Some(t) => Some(t.dims()),
            None => match self.tensors.get(name) {
                Some(e) => Some(e.shape.as_slice()),
                None => self.gguf.as_ref().and_then(|g| g.shape_of(name)),
            },
        }
    }

    /// Stored dtype names of all tensors (e.g. "BF16", "F8_E4M3"), for `info`.
    pub fn stored_dtypes(&self) -> Vec<String> {
        let mut dtypes: Vec<String> = self
            .tensors
            .values()
            .map(|e| format!("{:?}", e.dtype))
            .chain(self.in_memory.values().map(|t| format!("{:?}", t.dtype())))
            .chain(self.gguf.iter().flat_map(|g| g.stored_types()))
            .collect();
        dtypes.sort();
        dtypes.dedup();
        dtypes
    }

    /// A view of the tensors under `prefix` (joined with dots), as candle's `VarBuilder::pp`.
    pub fn pp(&self, prefix: impl AsRef<str>) -> Weights<'_> {
        Weights {
            checkpoint: self,
            prefix: prefix.as_ref().to_owned(),
        }
    }

    /// The 2-D tensor `name` as stored, read in place from the memory map, when the kernels multiply
    /// its format: a GGUF block format (Q8_0, Q4_K, ...), float (f32, f16, bf16, in a GGUF or a
    /// safetensors file) or the FP8 of a block-scaled FP8 checkpoint (its `_scale_inv` grid loaded
    /// beside it). `None` means: load it with [`Checkpoint::get`] (in-memory tensors, other dtypes).
    pub fn get_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QMatrix>> {
        if self.in_memory.contains_key(name) {
            return Ok(None);
        }
        if let Some(gguf) = &self.gguf {
            return gguf.get_quantized(name, shape);
        }
        let &[rows, cols] = shape else {
            return Ok(None);
        };
        let Some(entry) = self.tensors.get(name) else {
            return Ok(None);
        };
        let ty = match entry.dtype {
            safetensors::Dtype::F32 => Some(GgmlType::F32),
            safetensors::Dtype::F16 => Some(GgmlType::F16),
            safetensors::Dtype::BF16 => Some(GgmlType::BF16),
            safetensors::Dtype::F8_E4M3 => None,
            _ => return Ok(None),
        };
        self.check_shape(name, entry, shape)?;
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = self.files[entry.file].1.clone();
        let bytes = WeightBytes::new(owner, entry.start..entry.end)?;
        Ok(Some(match ty {
            Some(GgmlType::BF16) => {
                let matrix = QMatrix::new(GgmlType::BF16, rows, cols, bytes)?;
                release_pages(&self.files[entry.file].1, entry.start..entry.end);
                matrix
            }
            Some(ty) => QMatrix::new(ty, rows, cols, bytes)?,
            None => {
                let block = self.fp8_block(name, shape)?;
                let scales = self.fp8_scales(name, block, rows, cols)?;
                QMatrix::fp8(rows, cols, bytes, scales, block)?
            }
        }))
    }

    /// The `weight_scale_inv` grid of FP8 tensor `name`, (rows, cols) in blocks of `block`, row-major:
    /// an error naming it if a scale is NaN or infinite (a corrupt checkpoint would otherwise only
    /// give NaNs).
    fn fp8_scales(
        &self,
        name: &str,
        block: [usize; 2],
        rows: usize,
        cols: usize,
    ) -> Result<Vec<f32>> {
        let scale_name = format!("{name}_scale_inv");
        let grid = fp8_grid(block, rows, cols);
        let values: Vec<f32> = self.get(&scale_name, &grid)?.flatten_all()?.to_vec1()?;
        if let Some((i, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(ModelError::BadFp8Scale {
                file: self.file_of(&scale_name),
                name: scale_name,
                block: [i / grid[1], i % grid[1]],
                value,
            });
        }
        Ok(values)
    }

    /// The file holding stored tensor `name` (the folder if it is not in one).
    fn file_of(&self, name: &str) -> PathBuf {
        self.tensors
            .get(name)
            .map(|e| self.files[e.file].0.clone())
            .unwrap_or_else(|| self.dir.clone())
    }

    /// The scale block shape of FP8 tensor `name` of shape `shape`: an error unless the checkpoint
    /// declares block-scaled FP8 and the tensor is 2-D.
    fn fp8_block(&self, name: &str, shape: &[usize]) -> Result<[usize; 2]> {
        match (self.fp8_block_size, shape) {
            (Some(block), [_, _]) => Ok(block),
            _ => Err(ModelError::UnsupportedDtype {
                name: name.to_owned(),
                file: self.file_of(name),
                dtype: "F8_E4M3 outside a 2-D weight of a block-scaled fp8 checkpoint".into(),
            }),
        }
    }

    /// `kv_b_proj` as llama.cpp's quantized MLA pair (`attn_k_b`, `attn_v_b`) when a GGUF stores it
    /// so; see [`GgufTensors::get_mla_pair`].
    pub fn get_mla_pair(&self, name: &str, shape: &[usize]) -> Result<Option<(QMatrix, QMatrix)>> {
        match &self.gguf {
            Some(gguf) if !self.in_memory.contains_key(name) => gguf.get_mla_pair(name, shape),
            _ => Ok(None),
        }
    }

    /// Loads a tensor as f32, checking its shape; FP8 weights are dequantized with their block scales.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some(tensor) = self.in_memory.get(name) {
            if tensor.dims() != shape {
                return Err(ModelError::ShapeMismatch {
                    name: name.to_owned(),
                    file: self.dir.clone(),
                    expected: shape.to_vec(),
                    found: tensor.dims().to_vec(),
                });
            }
            return Ok(tensor.to_dtype(DType::F32)?);
        }
        if let Some(gguf) = &self.gguf
            && let Some(tensor) = gguf.get(name, shape, &self.device)?
        {
            return Ok(tensor);
        }
        let entry = self.entry(name)?;
        self.check_shape(name, entry, shape)?;
        let raw = self.raw(name, entry)?;
        if entry.dtype != safetensors::Dtype::F8_E4M3 {
            return Ok(raw.to_dtype(DType::F32)?);
        }
        let block = self.fp8_block(name, shape)?;
        let (rows, cols) = (shape[0], shape[1]);
        let [br, bc] = fp8_grid(block, rows, cols);
        let scale = self.fp8_scales(name, block, rows, cols)?;
        // (br, bc) -> (br, block0, bc, block1) -> (rows, cols): one scale per block.
        let scale = Tensor::from_vec(scale, (br, 1, bc, 1), &self.device)?
            .broadcast_as((br, block[0], bc, block[1]))?
            .reshape((br * block[0], bc * block[1]))?
            .narrow(0, 0, rows)?
            .narrow(1, 0, cols)?;
        Ok(raw.to_dtype(DType::F32)?.mul(&scale)?)
    }

    /// Errors unless the stored tensor `name` has shape `shape`.
    fn check_shape(&self, name: &str, entry: &TensorEntry, shape: &[usize]) -> Result<()> {
        if entry.shape != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_owned(),
                file: self.files[entry.file].0.clone(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        Ok(())
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_owned(),
                dir: self.dir.clone(),
            })
    }

    fn raw(&self, name: &str, entry: &TensorEntry) -> Result<Tensor> {
        let (file, mmap) = &self.files[entry.file];
        let dtype = match entry.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F64 => DType::F64,
            safetensors::Dtype::F8_E4M3 => DType::F8E4M3,
            other => {
                return Err(ModelError::UnsupportedDtype {
                    name: name.to_owned(),
                    file: file.clone(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        let bytes = &mmap[entry.start..entry.end];
        Ok(Tensor::from_raw_buffer(
            bytes,
            dtype,
            &entry.shape,
            &self.device,
        )?)
    }
}

/// Drops the pages of bytes `range` of `map` (a read-only map of a checkpoint file) from this
/// process, once a bf16 matrix has copied them into its panels: they stay in the page cache, and are
/// read again if touched.
pub(crate) fn release_pages(map: &Mmap, range: Range<usize>) {
    // SAFETY: the map is a read-only shared map of the file: after MADV_DONTNEED its pages read the
    // file's bytes again, so every slice of it still sees the same values. Only memory use is at
    // stake: a kernel that refuses the advice leaves the pages mapped.
    let _ =
        unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, range.start, range.len()) };
}

/// Shape of the scale grid of a (`rows`, `cols`) FP8 matrix in blocks of `block`.
fn fp8_grid(block: [usize; 2], rows: usize, cols: usize) -> [usize; 2] {
    [rows.div_ceil(block[0]), cols.div_ceil(block[1])]
}

fn shard_paths(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let parsed: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: index.to_path_buf(),
        source,
    })?;
    let mut names: Vec<&String> = parsed.weight_map.values().collect();
    names.sort();
    names.dedup();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// A name prefix into a [`Checkpoint`]: `weights.pp("self_attn").get("q_proj.weight", ..)`.
#[derive(Clone)]
pub struct Weights<'a> {
    checkpoint: &'a Checkpoint,
    prefix: String,
}

impl<'a> Weights<'a> {
    /// Extends the prefix by one dotted component.
    pub fn pp(&self, name: impl AsRef<str>) -> Weights<'a> {
        Weights {
            checkpoint: self.checkpoint,
            prefix: self.full_name(name.as_ref()),
        }
    }

    /// Full tensor name of `name` under this prefix.
    pub fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Loads `name` under this prefix as f32, checking its shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.checkpoint.get(&self.full_name(name), shape)
    }

    /// Loads `name` under this prefix in its quantized block format where it has one the kernels
    /// multiply; see [`Checkpoint::get_quantized`].
    pub fn get_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QMatrix>> {
        self.checkpoint.get_quantized(&self.full_name(name), shape)
    }

    /// `name` under this prefix as a quantized MLA pair; see [`Checkpoint::get_mla_pair`].
    pub fn get_mla_pair(&self, name: &str, shape: &[usize]) -> Result<Option<(QMatrix, QMatrix)>> {
        self.checkpoint.get_mla_pair(&self.full_name(name), shape)
    }

    /// Whether `name` exists under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.checkpoint.contains(&self.full_name(name))
    }

    /// The device tensors are loaded onto.
    pub fn device(&self) -> &Device {
        self.checkpoint.device()
    }
}
