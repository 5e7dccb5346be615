//! Inference weights packed in column panels, for products of few rows.
//!
//! A prefill of one sample, a reduced prefill (a plan keeps a tenth of the image) and a decoding step
//! multiply a few rows, 1 to a few hundred, by each weight. gemm, which candle calls, is built for large
//! products: with 17 rows, nmm-s's projections ran at 54–94 GFLOP/s against 120–170 at 290 rows and
//! more (scratch program, best of 200 passes over six layers of nmm-s's shapes).
//!
//! [`PackedWeight`] keeps a weight (k, n) a second time, cut into panels of [`PANEL`] columns, each panel
//! stored k rows of [`PANEL`] contiguous values. A product x·w of up to [`PANEL_ROWS_MAX`] rows is then
//! computed panel by panel in an AVX2 micro-kernel: six rows by sixteen columns in twelve registers,
//! one multiply-add per input value and column pair, the panel (16 KB for k = 256) read once from
//! memory and then from cache (L1 while k ≲ 400, L2 for the down projection's 688) for every six
//! rows. The same scratch program measured 1.0–1.7 ms for the 17-row products where gemm took
//! 1.7–3.0 ms, and 3.9–5.9 ms for 74 rows against 5.4–7.8 (four runs).
//!
//! On a CPU with AVX-512F the micro-kernel takes up to thirty rows at once, one 16-wide register per
//! row (see [`Kernel`]), so a product of up to 30 rows reads each panel once. It makes the same
//! multiply-adds in the same order, so the bits do not change. `TOKENFOLD_AVX512=0` keeps AVX2.
//!
//! Every output is one sum over k in order, by one thread, whatever the number of rows or threads: up
//! to [`PANEL_ROWS_MAX`] rows, a row's result does not depend on the rows beside it. Larger products,
//! f64, CPUs without AVX2 and FMA, and `TOKENFOLD_PLAIN_OPS=1` take candle's matmul with the plain
//! (k, n) tensor; so do inputs that need gradients in [`PackedWeight::matmul`], while
//! [`PackedWeight::matmul_add`], which has no backward pass, refuses them as [`kernels::matmul_add`]
//! does.
//!
//! Two products finish their tiles before writing them, so that their whole (m, n) result is never
//! written, nor read back by an operation of its own; both give the two-step path's bits:
//! - [`PackedWeight::matmul_swiglu`] applies SwiGLU to the gate and up tiles. Six layers of nmm-s's gate
//!   and up products with their SwiGLU (scratch program, best of ten rounds) took 0.65 ms where the two
//!   steps took 0.74 at 17 rows, 2.34 against 2.86 ms at 74 and 10.7 against 11.0 ms at 290.
//! - [`PackedWeight::matmul_heads`] splits q, k and v into heads, QK-norms and rotates them, head by
//!   head ([`kernels::split_heads`]' work). Six layers of nmm-s's q, k and v products with their split
//!   (scratch program, the two ways interleaved, best of 1,500 or 300, two runs) took 120–154 µs where
//!   the two steps took 173–257 µs for one row, 306–309 against 370–377 µs at 17 rows, and 1.16
//!   against 1.21–1.23 ms at 74. (At 290 rows its two steps took twice as long, 9.3–9.5 ms against
//!   4.9–5.0, which the batch-16 plans of `tokenfold bench prefill` did not bear out: see
//!   docs/performance.md.)

use std::sync::OnceLock;

use candle_core::{DType, Result, Tensor, bail};
use rayon::prelude::*;

use crate::kernels;

/// Columns per panel: two AVX2 registers of f32.
pub const PANEL: usize = 16;

/// The most rows a product takes through the panels; above it gemm, whose packing pays off, runs. The
/// scratch program's panels were ahead of gemm up to 290 rows and level with it, within the machine's
/// noise, at 1,202; 512 was not measured on its own: it only needs to sit between the two.
pub const PANEL_ROWS_MAX: usize = 512;

/// Rows per AVX2 micro-kernel call: six rows of two registers each keep twelve accumulators, the broadcast
/// input and the panel's two registers within AVX2's sixteen.
const MR: usize = 6;

/// Rows per AVX-512 micro-kernel call: a row's sixteen columns fill one of AVX-512's 32 registers, so
/// thirty rows keep thirty accumulators and the panel's register, the input values broadcast from
/// memory by the multiply-adds themselves (`vfmadd231ps` with `{1to16}`, as compiled).
const MR_WIDE: usize = 30;

/// The micro-kernel a product runs on. Both compute every output as one multiply-add after another
/// over k in order, so they give the same bits; they differ in how many rows share one read of a
/// panel.
///
/// A product of few rows reads each panel from memory in its first row block, and AVX2's six rows
/// leave that block waiting: a perf profile of FastV's batch-1 planned prefill (17 rows) put 14.6% of
/// the samples in the first block of each panel, 12.2% in the second and 8.9% in the third (five
/// rows). AVX-512's thirty rows take 17 rows in one block, reading the panel once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// AVX2 and FMA, [`MR`] rows at a time.
    Avx2,
    /// AVX-512F, up to [`MR_WIDE`] rows at a time.
    Avx512,
}

impl Kernel {
    /// The kernel products run on: AVX-512 where the CPU has it ([`avx512_available`]), unless
    /// `TOKENFOLD_AVX512=0`. Only asked where [`panels_available`] holds.
    fn detected() -> Kernel {
        static DETECTED: OnceLock<Kernel> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let wide =
                avx512_available() && std::env::var("TOKENFOLD_AVX512").map_or(true, |v| v != "0");
            if wide { Kernel::Avx512 } else { Kernel::Avx2 }
        })
    }
}

/// Whether this CPU runs the AVX-512 micro-kernel (AVX-512F, with the OS saving its registers).
fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight (k, n) for products x·w, kept as a contiguous tensor and, for f32 on CPUs with AVX2 and
/// FMA, packed in panels (see the module docs). Detached: for a model that is not trained further.
#[derive(Clone)]
pub struct PackedWeight {
    tensor: Tensor,
    panels: Option<Vec<f32>>,
    k: usize,
    n: usize,
}

impl PackedWeight {
    /// Packs `w` (k, n), detached and made contiguous.
    pub fn new(w: &Tensor) -> Result<PackedWeight> {
        let tensor = w.detach().contiguous()?;
        let (k, n) = tensor.dims2()?;
        let panels =
            if panels_available() && tensor.dtype() == DType::F32 && tensor.device().is_cpu() {
                Some(pack(&tensor.flatten_all()?.to_vec1::<f32>()?, k, n))
            } else {
                None
            };
        Ok(PackedWeight {
            tensor,
            panels,
            k,
            n,
        })
    }

    /// x·w for x (m, k).
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        match self.panels_for(x)? {
            Some((panels, m)) => {
                let x = x.contiguous()?;
                let out = kernels::with_slice::<f32, _>(&x, |x| {
                    Ok(product(
                        x,
                        panels,
                        (m, self.k, self.n),
                        None,
                        Kernel::detected(),
                    ))
                })?;
                Tensor::from_vec(out, (m, self.n), x.device())
            }
            None => x.matmul(&self.tensor),
        }
    }

    /// r + a·w for a (…, k) and r (…, n) with the same leading dimensions: the product accumulates onto
    /// the residual r (see [`kernels::matmul_add`], which larger products take).
    pub fn matmul_add(&self, r: &Tensor, a: &Tensor) -> Result<Tensor> {
        let leading = |t: &Tensor| t.dims()[..t.rank().saturating_sub(1)].to_vec();
        let fits = a.rank() >= 1
            && r.rank() >= 1
            && a.dim(candle_core::D::Minus1)? == self.k
            && r.dim(candle_core::D::Minus1)? == self.n
            && leading(a) == leading(r);
        if !fits {
            bail!(
                "matmul and add: r {:?}, a {:?} and w ({}, {}) do not fit r + a·w",
                r.dims(),
                a.dims(),
                self.k,
                self.n
            );
        }
        if self.k == 0 {
            return kernels::matmul_add(r, a, &self.tensor);
        }
        let a2 = a.reshape(((), self.k))?;
        match self.panels_for(&a2)? {
            Some((panels, m))
                if !r.track_op() && r.dtype() == DType::F32 && r.device().is_cpu() =>
            {
                let (a2, r) = (a2.contiguous()?, r.contiguous()?);
                let out = kernels::with_slice::<f32, _>(&a2, |a| {
                    kernels::with_slice::<f32, _>(&r, |r| {
                        Ok(product(
                            a,
                            panels,
                            (m, self.k, self.n),
                            Some(r),
                            Kernel::detected(),
                        ))
                    })
                })?;
                Tensor::from_vec(out, r.dims(), r.device())
            }
            _ => kernels::matmul_add(r, a, &self.tensor),
        }
    }

    /// silu(x·w_gate)·(x·w_up) for x (m, k), where this weight is the gate and up projections side by
    /// side (k, 2f), gate first: [`kernels::swiglu_halves`] of [`Self::matmul`], the same values. When
    /// the panels take x and f is a multiple of 16, each row block's gate and up tiles are computed
    /// into a buffer and only the activation is written, in one parallel pass, where the two steps
    /// wrote the (m, 2f) product, then read it back in an operation of their own.
    pub fn matmul_swiglu(&self, x: &Tensor) -> Result<Tensor> {
        if !self.n.is_multiple_of(2) {
            bail!(
                "matmul and swiglu: a weight of ({}, {}) does not hold two halves",
                self.k,
                self.n
            );
        }
        let f = self.n / 2;
        match self.panels_for(x)? {
            Some((panels, m)) if f.is_multiple_of(PANEL) && self.k > 0 => {
                let x = x.contiguous()?;
                let out = kernels::with_slice::<f32, _>(&x, |x| {
                    Ok(swiglu_product(
                        x,
                        panels,
                        (m, self.k, f),
                        Kernel::detected(),
                    ))
                })?;
                Tensor::from_vec(out, (m, f), x.device())
            }
            _ => kernels::swiglu_halves(&self.matmul(x)?),
        }
    }

    /// x·w for x (b, t, k), where this weight is `parts` projections of h heads side by side, split into
    /// one (b, h, t, hd) tensor per part as [`kernels::split_heads`] does it (each head RMS-normed by its
    /// part's weight and rotated by `rope` where the part asks), with the same values. When the panels
    /// take x and hd is a multiple of 16, each head's product is computed into a buffer of its own and
    /// written out split, normed and rotated: the (b·t, n) product is never written, nor read back by
    /// an operation of its own.
    pub fn matmul_heads(
        &self,
        x: &Tensor,
        h: usize,
        parts: &[kernels::HeadPart],
        rope: (&Tensor, &Tensor),
        eps: f64,
    ) -> Result<Vec<Tensor>> {
        self.matmul_heads_of(x, h, parts, &vec![true; parts.len()], rope, eps)
    }

    /// [`Self::matmul_heads`] for the parts marked in `wanted` only, in order: a layer whose keys a
    /// reduction stage already computed projects its queries and values alone. Only the fused pass (hd a
    /// multiple of 16, up to [`PANEL_ROWS_MAX`] rows) skips the other parts' work; elsewhere all parts
    /// are computed and the others dropped.
    pub fn matmul_heads_of(
        &self,
        x: &Tensor,
        h: usize,
        parts: &[kernels::HeadPart],
        wanted: &[bool],
        rope: (&Tensor, &Tensor),
        eps: f64,
    ) -> Result<Vec<Tensor>> {
        if wanted.len() != parts.len() {
            bail!(
                "matmul_heads: {} parts marked wanted or not, for {} parts",
                wanted.len(),
                parts.len()
            );
        }
        if !wanted.contains(&true) {
            return Ok(Vec::new());
        }
        let (b, t, k) = x.dims3()?;
        let x2 = x.reshape((b * t, k))?;
        let split = |product: Tensor| -> Result<Vec<Tensor>> {
            let all = kernels::split_heads(&product.reshape((b, t, self.n))?, h, parts, rope, eps)?;
            Ok(all
                .into_iter()
                .zip(wanted)
                .filter_map(|(part, &w)| w.then_some(part))
                .collect())
        };
        let Some((panels, m)) = self.panels_for(&x2)? else {
            return split(self.matmul(&x2)?);
        };
        let (hd, cos, sin) = kernels::head_layout((b, t, self.n), h, parts, rope, DType::F32)?;
        if hd == 0 || !hd.is_multiple_of(PANEL) || k == 0 {
            return split(self.matmul(&x2)?);
        }
        let norms: Vec<Option<Vec<f32>>> = parts
            .iter()
            .map(|p| {
                p.norm
                    .map(|w| w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let rotate: Vec<bool> = parts.iter().map(|p| p.rotate).collect();
        let chosen: Vec<usize> = (0..parts.len()).filter(|&p| wanted[p]).collect();
        let x2 = x2.contiguous()?;
        let out = kernels::with_slice::<f32, _>(&x2, |x| {
            kernels::with_tables::<f32, _>((&cos, &sin), |tables| {
                let heads = Heads {
                    dims: (b, t, h, hd),
                    tables,
                    norms: &norms,
                    rotate: &rotate,
                    chosen: &chosen,
                    eps,
                };
                Ok(heads_product(
                    x,
                    panels,
                    (m, k, self.n),
                    &heads,
                    Kernel::detected(),
                ))
            })
        })?;
        let all = Tensor::from_vec(out, (chosen.len(), b, h, t, hd), x.device())?;
        (0..chosen.len()).map(|p| all.get(p)).collect()
    }

    /// The panels and the row count when x (m, k) takes them.
    fn panels_for(&self, x: &Tensor) -> Result<Option<(&[f32], usize)>> {
        let (m, k) = x.dims2()?;
        if k != self.k {
            bail!(
                "matmul: x {:?} does not fit a weight of ({}, {})",
                x.dims(),
                self.k,
                self.n
            );
        }
        Ok(match &self.panels {
            Some(panels)
                if m <= PANEL_ROWS_MAX
                    && kernels::fused_enabled()
                    && x.dtype() == DType::F32
                    && x.device().is_cpu()
                    && !x.track_op() =>
            {
                Some((panels.as_slice(), m))
            }
            _ => None,
        })
    }
}

/// Whether this CPU runs the panel kernel.
pub(crate) fn panels_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        kernels::avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `w` (k, n, row-major) as panels: panel p holds columns p·16 … p·16 + 15 of every row in turn, the
/// last panel padded with zeros.
pub fn pack(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let mut out = Vec::new();
    pack_into(w, k, n, &mut out);
    out
}

/// [`pack`] into `out`, reusing its allocation.
pub(crate) fn pack_into(w: &[f32], k: usize, n: usize, out: &mut Vec<f32>) {
    let panels = n.div_ceil(PANEL);
    resize_for_overwrite(out, panels * k * PANEL);
    for (p, panel) in out
        .chunks_exact_mut((k * PANEL).max(1))
        .enumerate()
        .take(panels)
    {
        let cols = PANEL.min(n - p * PANEL);
        for (row, dst) in panel.chunks_exact_mut(PANEL).enumerate() {
            dst[..cols].copy_from_slice(&w[row * n + p * PANEL..row * n + p * PANEL + cols]);
            dst[cols..].fill(0.0);
        }
    }
}

/// `out` at `len` values, which the caller then writes every one of: a reused buffer is not zeroed
/// first (attention packs its keys and values once per sample and head).
fn resize_for_overwrite(out: &mut Vec<f32>, len: usize) {
    if out.len() < len {
        out.resize(len, 0.0);
    } else {
        out.truncate(len);
    }
}

/// The transpose (d, n) of `w` (n, d, row-major), packed as [`pack`] packs a weight of (d, n) into
/// `out`: panel p holds, for each of the d columns of w in turn, rows p·16 … p·16 + 15 of it (zeros
/// past n). Attention's keys, so that q·kᵀ runs through the micro-kernel.
pub(crate) fn pack_transposed_into(w: &[f32], n: usize, d: usize, out: &mut Vec<f32>) {
    assert!(w.len() == n * d, "panels: {} values for {n} × {d}", w.len());
    let panels = n.div_ceil(PANEL);
    resize_for_overwrite(out, panels * d * PANEL);
    for (row, src) in w.chunks_exact(d.max(1)).enumerate().take(n) {
        let (p, c) = (row / PANEL, row % PANEL);
        let panel = &mut out[p * d * PANEL..(p + 1) * d * PANEL];
        for (i, &x) in src.iter().enumerate() {
            panel[i * PANEL + c] = x;
        }
    }
    // The last panel's columns past n.
    if !n.is_multiple_of(PANEL) {
        let (p, c) = (n / PANEL, n % PANEL);
        for step in out[p * d * PANEL..(p + 1) * d * PANEL].chunks_exact_mut(PANEL) {
            step[c..].fill(0.0);
        }
    }
}

/// out[r·ldc + j] = Σ_i x[r·k + i]·panel[i·16 + j] for rows r < m and columns j < cols (≤ 16), on the
/// calling thread: one panel of a product whose caller already runs in parallel. False, with nothing
/// written, where the CPU has no micro-kernel.
///
/// # Panics
/// When a slice is too short for the product.
pub(crate) fn panel_product(
    x: &[f32],
    k: usize,
    panel: &[f32],
    out: &mut [f32],
    ldc: usize,
    m: usize,
    cols: usize,
) -> bool {
    if !panels_available() {
        return false;
    }
    if m == 0 || cols == 0 {
        return true;
    }
    // The kernel's reads and writes rely on these lengths, so they are checked in every build.
    assert!(
        cols <= PANEL && cols <= ldc && x.len() >= m * k && panel.len() >= k * PANEL,
        "panels: a product of {m} × {k} by a panel of {} values, {cols} columns",
        panel.len()
    );
    assert!(
        out.len() >= (m - 1) * ldc + cols,
        "panels: {} outputs for {m} rows of {cols}, {ldc} apart",
        out.len()
    );
    // SAFETY: the CPU has AVX2 and FMA (`panels_available`), and AVX-512F where it is detected; x holds
    // m × k values, the panel k × 16, and `out` m rows of `cols` values ldc apart (asserted above);
    // nothing else borrows `out`.
    unsafe {
        panel_rows(
            x,
            k,
            (&panel[..k * PANEL], None),
            out.as_mut_ptr(),
            ldc,
            m,
            cols,
            false,
            Kernel::detected(),
        )
    };
    true
}

/// A raw output pointer handed to the pool's jobs, each of which writes its own columns.
struct Out(*mut f32);
// SAFETY: the jobs write disjoint columns of the buffer, which outlives them (see `product`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// x (m, k) times the packed weight (k, n), plus `add` (m, n) when given; row-major (m, n), on `kernel`.
/// `panels` exist only where [`panels_available`] holds (the micro-kernel needs AVX2 and FMA).
fn product(
    x: &[f32],
    panels: &[f32],
    (m, k, n): (usize, usize, usize),
    add: Option<&[f32]>,
    kernel: Kernel,
) -> Vec<f32> {
    // The kernel's writes rely on these lengths, so they are checked in every build.
    assert!(x.len() == m * k, "panels: {} inputs for {m} × {k}", x.len());
    assert!(
        panels.len() == n.div_ceil(PANEL) * k * PANEL,
        "panels: {} packed values for {k} × {n}",
        panels.len()
    );
    assert!(
        add.is_none_or(|r| r.len() == m * n),
        "panels: a residual that is not {m} × {n}"
    );
    let mut out: Vec<f32> = match add {
        Some(r) => r.to_vec(),
        None => Vec::with_capacity(m * n),
    };
    if m == 0 || n == 0 {
        out.resize(m * n, 0.0);
        return out;
    }
    let dst = Out(out.as_mut_ptr());
    let dst = &dst;
    let accumulate = add.is_some();
    let panel = |q: usize| &panels[q * k * PANEL..(q + 1) * k * PANEL];
    for_each_panel(n.div_ceil(PANEL), |p, next| {
        let cols = PANEL.min(n - p * PANEL);
        let fetch = next.then(|| panel(p + 1));
        // SAFETY: `out` has room for m × n values (capacity or length); this call alone writes columns
        // p·16 … p·16 + cols of every row, and `x` and the panels hold m × k and k × 16 values.
        unsafe {
            panel_rows(
                x,
                k,
                (panel(p), fetch),
                dst.0.add(p * PANEL),
                n,
                m,
                cols,
                accumulate,
                kernel,
            )
        };
    });
    // SAFETY: every one of the m × n values was written above: each row's columns by its panel.
    unsafe { out.set_len(m * n) };
    out
}

/// silu(x·w_gate)·(x·w_up), row-major (m, f), for x (m, k) and panels packing (k, 2f), gate first, with
/// f a multiple of 16: gate panel p's up panel is p + f/16. On `kernel`.
fn swiglu_product(
    x: &[f32],
    panels: &[f32],
    (m, k, f): (usize, usize, usize),
    kernel: Kernel,
) -> Vec<f32> {
    assert!(x.len() == m * k, "panels: {} inputs for {m} × {k}", x.len());
    assert!(
        f.is_multiple_of(PANEL) && panels.len() == 2 * f * k,
        "panels: {} packed values for {k} × 2·{f}",
        panels.len()
    );
    let mut out: Vec<f32> = Vec::with_capacity(m * f);
    if m == 0 || f == 0 || k == 0 {
        out.resize(m * f, 0.0);
        return out;
    }
    let count = f / PANEL;
    let dst = Out(out.as_mut_ptr());
    let dst = &dst;
    let panel = |q: usize| &panels[q * k * PANEL..(q + 1) * k * PANEL];
    // The gate, up and activation tiles of one row block, made once per thread: zeroing the 5.8 KB of
    // an AVX-512 block for every panel would cost a decoding step (one row) more than its products.
    let tiles = || [[0.0f32; MR_WIDE * PANEL]; 3];
    for_each_panel_with(count, tiles, |tiles, p, next| {
        let fetch = next.then(|| (panel(p + 1), panel(p + 1 + count)));
        // SAFETY: `out` has room for m × f values; this call alone writes columns p·16 … p·16 + 15 of
        // every row, and `x` and the panels hold m × k and k × 16 values.
        unsafe {
            swiglu_rows(
                x,
                k,
                (panel(p), panel(p + count)),
                fetch,
                dst.0.add(p * PANEL),
                (f, m),
                kernel,
                tiles,
            )
        };
    });
    // SAFETY: every one of the m × f values was written above: each row's columns by its gate panel.
    unsafe { out.set_len(m * f) };
    out
}

/// How [`heads_product`] lays out and finishes each head: (b, t, h, hd), the rotary tables (cos and sin,
/// (b, t, hd/2) each), each part's norm weight and whether it rotates, and which parts it computes
/// (increasing).
struct Heads<'a> {
    dims: (usize, usize, usize, usize),
    tables: (&'a [f32], &'a [f32]),
    norms: &'a [Option<Vec<f32>>],
    rotate: &'a [bool],
    chosen: &'a [usize],
    eps: f64,
}

/// x (m = b·t, k) times panels packing (k, n), n = parts · h · hd with hd a multiple of 16, as one
/// (chosen parts, b, h, t, hd) buffer of the parts `heads.chosen`, on `kernel`: head by head, the head's
/// hd/16 panels into a buffer of m × hd, then each row [`kernels::head_row`]ed into place.
fn heads_product(
    x: &[f32],
    panels: &[f32],
    (m, k, n): (usize, usize, usize),
    heads: &Heads,
    kernel: Kernel,
) -> Vec<f32> {
    let (b, t, h, hd) = heads.dims;
    let parts = heads.norms.len();
    assert!(x.len() == m * k, "panels: {} inputs for {m} × {k}", x.len());
    assert!(
        m == b * t && n == parts * h * hd && hd.is_multiple_of(PANEL),
        "panels: heads ({b}, {t}, {h}, {hd}) of {parts} parts for a product ({m}, {n})"
    );
    assert!(
        panels.len() == n * k,
        "panels: {} packed values for {k} × {n}",
        panels.len()
    );
    assert!(
        heads.chosen.windows(2).all(|w| w[0] < w[1]) && heads.chosen.iter().all(|&p| p < parts),
        "panels: parts {:?} chosen out of {parts}",
        heads.chosen
    );
    let half = hd / 2;
    assert!(heads.tables.0.len() == m * half && heads.tables.1.len() == m * half);
    let size = m * heads.chosen.len() * h * hd;
    let mut out: Vec<f32> = Vec::with_capacity(size);
    let dst = Out(out.as_mut_ptr());
    let dst = &dst;
    let per_head = hd / PANEL;
    // Group g is head g % h of chosen part g / h; its j-th panel is at this index among all the panels.
    let panel_index = |g: usize, j: usize| (heads.chosen[g / h] * h + g % h) * per_head + j;
    let panel = |q: usize| &panels[q * k * PANEL..(q + 1) * k * PANEL];
    let groups = heads.chosen.len() * h;
    let jobs = rayon::current_num_threads().clamp(1, groups.max(1));
    let per_job = groups.div_ceil(jobs);
    (0..jobs).into_par_iter().for_each(|job| {
        let end = ((job + 1) * per_job).min(groups);
        let (mut tile, mut y) = (vec![0f32; m * hd], vec![0f32; hd]);
        for g in job * per_job..end {
            let (c, head) = (g / h, g % h);
            let p = heads.chosen[c];
            for j in 0..per_head {
                let q = panel_index(g, j);
                let fetch = if j + 1 < per_head {
                    Some(panel(q + 1))
                } else {
                    (g + 1 < end).then(|| panel(panel_index(g + 1, 0)))
                };
                // SAFETY: the panels hold k × 16 values each and x m × k (asserted above); the tile
                // holds m rows of hd ≥ 16·(j + 1) values.
                unsafe {
                    panel_rows(
                        x,
                        k,
                        (panel(q), fetch),
                        tile.as_mut_ptr().add(j * PANEL),
                        hd,
                        m,
                        PANEL,
                        false,
                        kernel,
                    )
                };
            }
            for row in 0..m {
                let (s, ti) = (row / t, row % t);
                let rope = heads.rotate[p].then(|| {
                    (
                        &heads.tables.0[row * half..(row + 1) * half],
                        &heads.tables.1[row * half..(row + 1) * half],
                    )
                });
                kernels::head_row(
                    &mut y,
                    &tile[row * hd..(row + 1) * hd],
                    heads.norms[p].as_deref(),
                    rope,
                    heads.eps,
                );
                let at = (((c * b + s) * h + head) * t + ti) * hd;
                // SAFETY: `out` has room for `size` values; head (c, head) of row (s, ti) is written by
                // this group alone, once.
                unsafe { std::ptr::copy_nonoverlapping(y.as_ptr(), dst.0.add(at), hd) };
            }
        }
    });
    // SAFETY: every one of the `size` values was written above: each (chosen part, head) group wrote its
    // head of every row.
    unsafe { out.set_len(size) };
    out
}

/// `run(p, next)` for every panel p < `count`, the panels cut into one contiguous range per thread of
/// the pool; `next` tells whether the same thread computes panel p + 1 after p.
fn for_each_panel(count: usize, run: impl Fn(usize, bool) + Sync) {
    for_each_panel_with(count, || (), |_, p, next| run(p, next));
}

/// [`for_each_panel`] with a scratch value made by `init` once per thread's range, handed to each of
/// its panels.
fn for_each_panel_with<S>(
    count: usize,
    init: impl Fn() -> S + Sync,
    run: impl Fn(&mut S, usize, bool) + Sync,
) {
    let jobs = rayon::current_num_threads().clamp(1, count.max(1));
    let per_job = count.div_ceil(jobs);
    (0..jobs).into_par_iter().for_each(|job| {
        let end = ((job + 1) * per_job).min(count);
        let mut scratch = init();
        (job * per_job..end).for_each(|p| run(&mut scratch, p, p + 1 < end));
    });
}

/// The row block during which a product of m rows prefetches the next panel into L2: the second, while
/// the current panel comes from L1, or the only one.
///
/// Without it, the first block of each panel waits for the panel to arrive from memory, and a product of
/// a few rows has few blocks to spread that wait over: nmm-s's six layers of projections (scratch
/// program, the two ways interleaved pass by pass, best of 400 passes, three runs) took 0.98–1.20 ms
/// with it against 1.17–1.41 ms without at 17 rows, 0.26–0.35 against 0.40–0.56 ms for one row, and
/// 3.90–3.93 against 4.08–4.13 ms at 74 rows; at 290 rows the two were level.
fn prefetch_block(m: usize, kernel: Kernel) -> usize {
    usize::from(row_blocks(m, kernel).nth(1).is_some())
}

/// The row blocks (first row, rows) of an m-row product. AVX2: six rows at a time, and a remainder of
/// 7 to 11 split in two near-equal blocks, which keeps more accumulators busy than a block of one to
/// five rows after a full one. AVX-512: as few blocks as thirty rows allow, of near-equal sizes.
fn row_blocks(m: usize, kernel: Kernel) -> impl Iterator<Item = (usize, usize)> {
    let (mut r, mut block) = (0, 0);
    let blocks = m.div_ceil(MR_WIDE).max(1);
    std::iter::from_fn(move || {
        let left = m - r;
        let rows = if kernel == Kernel::Avx512 {
            (m / blocks + usize::from(block < m % blocks)).min(left)
        } else if left >= 12 || left == MR {
            MR
        } else if left > MR {
            left.div_ceil(2)
        } else {
            left
        };
        let at = (r, rows);
        (r, block) = (r + rows, block + 1);
        (rows > 0).then_some(at)
    })
}

/// Rows 0 … m of one gate panel and its up panel: out[r·ldc + j] = silu(g)·u for g and u the rows' products
/// with the two panels, j < 16. `fetch`: the next gate and up panels, prefetched meanwhile. `tiles`:
/// scratch for one row block's gate, up and activation values, whatever they held before.
///
/// # Safety
/// The CPU has AVX2 and FMA, and AVX-512F for [`Kernel::Avx512`]; `x` holds m × k values and each panel
/// k × 16; `out` must be valid for writes of m rows of 16 values ldc apart.
#[allow(clippy::too_many_arguments)]
unsafe fn swiglu_rows(
    x: &[f32],
    k: usize,
    (gate, up): (&[f32], &[f32]),
    fetch: Option<(&[f32], &[f32])>,
    out: *mut f32,
    (ldc, m): (usize, usize),
    kernel: Kernel,
    tiles: &mut [[f32; MR_WIDE * PANEL]; 3],
) {
    #[cfg(target_arch = "x86_64")]
    let prefetching = prefetch_block(m, kernel);
    #[cfg(target_arch = "x86_64")]
    for (block, (r, rows)) in row_blocks(m, kernel).enumerate() {
        let a = &x[r * k..(r + rows) * k];
        let fetch = fetch.filter(|_| block == prefetching);
        let [g, u, y] = &mut *tiles;
        // SAFETY: the CPU's features and the slices' lengths are the caller's; the tiles hold `rows`
        // rows of 16 values, and `out` rows r … r + rows.
        unsafe {
            micro_rows(
                a,
                k,
                (gate, fetch.map(|f| f.0)),
                g.as_mut_ptr(),
                (PANEL, rows),
                false,
                kernel,
            );
            micro_rows(
                a,
                k,
                (up, fetch.map(|f| f.1)),
                u.as_mut_ptr(),
                (PANEL, rows),
                false,
                kernel,
            );
            kernels::swiglu_avx2(
                &mut y[..rows * PANEL],
                &g[..rows * PANEL],
                &u[..rows * PANEL],
            );
            for i in 0..rows {
                std::ptr::copy_nonoverlapping(
                    y[i * PANEL..].as_ptr(),
                    out.add((r + i) * ldc),
                    PANEL,
                );
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, k, gate, up, fetch, out, ldc, m, kernel, tiles);
        unreachable!("panels are packed only on x86-64");
    }
}

/// Rows 0 … m of one panel: out[r·ldc + j] (+)= Σ_k x[r·k + i]·panel[i·16 + j] for j < cols. `fetch`: the
/// panel to prefetch meanwhile, if any.
///
/// # Safety
/// The CPU has AVX2 and FMA, and AVX-512F for [`Kernel::Avx512`]; `x` holds m × k values and each panel
/// k × 16; `out` must be valid for writes of m rows of `cols` values ldc apart (and reads, when
/// `accumulate`).
#[allow(clippy::too_many_arguments)]
unsafe fn panel_rows(
    x: &[f32],
    k: usize,
    (panel, fetch): (&[f32], Option<&[f32]>),
    out: *mut f32,
    ldc: usize,
    m: usize,
    cols: usize,
    accumulate: bool,
    kernel: Kernel,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let prefetching = prefetch_block(m, kernel);
        for (block, (r, rows)) in row_blocks(m, kernel).enumerate() {
            let a = &x[r * k..(r + rows) * k];
            let panels = (panel, fetch.filter(|_| block == prefetching));
            // SAFETY: the caller's bounds, for rows r … r + rows.
            unsafe {
                let c = out.add(r * ldc);
                if cols == PANEL {
                    micro_rows(a, k, panels, c, (ldc, rows), accumulate, kernel);
                } else {
                    // The last panel of a width that is not a multiple of 16: through a buffer.
                    let mut buf = [0.0f32; MR_WIDE * PANEL];
                    if accumulate {
                        for i in 0..rows {
                            std::ptr::copy_nonoverlapping(
                                c.add(i * ldc),
                                buf[i * PANEL..].as_mut_ptr(),
                                cols,
                            );
                        }
                    }
                    micro_rows(
                        a,
                        k,
                        panels,
                        buf.as_mut_ptr(),
                        (PANEL, rows),
                        accumulate,
                        kernel,
                    );
                    for i in 0..rows {
                        std::ptr::copy_nonoverlapping(
                            buf[i * PANEL..].as_ptr(),
                            c.add(i * ldc),
                            cols,
                        );
                    }
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, k, panel, fetch, out, ldc, m, cols, accumulate, kernel);
        unreachable!("panels are packed only on x86-64");
    }
}

/// One call of `kernel`'s micro-kernel for 1 to 6 rows (AVX2) or 1 to 30 (AVX-512), prefetching the
/// panel `fetch` when given.
///
/// # Safety
/// The CPU has AVX2 and FMA, and AVX-512F for [`Kernel::Avx512`]; `a` holds `rows` × k values and the
/// panels k × 16 each; `out` is valid for `rows` rows of 16 values ldc apart.
#[cfg(target_arch = "x86_64")]
unsafe fn micro_rows(
    a: &[f32],
    k: usize,
    (panel, fetch): (&[f32], Option<&[f32]>),
    out: *mut f32,
    (ldc, rows): (usize, usize),
    accumulate: bool,
    kernel: Kernel,
) {
    macro_rules! wide {
        ($($r:literal)*) => {
            match rows {
                $($r => match fetch {
                    Some(next) => micro_wide::<$r, true>(a, k, (panel, next), out, ldc, accumulate),
                    None => micro_wide::<$r, false>(a, k, (panel, panel), out, ldc, accumulate),
                },)*
                _ => unreachable!("the AVX-512 micro-kernel takes 1 to {MR_WIDE} rows, not {rows}"),
            }
        };
    }
    if kernel == Kernel::Avx512 {
        // SAFETY: forwarded from the caller.
        unsafe {
            wide!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30)
        };
        return;
    }
    macro_rules! call {
        ($r:literal) => {
            match (accumulate, fetch) {
                (true, Some(next)) => micro::<$r, true, true>(a, k, panel, next, out, ldc),
                (false, Some(next)) => micro::<$r, false, true>(a, k, panel, next, out, ldc),
                (true, None) => micro::<$r, true, false>(a, k, panel, panel, out, ldc),
                (false, None) => micro::<$r, false, false>(a, k, panel, panel, out, ldc),
            }
        };
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match rows {
            6 => call!(6),
            5 => call!(5),
            4 => call!(4),
            3 => call!(3),
            2 => call!(2),
            1 => call!(1),
            _ => unreachable!("the AVX2 micro-kernel takes 1 to {MR} rows, not {rows}"),
        }
    }
}

/// R rows by 16 columns: out (+)= a (R, k) · panel (k, 16), two eight-wide accumulators per row. With
/// `FETCH`, each step over k also prefetches row i of the panel `next` into L2 (a row of a panel is one
/// cache line's 64 bytes).
///
/// # Safety
/// The CPU has AVX2 and FMA; `a` holds R × k values, `panel` and `next` k × 16 each, and `out` is valid
/// for R rows of 16 values ldc apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro<const R: usize, const ACC: bool, const FETCH: bool>(
    a: &[f32],
    k: usize,
    panel: &[f32],
    next: &[f32],
    out: *mut f32,
    ldc: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= R * k && panel.len() >= k * PANEL && next.len() >= k * PANEL);
    let (a, b, next) = (a.as_ptr(), panel.as_ptr(), next.as_ptr());
    // SAFETY: the bounds above and the caller's for `out`.
    unsafe {
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        if ACC {
            for r in 0..R {
                lo[r] = _mm256_loadu_ps(out.add(r * ldc));
                hi[r] = _mm256_loadu_ps(out.add(r * ldc + 8));
            }
        }
        for i in 0..k {
            if FETCH {
                _mm_prefetch::<_MM_HINT_T1>(next.add(i * PANEL).cast());
            }
            let b_lo = _mm256_loadu_ps(b.add(i * PANEL));
            let b_hi = _mm256_loadu_ps(b.add(i * PANEL + 8));
            for r in 0..R {
                let x = _mm256_broadcast_ss(&*a.add(r * k + i));
                lo[r] = _mm256_fmadd_ps(x, b_lo, lo[r]);
                hi[r] = _mm256_fmadd_ps(x, b_hi, hi[r]);
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(out.add(r * ldc), lo[r]);
            _mm256_storeu_ps(out.add(r * ldc + 8), hi[r]);
        }
    }
}

/// R rows by 16 columns in AVX-512: out (+)= a (R, k) · panel (k, 16), one sixteen-wide accumulator per
/// row, each multiply-add in the same order as [`micro`]'s. With `FETCH`, each step over k also
/// prefetches row i of the panel `next` into L2.
///
/// # Safety
/// The CPU has AVX-512F; `a` holds R × k values, `panel` and `next` k × 16 each, and `out` is valid for
/// R rows of 16 values ldc apart (reads too, when `accumulate`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro_wide<const R: usize, const FETCH: bool>(
    a: &[f32],
    k: usize,
    (panel, next): (&[f32], &[f32]),
    out: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= R * k && panel.len() >= k * PANEL && next.len() >= k * PANEL);
    let (a, b, next) = (a.as_ptr(), panel.as_ptr(), next.as_ptr());
    // SAFETY: the bounds above and the caller's for `out`.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        if accumulate {
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_loadu_ps(out.add(r * ldc));
            }
        }
        for i in 0..k {
            if FETCH {
                _mm_prefetch::<_MM_HINT_T1>(next.add(i * PANEL).cast());
            }
            let b = _mm512_loadu_ps(b.add(i * PANEL));
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(r * k + i)), b, *acc);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * ldc), *acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::relative_error;
    use candle_core::Device;

    /// Deterministic values in [−1, 1).
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
            .collect()
    }

    fn tensor(len_dims: (usize, usize), seed: usize) -> Tensor {
        let (r, c) = len_dims;
        Tensor::from_vec(values(r * c, seed), (r, c), &Device::Cpu).unwrap()
    }

    #[test]
    fn pack_cuts_columns_into_zero_padded_panels() {
        // w (2, 18): two panels, the second holding columns 16 and 17 and fourteen zeros per row.
        let w: Vec<f32> = (0..36).map(|v| v as f32).collect();
        let packed = pack(&w, 2, 18);
        assert_eq!(packed.len(), 2 * 2 * PANEL);
        assert_eq!(&packed[..PANEL], &w[..16]);
        assert_eq!(&packed[PANEL..2 * PANEL], &w[18..34]);
        assert_eq!(&packed[2 * PANEL..2 * PANEL + 2], &[16.0, 17.0]);
        assert_eq!(&packed[3 * PANEL..3 * PANEL + 2], &[34.0, 35.0]);
        assert!(packed[2 * PANEL + 2..3 * PANEL].iter().all(|&v| v == 0.0));
        assert!(packed[3 * PANEL + 2..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn packing_into_a_used_buffer_gives_a_fresh_packing() {
        // w (18, 3): its transpose (3, 18) packs into two panels, the second holding rows 16 and 17
        // of w and fourteen zeros per column.
        let w: Vec<f32> = (0..54).map(|v| v as f32).collect();
        let mut transposed = Vec::new();
        pack_transposed_into(&w, 18, 3, &mut transposed);
        let mut t = vec![0f32; 3 * 18];
        for (row, src) in w.chunks_exact(3).enumerate() {
            for (col, &x) in src.iter().enumerate() {
                t[col * 18 + row] = x;
            }
        }
        assert_eq!(transposed, pack(&t, 3, 18));
        assert_eq!(&transposed[..PANEL], &t[..16]);
        assert!(
            transposed[3 * PANEL + 2..4 * PANEL]
                .iter()
                .all(|&v| v == 0.0)
        );
        // Into buffers left longer and shorter by other packings, padding included, not zeroed first.
        for len in [0, 40, 500] {
            let mut used = vec![f32::NAN; len];
            pack_transposed_into(&w, 18, 3, &mut used);
            assert_eq!(used, transposed, "transposed, from {len} values");
            let mut used = vec![f32::NAN; len];
            pack_into(&w, 18, 3, &mut used);
            assert_eq!(used, pack(&w, 18, 3), "packed, from {len} values");
        }
    }

    /// The kernels this CPU runs: AVX2 and FMA, and AVX-512 where it has AVX-512F (whatever
    /// `TOKENFOLD_AVX512` says, so that the tests compare both here).
    fn kernels_here() -> Vec<Kernel> {
        let mut kernels = Vec::new();
        if panels_available() {
            kernels.push(Kernel::Avx2);
            if avx512_available() {
                kernels.push(Kernel::Avx512);
            }
        }
        kernels
    }

    #[test]
    fn row_blocks_cover_the_rows_once_and_the_second_prefetches() {
        for kernel in [Kernel::Avx2, Kernel::Avx512] {
            let most = if kernel == Kernel::Avx2 { MR } else { MR_WIDE };
            for m in 0..100 {
                let blocks: Vec<(usize, usize)> = row_blocks(m, kernel).collect();
                let mut next = 0;
                for &(r, rows) in &blocks {
                    assert!(r == next && (1..=most).contains(&rows), "m {m}: {blocks:?}");
                    next += rows;
                }
                assert_eq!(next, m, "m {m}: {blocks:?}");
                if kernel == Kernel::Avx2 {
                    // A remainder of 7 to 11 rows is split evenly rather than leaving a small last
                    // block.
                    if let [.., (_, a), (_, b)] = blocks[..] {
                        assert!(a.abs_diff(b) <= 1 || a == MR, "m {m}: {blocks:?}");
                    }
                } else {
                    // As few blocks as thirty rows allow, none more than one row longer than another.
                    assert_eq!(blocks.len(), m.div_ceil(MR_WIDE), "m {m}: {blocks:?}");
                    let sizes = blocks.iter().map(|b| b.1);
                    let (shortest, longest) = (sizes.clone().min(), sizes.max());
                    let near = longest.zip(shortest).is_none_or(|(a, b)| a - b <= 1);
                    assert!(near, "m {m}: {blocks:?}");
                }
                let prefetching = prefetch_block(m, kernel);
                assert_eq!(prefetching, usize::from(blocks.len() > 1), "m {m}");
            }
        }
        let blocks = |m, kernel| row_blocks(m, kernel).collect::<Vec<_>>();
        assert_eq!(blocks(17, Kernel::Avx2), [(0, 6), (6, 6), (12, 5)]);
        assert_eq!(blocks(9, Kernel::Avx2), [(0, 5), (5, 4)]);
        assert_eq!(blocks(17, Kernel::Avx512), [(0, 17)]);
        assert_eq!(blocks(74, Kernel::Avx512), [(0, 25), (25, 25), (50, 24)]);
    }

    #[test]
    fn both_kernels_give_the_same_bits() {
        if kernels_here().len() < 2 {
            eprintln!(
                "no AVX-512F on this CPU: only the AVX2 kernel runs, against candle's matmul"
            );
            return;
        }
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        // Row counts of none to five AVX-512 blocks, blocks of one to thirty rows, and inner sizes up to
        // the down projection's 688 (whose panels sit in L2).
        let rows = [
            0usize, 1, 2, 5, 6, 7, 13, 17, 29, 30, 31, 45, 60, 61, 74, 91, 121,
        ];
        for &k in &[1usize, 7, 64, 300, 688] {
            for &n in &[16usize, 50] {
                let (w, r) = (values(k * n, k + n), values(121 * n, 5));
                let panels = pack(&w, k, n);
                for &m in &rows {
                    let x = values(m * k, m);
                    let run = |kernel, add| bits(product(&x, &panels, (m, k, n), add, kernel));
                    let what = format!("m {m} k {k} n {n}");
                    let plain = run(Kernel::Avx2, None);
                    assert_eq!(plain, run(Kernel::Avx512, None), "x·w, {what}");
                    let add = Some(&r[..m * n]);
                    assert_eq!(
                        run(Kernel::Avx2, add),
                        run(Kernel::Avx512, add),
                        "r + x·w, {what}"
                    );
                }
            }
            let f = 32;
            let panels = pack(&values(k * 2 * f, k), k, 2 * f);
            let (h, hd) = (2, 16);
            let head_panels = pack(&values(k * 3 * h * hd, k + 1), k, 3 * h * hd);
            for &m in &rows {
                let x = values(m * k, m + 1);
                let run = |kernel| bits(swiglu_product(&x, &panels, (m, k, f), kernel));
                assert_eq!(
                    run(Kernel::Avx2),
                    run(Kernel::Avx512),
                    "swiglu, m {m} k {k}"
                );
                let (cos, sin) = (values(m * hd / 2, 6), values(m * hd / 2, 7));
                let norms = [Some(values(hd, 8)), None, None];
                let heads = Heads {
                    dims: (1, m, h, hd),
                    tables: (&cos, &sin),
                    norms: &norms,
                    rotate: &[true, true, false],
                    chosen: &[0, 1, 2],
                    eps: 1e-6,
                };
                let run = |kernel| {
                    bits(heads_product(
                        &x,
                        &head_panels,
                        (m, k, 3 * h * hd),
                        &heads,
                        kernel,
                    ))
                };
                assert_eq!(run(Kernel::Avx2), run(Kernel::Avx512), "heads, m {m} k {k}");
            }
        }
    }

    #[test]
    fn packed_products_match_candle_matmul() {
        let mut seed = 0;
        for &k in &[1usize, 7, 64] {
            for &n in &[1usize, 15, 16, 17, 50] {
                let w = tensor((k, n), seed);
                let packed = PackedWeight::new(&w).unwrap();
                assert_eq!(packed.panels.is_some(), panels_available());
                for &m in &[0usize, 1, 2, 5, 6, 7, 11, 12, 13, 17, 40] {
                    seed += 1;
                    let x = tensor((m, k), seed);
                    let got = packed.matmul(&x).unwrap();
                    let error = relative_error(&got, &x.matmul(&w).unwrap());
                    assert!(error < 1e-5, "x·w, m {m} k {k} n {n}: error {error}");
                    let r = tensor((m, n), seed + 1000);
                    let got = packed.matmul_add(&r, &x).unwrap();
                    let reference = (&r + x.matmul(&w).unwrap()).unwrap();
                    let error = relative_error(&got, &reference);
                    assert!(error < 1e-5, "r + x·w, m {m} k {k} n {n}: error {error}");
                }
            }
        }
    }

    #[test]
    fn products_are_right_in_pools_of_one_to_four_threads() {
        // 3, 3 and 5 panels: job counts that do not divide them, and a partial last panel.
        for &n in &[33usize, 40, 80] {
            let (m, k) = (13, 24);
            let w = tensor((k, n), n);
            let packed = PackedWeight::new(&w).unwrap();
            let x = tensor((m, k), n + 1);
            let reference = x.matmul(&w).unwrap();
            in_pools_of_one_to_four_threads(&reference, &format!("n {n}"), || {
                packed.matmul(&x).unwrap()
            });
        }
    }

    /// `run` in pools of one to four threads gives `reference`.
    fn in_pools_of_one_to_four_threads(
        reference: &Tensor,
        what: &str,
        run: impl Fn() -> Tensor + Send + Sync,
    ) {
        for threads in 1..=4 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let error = relative_error(&pool.install(&run), reference);
            assert!(error < 1e-5, "{what}, {threads} threads: error {error}");
        }
    }

    #[test]
    fn the_kernel_writes_only_its_panels_columns() {
        if !panels_available() {
            return;
        }
        // w (k, 20): a full panel and one of 4 columns, written into rows 24 apart with NaN around; 8
        // rows in one or two blocks, 37 in two or seven.
        let (k, n, ldc) = (5, 20, 24);
        let w = values(k * n, 1);
        let panels = pack(&w, k, n);
        for (kernel, m, accumulate) in kernels_here()
            .into_iter()
            .flat_map(|kernel| [8, 37].map(|m| (kernel, m)))
            .flat_map(|(kernel, m)| [false, true].map(|a| (kernel, m, a)))
        {
            let x = values(m * k, 2);
            let mut out = vec![f32::NAN; m * ldc + PANEL];
            if accumulate {
                (0..m).for_each(|i| out[i * ldc..i * ldc + n].fill(1.0));
            }
            let panel = |q: usize| &panels[q * k * PANEL..(q + 1) * k * PANEL];
            for p in 0..2 {
                let cols = PANEL.min(n - p * PANEL);
                // The first panel prefetches the second, as a thread that computes both does.
                let fetch = (p == 0).then(|| panel(1));
                // SAFETY: the CPU runs `kernel` (`kernels_here`); `out` holds m rows of ldc ≥ n
                // values, and columns p·16 … p·16 + cols of each lie inside it.
                unsafe {
                    panel_rows(
                        &x,
                        k,
                        (panel(p), fetch),
                        out.as_mut_ptr().add(p * PANEL),
                        ldc,
                        m,
                        cols,
                        accumulate,
                        kernel,
                    )
                };
            }
            check_written(&out, (m, n, ldc), |i, j| {
                (0..k).map(|l| x[i * k + l] * w[l * n + j]).sum::<f32>()
                    + if accumulate { 1.0 } else { 0.0 }
            });
        }
    }

    /// `out` holds `expected(i, j)` in columns j < width of m rows ldc apart, and NaN everywhere else.
    fn check_written(
        out: &[f32],
        (m, width, ldc): (usize, usize, usize),
        expected: impl Fn(usize, usize) -> f32,
    ) {
        for i in 0..m {
            for j in 0..width {
                let (got, expected) = (out[i * ldc + j], expected(i, j));
                assert!(
                    (got - expected).abs() < 1e-5,
                    "row {i} column {j}: {got} ≠ {expected}"
                );
            }
            assert!(
                out[i * ldc + width..(i + 1) * ldc]
                    .iter()
                    .all(|v| v.is_nan()),
                "row {i}"
            );
        }
        assert!(
            out[m * ldc..].iter().all(|v| v.is_nan()),
            "past the last row"
        );
    }

    #[test]
    fn inputs_that_need_gradients_take_candles_matmul_or_are_refused() {
        let w = tensor((6, 10), 7);
        let packed = PackedWeight::new(&w).unwrap();
        let x = candle_core::Var::from_tensor(&tensor((3, 6), 8)).unwrap();
        let y = packed.matmul(x.as_tensor()).unwrap();
        assert!(
            y.track_op(),
            "the product of a variable keeps its gradient graph"
        );
        let grads = y.sum_all().unwrap().backward().unwrap();
        let grad = grads.get(x.as_tensor()).expect("x receives a gradient");
        let expected = w
            .sum(1)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((3, 6))
            .unwrap();
        assert!(relative_error(grad, &expected.contiguous().unwrap()) < 1e-6);
        let err = packed
            .matmul_add(&tensor((3, 10), 9), x.as_tensor())
            .unwrap_err();
        assert!(err.to_string().contains("no backward pass"), "{err}");
    }

    #[test]
    fn a_rows_product_does_not_depend_on_the_rows_beside_it() {
        if !panels_available() {
            return;
        }
        let (k, n) = (96, 40);
        let packed = PackedWeight::new(&tensor((k, n), 3)).unwrap();
        let x = tensor((23, k), 4);
        let all: Vec<Vec<f32>> = packed.matmul(&x).unwrap().to_vec2().unwrap();
        for (i, row) in all.iter().enumerate() {
            let alone: Vec<Vec<f32>> = packed
                .matmul(&x.narrow(0, i, 1).unwrap())
                .unwrap()
                .to_vec2()
                .unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(row), bits(&alone[0]), "row {i}");
        }
    }

    #[test]
    fn larger_products_and_f64_take_candle_and_a_residual_keeps_its_leading_dimensions() {
        let (k, n) = (8, 20);
        let w = tensor((k, n), 5);
        let packed = PackedWeight::new(&w).unwrap();
        // More rows than the panels take: gemm, the same values.
        let x = tensor((PANEL_ROWS_MAX + 9, k), 6);
        let error = relative_error(&packed.matmul(&x).unwrap(), &x.matmul(&w).unwrap());
        assert!(error < 1e-5, "{error}");
        // f64: never packed.
        let w64 = w.to_dtype(DType::F64).unwrap();
        let packed64 = PackedWeight::new(&w64).unwrap();
        assert!(packed64.panels.is_none());
        let x64 = x.to_dtype(DType::F64).unwrap();
        let diff = (packed64.matmul(&x64).unwrap() - x64.matmul(&w64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(diff, 0.0);
        // A residual with leading dimensions (b, t, n) and a of (b, t, k).
        let a = Tensor::from_vec(values(2 * 3 * k, 7), (2, 3, k), &Device::Cpu).unwrap();
        let r = Tensor::from_vec(values(2 * 3 * n, 8), (2, 3, n), &Device::Cpu).unwrap();
        let reference = (&r
            + a.reshape((6, k))
                .unwrap()
                .matmul(&w)
                .unwrap()
                .reshape((2, 3, n))
                .unwrap())
        .unwrap();
        let got = packed.matmul_add(&r, &a).unwrap();
        assert!(relative_error(&got, &reference) < 1e-5);
    }

    /// silu(x·w_gate)·(x·w_up) in candle's plain ops, w (k, 2f) holding gate then up.
    fn swiglu_reference(x: &Tensor, w: &Tensor) -> Tensor {
        let f = w.dim(1).unwrap() / 2;
        let gate = x.matmul(&w.narrow(1, 0, f).unwrap()).unwrap();
        let up = x.matmul(&w.narrow(1, f, f).unwrap()).unwrap();
        (candle_nn::ops::silu(&gate).unwrap() * up).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn matmul_swiglu_gives_the_two_steps_values() {
        let mut seed = 100;
        // f a multiple of 16 takes the fused pass, other widths the two steps; 600 rows take gemm.
        for &k in &[1usize, 7, 64] {
            for &f in &[16usize, 32, 48, 8, 25] {
                let w = tensor((k, 2 * f), seed);
                let packed = PackedWeight::new(&w).unwrap();
                assert_eq!(packed.panels.is_some(), panels_available());
                for &m in &[0usize, 1, 5, 6, 7, 11, 12, 13, 17, 40, 600] {
                    seed += 1;
                    let x = tensor((m, k), seed);
                    let got = packed.matmul_swiglu(&x).unwrap();
                    assert_eq!(got.dims(), [m, f]);
                    let two_steps = kernels::swiglu_halves(&packed.matmul(&x).unwrap()).unwrap();
                    assert_eq!(bits(&got), bits(&two_steps), "m {m} k {k} f {f}");
                    let error = relative_error(&got, &swiglu_reference(&x, &w));
                    assert!(error < 1e-5, "m {m} k {k} f {f}: error {error}");
                }
            }
        }
    }

    #[test]
    fn matmul_swiglu_is_right_in_pools_of_one_to_four_threads() {
        // 1, 3 and 5 gate panels: job counts that do not divide them.
        for &f in &[16usize, 48, 80] {
            let (m, k) = (13, 24);
            let w = tensor((k, 2 * f), f);
            let packed = PackedWeight::new(&w).unwrap();
            let x = tensor((m, k), f + 1);
            in_pools_of_one_to_four_threads(&swiglu_reference(&x, &w), &format!("f {f}"), || {
                packed.matmul_swiglu(&x).unwrap()
            });
        }
    }

    #[test]
    fn the_swiglu_kernel_writes_only_its_panels_columns() {
        if !panels_available() {
            return;
        }
        // w (k, 2·32): gate panels 0 and 1, up panels 2 and 3; rows 40 apart with NaN around; 9 rows
        // in one or two blocks, 37 in two or seven.
        let (k, f, ldc) = (5, 32, 40);
        let w = values(k * 2 * f, 3);
        let panels = pack(&w, k, 2 * f);
        let panel = |q: usize| &panels[q * k * PANEL..(q + 1) * k * PANEL];
        for (kernel, m) in kernels_here()
            .into_iter()
            .flat_map(|kernel| [9, 37].map(|m| (kernel, m)))
        {
            let x = values(m * k, 4);
            let mut out = vec![f32::NAN; m * ldc + PANEL];
            for p in 0..2 {
                // SAFETY: the CPU runs `kernel` (`kernels_here`); `out` holds m rows of ldc ≥ f
                // values, and columns p·16 … p·16 + 15 of each lie inside it.
                unsafe {
                    swiglu_rows(
                        &x,
                        k,
                        (panel(p), panel(p + 2)),
                        (p == 0).then(|| (panel(1), panel(3))),
                        out.as_mut_ptr().add(p * PANEL),
                        (ldc, m),
                        kernel,
                        &mut [[f32::NAN; MR_WIDE * PANEL]; 3],
                    )
                };
            }
            check_written(&out, (m, f, ldc), |i, j| {
                let product =
                    |c: usize| (0..k).map(|l| x[i * k + l] * w[l * 2 * f + c]).sum::<f32>();
                let (g, u) = (product(j), product(f + j));
                g / (1.0 + (-g).exp()) * u
            });
        }
    }

    #[test]
    fn matmul_swiglu_keeps_gradients_and_refuses_an_odd_width() {
        let w = tensor((6, 32), 7);
        let packed = PackedWeight::new(&w).unwrap();
        let x = candle_core::Var::from_tensor(&tensor((3, 6), 8)).unwrap();
        let y = packed.matmul_swiglu(x.as_tensor()).unwrap();
        assert!(y.track_op(), "the activation of a variable keeps its graph");
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some(), "x receives a gradient");
        let err = PackedWeight::new(&tensor((6, 31), 9))
            .unwrap()
            .matmul_swiglu(&tensor((3, 6), 10))
            .unwrap_err()
            .to_string();
        assert!(err.contains("(6, 31)"), "{err}");
    }

    /// Rotary tables (b, 1, t, hd/2) of deterministic angles.
    fn tables(b: usize, t: usize, hd: usize) -> (Tensor, Tensor) {
        let angles: Vec<f32> = (0..b * t * hd / 2).map(|i| i as f32 * 0.37).collect();
        let table = |f: fn(f32) -> f32| {
            let v: Vec<f32> = angles.iter().map(|&a| f(a)).collect();
            Tensor::from_vec(v, (b, 1, t, hd / 2), &Device::Cpu).unwrap()
        };
        (table(f32::cos), table(f32::sin))
    }

    #[test]
    fn matmul_heads_gives_split_heads_values() {
        let mut seed = 200;
        // hd a multiple of 16 takes the fused pass, other sizes the two steps; 520 rows take gemm.
        for &(parts, h, hd) in &[
            (3usize, 2usize, 16usize),
            (3, 3, 32),
            (1, 2, 48),
            (1, 1, 16),
            (3, 2, 8),
            (1, 3, 6),
        ] {
            for &(b, t) in &[(1usize, 1usize), (1, 5), (1, 13), (3, 7), (2, 17), (1, 520)] {
                seed += 1;
                let (k, n) = (24, parts * h * hd);
                let w = tensor((k, n), seed);
                let packed = PackedWeight::new(&w).unwrap();
                assert_eq!(packed.panels.is_some(), panels_available());
                let x =
                    Tensor::from_vec(values(b * t * k, seed + 1), (b, t, k), &Device::Cpu).unwrap();
                let q_norm = tensor((1, hd), seed + 2).flatten_all().unwrap();
                let k_norm = tensor((1, hd), seed + 3).flatten_all().unwrap();
                let all = [
                    kernels::HeadPart {
                        norm: Some(&q_norm),
                        rotate: true,
                    },
                    kernels::HeadPart {
                        norm: Some(&k_norm),
                        rotate: true,
                    },
                    kernels::HeadPart {
                        norm: None,
                        rotate: false,
                    },
                ];
                let parts = &all[3 - parts..];
                let (cos, sin) = tables(b, t, hd);
                let got = packed
                    .matmul_heads(&x, h, parts, (&cos, &sin), 1e-5)
                    .unwrap();
                let product = packed.matmul(&x.reshape((b * t, k)).unwrap()).unwrap();
                let two_steps = kernels::split_heads(
                    &product.reshape((b, t, n)).unwrap(),
                    h,
                    parts,
                    (&cos, &sin),
                    1e-5,
                )
                .unwrap();
                let plain = kernels::split_heads(
                    &x.matmul(&w.unsqueeze(0).unwrap().broadcast_as((b, k, n)).unwrap())
                        .unwrap(),
                    h,
                    parts,
                    (&cos, &sin),
                    1e-5,
                )
                .unwrap();
                assert_eq!(got.len(), parts.len());
                // Every subset of the parts, none included, gives those parts' values bit for bit.
                for mask in 0..1usize << parts.len() {
                    let wanted: Vec<bool> = (0..parts.len()).map(|p| mask >> p & 1 == 1).collect();
                    let some = packed
                        .matmul_heads_of(&x, h, parts, &wanted, (&cos, &sin), 1e-5)
                        .unwrap();
                    let expected: Vec<&Tensor> = got
                        .iter()
                        .zip(&wanted)
                        .filter_map(|(part, &w)| w.then_some(part))
                        .collect();
                    assert_eq!(some.len(), expected.len(), "parts {wanted:?}");
                    for (some, expected) in some.iter().zip(expected) {
                        assert_eq!(
                            bits(some),
                            bits(expected),
                            "parts {wanted:?}, h {h}, hd {hd}"
                        );
                    }
                }
                for ((got, two_steps), plain) in got.iter().zip(&two_steps).zip(&plain) {
                    assert_eq!(got.dims(), [b, h, t, hd]);
                    let what = format!("{} parts, h {h}, hd {hd}, b {b}, t {t}", parts.len());
                    assert_eq!(bits(got), bits(two_steps), "{what}");
                    let error = relative_error(got, plain);
                    assert!(error < 1e-5, "{what}: error {error}");
                }
            }
        }
    }

    #[test]
    fn matmul_heads_is_right_in_pools_of_one_to_four_threads() {
        // Three parts of three heads: nine head groups, which two to four jobs do not divide evenly.
        let (b, t, k, h, hd) = (2, 9, 20, 3, 16);
        let w = tensor((k, 3 * h * hd), 1);
        let packed = PackedWeight::new(&w).unwrap();
        let x = Tensor::from_vec(values(b * t * k, 2), (b, t, k), &Device::Cpu).unwrap();
        let norm = tensor((1, hd), 3).flatten_all().unwrap();
        let parts = [
            kernels::HeadPart {
                norm: Some(&norm),
                rotate: true,
            },
            kernels::HeadPart {
                norm: None,
                rotate: true,
            },
            kernels::HeadPart {
                norm: None,
                rotate: false,
            },
        ];
        let (cos, sin) = tables(1, t, hd);
        let heads = |parts: &[kernels::HeadPart]| {
            let all = packed
                .matmul_heads(&x, h, parts, (&cos, &sin), 1e-5)
                .unwrap();
            Tensor::stack(&all, 0).unwrap()
        };
        let reference = heads(&parts);
        in_pools_of_one_to_four_threads(&reference, "heads", || heads(&parts));
    }

    #[test]
    fn matmul_heads_refuses_what_split_heads_refuses() {
        let packed = PackedWeight::new(&tensor((8, 64), 4)).unwrap();
        let x = Tensor::from_vec(values(3 * 8, 5), (1, 3, 8), &Device::Cpu).unwrap();
        let (cos, sin) = tables(1, 3, 16);
        let part = |norm| kernels::HeadPart { norm, rotate: true };
        // 64 columns do not hold three heads of an even size.
        let err = packed
            .matmul_heads(&x, 3, &[part(None)], (&cos, &sin), 1e-5)
            .unwrap_err();
        assert!(err.to_string().contains("width of 64"), "{err}");
        // A norm weight of 8 for heads of 16.
        let short = tensor((1, 8), 6).flatten_all().unwrap();
        let err = packed
            .matmul_heads(&x, 4, &[part(Some(&short))], (&cos, &sin), 1e-5)
            .unwrap_err();
        assert!(err.to_string().contains("heads of 16"), "{err}");
        // No columns at all: heads of size 0 take the two steps, which give empty heads.
        let empty = PackedWeight::new(&tensor((8, 0), 7)).unwrap();
        let (cos0, sin0) = tables(1, 3, 0);
        let heads = empty
            .matmul_heads(&x, 2, &[part(None)], (&cos0, &sin0), 1e-5)
            .unwrap();
        assert_eq!(heads[0].dims(), [1, 2, 3, 0]);
        // Tables for 2 rows where there are 3.
        let (cos2, sin2) = tables(1, 2, 16);
        let err = packed
            .matmul_heads(&x, 4, &[part(None)], (&cos2, &sin2), 1e-5)
            .unwrap_err();
        assert!(err.to_string().contains("rotary tables"), "{err}");
        // An input that needs gradients: no backward pass, as split_heads.
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let err = packed
            .matmul_heads(var.as_tensor(), 4, &[part(None)], (&cos, &sin), 1e-5)
            .unwrap_err();
        assert!(err.to_string().contains("no backward pass"), "{err}");
    }

    #[test]
    fn mismatched_shapes_are_refused_with_their_dimensions() {
        let packed = PackedWeight::new(&tensor((8, 20), 9)).unwrap();
        let err = packed.matmul(&tensor((3, 9), 10)).unwrap_err().to_string();
        assert!(err.contains("[3, 9]") && err.contains("(8, 20)"), "{err}");
        let err = packed
            .matmul_add(&tensor((3, 21), 11), &tensor((3, 8), 12))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[3, 21]") && err.contains("(8, 20)"), "{err}");
    }
}
