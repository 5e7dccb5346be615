//! Running a plan inside the model: a [`LayerHook`] that, before each layer with a stage, computes the
//! stage's signal, runs its operator per sample, and rebuilds the sequence.
//!
//! Each sample keeps its own tokens (batch > 1): a sample's new sequence is its text tokens plus its
//! reduced visual tokens, in order of original position; samples are padded to the longest with invalid
//! rows. Kept and merged tokens keep the original position of their representative, so RoPE and the mask
//! stay right, and the KV cache of later layers simply holds fewer keys.
//!
//! Signals are defined over the prompt only (the last prompt token, the text after the image), so a
//! decode step with the KV cache and a recomputation without it make the same choices.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use candle_core::{D, DType, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use tokenfold_model::{LayerHook, NativeModel, SeqState, kernels};

use crate::ops::{self, Assignment, Groups, Matrix};
use crate::plan::{Method, Plan, Stage};
use crate::signals::{HeadReduce, HostValues, QueriesKeys, RowLayout};
use crate::unified::{self, Signal};

/// Where each sample's image and prompt are, read from the sequence at layer 0.
#[derive(Debug, Clone)]
struct SampleLayout {
    /// Position of the first patch; `None` for a sample without an image.
    image_start: Option<u32>,
    n0: usize,
    /// Position of the last prompt token (the query of FastV and PDrop).
    query: u32,
    /// Position of the summary token, if the model has one.
    summary: Option<u32>,
    /// SparseVLM's raters: positions of the text tokens after the image chosen as raters at layer 0.
    raters: Vec<u32>,
    /// Valid tokens before any reduction.
    prompt_tokens: usize,
    /// A hash of the sample's layer-0 prompt input (image and text), so random draws depend on the sample, not
    /// on its place in a batch.
    content_seed: u64,
}

/// What passed through the layers: the budget accounting's measurements.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// Image samples seen.
    pub samples: u64,
    /// Σ over image samples of their original visual tokens.
    pub visual_tokens: u64,
    /// Σ over image samples of the visual tokens entering each layer.
    pub entering: Vec<u64>,
    /// Σ over image samples of all tokens (text and visual) entering each layer, and of their squares.
    pub entering_all: Vec<u64>,
    pub entering_all_sq: Vec<f64>,
    /// Σ over image samples of the rows each layer would compute for them in a padded batch (the batch's
    /// longest length), and of their squares: the work a padded layout executes, where `entering_all`
    /// counts the useful part (all a packed layout computes).
    pub computed_rows: Vec<u64>,
    pub computed_rows_sq: Vec<f64>,
    /// Σ over image samples of prompt tokens before any reduction, and of their squares.
    pub prompt_tokens: u64,
    pub prompt_tokens_sq: f64,
    /// Projections of one row by a d × d weight that the stages made beyond the layers' own, where a
    /// stage reads its own layer's queries and keys: the keys of every valid row and the queries of the
    /// rows whose queries it projects (the last prompt token and the summary token, SparseVLM's raters),
    /// less the keys it handed on to the layer (`SeqState::known_keys`), which the layer then does not
    /// project. What the layers' FLOPs leave out of a plan's cost; captured queries and keys cost nothing.
    /// Counted over valid rows, as the layers' FLOPs are: a padded batch's stage projects its padding
    /// rows too, so above batch 1 this is a lower bound of the work done.
    pub signal_projections: u64,
    /// Time spent computing signals and running operators, including the layer-0 bookkeeping that every
    /// plan needs (the samples' layouts and, for SparseVLM, its rater selection).
    pub overhead: Duration,
}

impl Trace {
    /// Mean visual tokens entering each layer.
    pub fn mean_entering(&self) -> Vec<f64> {
        self.entering
            .iter()
            .map(|&e| e as f64 / self.samples.max(1) as f64)
            .collect()
    }

    /// The FLOPs-equivalent average Σ_ℓ n_ℓ / L as a share of the original visual tokens.
    pub fn equivalent_share(&self) -> f64 {
        if self.visual_tokens == 0 || self.entering.is_empty() {
            return 1.0;
        }
        self.entering.iter().sum::<u64>() as f64
            / (self.entering.len() as u64 * self.visual_tokens) as f64
    }
}

/// Runs `plan` inside the model's forward pass.
pub struct FoldHook<'a> {
    model: &'a NativeModel,
    plan: &'a Plan,
    /// Per sample, the position of the last prompt token; by default the last valid token at layer 0.
    /// Set it when the sequence holds more than the prompt (recomputing generation without a cache).
    pub prompt_ends: Option<Vec<u32>>,
    pub trace: Trace,
    /// Record, per stage, which original patches each surviving token stands for (for drawing).
    pub record_groups: bool,
    /// Per stage: (layer, per sample: per surviving token, its original patch indices, the
    /// representative's first).
    pub groups: Vec<(usize, Vec<Vec<Vec<u32>>>)>,
    /// Per sample: the original patches each current visual token stands for, by representative patch.
    members: Vec<HashMap<u32, Vec<u32>>>,
    layouts: Vec<SampleLayout>,
    /// Per sample: size of each visual token, by the patch index of its representative.
    sizes: Vec<HashMap<u32, f32>>,
    /// Per sample: the attention-logit bias each visual token carries (the unified operator's
    /// re-weighting), by the patch index of its representative; absent is 0.
    boosts: Vec<HashMap<u32, f32>>,
}

impl<'a> FoldHook<'a> {
    pub fn new(model: &'a NativeModel, plan: &'a Plan) -> FoldHook<'a> {
        FoldHook {
            model,
            plan,
            prompt_ends: None,
            trace: Trace {
                entering: vec![0; model.n_layers()],
                entering_all: vec![0; model.n_layers()],
                entering_all_sq: vec![0.0; model.n_layers()],
                computed_rows: vec![0; model.n_layers()],
                computed_rows_sq: vec![0.0; model.n_layers()],
                ..Trace::default()
            },
            record_groups: false,
            groups: Vec::new(),
            members: Vec::new(),
            layouts: Vec::new(),
            sizes: Vec::new(),
            boosts: Vec::new(),
        }
    }

    fn grid(&self) -> usize {
        self.model.config.image_grid
    }

    /// Reads each sample's layout from a fresh sequence (before layer 0).
    fn read_layouts(&mut self, state: &SeqState) -> Result<()> {
        let (b, t) = (state.batch(), state.len());
        let summary_token = self.model.config.summary_token;
        self.layouts.clear();
        self.sizes.clear();
        self.boosts = vec![HashMap::new(); state.batch()];
        self.members.clear();
        let needs_seed = self
            .plan
            .stages
            .iter()
            .any(|st| st.method == Method::Random);
        let hidden: Vec<Vec<Vec<f32>>> = if needs_seed {
            state.hidden.to_vec3()?
        } else {
            Vec::new()
        };
        for s in 0..b {
            let row = |j: usize| s * t + j;
            let image: Vec<u32> = (0..t)
                .filter(|&j| state.is_image[row(j)] && state.valid[row(j)])
                .map(|j| state.positions[row(j)])
                .collect();
            let last_valid = (0..t)
                .filter(|&j| state.valid[row(j)])
                .map(|j| state.positions[row(j)])
                .max()
                .unwrap_or(0);
            let query = self
                .prompt_ends
                .as_ref()
                .and_then(|ends| ends.get(s).copied())
                .unwrap_or(last_valid);
            let image_start = image.iter().min().copied();
            let n0 = image.len();
            // `<|image_end|>` follows the last patch; the summary token follows it.
            let summary = image_start
                .filter(|_| summary_token)
                .map(|start| start + n0 as u32 + 1);
            let start = image_start.unwrap_or(0);
            self.sizes
                .push(image.iter().map(|&p| (p - start, 1.0)).collect());
            // Only drawings read which patches a token stands for.
            self.members.push(if self.record_groups {
                image
                    .iter()
                    .map(|&p| (p - start, vec![p - start]))
                    .collect()
            } else {
                HashMap::new()
            });
            self.layouts.push(SampleLayout {
                image_start,
                n0,
                query,
                summary,
                raters: Vec::new(),
                prompt_tokens: (0..t).filter(|&j| state.valid[row(j)]).count(),
                content_seed: if needs_seed {
                    // The prompt only, so generation with or without the cache draws the same.
                    content_hash(
                        hidden.get(s).map_or(&[][..], Vec::as_slice),
                        &(0..t)
                            .map(|j| state.valid[row(j)] && state.positions[row(j)] <= query)
                            .collect::<Vec<_>>(),
                    )
                } else {
                    0
                },
            });
        }
        if self.plan.stages.iter().any(|st| {
            st.method == Method::Sparsevlm
                || st
                    .operator
                    .as_ref()
                    .is_some_and(|op| op.uses(Signal::Raters))
        }) {
            self.choose_raters(state)?;
        }
        Ok(())
    }

    /// SparseVLM's rater selection on the layer-0 input: m = mean over visual tokens of softmax over text
    /// tokens of V·Tᵀ; the raters are the text tokens with m above its mean.
    fn choose_raters(&mut self, state: &SeqState) -> Result<()> {
        let (b, t) = (state.batch(), state.len());
        let hidden = HostValues::of(&state.hidden)?;
        let hidden = hidden.as_slice();
        let d = hidden.len() / (b * t).max(1);
        let layouts = &self.layouts;
        // Samples are independent; each one's dot products are the bulk of the work.
        let raters: Vec<Option<Vec<u32>>> = (0..b)
            .into_par_iter()
            .map(|s| {
                let layout = &layouts[s];
                let start = layout.image_start?;
                let image_end = start + layout.n0 as u32;
                let valid = |j: usize| state.valid[s * t + j];
                let position = |j: usize| state.positions[s * t + j];
                let row = |j: usize| &hidden[(s * t + j) * d..(s * t + j + 1) * d];
                let visual: Vec<usize> = (0..t)
                    .filter(|&j| valid(j) && state.is_image[s * t + j])
                    .collect();
                let text: Vec<usize> = (0..t)
                    .filter(|&j| {
                        valid(j)
                            && position(j) > image_end
                            && position(j) <= layout.query
                            && Some(position(j)) != layout.summary
                    })
                    .collect();
                if text.is_empty() || visual.is_empty() {
                    return None;
                }
                let chosen = sparsevlm_raters(
                    |j| row(visual[j]),
                    visual.len(),
                    |j| row(text[j]),
                    text.len(),
                );
                Some(chosen.into_iter().map(|i| position(text[i])).collect())
            })
            .collect();
        for (layout, raters) in self.layouts.iter_mut().zip(raters) {
            if let Some(raters) = raters {
                layout.raters = raters;
            }
        }
        Ok(())
    }

    /// Whether sample `s` holds an image: the budget accounting counts those samples only.
    fn has_image(&self, s: usize) -> bool {
        self.layouts[s].image_start.is_some()
    }

    fn record(&mut self, layer: usize, state: &SeqState) {
        let t = state.len();
        for s in 0..state.batch() {
            if !self.has_image(s) {
                continue;
            }
            let rows = s * t..(s + 1) * t;
            let valid = state.valid[rows.clone()].iter().filter(|&&v| v).count();
            let visual = rows
                .filter(|&r| state.valid[r] && state.is_image[r])
                .count();
            self.trace.entering[layer] += visual as u64;
            self.trace.entering_all[layer] += valid as u64;
            self.trace.entering_all_sq[layer] += (valid * valid) as f64;
            self.trace.computed_rows[layer] += t as u64;
            self.trace.computed_rows_sq[layer] += (t * t) as f64;
            if layer == 0 {
                self.trace.samples += 1;
                self.trace.visual_tokens += self.layouts[s].n0 as u64;
                let prompt = self.layouts[s].prompt_tokens;
                self.trace.prompt_tokens += prompt as u64;
                self.trace.prompt_tokens_sq += (prompt * prompt) as f64;
            }
        }
    }

    /// Runs one stage on every sample, then rebuilds the batch ([`Self::rebuild`]): each new row is a mix
    /// of old rows (one-hot for kept and text tokens, size-weighted for merged ones).
    fn run_stage(&mut self, stage: &Stage, state: &mut SeqState) -> Result<()> {
        let layer = stage.layer;
        let needs_qk = match (&stage.operator, stage.method) {
            (Some(op), Method::Unified) => {
                op.needs_metric() || op.active_signals().iter().any(|(s, _)| *s != Signal::Grid)
            }
            (_, method) => !matches!(method, Method::Pool | Method::Random),
        };
        // The layer's queries and keys, and the rows whose queries were computed (all of them for the
        // previous layer's): read in place below, not copied.
        let (keys, queries, query_rows) = if !needs_qk {
            (None, None, None)
        } else if stage.uses_previous_layer() && layer > 0 {
            let (q, k) = state.captured.take().ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "stage at layer {layer}: the previous layer's keys were not captured"
                ))
            })?;
            (Some(k), Some(q), None)
        } else {
            let rows = self.query_rows(stage, state);
            let (k, q) = self.model.layer_keys_and_queries_at(layer, state, &rows)?;
            // Counted over image samples, as the layers' FLOPs are (`record`).
            let t = state.len().max(1);
            let imaged = |row: usize| self.has_image(row / t);
            let valid = (0..state.valid.len())
                .filter(|&r| state.valid[r] && imaged(r))
                .count();
            let queries = rows.iter().filter(|&&r| imaged(r)).count();
            (Some(k), q, Some((rows, valid + queries)))
        };
        let keys = keys.as_ref().map(HostValues::of).transpose()?;
        let queries = queries.as_ref().map(HostValues::of).transpose()?;
        let qk = match (&keys, &queries, &query_rows) {
            (None, _, _) => None,
            (Some(k), Some(q), None) => Some(QueriesKeys::at_every_row(q, k)?),
            (Some(k), q, Some((rows, _))) => Some(QueriesKeys::at_rows(k, q.as_ref(), rows)?),
            (Some(_), None, None) => {
                candle_core::bail!("stage at layer {layer}: keys without queries")
            }
        };
        // DART compares final-normed hidden states.
        let needs_normed = stage.method == Method::Dart
            || stage
                .operator
                .as_ref()
                .is_some_and(|op| op.uses(Signal::Duplication));
        let normed = needs_normed
            .then(|| self.model.final_norm(&state.hidden))
            .transpose()?;
        let normed = normed.as_ref().map(HostValues::of).transpose()?;
        let b = state.batch();
        let key_bias = host_key_bias(state)?;
        // Samples are independent: each one's assignment and new rows are found in parallel, then the
        // hook's per-sample state is updated in order.
        let outcomes: Vec<SampleOutcome> = (0..b)
            .into_par_iter()
            .map(|s| {
                let (layout, visual) = sample_view(state, key_bias.as_deref(), s);
                let n = visual.len();
                let target = stage.kept_count(n, self.layouts[s].n0, self.grid());
                let positions: Vec<u32> = visual.iter().map(|&j| layout.positions[j]).collect();
                let assignment = if n == 0 || (n <= target && stage.method != Method::Pool) {
                    None
                } else {
                    let inputs = StageInputs {
                        s,
                        qk: qk.as_ref(),
                        normed: normed.as_ref().map(|n| sample_rows(n.as_slice(), state, s)),
                        layout: &layout,
                        visual: &visual,
                    };
                    Some(self.assign(stage, &inputs, target)?.sorted_by(&positions))
                };
                self.new_rows(s, &layout, &visual, &positions, assignment)
            })
            .collect::<Result<_>>()?;
        let mut samples: Vec<Vec<NewRow>> = Vec::with_capacity(b);
        let mut stage_groups: Vec<Vec<Vec<u32>>> = Vec::with_capacity(b);
        for (s, outcome) in outcomes.into_iter().enumerate() {
            samples.push(outcome.rows);
            if let Some((sizes, boosts)) = outcome.sizes_and_boosts {
                self.sizes[s] = sizes;
                self.boosts[s] = boosts;
            }
            if let Some(groups) = outcome.groups {
                if let Some(members) = outcome.members {
                    self.members[s] = members;
                }
                stage_groups.push(groups);
            }
        }
        if self.record_groups {
            self.groups.push((layer, stage_groups));
        }
        // The keys of this layer (not the previous one's, captured) are the layer's own for a row kept
        // unchanged: when every new row is an old row unchanged, the layer reuses them rather than
        // projecting them again, where the model says it gets the same bits.
        let reusable = query_rows.is_some()
            && mixes_on_host(&state.hidden)
            && state.hidden.dtype() == DType::F32
            && self.model.reuses_keys_of(state.batch() * state.len());
        let known_keys = match (&keys, reusable) {
            (Some(keys), true) => kept_keys(keys, &samples, state.hidden.device())?,
            _ => None,
        };
        self.rebuild(state, &samples)?;
        if let Some((_, projected)) = query_rows {
            // The layer takes the keys handed on and does not project them: only the rest is extra.
            let handed: usize = match known_keys {
                Some(_) => samples
                    .iter()
                    .enumerate()
                    .filter(|&(s, _)| self.has_image(s))
                    .map(|(_, rows)| rows.len())
                    .sum(),
                None => 0,
            };
            self.trace.signal_projections += projected.saturating_sub(handed) as u64;
        }
        state.known_keys = known_keys;
        Ok(())
    }

    /// Sample `s`'s new rows after a stage, in order of position: its text rows, then its visual rows
    /// (`visual`, at `positions`) kept as they are without an `assignment`, or the assignment's tokens with
    /// their sizes and attention boosts; with the sizes and boosts to keep for the next stage, and, when
    /// groups are recorded, which patches each new token stands for.
    fn new_rows(
        &self,
        s: usize,
        layout: &RowLayout,
        visual: &[usize],
        positions: &[u32],
        assignment: Option<Assignment>,
    ) -> Result<SampleOutcome> {
        let t = layout.positions.len();
        let mut rows: Vec<NewRow> = (0..t)
            .filter(|&j| layout.valid[j] && !layout.is_image[j])
            .map(|j| NewRow::copy(j, layout.positions[j], false, 1.0, 0.0))
            .collect();
        let start = self.layouts[s].image_start.unwrap_or(0);
        let size_of = |p: u32| self.sizes[s].get(&(p - start)).copied().unwrap_or(1.0);
        let boost_of = |p: u32| self.boosts[s].get(&(p - start)).copied().unwrap_or(0.0);
        let members_of = |p: u32| {
            self.members[s]
                .get(&(p - start))
                .cloned()
                .unwrap_or_default()
        };
        let Some(assignment) = assignment else {
            rows.extend(
                visual
                    .iter()
                    .zip(positions)
                    .map(|(&j, &p)| NewRow::copy(j, p, true, size_of(p), boost_of(p))),
            );
            rows.sort_by_key(|r| r.position);
            return Ok(SampleOutcome {
                rows,
                sizes_and_boosts: None,
                groups: self
                    .record_groups
                    .then(|| positions.iter().map(|&p| members_of(p)).collect()),
                members: None,
            });
        };
        let sizes_in: Vec<f32> = positions.iter().map(|&p| size_of(p)).collect();
        let (mixing, sizes_new) = assignment.mixing(&sizes_in)?;
        let new_positions: Vec<u32> = assignment
            .representative
            .iter()
            .map(|&r| positions[r])
            .collect();
        let boosts_new: Vec<f32> = new_positions
            .iter()
            .enumerate()
            .map(|(j, &p)| boost_of(p) + assignment.boost.get(j).copied().unwrap_or(0.0))
            .collect();
        for (((mix, &p), &size), &boost) in mixing
            .iter()
            .zip(&new_positions)
            .zip(&sizes_new)
            .zip(&boosts_new)
        {
            rows.push(NewRow {
                position: p,
                is_image: true,
                size,
                boost,
                mix: mix.iter().map(|&(i, m)| (visual[i], m)).collect(),
            });
        }
        let (groups, members) = if self.record_groups {
            let groups: Vec<Vec<u32>> = assignment
                .rows
                .iter()
                .zip(&assignment.representative)
                .map(|(row, &rep)| {
                    let mut patches = members_of(positions[rep]);
                    for &(i, _) in row.iter().filter(|(i, _)| *i != rep) {
                        patches.extend(members_of(positions[i]));
                    }
                    patches
                })
                .collect();
            let members = groups
                .iter()
                .zip(&new_positions)
                .map(|(g, &p)| (p - start, g.clone()))
                .collect();
            (Some(groups), Some(members))
        } else {
            (None, None)
        };
        let sizes = new_positions
            .iter()
            .zip(&sizes_new)
            .map(|(&p, &size)| (p - start, size))
            .collect();
        let boosts = new_positions
            .iter()
            .zip(&boosts_new)
            .filter(|(_, b)| **b != 0.0)
            .map(|(&p, &b)| (p - start, b))
            .collect();
        rows.sort_by_key(|r| r.position);
        Ok(SampleOutcome {
            rows,
            sizes_and_boosts: Some((sizes, boosts)),
            groups,
            members,
        })
    }

    /// The flat rows (s·t + j) whose queries `stage` reads: each sample's last prompt token, summary
    /// token and raters when a signal reads attention rows, and its visual rows when it reads the
    /// attention the image receives (no summary token); none for signals of keys or hidden states.
    fn query_rows(&self, stage: &Stage, state: &SeqState) -> Vec<usize> {
        let signals: Vec<Signal> = match (&stage.operator, stage.method) {
            (Some(op), Method::Unified) => {
                op.active_signals().into_iter().map(|(s, _)| s).collect()
            }
            (_, Method::Fastv | Method::Pdrop) => vec![Signal::Last],
            (_, Method::Sparsevlm) => vec![Signal::Raters],
            (_, Method::Visionzip | Method::Prumerge) => vec![Signal::Summary],
            _ => Vec::new(),
        };
        let reads_rows = signals
            .iter()
            .any(|s| matches!(s, Signal::Last | Signal::Raters | Signal::Summary));
        if !reads_rows {
            return Vec::new();
        }
        let reads_image = signals.contains(&Signal::Summary);
        let t = state.len();
        let mut rows = Vec::new();
        for (s, sample) in self.layouts.iter().enumerate() {
            let wanted = |j: usize| {
                let at = s * t + j;
                let position = state.positions[at];
                state.valid[at]
                    && (position == sample.query
                        || Some(position) == sample.summary
                        || sample.raters.contains(&position)
                        || (reads_image && sample.summary.is_none() && state.is_image[at]))
            };
            rows.extend((0..t).filter(|&j| wanted(j)).map(|j| s * t + j));
        }
        rows
    }

    /// One ranking signal over a sample's visual rows (see [`Signal`]).
    fn signal(
        &self,
        signal: Signal,
        inputs: &StageInputs,
        target: usize,
        pivots: usize,
        window: Option<u32>,
    ) -> Result<Vec<f32>> {
        let StageInputs {
            s,
            qk,
            normed,
            layout,
            visual,
        } = *inputs;
        let n = visual.len();
        let sample = &self.layouts[s];
        let t = layout.positions.len();
        let row_of =
            |position: u32| (0..t).find(|&j| layout.valid[j] && layout.positions[j] == position);
        let qk =
            || qk.ok_or_else(|| candle_core::Error::Msg("the stage needs queries and keys".into()));
        let at_visual =
            |scores: Vec<f32>| -> Vec<f32> { visual.iter().map(|&j| scores[j]).collect() };
        Ok(match signal {
            Signal::Last => match row_of(sample.query) {
                Some(query) => {
                    at_visual(qk()?.query_attention(s, layout, &[query], HeadReduce::Mean)?)
                }
                None => vec![0.0; n],
            },
            Signal::Raters => {
                let raters: Vec<usize> = sample.raters.iter().filter_map(|&p| row_of(p)).collect();
                let raters = if raters.is_empty() {
                    row_of(sample.query).into_iter().collect()
                } else {
                    raters
                };
                at_visual(qk()?.query_attention(s, layout, &raters, HeadReduce::Mean)?)
            }
            Signal::Summary => match sample.summary.and_then(row_of) {
                Some(query) => {
                    at_visual(qk()?.query_attention(s, layout, &[query], HeadReduce::Mean)?)
                }
                // No summary token: attention received from all image queries (the SigLIP port).
                None => at_visual(qk()?.attention_received(s, layout, visual)?),
            },
            Signal::Duplication => {
                let qk = qk()?;
                let normed = normed.ok_or_else(|| {
                    candle_core::Error::Msg("DART needs the final-normed hidden states".into())
                })?;
                let image_start = sample.image_start.unwrap_or(0);
                let text: Vec<usize> = (0..t)
                    .filter(|&j| {
                        layout.valid[j]
                            && !layout.is_image[j]
                            && layout.positions[j] > image_start + sample.n0 as u32
                            && layout.positions[j] <= sample.query
                            && Some(layout.positions[j]) != sample.summary
                    })
                    .collect();
                let rows: Vec<usize> = visual.iter().chain(&text).copied().collect();
                let cols = self.model.config.d_model;
                let mut data = Vec::with_capacity(rows.len() * cols);
                for &j in &rows {
                    data.extend_from_slice(&normed[j * cols..(j + 1) * cols]);
                }
                let hidden = Matrix::new(rows.len(), cols, data);
                let kept = dart(hidden, &qk.key_l1(s, &rows), n, pivots, target);
                let mut indicator = vec![0f32; n];
                kept.representative.iter().for_each(|&i| indicator[i] = 1.0);
                indicator
            }
            Signal::Redundancy => unified::redundancy_signal(&qk()?.key_metric(s, visual)),
            Signal::Grid => {
                let cells = self.cells(s, layout, visual);
                let stride = window.unwrap_or_else(|| {
                    ((self.grid() as f64 / (target.max(1) as f64).sqrt()).floor() as u32).max(1)
                });
                unified::grid_signal(&cells, stride)
            }
        })
    }

    /// Reads each sample's layout (last prompt token, summary token, SparseVLM's raters) from a state
    /// before layer 0, as the forward pass does; for callers that compute signals themselves (the search).
    pub fn read_layout(&mut self, state: &SeqState) -> Result<()> {
        self.read_layouts(state)
    }

    /// Every sample's `signals` over its valid visual rows, with the key metric (keys averaged over heads)
    /// and grid cells of those rows, from the queries and keys `qk` of `state`; `targets` gives each
    /// sample's kept count (DART's quotas and the grid stride depend on it) and `pivots` DART's pivots per
    /// side. Call [`Self::read_layout`] first.
    pub fn signals(
        &self,
        state: &SeqState,
        qk: &QueriesKeys,
        signals: &[Signal],
        targets: &[usize],
        pivots: usize,
    ) -> Result<Vec<SampleSignals>> {
        let b = state.batch();
        let normed = signals
            .contains(&Signal::Duplication)
            .then(|| self.model.final_norm(&state.hidden))
            .transpose()?;
        let normed = normed.as_ref().map(HostValues::of).transpose()?;
        let key_bias = host_key_bias(state)?;
        (0..b)
            .map(|s| {
                let (layout, visual) = sample_view(state, key_bias.as_deref(), s);
                if visual.is_empty() {
                    return Ok(SampleSignals {
                        visual,
                        values: Vec::new(),
                        metric: Matrix::new(0, 0, Vec::new()),
                        cells: Vec::new(),
                    });
                }
                let inputs = StageInputs {
                    s,
                    qk: Some(qk),
                    normed: normed.as_ref().map(|n| sample_rows(n.as_slice(), state, s)),
                    layout: &layout,
                    visual: &visual,
                };
                let target = targets.get(s).copied().unwrap_or(1).clamp(1, visual.len());
                let values = signals
                    .iter()
                    .map(|&sig| Ok((sig, self.signal(sig, &inputs, target, pivots, None)?)))
                    .collect::<Result<Vec<_>>>()?;
                Ok(SampleSignals {
                    metric: qk.key_metric(s, &visual),
                    cells: self.cells(s, &layout, &visual),
                    values,
                    visual,
                })
            })
            .collect()
    }

    /// Grid cells (row, column) of a sample's visual rows.
    fn cells(&self, s: usize, layout: &RowLayout, visual: &[usize]) -> Vec<(u32, u32)> {
        let start = self.layouts[s].image_start.unwrap_or(0);
        let grid = self.grid() as u32;
        visual
            .iter()
            .map(|&j| {
                let patch = layout.positions[j] - start;
                (patch / grid, patch % grid)
            })
            .collect()
    }

    /// The assignment of one sample's visual rows for `stage`, keeping `target` tokens.
    fn assign(&self, stage: &Stage, inputs: &StageInputs, target: usize) -> Result<Assignment> {
        let StageInputs {
            s,
            qk,
            layout,
            visual,
            ..
        } = *inputs;
        let n = visual.len();
        let pivots = stage.pivots.unwrap_or(DART_PIVOTS);
        let signal = |signal: Signal| self.signal(signal, inputs, target, pivots, stage.window);
        let qk =
            || qk.ok_or_else(|| candle_core::Error::Msg("the stage needs queries and keys".into()));
        Ok(match stage.method {
            Method::Fastv | Method::Pdrop => ops::prune(&signal(Signal::Last)?, target),
            Method::Sparsevlm => {
                let scores = signal(Signal::Raters)?;
                if stage.recycle.unwrap_or(false) {
                    sparsevlm_recycle(&scores, target, &qk()?.key_metric(s, visual))
                } else {
                    ops::prune(&scores, target)
                }
            }
            Method::Dart => {
                let kept = signal(Signal::Duplication)?;
                let kept: Vec<usize> = (0..n).filter(|&i| kept[i] > 0.0).collect();
                Assignment::keep(n, &kept)
            }
            Method::Tome => tome_to(&qk()?.key_metric(s, visual), target),
            Method::Visionzip | Method::Prumerge => {
                let sample = &self.layouts[s];
                let t = layout.positions.len();
                let summary = sample
                    .summary
                    .and_then(|p| (0..t).find(|&j| layout.valid[j] && layout.positions[j] == p));
                let scores: Vec<f32> = match summary {
                    Some(query) => {
                        let heads = if stage.method == Method::Visionzip {
                            HeadReduce::Sum
                        } else {
                            HeadReduce::Mean
                        };
                        let row = qk()?.query_attention(s, layout, &[query], heads)?;
                        visual.iter().map(|&j| row[j]).collect()
                    }
                    None => signal(Signal::Summary)?,
                };
                let metric = qk()?.key_metric(s, visual);
                if stage.method == Method::Visionzip {
                    visionzip(&scores, &metric, target, stage.contextual_share())
                } else {
                    prumerge_plus(&scores, &metric, target)
                }
            }
            Method::Pool => ops::pool(&self.cells(s, layout, visual), stage.window.unwrap_or(1)),
            Method::Random => {
                let sample = &self.layouts[s];
                let seed = stage.seed.unwrap_or(0) ^ sample.content_seed ^ stage.layer as u64;
                ops::random(n, target, &mut ChaCha8Rng::seed_from_u64(seed))
            }
            Method::Unified => {
                let op = stage.operator.as_ref().ok_or_else(|| {
                    candle_core::Error::Msg("a unified stage needs its operator".into())
                })?;
                let pivots = op.pivots.unwrap_or(DART_PIVOTS);
                let signals = op
                    .active_signals()
                    .into_iter()
                    .map(|(sig, _)| Ok((sig, self.signal(sig, inputs, target, pivots, op.window)?)))
                    .collect::<Result<Vec<_>>>()?;
                let score = unified::combine(op, &signals, n).map_err(fold_error)?;
                let metric = if op.needs_metric() {
                    Some(qk()?.key_metric(s, visual))
                } else {
                    None
                };
                unified::operate(
                    op,
                    &score,
                    metric.as_ref(),
                    &self.cells(s, layout, visual),
                    target,
                )
                .map_err(fold_error)?
            }
        })
    }

    /// Rebuilds the batch, samples padded to the longest with invalid rows: each new hidden row is a
    /// weighted sum of old rows of its sample, computed by [`kernels::mix_rows`] in inference passes and
    /// as one batched matmul (b, t', t)·(b, t, d) where gradients must flow.
    fn rebuild(&self, state: &mut SeqState, samples: &[Vec<NewRow>]) -> Result<()> {
        let t = state.len();
        let b = samples.len();
        let t_new = samples.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let n = b * t_new;
        let (mut positions, mut is_image, mut valid, mut key_bias) =
            (vec![0u32; n], vec![false; n], vec![false; n], vec![0f32; n]);
        let mut any_bias = false;
        for (s, rows) in samples.iter().enumerate() {
            for (r, row) in rows.iter().enumerate() {
                let at = s * t_new + r;
                positions[at] = row.position;
                is_image[at] = row.is_image;
                valid[at] = true;
                key_bias[at] = row.boost
                    + if self.plan.proportional_attention {
                        row.size.ln()
                    } else {
                        0.0
                    };
                any_bias |= key_bias[at] != 0.0;
            }
        }
        let device = state.hidden.device().clone();
        state.hidden = if mixes_on_host(&state.hidden) {
            // Only the rows each new row needs are read: most of a dense mixing matrix is zeros.
            let mixes: Vec<Vec<(usize, f32)>> = (0..b * t_new)
                .map(|at| {
                    let s = at / t_new;
                    samples[s].get(at % t_new).map_or_else(Vec::new, |row| {
                        row.mix.iter().map(|&(j, m)| (s * t + j, m)).collect()
                    })
                })
                .collect();
            let d = state.hidden.dim(D::Minus1)?;
            kernels::mix_rows(&state.hidden, &mixes)?.reshape((b, t_new, d))?
        } else {
            let mut mix = vec![0f32; b * t_new * t];
            for (s, rows) in samples.iter().enumerate() {
                for (r, row) in rows.iter().enumerate() {
                    for &(j, m) in &row.mix {
                        mix[(s * t_new + r) * t + j] += m;
                    }
                }
            }
            let mix =
                Tensor::from_vec(mix, (b, t_new, t), &device)?.to_dtype(state.hidden.dtype())?;
            mix.matmul(&state.hidden)?
        };
        state.positions = positions;
        state.is_image = is_image;
        state.valid = valid;
        state.key_bias = if self.plan.proportional_attention || any_bias {
            Some(Tensor::from_vec(key_bias, (b, t_new), &device)?)
        } else {
            None
        };
        state.captured = None;
        state.known_keys = None;
        Ok(())
    }
}

/// What a stage leaves of one sample (see [`FoldHook::new_rows`]).
struct SampleOutcome {
    rows: Vec<NewRow>,
    /// The sizes and attention boosts of the sample's visual tokens, by representative patch; `None` when
    /// the stage left the sample as it was.
    sizes_and_boosts: Option<(HashMap<u32, f32>, HashMap<u32, f32>)>,
    /// When groups are recorded: the patches each visual token stands for, in order.
    groups: Option<Vec<Vec<u32>>>,
    /// When groups are recorded and the stage changed the sample: the same, by representative patch.
    members: Option<HashMap<u32, Vec<u32>>>,
}

/// One sample's ranking signals for a caller outside the hook (see [`FoldHook::signals`]).
#[derive(Debug, Clone)]
pub struct SampleSignals {
    /// The sample's valid visual rows.
    pub visual: Vec<usize>,
    /// Per signal, its values over those rows.
    pub values: Vec<(Signal, Vec<f32>)>,
    /// Their keys averaged over heads, (rows, head_dim).
    pub metric: Matrix,
    /// Their grid cells (row, column).
    pub cells: Vec<(u32, u32)>,
}

/// A row of the rebuilt sequence: a mix of old rows of its sample.
struct NewRow {
    position: u32,
    is_image: bool,
    size: f32,
    /// Attention-logit bias the token carries (re-weighting).
    boost: f32,
    /// (old row, weight) pairs; one row with weight 1 for a kept token.
    mix: Vec<(usize, f32)>,
}

impl NewRow {
    fn copy(row: usize, position: u32, is_image: bool, size: f32, boost: f32) -> NewRow {
        NewRow {
            position,
            is_image,
            size,
            boost,
            mix: vec![(row, 1.0)],
        }
    }
}

/// What a stage's operator sees of one sample.
#[derive(Clone, Copy)]
struct StageInputs<'a> {
    s: usize,
    qk: Option<&'a QueriesKeys<'a>>,
    /// The sample's final-normed hidden states, (t, d) row-major.
    normed: Option<&'a [f32]>,
    layout: &'a RowLayout<'a>,
    visual: &'a [usize],
}

impl LayerHook for FoldHook<'_> {
    fn before_layer(&mut self, layer: usize, state: &mut SeqState) -> Result<bool> {
        if layer == 0 {
            // Reading the layouts includes SparseVLM's rater selection, which is reduction work.
            let started = Instant::now();
            self.read_layouts(state)?;
            self.trace.overhead += started.elapsed();
        }
        let mut changed = false;
        let plan = self.plan;
        for stage in plan.stages.iter().filter(|st| st.layer == layer) {
            let started = Instant::now();
            self.run_stage(stage, state)?;
            self.trace.overhead += started.elapsed();
            changed = true;
        }
        self.record(layer, state);
        Ok(changed)
    }

    fn capture(&self, layer: usize) -> bool {
        self.plan
            .stages
            .iter()
            .any(|st| st.layer == layer + 1 && st.uses_previous_layer())
    }

    fn reads_hidden(&self, layer: usize) -> bool {
        self.plan.stages.iter().any(|st| st.layer == layer)
    }
}

/// The keys (b, h, t', hd) of the rows `samples` rebuild the batch with, gathered from the keys (b, h, t,
/// hd) of the rows before, when every new row is an old one as it was (one old row, weight 1: the same
/// bits, hence the same keys); `None` when a row is a mix. Padding rows are zero.
fn kept_keys(
    keys: &HostValues,
    samples: &[Vec<NewRow>],
    device: &candle_core::Device,
) -> Result<Option<Tensor>> {
    let &[b, h, t, hd] = keys.dims() else {
        candle_core::bail!("keys of shape {:?}, expected (b, h, t, hd)", keys.dims());
    };
    let one_to_one = samples
        .iter()
        .flatten()
        .all(|row| matches!(row.mix[..], [(j, w)] if w == 1.0 && j < t));
    if samples.len() != b || !one_to_one {
        return Ok(None);
    }
    let t_new = samples.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let keys = keys.as_slice();
    let mut kept = vec![0f32; b * h * t_new * hd];
    for (s, rows) in samples.iter().enumerate() {
        for head in 0..h {
            for (r, row) in rows.iter().enumerate() {
                let from = ((s * h + head) * t + row.mix[0].0) * hd;
                let to = ((s * h + head) * t_new + r) * hd;
                kept[to..to + hd].copy_from_slice(&keys[from..from + hd]);
            }
        }
    }
    Ok(Some(Tensor::from_vec(kept, (b, h, t_new, hd), device)?))
}

/// Whether a rebuild can mix `hidden`'s rows with [`kernels::mix_rows`]: an inference pass on the CPU in
/// f32 or f64. Hidden states that need gradients (training through a plan, the search) take the dense
/// mixing matmul, which carries them.
fn mixes_on_host(hidden: &Tensor) -> bool {
    kernels::fused_enabled()
        && !hidden.track_op()
        && hidden.device().is_cpu()
        && matches!(hidden.dtype(), DType::F32 | DType::F64)
}

/// Sample `s`'s part of a (b, t, …) row-major buffer of `state`'s rows.
fn sample_rows<'a>(data: &'a [f32], state: &SeqState, s: usize) -> &'a [f32] {
    let per_sample = data.len() / state.batch().max(1);
    &data[s * per_sample..(s + 1) * per_sample]
}

/// The per-key bias of `state` on the host, if it has one.
fn host_key_bias(state: &SeqState) -> Result<Option<Vec<f32>>> {
    state
        .key_bias
        .as_ref()
        .map(|kb| kb.flatten_all()?.to_vec1())
        .transpose()
}

/// Sample `s`'s rows of `state` (with its slice of `key_bias`) and its valid visual rows.
fn sample_view<'a>(
    state: &'a SeqState,
    key_bias: Option<&'a [f32]>,
    s: usize,
) -> (RowLayout<'a>, Vec<usize>) {
    let t = state.len();
    let rows = s * t..(s + 1) * t;
    let layout = RowLayout {
        positions: &state.positions[rows.clone()],
        is_image: &state.is_image[rows.clone()],
        valid: &state.valid[rows.clone()],
        key_bias: key_bias.map(|kb| &kb[rows.clone()]),
    };
    let visual: Vec<usize> = (0..t)
        .filter(|&j| layout.valid[j] && layout.is_image[j])
        .collect();
    (layout, visual)
}

fn fold_error(e: crate::FoldError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// FNV-1a over the bit patterns of a sample's input rows marked in `include`.
fn content_hash(rows: &[Vec<f32>], include: &[bool]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for (row, _) in rows.iter().zip(include).filter(|(_, v)| **v) {
        for value in row {
            hash ^= u64::from(value.to_bits());
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// ToMe down to `target` tokens: bipartite rounds (each merging at most half) until the count is reached;
/// groups compose across rounds.
pub fn tome_to(metric: &Matrix, target: usize) -> Assignment {
    let n = metric.rows;
    let mut groups = Groups::singletons(n);
    let mut current = metric.clone();
    while groups.len() > target.max(1) {
        let round = ops::bipartite_groups(&current, groups.len() - target.max(1));
        // Merge the round's metric rows by plain averages (ToMe averages keys with the tokens' sizes; the
        // next round's similarity only needs a representative direction).
        let mut next_groups = Groups::with_capacity(round.len(), n);
        let mut next_rows = Vec::with_capacity(round.len() * current.cols);
        for row in round.iter() {
            let start = next_rows.len();
            next_rows.resize(start + current.cols, 0f32);
            for &i in row {
                for (m, v) in next_rows[start..].iter_mut().zip(current.row(i)) {
                    *m += v / row.len() as f32;
                }
            }
            // The representative stays the member that kept its place (the destination, listed first).
            next_groups.push(row.iter().flat_map(|&i| groups.group(i)).copied());
        }
        groups = next_groups;
        current = Matrix::new(groups.len(), current.cols, next_rows);
    }
    Assignment::from_groups(n, &groups)
}

/// SparseVLM with recycling: of the `target` tokens, some are cluster tokens made from the best 30% of the
/// pruned ones (DPC-kNN, n/10 + 1 clusters as in the reference code); the rest are the top scorers.
pub fn sparsevlm_recycle(scores: &[f32], target: usize, metric: &Matrix) -> Assignment {
    let n = scores.len();
    let pruned_guess = n.saturating_sub(target);
    let recycled = (pruned_guess * 3 / 10).max(1);
    let clusters = (recycled / 10 + 1).min(target.saturating_sub(1));
    if clusters == 0 {
        return ops::prune(scores, target);
    }
    let kept = ops::top_k(scores, target - clusters);
    let mut is_kept = vec![false; n];
    kept.iter().for_each(|&i| is_kept[i] = true);
    let pruned: Vec<usize> = (0..n).filter(|&i| !is_kept[i]).collect();
    let pruned_scores: Vec<f32> = pruned.iter().map(|&i| scores[i]).collect();
    let best: Vec<usize> = ops::top_k(&pruned_scores, recycled)
        .into_iter()
        .map(|i| pruned[i])
        .collect();
    let mut groups: Vec<Vec<usize>> = kept.iter().map(|&i| vec![i]).collect();
    groups.extend(ops::dpc_knn(metric, &best, clusters, 7));
    Assignment::groups(n, &groups)
}

/// SparseVLM's rater selection: m = mean over the `n_visual` visual rows of the softmax over the `n_text`
/// text rows of their dot products; the raters are the text rows whose m is above m's mean (all of them
/// when none is). Returns indices into the text rows, in order.
pub fn sparsevlm_raters<'a>(
    visual: impl Fn(usize) -> &'a [f32],
    n_visual: usize,
    text: impl Fn(usize) -> &'a [f32],
    n_text: usize,
) -> Vec<usize> {
    if n_visual == 0 || n_text == 0 {
        return (0..n_text).collect();
    }
    let mut m = vec![0f32; n_text];
    let mut logits = vec![0f32; n_text];
    // Rows of one width, as a layer's hidden states are, take each text row's products with all the
    // visual rows side by side, eight at a time (ops::dots); the products are the same either way round.
    let width = text(0).len();
    let one_width = (0..n_text).all(|j| text(j).len() == width)
        && (0..n_visual).all(|v| visual(v).len() == width);
    let by_text: Vec<f32> = if one_width {
        // Row by row: collecting a flat_map value by value took 8 of the 18 µs of 64 rows of 256.
        let mut visuals: Vec<f32> = Vec::with_capacity(n_visual * width);
        (0..n_visual).for_each(|v| visuals.extend_from_slice(visual(v)));
        let mut by_text = vec![0f32; n_text * n_visual];
        for (j, out) in by_text.chunks_exact_mut(n_visual).enumerate() {
            ops::dots(text(j), &visuals, width, out);
        }
        by_text
    } else {
        Vec::new()
    };
    for v in 0..n_visual {
        for (j, l) in logits.iter_mut().enumerate() {
            *l = if one_width {
                by_text[j * n_visual + v]
            } else {
                ops::dot(visual(v), text(j))
            };
        }
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        logits.iter_mut().for_each(|l| *l = (*l - max).exp());
        let total: f32 = logits.iter().sum();
        for (acc, e) in m.iter_mut().zip(&logits) {
            *acc += e / total / n_visual as f32;
        }
    }
    let mean = m.iter().sum::<f32>() / n_text as f32;
    let raters: Vec<usize> = (0..n_text).filter(|&j| m[j] > mean).collect();
    if raters.is_empty() {
        (0..n_text).collect()
    } else {
        raters
    }
}

/// DART's pivots per side (image and text) when a stage does not name them: the paper's 4 + 4.
pub const DART_PIVOTS: usize = 4;

/// DART: pivots are the `pivots` image tokens and `pivots` text tokens with the largest key L1 norms;
/// for each pivot in turn (image pivots, then text, by decreasing norm), the candidates least similar to it
/// (cosine of final-normed hidden states) are kept, `target − image pivots` in all, spread evenly.
/// `normed` and `l1` cover the `n` visual rows first, then the text rows.
pub fn dart(normed: Matrix, l1: &[f32], n: usize, pivots: usize, target: usize) -> Assignment {
    let m = normed.into_normalized();
    let image_pivots: Vec<usize> = top_desc(&l1[..n], pivots.min(target));
    let text_pivots: Vec<usize> = top_desc(&l1[n..], pivots)
        .into_iter()
        .map(|i| n + i)
        .collect();
    let all_pivots: Vec<usize> = image_pivots.iter().chain(&text_pivots).copied().collect();
    let mut kept: Vec<usize> = image_pivots.clone();
    let mut candidates: Vec<usize> = (0..n).filter(|i| !image_pivots.contains(i)).collect();
    let remaining = target - kept.len();
    let per = remaining / all_pivots.len().max(1);
    let extra = remaining % all_pivots.len().max(1);
    // The pivot's similarity to every visual row, eight at a time (the visual rows come first).
    let mut similarities = vec![0f32; n];
    for (p_index, &p) in all_pivots.iter().enumerate() {
        let want = per + usize::from(p_index < extra);
        ops::dots(m.row(p), &m.data, m.cols, &mut similarities);
        // A NaN similarity (from a NaN hidden state) counts as the most similar, which keeps the
        // comparison below a total order.
        let mut by_similarity: Vec<(usize, f32)> = candidates
            .iter()
            .map(|&c| {
                let similarity = similarities[c];
                (
                    c,
                    if similarity.is_nan() {
                        f32::INFINITY
                    } else {
                        similarity
                    },
                )
            })
            .collect();
        // Only the `want` least similar are needed, in no particular order: a selection, not a sort.
        let least_similar = |a: &(usize, f32), b: &(usize, f32)| {
            a.1.partial_cmp(&b.1)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.0.cmp(&b.0))
        };
        if want < by_similarity.len() {
            by_similarity.select_nth_unstable_by(want, least_similar);
        }
        let chosen: Vec<usize> = by_similarity.iter().take(want).map(|&(c, _)| c).collect();
        candidates.retain(|c| !chosen.contains(c));
        kept.extend(chosen);
    }
    kept.sort_unstable();
    Assignment::keep(n, &kept)
}

/// Indices of the `k` largest values, largest first.
fn top_desc(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    // A NaN value (from a NaN hidden state) counts as the smallest, so that the order stays total.
    let value = |i: usize| {
        if values[i].is_nan() {
            f32::NEG_INFINITY
        } else {
            values[i]
        }
    };
    order.sort_by(|&a, &b| value(b).total_cmp(&value(a)).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// VisionZip: `target − c` dominant tokens by score; the other tokens are split into `c` contextual
/// anchors at a uniform stride and the tokens merged into their key-nearest anchor (size-weighted average;
/// the reference adds the members' mean to the anchor instead, which doubles a token's norm inside a
/// decoder).
pub fn visionzip(scores: &[f32], metric: &Matrix, target: usize, contextual: f64) -> Assignment {
    let n = scores.len();
    let c = if target >= 2 {
        ((contextual * target as f64).round() as usize).min(target - 1)
    } else {
        0
    };
    let dominant = ops::top_k(scores, target - c);
    let rest: Vec<usize> = (0..n).filter(|i| !dominant.contains(i)).collect();
    if c == 0 || rest.is_empty() {
        return Assignment::keep(n, &dominant);
    }
    let step = (rest.len() / c).max(1);
    let anchors: Vec<usize> = rest.iter().step_by(step).take(c).copied().collect();
    let members: Vec<usize> = rest
        .iter()
        .filter(|i| !anchors.contains(i))
        .copied()
        .collect();
    let mut groups: Vec<Vec<usize>> = dominant.iter().map(|&i| vec![i]).collect();
    let merged = ops::anchor_merge(metric, &anchors, &members);
    groups.extend(
        merged
            .rows
            .iter()
            .map(|r| r.iter().map(|&(i, _)| i).collect()),
    );
    Assignment::groups(n, &groups)
}

/// PruMerge+: IQR outliers of the score (at most `target`), topped up with spatially uniform tokens to
/// `target`; every other token merges into its key-nearest kept token (size-weighted average).
pub fn prumerge_plus(scores: &[f32], metric: &Matrix, target: usize) -> Assignment {
    let n = scores.len();
    let outliers = ops::iqr_outliers(scores);
    let outlier_scores: Vec<f32> = outliers.iter().map(|&i| scores[i]).collect();
    let mut kept: Vec<usize> = ops::top_k(&outlier_scores, target)
        .into_iter()
        .map(|i| outliers[i])
        .collect();
    let rest: Vec<usize> = (0..n).filter(|i| !kept.contains(i)).collect();
    let need = target - kept.len();
    if need > 0 {
        // Evenly spaced over the remaining tokens in raster order.
        kept.extend((0..need).map(|i| rest[i * rest.len() / need]));
    }
    kept.sort_unstable();
    let members: Vec<usize> = (0..n).filter(|i| !kept.contains(i)).collect();
    ops::anchor_merge(metric, &kept, &members)
}
