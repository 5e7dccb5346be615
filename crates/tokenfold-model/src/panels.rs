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
//! Every output is one sum over k in order, by one thread, whatever the number of rows or threads: up
//! to [`PANEL_ROWS_MAX`] rows, a row's result does not depend on the rows beside it. Larger products,
//! f64, CPUs without AVX2 and FMA, and `TOKENFOLD_PLAIN_OPS=1` take candle's matmul with the plain
//! (k, n) tensor; so do inputs that need gradients in [`PackedWeight::matmul`], while
//! [`PackedWeight::matmul_add`], which has no backward pass, refuses them as [`kernels::matmul_add`]
//! does.

use candle_core::{DType, Result, Tensor, bail};
use rayon::prelude::*;

use crate::kernels;

/// Columns per panel: two AVX2 registers of f32.
pub const PANEL: usize = 16;

/// The most rows a product takes through the panels; above it gemm, whose packing pays off, runs. The
/// scratch program's panels were ahead of gemm up to 290 rows and level with it, within the machine's
/// noise, at 1,202; 512 was not measured on its own: it only needs to sit between the two.
pub const PANEL_ROWS_MAX: usize = 512;

/// Rows per micro-kernel call: six rows of two registers each keep twelve accumulators, the broadcast
/// input and the panel's two registers within AVX2's sixteen.
const MR: usize = 6;

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
                    Ok(product(x, panels, (m, self.k, self.n), None))
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
                        Ok(product(a, panels, (m, self.k, self.n), Some(r)))
                    })
                })?;
                Tensor::from_vec(out, r.dims(), r.device())
            }
            _ => kernels::matmul_add(r, a, &self.tensor),
        }
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
fn panels_available() -> bool {
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
    let panels = n.div_ceil(PANEL);
    let mut out = vec![0.0; panels * k * PANEL];
    for (p, panel) in out
        .chunks_exact_mut((k * PANEL).max(1))
        .enumerate()
        .take(panels)
    {
        let cols = PANEL.min(n - p * PANEL);
        for (row, dst) in panel.chunks_exact_mut(PANEL).enumerate() {
            dst[..cols].copy_from_slice(&w[row * n + p * PANEL..row * n + p * PANEL + cols]);
        }
    }
    out
}

/// A raw output pointer handed to the pool's jobs, each of which writes its own columns.
struct Out(*mut f32);
// SAFETY: the jobs write disjoint columns of the buffer, which outlives them (see `product`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// x (m, k) times the packed weight (k, n), plus `add` (m, n) when given; row-major (m, n). `panels`
/// exist only where [`panels_available`] holds (the micro-kernel needs AVX2 and FMA).
fn product(
    x: &[f32],
    panels: &[f32],
    (m, k, n): (usize, usize, usize),
    add: Option<&[f32]>,
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
    let count = n.div_ceil(PANEL);
    let jobs = rayon::current_num_threads().clamp(1, count);
    let per_job = count.div_ceil(jobs);
    let dst = Out(out.as_mut_ptr());
    let dst = &dst;
    let accumulate = add.is_some();
    (0..jobs).into_par_iter().for_each(|job| {
        for p in job * per_job..((job + 1) * per_job).min(count) {
            let panel = &panels[p * k * PANEL..(p + 1) * k * PANEL];
            let cols = PANEL.min(n - p * PANEL);
            // SAFETY: `out` has room for m × n values (capacity or length); this job alone writes columns
            // p·16 … p·16 + cols of every row, and `x` and `panel` hold m × k and k × 16 values.
            unsafe { panel_rows(x, k, panel, dst.0.add(p * PANEL), n, m, cols, accumulate) };
        }
    });
    // SAFETY: every one of the m × n values was written above: each row's columns by its panel.
    unsafe { out.set_len(m * n) };
    out
}

/// Rows 0 … m of one panel: out[r·ldc + j] (+)= Σ_k x[r·k + i]·panel[i·16 + j] for j < cols.
///
/// # Safety
/// The CPU has AVX2 and FMA; `x` holds m × k values and `panel` k × 16; `out` must be valid for writes
/// of m rows of `cols` values ldc apart (and reads, when `accumulate`).
#[allow(clippy::too_many_arguments)]
unsafe fn panel_rows(
    x: &[f32],
    k: usize,
    panel: &[f32],
    out: *mut f32,
    ldc: usize,
    m: usize,
    cols: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let mut r = 0;
        while r < m {
            // Six rows at a time; a remainder of 7 to 11 is split in two near-equal calls, which keeps
            // more accumulators busy than a call of one to five rows after a full one.
            let left = m - r;
            let rows = if left >= 12 || left == MR {
                MR
            } else if left > MR {
                left.div_ceil(2)
            } else {
                left
            };
            let a = &x[r * k..(r + rows) * k];
            // SAFETY: the caller's bounds, for rows r … r + rows.
            unsafe {
                let c = out.add(r * ldc);
                if cols == PANEL {
                    micro_rows(a, k, panel, c, ldc, rows, accumulate);
                } else {
                    // The last panel of a width that is not a multiple of 16: through a buffer.
                    let mut buf = [0.0f32; MR * PANEL];
                    if accumulate {
                        for i in 0..rows {
                            std::ptr::copy_nonoverlapping(
                                c.add(i * ldc),
                                buf[i * PANEL..].as_mut_ptr(),
                                cols,
                            );
                        }
                    }
                    micro_rows(a, k, panel, buf.as_mut_ptr(), PANEL, rows, accumulate);
                    for i in 0..rows {
                        std::ptr::copy_nonoverlapping(
                            buf[i * PANEL..].as_ptr(),
                            c.add(i * ldc),
                            cols,
                        );
                    }
                }
            }
            r += rows;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, k, panel, out, ldc, m, cols, accumulate);
        unreachable!("panels are packed only on x86-64");
    }
}

/// One call of the micro-kernel for 1 to 6 rows.
///
/// # Safety
/// The CPU has AVX2 and FMA; `out` is valid for `rows` rows of 16 values ldc apart.
#[cfg(target_arch = "x86_64")]
unsafe fn micro_rows(
    a: &[f32],
    k: usize,
    panel: &[f32],
    out: *mut f32,
    ldc: usize,
    rows: usize,
    accumulate: bool,
) {
    macro_rules! call {
        ($r:literal) => {
            if accumulate {
                micro::<$r, true>(a, k, panel, out, ldc)
            } else {
                micro::<$r, false>(a, k, panel, out, ldc)
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
            _ => call!(1),
        }
    }
}

/// R rows by 16 columns: out (+)= a (R, k) · panel (k, 16), two eight-wide accumulators per row.
///
/// # Safety
/// The CPU has AVX2 and FMA; `a` holds R × k values, `panel` k × 16, and `out` is valid for R rows of 16
/// values ldc apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro<const R: usize, const ACC: bool>(
    a: &[f32],
    k: usize,
    panel: &[f32],
    out: *mut f32,
    ldc: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= R * k && panel.len() >= k * PANEL);
    let (a, b) = (a.as_ptr(), panel.as_ptr());
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
            for threads in 1..=4 {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let got = pool.install(|| packed.matmul(&x).unwrap());
                let error = relative_error(&got, &reference);
                assert!(error < 1e-5, "n {n}, {threads} threads: error {error}");
            }
        }
    }

    #[test]
    fn the_kernel_writes_only_its_panels_columns() {
        if !panels_available() {
            return;
        }
        // w (k, 20): a full panel and one of 4 columns, written into rows 24 apart with NaN around.
        let (m, k, n, ldc) = (8, 5, 20, 24);
        let (w, x) = (values(k * n, 1), values(m * k, 2));
        let panels = pack(&w, k, n);
        for accumulate in [false, true] {
            let mut out = vec![f32::NAN; m * ldc + PANEL];
            if accumulate {
                (0..m).for_each(|i| out[i * ldc..i * ldc + n].fill(1.0));
            }
            for p in 0..2 {
                let cols = PANEL.min(n - p * PANEL);
                let panel = &panels[p * k * PANEL..(p + 1) * k * PANEL];
                // SAFETY: AVX2 and FMA are present (checked above); `out` holds m rows of ldc ≥ n
                // values, and columns p·16 … p·16 + cols of each lie inside it.
                unsafe {
                    panel_rows(
                        &x,
                        k,
                        panel,
                        out.as_mut_ptr().add(p * PANEL),
                        ldc,
                        m,
                        cols,
                        accumulate,
                    )
                };
            }
            for i in 0..m {
                for j in 0..n {
                    let expected: f32 = (0..k).map(|l| x[i * k + l] * w[l * n + j]).sum::<f32>()
                        + if accumulate { 1.0 } else { 0.0 };
                    let got = out[i * ldc + j];
                    assert!(
                        (got - expected).abs() < 1e-5,
                        "row {i} column {j}: {got} ≠ {expected}"
                    );
                }
                assert!(
                    out[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()),
                    "row {i}"
                );
            }
            assert!(
                out[m * ldc..].iter().all(|v| v.is_nan()),
                "past the last row"
            );
        }
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
