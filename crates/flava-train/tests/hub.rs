//! Hub ids: a cache in transformers' layout is used without any request; a download from a
//! local server on 127.0.0.1 that answers as the Hub does (`HF_ENDPOINT`), resumed after a
//! connection cut mid-file; a missing repository is a clear 404; `flava embed --model org/name`
//! gives transformers' numbers (1e-4, as `tests/cli.rs`) from the downloaded snapshot.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flava_train::hub::{Hub, HubId};
use sha2::{Digest, Sha256};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flava-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One request as the server saw it: the path and the `Range` header.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
}

/// A minimal Hub: `GET /api/models/ORG/NAME/revision/REV` lists the files, and
/// `GET /ORG/NAME/resolve/REV/FILE` serves them with the headers `hf-hub` reads (`etag`,
/// `x-repo-commit`, `Content-Range`) and honours `Range`. `cut` names files whose first full
/// transfer is cut after half the bytes (the connection closes early).
struct MockHub {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl MockHub {
    fn start(repos: HashMap<String, HashMap<String, Vec<u8>>>, cut: &[&str]) -> MockHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let repos = Arc::new(repos);
        let to_cut = Arc::new(Mutex::new(cut.iter().map(|s| s.to_string()).collect::<Vec<_>>()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (repos, log, to_cut) = (repos.clone(), log.clone(), to_cut.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &repos, &log, &to_cut);
                });
            }
        });
        MockHub { port, seen }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(
    mut stream: TcpStream,
    repos: &HashMap<String, HashMap<String, Vec<u8>>>,
    log: &Mutex<Vec<Seen>>,
    to_cut: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    log.lock().unwrap().push(Seen {
        path: path.clone(),
        range: range.clone(),
    });
    let reply = |stream: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)
    };
    let not_found = |stream: &mut TcpStream| {
        reply(
            stream,
            "404 Not Found",
            &[("x-error-code".into(), "RepositoryNotFound".into())],
            b"{\"error\":\"Repository not found\"}",
        )
    };
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let repo = rest.split("/revision/").next().unwrap_or("");
        return match repos.get(repo) {
            Some(files) => {
                let siblings: Vec<serde_json::Value> =
                    files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
                let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings }).to_string();
                reply(&mut stream, "200 OK", &[], body.as_bytes())
            }
            None => not_found(&mut stream),
        };
    }
    // /ORG/NAME/resolve/REV/FILE
    let Some((repo, rest)) = path.trim_start_matches('/').split_once("/resolve/") else {
        return not_found(&mut stream);
    };
    let Some(data) = repos
        .get(repo)
        .and_then(|files| files.get(rest.split_once('/').map(|(_, f)| f).unwrap_or("")))
    else {
        return not_found(&mut stream);
    };
    let file = rest.split_once('/').map(|(_, f)| f.to_string()).unwrap_or_default();
    let size = data.len();
    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap_or((r, ""));
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().map(|b: usize| b.min(size - 1)).unwrap_or(size - 1);
            (a, b)
        }
        None => (0, size - 1),
    };
    let headers = vec![
        ("etag".to_string(), format!("\"{:x}\"", Sha256::digest(data))),
        ("x-repo-commit".to_string(), COMMIT.to_string()),
        ("Content-Range".to_string(), format!("bytes {start}-{end}/{size}")),
    ];
    let body = &data[start..=end];
    let cut_now = body.len() > 1 && {
        let mut c = to_cut.lock().unwrap();
        let hit = c.iter().position(|f| *f == file);
        hit.map(|i| c.remove(i)).is_some()
    };
    if cut_now {
        // Promise the whole body, send half, hang up.
        let mut head = format!("HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n", body.len());
        for (k, v) in &headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(&body[..body.len() / 2])?;
        stream.flush()?;
        return stream.shutdown(Shutdown::Both);
    }
    reply(&mut stream, "206 Partial Content", &headers, body)
}

/// The files of a directory, by name.
fn files_of(dir: &Path) -> HashMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn hub(cache: &Path, endpoint: &str, retries: usize) -> Hub {
    Hub {
        cache: cache.to_path_buf(),
        endpoint: endpoint.to_string(),
        token: None,
        offline: false,
        progress: false,
        retries,
    }
}

#[test]
fn a_cache_in_transformers_layout_is_used_without_any_request() {
    // models--org--name/{blobs, refs/main, snapshots/COMMIT/* -> ../../blobs/*}, as transformers writes it.
    let cache = temp_dir("layout");
    let repo = cache.join("models--tiny-org--flava-embed");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    for (name, data) in files_of(&fixtures().join("embed_model")) {
        let blob = format!("{:x}", Sha256::digest(&data));
        std::fs::write(repo.join("blobs").join(&blob), &data).unwrap();
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&blob), snap.join(&name)).unwrap();
    }
    // An endpoint nobody listens on: any request would fail.
    let h = hub(&cache, "http://127.0.0.1:9", 0);
    for spec in ["tiny-org/flava-embed", &format!("tiny-org/flava-embed@{COMMIT}")] {
        let dir = h.resolve(Path::new(spec)).unwrap();
        assert_eq!(dir, snap, "{spec}");
    }
    let loaded = flava_fusion::load_flava_model(&snap, &burn::prelude::Device::flex()).unwrap();
    assert_eq!(loaded.report.missing.len(), 0, "{:?}", loaded.report.missing);
    // A local directory wins over an id that looks the same; a broken snapshot is not "cached".
    assert_eq!(
        h.resolve(&fixtures().join("embed_model")).unwrap(),
        fixtures().join("embed_model")
    );
    std::fs::remove_file(repo.join("blobs").join(format!(
        "{:x}",
        Sha256::digest(std::fs::read(fixtures().join("embed_model/model.safetensors")).unwrap())
    )))
    .unwrap();
    assert!(h.cached(&HubId::parse("tiny-org/flava-embed").unwrap()).is_none());
    let offline = Hub {
        offline: true,
        ..h.clone()
    };
    let err = format!("{:#}", offline.resolve(Path::new("tiny-org/flava-embed")).unwrap_err());
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("not in the Hugging Face cache"),
        "{err}"
    );
    let err = format!("{:#}", h.resolve(Path::new("no/such/dir")).unwrap_err());
    assert!(err.contains("no such file or directory"), "{err}");
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn a_download_cut_mid_file_resumes_and_a_missing_repo_is_a_clear_404() {
    let files = files_of(&fixtures().join("embed_model"));
    let weights = files["model.safetensors"].clone();
    let server = MockHub::start(
        HashMap::from([("tiny-org/flava-embed".to_string(), files.clone())]),
        &["model.safetensors"],
    );
    let cache = temp_dir("resume");
    // No retries: the cut ends the first run with a message that says how to go on.
    let first = hub(&cache, &server.endpoint(), 0).resolve(Path::new("tiny-org/flava-embed"));
    let err = format!("{:#}", first.unwrap_err());
    assert!(
        err.contains("model.safetensors") && err.contains("run again to resume"),
        "{err}"
    );
    // The second run continues from the partial file instead of starting over.
    let dir = hub(&cache, &server.endpoint(), 0)
        .resolve(Path::new("tiny-org/flava-embed"))
        .unwrap();
    assert_eq!(dir, cache.join("models--tiny-org--flava-embed/snapshots").join(COMMIT));
    for (name, data) in &files {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), data, "{name}");
    }
    let resumed: Vec<Seen> = server
        .seen()
        .into_iter()
        .filter(|s| s.path.ends_with("/model.safetensors"))
        .filter(|s| s.range.as_deref().is_some_and(|r| r != "bytes=0-0" && r != "bytes=0-"))
        .collect();
    assert_eq!(resumed.len(), 1, "{:?}", server.seen());
    let from: usize = resumed[0].range.as_deref().unwrap()["bytes=".len()..]
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(
        from > 0 && from < weights.len(),
        "resumed from byte {from} of {}",
        weights.len()
    );
    let loaded = flava_fusion::load_flava_model(&dir, &burn::prelude::Device::flex()).unwrap();
    assert!(loaded.report.missing.is_empty());
    // Now cached: no further request.
    let before = server.seen().len();
    hub(&cache, &server.endpoint(), 0)
        .resolve(Path::new("tiny-org/flava-embed"))
        .unwrap();
    assert_eq!(server.seen().len(), before);

    let err = format!(
        "{:#}",
        hub(&cache, &server.endpoint(), 0)
            .resolve(Path::new("tiny-org/flava-missing"))
            .unwrap_err()
    );
    assert!(
        err.contains("HTTP 404") && err.contains("tiny-org/flava-missing"),
        "{err}"
    );
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn flava_embed_takes_a_hub_id_and_matches_transformers() {
    let server = MockHub::start(
        HashMap::from([(
            "tiny-org/flava-embed".to_string(),
            files_of(&fixtures().join("embed_model")),
        )]),
        &[],
    );
    let cache = temp_dir("cli");
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("embed_expected.json")).unwrap()).unwrap();
    let run = |endpoint: &str, offline: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flava"));
        cmd.env("HF_ENDPOINT", endpoint)
            .env("HF_HUB_CACHE", &cache)
            .env_remove("HF_TOKEN")
            .env("HF_HUB_OFFLINE", if offline { "1" } else { "0" })
            .args(["embed", "--json", "--model", "tiny-org/flava-embed", "--max-length"])
            .arg(e["max_length"].to_string());
        for i in e["images"].as_array().unwrap() {
            cmd.arg("--image")
                .arg(fixtures().join("processor").join(i.as_str().unwrap()));
        }
        for t in e["texts"].as_array().unwrap() {
            cmd.args(["--text", t.as_str().unwrap()]);
        }
        cmd.output().unwrap()
    };
    // Online: downloads; then offline, with no server at the endpoint: the cache alone.
    for (endpoint, offline) in [(server.endpoint(), false), ("http://127.0.0.1:9".to_string(), true)] {
        let out = run(&endpoint, offline);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for k in ["image_features", "text_features", "logits_per_image"] {
            let (got, want) = (v[k].as_array().unwrap(), e[k].as_array().unwrap());
            assert_eq!(got.len(), want.len());
            let worst = got
                .iter()
                .zip(want)
                .flat_map(|(a, b)| {
                    let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
                    assert_eq!(a.len(), b.len());
                    a.iter()
                        .zip(b)
                        .map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs())
                        .collect::<Vec<_>>()
                })
                .fold(0.0, f64::max);
            assert!(worst <= 1e-4, "{k}: {worst:.2e} (offline {offline})");
        }
    }
    // Offline with an id that was never fetched: a clear error, not a hang.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flava"));
    let out = cmd
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .args(["embed", "--model", "tiny-org/never-fetched", "--text", "a"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tiny-org/never-fetched") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    std::fs::remove_dir_all(&cache).unwrap();
}
