//! Real `pod start` processes on 127.0.0.1, each with its own state directory (identity) and
//! the shared, verified model store (or a store of its own).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::test_home;

/// How long a pod may take to load its models and answer `/health`.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `pod start`. Killed when dropped.
pub struct PodProcess {
    pub child: Child,
    pub home: PathBuf,
    _home_dir: Option<tempfile::TempDir>,
    pub api: String,
    pub peer_id: String,
    log: PathBuf,
}

/// Flags of a storage pod serving the shared model store on loopback.
pub const STORAGE: [&str; 6] = [
    "--profile",
    "storage",
    "--listen",
    "/ip4/127.0.0.1/tcp/0",
    "--announce-interval",
    "1",
];

/// `pod` with the shared model store and the given state directory.
pub fn pod_command(home: &Path) -> Command {
    pod_command_with_models(home, &test_home().join("models"))
}

/// `pod models pull NAME` into the state directory `home` (its own model store), joining the
/// mesh through `bootstrap`, with `extra` flags.
pub fn models_pull(home: &Path, name: &str, bootstrap: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pod"));
    cmd.arg("--home").arg(home);
    cmd.args([
        "--log",
        "warn",
        "models",
        "pull",
        name,
        "--bootstrap",
        bootstrap,
    ]);
    cmd.args(extra);
    cmd
}

/// The standard output of a command that must have succeeded; fails with both outputs if not.
pub fn stdout_of_success(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `pod` with the given state directory and model store.
pub fn pod_command_with_models(home: &Path, models: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pod"));
    cmd.arg("--home").arg(home).arg("--models-dir").arg(models);
    cmd
}

impl PodProcess {
    /// Starts a pod with a fresh state directory, on loopback, with mDNS off.
    pub fn start(args: &[&str]) -> PodProcess {
        let dir = tempfile::tempdir().expect("temp home");
        let home = dir.path().to_path_buf();
        let mut p = Self::start_in(&home, args);
        p._home_dir = Some(dir);
        p
    }

    /// A storage pod serving the shared model store, with the default chat model in it, on
    /// loopback.
    pub fn storage() -> PodProcess {
        super::model_path(pod_node::catalogue::DEFAULT_CHAT_MODEL);
        Self::start(&STORAGE)
    }

    /// Starts a pod with a fresh state directory and its own model store `models`.
    pub fn start_with_models(models: &Path, args: &[&str]) -> PodProcess {
        let dir = tempfile::tempdir().expect("temp home");
        let home = dir.path().to_path_buf();
        let mut p = Self::spawn(&home, models, args);
        p._home_dir = Some(dir);
        p
    }

    /// Starts a pod with a fresh state directory and the variables `env` set for it alone.
    #[allow(dead_code)]
    pub fn start_with_env(args: &[&str], env: &[(&str, &Path)]) -> PodProcess {
        let dir = tempfile::tempdir().expect("temp home");
        let home = dir.path().to_path_buf();
        let mut p = Self::spawn_with_env(&home, &test_home().join("models"), args, env);
        p._home_dir = Some(dir);
        p
    }

    /// Starts a pod with the given state directory (to restart one with the same identity).
    pub fn start_in(home: &Path, args: &[&str]) -> PodProcess {
        Self::spawn(home, &test_home().join("models"), args)
    }

    /// Starts a pod with the given state directory and its own model store `models`.
    pub fn start_in_with_models(home: &Path, models: &Path, args: &[&str]) -> PodProcess {
        Self::spawn(home, models, args)
    }

    fn spawn(home: &Path, models: &Path, args: &[&str]) -> PodProcess {
        Self::spawn_with_env(home, models, args, &[])
    }

    fn spawn_with_env(
        home: &Path,
        models: &Path,
        args: &[&str],
        env: &[(&str, &Path)],
    ) -> PodProcess {
        let log = home.join(format!("pod-{}.log", std::process::id()));
        let _ = std::fs::remove_file(home.join("daemon.json"));
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = pod_command_with_models(home, models)
            .args([
                "--log",
                "info,pod_node=debug",
                "start",
                "--api-port",
                "0",
                "--no-mdns",
                "--no-upnp",
            ])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn pod");
        let mut p = PodProcess {
            child,
            home: home.to_path_buf(),
            _home_dir: None,
            api: String::new(),
            peer_id: String::new(),
            log,
        };
        p.wait_ready();
        p
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("pod exited with {status}:\n{}", self.log());
            }
            if let Ok(text) = std::fs::read_to_string(self.home.join("daemon.json")) {
                let d: serde_json::Value = serde_json::from_str(&text).expect("daemon.json");
                self.api = d["api"].as_str().expect("api").to_owned();
                self.peer_id = d["peer_id"].as_str().expect("peer_id").to_owned();
                if http_get(&format!("{}/health", self.api)).is_some_and(|(s, _)| s == 200) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "pod not ready within {READY_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET a path of the pod's API as text; panics on transport errors.
    pub fn get_text(&self, path: &str) -> String {
        http_get_text(&format!("{}{path}", self.api))
            .unwrap_or_else(|| panic!("GET {path} failed:\n{}", self.log()))
    }

    /// The value of an unlabelled Prometheus sample of `/metrics`, e.g.
    /// `pod_blob_bytes_served_total`; panics when it is missing.
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.get_text("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }

    /// GET a path of the pod's API; panics on transport errors.
    pub fn get(&self, path: &str) -> serde_json::Value {
        let (status, body) = http_get(&format!("{}{path}", self.api))
            .unwrap_or_else(|| panic!("GET {path} failed:\n{}", self.log()));
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// The first TCP mesh address, with `/p2p/<id>`.
    pub fn tcp_addr(&self) -> String {
        self.mesh_addr("/tcp/")
    }

    /// The first QUIC mesh address, with `/p2p/<id>`.
    pub fn quic_addr(&self) -> String {
        self.mesh_addr("/quic-v1")
    }

    fn mesh_addr(&self, kind: &str) -> String {
        let node = self.get("/pod/v1/node");
        let addr = node["listen_addrs"]
            .as_array()
            .expect("listen_addrs")
            .iter()
            .filter_map(|a| a.as_str())
            .find(|a| a.contains(kind))
            .unwrap_or_else(|| panic!("no {kind} address in {node}"));
        format!("{addr}/p2p/{}", self.peer_id)
    }

    /// Peer ids and model names from `/pod/v1/peers`.
    pub fn peers(&self) -> Vec<(String, Vec<String>)> {
        let body = self.get("/pod/v1/peers");
        body["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|p| {
                let models = p["models"]
                    .as_array()
                    .map(|m| {
                        m.iter()
                            .filter_map(|m| m["name"].as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                (p["peer_id"].as_str().unwrap_or_default().to_owned(), models)
            })
            .collect()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("pod did not stop within 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET a URL: status and JSON body, or `None` if it could not connect.
pub fn http_get(url: &str) -> Option<(u16, serde_json::Value)> {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build(),
    );
    let mut res = agent.get(url).call().ok()?;
    let status = res.status().as_u16();
    let text = res.body_mut().read_to_string().ok()?;
    Some((status, serde_json::from_str(&text).unwrap_or_default()))
}

/// GET a URL as text, or `None` if it could not connect or did not answer 200.
pub fn http_get_text(url: &str) -> Option<String> {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .build(),
    );
    agent.get(url).call().ok()?.body_mut().read_to_string().ok()
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
