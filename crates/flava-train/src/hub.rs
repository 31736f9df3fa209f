//! Hugging Face Hub model ids wherever a model directory is accepted (`--model`, `--init`,
//! `--codebook`): `facebook/flava-full` or `org/name@revision` is looked up in the local
//! Hugging Face cache (the `models--org--name/snapshots/COMMIT/` layout that transformers
//! writes) and, when missing there, downloaded into it with `hf-hub` (progress bar, resumable:
//! an interrupted file continues from its `.part` on the next run).
//!
//! The environment is the one `huggingface_hub` reads: `HF_HUB_CACHE`, `HF_HOME`,
//! `HF_ENDPOINT`, `HF_TOKEN` (or the token file), `HF_HUB_OFFLINE`.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use flava_fusion::checkpoint::WEIGHT_FILES;
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

/// The Hub's own address, used when `HF_ENDPOINT` is unset.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Files of a model repository that flava-rs reads, besides the weights (one of
/// [`WEIGHT_FILES`], safetensors preferred); those the repository has are fetched.
pub const MODEL_FILES: [&str; 6] = [
    "config.json",
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
];

/// What [`Hub::explain`] calls the repository listing.
const FILE_LIST: &str = "the file list";

/// A model repository on the Hub and a revision (branch, tag or commit; `main` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `org/name`.
    pub repo: String,
    /// Branch, tag or 40-hex commit.
    pub revision: String,
}

impl HubId {
    /// Parses `org/name` or `org/name@revision`; `None` for anything that is not one (paths
    /// with more or fewer components, `.`/`..`, characters the Hub does not allow).
    pub fn parse(s: &str) -> Option<HubId> {
        let (repo, revision) = match s.split_once('@') {
            Some((r, v)) if !v.is_empty() && !v.contains("..") => (r, v),
            Some(_) => return None,
            None => (s, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 96
                && !p.starts_with(['.', '-'])
                && !p.ends_with(['.', '-'])
                && !p.contains("--")
                && !p.contains("..")
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        (part_ok(org) && part_ok(name)).then(|| HubId {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The cache folder of the repository: `models--org--name`.
    pub fn cache_folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

impl fmt::Display for HubId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.revision == "main" {
            write!(f, "{}", self.repo)
        } else {
            write!(f, "{}@{}", self.repo, self.revision)
        }
    }
}

/// Where models are looked up and fetched from.
#[derive(Debug, Clone)]
pub struct Hub {
    /// The hub cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache: PathBuf,
    /// Base URL of the Hub (`HF_ENDPOINT`).
    pub endpoint: String,
    /// Bearer token for gated or private repositories (`HF_TOKEN`, else the token file).
    pub token: Option<String>,
    /// Use the cache only (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Show a progress bar per file.
    pub progress: bool,
    /// Retries of a failed transfer within one run (each resumes where the last stopped).
    pub retries: usize,
}

impl Hub {
    /// Settings from the process environment.
    pub fn from_env() -> Hub {
        Hub::from_vars(|k| std::env::var(k).ok())
    }

    /// Settings from a variable lookup (the environment, or a map in tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Hub {
        let set = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let hf_home = set("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            set("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| set("HOME").map(|h| Path::new(&h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache = set("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = set("HF_TOKEN").map(|t| t.trim().to_string()).or_else(|| {
            let file = set("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(file)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = set("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"));
        Hub {
            cache,
            endpoint: set("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
                .trim_end_matches('/')
                .to_string(),
            token,
            offline,
            progress: true,
            retries: 3,
        }
    }

    /// A model argument as a local directory: the path itself when it exists; else, when it
    /// reads as a Hub id, the cached snapshot, downloaded first if missing.
    pub fn resolve(&self, arg: &Path) -> anyhow::Result<PathBuf> {
        if arg.exists() {
            return Ok(arg.to_path_buf());
        }
        let id = arg.to_str().and_then(HubId::parse).with_context(|| {
            format!(
                "{}: no such file or directory (nor a Hugging Face Hub id such as facebook/flava-full)",
                arg.display()
            )
        })?;
        if let Some(dir) = self.cached(&id) {
            log::info!("{id}: from the Hugging Face cache, {}", dir.display());
            return Ok(dir);
        }
        if self.offline {
            anyhow::bail!(
                "{id}: not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set; download it \
                 once online, or give a local directory",
                self.cache.display()
            );
        }
        self.download(&id)
    }

    /// The cached snapshot of `id` when it holds a configuration and weights.
    pub fn cached(&self, id: &HubId) -> Option<PathBuf> {
        let repo_dir = self.cache.join(id.cache_folder());
        let is_commit = id.revision.len() == 40 && id.revision.chars().all(|c| c.is_ascii_hexdigit());
        let commit = if is_commit {
            id.revision.clone()
        } else {
            std::fs::read_to_string(repo_dir.join("refs").join(&id.revision))
                .ok()?
                .trim()
                .to_string()
        };
        let snapshot = repo_dir.join("snapshots").join(commit);
        // `is_file` follows the snapshot's links to the blobs: a dangling one is not complete.
        let complete =
            snapshot.join("config.json").is_file() && WEIGHT_FILES.iter().any(|w| snapshot.join(w).is_file());
        complete.then_some(snapshot)
    }

    /// Downloads the configuration, weights, tokenizer and processor files of `id` into the
    /// cache and returns the snapshot directory.
    pub fn download(&self, id: &HubId) -> anyhow::Result<PathBuf> {
        let api = ApiBuilder::from_cache(Cache::new(self.cache.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(self.progress)
            .with_retries(self.retries)
            .build()
            .context("setting up the Hugging Face Hub client")?;
        let repo = api.repo(Repo::with_revision(
            id.repo.clone(),
            RepoType::Model,
            id.revision.clone(),
        ));
        let info = repo.info().map_err(|e| self.explain(e, id, FILE_LIST))?;
        let names: HashSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        let weights = WEIGHT_FILES.iter().find(|w| names.contains(**w)).with_context(|| {
            format!(
                "{id} on {} has no {}: not a transformers checkpoint flava-rs can load",
                self.endpoint,
                WEIGHT_FILES.join(" or ")
            )
        })?;
        if !names.contains("config.json") {
            anyhow::bail!("{id} on {} has no config.json", self.endpoint);
        }
        log::info!("{id}: downloading from {} into {}", self.endpoint, self.cache.display());
        let mut snapshot = None;
        for file in std::iter::once(*weights).chain(MODEL_FILES.into_iter().filter(|f| names.contains(f))) {
            let path = repo.get(file).map_err(|e| self.explain(e, id, file))?;
            snapshot = path.parent().map(Path::to_path_buf);
        }
        snapshot.with_context(|| format!("{id}: nothing downloaded"))
    }

    /// A clear message for a failed Hub request.
    fn explain(&self, e: ApiError, id: &HubId, what: &str) -> anyhow::Error {
        let status = match &e {
            ApiError::RequestError(r) => match r.as_ref() {
                ureq::Error::Status(code, _) => Some(*code),
                ureq::Error::Transport(_) => None,
            },
            ApiError::TooManyRetries(inner) => match inner.as_ref() {
                ApiError::RequestError(r) => match r.as_ref() {
                    ureq::Error::Status(code, _) => Some(*code),
                    ureq::Error::Transport(_) => None,
                },
                _ => None,
            },
            _ => None,
        };
        let base = format!("{id}: fetching {what} from {}", self.endpoint);
        match status {
            Some(404) => anyhow::anyhow!(
                "{base}: not found (HTTP 404); check the model id and revision, or give a local directory"
            ),
            Some(code @ (401 | 403)) => anyhow::anyhow!(
                "{base}: access denied (HTTP {code}); the repository is gated or private: set HF_TOKEN to a token \
                 that has access{}",
                if self.token.is_some() {
                    " (the one given was refused)"
                } else {
                    ""
                }
            ),
            Some(code) => anyhow::anyhow!("{base}: HTTP {code}"),
            None if what == FILE_LIST => anyhow::anyhow!(
                "{base} failed: {e}; check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache \
                 ({}) only",
                self.cache.display()
            ),
            None => anyhow::anyhow!(
                "{base} failed: {e}; run again to resume (partial files are kept in {}), or set HF_HUB_OFFLINE=1 \
                 to use the cache only",
                self.cache.display()
            ),
        }
    }
}

/// [`Hub::resolve`] with the settings of the environment.
pub fn resolve(arg: &Path) -> anyhow::Result<PathBuf> {
    Hub::from_env().resolve(arg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_paths_do_not() {
        let id = HubId::parse("facebook/flava-full").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str()),
            ("facebook/flava-full", "main")
        );
        assert_eq!(id.cache_folder(), "models--facebook--flava-full");
        let pinned = HubId::parse("facebook/flava-full@refs/pr/3").unwrap();
        assert_eq!(pinned.revision, "refs/pr/3");
        assert_eq!(pinned.to_string(), "facebook/flava-full@refs/pr/3");
        for not_an_id in [
            "runs",
            "/abs/dir",
            "a/b/c",
            "./x",
            "../x",
            "a/",
            "/b",
            "org/na me",
            "org/..",
            "org/x@",
            "org/x@../../etc",
            "-org/x",
        ] {
            assert_eq!(HubId::parse(not_an_id), None, "{not_an_id}");
        }
    }

    #[test]
    fn environment_is_read_as_huggingface_hub_reads_it() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let h = Hub::from_vars(vars(&[("HOME", "/home/u")]));
        assert_eq!(h.cache, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(h.endpoint, DEFAULT_ENDPOINT);
        assert!(!h.offline && h.token.is_none());
        let h = Hub::from_vars(vars(&[
            ("HOME", "/home/u"),
            ("HF_HOME", "/data/hf"),
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("HF_TOKEN", " hf_abc \n"),
            ("HF_HUB_OFFLINE", "True"),
        ]));
        assert_eq!(h.cache, PathBuf::from("/data/hf/hub"));
        assert_eq!(h.endpoint, "http://127.0.0.1:9");
        assert_eq!(h.token.as_deref(), Some("hf_abc"));
        assert!(h.offline);
        let h = Hub::from_vars(vars(&[
            ("HF_HOME", "/data/hf"),
            ("HF_HUB_CACHE", "/fast/hub"),
            ("HF_HUB_OFFLINE", "0"),
        ]));
        assert_eq!(h.cache, PathBuf::from("/fast/hub"));
        assert!(!h.offline);
    }
}
