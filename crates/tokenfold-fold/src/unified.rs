//! The unified reduction operator: one operator whose continuous parameters span pruning, merging, pooling
//! and soft re-weighting (`docs/operator-space.md` gives the definition and where each method sits).
//!
//! For the n visual tokens x_i of sizes s_i entering a stage that keeps K of them:
//!
//! 1. **Score.** σ_i = Σ_k w_k · ẑ_k(i), the weighted ranking signals ([`Signal`]), each z-scored over the
//!    entering tokens (a single signal with non-zero weight is used raw, so that its ranking is exactly the
//!    method's). The K best-scored tokens are the anchors A; the rest, D, are removed.
//! 2. **Assignment.** A removed token j may transfer to the anchors allowed by `candidates` (all, or only
//!    the odd-indexed half as in ToMe's bipartite matching) and `window` (same block of the image grid),
//!    with P_ji = softmax_i(cos(k_j, k_i)/τ − d(i, j)²/(2λ²)) over those anchors: k the keys averaged over
//!    heads, d the distance of grid cells, λ the `locality`. τ = 0 is the argmax (first on ties), τ = ∞ a
//!    uniform split (modulated only by locality).
//! 3. **Transfer and normalisation.** Anchor i becomes
//!    x'_i = (s_i·x_i + γ·Σ_j P_ji·s_j·x_j) / (s_i + η·γ·Σ_j P_ji·s_j), of size s'_i = s_i + γ·Σ_j P_ji·s_j.
//! 4. **Re-weighting.** Anchor i carries the attention-logit bias ρ·ẑ(σ)_i from now on.
//!
//! γ = 0 is pruning by the signal; γ = 1, τ = 0, η = 1 is a hard nearest-anchor merge (ToMe with bipartite
//! candidates); γ = 1, τ = ∞, η = 1 with grid anchors and a window is block pooling; anything between is a
//! soft redistribution. The hook ([`crate::hook`]) computes the signals and runs [`operate`].

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::budget::Geometry;
use crate::error::{FoldError, Result};
use crate::ops::{Assignment, Matrix, top_k};
use crate::plan::{Method, Stage, keep_count};

/// A ranking signal over the visual tokens of one sample (higher = keep).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Attention of the last prompt token (head mean): FastV, PDrop.
    Last,
    /// Attention of SparseVLM's text raters (head mean).
    Raters,
    /// Attention of the summary token (head mean); without one, attention received from the image.
    Summary,
    /// DART: 1 for the tokens DART keeps at the stage's count (pivots, then the least duplicated), else 0.
    Duplication,
    /// ToMe's bipartite redundancy: 2 for odd-indexed tokens (set B), −(best cosine to B) for the others.
    Redundancy,
    /// A spatial prior: 1 on a stride grid of cells (stride = `window`, or ⌊grid/√K⌋), else 0.
    Grid,
}

impl Signal {
    pub const ALL: [Signal; 6] = [
        Signal::Last,
        Signal::Raters,
        Signal::Summary,
        Signal::Duplication,
        Signal::Redundancy,
        Signal::Grid,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Signal::Last => "last",
            Signal::Raters => "raters",
            Signal::Summary => "summary",
            Signal::Duplication => "duplication",
            Signal::Redundancy => "redundancy",
            Signal::Grid => "grid",
        }
    }
}

/// Which layer's queries and keys the signals and the transfer metric come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The layer before the stage (as FastV); at layer 0, the stage's own layer.
    #[default]
    Previous,
    /// The stage's own layer, recomputed from its input (as PDrop).
    Current,
}

/// Which anchors a removed token may transfer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Candidates {
    #[default]
    All,
    /// Only odd-indexed tokens (ToMe's set B).
    Bipartite,
}

/// The assignment temperature τ ∈ [0, ∞]; written as a number or `"inf"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tau(pub f64);

impl Tau {
    pub const INFINITE: Tau = Tau(f64::INFINITY);
}

impl Serialize for Tau {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        if self.0.is_finite() {
            serializer.serialize_f64(self.0)
        } else {
            serializer.serialize_str("inf")
        }
    }
}

impl<'de> Deserialize<'de> for Tau {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Tau, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(v) => Ok(Tau(v)),
            Raw::Text(t) if t == "inf" => Ok(Tau::INFINITE),
            Raw::Text(t) => Err(serde::de::Error::custom(format!(
                "tau \"{t}\" is neither a number nor \"inf\""
            ))),
        }
    }
}

fn infinite() -> Tau {
    Tau::INFINITE
}

fn one() -> f64 {
    1.0
}

/// The unified operator's parameters (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operator {
    /// Signal weights w_k; signals not listed weigh 0.
    pub signals: BTreeMap<Signal, f64>,
    #[serde(default)]
    pub source: Source,
    /// Transfer strength γ ∈ [0, 1].
    #[serde(default)]
    pub gamma: f64,
    /// Assignment temperature τ ∈ [0, ∞].
    #[serde(default = "infinite")]
    pub tau: Tau,
    /// Size-weighted normalisation η ∈ [0, 1].
    #[serde(default = "one")]
    pub eta: f64,
    /// Anchor re-weighting strength ρ (attention-logit bias per unit of z-scored score).
    #[serde(default)]
    pub rho: f64,
    /// Spatial locality scale λ in grid cells (none: no spatial term).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<f64>,
    /// Transfers stay inside `window × window` blocks of the grid (and the grid signal's stride).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u32>,
    #[serde(default)]
    pub candidates: Candidates,
    /// DART's pivots per side for the duplication signal; default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pivots: Option<usize>,
}

impl Operator {
    /// Pruning by one signal.
    pub fn prune(signal: Signal, source: Source) -> Operator {
        Operator {
            signals: BTreeMap::from([(signal, 1.0)]),
            source,
            gamma: 0.0,
            tau: Tau::INFINITE,
            eta: 1.0,
            rho: 0.0,
            locality: None,
            window: None,
            candidates: Candidates::All,
            pivots: None,
        }
    }

    /// The signals with a non-zero weight.
    pub fn active_signals(&self) -> Vec<(Signal, f64)> {
        self.signals
            .iter()
            .filter(|(_, w)| **w != 0.0)
            .map(|(&s, &w)| (s, w))
            .collect()
    }

    pub fn uses(&self, signal: Signal) -> bool {
        self.signals.get(&signal).is_some_and(|w| *w != 0.0)
    }

    /// Whether the transfer needs the key metric (a finite temperature with some transfer).
    pub fn needs_metric(&self) -> bool {
        (self.gamma > 0.0 && self.tau.0.is_finite()) || self.uses(Signal::Redundancy)
    }

    /// Checks every parameter's range; the error names the parameter and its value.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.active_signals().is_empty() {
            return Err("operator needs at least one signal with a non-zero weight".into());
        }
        if let Some((s, w)) = self.signals.iter().find(|(_, w)| !w.is_finite()) {
            return Err(format!("signal weight {}: {w} is not finite", s.name()));
        }
        let check = |name: &str, v: f64, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(format!("{name} {v} is out of range"))
            }
        };
        check("gamma", self.gamma, (0.0..=1.0).contains(&self.gamma))?;
        check("tau", self.tau.0, self.tau.0 >= 0.0)?;
        check("eta", self.eta, (0.0..=1.0).contains(&self.eta))?;
        check("rho", self.rho, self.rho.is_finite())?;
        if let Some(l) = self.locality {
            check("locality", l, l > 0.0 && l.is_finite())?;
        }
        if let Some(w) = self.window {
            check("window", w as f64, (1..=64).contains(&w))?;
        }
        if self.pivots == Some(0) {
            return Err("pivots must be at least 1".into());
        }
        Ok(())
    }
}

/// The unified operator's setting that reproduces a hand-designed stage exactly, if there is one, as a
/// unified stage at the same layer with the same kept count. `None` for methods it cannot express (see
/// `docs/operator-space.md`): VisionZip and PruMerge+ choose anchors by rules that are not a ranking
/// (contextual anchors at a stride of the remainder; IQR outliers topped up with a uniform stride),
/// SparseVLM's recycling makes new cluster tokens, random draws, and ToMe below half of the entering tokens
/// needs several bipartite rounds.
pub fn preset(stage: &Stage, geometry: Geometry, entering: usize) -> Option<Stage> {
    let n0 = geometry.n0();
    let operator = match stage.method {
        Method::Fastv => Operator::prune(Signal::Last, Source::Previous),
        Method::Pdrop => Operator::prune(Signal::Last, Source::Current),
        Method::Sparsevlm if !stage.recycle.unwrap_or(false) => {
            Operator::prune(Signal::Raters, Source::Previous)
        }
        Method::Dart => Operator {
            pivots: stage.pivots,
            ..Operator::prune(Signal::Duplication, Source::Previous)
        },
        Method::Tome => {
            let kept = keep_count(stage.keep.unwrap_or(1.0), n0).min(entering);
            if kept < entering / 2 {
                return None;
            }
            Operator {
                gamma: 1.0,
                tau: Tau(0.0),
                candidates: Candidates::Bipartite,
                ..Operator::prune(Signal::Redundancy, Source::Previous)
            }
        }
        Method::Pool => Operator {
            gamma: 1.0,
            window: stage.window,
            ..Operator::prune(Signal::Grid, Source::Current)
        },
        _ => return None,
    };
    let kept = stage.kept_count(entering, n0, geometry.grid);
    Some(Stage::unified(
        stage.layer,
        kept as f64 / n0 as f64,
        operator,
    ))
}

/// z-scores `values` (all zeros when they are constant).
pub fn zscore(values: &[f32]) -> Vec<f32> {
    let n = values.len().max(1) as f32;
    let mean = values.iter().sum::<f32>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let std = var.sqrt();
    if std > 0.0 && std.is_finite() {
        values.iter().map(|v| (v - mean) / std).collect()
    } else {
        vec![0.0; values.len()]
    }
}

/// The combined score σ of the module docs from per-signal values over n tokens.
pub fn combine(operator: &Operator, signals: &[(Signal, Vec<f32>)], n: usize) -> Result<Vec<f32>> {
    let active = operator.active_signals();
    let values = |signal: Signal| -> Result<&Vec<f32>> {
        signals
            .iter()
            .find(|(s, _)| *s == signal)
            .map(|(_, v)| v)
            .filter(|v| v.len() == n)
            .ok_or_else(|| {
                FoldError::Plan(format!(
                    "signal {} was not computed for {n} tokens",
                    signal.name()
                ))
            })
    };
    if let [(signal, weight)] = active[..] {
        return Ok(values(signal)?.iter().map(|v| v * weight as f32).collect());
    }
    let mut score = vec![0f32; n];
    for (signal, weight) in active {
        for (acc, z) in score.iter_mut().zip(zscore(values(signal)?)) {
            *acc += weight as f32 * z;
        }
    }
    Ok(score)
}

/// The grid signal: 1 on cells whose row and column are multiples of `stride`.
pub fn grid_signal(cells: &[(u32, u32)], stride: u32) -> Vec<f32> {
    let stride = stride.max(1);
    cells
        .iter()
        .map(|&(r, c)| f32::from(u8::from(r % stride == 0 && c % stride == 0)))
        .collect()
}

/// The grid signal's stride: the window, else ⌊grid/√K⌋ (at least 1) so that about K cells are on it.
pub fn grid_stride(operator: &Operator, grid: usize, kept: usize) -> u32 {
    operator
        .window
        .unwrap_or_else(|| ((grid as f64 / (kept.max(1) as f64).sqrt()).floor() as u32).max(1))
}

/// The redundancy signal from the (head-mean) keys of the visual tokens.
pub fn redundancy_signal(metric: &Matrix) -> Vec<f32> {
    let m = metric.normalized();
    let n = m.rows;
    (0..n)
        .map(|i| {
            if i % 2 == 1 {
                2.0
            } else {
                let best = (1..n)
                    .step_by(2)
                    .map(|j| m.dot(i, j))
                    .fold(f32::NEG_INFINITY, f32::max);
                if best.is_finite() { -best } else { 2.0 }
            }
        })
        .collect()
}

/// Runs the operator on one sample's n visual tokens: `score` the combined score, `metric` their keys
/// (needed when [`Operator::needs_metric`]), `cells` their grid cells, keeping `target`.
pub fn operate(
    operator: &Operator,
    score: &[f32],
    metric: Option<&Matrix>,
    cells: &[(u32, u32)],
    target: usize,
) -> Result<Assignment> {
    let n = score.len();
    let kept = top_k(score, target);
    let mut rows: Vec<Vec<(usize, f32)>> = kept.iter().map(|&i| vec![(i, 1.0)]).collect();
    let gamma = operator.gamma as f32;
    if gamma > 0.0 && kept.len() < n {
        let tau = operator.tau.0;
        let normalized = match metric {
            Some(m) => Some(m.normalized()),
            None if tau.is_finite() => {
                return Err(FoldError::Plan(
                    "the operator's transfer needs the key metric".into(),
                ));
            }
            None => None,
        };
        let is_kept: Vec<bool> = {
            let mut v = vec![false; n];
            kept.iter().for_each(|&i| v[i] = true);
            v
        };
        let block = |i: usize, w: u32| (cells[i].0 / w, cells[i].1 / w);
        for j in (0..n).filter(|&j| !is_kept[j]) {
            // (slot in `kept`, anchor) pairs this token may transfer to.
            let allowed: Vec<(usize, usize)> = kept
                .iter()
                .enumerate()
                .filter(|&(_, &i)| {
                    (operator.candidates == Candidates::All || i % 2 == 1)
                        && operator.window.is_none_or(|w| block(i, w) == block(j, w))
                })
                .map(|(slot, &i)| (slot, i))
                .collect();
            if allowed.is_empty() {
                continue;
            }
            let cos = |i: usize| normalized.as_ref().map_or(0.0, |m| m.dot(j, i));
            if tau == 0.0 {
                let (slot, _) =
                    allowed
                        .iter()
                        .fold((allowed[0].0, f32::NEG_INFINITY), |acc, &(slot, i)| {
                            let c = cos(i);
                            if c > acc.1 { (slot, c) } else { acc }
                        });
                rows[slot].push((j, gamma));
                continue;
            }
            let logits: Vec<f32> = allowed
                .iter()
                .map(|&(_, i)| {
                    let similarity = if tau.is_finite() {
                        cos(i) / tau as f32
                    } else {
                        0.0
                    };
                    let spatial = operator.locality.map_or(0.0, |l| {
                        let dr = cells[i].0 as f32 - cells[j].0 as f32;
                        let dc = cells[i].1 as f32 - cells[j].1 as f32;
                        (dr * dr + dc * dc) / (2.0 * (l * l) as f32)
                    });
                    similarity - spatial
                })
                .collect();
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f32 = exp.iter().sum();
            for (&(slot, _), e) in allowed.iter().zip(&exp) {
                let w = gamma * e / total;
                if w > 0.0 {
                    rows[slot].push((j, w));
                }
            }
        }
    }
    let boost = if operator.rho != 0.0 {
        let z = zscore(score);
        kept.iter().map(|&i| operator.rho as f32 * z[i]).collect()
    } else {
        Vec::new()
    };
    Ok(Assignment {
        n_in: n,
        rows,
        representative: kept,
        eta: operator.eta as f32,
        boost,
    })
}

/// The plan with every stage replaced by its unified preset ([`preset`]); `None` if some stage has none.
pub fn unified_plan(plan: &crate::Plan, geometry: Geometry) -> Option<crate::Plan> {
    let entering = plan.planned_tokens(geometry.n_layers, geometry.n0(), geometry.grid);
    let stages = plan
        .stages
        .iter()
        .map(|stage| {
            // `planned_tokens` counts after the stages of a layer; the stage sees the count before.
            let before = match stage.layer {
                0 => geometry.n0(),
                l => entering[l - 1],
            };
            preset(stage, geometry, before)
        })
        .collect::<Option<Vec<_>>>()?;
    Some(crate::Plan {
        name: format!("{} (unified)", plan.name),
        proportional_attention: plan.proportional_attention,
        stages,
    })
}
