//! The small layers every architecture shares: linear maps, RMSNorm, the SwiGLU MLP, causal masks.
//!
//! Activations are 2-D, `(tokens, features)`, in f32; weights keep the checkpoint's `(out, in)` layout.

use candle_core::{D, Device, Tensor};

use crate::error::Result;
use crate::weights::Weights;

/// `y = x W^T (+ b)` with `W` stored as (out, in).
#[derive(Debug, Clone)]
pub struct Linear {
    /// (out, in)
    weight: Tensor,
    /// (out)
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{prefix}.weight` of shape (out, in), and `{prefix}.bias` when `bias` is set.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get("weight", &[out_dim, in_dim])?;
        let bias = if bias {
            Some(w.get("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// Wraps an existing (out, in) weight.
    pub fn from_weight(weight: Tensor) -> Self {
        Self { weight, bias: None }
    }

    /// The (out, in) weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// (tokens, in) -> (tokens, out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Root-mean-square normalization with a learned scale, computed in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// (dim)
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Loads `{prefix}.weight` of shape (dim).
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get("weight", &[dim])?,
            eps: eps as f32,
        })
    }

    /// Normalizes over the last dimension. Composed of plain tensor ops (candle-nn's fused
    /// `rms_norm` passes no gradient), so training and inference run the same code.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(mean_square + self.eps as f64)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`, used for dense layers and experts alike.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    /// Loads `gate_proj`, `up_proj` and `down_proj` under `w`.
    pub fn load(w: &Weights, hidden: usize, intermediate: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            gate: Linear::load(&w.pp("gate_proj"), hidden, intermediate, bias)?,
            up: Linear::load(&w.pp("up_proj"), hidden, intermediate, bias)?,
            down: Linear::load(&w.pp("down_proj"), intermediate, hidden, bias)?,
        })
    }

    /// An MLP from its three (out, in) weights.
    pub fn from_weights(gate: Tensor, up: Tensor, down: Tensor) -> Self {
        Self {
            gate: Linear::from_weight(gate),
            up: Linear::from_weight(up),
            down: Linear::from_weight(down),
        }
    }

    /// (tokens, hidden) -> (tokens, hidden)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        self.down.forward(&(gate * self.up.forward(x)?)?)
    }
}

/// Additive causal mask (queries, keys) for queries at positions `start .. start + queries`
/// attending to keys `0 .. start + queries`: 0 where allowed, -inf in the future.
pub fn causal_mask(start: usize, queries: usize, device: &Device) -> Result<Tensor> {
    let keys = start + queries;
    let mask: Vec<f32> = (0..queries)
        .flat_map(|q| {
            (0..keys).map(move |k| {
                if k > start + q {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (queries, keys), device)?)
}

/// Softmax over the last dimension of scaled scores with an optional additive mask broadcast in.
pub fn masked_softmax(scores: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let scores = (scores * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    Ok(candle_nn::ops::softmax(&scores, D::Minus1)?)
}
