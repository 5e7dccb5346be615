//! Model configuration: presets `nmm-xs` (about 1M parameters), `nmm-s` (about 5M) and `nmm-m` (about 20M),
//! or explicit fields, from TOML or JSON.

use serde::{Deserialize, Serialize};

use crate::moe::MoeConfig;
use crate::vision::VisionConfig;

use crate::error::{ModelError, Result};

/// Shape of an early-fusion native multimodal model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Hidden width of the SwiGLU MLP.
    pub d_ff: usize,
    /// Token vocabulary, from the tokenizer.
    pub vocab_size: usize,
    /// Values per image patch (p × p × 3).
    pub patch_dim: usize,
    /// Patches per image side (image_size / patch_size).
    pub image_grid: usize,
    /// Largest position id (sequence length bound for RoPE).
    pub max_positions: usize,
    #[serde(default = "yes")]
    pub tie_embeddings: bool,
    #[serde(default = "yes")]
    pub qk_norm: bool,
    /// Whether sequences carry a learned `<|summary|>` token after the image span.
    #[serde(default)]
    pub summary_token: bool,
    #[serde(default = "rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    /// Mixture-of-experts FFNs in every layer instead of one SwiGLU MLP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
    /// Late fusion: a ViT encoder and connector replace the patch projection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision: Option<VisionConfig>,
}

fn yes() -> bool {
    true
}
fn rope_theta() -> f64 {
    10_000.0
}
fn norm_eps() -> f64 {
    1e-5
}

/// Width, depth, heads and MLP width of a preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_ff: usize,
}

pub const PRESETS: [(&str, Shape); 3] = [
    (
        "nmm-xs",
        Shape {
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            d_ff: 352,
        },
    ),
    (
        "nmm-s",
        Shape {
            d_model: 256,
            n_layers: 6,
            n_heads: 8,
            d_ff: 688,
        },
    ),
    (
        "nmm-m",
        Shape {
            d_model: 384,
            n_layers: 11,
            n_heads: 8,
            d_ff: 1024,
        },
    ),
];

pub fn preset(name: &str) -> Result<Shape> {
    PRESETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| {
            let names: Vec<_> = PRESETS.iter().map(|(n, _)| *n).collect();
            ModelError::Config(format!(
                "unknown model preset '{name}' (expected one of {})",
                names.join(", ")
            ))
        })
}

impl ModelConfig {
    pub fn from_shape(
        shape: Shape,
        vocab_size: usize,
        patch_dim: usize,
        image_grid: usize,
        max_positions: usize,
    ) -> Self {
        ModelConfig {
            d_model: shape.d_model,
            n_layers: shape.n_layers,
            n_heads: shape.n_heads,
            d_ff: shape.d_ff,
            vocab_size,
            patch_dim,
            image_grid,
            max_positions,
            tie_embeddings: true,
            qk_norm: true,
            summary_token: false,
            rope_theta: rope_theta(),
            norm_eps: norm_eps(),
            moe: None,
            vision: None,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    pub fn validate(&self) -> Result<()> {
        let fail = |field: &str, message: String| {
            Err(ModelError::Config(format!("model.{field}: {message}")))
        };
        if self.d_model == 0 || self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return fail(
                "n_heads",
                format!("{} does not divide d_model {}", self.n_heads, self.d_model),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return fail(
                "n_heads",
                format!("head dimension {} must be even for RoPE", self.head_dim()),
            );
        }
        for (field, value) in [
            ("n_layers", self.n_layers),
            ("d_ff", self.d_ff),
            ("vocab_size", self.vocab_size),
            ("patch_dim", self.patch_dim),
            ("image_grid", self.image_grid),
            ("max_positions", self.max_positions),
        ] {
            if value == 0 {
                return fail(field, "must be positive".into());
            }
        }
        if !(self.rope_theta > 1.0 && self.norm_eps > 0.0) {
            return fail(
                "rope_theta/norm_eps",
                "rope_theta must exceed 1 and norm_eps be positive".into(),
            );
        }
        if let Some(moe) = &self.moe {
            moe.validate().or_else(|message| fail("moe", message))?;
        }
        if let Some(vision) = &self.vision {
            vision
                .validate()
                .and_then(|()| vision.validate_with(self))
                .or_else(|message| fail("vision", message))?;
        }
        Ok(())
    }

    /// Trainable parameters, counted from the shapes (every expert of a mixture).
    pub fn parameter_count(&self) -> usize {
        let experts = self.moe.as_ref().map_or(1, |m| m.experts);
        self.count_with_experts(experts)
    }

    /// Parameters one token passes through: with mixture-of-experts FFNs, the router and its top-k
    /// experts; the total for a dense model.
    pub fn active_parameter_count(&self) -> usize {
        let top_k = self.moe.as_ref().map_or(1, |m| m.top_k);
        self.count_with_experts(top_k)
    }

    /// Active parameters without the token embedding and output head.
    pub fn non_embedding_active_parameter_count(&self) -> usize {
        self.active_parameter_count() - self.embedding_parameter_count()
    }

    /// Parameters that turn patches into decoder tokens: the patch projection and 2-D positions (early
    /// fusion), or the vision encoder and connector (late fusion).
    pub fn image_parameter_count(&self) -> usize {
        match &self.vision {
            None => {
                self.patch_dim * self.d_model + self.d_model + 2 * self.image_grid * self.d_model
            }
            Some(v) => v.encoder_parameter_count(self) + v.connector_parameter_count(self),
        }
    }

    fn embedding_parameter_count(&self) -> usize {
        self.vocab_size * self.d_model * if self.tie_embeddings { 1 } else { 2 }
    }

    fn count_with_experts(&self, experts: usize) -> usize {
        let d = self.d_model;
        let attention = 4 * d * d + if self.qk_norm { 2 * self.head_dim() } else { 0 };
        let router = self.moe.as_ref().map_or(0, |m| m.experts * d);
        let mlp = experts * 3 * d * self.d_ff + router;
        let per_layer = attention + mlp + 2 * d;
        let embeddings = self.vocab_size * d * if self.tie_embeddings { 1 } else { 2 };
        let image = self.image_parameter_count();
        per_layer * self.n_layers + embeddings + image + d
    }

    /// Parameters excluding the token embedding and output head (the N of scaling laws).
    pub fn non_embedding_parameter_count(&self) -> usize {
        self.parameter_count() - self.embedding_parameter_count()
    }
}
