//! The FLAVA text tokenizer: BERT uncased WordPiece on the `tokenizers` crate, loaded from an HF
//! `tokenizer.json` or a BERT `vocab.txt`, producing `[CLS] … [SEP]` ids padded or truncated to a
//! fixed length (77 by default, FLAVA's caption length) with the attention mask and token types.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};

/// FLAVA's caption length.
pub const DEFAULT_MAX_LENGTH: usize = 77;

/// Tokenizer errors.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer file is missing.
    #[error("tokenizer file {0} does not exist")]
    NotFound(PathBuf),
    /// The file could not be parsed or a text could not be encoded.
    #[error("tokenizer {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The vocabulary lacks a token FLAVA needs.
    #[error("the vocabulary has no `{0}` token")]
    MissingToken(&'static str),
}

/// Ids of the special tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `[PAD]`
    pub pad: u32,
    /// `[CLS]`
    pub cls: u32,
    /// `[SEP]`
    pub sep: u32,
    /// `[MASK]`
    pub mask: u32,
    /// `[UNK]`
    pub unk: u32,
}

/// Token ids of a batch of texts, all of length `max_length`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedBatch {
    /// `[batch][max_length]` ids, `[CLS] tokens [SEP] [PAD]…`.
    pub input_ids: Vec<Vec<u32>>,
    /// `[batch][max_length]`, 1 = token, 0 = padding.
    pub attention_mask: Vec<Vec<u32>>,
    /// `[batch][max_length]`, all 0 for single sentences.
    pub token_type_ids: Vec<Vec<u32>>,
    /// Per text: whether it was cut to fit `max_length` (never silent).
    pub truncated: Vec<bool>,
}

impl TokenizedBatch {
    /// Number of texts.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    fn tensor(rows: &[Vec<u32>], device: &Device) -> Tensor<2, Int> {
        let (b, l) = (rows.len(), rows.first().map_or(0, Vec::len));
        let flat: Vec<i64> = rows.iter().flatten().map(|&v| v as i64).collect();
        Tensor::from_data(TensorData::new(flat, [b, l]), device)
    }

    /// `(input_ids, attention_mask, token_type_ids)` as [batch, max_length] tensors.
    pub fn to_tensors(&self, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>, Tensor<2, Int>) {
        (
            Self::tensor(&self.input_ids, device),
            Self::tensor(&self.attention_mask, device),
            Self::tensor(&self.token_type_ids, device),
        )
    }
}

/// BERT uncased WordPiece tokenizer as FLAVA uses it.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    source: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (HF format) or `vocab.txt` (BERT WordPiece, uncased), by file name.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(TokenizerError::NotFound(path.into()));
        }
        let invalid = |e: &dyn std::fmt::Display| TokenizerError::Invalid {
            path: path.into(),
            message: e.to_string(),
        };
        let inner = if path.extension().and_then(|e| e.to_str()) == Some("txt") {
            let wp = WordPiece::from_file(&path.to_string_lossy())
                .unk_token("[UNK]".into())
                .build()
                .map_err(|e| invalid(&e))?;
            let mut tk = tokenizers::Tokenizer::new(wp);
            tk.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
            tk.with_pre_tokenizer(Some(BertPreTokenizer));
            tk.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
            let id = |t: &'static str| tk.token_to_id(t).ok_or(TokenizerError::MissingToken(t));
            let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
            tk.with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))));
            tk
        } else {
            tokenizers::Tokenizer::from_file(path).map_err(|e| invalid(&e))?
        };
        Self::from_tokenizer(inner, path.into())
    }

    /// Wraps an already-built `tokenizers::Tokenizer` (e.g. one trained in memory).
    pub fn from_tokenizer(inner: tokenizers::Tokenizer, source: PathBuf) -> Result<Self, TokenizerError> {
        let id = |t: &'static str| inner.token_to_id(t).ok_or(TokenizerError::MissingToken(t));
        let special = SpecialTokens {
            pad: id("[PAD]")?,
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            mask: id("[MASK]")?,
            unk: id("[UNK]")?,
        };
        Ok(Self { inner, special, source })
    }

    /// The special-token ids.
    pub fn special_tokens(&self) -> SpecialTokens {
        self.special
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Tokenizes texts as HF's FLAVA processor does with `padding="max_length",
    /// truncation=True`: `[CLS] … [SEP]`, padded with `[PAD]` (mask 0) to `max_length`; texts that
    /// do not fit are cut and flagged in [`TokenizedBatch::truncated`].
    pub fn encode_batch(&self, texts: &[impl AsRef<str>], max_length: usize) -> Result<TokenizedBatch, TokenizerError> {
        let pairs: Vec<(&str, Option<&str>)> = texts.iter().map(|t| (t.as_ref(), None)).collect();
        self.encode_pairs(&pairs, max_length)
    }

    /// [`Self::encode_batch`] for sentence pairs: `[CLS] a [SEP] b [SEP]` with token type 1 on
    /// `b` (BERT's pair layout, as GLUE and SNLI-VE fine-tuning use); a `None` second sentence
    /// is a single sentence. Pairs that do not fit are cut longest-first and flagged.
    pub fn encode_pairs(
        &self,
        texts: &[(&str, Option<&str>)],
        max_length: usize,
    ) -> Result<TokenizedBatch, TokenizerError> {
        let mut tk = self.inner.clone();
        let invalid = |e: &dyn std::fmt::Display| TokenizerError::Invalid {
            path: self.source.clone(),
            message: e.to_string(),
        };
        tk.with_truncation(Some(TruncationParams {
            max_length,
            ..Default::default()
        }))
        .map_err(|e| invalid(&e))?;
        tk.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            pad_id: self.special.pad,
            pad_token: self
                .inner
                .id_to_token(self.special.pad)
                .unwrap_or_else(|| "[PAD]".into()),
            ..Default::default()
        }));
        let mut out = TokenizedBatch {
            input_ids: vec![],
            attention_mask: vec![],
            token_type_ids: vec![],
            truncated: vec![],
        };
        for &(a, b) in texts {
            let enc = match b {
                Some(b) => tk.encode((a, b), true),
                None => tk.encode(a, true),
            }
            .map_err(|e| invalid(&e))?;
            out.truncated.push(!enc.get_overflowing().is_empty());
            out.input_ids.push(enc.get_ids().to_vec());
            out.attention_mask.push(enc.get_attention_mask().to_vec());
            out.token_type_ids.push(enc.get_type_ids().to_vec());
        }
        Ok(out)
    }
}
