use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokenfold_model::model::standard_normal as normal;

use crate::flops::{self, AttentionWindow, SequenceShape, Workload};
use crate::law::{self, FitOptions, Law, Point, StartGrid};
use crate::runs::{self, Holdout};

/// Runs on a 6 × 6 grid of sizes and token counts, their loss drawn from `law` with multiplicative
/// noise of standard deviation `noise`.
fn synthetic(law: &Law, noise: f64, seed: u64) -> Vec<Point> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut points = Vec::new();
    for i in 0..6 {
        for j in 0..6 {
            let n = 1e6 * 10f64.powf(i as f64 * 0.6);
            let d = 1e8 * 10f64.powf(j as f64 * 0.6);
            let loss = law.loss(n, d) * (noise * normal(&mut rng)).exp();
            points.push(Point::new(n, d, loss));
        }
    }
    points
}

fn relative(fitted: f64, truth: f64) -> f64 {
    ((fitted - truth) / truth).abs()
}

#[test]
fn fit_recovers_a_known_law_within_two_percent() {
    let truth = Law::new(1.9, 420.0, 1500.0, 0.33, 0.31);
    let points = synthetic(&truth, 2e-4, 1);
    let fit = law::fit(&points, &FitOptions::default()).unwrap();
    assert_eq!(fit.starts, 4500);
    let l = &fit.law;
    for (name, f, t) in [
        ("E", l.e, truth.e),
        ("A", l.a, truth.a),
        ("B", l.b, truth.b),
        ("alpha", l.alpha, truth.alpha),
        ("beta", l.beta, truth.beta),
    ] {
        assert!(relative(f, t) < 0.02, "{name}: fitted {f}, true {t}");
    }
    assert!(
        !fit.on_boundary(),
        "{:?} {:?}",
        fit.boundary,
        fit.outside_grid
    );
    let error = law::prediction_error(l, &points);
    assert!(error.r2 > 0.999 && error.mae_percent < 0.05, "{error:?}");
}

#[test]
fn objective_gradient_matches_finite_differences() {
    // Two modalities, so the weight gradient is checked too; residuals both inside and outside δ.
    let truth = Law {
        weights: vec![1.0, 0.4],
        ..Law::new(1.5, 300.0, 800.0, 0.3, 0.35)
    };
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let points: Vec<Point> = (0..12)
        .map(|i| {
            let tokens = vec![1e8 * (1.0 + i as f64), 3e8 / (1.0 + i as f64)];
            let mut p = Point {
                params: 1e6 * (1.0 + 3.0 * i as f64),
                tokens,
                loss: 0.0,
            };
            p.loss = truth.predict(&p) * (0.01 * normal(&mut rng)).exp();
            p
        })
        .collect();
    let objective = law::Objective::new(&points, 1e-3);
    let at = [5.5, 7.0, 0.3, 0.31, 0.33, -0.8];
    let mut grad = vec![0.0; at.len()];
    objective.evaluate(&at, Some(&mut grad));
    for k in 0..at.len() {
        let h = 1e-6;
        let (mut up, mut down) = (at.to_vec(), at.to_vec());
        up[k] += h;
        down[k] -= h;
        let numeric = (objective.evaluate(&up, None) - objective.evaluate(&down, None)) / (2.0 * h);
        assert!(
            (numeric - grad[k]).abs() < 1e-7 + 1e-5 * numeric.abs(),
            "param {k}: {numeric} vs {}",
            grad[k]
        );
    }
}

#[test]
fn closed_form_matches_published_test_values() {
    // Hoffmann et al.'s rounded coefficients at C = 1e21 and Gopher's budget (reference §4.2).
    let hoffmann = Law::new(1.69, 406.4, 410.7, 0.34, 0.28);
    for (c, n, d) in [(1e21, 1.82e9, 9.14e10), (5.76e23, 3.22e10, 2.98e12)] {
        let (fn_, fd) = hoffmann.optimal(c);
        assert!(
            relative(fn_, n) < 0.01 && relative(fd, d) < 0.01,
            "C={c:e}: N*={fn_:e} D*={fd:e}"
        );
        assert!(relative(6.0 * fn_ * fd, c) < 1e-12);
    }
    let (a, b) = Law::new(1.904, 1.0, 1.0, 0.301, 0.335).allocation_exponents();
    assert!(
        (a - 0.527).abs() < 5e-4 && (b - 0.473).abs() < 5e-4,
        "Paper A early fusion: a={a}, b={b}"
    );
}

#[test]
fn regression_agrees_with_the_closed_form() {
    let law = Law::new(1.9, 420.0, 1500.0, 0.33, 0.31);
    let budgets: Vec<f64> = (0..8).map(|i| 1e15 * 10f64.powi(i)).collect();
    let allocation = law::optimal_by_regression(&law, &budgets, |c, d| c / (6.0 * d)).unwrap();
    let (a, b) = law.allocation_exponents();
    assert!(
        (allocation.n_exponent - a).abs() < 2e-3,
        "{} vs {a}",
        allocation.n_exponent
    );
    assert!(
        (allocation.d_exponent - b).abs() < 2e-3,
        "{} vs {b}",
        allocation.d_exponent
    );
    for &(c, n, _) in &allocation.optima {
        assert!(relative(n, law.optimal(c).0) < 0.01);
    }
}

#[test]
fn an_optimum_beyond_the_grid_is_flagged() {
    // α = 3 lies beyond the grid's 0…2: the best start sits on the α edge and the fit outside the grid.
    let truth = Law::new(1.9, 2e7, 1500.0, 3.0, 0.31);
    let points = synthetic(&truth, 2e-4, 3);
    let fit = law::fit(
        &points,
        &FitOptions {
            grid: StartGrid::coarse(),
            ..FitOptions::default()
        },
    )
    .unwrap();
    assert!(fit.on_boundary());
    assert!(
        fit.outside_grid.iter().any(|s| s.starts_with("alpha")),
        "{:?}",
        fit.outside_grid
    );
    // A law inside the grid is not flagged from the same coarse grid.
    let inside = law::fit(
        &synthetic(&Law::new(1.9, 420.0, 1500.0, 0.33, 0.31), 2e-4, 3),
        &FitOptions {
            grid: StartGrid::coarse(),
            ..FitOptions::default()
        },
    )
    .unwrap();
    assert!(
        !inside.on_boundary(),
        "{:?} {:?}",
        inside.boundary,
        inside.outside_grid
    );
}

#[test]
fn compression_law_recovers_modality_weights() {
    // D_eff = T_text + 0.25·T_image: an image token is worth a quarter of a text token.
    let truth = Law {
        weights: vec![1.0, 0.25],
        ..Law::new(1.9, 420.0, 1500.0, 0.33, 0.31)
    };
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut points = Vec::new();
    for i in 0..5 {
        for j in 0..5 {
            for share in [0.2, 0.5, 0.8] {
                let n = 1e6 * 10f64.powf(i as f64 * 0.7);
                let d = 1e8 * 10f64.powf(j as f64 * 0.7);
                let mut p = Point {
                    params: n,
                    tokens: vec![d * (1.0 - share), d * share],
                    loss: 0.0,
                };
                p.loss = truth.predict(&p) * (2e-4 * normal(&mut rng)).exp();
                points.push(p);
            }
        }
    }
    let fit = law::fit(
        &points,
        &FitOptions {
            grid: StartGrid::coarse(),
            ..FitOptions::default()
        },
    )
    .unwrap();
    assert!(relative(fit.law.weights[1], 0.25) < 0.02, "{:?}", fit.law);
    assert!(relative(fit.law.beta, 0.31) < 0.02, "{:?}", fit.law);
}

#[test]
fn frontier_recovers_the_loss_compute_power_law() {
    // Optimal runs on L = 30·C^-0.05; others sit above the frontier at the same budgets.
    let mut runs = Vec::new();
    for i in 0..10 {
        let c = 1e15 * 10f64.powf(i as f64 * 0.5);
        let best = 30.0 * c.powf(-0.05);
        runs.extend([(c, best), (c, best * 1.05), (c * 1.3, best * 1.02)]);
    }
    let frontier = law::compute_frontier(&runs, 0.0).unwrap();
    assert!(
        (frontier.c + 0.05).abs() < 1e-3 && relative(frontier.k, 30.0) < 0.02,
        "{frontier:?}"
    );
    // Only optimal runs are hull vertices (collinear ones may be dropped).
    assert!(frontier.hull.len() >= 2);
    for &(c, l) in &frontier.hull {
        assert!(
            relative(l, 30.0 * c.powf(-0.05)) < 1e-9,
            "({c:e}, {l}) is not on the frontier"
        );
    }
    assert!(law::compute_frontier(&runs[..1], 0.0).is_err());
}

#[test]
fn bootstrap_intervals_cover_the_truth() {
    let truth = Law::new(1.9, 420.0, 1500.0, 0.33, 0.31);
    let points = synthetic(&truth, 5e-3, 5);
    let options = FitOptions {
        grid: StartGrid::coarse(),
        ..FitOptions::default()
    };
    let full = law::fit(&points, &options).unwrap();
    let boot = law::bootstrap(&points, &full, &options, 20, 7).unwrap();
    assert_eq!(boot.failed, 0);
    for (name, interval, t) in [
        ("alpha", &boot.alpha, 0.33),
        ("beta", &boot.beta, 0.31),
        ("E", &boot.e, 1.9),
    ] {
        assert!(interval.std > 0.0, "{name} has no spread");
        assert!(
            interval.mean - 4.0 * interval.std <= t && t <= interval.mean + 4.0 * interval.std,
            "{name}: {interval:?} vs {t}"
        );
    }
}

#[test]
fn fit_refuses_too_few_or_invalid_runs() {
    let few = vec![Point::new(1e6, 1e8, 3.0); 4];
    assert!(
        law::fit(&few, &FitOptions::default())
            .unwrap_err()
            .to_string()
            .contains("4 runs")
    );
    let mut bad = vec![Point::new(1e6, 1e8, 3.0); 6];
    bad[3].loss = -1.0;
    assert!(
        law::fit(&bad, &FitOptions::default())
            .unwrap_err()
            .to_string()
            .contains("run 3")
    );
}

#[test]
fn runs_round_trip_and_bad_input_names_the_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("runs.jsonl");
    let csv = dir.path().join("runs.csv");
    std::fs::write(&csv, "N,D,Loss,note\n1e6,2e8,3.5,a\n2e6,4e8,3.1,b\n").unwrap();
    let from_csv = runs::read_any(&csv).unwrap();
    assert_eq!(from_csv.len(), 2);
    assert_eq!(from_csv[1].flops, 6.0 * 2e6 * 4e8);
    for run in &from_csv {
        runs::append_run(&path, run).unwrap();
    }
    assert_eq!(runs::read_runs(&path).unwrap(), from_csv);
    assert_eq!(
        runs::points(&from_csv, "loss").unwrap()[0],
        Point::new(1e6, 2e8, 3.5)
    );
    assert!(
        runs::points(&from_csv, "caption")
            .unwrap_err()
            .to_string()
            .contains("has no validation loss `caption`")
    );

    std::fs::write(&csv, "n,d,loss\n1e6,2e8,3.5\n1e6,x,3.0\n").unwrap();
    let err = runs::read_any(&csv).unwrap_err().to_string();
    assert!(err.contains("line 3") && err.contains("`x`"), "{err}");
    std::fs::write(&csv, "n,tokens_seen,loss\n1,2,3\n").unwrap();
    assert!(
        runs::read_any(&csv)
            .unwrap_err()
            .to_string()
            .contains("no `d` column")
    );
    std::fs::write(&path, "{\"name\": 1}\n").unwrap();
    assert!(
        runs::read_runs(&path)
            .unwrap_err()
            .to_string()
            .contains("line 1")
    );

    let holdout = Holdout::parse("params>=1.5e6").unwrap();
    assert!(!holdout.holds_out(&from_csv[0]) && holdout.holds_out(&from_csv[1]));
    assert!(
        Holdout::parse("layers>3")
            .unwrap_err()
            .to_string()
            .contains("params, tokens or flops")
    );
}

#[test]
fn masked_attention_counts_image_pairs_bidirectionally() {
    // 4 image tokens first, then 3 text tokens: image rows see the 4 image keys; text rows 5, 6, 7.
    let shape = SequenceShape {
        length: 7,
        image_start: 0,
        image_tokens: 4,
        logit_positions: 3,
    };
    assert_eq!(flops::masked_pairs(&shape), 16.0 + 18.0);
    // Text only: the causal triangle.
    let text = SequenceShape {
        length: 10,
        image_start: 0,
        image_tokens: 0,
        logit_positions: 10,
    };
    assert_eq!(flops::masked_pairs(&text), 55.0);
}

#[test]
fn detailed_matmul_flops_equal_six_n_per_token() {
    let shape = tokenfold_model::config::preset("nmm-s").unwrap();
    let config = tokenfold_model::ModelConfig::from_shape(shape, 2048, 48, 16, 512);
    let shape = SequenceShape {
        length: 300,
        image_start: 0,
        image_tokens: 256,
        logit_positions: 300,
    };
    let f = flops::forward(&config, &Workload::sequence(&shape, AttentionWindow::Full));
    let (d, ff, layers) = (
        config.d_model as f64,
        config.d_ff as f64,
        config.n_layers as f64,
    );
    let matmul_params = layers * (4.0 * d * d + 3.0 * d * ff);
    assert!(relative(3.0 * (f.projections + f.mlp), 6.0 * matmul_params * 300.0) < 1e-12);
    let masked = flops::forward(
        &config,
        &Workload::sequence(&shape, AttentionWindow::Masked),
    );
    assert!(masked.attention < f.attention && masked.training() < f.training());
    assert_eq!(flops::early_fusion(1e6, 1e9), 6e15);
    assert_eq!(flops::late_fusion(1e5, 1e8, 1e6, 1e9), 6.0 * (1e13 + 1e15));
}

#[test]
fn late_fusion_flops_count_the_encoder_on_image_tokens_only() {
    let shape = tokenfold_model::config::preset("nmm-xs").unwrap();
    let early = tokenfold_model::ModelConfig::from_shape(shape, 2048, 192, 8, 256);
    let width = crate::sweep::Width {
        name: "w".into(),
        d_model: 128,
        n_layers: 4,
        n_heads: 4,
        d_ff: 352,
        lr: None,
    };
    let vision = crate::sweep::encoder_for(&width, 0.1, 1);
    assert_eq!(
        (vision.d_model, vision.n_layers, vision.n_heads, vision.d_ff),
        (64, 4, 2, 176)
    );
    let late = tokenfold_model::ModelConfig {
        vision: Some(vision),
        ..early.clone()
    };
    late.validate().unwrap();
    let image = SequenceShape {
        length: 90,
        image_start: 1,
        image_tokens: 64,
        logit_positions: 4,
    };
    let text = SequenceShape {
        length: 90,
        image_start: 0,
        image_tokens: 0,
        logit_positions: 89,
    };
    let flops =
        |config, shape| flops::forward(config, &Workload::sequence(shape, AttentionWindow::Masked));
    assert_eq!(flops(&early, &image).encoder, 0.0);
    assert!(flops(&late, &image).encoder > 0.0);
    // Text-only sequences cost the same in both: the encoder never runs.
    assert_eq!(flops(&late, &text).total(), flops(&early, &text).total());

    // Pixel-unshuffle by 2: the encoder runs over 4 × 64 patches of a quarter of the values, plus
    // [CLS], and the connector reads 4·d_v values per decoder image token; the decoder is unchanged.
    let unshuffled = tokenfold_model::ModelConfig {
        vision: Some(crate::sweep::encoder_for(&width, 0.1, 2)),
        ..early.clone()
    };
    unshuffled.validate().unwrap();
    let (dv, ff, d) = (64.0, 176.0, 128.0);
    let tokens = 4.0 * 64.0 + 1.0;
    let blocks = 4.0
        * (2.0 * (4.0 * dv * dv + 3.0 * dv * ff) * tokens
            + 2.0 * 2.0 * tokens * tokens * dv
            + 3.0 * 2.0 * tokens * tokens);
    let patches = 2.0 * (4.0 * 64.0) * (192.0 / 4.0) * dv;
    let connector = 2.0 * 64.0 * (4.0 * dv * d + d * d);
    let counted = flops(&unshuffled, &image);
    assert!(relative(counted.encoder, blocks + patches + connector) < 1e-12);
    assert_eq!(
        counted.total() - counted.encoder,
        flops(&late, &image).total() - flops(&late, &image).encoder
    );
}

#[test]
fn grid_widths_set_their_learning_rate_and_the_encoder_its_unshuffle() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/nmm-xs.toml");
    let grid_text = |lr: &str| {
        format!(
            "name = \"g\"\nbase = {base:?}\narchitectures = [\"early\", \"late\"]\nsteps = [10]\n\
             encoder_unshuffle = 2\n\
             [[width]]\nname = \"a\"\nd_model = 32\nn_layers = 2\nn_heads = 2\nd_ff = 64\n{lr}\n\
             [[width]]\nname = \"b\"\nd_model = 32\nn_layers = 2\nn_heads = 2\nd_ff = 64\n"
        )
    };
    let path = dir.path().join("grid.toml");
    std::fs::write(&path, grid_text("lr = 5e-3")).unwrap();
    let grid = crate::sweep::Grid::load(&path).unwrap();
    let base_lr = tokenfold_model::train::RunConfig::load(&base)
        .unwrap()
        .train
        .lr;
    let runs = grid.expand().unwrap();
    let lrs: Vec<(String, f64)> = runs
        .iter()
        .map(|r| (r.name.clone(), r.config.train.lr))
        .collect();
    assert_eq!(lrs.len(), 4);
    assert!(lrs[..2].iter().all(|(_, lr)| *lr == 5e-3), "{lrs:?}");
    assert!(lrs[2..].iter().all(|(_, lr)| *lr == base_lr), "{lrs:?}");
    let unshuffles: Vec<Option<usize>> = runs
        .iter()
        .map(|r| r.config.model.vision.as_ref().map(|v| v.unshuffle))
        .collect();
    assert_eq!(unshuffles, [None, Some(2), None, Some(2)]);

    std::fs::write(&path, grid_text("lr = -1.0")).unwrap();
    let error = crate::sweep::Grid::load(&path).unwrap_err().to_string();
    assert!(
        error.contains("width `a`: lr -1 must be positive"),
        "{error}"
    );
}
