//! Training a BERT-style WordPiece tokenizer (lower-casing BERT normaliser and pre-tokenizer,
//! `[CLS] … [SEP]` post-processing) on a corpus with the `tokenizers` crate's trainer.
//!
//! Not deterministic: the trainer breaks ties between equally frequent pairs in hash-map order,
//! so two trainings on the same texts can give other merges and ids (a run that must be
//! repeatable passes a fixed `tokenizer.json`).

use std::path::Path;

use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::tokenizer::TokenizerError;

/// The special tokens, in id order 0..5.
pub const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Trains on `texts` and writes `tokenizer.json` to `path`. Returns the vocabulary size.
pub fn train_wordpiece<I>(texts: I, vocab_size: usize, path: &Path) -> Result<usize, TokenizerError>
where
    I: Iterator<Item = String> + Send,
{
    let err = |e: tokenizers::Error| TokenizerError::Invalid {
        path: path.to_path_buf(),
        message: format!("training: {e}"),
    };
    let io = |e: std::io::Error| TokenizerError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut trainer = WordPieceTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(SPECIALS.iter().map(|s| AddedToken::from(*s, true)).collect())
        .build();
    let model = WordPiece::builder().unk_token("[UNK]".into()).build().map_err(err)?;
    let mut tok = TokenizerBuilder::<_, BertNormalizer, BertPreTokenizer, BertProcessing, WordPieceDecoder>::new()
        .with_model(model)
        .with_normalizer(Some(BertNormalizer::default()))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_post_processor(Some(BertProcessing::new(("[SEP]".into(), 3), ("[CLS]".into(), 2))))
        .with_decoder(Some(WordPieceDecoder::default()))
        .build()
        .map_err(err)?;
    tok.train(&mut trainer, texts).map_err(err)?;
    for (i, t) in SPECIALS.iter().enumerate() {
        if tok.token_to_id(t) != Some(i as u32) {
            return Err(TokenizerError::Invalid {
                path: path.to_path_buf(),
                message: format!("{t} is not token {i} after training"),
            });
        }
    }
    tok.with_post_processor(Some(BertProcessing::new(("[SEP]".into(), 3), ("[CLS]".into(), 2))));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    tok.save(path, true).map_err(err)?;
    Ok(tok.get_vocab_size(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_tokenizer_loads_and_round_trips() {
        let dir = std::env::temp_dir().join(format!("flava-tok-{}", std::process::id()));
        let path = dir.join("tokenizer.json");
        let texts = (0..200).map(|i| {
            format!(
                "a {} red circle left of a small blue square",
                if i % 2 == 0 { "big" } else { "small" }
            )
        });
        let n = train_wordpiece(texts, 60, &path).unwrap();
        assert!(n <= 60 && n > SPECIALS.len(), "{n}");
        let tok = crate::Tokenizer::from_file(&path).unwrap();
        let sp = tok.special_tokens();
        assert_eq!((sp.pad, sp.cls, sp.sep, sp.mask), (0, 2, 3, 4));
        let b = tok.encode_batch(&["A big red circle".to_string()], 8).unwrap();
        let ids = &b.input_ids[0];
        assert_eq!(ids[0], 2, "starts with [CLS]");
        assert!(ids.iter().all(|&i| i != 1), "no [UNK] for seen words: {ids:?}");
        std::fs::remove_dir_all(dir).ok();
    }
}
