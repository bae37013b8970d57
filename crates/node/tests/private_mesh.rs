//! Who may use a pod, with real `pod` processes on 127.0.0.1: a private mesh (`--mesh-key`)
//! that pods without the key, or with another one, cannot join, and `--serve-to trusted`
//! pods that run inference and send model files for their `--trust` peers only.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{models_pull, pod_command, wait_until, PodProcess};

const CHAT: &str = "smollm2-135m-instruct";

/// How long pods that could connect surely would have: they dial their bootstrap peer at
/// start and announce every second.
const WOULD_HAVE_CONNECTED: Duration = Duration::from_secs(6);

/// `pod` with a throwaway state directory and the shared model store.
fn pod(home: &Path) -> Command {
    let mut cmd = pod_command(home);
    cmd.args(["--log", "warn"]);
    cmd
}

/// Runs `pod mesh key new --out FILE`, which must succeed.
fn new_key(home: &Path, file: &Path) {
    let out = pod(home)
        .args(["mesh", "key", "new", "--out"])
        .arg(file)
        .output()
        .expect("pod mesh key new");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The PeerId of the identity in `home`, created on first use.
fn peer_id_of(home: &Path) -> String {
    let out = pod(home)
        .args(["identity", "show", "--json"])
        .output()
        .expect("pod identity show");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("identity json");
    json["peer_id"].as_str().expect("peer_id").to_owned()
}

/// A short, greedy chat request to `pod`'s API: status, `x-pod-served-by` and the body.
fn chat(pod: &PodProcess) -> (u16, String, serde_json::Value) {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(120)))
            .http_status_as_error(false)
            .build(),
    );
    let body = serde_json::json!({
        "model": CHAT,
        "messages": [{"role": "user", "content": "Say hello."}],
        "temperature": 0,
        "max_tokens": 8,
    });
    let mut res = agent
        .post(&format!("{}/v1/chat/completions", pod.api))
        .header("content-type", "application/json")
        .send(body.to_string())
        .expect("POST /v1/chat/completions");
    let status = res.status().as_u16();
    let served_by = res
        .headers()
        .get("x-pod-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = res.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        served_by,
        serde_json::from_str(&text).unwrap_or_default(),
    )
}

fn peer_ids(pod: &PodProcess) -> Vec<String> {
    pod.peers().into_iter().map(|(id, _)| id).collect()
}

/// Flags of a pod on loopback TCP that announces every second, joining through `bootstrap`.
fn joining<'a>(profile: &'a str, bootstrap: &'a str) -> Vec<&'a str> {
    vec![
        "--profile",
        profile,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--announce-interval",
        "1",
        "--bootstrap",
        bootstrap,
    ]
}

#[test]
fn pods_with_the_key_form_a_private_mesh_that_others_cannot_join() {
    let keys = tempfile::tempdir().unwrap();
    let (key, other_key) = (keys.path().join("mesh.key"), keys.path().join("other.key"));
    new_key(keys.path(), &key);
    new_key(keys.path(), &other_key);
    let key = key.to_str().unwrap();
    let other_key = other_key.to_str().unwrap();

    let a = PodProcess::start(&[
        "--profile",
        "inference",
        "--model",
        CHAT,
        "--announce-interval",
        "1",
        "--p2p-port",
        "0",
        "--mesh-key",
        key,
    ]);
    // With the key, the default listen addresses (every interface) are TCP only.
    let node = a.get("/pod/v1/node");
    let listening: Vec<&str> = node["listen_addrs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        listening
            .iter()
            .all(|a| a.contains("/tcp/") && !a.contains("quic")),
        "{node}"
    );
    assert!(a.log().contains("private mesh"), "{}", a.log());
    let a_tcp = a.tcp_addr();

    let started = Instant::now();
    let no_key = PodProcess::start(&joining("relay", &a_tcp));
    let wrong_key =
        PodProcess::start(&[&joining("relay", &a_tcp)[..], &["--mesh-key", other_key]].concat());
    let b = PodProcess::start(&[&joining("relay", &a_tcp)[..], &["--mesh-key", key]].concat());

    // B, with the key, sees A and its model, and its API runs a chat on A.
    wait_until(Duration::from_secs(15), "B lists A with its model", || {
        b.peers()
            .iter()
            .any(|(id, models)| *id == a.peer_id && models.iter().any(|m| m == CHAT))
            .then_some(())
    });
    // (B's API routes by a copy of the peer table refreshed a few times a second.)
    let (served_by, body) = wait_until(Duration::from_secs(5), "B's chat is served", || {
        let (status, served_by, body) = chat(&b);
        (status == 200).then_some((served_by, body))
    });
    assert_eq!(served_by, a.peer_id, "{body}");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{body}"
    );

    // The others dialled A at start; had they been let in, they would be peers by now.
    let left = WOULD_HAVE_CONNECTED.saturating_sub(started.elapsed());
    std::thread::sleep(left);
    assert_eq!(peer_ids(&a), vec![b.peer_id.clone()], "A's peers");
    for outsider in [&no_key, &wrong_key] {
        assert!(
            peer_ids(outsider).is_empty(),
            "an outsider has peers: {:?}",
            outsider.peers()
        );
        let (status, _, body) = chat(outsider);
        assert_eq!(status, 404, "an outsider reached the model: {body}");
    }
}

#[test]
fn bad_key_files_and_quic_with_a_key_are_one_line_errors_even_in_a_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let key = home.join("mesh.key");
    new_key(home, &key);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let written = std::fs::read_to_string(&key).unwrap();
    assert!(
        written.starts_with("/key/swarm/psk/1.0.0/\n/base16/\n"),
        "{written}"
    );

    // Never overwritten.
    let out = pod(home)
        .args(["mesh", "key", "new", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("already exists"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), written);

    // The fingerprint `pod mesh key show` prints is the one the dry run reports.
    let out = pod(home)
        .args(["mesh", "key", "show"])
        .arg(&key)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    let fingerprint = shown
        .trim()
        .strip_prefix("fingerprint ")
        .unwrap_or_else(|| panic!("{shown}"));
    let dry = |extra: &[&str]| {
        let mut cmd = pod(home);
        cmd.args(["start", "--profile", "relay", "--dry-run"])
            .args(extra);
        cmd.output().unwrap()
    };
    let out = dry(&["--json", "--mesh-key", key.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["mesh"]["private"], true, "{plan}");
    assert_eq!(plan["mesh"]["mesh_key_fingerprint"], fingerprint, "{plan}");
    let listen = plan["mesh"]["listen"].to_string() + &plan["mesh"]["listen_optional"].to_string();
    assert!(
        listen.contains("/tcp/") && !listen.contains("quic"),
        "{plan}"
    );
    assert_eq!(plan["serve_to"], "any", "{plan}");
    assert_eq!(plan["sources"]["mesh_key"], "flag", "{plan}");
    // Without a key, the open mesh with QUIC.
    let out = dry(&["--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["mesh"]["private"], false, "{plan}");
    assert!(
        plan["mesh"]["listen"].to_string().contains("quic-v1"),
        "{plan}"
    );

    let bad = home.join("bad.key");
    std::fs::write(&bad, "/key/swarm/psk/1.0.0/\n/base16/\nnot-hex\n").unwrap();
    let missing = home.join("missing.key");
    let quic_listen = ["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"];
    let cases: [(Vec<&str>, String); 4] = [
        (
            vec!["--mesh-key", bad.to_str().unwrap()],
            format!("error: mesh key file {} is not a key file: ", bad.display()),
        ),
        (
            vec!["--mesh-key", missing.to_str().unwrap()],
            format!("error: cannot read mesh key file {}", missing.display()),
        ),
        (
            [&["--mesh-key", key.to_str().unwrap()][..], &quic_listen[..]].concat(),
            "error: --listen /ip4/127.0.0.1/udp/0/quic-v1: a private mesh (--mesh-key) runs over TCP only".to_owned(),
        ),
        (
            vec!["--serve-to", "everyone"],
            "error: invalid value 'everyone' for '--serve-to".to_owned(),
        ),
    ];
    for (args, want) in cases {
        let out = dry(&args);
        assert!(!out.status.success(), "{args:?} passed");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with(&want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // The key file given through config.toml, relative to it.
    std::fs::write(home.join("config.toml"), "mesh_key = \"bad.key\"\n").unwrap();
    let out = dry(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("error: mesh key file {} is not", bad.display())),
        "{err}"
    );
}

#[test]
fn a_pod_serving_trusted_peers_only_serves_them_and_refuses_strangers() {
    common::model_path(CHAT);
    // B's identity exists before A starts, so that A can trust it.
    let b_home = tempfile::tempdir().unwrap();
    let b_id = peer_id_of(b_home.path());
    // A serves the chat model and the model files of the shared store, to B only.
    let a = PodProcess::start(&[
        "--profile",
        "full",
        "--model",
        CHAT,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--announce-interval",
        "1",
        "--serve-to",
        "trusted",
        "--trust",
        &b_id,
    ]);
    assert!(
        a.log().contains("serving trusted peers only"),
        "{}",
        a.log()
    );
    let a_tcp = a.tcp_addr();

    // A stranger's pull (a throwaway identity) is refused by A with the reason, in bounded
    // time, and nothing is installed.
    let stranger = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = models_pull(stranger.path(), CHAT, &a_tcp, &["--no-sources"])
        .output()
        .expect("pod models pull");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a stranger pulled from A: {err}");
    assert!(err.contains("trusted peers only"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert!(!stranger.path().join("models").join(CHAT).exists());
    wait_until(Duration::from_secs(5), "A logs the refusal", || {
        a.log()
            .contains("refused a peer's file request: not trusted")
            .then_some(())
    });
    assert_eq!(a.metric("pod_blob_bytes_served_total"), 0);

    // B, trusted, pulls the model from A as it starts (over the bulk connection too), and its
    // chat requests, sent to the mesh, are served by A.
    let b_models = tempfile::tempdir().unwrap();
    let b = PodProcess::start_in_with_models(
        b_home.path(),
        b_models.path(),
        &[
            &joining("inference", &a_tcp)[..],
            &["--model", CHAT, "--route", "mesh"],
        ]
        .concat(),
    );
    assert_eq!(b.peer_id, b_id);
    let log = b.log();
    assert!(log.contains("pulled from peers"), "{log}");
    let pulled = std::fs::read(b_models.path().join(CHAT).join("model.gguf")).unwrap();
    assert!(pulled == std::fs::read(common::model_path(CHAT)).unwrap());
    assert!(a.metric("pod_blob_bytes_served_total") > 0);
    wait_until(Duration::from_secs(15), "B lists A with its model", || {
        b.peers()
            .iter()
            .any(|(id, models)| *id == a.peer_id && models.iter().any(|m| m == CHAT))
            .then_some(())
    });
    let (served_by, body) = wait_until(Duration::from_secs(5), "B's chat is served", || {
        let (status, served_by, body) = chat(&b);
        (status == 200).then_some((served_by, body))
    });
    assert_eq!(served_by, a.peer_id, "{body}");

    // C, a stranger pod, does not route to A, which announces whom it serves: its chat goes
    // to B (which serves any peer), never to A.
    let c = PodProcess::start(&joining("relay", &a_tcp));
    wait_until(Duration::from_secs(15), "C sees A and B", || {
        let peers = peer_ids(&c);
        (peers.contains(&a.peer_id) && peers.contains(&b.peer_id)).then_some(())
    });
    // The chat model is listed once C's API has caught up, as B's alone.
    let models = wait_until(Duration::from_secs(5), "C lists the chat model", || {
        let models = c.get("/v1/models");
        let listed = models["data"].as_array()?.iter().any(|m| m["id"] == CHAT);
        listed.then_some(models)
    });
    let chat_model = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == CHAT)
        .unwrap();
    assert_eq!(chat_model["owned_by"], b.peer_id.as_str(), "{models}");
    assert_eq!(chat_model["providers"], 1, "{models}");
    for _ in 0..3 {
        let (status, served_by, body) = chat(&c);
        assert_eq!(status, 200, "{body}");
        assert_eq!(served_by, b.peer_id, "{body}");
    }
    // A served B's one request, and was never asked by C.
    let log = a.log();
    assert_eq!(log.matches("serving a peer's request").count(), 1, "{log}");
    assert!(!log.contains("refused a peer's request"), "{log}");
}
