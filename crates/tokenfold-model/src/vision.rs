//! Late fusion: a ViT encoder and a connector in front of the decoder.
//!
//! The encoder is trained from scratch with the decoder (the study's late-fusion models): the same
//! p × p patches through a linear layer, learned absolute positions, a learned `[CLS]` token first,
//! bidirectional pre-norm blocks (RMSNorm, QK-norm, SwiGLU: the decoder's block without RoPE), a final
//! norm. The `[CLS]` output is dropped; every patch output goes through a two-layer MLP connector
//! (GELU between) to the decoder width and takes the place of the early-fusion patch embedding, so the
//! decoder sees the same image span, positions and mask as in early fusion, and token reduction works
//! unchanged. A separate learning-rate multiplier (`lr_scale`, default 0.1) applies to the encoder, as
//! the study found a lower encoder rate helps when it is trained from scratch.

use candle_core::{Device, Module, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, Shape};
use crate::ops::rms_norm;

/// `[model.vision]`: the encoder's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_ff: usize,
    /// Learning-rate multiplier of the encoder's weights (not the connector's).
    #[serde(default = "lr_scale")]
    pub lr_scale: f64,
}

fn lr_scale() -> f64 {
    0.1
}

impl VisionConfig {
    /// The encoder as a block configuration (the decoder's block builder reads shapes and norms from it).
    pub(crate) fn block_config(&self, decoder: &ModelConfig) -> ModelConfig {
        let shape = Shape {
            d_model: self.d_model,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
            d_ff: self.d_ff,
        };
        let mut config =
            ModelConfig::from_shape(shape, 1, decoder.patch_dim, decoder.image_grid, 1);
        config.qk_norm = decoder.qk_norm;
        config.norm_eps = decoder.norm_eps;
        config
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.d_model == 0 || self.n_heads == 0 || self.d_model % self.n_heads != 0 {
            return Err(format!(
                "n_heads {} does not divide d_model {}",
                self.n_heads, self.d_model
            ));
        }
        if (self.d_model / self.n_heads) % 2 != 0 {
            return Err(format!(
                "head dimension {} must be even",
                self.d_model / self.n_heads
            ));
        }
        if self.n_layers == 0 || self.d_ff == 0 {
            return Err("n_layers and d_ff must be positive".into());
        }
        if !(self.lr_scale > 0.0 && self.lr_scale.is_finite()) {
            return Err(format!("lr_scale {} must be positive", self.lr_scale));
        }
        Ok(())
    }

    /// Encoder parameters: patch projection and bias, positions, `[CLS]`, blocks, final norm.
    pub fn encoder_parameter_count(&self, decoder: &ModelConfig) -> usize {
        let d = self.d_model;
        let head_dim = d / self.n_heads;
        let qk = if decoder.qk_norm { 2 * head_dim } else { 0 };
        let per_layer = 4 * d * d + qk + 3 * d * self.d_ff + 2 * d;
        let grid = decoder.image_grid;
        decoder.patch_dim * d + d + grid * grid * d + d + self.n_layers * per_layer + d
    }

    /// Connector parameters: d_v → d → d with biases.
    pub fn connector_parameter_count(&self, decoder: &ModelConfig) -> usize {
        let (dv, d) = (self.d_model, decoder.d_model);
        dv * d + d + d * d + d
    }
}

pub(crate) struct VisionEncoder {
    patch_embed: Linear,
    patch_bias: Tensor,
    /// (grid², d_v).
    positions: Tensor,
    /// (1, d_v).
    cls: Tensor,
    blocks: Vec<crate::model::Block>,
    norm: Tensor,
    connector_in: Linear,
    connector_in_bias: Tensor,
    connector_out: Linear,
    connector_out_bias: Tensor,
    block_config: ModelConfig,
}

fn randn(
    vb: &VarBuilder,
    shape: (usize, usize),
    name: &str,
    stdev: f64,
) -> candle_core::Result<Tensor> {
    vb.get_with_hints(shape, name, Init::Randn { mean: 0.0, stdev })
}

impl VisionEncoder {
    /// Weights under `vision.` (encoder) and `connector.`.
    pub(crate) fn new(
        vision: &VisionConfig,
        decoder: &ModelConfig,
        vb: &VarBuilder,
    ) -> candle_core::Result<VisionEncoder> {
        let (dv, d) = (vision.d_model, decoder.d_model);
        let block_config = vision.block_config(decoder);
        let v = vb.pp("vision");
        let c = vb.pp("connector");
        let grid = decoder.image_grid;
        Ok(VisionEncoder {
            patch_embed: Linear::new(
                randn(&v, (dv, decoder.patch_dim), "patch_embed.weight", 0.02)?,
                None,
            ),
            patch_bias: v.get_with_hints(dv, "patch_embed.bias", Init::Const(0.0))?,
            positions: randn(&v, (grid * grid, dv), "positions", 0.02)?,
            cls: randn(&v, (1, dv), "cls", 0.02)?,
            blocks: (0..vision.n_layers)
                .map(|i| crate::model::Block::new(&block_config, v.pp("layers").pp(i)))
                .collect::<candle_core::Result<_>>()?,
            norm: v.get_with_hints(dv, "norm.weight", Init::Const(1.0))?,
            connector_in: Linear::new(randn(&c, (d, dv), "fc1.weight", 0.02)?, None),
            connector_in_bias: c.get_with_hints(d, "fc1.bias", Init::Const(0.0))?,
            connector_out: Linear::new(randn(&c, (d, d), "fc2.weight", 0.02)?, None),
            connector_out_bias: c.get_with_hints(d, "fc2.bias", Init::Const(0.0))?,
            block_config,
        })
    }

    /// Patches (b, n, patch_dim) → decoder-width image tokens (b, n, d).
    pub(crate) fn forward(&self, patches: &Tensor, device: &Device) -> candle_core::Result<Tensor> {
        let (b, n, _) = patches.dims3()?;
        let dv = self.block_config.d_model;
        let x = self
            .patch_embed
            .forward(patches)?
            .broadcast_add(&self.patch_bias)?
            .broadcast_add(&self.positions)?;
        let cls = self.cls.unsqueeze(0)?.broadcast_as((b, 1, dv))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?;
        let t = n + 1;
        // Bidirectional over the image and [CLS]; no rotary positions (cos 1, sin 0).
        let half = self.block_config.head_dim() / 2;
        let cos = Tensor::ones((1, 1, 1, half), x.dtype(), device)?;
        let sin = Tensor::zeros((1, 1, 1, half), x.dtype(), device)?;
        let bias = Tensor::zeros((b, 1, t, t), x.dtype(), device)?;
        let valid = vec![true; b * t];
        let key_bias = vec![0f32; b * t];
        let is_image = vec![true; b * t];
        for block in &self.blocks {
            x = block
                .forward(
                    &x,
                    (&cos, &sin),
                    &bias,
                    &self.block_config,
                    None,
                    (&valid, &key_bias),
                    &is_image,
                )?
                .hidden;
        }
        let patches_out = rms_norm(&x, &self.norm, self.block_config.norm_eps)?.narrow(1, 1, n)?;
        let hidden = self
            .connector_in
            .forward(&patches_out)?
            .broadcast_add(&self.connector_in_bias)?
            .gelu()?;
        self.connector_out
            .forward(&hidden)?
            .broadcast_add(&self.connector_out_bias)
    }
}

/// Whether a variable belongs to the encoder (and takes its learning-rate multiplier).
pub fn is_encoder_weight(name: &str) -> bool {
    name.starts_with("vision.")
}
