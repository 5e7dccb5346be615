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
    let out = tokenfold(dir.path(), &["demo", "--out", results.to_str().unwrap()]);
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
