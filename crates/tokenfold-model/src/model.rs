//! The early-fusion native multimodal model: one decoder for image patches and text.
//!
//! - Image patches (p × p × 3 values) enter through one linear layer (`patch_embed`), plus a learned 2-D
//!   position (`image_pos.row[r] + image_pos.col[c]`); text tokens through `embed_tokens`.
//! - Every token also has a 1-D position id used by RoPE in attention: its index in the original sequence.
//! - Attention is bidirectional among the tokens of one image and causal everywhere else. Pre-norm
//!   RMSNorm, QK-norm (RMSNorm per head on queries and keys), SwiGLU MLP, tied embeddings by default.
//!
//! The forward pass runs over a [`SeqState`]: hidden states plus, per token, its original position, whether
//! it is an image token and whether it is valid. The attention mask is built from that metadata, never from
//! indices, so a [`LayerHook`] may drop, merge or re-weight tokens between layers (keeping each kept token's
//! original position) and add a per-key bias (log token sizes after merging). Hooks can ask for the queries
//! and keys of the layer just run, from which one query row q·Kᵀ is computed without the full attention
//! matrix.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{D, DType, Device, IndexOp, Module, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, Linear, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenfold_data::Batch;

use crate::awake::Awake;
use crate::config::ModelConfig;
use crate::kernels::{HeadPart, add_rms_norm, split_heads, swiglu_halves};
use crate::moe::{LayerRouting, Moe};
use crate::ops::{
    MASKED, apply_rope, attention, cross_entropy_rows, rms_norm, rope_tables, swiglu,
};
use crate::panels::PackedWeight;
use crate::vision::VisionEncoder;

/// Token ids, patches and layout of a batch, on a device.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// (b, t) u32.
    pub tokens: Tensor,
    /// (b, n_patches, patch_dim) f32; zeros for samples without an image.
    pub patches: Tensor,
    pub image_starts: Vec<Option<usize>>,
    pub lengths: Vec<usize>,
}

impl Inputs {
    pub fn from_batch(batch: &Batch, device: &Device) -> Result<Inputs> {
        Ok(Inputs {
            tokens: Tensor::from_slice(&batch.tokens, (batch.batch_size, batch.seq_len), device)?,
            patches: Tensor::from_slice(
                &batch.patches,
                (batch.batch_size, batch.n_patches, batch.patch_dim),
                device,
            )?,
            image_starts: batch.image_starts.clone(),
            lengths: batch.lengths.clone(),
        })
    }
}

/// The running sequence between layers.
#[derive(Debug, Clone)]
pub struct SeqState {
    /// (b, t, d).
    pub hidden: Tensor,
    /// Original position of each token, row-major (b × t).
    pub positions: Vec<u32>,
    /// Whether each token is an image patch.
    pub is_image: Vec<bool>,
    /// Whether each token is real (false for padding and removed tokens).
    pub valid: Vec<bool>,
    /// Additive per-key attention bias (b, t), e.g. log token sizes after merging.
    pub key_bias: Option<Tensor>,
    /// Queries and keys (b, h, t, hd) of the layer just run, when the hook asked for them.
    pub captured: Option<(Tensor, Tensor)>,
    /// Keys (b, h, t, hd) that the next layer would compute from these rows, when a hook already has
    /// them (a reduction stage that ranked tokens by that layer's keys and kept rows unchanged): the
    /// layer then projects only its queries and values. Taken by the next layer of a forward pass. The
    /// layer checks their shape, dtype and device only: they must be the bits it would compute (see
    /// [`NativeModel::reuses_keys_of`]).
    pub known_keys: Option<Tensor>,
    /// Sum of the mixture-of-experts layers' auxiliary losses (weighted), when there are any.
    pub aux_loss: Option<Tensor>,
    /// Per mixture-of-experts layer, the tokens each expert received.
    pub routing: Vec<LayerRouting>,
}

impl SeqState {
    pub fn batch(&self) -> usize {
        self.hidden.dim(0).unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.hidden.dim(1).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An error naming the first per-token field whose length is not the hidden states' b × t (a hook
    /// that changed one without the others).
    pub fn check(&self) -> Result<()> {
        let rows = self.batch() * self.len();
        let key_bias = self.key_bias.as_ref().map_or(rows, Tensor::elem_count);
        for (field, len) in [
            ("positions", self.positions.len()),
            ("is_image", self.is_image.len()),
            ("valid", self.valid.len()),
            ("key_bias", key_bias),
        ] {
            if len != rows {
                candle_core::bail!(
                    "sequence state: {field} holds {len} entries for hidden states of {} × {} rows",
                    self.batch(),
                    self.len()
                );
            }
        }
        Ok(())
    }

    /// The additive attention bias (b, 1, t, t): 0 where query i may see key j — j is valid and either
    /// not after i or both are image tokens — and [`MASKED`] elsewhere; plus the per-key bias.
    pub fn attention_bias(&self) -> Result<Tensor> {
        let (b, t) = (self.batch(), self.len());
        let mut bias = vec![MASKED; b * t * t];
        for s in 0..b {
            let row = s * t;
            for i in 0..t {
                for j in 0..t {
                    let visible = self.valid[row + j]
                        && (self.positions[row + j] <= self.positions[row + i]
                            || (self.is_image[row + i] && self.is_image[row + j]));
                    if visible {
                        bias[(row + i) * t + j] = 0.0;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(bias, (b, 1, t, t), self.hidden.device())?;
        match &self.key_bias {
            Some(key_bias) => mask.broadcast_add(&key_bias.reshape((b, 1, 1, t))?),
            None => Ok(mask),
        }
    }
}

/// Called before each layer; may change the set of tokens.
pub trait LayerHook {
    /// Returns whether it changed the tokens (their number, metadata or key bias), so that the forward
    /// pass rebuilds the attention mask.
    fn before_layer(&mut self, _layer: usize, _state: &mut SeqState) -> Result<bool> {
        Ok(false)
    }
    /// Whether the forward pass should store the queries and keys of `layer` in [`SeqState::captured`].
    fn capture(&self, _layer: usize) -> bool {
        false
    }
    /// Whether [`Self::before_layer`] at `layer` may read or change [`SeqState::hidden`]. When it says
    /// no, an inference forward pass that packs its rows (see [`NativeModel::forward`]) may leave
    /// `hidden` out of date during that call instead of unpacking it, and any change the hook makes to
    /// it is lost; the metadata is always current, and so is `hidden` before layer 0.
    fn reads_hidden(&self, _layer: usize) -> bool {
        true
    }
}

/// The plain forward pass.
pub struct NoHook;
impl LayerHook for NoHook {
    fn reads_hidden(&self, _layer: usize) -> bool {
        false
    }
}

/// Whether new models pack the rows of their inference passes (unless `TOKENFOLD_PACKED` is `0`).
fn packing_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("TOKENFOLD_PACKED").map_or(true, |v| v != "0"))
}

/// A padded batch's valid rows laid end to end, which an inference forward pass computes instead of the
/// padded (b, t) grid: after token reduction, samples keep different numbers of tokens, and padding them
/// to the longest would compute rows that are thrown away.
pub(crate) struct Packing {
    b: usize,
    t: usize,
    /// The padded index (s·t + j) of each packed row, sample by sample: (rows,) u32.
    rows: Tensor,
    /// Per padded index, its packed row, or `rows` (a zero row appended when unpacking) for padding:
    /// (b·t,) u32.
    unpack: Tensor,
    segments: crate::kernels::Segments,
    /// Rotary tables (1, 1, rows, hd/2) at the packed rows' positions.
    rope: (Tensor, Tensor),
    /// Per packed row, whether it is an image token.
    is_image: Vec<bool>,
}

impl Packing {
    /// The packing of `state`'s valid rows, with each sample's attention bias as [`SeqState::attention_bias`]
    /// would give it.
    fn new(model: &NativeModel, state: &SeqState) -> Result<Packing> {
        let (b, t) = (state.batch(), state.len());
        let key_bias: Option<Vec<f32>> = state
            .key_bias
            .as_ref()
            .map(|kb| kb.flatten_all()?.to_dtype(DType::F32)?.to_vec1())
            .transpose()?;
        let mut rows = Vec::new();
        let mut unpack = Vec::with_capacity(b * t);
        let mut segments = crate::kernels::Segments::default();
        for s in 0..b {
            let mine: Vec<usize> = (s * t..(s + 1) * t).filter(|&r| state.valid[r]).collect();
            segments.spans.push((rows.len(), mine.len()));
            for &i in &mine {
                for &j in &mine {
                    let visible = state.positions[j] <= state.positions[i]
                        || (state.is_image[i] && state.is_image[j]);
                    let extra = key_bias.as_ref().map_or(0.0, |kb| kb[j]);
                    segments.bias.push(if visible { extra } else { MASKED });
                }
            }
            rows.extend(mine.iter().map(|&r| r as u32));
        }
        let n = rows.len();
        let mut packed_at = vec![n as u32; b * t];
        for (p, &r) in rows.iter().enumerate() {
            packed_at[r as usize] = p as u32;
        }
        unpack.extend(packed_at);
        let positions: Vec<u32> = rows.iter().map(|&r| state.positions[r as usize]).collect();
        let is_image = rows.iter().map(|&r| state.is_image[r as usize]).collect();
        let device = state.hidden.device();
        Ok(Packing {
            b,
            t,
            rope: model.rope_for(&positions, 1, n)?,
            rows: Tensor::from_vec(rows, n, device)?,
            unpack: Tensor::from_vec(unpack, b * t, device)?,
            segments,
            is_image,
        })
    }

    fn len(&self) -> usize {
        self.is_image.len()
    }

    /// Padded hidden states (b, t, d) to packed (1, rows, d).
    fn pack(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        if (b, t) != (self.b, self.t) {
            candle_core::bail!(
                "hidden states of {b} × {t} rows where the packed layout has {} × {}: a hook changed \
                 the tokens without reporting it",
                self.b,
                self.t
            );
        }
        hidden
            .reshape((self.b * self.t, d))?
            .index_select(&self.rows, 0)?
            .reshape((1, self.len(), d))
    }

    /// Packed (1, rows, d) back to padded (b, t, d), padding rows zero.
    fn unpack(&self, packed: &Tensor) -> Result<Tensor> {
        let d = packed.dim(2)?;
        let zero = Tensor::zeros((1, 1, d), packed.dtype(), packed.device())?;
        Tensor::cat(&[packed, &zero], 1)?
            .index_select(&self.unpack, 1)?
            .reshape((self.b, self.t, d))
    }

    /// Padded heads (b, h, t, hd) to packed (1, h, rows, hd).
    fn pack_heads(&self, heads: &Tensor) -> Result<Tensor> {
        let (b, h, t, hd) = heads.dims4()?;
        if (b, t) != (self.b, self.t) {
            candle_core::bail!(
                "heads of {b} × {t} rows where the packed layout has {} × {}",
                self.b,
                self.t
            );
        }
        heads
            .transpose(0, 1)?
            .reshape((h, b * t, hd))?
            .index_select(&self.rows, 1)?
            .unsqueeze(0)
    }

    /// Packed heads (1, h, rows, hd) back to padded (b, h, t, hd), padding rows zero.
    fn unpack_heads(&self, packed: &Tensor) -> Result<Tensor> {
        let (_, h, _, hd) = packed.dims4()?;
        let zero = Tensor::zeros((1, h, 1, hd), packed.dtype(), packed.device())?;
        Tensor::cat(&[packed, &zero], 2)?
            .index_select(&self.unpack, 2)?
            .reshape((h, self.b, self.t, hd))?
            .transpose(0, 1)?
            .contiguous()
    }
}

/// How the layers of a forward pass lay out their rows until the tokens change.
enum Layout {
    /// The padded (b, t) grid, with its rotary tables and dense mask (b, 1, t, t).
    Dense {
        rope: (Tensor, Tensor),
        bias: Tensor,
    },
    Packed(Packing),
}

/// How a layer's rows attend: a dense additive bias over a padded batch, or a packed batch's samples.
pub(crate) enum Mask<'a> {
    /// (b, 1 or h, tq, tk), or anything that broadcasts to it.
    Dense(&'a Tensor),
    Packed(&'a Packing),
}

/// Keys and values of one layer for generation, with which cached keys are valid, per sample.
#[derive(Debug, Clone)]
pub struct LayerCache {
    /// (b, h, T, hd).
    pub k: Tensor,
    pub v: Tensor,
    /// (b × T).
    pub valid: Vec<bool>,
    /// Additive per-key attention bias (b × T): log token sizes after merging, 0 otherwise.
    pub key_bias: Vec<f32>,
}

/// The KV cache: one entry per layer (layers may hold different numbers of tokens after a reduction) and
/// the position each sample writes next.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub layers: Vec<Option<LayerCache>>,
    pub next_positions: Vec<u32>,
}

/// One standard normal draw by Box–Muller from two uniforms in (0, 1]: seeded initialisation, and
/// seeded random inputs in tests (candle's CPU generator cannot be seeded).
pub fn standard_normal(rng: &mut impl Rng) -> f64 {
    let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Creates each parameter in a [`VarMap`] from a seeded random stream, in construction order: candle's
/// own CPU initialisation cannot be seeded, and resumable, comparable runs need a reproducible start.
struct SeededInit {
    varmap: VarMap,
    rng: Mutex<ChaCha8Rng>,
}

impl SimpleBackend for SeededInit {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let mut vars = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned variable map".into()))?;
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!(
                    "parameter {name} exists with shape {:?}, asked for {shape:?}",
                    var.shape()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let n = shape.elem_count();
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned rng".into()))?;
        let values: Vec<f32> = match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| (mean + stdev * standard_normal(&mut *rng)) as f32)
                .collect(),
            Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
            other => candle_core::bail!("initialisation {other:?} of {name} is not supported"),
        };
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _device: &Device) -> Result<Tensor> {
        candle_core::bail!("parameter {name} must be created with a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|v| v.contains_key(name))
            .unwrap_or(false)
    }
}

struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    /// Once prepared for inference: the q, k and v weights side by side, (d, 3d), so that a layer
    /// projects and splits its heads in one matmul and one copy instead of three of each.
    qkv_transposed: Option<PackedWeight>,
}

/// A layer's feed-forward part: one SwiGLU MLP, or a mixture of experts.
enum Ffn {
    Dense {
        gate_proj: Proj,
        up_proj: Proj,
        down_proj: Proj,
        /// Once prepared for inference: the gate and up weights side by side, (d, 2·d_ff), so that an
        /// inference pass computes both in one matmul.
        gate_up_transposed: Option<PackedWeight>,
    },
    Experts(Moe),
}

pub(crate) struct Block {
    attn_norm: Tensor,
    attn: Attention,
    mlp_norm: Tensor,
    ffn: Ffn,
    /// Whether projections of one input are stacked into one matmul where the inference path does not
    /// apply (it needs weights prepared for inference and no tensor tracking gradients): q, k and v in
    /// passes without a cache ([`Block::stacked_heads`]), gate and up in any pass. On unless turned off
    /// for comparison ([`NativeModel::set_stack_projections`]).
    stack_projections: bool,
}

/// What one layer hands back: the new hidden state, its queries and keys, and for MoE layers the
/// auxiliary loss and routing.
pub(crate) struct LayerOutput {
    pub(crate) hidden: Tensor,
    q: Tensor,
    k: Tensor,
    aux_loss: Option<Tensor>,
    routing: Option<LayerRouting>,
}

fn linear(
    vb: &VarBuilder,
    in_dim: usize,
    out_dim: usize,
    stdev: f64,
    name: &str,
) -> Result<Linear> {
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        &format!("{name}.weight"),
        Init::Randn { mean: 0.0, stdev },
    )?;
    Ok(Linear::new(weight, None))
}

/// A bias-free projection of a layer. For inference it can hold its weight a second time, transposed to
/// (in, out), contiguous and packed in column panels ([`PackedWeight`]): gemm repacks a row-major
/// (out, in) weight on every call, which for the few rows of a reduced or batch-1 prefill costs more
/// than the multiplication, and the panels serve products of few rows faster than gemm does.
struct Proj {
    linear: Linear,
    transposed: Option<PackedWeight>,
}

impl Proj {
    fn new(linear: Linear) -> Proj {
        Proj {
            linear,
            transposed: None,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.transposed {
            Some(w) => {
                let (b, t, i) = x.dims3()?;
                w.matmul(&x.reshape((b * t, i))?)?.reshape((b, t, ()))
            }
            None => self.linear.forward(x),
        }
    }

    /// Stores the transposed weight, detached: valid until the weight changes.
    fn prepare_inference(&mut self) -> Result<()> {
        self.transposed = Some(PackedWeight::new(&self.linear.weight().t()?)?);
        Ok(())
    }
}

/// `normed` (b, t, d) through several projections at once: one matmul with their weights side by side,
/// giving (b · t, the sum of their outputs), each projection's columns after the previous one's. Gradients
/// reach every weight through the concatenation.
fn project_stacked(normed: &Tensor, projections: &[&Proj]) -> Result<Tensor> {
    let (b, t, d) = normed.dims3()?;
    let weights: Vec<&Tensor> = projections.iter().map(|p| p.linear.weight()).collect();
    normed
        .reshape((b * t, d))?
        .matmul(&Tensor::cat(&weights, 0)?.t()?)
}

/// Whether `x` may take the inference-only kernels (those without a backward pass): it tracks no
/// gradient, and the fused kernels run on it.
fn inference_kernels(x: &Tensor) -> bool {
    crate::kernels::fused_enabled()
        && !x.track_op()
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Heads (b, h, t, hd) QK-normed by `norm` and rotated by `rope` where given.
fn norm_and_rotate(
    mut x: Tensor,
    norm: Option<&Tensor>,
    rope: Option<(&Tensor, &Tensor)>,
    cfg: &ModelConfig,
) -> Result<Tensor> {
    if let Some(norm) = norm {
        x = rms_norm(&x, norm, cfg.norm_eps)?;
    }
    match rope {
        Some((cos, sin)) => apply_rope(&x, cos, sin),
        None => Ok(x),
    }
}

/// The parts of a layer's stacked q, k and v projection that it computes when given its keys.
const QUERIES_AND_VALUES: [bool; 3] = [true, false, true];

fn ones(vb: &VarBuilder, dim: usize, name: &str) -> Result<Tensor> {
    vb.get_with_hints(dim, name, Init::Const(1.0))
}

impl Block {
    pub(crate) fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Block> {
        let d = cfg.d_model;
        let std = 0.02;
        // Residual-branch outputs start smaller with depth (GPT-2's 1/√(2L)), keeping the residual stream stable.
        let out_std = std / (2.0 * cfg.n_layers as f64).sqrt();
        let attn_vb = vb.pp("attn");
        Ok(Block {
            attn_norm: ones(&vb, d, "attn_norm.weight")?,
            attn: Attention {
                q_proj: Proj::new(linear(&attn_vb, d, d, std, "q_proj")?),
                k_proj: Proj::new(linear(&attn_vb, d, d, std, "k_proj")?),
                v_proj: Proj::new(linear(&attn_vb, d, d, std, "v_proj")?),
                o_proj: Proj::new(linear(&attn_vb, d, d, out_std, "o_proj")?),
                q_norm: cfg
                    .qk_norm
                    .then(|| ones(&attn_vb, cfg.head_dim(), "q_norm.weight"))
                    .transpose()?,
                k_norm: cfg
                    .qk_norm
                    .then(|| ones(&attn_vb, cfg.head_dim(), "k_norm.weight"))
                    .transpose()?,
                qkv_transposed: None,
            },
            mlp_norm: ones(&vb, d, "mlp_norm.weight")?,
            ffn: match &cfg.moe {
                None => Ffn::Dense {
                    gate_proj: Proj::new(linear(&vb.pp("mlp"), d, cfg.d_ff, std, "gate_proj")?),
                    up_proj: Proj::new(linear(&vb.pp("mlp"), d, cfg.d_ff, std, "up_proj")?),
                    down_proj: Proj::new(linear(&vb.pp("mlp"), cfg.d_ff, d, out_std, "down_proj")?),
                    gate_up_transposed: None,
                },
                Some(moe) => Ffn::Experts(Moe::new(
                    moe,
                    d,
                    cfg.d_ff,
                    |vb, i, o, output, name| {
                        linear(vb, i, o, if output { out_std } else { std }, name)
                    },
                    &vb.pp("moe"),
                )?),
            },
            stack_projections: true,
        })
    }

    pub(crate) fn set_stack_projections(&mut self, on: bool) {
        self.stack_projections = on;
    }

    fn prepare_inference(&mut self) -> Result<()> {
        // Values only ever come from the side-by-side q/k/v weights below; queries and keys also come
        // alone, for reduction signals.
        for proj in [
            &mut self.attn.q_proj,
            &mut self.attn.k_proj,
            &mut self.attn.o_proj,
        ] {
            proj.prepare_inference()?;
        }
        let attn = &mut self.attn;
        let weights =
            [&attn.q_proj, &attn.k_proj, &attn.v_proj].map(|p| p.linear.weight().detach());
        attn.qkv_transposed = Some(PackedWeight::new(&Tensor::cat(&weights, 0)?.t()?)?);
        if let Ffn::Dense {
            gate_proj,
            up_proj,
            down_proj,
            gate_up_transposed,
        } = &mut self.ffn
        {
            // Gate and up are only ever read side by side: on their own they run only where gradients
            // flow or the plain ops are asked for, where no prepared weight is used.
            let weights = [&*gate_proj, &*up_proj].map(|p| p.linear.weight().detach());
            *gate_up_transposed = Some(PackedWeight::new(&Tensor::cat(&weights, 0)?.t()?)?);
            down_proj.prepare_inference()?;
        }
        Ok(())
    }

    /// Queries and keys (b, h, t, hd) of this layer for input `x` (normed, projected, QK-normed, rotated),
    /// and the values when `with_values`. `known_keys`, the keys of these rows computed before, are
    /// taken as they are where the fused inference projection runs (it then projects queries and values
    /// only, or, with heads of a size that is not a multiple of 16, all three and drops its keys), and
    /// computed again elsewhere.
    fn queries_keys(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        cfg: &ModelConfig,
        with_values: bool,
        known_keys: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let normed = rms_norm(x, &self.attn_norm, cfg.norm_eps)?;
        if let (Some(w), true) = (&self.attn.qkv_transposed, with_values) {
            let (b, t, d) = normed.dims3()?;
            let (h, hd) = (cfg.n_heads, cfg.head_dim());
            let attn = &self.attn;
            if inference_kernels(&normed) {
                let parts = [
                    HeadPart {
                        norm: attn.q_norm.as_ref(),
                        rotate: true,
                    },
                    HeadPart {
                        norm: attn.k_norm.as_ref(),
                        rotate: true,
                    },
                    HeadPart {
                        norm: None,
                        rotate: false,
                    },
                ];
                if let Some(k) = known_keys {
                    if k.dims() != [b, h, t, hd]
                        || k.dtype() != normed.dtype()
                        || !k.device().same_device(normed.device())
                    {
                        candle_core::bail!(
                            "known keys of shape {:?} ({:?}) for a layer of ({b}, {h}, {t}, {hd}) ({:?})",
                            k.dims(),
                            k.dtype(),
                            normed.dtype()
                        );
                    }
                    let [q, v]: [Tensor; 2] = w
                        .matmul_heads_of(
                            &normed,
                            h,
                            &parts,
                            &QUERIES_AND_VALUES,
                            rope,
                            cfg.norm_eps,
                        )?
                        .try_into()
                        .expect("two parts");
                    return Ok((q, k.clone(), Some(v)));
                }
                let [q, k, v]: [Tensor; 3] = w
                    .matmul_heads(&normed, h, &parts, rope, cfg.norm_eps)?
                    .try_into()
                    .expect("three parts");
                return Ok((q, k, Some(v)));
            }
            // (b·t, 3d) → (3, b, h, t, hd) in one copy; q, k and v are then contiguous slices of it.
            let qkv = w
                .matmul(&normed.reshape((b * t, d))?)?
                .reshape((b, t, 3, h, hd))?
                .permute((2, 0, 3, 1, 4))?
                .contiguous()?;
            return Ok((
                norm_and_rotate(qkv.i(0)?, attn.q_norm.as_ref(), Some(rope), cfg)?,
                norm_and_rotate(qkv.i(1)?, attn.k_norm.as_ref(), Some(rope), cfg)?,
                Some(qkv.i(2)?),
            ));
        }
        let v = with_values
            .then(|| self.heads(&normed, &self.attn.v_proj, None, None, cfg))
            .transpose()?;
        Ok((
            self.queries(&normed, rope, cfg)?,
            self.keys(&normed, rope, cfg)?,
            v,
        ))
    }

    /// Queries, keys and values of this layer for input `x`, stacked as (3, b, h, t, hd) for
    /// [`crate::kernels::attention_qkv`]: one matmul with the three weights side by side, then
    /// [`crate::kernels::qkv_heads`] for the QK-norm, rotation and head layout. Gradients reach every
    /// weight, as through the separate projections.
    fn stacked_heads(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        cfg: &ModelConfig,
    ) -> Result<Tensor> {
        let normed = rms_norm(x, &self.attn_norm, cfg.norm_eps)?;
        let (b, t, _) = normed.dims3()?;
        let attn = &self.attn;
        let qkv = project_stacked(&normed, &[&attn.q_proj, &attn.k_proj, &attn.v_proj])?
            .reshape((b, t, ()))?;
        let norms = match (&attn.q_norm, &attn.k_norm) {
            (Some(q), Some(k)) => Some(Tensor::stack(&[q, k], 0)?),
            _ => None,
        };
        crate::kernels::qkv_heads(&qkv, norms.as_ref(), cfg.n_heads, rope, cfg.norm_eps)
    }

    /// Queries (b, h, t, hd) of the normed input `normed` (b, t, d), QK-normed and rotated.
    fn queries(
        &self,
        normed: &Tensor,
        rope: (&Tensor, &Tensor),
        cfg: &ModelConfig,
    ) -> Result<Tensor> {
        let attn = &self.attn;
        self.heads(normed, &attn.q_proj, attn.q_norm.as_ref(), Some(rope), cfg)
    }

    /// Keys (b, h, t, hd) of the normed input `normed` (b, t, d), QK-normed and rotated.
    fn keys(&self, normed: &Tensor, rope: (&Tensor, &Tensor), cfg: &ModelConfig) -> Result<Tensor> {
        let attn = &self.attn;
        self.heads(normed, &attn.k_proj, attn.k_norm.as_ref(), Some(rope), cfg)
    }

    /// One projection of the normed input `normed` (b, t, d) split into heads (b, h, t, hd), then
    /// [`norm_and_rotate`]d.
    fn heads(
        &self,
        normed: &Tensor,
        proj: &Proj,
        norm: Option<&Tensor>,
        rope: Option<(&Tensor, &Tensor)>,
        cfg: &ModelConfig,
    ) -> Result<Tensor> {
        let (b, t, _) = normed.dims3()?;
        let (h, hd) = (cfg.n_heads, cfg.head_dim());
        let parts = [HeadPart { norm, rotate: true }];
        let one_part = |heads: Vec<Tensor>| {
            heads
                .into_iter()
                .next()
                .ok_or_else(|| candle_core::Error::Msg("split heads gave no part".into()))
        };
        // A prepared weight is detached: the product tracks no gradient where its input tracks none.
        if let (Some(w), Some(rope)) = (&proj.transposed, rope)
            && inference_kernels(normed)
        {
            return one_part(w.matmul_heads(normed, h, &parts, rope, cfg.norm_eps)?);
        }
        let projected = proj.forward(normed)?;
        if inference_kernels(&projected)
            && let Some(rope) = rope
        {
            return one_part(split_heads(&projected, h, &parts, rope, cfg.norm_eps)?);
        }
        let x = projected
            .reshape((b, t, h, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        norm_and_rotate(x, norm, rope, cfg)
    }

    /// One layer. `cache`, when given, receives this call's keys and values (and their validity and key
    /// bias, per padded row) appended to what it holds; a dense `mask` must then cover the cached keys
    /// followed by the new ones. With a packed `mask`, `x` holds the packed rows (1, rows, d), the cache
    /// must be empty and receives them padded again, and `is_image` is per packed row.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        mask: Mask,
        cfg: &ModelConfig,
        cache: Option<&mut Option<LayerCache>>,
        new_keys: (&[bool], &[f32]),
        is_image: &[bool],
        known_keys: Option<&Tensor>,
    ) -> Result<LayerOutput> {
        let (b, t, d) = x.dims3()?;
        // A pass without a cache over a dense mask (training, evaluation, scoring): q, k and v stay
        // stacked from their projection through attention, and so do their gradients.
        if let (Mask::Dense(bias), None) = (&mask, &cache)
            && self.stack_projections
            && self.attn.qkv_transposed.is_none()
            && crate::kernels::attention_supported(x, bias)
        {
            let heads = self.stacked_heads(x, rope, cfg)?;
            let scale = 1.0 / (cfg.head_dim() as f64).sqrt();
            let attended = crate::kernels::attention_qkv(&heads, bias, scale)?
                .transpose(1, 2)?
                .reshape((b, t, d))?;
            let (q, k) = (heads.i(0)?, heads.i(1)?);
            return self.finish(x, &attended, q, k, cfg, (new_keys.0, is_image));
        }
        let (q, k, v) = self.queries_keys(x, rope, cfg, true, known_keys)?;
        let v = v.ok_or_else(|| candle_core::Error::Msg("values were not computed".into()))?;
        let (new_valid, new_bias) = new_keys;
        let bias = match mask {
            Mask::Dense(bias) => bias,
            Mask::Packed(packing) => {
                if let Some(slot) = cache {
                    if slot.is_some() {
                        candle_core::bail!(
                            "a packed layer can only start a KV cache, not extend one"
                        );
                    }
                    *slot = Some(LayerCache {
                        k: packing.unpack_heads(&k)?,
                        v: packing.unpack_heads(&v)?,
                        valid: new_valid.to_vec(),
                        key_bias: new_bias.to_vec(),
                    });
                }
                let scale = 1.0 / (cfg.head_dim() as f64).sqrt();
                let attended =
                    crate::kernels::segment_attention(&q, &k, &v, &packing.segments, scale)?;
                let all_valid = vec![true; t];
                return self.finish(x, &attended, q, k, cfg, (&all_valid, is_image));
            }
        };
        let (k_all, v_all) = match cache {
            Some(slot) => {
                let (k_all, v_all, valid, key_bias) = match slot.take() {
                    Some(prev) => {
                        let t_prev = prev.k.dim(2)?;
                        let mut valid = Vec::with_capacity(b * (t_prev + t));
                        let mut key_bias = Vec::with_capacity(b * (t_prev + t));
                        for s in 0..b {
                            valid.extend_from_slice(&prev.valid[s * t_prev..(s + 1) * t_prev]);
                            valid.extend_from_slice(&new_valid[s * t..(s + 1) * t]);
                            key_bias
                                .extend_from_slice(&prev.key_bias[s * t_prev..(s + 1) * t_prev]);
                            key_bias.extend_from_slice(&new_bias[s * t..(s + 1) * t]);
                        }
                        (
                            Tensor::cat(&[&prev.k, &k], 2)?,
                            Tensor::cat(&[&prev.v, &v], 2)?,
                            valid,
                            key_bias,
                        )
                    }
                    None => (k.clone(), v.clone(), new_valid.to_vec(), new_bias.to_vec()),
                };
                *slot = Some(LayerCache {
                    k: k_all.clone(),
                    v: v_all.clone(),
                    valid,
                    key_bias,
                });
                (k_all, v_all)
            }
            None => (k.clone(), v),
        };
        let attended = attention(&q, &k_all, &v_all, bias)?
            .transpose(1, 2)?
            .reshape((b, t, d))?;
        self.finish(x, &attended, q, k, cfg, (new_valid, is_image))
    }

    /// The rest of a layer after attention: output projection, residual, and the feed-forward part, with
    /// the validity and modality of `x`'s rows.
    fn finish(
        &self,
        x: &Tensor,
        attended: &Tensor,
        q: Tensor,
        k: Tensor,
        cfg: &ModelConfig,
        (new_valid, is_image): (&[bool], &[bool]),
    ) -> Result<LayerOutput> {
        let projected = self.attn.o_proj.forward(attended)?;
        let (x, normed) =
            if inference_kernels(&projected) && inference_kernels(x) && !self.mlp_norm.track_op() {
                add_rms_norm(x, &projected, &self.mlp_norm, cfg.norm_eps)?
            } else {
                let x = (x + projected)?;
                let normed = rms_norm(&x, &self.mlp_norm, cfg.norm_eps)?;
                (x, normed)
            };
        let (hidden, aux_loss, routing) = match &self.ffn {
            Ffn::Dense {
                gate_proj,
                up_proj,
                down_proj,
                gate_up_transposed,
            } => match (gate_up_transposed, &down_proj.transposed) {
                (Some(gate_up), Some(down)) if inference_kernels(&normed) => {
                    let (b, t, d) = normed.dims3()?;
                    let activated = gate_up.matmul_swiglu(&normed.reshape((b * t, d))?)?;
                    let hidden = down.matmul_add(&x, &activated.reshape((b, t, ()))?)?;
                    (hidden, None, None)
                }
                _ if self.stack_projections
                    && crate::kernels::elementwise_supported(&normed, &[]) =>
                {
                    let (b, t, _) = normed.dims3()?;
                    let gate_up = project_stacked(&normed, &[gate_proj, up_proj])?;
                    let activated = swiglu_halves(&gate_up)?.reshape((b, t, ()))?;
                    ((x + down_proj.forward(&activated)?)?, None, None)
                }
                _ => {
                    let activated =
                        swiglu(&gate_proj.forward(&normed)?, &up_proj.forward(&normed)?)?;
                    ((x + down_proj.forward(&activated)?)?, None, None)
                }
            },
            Ffn::Experts(moe) => {
                let out = moe.forward(&normed, is_image, new_valid)?;
                ((x + out.output)?, out.aux_loss, Some(out.routing))
            }
        };
        Ok(LayerOutput {
            hidden,
            q,
            k,
            aux_loss,
            routing,
        })
    }
}

/// Teacher-forced losses of a batch, with what the mixture-of-experts layers of the same pass report.
pub struct SampleLosses {
    /// Per-sample mean NLL over its target tokens (b,).
    pub per_sample: Tensor,
    /// Target tokens per sample.
    pub counts: Vec<usize>,
    /// The weighted auxiliary losses (None for a dense model).
    pub aux_loss: Option<Tensor>,
    /// Per mixture-of-experts layer, the tokens each expert received.
    pub routing: Vec<LayerRouting>,
}

/// How image patches become decoder tokens.
enum ImageInput {
    /// Early fusion: one linear layer plus 2-D position embeddings (row and column, each (grid, d)).
    Linear {
        patch_embed: Linear,
        patch_bias: Tensor,
        image_row: Tensor,
        image_col: Tensor,
        /// Once prepared for inference: the weight transposed to (patch_dim, d), and the bias plus the 2-D
        /// positions, (grid², d), which the embedding then adds in one operation.
        prepared: Option<(PackedWeight, Tensor)>,
    },
    /// Late fusion: a ViT encoder and connector.
    Encoder(Box<VisionEncoder>),
}

/// An early-fusion native multimodal model.
pub struct NativeModel {
    pub config: ModelConfig,
    pub varmap: VarMap,
    embed_tokens: Tensor,
    image: ImageInput,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    /// The output head transposed to (d, vocab) and contiguous, once prepared for inference.
    head_transposed: Option<PackedWeight>,
    rope_cos: Tensor,
    rope_sin: Tensor,
    device: Device,
    /// A frozen model's weights by name (its `varmap` is empty), so that it can be frozen again.
    frozen_weights: Option<HashMap<String, Tensor>>,
    /// Whether inference passes over padded batches pack their rows (see [`NativeModel::forward`]).
    pack_rows: bool,
    /// See [`NativeModel::set_stack_projections`].
    stack_projections: bool,
}

impl NativeModel {
    /// A freshly initialised model; the same seed gives the same parameters.
    pub fn new(config: ModelConfig, seed: u64, device: &Device) -> crate::Result<NativeModel> {
        config.validate()?;
        let varmap = VarMap::new();
        let backend = SeededInit {
            varmap: varmap.clone(),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
        Ok(Self::build(config, varmap, vb, device)?)
    }

    fn build(
        config: ModelConfig,
        varmap: VarMap,
        vb: VarBuilder,
        device: &Device,
    ) -> Result<NativeModel> {
        let d = config.d_model;
        let embed_tokens = vb.get_with_hints(
            (config.vocab_size, d),
            "embed_tokens.weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let image = match &config.vision {
            None => {
                // Patch embeddings start at the scale of token embeddings (std 0.02 per weight): at the
                // fan-in scale 1/√patch_dim, image tokens entered the residual stream ~50× larger than
                // text tokens, the blocks' small updates barely moved them and the 2-D positions were
                // drowned.
                let position = |name: &str| {
                    vb.get_with_hints(
                        (config.image_grid, d),
                        name,
                        Init::Randn {
                            mean: 0.0,
                            stdev: 0.02,
                        },
                    )
                };
                ImageInput::Linear {
                    patch_embed: linear(&vb, config.patch_dim, d, 0.02, "patch_embed")?,
                    patch_bias: vb.get_with_hints(d, "patch_embed.bias", Init::Const(0.0))?,
                    image_row: position("image_pos.row")?,
                    image_col: position("image_pos.col")?,
                    prepared: None,
                }
            }
            Some(vision) => {
                ImageInput::Encoder(Box::new(VisionEncoder::new(vision, &config, &vb)?))
            }
        };
        let blocks = (0..config.n_layers)
            .map(|i| Block::new(&config, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = ones(&vb, d, "norm.weight")?;
        let lm_head = if config.tie_embeddings {
            None
        } else {
            Some(vb.get_with_hints(
                (config.vocab_size, d),
                "lm_head.weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?)
        };
        let (rope_cos, rope_sin) = rope_tables(
            config.head_dim(),
            config.max_positions,
            config.rope_theta,
            device,
        )?;
        Ok(NativeModel {
            config,
            varmap,
            embed_tokens,
            image,
            blocks,
            norm,
            lm_head,
            head_transposed: None,
            rope_cos,
            rope_sin,
            device: device.clone(),
            frozen_weights: None,
            pack_rows: packing_enabled(),
            stack_projections: true,
        })
    }

    /// A copy whose parameters are plain tensors rather than variables, sharing their storage: gradients
    /// flow through it to its inputs (a search's parameters) without being computed for its own weights,
    /// and a pass with no such inputs builds no gradient graph at all. Its `varmap` is empty.
    pub fn frozen(&self) -> Result<NativeModel> {
        let tensors: HashMap<String, Tensor> = match &self.frozen_weights {
            Some(weights) => weights.clone(),
            None => self
                .varmap
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned variable map".into()))?
                .iter()
                .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
                .collect(),
        };
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &self.device);
        let mut frozen = Self::build(self.config.clone(), VarMap::new(), vb, &self.device)?;
        frozen.frozen_weights = Some(tensors);
        frozen.pack_rows = self.pack_rows;
        frozen.set_stack_projections(self.stack_projections);
        if self.is_prepared_for_inference() {
            frozen.prepare_inference()?;
        }
        Ok(frozen)
    }

    /// Keeps a transposed, contiguous copy of each dense projection (and q, k, v side by side, gate and
    /// up side by side), of the output head and of the patch embedding (with its bias and 2-D positions
    /// summed into one table), each also packed in column panels ([`PackedWeight`]), which the forward
    /// pass then multiplies by directly (see `Proj`): gemm no longer repacks the weights on every call,
    /// which dominated prefills of few tokens, and products of up to 512 rows run over the panels
    /// (docs/performance.md).
    /// The copies are detached and go stale if the weights change: only for a model that is not trained
    /// any further. [`NativeModel::frozen`] keeps the preparation.
    pub fn prepare_inference(&mut self) -> Result<()> {
        for block in &mut self.blocks {
            block.prepare_inference()?;
        }
        if let ImageInput::Linear {
            patch_embed,
            patch_bias,
            image_row,
            image_col,
            prepared,
        } = &mut self.image
        {
            let d = self.config.d_model;
            let pos2d = image_row
                .unsqueeze(1)?
                .broadcast_add(&image_col.unsqueeze(0)?)?
                .reshape(((), d))?;
            *prepared = Some((
                PackedWeight::new(&patch_embed.weight().t()?)?,
                pos2d.broadcast_add(patch_bias)?.detach(),
            ));
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        self.head_transposed = Some(PackedWeight::new(&head.t()?)?);
        Ok(())
    }

    /// Whether [`NativeModel::prepare_inference`] has run.
    pub fn is_prepared_for_inference(&self) -> bool {
        self.head_transposed.is_some()
    }

    /// Loads weights from a safetensors file written by [`NativeModel::save`].
    pub fn load(
        config: ModelConfig,
        weights: &std::path::Path,
        device: &Device,
    ) -> crate::Result<NativeModel> {
        let mut model = Self::new(config, 0, device)?;
        model
            .varmap
            .load(weights)
            .map_err(|e| crate::ModelError::Checkpoint(format!("{}: {e}", weights.display())))?;
        // VarMap::load replaces the values of existing variables in place, so the model's tensors see them.
        model.check_loaded(weights)?;
        Ok(model)
    }

    fn check_loaded(&mut self, weights: &std::path::Path) -> crate::Result<()> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| crate::ModelError::Checkpoint("poisoned variable map".into()))?;
        let expected = self.config.parameter_count();
        let actual: usize = data.values().map(|v| v.elem_count()).sum();
        if actual != expected {
            return Err(crate::ModelError::Checkpoint(format!(
                "{}: holds {actual} parameters where the config gives {expected}",
                weights.display()
            )));
        }
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether inference passes over padded batches pack their rows: on by default for a frozen model
    /// (one loaded for inference, see [`Self::frozen`]), off for a model with variables, or where the
    /// environment sets `TOKENFOLD_PACKED=0` or the fused kernels are off (`TOKENFOLD_PLAIN_OPS`).
    pub fn packs_rows(&self) -> bool {
        self.pack_rows && self.frozen_weights.is_some() && crate::kernels::fused_enabled()
    }

    /// Turns row packing on or off, e.g. to compare the two layouts.
    pub fn set_pack_rows(&mut self, on: bool) {
        self.pack_rows = on;
    }

    /// Whether blocks outside the inference path (training, evaluation during training, a model or
    /// encoder not prepared for inference) stack projections that share an input, on by default: passes
    /// without a KV cache project q, k and v in one matmul and keep them stacked through attention, and
    /// the gate and up projections are one matmul followed by [`swiglu_halves`], gradients stacked alike.
    /// Off, each projection has its own matmul, head split, norm and rotation, as before; for comparison
    /// and debugging.
    pub fn set_stack_projections(&mut self, on: bool) {
        self.stack_projections = on;
        for block in &mut self.blocks {
            block.set_stack_projections(on);
        }
        if let ImageInput::Encoder(encoder) = &mut self.image {
            encoder.set_stack_projections(on);
        }
    }

    pub fn parameter_count(&self) -> usize {
        match &self.frozen_weights {
            Some(weights) => weights.values().map(Tensor::elem_count).sum(),
            None => self.varmap.all_vars().iter().map(|v| v.elem_count()).sum(),
        }
    }

    /// Embeds a batch: patch embeddings at each image span, token embeddings elsewhere.
    pub fn embed(&self, inputs: &Inputs) -> Result<SeqState> {
        let (b, t) = inputs.tokens.dims2()?;
        if let Some(hidden) = self.embed_for_inference(inputs)? {
            return Ok(self.fresh_state(hidden, inputs));
        }
        let tokens = self
            .embed_tokens
            .embedding(&inputs.tokens.flatten_all()?)?
            .reshape((b, t, self.config.d_model))?;
        let grid = self.config.image_grid;
        let n = grid * grid;
        let needs_patches = inputs.image_starts.iter().any(Option::is_some);
        let patches = match (&self.image, needs_patches) {
            (_, false) => None,
            (
                ImageInput::Linear {
                    prepared: Some((weight, offset)),
                    ..
                },
                true,
            ) if inference_kernels(&inputs.patches) => {
                let (b, n, p) = inputs.patches.dims3()?;
                Some(
                    weight
                        .matmul(&inputs.patches.reshape((b * n, p))?)?
                        .reshape((b, n, self.config.d_model))?
                        .broadcast_add(offset)?,
                )
            }
            (
                ImageInput::Linear {
                    patch_embed,
                    patch_bias,
                    image_row,
                    image_col,
                    ..
                },
                true,
            ) => {
                // (grid², d): row r, column c gets row[r] + col[c], raster order.
                let pos2d = image_row
                    .unsqueeze(1)?
                    .broadcast_add(&image_col.unsqueeze(0)?)?
                    .reshape((n, self.config.d_model))?;
                Some(
                    patch_embed
                        .forward(&inputs.patches)?
                        .broadcast_add(patch_bias)?
                        .broadcast_add(&pos2d)?,
                )
            }
            (ImageInput::Encoder(encoder), true) => {
                Some(encoder.forward(&inputs.patches, &self.device)?)
            }
        };
        // One gather assembles the batch: token embeddings, with each image span read from the patch
        // embeddings instead. (Cutting and joining each sample cost five operations per sample.)
        let d = self.config.d_model;
        let hidden = match &patches {
            None => tokens,
            Some(patches) => {
                if patches.dims3()? != (b, n, d) {
                    candle_core::bail!(
                        "patch embeddings of shape {:?}, expected ({b}, {n}, {d})",
                        patches.dims()
                    );
                }
                let mut index: Vec<u32> = (0..(b * t) as u32).collect();
                for (s, start) in inputs.image_starts.iter().enumerate() {
                    let Some(start) = *start else { continue };
                    if start.checked_add(n).is_none_or(|end| end > t) {
                        candle_core::bail!(
                            "sample {s}: an image of {n} patches at {start} overruns its {t} tokens"
                        );
                    }
                    for j in 0..n {
                        index[s * t + start + j] = (b * t + s * n + j) as u32;
                    }
                }
                let table = Tensor::cat(
                    &[tokens.reshape((b * t, d))?, patches.reshape((b * n, d))?],
                    0,
                )?;
                table
                    .index_select(&Tensor::from_vec(index, b * t, &self.device)?, 0)?
                    .reshape((b, t, d))?
            }
        };
        Ok(self.fresh_state(hidden, inputs))
    }

    /// An inference pass's embeddings with the patch weights prepared: the patches' matmul, then
    /// [`crate::kernels::embed_rows`] assembles the batch in one pass. `None` where that does not apply
    /// (no image in the batch, weights not prepared, an encoder, inputs that need gradients).
    fn embed_for_inference(&self, inputs: &Inputs) -> Result<Option<Tensor>> {
        let ImageInput::Linear {
            prepared: Some((weight, offset)),
            ..
        } = &self.image
        else {
            return Ok(None);
        };
        if !inputs.image_starts.iter().any(Option::is_some)
            || !inference_kernels(&inputs.patches)
            || self.embed_tokens.track_op()
        {
            return Ok(None);
        }
        let (b, n, p) = inputs.patches.dims3()?;
        let projected = weight.matmul(&inputs.patches.reshape((b * n, p))?)?;
        crate::kernels::embed_rows(
            &self.embed_tokens,
            &inputs.tokens,
            &projected,
            offset,
            &inputs.image_starts,
        )
        .map(Some)
    }

    /// The state before layer 0 of `hidden` (b, t, d), the embeddings of `inputs`.
    fn fresh_state(&self, hidden: Tensor, inputs: &Inputs) -> SeqState {
        let (b, t) = (hidden.dims()[0], hidden.dims()[1]);
        let n = self.config.image_grid * self.config.image_grid;
        let mut is_image = vec![false; b * t];
        for (s, start) in inputs.image_starts.iter().enumerate() {
            // Both embedding paths refuse an image that overruns its sample; clamped all the same.
            if let Some(start) = start.filter(|&start| start < t) {
                is_image[s * t + start..s * t + start + n.min(t - start)].fill(true);
            }
        }
        let valid = (0..b * t).map(|i| i % t < inputs.lengths[i / t]).collect();
        SeqState {
            hidden,
            positions: (0..b * t).map(|i| (i % t) as u32).collect(),
            is_image,
            valid,
            key_bias: None,
            captured: None,
            known_keys: None,
            aux_loss: None,
            routing: Vec::new(),
        }
    }

    fn rope_for(&self, positions: &[u32], b: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let max = self.config.max_positions;
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= max) {
            candle_core::bail!("position {p} exceeds model.max_positions {max}");
        }
        let ids = Tensor::from_slice(positions, b * t, &self.device)?;
        let half = self.config.head_dim() / 2;
        let cos = self
            .rope_cos
            .index_select(&ids, 0)?
            .reshape((b, 1, t, half))?;
        let sin = self
            .rope_sin
            .index_select(&ids, 0)?
            .reshape((b, 1, t, half))?;
        Ok((cos, sin))
    }

    /// Runs every layer over `state`, calling `hook` before each. With `cache`, each layer's keys and
    /// values are stored for generation.
    ///
    /// An inference pass (a frozen model, nothing tracking gradients, fused kernels on) over a batch with
    /// padding packs the valid rows end to end and computes only those: samples hold different numbers
    /// of tokens, most of all after a reduction, and a padded batch computes every sample at the longest
    /// length. `hidden` is unpacked again (padding rows zero) before each hook call that
    /// [`LayerHook::reads_hidden`], for captured queries and keys, and at the end. `TOKENFOLD_PACKED=0`
    /// keeps the padded layout.
    pub fn forward(
        &self,
        mut state: SeqState,
        hook: &mut dyn LayerHook,
        mut cache: Option<&mut KvCache>,
    ) -> Result<SeqState> {
        let _awake = Awake::new();
        if let Some(cache) = cache.as_deref_mut() {
            cache.layers = vec![None; self.blocks.len()];
        }
        let mut layout: Option<Layout> = None;
        // The packed hidden states while the layout is packed; `state.hidden` is then out of date.
        let mut packed: Option<Tensor> = None;
        for (i, block) in self.blocks.iter().enumerate() {
            if let (Some(Layout::Packed(packing)), Some(hidden)) = (&layout, &packed)
                && hook.reads_hidden(i)
            {
                state.hidden = packing.unpack(hidden)?;
                packed = None;
            }
            let changed = hook.before_layer(i, &mut state)?;
            // Keys a hook found for this layer serve this layer only.
            let known_keys = state.known_keys.take();
            if changed || layout.is_none() {
                if let (Some(Layout::Packed(packing)), Some(hidden)) = (&layout, packed.take()) {
                    state.hidden = packing.unpack(&hidden)?;
                }
                layout = Some(self.layout(&state)?);
            }
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let key_bias = match (&slot, &state.key_bias) {
                (Some(_), Some(bias)) => bias.flatten_all()?.to_vec1::<f32>()?,
                _ => vec![0.0; state.valid.len()],
            };
            let layout = layout.as_ref().expect("layout was just built");
            let (input, rope, mask, is_image) = match layout {
                Layout::Dense { rope, bias } => (
                    state.hidden.clone(),
                    rope,
                    Mask::Dense(bias),
                    &state.is_image[..],
                ),
                Layout::Packed(packing) => (
                    match packed.take() {
                        Some(hidden) => hidden,
                        None => packing.pack(&state.hidden)?,
                    },
                    &packing.rope,
                    Mask::Packed(packing),
                    &packing.is_image[..],
                ),
            };
            let known_keys = match (layout, known_keys) {
                (Layout::Packed(packing), Some(keys)) => Some(packing.pack_heads(&keys)?),
                (_, keys) => keys,
            };
            let mut out = block.forward(
                &input,
                (&rope.0, &rope.1),
                mask,
                &self.config,
                slot,
                (&state.valid, &key_bias),
                is_image,
                known_keys.as_ref(),
            )?;
            match layout {
                Layout::Dense { .. } => state.hidden = out.hidden.clone(),
                Layout::Packed(packing) => {
                    packed = Some(out.hidden.clone());
                    if hook.capture(i) {
                        out.q = packing.unpack_heads(&out.q)?;
                        out.k = packing.unpack_heads(&out.k)?;
                    }
                }
            }
            state.captured = hook.capture(i).then_some((out.q, out.k));
            if let Some(aux) = out.aux_loss {
                state.aux_loss = Some(match state.aux_loss.take() {
                    Some(total) => (total + aux)?,
                    None => aux,
                });
            }
            if let Some(routing) = out.routing {
                state.routing.push(routing);
            }
        }
        if let (Some(Layout::Packed(packing)), Some(hidden)) = (&layout, &packed) {
            state.hidden = packing.unpack(hidden)?;
        }
        if let Some(cache) = cache {
            let t = state.len();
            cache.next_positions = (0..state.batch())
                .map(|s| {
                    (0..t)
                        .filter(|&j| state.valid[s * t + j])
                        .map(|j| state.positions[s * t + j] + 1)
                        .max()
                        .unwrap_or(0)
                })
                .collect();
        }
        Ok(state)
    }

    /// How the layers run over `state` until its tokens change: packed when this is an inference pass
    /// over a batch with padding (see [`Self::forward`]), padded with a dense mask otherwise.
    fn layout(&self, state: &SeqState) -> Result<Layout> {
        state.check()?;
        // Frozen weights too: a model with variables would need gradients the packed kernels lack,
        // even where a hook hands it hidden states that track none.
        if self.pack_rows
            && self.frozen_weights.is_some()
            && inference_kernels(&state.hidden)
            && state.key_bias.as_ref().is_none_or(|kb| !kb.track_op())
            && state.valid.iter().any(|&v| !v)
        {
            return Ok(Layout::Packed(Packing::new(self, state)?));
        }
        let (b, t) = (state.batch(), state.len());
        Ok(Layout::Dense {
            rope: self.rope_for(&state.positions, b, t)?,
            bias: state.attention_bias()?,
        })
    }

    pub fn n_layers(&self) -> usize {
        self.blocks.len()
    }

    /// The (in, out) sizes of the four projection matmuls an inference pass runs per decoder layer, in
    /// order: q, k and v stacked, the attention output, gate and up stacked, down. `None` when the
    /// layers' feed-forward is a mixture of experts, whose matmuls depend on the routing.
    pub fn projection_shapes(&self) -> Option<[(usize, usize); 4]> {
        let (d, ff) = (self.config.d_model, self.config.d_ff);
        self.config
            .moe
            .is_none()
            .then_some([(d, 3 * d), (d, d), (d, 2 * ff), (ff, d)])
    }

    /// Queries and keys (b, h, t, hd) that layer `layer` computes from `state` (before attention): what
    /// reduction signals at the input of a layer rank tokens by, without running the layer.
    pub fn layer_queries_keys(&self, layer: usize, state: &SeqState) -> Result<(Tensor, Tensor)> {
        let block = self
            .blocks
            .get(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("layer {layer} out of range")))?;
        let rope = self.rope_for(&state.positions, state.batch(), state.len())?;
        let (q, k, _) =
            block.queries_keys(&state.hidden, (&rope.0, &rope.1), &self.config, false, None)?;
        Ok((q, k))
    }

    /// The keys (b, h, t, hd) that layer `layer` computes from `state`, and its queries at the flat rows
    /// `query_rows` (s·t + j) only, as (1, h, rows, hd) in that order; `None` without rows. What a
    /// reduction signal at the input of a layer needs, at a fraction of [`Self::layer_queries_keys`]'s
    /// cost when few queries are read.
    pub fn layer_keys_and_queries_at(
        &self,
        layer: usize,
        state: &SeqState,
        query_rows: &[usize],
    ) -> Result<(Tensor, Option<Tensor>)> {
        let block = self
            .blocks
            .get(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("layer {layer} out of range")))?;
        let (b, t) = (state.batch(), state.len());
        if let Some(&row) = query_rows.iter().find(|&&r| r >= b * t) {
            candle_core::bail!("query row {row} is outside the {b} × {t} rows of the sequence");
        }
        let normed = rms_norm(&state.hidden, &block.attn_norm, self.config.norm_eps)?;
        let rope = self.rope_for(&state.positions, b, t)?;
        let keys = block.keys(&normed, (&rope.0, &rope.1), &self.config)?;
        if query_rows.is_empty() {
            return Ok((keys, None));
        }
        let n = query_rows.len();
        let rows: Vec<u32> = query_rows.iter().map(|&r| r as u32).collect();
        let picked = normed
            .reshape((b * t, self.config.d_model))?
            .index_select(&Tensor::from_vec(rows, n, &self.device)?, 0)?
            .reshape((1, n, self.config.d_model))?;
        let positions: Vec<u32> = query_rows.iter().map(|&r| state.positions[r]).collect();
        let rope = self.rope_for(&positions, 1, n)?;
        let queries = block.queries(&picked, (&rope.0, &rope.1), &self.config)?;
        Ok((keys, Some(queries)))
    }

    /// Whether a hook should hand the keys that [`Self::layer_keys_and_queries_at`] computed over `rows`
    /// rows (f32, on the CPU, tracking no gradient) back to the layer as [`SeqState::known_keys`], for the
    /// rows it keeps unchanged. They are then, for any subset of those rows, the bits that the layer's own
    /// projection of that subset gives: the panel kernels compute each row on its own (up to
    /// [`crate::panels::PANEL_ROWS_MAX`] rows, on a CPU that has them, with fused kernels on), and the
    /// keys' panels hold the same values as the key part of the layer's stacked projection. Heads whose
    /// size is not a multiple of 16 are left out: their layer computes its keys anyway (see
    /// [`crate::panels::PackedWeight::matmul_heads_of`]).
    pub fn reuses_keys_of(&self, rows: usize) -> bool {
        crate::panels::panels_available()
            && crate::kernels::fused_enabled()
            && rows <= crate::panels::PANEL_ROWS_MAX
            && self.config.head_dim().is_multiple_of(crate::panels::PANEL)
            && self.is_prepared_for_inference()
    }

    /// The final RMSNorm (before the output head) applied to hidden rows.
    pub fn final_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        rms_norm(hidden, &self.norm, self.config.norm_eps)
    }

    /// Logits (n, vocab) of hidden rows (n, d).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let normed = rms_norm(hidden, &self.norm, self.config.norm_eps)?;
        match &self.head_transposed {
            Some(head) => head.matmul(&normed),
            None => normed.matmul(&self.lm_head.as_ref().unwrap_or(&self.embed_tokens).t()?),
        }
    }

    /// The logits (n, vocab) at every target token of a training batch with `hook` in the forward pass:
    /// hidden row j − 1 predicts token j wherever token j is a target. The hook may remove rows (a
    /// reduction plan), but not one that predicts a target. Returns the logits, the target ids (n,) and the
    /// sample of each row.
    pub fn target_logits(
        &self,
        batch: &Batch,
        hook: &mut dyn LayerHook,
    ) -> Result<(Tensor, Tensor, Vec<usize>)> {
        let (logits, targets, samples, _) = self.target_logits_and_state(batch, hook)?;
        Ok((logits, targets, samples))
    }

    /// [`Self::target_logits`] plus the state after the last layer (its mixture-of-experts auxiliary
    /// loss and routing).
    fn target_logits_and_state(
        &self,
        batch: &Batch,
        hook: &mut dyn LayerHook,
    ) -> Result<(Tensor, Tensor, Vec<usize>, SeqState)> {
        let inputs = Inputs::from_batch(batch, &self.device)?;
        let state = self.forward(self.embed(&inputs)?, hook, None)?;
        let (b, t) = (batch.batch_size, batch.seq_len);
        // A hook that removed rows (a reduction plan) keeps each row's original position: the row that
        // predicts target j is the one at position j − 1.
        let kept = state.len();
        let row_at: HashMap<(usize, u32), usize> = if kept == t {
            HashMap::new()
        } else {
            (0..b * kept)
                .filter(|&r| state.valid[r])
                .map(|r| ((r / kept, state.positions[r]), r))
                .collect()
        };
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let mut samples = Vec::new();
        for s in 0..b {
            for j in 1..t {
                if batch.loss_mask[s * t + j] > 0.0 {
                    let row = if kept == t {
                        s * t + j - 1
                    } else {
                        *row_at.get(&(s, (j - 1) as u32)).ok_or_else(|| {
                            candle_core::Error::Msg(format!(
                                "sample {s}: the hook removed row {} that predicts a target token",
                                j - 1
                            ))
                        })?
                    };
                    rows.push(row as u32);
                    targets.push(batch.tokens[s * t + j]);
                    samples.push(s);
                }
            }
        }
        if rows.is_empty() {
            candle_core::bail!("the batch has no target tokens");
        }
        let n = rows.len();
        let hidden = state.hidden.reshape((b * kept, self.config.d_model))?;
        let selected = hidden.index_select(&Tensor::from_vec(rows, n, &self.device)?, 0)?;
        Ok((
            self.logits(&selected)?,
            Tensor::from_vec(targets, n, &self.device)?,
            samples,
            state,
        ))
    }

    /// Per-target negative log-likelihoods of a training batch: for each sample, the mean over its masked
    /// tokens. Returns (per-sample mean NLL (b,), per-sample target-token counts).
    pub fn sample_losses(&self, batch: &Batch) -> Result<(Tensor, Vec<usize>)> {
        let losses = self.sample_losses_with_routing(batch)?;
        Ok((losses.per_sample, losses.counts))
    }

    /// [`Self::sample_losses`] plus what the same forward pass's mixture-of-experts layers report.
    pub fn sample_losses_with_routing(&self, batch: &Batch) -> Result<SampleLosses> {
        let (logits, targets, samples, state) = self.target_logits_and_state(batch, &mut NoHook)?;
        let b = batch.batch_size;
        let n = samples.len();
        let mut counts = vec![0usize; b];
        samples.iter().for_each(|&s| counts[s] += 1);
        // Sample membership (b, n) scaled by 1/count: the per-sample mean NLL as one matmul.
        let mut weights = vec![0f32; b * n];
        for (r, &s) in samples.iter().enumerate() {
            weights[s * n + r] = 1.0 / counts[s] as f32;
        }
        let nll = cross_entropy_rows(&logits, &targets)?;
        let membership = Tensor::from_vec(weights, (b, n), &self.device)?;
        let per_sample = membership.matmul(&nll.unsqueeze(1)?)?.squeeze(1)?;
        Ok(SampleLosses {
            per_sample,
            counts,
            aux_loss: state.aux_loss,
            routing: state.routing,
        })
    }

    /// The training loss: the mean over samples of each sample's mean NLL over its target tokens, so that
    /// a long text passage and a one-token answer weigh the same.
    pub fn loss(&self, batch: &Batch) -> Result<Tensor> {
        let losses = self.sample_losses_with_routing(batch)?;
        let loss = losses.per_sample.mean_all()?;
        match losses.aux_loss {
            Some(aux) => loss + aux,
            None => Ok(loss),
        }
    }

    /// Prefills prompts, filling `cache`; returns the logits (b, vocab) at each sample's last real token.
    pub fn prefill(
        &self,
        inputs: &Inputs,
        hook: &mut dyn LayerHook,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let _awake = Awake::new();
        let state = self.forward(self.embed(inputs)?, hook, Some(cache))?;
        let (b, t) = (state.batch(), state.len());
        let last: Vec<u32> = (0..b)
            .map(|s| {
                (0..t)
                    .filter(|&j| state.valid[s * t + j])
                    .max_by_key(|&j| state.positions[s * t + j])
                    .map(|j| (s * t + j) as u32)
                    .unwrap_or((s * t) as u32)
            })
            .collect();
        let hidden = state.hidden.reshape((b * t, self.config.d_model))?;
        self.logits(&hidden.index_select(&Tensor::from_vec(last, b, &self.device)?, 0)?)
    }

    /// One decoding step: feeds one token per sample at its next position; returns logits (b, vocab).
    pub fn decode_step(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let _awake = Awake::new();
        let b = tokens.len();
        let ids = Tensor::from_slice(tokens, b, &self.device)?;
        let mut hidden = self
            .embed_tokens
            .embedding(&ids)?
            .reshape((b, 1, self.config.d_model))?;
        let positions = cache.next_positions.clone();
        let rope = self.rope_for(&positions, b, 1)?;
        let new_valid = vec![true; b];
        let new_bias = vec![0f32; b];
        let text = vec![false; b];
        for (i, block) in self.blocks.iter().enumerate() {
            let layer = cache.layers[i]
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg("decode before prefill".into()))?;
            let cached = layer.k.dim(2)?;
            let mut bias = Vec::with_capacity(b * (cached + 1));
            for s in 0..b {
                let keys = s * cached..(s + 1) * cached;
                bias.extend(
                    layer.valid[keys.clone()]
                        .iter()
                        .zip(&layer.key_bias[keys])
                        .map(|(&v, &kb)| if v { kb } else { MASKED }),
                );
                bias.push(0.0);
            }
            let bias = Tensor::from_vec(bias, (b, 1, 1, cached + 1), &self.device)?;
            hidden = block
                .forward(
                    &hidden,
                    (&rope.0, &rope.1),
                    Mask::Dense(&bias),
                    &self.config,
                    Some(&mut cache.layers[i]),
                    (&new_valid, &new_bias),
                    &text,
                    None,
                )?
                .hidden;
        }
        for p in cache.next_positions.iter_mut() {
            *p += 1;
        }
        self.logits(&hidden.reshape((b, self.config.d_model))?)
    }

    /// Greedy generation after prefilling `inputs`: up to `max_new` tokens per sample, stopping a sample at
    /// `eos`. Returns the generated ids (without `eos`).
    pub fn generate(
        &self,
        inputs: &Inputs,
        hook: &mut dyn LayerHook,
        max_new: usize,
        eos: u32,
    ) -> Result<Vec<Vec<u32>>> {
        let mut cache = KvCache::default();
        let mut logits = self.prefill(inputs, hook, &mut cache)?;
        let b = inputs.lengths.len();
        let mut out = vec![Vec::new(); b];
        let mut done = vec![false; b];
        for step in 0..max_new {
            let next: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            for s in 0..b {
                if !done[s] {
                    if next[s] == eos {
                        done[s] = true;
                    } else {
                        out[s].push(next[s]);
                    }
                }
            }
            if done.iter().all(|&d| d) || step + 1 == max_new {
                break;
            }
            logits = self.decode_step(&next, &mut cache)?;
        }
        Ok(out)
    }
}
