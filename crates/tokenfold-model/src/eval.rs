//! Evaluation on the fixed evaluation sets: exact-match accuracy of greedy answers (generated with the KV
//! cache) for image tasks; negative log-likelihood per token and bits per byte for text.

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use tokenfold_data::sequence::{Encoded, SequenceConfig, encode_prompt};
use tokenfold_data::{Assets, Batch, EvalSpec, Sample, Task, TextTokenizer};

use crate::Result;
use crate::model::{Inputs, LayerHook, NativeModel, NoHook};
use crate::moe::LayerRouting;

/// Answers are short (a label is at most a handful of tokens); generation stops there at the latest.
pub const MAX_ANSWER_TOKENS: usize = 16;
/// A `describe` answer names up to six objects with their cells, about 40 tokens.
pub const MAX_DESCRIBE_TOKENS: usize = 72;

/// How many tokens greedy generation may produce for a task's answer.
pub fn max_answer_tokens(task: Task) -> usize {
    if task == Task::Describe {
        MAX_DESCRIBE_TOKENS
    } else {
        MAX_ANSWER_TOKENS
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetResult {
    /// `exist-random/test`, `count/test`, …
    pub set: String,
    pub task: Task,
    pub samples: usize,
    /// Exactly matching answers (image tasks); for `describe`, objects named with their cell.
    pub correct: usize,
    /// `describe` only: objects in the samples' scenes, the denominator of its accuracy (object recall).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<usize>,
    pub accuracy: f64,
    /// `read` only: the share of the numbers' digits written in their place (partial credit, so that a
    /// model on its way to reading shows it before whole numbers come out right).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digit_accuracy: Option<f64>,
    /// Text only.
    pub nll_per_token: Option<f64>,
    pub bits_per_byte: Option<f64>,
}

/// Pads encoded prompts into model inputs of the longest prompt's length.
pub fn prompt_inputs(
    prompts: &[Encoded],
    pad: u32,
    seq: &SequenceConfig,
    device: &Device,
) -> Result<Inputs> {
    let b = prompts.len();
    let t = prompts.iter().map(|p| p.tokens.len()).max().unwrap_or(1);
    let (n, dim) = (seq.n_patches(), seq.patch_dim());
    let mut tokens = vec![pad; b * t];
    let mut patches = vec![0f32; b * n * dim];
    for (s, p) in prompts.iter().enumerate() {
        tokens[s * t..s * t + p.tokens.len()].copy_from_slice(&p.tokens);
        if !p.patches.is_empty() {
            patches[s * n * dim..(s + 1) * n * dim].copy_from_slice(&p.patches);
        }
    }
    Ok(Inputs {
        tokens: Tensor::from_vec(tokens, (b, t), device)?,
        patches: Tensor::from_vec(patches, (b, n, dim), device)?,
        image_starts: prompts.iter().map(|p| p.image_start).collect(),
        lengths: prompts.iter().map(|p| p.tokens.len()).collect(),
    })
}

/// Greedy answers to encoded prompts, as one batch.
fn answer_prompts(
    model: &NativeModel,
    tokenizer: &TextTokenizer,
    seq: &SequenceConfig,
    prompts: &[Encoded],
    max_new: usize,
    hook: &mut dyn LayerHook,
) -> Result<Vec<String>> {
    let inputs = prompt_inputs(prompts, tokenizer.special.pad, seq, model.device())?;
    model
        .generate(&inputs, hook, max_new, tokenizer.special.eos)?
        .iter()
        .map(|ids| Ok(tokenizer.decode(ids)?.trim().to_string()))
        .collect()
}

/// Greedy answers to image-task samples, in batches.
pub fn answer(
    model: &NativeModel,
    tokenizer: &TextTokenizer,
    seq: &SequenceConfig,
    samples: &[Sample],
    batch_size: usize,
    hook: &mut dyn LayerHook,
) -> Result<Vec<String>> {
    let mut answers = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(batch_size.max(1)) {
        let prompts = chunk
            .iter()
            .map(|s| encode_prompt(s.image.as_ref(), &s.question, tokenizer, seq))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let max_new = chunk
            .iter()
            .map(|s| max_answer_tokens(s.task))
            .max()
            .unwrap_or(MAX_ANSWER_TOKENS);
        answers.extend(answer_prompts(
            model, tokenizer, seq, &prompts, max_new, hook,
        )?);
    }
    Ok(answers)
}

/// The greedy answer to one question about one image.
pub fn answer_question(
    model: &NativeModel,
    tokenizer: &TextTokenizer,
    seq: &SequenceConfig,
    image: &RgbImage,
    question: &str,
) -> Result<String> {
    let prompt = encode_prompt(Some(image), question, tokenizer, seq)?;
    // A free question is answered at a short answer's length unless it is describe's question.
    let task = if question.trim() == tokenfold_data::tasks::DESCRIBE_QUESTION {
        Task::Describe
    } else {
        Task::Caption
    };
    let max_new = max_answer_tokens(task);
    let mut answers = answer_prompts(model, tokenizer, seq, &[prompt], max_new, &mut NoHook)?;
    Ok(answers.remove(0))
}

/// Evaluates `n` samples of each set.
pub fn evaluate(
    model: &NativeModel,
    tokenizer: &TextTokenizer,
    assets: &Assets,
    seq: &SequenceConfig,
    specs: &[EvalSpec],
    n: usize,
    batch_size: usize,
) -> Result<Vec<SetResult>> {
    evaluate_with(
        model,
        tokenizer,
        assets,
        seq,
        specs,
        n,
        batch_size,
        &mut NoHook,
    )
}

/// [`evaluate`] with a hook in every image-task forward pass (a token-reduction plan, say).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_with(
    model: &NativeModel,
    tokenizer: &TextTokenizer,
    assets: &Assets,
    seq: &SequenceConfig,
    specs: &[EvalSpec],
    n: usize,
    batch_size: usize,
    hook: &mut dyn LayerHook,
) -> Result<Vec<SetResult>> {
    let mut results = Vec::with_capacity(specs.len());
    for spec in specs {
        let samples = spec.build(assets, n);
        let result = if spec.task == Task::Text {
            text_result(model, tokenizer, seq, &samples, batch_size)?
        } else {
            let answers = answer(model, tokenizer, seq, &samples, batch_size, hook)?;
            let (correct, objects) = if spec.task == Task::Describe {
                let (named, total) = answers
                    .iter()
                    .zip(&samples)
                    .map(|(a, s)| described_objects(a, &s.answer))
                    .fold((0, 0), |(n, t), (a, b)| (n + a, t + b));
                (named, Some(total))
            } else {
                let correct = answers
                    .iter()
                    .zip(&samples)
                    .filter(|(a, s)| **a == s.answer)
                    .count();
                (correct, None)
            };
            let digit_accuracy = (spec.task == Task::Read).then(|| {
                let (right, total) = answers
                    .iter()
                    .zip(&samples)
                    .map(|(a, s)| digits_in_place(a, &s.answer))
                    .fold((0, 0), |(r, t), (a, b)| (r + a, t + b));
                right as f64 / total.max(1) as f64
            });
            SetResult {
                set: String::new(),
                task: spec.task,
                samples: samples.len(),
                correct,
                objects,
                accuracy: correct as f64 / objects.unwrap_or(samples.len()).max(1) as f64,
                digit_accuracy,
                nll_per_token: None,
                bits_per_byte: None,
            }
        };
        results.push(SetResult {
            set: spec.to_string(),
            ..result
        });
    }
    Ok(results)
}

/// Scores a `read` answer digit by digit: of `truth`'s digits, how many `answer` has at the same place
/// (counted from the left; a missing digit is wrong). Returns (right, digits in the number).
pub fn digits_in_place(answer: &str, truth: &str) -> (usize, usize) {
    let right = truth
        .trim()
        .chars()
        .zip(answer.trim().chars())
        .filter(|(t, a)| t == a)
        .count();
    (right, truth.trim().chars().count())
}

/// Scores a `describe` answer by object recall: of the "cell label" items of `truth` ("top left cat,
/// center dog"), how many `answer` lists too, each of its items matching at most once. Returns (named,
/// objects in the scene). Recall rather than exact match, so that a model that recognises some of a
/// scene's objects gets credit for those.
pub fn described_objects(answer: &str, truth: &str) -> (usize, usize) {
    let items = |text: &str| -> Vec<String> {
        text.split(',')
            .map(|item| item.trim().to_string())
            .filter(|item| !item.is_empty())
            .collect()
    };
    let mut listed = items(answer);
    let expected = items(truth);
    let named = expected
        .iter()
        .filter(|item| {
            listed
                .iter()
                .position(|l| l == *item)
                .map(|i| listed.swap_remove(i))
                .is_some()
        })
        .count();
    (named, expected.len())
}

/// Cross-entropy of one set's target tokens (the answer for image tasks, the whole text for text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetLoss {
    pub set: String,
    pub task: Task,
    pub samples: usize,
    pub target_tokens: usize,
    /// UTF-8 bytes of the target text.
    pub target_bytes: usize,
    pub nll_per_token: f64,
    pub bits_per_byte: f64,
}

/// Teacher-forced cross-entropy of `samples`' targets: summed nats, target tokens and target bytes.
/// Adds the tokens each expert received to `routing` (mixture-of-experts models).
fn target_loss(
    model: &NativeModel,
    tokenizer: &TextTokenizer,
    seq: &SequenceConfig,
    samples: &[Sample],
    batch_size: usize,
    routing: &mut Vec<LayerRouting>,
) -> Result<(f64, usize, usize)> {
    let (mut nll, mut tokens, mut bytes) = (0f64, 0usize, 0usize);
    for chunk in samples.chunks(batch_size.max(1)) {
        let batch = Batch::from_samples(chunk, tokenizer, seq)?;
        let losses = model.sample_losses_with_routing(&batch)?;
        routing.resize(losses.routing.len(), LayerRouting::default());
        for (total, layer) in routing.iter_mut().zip(&losses.routing) {
            total.add(layer);
        }
        let (per_sample, counts) = (losses.per_sample, losses.counts);
        for (mean, count) in per_sample.to_vec1::<f32>()?.into_iter().zip(&counts) {
            nll += mean as f64 * *count as f64;
            tokens += count;
        }
        for s in 0..batch.batch_size {
            // The text the targets cover (special tokens such as <|eos|> decode to nothing).
            let row = s * batch.seq_len..s * batch.seq_len + batch.lengths[s];
            let targets: Vec<u32> = batch.tokens[row.clone()]
                .iter()
                .zip(&batch.loss_mask[row])
                .filter(|(_, m)| **m > 0.0)
                .map(|(t, _)| *t)
                .collect();
            bytes += tokenizer.decode(&targets)?.len();
        }
    }
    Ok((nll, tokens, bytes))
}

/// Validation loss of every set (nats per target token and bits per byte of target text), and from the
/// same forward passes the tokens each expert of every mixture-of-experts layer received (empty for a
/// dense model): the data of the per-layer specialisation score.
pub fn validation_losses(
    model: &NativeModel,
    tokenizer: &TextTokenizer,
    assets: &Assets,
    seq: &SequenceConfig,
    specs: &[EvalSpec],
    n: usize,
    batch_size: usize,
) -> Result<(Vec<SetLoss>, Vec<LayerRouting>)> {
    let mut routing = Vec::new();
    let losses = specs
        .iter()
        .map(|spec| {
            let samples = spec.build(assets, n);
            let (nll, tokens, bytes) =
                target_loss(model, tokenizer, seq, &samples, batch_size, &mut routing)?;
            Ok(SetLoss {
                set: spec.to_string(),
                task: spec.task,
                samples: samples.len(),
                target_tokens: tokens,
                target_bytes: bytes,
                nll_per_token: nll / tokens.max(1) as f64,
                bits_per_byte: nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
            })
        })
        .collect::<Result<_>>()?;
    Ok((losses, routing))
}

fn text_result(
    model: &NativeModel,
    tokenizer: &TextTokenizer,
    seq: &SequenceConfig,
    samples: &[Sample],
    batch_size: usize,
) -> Result<SetResult> {
    let (nll, tokens, bytes) =
        target_loss(model, tokenizer, seq, samples, batch_size, &mut Vec::new())?;
    Ok(SetResult {
        set: String::new(),
        task: Task::Text,
        samples: samples.len(),
        correct: 0,
        objects: None,
        digit_accuracy: None,
        accuracy: 0.0,
        nll_per_token: Some(nll / tokens.max(1) as f64),
        bits_per_byte: Some(nll / std::f64::consts::LN_2 / bytes.max(1) as f64),
    })
}

/// Mean accuracy over the benchmark image-task sets (`describe`, a diagnostic, left out).
pub fn mean_accuracy(results: &[SetResult]) -> f64 {
    let image: Vec<f64> = results
        .iter()
        .filter(|r| !matches!(r.task, Task::Text | Task::Describe))
        .map(|r| r.accuracy)
        .collect();
    image.iter().sum::<f64>() / image.len().max(1) as f64
}

/// A markdown table of results.
pub fn markdown(results: &[SetResult]) -> String {
    let mut out = String::from(
        "| set | samples | accuracy | NLL/token | bits/byte |\n|---|---:|---:|---:|---:|\n",
    );
    for r in results {
        let fmt = |v: Option<f64>| v.map_or("".to_string(), |v| format!("{v:.3}"));
        // Describe's accuracy is a share of objects: say so where a reader sees it.
        let set = match (r.objects, r.digit_accuracy) {
            (Some(objects), _) => format!("{} (objects named of {objects})", r.set),
            (None, Some(digits)) => format!("{} (digits in place: {:.1}%)", r.set, 100.0 * digits),
            (None, None) => r.set.clone(),
        };
        let accuracy = if r.task == Task::Text {
            String::new()
        } else {
            format!("{:.1}%", 100.0 * r.accuracy)
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            set,
            r.samples,
            accuracy,
            fmt(r.nll_per_token),
            fmt(r.bits_per_byte)
        ));
    }
    out.push_str(&format!(
        "| **image-task mean** | | **{:.1}%** | | |\n",
        100.0 * mean_accuracy(results)
    ));
    out
}
