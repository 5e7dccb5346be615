//! The numerical building blocks, written with candle ops that all carry a backward pass.
//!
//! candle-nn's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and rope kernels have no backward and
//! silently cut gradients, so training code uses these instead. Each has a finite-difference gradient
//! test (`tests.rs`).

use candle_core::{D, Device, Result, Tensor};

/// RMSNorm over the last dimension: x / sqrt(mean(x²) + eps) · weight. On the CPU, the fused kernel
/// [`crate::kernels::rms_norm`] unless `TOKENFOLD_PLAIN_OPS` is set.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::kernels::elementwise_supported(x, &[]) {
        return crate::kernels::rms_norm(x, weight, eps);
    }
    rms_norm_plain(x, weight, eps)
}

/// [`rms_norm`] written with candle ops only.
pub fn rms_norm_plain(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_square + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)
}

/// Softmax over the last dimension. The row maximum is subtracted for stability; it is detached, which
/// leaves the softmax (and so its gradient) unchanged.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// SwiGLU: silu(gate) · up. On the CPU, the fused kernel [`crate::kernels::swiglu`] unless
/// `TOKENFOLD_PLAIN_OPS` is set.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if crate::kernels::elementwise_supported(gate, &[]) {
        return crate::kernels::swiglu(gate, up);
    }
    swiglu_plain(gate, up)
}

/// [`swiglu`] written with candle ops, silu(x) = x · sigmoid(x) spelled out so the backward pass is
/// explicit.
pub fn swiglu_plain(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let sigmoid = (gate.neg()?.exp()? + 1.0)?.recip()?;
    (gate * sigmoid)?.mul(up)
}

/// Rotary tables: cos and sin of position × inverse frequency, (max_positions, head_dim / 2).
pub fn rope_tables(
    head_dim: usize,
    max_positions: usize,
    theta: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(max_positions * half);
    let mut sin = Vec::with_capacity(max_positions * half);
    for position in 0..max_positions {
        for i in 0..half {
            let angle = position as f64 * theta.powf(-((2 * i) as f64) / head_dim as f64);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (max_positions, half), device)?,
        Tensor::from_vec(sin, (max_positions, half), device)?,
    ))
}

/// Applies rotary embeddings to x (b, h, t, hd) with cos, sin (b, 1, t, hd/2) already gathered at each
/// token's position: the two halves of the head dimension rotate as (x1, x2) → (x1·c − x2·s, x1·s + x2·c).
/// On the CPU, the fused kernel [`crate::kernels::rope`] unless `TOKENFOLD_PLAIN_OPS` is set.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if crate::kernels::elementwise_supported(x, &[cos, sin]) {
        return crate::kernels::rope(x, cos, sin);
    }
    apply_rope_plain(x, cos, sin)
}

/// [`apply_rope`] written with candle ops only.
pub fn apply_rope_plain(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let rotated2 = (x1.broadcast_mul(sin)? + x2.broadcast_mul(cos)?)?;
    Tensor::cat(&[rotated1, rotated2], D::Minus1)
}

/// Scaled dot-product attention: softmax(q·kᵀ/√d + bias)·v for q (b, h, tq, d), k and v (b, h, tk, d),
/// and an additive bias broadcastable to (b, h, tq, tk) holding the mask (large negative where a key is not
/// visible) and any per-key terms such as log token sizes.
///
/// On the CPU this runs the fused kernel of [`crate::kernels::attention`] unless the bias needs a
/// gradient or `TOKENFOLD_PLAIN_OPS` is set; [`attention_plain`] is the reference it is tested against.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    if crate::kernels::attention_supported(q, bias) {
        return crate::kernels::attention(q, k, v, bias, scale);
    }
    attention_plain(q, k, v, bias)
}

/// [`attention`] written with candle ops only.
pub fn attention_plain(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?;
    softmax(&scores)?.matmul(v)
}

/// Per-row negative log-likelihood of `targets` (n,) under `logits` (n, vocab).
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let log_probs = log_softmax(logits)?;
    log_probs
        .gather(&targets.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()
}

/// Value used for masked attention logits: large enough to vanish after softmax, finite so that no NaN
/// arises.
pub const MASKED: f32 = -1e9;
