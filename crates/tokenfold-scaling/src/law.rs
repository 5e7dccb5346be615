//! The parametric loss law L(N, D) = E + A/N^α + B/D^β, fitted the Chinchilla way (Approach 3).
//!
//! The fit works in log-loss space with the log-sum-exp form
//! `min Σ_i Huber_δ(LSE(a − α·ln N_i, b − β·ln D_i, e) − ln L_i)`, then A = e^a, B = e^b, E = e^e.
//! The Huber terms are **summed**, not averaged: averaging shrinks the objective by the number of runs,
//! and with δ = 1e-3 L-BFGS then stops before it converges (the flaw Besiroglu et al. found in the
//! original fit). Every start of a grid of initialisations is run (4,500 for Chinchilla's grid) and the
//! best kept.
//!
//! D may be a weighted sum of per-modality token counts, `D_eff = Σ_j w_j·T_j` with `w_0 = 1`; the
//! weights `w_j = e^{lw_j}` are then fitted too. With raw byte counts `R_j` and measured compression
//! factors `C_j = R_j/T_j` (bytes per token) this is the compression-factor law of Sun & Guo,
//! `D_eff = Σ_j w_j·R_j/C_j`.

use std::cell::Cell;

use argmin::core::{CostFunction, Executor, Gradient, State};
use argmin::solver::linesearch::MoreThuenteLineSearch;
use argmin::solver::quasinewton::LBFGS;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ScalingError};

/// One training run as the fit sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Parameters N (active parameters for mixture-of-experts).
    pub params: f64,
    /// Training tokens, one count per modality (one entry for the plain law).
    pub tokens: Vec<f64>,
    /// Final validation loss.
    pub loss: f64,
}

impl Point {
    pub fn new(params: f64, tokens: f64, loss: f64) -> Point {
        Point {
            params,
            tokens: vec![tokens],
            loss,
        }
    }
}

/// A fitted law.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Law {
    pub e: f64,
    /// The coefficient A of the parameter term.
    pub a: f64,
    /// The coefficient B of the data term.
    pub b: f64,
    pub alpha: f64,
    pub beta: f64,
    /// Per-modality token weights `w_j` (the first is 1); a single 1 for the plain law.
    pub weights: Vec<f64>,
}

impl Law {
    /// The plain law with one kind of token.
    pub fn new(e: f64, a: f64, b: f64, alpha: f64, beta: f64) -> Law {
        Law {
            e,
            a,
            b,
            alpha,
            beta,
            weights: vec![1.0],
        }
    }

    pub fn effective_tokens(&self, tokens: &[f64]) -> f64 {
        self.weights.iter().zip(tokens).map(|(w, t)| w * t).sum()
    }

    pub fn loss(&self, params: f64, tokens: f64) -> f64 {
        self.e + self.a / params.powf(self.alpha) + self.b / tokens.powf(self.beta)
    }

    pub fn predict(&self, point: &Point) -> f64 {
        self.loss(point.params, self.effective_tokens(&point.tokens))
    }

    /// The exponents of compute-optimal allocation under C = 6ND: N* ∝ C^a, D* ∝ C^b.
    pub fn allocation_exponents(&self) -> (f64, f64) {
        let sum = self.alpha + self.beta;
        (self.beta / sum, self.alpha / sum)
    }

    /// Compute-optimal (N*, D*) for C = 6ND in closed form (Hoffmann et al., eq. 4):
    /// N* = G·(C/6)^a, D* = G⁻¹·(C/6)^b with G = (αA/(βB))^(1/(α+β)).
    pub fn optimal(&self, flops: f64) -> (f64, f64) {
        let (a, b) = self.allocation_exponents();
        let g = (self.alpha * self.a / (self.beta * self.b)).powf(1.0 / (self.alpha + self.beta));
        (g * (flops / 6.0).powf(a), (flops / 6.0).powf(b) / g)
    }
}

/// Starting values of the L-BFGS restarts; every combination is one start.
#[derive(Debug, Clone, PartialEq)]
pub struct StartGrid {
    pub alpha: Vec<f64>,
    pub beta: Vec<f64>,
    /// ln E.
    pub e: Vec<f64>,
    /// ln A.
    pub a: Vec<f64>,
    /// ln B.
    pub b: Vec<f64>,
    /// ln w_j of every modality after the first.
    pub log_weights: Vec<f64>,
}

impl StartGrid {
    /// Chinchilla's grid: 5 × 5 × 5 × 6 × 6 = 4,500 starts (times the weight values).
    pub fn chinchilla() -> StartGrid {
        StartGrid {
            alpha: vec![0.0, 0.5, 1.0, 1.5, 2.0],
            beta: vec![0.0, 0.5, 1.0, 1.5, 2.0],
            e: vec![-1.0, -0.5, 0.0, 0.5, 1.0],
            a: vec![0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
            b: vec![0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
            log_weights: vec![-2.0, 0.0, 2.0],
        }
    }

    /// A 3⁵ = 243-start grid over the same ranges, for bootstrap refits.
    pub fn coarse() -> StartGrid {
        StartGrid {
            alpha: vec![0.0, 1.0, 2.0],
            beta: vec![0.0, 1.0, 2.0],
            e: vec![-1.0, 0.0, 1.0],
            a: vec![0.0, 12.5, 25.0],
            b: vec![0.0, 12.5, 25.0],
            log_weights: vec![0.0],
        }
    }

    fn axes(&self, modalities: usize) -> Vec<(&'static str, &[f64])> {
        let mut axes = vec![
            ("a", self.a.as_slice()),
            ("b", self.b.as_slice()),
            ("e", self.e.as_slice()),
            ("alpha", self.alpha.as_slice()),
            ("beta", self.beta.as_slice()),
        ];
        for _ in 1..modalities {
            axes.push(("log_weight", self.log_weights.as_slice()));
        }
        axes
    }

    fn starts(&self, modalities: usize) -> Vec<Vec<f64>> {
        let mut starts = vec![vec![]];
        for (_, values) in self.axes(modalities) {
            starts = starts
                .into_iter()
                .flat_map(|prefix| {
                    values.iter().map(move |v| {
                        let mut start = prefix.clone();
                        start.push(*v);
                        start
                    })
                })
                .collect();
        }
        starts
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FitOptions {
    /// Huber threshold on the log-loss residual.
    pub delta: f64,
    pub grid: StartGrid,
    pub max_iters: u64,
}

impl Default for FitOptions {
    fn default() -> FitOptions {
        FitOptions {
            delta: 1e-3,
            grid: StartGrid::chinchilla(),
            max_iters: 1000,
        }
    }
}

/// The outcome of a fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fit {
    pub law: Law,
    /// The summed Huber objective at the optimum.
    pub objective: f64,
    /// Parameter names of the optimiser's vector: a, b, e, alpha, beta, then ln w_j.
    pub start: Vec<f64>,
    /// Grid axes on whose edge every start that reached the optimum began: the grid may be too small.
    pub boundary: Vec<String>,
    /// Fitted values outside their axis's grid range.
    pub outside_grid: Vec<String>,
    pub starts: usize,
    /// Starts whose optimisation failed (a line search that found no finite step).
    pub failed_starts: usize,
}

impl Fit {
    /// Whether the optimum is suspicious because of the start grid.
    pub fn on_boundary(&self) -> bool {
        !self.boundary.is_empty() || !self.outside_grid.is_empty()
    }
}

/// The summed Huber objective over runs, in the optimiser's coordinates.
pub(crate) struct Objective {
    ln_params: Vec<f64>,
    /// Per run, ln T_j of each modality.
    ln_tokens: Vec<Vec<f64>>,
    ln_loss: Vec<f64>,
    delta: f64,
}

fn log_sum_exp(values: &[f64]) -> f64 {
    let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    max + values.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

impl Objective {
    pub(crate) fn new(points: &[Point], delta: f64) -> Objective {
        Objective {
            ln_params: points.iter().map(|p| p.params.ln()).collect(),
            ln_tokens: points
                .iter()
                .map(|p| p.tokens.iter().map(|t| t.ln()).collect())
                .collect(),
            ln_loss: points.iter().map(|p| p.loss.ln()).collect(),
            delta,
        }
    }

    /// The objective and, if asked, its gradient.
    pub(crate) fn evaluate(&self, p: &[f64], mut gradient: Option<&mut [f64]>) -> f64 {
        let (a, b, e, alpha, beta) = (p[0], p[1], p[2], p[3], p[4]);
        let log_weights = &p[5..];
        if let Some(g) = gradient.as_deref_mut() {
            g.fill(0.0);
        }
        let mut total = 0.0;
        let mut shares = Vec::new();
        for i in 0..self.ln_loss.len() {
            // ln D_eff = LSE_j(lw_j + ln T_j), lw_0 = 0.
            let terms: Vec<f64> = self.ln_tokens[i]
                .iter()
                .enumerate()
                .map(|(j, lt)| lt + if j == 0 { 0.0 } else { log_weights[j - 1] })
                .collect();
            let ln_d = log_sum_exp(&terms);
            let x = [a - alpha * self.ln_params[i], b - beta * ln_d, e];
            let lse = log_sum_exp(&x);
            let r = lse - self.ln_loss[i];
            total += if r.abs() <= self.delta {
                0.5 * r * r
            } else {
                self.delta * (r.abs() - 0.5 * self.delta)
            };
            if let Some(g) = gradient.as_deref_mut() {
                let h = r.clamp(-self.delta, self.delta);
                let s: Vec<f64> = x.iter().map(|v| (v - lse).exp()).collect();
                g[0] += h * s[0];
                g[1] += h * s[1];
                g[2] += h * s[2];
                g[3] -= h * s[0] * self.ln_params[i];
                g[4] -= h * s[1] * ln_d;
                shares.clear();
                shares.extend(terms.iter().map(|t| (t - ln_d).exp()));
                for j in 1..terms.len() {
                    g[4 + j] -= h * s[1] * beta * shares[j];
                }
            }
        }
        total
    }
}

/// One start's view of the objective, with an evaluation budget: argmin's line search can iterate
/// without end once steps underflow, and a start that exhausts the budget counts as failed.
struct Budgeted<'a> {
    objective: &'a Objective,
    evaluations: Cell<u64>,
}

/// Objective evaluations (with or without gradient) one start may spend.
const EVALUATION_BUDGET: u64 = 50_000;

impl Budgeted<'_> {
    fn spend(&self) -> std::result::Result<(), argmin::core::Error> {
        let n = self.evaluations.get() + 1;
        self.evaluations.set(n);
        if n > EVALUATION_BUDGET {
            return Err(argmin::core::Error::msg("evaluation budget exhausted"));
        }
        Ok(())
    }
}

impl CostFunction for Budgeted<'_> {
    type Param = Vec<f64>;
    type Output = f64;
    fn cost(&self, p: &Vec<f64>) -> std::result::Result<f64, argmin::core::Error> {
        self.spend()?;
        Ok(self.objective.evaluate(p, None))
    }
}

impl Gradient for Budgeted<'_> {
    type Param = Vec<f64>;
    type Gradient = Vec<f64>;
    fn gradient(&self, p: &Vec<f64>) -> std::result::Result<Vec<f64>, argmin::core::Error> {
        self.spend()?;
        let mut g = vec![0.0; p.len()];
        self.objective.evaluate(p, Some(&mut g));
        Ok(g)
    }
}

/// L-BFGS (More–Thuente line search, memory 10) from one start: the optimum and its objective, or None
/// when the start fails.
fn minimise(objective: &Objective, start: &[f64], max_iters: u64) -> Option<(Vec<f64>, f64)> {
    // Tolerances: a gradient norm of 1e-10, or an objective change below 1e-15. The summed Huber
    // objective of real fits is 1e-7 or more, so this is far below any meaningful change; a zero cost
    // tolerance makes the line search spin at machine precision.
    let solver = LBFGS::new(MoreThuenteLineSearch::new(), 10)
        .with_tolerance_grad(1e-10)
        .ok()?
        .with_tolerance_cost(1e-15)
        .ok()?;
    let problem = Budgeted {
        objective,
        evaluations: Cell::new(0),
    };
    let result = Executor::new(problem, solver)
        .configure(|state| state.param(start.to_vec()).max_iters(max_iters))
        .run()
        .ok()?;
    let state = result.state();
    let cost = state.get_best_cost();
    if !cost.is_finite() {
        return None;
    }
    Some((state.get_best_param()?.clone(), cost))
}

fn check_points(points: &[Point], unknowns: usize) -> Result<usize> {
    let Some(first) = points.first() else {
        return Err(ScalingError::Fit("no runs to fit".into()));
    };
    let modalities = first.tokens.len();
    if modalities == 0 {
        return Err(ScalingError::Fit("a run has no token count".into()));
    }
    if points.len() < unknowns + modalities - 1 {
        return Err(ScalingError::Fit(format!(
            "{} runs cannot determine {} parameters; add runs",
            points.len(),
            unknowns + modalities - 1
        )));
    }
    for (i, p) in points.iter().enumerate() {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if p.tokens.len() != modalities {
            return Err(ScalingError::Fit(format!(
                "run {i} has {} token counts, the first run {modalities}",
                p.tokens.len()
            )));
        }
        if !positive(p.params) || !positive(p.loss) || !p.tokens.iter().all(|t| positive(*t)) {
            return Err(ScalingError::Fit(format!(
                "run {i}: parameters, tokens and loss must be positive and finite (got N={}, D={:?}, L={})",
                p.params, p.tokens, p.loss
            )));
        }
    }
    Ok(modalities)
}

/// Fits the law to runs from every start of the grid, keeping the best.
pub fn fit(points: &[Point], options: &FitOptions) -> Result<Fit> {
    fit_from(points, options, &[])
}

/// [`fit`] with extra starts besides the grid (a bootstrap adds the full-data optimum).
fn fit_from(points: &[Point], options: &FitOptions, extra_starts: &[Vec<f64>]) -> Result<Fit> {
    let modalities = check_points(points, 5)?;
    let objective = Objective::new(points, options.delta);
    let mut starts = options.grid.starts(modalities);
    let grid_starts = starts.len();
    starts.extend(extra_starts.iter().cloned());
    let outcomes: Vec<Option<(Vec<f64>, f64)>> = starts
        .par_iter()
        .map(|s| minimise(&objective, s, options.max_iters))
        .collect();
    let failed_starts = outcomes.iter().filter(|o| o.is_none()).count();
    let best = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.as_ref().map(|(p, c)| (i, p, *c)))
        .min_by(|x, y| x.2.total_cmp(&y.2))
        .ok_or_else(|| ScalingError::Fit(format!("all {} starts failed", starts.len())))?;
    let (best_index, best_param, best_cost) = (best.0, best.1.clone(), best.2);

    // Starts that reached the optimum (to a relative 1e-6 of the objective, or 1e-18 absolute).
    let tolerance = best_cost.abs() * 1e-6 + 1e-18;
    let reached: Vec<&Vec<f64>> = outcomes
        .iter()
        .zip(&starts)
        .take(grid_starts)
        .filter(|(o, _)| o.as_ref().is_some_and(|(_, c)| *c <= best_cost + tolerance))
        .map(|(_, s)| s)
        .collect();
    let axes = options.grid.axes(modalities);
    let mut boundary = Vec::new();
    let mut outside_grid = Vec::new();
    for (k, (name, values)) in axes.iter().enumerate() {
        let low = values.iter().cloned().fold(f64::INFINITY, f64::min);
        let high = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if values.len() > 1
            && !reached.is_empty()
            && reached.iter().all(|s| s[k] == low || s[k] == high)
        {
            boundary.push(name.to_string());
        }
        if best_param[k] < low || best_param[k] > high {
            outside_grid.push(format!(
                "{name} = {:.4} (grid {low}..{high})",
                best_param[k]
            ));
        }
    }
    let mut weights = vec![1.0];
    weights.extend(best_param[5..].iter().map(|lw| lw.exp()));
    Ok(Fit {
        law: Law {
            e: best_param[2].exp(),
            a: best_param[0].exp(),
            b: best_param[1].exp(),
            alpha: best_param[3],
            beta: best_param[4],
            weights,
        },
        objective: best_cost,
        start: starts[best_index].clone(),
        boundary,
        outside_grid,
        starts: starts.len(),
        failed_starts,
    })
}

/// How well a law predicts runs (the measures of Paper A's Table 10).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionError {
    pub runs: usize,
    /// Mean squared error of the loss.
    pub mse: f64,
    /// Coefficient of determination (undefined, so NaN, for fewer than two runs).
    pub r2: f64,
    /// Mean absolute error relative to the loss, in percent.
    pub mae_percent: f64,
}

pub fn prediction_error(law: &Law, points: &[Point]) -> PredictionError {
    let n = points.len() as f64;
    let mean = points.iter().map(|p| p.loss).sum::<f64>() / n;
    let residual: f64 = points
        .iter()
        .map(|p| (law.predict(p) - p.loss).powi(2))
        .sum();
    let total: f64 = points.iter().map(|p| (p.loss - mean).powi(2)).sum();
    PredictionError {
        runs: points.len(),
        mse: residual / n,
        r2: if points.len() > 1 {
            1.0 - residual / total
        } else {
            f64::NAN
        },
        mae_percent: 100.0
            * points
                .iter()
                .map(|p| ((law.predict(p) - p.loss) / p.loss).abs())
                .sum::<f64>()
            / n,
    }
}

/// Mean, standard deviation and a 90% percentile interval over bootstrap refits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub mean: f64,
    pub std: f64,
    pub p05: f64,
    pub p95: f64,
}

impl Interval {
    fn of(mut values: Vec<f64>) -> Interval {
        values.sort_by(f64::total_cmp);
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        let quantile = |q: f64| values[((q * (n - 1.0)).round() as usize).min(values.len() - 1)];
        Interval {
            mean,
            std: var.sqrt(),
            p05: quantile(0.05),
            p95: quantile(0.95),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bootstrap {
    pub resamples: usize,
    pub failed: usize,
    pub e: Interval,
    pub a: Interval,
    pub b: Interval,
    pub alpha: Interval,
    pub beta: Interval,
    /// N* ∝ C^a.
    pub n_exponent: Interval,
    /// D* ∝ C^b.
    pub d_exponent: Interval,
    /// Per-modality weights after the first.
    pub weights: Vec<Interval>,
}

/// Refits on `resamples` resamples of the runs (drawn with replacement), each from the coarse grid plus
/// the full-data optimum.
pub fn bootstrap(
    points: &[Point],
    full: &Fit,
    options: &FitOptions,
    resamples: usize,
    seed: u64,
) -> Result<Bootstrap> {
    if resamples < 2 {
        return Err(ScalingError::Fit(format!(
            "a bootstrap needs at least 2 resamples, got {resamples}"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let coarse = FitOptions {
        grid: StartGrid::coarse(),
        ..options.clone()
    };
    let mut fits = Vec::new();
    let mut failed = 0;
    for _ in 0..resamples {
        let sample: Vec<Point> = (0..points.len())
            .map(|_| points[rng.random_range(0..points.len())].clone())
            .collect();
        match fit_from(&sample, &coarse, std::slice::from_ref(&full_param(full))) {
            Ok(fit) => fits.push(fit.law),
            Err(_) => failed += 1,
        }
    }
    if fits.len() < 2 {
        return Err(ScalingError::Fit(format!(
            "{failed} of {resamples} bootstrap refits failed"
        )));
    }
    let of = |f: &dyn Fn(&Law) -> f64| Interval::of(fits.iter().map(f).collect());
    Ok(Bootstrap {
        resamples,
        failed,
        e: of(&|l| l.e),
        a: of(&|l| l.a),
        b: of(&|l| l.b),
        alpha: of(&|l| l.alpha),
        beta: of(&|l| l.beta),
        n_exponent: of(&|l| l.allocation_exponents().0),
        d_exponent: of(&|l| l.allocation_exponents().1),
        weights: (1..full.law.weights.len())
            .map(|j| of(&|l| l.weights[j]))
            .collect(),
    })
}

/// The optimiser's coordinates of a fitted law.
fn full_param(fit: &Fit) -> Vec<f64> {
    let law = &fit.law;
    let mut p = vec![law.a.ln(), law.b.ln(), law.e.ln(), law.alpha, law.beta];
    p.extend(law.weights[1..].iter().map(|w| w.ln()));
    p
}

/// Compute-optimal allocation found numerically, for FLOPs that are not simply 6ND.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    /// N* ∝ C^a, fitted by regression of ln N* on ln C.
    pub n_exponent: f64,
    /// D* ∝ C^b.
    pub d_exponent: f64,
    /// (C, N*, D*) at each budget.
    pub optima: Vec<(f64, f64, f64)>,
}

/// Paper A's regression (appendix C.2): at each budget C, scan D over a log grid with N = `params_for(C, D)`,
/// keep the D of lowest predicted loss, then regress ln N* and ln D* on ln C.
pub fn optimal_by_regression(
    law: &Law,
    budgets: &[f64],
    params_for: impl Fn(f64, f64) -> f64,
) -> Result<Allocation> {
    if budgets.len() < 2 {
        return Err(ScalingError::Fit(
            "the regression needs at least two FLOP budgets".into(),
        ));
    }
    let mut optima = Vec::new();
    for &c in budgets {
        // Scan D from 10 tokens to C/6 tokens per parameter … 1 parameter; 4,000 log-spaced values.
        let (ln_lo, ln_hi) = (10f64.ln(), (c / 6.0).ln());
        let steps = 4000;
        let mut best: Option<(f64, f64, f64)> = None;
        for i in 0..=steps {
            let d = (ln_lo + (ln_hi - ln_lo) * i as f64 / steps as f64).exp();
            let n = params_for(c, d);
            if !(n.is_finite() && n >= 1.0) {
                continue;
            }
            let loss = law.loss(n, d);
            if best.is_none_or(|b| loss < b.0) {
                best = Some((loss, n, d));
            }
        }
        let (_, n, d) = best
            .ok_or_else(|| ScalingError::Fit(format!("no feasible allocation at C = {c:.3e}")))?;
        optima.push((c, n, d));
    }
    let ln_c: Vec<f64> = optima.iter().map(|o| o.0.ln()).collect();
    let slope = |ys: Vec<f64>| least_squares(&ln_c, &ys).1;
    Ok(Allocation {
        n_exponent: slope(optima.iter().map(|o| o.1.ln()).collect()),
        d_exponent: slope(optima.iter().map(|o| o.2.ln()).collect()),
        optima,
    })
}

/// Ordinary least squares y = intercept + slope·x.
pub fn least_squares(x: &[f64], y: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let sxx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let slope = sxy / sxx;
    (my - slope * mx, slope)
}

/// The loss–compute frontier L = K·C^c.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeFrontier {
    pub k: f64,
    pub c: f64,
    /// The vertices (FLOPs, loss) of the lower convex hull the line was fitted to.
    pub hull: Vec<(f64, f64)>,
}

/// Paper A's appendix C.3: the lower convex hull of (ln C, ln L) over the runs above `min_flops`, up to
/// the lowest loss, sampled at 200 log-spaced budgets and fitted with a straight line in log–log space.
pub fn compute_frontier(runs: &[(f64, f64)], min_flops: f64) -> Result<ComputeFrontier> {
    let mut pts: Vec<(f64, f64)> = runs
        .iter()
        .filter(|(c, l)| *c > min_flops && c.is_finite() && l.is_finite() && *l > 0.0)
        .map(|(c, l)| (c.ln(), l.ln()))
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    // Andrew's monotone chain, lower half.
    let mut hull: Vec<(f64, f64)> = Vec::new();
    for p in pts {
        while hull.len() >= 2 {
            let (o, a) = (hull[hull.len() - 2], hull[hull.len() - 1]);
            if (a.0 - o.0) * (p.1 - o.1) - (a.1 - o.1) * (p.0 - o.0) <= 0.0 {
                hull.pop();
            } else {
                break;
            }
        }
        if hull.last().is_none_or(|last| last.0 < p.0) {
            hull.push(p);
        }
    }
    // Only the falling part is a frontier: more compute at higher loss is never optimal.
    if let Some(lowest) = hull
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.1.total_cmp(&b.1.1))
        .map(|(i, _)| i)
    {
        hull.truncate(lowest + 1);
    }
    if hull.len() < 2 {
        return Err(ScalingError::Fit(format!(
            "the loss–compute hull has {} vertex above {min_flops:.3e} FLOPs; need runs at two or more budgets",
            hull.len()
        )));
    }
    let (x0, x1) = (hull[0].0, hull[hull.len() - 1].0);
    let samples = 200;
    let xs: Vec<f64> = (0..samples)
        .map(|i| x0 + (x1 - x0) * i as f64 / (samples - 1) as f64)
        .collect();
    let ys: Vec<f64> = xs
        .iter()
        .map(|&x| {
            let j = hull
                .windows(2)
                .position(|w| x <= w[1].0)
                .unwrap_or(hull.len() - 2);
            let (p, q) = (hull[j], hull[j + 1]);
            p.1 + (q.1 - p.1) * (x - p.0) / (q.0 - p.0)
        })
        .collect();
    let (intercept, slope) = least_squares(&xs, &ys);
    Ok(ComputeFrontier {
        k: intercept.exp(),
        c: slope,
        hull: hull.iter().map(|(x, y)| (x.exp(), y.exp())).collect(),
    })
}
