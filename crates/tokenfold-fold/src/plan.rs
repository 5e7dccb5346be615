//! Reduction plans: the JSON artefact that says where, how much and how visual tokens are reduced.
//!
//! ```json
//! {"name": "fastv", "stages": [{"layer": 1, "method": "fastv", "keep": 0.25}]}
//! ```
//!
//! A stage runs at the input of `layer` (0 = before the first layer). `keep` is the share of the image's
//! original visual tokens left after the stage (kept count = max(1, round(keep · n₀))), so a staged plan
//! reads the same whatever the image size. Methods and their parameters are listed in [`Method`]; a
//! searched plan uses the same format.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{FoldError, Result};
use crate::unified::{Operator, Source};

/// What a stage does; see `docs/token-reduction.md` for each method's algorithm and early-fusion
/// adaptation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Prune by the last prompt token's attention at the previous layer (head mean).
    Fastv,
    /// Prune by the last prompt token's attention recomputed with this layer's own projections.
    Pdrop,
    /// Prune by the attention of text raters; optionally recycle pruned tokens into cluster tokens.
    Sparsevlm,
    /// Keep the tokens least duplicated with pivot tokens (cosine of final-normed hidden states).
    Dart,
    /// Bipartite soft matching on keys, size-weighted merge, proportional attention.
    Tome,
    /// Dominant tokens by summary-token attention, the rest merged into contextual anchors.
    Visionzip,
    /// PruMerge+: outliers of summary-token attention plus spatially uniform anchors; the rest merged into
    /// their key-nearest kept token.
    Prumerge,
    /// Size-weighted average over `window × window` blocks of the image grid.
    Pool,
    /// Uniformly random tokens (the sanity baseline).
    Random,
    /// The unified operator with the parameters in `operator` (see [`crate::unified`]); searched plans
    /// use it.
    Unified,
}

impl Method {
    /// The hand-designed methods (what `--methods all` compares).
    pub const ALL: [Method; 9] = [
        Method::Fastv,
        Method::Pdrop,
        Method::Sparsevlm,
        Method::Dart,
        Method::Tome,
        Method::Visionzip,
        Method::Prumerge,
        Method::Pool,
        Method::Random,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Fastv => "fastv",
            Method::Pdrop => "pdrop",
            Method::Sparsevlm => "sparsevlm",
            Method::Dart => "dart",
            Method::Tome => "tome",
            Method::Visionzip => "visionzip",
            Method::Prumerge => "prumerge",
            Method::Pool => "pool",
            Method::Random => "random",
            Method::Unified => "unified",
        }
    }

    /// A hand-designed method by name.
    pub fn parse(name: &str) -> Result<Method> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                FoldError::Plan(format!(
                    "unknown method '{name}' (expected one of {})",
                    Method::ALL.map(|m| m.name()).join(", ")
                ))
            })
    }

    /// Whether the method's signal comes from the queries and keys of the layer before its stage.
    pub fn uses_previous_layer(self) -> bool {
        matches!(
            self,
            Method::Fastv | Method::Sparsevlm | Method::Dart | Method::Tome
        )
    }
}

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// Runs at the input of this layer (0-based).
    pub layer: usize,
    pub method: Method,
    /// Share of the original visual tokens left after the stage, in (0, 1]. Not for `pool`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<f64>,
    /// `pool`: block side on the image grid (2 → 2×2 blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u32>,
    /// `visionzip`: share of the kept tokens that are contextual (merged) tokens; default 10/64 as the
    /// VisionZip paper's 54 + 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contextual: Option<f64>,
    /// `sparsevlm`: recycle pruned tokens into cluster tokens (counted in `keep`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recycle: Option<bool>,
    /// `dart`: pivot tokens per side (image and text); default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pivots: Option<usize>,
    /// `random`: seed of the draw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `unified`: the operator's parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<Operator>,
}

impl Stage {
    pub fn new(layer: usize, method: Method, keep: f64) -> Stage {
        Stage {
            layer,
            method,
            keep: Some(keep),
            window: None,
            contextual: None,
            recycle: None,
            pivots: None,
            seed: None,
            operator: None,
        }
    }

    pub fn unified(layer: usize, keep: f64, operator: Operator) -> Stage {
        Stage {
            operator: Some(operator),
            ..Stage::new(layer, Method::Unified, keep)
        }
    }

    /// Whether the stage's signals come from the queries and keys of the layer before it.
    pub fn uses_previous_layer(&self) -> bool {
        match (&self.operator, self.method) {
            (Some(op), Method::Unified) => op.source == Source::Previous,
            _ => self.method.uses_previous_layer(),
        }
    }

    pub fn pool(layer: usize, window: u32) -> Stage {
        Stage {
            window: Some(window),
            keep: None,
            ..Stage::new(layer, Method::Pool, 1.0)
        }
    }

    /// Visual tokens left after this stage, for `entering` tokens of an image of `n0` tokens on a
    /// `grid × grid` layout. Pooling a full grid gives ⌈grid/window⌉²; after another reduction it gives at
    /// most that many.
    pub fn kept_count(&self, entering: usize, n0: usize, grid: usize) -> usize {
        match self.method {
            Method::Pool => {
                let w = self.window.unwrap_or(1).max(1) as usize;
                grid.div_ceil(w).pow(2).min(entering)
            }
            // ToMe repeats bipartite rounds within the stage until it reaches its count.
            _ => keep_count(self.keep.unwrap_or(1.0), n0).min(entering),
        }
    }

    pub fn contextual_share(&self) -> f64 {
        self.contextual.unwrap_or(10.0 / 64.0)
    }
}

/// Tokens left by a keep share: max(1, round(keep · n0)).
pub fn keep_count(keep: f64, n0: usize) -> usize {
    ((keep * n0 as f64).round() as usize).clamp(1, n0.max(1))
}

/// A reduction plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    #[serde(default)]
    pub name: String,
    /// Add log(token size) to the attention logits of merged tokens (ToMe's proportional attention).
    #[serde(default)]
    pub proportional_attention: bool,
    pub stages: Vec<Stage>,
}

impl Plan {
    /// The plan that reduces nothing.
    pub fn full() -> Plan {
        Plan {
            name: "full".into(),
            proportional_attention: false,
            stages: Vec::new(),
        }
    }

    pub fn load(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| FoldError::Plan(format!("{}: {e}", path.display())))?;
        let plan: Plan = serde_json::from_str(&text)
            .map_err(|e| FoldError::Plan(format!("{}: {e}", path.display())))?;
        if plan.name.is_empty() {
            return Ok(Plan {
                name: path
                    .file_stem()
                    .map_or("plan".into(), |s| s.to_string_lossy().into_owned()),
                ..plan
            });
        }
        Ok(plan)
    }

    /// Writes the plan as JSON (write, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| FoldError::Plan(e.to_string()))?;
        crate::write_atomic(path, text.as_bytes())
    }

    /// Checks the plan against a model of `n_layers` layers: layers in range and increasing, one stage per
    /// layer, keep shares in (0, 1] and non-increasing, parameters that belong to the method.
    pub fn validate(&self, n_layers: usize) -> Result<()> {
        let mut previous_layer: Option<usize> = None;
        let mut previous_keep = 1.0f64;
        for (i, stage) in self.stages.iter().enumerate() {
            let at = format!("stage {i} ({})", stage.method.name());
            let fail = |m: String| Err(FoldError::Plan(format!("{at}: {m}")));
            if stage.layer >= n_layers {
                return fail(format!(
                    "layer {} is out of range (the model has {n_layers} layers, 0..={})",
                    stage.layer,
                    n_layers.saturating_sub(1)
                ));
            }
            if previous_layer.is_some_and(|p| stage.layer <= p) {
                return fail(format!(
                    "layer {} must come after the previous stage's layer {}",
                    stage.layer,
                    previous_layer.unwrap_or(0)
                ));
            }
            previous_layer = Some(stage.layer);
            let is_pool = stage.method == Method::Pool;
            if is_pool && i > 0 {
                // On a grid already thinned, pooling yields one token per non-empty block, a count the
                // plan cannot state in advance; the budget would be an upper bound, not the count.
                return fail("pool must be the first stage".into());
            }
            match (is_pool, stage.keep, stage.window) {
                (true, _, None) => return fail("pool needs \"window\"".into()),
                (true, Some(_), _) => {
                    return fail("pool takes \"window\", not \"keep\"".into());
                }
                (true, None, Some(w)) if !(1..=64).contains(&w) => {
                    return fail(format!("window {w} is outside 1..=64"));
                }
                (false, None, _) => return fail("needs \"keep\"".into()),
                (false, Some(keep), _) if !(keep > 0.0 && keep <= 1.0) => {
                    return fail(format!("keep {keep} is outside (0, 1]"));
                }
                (false, Some(keep), _) if keep > previous_keep => {
                    return fail(format!(
                        "keep {keep} exceeds the previous stage's {previous_keep}: a stage cannot add tokens"
                    ));
                }
                (false, Some(keep), _) => previous_keep = keep,
                _ => {}
            }
            let extra = |name: &str, present: bool, allowed: bool| {
                if present && !allowed {
                    Err(FoldError::Plan(format!(
                        "{at}: \"{name}\" does not apply to {}",
                        stage.method.name()
                    )))
                } else {
                    Ok(())
                }
            };
            extra("window", stage.window.is_some(), is_pool)?;
            extra(
                "contextual",
                stage.contextual.is_some(),
                stage.method == Method::Visionzip,
            )?;
            extra(
                "recycle",
                stage.recycle.is_some(),
                stage.method == Method::Sparsevlm,
            )?;
            extra(
                "pivots",
                stage.pivots.is_some(),
                stage.method == Method::Dart,
            )?;
            extra("seed", stage.seed.is_some(), stage.method == Method::Random)?;
            extra(
                "operator",
                stage.operator.is_some(),
                stage.method == Method::Unified,
            )?;
            if stage.method == Method::Unified {
                match &stage.operator {
                    None => return fail("needs \"operator\"".into()),
                    Some(op) => op.validate().or_else(&fail)?,
                }
            }
            if let Some(c) = stage.contextual
                && !(0.0..1.0).contains(&c)
            {
                return fail(format!("contextual {c} is outside [0, 1)"));
            }
            if stage.pivots == Some(0) {
                return fail("pivots must be at least 1".into());
            }
        }
        Ok(())
    }

    /// Visual tokens entering each layer for an image of `n0` tokens on a `grid × grid` layout, as the plan
    /// prescribes (the budget accounting checks it against what really passes).
    pub fn planned_tokens(&self, n_layers: usize, n0: usize, grid: usize) -> Vec<usize> {
        let mut current = n0;
        (0..n_layers)
            .map(|layer| {
                for stage in self.stages.iter().filter(|s| s.layer == layer) {
                    current = stage.kept_count(current, n0, grid);
                }
                current
            })
            .collect()
    }

    /// The FLOPs-equivalent visual-token average Σ_ℓ n_ℓ / L as a share of n0.
    pub fn equivalent_share(&self, n_layers: usize, n0: usize, grid: usize) -> f64 {
        let tokens = self.planned_tokens(n_layers, n0, grid);
        tokens.iter().sum::<usize>() as f64 / (n_layers * n0) as f64
    }
}
