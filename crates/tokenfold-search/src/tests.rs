use candle_core::{DType, Device, IndexOp, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenfold_data::{Batch, Task};
use tokenfold_fold::budget::Geometry;
use tokenfold_fold::ops::{self, Matrix};
use tokenfold_fold::unified::{self, Operator, Signal, Source, Tau};
use tokenfold_model::NativeModel;
use tokenfold_model::config::{ModelConfig, Shape};
use tokenfold_model::ops::MASKED;

use crate::relax::{Flow, SoftHook, StageInputs, relaxed_stage, threshold};
use crate::search::{SearchConfig, choose_active, discretise, prompt_ends, search};
use crate::space::{LayerParams, SIGNALS, SearchSpace, SpaceInit};

/// One sample of `n` visual rows on a 4×4 grid followed by `text` text rows, with random signals, keys
/// and hidden states, in `dtype`.
fn stage_fixture(seed: u64, dtype: DType) -> (Flow, StageInputs, Matrix, Vec<(u32, u32)>, usize) {
    let device = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (n, text, d, k) = (16usize, 3usize, 5usize, SIGNALS.len());
    let t = n + text;
    let mut z = vec![0f64; t * k];
    let mut raw: Vec<Vec<f32>> = vec![Vec::new(); k];
    for (c, column) in raw.iter_mut().enumerate() {
        *column = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        for (j, v) in unified::zscore(column).into_iter().enumerate() {
            z[j * k + c] = v as f64;
        }
    }
    let keys = Matrix::new(
        n,
        4,
        (0..n * 4).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
    );
    let normalized = keys.normalized();
    let cells: Vec<(u32, u32)> = (0..n as u32).map(|i| (i / 4, i % 4)).collect();
    let (mut cos, mut dist2, mut pair) = (
        vec![0f64; t * t],
        vec![0f64; t * t],
        vec![MASKED as f64; t * t],
    );
    for j in 0..n {
        for i in 0..n {
            cos[j * t + i] = normalized.dot(j, i) as f64;
            let (dr, dc) = (
                cells[j].0 as f64 - cells[i].0 as f64,
                cells[j].1 as f64 - cells[i].1 as f64,
            );
            dist2[j * t + i] = dr * dr + dc * dc;
            pair[j * t + i] = 0.0;
        }
    }
    let visual: Vec<f64> = (0..t).map(|j| if j < n { 1.0 } else { 0.0 }).collect();
    let hidden: Vec<f64> = (0..t * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let sizes: Vec<f64> = (0..t)
        .map(|j| {
            if j < n {
                rng.random_range(1.0..3.0)
            } else {
                1.0
            }
        })
        .collect();
    let tensor = |v: Vec<f64>, shape: &[usize]| {
        Tensor::from_vec(v, shape, &device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let flow = Flow {
        hidden: tensor(hidden, &[1, t, d]),
        presence: tensor(vec![1.0; t], &[1, t]),
        sizes: tensor(sizes, &[1, t]),
        boost: tensor(vec![0.0; t], &[1, t]),
    };
    let inputs = StageInputs {
        signals: tensor(z, &[1, t, k]),
        cos: tensor(cos, &[1, t, t]),
        dist2: tensor(dist2, &[1, t, t]),
        pair_mask: tensor(pair, &[1, t, t]),
        visual: tensor(visual, &[1, t]),
    };
    let _ = raw;
    (flow, inputs, keys, cells, n)
}

/// A scalar function of every output of a relaxed stage, with fixed random projections.
fn stage_objective(space: &SearchSpace, flow: &Flow, inputs: &StageInputs, seed: u64) -> Tensor {
    let params = space.stage(0).unwrap();
    let (out, _) = relaxed_stage(flow, inputs, &params, &params.activation, 0.3, false).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut project = |t: &Tensor| {
        let values: Vec<f64> = (0..t.elem_count())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let r = Tensor::from_vec(values, t.shape(), t.device()).unwrap();
        (t * r).unwrap().sum_all().unwrap()
    };
    let parts = [
        project(&out.hidden),
        project(&out.presence),
        project(&out.sizes),
        project(&out.boost),
    ];
    parts
        .iter()
        .skip(1)
        .fold(parts[0].clone(), |acc, p| (acc + p).unwrap())
}

#[test]
fn the_relaxed_stage_has_finite_difference_gradients_in_every_parameter() {
    let device = Device::Cpu;
    for seed in 0..3u64 {
        let (flow, inputs, _, _, _) = stage_fixture(seed, DType::F64);
        let init = SpaceInit {
            activation: 0.7,
            keep: 0.4,
            gamma: 0.6,
            tau: 0.5,
            eta: 0.7,
            rho: 0.3,
            locality: 0.2,
        };
        let space = SearchSpace::with_dtype(1, &init, DType::F64, &device).unwrap();
        // Unequal signal weights, so that each weight's gradient is exercised.
        space
            .omega
            .set(&Tensor::new(&[[0.3f64, -0.2, 0.5, 0.1, -0.4, 0.2]], &device).unwrap())
            .unwrap();
        let objective = stage_objective(&space, &flow, &inputs, seed + 100);
        let grads = objective.backward().unwrap();
        for (name, var) in space.vars() {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} has no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let eps = 1e-5;
            for (i, &g) in grad.iter().enumerate() {
                let at = |delta: f64| {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &device).unwrap())
                        .unwrap();
                    let value = stage_objective(&space, &flow, &inputs, seed + 100)
                        .to_scalar::<f64>()
                        .unwrap();
                    var.set(&Tensor::from_vec(base.clone(), var.shape(), &device).unwrap())
                        .unwrap();
                    value
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                let scale = numeric.abs().max(g.abs()).max(1e-3);
                assert!(
                    (numeric - g).abs() / scale < 1e-4,
                    "seed {seed}, {name}[{i}]: autodiff {g}, finite difference {numeric}"
                );
            }
        }
    }
}

#[test]
fn the_soft_threshold_keeps_the_asked_share() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let score: Vec<f64> = (0..40).map(|_| rng.random_range(-2.0..2.0)).collect();
    let presence: Vec<f64> = (0..40).map(|_| rng.random_range(0.1..1.0)).collect();
    let visual: Vec<f64> = (0..40).map(|j| if j < 32 { 1.0 } else { 0.0 }).collect();
    for keep in [0.05, 0.3, 0.9] {
        for temperature in [0.01, 0.5] {
            let theta = threshold(&score, &presence, &visual, keep, temperature);
            let kept: f64 = (0..32)
                .map(|j| presence[j] / (1.0 + (-(score[j] - theta) / temperature).exp()))
                .sum();
            let mass: f64 = presence[..32].iter().sum();
            assert!(
                (kept - keep * mass).abs() < 1e-6 * mass,
                "keep {keep}, T {temperature}"
            );
        }
    }
}

#[test]
fn cold_or_straight_through_relaxed_stages_are_the_hard_unified_operator() {
    let device = Device::Cpu;
    for seed in 0..4u64 {
        let (flow, inputs, keys, cells, n) = stage_fixture(seed, DType::F64);
        let (gamma, tau, eta, rho, kappa, keep) = (0.7, 0.3, 0.6, 0.5, 0.25, 0.375);
        let init = SpaceInit {
            activation: 0.5,
            keep,
            gamma,
            tau,
            eta,
            rho,
            locality: kappa,
        };
        let space = SearchSpace::with_dtype(1, &init, DType::F64, &device).unwrap();
        space
            .omega
            .set(&Tensor::new(&[[0.3f64, -0.2, 0.5, 0.1, -0.4, 0.2]], &device).unwrap())
            .unwrap();
        let params = space.stage(0).unwrap();
        let one = Tensor::new(1f64, &device).unwrap();
        // Cold and soft, or warm and straight-through: both run the hard operator forward.
        let (out, k) = if seed % 2 == 0 {
            relaxed_stage(&flow, &inputs, &params, &one, 1e-6, false).unwrap()
        } else {
            relaxed_stage(&flow, &inputs, &params, &one, 0.5, true).unwrap()
        };
        // The same operator, hard.
        let p = &space.snapshot(0.0).unwrap()[0];
        let operator = Operator {
            signals: p.weights.clone(),
            source: Source::Previous,
            gamma: p.gamma,
            tau: Tau(p.tau),
            eta: p.eta,
            rho: p.rho,
            locality: Some(1.0 / p.locality.sqrt()),
            window: None,
            candidates: Default::default(),
            pivots: None,
        };
        let z: Vec<Vec<f64>> = inputs.signals.i(0).unwrap().to_vec2().unwrap();
        let score: Vec<f32> = (0..n)
            .map(|j| {
                SIGNALS
                    .iter()
                    .enumerate()
                    .map(|(c, s)| z[j][c] * p.weights[s])
                    .sum::<f64>() as f32
            })
            .collect();
        let target = (keep * n as f64).round() as usize;
        let assignment = unified::operate(&operator, &score, Some(&keys), &cells, target).unwrap();
        let hidden = flow.hidden.i(0).unwrap().narrow(0, 0, n).unwrap();
        let sizes: Vec<f32> = flow
            .sizes
            .i(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[..n]
            .to_vec();
        let (hard, hard_sizes) =
            ops::apply(&hidden.to_dtype(DType::F32).unwrap(), &sizes, &assignment).unwrap();
        let k: Vec<f64> = k.i(0).unwrap().to_vec1().unwrap();
        let kept: Vec<usize> = (0..n).filter(|&j| k[j] > 0.5).collect();
        assert_eq!(kept, assignment.representative, "seed {seed}: kept tokens");
        let soft: Vec<Vec<f64>> = out.hidden.i(0).unwrap().to_vec2().unwrap();
        let soft_sizes: Vec<f64> = out.sizes.i(0).unwrap().to_vec1().unwrap();
        let boost: Vec<f64> = out.boost.i(0).unwrap().to_vec1().unwrap();
        let hard: Vec<Vec<f32>> = hard.to_vec2().unwrap();
        for (r, &j) in kept.iter().enumerate() {
            for (a, b) in soft[j].iter().zip(&hard[r]) {
                assert!(
                    (a - *b as f64).abs() < 1e-4,
                    "seed {seed}: row {j}: {a} vs {b}"
                );
            }
            assert!((soft_sizes[j] - hard_sizes[r] as f64).abs() < 1e-4);
            assert!((boost[j] - assignment.boost[r] as f64).abs() < 1e-3);
        }
    }
}

fn params(keep: f64, activation: f64) -> LayerParams {
    LayerParams {
        activation,
        keep,
        gamma: 0.1,
        tau: 0.2,
        eta: 1.0,
        rho: 0.0,
        locality: 0.0,
        weights: [(Signal::Last, 0.7), (Signal::Raters, 0.3)].into(),
        pivots: tokenfold_fold::DART_PIVOTS,
    }
}

#[test]
fn discrete_plans_meet_the_budget_and_use_as_much_of_it_as_they_can() {
    let g = Geometry {
        n_layers: 6,
        grid: 8,
    };
    let n0 = g.n0();
    let layers: Vec<LayerParams> = [0.4, 0.9, 0.5, 0.9, 0.3, 0.9]
        .iter()
        .map(|&k| params(k, 0.9))
        .collect();
    for budget in [0.5, 0.333, 0.111, 0.028] {
        for active in [
            vec![true, false, true, false, true, false],
            vec![false, false, true, false, false, false],
            vec![true; 6],
        ] {
            let plan = discretise(&layers, &active, budget, g, "p").unwrap();
            plan.validate(6).unwrap();
            let share = plan.equivalent_share(6, n0, 8);
            assert!(share <= budget + 1e-12, "{budget}: {share}");
            // One more token at any stage (keeping shares non-increasing) would exceed the budget.
            for i in 0..plan.stages.len() {
                let mut bigger = plan.clone();
                let count = (bigger.stages[i].keep.unwrap() * n0 as f64).round() + 1.0;
                let previous = if i == 0 {
                    n0 as f64
                } else {
                    (plan.stages[i - 1].keep.unwrap() * n0 as f64).round()
                };
                if count > previous {
                    continue;
                }
                bigger.stages[i].keep = Some(count / n0 as f64);
                if bigger.validate(6).is_ok() {
                    let over = bigger.equivalent_share(6, n0, 8);
                    assert!(
                        over > budget + 1e-12,
                        "{budget}: stage {i} could keep one more token ({share} → {over})"
                    );
                }
            }
            // Every stage is a unified stage carrying the searched operator.
            for stage in &plan.stages {
                let op = stage.operator.as_ref().unwrap();
                assert_eq!(op.gamma, 0.1);
                assert_eq!(op.signals.len(), 2);
            }
        }
    }
    // Only a late layer active at 2.8%: a first-layer-5 plan cannot fit, so the stage moves earlier.
    let late = vec![false, false, false, false, false, true];
    let plan = discretise(&layers, &late, 0.028, g, "late").unwrap();
    assert!(plan.equivalent_share(6, n0, 8) <= 0.028);
    assert!(plan.stages[0].layer < 5);
}

#[test]
fn activations_choose_the_layers_above_one_half_and_never_none() {
    let layers: Vec<LayerParams> = [0.2, 0.7, 0.4].iter().map(|&a| params(0.5, a)).collect();
    assert_eq!(choose_active(&layers), vec![false, true, false]);
    let quiet: Vec<LayerParams> = [0.2, 0.3, 0.1].iter().map(|&a| params(0.5, a)).collect();
    assert_eq!(choose_active(&quiet), vec![false, true, false]);
}

fn tiny_model() -> NativeModel {
    let shape = Shape {
        d_model: 32,
        n_layers: 4,
        n_heads: 4,
        d_ff: 48,
    };
    let mut config = ModelConfig::from_shape(shape, 40, 12, 4, 128);
    config.summary_token = true;
    NativeModel::new(config, 3, &Device::Cpu).unwrap()
}

/// `bos img_start patch×16 img_end summary question… answer… eos`, answers as targets.
fn tiny_batch(model: &NativeModel, seed: u64) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = model.config.image_grid.pow(2);
    let b = 4;
    let mut rows = Vec::new();
    let mut prompt_lens = Vec::new();
    for _ in 0..b {
        let mut row = vec![1u32, 3];
        row.extend(std::iter::repeat_n(5, n));
        row.extend([4, 6]);
        let question = rng.random_range(2..5);
        row.extend((0..question).map(|_| rng.random_range(7..40u32)));
        prompt_lens.push(row.len());
        row.extend((0..2).map(|_| rng.random_range(7..40u32)));
        row.push(2);
        rows.push(row);
    }
    let t = rows.iter().map(Vec::len).max().unwrap();
    let mut tokens = vec![0u32; b * t];
    let mut loss_mask = vec![0f32; b * t];
    for (s, row) in rows.iter().enumerate() {
        tokens[s * t..s * t + row.len()].copy_from_slice(row);
        for j in prompt_lens[s]..row.len() {
            loss_mask[s * t + j] = 1.0;
        }
    }
    Batch {
        batch_size: b,
        seq_len: t,
        n_patches: n,
        patch_dim: model.config.patch_dim,
        tokens,
        loss_mask,
        lengths: rows.iter().map(Vec::len).collect(),
        prompt_lens,
        image_starts: vec![Some(2); b],
        patches: (0..b * n * model.config.patch_dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect(),
        tasks: vec![Task::Count; b],
        answers: vec![String::new(); b],
    }
}

#[test]
fn a_short_search_emits_a_valid_plan_within_budget_and_its_trajectory() {
    let model = tiny_model();
    let g = Geometry::of(&model.config);
    let mut config = SearchConfig::new(0.3);
    config.steps = 6;
    config.batch_size = 4;
    config.seeds = false;
    let mut seen = 0;
    let report = search(
        &model,
        &config,
        |step| Ok(tiny_batch(&model, step as u64)),
        |_| seen += 1,
    )
    .unwrap();
    assert_eq!(seen, 6);
    assert_eq!(report.trajectory.len(), 6);
    assert_eq!((report.forward_passes, report.backward_passes), (12, 6));
    report.plan.validate(g.n_layers).unwrap();
    assert!(report.plan_share <= 0.3 + 1e-12);
    assert!(!report.plan.stages.is_empty());
    // The parameters moved from their start.
    let first = &report.trajectory[0].layers;
    let last = &report.trajectory[5].layers;
    assert!(first.iter().zip(last).any(|(a, b)| a.keep != b.keep));
    // The plan runs in the model.
    let mut hook = tokenfold_fold::FoldHook::new(&model, &report.plan);
    let batch = tiny_batch(&model, 99);
    let inputs = tokenfold_model::Inputs::from_batch(&batch, &Device::Cpu).unwrap();
    model
        .prefill(&inputs, &mut hook, &mut tokenfold_model::KvCache::default())
        .unwrap();
    let _ = Var::new(0f32, &Device::Cpu);
}

#[test]
fn bad_search_settings_name_the_field() {
    let mut config = SearchConfig::new(1.5);
    assert!(
        config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("budget 1.5")
    );
    config.budget = 0.1;
    config.temperature = (0.0, 0.1);
    assert!(
        config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature")
    );
}

#[test]
fn the_budget_projection_meets_the_budget_with_implicit_gradients() {
    use crate::search::budget_shift;
    let device = Device::Cpu;
    let space = SearchSpace::with_dtype(5, &SpaceInit::default(), DType::F64, &device).unwrap();
    space
        .keep
        .set(&Tensor::new(&[0.3f64, -0.5, 1.0, 0.2, -1.2], &device).unwrap())
        .unwrap();
    space
        .alpha
        .set(&Tensor::new(&[2.0f64, 0.5, 1.5, -0.3, 3.0], &device).unwrap())
        .unwrap();
    let budget = 0.2;
    // Within budget: no shift. Over it: the shifted share is the budget.
    let (_, none) = budget_shift(&space, None, 0.99, false).unwrap();
    assert_eq!(none, 0.0);
    let (shift, value) = budget_shift(&space, None, budget, false).unwrap();
    assert!(value < 0.0);
    let share: f64 = space
        .expected_share(&shift, None)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!((share - budget).abs() < 1e-9, "{share}");
    // Exact: a share under the budget is shifted up to it.
    let (shift, value) = budget_shift(&space, None, 0.9, true).unwrap();
    assert!(value > 0.0);
    let share: f64 = space
        .expected_share(&shift, None)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!((share - 0.9).abs() < 1e-9, "{share}");
    // A downstream function of the shifted keep ratios: autodiff (through the implicit shift) against
    // finite differences that re-solve the shift.
    let weights = Tensor::new(&[1.0f64, -2.0, 0.5, 3.0, 1.5], &device).unwrap();
    let objective = |space: &SearchSpace| {
        let (shift, _) = budget_shift(space, None, budget, false).unwrap();
        let keep =
            crate::space::sigmoid(&space.keep.as_tensor().broadcast_add(&shift).unwrap()).unwrap();
        (keep * &weights).unwrap().sum_all().unwrap()
    };
    let grads = objective(&space).backward().unwrap();
    for (name, var) in [("keep", &space.keep), ("alpha", &space.alpha)] {
        let grad: Vec<f64> = grads.get(var.as_tensor()).unwrap().to_vec1().unwrap();
        let base: Vec<f64> = var.as_tensor().to_vec1().unwrap();
        for i in 0..base.len() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::new(v.as_slice(), &device).unwrap())
                    .unwrap();
                let value = objective(&space).to_scalar::<f64>().unwrap();
                var.set(&Tensor::new(base.as_slice(), &device).unwrap())
                    .unwrap();
                value
            };
            let numeric = (at(1e-5) - at(-1e-5)) / 2e-5;
            let scale = numeric.abs().max(grad[i].abs()).max(1e-3);
            assert!(
                (numeric - grad[i]).abs() / scale < 1e-4,
                "{name}[{i}]: autodiff {}, finite difference {numeric}",
                grad[i]
            );
        }
    }
}

/// The prefill logits at each sample's last prompt token with `plan` in the forward pass.
fn plan_logits(model: &NativeModel, plan: &tokenfold_fold::Plan, batch: &Batch) -> Vec<Vec<f32>> {
    let mut hook = tokenfold_fold::FoldHook::new(model, plan);
    let inputs = tokenfold_model::Inputs::from_batch(batch, &Device::Cpu).unwrap();
    model
        .prefill(&inputs, &mut hook, &mut tokenfold_model::KvCache::default())
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// The largest difference between the answer logits of the soft hook with `seed`'s layers fixed
/// (straight-through, as the seeded search runs them) and those of its plan run by `FoldHook`.
fn soft_against_plan(model: &NativeModel, seed: &crate::seed::Seed, batch: &Batch) -> f32 {
    let frozen = model.frozen().unwrap();
    let template = crate::relax::template_plan();
    let space = SearchSpace::from_layers(&seed.layers, &Device::Cpu).unwrap();
    let mut soft = SoftHook::new(&frozen, &space, &template, prompt_ends(batch));
    soft.activation = Some(seed.active.clone());
    let (relaxed, _, _) = frozen.target_logits(batch, &mut soft).unwrap();
    let mut hard = tokenfold_fold::FoldHook::new(&frozen, &seed.plan);
    hard.prompt_ends = Some(prompt_ends(batch));
    let (planned, _, _) = frozen.target_logits(batch, &mut hard).unwrap();
    (&relaxed - &planned)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn seeds_are_the_hand_designed_plans_the_space_expresses_exactly() {
    use crate::seed::seeds;
    let model = tiny_model();
    let g = Geometry::of(&model.config);
    let batch = tiny_batch(&model, 5);
    for budget in [0.3, 0.111] {
        let found = seeds(budget, g);
        let labels: Vec<String> = found.iter().map(|s| s.label()).collect();
        // Pruning by the previous layer's signals; not PDrop (its own layer), SparseVLM (its plans
        // recycle), ToMe (bipartite candidates), pooling (a window), VisionZip, PruMerge+ or random draws.
        // DART at each pivot count, the default unnamed.
        assert_eq!(
            labels,
            [
                "fastv", "dart", "dart-p1", "dart-p2", "dart-p8", "dart-p16", "dart-p32"
            ],
            "budget {budget}"
        );
        for seed in &found {
            let mut method_plan = tokenfold_fold::budget::fit(seed.method, budget, g).unwrap();
            for stage in &mut method_plan.stages {
                stage.pivots = seed.pivots;
            }
            // The same plan: identical logits in the model.
            let (a, b) = (
                plan_logits(&model, &method_plan, &batch),
                plan_logits(&model, &seed.plan, &batch),
            );
            for (ra, rb) in a.iter().zip(&b) {
                for (x, y) in ra.iter().zip(rb) {
                    assert!(
                        (x - y).abs() < 1e-5,
                        "{}: {x} against {y}",
                        seed.method.name()
                    );
                }
            }
            // The variables start at the seed's parameters.
            let space = SearchSpace::from_layers(&seed.layers, &Device::Cpu).unwrap();
            let back = space.snapshot(0.0).unwrap();
            for (l, (p, q)) in seed.layers.iter().zip(&back).enumerate() {
                assert!((p.keep - q.keep).abs() < 1e-5, "layer {l} keep");
                assert!((p.gamma - q.gamma).abs() < 1e-5, "layer {l} gamma");
                assert_eq!(q.activation > 0.5, seed.active[l], "layer {l} activation");
                for (s, w) in &p.weights {
                    assert!((w - q.weights[s]).abs() < 1e-5, "layer {l} weight of {s:?}");
                }
            }
            // The method's stages: same layers, same kept shares.
            let stages = |plan: &tokenfold_fold::Plan| {
                plan.stages
                    .iter()
                    .map(|st| (st.layer, (st.keep.unwrap() * 1e6).round()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(stages(&method_plan), stages(&seed.plan));
            let n0 = g.n0();
            assert!(seed.plan.equivalent_share(g.n_layers, n0, g.grid) <= budget + 1e-12);
            // The search runs the seed, pivots included, as its plan.
            let diff = soft_against_plan(&model, seed, &batch);
            assert!(
                diff < 1e-5,
                "{}: soft hook against plan: {diff}",
                seed.label()
            );
        }
        // The pivot count changes DART's kept set: its seeds are not one plan. (At 11.1% the tiny
        // model keeps a single token, which every variant takes as its first image pivot.)
        if budget < 0.2 {
            continue;
        }
        let variants: Vec<Vec<Vec<f32>>> = found
            .iter()
            .filter(|s| s.label().starts_with("dart"))
            .map(|s| plan_logits(&model, &s.plan, &batch))
            .collect();
        assert!(
            variants.iter().any(|v| *v != variants[0]),
            "budget {budget}"
        );
    }
}

#[test]
fn a_thawed_seed_can_move_and_keeps_its_own_signal_first() {
    use crate::search::{THAW, thaw};
    let model = tiny_model();
    let g = Geometry::of(&model.config);
    let seed = crate::seed::seeds(0.111, g)
        .into_iter()
        .find(|s| s.label() == "dart")
        .unwrap();
    let thawed = thaw(&seed.layers);
    for (l, (p, q)) in seed.layers.iter().zip(&thawed).enumerate() {
        if !seed.active[l] {
            continue;
        }
        // A pruning seed: γ = 0, every weight on duplication.
        assert_eq!(p.gamma, 0.0);
        assert!(q.gamma >= THAW - 1e-12, "layer {l}: γ {}", q.gamma);
        let total: f64 = q.weights.values().sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!(q.weights.values().all(|&w| w >= THAW / 1.2));
        assert!(q.weights[&Signal::Duplication] > 0.85);
        assert_eq!(
            (q.keep, q.activation, q.pivots),
            (p.keep, p.activation, p.pivots)
        );
    }
    // The variables now sit where the maps have a gradient: they round-trip.
    let space = SearchSpace::from_layers(&thawed, &Device::Cpu).unwrap();
    for (l, (p, q)) in thawed.iter().zip(space.snapshot(0.0).unwrap()).enumerate() {
        assert!((p.gamma - q.gamma).abs() < 1e-5, "layer {l}");
        for (s, w) in &p.weights {
            assert!((w - q.weights[s]).abs() < 1e-5, "layer {l}: {s:?}");
        }
    }
}

#[test]
fn target_logits_follow_the_answers_through_a_reduction_plan() {
    let model = tiny_model();
    let g = Geometry::of(&model.config);
    let batch = tiny_batch(&model, 8);
    let (full, targets, samples) = model
        .target_logits(&batch, &mut tokenfold_model::NoHook)
        .unwrap();
    // A plan that keeps every token is the unreduced model.
    let keep_all = tokenfold_fold::Plan::full();
    let mut hook = tokenfold_fold::FoldHook::new(&model, &keep_all);
    let (same, _, _) = model.target_logits(&batch, &mut hook).unwrap();
    let diff = (&full - &same).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    // A plan that removes tokens answers at the same targets, with other logits.
    let plan = tokenfold_fold::budget::fit(tokenfold_fold::Method::Fastv, 0.3, g).unwrap();
    let mut hook = tokenfold_fold::FoldHook::new(&model, &plan);
    hook.prompt_ends = Some(batch.prompt_lens.iter().map(|&p| p as u32 - 1).collect());
    let (reduced, reduced_targets, reduced_samples) =
        model.target_logits(&batch, &mut hook).unwrap();
    assert_eq!(reduced.dims(), full.dims());
    assert_eq!(
        reduced_targets.to_vec1::<u32>().unwrap(),
        targets.to_vec1::<u32>().unwrap()
    );
    assert_eq!(reduced_samples, samples);
    let diff = (&full - &reduced)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 1e-4);
}

#[test]
fn a_seeded_search_emits_the_best_plan_on_held_out_batches() {
    let model = tiny_model();
    let g = Geometry::of(&model.config);
    let mut config = SearchConfig::new(0.3);
    config.steps = 4;
    config.seed_steps = 3;
    config.selection_batches = 2;
    config.batch_size = 4;
    let mut asked = Vec::new();
    let mut steps = 0;
    let report = search(
        &model,
        &config,
        |i| {
            asked.push(i);
            Ok(tiny_batch(&model, i as u64))
        },
        |_| steps += 1,
    )
    .unwrap();
    // Selection batches come after the search's own: indices 4 and 5.
    assert!(asked.contains(&4) && asked.contains(&5) && !asked.contains(&6));
    assert_eq!(steps, 4 + 3);
    let seeded = report.seeded.as_ref().expect("a seeded run");
    assert_eq!(seeded.trajectory.len(), 3);
    // Candidates: the neutral search, the seven seeds, the best seed on the schedule its hill-climb
    // reached (if it moved), the seeded search.
    let names: Vec<&str> = report.candidates.iter().map(|c| c.name.as_str()).collect();
    let moved = seeded.seed.contains('@');
    assert_eq!(names.len(), 9 + usize::from(moved), "{names:?}");
    // The hill-climb starts from the seed's own schedule and every schedule it scores fits the budget.
    let n0 = g.n0();
    assert!(!report.schedules.is_empty());
    for s in &report.schedules {
        assert_eq!(s.counts.len(), g.n_layers);
        assert!(s.counts.windows(2).all(|w| w[0] >= w[1]));
        assert!(s.counts.iter().sum::<usize>() as f64 <= 0.3 * (g.n_layers * n0) as f64 + 1e-9);
        assert!((0.0..=1.0).contains(&s.selection_accuracy));
    }
    assert!(names.contains(&"searched-30.0%"));
    assert!(names.contains(&"dart-unified"));
    assert!(names.contains(&"dart-p8-unified"));
    assert!(names.contains(&format!("searched-30.0%-from-{}", seeded.seed).as_str()));
    // The best: highest exact match on the selection batches, then the lowest objective.
    let best = report
        .candidates
        .iter()
        .max_by(|a, b| {
            a.selection_accuracy
                .total_cmp(&b.selection_accuracy)
                .then(b.selection_loss.total_cmp(&a.selection_loss))
        })
        .unwrap();
    assert!(
        report
            .candidates
            .iter()
            .all(|c| (0.0..=1.0).contains(&c.selection_accuracy))
    );
    assert_eq!(report.chosen, best.name);
    assert_eq!(report.plan, best.plan);
    assert!(
        report
            .candidates
            .iter()
            .all(|c| c.selection_loss.is_finite())
    );
    assert!(
        report
            .candidates
            .iter()
            .all(|c| c.plan_share <= 0.3 + 1e-12)
    );
    assert!(report.plan_share <= 0.3 + 1e-12);
    report.plan.validate(g.n_layers).unwrap();
    // The seeded run starts from its seed's layers, on the schedule the hill-climb reached.
    let (method, schedule) = seeded.seed.split_once('@').unwrap_or((&seeded.seed, ""));
    let seed = crate::seed::seeds(0.3, g)
        .into_iter()
        .find(|s| s.label() == method)
        .unwrap();
    assert_eq!(report.schedules[0].counts, seed.counts(g));
    let seed = if moved {
        let counts: Vec<usize> = schedule.split('-').map(|c| c.parse().unwrap()).collect();
        assert!(report.schedules.iter().any(|s| s.counts == counts));
        seed.with_schedule(&counts, g).unwrap()
    } else {
        seed
    };
    assert_eq!(seeded.active, seed.active);
}

#[test]
fn schedule_moves_trade_tokens_between_layers_within_the_budget() {
    use crate::seed::neighbours;
    // 2.8% of 64 tokens on 4 layers is 7.1 token-layers: one token per layer leaves three unused.
    let sorted = |mut v: Vec<Vec<usize>>| {
        v.sort();
        v
    };
    assert_eq!(
        sorted(neighbours(&[1, 1, 1, 1], 16.0 / 576.0, 64)),
        [vec![2, 1, 1, 1], vec![2, 2, 1, 1], vec![2, 2, 2, 1]]
    );
    // 11.1% is 28.4 token-layers, and 7 per layer use 28: every move pays for its raise.
    assert_eq!(
        sorted(neighbours(&[7, 7, 7, 7], 64.0 / 576.0, 64)),
        [
            vec![8, 6, 6, 6],
            vec![8, 7, 6, 6],
            vec![8, 7, 7, 6],
            vec![8, 8, 6, 6],
            vec![8, 8, 7, 5],
            vec![8, 8, 8, 4]
        ]
    );
    // Counts never rise above the layer before or n₀, nor fall to 0.
    assert_eq!(
        sorted(neighbours(&[64, 3, 1], 0.5, 64)),
        [vec![64, 3, 2], vec![64, 4, 1], vec![64, 4, 2]]
    );
    assert!(neighbours(&[1, 1], 0.01, 64).is_empty());
}

#[test]
fn a_seed_on_another_schedule_runs_as_its_plan() {
    use crate::seed::{neighbours, seeds};
    let model = tiny_model();
    let g = Geometry::of(&model.config);
    let n0 = g.n0();
    let batch = tiny_batch(&model, 6);
    for seed in seeds(0.3, g)
        .into_iter()
        .filter(|s| ["fastv", "dart-p2"].contains(&s.label().as_str()))
    {
        let own = seed.counts(g);
        assert_eq!(seed.with_schedule(&own, g).unwrap().plan, seed.plan);
        let moves = neighbours(&own, 0.3, n0);
        assert!(!moves.is_empty(), "{}", seed.label());
        // The move with the most stages: the seed's operator at every layer where the count drops.
        let counts = moves
            .iter()
            .max_by_key(|c| c.windows(2).filter(|w| w[1] < w[0]).count())
            .unwrap();
        let moved = seed.with_schedule(counts, g).unwrap();
        assert_eq!(moved.plan.planned_tokens(g.n_layers, n0, g.grid), *counts);
        assert!(moved.plan.equivalent_share(g.n_layers, n0, g.grid) <= 0.3 + 1e-12);
        assert!(moved.plan.stages.len() >= 2, "{counts:?}");
        assert!(moved.label().ends_with(&format!(
            "@{}",
            counts.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("-")
        )));
        for stage in &moved.plan.stages {
            assert_eq!(stage.operator, seed.plan.stages[0].operator);
        }
        // The search runs it as the plan.
        let diff = soft_against_plan(&model, &moved, &batch);
        assert!(diff < 1e-5, "{}: {diff}", moved.label());
    }
    // Not a schedule: rising, zero, or the wrong depth.
    let seed = &seeds(0.3, g)[0];
    assert!(seed.with_schedule(&[4, 5, 4, 4], g).is_none());
    assert!(seed.with_schedule(&[4, 4, 4, 0], g).is_none());
    assert!(seed.with_schedule(&[4, 4, 4], g).is_none());
}
