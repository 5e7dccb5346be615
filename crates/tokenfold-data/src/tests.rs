//! Unit tests on the generated fixture (`fixture.rs`): parsing, the label join, the vocabulary rule,
//! answers checked against the scenes that produced them, held-out compositions, determinism, the
//! tokenizer round trip, sequence masks, the loader, and clear errors for bad input.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::emoji::{EmojiSet, join_key};
use crate::error::DataError;
use crate::evalset::{EvalSpec, digest};
use crate::fixture::{DIGITS_PER_CLASS, SPEECHES, write_digit_merging_tokenizer, write_fixture};
use crate::loader::{Loader, Mixture, StreamConfig, training_batch};
use crate::scene::{SceneConfig, cell_name};
use crate::sequence::{Batch, SequenceConfig, encode, patchify};
use crate::store::{DataPaths, load_assets, stats};
use crate::tasks::{
    Assets, Negatives, POPULAR_POOL, Sample, Split, Task, composition_split, sample_rng,
};
use crate::tokenizer::{SPECIAL_TOKENS, TextTokenizer};
use crate::vocab::Vocabulary;

struct Fixture {
    _dir: tempfile::TempDir,
    paths: DataPaths,
    assets: Arc<Assets>,
    tokenizer: Arc<TextTokenizer>,
}

/// One fixture for the whole test binary: building it (and training a tokenizer) is the slow part.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary folder");
        let paths = write_fixture(dir.path()).expect("fixture written");
        let assets = load_assets(&paths, SceneConfig::default()).expect("fixture assets load");
        let texts = assets.task_texts();
        let corpus = assets
            .speeches
            .speeches
            .iter()
            .map(|s| s.text.as_str())
            .chain(texts.iter().map(String::as_str));
        let tokenizer = TextTokenizer::train(corpus, 400).expect("tokenizer trains");
        Fixture {
            _dir: dir,
            paths,
            assets: Arc::new(assets),
            tokenizer: Arc::new(tokenizer),
        }
    })
}

fn copy_fixture() -> (tempfile::TempDir, DataPaths) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let paths = write_fixture(dir.path()).expect("fixture written");
    (dir, paths)
}

fn label(assets: &Assets, object: usize) -> &str {
    &assets.vocab.objects[object].label
}

// ---------------------------------------------------------------- parsing and the label join

#[test]
fn join_key_ignores_variation_selectors_and_case() {
    assert_eq!(join_key("00a9-fe0f"), "00A9");
    assert_eq!(join_key("1F3F3-FE0F-200D-1F308"), "1F3F3-200D-1F308");
    assert_eq!(join_key("1F98A"), "1F98A");
}

#[test]
fn emoji_set_joins_labels_and_skips_emoji_without_an_image_in_the_style() {
    let f = fixture();
    let set = EmojiSet::load(&f.paths.emoji_datasource(), &f.paths.emojibase()).unwrap();
    assert_eq!(set.style, "fixture");
    // 63 vocabulary-like records + 5 edge cases; the record with has_img_fixture = false is skipped.
    assert_eq!(set.emoji.len(), 68);
    assert!(set.emoji.iter().all(|e| e.unified != "1F305"));
    // Every record but one has an emojibase label, including those written with -FE0F there.
    assert_eq!(set.labelled().count(), 67);
    let unlabelled: Vec<_> = set
        .emoji
        .iter()
        .filter(|e| e.label.is_none())
        .map(|e| e.unified.as_str())
        .collect();
    assert_eq!(unlabelled, ["1F304"]);
    let first = &set.emoji[0];
    assert_eq!(first.label.as_deref(), Some("red ant0"));
    assert_eq!(first.name, "red ant0");
    assert_eq!(first.tags, ["fixture", "animal-mammal"]);
    assert_eq!(set.load_image(first).unwrap().dimensions(), (64, 64));
}

#[test]
fn stats_count_what_is_installed() {
    let f = fixture();
    let s = stats(&f.paths).unwrap();
    assert_eq!(
        (s.emoji, s.emoji_with_label, s.emoji_images_present),
        (68, 67, 68)
    );
    assert_eq!(s.digits, 10 * DIGITS_PER_CLASS);
    assert_eq!(s.digits_per_class, [DIGITS_PER_CLASS; 10]);
    assert_eq!(s.speeches, SPEECHES);
    let bytes: usize = f
        .assets
        .speeches
        .speeches
        .iter()
        .map(|sp| sp.text.len())
        .sum();
    assert_eq!(s.speech_bytes, bytes);
    assert_eq!(
        (s.first_year, s.last_year),
        (1790, 1790 + SPEECHES as u32 - 1)
    );
}

#[test]
fn digits_parse_and_split_holds_out_every_tenth_image() {
    let digits = &fixture().assets.digits;
    assert_eq!(digits.len(), 10 * DIGITS_PER_CLASS);
    assert_eq!(digits.split_indices(3, Split::Val), [4]);
    assert_eq!(digits.split_indices(3, Split::Test), [9]);
    assert_eq!(
        digits.split_indices(3, Split::Train).len(),
        DIGITS_PER_CLASS - 2
    );
    // The fixture's 0.9 ink maps to round(0.9 × 255), its background to 0.
    let ink = (0.9f32 * 255.0).round() as u8;
    let image = &digits.by_digit[2][0];
    assert!(image.iter().all(|&v| v == 0 || v == ink));
    assert!(image.contains(&ink));
}

#[test]
fn speeches_parse_years_and_speakers_and_hold_out_a_split() {
    let speeches = &fixture().assets.speeches;
    assert_eq!(speeches.speeches[0].year, 1790);
    assert_eq!(speeches.speeches[0].speaker, "george_washington");
    let test: Vec<u32> = speeches.split(Split::Test).map(|s| s.year).collect();
    let val: Vec<u32> = speeches.split(Split::Val).map(|s| s.year).collect();
    assert_eq!(test, [1790 + 15]);
    assert_eq!(val, [1790 + 7]);
    assert_eq!(speeches.split(Split::Train).count(), SPEECHES - 2);
}

// ---------------------------------------------------------------- the vocabulary rule

#[test]
fn vocabulary_rule_rejects_faces_repeated_heads_non_ascii_and_other_subcategories() {
    let vocab = &fixture().assets.vocab;
    assert_eq!(vocab.len(), 63);
    let labels: HashSet<&str> = vocab.objects.iter().map(|o| o.label.as_str()).collect();
    for rejected in ["cat face", "guide ant0", "woman\u{2019}s hat", "flag"] {
        assert!(
            !labels.contains(rejected),
            "{rejected} must not be in the vocabulary"
        );
    }
    assert_eq!(vocab.kinds().len(), 12);
    let ranks: HashSet<usize> = vocab.objects.iter().map(|o| o.popularity_rank).collect();
    assert_eq!(
        ranks.len(),
        vocab.len(),
        "popularity ranks are a permutation"
    );
    let most_popular = vocab.by_popularity[0];
    assert_eq!(vocab.weights[most_popular], 1_000_000);
    assert!(
        vocab
            .weights
            .iter()
            .all(|&w| (1_000_000 / 8..=1_000_000).contains(&w))
    );
}

#[test]
fn vocabulary_caps_each_subcategory() {
    let f = fixture();
    let set = EmojiSet::load(&f.paths.emoji_datasource(), &f.paths.emojibase()).unwrap();
    let vocab = Vocabulary::select(&set.emoji, 2).unwrap();
    assert_eq!(vocab.len(), 21 * 2);
    let too_few = Vocabulary::select(&set.emoji[..3], 10).unwrap_err();
    assert!(too_few.to_string().contains("only 3 emoji"), "{too_few}");
}

// ---------------------------------------------------------------- errors name what is wrong

#[test]
fn missing_data_folder_says_how_to_fetch() {
    let paths = DataPaths::resolve(Some(Path::new("/nonexistent/tokenfold-data")));
    let error = stats(&paths).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, DataError::MissingData { .. }));
    assert!(message.contains("/nonexistent/tokenfold-data"), "{message}");
    assert!(message.contains("scripts/fetch-data.sh"), "{message}");
}

#[test]
fn missing_package_names_the_package() {
    let (_dir, paths) = copy_fixture();
    std::fs::remove_dir_all(paths.mnist()).unwrap();
    let message = stats(&paths).unwrap_err().to_string();
    assert!(message.contains("mnist/ package folder"), "{message}");
}

#[test]
fn missing_png_names_the_file() {
    let (_dir, paths) = copy_fixture();
    let image = paths.emoji_datasource().join("img/fixture/64/1f000.png");
    std::fs::remove_file(&image).unwrap();
    let error = load_assets(&paths, SceneConfig::default()).unwrap_err();
    assert!(matches!(error, DataError::Io { .. }), "{error:?}");
    assert!(error.to_string().contains("1f000.png"), "{error}");
}

#[test]
fn corrupt_png_names_the_file() {
    let (_dir, paths) = copy_fixture();
    let image = paths.emoji_datasource().join("img/fixture/64/1f001.png");
    std::fs::write(&image, b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
    let error = load_assets(&paths, SceneConfig::default()).unwrap_err();
    assert!(matches!(error, DataError::Image { .. }), "{error:?}");
    assert!(error.to_string().contains("1f001.png"), "{error}");
}

#[test]
fn malformed_json_record_names_file_index_and_field() {
    let (_dir, paths) = copy_fixture();
    let file = paths.emoji_datasource().join("emoji.json");
    let mut records: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    records[4].as_object_mut().unwrap().remove("category");
    std::fs::write(&file, serde_json::to_vec(&records).unwrap()).unwrap();
    let message = stats(&paths).unwrap_err().to_string();
    assert!(message.contains("emoji.json: record 4"), "{message}");
    assert!(message.contains("category"), "{message}");
}

#[test]
fn json_syntax_error_names_the_file() {
    let (_dir, paths) = copy_fixture();
    let file = paths.emojibase().join("en/data.json");
    std::fs::write(&file, b"[{\"label\": \"fox\",").unwrap();
    let error = stats(&paths).unwrap_err();
    assert!(matches!(error, DataError::Json { .. }), "{error:?}");
    assert!(
        error.to_string().contains("data.json: malformed JSON"),
        "{error}"
    );
}

#[test]
fn malformed_digit_file_names_the_problem() {
    let (_dir, paths) = copy_fixture();
    let file = paths.mnist().join("src/digits/7.json");
    std::fs::write(&file, br#"{"data": [0.0, 0.5, 1.0]}"#).unwrap();
    let message = stats(&paths).unwrap_err().to_string();
    assert!(
        message.contains("7.json") && message.contains("has 3 values"),
        "{message}"
    );
    let out_of_range: Vec<f32> = (0..784).map(|i| if i == 10 { 2.5 } else { 0.0 }).collect();
    std::fs::write(
        &file,
        serde_json::to_vec(&serde_json::json!({"data": out_of_range})).unwrap(),
    )
    .unwrap();
    let message = stats(&paths).unwrap_err().to_string();
    assert!(message.contains("intensity 2.5"), "{message}");
}

#[test]
fn invalid_scene_config_names_the_field() {
    let cfg = SceneConfig {
        min_size: 30,
        max_size: 20,
        ..SceneConfig::default()
    };
    let message = cfg.validate().unwrap_err().to_string();
    assert!(message.contains("scene.min_size/max_size"), "{message}");
    let cfg = SceneConfig {
        max_objects: 3,
        ..SceneConfig::default()
    };
    assert!(
        cfg.validate()
            .unwrap_err()
            .to_string()
            .contains("max_objects")
    );
}

#[test]
fn parse_errors_list_the_valid_values() {
    let message = "counting".parse::<Task>().unwrap_err().to_string();
    assert!(
        message.contains("unknown task 'counting'") && message.contains("exist, count"),
        "{message}"
    );
    assert!("dev".parse::<Split>().is_err());
    assert!("exist-popular/train".parse::<EvalSpec>().is_err());
    assert!("count-random/test".parse::<EvalSpec>().is_err());
    let spec: EvalSpec = "exist/val".parse().unwrap();
    assert_eq!(spec.negatives, Some(Negatives::Random));
    assert_eq!(
        "exist-adversarial/test"
            .parse::<EvalSpec>()
            .unwrap()
            .to_string(),
        "exist-adversarial/test"
    );
}

// ---------------------------------------------------------------- answers agree with the scenes

fn samples(task: Task, split: Split, negatives: Option<Negatives>, n: u64) -> Vec<Sample> {
    let assets = &fixture().assets;
    (0..n)
        .map(|i| assets.sample(task, split, negatives, &mut sample_rng(11, task as u64, i)))
        .collect()
}

#[test]
fn exist_answers_yes_exactly_when_the_object_is_in_the_scene() {
    let assets = &fixture().assets;
    let mut yes = 0;
    for sample in samples(Task::Exist, Split::Train, None, 300) {
        let scene = sample.scene.as_ref().unwrap();
        let asked = sample
            .question
            .strip_prefix("is there a ")
            .unwrap()
            .strip_suffix('?')
            .unwrap();
        let present = scene
            .objects
            .iter()
            .any(|p| label(assets, p.object) == asked);
        assert_eq!(
            sample.answer,
            if present { "yes" } else { "no" },
            "{}",
            sample.question
        );
        yes += present as usize;
    }
    assert!(
        (120..=180).contains(&yes),
        "answers are balanced: {yes} yes of 300"
    );
}

#[test]
fn popular_and_adversarial_negatives_follow_their_rule() {
    let assets = &fixture().assets;
    let popular: HashSet<&str> = assets.vocab.by_popularity[..POPULAR_POOL]
        .iter()
        .map(|&o| label(assets, o))
        .collect();
    for negatives in [Negatives::Popular, Negatives::Adversarial] {
        let mut checked = 0;
        for sample in samples(Task::Exist, Split::Test, Some(negatives), 200)
            .iter()
            .filter(|s| s.answer == "no")
        {
            let asked = sample
                .question
                .strip_prefix("is there a ")
                .unwrap()
                .strip_suffix('?')
                .unwrap();
            let asked = assets
                .vocab
                .objects
                .iter()
                .find(|o| o.label == asked)
                .unwrap();
            let scene = sample.scene.as_ref().unwrap();
            match negatives {
                Negatives::Popular => {
                    assert!(popular.contains(asked.label.as_str()), "{}", asked.label)
                }
                _ => assert!(
                    scene
                        .objects
                        .iter()
                        .any(|p| assets.vocab.objects[p.object].kind == asked.kind),
                    "{} shares a kind with an object in the scene",
                    asked.label
                ),
            }
            checked += 1;
        }
        assert!(checked > 50);
    }
}

#[test]
fn count_answers_count_the_matching_objects() {
    let assets = &fixture().assets;
    let mut answers = HashSet::new();
    for sample in samples(Task::Count, Split::Train, None, 300) {
        let scene = sample.scene.as_ref().unwrap();
        let expected = if let Some(kind) = sample
            .question
            .strip_prefix("how many ")
            .and_then(|q| q.strip_suffix(" are there?"))
        {
            scene
                .objects
                .iter()
                .filter(|p| assets.vocab.objects[p.object].kind == kind)
                .count()
        } else {
            let asked = sample
                .question
                .strip_prefix("how many times does the ")
                .unwrap()
                .strip_suffix(" appear?")
                .unwrap();
            scene
                .objects
                .iter()
                .filter(|p| label(assets, p.object) == asked)
                .count()
        };
        assert_eq!(sample.answer, expected.to_string(), "{}", sample.question);
        assert!(!scene.objects.is_empty());
        answers.insert(expected);
    }
    assert_eq!(answers, (0..=4).collect());
}

#[test]
fn locate_answers_the_cell_of_the_unique_object() {
    let assets = &fixture().assets;
    for sample in samples(Task::Locate, Split::Train, None, 200) {
        let scene = sample.scene.as_ref().unwrap();
        let asked = sample
            .question
            .strip_prefix("where is the ")
            .unwrap()
            .strip_suffix('?')
            .unwrap();
        let matches: Vec<_> = scene
            .objects
            .iter()
            .filter(|p| label(assets, p.object) == asked)
            .collect();
        assert_eq!(matches.len(), 1);
        assert_eq!(sample.answer, cell_name(3, matches[0].cell));
    }
}

#[test]
fn relation_answers_the_only_object_left_of_or_above_the_target() {
    let assets = &fixture().assets;
    for sample in samples(Task::Relation, Split::Train, None, 200) {
        let scene = sample.scene.as_ref().unwrap();
        let (left, asked) = match sample.question.strip_prefix("what is left of the ") {
            Some(rest) => (true, rest),
            None => (
                false,
                sample.question.strip_prefix("what is above the ").unwrap(),
            ),
        };
        let asked = asked.strip_suffix('?').unwrap();
        let target = scene
            .objects
            .iter()
            .find(|p| label(assets, p.object) == asked)
            .unwrap();
        let (row, col) = (target.cell / 3, target.cell % 3);
        let candidates: Vec<&str> = scene
            .objects
            .iter()
            .filter(|p| {
                if left {
                    p.cell / 3 == row && p.cell % 3 < col
                } else {
                    p.cell % 3 == col && p.cell / 3 < row
                }
            })
            .map(|p| label(assets, p.object))
            .collect();
        assert_eq!(candidates, [sample.answer.as_str()], "{}", sample.question);
    }
}

#[test]
fn read_answers_the_number_on_the_plate_with_held_out_handwriting() {
    for split in [Split::Train, Split::Test] {
        for sample in samples(Task::Read, split, None, 100) {
            let plate = sample.scene.as_ref().unwrap().number.as_ref().unwrap();
            assert_eq!(sample.answer, plate.text());
            assert!((2..=3).contains(&sample.answer.len()));
            for &(_, index) in &plate.digits {
                assert_eq!(crate::digits::split_of_index(index), split);
            }
        }
    }
}

#[test]
fn caption_answers_the_label_of_the_one_object() {
    let assets = &fixture().assets;
    for sample in samples(Task::Caption, Split::Train, None, 100) {
        let scene = sample.scene.as_ref().unwrap();
        assert_eq!(scene.objects.len(), 1);
        assert_eq!(sample.answer, label(assets, scene.objects[0].object));
        let size = scene.objects[0].size;
        assert!((20..=32).contains(&size));
    }
}

#[test]
fn describe_names_every_object_with_its_cell_in_reading_order() {
    let assets = &fixture().assets;
    for sample in samples(Task::Describe, Split::Train, None, 100) {
        let scene = sample.scene.as_ref().unwrap();
        assert_eq!(sample.question, crate::tasks::DESCRIBE_QUESTION);
        let mut objects = scene.objects.clone();
        objects.sort_by_key(|p| p.cell);
        let expected: Vec<String> = objects
            .iter()
            .map(|p| {
                format!(
                    "{} {}",
                    crate::scene::cell_name(3, p.cell),
                    label(assets, p.object)
                )
            })
            .collect();
        assert_eq!(sample.answer, expected.join(", "));
        assert!((1..=6).contains(&objects.len()));
    }
    assert_eq!("describe".parse::<Task>().unwrap(), Task::Describe);
    assert!(!Task::ALL.contains(&Task::Describe), "not a benchmark task");
}

#[test]
fn text_passages_start_at_a_word_of_a_speech_of_the_split_even_near_multibyte_characters() {
    let speeches = &fixture().assets.speeches;
    let test_text = &speeches.split(Split::Test).next().unwrap().text;
    for sample in samples(Task::Text, Split::Test, None, 300) {
        assert!(sample.image.is_none() && sample.question.is_empty());
        assert!(
            test_text.contains(&sample.answer),
            "passage comes from the test speech"
        );
        assert!(!sample.answer.starts_with(' '));
    }
}

#[test]
fn scenes_of_each_split_have_compositions_of_that_split_only() {
    for task in [Task::Exist, Task::Count, Task::Locate, Task::Relation] {
        for split in [Split::Train, Split::Val, Split::Test] {
            for sample in samples(task, split, None, 40) {
                let scene = sample.scene.unwrap();
                let mut key: Vec<u64> = scene
                    .objects
                    .iter()
                    .map(|p| ((p.object as u64) << 8) | p.cell as u64)
                    .collect();
                key.sort_unstable();
                key.insert(0, task as u64);
                assert_eq!(composition_split(&key), split, "{task} {split}");
            }
        }
    }
    let train_numbers: HashSet<String> = samples(Task::Read, Split::Train, None, 400)
        .into_iter()
        .map(|s| s.answer)
        .collect();
    for sample in samples(Task::Read, Split::Test, None, 100) {
        assert!(
            !train_numbers.contains(&sample.answer),
            "test number {} seen in training",
            sample.answer
        );
    }
}

#[test]
fn objects_are_drawn_where_the_scene_says() {
    let assets = &fixture().assets;
    let sample = &samples(Task::Caption, Split::Train, None, 1)[0];
    let placed = sample.scene.as_ref().unwrap().objects[0];
    let image = sample.image.as_ref().unwrap();
    // The sprite is opaque at its centre: the centre pixel is the sprite's colour, not the background's.
    let sprite = crate::fixture::emoji_image(assets.vocab.objects[placed.object].emoji_index);
    let centre = image
        .get_pixel(placed.x + placed.size / 2, placed.y + placed.size / 2)
        .0;
    let sprite_centre = sprite.get_pixel(32, 32).0;
    let close = (0..3).all(|c| (centre[c] as i32 - sprite_centre[c] as i32).abs() <= 48);
    assert!(close, "centre {centre:?} vs sprite {sprite_centre:?}");
}

// ---------------------------------------------------------------- determinism of the eval sets

#[test]
fn eval_sets_are_deterministic_and_distinct() {
    let assets = &fixture().assets;
    let mut digests = HashSet::new();
    for spec in EvalSpec::all(Split::Test)
        .into_iter()
        .chain(EvalSpec::all(Split::Val))
    {
        let first = digest(&spec.build(assets, 12));
        assert_eq!(first, digest(&spec.build(assets, 12)), "{spec}");
        assert!(digests.insert(first), "{spec} repeats another set");
    }
}

/// The bytes of version 1 of an evaluation set on the fixture. If this changes, generation changed:
/// bump `EVAL_VERSION` and record the new digest.
#[test]
fn eval_set_digest_is_pinned() {
    let assets = &fixture().assets;
    let spec: EvalSpec = "relation/test".parse().unwrap();
    assert_eq!(digest(&spec.build(assets, 20)), PINNED_RELATION_TEST_DIGEST);
}

const PINNED_RELATION_TEST_DIGEST: &str =
    "16c8de300b5fdbf15ecfaba37990a55a8ab8787100cffe2ed9d406a1b0b26fac";

// ---------------------------------------------------------------- tokenizer

#[test]
fn tokenizer_round_trips_every_task_text_and_caption() {
    let f = fixture();
    for text in f.assets.task_texts() {
        let ids = f.tokenizer.encode(&text).unwrap();
        assert_eq!(f.tokenizer.decode(&ids).unwrap(), text);
        let answer = format!(" {text}");
        assert_eq!(
            f.tokenizer
                .decode(&f.tokenizer.encode(&answer).unwrap())
                .unwrap(),
            answer
        );
    }
    let unicode = "Madam Vice President\u{2014}(applause)\u{2014}caf\u{e9} \u{1F98A}";
    assert_eq!(
        f.tokenizer
            .decode(&f.tokenizer.encode(unicode).unwrap())
            .unwrap(),
        unicode
    );
}

#[test]
fn tokenizer_special_tokens_have_fixed_ids_and_survive_save_and_load() {
    let f = fixture();
    let ids: Vec<u32> = SPECIAL_TOKENS
        .iter()
        .map(|t| f.tokenizer.inner.token_to_id(t).unwrap())
        .collect();
    assert_eq!(ids, (0..7).collect::<Vec<u32>>());
    assert_eq!(f.tokenizer.vocab_size(), 400);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    f.tokenizer.save(&path).unwrap();
    let loaded = TextTokenizer::load(&path).unwrap();
    assert_eq!(loaded.special, f.tokenizer.special);
    let text = "how many times does the red ant0 appear?";
    assert_eq!(
        loaded.encode(text).unwrap(),
        f.tokenizer.encode(text).unwrap()
    );
    assert!(
        f.tokenizer
            .bytes_per_token(["the state of the union is strong"].into_iter())
            .unwrap()
            > 1.0
    );
}

#[test]
fn tokenizer_gives_every_digit_a_token_of_its_own() {
    // Numbers repeated often enough that BPE would merge them if digits were not split first.
    let corpus: Vec<String> = (0..200)
        .map(|i| format!("what number is written? 47 123 1000 {}", i % 10 * 111))
        .collect();
    let tokenizer = TextTokenizer::train(corpus.iter().map(String::as_str), 400).unwrap();
    for number in ["47", "123", "1000", "908", " 2026"] {
        let ids = tokenizer.encode(number).unwrap();
        let digits = number.trim().len();
        assert_eq!(
            ids.len() - (number.len() - digits),
            digits,
            "{number}: {ids:?}"
        );
        assert_eq!(tokenizer.decode(&ids).unwrap(), number);
    }
    assert!(tokenizer.splits_digits().unwrap());

    // A tokenizer of the older kind: byte-level pre-tokenization only, and a merge of "4" and "7".
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    write_digit_merging_tokenizer(&tokenizer, &path).unwrap();
    let merging = TextTokenizer::load(&path).unwrap();
    assert_eq!(merging.encode("47").unwrap().len(), 1);
    assert!(!merging.splits_digits().unwrap());
}

#[test]
fn tokenizer_errors_are_clear() {
    let message = TextTokenizer::train(["a b c"].into_iter(), 100)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("vocab_size") && message.contains("100"),
        "{message}"
    );
    let message = TextTokenizer::load(Path::new("/nonexistent/tokenizer.json"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("tokenfold data tokenizer"), "{message}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, b"{\"not\": \"a tokenizer\"}").unwrap();
    let message = TextTokenizer::load(&path).unwrap_err().to_string();
    assert!(message.contains("tokenizer.json"), "{message}");
}

// ---------------------------------------------------------------- sequences and batches

#[test]
fn image_sequence_masks_exactly_the_answer_and_eos() {
    let f = fixture();
    let cfg = SequenceConfig::default();
    let sample = &samples(Task::Locate, Split::Train, None, 1)[0];
    let encoded = encode(sample, &f.tokenizer, &cfg).unwrap();
    let special = f.tokenizer.special;
    assert_eq!(&encoded.tokens[..2], [special.bos, special.image_start]);
    assert_eq!(encoded.image_start, Some(2));
    assert!(
        encoded.tokens[2..2 + 256]
            .iter()
            .all(|&t| t == special.patch)
    );
    assert_eq!(encoded.tokens[2 + 256], special.image_end);
    let question = f.tokenizer.encode(&sample.question).unwrap();
    let answer = f.tokenizer.encode(&format!(" {}", sample.answer)).unwrap();
    assert_eq!(encoded.prompt_len, 3 + 256 + question.len());
    assert_eq!(encoded.tokens.len(), encoded.prompt_len + answer.len() + 1);
    assert_eq!(
        &encoded.tokens[encoded.prompt_len..encoded.tokens.len() - 1],
        answer.as_slice()
    );
    assert_eq!(*encoded.tokens.last().unwrap(), special.eos);
    let masked: Vec<usize> = (0..encoded.tokens.len())
        .filter(|&i| encoded.loss_mask[i] == 1)
        .collect();
    assert_eq!(
        masked,
        (encoded.prompt_len..encoded.tokens.len()).collect::<Vec<_>>()
    );
    assert_eq!(encoded.patches.len(), 256 * 48);
}

#[test]
fn text_sequence_masks_everything_after_bos_and_is_cut_to_length() {
    let f = fixture();
    let cfg = SequenceConfig {
        max_len: 270,
        ..SequenceConfig::default()
    };
    let sample = &samples(Task::Text, Split::Train, None, 1)[0];
    let encoded = encode(sample, &f.tokenizer, &cfg).unwrap();
    assert!(encoded.tokens.len() <= cfg.max_len);
    assert_eq!(encoded.loss_mask[0], 0);
    assert!(encoded.loss_mask[1..].iter().all(|&m| m == 1));
    assert_eq!(*encoded.tokens.last().unwrap(), f.tokenizer.special.eos);
    assert!(encoded.image_start.is_none() && encoded.patches.is_empty());
}

#[test]
fn patches_are_raster_ordered_and_scaled_to_unit_range() {
    let cfg = SequenceConfig {
        image_size: 8,
        patch_size: 4,
        max_len: 64,
        summary_token: false,
    };
    let image = image::RgbImage::from_fn(8, 8, |x, y| {
        image::Rgb([(x * 10) as u8, (y * 10) as u8, 255])
    });
    let patches = patchify(&image, &cfg).unwrap();
    assert_eq!(patches.len(), 4 * 48);
    let value = |v: u8| v as f32 / 127.5 - 1.0;
    // Patch 1 is the top-right one; its element (row 2, column 3, channel 0) is pixel (7, 2).
    let index = 48 + (2 * 4 + 3) * 3;
    assert_eq!(patches[index], value(70));
    assert_eq!(patches[index + 1], value(20));
    assert_eq!(patches[index + 2], 1.0);
    assert_eq!(patches[0], -1.0);
    let wrong = image::RgbImage::new(6, 6);
    assert!(
        patchify(&wrong, &cfg)
            .unwrap_err()
            .to_string()
            .contains("6×6")
    );
}

#[test]
fn batches_are_padded_to_their_longest_sample_with_zero_patches_for_text() {
    let f = fixture();
    let cfg = SequenceConfig::default();
    let mut items = samples(Task::Caption, Split::Train, None, 2);
    items.extend(samples(Task::Text, Split::Train, None, 1));
    let batch = Batch::from_samples(&items, &f.tokenizer, &cfg).unwrap();
    let longest = *batch.lengths.iter().max().unwrap();
    assert_eq!(batch.seq_len, longest);
    assert!(longest <= cfg.max_len);
    assert_eq!(batch.tokens.len(), 3 * longest);
    assert_eq!(batch.loss_mask.len(), 3 * longest);
    assert_eq!(batch.patches.len(), 3 * 256 * 48);
    assert_eq!(batch.image_starts, [Some(2), Some(2), None]);
    for i in 0..3 {
        let row = &batch.tokens[i * longest..(i + 1) * longest];
        assert!(
            row[batch.lengths[i]..]
                .iter()
                .all(|&t| t == f.tokenizer.special.pad)
        );
        let mask = &batch.loss_mask[i * longest..(i + 1) * longest];
        assert!(mask[batch.lengths[i]..].iter().all(|&m| m == 0.0));
    }
    assert!(batch.patches[2 * 256 * 48..].iter().all(|&v| v == 0.0));
    assert_eq!(batch.tasks, [Task::Caption, Task::Caption, Task::Text]);
}

#[test]
fn sequence_too_short_for_the_prompt_is_an_error() {
    let f = fixture();
    let cfg = SequenceConfig {
        max_len: 262,
        ..SequenceConfig::default()
    };
    let sample = &samples(Task::Relation, Split::Train, None, 1)[0];
    let message = encode(sample, &f.tokenizer, &cfg).unwrap_err().to_string();
    assert!(message.contains("sequence.max_len"), "{message}");
    let bad = SequenceConfig {
        patch_size: 5,
        ..SequenceConfig::default()
    };
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("does not divide")
    );
}

// ---------------------------------------------------------------- the training stream

#[test]
fn loader_stream_is_the_same_for_any_worker_count_and_resumes_exactly() {
    let f = fixture();
    let stream = StreamConfig {
        seed: 5,
        batch_size: 3,
        mixture: Mixture::uniform(),
        stages: vec![crate::loader::Stage {
            until_batch: 2,
            mixture: "caption=1".parse().unwrap(),
        }],
        seq: SequenceConfig::default(),
        group_text: false,
        follow_ups: 0,
    };
    let direct: Vec<Batch> = (0..5)
        .map(|i| {
            training_batch(
                &f.assets,
                &f.tokenizer,
                &stream.seq,
                stream.mixture_at(i),
                5,
                3,
                i,
                0,
            )
            .unwrap()
        })
        .collect();
    for workers in [1, 2, 3] {
        let mut loader = Loader::spawn(
            f.assets.clone(),
            f.tokenizer.clone(),
            stream.clone(),
            0,
            workers,
            2,
        )
        .unwrap();
        for (i, expected) in direct.iter().enumerate() {
            assert_eq!(loader.position(), i as u64);
            assert_eq!(
                &loader.next_batch().unwrap(),
                expected,
                "{workers} workers, batch {i}"
            );
        }
    }
    // The curriculum stage holds for batches 0 and 1 only.
    let tasks =
        |batches: &[Batch]| -> Vec<Task> { batches.iter().flat_map(|b| b.tasks.clone()).collect() };
    assert!(tasks(&direct[..2]).iter().all(|&t| t == Task::Caption));
    assert!(tasks(&direct[2..]).iter().any(|&t| t != Task::Caption));
    let mut resumed =
        Loader::spawn(f.assets.clone(), f.tokenizer.clone(), stream, 3, 2, 2).unwrap();
    assert_eq!(resumed.next_batch().unwrap(), direct[3]);
    assert_eq!(resumed.next_batch().unwrap(), direct[4]);
}

#[test]
fn grouped_batches_are_all_text_or_all_images_in_the_mixture_share() {
    let f = fixture();
    let stream = StreamConfig {
        seed: 9,
        batch_size: 4,
        mixture: "caption=1, count=1, text=1".parse().unwrap(),
        stages: Vec::new(),
        seq: SequenceConfig::default(),
        group_text: true,
        follow_ups: 0,
    };
    let batches: Vec<Batch> = (0..60)
        .map(|i| crate::loader::stream_batch(&f.assets, &f.tokenizer, &stream, i).unwrap())
        .collect();
    let text_batches = batches
        .iter()
        .filter(|b| b.tasks.iter().all(|&t| t == Task::Text))
        .count();
    let image_batches = batches
        .iter()
        .filter(|b| b.tasks.iter().all(|&t| t != Task::Text))
        .count();
    assert_eq!(
        text_batches + image_batches,
        60,
        "every batch is homogeneous"
    );
    // A third of the weight is text: 20 of 60 batches expected, binomial sd 3.7.
    assert!(
        (10..=30).contains(&text_batches),
        "{text_batches} text batches"
    );
    // Image batches draw both image tasks; each sample is still a function of (seed, index) alone.
    let image: Mixture = "caption=1, count=1".parse().unwrap();
    let (i, batch) = batches
        .iter()
        .enumerate()
        .find(|(_, b)| b.tasks.iter().all(|&t| t != Task::Text))
        .unwrap();
    for (s, &task) in batch.tasks.iter().enumerate() {
        let index = (i * 4 + s) as u64;
        assert_eq!(
            crate::loader::training_sample(&f.assets, &image, 9, index, 0).task,
            task
        );
    }
    assert!(
        batches
            .iter()
            .flat_map(|b| &b.tasks)
            .any(|&t| t == Task::Count)
    );
    // Without text in the mixture, grouping changes nothing.
    let no_text = StreamConfig {
        mixture: "caption=1, count=1".parse().unwrap(),
        ..stream.clone()
    };
    let plain = StreamConfig {
        group_text: false,
        ..no_text.clone()
    };
    for i in 0..3 {
        assert_eq!(
            crate::loader::stream_batch(&f.assets, &f.tokenizer, &no_text, i).unwrap(),
            crate::loader::stream_batch(&f.assets, &f.tokenizer, &plain, i).unwrap()
        );
    }
}

#[test]
fn follow_ups_ask_correct_distinct_questions_about_training_scenes() {
    let f = fixture();
    let mixture: Mixture = "exist=1, count=1, locate=1, relation=1, caption=1"
        .parse()
        .unwrap();
    let vocab = &f.assets.vocab;
    let grid = f.assets.scene.grid as usize;
    let object = |label: &str| {
        vocab
            .objects
            .iter()
            .position(|o| o.label == label)
            .unwrap_or_else(|| panic!("{label:?} is not a label"))
    };
    let strip = |q: &str, prefix: &str, suffix: &str| -> Option<String> {
        q.strip_prefix(prefix)?
            .strip_suffix(suffix)
            .map(String::from)
    };
    let mut asked = std::collections::BTreeMap::<Task, usize>::new();
    for index in 0..200 {
        let sample = crate::loader::training_sample(&f.assets, &mixture, 4, index, 3);
        // The stream without follow-ups is unchanged: they are drawn after the sample.
        let plain = crate::loader::training_sample(&f.assets, &mixture, 4, index, 0);
        assert_eq!(
            Sample {
                follow_ups: Vec::new(),
                ..sample.clone()
            },
            plain
        );
        assert!(sample.follow_ups.len() <= 3);
        if !crate::tasks::SCENE_TASKS.contains(&sample.task) {
            assert!(sample.follow_ups.is_empty(), "{:?}", sample.task);
            continue;
        }
        let scene = sample.scene.as_ref().unwrap();
        let objects = &scene.objects;
        let copies = |o: usize| objects.iter().filter(|p| p.object == o).count();
        let mut questions = std::collections::HashSet::from([sample.question.clone()]);
        for fu in &sample.follow_ups {
            assert!(
                questions.insert(fu.question.clone()),
                "{:?} twice",
                fu.question
            );
            assert_eq!(
                crate::tasks::composition_split(&crate::tasks::scene_key(fu.task, objects)),
                Split::Train
            );
            *asked.entry(fu.task).or_default() += 1;
            let q = fu.question.as_str();
            let expected = match fu.task {
                Task::Exist => {
                    let label = strip(q, "is there a ", "?").unwrap();
                    if copies(object(&label)) > 0 {
                        "yes"
                    } else {
                        "no"
                    }
                    .to_string()
                }
                Task::Count => {
                    if let Some(label) = strip(q, "how many times does the ", " appear?") {
                        copies(object(&label)).to_string()
                    } else {
                        let kind = strip(q, "how many ", " are there?").unwrap();
                        objects
                            .iter()
                            .filter(|p| vocab.objects[p.object].kind == kind)
                            .count()
                            .to_string()
                    }
                }
                Task::Locate => {
                    let target = object(&strip(q, "where is the ", "?").unwrap());
                    assert_eq!(copies(target), 1);
                    let placed = objects.iter().find(|p| p.object == target).unwrap();
                    crate::scene::cell_name(f.assets.scene.grid, placed.cell)
                }
                Task::Relation => {
                    let (label, left) = match strip(q, "what is left of the ", "?") {
                        Some(label) => (label, true),
                        None => (strip(q, "what is above the ", "?").unwrap(), false),
                    };
                    let target = object(&label);
                    assert_eq!(copies(target), 1);
                    let t = objects.iter().find(|p| p.object == target).unwrap().cell;
                    let before: Vec<_> = objects
                        .iter()
                        .filter(|p| {
                            if left {
                                p.cell / grid == t / grid && p.cell % grid < t % grid
                            } else {
                                p.cell % grid == t % grid && p.cell / grid < t / grid
                            }
                        })
                        .collect();
                    assert_eq!(before.len(), 1, "{q}");
                    vocab.objects[before[0].object].label.clone()
                }
                other => panic!("a follow-up of task {other:?}"),
            };
            assert_eq!(fu.answer, expected, "{q}");
        }
        // Each answer (and its <|eos|>) is a target, each question is not.
        let eos_targets = |encoded: &crate::sequence::Encoded| {
            encoded
                .tokens
                .iter()
                .zip(&encoded.loss_mask)
                .filter(|&(&t, &m)| t == f.tokenizer.special.eos && m == 1)
                .count()
        };
        let roomy = SequenceConfig {
            patch_size: 8,
            max_len: 1024,
            ..SequenceConfig::default()
        };
        let encoded = encode(&sample, &f.tokenizer, &roomy).unwrap();
        assert_eq!(eos_targets(&encoded), 1 + sample.follow_ups.len());
        // Where the sequence is full, the follow-ups that do not fit are left out.
        let tight = SequenceConfig {
            patch_size: 8,
            max_len: encoded.tokens.len() - 1,
            ..SequenceConfig::default()
        };
        if !sample.follow_ups.is_empty() {
            let cut = encode(&sample, &f.tokenizer, &tight).unwrap();
            assert!(cut.tokens.len() <= tight.max_len);
            assert_eq!(eos_targets(&cut), sample.follow_ups.len());
            assert_eq!(cut.tokens[..], encoded.tokens[..cut.tokens.len()]);
        }
        let text = f
            .tokenizer
            .decode(&encoded.tokens[encoded.prompt_len..])
            .unwrap();
        for fu in &sample.follow_ups {
            assert!(
                text.contains(&format!("{} {}", fu.question, fu.answer)),
                "{text:?}"
            );
        }
    }
    for task in crate::tasks::SCENE_TASKS {
        assert!(asked.get(&task).copied().unwrap_or(0) >= 10, "{asked:?}");
    }
}

#[test]
fn mixture_weights_steer_the_task_draw() {
    let assets = &fixture().assets;
    let only_count: Mixture = "count=1, text=0".parse().unwrap();
    for i in 0..20 {
        assert_eq!(
            crate::loader::training_sample(assets, &only_count, 1, i, 0).task,
            Task::Count
        );
    }
    assert!(
        "count=x"
            .parse::<Mixture>()
            .unwrap_err()
            .to_string()
            .contains("'x'")
    );
    assert!("count=-1".parse::<Mixture>().is_err());
    assert!("count=0".parse::<Mixture>().is_err());
    assert!(
        "colour=1"
            .parse::<Mixture>()
            .unwrap_err()
            .to_string()
            .contains("unknown task 'colour'")
    );
}

// ---------------------------------------------------------------- files written

#[test]
fn write_atomic_replaces_the_file_and_leaves_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/out.json");
    crate::write_atomic(&path, b"first").unwrap();
    crate::write_atomic(&path, b"second").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"second");
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["out.json"]);
}

#[test]
fn contact_sheet_lays_out_samples_in_a_grid() {
    let mut items = samples(Task::Caption, Split::Train, None, 5);
    items.extend(samples(Task::Text, Split::Train, None, 1));
    let sheet = crate::preview::contact_sheet(&items, 4, 2, 64);
    // 4 columns of (128 + 12) px; 2 rows of (128 + 50 + 12) px.
    assert_eq!(sheet.dimensions(), (4 * 140, 2 * 190));
    // Text is drawn: some pixel under the first image is black.
    let under = (0..140).any(|x| sheet.get_pixel(x, 6 + 128 + 4).0 == [0, 0, 0]);
    assert!(under);
}
