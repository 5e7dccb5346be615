//! Fused CPU kernels: for training, with their backward pass, as candle custom ops; for inference, a
//! few forward-only ones that refuse inputs needing gradients.
//!
//! Written out with candle's elementwise ops, attention materialises the (b, h, tq, tk) score matrix
//! about six times in the forward pass (scaled, biased, shifted, exponentiated, normalised) and more in
//! the backward pass; on 2 cores that memory traffic and its page faults cost more than the matrix
//! products. [`attention`] computes the same function in tiles of query rows: per head and tile, the
//! scores live in a small buffer that stays in cache, masked key ranges are skipped, and only the
//! row maximum and sum of exponentials are kept for the backward pass, which recomputes the probabilities
//! (FlashAttention's scheme, here with the whole key range in one tile since our sequences are short).
//!
//! Training stacks projections that share an input: [`qkv_heads`] and [`attention_qkv`] take q, k and v
//! from one matmul, [`swiglu_halves`] the gate and up projections, each with a backward pass to the
//! stacked tensor. The inference kernels ([`segment_attention`], [`split_heads`], [`add_rms_norm`],
//! [`matmul_add`]) each do in one pass what several operations do in a layer: the head split, norms and
//! rotation, a residual sum with its norm, a projection onto the residual, and attention over packed
//! samples.
//!
//! The plain ops of [`crate::ops`] remain the reference: set `TOKENFOLD_PLAIN_OPS=1` to run them instead
//! (for debugging). Every training kernel here is tested against them and against finite differences,
//! every inference kernel against them in values.

use std::sync::{Mutex, OnceLock};

use candle_core::{
    CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType, bail,
};
use num_traits::Float;
use rayon::prelude::*;

/// Query rows per tile: the tile's scores (rows × keys) stay in L2 for sequences of a few hundred keys.
const TILE: usize = 64;

/// Attention logits at or below this count as masked, so their keys can be skipped: the model's mask
/// value is −1e9, and exp of anything that far below the row maximum is exactly 0 in f32 and f64.
const MASK_THRESHOLD: f64 = -1e8;

/// Whether the fused kernels run (unless `TOKENFOLD_PLAIN_OPS` is set to anything but `0`).
pub fn fused_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("TOKENFOLD_PLAIN_OPS").map_or(true, |v| v == "0"))
}

/// Whether [`attention`] should run these inputs: fused kernels enabled, CPU tensors of f32 or f64, and a bias that needs no
/// gradient (the search's soft masks do; they take the plain path).
pub fn attention_supported(q: &Tensor, bias: &Tensor) -> bool {
    fused_enabled()
        && q.device().is_cpu()
        && matches!(q.dtype(), DType::F32 | DType::F64)
        && !bias.track_op()
}

/// softmax(q·kᵀ·scale + bias)·v for q (b, h, tq, d), k and v (b, h, tk, d) and bias (b, 1 or h, tq, tk)
/// or anything that broadcasts to it. Gradients flow to q, k and v; the bias is treated as a constant.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let tk = k.dim(2)?;
    if k.dims() != [b, h, tk, d] || v.dims() != [b, h, tk, d] {
        bail!(
            "fused attention: q {:?}, k {:?} and v {:?} do not match",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let op = FusedAttention::new(bias, (b, h, tq, tk), q.dtype(), scale)?;
    // Without gradients (inference: a padded prefill, a decoding step), no backward pass will ask for
    // the rows' statistics, and the panels' micro-kernel can take the products.
    if ![q, k, v].iter().any(|x| x.track_op()) && tq > 0 && tk > 0 && d > 0 {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let dims = op.dims((b, h, tq, tk, d));
        macro_rules! run {
            ($t:ty) => {{
                let out = with_slice::<$t, _>(&q, |q| {
                    with_slice::<$t, _>(&k, |k| {
                        with_slice::<$t, _>(&v, |v| {
                            with_slice::<$t, _>(&op.bias, |bias| {
                                Ok(inference_forward(dims, q, k, v, bias, scale))
                            })
                        })
                    })
                })?;
                Tensor::from_vec(out, (b, h, tq, d), q.device())
            }};
        }
        return match q.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dtype => bail!("fused attention supports f32 and f64, not {dtype:?}"),
        };
    }
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// [`forward`] for inference: the same outputs, each head through [`attend_panels`] (or [`attend`]
/// where the CPU has no micro-kernel, and in f64), each query row's keys found once per bias block
/// (sample, and head where the bias has one per head) for all heads sharing it. No statistics are kept:
/// nothing will ask for a backward pass.
fn inference_forward<T: Real>(
    dims: Dims,
    q: &[T],
    k: &[T],
    v: &[T],
    bias: &[T],
    scale: f64,
) -> Vec<T> {
    let Dims { tq, tk, d, .. } = dims;
    let block = tq * tk;
    let mut ranges = Vec::with_capacity(dims.b * dims.bias_heads * tq);
    for rows in bias.chunks_exact(block) {
        row_ranges(rows, tk, &mut ranges);
    }
    let mut out = vec![T::zero(); dims.b * dims.h * tq * d];
    out.par_chunks_mut(tq * d)
        .enumerate()
        .for_each(|(bh, out)| {
            let at = dims.bias_offset(bh);
            let (bias, ranges) = (&bias[at..at + block], &ranges[at / tk..at / tk + tq]);
            let (q, k, v) = (
                &q[bh * tq * d..(bh + 1) * tq * d],
                &k[bh * tk * d..(bh + 1) * tk * d],
                &v[bh * tk * d..(bh + 1) * tk * d],
            );
            let mut lse = vec![(0.0, 0.0); tq];
            let mut scratch = Default::default();
            let inputs = (q, k, v, bias, ranges);
            attend_inference((tq, tk, d), inputs, scale, (out, &mut lse), &mut scratch);
        });
    out
}

/// [`attention`] over queries, keys and values stacked in one tensor, `heads` (3, b, h, t, d), as
/// [`qkv_heads`] gives them; the result is (b, h, t, d). Its gradient is one tensor of the stacked
/// layout, so a training step that projects q, k and v in one matmul never splits and re-joins them:
/// the backward pass of a split pads each part with zeros to the full size, and the three are summed.
pub fn attention_qkv(heads: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (parts, b, h, t, _) = heads.dims5()?;
    if parts != 3 {
        bail!(
            "fused attention: stacked heads {:?} must be (3, b, h, t, d)",
            heads.dims()
        );
    }
    let op = FusedAttention::new(bias, (b, h, t, t), heads.dtype(), scale)?;
    heads.contiguous()?.apply_op1(StackedAttention(op))
}

struct FusedAttention {
    scale: f64,
    /// (b, bias_heads, tq, tk), contiguous, in the inputs' dtype.
    bias: Tensor,
    bias_heads: usize,
    /// Per (b, h, query row), the maximum and the sum of the exponentials of its logits, from the
    /// forward pass for the backward.
    lse: Mutex<Vec<(f64, f64)>>,
}

impl FusedAttention {
    /// The op for (b, h) heads of `tq` queries and `tk` keys: `bias` broadcast to (b, 1 or h, tq, tk)
    /// (one bias for all heads when its head dimension is 1 or absent) and made contiguous in `dtype`.
    fn new(
        bias: &Tensor,
        (b, h, tq, tk): (usize, usize, usize, usize),
        dtype: DType,
        scale: f64,
    ) -> Result<FusedAttention> {
        let bias_heads = match bias.dims() {
            [_, 1, _, _] | [_, _] | [_] => 1,
            _ => h,
        };
        let bias = bias
            .broadcast_as((b, bias_heads, tq, tk))?
            .to_dtype(dtype)?
            .contiguous()?;
        Ok(FusedAttention {
            scale,
            bias,
            bias_heads,
            lse: Mutex::new(Vec::new()),
        })
    }
}

/// Dimensions of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    tq: usize,
    tk: usize,
    d: usize,
    bias_heads: usize,
}

impl Dims {
    /// The bias rows (tq × tk) of head `bh` (= batch · h + head).
    fn bias_offset(&self, bh: usize) -> usize {
        let (s, head) = (bh / self.h, bh % self.h);
        (s * self.bias_heads + head % self.bias_heads) * self.tq * self.tk
    }
}

fn contiguous_slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    name: &str,
) -> Result<&'a [T]> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!("fused attention: {name} not contiguous"))
    })?;
    Ok(&storage.as_slice::<T>()?[start..end])
}

/// The slice of a contiguous CPU tensor; the read guard must outlive it, hence the callback.
pub(crate) fn with_slice<T: WithDType, R>(
    tensor: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = tensor.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(contiguous_slice(cpu, layout, "tensor")?),
        _ => bail!("fused attention runs on the CPU only"),
    }
}

/// The slices of the rotary tables `cos` and `sin`, as [`with_slice`] gives one.
pub(crate) fn with_tables<T: WithDType, R>(
    (cos, sin): (&Tensor, &Tensor),
    f: impl FnOnce((&[T], &[T])) -> Result<R>,
) -> Result<R> {
    with_slice::<T, _>(cos, |cos| with_slice::<T, _>(sin, |sin| f((cos, sin))))
}

impl FusedAttention {
    /// The dimensions of a call on (b, h) heads of `tq` queries and `tk` keys of size d.
    fn dims(&self, (b, h, tq, tk, d): (usize, usize, usize, usize, usize)) -> Dims {
        Dims {
            b,
            h,
            tq,
            tk,
            d,
            bias_heads: self.bias_heads,
        }
    }

    /// The forward pass over q, k and v, keeping each row's statistics for the backward pass.
    fn forward_slices<T: Real>(&self, dims: Dims, q: &[T], k: &[T], v: &[T]) -> Result<Vec<T>> {
        let (out, lse) = with_slice::<T, _>(&self.bias, |bias| {
            Ok(forward(dims, q, k, v, bias, self.scale))
        })?;
        *self.lse.lock().expect("lse lock") = lse;
        Ok(out)
    }

    /// The backward pass into `grads` (dq, dk, dv, zeroed), from the forward pass's output `out` and
    /// its gradient.
    fn backward_slices<T: Real>(
        &self,
        dims: Dims,
        (q, k, v): (&[T], &[T], &[T]),
        out: &Tensor,
        grad_out: &Tensor,
        grads: (&mut [T], &mut [T], &mut [T]),
    ) -> Result<()> {
        let grad_out = grad_out.contiguous()?;
        let lse = self.lse.lock().expect("lse lock");
        with_slice::<T, _>(out, |o| {
            with_slice::<T, _>(&grad_out, |go| {
                with_slice::<T, _>(&self.bias, |bias| {
                    backward(dims, q, k, v, o, go, bias, &lse, self.scale, grads);
                    Ok(())
                })
            })
        })
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, tq, d) = l1.shape().dims4()?;
        let tk = l2.shape().dims4()?.2;
        let dims = self.dims((b, h, tq, tk, d));
        macro_rules! forward {
            ($t:ty, $wrap:path) => {{
                let q = contiguous_slice::<$t>(s1, l1, "q")?;
                let k = contiguous_slice::<$t>(s2, l2, "k")?;
                let v = contiguous_slice::<$t>(s3, l3, "v")?;
                $wrap(self.forward_slices(dims, q, k, v)?)
            }};
        }
        let out = match s1 {
            CpuStorage::F32(_) => forward!(f32, CpuStorage::F32),
            CpuStorage::F64(_) => forward!(f64, CpuStorage::F64),
            _ => bail!("fused attention supports f32 and f64"),
        };
        Ok((out, Shape::from((b, h, tq, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, tq, d) = q.dims4()?;
        let tk = k.dim(2)?;
        let dims = self.dims((b, h, tq, tk, d));
        macro_rules! backward {
            ($t:ty) => {{
                let mut dq = vec![0 as $t; b * h * tq * d];
                let mut dk = vec![0 as $t; b * h * tk * d];
                let mut dv = vec![0 as $t; b * h * tk * d];
                with_slice::<$t, _>(q, |q| {
                    with_slice::<$t, _>(k, |k| {
                        with_slice::<$t, _>(v, |v| {
                            let grads = (&mut dq[..], &mut dk[..], &mut dv[..]);
                            self.backward_slices(dims, (q, k, v), out, grad_out, grads)
                        })
                    })
                })?;
                let device = q.device();
                (
                    Tensor::from_vec(dq, (b, h, tq, d), device)?,
                    Tensor::from_vec(dk, (b, h, tk, d), device)?,
                    Tensor::from_vec(dv, (b, h, tk, d), device)?,
                )
            }};
        }
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => backward!(f32),
            DType::F64 => backward!(f64),
            dtype => bail!("fused attention supports f32 and f64, not {dtype:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// [`attention_qkv`]'s op: [`FusedAttention`] reading q, k and v as the three thirds of one tensor.
struct StackedAttention(FusedAttention);

impl candle_core::CustomOp1 for StackedAttention {
    fn name(&self) -> &'static str {
        "fused-attention-stacked"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, b, h, t, d) = layout.shape().dims5()?;
        let dims = self.0.dims((b, h, t, t, d));
        let n = b * h * t * d;
        macro_rules! forward {
            ($t:ty, $wrap:path) => {{
                let heads = contiguous_slice::<$t>(storage, layout, "stacked heads")?;
                let (q, rest) = heads.split_at(n);
                let (k, v) = rest.split_at(n);
                $wrap(self.0.forward_slices(dims, q, k, v)?)
            }};
        }
        let out = match storage {
            CpuStorage::F32(_) => forward!(f32, CpuStorage::F32),
            CpuStorage::F64(_) => forward!(f64, CpuStorage::F64),
            _ => bail!("fused attention supports f32 and f64"),
        };
        Ok((out, Shape::from((b, h, t, d))))
    }

    fn bwd(&self, heads: &Tensor, out: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        let (_, b, h, t, d) = heads.dims5()?;
        let dims = self.0.dims((b, h, t, t, d));
        let n = b * h * t * d;
        macro_rules! backward {
            ($t:ty) => {{
                let mut grad = vec![0 as $t; 3 * n];
                let (dq, rest) = grad.split_at_mut(n);
                let (dk, dv) = rest.split_at_mut(n);
                with_slice::<$t, _>(heads, |heads| {
                    let (q, rest) = heads.split_at(n);
                    let (k, v) = rest.split_at(n);
                    self.0
                        .backward_slices(dims, (q, k, v), out, grad_out, (dq, dk, dv))
                })?;
                Tensor::from_vec(grad, heads.shape(), heads.device())?
            }};
        }
        let grad = match heads.dtype() {
            DType::F32 => backward!(f32),
            DType::F64 => backward!(f64),
            dtype => bail!("fused attention supports f32 and f64, not {dtype:?}"),
        };
        Ok(Some(grad))
    }
}

/// The element types the kernels run in.
pub(crate) trait Real:
    Float
    + WithDType
    + std::ops::AddAssign
    + std::ops::MulAssign
    + Send
    + Sync
    + std::iter::Sum
    + 'static
{
    /// eˣ as the kernels compute it: [`exp_f32`] in f32, the standard library's in f64 (the precision
    /// of the finite-difference tests).
    fn fast_exp(self) -> Self;
    /// f32 values in this type: borrowed when it is f32, so that a packed batch's bias is not copied
    /// at every layer.
    fn from_f32s(values: &[f32]) -> std::borrow::Cow<'_, [Self]>;
    /// `row[i]` = exp(row[i] − max): a softmax row's exponentials.
    fn exp_shifted(row: &mut [Self], max: Self) {
        exp_shifted_loop(row, max);
    }
    /// `row[i]` = exp(row[i] + bias[i] − max)·scale: a softmax row recomputed from its logits.
    fn exp_biased(row: &mut [Self], bias: &[Self], max: Self, scale: Self) {
        exp_biased_loop(row, bias, max, scale);
    }
    /// `out[i]` = silu(gate[i])·up[i] over equal-length slices.
    fn swiglu_into(out: &mut [Self], gate: &[Self], up: &[Self]) {
        swiglu_loop(out, gate, up);
    }
    /// [`attend`] with its two products in the packed-panel micro-kernel ([`attend_panels`]) where
    /// the type and the CPU allow it; false, with nothing written, elsewhere.
    fn attend_panels(
        _dims: (usize, usize, usize),
        _inputs: HeadInputs<Self>,
        _scale: Self,
        _out: HeadOutputs<Self>,
        _scratch: &mut [Vec<Self>; 3],
    ) -> bool {
        false
    }
    /// The gradients of gate and up given the output's gradient, over equal-length slices.
    fn swiglu_grads_into(
        dgate: &mut [Self],
        dup: &mut [Self],
        gate: &[Self],
        up: &[Self],
        g: &[Self],
    ) {
        swiglu_grads_loop(dgate, dup, gate, up, g);
    }
}
impl Real for f32 {
    #[inline(always)]
    fn fast_exp(self) -> f32 {
        exp_f32(self)
    }
    fn from_f32s(values: &[f32]) -> std::borrow::Cow<'_, [f32]> {
        std::borrow::Cow::Borrowed(values)
    }
    fn exp_shifted(row: &mut [f32], max: f32) {
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time).
            return unsafe { exp_shifted_avx2(row, max) };
        }
        exp_shifted_loop(row, max);
    }
    fn exp_biased(row: &mut [f32], bias: &[f32], max: f32, scale: f32) {
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time).
            return unsafe { exp_biased_avx2(row, bias, max, scale) };
        }
        exp_biased_loop(row, bias, max, scale);
    }
    fn attend_panels(
        dims: (usize, usize, usize),
        inputs: HeadInputs<f32>,
        scale: f32,
        out: HeadOutputs<f32>,
        scratch: &mut [Vec<f32>; 3],
    ) -> bool {
        attend_panels(dims, inputs, scale, out, scratch)
    }
    fn swiglu_into(out: &mut [f32], gate: &[f32], up: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time).
            return unsafe { swiglu_avx2(out, gate, up) };
        }
        swiglu_loop(out, gate, up);
    }
    fn swiglu_grads_into(dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], g: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time).
            return unsafe { swiglu_grads_avx2(dgate, dup, gate, up, g) };
        }
        swiglu_grads_loop(dgate, dup, gate, up, g);
    }
}

/// Whether this x86-64 CPU has AVX2 and FMA. The build targets the x86-64 baseline, whose vectors are
/// four f32 wide (SSE2); the few loops that are bound by arithmetic rather than memory (the
/// exponentials of SwiGLU and of attention's softmax) are compiled a second time for eight-wide AVX2 and
/// picked at run time.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_fma() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    })
}

// The loops themselves, written once: inlined into each caller, they are compiled for the baseline in
// the plain methods and for AVX2 in the `*_avx2` functions.

#[inline(always)]
fn exp_shifted_loop<T: Real>(row: &mut [T], max: T) {
    for x in row.iter_mut() {
        *x = (*x - max).fast_exp();
    }
}

#[inline(always)]
fn exp_biased_loop<T: Real>(row: &mut [T], bias: &[T], max: T, scale: T) {
    for (x, &b) in row.iter_mut().zip(bias) {
        *x = (*x + b - max).fast_exp() * scale;
    }
}

#[inline(always)]
fn swiglu_loop<T: Real>(out: &mut [T], gate: &[T], up: &[T]) {
    for ((y, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *y = swiglu_value(g, u);
    }
}

#[inline(always)]
fn swiglu_grads_loop<T: Real>(dgate: &mut [T], dup: &mut [T], gate: &[T], up: &[T], g: &[T]) {
    for i in 0..gate.len() {
        (dgate[i], dup[i]) = swiglu_grads(gate[i], up[i], g[i]);
    }
}

/// [`Real::exp_shifted`]'s loop compiled for AVX2 and FMA (same results, as below).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(row: &mut [f32], max: f32) {
    exp_shifted_loop(row, max);
}

/// [`Real::exp_biased`]'s loop compiled for AVX2 and FMA (same results, as below).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_biased_avx2(row: &mut [f32], bias: &[f32], max: f32, scale: f32) {
    exp_biased_loop(row, bias, max, scale);
}

/// [`Real::swiglu_into`]'s loop compiled for AVX2 and FMA. FMA contracts no operation here (Rust never
/// fuses a multiply and an add on its own), so the results are the same bits as the baseline loop's.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn swiglu_avx2(out: &mut [f32], gate: &[f32], up: &[f32]) {
    swiglu_loop(out, gate, up);
}

/// [`Real::swiglu_grads_into`]'s loop compiled for AVX2 and FMA (same results, as above).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_grads_avx2(
    dgate: &mut [f32],
    dup: &mut [f32],
    gate: &[f32],
    up: &[f32],
    g: &[f32],
) {
    swiglu_grads_loop(dgate, dup, gate, up, g);
}
impl Real for f64 {
    #[inline(always)]
    fn fast_exp(self) -> f64 {
        self.exp()
    }
    fn from_f32s(values: &[f32]) -> std::borrow::Cow<'_, [f64]> {
        values.iter().map(|&x| f64::from(x)).collect()
    }
}

/// eˣ in f32 without a library call, so that loops over it vectorise: the libm `expf` the softmax and
/// SiLU called element by element took 6–10% of a prefill's time (perf). Cody–Waite range reduction
/// x = k·ln 2 + r, |r| ≤ ln 2 / 2, then Cephes' degree-7 polynomial for eʳ and 2ᵏ from the exponent
/// bits; at worst 1 ulp from `f32::exp` over every 97th f32 in its range (test
/// `fast_exp_is_within_two_ulp`, which allows 2). Below −87.3 it gives 0, as the masked logits of
/// attention need (a little before f32's normal range ends, near −87.34); above 88.7, e^88.7 (≈ 3.3e38)
/// rather than infinity.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two, so that k·LN2_HI is exact for the k that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding and subtracting it rounds to the nearest integer without a rounding instruction.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.3, 88.7);
    let shifted = clamped * LOG2E + ROUND;
    let k = shifted - ROUND;
    let r = clamped - k * LN2_HI - k * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * r2 + r + 1.0;
    // k as an integer, read from the low bits of `shifted` (a float-to-int cast would not vectorise),
    // and 2ᵏ in two halves: k reaches 128 near the top of the range, one past the largest exponent.
    let k = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let power = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = er * power(k >> 1) * power(k - (k >> 1));
    if x < -87.3 { 0.0 } else { y }
}

fn real<T: Real>(x: f64) -> T {
    T::from(x).expect("f64 converts to f32 and f64")
}

/// The key range [lo, hi) that holds every visible key of query rows `rows` (all keys when some row
/// sees none, so that such a row keeps the plain softmax's uniform weights).
fn key_range<T: Real>(bias: &[T], tk: usize, rows: std::ops::Range<usize>) -> (usize, usize) {
    let threshold = real::<T>(MASK_THRESHOLD);
    let (mut lo, mut hi) = (tk, 0);
    for r in rows {
        let row = &bias[r * tk..(r + 1) * tk];
        match row.iter().position(|&x| x > threshold) {
            Some(first) => {
                let last = row.iter().rposition(|&x| x > threshold).unwrap_or(first);
                lo = lo.min(first);
                hi = hi.max(last + 1);
            }
            None => return (0, tk),
        }
    }
    (lo, hi)
}

/// C (m × n, row stride `c_rs`) = `beta`·C + `alpha`·A·B for A (m × k) and B (k × n) given by their row
/// and column strides. Single-threaded: the kernels parallelise over heads.
#[allow(clippy::too_many_arguments)]
fn matmul<T: Real>(
    (m, n, k): (usize, usize, usize),
    c: &mut [T],
    c_rs: usize,
    accumulate: bool,
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
    alpha: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    debug_assert!(c.len() >= (m - 1) * c_rs + n);
    debug_assert!(k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    debug_assert!(k == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the asserts above (checked in debug builds, guaranteed by the callers' shapes) keep every
    // index gemm touches inside the three slices, and `c` does not alias `a` or `b` (it is borrowed
    // mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::one(),
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// c (rows × d) = alpha · a·b for a (rows × n) and b (n × d), all row-major: attention's p·v and ds·k.
fn product<T: Real>(c: &mut [T], (rows, n, d): (usize, usize, usize), a: &[T], b: &[T], alpha: T) {
    matmul((rows, d, n), c, d, false, a, (n, 1), b, (d, 1), alpha);
}

/// c (n × d) += alpha · aᵀ·b for a (rows × n) and b (rows × d), all row-major: the key and value
/// gradients dsᵀ·q and pᵀ·go.
fn add_transposed_product<T: Real>(
    c: &mut [T],
    (rows, n, d): (usize, usize, usize),
    a: &[T],
    b: &[T],
    alpha: T,
) {
    matmul((n, d, rows), c, d, true, a, (1, n), b, (d, 1), alpha);
}

/// p (rows × n) = q·kᵀ·scale for `rows` query rows and `n` key rows of width d.
fn scaled_scores<T: Real>(
    p: &mut [T],
    (rows, n, d): (usize, usize, usize),
    q: &[T],
    k: &[T],
    scale: T,
) {
    matmul((rows, n, d), p, n, false, q, (d, 1), k, (1, d), scale);
}

/// Forward pass: the outputs (b, h, tq, d) and, per query row, the maximum logit and the sum of the
/// exponentials. They are kept apart rather than as one log-sum-exp: with a mask of −1e9 in f32,
/// max + ln(sum) rounds back to max, and a row with no visible key would lose its 1/sum.
fn forward<T: Real>(
    dims: Dims,
    q: &[T],
    k: &[T],
    v: &[T],
    bias: &[T],
    scale: f64,
) -> (Vec<T>, Vec<(f64, f64)>) {
    let Dims { tq, tk, d, .. } = dims;
    let mut out = vec![T::zero(); dims.b * dims.h * tq * d];
    let mut lse = vec![(0f64, 0f64); dims.b * dims.h * tq];
    out.par_chunks_mut(tq * d.max(1))
        .zip(lse.par_chunks_mut(tq.max(1)))
        .enumerate()
        .for_each(|(bh, (out, lse))| {
            let mut scores = Vec::new();
            attend(
                (tq, tk, d),
                &q[bh * tq * d..(bh + 1) * tq * d],
                &k[bh * tk * d..(bh + 1) * tk * d],
                &v[bh * tk * d..(bh + 1) * tk * d],
                &bias[dims.bias_offset(bh)..dims.bias_offset(bh) + tq * tk],
                real(scale),
                (out, lse),
                &mut scores,
            );
        });
    (out, lse)
}

/// One head's attention: `out` (tq × d) = softmax(q·kᵀ·scale + bias)·v for q (tq × d), k and v (tk × d)
/// and bias (tq × tk), all row-major, in tiles of [`TILE`] query rows; `lse` receives each row's maximum
/// logit and sum of exponentials. `scores` is scratch space, grown as needed.
#[allow(clippy::too_many_arguments)]
fn attend<T: Real>(
    (tq, tk, d): (usize, usize, usize),
    q: &[T],
    k: &[T],
    v: &[T],
    bias: &[T],
    scale: T,
    (out, lse): (&mut [T], &mut [(f64, f64)]),
    scores: &mut Vec<T>,
) {
    if scores.len() < TILE * tk {
        scores.resize(TILE * tk, T::zero());
    }
    for r0 in (0..tq).step_by(TILE) {
        let rows = TILE.min(tq - r0);
        let (lo, hi) = key_range(bias, tk, r0..r0 + rows);
        let n = hi - lo;
        let p = &mut scores[..rows * n];
        scaled_scores(p, (rows, n, d), &q[r0 * d..], &k[lo * d..], scale);
        for r in 0..rows {
            let row = &mut p[r * n..(r + 1) * n];
            let bias_row = &bias[(r0 + r) * tk + lo..(r0 + r) * tk + hi];
            for (x, &b) in row.iter_mut().zip(bias_row) {
                *x += b;
            }
            // Maximum, exponentials and sum in separate passes: with the sum accumulated inside the
            // exponentials' loop, that loop stayed scalar (13% of a training step, perf); apart, each
            // vectorises.
            let max = max_of(row);
            T::exp_shifted(row, max);
            let sum = sum_of(row);
            let inv = sum.recip();
            row.iter_mut().for_each(|x| *x *= inv);
            lse[r0 + r] = (WithDType::to_f64(max), WithDType::to_f64(sum));
        }
        // out = p·v.
        product(&mut out[r0 * d..], (rows, n, d), p, &v[lo * d..], T::one());
    }
}

/// Query rows per tile of [`attend_panels`]. Tiles of few rows skip more of a causal mask's keys; the
/// AVX2 micro-kernel takes six rows at a time, so a multiple of six loses nothing to it (the AVX-512
/// one takes the twelve in one block). In one run of a scratch program, nmm-s's attention (8 heads of
/// 32) over 16 samples of 75 rows took 1.09 ms with tiles of 12 rows, 1.14 with 24, 1.19 with 18 and
/// 1.28 with 64 (the tile of the gemm path).
const PANEL_TILE: usize = 12;

/// Per query row, the keys it sees: the first and one past the last whose bias is above the mask
/// threshold, or all keys for a row that sees none (as [`key_range`] takes such a row). Computed once
/// per sample for all heads.
fn row_ranges<T: Real>(bias: &[T], tk: usize, out: &mut Vec<(usize, usize)>) {
    let threshold = real::<T>(MASK_THRESHOLD);
    out.extend(bias.chunks_exact(tk.max(1)).map(
        |row| match row.iter().position(|&x| x > threshold) {
            Some(first) => (
                first,
                row.iter().rposition(|&x| x > threshold).unwrap_or(first) + 1,
            ),
            None => (0, tk),
        },
    ));
}

/// [`attend`] in f32 with q·kᵀ and p·v through the packed-panel micro-kernel
/// ([`crate::panels::panel_product`]) instead of gemm, whose packing and dispatch cost more than the
/// arithmetic at a sample's size (tens of rows, heads of 32). `ranges` holds each query row's span of
/// keys, from the first it sees to the last ([`row_ranges`]): only those get a logit and an
/// exponential (the masked keys inside the span come out 0), the others of the tile's key range weigh
/// 0, which their exponentials would be. The keys are packed transposed and the values packed
/// once for all query tiles; a tile's key range is widened to whole panels of keys. The rows are divided
/// by their sums after p·v (d values a row) rather than before (one per key). False, with nothing
/// written, where the CPU has no micro-kernel.
fn attend_panels(
    dims: (usize, usize, usize),
    inputs: HeadInputs<f32>,
    scale: f32,
    out: HeadOutputs<f32>,
    scratch: &mut [Vec<f32>; 3],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::panels::panels_available() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time).
        unsafe { attend_panels_avx2(dims, inputs, scale, out, scratch) };
        return true;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (dims, inputs, scale, out, scratch);
    false
}

/// [`attend_panels`]' work, its loops (logits, maximum, exponentials, sums) compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_panels_avx2(
    (tq, tk, d): (usize, usize, usize),
    (q, k, v, bias, ranges): HeadInputs<f32>,
    scale: f32,
    (out, lse): HeadOutputs<f32>,
    [scores, keys, values]: &mut [Vec<f32>; 3],
) {
    use crate::panels::{PANEL, pack_into, pack_transposed_into, panel_product};
    assert!(
        ranges.len() == tq,
        "attention: {} key ranges for {tq} rows",
        ranges.len()
    );
    if tq == 0 || d == 0 {
        return;
    }
    pack_transposed_into(&k[..tk * d], tk, d, keys);
    pack_into(&v[..tk * d], tk, d, values);
    for r0 in (0..tq).step_by(PANEL_TILE) {
        let rows = PANEL_TILE.min(tq - r0);
        let tile_ranges = &ranges[r0..r0 + rows];
        let lo = tile_ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let hi = tile_ranges.iter().map(|r| r.1).max().unwrap_or(tk).min(tk);
        let (first, end) = (lo / PANEL, hi.div_ceil(PANEL));
        let lo = first * PANEL;
        let n = hi - lo;
        if scores.len() < rows * n {
            scores.resize(rows * n, 0.0);
        }
        let p = &mut scores[..rows * n];
        let q_tile = &q[r0 * d..(r0 + rows) * d];
        for j in first..end {
            let panel = &keys[j * d * PANEL..(j + 1) * d * PANEL];
            let cols = PANEL.min(hi - j * PANEL);
            let done = panel_product(q_tile, d, panel, &mut p[j * PANEL - lo..], n, rows, cols);
            debug_assert!(done, "the caller checked for the micro-kernel");
        }
        for (r, &(a, b)) in tile_ranges.iter().enumerate() {
            let row = &mut p[r * n..(r + 1) * n];
            let (a, b) = (a - lo, b.min(hi) - lo);
            let bias_row = &bias[(r0 + r) * tk + lo..(r0 + r) * tk + hi];
            row[..a].fill(0.0);
            row[b..].fill(0.0);
            let seen = &mut row[a..b];
            for (x, &b) in seen.iter_mut().zip(&bias_row[a..b]) {
                *x = *x * scale + b;
            }
            let max = max_of(seen);
            exp_shifted_loop(seen, max);
            lse[r0 + r] = (f64::from(max), f64::from(sum_of(seen)));
        }
        let o_tile = &mut out[r0 * d..(r0 + rows) * d];
        for j in 0..d.div_ceil(PANEL) {
            let panel = &values[(j * tk + lo) * PANEL..(j * tk + hi) * PANEL];
            let cols = PANEL.min(d - j * PANEL);
            let done = panel_product(p, n, panel, &mut o_tile[j * PANEL..], d, rows, cols);
            debug_assert!(done, "the caller checked for the micro-kernel");
        }
        for (o, &(_, sum)) in o_tile.chunks_exact_mut(d).zip(&lse[r0..r0 + rows]) {
            let inv = (sum as f32).recip();
            o.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// The inputs of one head's attention: q, k, v, the bias and each query row's keys ([`row_ranges`]).
type HeadInputs<'a, T> = (&'a [T], &'a [T], &'a [T], &'a [T], &'a [(usize, usize)]);

/// The outputs of one head's attention: its rows, and each row's maximum logit and sum of exponentials.
type HeadOutputs<'a, T> = (&'a mut [T], &'a mut [(f64, f64)]);

/// One head's attention where no backward pass will follow: [`attend_panels`] where the type and the
/// CPU allow it, [`attend`] otherwise.
fn attend_inference<T: Real>(
    dims: (usize, usize, usize),
    inputs: HeadInputs<T>,
    scale: f64,
    (out, lse): HeadOutputs<T>,
    scratch: &mut [Vec<T>; 3],
) {
    if !T::attend_panels(dims, inputs, real(scale), (out, lse), scratch) {
        let (q, k, v, bias, _) = inputs;
        attend(
            dims,
            q,
            k,
            v,
            bias,
            real(scale),
            (out, lse),
            &mut scratch[0],
        );
    }
}

/// The samples of a packed batch: rows laid end to end without padding, each sample attending only to
/// its own rows.
#[derive(Debug, Clone, Default)]
pub struct Segments {
    /// Per sample, its first packed row and its number of rows.
    pub spans: Vec<(usize, usize)>,
    /// Per sample, its additive attention bias (len × len, row-major: mask and per-key terms), end to end
    /// in sample order.
    pub bias: Vec<f32>,
}

impl Segments {
    /// The rows all samples hold together.
    pub fn rows(&self) -> usize {
        self.spans.iter().map(|&(_, len)| len).sum()
    }

    fn check(&self, rows: usize) -> Result<()> {
        let mut next = 0;
        for (s, &(start, len)) in self.spans.iter().enumerate() {
            if start != next {
                bail!("packed attention: sample {s} starts at row {start}, expected {next}");
            }
            next += len;
        }
        if next != rows {
            bail!("packed attention: the samples hold {next} rows, the queries {rows}");
        }
        let squares: usize = self.spans.iter().map(|&(_, len)| len * len).sum();
        if self.bias.len() != squares {
            bail!(
                "packed attention: {} bias values for samples needing {squares}",
                self.bias.len()
            );
        }
        Ok(())
    }
}

/// Attention over a packed batch, for inference: q, k and v (1, h, rows, d) hold the samples of
/// `segments` end to end, and each sample's queries see only its own keys, through its bias block. The
/// result, (1, rows, h · d) with the heads side by side as the output projection takes them, equals
/// [`attention`] over the same samples padded to a common length, at their real rows, but computes no
/// padding. It has no backward pass: inputs that track gradients are refused.
pub fn segment_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Segments,
    scale: f64,
) -> Result<Tensor> {
    let (one, h, rows, d) = q.dims4()?;
    if one != 1 || k.dims() != q.dims() || v.dims() != q.dims() {
        bail!(
            "packed attention: q {:?}, k {:?} and v {:?} must be (1, h, rows, d) alike",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if [q, k, v].iter().any(|x| x.track_op()) {
        bail!("packed attention has no backward pass; inputs that need gradients take `attention`");
    }
    segments.check(rows)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    macro_rules! run {
        ($t:ty) => {{
            let bias = <$t>::from_f32s(&segments.bias);
            let out = with_slice::<$t, _>(&q, |q| {
                with_slice::<$t, _>(&k, |k| {
                    with_slice::<$t, _>(&v, |v| {
                        Ok(segment_forward::<$t>(
                            (h, rows, d),
                            q,
                            k,
                            v,
                            segments,
                            &bias,
                            scale,
                        ))
                    })
                })
            })?;
            Tensor::from_vec(out, (1, rows, h * d), q.device())
        }};
    }
    match q.dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        dtype => bail!("packed attention supports f32 and f64, not {dtype:?}"),
    }
}

/// [`segment_attention`]'s arithmetic: heads in parallel, each sample's rows a separate
/// [`attend_panels`] (or [`attend`] where the CPU has no micro-kernel, and in f64), its rows' key
/// ranges found once for all heads; then the heads are interleaved into (rows, h · d), rows in parallel.
#[allow(clippy::too_many_arguments)]
fn segment_forward<T: Real>(
    (h, rows, d): (usize, usize, usize),
    q: &[T],
    k: &[T],
    v: &[T],
    segments: &Segments,
    bias: &[T],
    scale: f64,
) -> Vec<T> {
    let mut ranges = Vec::with_capacity(rows);
    let mut bias_at = 0;
    for &(_, len) in &segments.spans {
        row_ranges(&bias[bias_at..bias_at + len * len], len, &mut ranges);
        bias_at += len * len;
    }
    let mut out = vec![T::zero(); h * rows * d];
    let per_head = rows * d;
    out.par_chunks_mut(per_head.max(1))
        .enumerate()
        .for_each(|(head, out)| {
            let [q, k, v] = [q, k, v].map(|x| &x[head * per_head..(head + 1) * per_head]);
            let mut scratch: [Vec<T>; 3] = Default::default();
            let mut lse = Vec::new();
            let mut bias_at = 0;
            for &(start, len) in &segments.spans {
                let span = start * d..(start + len) * d;
                lse.resize(len, (0.0, 0.0));
                let (q, k, v) = (&q[span.clone()], &k[span.clone()], &v[span.clone()]);
                let bias = &bias[bias_at..bias_at + len * len];
                let out = &mut out[span];
                let inputs = (q, k, v, bias, &ranges[start..start + len]);
                attend_inference((len, len, d), inputs, scale, (out, &mut lse), &mut scratch);
                bias_at += len * len;
            }
        });
    let mut interleaved = vec![T::zero(); h * rows * d];
    interleaved
        .par_chunks_mut((h * d).max(1))
        .enumerate()
        .for_each(|(row, dst)| {
            for (head, dst) in dst.chunks_mut(d.max(1)).enumerate() {
                let from = head * per_head + row * d;
                dst.copy_from_slice(&out[from..from + d]);
            }
        });
    interleaved
}

/// Backward pass: gradients of q, k and v given the outputs' gradient `go`, written into `dq`, `dk` and
/// `dv`, which must hold zeros (the key and value gradients accumulate over query tiles).
#[allow(clippy::too_many_arguments)]
fn backward<T: Real>(
    dims: Dims,
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    go: &[T],
    bias: &[T],
    lse: &[(f64, f64)],
    scale: f64,
    (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
) {
    let Dims { tq, tk, d, .. } = dims;
    let scale_t: T = real(scale);
    dq.par_chunks_mut(tq * d.max(1))
        .zip(dk.par_chunks_mut(tk * d.max(1)))
        .zip(dv.par_chunks_mut(tk * d.max(1)))
        .enumerate()
        .for_each(|(bh, ((dq, dk), dv))| {
            let q = &q[bh * tq * d..(bh + 1) * tq * d];
            let o = &o[bh * tq * d..(bh + 1) * tq * d];
            let go = &go[bh * tq * d..(bh + 1) * tq * d];
            let k = &k[bh * tk * d..(bh + 1) * tk * d];
            let v = &v[bh * tk * d..(bh + 1) * tk * d];
            let bias = &bias[dims.bias_offset(bh)..dims.bias_offset(bh) + tq * tk];
            let lse = &lse[bh * tq..(bh + 1) * tq];
            let mut p_buf = vec![T::zero(); TILE * tk];
            let mut dp_buf = vec![T::zero(); TILE * tk];
            for r0 in (0..tq).step_by(TILE) {
                let rows = TILE.min(tq - r0);
                let (lo, hi) = key_range(bias, tk, r0..r0 + rows);
                let n = hi - lo;
                let p = &mut p_buf[..rows * n];
                let dp = &mut dp_buf[..rows * n];
                // Recompute p = exp(q·kᵀ·scale + bias − max) / sum.
                scaled_scores(p, (rows, n, d), &q[r0 * d..], &k[lo * d..], scale_t);
                for r in 0..rows {
                    let bias_row = &bias[(r0 + r) * tk + lo..(r0 + r) * tk + hi];
                    let (max, sum) = lse[r0 + r];
                    let (max, inv): (T, T) = (real(max), real::<T>(sum).recip());
                    T::exp_biased(&mut p[r * n..(r + 1) * n], bias_row, max, inv);
                }
                // dp = go·vᵀ; ds = p ∘ (dp − rowsum(go ∘ o)), stored in dp.
                matmul(
                    (rows, n, d),
                    dp,
                    n,
                    false,
                    &go[r0 * d..],
                    (d, 1),
                    &v[lo * d..],
                    (1, d),
                    T::one(),
                );
                for r in 0..rows {
                    let row = (r0 + r) * d..(r0 + r + 1) * d;
                    let delta: T = go[row.clone()]
                        .iter()
                        .zip(&o[row])
                        .map(|(&g, &y)| g * y)
                        .sum();
                    for (ds, &pr) in dp[r * n..(r + 1) * n]
                        .iter_mut()
                        .zip(&p[r * n..(r + 1) * n])
                    {
                        *ds = pr * (*ds - delta);
                    }
                }
                // dq = ds·k·scale; dk += dsᵀ·q·scale; dv += pᵀ·go.
                let shape = (rows, n, d);
                product(&mut dq[r0 * d..], shape, dp, &k[lo * d..], scale_t);
                add_transposed_product(&mut dk[lo * d..], shape, dp, &q[r0 * d..], scale_t);
                add_transposed_product(&mut dv[lo * d..], shape, p, &go[r0 * d..], T::one());
            }
        });
}

// ------------------------------------------------------------------------------------------------
// Elementwise kernels: one pass over memory where the plain ops make several, each with a fresh
// tensor. Rows are processed in parallel chunks.

/// Rows per parallel chunk of the row-wise kernels.
const ROWS_PER_CHUNK: usize = 64;

/// Whether the elementwise kernels can run on these tensors (CPU, f32 or f64) and any tensor in
/// `constants` needs no gradient.
pub fn elementwise_supported(x: &Tensor, constants: &[&Tensor]) -> bool {
    fused_enabled()
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && constants.iter().all(|c| !c.track_op())
}

/// A fused kernel of two same-dtype inputs, written once for f32 and f64; [`Binary`] makes it a candle
/// op.
trait BinaryKernel: Send + Sync + 'static {
    const NAME: &'static str;
    fn forward<T: Real>(&self, a: &[T], b: &[T]) -> Vec<T>;
    /// The gradients of a and b (each of its input's length) given the output's gradient `g`.
    fn backward<T: Real>(&self, a: &[T], b: &[T], g: &[T]) -> (Vec<T>, Vec<T>);
}

struct Binary<K>(K);

impl<K: BinaryKernel> candle_core::CustomOp2 for Binary<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(self.0.forward(
                contiguous_slice::<f32>(s1, l1, K::NAME)?,
                contiguous_slice::<f32>(s2, l2, K::NAME)?,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(self.0.forward(
                contiguous_slice::<f64>(s1, l1, K::NAME)?,
                contiguous_slice::<f64>(s2, l2, K::NAME)?,
            )),
            _ => bail!("{} needs two f32 or two f64 inputs", K::NAME),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        macro_rules! grads {
            ($t:ty) => {{
                let (da, db) = with_slice::<$t, _>(a, |a| {
                    with_slice::<$t, _>(b, |b| {
                        with_slice::<$t, _>(&grad, |g| Ok(self.0.backward(a, b, g)))
                    })
                })?;
                (
                    Tensor::from_vec(da, a.shape(), a.device())?,
                    Tensor::from_vec(db, b.shape(), b.device())?,
                )
            }};
        }
        let (da, db) = match a.dtype() {
            DType::F32 => grads!(f32),
            DType::F64 => grads!(f64),
            dtype => bail!("{} supports f32 and f64, not {dtype:?}", K::NAME),
        };
        Ok((Some(da), Some(db)))
    }
}

/// RMSNorm over the last dimension, x / sqrt(mean(x²) + eps) · weight, for x (…, d) and weight (d).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [d] {
        bail!("rms_norm: weight {:?} for rows of {d}", weight.dims());
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, Binary(RmsNorm { eps }))
}

struct RmsNorm {
    eps: f64,
}

/// Whether [`adamw_update`] can run on this variable, gradient and moments: fused kernels on, CPU, f32
/// throughout, one shape.
pub fn adamw_supported(var: &Tensor, grad: &Tensor, (m, v): (&Tensor, &Tensor)) -> bool {
    fused_enabled()
        && var.device().is_cpu()
        && [var, grad, m, v]
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.dims() == var.dims())
}

/// Elements per parallel chunk of [`adamw_update`].
const UPDATE_CHUNK: usize = 1 << 14;

/// One AdamW update of an f32 variable in a single pass: from `var`, its gradient and its moment
/// estimates (m, v), the next value and the next m and v. Bit for bit the arithmetic of
/// [`crate::optim::update_plain`], whose eight candle operations each read and write the whole variable:
/// candle multiplies by a scalar in f32 after computing it in f64, and divides by one as a
/// multiplication by its inverse.
pub fn adamw_update(
    var: &Tensor,
    grad: &Tensor,
    (m, v): (&Tensor, &Tensor),
    s: &crate::optim::UpdateStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    if !adamw_supported(var, grad, (m, v)) {
        bail!(
            "fused AdamW: variable {:?} ({:?}), gradient {:?} ({:?}), moments {:?} and {:?}",
            var.dims(),
            var.dtype(),
            grad.dims(),
            grad.dtype(),
            m.dims(),
            v.dims()
        );
    }
    let (grad, m, v) = (grad.contiguous()?, m.contiguous()?, v.contiguous()?);
    let var = var.contiguous()?;
    let n = var.elem_count();
    let (beta1, beta2) = (s.beta1 as f32, s.beta2 as f32);
    let (rest1, rest2) = ((1.0 - s.beta1) as f32, (1.0 - s.beta2) as f32);
    let (inv_c1, inv_c2) = ((1.0 / s.correction1) as f32, (1.0 / s.correction2) as f32);
    let (eps, lr, keep) = (s.eps as f32, s.lr as f32, (1.0 - s.lr * s.decay) as f32);
    let mut next = vec![0f32; n];
    let mut m_next = vec![0f32; n];
    let mut v_next = vec![0f32; n];
    with_slice::<f32, _>(&var, |x| {
        with_slice::<f32, _>(&grad, |g| {
            with_slice::<f32, _>(&m, |m| {
                with_slice::<f32, _>(&v, |v| {
                    next.par_chunks_mut(UPDATE_CHUNK)
                        .zip(m_next.par_chunks_mut(UPDATE_CHUNK))
                        .zip(v_next.par_chunks_mut(UPDATE_CHUNK))
                        .enumerate()
                        .for_each(|(c, ((next, m_next), v_next))| {
                            let at = c * UPDATE_CHUNK..(c * UPDATE_CHUNK + next.len());
                            let (x, g, m, v) =
                                (&x[at.clone()], &g[at.clone()], &m[at.clone()], &v[at]);
                            for i in 0..next.len() {
                                let mi = m[i] * beta1 + g[i] * rest1;
                                let vi = v[i] * beta2 + (g[i] * g[i]) * rest2;
                                let step = (mi * inv_c1) / ((vi * inv_c2).sqrt() + eps);
                                next[i] = x[i] * keep - step * lr;
                                m_next[i] = mi;
                                v_next[i] = vi;
                            }
                        });
                    Ok(())
                })
            })
        })
    })?;
    let (shape, device) = (var.shape(), var.device());
    Ok((
        Tensor::from_vec(next, shape, device)?,
        Tensor::from_vec(m_next, shape, device)?,
        Tensor::from_vec(v_next, shape, device)?,
    ))
}

/// Σ a_i·b_i·c_i over the common length, in eight interleaved partial sums. A single running sum waits
/// on each addition's latency (about four cycles per element); eight independent ones vectorise, which
/// made the fused norms about twice as fast (docs/performance.md).
fn dot3<T: Real>(a: &[T], b: &[T], c: &[T]) -> T {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut lanes = [T::zero(); 8];
    let (ac, bc, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let tail: T = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .zip(cc.remainder())
        .map(|((&x, &y), &z)| x * y * z)
        .sum();
    for ((x, y), z) in ac.zip(bc).zip(cc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l] * z[l];
        }
    }
    lanes.iter().copied().sum::<T>() + tail
}

/// Σ x_i, as [`dot3`] does it.
#[inline]
fn sum_of<T: Real>(row: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let chunks = row.chunks_exact(8);
    let tail: T = chunks.remainder().iter().copied().sum();
    for x in chunks {
        for l in 0..8 {
            lanes[l] += x[l];
        }
    }
    lanes.iter().copied().sum::<T>() + tail
}

/// The largest x_i (−∞ for an empty row; NaN is skipped, as [`Float::max`] does), in eight
/// interleaved lanes so that it vectorises.
#[inline]
fn max_of<T: Real>(row: &[T]) -> T {
    let mut lanes = [T::neg_infinity(); 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |m, &x| Float::max(m, x));
    for x in chunks {
        for l in 0..8 {
            lanes[l] = Float::max(lanes[l], x[l]);
        }
    }
    lanes.iter().fold(tail, |m, &x| Float::max(m, x))
}

/// Σ x_i², as [`dot3`] does it.
fn sum_squares<T: Real>(row: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let chunks = row.chunks_exact(8);
    let tail: T = chunks.remainder().iter().map(|&x| x * x).sum();
    for x in chunks {
        for l in 0..8 {
            lanes[l] += x[l] * x[l];
        }
    }
    lanes.iter().copied().sum::<T>() + tail
}

/// 1 / sqrt(mean(x²) + eps) of one row.
fn inv_rms<T: Real>(row: &[T], eps: f64) -> T {
    let mean_square: T = sum_squares(row) / real(row.len() as f64);
    (mean_square + real(eps)).sqrt().recip()
}

/// One row's RMSNorm by `w`, value by value.
fn rms_normed<'a, T: Real>(row: &'a [T], w: &'a [T], eps: f64) -> impl Iterator<Item = T> + 'a {
    let inv = inv_rms(row, eps);
    row.iter().zip(w).map(move |(&x, &w)| x * inv * w)
}

/// Whether an inference kernel over `len` values in rows of `d` builds its output in one pass, row
/// after row, rather than zero-filling it first and handing out jobs of [`ROWS_PER_CHUNK`] rows: when
/// the rows fit in one job, there is nothing to share out, and the zero-fill was a serial pass over
/// memory that the writes then went over again. A reduced batch-1 prefill's norms (17 rows) are this
/// case: FastV's batch-1 planned prefill of nmm-s, the two ways alternating pass by pass in one
/// process, took 1,226–1,248 µs against 1,235–1,257 (10th percentiles of 2,000 passes, three runs).
fn one_job(len: usize, d: usize) -> bool {
    len <= d * ROWS_PER_CHUNK
}

impl BinaryKernel for RmsNorm {
    const NAME: &'static str = "fused-rms-norm";

    fn forward<T: Real>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let d = w.len();
        if one_job(x.len(), d) {
            let mut out = Vec::with_capacity(x.len());
            for x in x.chunks(d.max(1)) {
                out.extend(rms_normed(x, w, self.eps));
            }
            return out;
        }
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(d * ROWS_PER_CHUNK)
            .zip(x.par_chunks(d * ROWS_PER_CHUNK))
            .for_each(|(out, x)| {
                for (y, x) in out.chunks_mut(d).zip(x.chunks(d)) {
                    for (y, v) in y.iter_mut().zip(rms_normed(x, w, self.eps)) {
                        *y = v;
                    }
                }
            });
        out
    }

    fn backward<T: Real>(&self, x: &[T], w: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
        let d = w.len();
        let mut dx = vec![T::zero(); x.len()];
        let dw = dx
            .par_chunks_mut(d * ROWS_PER_CHUNK)
            .zip(x.par_chunks(d * ROWS_PER_CHUNK))
            .zip(g.par_chunks(d * ROWS_PER_CHUNK))
            .map(|((dx, x), g)| {
                let mut dw = vec![T::zero(); d];
                for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                    let inv = inv_rms(x, self.eps);
                    // d/dx of x·inv·w: inv·(g∘w) − x·inv³·Σ(g∘w∘x)/d.
                    let dot = dot3(g, w, x);
                    let k = inv * inv * inv * dot / real(d as f64);
                    for i in 0..d {
                        dx[i] = inv * g[i] * w[i] - x[i] * k;
                        dw[i] += g[i] * x[i] * inv;
                    }
                }
                dw
            })
            .reduce(
                || vec![T::zero(); d],
                |a, b| a.iter().zip(&b).map(|(&a, &b)| a + b).collect(),
            );
        (dx, dw)
    }
}

/// SwiGLU, silu(gate) · up, for two tensors of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        );
    }
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, Binary(SwiGlu))
}

struct SwiGlu;

/// Elements per parallel chunk of the elementwise kernels.
const ELEMENTS_PER_CHUNK: usize = 1 << 14;

#[inline(always)]
fn sigmoid<T: Real>(x: T) -> T {
    (T::one() + (-x).fast_exp()).recip()
}

/// silu(gate) · up.
#[inline(always)]
fn swiglu_value<T: Real>(gate: T, up: T) -> T {
    gate * sigmoid(gate) * up
}

/// The gradients of gate and up given the output's gradient `g`; silu'(x) = s + x·s·(1 − s).
#[inline(always)]
fn swiglu_grads<T: Real>(gate: T, up: T, g: T) -> (T, T) {
    let s = sigmoid(gate);
    (g * up * (s + gate * s * (T::one() - s)), g * gate * s)
}

impl BinaryKernel for SwiGlu {
    const NAME: &'static str = "fused-swiglu";

    fn forward<T: Real>(&self, gate: &[T], up: &[T]) -> Vec<T> {
        let mut out = vec![T::zero(); gate.len()];
        out.par_chunks_mut(ELEMENTS_PER_CHUNK)
            .zip(gate.par_chunks(ELEMENTS_PER_CHUNK))
            .zip(up.par_chunks(ELEMENTS_PER_CHUNK))
            .for_each(|((out, gate), up)| T::swiglu_into(out, gate, up));
        out
    }

    fn backward<T: Real>(&self, gate: &[T], up: &[T], grad: &[T]) -> (Vec<T>, Vec<T>) {
        let mut dgate = vec![T::zero(); gate.len()];
        let mut dup = vec![T::zero(); gate.len()];
        dgate
            .par_chunks_mut(ELEMENTS_PER_CHUNK)
            .zip(dup.par_chunks_mut(ELEMENTS_PER_CHUNK))
            .zip(gate.par_chunks(ELEMENTS_PER_CHUNK))
            .zip(
                up.par_chunks(ELEMENTS_PER_CHUNK)
                    .zip(grad.par_chunks(ELEMENTS_PER_CHUNK)),
            )
            .for_each(|(((dgate, dup), gate), (up, grad))| {
                T::swiglu_grads_into(dgate, dup, gate, up, grad);
            });
        (dgate, dup)
    }
}

/// Rotary embeddings for x (b, h, t, hd) with cos and sin broadcastable to (b, 1, t, hd/2), as
/// [`crate::ops::apply_rope`]: (x1, x2) → (x1·c − x2·s, x1·s + x2·c) on the two halves of the head
/// dimension. The tables are constants: gradients flow to x only.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, hd) = x.dims4()?;
    if hd % 2 != 0 {
        bail!("rope: head dimension {hd} of x {:?} is odd", x.dims());
    }
    // Contiguous already in the model (gathered per position), so this copies nothing there.
    let table = |tab: &Tensor| {
        tab.broadcast_as((b, 1, t, hd / 2))?
            .to_dtype(x.dtype())?
            .contiguous()
    };
    x.contiguous()?.apply_op1(Rope {
        cos: table(cos)?,
        sin: table(sin)?,
        dims: x.dims4()?,
    })
}

struct Rope {
    /// (b, 1, t, hd/2) each, contiguous.
    cos: Tensor,
    sin: Tensor,
    dims: (usize, usize, usize, usize),
}

impl Rope {
    /// Rotates every head row of `x` by the tables (`sign` −1 for the inverse rotation, the backward).
    fn rotate<T: Real>(&self, x: &[T], sign: T) -> Result<Vec<T>> {
        with_slice::<T, _>(&self.cos, |cos| {
            with_slice::<T, _>(&self.sin, |sin| Ok(self.rotate_with(x, cos, sin, sign)))
        })
    }

    fn rotate_with<T: Real>(&self, x: &[T], cos: &[T], sin: &[T], sign: T) -> Vec<T> {
        let (_, h, t, hd) = self.dims;
        let half = hd / 2;
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(hd * t)
            .zip(x.par_chunks(hd * t))
            .enumerate()
            .for_each(|(bh, (out, x))| {
                let s = bh / h;
                for ti in 0..t {
                    let table = (s * t + ti) * half;
                    let (c, sn) = (&cos[table..table + half], &sin[table..table + half]);
                    let (x1, x2) = x[ti * hd..(ti + 1) * hd].split_at(half);
                    let (y1, y2) = out[ti * hd..(ti + 1) * hd].split_at_mut(half);
                    for i in 0..half {
                        let si = sign * sn[i];
                        y1[i] = x1[i] * c[i] - x2[i] * si;
                        y2[i] = x1[i] * si + x2[i] * c[i];
                    }
                }
            });
        out
    }
}

impl candle_core::CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.rotate(contiguous_slice::<f32>(s1, l1, "x")?, 1.0)?)
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.rotate(contiguous_slice::<f64>(s1, l1, "x")?, 1.0)?)
            }
            _ => bail!("fused rope supports f32 and f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The rotation is orthogonal: its gradient is the inverse rotation of the output's gradient.
        let grad = grad.contiguous()?;
        let (shape, device) = (x.shape(), x.device());
        let dx = match x.dtype() {
            DType::F32 => Tensor::from_vec(
                with_slice::<f32, _>(&grad, |g| self.rotate(g, -1.0))?,
                shape,
                device,
            )?,
            DType::F64 => Tensor::from_vec(
                with_slice::<f64, _>(&grad, |g| self.rotate(g, -1.0))?,
                shape,
                device,
            )?,
            dtype => bail!("fused rope supports f32 and f64, not {dtype:?}"),
        };
        Ok(Some(dx))
    }
}

/// One projection among those [`split_heads`] separates: its QK-norm weight (hd,), if any, and whether
/// its heads are rotated.
pub struct HeadPart<'a> {
    pub norm: Option<&'a Tensor>,
    pub rotate: bool,
}

/// For inference: projections laid side by side in `x` (b, t, parts · h · hd) → one (b, h, t, hd)
/// tensor per part, each head RMS-normed by its part's weight and rotated by `rope` (cos and sin,
/// (b, 1, t, hd/2)) where the part asks. The same values as a reshape, a transpose, [`rms_norm`] and
/// [`rope`] per part, in one pass over the rows instead of five operations and their temporaries. It
/// has no backward pass: inputs that need gradients are refused.
pub fn split_heads(
    x: &Tensor,
    h: usize,
    parts: &[HeadPart],
    rope: (&Tensor, &Tensor),
    eps: f64,
) -> Result<Vec<Tensor>> {
    let (b, t, width) = x.dims3()?;
    let n = parts.len();
    let (hd, cos, sin) = head_layout((b, t, width), h, parts, rope, x.dtype())?;
    if x.track_op() {
        bail!("split heads has no backward pass; inputs that need gradients take the plain ops");
    }
    let x = x.contiguous()?;
    let norms: Vec<Option<Tensor>> = parts
        .iter()
        .map(|p| {
            p.norm
                .map(|w| w.to_dtype(x.dtype())?.flatten_all()?.contiguous())
                .transpose()
        })
        .collect::<Result<_>>()?;
    let rotate: Vec<bool> = parts.iter().map(|p| p.rotate).collect();
    macro_rules! run {
        ($t:ty) => {{
            let norms: Vec<Option<Vec<$t>>> = norms
                .iter()
                .map(|w| w.as_ref().map(|w| w.to_vec1::<$t>()).transpose())
                .collect::<Result<_>>()?;
            let out = with_slice::<$t, _>(&x, |x| {
                with_tables::<$t, _>((&cos, &sin), |tables| {
                    Ok(split_heads_into::<$t>(
                        (b, t, h, hd),
                        x,
                        tables,
                        &norms,
                        &rotate,
                        eps,
                    ))
                })
            })?;
            Tensor::from_vec(out, (n, b, h, t, hd), x.device())?
        }};
    }
    let all = match x.dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        dtype => bail!("split heads supports f32 and f64, not {dtype:?}"),
    };
    (0..n).map(|p| all.get(p)).collect()
}

/// The head size of [`split_heads`]' parts laid side by side in rows (b, t, `width`), and the rotary
/// tables broadcast to (b, 1, t, hd/2), contiguous, in `dtype`; an error if the width does not hold the
/// parts' heads, the tables do not broadcast, a norm weight does not fit a head or needs gradients.
pub(crate) fn head_layout(
    (b, t, width): (usize, usize, usize),
    h: usize,
    parts: &[HeadPart],
    rope: (&Tensor, &Tensor),
    dtype: DType,
) -> Result<(usize, Tensor, Tensor)> {
    let n = parts.len();
    if n == 0 || h == 0 || !width.is_multiple_of(n * h) || !(width / (n * h)).is_multiple_of(2) {
        bail!(
            "split heads: a width of {width} does not hold {n} parts of {h} heads of an even size"
        );
    }
    let hd = width / (n * h);
    let (cos, sin) = broadcast_tables(rope, (b, t, hd / 2), "split heads")?;
    for part in parts {
        if let Some(norm) = part.norm
            && norm.elem_count() != hd
        {
            bail!(
                "split heads: a norm weight of {:?} for heads of {hd}",
                norm.dims()
            );
        }
    }
    if parts.iter().any(|p| p.norm.is_some_and(Tensor::track_op)) {
        bail!("split heads has no backward pass; inputs that need gradients take the plain ops");
    }
    let cos = cos.to_dtype(dtype)?.contiguous()?;
    let sin = sin.to_dtype(dtype)?.contiguous()?;
    Ok((hd, cos, sin))
}

/// The rotary tables `rope` (cos and sin) broadcast to (b, 1, t, half), or an error naming `what`.
fn broadcast_tables(
    rope: (&Tensor, &Tensor),
    (b, t, half): (usize, usize, usize),
    what: &str,
) -> Result<(Tensor, Tensor)> {
    let tables = [rope.0, rope.1].map(|tab| tab.broadcast_as((b, 1, t, half)));
    let [Ok(cos), Ok(sin)] = tables else {
        bail!(
            "{what}: rotary tables {:?} and {:?} do not broadcast to ({b}, 1, {t}, {half})",
            rope.0.dims(),
            rope.1.dims(),
        );
    };
    Ok((cos, sin))
}

/// For training: q, k and v projected side by side in `qkv` (b, t, 3 · h · hd) → one (3, b, h, t, hd)
/// tensor, as [`split_heads`] computes it for the parts q, k and v: the queries and keys RMS-normed per
/// head by `norms` (2, hd: the q weight, then the k weight) when given, and rotated by `rope` (cos and
/// sin, broadcasting to (b, 1, t, hd/2)); the values only change layout. Unlike [`split_heads`], it has
/// a backward pass, to `qkv` and `norms`. [`attention_qkv`] takes its result whole.
pub fn qkv_heads(
    qkv: &Tensor,
    norms: Option<&Tensor>,
    h: usize,
    rope: (&Tensor, &Tensor),
    eps: f64,
) -> Result<Tensor> {
    let (b, t, width) = qkv.dims3()?;
    if h == 0 || !width.is_multiple_of(3 * h) || !(width / (3 * h)).is_multiple_of(2) {
        bail!("qkv heads: a width of {width} does not hold 3 parts of {h} heads of an even size");
    }
    let hd = width / (3 * h);
    let (cos, sin) = broadcast_tables(rope, (b, t, hd / 2), "qkv heads")?;
    if let Some(norms) = norms
        && norms.dims() != [2, hd]
    {
        bail!(
            "qkv heads: norm weights of {:?} where (2, {hd}) were expected",
            norms.dims()
        );
    }
    let op = QkvHeads {
        h,
        eps,
        normed: norms.is_some(),
        cos: cos.to_dtype(qkv.dtype())?.contiguous()?,
        sin: sin.to_dtype(qkv.dtype())?.contiguous()?,
    };
    // Without norms, a constant stands in for them: it tracks no gradient and is never read.
    let norms = match norms {
        Some(norms) => norms.to_dtype(qkv.dtype())?.contiguous()?,
        None => Tensor::zeros((2, hd), qkv.dtype(), qkv.device())?,
    };
    qkv.contiguous()?.apply_op2(&norms, op)
}

/// [`qkv_heads`]' op.
struct QkvHeads {
    h: usize,
    eps: f64,
    normed: bool,
    /// (b, 1, t, hd/2), contiguous, in the input's dtype.
    cos: Tensor,
    sin: Tensor,
}

impl QkvHeads {
    /// (b, t, h, hd) of an input of `shape` (b, t, 3 · h · hd).
    fn dims(&self, shape: &Shape) -> Result<(usize, usize, usize, usize)> {
        let (b, t, width) = shape.dims3()?;
        Ok((b, t, self.h, width / (3 * self.h)))
    }

    /// The per-part norm weights (q, k, none for v) from `norms` (2 · hd), and which parts rotate.
    fn parts<T: Real>(&self, norms: &[T]) -> ([Option<Vec<T>>; 3], [bool; 3]) {
        let hd = norms.len() / 2;
        let weight = |p: usize| self.normed.then(|| norms[p * hd..(p + 1) * hd].to_vec());
        ([weight(0), weight(1), None], [true, true, false])
    }
}

impl candle_core::CustomOp2 for QkvHeads {
    fn name(&self) -> &'static str {
        "qkv-heads"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, t, h, hd) = self.dims(l1.shape())?;
        macro_rules! forward {
            ($t:ty, $wrap:path) => {{
                let x = contiguous_slice::<$t>(s1, l1, "qkv")?;
                let (norms, rotate) = self.parts(contiguous_slice::<$t>(s2, l2, "norms")?);
                let out = with_tables::<$t, _>((&self.cos, &self.sin), |tables| {
                    Ok(split_heads_into::<$t>(
                        (b, t, h, hd),
                        x,
                        tables,
                        &norms,
                        &rotate,
                        self.eps,
                    ))
                })?;
                Ok(($wrap(out), Shape::from((3, b, h, t, hd))))
            }};
        }
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => forward!(f32, CpuStorage::F32),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => forward!(f64, CpuStorage::F64),
            _ => bail!("qkv heads needs f32 or f64 inputs of one dtype"),
        }
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        norms: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, t, h, hd) = self.dims(qkv.shape())?;
        let grad = grad.contiguous()?;
        macro_rules! backward {
            ($t:ty) => {{
                let (dx, dnorms) = with_slice::<$t, _>(qkv, |x| {
                    with_slice::<$t, _>(norms, |w| {
                        with_slice::<$t, _>(&grad, |g| {
                            with_tables::<$t, _>((&self.cos, &self.sin), |tables| {
                                let (norms, rotate) = self.parts(w);
                                Ok(split_heads_backward::<$t>(
                                    (b, t, h, hd),
                                    x,
                                    tables,
                                    &norms,
                                    &rotate,
                                    self.eps,
                                    g,
                                ))
                            })
                        })
                    })
                })?;
                let dx = Tensor::from_vec(dx, qkv.shape(), qkv.device())?;
                // The v part has no norm: its slot of `dnorms` is dropped.
                let dnorms = Tensor::from_vec(dnorms[..2 * hd].to_vec(), (2, hd), qkv.device())?;
                (dx, dnorms)
            }};
        }
        let (dx, dnorms) = match qkv.dtype() {
            DType::F32 => backward!(f32),
            DType::F64 => backward!(f64),
            dtype => bail!("qkv heads supports f32 and f64, not {dtype:?}"),
        };
        Ok((Some(dx), self.normed.then_some(dnorms)))
    }
}

/// The backward pass of [`split_heads_into`]: given the outputs' gradient `g` (parts, b, h, t, hd), the
/// gradient of `x` (b · t rows of parts · h · hd) and of each part's norm weight (parts · hd, zeros
/// where a part has none). Rows run in parallel chunks, each summing its own norm-weight gradient.
fn split_heads_backward<T: Real>(
    (b, t, h, hd): (usize, usize, usize, usize),
    x: &[T],
    (cos, sin): (&[T], &[T]),
    norms: &[Option<Vec<T>>],
    rotate: &[bool],
    eps: f64,
    g: &[T],
) -> (Vec<T>, Vec<T>) {
    let parts = norms.len();
    let width = parts * h * hd;
    let half = hd / 2;
    let mut dx = vec![T::zero(); b * t * width];
    let partial: Vec<Vec<T>> = dx
        .par_chunks_mut((width * ROWS_PER_CHUNK).max(1))
        .enumerate()
        .map(|(chunk, dx)| {
            let mut dw = vec![T::zero(); parts * hd];
            let mut gy = vec![T::zero(); hd];
            for (i, dx_row) in dx.chunks_mut(width.max(1)).enumerate() {
                let row = chunk * ROWS_PER_CHUNK + i;
                let (s, ti) = (row / t, row % t);
                for p in 0..parts {
                    for head in 0..h {
                        let at = (p * h + head) * hd;
                        let from = (((p * b + s) * h + head) * t + ti) * hd;
                        gy.copy_from_slice(&g[from..from + hd]);
                        // The rotation's transpose: the same angles, turned back.
                        if rotate[p] {
                            let c = &cos[row * half..(row + 1) * half];
                            let sn = &sin[row * half..(row + 1) * half];
                            let (g1, g2) = gy.split_at_mut(half);
                            for j in 0..half {
                                let (a, z) = (g1[j], g2[j]);
                                g1[j] = a * c[j] + z * sn[j];
                                g2[j] = z * c[j] - a * sn[j];
                            }
                        }
                        let src = &x[row * width + at..row * width + at + hd];
                        let dst = &mut dx_row[at..at + hd];
                        match &norms[p] {
                            // y = x·inv·w with inv = 1/√(mean(x²) + eps):
                            // dx = inv·(g∘w) − x·inv³·Σ(g∘w∘x)/hd, and dw += g∘x·inv.
                            Some(w) => {
                                let inv = inv_rms(src, eps);
                                let coef = inv * inv * inv * dot3(&gy, w, src) / real(hd as f64);
                                let dw = &mut dw[p * hd..(p + 1) * hd];
                                for j in 0..hd {
                                    dst[j] = inv * gy[j] * w[j] - src[j] * coef;
                                    dw[j] += gy[j] * src[j] * inv;
                                }
                            }
                            None => dst.copy_from_slice(&gy),
                        }
                    }
                }
            }
            dw
        })
        .collect();
    let mut dnorms = vec![T::zero(); parts * hd];
    for dw in partial {
        for (total, x) in dnorms.iter_mut().zip(dw) {
            *total += x;
        }
    }
    (dx, dnorms)
}

/// [`split_heads`]' arithmetic: (part, sample, head) blocks in parallel, written as (parts, b, h, t, hd).
fn split_heads_into<T: Real>(
    (b, t, h, hd): (usize, usize, usize, usize),
    x: &[T],
    (cos, sin): (&[T], &[T]),
    norms: &[Option<Vec<T>>],
    rotate: &[bool],
    eps: f64,
) -> Vec<T> {
    let parts = norms.len();
    let width = parts * h * hd;
    let half = hd / 2;
    let mut out = vec![T::zero(); parts * b * h * t * hd];
    out.par_chunks_mut((t * hd).max(1))
        .enumerate()
        .for_each(|(block, out)| {
            let (p, s, head) = (block / (b * h), block / h % b, block % h);
            for ti in 0..t {
                let row = s * t + ti;
                let from = row * width + (p * h + head) * hd;
                let rope = rotate[p].then(|| {
                    (
                        &cos[row * half..(row + 1) * half],
                        &sin[row * half..(row + 1) * half],
                    )
                });
                head_row(
                    &mut out[ti * hd..(ti + 1) * hd],
                    &x[from..from + hd],
                    norms[p].as_deref(),
                    rope,
                    eps,
                );
            }
        });
    out
}

/// One head of one row as [`split_heads`] leaves it: `src` RMS-normed by `norm` (when given) into `y`, then
/// rotated by the row's `rope` tables (cos and sin, hd/2 each; when given).
pub(crate) fn head_row<T: Real>(
    y: &mut [T],
    src: &[T],
    norm: Option<&[T]>,
    rope: Option<(&[T], &[T])>,
    eps: f64,
) {
    match norm {
        Some(w) => {
            let inv = inv_rms(src, eps);
            for ((y, &x), &w) in y.iter_mut().zip(src).zip(w) {
                *y = x * inv * w;
            }
        }
        None => y.copy_from_slice(src),
    }
    if let Some((c, sn)) = rope {
        let half = y.len() / 2;
        let (y1, y2) = y.split_at_mut(half);
        for i in 0..half {
            let (a, z) = (y1[i], y2[i]);
            y1[i] = a * c[i] - z * sn[i];
            y2[i] = a * sn[i] + z * c[i];
        }
    }
}

/// silu(gate) · up for the gate and up projections side by side in `x` (…, 2f), gate first, giving
/// (…, f): the same values as [`swiglu`] on the two halves, without splitting them into tensors of their
/// own, so that one matrix product computes both. Its gradient is likewise one (…, 2f) tensor, the gate's
/// half first.
pub fn swiglu_halves(x: &Tensor) -> Result<Tensor> {
    let width = x.dim(candle_core::D::Minus1)?;
    if !width.is_multiple_of(2) {
        bail!("swiglu halves: an odd width {width} in {:?}", x.dims());
    }
    x.contiguous()?.apply_op1(SwiGluHalves)
}

/// [`swiglu_halves`]' op.
struct SwiGluHalves;

impl SwiGluHalves {
    /// The output (rows of f) of `x` (rows of 2f: gate, then up).
    fn forward<T: Real>(x: &[T], f: usize) -> Vec<T> {
        let width = 2 * f;
        let mut out = vec![T::zero(); x.len() / 2];
        out.par_chunks_mut(f.max(1) * ROWS_PER_CHUNK)
            .zip(x.par_chunks(width.max(1) * ROWS_PER_CHUNK))
            .for_each(|(out, x)| {
                for (y, row) in out.chunks_mut(f.max(1)).zip(x.chunks(width.max(1))) {
                    let (gate, up) = row.split_at(f);
                    T::swiglu_into(y, gate, up);
                }
            });
        out
    }

    /// The gradient of `x` (rows of 2f) given the output's `grad` (rows of f).
    fn backward<T: Real>(x: &[T], grad: &[T], f: usize) -> Vec<T> {
        let width = 2 * f;
        let mut dx = vec![T::zero(); x.len()];
        dx.par_chunks_mut(width.max(1) * ROWS_PER_CHUNK)
            .zip(x.par_chunks(width.max(1) * ROWS_PER_CHUNK))
            .zip(grad.par_chunks(f.max(1) * ROWS_PER_CHUNK))
            .for_each(|((dx, x), grad)| {
                for ((dx, row), g) in dx
                    .chunks_mut(width.max(1))
                    .zip(x.chunks(width.max(1)))
                    .zip(grad.chunks(f.max(1)))
                {
                    let (gate, up) = row.split_at(f);
                    let (dgate, dup) = dx.split_at_mut(f);
                    T::swiglu_grads_into(dgate, dup, gate, up, g);
                }
            });
        dx
    }
}

impl candle_core::CustomOp1 for SwiGluHalves {
    fn name(&self) -> &'static str {
        "swiglu-halves"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut dims = layout.shape().dims().to_vec();
        let f = dims.last().copied().unwrap_or(0) / 2;
        if let Some(last) = dims.last_mut() {
            *last = f;
        }
        let out = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(Self::forward(
                contiguous_slice::<f32>(storage, layout, "swiglu halves")?,
                f,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(Self::forward(
                contiguous_slice::<f64>(storage, layout, "swiglu halves")?,
                f,
            )),
            _ => bail!("swiglu halves supports f32 and f64"),
        };
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let f = x.dim(candle_core::D::Minus1)? / 2;
        let grad = grad.contiguous()?;
        macro_rules! run {
            ($t:ty) => {
                with_slice::<$t, _>(x, |x| {
                    with_slice::<$t, _>(&grad, |g| Ok(Self::backward(x, g, f)))
                })
                .and_then(|dx| Tensor::from_vec(dx, x.shape(), x.device()))?
            };
        }
        let dx = match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dtype => bail!("swiglu halves supports f32 and f64, not {dtype:?}"),
        };
        Ok(Some(dx))
    }
}

/// For inference: the residual sum x + y and its RMSNorm by `weight` (over the last dimension), in one
/// pass over the rows instead of an addition and a norm. It has no backward pass: inputs that need
/// gradients are refused.
pub fn add_rms_norm(x: &Tensor, y: &Tensor, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    if x.dims() != y.dims() {
        bail!("add and norm: x {:?} and y {:?} differ", x.dims(), y.dims());
    }
    let d = x.dim(candle_core::D::Minus1)?;
    if weight.elem_count() != d {
        bail!(
            "add and norm: a weight of {:?} for rows of {d}",
            weight.dims()
        );
    }
    if [x, y, weight].iter().any(|t| t.track_op()) {
        bail!("add and norm has no backward pass; inputs that need gradients take the plain ops");
    }
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    let weight = weight.to_dtype(x.dtype())?.flatten_all()?.contiguous()?;
    macro_rules! run {
        ($t:ty) => {{
            let (sum, normed) = with_slice::<$t, _>(&x, |x| {
                with_slice::<$t, _>(&y, |y| {
                    with_slice::<$t, _>(&weight, |w| {
                        if one_job(x.len(), d) {
                            let mut sum = Vec::with_capacity(x.len());
                            let mut normed = Vec::with_capacity(x.len());
                            for (x, y) in x.chunks(d.max(1)).zip(y.chunks(d.max(1))) {
                                let at = sum.len();
                                sum.extend(x.iter().zip(y).map(|(&a, &b)| a + b));
                                normed.extend(rms_normed(&sum[at..], w, eps));
                            }
                            return Ok((sum, normed));
                        }
                        let mut sum = vec![<$t>::default(); x.len()];
                        let mut normed = vec![<$t>::default(); x.len()];
                        let chunk = d.max(1) * ROWS_PER_CHUNK;
                        sum.par_chunks_mut(chunk)
                            .zip(normed.par_chunks_mut(chunk))
                            .zip(x.par_chunks(chunk).zip(y.par_chunks(chunk)))
                            .for_each(|((sum, normed), (x, y))| {
                                for (((s, n), x), y) in sum
                                    .chunks_mut(d.max(1))
                                    .zip(normed.chunks_mut(d.max(1)))
                                    .zip(x.chunks(d.max(1)))
                                    .zip(y.chunks(d.max(1)))
                                {
                                    for ((s, &a), &b) in s.iter_mut().zip(x).zip(y) {
                                        *s = a + b;
                                    }
                                    for (n, v) in n.iter_mut().zip(rms_normed(s, w, eps)) {
                                        *n = v;
                                    }
                                }
                            });
                        Ok((sum, normed))
                    })
                })
            })?;
            (
                Tensor::from_vec(sum, x.dims(), x.device())?,
                Tensor::from_vec(normed, x.dims(), x.device())?,
            )
        }};
    }
    Ok(match x.dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        dtype => bail!("add and norm supports f32 and f64, not {dtype:?}"),
    })
}

/// For inference: x + a·w for a (…, k) and x (…, n) with the same leading dimensions, and w (k, n): the
/// product accumulates into a copy of x in one GEMM, instead of a matmul and an addition (the residual
/// connection after a layer's last projection). It has no backward pass: inputs that need gradients are
/// refused.
pub fn matmul_add(x: &Tensor, a: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (k, n) = w.dims2()?;
    let (a_width, x_width) = (
        a.dim(candle_core::D::Minus1)?,
        x.dim(candle_core::D::Minus1)?,
    );
    let m = a.elem_count() / k.max(1);
    let leading = |t: &Tensor| t.dims()[..t.rank() - 1].to_vec();
    if a_width != k || x_width != n || leading(x) != leading(a) {
        bail!(
            "matmul and add: x {:?}, a {:?} and w {:?} do not fit x + a·w",
            x.dims(),
            a.dims(),
            w.dims()
        );
    }
    if [x, a, w].iter().any(|t| t.track_op()) {
        bail!("matmul and add has no backward pass; inputs that need gradients take the plain ops");
    }
    let (x, a, w) = (x.contiguous()?, a.contiguous()?, w.contiguous()?);
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    macro_rules! run {
        ($t:ty) => {{
            let out = with_slice::<$t, _>(&x, |x| {
                with_slice::<$t, _>(&a, |a| {
                    with_slice::<$t, _>(&w, |w| {
                        let mut out = x.to_vec();
                        if m > 0 && n > 0 {
                            // SAFETY: out is m × n, a is m × k and w is k × n, all row-major and
                            // contiguous (checked above), and out is a fresh buffer that aliases
                            // neither input.
                            unsafe {
                                gemm::gemm(
                                    m,
                                    n,
                                    k,
                                    out.as_mut_ptr(),
                                    1,
                                    n as isize,
                                    true,
                                    a.as_ptr(),
                                    1,
                                    k as isize,
                                    w.as_ptr(),
                                    1,
                                    n as isize,
                                    1.0 as $t,
                                    1.0 as $t,
                                    false,
                                    false,
                                    false,
                                    parallelism,
                                );
                            }
                        }
                        Ok(out)
                    })
                })
            })?;
            Tensor::from_vec(out, x.dims(), x.device())
        }};
    }
    match (x.dtype(), a.dtype(), w.dtype()) {
        (DType::F32, DType::F32, DType::F32) => run!(f32),
        (DType::F64, DType::F64, DType::F64) => run!(f64),
        dtypes => bail!("matmul and add supports f32 or f64 throughout, not {dtypes:?}"),
    }
}

/// Output rows per parallel job of [`mix_rows`]: a row is a few hundred multiply-adds, so smaller jobs
/// would cost more to hand out than to run.
const MIX_ROWS_PER_JOB: usize = 32;

/// For inference: rows made of weighted sums of `x`'s rows, for x (…, d) read as rows of d. Output row i
/// is Σ w·x[j] over the (j, w) pairs of `mixes[i]` (zeros for an empty list); the result is
/// (mixes.len(), d). This is what a dense (rows × rows) mixing matrix times x computes, reading only
/// the rows each output needs: a reduction stage keeps or merges a few of a batch's rows. It has no
/// backward pass: an `x` that needs gradients is refused.
pub fn mix_rows(x: &Tensor, mixes: &[Vec<(usize, f32)>]) -> Result<Tensor> {
    if x.track_op() {
        bail!("mix rows has no backward pass; inputs that need gradients take the plain ops");
    }
    let d = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / d.max(1);
    if let Some((i, &(j, _))) = mixes
        .iter()
        .enumerate()
        .find_map(|(i, mix)| mix.iter().find(|(j, _)| *j >= rows).map(|p| (i, p)))
    {
        bail!("mix rows: output row {i} reads row {j} of {rows}");
    }
    let x = x.contiguous()?;
    macro_rules! run {
        ($t:ty) => {{
            let out = with_slice::<$t, _>(&x, |x| {
                let mut out = vec![<$t>::default(); mixes.len() * d];
                out.par_chunks_mut((d * MIX_ROWS_PER_JOB).max(1))
                    .zip(mixes.par_chunks(MIX_ROWS_PER_JOB))
                    .for_each(|(out, mixes)| {
                        for (y, mix) in out.chunks_mut(d.max(1)).zip(mixes) {
                            for &(j, w) in mix {
                                let (src, w) = (&x[j * d..(j + 1) * d], w as $t);
                                for (y, &v) in y.iter_mut().zip(src) {
                                    *y += w * v;
                                }
                            }
                        }
                    });
                Ok(out)
            })?;
            Tensor::from_vec(out, (mixes.len(), d), x.device())
        }};
    }
    match x.dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        dtype => bail!("mix rows supports f32 and f64, not {dtype:?}"),
    }
}

/// Rows per parallel job of [`embed_rows`].
const EMBED_ROWS_PER_JOB: usize = 64;

/// For inference: a batch's first hidden states, (b, t, d), in one pass. Row j of sample s is
/// `patches[s·n + j − start] + offset[j − start]` inside the sample's image span [start, start + n), and
/// the row of `table` (vocab, d) that `tokens[s, j]` names elsewhere; `tokens` is (b, t) u32, `patches`
/// (b·n, d) the projected patches, `offset` (n, d) their bias and 2-D positions. It replaces a token
/// gather, a broadcast addition, a concatenation and a second gather. It has no backward pass: inputs that
/// need gradients are refused.
pub fn embed_rows(
    table: &Tensor,
    tokens: &Tensor,
    patches: &Tensor,
    offset: &Tensor,
    image_starts: &[Option<usize>],
) -> Result<Tensor> {
    let (b, t) = tokens.dims2()?;
    let (vocab, d) = table.dims2()?;
    let (n, offset_width) = offset.dims2()?;
    if patches.dims2()? != (b * n, d) || offset_width != d || image_starts.len() != b {
        bail!(
            "embed rows: tokens {:?}, table {:?}, patches {:?}, offset {:?} and {} image starts do not fit",
            tokens.dims(),
            table.dims(),
            patches.dims(),
            offset.dims(),
            image_starts.len()
        );
    }
    if let Some((s, start)) = image_starts.iter().enumerate().find_map(|(s, start)| {
        start
            .filter(|&start| start.checked_add(n).is_none_or(|end| end > t))
            .map(|start| (s, start))
    }) {
        bail!("sample {s}: an image of {n} patches at {start} overruns its {t} tokens");
    }
    if [table, patches, offset].iter().any(|x| x.track_op()) {
        bail!("embed rows has no backward pass; inputs that need gradients take the plain ops");
    }
    let tokens = tokens.to_dtype(DType::U32)?.contiguous()?;
    let (table, patches, offset) = (
        table.contiguous()?,
        patches.contiguous()?,
        offset.contiguous()?,
    );
    macro_rules! run {
        ($t:ty) => {{
            let out = with_slice::<u32, _>(&tokens, |ids| {
                if let Some((at, &id)) = ids
                    .iter()
                    .enumerate()
                    .find(|(at, id)| !in_image(image_starts, n, t, *at) && **id as usize >= vocab)
                {
                    bail!(
                        "embed rows: token {id} at row {at} is outside the vocabulary of {vocab}"
                    );
                }
                with_slice::<$t, _>(&table, |table| {
                    with_slice::<$t, _>(&patches, |patches| {
                        with_slice::<$t, _>(&offset, |offset| {
                            let mut out = vec![<$t>::default(); b * t * d];
                            out.par_chunks_mut((d * EMBED_ROWS_PER_JOB).max(1))
                                .enumerate()
                                .for_each(|(job, out)| {
                                    for (i, y) in out.chunks_mut(d.max(1)).enumerate() {
                                        let at = job * EMBED_ROWS_PER_JOB + i;
                                        let (s, j) = (at / t, at % t);
                                        match image_starts[s]
                                            .filter(|_| in_image(image_starts, n, t, at))
                                        {
                                            Some(start) => {
                                                let (patch, k) =
                                                    ((s * n + j - start) * d, (j - start) * d);
                                                for ((y, &p), &o) in y
                                                    .iter_mut()
                                                    .zip(&patches[patch..patch + d])
                                                    .zip(&offset[k..k + d])
                                                {
                                                    *y = p + o;
                                                }
                                            }
                                            None => {
                                                let row = ids[at] as usize * d;
                                                y.copy_from_slice(&table[row..row + d]);
                                            }
                                        }
                                    }
                                });
                            Ok(out)
                        })
                    })
                })
            })?;
            Tensor::from_vec(out, (b, t, d), table.device())
        }};
    }
    match (table.dtype(), patches.dtype(), offset.dtype()) {
        (DType::F32, DType::F32, DType::F32) => run!(f32),
        (DType::F64, DType::F64, DType::F64) => run!(f64),
        dtypes => bail!("embed rows supports f32 or f64 throughout, not {dtypes:?}"),
    }
}

/// Whether flat row `at` of a (b, t) batch lies in its sample's image span of `n` patches.
fn in_image(image_starts: &[Option<usize>], n: usize, t: usize, at: usize) -> bool {
    let (s, j) = (at / t, at % t);
    image_starts[s].is_some_and(|start| j >= start && j - start < n)
}

#[cfg(test)]
mod dispatch_tests {
    use super::*;

    /// Values across the exponential's range, past both ends of its clamp, in a length with a remainder
    /// after the eight-wide iterations.
    fn values(n: usize, offset: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + offset) % 4001) as f32 / 20.0 - 100.0)
            .collect()
    }

    #[test]
    fn the_f32_loops_give_the_baseline_loops_bits() {
        let n = 203;
        let (a, b, c) = (values(n, 0), values(n, 17), values(n, 911));
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        // <f32 as Real> dispatches (to AVX2 where the CPU has it); the `*_loop` functions are the
        // baseline. On a CPU without AVX2 both are the baseline and the test holds trivially.
        let (mut fast, mut plain) = (a.clone(), a.clone());
        <f32 as Real>::exp_shifted(&mut fast, 3.5);
        exp_shifted_loop(&mut plain, 3.5f32);
        assert_eq!(bits(&fast), bits(&plain), "exp_shifted");
        let (mut fast, mut plain) = (a.clone(), a.clone());
        <f32 as Real>::exp_biased(&mut fast, &b, 2.0, 0.25);
        exp_biased_loop(&mut plain, &b, 2.0f32, 0.25);
        assert_eq!(bits(&fast), bits(&plain), "exp_biased");
        let (mut fast, mut plain) = (vec![0f32; n], vec![0f32; n]);
        <f32 as Real>::swiglu_into(&mut fast, &a, &b);
        swiglu_loop(&mut plain, &a, &b);
        assert_eq!(bits(&fast), bits(&plain), "swiglu");
        let (mut fast_g, mut fast_u, mut plain_g, mut plain_u) =
            (vec![0f32; n], vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        <f32 as Real>::swiglu_grads_into(&mut fast_g, &mut fast_u, &a, &b, &c);
        swiglu_grads_loop(&mut plain_g, &mut plain_u, &a, &b, &c);
        assert_eq!(bits(&fast_g), bits(&plain_g), "swiglu gate gradient");
        assert_eq!(bits(&fast_u), bits(&plain_u), "swiglu up gradient");
    }

    /// One sample's additive bias (len × len): causal, rows and keys `image` seeing each other, a term
    /// per key, the keys in `invalid` masked for every row and the rows in `blind` seeing no key.
    fn sample_bias(
        len: usize,
        image: std::ops::Range<usize>,
        invalid: &[usize],
        blind: &[usize],
    ) -> Vec<f32> {
        let mut bias = vec![-1e9f32; len * len];
        for i in 0..len {
            for j in 0..len {
                let sees = j <= i || (image.contains(&i) && image.contains(&j));
                if sees && !invalid.contains(&j) && !blind.contains(&i) {
                    bias[i * len + j] = 0.1 * ((j % 5) as f32 - 2.0);
                }
            }
        }
        bias
    }

    #[test]
    fn panel_attention_gives_the_gemm_attention_values() {
        if !crate::panels::panels_available() {
            let mut scratch = Default::default();
            let inputs = (
                &[0.0; 16][..],
                &[0.0; 16][..],
                &[0.0; 16][..],
                &[0.0][..],
                &[(0, 1)][..],
            );
            let out = (&mut [0.0; 16][..], &mut [(0.0, 0.0)][..]);
            let done = attend_panels((1, 1, 16), inputs, 1.0, out, &mut scratch);
            assert!(
                !done,
                "panel attention ran on a CPU without the micro-kernel"
            );
            return;
        }
        // Lengths from one row to several tiles and panels of keys; head widths that are and are not
        // multiples of the panel's 16 columns.
        // (rows, image rows, keys masked for all, rows seeing nothing)
        type Case = (
            usize,
            std::ops::Range<usize>,
            &'static [usize],
            &'static [usize],
        );
        // Keys 0 to 19 masked for every row: the tiles' key ranges start past the first panel.
        const FIRST_20: [usize; 20] = [
            0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
        ];
        let cases: [Case; 7] = [
            (1, 0..0, &[], &[]),
            (5, 1..4, &[], &[]),
            (13, 2..9, &[3], &[]),
            (17, 0..0, &[0, 16], &[4]),
            (40, 3..19, &[], &[0, 39]),
            (45, 22..30, &FIRST_20, &[]),
            (75, 1..65, &[20, 21, 70], &[]),
        ];
        for d in [8, 16, 24, 32, 40] {
            for (len, image, invalid, blind) in &cases {
                let (len, n) = (*len, len * d);
                let data = |offset: usize| -> Vec<f32> {
                    (0..n)
                        .map(|i| ((i * 7919 + offset) % 1999) as f32 / 500.0 - 2.0)
                        .collect()
                };
                let (q, k, v) = (data(0), data(331), data(977));
                let bias = sample_bias(len, image.clone(), invalid, blind);
                let mut ranges = Vec::new();
                row_ranges(&bias, len, &mut ranges);
                let scale = 1.0 / (d as f32).sqrt();
                let (mut out, mut lse) = (vec![f32::NAN; n], vec![(0.0, 0.0); len]);
                let mut scratch = Default::default();
                let inputs = (&q[..], &k[..], &v[..], &bias[..], &ranges[..]);
                let done = attend_panels(
                    (len, len, d),
                    inputs,
                    scale,
                    (&mut out, &mut lse),
                    &mut scratch,
                );
                assert!(done);
                let (mut want, mut want_lse) = (vec![0f32; n], vec![(0.0, 0.0); len]);
                attend(
                    (len, len, d),
                    &q,
                    &k,
                    &v,
                    &bias,
                    scale,
                    (&mut want, &mut want_lse),
                    &mut Vec::new(),
                );
                // Every output written, and finite (NaN would slip through the maximum below).
                assert!(
                    out.iter().all(|x| x.is_finite()),
                    "d {d}, {len} rows: an output left unwritten or not finite"
                );
                let top = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                let error = out
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max)
                    / top;
                assert!(
                    error < 1e-5,
                    "d {d}, {len} rows: relative error {error:.2e}"
                );
                for (r, (got, want)) in lse.iter().zip(&want_lse).enumerate() {
                    assert!(
                        (got.0 - want.0).abs() <= 1e-5 * want.0.abs().max(1.0)
                            && (got.1 - want.1).abs() <= 1e-5 * want.1,
                        "d {d}, {len} rows, row {r}: max and sum {got:?}, expected {want:?}"
                    );
                }
            }
        }
    }
}
