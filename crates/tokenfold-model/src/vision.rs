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
//!
//! **Pixel-unshuffle** (`unshuffle = r`, default 1): the encoder sees the image at r× finer patches,
//! (p/r) × (p/r) pixels, so it runs over r² tokens per decoder image token; the connector then folds
//! each r × r block of encoder outputs into one decoder token (space-to-depth: their r²·d_v values,
//! concatenated, are the connector's input). This is how SmolVLM and Idefics3 cut the visual tokens the
//! language model sees by r² while the encoder keeps its resolution. Here the decoder's image span is
//! still set by `sequence.patch_size`; `unshuffle` makes the encoder finer than the decoder rather than
//! the decoder coarser than the encoder, so the sequence format, positions, masks and token reduction
//! are unchanged.

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
    /// Pixel-unshuffle factor r: encoder patches are (p/r)², and r × r of their outputs make one
    /// decoder token. 1 (the default) is no unshuffle.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub unshuffle: usize,
}

fn lr_scale() -> f64 {
    0.1
}
fn one() -> usize {
    1
}
fn is_one(r: &usize) -> bool {
    *r == 1
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
        let mut config = ModelConfig::from_shape(
            shape,
            1,
            self.encoder_patch_dim(decoder),
            self.encoder_grid(decoder),
            1,
        );
        config.qk_norm = decoder.qk_norm;
        config.norm_eps = decoder.norm_eps;
        config
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.d_model == 0 || self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return Err(format!(
                "n_heads {} does not divide d_model {}",
                self.n_heads, self.d_model
            ));
        }
        if !(self.d_model / self.n_heads).is_multiple_of(2) {
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
        if self.unshuffle == 0 {
            return Err("unshuffle must be at least 1".into());
        }
        Ok(())
    }

    /// Checks that the decoder's patch side p is a multiple of the unshuffle factor.
    pub fn validate_with(&self, decoder: &ModelConfig) -> std::result::Result<(), String> {
        self.validate_patch_side(patch_side(decoder.patch_dim))
    }

    /// Checks that a patch side of `side` pixels is a multiple of the unshuffle factor.
    pub fn validate_patch_side(&self, side: usize) -> std::result::Result<(), String> {
        if !side.is_multiple_of(self.unshuffle) {
            return Err(format!(
                "unshuffle {} does not divide the patch side {side}",
                self.unshuffle
            ));
        }
        Ok(())
    }

    /// Values per encoder patch: (p/r)² × 3.
    pub fn encoder_patch_dim(&self, decoder: &ModelConfig) -> usize {
        decoder.patch_dim / (self.unshuffle * self.unshuffle)
    }

    /// Encoder patches per image side: the decoder's grid × r.
    pub fn encoder_grid(&self, decoder: &ModelConfig) -> usize {
        decoder.image_grid * self.unshuffle
    }

    /// Encoder tokens per decoder image token, r².
    pub fn tokens_per_image_token(&self) -> usize {
        self.unshuffle * self.unshuffle
    }

    /// Encoder parameters: patch projection and bias, positions, `[CLS]`, blocks, final norm.
    pub fn encoder_parameter_count(&self, decoder: &ModelConfig) -> usize {
        let d = self.d_model;
        let head_dim = d / self.n_heads;
        let qk = if decoder.qk_norm { 2 * head_dim } else { 0 };
        let per_layer = 4 * d * d + qk + 3 * d * self.d_ff + 2 * d;
        let grid = self.encoder_grid(decoder);
        self.encoder_patch_dim(decoder) * d
            + d
            + grid * grid * d
            + d
            + self.n_layers * per_layer
            + d
    }

    /// Connector parameters: r²·d_v → d → d with biases.
    pub fn connector_parameter_count(&self, decoder: &ModelConfig) -> usize {
        let (dv, d) = (
            self.d_model * self.tokens_per_image_token(),
            decoder.d_model,
        );
        dv * d + d + d * d + d
    }
}

/// Side p of a square RGB patch of `patch_dim` = p² × 3 values.
fn patch_side(patch_dim: usize) -> usize {
    ((patch_dim / 3) as f64).sqrt().round() as usize
}

/// Cuts every p × p patch of (b, n, p·p·3) values, laid out (row, column, channel), into its r × r
/// sub-patches of (p/r)² × 3 values in the same layout: (b, n·r², (p/r)²·3), the r² sub-patches of a
/// patch consecutive and in raster order, so that r² consecutive encoder outputs belong to one decoder
/// token.
pub fn unshuffle_patches(patches: &Tensor, r: usize) -> candle_core::Result<Tensor> {
    if r == 1 {
        return Ok(patches.clone());
    }
    let (b, n, patch_dim) = patches.dims3()?;
    let s = patch_side(patch_dim) / r;
    // A patch's values index as (ry, sy, rx, sx, c); sub-patches want (ry, rx) outside (sy, sx, c).
    patches
        .reshape((b * n, r, s, r, s * 3))?
        .permute((0, 1, 3, 2, 4))?
        .contiguous()?
        .reshape((b, n * r * r, s * s * 3))
}

pub(crate) struct VisionEncoder {
    patch_embed: Linear,
    patch_bias: Tensor,
    /// ((grid·r)², d_v).
    positions: Tensor,
    /// Pixel-unshuffle factor r.
    unshuffle: usize,
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
    /// See [`crate::NativeModel::set_stack_projections`].
    pub(crate) fn set_stack_projections(&mut self, on: bool) {
        for block in &mut self.blocks {
            block.set_stack_projections(on);
        }
    }

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
        let grid = vision.encoder_grid(decoder);
        Ok(VisionEncoder {
            patch_embed: Linear::new(
                randn(&v, (dv, block_config.patch_dim), "patch_embed.weight", 0.02)?,
                None,
            ),
            patch_bias: v.get_with_hints(dv, "patch_embed.bias", Init::Const(0.0))?,
            positions: randn(&v, (grid * grid, dv), "positions", 0.02)?,
            unshuffle: vision.unshuffle,
            cls: randn(&v, (1, dv), "cls", 0.02)?,
            blocks: (0..vision.n_layers)
                .map(|i| crate::model::Block::new(&block_config, v.pp("layers").pp(i)))
                .collect::<candle_core::Result<_>>()?,
            norm: v.get_with_hints(dv, "norm.weight", Init::Const(1.0))?,
            connector_in: Linear::new(
                randn(
                    &c,
                    (d, dv * vision.tokens_per_image_token()),
                    "fc1.weight",
                    0.02,
                )?,
                None,
            ),
            connector_in_bias: c.get_with_hints(d, "fc1.bias", Init::Const(0.0))?,
            connector_out: Linear::new(randn(&c, (d, d), "fc2.weight", 0.02)?, None),
            connector_out_bias: c.get_with_hints(d, "fc2.bias", Init::Const(0.0))?,
            block_config,
        })
    }

    /// Patches (b, n, patch_dim) → decoder-width image tokens (b, n, d).
    pub(crate) fn forward(&self, patches: &Tensor, device: &Device) -> candle_core::Result<Tensor> {
        let (b, n_out, _) = patches.dims3()?;
        let r2 = self.unshuffle * self.unshuffle;
        let n = n_out * r2;
        let dv = self.block_config.d_model;
        let x = self
            .patch_embed
            .forward(&unshuffle_patches(patches, self.unshuffle)?)?
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
                    crate::model::Mask::Dense(&bias),
                    &self.block_config,
                    None,
                    (&valid, &key_bias),
                    &is_image,
                    None,
                )?
                .hidden;
        }
        // Space-to-depth: the r² outputs of one decoder patch are consecutive, so a reshape
        // concatenates them.
        let patches_out = rms_norm(&x, &self.norm, self.block_config.norm_eps)?
            .narrow(1, 1, n)?
            .reshape((b, n_out, r2 * dv))?;
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
