//! `/pod/blob/1.0.0` between real `pod` processes on 127.0.0.1: a starting pod pulls its
//! missing model from a storage pod, both count the bytes in `/metrics`, `pod models list`
//! shows what is served to how many peers, and a pull cut by killing its provider resumes
//! from the verified chunks once the provider is back; a starting pod asks systemd for more
//! time only while its pull moves bytes.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{
    models_pull, pod_command_with_models, stdout_of_success, wait_until, PodProcess, STORAGE,
};

/// Bytes per chunk of `/pod/blob/1.0.0`.
const CHUNK: u64 = 1024 * 1024;

const CHAT: &str = "smollm2-135m-instruct";
/// Size of the default chat model's GGUF file.
const CHAT_SIZE: u64 = 98_362_432;

#[test]
fn a_starting_pod_pulls_its_model_from_a_storage_pod_and_both_count_the_bytes() {
    let a = PodProcess::storage();
    let models = tempfile::tempdir().unwrap();
    let b = PodProcess::start_with_models(
        models.path(),
        &[
            "--profile",
            "inference",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--announce-interval",
            "1",
            "--bootstrap",
            &a.tcp_addr(),
        ],
    );
    let log = b.log();
    assert!(log.contains("pulled from peers"), "{log}");
    // Over A's bulk connection.
    assert!(log.contains("bulk=1"), "{log}");
    let pulled = std::fs::read(models.path().join(CHAT).join("model.gguf")).unwrap();
    let original = std::fs::read(common::model_path(CHAT)).unwrap();
    assert!(pulled == original, "the pulled file differs");

    assert_eq!(b.metric("pod_blob_bytes_fetched_total"), CHAT_SIZE);
    assert_eq!(b.metric("pod_blob_bytes_served_total"), 0);
    assert_eq!(b.metric("pod_blob_chunks_corrupt_total"), 0);
    assert_eq!(a.metric("pod_blob_bytes_served_total"), CHAT_SIZE);
    assert_eq!(a.metric("pod_blob_bytes_fetched_total"), 0);
    assert_eq!(a.metric("pod_blob_requests_refused_total"), 0);

    // What A serves, and to whom: one file of the chat model, to B.
    let files = a.get("/pod/v1/files");
    assert_eq!(files["serving"], true, "{files}");
    let chat = files["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["model"] == CHAT)
        .unwrap_or_else(|| panic!("{files}"));
    assert_eq!(chat["file"], "model.gguf");
    assert_eq!(chat["peers_served"], 1);
    assert_eq!(chat["bytes_served"], CHAT_SIZE);
    assert_eq!(b.get("/pod/v1/files")["serving"], false);

    let listed = models_list(&a.home, &common::test_home().join("models"), true);
    let row = |rows: &serde_json::Value| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == CHAT)
            .cloned()
            .unwrap()
    };
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(row(&listed)["serving"], true, "{listed}");
    assert_eq!(row(&listed)["peers_served"], 1, "{listed}");
    let table = models_list(&a.home, &common::test_home().join("models"), false);
    let line = table.lines().find(|l| l.starts_with(CHAT)).unwrap();
    assert!(line.contains("to 1 peer "), "{table}");
    // B runs the inference profile: it serves no files.
    let listed: serde_json::Value =
        serde_json::from_str(&models_list(&b.home, models.path(), true)).unwrap();
    assert_eq!(row(&listed)["serving"], false, "{listed}");
    assert_eq!(row(&listed)["downloaded"], true, "{listed}");
}

/// `pod models list` for the node running with `home`.
fn models_list(home: &Path, models: &Path, json: bool) -> String {
    let mut cmd = pod_command_with_models(home, models);
    cmd.args(["--log", "warn", "models", "list"]);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("pod models list");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `pod models pull CHAT` from peers only into the state directory `home`, through `bootstrap`.
fn pull_from(home: &Path, bootstrap: &str) -> Command {
    models_pull(home, CHAT, bootstrap, &["--no-sources"])
}

/// The number in front of `infix` on the first line of `stdout` holding it, e.g. the bytes of
/// "model.gguf: 123 bytes from peer X".
fn number_before(stdout: &str, infix: &str) -> Option<u64> {
    stdout.lines().find_map(|l| {
        let (head, _) = l.split_once(infix)?;
        head.rsplit(' ').next()?.parse().ok()
    })
}

#[test]
fn a_pull_cut_by_killing_its_provider_resumes_without_refetching_verified_chunks() {
    common::model_path(CHAT);
    // 20 MB/s per peer: the 98 MB file takes about 5 s, so the kill lands mid-transfer.
    let args = [&STORAGE[..], &["--serve-rate", "20000000"]].concat();
    let a_home = tempfile::tempdir().unwrap();
    let mut a = PodProcess::start_in(a_home.path(), &args);
    let a_id = a.peer_id.clone();
    let b_home = tempfile::tempdir().unwrap();
    let b_out = b_home.path().join("pull-1.out");
    let mut first = pull_from(b_home.path(), &a.tcp_addr())
        .stdout(std::fs::File::create(&b_out).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pod models pull");

    // Kill A (SIGKILL, no goodbye) once it has sent about a third of the file.
    let sent = wait_until(Duration::from_secs(60), "a third of the file sent", || {
        let sent = a.metric("pod_blob_bytes_served_total");
        (sent >= CHAT_SIZE / 3).then_some(sent)
    });
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    assert!(sent < CHAT_SIZE, "the pull finished before the kill");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = first.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the cut pull did not end");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(first.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "the cut pull succeeded: {err}");
    assert!(err.contains("run the pull again to resume"), "{err}");
    let models = b_home.path().join("models");
    assert!(!models.join(CHAT).join("model.gguf").exists());

    // A comes back with the same identity (and another port); B pulls again.
    drop(a);
    let a = PodProcess::start_in(a_home.path(), &args);
    assert_eq!(a.peer_id, a_id);
    let second = pull_from(b_home.path(), &a.tcp_addr())
        .output()
        .expect("pod models pull");
    let stdout = stdout_of_success(&second);
    let kept = number_before(&stdout, " chunks kept from an interrupted pull")
        .unwrap_or_else(|| panic!("no resumed chunks: {stdout}"));
    let fetched = number_before(&stdout, &format!(" bytes from peer {a_id}"))
        .unwrap_or_else(|| panic!("nothing fetched from A: {stdout}"));
    assert!(kept > 0 && fetched < CHAT_SIZE, "{stdout}");
    // A storage pod offers a bulk connection on its mesh IP, and the pull took it.
    assert!(
        stdout.contains(&format!("bytes from peer {a_id} over a bulk connection")),
        "{stdout}"
    );
    // Only the chunks not kept crossed the mesh again (the last chunk is shorter).
    let total_chunks = CHAT_SIZE.div_ceil(CHUNK);
    assert_eq!(fetched.div_ceil(CHUNK), total_chunks - kept, "{stdout}");
    assert_eq!(a.metric("pod_blob_bytes_served_total"), fetched);
    let pulled = std::fs::read(models.join(CHAT).join("model.gguf")).unwrap();
    let original = std::fs::read(common::model_path(CHAT)).unwrap();
    assert!(pulled == original, "the resumed file differs");
}

/// What a `pod start` told systemd through `$NOTIFY_SOCKET` (a socket of the test's own),
/// each message with the seconds since the start, until READY=1 or the process ended.
fn notifications_until_ready(mut cmd: Command, timeout: Duration) -> Vec<(u64, String)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log = dir.path().join("pod.log");
    let started = Instant::now();
    let mut child = cmd
        .env("NOTIFY_SOCKET", &path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn pod");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let ready = text.lines().any(|l| l == "READY=1");
            got.push((started.elapsed().as_secs(), text));
            if ready {
                break;
            }
        }
        let log = || std::fs::read_to_string(&log).unwrap_or_default();
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "pod exited with {status} before READY=1: {got:?}\n{}",
                log()
            );
        }
        assert!(
            started.elapsed() < timeout,
            "no READY=1 within {timeout:?}: {got:?}\n{}",
            log()
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    got
}

fn extensions(notes: &[(u64, String)]) -> Vec<u64> {
    notes
        .iter()
        .filter(|(_, n)| n.lines().any(|l| l == "EXTEND_TIMEOUT_USEC=90000000"))
        .map(|(s, _)| *s)
        .collect()
}

#[test]
fn a_starting_pod_extends_systemds_start_timeout_only_while_its_download_moves() {
    // Nothing to download: READY=1 and no extension (the start needs no more than
    // TimeoutStartSec gives it).
    let home = tempfile::tempdir().unwrap();
    let mut relay = pod_command_with_models(home.path(), &home.path().join("models"));
    relay.args([
        "start",
        "--profile",
        "relay",
        "--api-port",
        "0",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
        "--no-upnp",
    ]);
    let notes = notifications_until_ready(relay, Duration::from_secs(60));
    assert_eq!(extensions(&notes), Vec::<u64>::new(), "{notes:?}");

    // A model pulled from a storage pod at 3.5 MB/s (about 28 s for 98 MB): the looks every
    // 20 s see bytes moving and extend, then the node is ready.
    common::model_path(CHAT);
    let args = [&STORAGE[..], &["--serve-rate", "3500000"]].concat();
    let a = PodProcess::start(&args);
    let home = tempfile::tempdir().unwrap();
    let mut b = pod_command_with_models(home.path(), &home.path().join("models"));
    b.args([
        "start",
        "--profile",
        "inference",
        "--api-port",
        "0",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
        "--no-upnp",
        "--bootstrap",
        &a.tcp_addr(),
    ]);
    let notes = notifications_until_ready(b, Duration::from_secs(120));
    let ready_at = notes.last().map(|(s, _)| *s).unwrap_or_default();
    let extended = extensions(&notes);
    assert!(
        ready_at >= 20,
        "the pull was too fast to be looked at: {notes:?}"
    );
    assert!(
        !extended.is_empty(),
        "no extension while downloading: {notes:?}"
    );
    assert!(
        extended.iter().all(|&s| (19..=ready_at).contains(&s)),
        "{notes:?}"
    );
    assert_eq!(a.metric("pod_blob_bytes_served_total"), CHAT_SIZE);
}
