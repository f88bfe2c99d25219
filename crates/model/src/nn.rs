//! The small layers every architecture shares: linear maps, RMSNorm, the SwiGLU MLP, causal masks.
//!
//! Activations are 2-D, `(tokens, features)`, in f32; weights keep the checkpoint's `(out, in)` layout.

use candle_core::{D, Device, Tensor};
use tiefsee_kernels::{MatmulJob, QMatrix, matmul_batch};

use crate::error::{ModelError, Result};
use crate::weights::Weights;

/// The weight of a linear map: an f32 tensor, or stored weights multiplied by `tiefsee_kernels`.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// (out, in) f32, differentiable.
    Dense(Tensor),
    /// (out, in) in a GGUF block format, as stored floats (f32, f16, bf16) or as DeepSeek's
    /// block-scaled FP8, read in place from the file's memory map.
    Mapped(QMatrix),
}

/// `y = x W^T (+ b)` with `W` stored as (out, in).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    /// (out)
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{prefix}.weight` of shape (out, in), and `{prefix}.bias` when `bias` is set. A weight
    /// stored in a block format the kernels multiply (a quantized GGUF) stays in that format.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = match w.get_quantized("weight", &[out_dim, in_dim])? {
            Some(q) => LinearWeight::Mapped(q),
            None => LinearWeight::Dense(w.get("weight", &[out_dim, in_dim])?),
        };
        let bias = if bias {
            Some(w.get("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// Wraps an existing (out, in) weight.
    pub fn from_weight(weight: LinearWeight) -> Self {
        Self { weight, bias: None }
    }

    /// The (out, in) weight.
    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// The weight when it is quantized and there is no bias: the map is then a bare product.
    pub fn quantized(&self) -> Option<&QMatrix> {
        match (&self.weight, &self.bias) {
            (LinearWeight::Mapped(q), None) => Some(q),
            _ => None,
        }
    }

    /// (tokens, in) -> (tokens, out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => x.matmul(&w.t()?)?,
            LinearWeight::Mapped(q) => quantized_matmul(q, x)?,
        };
        self.add_bias(y)
    }

    /// `y + b` when there is a bias.
    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// `linears[i].forward(x)` for every `i`, the quantized ones as one batch of products (one parallel
/// region, the input quantized once): the same values as one call each.
pub fn forward_all<const N: usize>(linears: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
    let quantized = linears
        .iter()
        .filter(|l| matches!(l.weight, LinearWeight::Mapped(_)))
        .count();
    let mut ys = Vec::with_capacity(N);
    if quantized < 2 {
        for linear in linears {
            ys.push(linear.forward(x)?);
        }
    } else {
        let tokens = x.dim(0)?;
        let input: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut outs: Vec<Vec<f32>> = linears
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Mapped(q) => vec![0f32; tokens * q.rows()],
                LinearWeight::Dense(_) => Vec::new(),
            })
            .collect();
        let mut jobs: Vec<MatmulJob> = linears
            .iter()
            .zip(&mut outs)
            .filter_map(|(l, out)| match &l.weight {
                LinearWeight::Mapped(matrix) => Some(MatmulJob {
                    matrix,
                    x: &input,
                    out,
                }),
                LinearWeight::Dense(_) => None,
            })
            .collect();
        matmul_batch(&mut jobs)?;
        for (linear, out) in linears.into_iter().zip(outs) {
            ys.push(match &linear.weight {
                LinearWeight::Mapped(q) => {
                    linear.add_bias(Tensor::from_vec(out, (tokens, q.rows()), x.device())?)?
                }
                LinearWeight::Dense(_) => linear.forward(x)?,
            });
        }
    }
    let mut ys = ys.into_iter();
    Ok(std::array::from_fn(|_| {
        ys.next().expect("one output per linear map")
    }))
}

/// (tokens, in) f32 -> (tokens, out) through the quantized kernels.
pub fn quantized_matmul(q: &QMatrix, x: &Tensor) -> Result<Tensor> {
    let tokens = x.dim(0)?;
    let input: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let mut out = vec![0f32; tokens * q.rows()];
    q.matmul(&input, &mut out)?;
    Ok(Tensor::from_vec(out, (tokens, q.rows()), x.device())?)
}

impl LinearWeight {
    /// The weight as an f32 (out, in) tensor, dequantizing a quantized one.
    pub fn to_dense(&self, device: &Device) -> Result<Tensor> {
        match self {
            LinearWeight::Dense(w) => Ok(w.clone()),
            LinearWeight::Mapped(q) => {
                let mut values = vec![0f32; q.rows() * q.cols()];
                for (row, out) in values.chunks_exact_mut(q.cols()).enumerate() {
                    q.dequantize_row(row, out);
                }
                Ok(Tensor::from_vec(values, (q.rows(), q.cols()), device)?)
            }
        }
    }
}

/// A token embedding table (vocab, hidden), f32 or quantized; a quantized table decodes only the rows
/// it looks up.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: LinearWeight,
    device: Device,
}

impl Embedding {
    /// Loads `{prefix}.weight` of shape (vocab, hidden), keeping a quantized GGUF table quantized.
    pub fn load(w: &Weights, vocab: usize, hidden: usize) -> Result<Self> {
        let table = match w.get_quantized("weight", &[vocab, hidden])? {
            Some(q) => LinearWeight::Mapped(q),
            None => LinearWeight::Dense(w.get("weight", &[vocab, hidden])?),
        };
        Ok(Self {
            table,
            device: w.device().clone(),
        })
    }

    /// The table as the weight of a tied output head.
    pub fn as_linear(&self) -> Linear {
        Linear::from_weight(self.table.clone())
    }

    /// The device embeddings are made on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// (tokens) ids -> (tokens, hidden)
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.table {
            LinearWeight::Dense(table) => Ok(table.index_select(ids, 0)?),
            LinearWeight::Mapped(q) => {
                let ids: Vec<u32> = ids.to_vec1()?;
                let mut out = vec![0f32; ids.len() * q.cols()];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(q.cols())) {
                    if id as usize >= q.rows() {
                        return Err(ModelError::TokenOutOfRange {
                            id,
                            vocab_size: q.rows(),
                        });
                    }
                    q.dequantize_row(id as usize, row);
                }
                Ok(Tensor::from_vec(out, (ids.len(), q.cols()), &self.device)?)
            }
        }
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
            gate: Linear::from_weight(LinearWeight::Dense(gate)),
            up: Linear::from_weight(LinearWeight::Dense(up)),
            down: Linear::from_weight(LinearWeight::Dense(down)),
        }
    }

    /// The three (out, in) weights `[gate, up, down]` when all are quantized and none has a bias.
    pub fn quantized(&self) -> Option<[&QMatrix; 3]> {
        Some([
            self.gate.quantized()?,
            self.up.quantized()?,
            self.down.quantized()?,
        ])
    }

    /// (tokens, hidden) -> (tokens, hidden)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up] = forward_all([&self.gate, &self.up], x)?;
        self.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)
    }
}

/// `silu(gate) * up`, elementwise, with candle's formulas for f32 (`v / (1 + e^-v)`, then a product),
/// so that it equals [`Mlp::forward`]'s tensor ops bit for bit.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
        .collect()
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
