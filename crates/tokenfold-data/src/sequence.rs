//! One sequence format for every task, and batches (padded to their longest sample) for the model crate.
//!
//! An image sample becomes
//! `<|bos|> <|image_start|> <|patch|>×n <|image_end|> [<|summary|>] question-tokens answer-tokens <|eos|>`,
//! a text sample `<|bos|> text-tokens <|eos|>`. The answer is encoded with a leading space
//! (`" yes"`). At each `<|patch|>` position the model embeds the image patch instead of a token; patches
//! are p×p×3 values in [-1, 1], ordered (row, column, channel) inside a patch and in raster order across
//! the image.
//!
//! The loss mask marks the tokens the model is trained to predict: the answer tokens and `<|eos|>` of an
//! image sample, every token after `<|bos|>` of a text sample. Token `t` is predicted from position `t − 1`.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::tasks::{Sample, Task};
use crate::tokenizer::TextTokenizer;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceConfig {
    /// Side of the square image, pixels.
    pub image_size: u32,
    /// Side of a square patch, pixels; must divide `image_size`.
    pub patch_size: u32,
    /// Length of every sequence in a batch, tokens; text passages are cut to fit.
    pub max_len: usize,
    /// Whether a `<|summary|>` token follows `<|image_end|>`: a learned [CLS] stand-in whose attention
    /// row ranks patches for methods defined by [CLS] attention (VisionZip, PruMerge).
    #[serde(default)]
    pub summary_token: bool,
}

impl Default for SequenceConfig {
    fn default() -> Self {
        SequenceConfig {
            image_size: 64,
            patch_size: 4,
            max_len: 320,
            summary_token: false,
        }
    }
}

impl SequenceConfig {
    pub fn validate(&self) -> Result<()> {
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(DataError::config(
                "sequence.patch_size",
                format!(
                    "{} does not divide image_size {}",
                    self.patch_size, self.image_size
                ),
            ));
        }
        if self.max_len < self.n_patches() + 8 {
            return Err(DataError::config(
                "sequence.max_len",
                format!(
                    "{} leaves no room for a question after {} patches",
                    self.max_len,
                    self.n_patches()
                ),
            ));
        }
        Ok(())
    }

    pub fn grid(&self) -> usize {
        (self.image_size / self.patch_size) as usize
    }

    pub fn n_patches(&self) -> usize {
        self.grid() * self.grid()
    }

    pub fn patch_dim(&self) -> usize {
        (self.patch_size * self.patch_size * 3) as usize
    }
}

/// One encoded sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub tokens: Vec<u32>,
    /// 1 where the token is a training target.
    pub loss_mask: Vec<u8>,
    /// Position of the first `<|patch|>` token, if the sample has an image.
    pub image_start: Option<usize>,
    /// Tokens before the answer: the prompt a model is given at evaluation.
    pub prompt_len: usize,
    /// (n_patches × patch_dim) values, empty without an image.
    pub patches: Vec<f32>,
}

/// Cuts an RGB image into patches, values mapped from 0..=255 to [-1, 1].
pub fn patchify(image: &RgbImage, cfg: &SequenceConfig) -> Result<Vec<f32>> {
    if image.width() != cfg.image_size || image.height() != cfg.image_size {
        return Err(DataError::config(
            "image",
            format!(
                "{}×{} does not match image_size {}",
                image.width(),
                image.height(),
                cfg.image_size
            ),
        ));
    }
    let (grid, p) = (cfg.grid() as u32, cfg.patch_size);
    let mut patches = Vec::with_capacity(cfg.n_patches() * cfg.patch_dim());
    for gy in 0..grid {
        for gx in 0..grid {
            for y in 0..p {
                for x in 0..p {
                    let pixel = image.get_pixel(gx * p + x, gy * p + y);
                    patches.extend(pixel.0.iter().map(|&v| v as f32 / 127.5 - 1.0));
                }
            }
        }
    }
    Ok(patches)
}

/// Encodes a prompt (image and question) with no answer: what a model sees at evaluation.
pub fn encode_prompt(
    image: Option<&RgbImage>,
    question: &str,
    tokenizer: &TextTokenizer,
    cfg: &SequenceConfig,
) -> Result<Encoded> {
    let special = tokenizer.special;
    let mut tokens = vec![special.bos];
    let mut image_start = None;
    let mut patches = Vec::new();
    if let Some(image) = image {
        patches = patchify(image, cfg)?;
        tokens.push(special.image_start);
        image_start = Some(tokens.len());
        tokens.extend(std::iter::repeat_n(special.patch, cfg.n_patches()));
        tokens.push(special.image_end);
        if cfg.summary_token {
            tokens.push(special.summary);
        }
    }
    tokens.extend(tokenizer.encode(question)?);
    if tokens.len() >= cfg.max_len {
        return Err(DataError::config(
            "sequence.max_len",
            format!(
                "{} is too short for the prompt {question:?} ({} tokens)",
                cfg.max_len,
                tokens.len()
            ),
        ));
    }
    Ok(Encoded {
        loss_mask: vec![0; tokens.len()],
        prompt_len: tokens.len(),
        tokens,
        image_start,
        patches,
    })
}

/// Encodes a sample with its answer, for training or loss evaluation.
pub fn encode(sample: &Sample, tokenizer: &TextTokenizer, cfg: &SequenceConfig) -> Result<Encoded> {
    let eos = tokenizer.special.eos;
    if sample.task == Task::Text {
        let mut tokens = vec![tokenizer.special.bos];
        tokens.extend(tokenizer.encode(&sample.answer)?);
        tokens.truncate(cfg.max_len - 1);
        tokens.push(eos);
        let mut loss_mask = vec![1; tokens.len()];
        loss_mask[0] = 0;
        return Ok(Encoded {
            tokens,
            loss_mask,
            image_start: None,
            prompt_len: 1,
            patches: Vec::new(),
        });
    }
    let mut encoded = encode_prompt(sample.image.as_ref(), &sample.question, tokenizer, cfg)?;
    let answer = tokenizer.encode(&format!(" {}", sample.answer))?;
    if encoded.tokens.len() + answer.len() + 1 > cfg.max_len {
        return Err(DataError::config(
            "sequence.max_len",
            format!(
                "{} is too short for {:?} → {:?} ({} tokens)",
                cfg.max_len,
                sample.question,
                sample.answer,
                encoded.tokens.len() + answer.len() + 1
            ),
        ));
    }
    encoded.tokens.extend(&answer);
    encoded.tokens.push(eos);
    encoded.loss_mask.resize(encoded.tokens.len(), 1);
    // Follow-ups continue the sequence after the answer's `<|eos|>`: question (not a target), answer and
    // `<|eos|>` (targets). Those that no longer fit in `max_len` are left out; they are extra supervision,
    // and the sample's own question and answer always fit.
    for follow_up in &sample.follow_ups {
        let question = tokenizer.encode(&follow_up.question)?;
        let answer = tokenizer.encode(&format!(" {}", follow_up.answer))?;
        if encoded.tokens.len() + question.len() + answer.len() + 1 > cfg.max_len {
            break;
        }
        encoded.tokens.extend(&question);
        encoded.loss_mask.resize(encoded.tokens.len(), 0);
        encoded.tokens.extend(&answer);
        encoded.tokens.push(eos);
        encoded.loss_mask.resize(encoded.tokens.len(), 1);
    }
    Ok(encoded)
}

/// A batch (batch_size × seq_len), row-major, padded to its longest sample: padding to `max_len` would
/// spend attention and MLP compute on pad tokens (half of a batch of short VQA samples).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub n_patches: usize,
    pub patch_dim: usize,
    /// (b, t) token ids, `<|pad|>` after each sequence.
    pub tokens: Vec<u32>,
    /// (b, t) 1.0 where the token is a training target.
    pub loss_mask: Vec<f32>,
    /// Real (non-padding) tokens per sample.
    pub lengths: Vec<usize>,
    /// Tokens before the answer, per sample.
    pub prompt_lens: Vec<usize>,
    /// Position of the first patch token per sample, `None` for text.
    pub image_starts: Vec<Option<usize>>,
    /// (b, n_patches, patch_dim) patch values, zeros for samples without an image.
    pub patches: Vec<f32>,
    pub tasks: Vec<Task>,
    pub answers: Vec<String>,
}

impl Batch {
    pub fn from_encoded(
        items: &[Encoded],
        tasks: Vec<Task>,
        answers: Vec<String>,
        pad: u32,
        cfg: &SequenceConfig,
    ) -> Batch {
        let b = items.len();
        let t = items
            .iter()
            .map(|e| e.tokens.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let (n_patches, patch_dim) = (cfg.n_patches(), cfg.patch_dim());
        let mut batch = Batch {
            batch_size: b,
            seq_len: t,
            n_patches,
            patch_dim,
            tokens: vec![pad; b * t],
            loss_mask: vec![0.0; b * t],
            lengths: Vec::with_capacity(b),
            prompt_lens: Vec::with_capacity(b),
            image_starts: Vec::with_capacity(b),
            patches: vec![0.0; b * n_patches * patch_dim],
            tasks,
            answers,
        };
        for (i, item) in items.iter().enumerate() {
            let row = i * t;
            batch.tokens[row..row + item.tokens.len()].copy_from_slice(&item.tokens);
            for (dst, &m) in batch.loss_mask[row..].iter_mut().zip(&item.loss_mask) {
                *dst = m as f32;
            }
            batch.lengths.push(item.tokens.len());
            batch.prompt_lens.push(item.prompt_len);
            batch.image_starts.push(item.image_start);
            if !item.patches.is_empty() {
                let start = i * n_patches * patch_dim;
                batch.patches[start..start + item.patches.len()].copy_from_slice(&item.patches);
            }
        }
        batch
    }

    /// Encodes and batches samples.
    pub fn from_samples(
        samples: &[Sample],
        tokenizer: &TextTokenizer,
        cfg: &SequenceConfig,
    ) -> Result<Batch> {
        let items = samples
            .iter()
            .map(|s| encode(s, tokenizer, cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Batch::from_encoded(
            &items,
            samples.iter().map(|s| s.task).collect(),
            samples.iter().map(|s| s.answer.clone()).collect(),
            tokenizer.special.pad,
            cfg,
        ))
    }
}
