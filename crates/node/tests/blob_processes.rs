//! `/pod/blob/1.0.0` between real `pod` processes on 127.0.0.1: a starting pod pulls its
//! missing model from a storage pod, both count the bytes in `/metrics`, and `pod models list`
//! shows what is served to how many peers.

mod common;

use std::path::Path;

use common::process::{pod_command_with_models, PodProcess};

const CHAT: &str = "smollm2-135m-instruct";
/// Size of the default chat model's GGUF file.
const CHAT_SIZE: u64 = 98_362_432;

/// A storage pod serving the shared model store on loopback.
fn storage_pod() -> PodProcess {
    common::model_path(CHAT);
    PodProcess::start(&[
        "--profile",
        "storage",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--announce-interval",
        "1",
    ])
}

#[test]
fn a_starting_pod_pulls_its_model_from_a_storage_pod_and_both_count_the_bytes() {
    let a = storage_pod();
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
