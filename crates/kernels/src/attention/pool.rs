//! Cache rows in storage: one pool of fixed-width rows ("slots") per layer, in f32 (exact), bf16, or
//! an 8-bit format like llama.cpp's Q8_0 (but with an f32 scale per block of 32 values, not an f16 one).

use half::bf16;

use super::AttentionError;

/// Values per Q8 block, each block with its own scale (as in ggml's Q8_0).
pub(super) const Q8_BLOCK: usize = 32;

/// How the cache stores row values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheFormat {
    /// f32, exact: the reference the others are measured against.
    F32,
    /// bf16, rounded to nearest even on write.
    Bf16,
    /// int8 with one f32 scale per block of 32 values (absmax / 127), half the bytes of bf16.
    Q8,
}

impl CacheFormat {
    /// A short lowercase name ("f32", "bf16", "q8").
    pub fn name(self) -> &'static str {
        match self {
            CacheFormat::F32 => "f32",
            CacheFormat::Bf16 => "bf16",
            CacheFormat::Q8 => "q8",
        }
    }

    /// Bytes a row of `width` values takes, or `None` when this format cannot store such rows (q8
    /// needs whole blocks of 32).
    pub fn bytes_per_row(self, width: usize) -> Option<usize> {
        match self {
            CacheFormat::F32 => Some(4 * width),
            CacheFormat::Bf16 => Some(2 * width),
            CacheFormat::Q8 if width.is_multiple_of(Q8_BLOCK) => {
                Some(width + 4 * (width / Q8_BLOCK))
            }
            CacheFormat::Q8 => None,
        }
    }
}

/// The stored values of every slot.
#[derive(Clone)]
pub(super) enum Storage {
    /// (slots, width)
    F32(Vec<f32>),
    /// (slots, width)
    Bf16(Vec<bf16>),
    /// values (slots, width), scales (slots, width / Q8_BLOCK)
    Q8 { values: Vec<i8>, scales: Vec<f32> },
}

/// A pool of fixed-width rows ("slots") in one [`CacheFormat`]: one per layer in the model.
#[derive(Clone)]
pub struct RowPool {
    slots: usize,
    width: usize,
    storage: Storage,
}

impl std::fmt::Debug for RowPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowPool")
            .field("format", &self.format())
            .field("slots", &self.slots)
            .field("width", &self.width)
            .finish()
    }
}

impl RowPool {
    /// A pool of `slots` zeroed rows of `width` values; Q8 needs `width` to be a multiple of 32.
    pub fn new(format: CacheFormat, slots: usize, width: usize) -> Result<Self, AttentionError> {
        let values = slots
            .checked_mul(width)
            .ok_or(AttentionError::PoolSize { slots, width })?;
        let storage = match format {
            CacheFormat::F32 => Storage::F32(vec![0.0; values]),
            CacheFormat::Bf16 => Storage::Bf16(vec![bf16::ZERO; values]),
            CacheFormat::Q8 => {
                if !width.is_multiple_of(Q8_BLOCK) {
                    return Err(AttentionError::Q8Width {
                        width,
                        block: Q8_BLOCK,
                    });
                }
                Storage::Q8 {
                    values: vec![0; values],
                    scales: vec![0.0; values / Q8_BLOCK],
                }
            }
        };
        Ok(Self {
            slots,
            width,
            storage,
        })
    }

    /// The format rows are stored in.
    pub fn format(&self) -> CacheFormat {
        match self.storage {
            Storage::F32(_) => CacheFormat::F32,
            Storage::Bf16(_) => CacheFormat::Bf16,
            Storage::Q8 { .. } => CacheFormat::Q8,
        }
    }

    /// How many rows the pool holds.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Values per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Exact storage per row in bytes (f32: 4 * width; bf16: 2 * width; q8: width + 4 * width / 32).
    pub fn bytes_per_row(&self) -> usize {
        match self.storage {
            Storage::F32(_) => 4 * self.width,
            Storage::Bf16(_) => 2 * self.width,
            Storage::Q8 { .. } => self.width + 4 * (self.width / Q8_BLOCK),
        }
    }

    /// Storage of the whole pool in bytes.
    pub fn bytes(&self) -> usize {
        self.slots * self.bytes_per_row()
    }

    /// Stores `row` (`width` values) in `slot`, rounding to the pool's format.
    pub fn write(&mut self, slot: usize, row: &[f32]) -> Result<(), AttentionError> {
        self.check(slot, row.len())?;
        let w = self.width;
        match &mut self.storage {
            Storage::F32(data) => data[slot * w..][..w].copy_from_slice(row),
            Storage::Bf16(data) => {
                for (dst, &x) in data[slot * w..][..w].iter_mut().zip(row) {
                    *dst = bf16::from_f32(x);
                }
            }
            Storage::Q8 { values, scales } => {
                let values = values[slot * w..][..w].chunks_exact_mut(Q8_BLOCK);
                let scales = &mut scales[slot * w / Q8_BLOCK..][..w / Q8_BLOCK];
                for ((dst, scale), src) in values.zip(scales).zip(row.chunks_exact(Q8_BLOCK)) {
                    let amax = src.iter().fold(0.0f32, |a, x| a.max(x.abs()));
                    let d = amax / 127.0;
                    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                    for (q, &x) in dst.iter_mut().zip(src) {
                        *q = (x * inv).round().clamp(-127.0, 127.0) as i8;
                    }
                    *scale = d;
                }
            }
        }
        Ok(())
    }

    /// The row in `slot` as f32 (`out` holds `width` values).
    pub fn read(&self, slot: usize, out: &mut [f32]) -> Result<(), AttentionError> {
        self.check(slot, out.len())?;
        self.read_unchecked(slot, out);
        Ok(())
    }

    /// [`RowPool::read`] without the checks, for callers that validated `slot` and `out.len()`.
    pub(super) fn read_unchecked(&self, slot: usize, out: &mut [f32]) {
        let w = self.width;
        match &self.storage {
            Storage::F32(data) => out.copy_from_slice(&data[slot * w..][..w]),
            Storage::Bf16(data) => {
                for (dst, x) in out.iter_mut().zip(&data[slot * w..][..w]) {
                    *dst = x.to_f32();
                }
            }
            Storage::Q8 { values, scales } => {
                let values = values[slot * w..][..w].chunks_exact(Q8_BLOCK);
                let scales = &scales[slot * w / Q8_BLOCK..][..w / Q8_BLOCK];
                for ((dst, src), &d) in out.chunks_exact_mut(Q8_BLOCK).zip(values).zip(scales) {
                    for (y, &q) in dst.iter_mut().zip(src) {
                        *y = f32::from(q) * d;
                    }
                }
            }
        }
    }

    /// The stored values, for the kernels' own row conversion.
    pub(super) fn storage(&self) -> &Storage {
        &self.storage
    }

    fn check(&self, slot: usize, len: usize) -> Result<(), AttentionError> {
        if slot >= self.slots {
            return Err(AttentionError::SlotOutOfRange {
                slot,
                slots: self.slots,
            });
        }
        if len != self.width {
            return Err(AttentionError::RowLength {
                expected: self.width,
                found: len,
            });
        }
        Ok(())
    }
}
