//! Pods behind NAT, in a small internet of network namespaces (see `common::netns`): a relay
//! pod on the public side, one pod behind each of two masquerading routers. Both learn they
//! are private, reserve a slot on the relay and find each other through it; a chat request to
//! the pod that holds no model is served by the other one, over a relayed connection that
//! hole punching (DCUtR) upgrades to a direct one where the NATs allow it. Then the relay is
//! killed: both pods report that they are no longer reachable, and a hole-punched pair keeps
//! serving each other without it; where a second relay was configured, it takes over.
//!
//! Needs root (namespaces, iptables); elsewhere the tests say they skip, and under `CI=true`
//! they fail instead.

mod common;

use std::time::Duration;

use common::netns::{NatKind, NatLab, NsPod, HOME_B_IP, PUBLIC_IP, ROUTER_B_IP};
use common::process::wait_until;

const CHAT: &str = "smollm2-135m-instruct";

/// How long discovery, AutoNAT, the reservation and hole punching may take together.
const MESH_TIMEOUT: Duration = Duration::from_secs(90);

/// A relay pod on the public side listening on `port`, with its public address configured,
/// as a relay on the internet would have.
fn start_relay(lab: &NatLab, port: u16, extra: &[&str]) -> Relay {
    let tcp = format!("/ip4/{PUBLIC_IP}/tcp/{port}");
    let quic = format!("/ip4/{PUBLIC_IP}/udp/{port}/quic-v1");
    let mut args = vec![
        "--profile",
        "relay",
        "--listen",
        &tcp,
        "--listen",
        &quic,
        "--external-addr",
        &tcp,
        "--external-addr",
        &quic,
        "--nat-trust-private",
        "--announce-interval",
        "1",
    ];
    args.extend_from_slice(extra);
    let pod = NsPod::start(&lab.public, true, &args);
    Relay { pod, port }
}

/// A relay pod and the port it listens on.
struct Relay {
    pod: NsPod,
    port: u16,
}

impl Relay {
    /// Its TCP and QUIC addresses, to bootstrap from.
    fn addrs(&self) -> [String; 2] {
        let (port, id) = (self.port, &self.pod.peer_id);
        [
            format!("/ip4/{PUBLIC_IP}/tcp/{port}/p2p/{id}"),
            format!("/ip4/{PUBLIC_IP}/udp/{port}/quic-v1/p2p/{id}"),
        ]
    }
}

/// A home pod: default listen addresses (TCP and QUIC on 4001), joining through the relays;
/// `own_store`: an empty model store of its own (it holds no model).
fn start_home(ns: &str, relays: &[&Relay], own_store: bool, extra: &[&str]) -> NsPod {
    let addrs: Vec<String> = relays.iter().flat_map(|r| r.addrs()).collect();
    let mut args = Vec::new();
    for addr in &addrs {
        args.extend_from_slice(&["--bootstrap", addr.as_str()]);
    }
    args.extend_from_slice(&["--nat-trust-private", "--announce-interval", "1"]);
    args.extend_from_slice(extra);
    NsPod::start(ns, own_store, &args)
}

/// `pod` `peer`'s row in `viewer`'s `/pod/v1/peers`.
fn peer_row(viewer: &NsPod, peer: &NsPod) -> Option<serde_json::Value> {
    viewer.get("/pod/v1/peers")["data"]
        .as_array()?
        .iter()
        .find(|p| p["peer_id"] == peer.peer_id.as_str())
        .cloned()
}

/// Waits until the pod says it is private and reachable through exactly `relays`.
fn wait_private_through(pod: &NsPod, relays: &[&Relay], name: &str) {
    let mut want: Vec<&str> = relays.iter().map(|r| r.pod.peer_id.as_str()).collect();
    want.sort_unstable();
    wait_until(
        MESH_TIMEOUT,
        &format!("{name} private through {} relay(s)", want.len()),
        || {
            let node = pod.get("/pod/v1/node");
            let mut through: Vec<&str> = node["relays"]
                .as_array()?
                .iter()
                .filter_map(|r| r.as_str())
                .collect();
            through.sort_unstable();
            (node["nat_status"] == "private" && through == want).then_some(())
        },
    );
}

/// The whole story for one NAT kind; with `second_relay`, the homes also reserve on a
/// second relay, which takes over when the first dies. Returns the path the request took and
/// the hole punch outcome.
fn two_homes_behind(kind: NatKind, second_relay: bool) -> Option<(String, String)> {
    let lab = NatLab::create_or_skip(kind)?;
    let mut relay = start_relay(&lab, 4001, &[]);
    let spare = second_relay.then(|| start_relay(&lab, 4002, &[]));
    let relays: Vec<&Relay> = std::iter::once(&relay).chain(spare.as_ref()).collect();
    let b = start_home(
        &lab.home_b,
        &relays,
        false,
        &["--profile", "inference", "--model", CHAT],
    );
    let a = start_home(&lab.home_a, &relays, true, &["--profile", "storage"]);
    let relay_log = relay.pod.home.join("pod.log");
    let fail = |what: &str| -> String {
        let relay_log = std::fs::read_to_string(&relay_log).unwrap_or_default();
        let tail: Vec<&str> = relay_log.lines().rev().take(20).collect();
        format!(
            "{what}\n--- home A\n{}\n--- home B\n{}\n--- relay\n{}",
            a.log_tail(80),
            b.log_tail(80),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    };

    // The network is what it claims: the homes reach the public side, nobody reaches a home.
    assert!(
        lab.tcp_reaches(&lab.home_a, PUBLIC_IP, 4001),
        "home A reaches the relay"
    );
    assert!(
        lab.tcp_reaches(&lab.home_b, HOME_B_IP, 4001),
        "B listens on 4001"
    );
    assert!(
        !lab.tcp_reaches(&lab.home_a, HOME_B_IP, 4001),
        "no route from home A to home B"
    );
    assert!(
        !lab.tcp_reaches(&lab.public, HOME_B_IP, 4001),
        "no route from the public side in"
    );
    assert!(
        !lab.tcp_reaches(&lab.public, ROUTER_B_IP, 4001),
        "router B forwards nothing unasked"
    );

    // Both learn they are behind NAT and reserve a slot on every relay.
    wait_private_through(&a, &relays, "home A");
    wait_private_through(&b, &relays, "home B");
    // The homes dial the relays back from behind their NAT: they are public.
    for r in &relays {
        wait_until(MESH_TIMEOUT, "the relay public", || {
            (r.pod.get("/pod/v1/node")["nat_status"] == "public").then_some(())
        });
    }

    // A finds B (through the relay) with its model, and the hole punch ends one way or the
    // other.
    let (path, punch) = wait_until(
        MESH_TIMEOUT,
        "A connected to B with its model, hole punch done",
        || {
            let (ab, ba) = (peer_row(&a, &b)?, peer_row(&b, &a)?);
            let has_model = ab["models"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["name"] == CHAT));
            let punch = ab["hole_punch"]
                .as_str()
                .or_else(|| ba["hole_punch"].as_str())?
                .to_owned();
            let path = ab["path"].as_str()?.to_owned();
            (has_model && ab["connected"] == true).then_some((path, punch))
        },
    );
    eprintln!("NAT {kind:?}: hole punch {punch}, A reaches B {path}");
    match kind {
        NatKind::PortPreserving => {
            assert_eq!(punch, "succeeded", "{}", fail("hole punch"));
            assert_eq!(path, "direct", "{}", fail("path"));
            // The direct connection crosses both NATs: A sees B at router B's address.
            let ab = peer_row(&a, &b).expect("B known to A");
            let direct_seen = ab["addrs"].as_array().is_some_and(|addrs| {
                addrs.iter().filter_map(|x| x.as_str()).any(|x| {
                    x.starts_with(&format!("/ip4/{ROUTER_B_IP}/")) && !x.contains("p2p-circuit")
                })
            });
            assert!(direct_seen, "A sees B at router B's address: {ab}");
        }
        NatKind::Symmetric => {
            assert_eq!(punch, "failed", "{}", fail("hole punch"));
            assert_eq!(path, "relayed", "{}", fail("path"));
        }
    }

    // A chat request to A, which holds no model, is served by B.
    let body = serde_json::json!({
        "model": CHAT,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "temperature": 0,
    })
    .to_string();
    let r = a
        .request("POST", "/v1/chat/completions", Some(&body))
        .unwrap_or_else(|| panic!("{}", fail("chat request failed")));
    assert_eq!(r.status, 200, "{}\n{}", r.body, fail("chat"));
    assert_eq!(
        r.header("x-pod-served-by"),
        Some(b.peer_id.as_str()),
        "served by B"
    );
    let answer: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(!text.is_empty(), "an answer: {answer}");
    let after = peer_row(&a, &b).expect("B known to A");
    assert_eq!(
        after["path"].as_str(),
        Some(path.as_str()),
        "the path held: {after}"
    );
    eprintln!("NAT {kind:?}: B answered A's request {path}: {text:?}");

    // The CLI tells the same story.
    let cli = |args: &[&str]| {
        let home = a.home.to_string_lossy().into_owned();
        let mut all = vec!["--home", home.as_str()];
        all.extend_from_slice(args);
        let out = lab.exec(
            &lab.home_a,
            env!("CARGO_BIN_EXE_pod"),
            &all,
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "pod {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let status = cli(&["status"]);
    let line = status
        .lines()
        .find(|l| l.contains("private: peers reach this node through relay "))
        .unwrap_or_else(|| panic!("a reach line in:\n{status}"));
    for r in &relays {
        assert!(line.contains(r.pod.peer_id.as_str()), "{line}");
    }
    let peers = cli(&["peers"]);
    let row = peers
        .lines()
        .find(|l| l.starts_with(&b.peer_id))
        .unwrap_or_else(|| panic!("B in pod peers:\n{peers}"));
    // The side that made the attempts knows the outcome; the other may not.
    let expected = match after["hole_punch"].as_str() {
        Some(seen) => format!("{path} (punch {seen})"),
        None => format!(" {path} "),
    };
    assert!(row.contains(&expected), "{expected:?} in {row}");

    // The first relay dies: both homes notice. Without a second relay they are no longer
    // reachable, and say so; with one, it holds their reservations alone.
    relay.pod.kill();
    let left: Vec<&Relay> = spare.iter().collect();
    for (pod, name) in [(&a, "home A"), (&b, "home B")] {
        wait_private_through(pod, &left, name);
    }
    let status = cli(&["status"]);
    let expected = match &spare {
        Some(spare) => format!(
            "private: peers reach this node through relay {}\n",
            spare.pod.peer_id
        ),
        None => "private and not reachable: no relay holds a reservation".to_owned(),
    };
    assert!(status.contains(&expected), "{expected:?} in\n{status}");
    if spare.is_some() {
        // B is reached through the second relay now.
        let r = a
            .request("POST", "/v1/chat/completions", Some(&body))
            .unwrap_or_else(|| panic!("{}", fail("chat request through the second relay")));
        assert_eq!(r.status, 200, "{}\n{}", r.body, fail("chat"));
        assert_eq!(r.header("x-pod-served-by"), Some(b.peer_id.as_str()));
        // A forgets B's addresses through the dead relay once B stops listing them.
        let dead = relay.pod.peer_id.clone();
        let addrs = wait_until(
            MESH_TIMEOUT,
            "B's addresses through the dead relay gone",
            || {
                let row = peer_row(&a, &b)?;
                let addrs: Vec<String> = row["addrs"]
                    .as_array()?
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect();
                (row["connected"] == true && !addrs.iter().any(|x| x.contains(dead.as_str())))
                    .then_some(addrs)
            },
        );
        eprintln!("NAT {kind:?}: the second relay took over; A knows B at {addrs:?}");
    }
    if path == "direct" {
        // The hole-punched connection does not need the relay: B still serves A.
        let r = a
            .request("POST", "/v1/chat/completions", Some(&body))
            .unwrap_or_else(|| panic!("chat request without the relay:\n{}", a.log_tail(80)));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-pod-served-by"), Some(b.peer_id.as_str()));
        eprintln!("NAT {kind:?}: with the relay gone, B still answers A directly");
    }
    Some((path, punch))
}

#[test]
fn pods_behind_port_preserving_nats_hole_punch_and_serve_each_other() {
    two_homes_behind(NatKind::PortPreserving, false);
}

/// With two relays configured, the second takes over when the first dies: the homes stay
/// reachable and B keeps answering A through it.
#[test]
fn pods_behind_symmetric_nats_serve_each_other_through_a_relay_and_a_second_takes_over() {
    two_homes_behind(NatKind::Symmetric, true);
}

/// A model file pulled by one home from the other through a relay: with symmetric NATs no
/// hole punch succeeds, so the file travels over mesh streams on the relayed connection, on a
/// relay that allows circuits that large (`--relay-circuit-mib`).
#[test]
fn a_model_file_is_pulled_from_one_home_to_the_other_through_a_relay() {
    let Some(lab) = NatLab::create_or_skip(NatKind::Symmetric) else {
        return;
    };
    let size = std::fs::metadata(common::model_path(CHAT))
        .expect("the chat model in the shared store")
        .len();
    let relay = start_relay(&lab, 4001, &["--relay-circuit-mib", "512"]);
    let b = start_home(&lab.home_b, &[&relay], false, &["--profile", "storage"]);
    wait_private_through(&b, &[&relay], "home B");

    let home = tempfile::tempdir().expect("temp home");
    let models = tempfile::tempdir().expect("temp models");
    let [tcp, _] = relay.addrs();
    let (home_arg, models_arg) = (
        home.path().to_string_lossy().into_owned(),
        models.path().to_string_lossy().into_owned(),
    );
    let out = lab.exec(
        &lab.home_a,
        env!("CARGO_BIN_EXE_pod"),
        &[
            "--home",
            &home_arg,
            "--models-dir",
            &models_arg,
            "--log",
            "warn",
            "models",
            "pull",
            CHAT,
            "--bootstrap",
            &tcp,
            "--no-sources",
            "--peer-wait",
            "60",
        ],
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pull through the relay: {stdout}\n{}\n--- home B\n{}",
        String::from_utf8_lossy(&out.stderr),
        b.log_tail(60)
    );
    assert!(
        stdout.contains(&format!("{size} bytes from peer {}", b.peer_id)),
        "the whole file from B: {stdout}"
    );
    let pulled = models.path().join(CHAT).join("model.gguf");
    assert_eq!(std::fs::metadata(&pulled).map(|m| m.len()).ok(), Some(size));
    eprintln!("pulled {size} bytes from home B through the relay: {stdout}");
}
