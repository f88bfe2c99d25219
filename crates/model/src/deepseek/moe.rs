//! DeepSeekMoE (DeepSeek-V2 paper 2.2, V3 paper 2.1.2): shared experts plus fine-grained routed experts.
//!
//! The router turns each token's logits into scores (softmax or sigmoid), optionally limits the
//! choice to the best `topk_group` expert groups, picks `top_k` experts and weights them. V3 adds
//! `e_score_correction_bias` to the scores for *selection only* (auxiliary-loss-free balancing); the
//! weights come from the unbiased scores. Weight normalization follows DeepSeek's own code: V2
//! either normalizes or scales by `routed_scaling_factor`, V3 normalizes (if asked) and then scales.
//! (transformers' V2 router ignores `norm_topk_prob`; it agrees wherever that flag is false.)

use candle_core::{D, DType, Tensor};

use crate::config::{DeepSeekConfig, DeepSeekVersion, ScoringFunc, TopkMethod};
use tiefsee_kernels::{MatmulJob, QMatrix, matmul_batch};

use crate::error::{ModelError, Result};
use crate::nn::{Mlp, swiglu};
use crate::weights::Weights;

/// Expert selection for one token: `(expert index, weight)` pairs.
pub type Routing = Vec<(usize, f32)>;

/// The routing rule of a MoE layer, independent of any weights but the router's.
#[derive(Debug, Clone)]
pub struct Router {
    pub version: DeepSeekVersion,
    pub scoring: ScoringFunc,
    pub method: TopkMethod,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
    /// (experts) bias added to scores for selection only (`noaux_tc`).
    pub correction_bias: Option<Vec<f32>>,
}

impl Router {
    /// The routing rule a config describes, with the layer's correction bias.
    pub fn from_config(cfg: &DeepSeekConfig, correction_bias: Option<Vec<f32>>) -> Self {
        Self {
            version: cfg.version,
            scoring: cfg.scoring_func,
            method: cfg.topk_method,
            top_k: cfg.num_experts_per_tok,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            norm_topk_prob: cfg.norm_topk_prob,
            routed_scaling_factor: cfg.routed_scaling_factor as f32,
            correction_bias,
        }
    }

    /// Chooses experts and their weights from one token's router logits (experts).
    pub fn route(&self, logits: &[f32]) -> Routing {
        let n = logits.len();
        let scores: Vec<f32> = match self.scoring {
            ScoringFunc::Softmax => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
                let sum: f32 = exp.iter().sum();
                exp.iter().map(|e| e / sum).collect()
            }
            ScoringFunc::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
        };
        let choice: Vec<f32> = match (&self.correction_bias, self.method) {
            (Some(bias), TopkMethod::NoauxTc) => {
                scores.iter().zip(bias).map(|(s, b)| s + b).collect()
            }
            _ => scores.clone(),
        };
        let mut allowed = vec![true; n];
        let group_size = n / self.n_group;
        let group_score = |g: usize| -> f32 {
            let mut members: Vec<f32> = choice[g * group_size..(g + 1) * group_size].to_vec();
            members.sort_by(|a, b| b.total_cmp(a));
            match self.method {
                // V3 ranks a group by the sum of its two best (biased) scores.
                TopkMethod::NoauxTc => members.iter().take(2).sum(),
                _ => members[0],
            }
        };
        if self.method != TopkMethod::Greedy && self.n_group > 1 {
            let kept = top_indices(
                &(0..self.n_group).map(group_score).collect::<Vec<_>>(),
                self.topk_group,
            );
            for (e, allow) in allowed.iter_mut().enumerate() {
                *allow = kept.contains(&(e / group_size));
            }
        }
        let masked: Vec<f32> = choice
            .iter()
            .zip(&allowed)
            .map(|(&c, &a)| if a { c } else { f32::NEG_INFINITY })
            .collect();
        let chosen = top_indices(&masked, self.top_k);
        let mut weights: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
        let (normalize, scale) = self.weight_rule();
        if normalize {
            let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        if scale {
            weights
                .iter_mut()
                .for_each(|w| *w *= self.routed_scaling_factor);
        }
        chosen.into_iter().zip(weights).collect()
    }

    /// Whether the chosen experts' scores are normalized to sum to one, and whether they are then
    /// multiplied by `routed_scaling_factor`: DeepSeek-V2 does one or the other, V3 both.
    fn weight_rule(&self) -> (bool, bool) {
        let normalize =
            self.norm_topk_prob && (self.version == DeepSeekVersion::V3 || self.top_k > 1);
        let scale = !normalize || self.version == DeepSeekVersion::V3;
        (normalize, scale)
    }

    /// Scores (tokens, experts) as a differentiable tensor, by the configured scoring function.
    fn scores(&self, logits: &Tensor) -> Result<Tensor> {
        Ok(match self.scoring {
            ScoringFunc::Softmax => candle_nn::ops::softmax(logits, D::Minus1)?,
            ScoringFunc::Sigmoid => (logits.neg()?.exp()? + 1.0)?.recip()?,
        })
    }

    /// The routing weights (tokens, top_k) of chosen experts, from their scores (tokens, top_k) by
    /// the same rule as [`Router::route`], as tensor ops so that gradients reach the router.
    fn weights(&self, chosen_scores: &Tensor) -> Result<Tensor> {
        let (normalize, scale) = self.weight_rule();
        let mut weights = chosen_scores.clone();
        if normalize {
            let sum = (weights.sum_keepdim(D::Minus1)? + 1e-20)?;
            weights = weights.broadcast_div(&sum)?;
        }
        if scale {
            weights = (weights * self.routed_scaling_factor as f64)?;
        }
        Ok(weights)
    }
}

/// Indices of the `k` largest values, largest first.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    order.truncate(k);
    order
}

/// A DeepSeekMoE feed-forward layer: router, routed experts, shared experts.
#[derive(Debug, Clone)]
pub struct Moe {
    /// (experts, hidden)
    gate: Tensor,
    router: Router,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
}

impl Moe {
    /// Loads `mlp` of a MoE layer, with per-expert tensors as DeepSeek publishes them.
    pub fn load(w: &Weights, cfg: &DeepSeekConfig) -> Result<Self> {
        let (hidden, n) = (cfg.hidden_size, cfg.n_routed_experts);
        let gate = w.get("gate.weight", &[n, hidden])?;
        let correction_bias = if cfg.topk_method == TopkMethod::NoauxTc {
            let name = "gate.e_score_correction_bias";
            if !w.contains(name) {
                return Err(ModelError::MissingTensor {
                    name: w.full_name(name),
                    dir: "the checkpoint (topk_method noaux_tc needs it)".into(),
                });
            }
            Some(w.get(name, &[n])?.to_dtype(DType::F32)?.to_vec1()?)
        } else {
            None
        };
        let inter = cfg.moe_intermediate_size;
        let experts = if w.contains("experts.gate_up_proj") {
            // transformers 5 saves experts fused: gate_up_proj (experts, 2 * inter, hidden) with the
            // gate rows first, down_proj (experts, hidden, inter).
            let gate_up = w.get("experts.gate_up_proj", &[n, 2 * inter, hidden])?;
            let down = w.get("experts.down_proj", &[n, hidden, inter])?;
            (0..n)
                .map(|i| {
                    let gate_up = gate_up.get(i)?;
                    Ok(Mlp::from_weights(
                        gate_up.narrow(0, 0, inter)?,
                        gate_up.narrow(0, inter, inter)?,
                        down.get(i)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            (0..n)
                .map(|i| Mlp::load(&w.pp(format!("experts.{i}")), hidden, inter, false))
                .collect::<Result<Vec<_>>>()?
        };
        let shared = if cfg.n_shared_experts > 0 {
            Some(Mlp::load(
                &w.pp("shared_experts"),
                hidden,
                cfg.moe_intermediate_size * cfg.n_shared_experts,
                false,
            )?)
        } else {
            None
        };
        Ok(Self {
            gate,
            router: Router::from_config(cfg, correction_bias),
            experts,
            shared,
        })
    }

    /// (tokens, hidden) -> (tokens, hidden). Each expert runs once on the tokens routed to it.
    /// Experts are chosen by [`Router::route`]; their weights are recomputed from the scores as
    /// tensor ops, so the router's weight receives gradients in training.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_traced(x)?.0)
    }

    /// [`Moe::forward`] that also returns how the tokens were routed, for load balancing in training.
    pub fn forward_traced(&self, x: &Tensor) -> Result<(Tensor, RoutingTrace)> {
        let logits = x.matmul(&self.gate.t()?)?; // (tokens, experts)
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        let top_k = self.router.top_k;
        let mut chosen = Vec::with_capacity(rows.len() * top_k);
        // Per expert: the tokens routed to it and the (token * top_k + slot) of their weights.
        let mut per_expert: Vec<(Vec<u32>, Vec<u32>)> =
            vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (token, row) in rows.iter().enumerate() {
            for (slot, (expert, _)) in self.router.route(row).into_iter().enumerate() {
                chosen.push(expert as u32);
                per_expert[expert].0.push(token as u32);
                per_expert[expert].1.push((token * top_k + slot) as u32);
            }
        }
        let trace_chosen = chosen.clone();
        let chosen = Tensor::from_vec(chosen, (rows.len(), top_k), x.device())?;
        let all_scores = self.router.scores(&logits)?; // (tokens, experts)
        let scores = all_scores.gather(&chosen, 1)?; // (tokens, top_k)
        let weights = self.router.weights(&scores)?.flatten_all()?;
        let out = if self.is_quantized() {
            self.forward_quantized(x, &per_expert, &weights.to_vec1()?)?
        } else {
            self.forward_dense(x, per_expert, &weights)?
        };
        Ok((
            out,
            RoutingTrace {
                scores: all_scores,
                chosen: trace_chosen,
                top_k,
            },
        ))
    }

    /// Whether every expert, shared ones included, is a bare quantized product (a quantized GGUF).
    fn is_quantized(&self) -> bool {
        self.experts
            .iter()
            .chain(&self.shared)
            .all(|e| e.quantized().is_some())
    }

    /// The experts as tensor ops, differentiable: each routed expert's output, times its weight from
    /// `weights` (tokens * top_k), is added to the shared experts' output at its tokens.
    fn forward_dense(
        &self,
        x: &Tensor,
        per_expert: Vec<(Vec<u32>, Vec<u32>)>,
        weights: &Tensor,
    ) -> Result<Tensor> {
        let mut out = match &self.shared {
            Some(shared) => shared.forward(x)?,
            None => x.zeros_like()?,
        };
        for (expert, (tokens, slots)) in self.experts.iter().zip(per_expert) {
            if tokens.is_empty() {
                continue;
            }
            let n = tokens.len();
            let index = Tensor::from_vec(tokens, n, x.device())?;
            let slots = Tensor::from_vec(slots, n, x.device())?;
            let weight = weights.index_select(&slots, 0)?.reshape((n, 1))?;
            let y = expert
                .forward(&x.index_select(&index, 0)?)?
                .broadcast_mul(&weight)?;
            out = out.index_add(&index, &y, 0)?;
        }
        Ok(out)
    }

    /// [`Moe::forward_dense`] over quantized experts, with the same per-expert arithmetic, in two
    /// batches of products: every gate and up projection at once, then every down projection. A
    /// decode step thus waits for its threads twice per layer instead of three times per expert.
    fn forward_quantized(
        &self,
        x: &Tensor,
        per_expert: &[(Vec<u32>, Vec<u32>)],
        weights: &[f32],
    ) -> Result<Tensor> {
        let (tokens, hidden) = x.dims2()?;
        let input: Vec<f32> = x.flatten_all()?.to_vec1()?; // (tokens, hidden)
        // Each routed expert's rows of the input: (n, hidden) for its n tokens.
        let gathered: Vec<Vec<f32>> = per_expert
            .iter()
            .map(|(rows, _)| {
                rows.iter()
                    .flat_map(|&t| &input[t as usize * hidden..(t as usize + 1) * hidden])
                    .copied()
                    .collect()
            })
            .collect();
        // Shared experts first, then routed ones in index order: ([gate, up, down], (n, hidden) input).
        let active: Vec<([&QMatrix; 3], &[f32])> = self
            .shared
            .iter()
            .map(|s| (s, input.as_slice()))
            .chain(
                self.experts
                    .iter()
                    .zip(&gathered)
                    .filter(|(_, x)| !x.is_empty())
                    .map(|(e, x)| (e, x.as_slice())),
            )
            .filter_map(|(mlp, x)| Some((mlp.quantized()?, x)))
            .collect();
        let rows = |x: &[f32]| x.len() / hidden;
        // (n, intermediate) gate and up outputs of each active expert.
        let mut gates: Vec<Vec<f32>> = active
            .iter()
            .map(|([g, _, _], x)| vec![0f32; rows(x) * g.rows()])
            .collect();
        let mut ups = gates.clone();
        let mut jobs: Vec<MatmulJob> = Vec::with_capacity(2 * active.len());
        for ((([gate, up, _], x), g), u) in active.iter().zip(&mut gates).zip(&mut ups) {
            jobs.push(MatmulJob {
                matrix: gate,
                x,
                out: g,
            });
            jobs.push(MatmulJob {
                matrix: up,
                x,
                out: u,
            });
        }
        matmul_batch(&mut jobs)?;
        let mids: Vec<Vec<f32>> = gates.iter().zip(&ups).map(|(g, u)| swiglu(g, u)).collect();
        // (n, hidden) down outputs of each active expert.
        let mut downs: Vec<Vec<f32>> = active
            .iter()
            .map(|(_, x)| vec![0f32; rows(x) * hidden])
            .collect();
        let mut jobs: Vec<MatmulJob> = active
            .iter()
            .zip(&mids)
            .zip(&mut downs)
            .map(|((([_, _, down], _), x), out)| MatmulJob {
                matrix: down,
                x,
                out,
            })
            .collect();
        matmul_batch(&mut jobs)?;
        let mut downs = downs.into_iter();
        let mut out = match self.shared {
            Some(_) => downs.next().unwrap_or_default(),
            None => vec![0f32; tokens * hidden],
        }; // (tokens, hidden)
        let routed = per_expert.iter().filter(|(rows, _)| !rows.is_empty());
        for ((rows, slots), y) in routed.zip(downs) {
            for ((&t, &slot), y) in rows.iter().zip(slots).zip(y.chunks_exact(hidden)) {
                let w = weights[slot as usize];
                let dst = &mut out[t as usize * hidden..(t as usize + 1) * hidden];
                for (o, &v) in dst.iter_mut().zip(y) {
                    *o += v * w;
                }
            }
        }
        Ok(Tensor::from_vec(out, (tokens, hidden), x.device())?)
    }
}

/// How one MoE layer routed a batch of tokens: what balancing needs (DeepSeek-V3 2.1.2).
#[derive(Debug, Clone)]
pub struct RoutingTrace {
    /// Unbiased affinities `s_{i,t}`, differentiable. `// (tokens, experts)`
    pub scores: Tensor,
    /// Chosen experts, `top_k` per token, token-major (selected with the correction bias).
    pub chosen: Vec<u32>,
    /// Experts per token.
    pub top_k: usize,
}
