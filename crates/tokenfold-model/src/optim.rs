//! AdamW with decoupled weight decay, gradient clipping by global norm, and the learning-rate schedules.
//!
//! Written here rather than taken from candle-nn because an exact resume needs the moment estimates, which
//! candle-nn's `AdamW` does not expose: [`AdamW::state_tensors`] and [`AdamW::load_state`] save and restore them.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// AdamW over named variables. Weight decay applies to matrices only (not to norm gains or biases).
pub struct AdamW {
    pub config: AdamWConfig,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Per-variable multiplier of the learning rate (1 unless [`AdamW::scale_lr`] set it).
    lr_scales: Vec<f64>,
    pub step: u64,
}

impl AdamW {
    pub fn new(mut vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<AdamW> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let m = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let lr_scales = vec![1.0; vars.len()];
        Ok(AdamW {
            config,
            vars,
            m,
            v,
            lr_scales,
            step: 0,
        })
    }

    /// Multiplies the learning rate (and so the decoupled decay) of the variables `selects` picks.
    pub fn scale_lr(&mut self, selects: impl Fn(&str) -> bool, scale: f64) {
        for ((name, _), s) in self.vars.iter().zip(self.lr_scales.iter_mut()) {
            if selects(name) {
                *s = scale;
            }
        }
    }

    /// One update with learning rate `lr` from gradients `grads` (already clipped).
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.config;
        let correction1 = 1.0 - c.beta1.powi(self.step as i32);
        let correction2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let Some(grad) = grads.get(name) else {
                continue;
            };
            let step = UpdateStep {
                beta1: c.beta1,
                beta2: c.beta2,
                correction1,
                correction2,
                eps: c.eps,
                lr: lr * self.lr_scales[i],
                decay: if var.rank() >= 2 { c.weight_decay } else { 0.0 },
            };
            let (next, m, v) = update(var.as_tensor(), grad, (&self.m[i], &self.v[i]), &step)?;
            var.set(&next)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moment estimates, named `m.<param>` and `v.<param>`, for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut state = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            state.insert(format!("m.{name}"), self.m[i].clone());
            state.insert(format!("v.{name}"), self.v[i].clone());
        }
        state
    }

    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        step: u64,
    ) -> std::result::Result<(), String> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let tensor = state
                    .get(&key)
                    .ok_or_else(|| format!("optimizer state lacks {key}"))?;
                if tensor.dims() != var.dims() {
                    return Err(format!(
                        "optimizer state {key} has shape {:?}, the parameter {:?}",
                        tensor.dims(),
                        var.dims()
                    ));
                }
                *slot = tensor.clone();
            }
        }
        self.step = step;
        Ok(())
    }
}

/// What one variable's AdamW update needs besides its tensors.
#[derive(Debug, Clone, Copy)]
pub struct UpdateStep {
    pub beta1: f64,
    pub beta2: f64,
    /// The bias corrections 1 − β₁ᵗ and 1 − β₂ᵗ.
    pub correction1: f64,
    pub correction2: f64,
    pub eps: f64,
    /// This variable's learning rate, and its decoupled weight decay (0 for vectors).
    pub lr: f64,
    pub decay: f64,
}

/// One variable's update: its next value and moment estimates from its gradient. The fused kernel
/// ([`crate::kernels::adamw_update`], one pass) where it runs, the plain ops otherwise.
fn update(
    var: &Tensor,
    grad: &Tensor,
    moments: (&Tensor, &Tensor),
    step: &UpdateStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    if crate::kernels::adamw_supported(var, grad, moments) {
        return crate::kernels::adamw_update(var, grad, moments, step);
    }
    update_plain(var, grad, moments, step)
}

/// [`update`] in candle ops: eight operations, each a pass over the variable and a new tensor.
pub fn update_plain(
    var: &Tensor,
    grad: &Tensor,
    (m, v): (&Tensor, &Tensor),
    s: &UpdateStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    let m = ((m * s.beta1)? + (grad * (1.0 - s.beta1))?)?;
    let v = ((v * s.beta2)? + (grad.sqr()? * (1.0 - s.beta2))?)?;
    let step = ((&m / s.correction1)? / ((&v / s.correction2)?.sqrt()? + s.eps)?)?;
    let next = ((var * (1.0 - s.lr * s.decay))? - (step * s.lr)?)?;
    Ok((next, m, v))
}

/// Gradients of named variables from a backward pass.
pub fn named_grads(vars: &[(String, Var)], grads: &GradStore) -> HashMap<String, Tensor> {
    vars.iter()
        .filter_map(|(name, var)| {
            grads
                .get(var.as_tensor())
                .map(|g| (name.clone(), g.clone()))
        })
        .collect()
}

/// Scales gradients so that their global L2 norm is at most `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// Learning-rate schedules.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Linear warmup, constant, then a cooldown to 0 over the last `cooldown_fraction` of the steps with
    /// the 1 − √ shape (Hägele et al. 2024), as in the native-multimodal scaling study.
    ConstantCooldown,
    /// Linear warmup, then cosine decay to 10% of the peak.
    Cosine,
}

/// The learning rate at `step` (0-based) of `total`.
pub fn learning_rate(
    schedule: Schedule,
    peak: f64,
    step: u64,
    total: u64,
    warmup: u64,
    cooldown_fraction: f64,
) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    match schedule {
        Schedule::ConstantCooldown => {
            let cooldown = ((total as f64) * cooldown_fraction).round() as u64;
            let start = total.saturating_sub(cooldown);
            if step < start || cooldown == 0 {
                peak
            } else {
                peak * (1.0 - ((step - start + 1) as f64 / cooldown as f64).sqrt()).max(0.0)
            }
        }
        Schedule::Cosine => {
            let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
            let min = 0.1 * peak;
            min + (peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
        }
    }
}
