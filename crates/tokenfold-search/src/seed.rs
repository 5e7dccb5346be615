//! Seeds and selection.
//!
//! The hand-designed methods that the search space expresses exactly (the unified operator's presets with
//! the space's signal source and candidates: FastV and DART) are points of that space, so the search can
//! start from one of them as well as from its neutral start. The best one's schedule (the visual tokens
//! each layer processes) is then moved a token at a time ([`refine_schedule`]). Which start, which
//! schedule and which of the plans found is emitted are decided on held-out batches of the training split
//! (never an evaluation split), each plan run as a hard plan: first by exact-match accuracy (what the
//! comparison tables report), then by the search objective (answer cross-entropy plus the KL term).

use std::cell::Cell;

use candle_core::{D, Tensor};
use tokenfold_data::Batch;
use tokenfold_fold::budget::{Geometry, fit};
use tokenfold_fold::unified::{Candidates, Source, preset};
use tokenfold_fold::{DART_PIVOTS, FoldHook, Method, Plan, Stage};
use tokenfold_model::NativeModel;

use crate::error::Result;
use crate::search::{ScoredSchedule, answer_terms, prompt_ends};
use crate::space::{LayerParams, SIGNALS, SpaceInit};

/// A hand-designed plan at the budget, as unified stages, and the search variables that express it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seed {
    pub method: Method,
    /// DART's pivots per side when not the default [`DART_PIVOTS`].
    pub pivots: Option<usize>,
    /// The method's plan at the budget, every stage as its unified preset.
    pub plan: Plan,
    /// Per layer: the parameters (keep ratio of the entering tokens, operator, signal weights).
    pub layers: Vec<LayerParams>,
    /// The layers with a stage.
    pub active: Vec<bool>,
    /// The visual tokens each layer processes, when moved off the method's own schedule by
    /// [`refine_schedule`].
    pub schedule: Option<Vec<usize>>,
}

/// Signal weights below this are dropped from a plan; a seed gives the signals it does not use less.
const ABSENT_WEIGHT: f64 = 1e-6;

/// The pivot counts per side that DART's seeds take: the paper's 4, fewer and more. The count is the one
/// discrete parameter of the duplication signal, so no gradient chooses it; the selection does. It
/// decides much of the kept set: DART keeps min(pivots, K) image pivots (the largest key L1 norms), then
/// spreads the rest over the image and text pivots, so from K pivots on it keeps the K largest key norms.
/// The paper's count comes first, so that it wins a tie in the selection (at one kept token, every count
/// keeps the same one).
pub const DART_PIVOT_CHOICES: [usize; 6] = [4, 1, 2, 8, 16, 32];

/// The seeds at `budget`: each hand-designed method whose fitted plan the space expresses exactly, DART
/// at each of [`DART_PIVOT_CHOICES`].
pub fn seeds(budget: f64, geometry: Geometry) -> Vec<Seed> {
    Method::ALL
        .into_iter()
        .flat_map(|method| {
            let pivots: Vec<Option<usize>> = if method == Method::Dart {
                DART_PIVOT_CHOICES.iter().map(|&p| Some(p)).collect()
            } else {
                vec![None]
            };
            pivots
                .into_iter()
                .filter_map(move |p| seed(method, p, budget, geometry))
        })
        .collect()
}

/// `method`'s plan at `budget` (DART with `pivots` per side, if given) as a seed, if every stage has a
/// preset inside the search space: the previous layer's signals, every anchor a candidate, no window.
pub fn seed(
    method: Method,
    pivots: Option<usize>,
    budget: f64,
    geometry: Geometry,
) -> Option<Seed> {
    let pivots = pivots.filter(|&p| p != DART_PIVOTS);
    let mut plan = fit(method, budget, geometry).ok()?;
    if pivots.is_some() {
        if method != Method::Dart {
            return None;
        }
        plan.stages.iter_mut().for_each(|st| st.pivots = pivots);
    }
    let n0 = geometry.n0();
    let neutral = SpaceInit::default();
    let mut layers: Vec<LayerParams> = (0..geometry.n_layers)
        .map(|_| LayerParams {
            activation: 0.0,
            keep: neutral.keep,
            gamma: neutral.gamma,
            tau: neutral.tau,
            eta: neutral.eta,
            rho: neutral.rho,
            locality: neutral.locality,
            weights: SIGNALS
                .iter()
                .map(|&s| (s, 1.0 / SIGNALS.len() as f64))
                .collect(),
            pivots: pivots.unwrap_or(DART_PIVOTS),
        })
        .collect();
    let mut active = vec![false; geometry.n_layers];
    let mut stages = Vec::new();
    let mut entering = n0;
    for stage in &plan.stages {
        let unified = preset(stage, geometry, entering)?;
        let op = unified.operator.clone()?;
        let expressible = op.source == Source::Previous
            && op.candidates == Candidates::All
            && op.window.is_none()
            && stage.layer < geometry.n_layers
            && !active[stage.layer];
        if !expressible {
            return None;
        }
        let kept = (unified.keep.unwrap_or(1.0) * n0 as f64).round() as usize;
        let total: f64 = op.signals.values().sum();
        layers[stage.layer] = LayerParams {
            activation: 1.0,
            keep: kept as f64 / entering as f64,
            gamma: op.gamma,
            tau: op.tau.0,
            eta: op.eta,
            rho: op.rho,
            locality: op.locality.map_or(0.0, |lambda| 1.0 / (lambda * lambda)),
            weights: SIGNALS
                .iter()
                .map(|&s| {
                    let w = op.signals.get(&s).copied().unwrap_or(0.0) / total;
                    (s, w.max(ABSENT_WEIGHT))
                })
                .collect(),
            pivots: op.pivots.unwrap_or(DART_PIVOTS),
        };
        active[stage.layer] = true;
        entering = kept;
        stages.push(Stage {
            operator: Some(op),
            ..unified
        });
    }
    if stages.is_empty() {
        return None;
    }
    Some(Seed {
        method,
        pivots,
        plan: Plan {
            name: format!("{}-unified", label(method, pivots, None)),
            proportional_attention: true,
            stages,
        },
        layers,
        active,
        schedule: None,
    })
}

impl Seed {
    /// The method, with DART's pivots when not the default and the schedule when moved: `dart-p1`,
    /// `dart@2-2-2-1`.
    pub fn label(&self) -> String {
        label(self.method, self.pivots, self.schedule.as_deref())
    }

    /// The visual tokens each layer processes under the seed's plan.
    pub fn counts(&self, geometry: Geometry) -> Vec<usize> {
        self.plan
            .planned_tokens(geometry.n_layers, geometry.n0(), geometry.grid)
    }

    /// The seed's operator run on another schedule: `counts[ℓ]` visual tokens through layer ℓ
    /// (non-increasing, at least 1, at most n₀). A stage goes wherever the count drops, with the operator
    /// and parameters of the seed's stage that governs that layer (the last one at or before it, else its
    /// first). `None` if `counts` is not such a schedule. The label names the schedule when it is not
    /// this seed's.
    pub fn with_schedule(&self, counts: &[usize], geometry: Geometry) -> Option<Seed> {
        let n0 = geometry.n0();
        let valid = counts.len() == geometry.n_layers
            && counts.iter().all(|&c| (1..=n0).contains(&c))
            && counts.windows(2).all(|w| w[0] >= w[1]);
        let first = self.plan.stages.first()?;
        if !valid {
            return None;
        }
        let governing = |layer: usize| {
            self.plan
                .stages
                .iter()
                .rev()
                .find(|st| st.layer <= layer)
                .unwrap_or(first)
        };
        let mut layers = self.layers.clone();
        let mut active = vec![false; geometry.n_layers];
        let mut stages = Vec::new();
        let mut entering = n0;
        for (layer, &count) in counts.iter().enumerate() {
            let from = governing(layer);
            if count < entering {
                stages.push(Stage {
                    layer,
                    keep: Some(count as f64 / n0 as f64),
                    ..from.clone()
                });
                layers[layer] = LayerParams {
                    activation: 1.0,
                    keep: count as f64 / entering as f64,
                    ..self.layers[from.layer].clone()
                };
                active[layer] = true;
            } else {
                layers[layer].activation = 0.0;
                layers[layer].keep = 1.0;
            }
            entering = count;
        }
        let schedule = (counts != self.counts(geometry)).then(|| counts.to_vec());
        Some(Seed {
            plan: Plan {
                name: format!(
                    "{}-unified",
                    label(self.method, self.pivots, schedule.as_deref())
                ),
                stages,
                ..self.plan.clone()
            },
            layers,
            active,
            schedule,
            ..self.clone()
        })
    }
}

fn label(method: Method, pivots: Option<usize>, schedule: Option<&[usize]>) -> String {
    let mut label = method.name().to_string();
    if let Some(p) = pivots {
        label += &format!("-p{p}");
    }
    if let Some(counts) = schedule {
        let counts: Vec<String> = counts.iter().map(|c| c.to_string()).collect();
        label += &format!("@{}", counts.join("-"));
    }
    label
}

/// The schedules one move away from `counts` (visual tokens per layer) within `budget`: one more token
/// through a run of consecutive layers [i, j) (the counts stay non-increasing and at most `n0`), paid for,
/// if the budget needs it, by the fewest tokens taken from every layer from some b ≥ j on (at least one
/// left). Moves only ever trade tokens between layers or spend unused budget, so from the flat schedules
/// of the fitted methods they reach the front-loaded ones (more tokens early, fewer late) and fill a budget
/// that a whole token per layer would exceed.
pub fn neighbours(counts: &[usize], budget: f64, n0: usize) -> Vec<Vec<usize>> {
    let n_layers = counts.len();
    let fits =
        |c: &[usize]| c.iter().sum::<usize>() as f64 / (n_layers * n0) as f64 <= budget + 1e-12;
    let mut found: Vec<Vec<usize>> = Vec::new();
    for i in 0..n_layers {
        let ceiling = if i == 0 { n0 } else { counts[i - 1] };
        if counts[i] + 1 > ceiling {
            continue;
        }
        for j in i + 1..=n_layers {
            let mut raised = counts.to_vec();
            raised[i..j].iter_mut().for_each(|c| *c += 1);
            if fits(&raised) {
                found.push(raised);
                continue;
            }
            for b in j..n_layers {
                // Lowering a suffix keeps the counts non-increasing; the last count bounds d.
                if let Some(moved) = (1..raised[n_layers - 1])
                    .map(|d| {
                        let mut moved = raised.clone();
                        moved[b..].iter_mut().for_each(|c| *c -= d);
                        moved
                    })
                    .find(|moved| fits(moved))
                {
                    found.push(moved);
                }
            }
        }
    }
    let mut unique: Vec<Vec<usize>> = Vec::new();
    for counts in found {
        if !unique.contains(&counts) {
            unique.push(counts);
        }
    }
    unique
}

/// Where a schedule hill-climb ended.
pub struct Refined {
    /// The seed on the schedule reached (the seed itself if no move beat it).
    pub seed: Seed,
    pub score: Score,
    /// Every schedule scored, in order, the seed's own first.
    pub tried: Vec<ScoredSchedule>,
}

/// Hill-climbing over schedules with `seed`'s operator: each round scores every [`neighbours`] schedule
/// on the selection batches and moves to the best if it beats the current one (accuracy, then objective);
/// at most `rounds` rounds.
pub fn refine_schedule(
    frozen: &NativeModel,
    selection: &Selection,
    seed: &Seed,
    score: Score,
    budget: f64,
    geometry: Geometry,
    rounds: usize,
) -> Result<Refined> {
    let (mut current, mut current_score) = (seed.clone(), score);
    let scored = |counts: Vec<usize>, s: Score| ScoredSchedule {
        counts,
        selection_loss: s.objective,
        selection_accuracy: s.accuracy,
    };
    let mut tried = vec![scored(seed.counts(geometry), score)];
    for _ in 0..rounds {
        let mut best: Option<(Seed, Score)> = None;
        for counts in neighbours(&current.counts(geometry), budget, geometry.n0()) {
            if tried.iter().any(|t| t.counts == counts) {
                continue;
            }
            let Some(moved) = seed.with_schedule(&counts, geometry) else {
                continue;
            };
            let s = selection.score(frozen, &moved.plan)?;
            tried.push(scored(counts, s));
            if best.as_ref().is_none_or(|(_, b)| s.better_than(b)) {
                best = Some((moved, s));
            }
        }
        match best {
            Some((moved, s)) if s.better_than(&current_score) => {
                current = moved;
                current_score = s;
            }
            _ => break,
        }
    }
    Ok(Refined {
        seed: current,
        score: current_score,
        tried,
    })
}

/// Held-out batches with the unreduced model's answer logits on them.
pub struct Selection {
    pub batches: Vec<Batch>,
    references: Vec<Tensor>,
    align: f64,
    /// Plans scored so far.
    scored: Cell<usize>,
}

impl Selection {
    pub fn new(frozen: &NativeModel, batches: Vec<Batch>, align: f64) -> Result<Selection> {
        let references = batches
            .iter()
            .map(|b| Ok(frozen.target_logits(b, &mut tokenfold_model::NoHook)?.0))
            .collect::<Result<Vec<_>>>()?;
        Ok(Selection {
            batches,
            references,
            align,
            scored: Cell::new(0),
        })
    }

    /// Forward passes run so far: the unreduced model's on every batch, then one per batch and plan scored.
    pub fn forward_passes(&self) -> usize {
        self.batches.len() * (1 + self.scored.get())
    }

    /// How `plan`, run as a hard plan, does on the batches: the search objective (answer cross-entropy +
    /// align × KL to the unreduced model, averaged over batches) and the exact-match accuracy under
    /// teacher forcing (every answer token, end of sequence included, is the argmax: exactly when greedy
    /// decoding gives the reference answer).
    pub fn score(&self, frozen: &NativeModel, plan: &Plan) -> Result<Score> {
        self.scored.set(self.scored.get() + 1);
        let (mut objective, mut correct, mut samples_seen) = (0.0, 0usize, 0usize);
        for (batch, reference) in self.batches.iter().zip(&self.references) {
            let mut hook = FoldHook::new(frozen, plan);
            hook.prompt_ends = Some(prompt_ends(batch));
            let (logits, targets, samples) = frozen.target_logits(batch, &mut hook)?;
            let (ce, kl) = answer_terms(
                &logits,
                reference,
                &targets,
                &samples,
                batch.batch_size,
                self.align,
            )?;
            objective += (ce + (kl * self.align)?)?.to_scalar::<f32>()? as f64;
            let predicted: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            let targets: Vec<u32> = targets.to_vec1()?;
            let mut right = vec![None::<bool>; batch.batch_size];
            for ((&s, p), t) in samples.iter().zip(&predicted).zip(&targets) {
                let r = right[s].get_or_insert(true);
                *r &= p == t;
            }
            correct += right.iter().filter(|r| **r == Some(true)).count();
            samples_seen += right.iter().filter(|r| r.is_some()).count();
        }
        Ok(Score {
            objective: objective / self.batches.len().max(1) as f64,
            accuracy: correct as f64 / samples_seen.max(1) as f64,
        })
    }
}

/// A plan's result on the selection batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub objective: f64,
    pub accuracy: f64,
}

impl Score {
    /// Higher accuracy first (what the comparison tables report), then the lower objective.
    pub fn better_than(&self, other: &Score) -> bool {
        self.accuracy > other.accuracy
            || (self.accuracy == other.accuracy && self.objective < other.objective)
    }
}
