//! A byte-level BPE tokenizer trained with Hugging Face `tokenizers` on the training speeches plus every
//! task text, saved as a standard `tokenizer.json`.
//!
//! Byte-level means every string round-trips exactly and no text is ever out of vocabulary. The special
//! tokens come first, with fixed ids, so that a model can rely on them.
//!
//! Every digit is a token of its own. Left to itself, BPE merges the frequent numbers of the corpus into
//! one- and two-digit tokens of its own choosing ("47" one token, "123" "12" then "3"), so a model reading
//! a number off an image would have to learn an arbitrary segmentation on top of the digits; with single
//! digits it writes what it reads, one digit per token.

use std::path::Path;

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer, TokenizerBuilder,
};

use crate::error::{DataError, Result};

pub const PAD: &str = "<|pad|>";
pub const BOS: &str = "<|bos|>";
pub const EOS: &str = "<|eos|>";
pub const IMAGE_START: &str = "<|image_start|>";
pub const IMAGE_END: &str = "<|image_end|>";
/// Stands in the token sequence at each image-patch position; the model embeds the patch instead.
pub const PATCH: &str = "<|patch|>";
/// Reserved for a learned summary token after the image span.
pub const SUMMARY: &str = "<|summary|>";

/// Special tokens, in id order (0..7).
pub const SPECIAL_TOKENS: [&str; 7] = [PAD, BOS, EOS, IMAGE_START, IMAGE_END, PATCH, SUMMARY];

/// How many times each task text is repeated in the training corpus, so that labels and question
/// templates earn merges next to 10 MB of speeches.
pub const TASK_TEXT_REPEAT: usize = 50;

/// Ids of the special tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub pad: u32,
    pub bos: u32,
    pub eos: u32,
    pub image_start: u32,
    pub image_end: u32,
    pub patch: u32,
    pub summary: u32,
}

/// A trained tokenizer and its special-token ids.
#[derive(Clone)]
pub struct TextTokenizer {
    pub inner: Tokenizer,
    pub special: SpecialIds,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

impl TextTokenizer {
    /// Trains a byte-level BPE of `vocab_size` tokens (special tokens and the 256 byte symbols included).
    pub fn train<'a>(
        texts: impl Iterator<Item = &'a str> + Send,
        vocab_size: usize,
    ) -> Result<TextTokenizer> {
        if !(300..=65_536).contains(&vocab_size) {
            return Err(DataError::config(
                "vocab_size",
                format!(
                    "{vocab_size} is outside 300..=65536 (256 byte symbols and 7 special tokens come first)"
                ),
            ));
        }
        let specials: Vec<AddedToken> = SPECIAL_TOKENS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect();
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut builder = TokenizerBuilder::<
            ModelWrapper,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        >::new()
        .with_model(BPE::default().into())
        .with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::default().add_prefix_space(false).into(),
        ]))))
        .with_decoder(Some(ByteLevel::default().into()))
        .build()
        .map_err(|e| DataError::Tokenizer(e.to_string()))?;
        builder
            .train(&mut trainer, texts)
            .map_err(|e| DataError::Tokenizer(format!("training failed: {e}")))?;
        Self::from_tokenizer(Tokenizer::from(builder))
    }

    /// Trains on tokenfold's corpus: the training speeches plus every task text, each repeated
    /// [`TASK_TEXT_REPEAT`] times (held-out speeches stay out, so bytes per token on them is honest).
    pub fn train_on_assets(assets: &crate::Assets, vocab_size: usize) -> Result<TextTokenizer> {
        let task_texts = assets.task_texts();
        let corpus = assets
            .speeches
            .split(crate::Split::Train)
            .map(|s| s.text.as_str())
            .chain(
                std::iter::repeat_n(task_texts.iter(), TASK_TEXT_REPEAT)
                    .flatten()
                    .map(String::as_str),
            );
        Self::train(corpus, vocab_size)
    }

    pub fn load(path: &Path) -> Result<TextTokenizer> {
        if !path.exists() {
            return Err(DataError::MissingData {
                path: path.parent().unwrap_or(path).to_path_buf(),
                what: format!(
                    "tokenizer {} (train it with `tokenfold data tokenizer`)",
                    path.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ),
            });
        }
        let inner = Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::from_tokenizer(inner)
    }

    /// Writes `tokenizer.json` atomically (a temporary file, then a rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| DataError::Tokenizer(format!("cannot serialise: {e}")))?;
        crate::write_atomic(path, json.as_bytes())
    }

    fn from_tokenizer(inner: Tokenizer) -> Result<TextTokenizer> {
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| DataError::Tokenizer(format!("special token {token} is missing")))
        };
        let special = SpecialIds {
            pad: id(PAD)?,
            bos: id(BOS)?,
            eos: id(EOS)?,
            image_start: id(IMAGE_START)?,
            image_end: id(IMAGE_END)?,
            patch: id(PATCH)?,
            summary: id(SUMMARY)?,
        };
        Ok(TextTokenizer { inner, special })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether every digit is a token of its own, as [`TextTokenizer::train`] makes it. A tokenizer
    /// trained before digits were split merges numbers; runs keep theirs, new runs train a new one.
    pub fn splits_digits(&self) -> Result<bool> {
        for id in self.encode("0123456789 1000 47 2026")? {
            let piece = self.decode(&[id])?;
            if piece.chars().filter(char::is_ascii_digit).count() > 1 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Token ids of plain text (special-token strings inside it are not treated specially).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| DataError::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| DataError::Tokenizer(format!("cannot decode {ids:?}: {e}")))
    }

    /// Bytes of text per token over `texts`: the tokenizer's compression factor on that text.
    pub fn bytes_per_token<'a>(&self, texts: impl Iterator<Item = &'a str>) -> Result<f64> {
        let (mut bytes, mut tokens) = (0usize, 0usize);
        for text in texts {
            bytes += text.len();
            tokens += self.encode(text)?.len();
        }
        if tokens == 0 {
            return Err(DataError::config(
                "text",
                "no text to measure bytes per token on",
            ));
        }
        Ok(bytes as f64 / tokens as f64)
    }
}
