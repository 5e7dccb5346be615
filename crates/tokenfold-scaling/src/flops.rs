//! Training FLOPs, two ways.
//!
//! The scaling-law convention (Kaplan, Chinchilla, Paper A) is 6ND: 2 FLOPs per multiply-accumulate,
//! backward twice the forward, context terms ignored. Late fusion adds the encoder on the image tokens,
//! 6(N_v·D_v + N·D); mixture-of-experts counts active parameters only, 6·N_active·D.
//!
//! The detailed count follows Chinchilla's appendix F per operation, with three matrices for the SwiGLU
//! MLP and the attention window stated explicitly: `Full` counts every query against the whole
//! sequence (Chinchilla's convention); `Masked` counts only the pairs our mask allows (causal for text,
//! bidirectional within an image), which is what a kernel that skips masked blocks would do.

use serde::{Deserialize, Serialize};
use tokenfold_model::ModelConfig;
use tokenfold_model::train::{ModalityCounts, masked_attention_pairs};

/// 6·N·D.
pub fn early_fusion(params: f64, tokens: f64) -> f64 {
    6.0 * params * tokens
}

/// 6·(N_v·D_v + N·D): the encoder runs on image tokens only, the decoder on all of them.
pub fn late_fusion(vision_params: f64, image_tokens: f64, params: f64, tokens: f64) -> f64 {
    6.0 * (vision_params * image_tokens + params * tokens)
}

/// 6·N_active·D (router FLOPs ignored).
pub fn mixture_of_experts(active_params: f64, tokens: f64) -> f64 {
    6.0 * active_params * tokens
}

/// Which query–key pairs the attention terms count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionWindow {
    /// Every query against every position of the sequence (Chinchilla appendix F).
    Full,
    /// Only the pairs the attention mask allows.
    Masked,
}

/// Forward FLOPs of one sequence, per operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardFlops {
    /// The patch projection (a matmul) plus the token-embedding lookup counted as a matmul with the
    /// one-hot input, as Chinchilla does.
    pub embeddings: f64,
    /// Q, K, V and output projections.
    pub projections: f64,
    /// Q·Kᵀ and the attention-weighted sum of V.
    pub attention: f64,
    /// 3 FLOPs per score (max, exp, normalise).
    pub softmax: f64,
    /// SwiGLU: three d × d_ff matrices (per active expert, plus the router, for mixture-of-experts).
    pub mlp: f64,
    /// The output head over the positions whose logits are computed.
    pub logits: f64,
    /// Late fusion: the vision encoder ([CLS] included) and connector.
    pub encoder: f64,
}

impl ForwardFlops {
    pub fn total(&self) -> f64 {
        self.embeddings
            + self.projections
            + self.attention
            + self.softmax
            + self.mlp
            + self.logits
            + self.encoder
    }

    /// Forward plus backward (twice the forward).
    pub fn training(&self) -> f64 {
        3.0 * self.total()
    }

    /// The same count without embeddings and logits (the variant that reproduces Chinchilla's table A4).
    pub fn without_embeddings(&self) -> f64 {
        self.total() - self.embeddings - self.logits
    }
}

/// The shape of one early-fusion sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceShape {
    /// All positions, image tokens included.
    pub length: usize,
    /// Where the image span starts (0 for an image-first sequence).
    pub image_start: usize,
    /// Image tokens (0 for a text-only sequence).
    pub image_tokens: usize,
    /// Positions whose logits are computed.
    pub logit_positions: usize,
}

/// Query–key pairs the mask allows: causal, except that image tokens see their whole image.
pub fn masked_pairs(shape: &SequenceShape) -> f64 {
    masked_attention_pairs(shape.length, shape.image_start, shape.image_tokens) as f64
}

/// What a forward pass processes, summed over sequences.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    pub tokens: f64,
    pub image_tokens: f64,
    /// Query–key pairs the attention terms count.
    pub attention_pairs: f64,
    pub logit_positions: f64,
}

impl Workload {
    pub fn sequence(shape: &SequenceShape, window: AttentionWindow) -> Workload {
        let s = shape.length as f64;
        Workload {
            tokens: s,
            image_tokens: shape.image_tokens as f64,
            attention_pairs: match window {
                AttentionWindow::Full => s * s,
                AttentionWindow::Masked => masked_pairs(shape),
            },
            logit_positions: shape.logit_positions as f64,
        }
    }

    /// Everything a training run fed the model, as counted during training (masked window).
    pub fn trained(counts: &ModalityCounts) -> Workload {
        Workload {
            tokens: (counts.image_tokens + counts.text_tokens) as f64,
            image_tokens: counts.image_tokens as f64,
            attention_pairs: counts.attention_pairs as f64,
            logit_positions: counts.target_tokens as f64,
        }
    }
}

/// Forward FLOPs of a workload through an early-fusion decoder.
pub fn forward(config: &ModelConfig, work: &Workload) -> ForwardFlops {
    let d = config.d_model as f64;
    let s = work.tokens;
    let layers = config.n_layers as f64;
    let pairs = work.attention_pairs;
    // A mixture of experts runs top_k experts per token, plus its router.
    let (active_experts, router) = config
        .moe
        .as_ref()
        .map_or((1.0, 0.0), |m| (m.top_k as f64, m.experts as f64));
    let text_embeddings = 2.0 * (s - work.image_tokens) * config.vocab_size as f64 * d;
    let (patch_projection, encoder) = match &config.vision {
        None => (2.0 * work.image_tokens * config.patch_dim as f64 * d, 0.0),
        Some(v) => {
            // Every image runs the encoder over its (grid·r)² patches plus [CLS], bidirectionally;
            // the connector folds r² encoder outputs into each decoder image token.
            let per_image = (config.image_grid * config.image_grid) as f64;
            let images = work.image_tokens / per_image;
            let r2 = v.tokens_per_image_token() as f64;
            let encoder_tokens = per_image * r2 + 1.0;
            let tokens = images * encoder_tokens;
            let pairs = images * encoder_tokens.powi(2);
            let (dv, layers_v) = (v.d_model as f64, v.n_layers as f64);
            let blocks = layers_v
                * (2.0 * 4.0 * tokens * dv * dv
                    + 2.0 * 2.0 * pairs * dv
                    + 3.0 * v.n_heads as f64 * pairs
                    + 2.0 * 3.0 * tokens * dv * v.d_ff as f64);
            let patches = 2.0 * work.image_tokens * config.patch_dim as f64 * dv;
            let connector = 2.0 * work.image_tokens * (r2 * dv * d + d * d);
            (0.0, blocks + patches + connector)
        }
    };
    ForwardFlops {
        embeddings: patch_projection + text_embeddings,
        projections: layers * 2.0 * 4.0 * s * d * d,
        attention: layers * 2.0 * 2.0 * pairs * d,
        softmax: layers * 3.0 * config.n_heads as f64 * pairs,
        mlp: layers * 2.0 * s * d * (3.0 * active_experts * config.d_ff as f64 + router),
        logits: 2.0 * work.logit_positions * d * config.vocab_size as f64,
        encoder,
    }
}
