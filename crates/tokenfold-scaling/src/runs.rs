//! Run records: `runs.jsonl` (one JSON object per finished run, as `tokenfold sweep` writes them) and
//! plain CSV files of (N, D, loss) from elsewhere.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, ScalingError};
use crate::law::Point;

/// One finished training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRecord {
    pub name: String,
    /// `early`, `late` or `moe`.
    pub architecture: String,
    /// Decoder parameters without the token embedding and head (N); all experts for MoE.
    pub params: f64,
    /// Parameters a token passes through (N_active); equal to `params` for dense models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_params: Option<f64>,
    /// Vision-encoder parameters (N_v, late fusion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_params: Option<f64>,
    /// Training tokens of every modality (D).
    pub tokens: f64,
    /// Training tokens per modality (`image`, `text`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tokens_by_modality: BTreeMap<String, f64>,
    /// Raw bytes behind those tokens, per modality (RGB bytes for images, UTF-8 bytes for text).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bytes_by_modality: BTreeMap<String, f64>,
    /// Training FLOPs under the 6ND convention of the run's architecture.
    pub flops: f64,
    /// Training FLOPs counted per operation (masked attention window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flops_detailed: Option<f64>,
    /// Validation loss per task type, nats per target token.
    pub val_loss: BTreeMap<String, f64>,
    /// Validation loss per task type in bits per raw byte of the target text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub val_bits_per_byte: BTreeMap<String, f64>,
    /// Mixture-of-experts runs: the specialisation score of each layer on the validation sets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub specialisation: Vec<f64>,
    #[serde(default)]
    pub wall_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_revision: Option<String>,
    /// Anything else the sweep wants to keep (grid coordinates, mixture).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl RunRecord {
    pub fn active(&self) -> f64 {
        self.active_params.unwrap_or(self.params)
    }

    /// The loss a fit targets: one task type, or `avg`, the mean over the run's task types.
    pub fn target_loss(&self, target: &str) -> Option<f64> {
        if target == "avg" {
            let n = self.val_loss.len();
            (n > 0).then(|| self.val_loss.values().sum::<f64>() / n as f64)
        } else {
            self.val_loss.get(target).copied()
        }
    }

    /// Measured compression factor of a modality: raw bytes per token.
    pub fn compression(&self, modality: &str) -> Option<f64> {
        Some(self.bytes_by_modality.get(modality)? / self.tokens_by_modality.get(modality)?)
    }
}

fn input_error(path: &Path, message: String) -> ScalingError {
    ScalingError::Input {
        path: path.display().to_string(),
        message,
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| ScalingError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Reads `runs.jsonl`; a malformed line is an error naming its line number.
pub fn read_runs(path: &Path) -> Result<Vec<RunRecord>> {
    let text = read(path)?;
    let mut runs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let run: RunRecord = serde_json::from_str(line)
            .map_err(|e| input_error(path, format!("line {}: {e}", i + 1)))?;
        runs.push(run);
    }
    if runs.is_empty() {
        return Err(input_error(path, "no runs".into()));
    }
    Ok(runs)
}

/// Appends one record to `runs.jsonl` atomically: the whole file is rewritten to a temporary file
/// beside it, then renamed over it, so a reader never sees half a line and an interrupted sweep loses
/// no finished run.
pub fn append_run(path: &Path, run: &RunRecord) -> Result<()> {
    let io = |source| ScalingError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(e)),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&serde_json::to_string(run).expect("run records serialise"));
    text.push('\n');
    Ok(tokenfold_data::write_atomic(path, text.as_bytes())?)
}

/// A plain table of runs from elsewhere: columns `n` (or `params`), `d` (or `tokens`), `loss`, and
/// optionally `flops`; header names are case-insensitive, other columns are ignored.
pub fn read_csv(path: &Path) -> Result<Vec<RunRecord>> {
    let text = read(path)?;
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| input_error(path, format!("header: {e}")))?
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    let column = |names: &[&str]| headers.iter().position(|h| names.contains(&h.as_str()));
    let missing = |what: &str| {
        input_error(
            path,
            format!("no `{what}` column (header: {})", headers.join(",")),
        )
    };
    let n_col = column(&["n", "params"]).ok_or_else(|| missing("n"))?;
    let d_col = column(&["d", "tokens"]).ok_or_else(|| missing("d"))?;
    let loss_col = column(&["loss", "l"]).ok_or_else(|| missing("loss"))?;
    let flops_col = column(&["flops", "c"]);
    let mut runs = Vec::new();
    for (i, row) in reader.records().enumerate() {
        let line = i + 2;
        let row = row.map_err(|e| input_error(path, format!("line {line}: {e}")))?;
        let number = |col: usize, name: &str| -> Result<f64> {
            let field = row.get(col).unwrap_or("");
            field.parse::<f64>().map_err(|_| {
                input_error(
                    path,
                    format!("line {line}: {name} `{field}` is not a number"),
                )
            })
        };
        let (n, d, loss) = (
            number(n_col, "n")?,
            number(d_col, "d")?,
            number(loss_col, "loss")?,
        );
        let flops = match flops_col {
            Some(col) => number(col, "flops")?,
            None => 6.0 * n * d,
        };
        runs.push(RunRecord {
            name: format!("{}:{line}", path.display()),
            architecture: "early".into(),
            params: n,
            active_params: None,
            vision_params: None,
            tokens: d,
            tokens_by_modality: BTreeMap::new(),
            bytes_by_modality: BTreeMap::new(),
            flops,
            flops_detailed: None,
            val_loss: BTreeMap::from([("loss".to_string(), loss)]),
            val_bits_per_byte: BTreeMap::new(),
            specialisation: Vec::new(),
            wall_s: 0.0,
            git_revision: None,
            labels: BTreeMap::new(),
        });
    }
    if runs.is_empty() {
        return Err(input_error(path, "no rows".into()));
    }
    Ok(runs)
}

/// Reads runs from `.jsonl` or `.csv`, by extension.
pub fn read_any(path: &Path) -> Result<Vec<RunRecord>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => read_csv(path),
        Some("jsonl") | Some("json") => read_runs(path),
        _ => Err(input_error(
            path,
            "expected a .jsonl runs file or a .csv table".into(),
        )),
    }
}

/// The fit's view of runs: (N_active, D, target loss). Runs without the target are an error naming them.
pub fn points(runs: &[RunRecord], target: &str) -> Result<Vec<Point>> {
    runs.iter()
        .map(|run| {
            let loss = run.target_loss(target).ok_or_else(|| {
                ScalingError::Fit(format!(
                    "run `{}` has no validation loss `{target}` (it has: {})",
                    run.name,
                    run.val_loss.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
            Ok(Point::new(run.active(), run.tokens, loss))
        })
        .collect()
}

/// Per-modality points for the compression-factor law, modalities in the given order (the first is the
/// reference whose weight is 1).
pub fn modality_points(
    runs: &[RunRecord],
    target: &str,
    modalities: &[String],
) -> Result<Vec<Point>> {
    let mut out = points(runs, target)?;
    for (point, run) in out.iter_mut().zip(runs) {
        point.tokens = modalities
            .iter()
            .map(|m| {
                run.tokens_by_modality
                    .get(m)
                    .copied()
                    .filter(|t| *t > 0.0)
                    .ok_or_else(|| {
                        ScalingError::Fit(format!(
                            "run `{}` has no `{m}` tokens for the compression-factor law",
                            run.name
                        ))
                    })
            })
            .collect::<Result<_>>()?;
    }
    Ok(out)
}

/// A filter that splits runs into fitted and held out: `params>=X`, `tokens>=X`, `flops>=X` (or `<=`,
/// `>`, `<`), matching runs held out.
#[derive(Debug, Clone, PartialEq)]
pub struct Holdout {
    pub field: String,
    pub op: String,
    pub value: f64,
}

impl Holdout {
    pub fn parse(text: &str) -> Result<Holdout> {
        let bad = |why: &str| {
            ScalingError::Fit(format!("--holdout `{text}`: {why} (example: params>=5e6)"))
        };
        let op = [">=", "<=", ">", "<"]
            .into_iter()
            .find(|op| text.contains(op))
            .ok_or_else(|| bad("no comparison"))?;
        let (field, value) = text.split_once(op).expect("found above");
        let field = field.trim().to_string();
        if !["params", "tokens", "flops"].contains(&field.as_str()) {
            return Err(bad("the field must be params, tokens or flops"));
        }
        let value = value
            .trim()
            .parse::<f64>()
            .map_err(|_| bad("the value is not a number"))?;
        Ok(Holdout {
            field,
            op: op.to_string(),
            value,
        })
    }

    pub fn holds_out(&self, run: &RunRecord) -> bool {
        let v = match self.field.as_str() {
            "params" => run.active(),
            "tokens" => run.tokens,
            _ => run.flops,
        };
        match self.op.as_str() {
            ">=" => v >= self.value,
            "<=" => v <= self.value,
            ">" => v > self.value,
            _ => v < self.value,
        }
    }
}
