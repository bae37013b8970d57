//! The model store against a local HTTP server on 127.0.0.1 that serves files the way
//! Hugging Face and plain HTTPS hosts do, plus local-path sources.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pod_node::catalogue::{CatalogueEntry, FileSpec};
use pod_node::source::HttpTimeouts;
use pod_node::store::{sha256_file, ModelFormat, ModelStore, StoreError};
use sha2::{Digest, Sha256};

/// Serves `files` by path; paths starting with `/cut/` send half the body then hang up,
/// `/stall/` half the body then nothing more while holding the connection, and `/endless/`
/// the body and then zeros without end (no `Content-Length`). Returns the base URL and a log
/// of requested paths.
fn serve(files: HashMap<String, Vec<u8>>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = Arc::clone(&log);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                    break;
                }
            }
            log2.lock().unwrap().push(path.clone());
            if let Some(body) = path.strip_prefix("/endless").and_then(|key| files.get(key)) {
                let body = body.clone();
                thread::spawn(move || {
                    let _ = write!(stream, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                    let _ = stream.write_all(&body);
                    let zeros = vec![0u8; 1 << 16];
                    while stream.write_all(&zeros).is_ok() {}
                });
                continue;
            }
            if let Some(body) = path.strip_prefix("/stall").and_then(|key| files.get(key)) {
                let body = body.clone();
                thread::spawn(move || {
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(&body[..body.len() / 2]);
                    thread::sleep(Duration::from_secs(300));
                });
                continue;
            }
            let key = path.trim_start_matches("/cut");
            match files.get(key) {
                Some(body) => {
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let n = if path.starts_with("/cut/") {
                        body.len() / 2
                    } else {
                        body.len()
                    };
                    let _ = stream.write_all(&body[..n]);
                }
                None => {
                    let _ = stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
            }
        }
    });
    (base, log)
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn entry(name: &str, sources: Vec<String>, body: &[u8]) -> &'static CatalogueEntry {
    let sources: Vec<&'static str> = sources.into_iter().map(leak).collect();
    let file = FileSpec {
        name: "model.gguf",
        sources: Box::leak(sources.into_boxed_slice()),
        sha256: leak(hex::encode(Sha256::digest(body))),
        size: body.len() as u64,
    };
    Box::leak(Box::new(CatalogueEntry {
        name: leak(name.to_owned()),
        format: ModelFormat::Gguf,
        description: "test",
        license: "test",
        files: Box::leak(vec![file].into_boxed_slice()),
    }))
}

fn payload() -> Vec<u8> {
    (0..3_000_000u32).map(|i| (i % 251) as u8).collect()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn hf_source_downloads_and_verifies() {
    let body = payload();
    let (base, log) = serve(HashMap::from([(
        "/org/repo/resolve/main/m.gguf".to_owned(),
        body.clone(),
    )]));
    let home = tempfile::tempdir().unwrap();
    let store = ModelStore::open(home.path())
        .unwrap()
        .with_hf_endpoint(&base);
    let e = entry("hf-model", vec!["hf:org/repo:m.gguf".into()], &body);
    assert!(!store.is_present(e));
    // Half a file left by a pull from peers that was cut off.
    let partial = store.partial_path(e.files[0].sha256);
    std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
    std::fs::write(&partial, &body[..body.len() / 2]).unwrap();
    let dir = store.pull(e).unwrap();
    assert!(store.is_present(e));
    assert!(!partial.exists(), "the partial file outlived the download");
    assert_eq!(std::fs::read(dir.join("model.gguf")).unwrap(), body);
    // A second pull is a no-op.
    store.pull(e).unwrap();
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[test]
fn corrupted_download_never_becomes_a_model_and_next_source_is_tried() {
    let body = payload();
    let mut bad = body.clone();
    bad[1000] ^= 0xff;
    let (base, _) = serve(HashMap::from([
        ("/bad.gguf".to_owned(), bad),
        ("/good.gguf".to_owned(), body.clone()),
    ]));
    let home = tempfile::tempdir().unwrap();
    let store = ModelStore::open(home.path()).unwrap();

    let only_bad = entry("bad-model", vec![format!("{base}/bad.gguf")], &body);
    let err = store.pull(only_bad).unwrap_err();
    assert!(matches!(err, StoreError::AllSourcesFailed { .. }), "{err}");
    assert!(err.to_string().contains("failed verification"), "{err}");
    assert!(!store.is_present(only_bad));
    assert!(!store.model_dir("bad-model").join("model.gguf").exists());
    assert!(files_in(&store.model_dir("bad-model"))
        .iter()
        .all(|f| !f.starts_with(".partial")));

    let fallback = entry(
        "fallback-model",
        vec![format!("{base}/bad.gguf"), format!("{base}/good.gguf")],
        &body,
    );
    let dir = store.pull(fallback).unwrap();
    assert_eq!(
        sha256_file(&dir.join("model.gguf")).unwrap(),
        fallback.files[0].sha256
    );
}

#[test]
fn interrupted_download_leaves_nothing_behind() {
    let body = payload();
    let (base, _) = serve(HashMap::from([("/m.gguf".to_owned(), body.clone())]));
    let home = tempfile::tempdir().unwrap();
    let store = ModelStore::open(home.path()).unwrap();
    let e = entry("cut-model", vec![format!("{base}/cut/m.gguf")], &body);
    let err = store.pull(e).unwrap_err();
    assert!(matches!(err, StoreError::AllSourcesFailed { .. }), "{err}");
    assert!(!store.is_present(e));
    assert_eq!(
        files_in(&store.model_dir("cut-model")),
        Vec::<String>::new()
    );
}

/// Pulls `e` on another thread; the outcome and how long it took, or `None` after 30 s.
fn pull_within(
    store: &ModelStore,
    e: &'static CatalogueEntry,
) -> Option<(Result<(), String>, Duration)> {
    let store = store.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let started = Instant::now();
        let outcome = store.pull(e).map(|_| ()).map_err(|e| e.to_string());
        let _ = tx.send((outcome, started.elapsed()));
    });
    rx.recv_timeout(Duration::from_secs(30)).ok()
}

#[test]
fn a_server_that_sends_more_than_the_catalogue_size_is_stopped_and_nothing_kept() {
    let body = payload();
    let (base, _) = serve(HashMap::from([("/m.gguf".to_owned(), body.clone())]));
    let home = tempfile::tempdir().unwrap();
    let store = ModelStore::open(home.path()).unwrap();
    let e = entry(
        "endless-model",
        vec![format!("{base}/endless/m.gguf")],
        &body,
    );
    let (outcome, took) = pull_within(&store, e).expect("the download stops");
    let err = outcome.unwrap_err();
    assert!(err.contains("more than the 3000000 bytes"), "{err}");
    eprintln!("stopped after {took:?}");
    assert!(!store.is_present(e));
    assert_eq!(
        files_in(&store.model_dir("endless-model")),
        Vec::<String>::new()
    );
}

#[test]
fn a_server_that_stalls_fails_the_download_in_bounded_time() {
    let body = payload();
    let (base, _) = serve(HashMap::from([("/m.gguf".to_owned(), body.clone())]));
    let home = tempfile::tempdir().unwrap();
    let store = ModelStore::open(home.path())
        .unwrap()
        .with_http_timeouts(HttpTimeouts {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(1),
        });
    // Stalls halfway through the body, or before the headers (a port that accepts and says
    // nothing).
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}/m.gguf", silent.local_addr().unwrap());
    for (name, url) in [
        ("stalled-model", format!("{base}/stall/m.gguf")),
        ("silent-model", silent_url),
    ] {
        let e = entry(name, vec![url], &body);
        let (outcome, took) = pull_within(&store, e).expect("the download gives up");
        let err = outcome.unwrap_err();
        assert!(
            took < Duration::from_secs(10),
            "{name}: gave up after {took:?}"
        );
        assert!(
            err.contains("timed out") || err.contains("imeout"),
            "{name}: {err}"
        );
        assert!(!store.is_present(e));
        assert_eq!(files_in(&store.model_dir(name)), Vec::<String>::new());
    }
    drop(silent);
}

#[test]
fn missing_file_and_404_are_reported() {
    let body = payload();
    let (base, _) = serve(HashMap::new());
    let home = tempfile::tempdir().unwrap();
    let store = ModelStore::open(home.path()).unwrap();
    let e = entry(
        "nowhere",
        vec![
            format!("{base}/none.gguf"),
            "/definitely/not/here.gguf".into(),
        ],
        &body,
    );
    let err = store.pull(e).unwrap_err().to_string();
    assert!(err.contains("404"), "{err}");
    assert!(err.contains("/definitely/not/here.gguf"), "{err}");
}

#[test]
fn local_parts_are_concatenated() {
    let body = payload();
    let src = tempfile::tempdir().unwrap();
    let (a, b) = body.split_at(1_234_567);
    std::fs::write(src.path().join("a"), a).unwrap();
    std::fs::write(src.path().join("b"), b).unwrap();
    let spec = format!(
        "{} + file:{}",
        src.path().join("a").display(),
        src.path().join("b").display()
    );
    let home = tempfile::tempdir().unwrap();
    let store = ModelStore::open(home.path()).unwrap();
    let e = entry("parts", vec![spec], &body);
    let dir = store.pull(e).unwrap();
    assert_eq!(std::fs::read(dir.join("model.gguf")).unwrap(), body);
    assert!(store.remove("parts").unwrap());
    assert!(!store.is_present(e));
    assert!(!store.remove("parts").unwrap());
}

/// Changes one byte of `path` in place.
fn flip_a_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all(&bytes).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_file_modified_after_its_download_is_found_and_pulled_again() {
    use pod_node::store::FileState;
    let body = payload();
    let (base, log) = serve(HashMap::from([(
        "/org/repo/resolve/main/m.gguf".to_owned(),
        body.clone(),
    )]));
    let home = tempfile::tempdir().unwrap();
    let store = ModelStore::open(home.path())
        .unwrap()
        .with_hf_endpoint(&base);
    let e = entry("rot-model", vec!["hf:org/repo:m.gguf".into()], &body);
    let path = store.pull(e).unwrap().join("model.gguf");
    assert_eq!(store.check_file(e, &e.files[0]), FileState::Ok);

    // Same size, same inode, one byte changed: the new modification time gives it away.
    flip_a_byte(&path);
    assert_eq!(store.check_file(e, &e.files[0]), FileState::Modified);
    assert!(!store.is_present(e));
    assert!(!store.file_present(e, &e.files[0]));
    assert_eq!(store.modified_file(e), Some(path.clone()));
    assert_eq!(store.verify(e), vec![("model.gguf", FileState::Modified)]);

    store.pull(e).unwrap();
    assert_eq!(log.lock().unwrap().len(), 2, "the file was fetched again");
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert_eq!(store.verify(e), vec![("model.gguf", FileState::Ok)]);

    // A copy (another inode and time) of the right bytes is hashed again and kept.
    let copy = home.path().join("copy");
    std::fs::copy(&path, &copy).unwrap();
    std::fs::rename(&copy, &path).unwrap();
    assert!(store.is_present(e));
    store.pull(e).unwrap();
    assert_eq!(
        log.lock().unwrap().len(),
        2,
        "nothing fetched for an intact copy"
    );

    std::fs::remove_file(&path).unwrap();
    assert_eq!(store.verify(e), vec![("model.gguf", FileState::Missing)]);
}

#[test]
fn leftovers_of_interrupted_pulls_are_removed_unless_a_pull_runs() {
    let home = tempfile::tempdir().unwrap();
    let store = ModelStore::open(home.path()).unwrap();
    let models = home.path().join("models");
    let name = pod_node::catalogue::DEFAULT_CHAT_MODEL;
    let dir = models.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(".partial-a1b2c3"), b"half a download").unwrap();
    std::fs::write(dir.join("keep.txt"), b"not a leftover").unwrap();
    std::fs::create_dir_all(models.join(".tmp/.tmpXYZ")).unwrap();
    std::fs::write(models.join(".tmp/.tmpXYZ/wheel.whl"), b"scratch").unwrap();
    let resumable = store.partial_path("ab".repeat(32).as_str());
    std::fs::create_dir_all(resumable.parent().unwrap()).unwrap();
    std::fs::write(&resumable, b"resumable").unwrap();

    // A pull of the model runs (it holds the model's lock): its files stay.
    let lock = std::fs::File::create(models.join(format!(".{name}.lock"))).unwrap();
    lock.lock().unwrap();
    assert_eq!(store.clean_leftovers(), 0);
    assert!(dir.join(".partial-a1b2c3").exists());
    assert!(models.join(".tmp/.tmpXYZ").exists());
    drop(lock);

    assert_eq!(store.clean_leftovers(), 2);
    assert_eq!(files_in(&dir), ["keep.txt"]);
    assert!(files_in(&models.join(".tmp")).is_empty());
    assert!(resumable.exists(), "what a peer pull can resume is kept");
}
