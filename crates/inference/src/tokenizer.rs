//! Tokenizers built from GGUF metadata, and incremental detokenisation.
//!
//! Two tokenizer models are supported, as llama.cpp names them in `tokenizer.ggml.model`:
//! `gpt2` (byte-level BPE with merges, used by Llama 3, SmolLM, Qwen...) and `llama`
//! (SentencePiece BPE with scores and byte fallback, used by Llama 2, Mistral, Gemma...).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::LoadError;
use crate::gguf::GgufFile;

/// GGUF token types (`tokenizer.ggml.token_type`), as llama.cpp defines them.
mod token_type {
    pub(super) const UNKNOWN: i32 = 2;
    pub(super) const CONTROL: i32 = 3;
    pub(super) const USER_DEFINED: i32 = 4;
}

const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenizer regexes for each `tokenizer.ggml.pre` value, applied in order (as llama.cpp does).
fn pre_patterns(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        "default" | "gpt2" | "gpt-2" | "olmo" | "jais" | "refact" => vec![GPT2_PATTERN],
        "smollm" | "starcoder" | "deepseek-coder" => vec![r"\p{N}", GPT2_PATTERN],
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "smaug-bpe" => {
            vec![LLAMA3_PATTERN]
        }
        "qwen2" | "qwen3" | "deepseek-r1-qwen" | "stablelm2" | "hunyuan" => vec![QWEN2_PATTERN],
        _ => return None,
    })
}

/// A tokenizer plus the special-token facts the engine needs.
#[derive(Debug, Clone)]
pub struct PodTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    eos: Option<u32>,
    stop_tokens: HashSet<u32>,
    bos_text: String,
    eos_text: String,
}

fn strings(file: &GgufFile, key: &str) -> Result<Vec<String>, LoadError> {
    let values = file
        .array(key)
        .ok_or_else(|| LoadError::Metadata { key: key.into() })?;
    values
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<Result<_, _>>()
        .map_err(|_| LoadError::Metadata { key: key.into() })
}

fn numbers<T>(file: &GgufFile, key: &str, f: impl Fn(&Value) -> Option<T>) -> Option<Vec<T>> {
    file.array(key)?.iter().map(f).collect()
}

fn tok_err(e: impl std::fmt::Display) -> LoadError {
    LoadError::Tokenizer(e.to_string())
}

/// Token strings that end a turn in common chat formats; generation stops on any that exists.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
    "</s>",
];

impl PodTokenizer {
    /// Builds the tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, LoadError> {
        let model = file
            .string("tokenizer.ggml.model")
            .ok_or_else(|| LoadError::Metadata {
                key: "tokenizer.ggml.model".into(),
            })?
            .to_owned();
        let tokens = strings(file, "tokenizer.ggml.tokens")?;
        let types: Vec<i32> = numbers(file, "tokenizer.ggml.token_type", |v| v.to_i32().ok())
            .unwrap_or_else(|| vec![1; tokens.len()]);
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();

        let mut inner = match model.as_str() {
            "gpt2" => Self::byte_level_bpe(file, &vocab)?,
            "llama" => Self::sentencepiece_bpe(file, &tokens, &types, &vocab)?,
            other => {
                return Err(LoadError::Tokenizer(format!(
                    "tokenizer model `{other}` is not supported (supported: gpt2, llama)"
                )))
            }
        };

        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| matches!(**t, token_type::CONTROL | token_type::USER_DEFINED))
            .map(|(s, _)| AddedToken::from(s.clone(), true).normalized(false))
            .collect();
        inner.add_special_tokens(&specials);

        let id = |key: &str| {
            file.uint(key)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|v| (*v as usize) < tokens.len())
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let default_add_bos = model == "llama";
        let add_bos = file
            .bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(default_add_bos)
            && bos.is_some();
        let mut stop_tokens: HashSet<u32> = [
            eos,
            id("tokenizer.ggml.eot_token_id"),
            id("tokenizer.ggml.eom_token_id"),
        ]
        .into_iter()
        .flatten()
        .collect();
        for s in END_OF_TURN {
            if let Some(&i) = vocab.get(*s) {
                if types.get(i as usize) == Some(&token_type::CONTROL) {
                    stop_tokens.insert(i);
                }
            }
        }
        let text_of = |t: Option<u32>| {
            t.and_then(|i| tokens.get(i as usize).cloned())
                .unwrap_or_default()
        };
        Ok(Self {
            inner,
            bos,
            add_bos,
            eos,
            stop_tokens,
            bos_text: text_of(bos),
            eos_text: text_of(eos),
        })
    }

    fn byte_level_bpe(
        file: &GgufFile,
        vocab: &HashMap<String, u32>,
    ) -> Result<tokenizers::Tokenizer, LoadError> {
        let merges: Vec<(String, String)> = strings(file, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| LoadError::Tokenizer(format!("malformed merge `{m}`")))
            })
            .collect::<Result<_, _>>()?;
        let pre = file.string("tokenizer.ggml.pre").unwrap_or("default");
        let patterns = pre_patterns(pre).ok_or_else(|| {
            LoadError::Tokenizer(format!("BPE pre-tokenizer `{pre}` is not supported"))
        })?;
        let ignore_merges = matches!(pre, "llama3" | "llama-v3" | "llama-bpe");
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.clone().into_iter().collect::<Vocab>(), merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(tok_err)?;
        let mut pre_tokenizers: Vec<PreTokenizerWrapper> = patterns
            .into_iter()
            .map(|p| {
                Split::new(
                    SplitPattern::Regex(p.to_owned()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map(PreTokenizerWrapper::from)
                .map_err(tok_err)
            })
            .collect::<Result<_, _>>()?;
        pre_tokenizers.push(ByteLevel::new(false, false, false).into());
        let mut tk = tokenizers::Tokenizer::new(bpe);
        tk.with_pre_tokenizer(Some(PreSequence::new(pre_tokenizers)));
        tk.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(tk)
    }

    /// SentencePiece BPE: merges are every split of a vocabulary piece into two pieces, ranked
    /// by the merged piece's score, which reproduces llama.cpp's greedy highest-score merging.
    fn sentencepiece_bpe(
        file: &GgufFile,
        tokens: &[String],
        types: &[i32],
        vocab: &HashMap<String, u32>,
    ) -> Result<tokenizers::Tokenizer, LoadError> {
        let scores: Vec<f32> = numbers(file, "tokenizer.ggml.scores", |v| v.to_f32().ok())
            .ok_or_else(|| LoadError::Metadata {
                key: "tokenizer.ggml.scores".into(),
            })?;
        let mut merges: Vec<(f32, u32, String, String)> = Vec::new();
        for (id, piece) in tokens.iter().enumerate() {
            if types.get(id).copied().unwrap_or(1) != 1 {
                continue;
            }
            for (split, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(split);
                if vocab.contains_key(l) && vocab.contains_key(r) {
                    let score = scores.get(id).copied().unwrap_or(0.0);
                    merges.push((score, id as u32, l.to_owned(), r.to_owned()));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let merges = merges.into_iter().map(|(_, _, l, r)| (l, r)).collect();
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab.clone().into_iter().collect::<Vocab>(), merges)
            .byte_fallback(true);
        if let Some(unk) = types
            .iter()
            .position(|t| *t == token_type::UNKNOWN)
            .and_then(|i| tokens.get(i))
        {
            builder = builder.unk_token(unk.clone());
        }
        let bpe = builder.build().map_err(tok_err)?;
        let add_space_prefix = file.bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
        let mut normalizers = vec![Replace::new(" ", "\u{2581}").map_err(tok_err)?.into()];
        if add_space_prefix {
            normalizers.insert(0, Prepend::new("\u{2581}".into()).into());
        }
        let mut decoders: Vec<DecoderWrapper> = vec![
            Replace::new("\u{2581}", " ").map_err(tok_err)?.into(),
            ByteFallback::default().into(),
            Fuse::default().into(),
        ];
        if add_space_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        let mut tk = tokenizers::Tokenizer::new(bpe);
        tk.with_normalizer(Some(NormalizerSequence::new(normalizers)));
        tk.with_decoder(Some(DecoderSequence::new(decoders)));
        Ok(tk)
    }

    /// A tokenizer whose tokens are `words` split on whitespace (token id = index), `words[eos]`
    /// ending completions; no BOS. For tests of what surrounds the models.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn word_level(words: &[String], eos: u32) -> Result<Self, LoadError> {
        use tokenizers::models::wordlevel::WordLevel;
        use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;

        let vocab = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.clone(), i as u32))
            .collect();
        let eos_text = words
            .get(eos as usize)
            .cloned()
            .ok_or_else(|| LoadError::Tokenizer(format!("no word for EOS id {eos}")))?;
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token(eos_text.clone())
            .build()
            .map_err(tok_err)?;
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(WhitespaceSplit));
        Ok(Self {
            inner,
            bos: None,
            add_bos: false,
            eos: Some(eos),
            stop_tokens: HashSet::from([eos]),
            bos_text: String::new(),
            eos_text,
        })
    }

    /// Token ids of `text`, special tokens written in the text matched whole. A BOS token is
    /// prepended when the model asks for one and the text does not already start with it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| e.to_string())?;
        let mut ids = enc.get_ids().to_vec();
        if self.add_bos {
            if let Some(bos) = self.bos {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.inner.decode(ids, true).map_err(|e| e.to_string())
    }

    /// The text of one token as the vocabulary spells it (for logprob listings).
    pub fn token_piece(&self, id: u32) -> String {
        self.inner
            .decode(&[id], false)
            .unwrap_or_else(|_| self.inner.id_to_token(id).unwrap_or_default())
    }

    /// Number of tokens in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether generating `id` ends the completion (EOS or an end-of-turn token).
    pub fn is_stop_token(&self, id: u32) -> bool {
        self.stop_tokens.contains(&id)
    }

    /// Whether [`PodTokenizer::encode`] prepends a BOS token.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// The BOS token's text, for chat templates.
    pub fn bos_text(&self) -> &str {
        &self.bos_text
    }

    /// The EOS token's text, for chat templates.
    pub fn eos_text(&self) -> &str {
        &self.eos_text
    }

    /// The EOS token id, if the model has one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Starts an incremental decoder for a completion.
    pub fn stream(self: &Arc<Self>) -> DecodeStream {
        DecodeStream {
            tokenizer: Arc::clone(self),
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }
}

/// Turns generated token ids into text piece by piece, never splitting a UTF-8 character and
/// keeping the spacing a full decode would give.
#[derive(Debug)]
pub struct DecodeStream {
    tokenizer: Arc<PodTokenizer>,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl DecodeStream {
    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, String> {
        self.ids.push(id);
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = self.tokenizer.decode(&self.ids[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let text = after
                .get(before.len()..)
                .map(str::to_owned)
                .unwrap_or_default();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(text))
        } else {
            Ok(None)
        }
    }
}
