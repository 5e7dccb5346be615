//! Mixture-of-experts FFN: E SwiGLU experts, token-choice top-k routing, dropless.
//!
//! Each token's router probabilities p = softmax(W_r·x) pick its top k experts; its output is
//! Σ_{e ∈ top-k} g_e·FFN_e(x) with g_e = p_e for k = 1 (Switch: the router learns through the gate) and
//! p_e renormalised over the k chosen for k > 1. Dropless: every expert processes every token routed to
//! it (gathered with `index_select`, scattered back with `index_add`, both with a backward pass), so
//! compute follows the routing instead of a capacity.
//!
//! - **Learned** routing is modality-agnostic. **Modality** routing is the study's modality-aware hard
//!   routing: the first half of the experts takes image tokens, the second half text tokens (with two
//!   experts, one FFN per modality), with learned top-k inside each half.
//! - Auxiliary losses, on real tokens only: Switch's load-balancing loss `w_b·E·Σ_e f_e·P_e` (f_e the
//!   share of assignments to expert e, P_e its mean router probability) and the router z-loss
//!   `w_z·mean(logsumexp(logits)²)`.
//! - Per layer, the tokens of each modality each expert received: the specialisation score is the mean
//!   over experts of 1 − H(image share), H the binary entropy in bits (1: every expert sees one modality;
//!   0: every expert sees both alike).

use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::ops::{log_softmax, softmax, swiglu};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// A learned router over all experts (modality-agnostic).
    #[default]
    Learned,
    /// Image tokens to the first half of the experts, text tokens to the second (modality-aware).
    Modality,
}

/// `[model.moe]`: replaces every layer's FFN with experts of the same width.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    pub experts: usize,
    #[serde(default = "one")]
    pub top_k: usize,
    #[serde(default)]
    pub routing: Routing,
    /// Weight of the load-balancing loss.
    #[serde(default = "balance_weight")]
    pub balance_weight: f64,
    /// Weight of the router z-loss (0: off).
    #[serde(default)]
    pub z_loss_weight: f64,
}

fn one() -> usize {
    1
}
fn balance_weight() -> f64 {
    0.01
}

impl MoeConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.experts == 0 || self.top_k == 0 || self.top_k > self.experts {
            return Err(format!(
                "experts ({}) and top_k ({}) need 1 ≤ top_k ≤ experts",
                self.experts, self.top_k
            ));
        }
        if self.routing == Routing::Modality
            && (!self.experts.is_multiple_of(2) || self.top_k > self.experts / 2)
        {
            return Err(format!(
                "modality routing splits the experts in two halves: experts ({}) must be even and top_k ({}) at most half",
                self.experts, self.top_k
            ));
        }
        if !(self.balance_weight >= 0.0 && self.z_loss_weight >= 0.0) {
            return Err("balance_weight and z_loss_weight must be non-negative".into());
        }
        Ok(())
    }

    /// Experts a token of the given modality may be routed to.
    fn allowed(&self, image: bool) -> std::ops::Range<usize> {
        match self.routing {
            Routing::Learned => 0..self.experts,
            Routing::Modality if image => 0..self.experts / 2,
            Routing::Modality => self.experts / 2..self.experts,
        }
    }
}

/// Tokens each expert of one layer received, per modality.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerRouting {
    pub image: Vec<u64>,
    pub text: Vec<u64>,
}

impl LayerRouting {
    pub fn add(&mut self, other: &LayerRouting) {
        if self.image.is_empty() {
            *self = other.clone();
            return;
        }
        for (a, b) in self.image.iter_mut().zip(&other.image) {
            *a += b;
        }
        for (a, b) in self.text.iter_mut().zip(&other.text) {
            *a += b;
        }
    }

    /// Mean over experts that received tokens of 1 − H(image share), in bits.
    pub fn specialisation(&self) -> f64 {
        let scores: Vec<f64> = self
            .image
            .iter()
            .zip(&self.text)
            .filter(|(i, t)| **i + **t > 0)
            .map(|(&i, &t)| {
                let p = i as f64 / (i + t) as f64;
                let h = |q: f64| if q > 0.0 { -q * q.log2() } else { 0.0 };
                1.0 - (h(p) + h(1.0 - p))
            })
            .collect();
        if scores.is_empty() {
            0.0
        } else {
            scores.iter().sum::<f64>() / scores.len() as f64
        }
    }
}

struct Expert {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

pub struct Moe {
    router: Linear,
    experts: Vec<Expert>,
    config: MoeConfig,
}

/// One MoE layer's output, auxiliary loss (already weighted; None when no token was real) and routing.
pub struct MoeOutput {
    pub output: Tensor,
    pub aux_loss: Option<Tensor>,
    pub routing: LayerRouting,
}

impl Moe {
    /// Weights `router.weight` (E, d) and `experts.{e}.{gate,up,down}_proj.weight` under `vb`.
    pub fn new(
        config: &MoeConfig,
        d: usize,
        d_ff: usize,
        linear: impl Fn(&VarBuilder, usize, usize, bool, &str) -> candle_core::Result<Linear>,
        vb: &VarBuilder,
    ) -> candle_core::Result<Moe> {
        let experts = (0..config.experts)
            .map(|e| {
                let vb = vb.pp("experts").pp(e);
                Ok(Expert {
                    gate_proj: linear(&vb, d, d_ff, false, "gate_proj")?,
                    up_proj: linear(&vb, d, d_ff, false, "up_proj")?,
                    down_proj: linear(&vb, d_ff, d, true, "down_proj")?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Moe {
            router: linear(vb, d, config.experts, false, "router")?,
            experts,
            config: config.clone(),
        })
    }

    /// x (b, t, d), already normed; `is_image` and `valid` per token (b × t, row-major).
    pub fn forward(
        &self,
        x: &Tensor,
        is_image: &[bool],
        valid: &[bool],
    ) -> candle_core::Result<MoeOutput> {
        let (b, t, d) = x.dims3()?;
        let n = b * t;
        let experts = self.config.experts;
        let k = self.config.top_k;
        let flat = x.reshape((n, d))?;
        let mut logits = self.router.forward(&flat)?;
        if self.config.routing == Routing::Modality {
            // Experts outside the token's half are masked before the softmax: probability exactly 0.
            let mut mask = vec![0f32; n * experts];
            for (r, row) in mask.chunks_mut(experts).enumerate() {
                let allowed = self.config.allowed(is_image[r]);
                for (e, m) in row.iter_mut().enumerate() {
                    if !allowed.contains(&e) {
                        *m = -1e9;
                    }
                }
            }
            logits = logits.broadcast_add(
                &Tensor::from_vec(mask, (n, experts), x.device())?.to_dtype(x.dtype())?,
            )?;
        }
        let probs = softmax(&logits)?;
        let host = probs.to_dtype(DType::F32)?.to_vec2::<f32>()?;

        // Top-k of every real token: assignment slots (row, expert), k per row in row order.
        let rows: Vec<usize> = (0..n).filter(|&r| valid[r]).collect();
        let mut slots: Vec<(usize, usize)> = Vec::with_capacity(rows.len() * k);
        let mut routing = LayerRouting {
            image: vec![0; experts],
            text: vec![0; experts],
        };
        for &r in &rows {
            let mut order: Vec<usize> = self.config.allowed(is_image[r]).collect();
            order.sort_by(|&a, &c| host[r][c].total_cmp(&host[r][a]).then(a.cmp(&c)));
            for &e in order.iter().take(k) {
                slots.push((r, e));
                if is_image[r] {
                    routing.image[e] += 1;
                } else {
                    routing.text[e] += 1;
                }
            }
        }
        if rows.is_empty() {
            return Ok(MoeOutput {
                output: x.zeros_like()?,
                aux_loss: None,
                routing,
            });
        }
        let flat_index: Vec<u32> = slots
            .iter()
            .map(|&(r, e)| (r * experts + e) as u32)
            .collect();
        let mut gates = probs
            .flatten_all()?
            .index_select(&Tensor::from_vec(flat_index, slots.len(), x.device())?, 0)?;
        if k > 1 {
            let per_row = gates.reshape((rows.len(), k))?;
            gates = per_row
                .broadcast_div(&per_row.sum_keepdim(1)?)?
                .flatten_all()?;
        }

        let mut output = flat.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            let mine: Vec<usize> = (0..slots.len()).filter(|&s| slots[s].1 == e).collect();
            if mine.is_empty() {
                continue;
            }
            let m = mine.len();
            let token_rows = Tensor::from_vec(
                mine.iter().map(|&s| slots[s].0 as u32).collect::<Vec<_>>(),
                m,
                x.device(),
            )?;
            let slot_ids = Tensor::from_vec(
                mine.iter().map(|&s| s as u32).collect::<Vec<_>>(),
                m,
                x.device(),
            )?;
            let input = flat.index_select(&token_rows, 0)?;
            let hidden = swiglu(
                &expert.gate_proj.forward(&input)?,
                &expert.up_proj.forward(&input)?,
            )?;
            let weighted = expert
                .down_proj
                .forward(&hidden)?
                .broadcast_mul(&gates.index_select(&slot_ids, 0)?.unsqueeze(1)?)?;
            output = output.index_add(&token_rows, &weighted, 0)?;
        }

        // Auxiliary losses over real tokens.
        let real = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            x.device(),
        )?;
        let real_probs = probs.index_select(&real, 0)?;
        let assigned = slots.len() as f64;
        let shares: Vec<f32> = (0..experts)
            .map(|e| ((routing.image[e] + routing.text[e]) as f64 / assigned) as f32)
            .collect();
        let shares = Tensor::from_vec(shares, (1, experts), x.device())?.to_dtype(x.dtype())?;
        let mean_probs = real_probs.mean_keepdim(0)?;
        let mut aux =
            (mean_probs.mul(&shares)?.sum_all()? * (self.config.balance_weight * experts as f64))?;
        if self.config.z_loss_weight > 0.0 {
            // logsumexp = logit − log-softmax at any expert; read at each token's top expert, which is
            // never masked (a masked logit of −1e9 would cancel catastrophically).
            let top: Vec<u32> = slots
                .iter()
                .step_by(k)
                .map(|&(r, e)| (r * experts + e) as u32)
                .collect();
            let lse = (&logits - log_softmax(&logits)?)?
                .flatten_all()?
                .index_select(&Tensor::from_vec(top, rows.len(), x.device())?, 0)?;
            aux = (aux + (lse.sqr()?.mean_all()? * self.config.z_loss_weight)?)?;
        }
        Ok(MoeOutput {
            output: output.reshape((b, t, d))?,
            aux_loss: Some(aux),
            routing,
        })
    }

    pub fn config(&self) -> &MoeConfig {
        &self.config
    }
}
