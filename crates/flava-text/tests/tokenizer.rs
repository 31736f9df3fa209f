//! The tokenizer against HF `BertTokenizerFast(padding="max_length", truncation=True)` on a small
//! uncased vocabulary (written by `scripts/make_fixtures.py`): ids, masks and types exactly equal.

use std::path::PathBuf;

use flava_text::{Tokenizer, TokenizerError};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer")
}

#[derive(serde::Deserialize)]
struct Expected {
    texts: Vec<String>,
    max_length: usize,
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
    token_type_ids: Vec<Vec<u32>>,
}

fn expected() -> Expected {
    serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap()).unwrap()
}

#[test]
fn tokenizer_json_and_vocab_txt_match_hf() {
    let e = expected();
    for file in ["tokenizer.json", "vocab.txt"] {
        let tok = Tokenizer::from_file(dir().join(file)).unwrap();
        let got = tok.encode_batch(&e.texts, e.max_length).unwrap();
        assert_eq!(got.input_ids, e.input_ids, "{file}");
        assert_eq!(got.attention_mask, e.attention_mask, "{file}");
        assert_eq!(got.token_type_ids, e.token_type_ids, "{file}");
        // Only the 30-word text overflows 16 tokens, and it says so.
        assert_eq!(got.truncated, vec![false, false, false, true, false], "{file}");
        let sp = tok.special_tokens();
        assert_eq!((sp.pad, sp.unk, sp.cls, sp.sep, sp.mask), (0, 4, 5, 6, 7));
    }
}

#[test]
fn tensors_have_batch_by_length_shape() {
    let tok = Tokenizer::from_file(dir().join("tokenizer.json")).unwrap();
    let b = tok.encode_batch(&["a cat", "two dogs"], 77).unwrap();
    let (ids, mask, types) = b.to_tensors(&burn::prelude::Device::flex());
    assert_eq!((ids.dims(), mask.dims(), types.dims()), ([2, 77], [2, 77], [2, 77]));
    assert_eq!(mask.sum().into_scalar::<i64>(), 4 + 4);
}

#[test]
fn missing_file_is_a_clear_error() {
    let err = Tokenizer::from_file(dir().join("nope.json")).unwrap_err();
    assert!(matches!(err, TokenizerError::NotFound(_)), "{err}");
    let bad = std::env::temp_dir().join(format!("flava-bad-tok-{}.json", std::process::id()));
    std::fs::write(&bad, "{ not json").unwrap();
    assert!(matches!(
        Tokenizer::from_file(&bad).unwrap_err(),
        TokenizerError::Invalid { .. }
    ));
    std::fs::remove_file(bad).ok();
}

#[derive(serde::Deserialize)]
struct ExpectedPairs {
    pairs: Vec<(String, String)>,
    max_length: usize,
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
    token_type_ids: Vec<Vec<u32>>,
}

/// Sentence pairs (GLUE, SNLI-VE) as `BertTokenizerFast(a, b, padding="max_length",
/// truncation=True)` encodes them: `[CLS] a [SEP] b [SEP]`, type 1 on `b`, longest-first cuts.
#[test]
fn sentence_pairs_match_hf() {
    let e: ExpectedPairs =
        serde_json::from_str(&std::fs::read_to_string(dir().join("expected_pairs.json")).unwrap()).unwrap();
    let tok = Tokenizer::from_file(dir().join("tokenizer.json")).unwrap();
    let pairs: Vec<(&str, Option<&str>)> = e.pairs.iter().map(|(a, b)| (a.as_str(), Some(b.as_str()))).collect();
    let got = tok.encode_pairs(&pairs, e.max_length).unwrap();
    assert_eq!(got.input_ids, e.input_ids);
    assert_eq!(got.attention_mask, e.attention_mask);
    assert_eq!(got.token_type_ids, e.token_type_ids);
    assert_eq!(got.truncated, [false, true, true]);
}
