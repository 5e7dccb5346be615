//! The search space: per candidate layer, a handful of unconstrained scalars that map onto the unified
//! operator's parameters.
//!
//! | variable | parameter | map |
//! |---|---|---|
//! | `alpha` | layer activation a | sigmoid |
//! | `keep` | keep ratio c of the tokens entering the layer | sigmoid |
//! | `gamma` | transfer strength γ | sigmoid |
//! | `log_tau` | temperature τ | exp |
//! | `eta` | size-weighted normalisation η | sigmoid |
//! | `rho` | anchor re-weighting ρ | identity |
//! | `locality` | spatial precision κ = 1/λ² | softplus |
//! | `omega` (K per layer) | signal weights w | softmax |
//!
//! DART's pivot count, the one discrete parameter of the duplication signal, is fixed per layer (no
//! gradient reaches it): the search's seeds and selection choose it.

use std::collections::BTreeMap;

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var};
use serde::{Deserialize, Serialize};
use tokenfold_fold::DART_PIVOTS;
use tokenfold_fold::unified::Signal;

/// The signals the search mixes, in the order of `omega`'s columns.
pub const SIGNALS: [Signal; 6] = Signal::ALL;

/// Starting values of the search variables (in parameter space).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpaceInit {
    pub activation: f64,
    pub keep: f64,
    pub gamma: f64,
    pub tau: f64,
    pub eta: f64,
    pub rho: f64,
    /// κ = 1/λ².
    pub locality: f64,
}

impl Default for SpaceInit {
    /// Undecided activation, half the tokens, a small sharp transfer (near the pruning edge, where the
    /// EOS authors' searched operator sits), mostly size-weighted, no re-weighting, a weak spatial term,
    /// equal signal weights.
    fn default() -> Self {
        SpaceInit {
            activation: 0.5,
            keep: 0.5,
            gamma: 0.1,
            tau: 0.2,
            eta: 0.9,
            rho: 0.0,
            locality: 0.02,
        }
    }
}

/// One layer's parameters as numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerParams {
    pub activation: f64,
    pub keep: f64,
    pub gamma: f64,
    pub tau: f64,
    pub eta: f64,
    pub rho: f64,
    /// κ = 1/λ².
    pub locality: f64,
    pub weights: BTreeMap<Signal, f64>,
    /// DART's pivots per side for the duplication signal (fixed, not a variable).
    #[serde(default = "default_pivots")]
    pub pivots: usize,
}

fn default_pivots() -> usize {
    DART_PIVOTS
}

fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-6, 1.0 - 1e-6);
    (p / (1.0 - p)).ln()
}

/// sigmoid(x) = (1 + tanh(x/2))/2, from ops that carry a backward pass. Written with tanh rather than
/// 1/(1 + e^−x): for very negative x, e^−x overflows and its backward pass multiplies 0 by ∞ (NaN), which
/// the soft top-k mask reaches at cold temperatures.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x * 0.5)?.tanh()?.affine(0.5, 0.5)
}

/// softplus(x) = max(x, 0) + ln(1 + e^−|x|), stable for large |x|.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// The search variables over `n_layers` candidate layers.
pub struct SearchSpace {
    pub n_layers: usize,
    pub alpha: Var,
    pub keep: Var,
    pub gamma: Var,
    pub log_tau: Var,
    pub eta: Var,
    pub rho: Var,
    pub locality: Var,
    /// (n_layers, K).
    pub omega: Var,
    /// DART's pivots per side at each layer (fixed).
    pub pivots: Vec<usize>,
}

/// One layer's parameters as tensors (scalars, and the K signal weights), differentiable in the variables.
pub struct StageTensors {
    pub activation: Tensor,
    pub keep: Tensor,
    pub gamma: Tensor,
    pub tau: Tensor,
    pub eta: Tensor,
    pub rho: Tensor,
    pub locality: Tensor,
    /// (K,).
    pub weights: Tensor,
}

impl SearchSpace {
    pub fn new(n_layers: usize, init: &SpaceInit, device: &Device) -> Result<SearchSpace> {
        Self::with_dtype(n_layers, init, DType::F32, device)
    }

    /// The same in another float type (f64 for finite-difference tests).
    pub fn with_dtype(
        n_layers: usize,
        init: &SpaceInit,
        dtype: DType,
        device: &Device,
    ) -> Result<SearchSpace> {
        let filled =
            |v: f64| Var::from_tensor(&Tensor::full(v, n_layers, device)?.to_dtype(dtype)?);
        // softplus⁻¹(κ) = ln(e^κ − 1).
        let locality = init.locality.max(1e-6);
        Ok(SearchSpace {
            n_layers,
            alpha: filled(logit(init.activation))?,
            keep: filled(logit(init.keep))?,
            gamma: filled(logit(init.gamma))?,
            log_tau: filled(init.tau.max(1e-6).ln())?,
            eta: filled(logit(init.eta))?,
            rho: filled(init.rho)?,
            locality: filled(locality.exp_m1().ln())?,
            omega: Var::from_tensor(&Tensor::zeros((n_layers, SIGNALS.len()), dtype, device)?)?,
            pivots: vec![DART_PIVOTS; n_layers],
        })
    }

    /// Variables that start at given per-layer parameters (a seed): the inverse of [`Self::snapshot`]
    /// at shift 0, with τ kept in [10⁻³, 10³] and κ ≥ 10⁻⁶ so that every variable is finite.
    pub fn from_layers(layers: &[LayerParams], device: &Device) -> Result<SearchSpace> {
        let n_layers = layers.len();
        let column = |f: &dyn Fn(&LayerParams) -> f64| -> Result<Var> {
            let values: Vec<f32> = layers.iter().map(|p| f(p) as f32).collect();
            Var::from_tensor(&Tensor::from_vec(values, n_layers, device)?)
        };
        let omega: Vec<f32> = layers
            .iter()
            .flat_map(|p| {
                SIGNALS
                    .iter()
                    .map(|s| p.weights.get(s).copied().unwrap_or(0.0).max(1e-9).ln() as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok(SearchSpace {
            n_layers,
            alpha: column(&|p| logit(p.activation))?,
            keep: column(&|p| logit(p.keep))?,
            gamma: column(&|p| logit(p.gamma))?,
            log_tau: column(&|p| p.tau.clamp(1e-3, 1e3).ln())?,
            eta: column(&|p| logit(p.eta))?,
            rho: column(&|p| p.rho)?,
            locality: column(&|p| p.locality.max(1e-6).exp_m1().ln())?,
            omega: Var::from_tensor(&Tensor::from_vec(omega, (n_layers, SIGNALS.len()), device)?)?,
            pivots: layers.iter().map(|p| p.pivots).collect(),
        })
    }

    /// The expected FLOPs-equivalent token share of the relaxed stages when every keep logit is shifted
    /// by `shift`, with fixed activations `active` or the expected ones: (1/L)·Σ_ℓ Π_{ℓ'≤ℓ}
    /// (1 − a_ℓ'·(1 − c_ℓ')). The soft top-k keeps exactly c of the entering presence, so this is the share
    /// the forward pass measures.
    pub fn expected_share(&self, shift: &Tensor, active: Option<&[bool]>) -> Result<Tensor> {
        let device = self.keep.device();
        let dtype = self.keep.dtype();
        let keep = sigmoid(&self.keep.as_tensor().broadcast_add(shift)?)?;
        let activation = match active {
            Some(active) => Tensor::from_vec(
                active
                    .iter()
                    .map(|&a| if a { 1f64 } else { 0.0 })
                    .collect::<Vec<_>>(),
                self.n_layers,
                device,
            )?
            .to_dtype(dtype)?,
            None => sigmoid(self.alpha.as_tensor())?,
        };
        // Per layer, the share of the entering presence that leaves: 1 − a·(1 − c).
        let factor = (1.0 - (activation * (1.0 - keep)?)?)?;
        let mut ratio = Tensor::ones((), dtype, device)?;
        let mut total = Tensor::zeros((), dtype, device)?;
        for l in 0..self.n_layers {
            ratio = (ratio * factor.i(l)?)?;
            total = (total + &ratio)?;
        }
        total / self.n_layers as f64
    }

    /// Named variables, for the optimiser.
    pub fn vars(&self) -> Vec<(String, Var)> {
        [
            ("alpha", &self.alpha),
            ("keep", &self.keep),
            ("gamma", &self.gamma),
            ("log_tau", &self.log_tau),
            ("eta", &self.eta),
            ("rho", &self.rho),
            ("locality", &self.locality),
            ("omega", &self.omega),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect()
    }

    /// Layer `layer`'s parameters as differentiable tensors.
    pub fn stage(&self, layer: usize) -> Result<StageTensors> {
        self.stage_shifted(layer, None)
    }

    /// The same with every keep logit shifted by `shift` (the budget projection, a scalar tensor).
    pub fn stage_shifted(&self, layer: usize, shift: Option<&Tensor>) -> Result<StageTensors> {
        let omega = self.omega.as_tensor().i(layer)?;
        let exp = omega
            .broadcast_sub(&omega.max_keepdim(0)?.detach())?
            .exp()?;
        let keep_logit = self.keep.as_tensor().i(layer)?;
        let keep_logit = match shift {
            Some(shift) => keep_logit.broadcast_add(shift)?,
            None => keep_logit,
        };
        Ok(StageTensors {
            activation: sigmoid(&self.alpha.as_tensor().i(layer)?)?,
            keep: sigmoid(&keep_logit)?,
            gamma: sigmoid(&self.gamma.as_tensor().i(layer)?)?,
            tau: self.log_tau.as_tensor().i(layer)?.exp()?,
            eta: sigmoid(&self.eta.as_tensor().i(layer)?)?,
            rho: self.rho.as_tensor().i(layer)?,
            locality: softplus(&self.locality.as_tensor().i(layer)?)?,
            weights: exp.broadcast_div(&exp.sum_keepdim(0)?)?,
        })
    }

    /// Every layer's parameters as numbers (keep ratios with the budget shift `shift`).
    pub fn snapshot(&self, shift: f64) -> Result<Vec<LayerParams>> {
        let shift = Tensor::new(shift, self.keep.device())?.to_dtype(self.keep.dtype())?;
        (0..self.n_layers)
            .map(|l| {
                let st = self.stage_shifted(l, Some(&shift))?;
                let scalar = |t: &Tensor| -> Result<f64> { t.to_dtype(DType::F64)?.to_scalar() };
                let weights: Vec<f64> = st.weights.to_dtype(DType::F64)?.to_vec1()?;
                Ok(LayerParams {
                    activation: scalar(&st.activation)?,
                    keep: scalar(&st.keep)?,
                    gamma: scalar(&st.gamma)?,
                    tau: scalar(&st.tau)?,
                    eta: scalar(&st.eta)?,
                    rho: scalar(&st.rho)?,
                    locality: scalar(&st.locality)?,
                    weights: SIGNALS.iter().zip(weights).map(|(&s, w)| (s, w)).collect(),
                    pivots: self.pivots[l],
                })
            })
            .collect()
    }
}
