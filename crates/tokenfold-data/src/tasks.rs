//! The benchmark tasks ("tokenfold-bench"): a question with a short answer about a generated scene.
//!
//! | task | plays the role of | question → answer |
//! |---|---|---|
//! | `exist` | POPE | "is there a {label}?" → yes / no (random, popular or adversarial negatives) |
//! | `count` | counting | "how many times does the {label} appear?" / "how many {kind} are there?" → 0–4 |
//! | `locate` | GQA | "where is the {label}?" → a cell name ("top left") |
//! | `relation` | GQA | "what is left of / above the {label}?" → a label |
//! | `read` | TextVQA (fine detail) | "what number is written?" → 2–3 handwritten digits |
//! | `caption` | captioning | one emoji, "what is this?" → its CLDR label |
//! | `text` | language modelling | a passage of a State of the Union address, no image |
//! | `describe` | dense captioning (training only) | "what is in the picture?" → "top left cat face, center tiger" |
//!
//! `describe` is not a benchmark task: it names every object of a scene with its cell, in reading order, so
//! one training sample supervises recognition and location of all its objects at once instead of one
//! object's yes/no. It is the curriculum's pretraining task (see `docs/model.md`).
//!
//! Training samples of the scene tasks (exist, count, locate, relation) can carry *follow-ups*: further
//! questions of those tasks about the same scene ([`Assets::add_follow_ups`]), so that one image serves
//! several answers in a training sequence.
//!
//! Held-out compositions: every scene has a composition key (its objects and their cells; the number for
//! `read`; object, size and rough position for `caption`), hashed into 16 buckets. Bucket 0 is the test
//! split, bucket 1 validation, the rest training; generation rejects scenes of other splits. So a test
//! scene never appears in training, and neither do test numbers, test handwriting (MNIST images are split
//! too) or test speeches.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use image::RgbImage;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::digits::{Digits, split_of_index};
use crate::error::{DataError, Result};
use crate::scene::{NumberPlate, Placed, Scene, SceneConfig, Sprites, cell_name, render};
use crate::speeches::Speeches;
use crate::vocab::Vocabulary;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Exist,
    Count,
    Locate,
    Relation,
    Read,
    Caption,
    Text,
    // Declared last: `Task as u64` enters the composition keys of the splits.
    Describe,
}

impl Task {
    /// The benchmark tasks and text: what the evaluation sets cover.
    pub const ALL: [Task; 7] = [
        Task::Exist,
        Task::Count,
        Task::Locate,
        Task::Relation,
        Task::Read,
        Task::Caption,
        Task::Text,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Task::Exist => "exist",
            Task::Count => "count",
            Task::Locate => "locate",
            Task::Relation => "relation",
            Task::Read => "read",
            Task::Caption => "caption",
            Task::Text => "text",
            Task::Describe => "describe",
        }
    }

    /// Every task, the training-only ones included.
    pub fn every() -> impl Iterator<Item = Task> {
        Task::ALL.into_iter().chain([Task::Describe])
    }

    pub fn has_image(self) -> bool {
        self != Task::Text
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Task> {
        Task::every().find(|t| t.name() == s).ok_or_else(|| {
            let names: Vec<_> = Task::every().map(|t| t.name()).collect();
            DataError::config(
                "task",
                format!("unknown task '{s}' (expected one of {})", names.join(", ")),
            )
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Split {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Split> {
        match s {
            "train" => Ok(Split::Train),
            "val" => Ok(Split::Val),
            "test" => Ok(Split::Test),
            _ => Err(DataError::config(
                "split",
                format!("unknown split '{s}' (expected train, val or test)"),
            )),
        }
    }
}

/// How `exist` picks the absent object of a "no" question (POPE's three splits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Negatives {
    /// Any object not in the scene.
    Random,
    /// One of the most popular objects not in the scene.
    Popular,
    /// An object of the same subcategory as one in the scene (then the same kind).
    Adversarial,
}

impl Negatives {
    pub const ALL: [Negatives; 3] = [
        Negatives::Random,
        Negatives::Popular,
        Negatives::Adversarial,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Negatives::Random => "random",
            Negatives::Popular => "popular",
            Negatives::Adversarial => "adversarial",
        }
    }
}

impl FromStr for Negatives {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Negatives> {
        Negatives::ALL
            .into_iter()
            .find(|n| n.name() == s)
            .ok_or_else(|| {
                DataError::config(
                    "negatives",
                    format!("unknown negatives '{s}' (expected random, popular or adversarial)"),
                )
            })
    }
}

/// The question of the `describe` task.
pub const DESCRIBE_QUESTION: &str = "what is in the picture?";

/// How many of the most popular objects count as "popular" negatives.
pub const POPULAR_POOL: usize = 20;

/// One benchmark sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub task: Task,
    /// The rendered scene, `None` for `text`.
    pub image: Option<RgbImage>,
    /// What the image shows (objects, cells, the number), `None` for `text`.
    pub scene: Option<Scene>,
    /// Empty for `text`.
    pub question: String,
    /// The expected answer; for `text`, the passage itself.
    pub answer: String,
    /// Further questions about the same scene, asked after the answer in one training sequence (see
    /// [`Assets::add_follow_ups`]); always empty in evaluation sets.
    pub follow_ups: Vec<FollowUp>,
}

/// A further question about a sample's scene and its answer.
#[derive(Debug, Clone, PartialEq)]
pub struct FollowUp {
    pub task: Task,
    pub question: String,
    pub answer: String,
}

/// The tasks whose questions are about a scene of objects in grid cells, and so can follow each other.
pub const SCENE_TASKS: [Task; 4] = [Task::Exist, Task::Count, Task::Locate, Task::Relation];

/// Everything generation reads: the vocabulary with its sprites, the digits and the speeches.
#[derive(Debug, Clone)]
pub struct Assets {
    pub scene: SceneConfig,
    pub vocab: Vocabulary,
    pub sprites: Sprites,
    pub digits: Digits,
    pub speeches: Speeches,
    /// Bytes of text in a `text` sample.
    pub text_bytes: usize,
}

/// A deterministic random stream for sample `index` of stream `stream` under `seed`.
pub fn sample_rng(seed: u64, stream: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(splitmix(seed ^ splitmix(stream ^ splitmix(index))));
    rng.set_stream(stream);
    rng
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The split a composition key belongs to.
pub fn composition_split(key: &[u64]) -> Split {
    let hash = key.iter().fold(0x7f4a_7c15_u64, |h, &k| splitmix(h ^ k));
    match hash % 16 {
        0 => Split::Test,
        1 => Split::Val,
        _ => Split::Train,
    }
}

// The question templates, one each: the generators, the follow-ups and the tokenizer's corpus
// (`task_texts`) must phrase a question identically.
fn exist_question(label: &str) -> String {
    format!("is there a {label}?")
}

fn count_kind_question(kind: &str) -> String {
    format!("how many {kind} are there?")
}

fn count_label_question(label: &str) -> String {
    format!("how many times does the {label} appear?")
}

fn locate_question(label: &str) -> String {
    format!("where is the {label}?")
}

/// "what is left of the X?" with `left`, else "what is above the X?".
fn relation_question(left: bool, label: &str) -> String {
    let direction = if left { "left of" } else { "above" };
    format!("what is {direction} the {label}?")
}

pub(crate) fn scene_key(task: Task, objects: &[Placed]) -> Vec<u64> {
    let mut pairs: Vec<u64> = objects
        .iter()
        .map(|p| ((p.object as u64) << 8) | p.cell as u64)
        .collect();
    pairs.sort_unstable();
    pairs.insert(0, task as u64);
    pairs
}

impl Assets {
    /// Generates one sample of `task` in `split`. `negatives` applies to `exist` only; `None` there draws
    /// one of the three kinds at random (the training mixture).
    pub fn sample(
        &self,
        task: Task,
        split: Split,
        negatives: Option<Negatives>,
        rng: &mut ChaCha8Rng,
    ) -> Sample {
        let mut sample = match task {
            Task::Exist => self.exist(split, negatives, rng),
            Task::Count => self.count(split, rng),
            Task::Locate => self.locate(split, rng),
            Task::Relation => self.relation(split, rng),
            Task::Read => self.read(split, rng),
            Task::Caption => self.caption(split, rng),
            Task::Describe => self.describe(split, rng),
            Task::Text => return self.text(split, rng),
        };
        sample.task = task;
        sample
    }

    fn render(&self, scene: &Scene) -> RgbImage {
        render(scene, &self.scene, &self.sprites, &self.digits)
    }

    fn pick_weighted(&self, rng: &mut ChaCha8Rng, exclude: &HashSet<usize>) -> usize {
        let total: u64 = self
            .vocab
            .weights
            .iter()
            .enumerate()
            .filter(|(i, _)| !exclude.contains(i))
            .map(|(_, w)| w)
            .sum();
        let mut target = rng.random_range(0..total);
        for (i, &w) in self.vocab.weights.iter().enumerate() {
            if exclude.contains(&i) {
                continue;
            }
            if target < w {
                return i;
            }
            target -= w;
        }
        unreachable!("weighted pick ran past the total weight")
    }

    fn size(&self, rng: &mut ChaCha8Rng) -> u32 {
        rng.random_range(self.scene.min_size..=self.scene.max_size)
    }

    /// A scene of `count` distinct objects (popularity-weighted) in distinct random cells, in `split`.
    fn distinct_scene(
        &self,
        task: Task,
        split: Split,
        count: usize,
        rng: &mut ChaCha8Rng,
    ) -> Vec<Placed> {
        loop {
            let mut cells: Vec<usize> = (0..self.scene.cells()).collect();
            cells.shuffle(rng);
            let mut chosen = HashSet::new();
            let objects: Vec<Placed> = cells[..count]
                .iter()
                .map(|&cell| {
                    let object = self.pick_weighted(rng, &chosen);
                    chosen.insert(object);
                    let size = self.size(rng);
                    Scene::place(&self.scene, rng, object, cell, size)
                })
                .collect();
            if composition_split(&scene_key(task, &objects)) == split {
                return objects;
            }
        }
    }

    fn object_count(&self, rng: &mut ChaCha8Rng) -> usize {
        rng.random_range(self.scene.min_objects..=self.scene.max_objects)
    }

    fn finish(
        &self,
        objects: Vec<Placed>,
        number: Option<NumberPlate>,
        question: String,
        answer: String,
        rng: &mut ChaCha8Rng,
    ) -> Sample {
        let scene = Scene {
            background_seed: rng.random(),
            objects,
            number,
        };
        Sample {
            task: Task::Exist,
            image: Some(self.render(&scene)),
            scene: Some(scene),
            question,
            answer,
            follow_ups: Vec::new(),
        }
    }

    fn label(&self, object: usize) -> &str {
        &self.vocab.objects[object].label
    }

    fn exist(&self, split: Split, negatives: Option<Negatives>, rng: &mut ChaCha8Rng) -> Sample {
        let count = self.object_count(rng);
        let objects = self.distinct_scene(Task::Exist, split, count, rng);
        let present: HashSet<usize> = objects.iter().map(|p| p.object).collect();
        let (target, answer) = if rng.random_bool(0.5) {
            (objects.choose(rng).map(|p| p.object).unwrap_or(0), "yes")
        } else {
            let negatives = negatives
                .unwrap_or_else(|| *Negatives::ALL.choose(rng).unwrap_or(&Negatives::Random));
            (self.negative(negatives, &objects, &present, rng), "no")
        };
        let question = exist_question(self.label(target));
        self.finish(objects, None, question, answer.to_string(), rng)
    }

    fn negative(
        &self,
        negatives: Negatives,
        objects: &[Placed],
        present: &HashSet<usize>,
        rng: &mut ChaCha8Rng,
    ) -> usize {
        let absent = |candidates: Vec<usize>| -> Vec<usize> {
            candidates
                .into_iter()
                .filter(|c| !present.contains(c))
                .collect()
        };
        let all: Vec<usize> = (0..self.vocab.len()).collect();
        let pool = match negatives {
            Negatives::Random => absent(all.clone()),
            Negatives::Popular => absent(
                self.vocab
                    .by_popularity
                    .iter()
                    .copied()
                    .take(POPULAR_POOL)
                    .collect(),
            ),
            Negatives::Adversarial => {
                let objs = &self.vocab.objects;
                let same = |pred: &dyn Fn(usize, usize) -> bool| {
                    absent(
                        all.iter()
                            .copied()
                            .filter(|&c| objects.iter().any(|p| pred(c, p.object)))
                            .collect(),
                    )
                };
                let by_subcategory = same(&|c, o| objs[c].subcategory == objs[o].subcategory);
                if by_subcategory.is_empty() {
                    same(&|c, o| objs[c].kind == objs[o].kind)
                } else {
                    by_subcategory
                }
            }
        };
        let pool = if pool.is_empty() { absent(all) } else { pool };
        *pool
            .choose(rng)
            .expect("the vocabulary has more objects than a scene")
    }

    fn count(&self, split: Split, rng: &mut ChaCha8Rng) -> Sample {
        let by_kind = rng.random_bool(0.5);
        let kinds = self.vocab.kinds();
        loop {
            let n = rng.random_range(0..=4usize);
            let others = rng.random_range(
                (1usize.saturating_sub(n))
                    ..=(self.scene.max_objects - n.min(self.scene.max_objects)),
            );
            let (question, matches): (String, Box<dyn Fn(usize) -> bool>) = if by_kind {
                let kind = *kinds.choose(rng).unwrap_or(&"animals");
                (
                    count_kind_question(kind),
                    Box::new(move |o| self.vocab.objects[o].kind == kind),
                )
            } else {
                let target = self.pick_weighted(rng, &HashSet::new());
                (
                    count_label_question(self.label(target)),
                    Box::new(move |o| o == target),
                )
            };
            let matching: Vec<usize> = (0..self.vocab.len()).filter(|&o| matches(o)).collect();
            let other: HashSet<usize> = matching.iter().copied().collect();
            let mut cells: Vec<usize> = (0..self.scene.cells()).collect();
            cells.shuffle(rng);
            let mut objects = Vec::with_capacity(n + others);
            for &cell in &cells[..n] {
                let object = *matching
                    .choose(rng)
                    .expect("a kind or label matches at least one object");
                let size = self.size(rng);
                objects.push(Scene::place(&self.scene, rng, object, cell, size));
            }
            for &cell in &cells[n..n + others] {
                let object = self.pick_weighted(rng, &other);
                let size = self.size(rng);
                objects.push(Scene::place(&self.scene, rng, object, cell, size));
            }
            if composition_split(&scene_key(Task::Count, &objects)) == split {
                return self.finish(objects, None, question, n.to_string(), rng);
            }
        }
    }

    fn locate(&self, split: Split, rng: &mut ChaCha8Rng) -> Sample {
        let count = self.object_count(rng);
        let objects = self.distinct_scene(Task::Locate, split, count, rng);
        let target = *objects
            .choose(rng)
            .expect("a scene has at least one object");
        let question = locate_question(self.label(target.object));
        self.finish(
            objects,
            None,
            question,
            cell_name(self.scene.grid, target.cell),
            rng,
        )
    }

    /// "what is in the picture?": every object with its cell, in reading (row-major) order.
    fn describe(&self, split: Split, rng: &mut ChaCha8Rng) -> Sample {
        let count = self.object_count(rng);
        let objects = self.distinct_scene(Task::Describe, split, count, rng);
        let mut order: Vec<&Placed> = objects.iter().collect();
        order.sort_by_key(|p| p.cell);
        let answer = order
            .iter()
            .map(|p| {
                format!(
                    "{} {}",
                    cell_name(self.scene.grid, p.cell),
                    self.label(p.object)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        self.finish(objects, None, DESCRIBE_QUESTION.into(), answer, rng)
    }

    /// "what is left of / above the X?": exactly one object lies left of (above) X in its row (column).
    fn relation(&self, split: Split, rng: &mut ChaCha8Rng) -> Sample {
        let grid = self.scene.grid as usize;
        loop {
            let left = rng.random_bool(0.5);
            // (row, column) coordinates with the relation along the second.
            let (line, along) = (rng.random_range(0..grid), rng.random_range(1..grid));
            let other_along = rng.random_range(0..along);
            let cell = |line: usize, along: usize| {
                if left {
                    line * grid + along
                } else {
                    along * grid + line
                }
            };
            let (target_cell, answer_cell) = (cell(line, along), cell(line, other_along));
            let blocked: HashSet<usize> = (0..along).map(|a| cell(line, a)).collect();
            let mut free: Vec<usize> = (0..self.scene.cells())
                .filter(|c| *c != target_cell && !blocked.contains(c))
                .collect();
            free.shuffle(rng);
            let extra = rng.random_range(0..=(self.scene.max_objects - 2).min(free.len()));
            let mut chosen = HashSet::new();
            let mut objects = Vec::new();
            for cell in [target_cell, answer_cell]
                .into_iter()
                .chain(free[..extra].iter().copied())
            {
                let object = self.pick_weighted(rng, &chosen);
                chosen.insert(object);
                let size = self.size(rng);
                objects.push(Scene::place(&self.scene, rng, object, cell, size));
            }
            if composition_split(&scene_key(Task::Relation, &objects)) == split {
                let question = relation_question(left, self.label(objects[0].object));
                let answer = self.label(objects[1].object).to_string();
                return self.finish(objects, None, question, answer, rng);
            }
        }
    }

    fn read(&self, split: Split, rng: &mut ChaCha8Rng) -> Sample {
        let grid = self.scene.grid as usize;
        let number = loop {
            let value: u32 = if rng.random_bool(0.5) {
                rng.random_range(10..100)
            } else {
                rng.random_range(100..1000)
            };
            if composition_split(&[Task::Read as u64, value as u64]) == split {
                break value;
            }
        };
        let digits = number
            .to_string()
            .bytes()
            .map(|b| {
                let d = b - b'0';
                let pool = &self.digits.by_digit[d as usize];
                let index = loop {
                    let i = rng.random_range(0..pool.len());
                    if split_of_index(i) == split {
                        break i;
                    }
                };
                (d, index)
            })
            .collect();
        let row = rng.random_range(0..grid);
        let first = rng.random_range(0..grid - 1);
        let plate_cells = vec![row * grid + first, row * grid + first + 1];
        let plate = Scene::plate(&self.scene, rng, digits, plate_cells.clone());
        let mut free: Vec<usize> = (0..self.scene.cells())
            .filter(|c| !plate_cells.contains(c))
            .collect();
        free.shuffle(rng);
        let extra = rng.random_range(0..=(self.scene.max_objects / 2).min(free.len()));
        let mut chosen = HashSet::new();
        let mut objects = Vec::new();
        for &cell in &free[..extra] {
            let object = self.pick_weighted(rng, &chosen);
            chosen.insert(object);
            let size = self.size(rng);
            objects.push(Scene::place(&self.scene, rng, object, cell, size));
        }
        self.finish(
            objects,
            Some(plate),
            "what number is written?".into(),
            number.to_string(),
            rng,
        )
    }

    /// One emoji, drawn uniformly from the vocabulary (not by popularity: every label must be learnable).
    fn caption(&self, split: Split, rng: &mut ChaCha8Rng) -> Sample {
        let cfg = &self.scene;
        let placed = loop {
            let object = rng.random_range(0..self.vocab.len());
            let size = rng.random_range(cfg.caption_min_size..=cfg.caption_max_size);
            let (x, y) = (
                rng.random_range(0..=cfg.canvas - size),
                rng.random_range(0..=cfg.canvas - size),
            );
            let key = [
                Task::Caption as u64,
                object as u64,
                size as u64,
                (x / 8) as u64,
                (y / 8) as u64,
            ];
            if composition_split(&key) == split {
                break Placed {
                    object,
                    cell: usize::MAX,
                    x,
                    y,
                    size,
                };
            }
        };
        let answer = self.label(placed.object).to_string();
        self.finish(vec![placed], None, "what is this?".into(), answer, rng)
    }

    /// A passage of about `text_bytes` bytes from a speech of the split, starting at a word.
    fn text(&self, split: Split, rng: &mut ChaCha8Rng) -> Sample {
        let speeches: Vec<&str> = self
            .speeches
            .split(split)
            .map(|s| s.text.as_str())
            .collect();
        let total: usize = speeches.iter().map(|s| s.len()).sum();
        let mut offset = rng.random_range(0..total);
        let text = speeches
            .iter()
            .find(|s| {
                if offset < s.len() {
                    true
                } else {
                    offset -= s.len();
                    false
                }
            })
            .expect("offset lies inside the split's text");
        // Search the bytes: `offset` may fall inside a multi-byte character, a space byte never does.
        let start = text.as_bytes()[..offset]
            .iter()
            .rposition(|&b| b == b' ')
            .map_or(0, |i| i + 1);
        let mut end = (start + self.text_bytes).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Sample {
            task: Task::Text,
            image: None,
            scene: None,
            question: String::new(),
            answer: text[start..end].to_string(),
            follow_ups: Vec::new(),
        }
    }

    /// Appends up to `n` further questions about `sample`'s scene, so that one image serves several
    /// answers in a training sequence. Only samples of the [`SCENE_TASKS`] get them. Each follow-up's task is
    /// drawn uniformly from those tasks under whose composition key the scene belongs to the training
    /// split, so that no follow-up asks a question of a held-out scene of its task; questions are phrased
    /// as the tasks phrase them and are distinct within a sample. A draw that does not apply to the scene
    /// (a locate question with every label repeated, a count above 4, no object with exactly one
    /// neighbour left of or above it) is skipped, so a sample can get fewer than `n`.
    pub fn add_follow_ups(&self, sample: &mut Sample, n: usize, rng: &mut ChaCha8Rng) {
        if n == 0 || !SCENE_TASKS.contains(&sample.task) {
            return;
        }
        let Some(scene) = &sample.scene else {
            return;
        };
        let objects = &scene.objects;
        let tasks: Vec<Task> = SCENE_TASKS
            .into_iter()
            .filter(|&t| composition_split(&scene_key(t, objects)) == Split::Train)
            .collect();
        let mut asked: HashSet<String> = HashSet::from([sample.question.clone()]);
        let mut follow_ups = Vec::with_capacity(n);
        for _ in 0..4 * n {
            if follow_ups.len() == n {
                break;
            }
            let Some(&task) = tasks.choose(rng) else {
                break;
            };
            if let Some((question, answer)) = self.follow_up(task, objects, rng)
                && asked.insert(question.clone())
            {
                follow_ups.push(FollowUp {
                    task,
                    question,
                    answer,
                });
            }
        }
        sample.follow_ups = follow_ups;
    }

    /// One question of `task` about `objects` with its answer, or `None` where the draw does not apply.
    fn follow_up(
        &self,
        task: Task,
        objects: &[Placed],
        rng: &mut ChaCha8Rng,
    ) -> Option<(String, String)> {
        let copies = |object: usize| objects.iter().filter(|p| p.object == object).count();
        let unique: Vec<&Placed> = objects.iter().filter(|p| copies(p.object) == 1).collect();
        match task {
            Task::Exist => {
                let present: HashSet<usize> = objects.iter().map(|p| p.object).collect();
                let (target, answer) = if rng.random_bool(0.5) {
                    (objects.choose(rng)?.object, "yes")
                } else {
                    let negatives = *Negatives::ALL.choose(rng)?;
                    (self.negative(negatives, objects, &present, rng), "no")
                };
                Some((exist_question(self.label(target)), answer.to_string()))
            }
            Task::Count => {
                let (question, n) = if rng.random_bool(0.5) {
                    let kinds = self.vocab.kinds();
                    let kind = *kinds.choose(rng)?;
                    let n = objects
                        .iter()
                        .filter(|p| self.vocab.objects[p.object].kind == kind)
                        .count();
                    (count_kind_question(kind), n)
                } else {
                    let target = if rng.random_bool(0.5) {
                        objects.choose(rng)?.object
                    } else {
                        self.pick_weighted(rng, &HashSet::new())
                    };
                    (count_label_question(self.label(target)), copies(target))
                };
                (n <= 4).then(|| (question, n.to_string()))
            }
            Task::Locate => {
                let target = unique.choose(rng)?;
                Some((
                    locate_question(self.label(target.object)),
                    cell_name(self.scene.grid, target.cell),
                ))
            }
            Task::Relation => {
                let grid = self.scene.grid as usize;
                let left = rng.random_bool(0.5);
                // (line, position along the line): the relation runs along the second coordinate.
                let coords = |cell: usize| {
                    if left {
                        (cell / grid, cell % grid)
                    } else {
                        (cell % grid, cell / grid)
                    }
                };
                let pairs: Vec<(&Placed, &Placed)> = unique
                    .iter()
                    .filter_map(|target| {
                        let (line, along) = coords(target.cell);
                        let mut before = objects.iter().filter(|p| {
                            let (l, a) = coords(p.cell);
                            l == line && a < along
                        });
                        match (before.next(), before.next()) {
                            (Some(only), None) => Some((*target, only)),
                            _ => None,
                        }
                    })
                    .collect();
                let (target, answer) = pairs.choose(rng)?;
                Some((
                    relation_question(left, self.label(target.object)),
                    self.label(answer.object).to_string(),
                ))
            }
            _ => None,
        }
    }

    /// Every question and answer text the image tasks can produce (for the tokenizer's training corpus and
    /// its round-trip test).
    pub fn task_texts(&self) -> Vec<String> {
        let mut texts = vec![
            "yes".to_string(),
            "no".to_string(),
            "what number is written?".into(),
            "what is this?".into(),
        ];
        for kind in self.vocab.kinds() {
            texts.push(count_kind_question(kind));
        }
        for n in 0..=4 {
            texts.push(n.to_string());
        }
        for cell in 0..self.scene.cells() {
            texts.push(cell_name(self.scene.grid, cell));
        }
        for object in &self.vocab.objects {
            let label = &object.label;
            texts.push(label.clone());
            texts.push(exist_question(label));
            texts.push(count_label_question(label));
            texts.push(locate_question(label));
            texts.push(relation_question(true, label));
            texts.push(relation_question(false, label));
        }
        for number in 10..1000 {
            texts.push(number.to_string());
        }
        texts
    }
}
