//! WebDataset shards at `http://`, `s3://` and `gs://` URLs, served by a small HTTP server on
//! 127.0.0.1 that answers the way web servers, S3 (path-style) and GCS (XML API) do: ranged GETs,
//! ETags, `If-Match`. Connections are cut or stalled mid-shard on purpose; every read must give
//! the records of the same shard read from disk, or a counted skip, in bounded time.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use flava_data::sources::remote::RemoteOptions;
use flava_data::sources::{Record, ShardSource, SkipReason, Source, SourceError};
use flava_data::spec::{open_source, SourceOptions};
use flava_data::task::Task;

/// What the server does with an object's GETs.
#[derive(Clone, Copy, Debug)]
enum Behaviour {
    Normal,
    /// The first GET sends this many body bytes, then closes the connection.
    CutOnce(usize),
    /// Every GET stops at this absolute byte offset and closes.
    CutAlwaysAt(usize),
    /// The first GET sends this many bytes, then goes silent (for 20 s).
    StallOnce(usize),
    /// The first GET is cut here; the object is replaced (new ETag) before the next request.
    ChangeAfterCut(usize),
    /// The first GET is cut here; later ones ignore `Range` and send the whole object again.
    CutOnceIgnoringRanges(usize),
}

#[derive(Clone, Debug)]
struct Logged {
    method: String,
    path: String,
    range: Option<String>,
}

#[derive(Default)]
struct State {
    objects: HashMap<String, (Vec<u8>, u32, Behaviour)>,
    gets: HashMap<String, u32>,
    log: Vec<Logged>,
}

struct Server {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || serve(conn, st));
            }
        });
        Server { port, state }
    }

    fn put(&self, path: &str, data: Vec<u8>, behaviour: Behaviour) {
        self.state
            .lock()
            .unwrap()
            .objects
            .insert(path.into(), (data, 1, behaviour));
    }

    fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn serve(conn: TcpStream, st: Arc<Mutex<State>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let path = percent_decode(target.split('?').next().unwrap());
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let range = headers.get("range").cloned();
        let mut s = st.lock().unwrap();
        s.log.push(Logged {
            method: method.clone(),
            path: path.clone(),
            range: range.clone(),
        });
        let Some((data, version, behaviour)) = s.objects.get(&path).cloned() else {
            drop(s);
            let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            continue;
        };
        let etag = format!("\"v{version}\"");
        if let Some(m) = headers.get("if-match") {
            if *m != etag {
                drop(s);
                let _ = conn.write_all(b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\n\r\n");
                continue;
            }
        }
        let n = if method == "GET" {
            let e = s.gets.entry(path.clone()).or_insert(0);
            *e += 1;
            *e
        } else {
            0
        };
        if let (Behaviour::ChangeAfterCut(_), true) = (behaviour, n == 1) {
            // Replaced right after this first answer: later requests see version 2.
            let mut changed = data.clone();
            changed.reverse();
            s.objects.insert(path.clone(), (changed, version + 1, behaviour));
        }
        drop(s);
        let total = data.len();
        let start = range.as_deref().and_then(|r| r.strip_prefix("bytes=")).map(|r| {
            let (a, b) = r.split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b: usize = if b.is_empty() { total - 1 } else { b.parse().unwrap() };
            (a, b.min(total - 1))
        });
        let start = if matches!(behaviour, Behaviour::CutOnceIgnoringRanges(_)) {
            None
        } else {
            start
        };
        let (status, lo, hi) = match start {
            Some((a, b)) => ("206 Partial Content", a, b + 1),
            None => ("200 OK", 0, total),
        };
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nETag: {etag}\r\nLast-Modified: Thu, 03 Dec 2026 07:00:00 GMT\r\nAccept-Ranges: bytes\r\n",
            hi - lo
        );
        if start.is_some() {
            head += &format!("Content-Range: bytes {lo}-{}/{total}\r\n", hi - 1);
        }
        head += "\r\n";
        if conn.write_all(head.as_bytes()).is_err() {
            return;
        }
        if method == "HEAD" {
            continue;
        }
        let body = &data[lo..hi];
        let cut = match behaviour {
            Behaviour::Normal => None,
            Behaviour::CutOnce(k) | Behaviour::ChangeAfterCut(k) | Behaviour::CutOnceIgnoringRanges(k) if n == 1 => {
                Some((k, false))
            }
            Behaviour::StallOnce(k) if n == 1 => Some((k, true)),
            Behaviour::CutAlwaysAt(k) => Some((k.saturating_sub(lo), false)),
            _ => None,
        };
        match cut {
            Some((k, stall)) if k < body.len() => {
                let _ = conn.write_all(&body[..k]);
                let _ = conn.flush();
                if stall {
                    std::thread::sleep(Duration::from_secs(20));
                }
                let _ = conn.shutdown(std::net::Shutdown::Both);
                return;
            }
            _ => {
                if conn.write_all(body).is_err() {
                    return;
                }
            }
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flava-remote-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A shard of `n` samples (a 40x30 PNG of distinct noise and a caption each), as file bytes.
fn shard_bytes(dir: &std::path::Path, name: &str, n: usize, seed: u8) -> Vec<u8> {
    let mut members = Vec::new();
    for i in 0..n {
        let img = image::RgbImage::from_fn(40, 30, |x, y| {
            let v = (x * 31 + y * 17 + i as u32 * 101 + seed as u32 * 7) as u8;
            image::Rgb([v, v.wrapping_mul(3), v ^ 0x5a])
        });
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        members.push((format!("s{seed}_{i:04}.png"), png.into_inner()));
        members.push((
            format!("s{seed}_{i:04}.txt"),
            format!("caption {i} of shard {seed}").into_bytes(),
        ));
    }
    let refs: Vec<(&str, Vec<u8>)> = members.iter().map(|(a, b)| (a.as_str(), b.clone())).collect();
    let path = dir.join(name);
    common::write_tar(&path, &refs, None);
    std::fs::read(&path).unwrap()
}

/// (key, text, image bytes) of the samples, and the skips' reasons.
type Seen = (Vec<(String, Option<String>, Vec<u8>)>, Vec<SkipReason>);

fn summarise(records: Vec<Record>) -> Seen {
    let mut samples = Vec::new();
    let mut skips = Vec::new();
    for r in records {
        match r {
            Record::Sample(s) => {
                let img = match s.image {
                    Some(flava_data::sources::ImageData::Encoded(b)) => b,
                    _ => Vec::new(),
                };
                samples.push((s.key, s.text, img));
            }
            Record::Skipped { reason, .. } => skips.push(reason),
        }
    }
    (samples, skips)
}

/// Keys are prefixed by nothing shard-specific, so local and remote reads compare directly.
fn local(dir: &std::path::Path, name: &str) -> Seen {
    summarise(ShardSource::read_shard(&dir.join(name)))
}

/// Short retries; a stall timeout long enough that a loaded CI machine never trips it by accident.
fn quick() -> RemoteOptions {
    RemoteOptions {
        stall: Duration::from_secs(5),
        max_resumes: 3,
        request_retries: 1,
        backoff: Duration::from_millis(20),
        ..Default::default()
    }
}

fn drain(src: &mut dyn Source) -> Seen {
    src.start_epoch(0);
    let mut out = Vec::new();
    while let Some(r) = src.next_record() {
        out.push(r);
    }
    summarise(out)
}

#[test]
fn http_shards_stream_like_the_same_files_on_disk() {
    let d = scratch("http");
    let srv = Server::start();
    let a = shard_bytes(&d, "000.tar", 12, 0);
    let b = shard_bytes(&d, "001.tar", 7, 1);
    srv.put("/data/000.tar", a, Behaviour::Normal);
    srv.put("/data/001.tar", b, Behaviour::Normal);
    let pattern = format!("{}/data/{{000..001}}.tar", srv.base());
    // Through the spec parser, as `flava pretrain --pairs URL` opens it.
    let opts = SourceOptions {
        shuffle_buffer: 0,
        ..Default::default()
    };
    let mut src = open_source(&pattern, Task::Pairs, &opts).unwrap();
    let (samples, skips) = drain(src.as_mut());
    let (mut want, _) = local(&d, "000.tar");
    want.extend(local(&d, "001.tar").0);
    assert_eq!(samples.len(), 19);
    assert_eq!(samples, want);
    assert!(skips.is_empty(), "{skips:?}");
    // One HEAD for the first shard at open, one whole GET per shard, no ranges.
    let log = srv.log();
    assert_eq!(log.iter().filter(|l| l.method == "GET").count(), 2, "{log:?}");
    assert!(log.iter().all(|l| l.range.is_none()), "{log:?}");
}

#[test]
fn a_connection_cut_mid_shard_resumes_from_the_byte_it_stopped_at() {
    let d = scratch("cut");
    let srv = Server::start();
    let bytes = shard_bytes(&d, "000.tar", 20, 2);
    let cut = bytes.len() / 2 + 123;
    srv.put("/c/000.tar", bytes, Behaviour::CutOnce(cut));
    let url = format!("{}/c/000.tar", srv.base());
    let got = summarise(ShardSource::read_shard_at(&url, &quick()));
    assert_eq!(got, local(&d, "000.tar"));
    assert_eq!(got.0.len(), 20);
    // The second GET asked for the rest only: a range from the cut, never from 0 again.
    let gets: Vec<_> = srv.log().into_iter().filter(|l| l.method == "GET").collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(gets[0].range.is_none());
    let r = gets[1].range.as_deref().unwrap();
    assert!(r.starts_with(&format!("bytes={cut}-")), "{r} (cut at {cut})");
}

#[test]
fn a_stalled_server_is_dropped_after_the_stall_timeout_and_the_shard_resumed() {
    let d = scratch("stall");
    let srv = Server::start();
    let bytes = shard_bytes(&d, "000.tar", 10, 3);
    let at = bytes.len() / 3;
    srv.put("/s/000.tar", bytes, Behaviour::StallOnce(at));
    let url = format!("{}/s/000.tar", srv.base());
    let t = Instant::now();
    let opts = RemoteOptions {
        stall: Duration::from_millis(700),
        ..quick()
    };
    let got = summarise(ShardSource::read_shard_at(&url, &opts));
    // The server stays silent for 20 s; the reader gave up on it after 0.7 s.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(got, local(&d, "000.tar"));
    let gets: Vec<_> = srv.log().into_iter().filter(|l| l.method == "GET").collect();
    assert!(
        gets[1].range.as_deref().unwrap().starts_with(&format!("bytes={at}-")),
        "{gets:?}"
    );
}

#[test]
fn a_shard_cut_at_the_same_byte_every_time_ends_with_a_counted_skip_in_bounded_time() {
    let d = scratch("always");
    let srv = Server::start();
    let bytes = shard_bytes(&d, "000.tar", 16, 4);
    let at = bytes.len() * 3 / 4;
    srv.put("/a/000.tar", bytes, Behaviour::CutAlwaysAt(at));
    let url = format!("{}/a/000.tar", srv.base());
    let t = Instant::now();
    let (samples, skips) = summarise(ShardSource::read_shard_at(&url, &quick()));
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    // The samples before the cut are kept, exactly; the rest is one TruncatedMember skip.
    let (want, _) = local(&d, "000.tar");
    assert!(!samples.is_empty() && samples.len() < 16, "{}", samples.len());
    assert_eq!(samples[..], want[..samples.len()]);
    assert_eq!(skips, vec![SkipReason::TruncatedMember]);
    // Bounded: the first GET, then resumptions up to the limit (object_store's own body retry
    // may add one ranged request per attempt).
    let gets = srv.log().into_iter().filter(|l| l.method == "GET").count();
    assert!((4..=1 + 2 * 4).contains(&gets), "{gets} GETs");
}

#[test]
fn an_object_replaced_mid_read_is_not_stitched_from_two_versions() {
    let d = scratch("changed");
    let srv = Server::start();
    let bytes = shard_bytes(&d, "000.tar", 12, 5);
    let cut = bytes.len() / 2;
    srv.put("/x/000.tar", bytes, Behaviour::ChangeAfterCut(cut));
    let url = format!("{}/x/000.tar", srv.base());
    let (samples, skips) = summarise(ShardSource::read_shard_at(&url, &quick()));
    let (want, _) = local(&d, "000.tar");
    assert!(samples.len() < 12);
    assert_eq!(samples[..], want[..samples.len()]);
    assert_eq!(skips, vec![SkipReason::TruncatedMember]);
}

#[test]
fn missing_remote_shards_are_an_error_first_and_a_counted_skip_later() {
    let d = scratch("missing");
    let srv = Server::start();
    srv.put("/m/000.tar", shard_bytes(&d, "000.tar", 5, 6), Behaviour::Normal);
    srv.put("/m/002.tar", shard_bytes(&d, "002.tar", 4, 7), Behaviour::Normal);
    // The first shard missing: the source does not start, and says which URL.
    let pattern = format!("{}/m/{{001..002}}.tar", srv.base());
    match ShardSource::with_remote(&pattern, 0, 0, quick()) {
        Err(SourceError::NoMatch(m)) => assert!(m.contains("/m/001.tar: not found"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a missing first shard must be an error"),
    }
    // A later one missing: one BadShard skip, the others read.
    let pattern = format!("{}/m/{{000..002}}.tar", srv.base());
    let mut src = ShardSource::with_remote(&pattern, 0, 0, quick()).unwrap();
    let (samples, skips) = drain(&mut src);
    assert_eq!(samples.len(), 9);
    assert_eq!(skips, vec![SkipReason::BadShard]);
    // Nothing listening: a clear error, quickly.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let t = Instant::now();
    let e = ShardSource::with_remote(&format!("http://127.0.0.1:{port}/d/{{0..3}}.tar"), 0, 0, quick())
        .err()
        .expect("an unreachable server must be an error");
    assert!(t.elapsed() < Duration::from_secs(10));
    let msg = e.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}/d/0.tar")), "{msg}");
    // URLs only name shards.
    let e = open_source(
        &format!("{}/m/list.csv", srv.base()),
        Task::Pairs,
        &SourceOptions::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("only WebDataset shards"), "{e}");
}

#[test]
fn s3_and_gs_urls_read_through_their_stores() {
    let d = scratch("clouds");
    let srv = Server::start();
    let bytes = shard_bytes(&d, "000.tar", 6, 8);
    // S3, path-style under a custom endpoint (MinIO, R2, Ceph…): /BUCKET/KEY.
    srv.put(
        "/my-bucket/laion/000.tar",
        bytes.clone(),
        Behaviour::CutOnce(bytes.len() / 2),
    );
    let s3 = RemoteOptions {
        vars: vec![
            ("AWS_ENDPOINT".into(), srv.base()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_SKIP_SIGNATURE".into(), "true".into()),
        ],
        ..quick()
    };
    let mut src = ShardSource::with_remote("s3://my-bucket/laion/{000..000}.tar", 0, 0, s3).unwrap();
    assert_eq!(drain(&mut src), local(&d, "000.tar"));
    // GCS's XML API under GOOGLE_BASE_URL: /BUCKET/KEY with the key percent-encoded.
    srv.put("/gbucket/cc3m/000.tar", bytes, Behaviour::Normal);
    let gs = RemoteOptions {
        vars: vec![
            ("GOOGLE_BASE_URL".into(), srv.base()),
            ("GOOGLE_SKIP_SIGNATURE".into(), "true".into()),
        ],
        ..quick()
    };
    let mut src = ShardSource::with_remote("gs://gbucket/cc3m/000.tar", 0, 0, gs).unwrap();
    assert_eq!(drain(&mut src), local(&d, "000.tar"));
    let paths: Vec<String> = srv.log().into_iter().map(|l| l.path).collect();
    assert!(paths.iter().any(|p| p == "/my-bucket/laion/000.tar"), "{paths:?}");
    assert!(paths.iter().any(|p| p == "/gbucket/cc3m/000.tar"), "{paths:?}");
}

#[test]
fn remote_options_come_from_the_environment_names() {
    let o = RemoteOptions::from_vars(
        [
            ("AWS_REGION", "eu-west-1"),
            ("GOOGLE_SKIP_SIGNATURE", "true"),
            ("HOME", "/root"),
            ("FLAVA_REMOTE_STALL_SECS", "2.5"),
            ("FLAVA_REMOTE_MAX_RESUMES", "9"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string())),
    );
    assert_eq!(o.stall, Duration::from_millis(2500));
    assert_eq!(o.max_resumes, 9);
    assert_eq!(
        o.vars,
        vec![
            ("AWS_REGION".to_string(), "eu-west-1".to_string()),
            ("GOOGLE_SKIP_SIGNATURE".to_string(), "true".to_string())
        ]
    );
    // Nonsense values keep the defaults.
    let o = RemoteOptions::from_vars([("FLAVA_REMOTE_STALL_SECS".to_string(), "-1".to_string())]);
    assert_eq!(o.stall, RemoteOptions::default().stall);
}

#[test]
fn a_remote_reader_reads_exactly_the_object() {
    let srv = Server::start();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    srv.put("/blob.tar", data.clone(), Behaviour::CutOnce(33_333));
    let mut r = flava_data::sources::remote::RemoteReader::open(&format!("{}/blob.tar", srv.base()), &quick()).unwrap();
    assert_eq!(r.size(), 100_000);
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    assert_eq!(got, data);
}

#[test]
fn inspecting_remote_shards_counts_their_samples_and_a_missing_one_as_a_skip() {
    let d = scratch("inspect");
    let srv = Server::start();
    srv.put("/i/000.tar", shard_bytes(&d, "000.tar", 5, 9), Behaviour::Normal);
    srv.put("/i/002.tar", shard_bytes(&d, "002.tar", 3, 10), Behaviour::Normal);
    let (shards, first) = flava_data::shards::inspect(&format!("{}/i/{{000..002}}.tar", srv.base())).unwrap();
    let counts: Vec<(u64, u64, u64)> = shards.iter().map(|s| (s.samples, s.with_text, s.skipped)).collect();
    assert_eq!(counts, vec![(5, 5, 0), (0, 0, 1), (3, 3, 0)]);
    let first = first.unwrap();
    assert!(first.contains("s9_0000") && first.contains("40x30"), "{first}");
}

#[test]
fn an_empty_object_and_a_server_that_ignores_ranges_end_like_their_local_counterparts() {
    let d = scratch("odd");
    let srv = Server::start();
    // Empty: what the same empty file on disk gives (no records), at once.
    std::fs::write(d.join("empty.tar"), b"").unwrap();
    srv.put("/o/empty.tar", Vec::new(), Behaviour::Normal);
    let got = summarise(ShardSource::read_shard_at(
        &format!("{}/o/empty.tar", srv.base()),
        &quick(),
    ));
    assert_eq!(got, local(&d, "empty.tar"));
    // Not a tar: one BadShard skip, as for a local file.
    std::fs::write(d.join("junk.tar"), vec![0xAB; 3000]).unwrap();
    srv.put("/o/junk.tar", vec![0xAB; 3000], Behaviour::Normal);
    let got = summarise(ShardSource::read_shard_at(
        &format!("{}/o/junk.tar", srv.base()),
        &quick(),
    ));
    assert_eq!(got, local(&d, "junk.tar"));
    assert_eq!(got.1, vec![SkipReason::BadShard]);
    // A resume answered with the whole object again (200, Range ignored) cannot be spliced: the
    // samples before the cut are kept and the rest is one TruncatedMember skip, in bounded time.
    let bytes = shard_bytes(&d, "000.tar", 10, 11);
    let cut = bytes.len() / 2;
    srv.put("/o/000.tar", bytes, Behaviour::CutOnceIgnoringRanges(cut));
    let t = Instant::now();
    let (samples, skips) = summarise(ShardSource::read_shard_at(
        &format!("{}/o/000.tar", srv.base()),
        &quick(),
    ));
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    let (want, _) = local(&d, "000.tar");
    assert!(!samples.is_empty() && samples.len() < 10, "{}", samples.len());
    assert_eq!(samples[..], want[..samples.len()]);
    assert_eq!(skips, vec![SkipReason::TruncatedMember]);
}
