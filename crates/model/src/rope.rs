//! Rotary position embeddings: frequency tables (plain, linear, YaRN, Llama 3) and their application.
//!
//! Frequencies follow transformers' `modeling_rope_utils` (YaRN as in the YaRN paper and DeepSeek-V2's
//! code: a linear ramp between interpolated and extrapolated frequencies, cos/sin scaled by
//! `mscale(factor, mscale) / mscale(factor, mscale_all_dim)`). DeepSeek rotates interleaved pairs
//! `(x0, x1), (x2, x3), ...`; Llama and Qwen2 rotate the two halves `(x_i, x_{i + d/2})`.

use candle_core::{Device, Tensor};

use crate::config::RopeScaling;
use crate::error::Result;

/// Which elements of a head form the rotated pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs, as DeepSeek-V2/V3 checkpoints use them.
    Interleaved,
    /// First half paired with second half (`rotate_half`), as Llama and Qwen2 use them.
    HalfSplit,
}

/// `0.1 * mscale * ln(scale) + 1` for scale > 1, else 1 (YaRN's attention temperature).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// The frequency table of one rotary embedding, and how it pairs elements.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// (dim / 2) inverse frequencies.
    inv_freq: Vec<f64>,
    /// Multiplier of cos and sin (YaRN's attention factor; 1 otherwise).
    attention_factor: f64,
    style: RopeStyle,
}

impl RotaryEmbedding {
    /// Builds the table for heads of `dim` rotated elements.
    pub fn new(dim: usize, theta: f64, scaling: &RopeScaling, style: RopeStyle) -> Self {
        let base: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64))
            .collect();
        let (inv_freq, attention_factor) = match *scaling {
            RopeScaling::None => (base, 1.0),
            RopeScaling::Linear { factor } => (base.iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::Factors(ref factors) => (
                base.iter()
                    .zip(factors.iter().chain(std::iter::repeat(&1.0)))
                    .map(|(f, d)| f / d)
                    .collect(),
                1.0,
            ),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_len = original_max_position_embeddings as f64;
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                let scaled = base
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_len / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (scaled, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
            } => {
                let correction_dim = |rotations: f64| {
                    dim as f64
                        * (original_max_position_embeddings as f64
                            / (rotations * 2.0 * std::f64::consts::PI))
                            .ln()
                        / (2.0 * theta.ln())
                };
                let low = correction_dim(beta_fast).floor().max(0.0);
                let high = correction_dim(beta_slow).ceil().min(dim as f64 - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                let blended = base
                    .iter()
                    .enumerate()
                    .map(|(i, &extrapolated)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        extrapolated / factor * (1.0 - keep) + extrapolated * keep
                    })
                    .collect();
                let attention_factor = attention_factor.unwrap_or_else(|| {
                    if mscale != 0.0 && mscale_all_dim != 0.0 {
                        yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                    } else {
                        yarn_mscale(factor, 1.0)
                    }
                });
                (blended, attention_factor)
            }
        };
        Self {
            inv_freq,
            attention_factor,
            style,
        }
    }

    /// cos and sin tables, each (positions, dim / 2), for the given positions.
    pub fn cos_sin(&self, positions: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &pos in positions {
            for &f in &self.inv_freq {
                let angle = pos as f64 * f;
                cos.push((angle.cos() * self.attention_factor) as f32);
                sin.push((angle.sin() * self.attention_factor) as f32);
            }
        }
        Ok((
            Tensor::from_vec(cos, (positions.len(), half), device)?,
            Tensor::from_vec(sin, (positions.len(), half), device)?,
        ))
    }

    /// Rotates `x` of shape (batch, heads, seq, dim) at positions `start .. start + seq`.
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let positions: Vec<usize> = (start..start + x.dim(2)?).collect();
        self.apply_at(x, &positions)
    }

    /// Rotates `x` of shape (batch, heads, seq, dim), element `i` of the sequence axis at
    /// `positions[i]` (tokens of several sequences batched together). Composed of plain tensor
    /// ops (candle-nn's fused rope passes no gradient).
    pub fn apply_at(&self, x: &Tensor, positions: &[usize]) -> Result<Tensor> {
        let (b, h, seq, dim) = x.dims4()?;
        let half = dim / 2;
        let (cos, sin) = self.cos_sin(positions, x.device())?; // (seq, dim / 2) each
        Ok(match self.style {
            RopeStyle::Interleaved => {
                // (b, h, seq, dim) -> (b, h, seq, dim / 2, 2): pairs (x0, x1), (x2, x3), ...
                let pairs = x.reshape((b, h, seq, half, 2))?;
                let even = pairs.narrow(4, 0, 1)?.squeeze(4)?;
                let odd = pairs.narrow(4, 1, 1)?.squeeze(4)?;
                let rot_even = (even.broadcast_mul(&cos)? - odd.broadcast_mul(&sin)?)?;
                let rot_odd = (even.broadcast_mul(&sin)? + odd.broadcast_mul(&cos)?)?;
                Tensor::stack(&[rot_even, rot_odd], 4)?.reshape((b, h, seq, dim))?
            }
            RopeStyle::HalfSplit => {
                let first = x.narrow(3, 0, half)?;
                let second = x.narrow(3, half, half)?;
                let rot_first = (first.broadcast_mul(&cos)? - second.broadcast_mul(&sin)?)?;
                let rot_second = (second.broadcast_mul(&cos)? + first.broadcast_mul(&sin)?)?;
                Tensor::cat(&[rot_first, rot_second], 3)?
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mscale_is_one_without_scaling() {
        assert_eq!(yarn_mscale(1.0, 0.707), 1.0);
        assert!((yarn_mscale(40.0, 1.0) - (0.1 * 40f64.ln() + 1.0)).abs() < 1e-12);
    }

    #[test]
    fn interleaved_rotation_turns_adjacent_pairs() -> Result<()> {
        // One head of dim 4 at position 1 with theta chosen so the two frequencies are 1 and 0.01.
        let rope = RotaryEmbedding::new(4, 10000.0, &RopeScaling::None, RopeStyle::Interleaved);
        let x = Tensor::new(&[1f32, 0., 0., 1.], &Device::Cpu)?.reshape((1, 1, 1, 4))?;
        let y: Vec<f32> = rope.apply(&x, 1)?.flatten_all()?.to_vec1()?;
        let (c0, s0) = (1f64.cos() as f32, 1f64.sin() as f32);
        let (c1, s1) = (0.01f64.cos() as f32, 0.01f64.sin() as f32);
        let expected = [c0, s0, -s1, c1];
        for (a, b) in y.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {expected:?}");
        }
        Ok(())
    }

    #[test]
    fn half_split_rotation_pairs_halves() -> Result<()> {
        let rope = RotaryEmbedding::new(4, 10000.0, &RopeScaling::None, RopeStyle::HalfSplit);
        let x = Tensor::new(&[1f32, 0., 0., 1.], &Device::Cpu)?.reshape((1, 1, 1, 4))?;
        let y: Vec<f32> = rope.apply(&x, 1)?.flatten_all()?.to_vec1()?;
        // Pairs (x0, x2) at frequency 1 and (x1, x3) at frequency 0.01.
        let (c0, s0) = (1f64.cos() as f32, 1f64.sin() as f32);
        let (c1, s1) = (0.01f64.cos() as f32, 0.01f64.sin() as f32);
        let expected = [c0, -s1, s0, c1];
        for (a, b) in y.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {expected:?}");
        }
        Ok(())
    }
}
