//! The `tokenfold` binary on the generated fixture: commands work end to end and bad input gives a clear
//! error and a non-zero exit, never a panic.

use std::path::Path;
use std::process::{Command, Output};

use tokenfold_data::fixture::write_fixture;

fn tokenfold(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tokenfold"))
        .arg("--data")
        .arg(data)
        .args(["--emoji-style", "fixture"])
        .args(args)
        .output()
        .expect("the tokenfold binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn stats_reports_the_fixture_counts() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).unwrap();
    let out = tokenfold(dir.path(), &["data", "stats", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["emoji"], 68);
    assert_eq!(stats["emoji_with_label"], 67);
    assert_eq!(stats["digits"], 120);
    assert_eq!(stats["speeches"], 20);
    assert_eq!(stats["vocabulary"], 63);
}

#[test]
fn missing_data_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    for args in [
        &["data", "stats"][..],
        &["demo"][..],
        &["data", "show", "--task", "count"][..],
    ] {
        let out = tokenfold(&missing, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("scripts/fetch-data.sh"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn unknown_task_lists_the_valid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokenfold(dir.path(), &["data", "show", "--task", "colours"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown task 'colours'"));
}

#[test]
fn show_writes_a_png_sheet() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).unwrap();
    let sheet = dir.path().join("out/grid.png");
    let out = tokenfold(
        dir.path(),
        &[
            "data",
            "show",
            "--task",
            "exist",
            "--split",
            "test",
            "--negatives",
            "popular",
            "-n",
            "6",
            "--out",
            sheet.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let image = image::open(&sheet).unwrap();
    // 4 columns of 64 × 3 + 12 px, 2 rows of 64 × 3 + 50 + 12 px.
    assert_eq!((image.width(), image.height()), (4 * 204, 2 * 254));
}

#[test]
fn tokenizer_evalsets_and_demo_run_on_the_fixture() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).unwrap();
    let out = tokenfold(dir.path(), &["data", "tokenizer", "--vocab-size", "400"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("bytes per token"));
    assert!(dir.path().join("tokenizer.json").is_file());

    let out = tokenfold(
        dir.path(),
        &["data", "evalsets", "--split", "val", "-n", "5"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("| ") && l.contains("/val |"))
            .count(),
        9,
        "{stdout}"
    );

    let results = dir.path().join("demo");
    // Two training steps and two samples per test set: the demo's path end to end, not its accuracy.
    let out = tokenfold(
        dir.path(),
        &[
            "demo",
            "--out",
            results.to_str().unwrap(),
            "--steps",
            "2",
            "-n",
            "2",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("demo finished"));
    for task in [
        "exist-adversarial",
        "count",
        "locate",
        "relation",
        "read",
        "caption",
        "text",
    ] {
        assert!(results.join(format!("{task}.png")).is_file(), "{task}.png");
    }
}

const TINY_RUN: &str = r#"
[model]
d_model = 32
n_layers = 2
n_heads = 4
d_ff = 48

[sequence]
image_size = 64
patch_size = 8
max_len = 120
summary_token = true

[tokenizer]
vocab_size = 400

[train]
steps = 4
batch_size = 4
lr = 3e-3
warmup_steps = 1
checkpoint_every = 2
eval_samples = 3
"#;

#[test]
fn train_eval_and_ask_run_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).unwrap();
    let config = dir.path().join("tiny.toml");
    std::fs::write(&config, TINY_RUN).unwrap();
    let run = dir.path().join("run");
    let run_arg = run.to_str().unwrap();
    let out = tokenfold(
        dir.path(),
        &[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--out",
            run_arg,
            "--quiet",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("trained 4 steps") && stdout.contains("count/val"),
        "{stdout}"
    );
    assert!(run.join("checkpoint/model.safetensors").is_file());
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"loss\""))
            .count(),
        4
    );

    // --tokenizer: a second run trains with the first run's tokenizer, byte for byte; a tokenizer of
    // another size than the configuration's is a clear error.
    let tokenizer = run.join("tokenizer.json");
    let second = dir.path().join("second");
    let args = |config: &Path, out: &Path| -> Vec<String> {
        [
            "train",
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--tokenizer",
            tokenizer.to_str().unwrap(),
            "--steps",
            "1",
            "--quiet",
        ]
        .map(String::from)
        .to_vec()
    };
    fn as_strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let out = tokenfold(dir.path(), &as_strs(&args(&config, &second)));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(second.join("tokenizer.json")).unwrap(),
        std::fs::read(&tokenizer).unwrap()
    );
    let bigger = dir.path().join("bigger.toml");
    std::fs::write(
        &bigger,
        TINY_RUN.replace("vocab_size = 400", "vocab_size = 500"),
    )
    .unwrap();
    let out = tokenfold(
        dir.path(),
        &as_strs(&args(&bigger, &dir.path().join("third"))),
    );
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("--tokenizer")
            && stderr.contains("400 tokens")
            && stderr.contains("500"),
        "{stderr}"
    );

    let out = tokenfold(
        dir.path(),
        &[
            "eval",
            "--model",
            run_arg,
            "--tasks",
            "count,text",
            "-n",
            "4",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("| count/test | 4 |") && stdout.contains("| text/test | 4 |"),
        "{stdout}"
    );
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("eval-test.json")).unwrap()).unwrap();
    assert_eq!(results.as_array().unwrap().len(), 2);

    let image = dir.path().join("scene.png");
    image::RgbImage::from_pixel(80, 80, image::Rgb([200, 40, 40]))
        .save(&image)
        .unwrap();
    let out = tokenfold(
        dir.path(),
        &[
            "ask",
            "--model",
            run_arg,
            "--image",
            image.to_str().unwrap(),
            "how many animals are there?",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 1);

    // Token reduction: a fitted plan, its evaluation, the comparison table and the kept-patch drawing.
    let plan = dir.path().join("fastv.json");
    let plan_arg = plan.to_str().unwrap();
    let out = tokenfold(
        dir.path(),
        &[
            "fold", "plan", "--model", run_arg, "--method", "fastv", "--budget", "0.222", "--out",
            plan_arg,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&plan).unwrap()).unwrap();
    assert_eq!(saved["stages"][0]["method"], "fastv");
    let out = tokenfold(
        dir.path(),
        &[
            "fold", "eval", "--model", run_arg, "--plan", plan_arg, "--tasks", "count", "-n", "3",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("| count/test | 3 |") && stdout.contains("FLOPs-equivalent tokens"),
        "{stdout}"
    );
    let results = dir.path().join("compare");
    let methods = format!("pool,random,tome,{plan_arg}");
    let compare_args = [
        "fold",
        "compare",
        "--model",
        run_arg,
        "--budgets",
        "0.111",
        "--methods",
        &methods,
        "--tasks",
        "count",
        "-n",
        "2",
        "--latency-repeats",
        "1",
        "--out",
        results.to_str().unwrap(),
    ];
    let out = tokenfold(dir.path(), &compare_args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = std::fs::read_to_string(results.join("compare.md")).unwrap();
    // A rerun reuses every finished row and writes the same table.
    let out = tokenfold(dir.path(), &compare_args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr).matches("reused from rows/").count(), 5);
    assert_eq!(
        std::fs::read_to_string(results.join("compare.md")).unwrap(),
        table
    );
    for row in [
        "| full |",
        "| pool |",
        "| random |",
        "| tome |",
        "| fastv |",
    ] {
        assert!(table.contains(row), "{row} missing from\n{table}");
    }
    let compared: serde_json::Value =
        serde_json::from_slice(&std::fs::read(results.join("compare.json")).unwrap()).unwrap();
    assert_eq!(compared.as_array().unwrap().len(), 5);
    assert!(results.join("accuracy-flops.svg").is_file());
    assert!(image::open(results.join("accuracy-flops.png")).is_ok());
    let kept = dir.path().join("kept.png");
    let out = tokenfold(
        dir.path(),
        &[
            "fold",
            "show",
            "--model",
            run_arg,
            "--image",
            image.to_str().unwrap(),
            "--plan",
            plan_arg,
            "--out",
            kept.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let drawn = image::open(&kept).unwrap();
    assert!(
        drawn.width() > 2 * drawn.height(),
        "the image and one panel per stage"
    );

    let bench = dir.path().join("bench-prefill.json");
    let bench_prefill = |extra: &[&str]| {
        let args = [
            "bench",
            "prefill",
            "--model",
            run_arg,
            "--plan",
            plan_arg,
            "--repeats",
            "1",
            "--out",
            bench.to_str().unwrap(),
        ];
        tokenfold(dir.path(), &[&args[..], extra].concat())
    };
    let figures = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&bench).unwrap()).unwrap()
    };
    let out = bench_prefill(&[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(figures()["rows"].as_array().unwrap().len(), 2);
    assert!(figures()["rows"][1]["full_ms"].as_f64().unwrap() > 0.0);
    let matmul = |key: &str| figures()["rows"][1][key].as_f64().unwrap();
    // Times only: which of the two is faster is for the benchmark to measure, not for a test to assert
    // (with one repeat on a tiny model, the machine's noise can order them either way).
    assert!(matmul("matmul_full_ms") > 0.0 && matmul("matmul_plan_ms") > 0.0);
    assert!(matmul("row_ratio") > 1.0, "the plan removes rows");
    // The planned runs right after a full one are among the planned runs, so no faster than the fastest.
    assert!(matmul("plan_after_full_ms") >= matmul("plan_ms"));
    // The FastV plan's stage reads layer 0's keys: whole row projections of 2·d² each, which lower
    // the prediction that counts them.
    let d = figures()["config"]["d_model"].as_f64().unwrap();
    let projections = matmul("signal_flops") / (2.0 * d * d);
    assert!(
        projections >= 1.0 && projections.fract() == 0.0,
        "{projections}"
    );
    assert!(matmul("plan_flops") > 0.0);
    assert!(matmul("predicted_speedup_with_signals") < matmul("predicted_speedup"));
    assert!(text(&out.stdout).contains("the stages' own key and query projections"));
    assert_eq!(figures()["block"].as_u64(), Some(5));
    // Chosen batch sizes, and a size of zero refused by name.
    let out = bench_prefill(&["--batch", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = figures()["rows"].as_array().unwrap().clone();
    assert_eq!((rows.len(), rows[0]["batch"].as_u64()), (1, Some(3)));
    for (flag, value) in [("--batch", "1,0"), ("--repeats", "0")] {
        let out = tokenfold(
            dir.path(),
            &["bench", "prefill", "--model", run_arg, flag, value],
        );
        assert_eq!(
            out.status.code(),
            Some(2),
            "a usage error for {flag} {value}"
        );
        assert!(text(&out.stderr).contains(flag), "{}", text(&out.stderr));
    }

    // A short search writes a plan within its budget, its report, and the plan runs.
    let searched = dir.path().join("searched.json");
    let out = tokenfold(
        dir.path(),
        &[
            "search",
            "--model",
            run_arg,
            "--budget",
            "0.3",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--tasks",
            "count",
            "--out",
            searched.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&searched).unwrap()).unwrap();
    assert!(plan["stages"][0]["method"] == "unified", "{plan}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("searched.report.json")).unwrap())
            .unwrap();
    assert_eq!(report["trajectory"].as_array().unwrap().len(), 3);
    assert!(report["plan_share"].as_f64().unwrap() <= 0.3);
    let out = tokenfold(
        dir.path(),
        &[
            "fold",
            "eval",
            "--model",
            run_arg,
            "--plan",
            searched.to_str().unwrap(),
            "--tasks",
            "count",
            "-n",
            "3",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    for (args, needle) in [
        (&["--budget", "1.5"][..], "budget 1.5"),
        (&["--budget", "0.1", "--tasks", "text"][..], "image task"),
        (&["--budget", "0.1", "--steps", "0"][..], "steps 0"),
    ] {
        let mut full = vec!["search", "--model", run_arg, "--out", "unused.json"];
        full.extend_from_slice(args);
        let out = tokenfold(dir.path(), &full);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(needle) && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
    }

    // A plan that does not fit the model names the stage and the field.
    let bad = dir.path().join("bad-plan.json");
    std::fs::write(
        &bad,
        r#"{"stages":[{"layer":9,"method":"fastv","keep":0.5}]}"#,
    )
    .unwrap();
    let out = tokenfold(
        dir.path(),
        &[
            "fold",
            "eval",
            "--model",
            run_arg,
            "--plan",
            bad.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("bad-plan.json") && stderr.contains("layer 9 is out of range"),
        "{stderr}"
    );

    // Training into a finished run without --resume is refused with advice.
    let out = tokenfold(
        dir.path(),
        &[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--out",
            run_arg,
            "--quiet",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--resume"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn model_commands_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).unwrap();
    let missing = dir.path().join("no-run");
    let out = tokenfold(dir.path(), &["eval", "--model", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("has no trained model"),
        "{}",
        text(&out.stderr)
    );

    let config = dir.path().join("bad.toml");
    std::fs::write(&config, TINY_RUN.replace("lr = 3e-3", "lr = -1")).unwrap();
    let out = tokenfold(
        dir.path(),
        &[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--out",
            "unused",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("train.lr"),
        "{stderr}"
    );

    let out = tokenfold(
        dir.path(),
        &[
            "ask",
            "--model",
            missing.to_str().unwrap(),
            "--image",
            "nope.png",
            "what is this?",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(!text(&out.stderr).contains("panicked"));
}

#[test]
fn sweep_records_runs_in_shards_and_fit_reports_on_them() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).unwrap();
    let base = dir.path().join("tiny.toml");
    std::fs::write(&base, TINY_RUN).unwrap();
    let grid = dir.path().join("grid.toml");
    let widths: String = [(16, 2), (24, 2), (32, 2)]
        .iter()
        .map(|(d, heads)| {
            format!("[[width]]\nname = \"d{d}\"\nd_model = {d}\nn_layers = 2\nn_heads = {heads}\nd_ff = {}\n", 2 * d)
        })
        .collect();
    std::fs::write(
        &grid,
        format!(
            "name = \"tiny\"\nbase = \"{}\"\narchitectures = [\"early\", \"late\", \"moe\"]\nsteps = [2, 4]\neval_samples = 3\n{widths}\n[moe]\nexperts = 2\n",
            base.display()
        ),
    )
    .unwrap();
    let (grid_arg, out) = (grid.to_str().unwrap(), dir.path().join("study"));
    let out_arg = out.to_str().unwrap();
    let records = out.join("runs.jsonl");
    let count = || std::fs::read_to_string(&records).map_or(0, |t| t.lines().count());

    // Two shards share the grid's 18 runs; a rerun skips everything recorded.
    for (shard, expected) in [("0/2", 9), ("1/2", 18)] {
        let out = tokenfold(
            dir.path(),
            &[
                "sweep", "run", grid_arg, "--out", out_arg, "--shard", shard, "--quiet",
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(count(), expected);
    }
    let again = tokenfold(
        dir.path(),
        &["sweep", "run", grid_arg, "--out", out_arg, "--quiet"],
    );
    assert!(
        text(&again.stderr).contains("trained 0, skipped 18"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(count(), 18);
    let listed =
        text(&tokenfold(dir.path(), &["sweep", "list", grid_arg, "--out", out_arg]).stdout);
    assert_eq!(listed.matches("| recorded |").count(), 18, "{listed}");

    let runs: Vec<serde_json::Value> = std::fs::read_to_string(&records)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for run in &runs {
        let (n, d) = (
            run["params"].as_f64().unwrap(),
            run["tokens"].as_f64().unwrap(),
        );
        let by = &run["tokens_by_modality"];
        let image = by["image"].as_f64().unwrap();
        assert_eq!(image + by["text"].as_f64().unwrap(), d);
        let flops = match run["architecture"].as_str().unwrap() {
            "early" => 6.0 * n * d,
            "late" => 6.0 * (run["vision_params"].as_f64().unwrap() * image + n * d),
            _ => {
                // Two experts, top-1: about half the FFN parameters are active.
                let active = run["active_params"].as_f64().unwrap();
                let layers = run["specialisation"].as_array().unwrap().len();
                assert!(active < n && layers == 2, "{run}");
                6.0 * active * d
            }
        };
        assert_eq!(run["flops"].as_f64().unwrap(), flops);
        assert!(run["flops_detailed"].as_f64().unwrap() > 0.0);
        for task in ["count", "caption", "text"] {
            let loss = run["val_loss"][task].as_f64().unwrap();
            assert!(loss.is_finite() && loss > 0.0, "{run}");
        }
    }
    // More steps, more tokens, same parameters.
    let find = |name: &str| runs.iter().find(|r| r["name"] == name).unwrap();
    let (short, long) = (find("early-d16-s2-default"), find("early-d16-s4-default"));
    assert_eq!(short["params"], long["params"]);
    assert!(long["tokens"].as_f64().unwrap() > short["tokens"].as_f64().unwrap());

    let report = dir.path().join("report");
    let out = tokenfold(
        dir.path(),
        &[
            "fit",
            records.to_str().unwrap(),
            "--grid",
            "coarse",
            "--bootstrap",
            "4",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for family in ["early", "late", "moe"] {
        assert!(
            stdout.contains(&format!("## {family} (6 runs fitted")),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains("| closed form |") && stdout.contains("Compression-factor law"),
        "{stdout}"
    );
    assert!(
        stdout.contains("**moe against early**: lower loss in")
            && stdout.contains("| d16/2/default |"),
        "{stdout}"
    );
    let fit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("fit.json")).unwrap()).unwrap();
    assert!(fit["families"][0]["fit"]["law"]["alpha"].is_f64());
    for plot in [
        "loss-vs-flops",
        "iso-flops-early",
        "iso-flops-late",
        "optimal-allocation",
        "moe-specialisation",
    ] {
        assert!(
            report.join(format!("{plot}.svg")).is_file()
                && report.join(format!("{plot}.png")).is_file()
        );
    }

    let slurm = text(
        &tokenfold(
            dir.path(),
            &[
                "sweep", "slurm", grid_arg, "--out", out_arg, "--shards", "3",
            ],
        )
        .stdout,
    );
    assert!(
        slurm.contains("#SBATCH --array=0-2")
            && slurm.contains("--shard \"${SLURM_ARRAY_TASK_ID}/3\""),
        "{slurm}"
    );

    // Bad input names what is wrong.
    let err = text(
        &tokenfold(
            dir.path(),
            &["sweep", "run", grid_arg, "--out", out_arg, "--shard", "2/2"],
        )
        .stderr,
    );
    assert!(err.contains("--shard `2/2`"), "{err}");
    std::fs::write(
        &grid,
        format!(
            "name = \"x\"\nbase = \"{}\"\narchitectures = [\"hybrid\"]\nsteps = [2]\n{widths}",
            base.display()
        ),
    )
    .unwrap();
    let err = text(&tokenfold(dir.path(), &["sweep", "list", grid_arg]).stderr);
    assert!(
        err.contains("grid.toml") && err.contains("`hybrid` is unknown"),
        "{err}"
    );
    let err = text(
        &tokenfold(
            dir.path(),
            &["fit", records.to_str().unwrap(), "--target", "speech"],
        )
        .stderr,
    );
    assert!(err.contains("has no validation loss `speech`"), "{err}");
    let csv = dir.path().join("runs.csv");
    std::fs::write(&csv, "n,d,loss\n1e6,1e8,3.2\n2e6,oops,3.1\n").unwrap();
    let err = text(&tokenfold(dir.path(), &["fit", csv.to_str().unwrap()]).stderr);
    assert!(
        err.contains("runs.csv: line 3: d `oops` is not a number"),
        "{err}"
    );
}
