//! The relaxation: the unified operator made differentiable in its parameters, run inside the frozen
//! model's forward pass without removing any token.
//!
//! Every visual token carries a presence m ∈ (0, 1] (1 at the start), a size s and a re-weighting bias.
//! A relaxed stage at layer ℓ, with the combined score σ = Σ_k w_k·ẑ_k over the entering tokens:
//!
//! - **soft top-k**: k_i = sigmoid((σ_i − θ)/T), θ chosen per sample so that Σ m·k = c·Σ m (c the keep
//!   ratio) — found by bisection, and differentiated implicitly (its gradient in σ and c is that of the
//!   constraint, written as a correction term whose value is zero);
//! - **soft transfer**: each token passes its removed share d_j = s_j·m_j·(1 − k_j) to the others with
//!   P_ji = softmax_i(cos_ji/τ − κ·dist²_ji/2 + ln(m_i·k_i)), so only (softly) kept tokens receive;
//!   x'_i = (s_i·x_i + γ·Σ_j P_ji·d_j·x_j)/(s_i + η·γ·Σ_j P_ji·d_j), s'_i = s_i + γ·Σ_j P_ji·d_j;
//! - **re-weighting**: bias_i += ρ·ẑ(σ)_i;
//! - **expected activation**: with a = sigmoid(α) the layer's outputs are a·(reduced) + (1 − a)·(unchanged),
//!   and m ← m·(1 − a·(1 − k)).
//!
//! Once the layer activations are fixed (the search's second phase), stages run **straight-through**: the
//! forward pass uses the hard top-K mask — exactly the plan's selection, ties to the lower index — and the
//! backward pass the soft mask's gradient. Without it the search exploits the relaxation: a binary signal
//! (grid, duplication, ToMe's set B) ties many tokens, the soft threshold cuts through the tie and every tied
//! token keeps a fraction of its presence, far more information than the K tokens the plan will keep
//! (measured: the searched plans then favoured such signals and fell below random selection on locate).
//!
//! Soft dropping is a log-mask: every later attention adds ln m + ln s + bias to the keys' logits (ln s is
//! proportional attention), so a token with m → 0 vanishes from attention exactly as if removed. With
//! k ∈ {0, 1} and a = 1 the stage is the hard unified operator (a test checks it).

use candle_core::{D, DType, Device, Result, Tensor};
use tokenfold_fold::signals::QueriesKeys;
use tokenfold_fold::unified::zscore;
use tokenfold_fold::{FoldHook, Plan, Stage};
use tokenfold_model::ops::{MASKED, softmax};
use tokenfold_model::{LayerHook, NativeModel, SeqState};

use crate::space::{SIGNALS, SearchSpace, StageTensors, sigmoid};

/// Constants of one relaxed stage over a batch of b samples and t rows.
pub struct StageInputs {
    /// (b, t, K) signals, z-scored per sample over its visual rows; 0 on other rows.
    pub signals: Tensor,
    /// (b, t, t) cosine similarity of key metrics between visual rows j and i; 0 elsewhere.
    pub cos: Tensor,
    /// (b, t, t) squared grid distance between visual rows.
    pub dist2: Tensor,
    /// (b, t, t) 0 where rows j and i are both visual, [`MASKED`] elsewhere.
    pub pair_mask: Tensor,
    /// (b, t) 1 on visual rows, 0 elsewhere.
    pub visual: Tensor,
}

/// What flows between relaxed stages.
#[derive(Clone)]
pub struct Flow {
    /// (b, t, d).
    pub hidden: Tensor,
    /// (b, t) presence m (1 on text rows).
    pub presence: Tensor,
    /// (b, t) sizes s.
    pub sizes: Tensor,
    /// (b, t) re-weighting bias.
    pub boost: Tensor,
}

impl Flow {
    pub fn start(hidden: &Tensor) -> Result<Flow> {
        let (b, t, _) = hidden.dims3()?;
        let ones = Tensor::ones((b, t), hidden.dtype(), hidden.device())?;
        Ok(Flow {
            hidden: hidden.clone(),
            presence: ones.clone(),
            sizes: ones.clone(),
            boost: ones.zeros_like()?,
        })
    }

    /// The additive attention bias per key: ln m + ln s + bias.
    pub fn key_bias(&self) -> Result<Tensor> {
        ((self.presence.clone() + 1e-6)?.log()? + self.sizes.log()?)? + &self.boost
    }
}

/// θ with Σ_i v_i·m_i·sigmoid((σ_i − θ)/T) = c·Σ_i v_i·m_i for one sample (v the visual indicator), by
/// bisection.
pub fn threshold(
    score: &[f64],
    presence: &[f64],
    visual: &[f64],
    keep: f64,
    temperature: f64,
) -> f64 {
    let mass: f64 = presence.iter().zip(visual).map(|(m, v)| m * v).sum();
    let target = keep * mass;
    let rows: Vec<(f64, f64)> = score
        .iter()
        .zip(presence)
        .zip(visual)
        .filter(|(_, v)| **v > 0.0)
        .map(|((s, m), _)| (*s, *m))
        .collect();
    if rows.is_empty() {
        return 0.0;
    }
    let (lo_s, hi_s) = rows
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (s, _)| {
            (lo.min(*s), hi.max(*s))
        });
    let (mut lo, mut hi) = (lo_s - 40.0 * temperature, hi_s + 40.0 * temperature);
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        let kept: f64 = rows
            .iter()
            .map(|(s, m)| m / (1.0 + (-(s - mid) / temperature).exp()))
            .sum();
        if kept > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The hard keep mask (b, t) of a straight-through stage: per sample, the K = max(1, round(c·P)) present
/// visual rows (presence above ½; P of them) with the highest scores, ties to the lower row, as the hard
/// operator ranks; 1 on non-visual rows.
fn hard_mask(
    score: &[Vec<f64>],
    presence: &[Vec<f64>],
    visual: &[Vec<f64>],
    keep: f64,
) -> Vec<f64> {
    let mut mask = Vec::new();
    for ((score, presence), visual) in score.iter().zip(presence).zip(visual) {
        let present: Vec<usize> = (0..score.len())
            .filter(|&j| visual[j] > 0.0 && presence[j] > 0.5)
            .collect();
        let k = ((keep * present.len() as f64).round() as usize).clamp(1, present.len().max(1));
        let mut order = present.clone();
        order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
        let mut row: Vec<f64> = visual
            .iter()
            .map(|&v| if v > 0.0 { 0.0 } else { 1.0 })
            .collect();
        order.iter().take(k).for_each(|&j| row[j] = 1.0);
        mask.extend(row);
    }
    mask
}

/// One relaxed stage (see the module docs) with activation `activation` (a scalar tensor in [0, 1]) and
/// mask temperature `temperature`. With `straight_through`, the forward pass uses the hard top-K mask (the
/// plan's selection exactly) and the backward pass the soft one's gradient. Returns the new flow and the
/// keep mask k (b, t).
pub fn relaxed_stage(
    flow: &Flow,
    inputs: &StageInputs,
    params: &StageTensors,
    activation: &Tensor,
    temperature: f64,
    straight_through: bool,
) -> Result<(Flow, Tensor)> {
    let (b, t, k_signals) = inputs.signals.dims3()?;
    let vis = &inputs.visual;
    let score = inputs
        .signals
        .reshape((b * t, k_signals))?
        .matmul(&params.weights.unsqueeze(1)?)?
        .reshape((b, t))?;
    // θ per sample by bisection on the detached values, then the implicit-gradient correction.
    let host = |t: &Tensor| -> Result<Vec<Vec<f64>>> { t.to_dtype(DType::F64)?.to_vec2() };
    let score_host = host(&score)?;
    let presence_host = host(&flow.presence)?;
    let vis_host = host(vis)?;
    let keep_value = params.keep.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let theta0: Vec<f64> = (0..b)
        .map(|s| {
            threshold(
                &score_host[s],
                &presence_host[s],
                &vis_host[s],
                keep_value,
                temperature,
            )
        })
        .collect();
    let theta0 = Tensor::from_vec(theta0, (b, 1), score.device())?.to_dtype(score.dtype())?;
    let score_sg = score.detach();
    let keep_sg = params.keep.detach();
    let presence_sg = flow.presence.detach();
    let sig0 = sigmoid(&(score_sg.broadcast_sub(&theta0)? / temperature)?)?;
    let weights = ((&sig0 * (1.0 - &sig0)?)? * &presence_sg)?.mul(vis)?;
    let mass = (&presence_sg * vis)?.sum_keepdim(1)?;
    let numerator = ((&weights * (&score - &score_sg)?)?.sum_keepdim(1)?
        - mass
            .broadcast_mul(&(&params.keep - &keep_sg)?)?
            .affine(temperature, 0.0)?)?;
    let theta = (theta0 + numerator.div(&(weights.sum_keepdim(1)? + 1e-12)?)?)?;
    let k = sigmoid(&(score.broadcast_sub(&theta)? / temperature)?)?;
    let k = ((&k * vis)? + (1.0 - vis)?)?;
    let k = if straight_through {
        let hard = hard_mask(&score_host, &presence_host, &vis_host, keep_value);
        let hard = Tensor::from_vec(hard, (b, t), k.device())?.to_dtype(k.dtype())?;
        (hard + (&k - k.detach())?)?
    } else {
        k
    };
    // Soft transfer of the removed shares into the kept tokens.
    let kept = (&flow.presence * &k)?;
    let logits = (inputs.cos.broadcast_div(&params.tau)?
        - inputs
            .dist2
            .broadcast_mul(&params.locality)?
            .affine(0.5, 0.0)?)?
    .broadcast_add(&(kept.clone() + 1e-12)?.log()?.unsqueeze(1)?)?
    .add(&inputs.pair_mask)?;
    let p = softmax(&logits)?;
    let removed = ((&flow.sizes * &flow.presence)? * (1.0 - &k)?)?.mul(vis)?;
    let shares = p.broadcast_mul(&removed.unsqueeze(2)?)?;
    let received = shares.sum(1)?;
    let moved = shares.transpose(1, 2)?.matmul(&flow.hidden)?;
    let gamma_received = received.broadcast_mul(&params.gamma)?;
    let numerator = (flow.hidden.broadcast_mul(&flow.sizes.unsqueeze(2)?)?
        + moved.broadcast_mul(&params.gamma)?)?;
    let denominator = (&flow.sizes + gamma_received.broadcast_mul(&params.eta)?)?;
    let reduced = numerator.broadcast_div(&denominator.unsqueeze(2)?)?;
    let new_sizes = (&flow.sizes + &gamma_received)?;
    // Re-weighting by the z-scored score over the visual rows.
    let count = (vis.sum_keepdim(1)? + 1e-9)?;
    let mean = (&score * vis)?.sum_keepdim(1)?.div(&count)?;
    let centred = score.broadcast_sub(&mean)?;
    let var = (centred.sqr()? * vis)?.sum_keepdim(1)?.div(&count)?;
    let z = centred.broadcast_div(&(var + 1e-6)?.sqrt()?)?.mul(vis)?;
    let a = activation;
    let blend =
        |new: &Tensor, old: &Tensor| -> Result<Tensor> { old + (new - old)?.broadcast_mul(a)? };
    let presence = (&flow.presence * (1.0 - (1.0 - &k)?.broadcast_mul(a)?)?)?;
    Ok((
        Flow {
            hidden: blend(&reduced, &flow.hidden)?,
            presence,
            sizes: blend(&new_sizes, &flow.sizes)?,
            boost: (&flow.boost + z.broadcast_mul(&params.rho)?.broadcast_mul(a)?)?,
        },
        k,
    ))
}

/// A plan whose single stage asks the fold hook for every signal, so that it reads SparseVLM's raters.
pub fn template_plan() -> Plan {
    let operator = tokenfold_fold::unified::Operator {
        signals: SIGNALS.iter().map(|&s| (s, 1.0)).collect(),
        ..tokenfold_fold::unified::Operator::prune(SIGNALS[0], Default::default())
    };
    Plan {
        name: "search".into(),
        proportional_attention: true,
        stages: vec![Stage::unified(0, 1.0, operator)],
    }
}

/// Runs the relaxed stages of a [`SearchSpace`] inside the forward pass.
pub struct SoftHook<'a> {
    model: &'a NativeModel,
    space: &'a SearchSpace,
    signals: FoldHook<'a>,
    /// Mask temperature T.
    pub temperature: f64,
    /// Fixed layer activations (the second phase of the search); `None`: the expectation under sigmoid(α).
    pub activation: Option<Vec<bool>>,
    /// The budget projection's shift of every keep logit (a scalar tensor), if any.
    pub shift: Option<Tensor>,
    flow: Option<Flow>,
    /// Per sample: original visual tokens and text tokens (valid, non-visual).
    pub visual_tokens: Vec<f32>,
    pub text_tokens: Vec<f32>,
    /// Per layer: expected visual tokens entering it (after its stage), (b,).
    pub entering: Vec<Tensor>,
    dist2: Option<Tensor>,
    pair_mask: Option<Tensor>,
    visual: Option<Tensor>,
}

impl<'a> SoftHook<'a> {
    /// `template` is [`template_plan`]; `prompt_ends` the position of each sample's last prompt token.
    pub fn new(
        model: &'a NativeModel,
        space: &'a SearchSpace,
        template: &'a Plan,
        prompt_ends: Vec<u32>,
    ) -> SoftHook<'a> {
        let mut signals = FoldHook::new(model, template);
        signals.prompt_ends = Some(prompt_ends);
        SoftHook {
            model,
            space,
            signals,
            temperature: 1.0,
            activation: None,
            shift: None,
            flow: None,
            visual_tokens: Vec::new(),
            text_tokens: Vec::new(),
            entering: Vec::new(),
            dist2: None,
            pair_mask: None,
            visual: None,
        }
    }

    fn start(&mut self, state: &SeqState) -> Result<()> {
        self.signals.read_layout(state)?;
        let (b, t) = (state.batch(), state.len());
        let device = state.hidden.device();
        let grid = self.model.config.image_grid as u32;
        let mut visual = vec![0f32; b * t];
        let mut dist2 = vec![0f32; b * t * t];
        let mut pair = vec![MASKED; b * t * t];
        self.visual_tokens = vec![0.0; b];
        self.text_tokens = vec![0.0; b];
        for s in 0..b {
            let row = |j: usize| s * t + j;
            let rows: Vec<usize> = (0..t)
                .filter(|&j| state.valid[row(j)] && state.is_image[row(j)])
                .collect();
            let start = rows.iter().map(|&j| state.positions[row(j)]).min();
            self.visual_tokens[s] = rows.len() as f32;
            self.text_tokens[s] = (0..t)
                .filter(|&j| state.valid[row(j)] && !state.is_image[row(j)])
                .count() as f32;
            let cell = |j: usize| {
                let patch = state.positions[row(j)] - start.unwrap_or(0);
                ((patch / grid) as f32, (patch % grid) as f32)
            };
            for &j in &rows {
                visual[row(j)] = 1.0;
                for &i in &rows {
                    let ((rj, cj), (ri, ci)) = (cell(j), cell(i));
                    let at = (s * t + j) * t + i;
                    dist2[at] = (rj - ri).powi(2) + (cj - ci).powi(2);
                    pair[at] = 0.0;
                }
            }
        }
        self.visual = Some(Tensor::from_vec(visual, (b, t), device)?);
        self.dist2 = Some(Tensor::from_vec(dist2, (b, t, t), device)?);
        self.pair_mask = Some(Tensor::from_vec(pair, (b, t, t), device)?);
        self.flow = Some(Flow::start(&state.hidden)?);
        self.entering.clear();
        Ok(())
    }

    /// The constants of the stage at `layer` from the queries and keys of the signal layer.
    fn stage_inputs(
        &self,
        state: &SeqState,
        qk: &QueriesKeys,
        targets: &[usize],
        pivots: usize,
    ) -> Result<StageInputs> {
        let (b, t) = (state.batch(), state.len());
        let k = SIGNALS.len();
        let per_sample = self.signals.signals(state, qk, &SIGNALS, targets, pivots)?;
        let mut z = vec![0f32; b * t * k];
        let mut cos = vec![0f32; b * t * t];
        for (s, sample) in per_sample.iter().enumerate() {
            for (c, (_, values)) in sample.values.iter().enumerate() {
                for (&j, v) in sample.visual.iter().zip(zscore(values)) {
                    z[(s * t + j) * k + c] = v;
                }
            }
            let metric = sample.metric.normalized();
            for (a, &j) in sample.visual.iter().enumerate() {
                for (c, &i) in sample.visual.iter().enumerate() {
                    cos[(s * t + j) * t + i] = metric.dot(a, c);
                }
            }
        }
        let device = state.hidden.device();
        let missing = || candle_core::Error::Msg("the soft hook was not started".into());
        Ok(StageInputs {
            signals: Tensor::from_vec(z, (b, t, k), device)?,
            cos: Tensor::from_vec(cos, (b, t, t), device)?,
            dist2: self.dist2.clone().ok_or_else(missing)?,
            pair_mask: self.pair_mask.clone().ok_or_else(missing)?,
            visual: self.visual.clone().ok_or_else(missing)?,
        })
    }

    fn record(&mut self) -> Result<()> {
        let flow = self
            .flow
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("the soft hook was not started".into()))?;
        let visual = self
            .visual
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("the soft hook was not started".into()))?;
        self.entering.push((&flow.presence * visual)?.sum(1)?);
        Ok(())
    }
}

impl LayerHook for SoftHook<'_> {
    fn before_layer(&mut self, layer: usize, state: &mut SeqState) -> Result<bool> {
        if layer == 0 {
            self.start(state)?;
        }
        let fixed = self.activation.as_ref().map(|a| a[layer]);
        if fixed == Some(false) {
            state.captured = None;
            self.record()?;
            return Ok(false);
        }
        let (q, k) = match state.captured.take() {
            Some(qk) if layer > 0 => qk,
            _ => self.model.layer_queries_keys(layer, state)?,
        };
        let qk = QueriesKeys::from_tensors(&q.detach(), &k.detach())?;
        let params = self.space.stage_shifted(layer, self.shift.as_ref())?;
        let flow = self
            .flow
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("the soft hook was not started".into()))?;
        let keep = params.keep.to_scalar::<f32>()?;
        let presence: Vec<Vec<f32>> =
            (&flow.presence * self.visual.as_ref().expect("started"))?.to_vec2()?;
        let targets: Vec<usize> = presence
            .iter()
            .map(|row| ((keep * row.iter().sum::<f32>()).round() as usize).max(1))
            .collect();
        // The hidden states the signals see are the flow's (state.hidden is the same tensor).
        // Straight-through, presence is 0 or 1 and the signals see only the tokens still present, as the
        // plan's stage does: DART's pivots and duplication depend on which tokens are there, not only on
        // each token's own value.
        let inputs = if fixed.is_some() {
            let mut present = state.clone();
            let rows = presence.iter().flatten();
            for ((valid, &image), &m) in present.valid.iter_mut().zip(&state.is_image).zip(rows) {
                *valid &= !image || m > 0.5;
            }
            self.stage_inputs(&present, &qk, &targets, self.space.pivots[layer])?
        } else {
            self.stage_inputs(state, &qk, &targets, self.space.pivots[layer])?
        };
        let activation = match fixed {
            Some(true) => Tensor::new(1f32, state.hidden.device())?,
            _ => params.activation.clone(),
        };
        let flow = Flow {
            hidden: state.hidden.clone(),
            ..flow
        };
        let (flow, _) = relaxed_stage(
            &flow,
            &inputs,
            &params,
            &activation,
            self.temperature,
            fixed.is_some(),
        )?;
        state.hidden = flow.hidden.clone();
        state.key_bias = Some(flow.key_bias()?);
        self.flow = Some(flow);
        self.record()?;
        Ok(true)
    }

    fn capture(&self, layer: usize) -> bool {
        layer + 1 < self.model.n_layers()
            && self
                .activation
                .as_ref()
                .is_none_or(|active| active[layer + 1])
    }
}

/// A scalar tensor on `device`.
pub fn scalar(value: f32, device: &Device) -> Result<Tensor> {
    Tensor::new(value, device)
}

/// Row-wise KL(p ‖ q) of logits (n, vocab): Σ p·(ln p − ln q).
pub fn kl_rows(reference: &Tensor, logits: &Tensor) -> Result<Tensor> {
    let log_p = tokenfold_model::ops::log_softmax(reference)?;
    let log_q = tokenfold_model::ops::log_softmax(logits)?;
    (log_p.exp()? * (log_p - log_q)?)?.sum(D::Minus1)
}
