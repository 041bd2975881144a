//! Text to token ids and back: a `tokenizer.json` (Hugging Face `tokenizers` format) read with
//! the pure-Rust `tokenizers` crate.
//!
//! Where the tokenizer comes from ([`Tokenizer::for_model`]), first match wins:
//! 1. `tokenizer.json` in the model's directory (beside `config.json` and the weights);
//! 2. for a Hugging Face repo id, the repo's `tokenizer.json` (cache, or downloaded);
//! 3. the GPT-NeoX-20B tokenizer (`EleutherAI/gpt-neox-20b`), which the published Mamba
//!    models use but do not ship, from the cache or downloaded; only for models whose
//!    vocabulary holds it (50,277 ids).
//!
//! `HF_HUB_OFFLINE=1` keeps steps 2 and 3 to the local cache, as for the weights.

use crate::model::Error;
use std::path::{Path, PathBuf};

/// The tokenizer of the published Mamba models.
pub const NEOX_REPO: &str = "EleutherAI/gpt-neox-20b";
/// The file name of a tokenizer in a model directory or repo.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Tokens that end a document in the usual vocabularies, tried in order for the eos id.
const EOS_NAMES: &[&str] = &["<|endoftext|>", "</s>", "<eos>", "[EOS]"];

/// A loaded tokenizer and where it came from.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .finish()
    }
}

impl Tokenizer {
    /// Reads a `tokenizer.json`, or the one in directory `path`.
    pub fn from_path(path: &Path) -> Result<Tokenizer, Error> {
        let file = if path.is_dir() {
            path.join(TOKENIZER_FILE)
        } else {
            path.to_path_buf()
        };
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| Error::Tokenizer(format!("cannot read {}: {e}", file.display())))?;
        Ok(Tokenizer { inner, path: file })
    }

    /// The tokenizer for a model (see the module doc for the lookup order). `spec` is what
    /// the model was loaded from, `dir` its weights' directory, `vocab` its (padded)
    /// vocabulary size; `hub` allows steps 2 and 3. `Ok(None)` when there is none; the
    /// error of a tokenizer that exists but cannot be read is returned.
    pub fn for_model(
        spec: &str,
        dir: Option<&Path>,
        vocab: usize,
        hub: bool,
    ) -> Result<Option<Tokenizer>, Error> {
        if let Some(d) = dir
            && d.join(TOKENIZER_FILE).is_file()
        {
            return Tokenizer::from_path(&d.join(TOKENIZER_FILE)).map(Some);
        }
        if !hub {
            return Ok(None);
        }
        let offline = runtime::weights::hub_offline();
        let cache = runtime::weights::hub_cache();
        let is_repo = !Path::new(spec).exists() && runtime::weights::is_repo_id(spec);
        if is_repo
            && let Ok(p) = runtime::weights::resolve_file(spec, TOKENIZER_FILE, offline, &cache)
        {
            return Tokenizer::from_path(&p).map(Some);
        }
        if vocab >= 50_277
            && let Ok(p) =
                runtime::weights::resolve_file(NEOX_REPO, TOKENIZER_FILE, offline, &cache)
        {
            let t = Tokenizer::from_path(&p)?;
            if t.vocab_size() <= vocab {
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    /// Where the lookup of [`Tokenizer::for_model`] searched (`looked in ...`), for an error
    /// message.
    pub fn searched(spec: &str, dir: Option<&Path>, vocab: usize) -> String {
        let mut places = Vec::new();
        if let Some(d) = dir {
            places.push(d.join(TOKENIZER_FILE).display().to_string());
        }
        if !Path::new(spec).exists() && runtime::weights::is_repo_id(spec) {
            places.push(format!("the hub repo {spec}"));
        }
        if vocab >= 50_277 {
            places.push(format!("the hub repo {NEOX_REPO}"));
        }
        let offline = if runtime::weights::hub_offline() && places.iter().any(|p| p.contains("hub"))
        {
            "; HF_HUB_OFFLINE=1: the hub only through its local cache"
        } else {
            ""
        };
        if places.is_empty() {
            "a preset with random weights has none".into()
        } else {
            format!("looked in {}{offline}", places.join(", "))
        }
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ids including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` (with the tokenizer's special tokens, as `tokenizer(text)` does
    /// in Python).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, Error> {
        self.inner
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer(format!("cannot encode the text: {e}")))
    }

    /// The text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, Error> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(format!("cannot decode {ids:?}: {e}")))
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The end-of-text token id (`<|endoftext|>`, `</s>`, ...), if there is one.
    pub fn eos_token_id(&self) -> Option<u32> {
        EOS_NAMES.iter().find_map(|n| self.token_id(n))
    }
}
