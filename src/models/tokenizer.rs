//! The CLIP tokenizer of Stable Diffusion (`<model>/tokenizer`), built with the `tokenizers` crate
//! from the folder's `vocab.json` and `merges.txt` exactly as transformers' `CLIPTokenizer` builds
//! it: NFC, whitespace runs → one space, lower case; CLIP's split pattern then byte-level
//! symbols; byte-level BPE with the `</w>` end-of-word suffix; `<|startoftext|> … <|endoftext|>`
//! around every prompt; truncation and padding to `model_max_length` (77 for SD), as SD pipelines
//! call it.
use std::path::Path;

use serde_json::Value;
use tch::{Device, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

use super::diffusers::read_json;
use crate::{Error, Result};

/// CLIP's pre-tokenization pattern (transformers' `CLIPTokenizer`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP BPE tokenizer with SD's truncation and padding.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    /// Sequence length after truncation and padding (`model_max_length`).
    pub max_length: usize,
    /// Id of `<|startoftext|>`.
    pub bos_id: u32,
    /// Id of `<|endoftext|>`.
    pub eos_id: u32,
    /// Id of the padding token (`<|endoftext|>` for SD1.x, `!` for SD2.x).
    pub pad_id: u32,
}

fn tok_err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::format(path, format!("{what}: {e}"))
}

/// A special token's text from `tokenizer_config.json` / `special_tokens_map.json`: a string, or an
/// object with `content`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Loads `dir` (`vocab.json`, `merges.txt`, optionally `tokenizer_config.json` and
    /// `special_tokens_map.json` for `model_max_length` and the special tokens).
    pub fn load(dir: &Path) -> Result<Self> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for f in [&vocab, &merges] {
            if !f.is_file() {
                return Err(Error::format(dir, format!("no {} here: not a CLIP tokenizer folder", f.display())));
            }
        }
        let mut settings = serde_json::Map::new();
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let p = dir.join(name);
            if p.is_file() {
                if let Value::Object(m) = read_json(&p)? {
                    settings.extend(m);
                }
            }
        }
        let bos = token_text(settings.get("bos_token")).unwrap_or_else(|| "<|startoftext|>".into());
        let eos = token_text(settings.get("eos_token")).unwrap_or_else(|| "<|endoftext|>".into());
        let unk = token_text(settings.get("unk_token")).unwrap_or_else(|| eos.clone());
        let pad = token_text(settings.get("pad_token")).unwrap_or_else(|| eos.clone());
        let max_length =
            settings.get("model_max_length").and_then(Value::as_u64).filter(|&m| m < 1 << 20).unwrap_or(77) as usize;

        let (v, m) = (vocab.to_string_lossy().into_owned(), merges.to_string_lossy().into_owned());
        let bpe = BPE::from_file(&v, &m)
            .end_of_word_suffix("</w>".into())
            .unk_token(unk)
            .build()
            .map_err(|e| tok_err(dir, "cannot build the BPE model from vocab.json and merges.txt", e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
                .map_err(|e| tok_err(dir, "normalizer", e))?
                .into(),
            Lowercase.into(),
        ]);
        tokenizer.with_normalizer(Some(normalizer)).map_err(|e| tok_err(dir, "normalizer", e))?;
        let split = Split::new(SplitPattern::Regex(CLIP_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| tok_err(dir, "pre-tokenizer", e))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        let id = |t: &str| -> Result<u32> {
            tokenizer.token_to_id(t).ok_or_else(|| Error::format(&vocab, format!("has no token {t:?}")))
        };
        let (bos_id, eos_id, pad_id) = (id(&bos)?, id(&eos)?, id(&pad)?);
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new((eos.clone(), eos_id), (bos.clone(), bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        tokenizer
            .add_special_tokens([AddedToken::from(bos, true), AddedToken::from(eos, true)])
            .map_err(|e| tok_err(dir, "special tokens", e))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| tok_err(dir, "truncation", e))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad,
        }));
        Ok(Self { tokenizer, max_length, bos_id, eos_id, pad_id })
    }

    /// The ids of `prompt`, with the start and end tokens, neither truncated nor padded.
    pub fn encode_unpadded(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut t = self.tokenizer.clone();
        t.with_padding(None);
        t.with_truncation(None).map_err(|e| Error::Config(format!("tokenizer: {e}")))?;
        let enc = t.encode(prompt, true).map_err(|e| Error::Config(format!("cannot tokenize {prompt:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The ids of `prompt` truncated and padded to `max_length`, as SD pipelines tokenize.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| Error::Config(format!("cannot tokenize {prompt:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `input_ids` [B, max_length] (int64 on `device`) for a batch of prompts.
    pub fn encode_batch(&self, prompts: &[&str], device: Device) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(prompts.len() * self.max_length);
        for p in prompts {
            ids.extend(self.encode(p)?.into_iter().map(i64::from));
        }
        Ok(Tensor::f_from_slice(&ids)?.f_view([prompts.len() as i64, self.max_length as i64])?.f_to_device(device)?)
    }
}
