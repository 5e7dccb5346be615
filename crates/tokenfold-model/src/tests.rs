//! Tests on tiny generated fixtures: finite-difference gradients of every op we write, gradients reaching
//! every parameter, the attention mask, KV-cache generation against full recomputation, batching without
//! leaks, seeded initialisation, the optimizer and schedules, exact resume, and clear errors.

use std::sync::{Arc, OnceLock};

use candle_core::{D, DType, Device, IndexOp, Tensor};
use tokenfold_data::fixture::{write_digit_merging_tokenizer, write_fixture};
use tokenfold_data::sequence::encode_prompt;
use tokenfold_data::store::load_assets;
use tokenfold_data::tasks::sample_rng;
use tokenfold_data::{Assets, Batch, SceneConfig, SequenceConfig, Split, Task, TextTokenizer};

use crate::config::ModelConfig;
use crate::eval::prompt_inputs;
use crate::model::{Inputs, NativeModel, NoHook};
use crate::ops;
use crate::optim::{AdamW, AdamWConfig, Schedule, learning_rate};
use crate::train::{RunConfig, RunDir, TrainOptions, prepare_tokenizer, read_step_metrics, train};

struct Fixture {
    _dir: tempfile::TempDir,
    assets: Arc<Assets>,
    tokenizer: TextTokenizer,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_fixture(dir.path()).unwrap();
        let assets = load_assets(&paths, SceneConfig::default()).unwrap();
        let tokenizer = TextTokenizer::train_on_assets(&assets, 400).unwrap();
        Fixture {
            _dir: dir,
            assets: Arc::new(assets),
            tokenizer,
        }
    })
}

/// A tiny model on an 8-pixel-patch grid (64 patches) so tests stay fast.
fn tiny_seq() -> SequenceConfig {
    SequenceConfig {
        image_size: 64,
        patch_size: 8,
        max_len: 120,
        summary_token: false,
    }
}

fn tiny_config() -> ModelConfig {
    let seq = tiny_seq();
    let shape = crate::config::Shape {
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        d_ff: 48,
    };
    ModelConfig::from_shape(
        shape,
        fixture().tokenizer.vocab_size(),
        seq.patch_dim(),
        seq.grid(),
        256,
    )
}

fn samples(task: Task, n: u64) -> Vec<tokenfold_data::Sample> {
    (0..n)
        .map(|i| {
            fixture()
                .assets
                .sample(task, Split::Train, None, &mut sample_rng(3, task as u64, i))
        })
        .collect()
}

// ---------------------------------------------------------------- finite-difference gradients

/// Checks d(sum(f(x) · r))/dx from backward against central differences, in f64.
fn check_gradient(
    name: &str,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) {
    let vars: Vec<candle_core::Var> = inputs
        .iter()
        .map(|t| candle_core::Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&tensors).unwrap();
    let weights = Tensor::randn(0f64, 1.0, out.shape(), &Device::Cpu).unwrap();
    let objective = |xs: &[Tensor]| -> f64 {
        (f(xs).unwrap() * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = (out * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let eps = 1e-6;
    for (i, var) in vars.iter().enumerate() {
        let analytic: Vec<f64> = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient for input {i}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for j in 0..base.len() {
            let shifted = |delta: f64| {
                let mut values = base.clone();
                values[j] += delta;
                let mut xs = tensors.clone();
                xs[i] = Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap();
                objective(&xs)
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
            let tolerance = 1e-6 * (1.0 + numeric.abs());
            assert!(
                (analytic[j] - numeric).abs() <= tolerance,
                "{name}: input {i}[{j}]: backward {} vs finite difference {numeric}",
                analytic[j]
            );
        }
    }
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f64, 1.0, shape, &Device::Cpu).unwrap()
}

#[test]
fn rms_norm_gradient() {
    check_gradient("rms_norm (plain)", &[randn(&[3, 5]), randn(&[5])], |x| {
        ops::rms_norm_plain(&x[0], &x[1], 1e-5)
    });
    // 70 rows cross the kernel's 64-row chunks.
    check_gradient(
        "rms_norm (fused kernel)",
        &[randn(&[70, 3]), randn(&[3])],
        |x| crate::kernels::rms_norm(&x[0], &x[1], 1e-5),
    );
}

#[test]
fn softmax_and_log_softmax_gradients() {
    check_gradient("softmax", &[randn(&[2, 3, 6])], |x| ops::softmax(&x[0]));
    check_gradient("log_softmax", &[randn(&[4, 7])], |x| {
        ops::log_softmax(&x[0])
    });
}

#[test]
fn swiglu_gradient() {
    check_gradient("swiglu (plain)", &[randn(&[3, 4]), randn(&[3, 4])], |x| {
        ops::swiglu_plain(&x[0], &x[1])
    });
    check_gradient(
        "swiglu (fused kernel)",
        &[randn(&[3, 4]), randn(&[3, 4])],
        |x| crate::kernels::swiglu(&x[0], &x[1]),
    );
}

/// Rotary tables (b, 1, t, hd/2) gathered at `positions` (b × t, row-major), as the model gathers them.
fn rope_rows(hd: usize, positions: Vec<u32>, (b, t): (usize, usize)) -> (Tensor, Tensor) {
    let (cos, sin) = ops::rope_tables(hd, 64, 10_000.0, &Device::Cpu).unwrap();
    let ids = Tensor::from_vec(positions, b * t, &Device::Cpu).unwrap();
    let table = |tab: &Tensor| {
        tab.index_select(&ids, 0)
            .unwrap()
            .reshape((b, 1, t, hd / 2))
            .unwrap()
    };
    (table(&cos), table(&sin))
}

#[test]
fn fused_elementwise_kernels_match_the_plain_ops_in_values_and_gradients() {
    let f32_randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    // Shapes cross the kernels' chunk sizes (64 rows, 2^14 elements).
    let (b, h, t, hd) = (3, 4, 37, 16);
    let positions: Vec<u32> = (0..b * t).map(|i| (i % t + i / t) as u32).collect();
    let (cos, sin) = rope_rows(hd, positions, (b, t));
    type Op<'a> = Box<dyn Fn(&[Tensor], bool) -> candle_core::Result<Tensor> + 'a>;
    let cases: Vec<(&str, Vec<Tensor>, Op)> = vec![
        (
            "rms_norm",
            vec![f32_randn(&[5, 40, 24]), f32_randn(&[24])],
            Box::new(|x, fused| {
                if fused {
                    crate::kernels::rms_norm(&x[0], &x[1], 1e-5)
                } else {
                    ops::rms_norm_plain(&x[0], &x[1], 1e-5)
                }
            }),
        ),
        (
            "swiglu",
            vec![f32_randn(&[7, 50, 96]), f32_randn(&[7, 50, 96])],
            Box::new(|x, fused| {
                if fused {
                    crate::kernels::swiglu(&x[0], &x[1])
                } else {
                    ops::swiglu_plain(&x[0], &x[1])
                }
            }),
        ),
        (
            "rope",
            vec![f32_randn(&[b, h, t, hd])],
            Box::new(|x, fused| {
                if fused {
                    crate::kernels::rope(&x[0], &cos, &sin)
                } else {
                    ops::apply_rope_plain(&x[0], &cos, &sin)
                }
            }),
        ),
    ];
    for (name, inputs, op) in &cases {
        assert_fused_matches_plain(name, inputs, op);
    }
}

#[test]
fn rope_gradient_and_rotation() {
    let (cos, sin) = ops::rope_tables(4, 8, 10_000.0, &Device::Cpu).unwrap();
    let positions = Tensor::new(&[0u32, 3, 5], &Device::Cpu).unwrap();
    let cos = cos
        .index_select(&positions, 0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .reshape((1, 1, 3, 2))
        .unwrap();
    let sin = sin
        .index_select(&positions, 0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .reshape((1, 1, 3, 2))
        .unwrap();
    check_gradient("apply_rope (plain)", &[randn(&[1, 2, 3, 4])], |x| {
        ops::apply_rope_plain(&x[0], &cos, &sin)
    });
    check_gradient("apply_rope (fused kernel)", &[randn(&[1, 2, 3, 4])], |x| {
        crate::kernels::rope(&x[0], &cos, &sin)
    });
    // A rotation: norms are kept, and position 0 is the identity.
    let x = randn(&[1, 1, 3, 4]);
    let y = ops::apply_rope(&x, &cos, &sin).unwrap();
    let norms = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    // The tables are f32, so cos² + sin² = 1 holds to about 1e-7.
    for (a, b) in norms(&x).iter().zip(norms(&y)) {
        assert!((a - b).abs() < 1e-6 * (1.0 + a), "{a} vs {b}");
    }
    let first: Vec<f64> = x.i((0, 0, 0)).unwrap().to_vec1().unwrap();
    assert_eq!(y.i((0, 0, 0)).unwrap().to_vec1::<f64>().unwrap(), first);
}

#[test]
fn attention_gradient_and_mask() {
    let bias = Tensor::new(
        &[[0f64, -1e9, -1e9], [0.0, 0.0, -1e9], [0.0, 0.3, 0.0]],
        &Device::Cpu,
    )
    .unwrap()
    .reshape((1, 1, 3, 3))
    .unwrap();
    let inputs = [
        randn(&[1, 2, 3, 4]),
        randn(&[1, 2, 3, 4]),
        randn(&[1, 2, 3, 4]),
    ];
    check_gradient("attention (plain)", &inputs, |x| {
        ops::attention_plain(&x[0], &x[1], &x[2], &bias)
    });
    check_gradient("attention (fused kernel)", &inputs, |x| {
        crate::kernels::attention(&x[0], &x[1], &x[2], &bias, 0.5)
    });
    // The first query sees only the first key: its output is the first value.
    let (q, k, v) = (
        randn(&[1, 1, 3, 4]),
        randn(&[1, 1, 3, 4]),
        randn(&[1, 1, 3, 4]),
    );
    let out = ops::attention(&q, &k, &v, &bias).unwrap();
    let (a, b): (Vec<f64>, Vec<f64>) = (
        out.i((0, 0, 0)).unwrap().to_vec1().unwrap(),
        v.i((0, 0, 0)).unwrap().to_vec1().unwrap(),
    );
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-9);
    }
}

/// The model's mask for `lengths` (right padding to `t`), causal except within an image span, plus a
/// per-key bias; (b, 1, t, t).
fn model_like_bias(lengths: &[usize], t: usize, image: (usize, usize)) -> Tensor {
    let b = lengths.len();
    let mut bias = vec![ops::MASKED; b * t * t];
    for (s, &len) in lengths.iter().enumerate() {
        let in_image = |j: usize| j >= image.0 && j < image.0 + image.1;
        for i in 0..t {
            for j in 0..len {
                if j <= i || (in_image(i) && in_image(j)) {
                    bias[(s * t + i) * t + j] = 0.1 * ((j % 5) as f32 - 2.0);
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, t, t), &Device::Cpu).unwrap()
}

/// Largest difference between two tensors relative to the largest magnitude of the reference.
pub(crate) fn relative_error(a: &Tensor, reference: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let r: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
    let scale = r.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30) as f64;
    a.iter()
        .zip(&r)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
        / scale
}

/// A fused kernel (`op(inputs, true)`) against the plain ops (`op(inputs, false)`): output and the
/// gradient of every input, each within 1e-5 of the plain value relative to its largest magnitude.
fn assert_fused_matches_plain(
    name: &str,
    inputs: &[Tensor],
    op: &dyn Fn(&[Tensor], bool) -> candle_core::Result<Tensor>,
) {
    let vars: Vec<candle_core::Var> = inputs
        .iter()
        .map(|x| candle_core::Var::from_tensor(x).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let upstream =
        Tensor::randn(0f32, 1.0, op(&tensors, false).unwrap().dims(), &Device::Cpu).unwrap();
    let run = |fused: bool| {
        let out = op(&tensors, fused).unwrap();
        let grads = (&out * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut all = vec![out.detach()];
        all.extend(vars.iter().map(|v| grads.get(v).unwrap().clone()));
        all
    };
    let (fused, plain) = (run(true), run(false));
    for (i, (a, r)) in fused.iter().zip(&plain).enumerate() {
        let error = relative_error(a, r);
        let what = match i {
            0 => "output".to_string(),
            _ => format!("gradient of input {}", i - 1),
        };
        assert!(
            error < 1e-5,
            "{name}: {what} differs by {error:.2e} (relative)"
        );
    }
}

#[test]
fn fused_attention_matches_the_plain_ops_in_values_and_gradients() {
    let f32_randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    // Prefill: 70 positions cross a 64-row tile; padding, an image span and a row with no visible key
    // (sample 2 has length 0) included. Decode: 3 new queries against 75 cached keys. Per-head bias.
    let prefill = model_like_bias(&[70, 41, 0], 70, (3, 20));
    let decode = model_like_bias(&[75, 60], 75, (5, 30))
        .narrow(2, 72, 3)
        .unwrap();
    let per_head = Tensor::randn(0f32, 1.0, (1, 3, 9, 9), &Device::Cpu).unwrap();
    let cases = [
        ("prefill", [3, 4, 70, 16], 70, prefill),
        ("decode", [2, 4, 3, 8], 75, decode),
        ("per-head bias", [1, 3, 9, 8], 9, per_head),
    ];
    for (name, [b, h, tq, d], tk, bias) in &cases {
        let scale = 1.0 / (*d as f64).sqrt();
        let inputs = [
            f32_randn(&[*b, *h, *tq, *d]),
            f32_randn(&[*b, *h, *tk, *d]),
            f32_randn(&[*b, *h, *tk, *d]),
        ];
        assert_fused_matches_plain(name, &inputs, &|x, fused| {
            if fused {
                crate::kernels::attention(&x[0], &x[1], &x[2], bias, scale)
            } else {
                ops::attention_plain(&x[0], &x[1], &x[2], bias)
            }
        });
        // Inputs that need no gradient take the inference path (the panels, where the CPU has them).
        let [q, k, v] = &inputs;
        let inference = crate::kernels::attention(q, k, v, bias, scale).unwrap();
        let values: Vec<f32> = inference.flatten_all().unwrap().to_vec1().unwrap();
        assert!(values.iter().all(|x| x.is_finite()), "{name}: not finite");
        let error = relative_error(&inference, &ops::attention_plain(q, k, v, bias).unwrap());
        assert!(
            error < 1e-5,
            "{name} without gradients: differs by {error:.2e}"
        );
    }
}

/// Part `p` of projections side by side in `x` (b, t, parts · h · hd) as heads (b, h, t, hd), with candle
/// ops: split, then RMS-normed by `norm` and rotated by `rope` where given.
fn plain_part(
    x: &Tensor,
    (p, h, hd): (usize, usize, usize),
    norm: Option<&Tensor>,
    rope: Option<(&Tensor, &Tensor)>,
) -> Tensor {
    let (b, t, _) = x.dims3().unwrap();
    let mut part = x
        .narrow(2, p * h * hd, h * hd)
        .unwrap()
        .reshape((b, t, h, hd))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap();
    if let Some(w) = norm {
        part = ops::rms_norm_plain(&part, w, 1e-5).unwrap();
    }
    if let Some((cos, sin)) = rope {
        part = ops::apply_rope_plain(&part, cos, sin).unwrap();
    }
    part
}

/// q, k and v side by side in `qkv` (b, t, 3 · h · hd) as [`crate::kernels::qkv_heads`] splits them, with
/// candle ops: the queries and keys normed by `norms` (2, hd) when given, then rotated.
fn plain_heads(
    qkv: &Tensor,
    norms: Option<&Tensor>,
    h: usize,
    rope: (&Tensor, &Tensor),
) -> [Tensor; 3] {
    let hd = qkv.dim(2).unwrap() / (3 * h);
    let norm = |p: usize| norms.map(|w| w.i(p).unwrap());
    [
        plain_part(qkv, (0, h, hd), norm(0).as_ref(), Some(rope)),
        plain_part(qkv, (1, h, hd), norm(1).as_ref(), Some(rope)),
        plain_part(qkv, (2, h, hd), None, None),
    ]
}

#[test]
fn stacked_projection_kernels_match_the_plain_ops_in_values_and_gradients() {
    let f32_randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    // 70 positions cross the attention's 64-row tile and the row kernels' 64-row chunks; padding, an
    // image span and a sample with no visible key, as in the unstacked attention's test.
    let (b, t, h, hd) = (3, 70, 2, 8);
    let bias = model_like_bias(&[70, 41, 0], t, (3, 20));
    let positions: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7) % 50).collect();
    let (cos, sin) = rope_rows(hd, positions, (b, t));
    let scale = 1.0 / (hd as f64).sqrt();
    for normed in [true, false] {
        let mut inputs = vec![f32_randn(&[b, t, 3 * h * hd])];
        if normed {
            inputs.push(f32_randn(&[2, hd]));
        }
        let rope = (&cos, &sin);
        assert_fused_matches_plain(
            &format!("qkv heads, normed {normed}"),
            &inputs,
            &|x, fused| {
                if fused {
                    crate::kernels::qkv_heads(&x[0], x.get(1), h, rope, 1e-5)
                } else {
                    Tensor::stack(&plain_heads(&x[0], x.get(1), h, rope), 0)
                }
            },
        );
        assert_fused_matches_plain(
            &format!("stacked attention, normed {normed}"),
            &inputs,
            &|x, fused| {
                if fused {
                    let heads = crate::kernels::qkv_heads(&x[0], x.get(1), h, rope, 1e-5)?;
                    crate::kernels::attention_qkv(&heads, &bias, scale)
                } else {
                    let [q, k, v] = plain_heads(&x[0], x.get(1), h, rope);
                    ops::attention_plain(&q, &k, &v, &bias)
                }
            },
        );
    }
    // Gate and up side by side, over more rows than one parallel chunk.
    assert_fused_matches_plain(
        "swiglu halves",
        &[f32_randn(&[2, 70, 2 * 24])],
        &|x, fused| {
            if fused {
                crate::kernels::swiglu_halves(&x[0])
            } else {
                ops::swiglu_plain(&x[0].narrow(2, 0, 24)?, &x[0].narrow(2, 24, 24)?)
            }
        },
    );
    let odd =
        crate::kernels::qkv_heads(&f32_randn(&[b, t, 3 * h * 7]), None, h, (&cos, &sin), 1e-5);
    assert!(odd.unwrap_err().to_string().contains("even size"));
    let wrong_norms = f32_randn(&[3, hd]);
    let err = crate::kernels::qkv_heads(
        &f32_randn(&[b, t, 3 * h * hd]),
        Some(&wrong_norms),
        h,
        (&cos, &sin),
        1e-5,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("norm weights of [3, 8]"), "{err}");
    let unstacked = f32_randn(&[2, b, h, t, hd]);
    let err = crate::kernels::attention_qkv(&unstacked, &bias, scale)
        .unwrap_err()
        .to_string();
    assert!(err.contains("must be (3, b, h, t, d)"), "{err}");
}

#[test]
fn stacked_projection_kernel_gradients() {
    let (b, t, h, hd) = (2, 5, 2, 4);
    let positions: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 3) % 11).collect();
    let (cos, sin) = rope_rows(hd, positions, (b, t));
    check_gradient(
        "qkv heads",
        &[randn(&[b, t, 3 * h * hd]), randn(&[2, hd])],
        |x| crate::kernels::qkv_heads(&x[0], Some(&x[1]), h, (&cos, &sin), 1e-5),
    );
    let bias = model_like_bias(&[5, 3], t, (1, 2));
    check_gradient("stacked attention", &[randn(&[3, b, h, t, hd])], |x| {
        crate::kernels::attention_qkv(&x[0], &bias, 0.5)
    });
    check_gradient("swiglu halves", &[randn(&[2, 3, 10])], |x| {
        crate::kernels::swiglu_halves(&x[0])
    });
}

#[test]
fn stacked_projections_train_as_separate_ones() {
    // The loss and every weight's gradient, with q, k and v stacked from one matmul through attention
    // and gate and up from another, against each projected (and split, normed and rotated) on its own:
    // dense, mixture of experts and late fusion (whose encoder blocks stack too).
    assert!(
        crate::kernels::fused_enabled(),
        "the stacked path needs the fused kernels"
    );
    let moe = moe_config(4, 2, crate::moe::Routing::Learned);
    let mut without_qk_norm = tiny_config();
    without_qk_norm.qk_norm = false;
    for config in [tiny_config(), without_qk_norm, moe, late_config()] {
        let mut model = NativeModel::new(config, 5, &Device::Cpu).unwrap();
        let batch = mixed_batch(&tiny_seq());
        let mut run = |stacked: bool| {
            model.set_stack_projections(stacked);
            let loss = model.loss(&batch).unwrap();
            let grads = loss.backward().unwrap();
            let data = model.varmap.data().lock().unwrap();
            let mut all: Vec<(String, Tensor)> = data
                .iter()
                .map(|(name, var)| (name.clone(), grads.get(var.as_tensor()).unwrap().clone()))
                .collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            all.push(("loss".to_string(), loss.detach()));
            all
        };
        let (stacked, separate) = (run(true), run(false));
        assert_eq!(stacked.len(), separate.len());
        // The forward values may agree to the bit (the same products in the same order), but the input
        // gradients of one stacked matmul are summed differently than those of three: gradients equal
        // to the bit would mean both runs took the same path.
        let bits = |t: &Tensor| -> Vec<u32> {
            let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            values.iter().map(|x| x.to_bits()).collect()
        };
        assert!(
            stacked
                .iter()
                .zip(&separate)
                .any(|((_, a), (_, r))| bits(a) != bits(r)),
            "one path ran twice"
        );
        for ((name, a), (_, r)) in stacked.iter().zip(&separate) {
            let error = relative_error(a, r);
            assert!(error < 1e-5, "{name} differs by {error:.2e} (relative)");
        }
    }
}

#[test]
fn cross_entropy_gradient_and_value() {
    let targets = Tensor::new(&[2u32, 0, 4], &Device::Cpu).unwrap();
    check_gradient("cross_entropy_rows", &[randn(&[3, 5])], |x| {
        ops::cross_entropy_rows(&x[0], &targets)
    });
    let uniform = Tensor::zeros((3, 5), DType::F64, &Device::Cpu).unwrap();
    let nll: Vec<f64> = ops::cross_entropy_rows(&uniform, &targets)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(nll.iter().all(|v| (v - 5f64.ln()).abs() < 1e-12));
}

// ---------------------------------------------------------------- the model

fn mixed_batch(seq: &SequenceConfig) -> Batch {
    let mut items = samples(Task::Relation, 2);
    items.extend(samples(Task::Text, 1));
    items.extend(samples(Task::Read, 1));
    Batch::from_samples(&items, &fixture().tokenizer, seq).unwrap()
}

/// Backpropagates the training loss of a mixed batch and checks every weight gets a non-zero gradient;
/// returns the loss.
fn assert_every_weight_learns(model: &NativeModel) -> Tensor {
    let loss = model.loss(&mixed_batch(&tiny_seq())).unwrap();
    let grads = loss.backward().unwrap();
    let data = model.varmap.data().lock().unwrap();
    assert!(!data.is_empty());
    for (name, var) in data.iter() {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let size = grad
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(size > 0.0, "{name} has a zero gradient");
    }
    loss
}

#[test]
fn every_parameter_receives_a_nonzero_gradient() {
    for tie in [true, false] {
        let mut config = tiny_config();
        config.tie_embeddings = tie;
        let model = NativeModel::new(config.clone(), 1, &Device::Cpu).unwrap();
        assert_eq!(model.parameter_count(), config.parameter_count());
        assert_every_weight_learns(&model);
    }
}

#[test]
fn image_tokens_attend_both_ways_and_text_causally() {
    let model = NativeModel::new(tiny_config(), 2, &Device::Cpu).unwrap();
    let seq = tiny_seq();
    let batch = Batch::from_samples(&samples(Task::Locate, 1), &fixture().tokenizer, &seq).unwrap();
    let hidden = |batch: &Batch| {
        let inputs = Inputs::from_batch(batch, &Device::Cpu).unwrap();
        model
            .forward(model.embed(&inputs).unwrap(), &mut NoHook, None)
            .unwrap()
            .hidden
    };
    let base = hidden(&batch);
    let start = batch.image_starts[0].unwrap();
    let n = batch.n_patches;
    // Change the last patch: the first patch's state changes (bidirectional within the image) …
    let mut changed = batch.clone();
    let last = (n - 1) * batch.patch_dim;
    for v in &mut changed.patches[last..last + batch.patch_dim] {
        *v = -*v + 0.5;
    }
    let after = hidden(&changed);
    let diff = |a: &Tensor, b: &Tensor, pos: usize| {
        (a.i((0, pos)).unwrap() - b.i((0, pos)).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(diff(&base, &after, start) > 1e-6);
    // … but not the tokens before the image (causal).
    assert!(diff(&base, &after, 0) == 0.0);
    // Change the last answer token: nothing before it changes.
    let mut text_changed = batch.clone();
    let end = batch.lengths[0] - 1;
    text_changed.tokens[end] = (text_changed.tokens[end] + 1) % 300 + 10;
    let after = hidden(&text_changed);
    assert!((0..end).all(|p| diff(&base, &after, p) == 0.0));
    assert!(diff(&base, &after, end) > 0.0);
}

#[test]
fn seeded_initialisation_is_reproducible() {
    let weights = |seed| {
        let model = NativeModel::new(tiny_config(), seed, &Device::Cpu).unwrap();
        let data = model.varmap.data().lock().unwrap();
        data["layers.1.mlp.up_proj.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(weights(7), weights(7));
    assert_ne!(weights(7), weights(8));
}

fn prompt_batch(model_seq: &SequenceConfig, items: &[tokenfold_data::Sample]) -> Inputs {
    let f = fixture();
    let prompts: Vec<_> = items
        .iter()
        .map(|s| encode_prompt(s.image.as_ref(), &s.question, &f.tokenizer, model_seq).unwrap())
        .collect();
    prompt_inputs(&prompts, f.tokenizer.special.pad, model_seq, &Device::Cpu).unwrap()
}

/// A relation, an exist and a caption prompt: three lengths, so the batch has padding.
fn three_length_prompts() -> Inputs {
    let mut items = samples(Task::Relation, 1);
    items.extend(samples(Task::Exist, 1));
    items.extend(samples(Task::Caption, 1));
    prompt_batch(&tiny_seq(), &items)
}

/// Logits of the last real token of each sample by a full forward pass, without cache.
fn full_forward_last_logits(model: &NativeModel, inputs: &Inputs) -> Tensor {
    let state = model
        .forward(model.embed(inputs).unwrap(), &mut NoHook, None)
        .unwrap();
    let rows: Vec<Tensor> = inputs
        .lengths
        .iter()
        .enumerate()
        .map(|(s, &len)| state.hidden.i((s, len - 1)).unwrap())
        .collect();
    model.logits(&Tensor::stack(&rows, 0).unwrap()).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Appends each sample's token after its own last real token.
fn append_tokens(inputs: &mut Inputs, next: &[u32]) {
    let (b, t) = inputs.tokens.dims2().unwrap();
    let old: Vec<u32> = inputs.tokens.flatten_all().unwrap().to_vec1().unwrap();
    let mut grown = vec![fixture().tokenizer.special.pad; b * (t + 1)];
    for s in 0..b {
        let len = inputs.lengths[s];
        grown[s * (t + 1)..s * (t + 1) + len].copy_from_slice(&old[s * t..s * t + len]);
        grown[s * (t + 1) + len] = next[s];
        inputs.lengths[s] += 1;
    }
    inputs.tokens = Tensor::from_vec(grown, (b, t + 1), &Device::Cpu).unwrap();
}

#[test]
fn kv_cache_decoding_matches_full_recomputation_with_batch_and_padding() {
    let model = NativeModel::new(tiny_config(), 4, &Device::Cpu).unwrap();
    // Prompts of different lengths: padding must not leak.
    let mut inputs = three_length_prompts();
    let mut cache = crate::model::KvCache::default();
    let mut logits = model.prefill(&inputs, &mut NoHook, &mut cache).unwrap();
    for step in 0..5 {
        let reference = full_forward_last_logits(&model, &inputs);
        assert!(
            max_abs_diff(&logits, &reference) < 1e-4,
            "step {step}: cached and recomputed logits differ"
        );
        let next: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        append_tokens(&mut inputs, &next);
        logits = model.decode_step(&next, &mut cache).unwrap();
    }
}

#[test]
fn a_sample_gives_the_same_logits_alone_and_in_a_batch() {
    let model = NativeModel::new(tiny_config(), 5, &Device::Cpu).unwrap();
    let seq = tiny_seq();
    let mut items = samples(Task::Count, 2);
    items.extend(samples(Task::Caption, 1));
    let together = full_forward_last_logits(&model, &prompt_batch(&seq, &items));
    for (s, item) in items.iter().enumerate() {
        let alone =
            full_forward_last_logits(&model, &prompt_batch(&seq, std::slice::from_ref(item)));
        assert!(
            max_abs_diff(&together.i(s).unwrap().unsqueeze(0).unwrap(), &alone) < 1e-4,
            "sample {s}"
        );
    }
    let generated = model
        .generate(
            &prompt_batch(&seq, &items),
            &mut NoHook,
            4,
            fixture().tokenizer.special.eos,
        )
        .unwrap();
    assert_eq!(generated.len(), 3);
    assert!(generated.iter().all(|g| g.len() <= 4));
}

// ---------------------------------------------------------------- optimizer and schedules

#[test]
fn adamw_first_step_moves_each_weight_by_lr_and_decays_matrices() {
    let matrix =
        candle_core::Var::from_tensor(&Tensor::new(&[[1f32, -2.0]], &Device::Cpu).unwrap())
            .unwrap();
    let gain = candle_core::Var::from_tensor(&Tensor::new(&[3f32], &Device::Cpu).unwrap()).unwrap();
    let config = AdamWConfig {
        weight_decay: 0.5,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(
        vec![("m".into(), matrix.clone()), ("g".into(), gain.clone())],
        config,
    )
    .unwrap();
    let grads = [
        (
            "m".to_string(),
            Tensor::new(&[[0.2f32, -0.1]], &Device::Cpu).unwrap(),
        ),
        ("g".to_string(), Tensor::new(&[5f32], &Device::Cpu).unwrap()),
    ]
    .into_iter()
    .collect();
    opt.step(&grads, 0.1).unwrap();
    // Step 1: m̂ = g, v̂ = g², so the update is sign(g) · lr (ε aside); matrices also decay by lr · wd.
    let m: Vec<Vec<f32>> = matrix.as_tensor().to_vec2().unwrap();
    assert!((m[0][0] - (1.0 * (1.0 - 0.05) - 0.1)).abs() < 1e-5);
    assert!((m[0][1] - (-2.0 * (1.0 - 0.05) + 0.1)).abs() < 1e-5);
    let g: Vec<f32> = gain.as_tensor().to_vec1().unwrap();
    assert!((g[0] - (3.0 - 0.1)).abs() < 1e-5, "no decay on vectors");
}

#[test]
fn the_fused_adamw_update_equals_the_plain_ops() {
    let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    let step = crate::optim::UpdateStep {
        beta1: 0.9,
        beta2: 0.95,
        correction1: 1.0 - 0.9f64.powi(3),
        correction2: 1.0 - 0.95f64.powi(3),
        eps: 1e-8,
        lr: 2e-3,
        decay: 0.1,
    };
    // A matrix larger than one parallel chunk with a transposed (non-contiguous) gradient, as a
    // projection's is, and a vector without decay.
    let cases = [
        (randn(&[130, 260]), randn(&[260, 130]).t().unwrap(), step),
        (
            randn(&[7]),
            randn(&[7]),
            crate::optim::UpdateStep { decay: 0.0, ..step },
        ),
    ];
    for (var, grad, step) in &cases {
        let (m, v) = (randn(var.dims()), randn(var.dims()).sqr().unwrap());
        let fused = crate::kernels::adamw_update(var, grad, (&m, &v), step).unwrap();
        let plain = crate::optim::update_plain(var, grad, (&m, &v), step).unwrap();
        for (what, a, r) in [
            ("value", &fused.0, &plain.0),
            ("m", &fused.1, &plain.1),
            ("v", &fused.2, &plain.2),
        ] {
            assert_eq!(a.dims(), var.dims());
            let bits = |t: &Tensor| -> Vec<u32> {
                let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                values.iter().map(|x| x.to_bits()).collect()
            };
            assert!(bits(a) == bits(r), "{what} differs from the plain ops");
        }
    }
    let err = crate::kernels::adamw_update(
        &randn(&[3]),
        &randn(&[4]),
        (&randn(&[3]), &randn(&[3])),
        &step,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("gradient [4]"), "{err}");
}

#[test]
fn schedules_warm_up_hold_and_cool_down() {
    let lr = |s| learning_rate(Schedule::ConstantCooldown, 1.0, s, 100, 10, 0.2);
    assert!((lr(0) - 0.1).abs() < 1e-12 && (lr(9) - 1.0).abs() < 1e-12);
    assert_eq!(lr(50), 1.0);
    assert_eq!(lr(79), 1.0);
    assert!(lr(80) < 1.0 && lr(90) < lr(85));
    assert!(lr(99).abs() < 1e-12);
    let cosine = |s| learning_rate(Schedule::Cosine, 1.0, s, 100, 10, 0.2);
    assert!(
        (cosine(10) - 1.0).abs() < 1e-12
            && (cosine(99) - 0.1).abs() < 1e-3
            && cosine(50) < cosine(30)
    );
}

// ---------------------------------------------------------------- training, resume, errors

fn tiny_run_config(steps: u64) -> RunConfig {
    let toml = format!(
        r#"
[model]
d_model = 32
n_layers = 2
n_heads = 4
d_ff = 48

[sequence]
image_size = 64
patch_size = 8
max_len = 120

[tokenizer]
vocab_size = 400

[train]
steps = {steps}
batch_size = 4
grad_accum = 2
lr = 3e-3
warmup_steps = 2
checkpoint_every = 2
eval_samples = 4
workers = 2
mixture = {{ caption = 2, count = 1, text = 1 }}
"#
    );
    let config: RunConfig = toml::from_str(&toml).unwrap();
    config.validate().unwrap();
    config
}

#[test]
fn resumed_run_repeats_the_uninterrupted_losses() {
    let f = fixture();
    let config = tiny_run_config(6);
    let whole = tempfile::tempdir().unwrap();
    let summary = train(
        &config,
        whole.path(),
        f.assets.clone(),
        f.tokenizer.clone(),
        &TrainOptions::default(),
    )
    .unwrap();
    assert_eq!(summary.steps, 6);
    // Nine benchmark sets, then the describe diagnostic, scored per object over the same samples.
    assert_eq!(summary.validation.len(), 10);
    let describe = &summary.validation[9];
    assert_eq!(describe.set, "describe/val");
    let scenes = tokenfold_data::EvalSpec::describe(Split::Val).build(&f.assets, 4);
    let objects: usize = scenes.iter().map(|s| s.answer.split(", ").count()).sum();
    assert_eq!(describe.objects, Some(objects));
    assert!(describe.correct <= objects);
    assert_eq!(
        crate::eval::mean_accuracy(&summary.validation),
        crate::eval::mean_accuracy(&summary.validation[..9])
    );
    let parts = tempfile::tempdir().unwrap();
    let stopped = train(
        &config,
        parts.path(),
        f.assets.clone(),
        f.tokenizer.clone(),
        &TrainOptions {
            stop_after: Some(3),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(stopped.steps, 3);
    assert!(parts.path().join("checkpoint/state.json").is_file());
    let again = train(
        &config,
        parts.path(),
        f.assets.clone(),
        f.tokenizer.clone(),
        &TrainOptions::default(),
    )
    .unwrap_err();
    assert!(again.to_string().contains("--resume"), "{again}");
    train(
        &config,
        parts.path(),
        f.assets.clone(),
        f.tokenizer.clone(),
        &TrainOptions {
            resume: true,
            ..Default::default()
        },
    )
    .unwrap();
    let a = read_step_metrics(&whole.path().join("metrics.jsonl")).unwrap();
    let b = read_step_metrics(&parts.path().join("metrics.jsonl")).unwrap();
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.step, y.step);
        assert!(
            (x.loss - y.loss).abs() < 1e-5,
            "step {}: {} vs {}",
            x.step,
            x.loss,
            y.loss
        );
    }
    assert!(
        a[5].loss < a[0].loss,
        "training lowers the loss: {} → {}",
        a[0].loss,
        a[5].loss
    );
    // The trained run loads back for evaluation.
    let (model, tokenizer, run) = crate::train::RunDir::new(parts.path())
        .load(&Device::Cpu)
        .unwrap();
    assert_eq!(run, config);
    assert_eq!(tokenizer.vocab_size(), model.config.vocab_size);
}

#[test]
fn read_answers_score_each_digit_in_its_place() {
    use crate::eval::digits_in_place;
    assert_eq!(digits_in_place("472", "472"), (3, 3));
    assert_eq!(digits_in_place(" 472", "472"), (3, 3));
    // Place matters: a shifted or missing digit is wrong, an extra one costs nothing more.
    assert_eq!(digits_in_place("47", "472"), (2, 3));
    assert_eq!(digits_in_place("72", "472"), (0, 3));
    assert_eq!(digits_in_place("4721", "472"), (3, 3));
    assert_eq!(digits_in_place("", "58"), (0, 2));
}

#[test]
fn describe_answers_score_each_object_named_with_its_cell_once() {
    use crate::eval::described_objects;
    let truth = "top left cat, center dog, bottom right cat";
    assert_eq!(described_objects(truth, truth), (3, 3));
    // Order does not matter; a wrong cell or label does, and a repeated item counts once.
    assert_eq!(
        described_objects("center dog, top left cat, top left cat", truth),
        (2, 3)
    );
    assert_eq!(
        described_objects("top middle cat, center bread", truth),
        (0, 3)
    );
    // A truncated answer keeps the items it completed.
    assert_eq!(described_objects("top left cat, center do", truth), (1, 3));
    assert_eq!(described_objects("", truth), (0, 3));
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let base = toml::to_string(&tiny_run_config(4)).unwrap();
    let check = |edit: &dyn Fn(&str) -> String, expected: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, edit(&base)).unwrap();
        let message = RunConfig::load(&path).unwrap_err().to_string();
        assert!(
            message.contains("run.toml") && message.contains(expected),
            "{message}"
        );
    };
    check(&|s| s.replace("lr = 0.003", "lr = 3.0"), "train.lr");
    check(
        &|s| s.replace("caption = 2", "colour = 2"),
        "unknown task 'colour'",
    );
    check(&|s| s.replace("[model]", "[model]\nwidth = 3"), "width");
    check(
        &|s| s.replace("[train]", "[train]\nfollow_ups = 9"),
        "train.follow_ups 9 is above the maximum 8",
    );
    check(
        &|s| s.replace("patch_size = 8", "patch_size = 5"),
        "does not divide",
    );
    fn stage(until: u64, mixture: &'static str) -> impl Fn(&str) -> String {
        move |s: &str| {
            format!("{s}\n[[train.curriculum]]\nuntil_step = {until}\nmixture = {{ {mixture} }}\n")
        }
    }
    check(
        &stage(9, "describe = 1"),
        "train.curriculum[0].until_step 9",
    );
    check(&stage(2, "shapes = 1"), "train.curriculum[0].mixture");
    check(&stage(2, "shapes = 1"), "unknown task 'shapes'");
    let staged = tiny_run_config(4);
    let parsed = RunConfig::parse(
        &stage(2, "describe = 3, caption = 1")(&base),
        false,
        "run.toml",
    )
    .unwrap();
    let stages = parsed.stages().unwrap();
    assert_eq!(stages.len(), 1);
    assert_eq!(stages[0].until_batch, 2 * staged.train.grad_accum as u64);
    assert_eq!(
        stages[0].mixture.0,
        vec![(Task::Caption, 1.0), (Task::Describe, 3.0)]
    );
    let mut config = tiny_run_config(4);
    config.model.preset = Some("nmm-xxl".into());
    config.model.d_model = None;
    let message = config.model_config(400).unwrap_err().to_string();
    assert!(
        message.contains("unknown model preset 'nmm-xxl'"),
        "{message}"
    );
}

#[test]
fn missing_or_corrupt_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let message = crate::train::RunDir::new(dir.path())
        .load(&Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(message.contains("has no trained model"), "{message}");
    let weights = dir.path().join("model.safetensors");
    std::fs::write(&weights, b"not safetensors").unwrap();
    let message = NativeModel::load(tiny_config(), &weights, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(message.contains("model.safetensors"), "{message}");
}

#[test]
fn presets_have_the_advertised_sizes() {
    for (name, low, high) in [
        ("nmm-xs", 0.8e6, 1.4e6),
        ("nmm-s", 4e6, 6.5e6),
        ("nmm-m", 17e6, 24e6),
    ] {
        let config =
            ModelConfig::from_shape(crate::config::preset(name).unwrap(), 2048, 48, 16, 384);
        let n = config.parameter_count() as f64;
        assert!((low..high).contains(&n), "{name}: {n} parameters");
    }
}

// ---------------------------------------------------------------- hooks that change the token set

/// Drops the image tokens at `drop` (indices within the image span) before `layer`, either by removing
/// their rows or by marking them invalid.
struct DropPatches {
    layer: usize,
    drop: Vec<usize>,
    remove: bool,
}

impl crate::model::LayerHook for DropPatches {
    fn before_layer(
        &mut self,
        layer: usize,
        state: &mut crate::model::SeqState,
    ) -> candle_core::Result<bool> {
        if layer != self.layer {
            return Ok(false);
        }
        let (b, t) = (state.batch(), state.len());
        let dropped = |s: usize, j: usize| {
            let image: Vec<usize> = (0..t).filter(|&k| state.is_image[s * t + k]).collect();
            self.drop.iter().any(|&d| image.get(d) == Some(&j))
        };
        if !self.remove {
            for s in 0..b {
                for j in 0..t {
                    if dropped(s, j) {
                        state.valid[s * t + j] = false;
                    }
                }
            }
            return Ok(true);
        }
        let keep: Vec<Vec<usize>> = (0..b)
            .map(|s| (0..t).filter(|&j| !dropped(s, j)).collect())
            .collect();
        let kept = keep[0].len();
        let mut rows = Vec::with_capacity(b);
        let (mut positions, mut is_image, mut valid) = (Vec::new(), Vec::new(), Vec::new());
        for (s, keep) in keep.iter().enumerate() {
            let index = Tensor::from_vec(
                keep.iter().map(|&j| j as u32).collect::<Vec<_>>(),
                kept,
                state.hidden.device(),
            )?;
            rows.push(state.hidden.i(s)?.index_select(&index, 0)?);
            for &j in keep {
                positions.push(state.positions[s * t + j]);
                is_image.push(state.is_image[s * t + j]);
                valid.push(state.valid[s * t + j]);
            }
        }
        state.hidden = Tensor::stack(&rows, 0)?;
        (state.positions, state.is_image, state.valid) = (positions, is_image, valid);
        Ok(true)
    }
}

#[test]
fn removing_tokens_equals_masking_them_through_prefill_and_cached_decoding() {
    let model = NativeModel::new(tiny_config(), 6, &Device::Cpu).unwrap();
    let seq = tiny_seq();
    let mut items = samples(Task::Locate, 1);
    items.extend(samples(Task::Count, 1));
    let inputs = prompt_batch(&seq, &items);
    let drop: Vec<usize> = (0..64).step_by(3).collect();
    let mut results = Vec::new();
    for remove in [true, false] {
        let mut hook = DropPatches {
            layer: 1,
            drop: drop.clone(),
            remove,
        };
        let mut cache = crate::model::KvCache::default();
        let mut logits = vec![model.prefill(&inputs, &mut hook, &mut cache).unwrap()];
        // Layer 0 cached every token, layer 1 on only the kept ones (when removed).
        let cached: Vec<usize> = cache
            .layers
            .iter()
            .map(|l| l.as_ref().unwrap().k.dim(2).unwrap())
            .collect();
        for _ in 0..3 {
            let next: Vec<u32> = logits
                .last()
                .unwrap()
                .argmax(D::Minus1)
                .unwrap()
                .to_vec1()
                .unwrap();
            logits.push(model.decode_step(&next, &mut cache).unwrap());
        }
        results.push((logits, cached));
    }
    let (removed, masked) = (&results[0], &results[1]);
    assert_eq!(removed.1[0], masked.1[0]);
    assert_eq!(
        removed.1[1],
        masked.1[1] - drop.len(),
        "layer 1 caches only the kept tokens"
    );
    for (step, (a, b)) in removed.0.iter().zip(&masked.0).enumerate() {
        assert!(
            max_abs_diff(a, b) < 1e-4,
            "step {step}: removal and masking disagree"
        );
    }
    // And the reduction matters: the logits differ from the unreduced model's.
    let mut cache = crate::model::KvCache::default();
    let full = model.prefill(&inputs, &mut NoHook, &mut cache).unwrap();
    assert!(max_abs_diff(&full, &removed.0[0]) > 1e-4);
}

// ---------------------------------------------------------------- mixture of experts

/// A mixture-of-experts layer whose weights are `weights` (router, then gate/up/down per expert).
fn moe_from(
    config: &crate::moe::MoeConfig,
    d: usize,
    d_ff: usize,
    weights: &[Tensor],
) -> crate::moe::Moe {
    let vb = candle_nn::VarBuilder::zeros(DType::F64, &Device::Cpu);
    let order: Vec<String> = std::iter::once("moe.router".to_string())
        .chain((0..config.experts).flat_map(|e| {
            ["gate_proj", "up_proj", "down_proj"].map(|p| format!("moe.experts.{e}.{p}"))
        }))
        .collect();
    crate::moe::Moe::new(
        config,
        d,
        d_ff,
        |vb, _, _, _, name| {
            let key = format!("{}.{name}", vb.prefix());
            let i = order
                .iter()
                .position(|o| *o == key)
                .unwrap_or_else(|| panic!("unexpected weight {key}"));
            Ok(candle_nn::Linear::new(weights[i].clone(), None))
        },
        &vb.pp("moe"),
    )
    .unwrap()
}

/// Seeded standard-normal values (candle's CPU generator cannot be seeded).
fn seeded_randn(shape: &[usize], rng: &mut impl rand::Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f64> = (0..n).map(|_| crate::model::standard_normal(rng)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

#[test]
fn moe_layer_gradients_match_finite_differences() {
    use crate::moe::{MoeConfig, Routing};
    use rand::SeedableRng;
    let (d, d_ff, t) = (4, 6, 18);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for (experts, top_k, routing) in [
        (3, 2, Routing::Learned),
        (2, 1, Routing::Learned),
        (4, 1, Routing::Modality),
    ] {
        let config = MoeConfig {
            experts,
            top_k,
            routing,
            balance_weight: 0.5,
            z_loss_weight: 0.1,
        };
        let mut inputs = vec![
            seeded_randn(&[1, t, d], &mut rng),
            seeded_randn(&[experts, d], &mut rng),
        ];
        for _ in 0..experts {
            for shape in [[d_ff, d], [d_ff, d], [d, d_ff]] {
                inputs.push(seeded_randn(&shape, &mut rng));
            }
        }
        let is_image: Vec<bool> = (0..t).map(|i| i % 3 != 2).collect();
        let valid: Vec<bool> = (0..t).map(|i| i != 4).collect();
        // Every expert must receive tokens, or its weights rightly get no gradient.
        let routed = moe_from(&config, d, d_ff, &inputs[1..])
            .forward(&inputs[0], &is_image, &valid)
            .unwrap()
            .routing;
        assert!(
            (0..experts).all(|e| routed.image[e] + routed.text[e] > 0),
            "{routed:?}"
        );
        check_gradient(
            &format!("moe {experts}/{top_k} {routing:?}"),
            &inputs,
            |xs| {
                let moe = moe_from(&config, d, d_ff, &xs[1..]);
                let out = moe.forward(&xs[0], &is_image, &valid)?;
                Tensor::cat(
                    &[out.output.flatten_all()?, out.aux_loss.unwrap().reshape(1)?],
                    0,
                )
            },
        );
    }
}

fn moe_config(experts: usize, top_k: usize, routing: crate::moe::Routing) -> ModelConfig {
    let mut config = tiny_config();
    config.moe = Some(crate::moe::MoeConfig {
        experts,
        top_k,
        routing,
        balance_weight: 0.01,
        z_loss_weight: 1e-3,
    });
    config
}

#[test]
fn moe_with_one_expert_equals_the_dense_model() {
    let dense = NativeModel::new(tiny_config(), 5, &Device::Cpu).unwrap();
    let moe = NativeModel::new(
        moe_config(1, 1, crate::moe::Routing::Learned),
        6,
        &Device::Cpu,
    )
    .unwrap();
    {
        let source = dense.varmap.data().lock().unwrap();
        let target = moe.varmap.data().lock().unwrap();
        for (name, var) in target.iter() {
            let from = name.replace("moe.experts.0.", "mlp.");
            if let Some(weights) = source.get(&from) {
                var.set(weights.as_tensor()).unwrap();
            } else {
                assert!(
                    name.ends_with("moe.router.weight"),
                    "{name} has no dense counterpart"
                );
            }
        }
    }
    // With one expert the router's probability is exactly 1: the same function.
    let batch = mixed_batch(&tiny_seq());
    let (a, _) = dense.sample_losses(&batch).unwrap();
    let (b, _) = moe.sample_losses(&batch).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-5);
    let inputs = prompt_batch(&tiny_seq(), &samples(Task::Count, 2));
    assert!(
        max_abs_diff(
            &full_forward_last_logits(&dense, &inputs),
            &full_forward_last_logits(&moe, &inputs)
        ) < 1e-5
    );
}

#[test]
fn moe_counts_train_and_decode() {
    use crate::moe::Routing;
    let dense = tiny_config();
    let config = moe_config(4, 2, Routing::Learned);
    let (d, ff, layers) = (dense.d_model, dense.d_ff, dense.n_layers);
    assert_eq!(
        config.parameter_count() - dense.parameter_count(),
        layers * (3 * 3 * d * ff + 4 * d)
    );
    assert_eq!(
        config.active_parameter_count() - dense.parameter_count(),
        layers * (3 * d * ff + 4 * d)
    );
    let model = NativeModel::new(config.clone(), 7, &Device::Cpu).unwrap();
    assert_eq!(model.parameter_count(), config.parameter_count());

    // Every weight, router and experts included, learns (the balance and z-losses reach the router).
    let loss = assert_every_weight_learns(&model);
    // The training loss adds the auxiliary losses to the cross-entropy; evaluation losses do not.
    let (per_sample, _) = model.sample_losses(&mixed_batch(&tiny_seq())).unwrap();
    let ce = per_sample.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(loss.to_scalar::<f32>().unwrap() > ce);

    // Cached decoding matches recomputation with routed FFNs.
    let mut inputs = prompt_batch(&tiny_seq(), &samples(Task::Relation, 2));
    let mut cache = crate::model::KvCache::default();
    let logits = model.prefill(&inputs, &mut NoHook, &mut cache).unwrap();
    let next: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
    let stepped = model.decode_step(&next, &mut cache).unwrap();
    append_tokens(&mut inputs, &next);
    assert!(max_abs_diff(&stepped, &full_forward_last_logits(&model, &inputs)) < 1e-4);
}

#[test]
fn modality_routing_keeps_image_and_text_experts_apart() {
    use crate::moe::Routing;
    let batch = mixed_batch(&tiny_seq());
    let inputs = Inputs::from_batch(&batch, &Device::Cpu).unwrap();
    let image_tokens: usize =
        batch.image_starts.iter().filter(|s| s.is_some()).count() * batch.n_patches;
    let real: usize = batch.lengths.iter().sum();
    for (routing, top_k) in [(Routing::Modality, 1), (Routing::Learned, 2)] {
        let model = NativeModel::new(moe_config(4, top_k, routing), 8, &Device::Cpu).unwrap();
        let state = model
            .forward(model.embed(&inputs).unwrap(), &mut NoHook, None)
            .unwrap();
        assert_eq!(state.routing.len(), 2);
        for layer in &state.routing {
            assert_eq!(
                layer.image.iter().sum::<u64>() as usize,
                image_tokens * top_k
            );
            assert_eq!(
                layer.text.iter().sum::<u64>() as usize,
                (real - image_tokens) * top_k
            );
            let score = layer.specialisation();
            if routing == Routing::Modality {
                assert!(
                    layer.image[2..].iter().all(|&c| c == 0)
                        && layer.text[..2].iter().all(|&c| c == 0)
                );
                assert_eq!(score, 1.0);
            } else {
                assert!((0.0..1.0).contains(&score), "{score}");
            }
        }
    }
    let mut bad = moe_config(3, 1, Routing::Modality);
    assert!(
        NativeModel::new(bad.clone(), 0, &Device::Cpu)
            .err()
            .unwrap()
            .to_string()
            .contains("model.moe")
    );
    bad.moe = Some(crate::moe::MoeConfig {
        top_k: 5,
        ..moe_config(4, 1, Routing::Learned).moe.unwrap()
    });
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("top_k (5)")
    );
}

// ---------------------------------------------------------------- late fusion

fn late_config() -> ModelConfig {
    late_config_unshuffled(1)
}

fn late_config_unshuffled(unshuffle: usize) -> ModelConfig {
    let mut config = tiny_config();
    config.vision = Some(crate::vision::VisionConfig {
        d_model: 16,
        n_layers: 2,
        n_heads: 2,
        d_ff: 24,
        lr_scale: 0.1,
        unshuffle,
    });
    config
}

#[test]
fn unshuffled_patches_are_the_finer_patches_of_the_same_image() {
    // A 64 × 64 scene cut into 8-pixel patches, unshuffled by r, must equal the same scene cut into
    // 8/r-pixel patches, reordered so that each 8-pixel patch's sub-patches are consecutive.
    let image = samples(Task::Count, 1).remove(0).image.unwrap();
    for r in [2usize, 4] {
        let coarse = tiny_seq();
        let fine = SequenceConfig {
            patch_size: coarse.patch_size / r as u32,
            ..coarse.clone()
        };
        let to_tensor = |cfg: &SequenceConfig| {
            let values = tokenfold_data::sequence::patchify(&image, cfg).unwrap();
            Tensor::from_vec(values, (1, cfg.n_patches(), cfg.patch_dim()), &Device::Cpu).unwrap()
        };
        let unshuffled: Vec<Vec<f32>> = crate::vision::unshuffle_patches(&to_tensor(&coarse), r)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let finer: Vec<Vec<f32>> = to_tensor(&fine).squeeze(0).unwrap().to_vec2().unwrap();
        let (g, fine_grid) = (coarse.grid(), fine.grid());
        for (i, sub) in unshuffled.iter().enumerate() {
            let (patch, within) = (i / (r * r), i % (r * r));
            let row = (patch / g) * r + within / r;
            let column = (patch % g) * r + within % r;
            assert_eq!(
                sub,
                &finer[row * fine_grid + column],
                "r {r}, sub-patch {i}"
            );
        }
    }
    // A factor that does not divide the patch side is refused with the field named.
    let mut bad = late_config_unshuffled(3);
    let error = bad.validate().unwrap_err().to_string();
    assert!(
        error.contains("vision") && error.contains("unshuffle 3"),
        "{error}"
    );
    bad.vision.as_mut().unwrap().unshuffle = 0;
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("unshuffle")
    );
}

#[test]
fn gelu_gradient() {
    check_gradient("gelu", &[randn(&[3, 5])], |xs| xs[0].gelu());
}

#[test]
fn late_fusion_trains_every_weight_and_decodes_with_the_cache() {
    for unshuffle in [1, 2] {
        late_fusion_case(late_config_unshuffled(unshuffle));
    }
}

fn late_fusion_case(config: ModelConfig) {
    let vision = config.vision.clone().unwrap();
    assert_eq!(
        config.image_parameter_count(),
        vision.encoder_parameter_count(&config) + vision.connector_parameter_count(&config)
    );
    let model = NativeModel::new(config.clone(), 9, &Device::Cpu).unwrap();
    assert_eq!(model.parameter_count(), config.parameter_count());
    let names: Vec<String> = model
        .varmap
        .data()
        .lock()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(
        names.iter().any(|n| n == "vision.cls")
            && names.iter().any(|n| n == "connector.fc2.weight")
    );
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("patch_embed") || n.starts_with("image_pos"))
    );

    assert_every_weight_learns(&model);

    let mut inputs = prompt_batch(&tiny_seq(), &samples(Task::Locate, 2));
    let mut cache = crate::model::KvCache::default();
    let logits = model.prefill(&inputs, &mut NoHook, &mut cache).unwrap();
    assert!(max_abs_diff(&logits, &full_forward_last_logits(&model, &inputs)) < 1e-4);
    let next: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
    let stepped = model.decode_step(&next, &mut cache).unwrap();
    append_tokens(&mut inputs, &next);
    assert!(max_abs_diff(&stepped, &full_forward_last_logits(&model, &inputs)) < 1e-4);

    // Image tokens see the whole image in the encoder: a change to the last patch moves the first
    // patch's decoder input (in early fusion it would not before the first layer).
    let batch =
        Batch::from_samples(&samples(Task::Count, 1), &fixture().tokenizer, &tiny_seq()).unwrap();
    let mut changed = Inputs::from_batch(&batch, &Device::Cpu).unwrap();
    let embedded = |inputs: &Inputs| model.embed(inputs).unwrap().hidden;
    let start = changed.image_starts[0].unwrap();
    let before = embedded(&changed).i((0, start)).unwrap();
    let mut values: Vec<f32> = changed.patches.flatten_all().unwrap().to_vec1().unwrap();
    let last = values.len() - 1;
    values[last] += 1.0;
    changed.patches = Tensor::from_vec(values, changed.patches.shape(), &Device::Cpu).unwrap();
    let after = embedded(&changed).i((0, start)).unwrap();
    assert!(max_abs_diff(&before, &after) > 0.0);
}

#[test]
fn encoder_weights_take_their_learning_rate_multiplier() {
    let config = late_config();
    let model = NativeModel::new(config, 10, &Device::Cpu).unwrap();
    let vars: Vec<(String, candle_core::Var)> = model
        .varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    let before: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    opt.scale_lr(crate::vision::is_encoder_weight, 0.1);
    // A gradient of ones: Adam's first step moves every weight by lr·scale (ε aside).
    let grads = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().ones_like().unwrap()))
        .collect();
    opt.step(&grads, 0.01).unwrap();
    for ((name, var), old) in vars.iter().zip(&before) {
        let moved = max_abs_diff(old, var.as_tensor());
        let expected = if name.starts_with("vision.") {
            0.001
        } else {
            0.01
        };
        assert!(
            (moved - expected).abs() < 1e-5,
            "{name} moved {moved}, expected {expected}"
        );
    }
}

#[test]
fn a_model_prepared_for_inference_gives_the_same_logits_prefill_and_decode() {
    let inputs = three_length_prompts();
    // Untied embeddings too, so that the separate output head is prepared as well; and widths that are
    // not multiples of the panels' 16 columns (d 24: q, k and v 72 wide, the output projection 24; d_ff
    // 40, whose gate and up products take the two-step SwiGLU, where tiny_config's 48 takes the fused one).
    // Frozen models, as a loaded one is: passes through variables track gradients and never take the
    // inference paths.
    let narrow = ModelConfig {
        d_model: 24,
        n_heads: 2,
        d_ff: 40,
        ..tiny_config()
    };
    // Two heads of 16: the q, k and v product is split into heads as it is computed (hd a multiple of
    // the panels' 16 columns), where tiny_config's heads of 8 take the two steps.
    let wide_heads = ModelConfig {
        n_heads: 2,
        ..tiny_config()
    };
    for config in [
        tiny_config(),
        ModelConfig {
            tie_embeddings: false,
            ..tiny_config()
        },
        narrow,
        wide_heads,
    ] {
        let plain = NativeModel::new(config.clone(), 9, &Device::Cpu)
            .unwrap()
            .frozen()
            .unwrap();
        let mut prepared = NativeModel::new(config, 9, &Device::Cpu)
            .unwrap()
            .frozen()
            .unwrap();
        assert!(!prepared.is_prepared_for_inference());
        prepared.prepare_inference().unwrap();
        assert!(prepared.is_prepared_for_inference());
        assert!(prepared.frozen().unwrap().is_prepared_for_inference());
        let reference = full_forward_last_logits(&plain, &inputs);
        assert!(max_abs_diff(&full_forward_last_logits(&prepared, &inputs), &reference) < 1e-5);
        let (mut plain_cache, mut prepared_cache) = (
            crate::model::KvCache::default(),
            crate::model::KvCache::default(),
        );
        let a = plain
            .prefill(&inputs, &mut NoHook, &mut plain_cache)
            .unwrap();
        let b = prepared
            .prefill(&inputs, &mut NoHook, &mut prepared_cache)
            .unwrap();
        assert!(max_abs_diff(&a, &b) < 1e-5, "prefill logits differ");
        let next: Vec<u32> = a.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        let a = plain.decode_step(&next, &mut plain_cache).unwrap();
        let b = prepared.decode_step(&next, &mut prepared_cache).unwrap();
        assert!(max_abs_diff(&a, &b) < 1e-5, "decoding logits differ");
    }
}

#[test]
fn keys_and_queries_at_rows_are_the_layers_own() {
    let model = NativeModel::new(tiny_config(), 5, &Device::Cpu).unwrap();
    let seq = tiny_seq();
    let mut items = samples(Task::Count, 1);
    items.extend(samples(Task::Caption, 1));
    let inputs = prompt_batch(&seq, &items);
    let state = model.embed(&inputs).unwrap();
    let t = state.len();
    let layer = 1;
    let (q, k) = model.layer_queries_keys(layer, &state).unwrap();
    // Rows of both samples, out of order: the queries come back in the order asked.
    let rows = [t + 3, 0, inputs.lengths[0] - 1, t + inputs.lengths[1] - 1];
    let (keys, queries) = model
        .layer_keys_and_queries_at(layer, &state, &rows)
        .unwrap();
    assert!(max_abs_diff(&keys, &k) < 1e-6, "keys differ");
    let queries = queries.expect("queries were asked for");
    assert_eq!(
        queries.dims(),
        &[1, q.dim(1).unwrap(), rows.len(), q.dim(3).unwrap()]
    );
    for (i, &row) in rows.iter().enumerate() {
        let expected = q.i((row / t, .., row % t, ..)).unwrap();
        let got = queries.i((0, .., i, ..)).unwrap();
        assert!(max_abs_diff(&got, &expected) < 1e-6, "query of row {row}");
    }
    let (_, none) = model.layer_keys_and_queries_at(layer, &state, &[]).unwrap();
    assert!(none.is_none());
    let err = model
        .layer_keys_and_queries_at(layer, &state, &[2 * t])
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("query row {}", 2 * t)), "{err}");
}

#[test]
fn a_data_tokenizer_that_merges_digits_is_replaced_and_one_that_splits_them_is_kept() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let data_tokenizer = dir.path().join("tokenizer.json");
    let run = RunDir::new(&dir.path().join("run"));
    write_digit_merging_tokenizer(&f.tokenizer, &data_tokenizer).unwrap();
    let merged_size = TextTokenizer::load(&data_tokenizer).unwrap().vocab_size();

    // Asked for the merging tokenizer's own size: it is still replaced, on disk too.
    let tokenizer =
        prepare_tokenizer(&run, &data_tokenizer, &f.assets, merged_size, false).unwrap();
    assert!(tokenizer.splits_digits().unwrap());
    let on_disk = TextTokenizer::load(&data_tokenizer).unwrap();
    assert!(on_disk.splits_digits().unwrap());
    assert_eq!(on_disk.vocab_size(), merged_size);

    // A tokenizer that splits digits and has the configured size is used as it is.
    let before = std::fs::read(&data_tokenizer).unwrap();
    let again = prepare_tokenizer(&run, &data_tokenizer, &f.assets, merged_size, false).unwrap();
    assert_eq!(
        again.encode("what number is written? 47").unwrap(),
        on_disk.encode("what number is written? 47").unwrap()
    );
    assert_eq!(std::fs::read(&data_tokenizer).unwrap(), before);
}

// ---------------------------------------------------------------- packed rows

#[test]
fn packed_attention_equals_padded_attention_at_the_real_rows() {
    // Sample 0 crosses a 64-row tile, sample 2 holds no rows, the bias carries per-key terms.
    let (lengths, t, h, d) = ([70, 41, 0, 3], 70, 4, 16);
    let bias = model_like_bias(&lengths, t, (3, 20));
    let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    let (q, k, v) = (
        randn(&[4, h, t, d]),
        randn(&[4, h, t, d]),
        randn(&[4, h, t, d]),
    );
    let reference = ops::attention_plain(&q, &k, &v, &bias).unwrap();
    let mut segments = crate::kernels::Segments::default();
    let mut start = 0;
    for (s, &len) in lengths.iter().enumerate() {
        segments.spans.push((start, len));
        let block: Vec<f32> = bias
            .i((s, 0, ..len, ..len))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        segments.bias.extend(block);
        start += len;
    }
    let pack = |x: &Tensor| {
        let parts: Vec<Tensor> = lengths
            .iter()
            .enumerate()
            .map(|(s, &len)| x.i(s).unwrap().narrow(1, 0, len).unwrap())
            .collect();
        Tensor::cat(&parts, 1).unwrap().unsqueeze(0).unwrap()
    };
    let scale = 1.0 / (d as f64).sqrt();
    let packed =
        crate::kernels::segment_attention(&pack(&q), &pack(&k), &pack(&v), &segments, scale)
            .unwrap();
    let rows = segments.rows();
    let reference = pack(&reference)
        .transpose(1, 2)
        .unwrap()
        .reshape((1, rows, h * d))
        .unwrap();
    let error = relative_error(&packed, &reference);
    assert!(error < 1e-5, "packed attention differs by {error:.2e}");

    // Inconsistent segments and inputs that need gradients are refused.
    let mut short = segments.clone();
    short.spans[1].1 -= 1;
    let err = crate::kernels::segment_attention(&pack(&q), &pack(&k), &pack(&v), &short, scale)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sample 2 starts at row"), "{err}");
    let var = candle_core::Var::from_tensor(&pack(&q)).unwrap();
    let err =
        crate::kernels::segment_attention(var.as_tensor(), &pack(&k), &pack(&v), &segments, scale)
            .unwrap_err()
            .to_string();
    assert!(err.contains("no backward pass"), "{err}");
}

/// Before layer 1: marks the first image tokens of every sample invalid and gives every key a bias (what a
/// merging stage leaves); keeps the queries and keys captured from layer 0.
struct MaskAndCapture {
    drop: usize,
    captured: Option<(Tensor, Tensor)>,
}

impl crate::model::LayerHook for MaskAndCapture {
    fn before_layer(
        &mut self,
        layer: usize,
        state: &mut crate::model::SeqState,
    ) -> candle_core::Result<bool> {
        if layer != 1 {
            return Ok(false);
        }
        self.captured = state.captured.take();
        let (b, t) = (state.batch(), state.len());
        for s in 0..b {
            let image: Vec<usize> = (0..t).filter(|&j| state.is_image[s * t + j]).collect();
            for &j in image.iter().take(self.drop) {
                state.valid[s * t + j] = false;
            }
        }
        let key_bias: Vec<f32> = (0..b * t).map(|r| 0.1 * ((r % 5) as f32 - 2.0)).collect();
        state.key_bias = Some(Tensor::from_vec(key_bias, (b, t), state.hidden.device())?);
        Ok(true)
    }

    fn capture(&self, layer: usize) -> bool {
        layer == 0
    }

    // It changes metadata only, so a packed pass need not unpack before it: the path where the layout
    // is rebuilt from packed rows.
    fn reads_hidden(&self, _layer: usize) -> bool {
        false
    }
}

/// `x` (b, …, t, …) at the real rows of `valid` (b × t) along dimension `dim`, samples end to end.
fn real_rows(x: &Tensor, valid: &[bool], dim: usize) -> Tensor {
    let b = x.dim(0).unwrap();
    let t = valid.len() / b;
    let parts: Vec<Tensor> = (0..b)
        .map(|s| {
            let rows: Vec<u32> = (0..t as u32)
                .filter(|&j| valid[s * t + j as usize])
                .collect();
            let n = rows.len();
            x.i(s)
                .unwrap()
                .index_select(&Tensor::from_vec(rows, n, &Device::Cpu).unwrap(), dim - 1)
                .unwrap()
        })
        .collect();
    Tensor::cat(&parts, dim - 1).unwrap()
}

#[test]
fn a_packed_forward_equals_the_padded_one_through_prefill_capture_and_decoding() {
    // Prompts of three lengths: the batch has padding, so an inference pass packs its rows.
    let inputs = three_length_prompts();
    assert!(inputs.lengths.iter().any(|&l| l != inputs.lengths[0]));
    let configs = [
        ("dense", tiny_config()),
        (
            "mixture of experts",
            moe_config(4, 2, crate::moe::Routing::Modality),
        ),
        ("late fusion", late_config()),
    ];
    for (name, config) in configs {
        let trainable = NativeModel::new(config, 12, &Device::Cpu).unwrap();
        assert!(
            !trainable.packs_rows(),
            "{name}: a model with variables pads"
        );
        let mut packed = trainable.frozen().unwrap();
        packed.prepare_inference().unwrap();
        assert!(packed.packs_rows());
        let mut padded = packed.frozen().unwrap();
        padded.set_pack_rows(false);

        // Full forward: equal at the real rows; the packed pass leaves padding rows zero, which shows it
        // computed none of them. A model with variables (being trained) never packs.
        let run = |model: &NativeModel| {
            model
                .forward(model.embed(&inputs).unwrap(), &mut NoHook, None)
                .unwrap()
        };
        let (a, b, c) = (run(&packed), run(&padded), run(&trainable));
        let real = |x: &Tensor| real_rows(x, &a.valid, 1);
        assert!(
            max_abs_diff(&real(&a.hidden), &real(&b.hidden)) < 1e-5,
            "{name}: hidden"
        );
        // The inference kernels give what the training path gives, routing and auxiliary loss included.
        assert!(
            max_abs_diff(&real(&a.hidden), &real(&c.hidden)) < 1e-5,
            "{name}: trainable"
        );
        assert_eq!(a.routing, c.routing, "{name}: routing");
        assert_eq!(
            a.aux_loss.is_some(),
            c.aux_loss.is_some(),
            "{name}: auxiliary loss"
        );
        if let (Some(x), Some(y)) = (&a.aux_loss, &c.aux_loss) {
            assert!(max_abs_diff(x, y) < 1e-6, "{name}: auxiliary loss");
        }
        assert_eq!(packed.parameter_count(), trainable.parameter_count());
        assert_eq!(padded.parameter_count(), trainable.parameter_count());
        let pad = a.valid.iter().position(|&v| !v).expect("a padding row");
        let (t, d) = (a.len(), tiny_config().d_model);
        let zeros = Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap();
        let row = |x: &Tensor| {
            max_abs_diff(
                &x.reshape((a.batch() * t, d)).unwrap().i(pad).unwrap(),
                &zeros,
            )
        };
        assert_eq!(
            row(&a.hidden),
            0.0,
            "{name}: the packed pass computed padding"
        );
        assert!(
            row(&b.hidden) > 0.0 && row(&c.hidden) > 0.0,
            "{name}: padding rows computed"
        );

        // Prefill through a hook that masks tokens, adds a key bias and captures layer 0; then decoding.
        let prefill = |model: &NativeModel| {
            let mut hook = MaskAndCapture {
                drop: 5,
                captured: None,
            };
            let mut cache = crate::model::KvCache::default();
            let logits = model.prefill(&inputs, &mut hook, &mut cache).unwrap();
            (logits, cache, hook.captured.expect("layer 0 was captured"))
        };
        let (logits_a, mut cache_a, (qa, ka)) = prefill(&packed);
        let (logits_b, mut cache_b, (qb, kb)) = prefill(&padded);
        assert!(
            max_abs_diff(&logits_a, &logits_b) < 1e-5,
            "{name}: prefill logits"
        );
        let real = |x: &Tensor| real_rows(x, &b.valid, 2);
        assert!(
            max_abs_diff(&real(&qa), &real(&qb)) < 1e-5,
            "{name}: captured queries"
        );
        assert!(
            max_abs_diff(&real(&ka), &real(&kb)) < 1e-5,
            "{name}: captured keys"
        );
        for layer in 0..2 {
            let (la, lb) = (
                cache_a.layers[layer].as_ref().unwrap(),
                cache_b.layers[layer].as_ref().unwrap(),
            );
            assert_eq!((&la.valid, &la.key_bias), (&lb.valid, &lb.key_bias));
        }
        let mut next: Vec<u32> = logits_a.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        for step in 0..3 {
            let a = packed.decode_step(&next, &mut cache_a).unwrap();
            let b = padded.decode_step(&next, &mut cache_b).unwrap();
            assert!(max_abs_diff(&a, &b) < 1e-5, "{name}: decoding step {step}");
            next = a.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        }
    }
}

#[test]
fn a_hook_that_leaves_the_state_inconsistent_is_a_clear_error() {
    struct DropAPosition;
    impl crate::model::LayerHook for DropAPosition {
        fn before_layer(
            &mut self,
            layer: usize,
            state: &mut crate::model::SeqState,
        ) -> candle_core::Result<bool> {
            if layer == 1 {
                state.positions.pop();
            }
            Ok(layer == 1)
        }
    }
    let model = NativeModel::new(tiny_config(), 3, &Device::Cpu).unwrap();
    let inputs = prompt_batch(&tiny_seq(), &samples(Task::Count, 2));
    for model in [model.frozen().unwrap(), model] {
        let err = model
            .forward(model.embed(&inputs).unwrap(), &mut DropAPosition, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("positions holds"), "{err}");
    }
}

#[test]
fn split_heads_equals_reshape_norm_and_rotation() {
    let (b, t, h, hd) = (2, 5, 3, 8);
    let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    let x = randn(&[b, t, 3 * h * hd]);
    let (q_norm, k_norm) = (randn(&[hd]), randn(&[hd]));
    let positions: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7) % 40).collect();
    let (cos, sin) = rope_rows(hd, positions, (b, t));
    let parts = [
        crate::kernels::HeadPart {
            norm: Some(&q_norm),
            rotate: true,
        },
        crate::kernels::HeadPart {
            norm: Some(&k_norm),
            rotate: false,
        },
        crate::kernels::HeadPart {
            norm: None,
            rotate: true,
        },
    ];
    let split = crate::kernels::split_heads(&x, h, &parts, (&cos, &sin), 1e-5).unwrap();
    for (p, part) in parts.iter().enumerate() {
        let rope = part.rotate.then_some((&cos, &sin));
        let reference = plain_part(&x, (p, h, hd), part.norm, rope);
        assert_eq!(split[p].dims(), &[b, h, t, hd]);
        let error = relative_error(&split[p], &reference);
        assert!(error < 1e-6, "part {p} differs by {error:.2e}");
    }
    let odd = crate::kernels::split_heads(
        &x.narrow(2, 0, 3 * h * 7).unwrap(),
        h,
        &parts,
        (&cos, &sin),
        1e-5,
    );
    assert!(odd.unwrap_err().to_string().contains("even size"));
    let var = candle_core::Var::from_tensor(&x).unwrap();
    let err = crate::kernels::split_heads(var.as_tensor(), h, &parts, (&cos, &sin), 1e-5)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no backward pass"), "{err}");
}

#[test]
fn the_fused_inference_kernels_equal_the_plain_ops() {
    let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    // SwiGLU over gate and up side by side.
    let x = randn(&[2, 70, 2 * 24]);
    let (gate, up) = (x.narrow(2, 0, 24).unwrap(), x.narrow(2, 24, 24).unwrap());
    let reference = ops::swiglu_plain(&gate, &up).unwrap();
    let error = relative_error(&crate::kernels::swiglu_halves(&x).unwrap(), &reference);
    assert!(error < 1e-6, "swiglu halves differs by {error:.2e}");
    // Residual sum and its norm.
    let (a, b, w) = (randn(&[3, 70, 32]), randn(&[3, 70, 32]), randn(&[32]));
    let (sum, normed) = crate::kernels::add_rms_norm(&a, &b, &w, 1e-5).unwrap();
    let plain_sum = (&a + &b).unwrap();
    assert!(relative_error(&sum, &plain_sum) < 1e-7);
    let error = relative_error(&normed, &ops::rms_norm_plain(&plain_sum, &w, 1e-5).unwrap());
    assert!(error < 1e-6, "add and norm differs by {error:.2e}");
    // 17 rows fit one job and are built row after row; the 210 above are zero-filled and shared out
    // in jobs. Each row gets the same bits either way, from the sum and its norm alike.
    let bits = |t: &Tensor| -> Vec<u32> {
        let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        values.iter().map(|x| x.to_bits()).collect()
    };
    let first = |t: &Tensor| t.get(0).unwrap().narrow(0, 0, 17).unwrap();
    let (sum17, normed17) = crate::kernels::add_rms_norm(&first(&a), &first(&b), &w, 1e-5).unwrap();
    assert_eq!(bits(&sum17), bits(&first(&sum)), "sum of 17 rows");
    assert_eq!(
        bits(&normed17),
        bits(&first(&normed)),
        "add and norm of 17 rows"
    );
    let normed = crate::kernels::rms_norm(&a, &w, 1e-5).unwrap();
    let error = relative_error(&normed, &ops::rms_norm_plain(&a, &w, 1e-5).unwrap());
    assert!(error < 1e-6, "norm differs by {error:.2e}");
    let normed17 = crate::kernels::rms_norm(&first(&a), &w, 1e-5).unwrap();
    assert_eq!(bits(&normed17), bits(&first(&normed)), "norm of 17 rows");
    // Residual plus a projection, in one GEMM.
    let (x, h, w) = (randn(&[2, 70, 32]), randn(&[2, 70, 48]), randn(&[48, 32]));
    let reference = (&x + h.broadcast_matmul(&w).unwrap()).unwrap();
    let error = relative_error(&crate::kernels::matmul_add(&x, &h, &w).unwrap(), &reference);
    assert!(error < 1e-6, "matmul and add differs by {error:.2e}");
    let err = crate::kernels::matmul_add(&x, &h.narrow(1, 0, 69).unwrap(), &w).unwrap_err();
    assert!(err.to_string().contains("do not fit"), "{err}");
    // Clear errors.
    let odd = crate::kernels::swiglu_halves(&randn(&[2, 5])).unwrap_err();
    assert!(odd.to_string().contains("odd width"), "{odd}");
    let err = crate::kernels::add_rms_norm(&a, &b.narrow(1, 0, 3).unwrap(), &w, 1e-5).unwrap_err();
    assert!(err.to_string().contains("differ"), "{err}");
    let var = candle_core::Var::from_tensor(&a).unwrap();
    let err = crate::kernels::add_rms_norm(var.as_tensor(), &b, &randn(&[32]), 1e-5).unwrap_err();
    assert!(err.to_string().contains("no backward pass"), "{err}");
}

#[test]
fn fast_exp_is_within_two_ulp() {
    let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
    // Every 97th f32 bit pattern between −87.3 and 88.7 (about 22 million values, both signs).
    let mut worst = (0i64, 0f32);
    for bits in (0u32..=u32::MAX).step_by(97) {
        let x = f32::from_bits(bits);
        if !(-87.3..=88.7).contains(&x) {
            continue;
        }
        let error = ulps(crate::kernels::exp_f32(x), x.exp());
        if error > worst.0 {
            worst = (error, x);
        }
    }
    assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
    assert_eq!(crate::kernels::exp_f32(-1e9), 0.0);
    assert_eq!(crate::kernels::exp_f32(f32::NEG_INFINITY), 0.0);
    assert!(crate::kernels::exp_f32(f32::NAN).is_nan());
    assert_eq!(crate::kernels::exp_f32(-87.4), 0.0);
    assert!(crate::kernels::exp_f32(1e9).is_finite());
    assert_eq!(crate::kernels::exp_f32(0.0), 1.0);
}

/// One guard is active per process, so the tests of guards take turns.
fn awake_tests_in_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn awake_guards_keep_pool_threads_working_until_dropped_and_only_inside_a_pool() {
    use crate::awake::Awake;
    use rayon::prelude::*;
    let _turn = awake_tests_in_turn();
    let expected: u64 = (0..200_000u64).map(|x| x * x % 7).sum();
    // A thread outside any pool must never start spinning threads it would compete with.
    assert!(!Awake::start().is_active());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        let guard = Awake::start();
        assert!(guard.is_active());
        assert!(!Awake::start().is_active(), "a nested guard starts nothing");
        let flag = guard.stop_flag().expect("an active guard has a flag");
        // The spinning thread takes the pool's work: parallel operations still finish, with the same sums.
        for _ in 0..20 {
            let sum: u64 = (0..200_000u64).into_par_iter().map(|x| x * x % 7).sum();
            assert_eq!(sum, expected);
        }
        drop(guard);
        // The spinning job ends once the guard is gone. Its closure, which holds a clone of the flag, is
        // shared by every thread's copy of the broadcast and dropped once all have run; this thread runs
        // its own (which returns at once) when it looks for pool work.
        let started = std::time::Instant::now();
        while Arc::strong_count(&flag) > 1 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the spinning job did not end after the guard was dropped"
            );
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                std::thread::yield_now();
            }
        }
        assert!(Awake::start().is_active(), "a later guard starts again");
        // Guards in quick succession, as back-to-back passes make them: a spinning thread may take the
        // next guard's job before it saw its own flag. Every job still ends, and every flag is released.
        let flags: Vec<Arc<std::sync::atomic::AtomicBool>> = (0..200)
            .map(|_| {
                let guard = Awake::start();
                let sum: u64 = (0..2_000u64).into_par_iter().map(|x| x * x % 7).sum();
                assert_eq!(sum, (0..2_000u64).map(|x| x * x % 7).sum::<u64>());
                guard.stop_flag().expect("an active guard has a flag")
            })
            .collect();
        let started = std::time::Instant::now();
        while flags.iter().any(|f| Arc::strong_count(f) > 1) {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "a spinning job did not end after its guard was dropped"
            );
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                std::thread::yield_now();
            }
        }
    });
    let single = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    single.install(|| assert!(!Awake::start().is_active(), "no other thread to keep awake"));
}

#[test]
fn awake_guards_on_two_pool_threads_at_once_never_hang() {
    use crate::awake::Awake;
    use rayon::prelude::*;
    let _turn = awake_tests_in_turn();
    // Passes started from two pool threads at the same time: with both guards spinning, each thread
    // could run the other's spinning job on top of its own pass. A watchdog turns a hang into a failure.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (active, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        pool.install(|| {
            for _ in 0..100 {
                let work = || {
                    let guard = Awake::start();
                    if guard.is_active() {
                        most.fetch_max(active.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    }
                    let sum: u64 = (0..20_000u64).into_par_iter().map(|x| x % 3).sum();
                    if guard.is_active() {
                        active.fetch_sub(1, Ordering::SeqCst);
                    }
                    sum
                };
                assert_eq!(rayon::join(work, work), (19_999, 19_999));
            }
        });
        assert_eq!(most.load(Ordering::SeqCst), 1, "one guard active at a time");
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("passes with guards on two pool threads did not finish");
}

#[test]
fn mix_rows_matches_a_dense_mixing_matmul() {
    use crate::kernels::mix_rows;
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for (rows, d, out) in [(1, 1, 1), (5, 3, 0), (40, 16, 70), (9, 256, 33)] {
        let x = randn(&[rows, d]);
        // Kept rows (one weight of 1), merged rows (several weights, a row repeated), and empty rows.
        let mixes: Vec<Vec<(usize, f32)>> = (0..out)
            .map(|i| match i % 4 {
                0 => vec![(rng.random_range(0..rows), 1.0)],
                1 => Vec::new(),
                _ => (0..rng.random_range(1..4))
                    .map(|_| (rng.random_range(0..rows), rng.random_range(-1.0..1.0)))
                    .collect(),
            })
            .collect();
        let mut dense = vec![0f64; out * rows];
        for (i, mix) in mixes.iter().enumerate() {
            for &(j, w) in mix {
                dense[i * rows + j] += f64::from(w);
            }
        }
        let expected = Tensor::from_vec(dense, (out, rows), &Device::Cpu)
            .unwrap()
            .matmul(&x)
            .unwrap();
        let got = mix_rows(&x, &mixes).unwrap();
        assert_eq!(got.dims(), [out, d]);
        let diff = (got - expected)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap_or_else(|_| Tensor::new(0f64, &Device::Cpu).unwrap())
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            diff < 1e-12,
            "rows {rows}, d {d}, out {out}: differs by {diff}"
        );
    }
    let x = randn(&[3, 2]);
    let error = mix_rows(&x, &[vec![(3, 1.0)]]).unwrap_err().to_string();
    assert!(error.contains("output row 0 reads row 3 of 3"), "{error}");
    let var = candle_core::Var::from_tensor(&x).unwrap();
    assert!(mix_rows(var.as_tensor(), &[vec![(0, 1.0)]]).is_err());
}

#[test]
fn embed_rows_assembles_token_and_patch_rows() {
    use crate::kernels::embed_rows;
    let (vocab, d, n, t) = (6, 3, 2, 5);
    let table = randn(&[vocab, d]);
    let patches = randn(&[3 * n, d]);
    let offset = randn(&[n, d]);
    // Sample 0 has its image at 1..3, sample 1 none, sample 2 at the very end (3..5).
    let ids: Vec<u32> = vec![0, 5, 5, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 9, 9];
    let tokens = Tensor::from_vec(ids.clone(), (3, t), &Device::Cpu).unwrap();
    let starts = [Some(1), None, Some(3)];
    let got = embed_rows(&table, &tokens, &patches, &offset, &starts).unwrap();
    assert_eq!(got.dims(), [3, t, d]);
    for s in 0..3 {
        for j in 0..t {
            let expected = match starts[s].filter(|&st| (st..st + n).contains(&j)) {
                Some(st) => {
                    (patches.i(s * n + j - st).unwrap() + offset.i(j - st).unwrap()).unwrap()
                }
                None => table.i(ids[s * t + j] as usize).unwrap(),
            };
            let diff = (got.i((s, j)).unwrap() - expected)
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(diff == 0.0, "sample {s}, row {j}: differs by {diff}");
        }
    }
    // Ids under an image span are never read (the 9s above); elsewhere they must be in the vocabulary.
    let bad = Tensor::from_vec(vec![0u32, 7, 0, 0, 0], (1, t), &Device::Cpu).unwrap();
    let error = embed_rows(
        &table,
        &bad,
        &patches.narrow(0, 0, n).unwrap(),
        &offset,
        &[None],
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("token 7 at row 1"), "{error}");
    let error = embed_rows(
        &table,
        &tokens.narrow(0, 0, 1).unwrap(),
        &patches.narrow(0, 0, n).unwrap(),
        &offset,
        &[Some(4)],
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("at 4 overruns its 5 tokens"), "{error}");
    // An image longer than the whole sequence.
    let patches_long = randn(&[8, d]);
    let error = embed_rows(
        &table,
        &tokens.narrow(0, 0, 1).unwrap(),
        &patches_long,
        &randn(&[8, d]),
        &[Some(0)],
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("an image of 8 patches at 0 overruns its 5 tokens"),
        "{error}"
    );
}

#[test]
fn swiglu_halves_in_f32_gives_the_scalar_loops_bits() {
    use crate::kernels::{exp_f32, swiglu_halves};
    // Wide enough for several vector iterations and a remainder, with values that saturate the sigmoid.
    let f = 37;
    let x: Vec<f32> = (0..3 * 2 * f)
        .map(|i| ((i * 7919) % 2003) as f32 / 20.0 - 50.0)
        .collect();
    let got: Vec<f32> =
        swiglu_halves(&Tensor::from_vec(x.clone(), (3, 2 * f), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
    for (r, row) in x.chunks(2 * f).enumerate() {
        for i in 0..f {
            let (g, u) = (row[i], row[f + i]);
            let expected = g * (1.0 + exp_f32(-g)).recip() * u;
            assert_eq!(
                got[r * f + i].to_bits(),
                expected.to_bits(),
                "row {r}, column {i}"
            );
        }
    }
}
