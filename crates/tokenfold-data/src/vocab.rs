//! The object vocabulary of the benchmark scenes: a few hundred visually distinct emoji that a small
//! model can learn, chosen from the emoji set by a fixed rule (documented in `docs/data.md`):
//!
//! 1. subcategories of Animals & Nature, Food & Drink, Objects, Travel & Places and Activities listed in
//!    [`KINDS`], each mapped to a coarse *kind* ("animals", "fruits", "vehicles") used by counting questions;
//! 2. in Unicode sort order, skip labels that are not ASCII or name a face (`dog face` beside `dog`),
//!    and labels whose head noun (last word) an earlier pick of the same subcategory already has
//!    (`guide dog` after `dog`, `green apple` after `red apple`) — these look alike at 16 px;
//! 3. at most [`PER_SUBCATEGORY`] per subcategory.
//!
//! Every object also has a popularity rank (a seeded shuffle) that sets how often scenes contain it
//! (Zipf-like: weight ∝ 1/√(rank+1), held as integers so that sampling is bit-identical on every machine);
//! POPE's "popular" negatives are the most popular objects.

use std::collections::HashSet;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::emoji::{Emoji, EmojiSet};
use crate::error::{DataError, Result};

/// (subcategory, kind) pairs, in the order the vocabulary lists them.
pub const KINDS: &[(&str, &str)] = &[
    ("animal-mammal", "animals"),
    ("animal-bird", "animals"),
    ("animal-amphibian", "animals"),
    ("animal-reptile", "animals"),
    ("animal-marine", "animals"),
    ("animal-bug", "animals"),
    ("plant-flower", "plants"),
    ("plant-other", "plants"),
    ("food-fruit", "fruits"),
    ("food-vegetable", "vegetables"),
    ("food-prepared", "dishes"),
    ("food-asian", "dishes"),
    ("food-sweet", "sweets"),
    ("drink", "drinks"),
    ("transport-ground", "vehicles"),
    ("transport-water", "vehicles"),
    ("transport-air", "vehicles"),
    ("sport", "balls and sports gear"),
    ("clothing", "clothes"),
    ("musical-instrument", "instruments"),
    ("tool", "tools"),
];

pub const PER_SUBCATEGORY: usize = 10;
const POPULARITY_SEED: u64 = 0x0070_6f70_756c_6172; // "popular" in ASCII

/// One object of the vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub label: String,
    pub unified: String,
    pub subcategory: String,
    pub kind: &'static str,
    /// 0 is the most popular.
    pub popularity_rank: usize,
    /// Index of the emoji in [`EmojiSet::emoji`].
    pub emoji_index: usize,
}

#[derive(Debug, Clone)]
pub struct Vocabulary {
    pub objects: Vec<Object>,
    /// Scene sampling weight of each object (integer, ∝ 1/√(popularity rank + 1)).
    pub weights: Vec<u64>,
    /// Object indices by popularity, most popular first.
    pub by_popularity: Vec<usize>,
}

impl Vocabulary {
    pub fn from_emoji(set: &EmojiSet) -> Result<Vocabulary> {
        Self::select(&set.emoji, PER_SUBCATEGORY)
    }

    /// Applies the selection rule to any list of emoji (in sort order).
    pub fn select(emoji: &[Emoji], per_subcategory: usize) -> Result<Vocabulary> {
        let mut objects = Vec::new();
        for &(subcategory, kind) in KINDS {
            let mut heads: HashSet<String> = HashSet::new();
            let mut taken = 0;
            for (emoji_index, e) in emoji.iter().enumerate() {
                if e.subcategory != subcategory || taken == per_subcategory {
                    continue;
                }
                let Some(label) = &e.label else { continue };
                let words: Vec<&str> = label.split_whitespace().collect();
                if !label.is_ascii() || words.contains(&"face") {
                    continue;
                }
                let head = words.last().map(|w| w.to_lowercase()).unwrap_or_default();
                if !heads.insert(head) {
                    continue;
                }
                objects.push(Object {
                    label: label.clone(),
                    unified: e.unified.clone(),
                    subcategory: subcategory.to_string(),
                    kind,
                    popularity_rank: 0,
                    emoji_index,
                });
                taken += 1;
            }
        }
        if objects.len() < 8 {
            return Err(DataError::config(
                "object vocabulary",
                format!(
                    "only {} emoji match the vocabulary rule; the emoji set lacks the expected subcategories",
                    objects.len()
                ),
            ));
        }
        let mut by_popularity: Vec<usize> = (0..objects.len()).collect();
        by_popularity.shuffle(&mut ChaCha8Rng::seed_from_u64(POPULARITY_SEED));
        for (rank, &index) in by_popularity.iter().enumerate() {
            objects[index].popularity_rank = rank;
        }
        // sqrt is correctly rounded under IEEE 754, so these integers are the same on every machine.
        let weights = objects
            .iter()
            .map(|o| (1e6 / ((o.popularity_rank + 1) as f64).sqrt()).round() as u64)
            .collect();
        Ok(Vocabulary {
            objects,
            weights,
            by_popularity,
        })
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Distinct kinds, in vocabulary order.
    pub fn kinds(&self) -> Vec<&'static str> {
        let mut kinds: Vec<&'static str> = Vec::new();
        for o in &self.objects {
            if !kinds.contains(&o.kind) {
                kinds.push(o.kind);
            }
        }
        kinds
    }
}
