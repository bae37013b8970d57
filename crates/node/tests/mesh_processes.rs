//! Several real `pod` processes forming a mesh on 127.0.0.1, and a js-libp2p node dialling one.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{wait_until, PodProcess};

const CHAT: &str = "smollm2-135m-instruct";
const EMBED: &str = "all-minilm-l6-v2";

/// Every pod in `pods` lists every other one with its models.
fn all_see_each_other(pods: &[&PodProcess], models: &[(&str, Vec<String>)]) -> bool {
    pods.iter().all(|viewer| {
        let seen = viewer.peers();
        models.iter().all(|(peer, want)| {
            *peer == viewer.peer_id || seen.iter().any(|(id, have)| id == peer && have == want)
        })
    })
}

/// Flags of a relay pod that listens on QUIC only and joins through `bootstrap`.
fn relay_over_quic(bootstrap: &str) -> [&str; 8] {
    [
        "--announce-interval",
        "1",
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
        "--profile",
        "relay",
        "--bootstrap",
        bootstrap,
    ]
}

#[test]
fn three_pods_form_a_mesh_keep_their_ids_and_drop_the_dead() {
    let mesh = [
        "--announce-interval",
        "1",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--listen",
    ];
    let a = PodProcess::start(
        &[
            &mesh[..],
            &[
                "/ip4/127.0.0.1/udp/0/quic-v1",
                "--profile",
                "inference",
                "--model",
                CHAT,
            ],
        ]
        .concat(),
    );
    let a_tcp = a.tcp_addr();
    let a_quic = a.quic_addr();
    let mut b = PodProcess::start(&[
        "--announce-interval",
        "1",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--profile",
        "embedding",
        "--model",
        EMBED,
        "--bootstrap",
        &a_tcp,
    ]);
    // C joins over QUIC.
    let mut c = PodProcess::start(&relay_over_quic(&a_quic));
    let ready = Instant::now();
    let (a_id, b_id, c_id) = (a.peer_id.clone(), b.peer_id.clone(), c.peer_id.clone());
    let expected = vec![
        (a_id.as_str(), vec![CHAT.to_owned()]),
        (b_id.as_str(), vec![EMBED.to_owned()]),
        (c_id.as_str(), vec![]),
    ];
    wait_until(
        Duration::from_secs(5),
        "every pod lists the other two",
        || all_see_each_other(&[&a, &b, &c], &expected).then_some(()),
    );
    eprintln!(
        "mesh of 3 formed {:?} after the last pod was ready",
        ready.elapsed()
    );

    // `pod peers --json` shows the same table from the command line.
    let out = common::process::pod_command(&a.home)
        .args(["peers", "--json"])
        .output()
        .expect("pod peers");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let ids: BTreeSet<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["peer_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        BTreeSet::from([b.peer_id.as_str(), c.peer_id.as_str()])
    );
    let b_row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["peer_id"] == b.peer_id.as_str())
        .unwrap();
    assert!(b_row["rtt_ms"].as_f64().is_some(), "{b_row}");
    assert_eq!(
        b_row["agent"].as_str().unwrap(),
        format!("pod/{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(b_row["load"]["max_active"], 8);

    // /pod/v1/node describes the node itself.
    let node = c.get("/pod/v1/node");
    assert_eq!(node["peer_id"], c.peer_id.as_str());
    assert_eq!(node["profile"], "relay");
    assert!(node["listen_addrs"][0]
        .as_str()
        .unwrap()
        .ends_with("/quic-v1"));

    // Restarting C keeps its PeerId, and the others see it again.
    let c_home = c.home.clone();
    assert!(c.stop().success());
    let c2 = PodProcess::start_in(&c_home, &relay_over_quic(&a_quic));
    assert_eq!(c2.peer_id, c_id);
    wait_until(
        Duration::from_secs(5),
        "the restarted pod is listed again",
        || all_see_each_other(&[&a, &b, &c2], &expected).then_some(()),
    );

    // Killing B makes A and C drop it within the expiry window (3 announce intervals).
    b.child.kill().expect("kill");
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(3 + 2),
        "the killed pod is dropped",
        || {
            [&a, &c2]
                .iter()
                .all(|p| !p.peers().iter().any(|(id, _)| *id == b_id))
                .then_some(())
        },
    );
    eprintln!("killed pod dropped after {:?}", killed.elapsed());
    drop(c);
}

#[test]
fn a_second_pod_on_a_taken_mesh_port_fails_with_one_line() {
    let a = PodProcess::start(&["--profile", "relay", "--listen", "/ip4/127.0.0.1/tcp/0"]);
    let taken = a.tcp_addr();
    let taken = taken.split("/p2p/").next().unwrap();
    let home = tempfile::tempdir().unwrap();
    let out = common::process::pod_command(home.path())
        .args([
            "start",
            "--profile",
            "relay",
            "--api-port",
            "0",
            "--no-mdns",
            "--listen",
            taken,
        ])
        .output()
        .expect("run pod");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: cannot listen on"), "{err}");
    assert!(last.contains("in use"), "{err}");
}

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop")
}

#[test]
fn a_js_libp2p_node_completes_identify_and_ping_with_a_pod() {
    let dir = interop_dir();
    assert!(
        dir.join("node_modules/libp2p").is_dir(),
        "js-libp2p is not installed: run `npm ci --prefix tests/interop` (scripts/test does)"
    );
    let pod = PodProcess::start(&["--profile", "relay", "--listen", "/ip4/127.0.0.1/tcp/0"]);
    let addr = pod.tcp_addr();
    let mut js = Command::new("node")
        .arg(dir.join("dial.mjs"))
        .args([&addr, "--hold-ms", "3000", "--timeout-ms", "20000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("node must be installed to run the interop test");
    // While the js node holds its connection, the pod lists it as a peer.
    let js_seen = wait_until(Duration::from_secs(20), "the pod sees the js node", || {
        let body = pod.get("/pod/v1/peers");
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| {
                p["agent"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("pod-interop-js"))
            })
            .cloned()
    });
    let out = wait_until(Duration::from_secs(30), "the js node exits", || {
        js.try_wait().ok().flatten()
    });
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    js.stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    js.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(out.success(), "dial.mjs failed: {stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect(&stdout);
    assert_eq!(report["peer_id"], pod.peer_id.as_str());
    assert_eq!(
        report["agent_version"],
        format!("pod/{}", env!("CARGO_PKG_VERSION")).as_str()
    );
    let protocols: Vec<&str> = report["protocols"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    for p in ["/ipfs/id/1.0.0", "/ipfs/ping/1.0.0", "/pod/kad/1.0.0"] {
        assert!(protocols.contains(&p), "{p} not in {protocols:?}");
    }
    assert!(report["ping_ms"].as_array().unwrap().len() >= 3);
    assert_eq!(js_seen["peer_id"], report["local_peer_id"]);
    assert!(js_seen["connected"].as_bool().unwrap());
}

#[test]
fn pod_infer_p2p_runs_on_a_peer_and_matches_a_local_run() {
    let a = PodProcess::start(&[
        "--profile",
        "inference",
        "--model",
        CHAT,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--announce-interval",
        "1",
    ]);
    let addr = a.tcp_addr();
    let prompt = ["--prompt", "Name a colour.", "--max-tokens", "12"];
    let empty = tempfile::tempdir().unwrap();
    let p2p = common::process::pod_command(empty.path())
        .args(["--log", "warn", "infer", "--p2p", "--bootstrap", &addr])
        .args(prompt)
        .output()
        .expect("pod infer --p2p");
    assert!(
        p2p.status.success(),
        "{}",
        String::from_utf8_lossy(&p2p.stderr)
    );
    let local = common::process::pod_command(empty.path())
        .args(["--log", "warn", "infer", "--local"])
        .args(prompt)
        .output()
        .expect("pod infer --local");
    assert!(
        local.status.success(),
        "{}",
        String::from_utf8_lossy(&local.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&p2p.stdout),
        String::from_utf8_lossy(&local.stdout)
    );
    let err = String::from_utf8_lossy(&p2p.stderr);
    assert!(err.contains(&format!("[served by {}]", a.peer_id)), "{err}");

    // No provider: a bounded wait and one clear line.
    let none = common::process::pod_command(empty.path())
        .args([
            "--log",
            "warn",
            "infer",
            "--p2p",
            "--bootstrap",
            &addr,
            "--wait",
            "2",
            "--model",
            "no-such-model",
        ])
        .args(prompt)
        .output()
        .expect("pod infer --p2p");
    assert!(!none.status.success());
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(
        err.trim()
            .starts_with("error: no peer serving `no-such-model`"),
        "{err}"
    );
}

#[test]
fn models_pull_fetches_from_a_storage_pod_first() {
    let a = PodProcess::storage();
    let addr = a.tcp_addr();
    let empty = tempfile::tempdir().unwrap();
    let out = common::process::models_pull(empty.path(), CHAT, &addr, &[])
        .output()
        .expect("pod models pull");
    let stdout = common::process::stdout_of_success(&out);
    assert!(
        stdout.contains(&format!("98362432 bytes from peer {}", a.peer_id)),
        "{stdout}"
    );
    assert!(stdout.contains("(from peers)"), "{stdout}");
    let pulled = std::fs::read(empty.path().join("models").join(CHAT).join("model.gguf")).unwrap();
    let original = std::fs::read(common::model_path(CHAT)).unwrap();
    assert!(pulled == original, "the pulled file differs");
    // Pulling again finds it in place.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_pod"))
        .arg("--home")
        .arg(empty.path())
        .args(["--log", "warn", "models", "pull", CHAT, "--no-peers"])
        .output()
        .expect("pod models pull");
    assert!(String::from_utf8_lossy(&again.stdout).contains("already here"));
}
