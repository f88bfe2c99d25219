//! AdamW (Loshchilov & Hutter 2019) with its state kept by parameter name so that it can be saved
//! and resumed exactly, the warm-up + cosine learning-rate schedule, and global-norm gradient
//! clipping. candle-nn has an AdamW too, but its moments are private and cannot be checkpointed.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use crate::config::OptimSpec;
use crate::error::{Result, TrainError};

/// The learning rate at `step` (0-based) of `total`: linear warm-up from `lr / warmup` to `lr`,
/// then cosine decay to `min_lr` at the last step.
pub fn learning_rate(spec: &OptimSpec, step: usize, total: usize) -> f64 {
    if step < spec.warmup_steps {
        return spec.lr * (step + 1) as f64 / spec.warmup_steps as f64;
    }
    let decay_steps = total.saturating_sub(spec.warmup_steps + 1).max(1);
    let progress = ((step - spec.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    spec.min_lr + 0.5 * (spec.lr - spec.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The gradients of `vars`, scaled so that their global L2 norm is at most `max_norm` (0: no
/// clipping). Returns them with the norm before clipping.
pub fn clipped_gradients(
    vars: &BTreeMap<String, Var>,
    grads: &GradStore,
    max_norm: f64,
) -> Result<(BTreeMap<String, Tensor>, f64)> {
    let mut out = BTreeMap::new();
    let mut sum_sq = 0f64;
    for (name, var) in vars {
        let g = match grads.get(var.as_tensor()) {
            Some(g) => g.clone(),
            None => var.as_tensor().zeros_like()?,
        };
        sum_sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        out.insert(name.clone(), g);
    }
    let norm = sum_sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in out.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok((out, norm))
}

/// AdamW's state: the step count and the two moments of every parameter.
#[derive(Debug, Clone)]
pub struct AdamW {
    spec: OptimSpec,
    /// Updates applied so far.
    pub step: u64,
    first: BTreeMap<String, Tensor>,
    second: BTreeMap<String, Tensor>,
}

impl AdamW {
    /// A fresh optimizer (zero moments).
    pub fn new(spec: OptimSpec) -> Self {
        Self {
            spec,
            step: 0,
            first: BTreeMap::new(),
            second: BTreeMap::new(),
        }
    }

    /// One update of every parameter with its (already clipped) gradient at learning rate `lr`.
    /// Weight decay applies to matrices only, not to norms' scales.
    pub fn update(
        &mut self,
        vars: &BTreeMap<String, Var>,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
    ) -> Result<()> {
        self.step += 1;
        let (b1, b2) = (self.spec.beta1, self.spec.beta2);
        let t = self.step as i32;
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { continue };
            let m = match self.first.get(name) {
                Some(m) => ((m * b1)? + (g * (1.0 - b1))?)?,
                None => (g * (1.0 - b1))?,
            };
            let v = match self.second.get(name) {
                Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
                None => (g.sqr()? * (1.0 - b2))?,
            };
            let step = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.spec.eps)?)?;
            let p = var.as_tensor();
            let decay = if p.rank() >= 2 {
                self.spec.weight_decay
            } else {
                0.0
            };
            let new = ((p * (1.0 - lr * decay))? - (step * lr)?)?;
            var.set(&new)?;
            self.first.insert(name.clone(), m);
            self.second.insert(name.clone(), v);
        }
        Ok(())
    }

    /// Writes the moments to `path` (safetensors; the step count goes in the trainer state).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self
            .first
            .iter()
            .map(|(n, t)| (format!("m.{n}"), t.clone()))
            .chain(
                self.second
                    .iter()
                    .map(|(n, t)| (format!("v.{n}"), t.clone())),
            )
            .collect();
        candle_core::safetensors::save(&tensors, path).map_err(|e| TrainError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// The optimizer saved at `path` after `step` updates.
    pub fn load(spec: OptimSpec, path: &Path, step: u64) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            TrainError::NotACheckpoint {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        let mut out = Self::new(spec);
        out.step = step;
        for (name, t) in tensors {
            if let Some(n) = name.strip_prefix("m.") {
                out.first.insert(n.to_string(), t);
            } else if let Some(n) = name.strip_prefix("v.") {
                out.second.insert(n.to_string(), t);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn spec() -> OptimSpec {
        OptimSpec {
            lr: 1e-2,
            min_lr: 1e-3,
            warmup_steps: 10,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let s = spec();
        assert!((learning_rate(&s, 0, 100) - 1e-3).abs() < 1e-12);
        assert!((learning_rate(&s, 9, 100) - 1e-2).abs() < 1e-12);
        assert!((learning_rate(&s, 10, 100) - 1e-2).abs() < 1e-12);
        assert!((learning_rate(&s, 99, 100) - 1e-3).abs() < 1e-12);
        // Halfway through the decay: the mean of peak and floor.
        let mid = learning_rate(&s, 10 + 89 / 2, 100);
        assert!((mid - 5.5e-3).abs() < 2e-4, "{mid}");
    }

    #[test]
    fn adamw_matches_hand_computation() {
        // One matrix parameter, two steps with gradients 0.5 then -1 (elementwise).
        let var = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0]], &Device::Cpu).unwrap()).unwrap();
        let vars = BTreeMap::from([("w".to_string(), var.clone())]);
        let mut opt = AdamW::new(spec());
        let (lr, wd, b1, b2, eps) = (0.01f64, 0.1, 0.9, 0.95, 1e-8);
        let mut p = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for (t, g) in [(1, 0.5f64), (2, -1.0)] {
            let grads = BTreeMap::from([(
                "w".to_string(),
                Tensor::new(&[[g as f32, g as f32]], &Device::Cpu).unwrap(),
            )]);
            opt.update(&vars, &grads, lr).unwrap();
            for i in 0..2 {
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let mh = m[i] / (1.0 - b1.powi(t));
                let vh = v[i] / (1.0 - b2.powi(t));
                p[i] = p[i] * (1.0 - lr * wd) - lr * mh / (vh.sqrt() + eps);
            }
        }
        let got: Vec<Vec<f32>> = var.as_tensor().to_vec2().unwrap();
        for i in 0..2 {
            assert!(
                (f64::from(got[0][i]) - p[i]).abs() < 1e-6,
                "{got:?} vs {p:?}"
            );
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let a = Var::zeros((2,), DType::F32, &Device::Cpu).unwrap();
        let b = Var::zeros((1,), DType::F32, &Device::Cpu).unwrap();
        // loss = 3a0 + 0a1 + 4b0: gradient norm 5.
        let coef = Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap();
        let loss = ((a.as_tensor() * &coef).unwrap().sum_all().unwrap()
            + (b.as_tensor() * 4.0).unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let vars = BTreeMap::from([("a".to_string(), a), ("b".to_string(), b)]);
        let (clipped, norm) = clipped_gradients(&vars, &grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let ga: Vec<f32> = clipped["a"].to_vec1().unwrap();
        let gb: Vec<f32> = clipped["b"].to_vec1().unwrap();
        assert!((ga[0] - 0.6).abs() < 1e-5 && ga[1] == 0.0 && (gb[0] - 0.8).abs() < 1e-5);
    }
}
