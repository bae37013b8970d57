//! A small internet in network namespaces, for tests of pods behind NAT: a "public" namespace
//! (where a relay pod runs), two routers that masquerade, and a home namespace behind each
//! router. Only private addresses are used and the host's own network is never touched. The
//! homes have no route to each other: what one sends the other goes out through its router
//! to the public side, and comes in only where the other router's NAT lets it.
//!
//! ```text
//!  home_a 192.168.1.2 ─ 192.168.1.1 router_a 10.0.1.2 ─┐
//!                                                      public 10.0.0.1 (10.0.1.1, 10.0.2.1)
//!  home_b 172.16.2.2  ─ 172.16.2.1  router_b 10.0.2.2 ─┘
//! ```
//!
//! Namespaces are named after the test process and a counter, so parallel runs do not
//! collide; everything is removed on drop, also when a test fails, and namespaces left by
//! killed runs are removed by the next one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Names of this harness's namespaces start with this, then the test process id.
const PREFIX: &str = "podnat";

/// How the routers translate addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Linux masquerading as home routers do it: the source port is kept where it is free
    /// (endpoint-independent mapping), inbound packets pass only for connections opened
    /// from inside. Hole punching can work.
    PortPreserving,
    /// Masquerading with a random source port for every connection (`--random-fully`):
    /// endpoint-dependent mapping, as in "symmetric" NATs. Hole punching cannot work.
    Symmetric,
}

/// The namespaces and their addresses.
pub struct NatLab {
    /// The public side: reachable from both homes.
    pub public: String,
    pub router_a: String,
    pub router_b: String,
    pub home_a: String,
    pub home_b: String,
    /// All of them, in creation order.
    all: Vec<String>,
}

/// The public namespace's address every home can reach.
pub const PUBLIC_IP: &str = "10.0.0.1";
/// Router A's public address: how home A appears on the public side.
pub const ROUTER_A_IP: &str = "10.0.1.2";
/// Router B's public address.
pub const ROUTER_B_IP: &str = "10.0.2.2";
pub const HOME_A_IP: &str = "192.168.1.2";
pub const HOME_B_IP: &str = "172.16.2.2";

impl NatLab {
    /// Builds the lab, or says why it cannot be built here. Under `CI=true` it must be
    /// built: a failure panics instead of letting the test skip.
    pub fn create_or_skip(nat: NatKind) -> Option<NatLab> {
        match Self::create(nat) {
            Ok(lab) => Some(lab),
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("cannot build the NAT test network (CI must run these tests): {e}")
            }
            Err(e) => {
                eprintln!("skipped: cannot build the NAT test network here: {e}");
                None
            }
        }
    }

    /// Creates the namespaces, links, addresses, routes and NAT rules.
    pub fn create(nat: NatKind) -> Result<NatLab, String> {
        remove_stale();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = |role: &str| format!("{PREFIX}-{}-{n}-{role}", std::process::id());
        let mut lab = NatLab {
            public: name("pub"),
            router_a: name("ra"),
            router_b: name("rb"),
            home_a: name("ha"),
            home_b: name("hb"),
            all: Vec::new(),
        };
        for ns in [
            lab.public.clone(),
            lab.router_a.clone(),
            lab.router_b.clone(),
            lab.home_a.clone(),
            lab.home_b.clone(),
        ] {
            run("ip", &["netns", "add", &ns])?;
            // From here on, drop removes it.
            lab.all.push(ns.clone());
            ip(&ns, &["link", "set", "lo", "up"])?;
        }
        let public = lab.public.clone();
        ip(
            &public,
            &["addr", "add", &format!("{PUBLIC_IP}/32"), "dev", "lo"],
        )?;
        sysctl(&public, "net/ipv4/ip_forward", "1")?;
        for (router, home, wan_side, wan_net, lan_net, home_ip) in [
            (
                &lab.router_a,
                &lab.home_a,
                "to-a",
                "10.0.1",
                "192.168.1",
                HOME_A_IP,
            ),
            (
                &lab.router_b,
                &lab.home_b,
                "to-b",
                "10.0.2",
                "172.16.2",
                HOME_B_IP,
            ),
        ] {
            veth(&public, wan_side, router, "wan")?;
            ip(
                &public,
                &["addr", "add", &format!("{wan_net}.1/24"), "dev", wan_side],
            )?;
            ip(
                router,
                &["addr", "add", &format!("{wan_net}.2/24"), "dev", "wan"],
            )?;
            ip(
                router,
                &["route", "add", "default", "via", &format!("{wan_net}.1")],
            )?;
            veth(router, "lan", home, "eth0")?;
            ip(
                router,
                &["addr", "add", &format!("{lan_net}.1/24"), "dev", "lan"],
            )?;
            ip(
                home,
                &["addr", "add", &format!("{home_ip}/24"), "dev", "eth0"],
            )?;
            ip(
                home,
                &["route", "add", "default", "via", &format!("{lan_net}.1")],
            )?;
            sysctl(router, "net/ipv4/ip_forward", "1")?;
            let mut masquerade = vec![
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "wan",
                "-j",
                "MASQUERADE",
            ];
            if nat == NatKind::Symmetric {
                masquerade.push("--random-fully");
            }
            iptables(router, &masquerade)?;
            // A home router's firewall: from outside, only replies to what the inside opened
            // pass; anything else is dropped without an answer (no RST, no ICMP), to the
            // router itself too. A dropped packet leaves no connection-tracking entry behind,
            // so a hole punch's first packet, arriving before the other side opened its
            // mapping, does not take the port the other side's packets will need.
            for chain in [
                &["-A", "FORWARD", "-i", "wan", "-o", "lan"][..],
                &["-A", "INPUT", "-i", "wan"],
            ] {
                let mut accept = chain.to_vec();
                accept.extend_from_slice(&[
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "ESTABLISHED,RELATED",
                    "-j",
                    "ACCEPT",
                ]);
                iptables(router, &accept)?;
                let mut drop = chain.to_vec();
                drop.extend_from_slice(&["-j", "DROP"]);
                iptables(router, &drop)?;
            }
        }
        Ok(lab)
    }

    /// Runs a command inside a namespace and waits for it, at most `timeout`.
    pub fn exec(&self, ns: &str, program: &str, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new("timeout");
        cmd.arg(format!("{}", timeout.as_secs().max(1)))
            .args(["ip", "netns", "exec", ns, program])
            .args(args);
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {program} in {ns}: {e}"))
    }

    /// Whether a TCP connection from namespace `from` to `ip:port` opens within 3 seconds.
    pub fn tcp_reaches(&self, from: &str, ip: &str, port: u16) -> bool {
        self.exec(
            from,
            "bash",
            &["-c", &format!("exec 3<>/dev/tcp/{ip}/{port}")],
            Duration::from_secs(3),
        )
        .status
        .success()
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for ns in self.all.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Removes namespaces this harness left behind in runs that were killed (their process is
/// gone), so they do not pile up.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

fn iptables(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["netns", "exec", ns, "iptables"];
    all.extend_from_slice(args);
    run("ip", &all)
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), String> {
    run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            &format!("echo {value} > /proc/sys/{key}"),
        ],
    )
}

/// A veth pair from `a`'s `a_if` to `b`'s `b_if`, both up.
fn veth(a: &str, a_if: &str, b: &str, b_if: &str) -> Result<(), String> {
    ip(
        a,
        &[
            "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
        ],
    )?;
    ip(a, &["link", "set", a_if, "up"])?;
    ip(b, &["link", "set", b_if, "up"])
}

/// How long a pod in a namespace may take to answer `/health`.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A `pod start` running inside a namespace, with its own state directory. Its API listens
/// on the namespace's loopback and is reached with `curl` run in the namespace. Killed when
/// dropped.
pub struct NsPod {
    pub ns: String,
    pub child: Child,
    pub home: PathBuf,
    _home_dir: tempfile::TempDir,
    /// Empty model store of its own, for pods that must hold no model.
    _models_dir: Option<tempfile::TempDir>,
    pub api: String,
    pub peer_id: String,
    log: PathBuf,
}

impl NsPod {
    /// Starts `pod start` in `ns` with the shared model store (`own_store`: an empty one of
    /// its own) and the given flags, and waits until its API answers `/health`.
    pub fn start(ns: &str, own_store: bool, args: &[&str]) -> NsPod {
        let home_dir = tempfile::tempdir().expect("temp home");
        let home = home_dir.path().to_path_buf();
        let models_dir = own_store.then(|| tempfile::tempdir().expect("temp models"));
        let models = models_dir.as_ref().map_or_else(
            || super::test_home().join("models"),
            |d| d.path().to_path_buf(),
        );
        let log = home.join("pod.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_pod")])
            .arg("--home")
            .arg(&home)
            .arg("--models-dir")
            .arg(&models)
            .args([
                "--log",
                "info,pod_node=debug",
                "start",
                "--api-port",
                "0",
                "--no-mdns",
                "--no-upnp",
                "--no-pull",
            ])
            .args(args)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn pod in namespace");
        let mut pod = NsPod {
            ns: ns.to_owned(),
            child,
            home,
            _home_dir: home_dir,
            _models_dir: models_dir,
            api: String::new(),
            peer_id: String::new(),
            log,
        };
        pod.wait_ready();
        pod
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("pod in {} exited with {status}:\n{}", self.ns, self.log());
            }
            if let Ok(text) = std::fs::read_to_string(self.home.join("daemon.json")) {
                let d: serde_json::Value = serde_json::from_str(&text).expect("daemon.json");
                self.api = d["api"].as_str().expect("api").to_owned();
                self.peer_id = d["peer_id"].as_str().expect("peer_id").to_owned();
                if self
                    .request("GET", "/health", None)
                    .is_some_and(|r| r.status == 200)
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "pod in {} not ready within {READY_TIMEOUT:?}:\n{}",
                self.ns,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A request to the pod's API from inside its namespace (`curl`, 120 s at most); `None`
    /// when it could not connect.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Option<Response> {
        let url = format!("{}{path}", self.api);
        let mut args = vec!["-sS", "-m", "120", "-D", "-", "-X", method];
        if let Some(body) = body {
            args.extend_from_slice(&["-H", "content-type: application/json", "--data", body]);
        }
        args.push(&url);
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl"])
            .args(&args)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        Response::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// GET a path of the API as JSON; panics unless it answers 200.
    pub fn get(&self, path: &str) -> serde_json::Value {
        let r = self
            .request("GET", path, None)
            .unwrap_or_else(|| panic!("GET {path} failed in {}:\n{}", self.ns, self.log()));
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        serde_json::from_str(&r.body).expect("JSON body")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Kills the pod at once (no graceful stop), as a crash or a power cut would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NsPod {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP response as `curl -D -` printed it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    fn parse(text: &str) -> Option<Response> {
        let (head, body) = text.split_once("\r\n\r\n")?;
        let mut lines = head.lines();
        let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Some(Response {
            status,
            headers,
            body: body.to_owned(),
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}
