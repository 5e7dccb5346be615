//! Integration tests on the real datasets that `scripts/fetch-data.sh` installs (the README's test command
//! fetches them first). They pin what the data layer promises about the real data: the counts, the
//! vocabulary, and the bytes of the evaluation sets on any machine.

use std::path::PathBuf;

use tokenfold_data::evalset::digest;
use tokenfold_data::store::{load_assets, stats};
use tokenfold_data::{DataPaths, EvalSpec, SceneConfig, Split, TextTokenizer};

fn paths() -> DataPaths {
    let root = std::env::var_os("TOKENFOLD_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data"));
    let paths = DataPaths::resolve(Some(&root));
    if let Err(error) = paths.check() {
        panic!("these tests read the real data: {error}");
    }
    paths
}

#[test]
fn real_data_has_the_documented_counts() {
    let s = stats(&paths()).unwrap();
    assert_eq!(
        (s.emoji, s.emoji_with_label, s.emoji_images_present),
        (1911, 1911, 1911)
    );
    assert_eq!(s.digits, 10_000);
    assert_eq!(
        s.digits_per_class,
        [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    );
    assert_eq!((s.speeches, s.speech_bytes), (233, 10_761_413));
    assert_eq!((s.first_year, s.last_year), (1790, 2021));
    assert_eq!(s.vocabulary, 196);
    assert_eq!(s.kinds.len(), 12);
}

#[test]
fn real_vocabulary_labels_are_distinct_and_tokenize_round_trip() {
    let assets = load_assets(&paths(), SceneConfig::default()).unwrap();
    let labels: std::collections::HashSet<&str> = assets
        .vocab
        .objects
        .iter()
        .map(|o| o.label.as_str())
        .collect();
    assert_eq!(labels.len(), assets.vocab.len());
    let texts = assets.task_texts();
    let corpus = assets
        .speeches
        .split(Split::Train)
        .map(|s| s.text.as_str())
        .chain(texts.iter().map(String::as_str));
    let tokenizer = TextTokenizer::train(corpus, 2048).unwrap();
    for text in &texts {
        let answer = format!(" {text}");
        assert_eq!(
            &tokenizer.decode(&tokenizer.encode(text).unwrap()).unwrap(),
            text
        );
        assert_eq!(
            tokenizer
                .decode(&tokenizer.encode(&answer).unwrap())
                .unwrap(),
            answer
        );
    }
    let held_out = tokenizer
        .bytes_per_token(assets.speeches.split(Split::Test).map(|s| s.text.as_str()))
        .unwrap();
    assert!(
        (3.0..5.0).contains(&held_out),
        "bytes per token on held-out speeches: {held_out}"
    );
}

/// Digests of the first 50 samples of version-1 evaluation sets on the real data: the same bytes on every
/// machine. A change here means generation changed: bump `EVAL_VERSION` and update these.
#[test]
fn real_eval_sets_are_the_same_bytes_everywhere() {
    let assets = load_assets(&paths(), SceneConfig::default()).unwrap();
    let pinned = [
        (
            "exist-adversarial/test",
            "95c5278b150ace2d6a7b3a25c6270b602cfc4ad12b161223c6e96679104a8598",
        ),
        (
            "count/test",
            "d751494c4772dadae144b3e76ce8f9447547780a636438fa6c50c4ba3a33f9f4",
        ),
        (
            "read/test",
            "b053d3b640fe0d8992e10506377ec36755bd5a8e2073cda71a3ceff27b178ec6",
        ),
        (
            "caption/val",
            "c7f6dd19d911530f5ee9498409837f9d7a9e3d67c3e37b718b48238066de5602",
        ),
        (
            "text/test",
            "c03e813591f69991e42bdb65101a37739063423b86620170c03eca5a2eaba12b",
        ),
    ];
    let mut actual = Vec::new();
    for (name, _) in pinned {
        let spec: EvalSpec = name.parse().unwrap();
        actual.push((name, digest(&spec.build(&assets, 50))));
    }
    let expected: Vec<(&str, String)> = pinned.iter().map(|(n, d)| (*n, d.to_string())).collect();
    assert_eq!(actual, expected);
}
