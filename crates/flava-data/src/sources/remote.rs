//! WebDataset shards where large datasets live: `https://` (and `http://`) servers, `s3://` buckets
//! and `gs://` buckets, streamed through [`object_store`] without a local copy.
//!
//! A shard is read as one ranged stream. A connection lost (or silent for
//! [`RemoteOptions::stall`]) part-way through is resumed from the byte it stopped at, on a new
//! request pinned to the same object version (`If-Match` on its ETag), up to
//! [`RemoteOptions::max_resumes`] times in a row without progress; after that the reader fails and
//! the shard ends with a counted `TruncatedMember` skip, like a cut local file. Requests that fail
//! outright (connection refused, 5xx) are retried by object_store with backoff.
//!
//! Credentials and endpoints come from the variables object_store reads: `AWS_*` for `s3://`
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`,
//! `AWS_SKIP_SIGNATURE` for public buckets…) and `GOOGLE_*` for `gs://`
//! (`GOOGLE_SERVICE_ACCOUNT`, `GOOGLE_BASE_URL`, `GOOGLE_SKIP_SIGNATURE`…).
//!
//! The readers block: they drive one shared tokio runtime, and refuse (with an error, not a
//! panic) to run on a thread that is itself inside a tokio runtime.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, ObjectStoreScheme, RetryConfig};
use url::Url;

/// How remote shards are fetched. [`RemoteOptions::from_env`] is what the `flava` CLI uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RemoteOptions {
    /// Store configuration as `(key, value)` pairs in object_store's names, e.g.
    /// `("AWS_REGION", "eu-west-1")` or `("GOOGLE_SKIP_SIGNATURE", "true")`; keys are matched
    /// case-insensitively, those a store does not know are ignored.
    pub vars: Vec<(String, String)>,
    /// A stream that delivers nothing for this long is dropped and resumed (a stalled server).
    pub stall: Duration,
    /// Resumptions in a row without a byte of progress before a shard is given up.
    pub max_resumes: u32,
    /// Retries of one failing request (connection refused, 5xx), by object_store with backoff.
    pub request_retries: usize,
    /// The first backoff between retries and resumptions (doubling, at most 30 s).
    pub backoff: Duration,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            vars: Vec::new(),
            stall: Duration::from_secs(60),
            max_resumes: 5,
            request_retries: 5,
            backoff: Duration::from_millis(200),
        }
    }
}

impl RemoteOptions {
    /// The defaults, with the `AWS_*` and `GOOGLE_*` variables of the environment, and
    /// `FLAVA_REMOTE_STALL_SECS` / `FLAVA_REMOTE_MAX_RESUMES` where set.
    pub fn from_env() -> Self {
        Self::from_vars(std::env::vars())
    }

    /// As [`RemoteOptions::from_env`], from the given variables.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut o = Self::default();
        for (k, v) in vars {
            match k.as_str() {
                "FLAVA_REMOTE_STALL_SECS" => {
                    if let Ok(s) = v.parse::<f64>() {
                        if s.is_finite() && s > 0.0 {
                            o.stall = Duration::from_secs_f64(s);
                        }
                    }
                }
                "FLAVA_REMOTE_MAX_RESUMES" => {
                    if let Ok(n) = v.parse() {
                        o.max_resumes = n;
                    }
                }
                _ if k.starts_with("AWS_") || k.starts_with("GOOGLE_") => o.vars.push((k, v)),
                _ => {}
            }
        }
        o.vars.sort();
        o
    }
}

/// Why a remote shard could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The URL is not one we can read.
    #[error("{url}: {message}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        message: String,
    },
    /// The object does not exist (HTTP 404, no such key).
    #[error("{0}: not found")]
    NotFound(String),
    /// Any other failure (refused, unreachable, denied, timed out), after retries.
    #[error("{url}: {message}")]
    Failed {
        /// The URL.
        url: String,
        /// What happened.
        message: String,
    },
}

/// One runtime for every remote reader: a single worker drives the connections.
fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RT: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("flava-remote")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the I/O runtime: {e}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Runs `f` to completion on the shared runtime, from a blocking thread.
fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, String> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(
            "remote shards are read with blocking I/O; call this from a blocking thread \
                    (tokio::task::spawn_blocking), not from async code"
                .into(),
        );
    }
    Ok(runtime()?.block_on(f))
}

type StoreKey = (String, RemoteOptions);

/// The store for a URL's scheme and bucket (or host), built once per options and reused, so
/// connections and credentials are shared by all shards of a bucket.
fn store_for(url: &str, opts: &RemoteOptions) -> Result<(Arc<dyn ObjectStore>, object_store::path::Path), RemoteError> {
    let bad = |message: String| RemoteError::BadUrl {
        url: url.into(),
        message,
    };
    let parsed = Url::parse(url).map_err(|e| bad(e.to_string()))?;
    let (scheme, path) = ObjectStoreScheme::parse(&parsed).map_err(|e| bad(e.to_string()))?;
    let base = parsed[..url::Position::BeforePath].to_string();
    static STORES: OnceLock<Mutex<HashMap<StoreKey, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let cache = STORES.get_or_init(Default::default);
    let key = (base.clone(), opts.clone());
    if let Some(s) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok((s.clone(), path));
    }
    let retry = RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: opts.backoff,
            max_backoff: Duration::from_secs(30),
            base: 2.0,
        },
        max_retries: opts.request_retries,
        retry_timeout: Duration::from_secs(300),
    };
    // No whole-request timeout: a multi-gigabyte shard takes what it takes; a silent server is
    // caught by the stall timeout of the reader instead.
    let client = ClientOptions::new()
        .with_timeout_disabled()
        .with_connect_timeout(Duration::from_secs(10));
    let vars = |prefix: &'static str| {
        opts.vars
            .iter()
            .filter(move |(k, _)| k.to_ascii_uppercase().starts_with(prefix))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
    };
    let store: Arc<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::Http => Arc::new(
            object_store::http::HttpBuilder::new()
                .with_url(base.clone())
                // The user typed the scheme: http:// is allowed when asked for.
                .with_client_options(client.with_allow_http(true))
                .with_retry(retry)
                .build()
                .map_err(|e| bad(e.to_string()))?,
        ),
        ObjectStoreScheme::AmazonS3 => {
            let mut b = object_store::aws::AmazonS3Builder::new()
                .with_url(url)
                .with_client_options(client)
                .with_retry(retry);
            for (k, v) in vars("AWS_") {
                if let Ok(k) = k.parse() {
                    b = b.with_config(k, v);
                }
            }
            Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            // As object_store's own GCS default: plain http only where GOOGLE_BASE_URL says so.
            let mut b = object_store::gcp::GoogleCloudStorageBuilder::new()
                .with_url(url)
                .with_client_options(client.with_allow_http(true))
                .with_retry(retry);
            for (k, v) in vars("GOOGLE_") {
                if let Ok(k) = k.parse() {
                    b = b.with_config(k, v);
                }
            }
            Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
        }
        other => {
            return Err(bad(format!(
                "{other:?} URLs are not supported (https, http, s3 and gs are)"
            )))
        }
    };
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, store.clone());
    Ok((store, path))
}

fn failed(url: &str, e: impl std::fmt::Display) -> RemoteError {
    RemoteError::Failed {
        url: url.into(),
        message: e.to_string(),
    }
}

fn classify(url: &str, e: object_store::Error) -> RemoteError {
    match e {
        object_store::Error::NotFound { .. } => RemoteError::NotFound(url.into()),
        e => failed(url, e),
    }
}

/// The size in bytes of the object at `url` (one HEAD request); a quick check that a shard
/// exists and the credentials work.
pub fn remote_size(url: &str, opts: &RemoteOptions) -> Result<u64, RemoteError> {
    let (store, path) = store_for(url, opts)?;
    let stall = opts.stall;
    let meta = block_on(async move { tokio::time::timeout(stall, store.head(&path)).await })
        .map_err(|e| failed(url, e))?
        .map_err(|_| failed(url, format!("no answer in {:.0} s", stall.as_secs_f64())))?
        .map_err(|e| classify(url, e))?;
    Ok(meta.size)
}

/// A remote object as a blocking [`Read`], resumed from where it stopped when the connection is
/// lost or stalls (see the module docs).
pub struct RemoteReader {
    url: String,
    store: Arc<dyn ObjectStore>,
    path: object_store::path::Path,
    opts: RemoteOptions,
    /// Total size and version of the object, from the first response.
    size: u64,
    e_tag: Option<String>,
    /// Bytes delivered so far.
    offset: u64,
    stream: Option<BoxStream<'static, object_store::Result<Bytes>>>,
    chunk: Bytes,
    /// Failures since the last byte of progress.
    failures: u32,
    /// Resumptions over the reader's life (logged once at the end).
    resumes: u32,
    logged_end: bool,
}

impl RemoteReader {
    /// Opens `url` (the first request: a missing object or bad credentials fail here).
    pub fn open(url: &str, opts: &RemoteOptions) -> Result<Self, RemoteError> {
        let (store, path) = store_for(url, opts)?;
        let mut r = Self {
            url: url.into(),
            store,
            path,
            opts: opts.clone(),
            size: 0,
            e_tag: None,
            offset: 0,
            stream: None,
            chunk: Bytes::new(),
            failures: 0,
            resumes: 0,
            logged_end: false,
        };
        r.request(None).map_err(|e| match e {
            Request::Store(e) => classify(url, e),
            Request::Other(m) | Request::Changed(m) => failed(url, m),
        })?;
        Ok(r)
    }

    /// The object's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Times the stream was resumed after a lost or stalled connection.
    pub fn resumes(&self) -> u32 {
        self.resumes
    }

    /// Starts a GET: the whole object first, then `from..` pinned to the first response's ETag.
    fn request(&mut self, from: Option<u64>) -> Result<(), Request> {
        let options = GetOptions {
            range: from.map(GetRange::Offset),
            if_match: from.and(self.e_tag.clone()),
            ..Default::default()
        };
        let (store, path, stall) = (self.store.clone(), self.path.clone(), self.opts.stall);
        let result = block_on(async move { tokio::time::timeout(stall, store.get_opts(&path, options)).await })
            .map_err(Request::Other)?
            .map_err(|_| Request::Other(format!("no answer in {:.0} s", stall.as_secs_f64())))?
            .map_err(|e| match e {
                object_store::Error::Precondition { .. } => {
                    Request::Changed("the object changed while it was read (its ETag differs)".into())
                }
                e => Request::Store(e),
            })?;
        if from.is_none() {
            self.size = result.meta.size;
            self.e_tag = result.meta.e_tag.clone();
        } else if result.meta.size != self.size {
            return Err(Request::Changed(format!(
                "the object changed while it was read ({} bytes, then {})",
                self.size, result.meta.size
            )));
        }
        self.stream = Some(result.into_stream());
        Ok(())
    }

    /// Notes a failure; gives up (an I/O error) after too many in a row.
    fn fail(&mut self, why: String) -> io::Result<()> {
        self.stream = None;
        self.failures += 1;
        if self.failures > self.opts.max_resumes {
            return Err(io::Error::other(format!(
                "{}: {why}; gave up at byte {} of {} after {} attempts without progress",
                self.url, self.offset, self.size, self.failures
            )));
        }
        let wait = self
            .opts
            .backoff
            .saturating_mul(1 << (self.failures - 1).min(8))
            .min(Duration::from_secs(30));
        log::warn!(
            "{}: {why} at byte {} of {}; resuming in {:.1} s (attempt {} of {})",
            self.url,
            self.offset,
            self.size,
            wait.as_secs_f64(),
            self.failures,
            self.opts.max_resumes
        );
        std::thread::sleep(wait);
        Ok(())
    }
}

/// Why a request failed: the store said so, something else (a timeout), or the object is no
/// longer the one being read (never retried).
enum Request {
    Store(object_store::Error),
    Other(String),
    Changed(String),
}

impl Read for RemoteReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.chunk.is_empty() {
                let n = out.len().min(self.chunk.len());
                out[..n].copy_from_slice(&self.chunk.split_to(n));
                return Ok(n);
            }
            if self.offset >= self.size {
                if self.resumes > 0 && !self.logged_end {
                    self.logged_end = true;
                    log::info!("{}: read whole after {} resumption(s)", self.url, self.resumes);
                }
                return Ok(0);
            }
            if self.stream.is_none() {
                self.resumes += 1;
                match self.request(Some(self.offset)) {
                    Ok(()) => {}
                    // A changed object cannot be stitched together: stop now.
                    Err(Request::Changed(m)) => return Err(io::Error::other(format!("{}: {m}", self.url))),
                    Err(Request::Store(e)) => {
                        self.fail(e.to_string())?;
                        continue;
                    }
                    Err(Request::Other(m)) => {
                        self.fail(m)?;
                        continue;
                    }
                }
            }
            let stall = self.opts.stall;
            let Some(stream) = self.stream.as_mut() else { continue };
            let next =
                block_on(async { tokio::time::timeout(stall, stream.next()).await }).map_err(io::Error::other)?;
            match next {
                Ok(Some(Ok(bytes))) => {
                    if bytes.is_empty() {
                        continue;
                    }
                    // Never past the size the first response gave (a server that sends more).
                    let take = (self.size - self.offset).min(bytes.len() as u64) as usize;
                    self.offset += take as u64;
                    self.chunk = bytes.slice(..take);
                    self.failures = 0;
                }
                Ok(Some(Err(e))) => self.fail(format!("connection lost ({e})"))?,
                Ok(None) => self.fail("the stream ended early".into())?,
                Err(_) => self.fail(format!("no data for {:.0} s", stall.as_secs_f64()))?,
            }
        }
    }
}
