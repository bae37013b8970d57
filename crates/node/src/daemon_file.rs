//! `daemon.json` in the state directory: how `pod status`, `pod stop` and `pod peers` find the
//! node running with that directory, tell whether it still runs, and stop it.

use std::path::{Path, PathBuf};

/// What `daemon.json` in the state directory says about the running node, for `pod status`,
/// `pod peers` and `pod stop`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DaemonFile {
    /// Process id.
    pub pid: u32,
    /// Base URL of the API, e.g. `http://127.0.0.1:8080`; `None` with `--no-api`.
    pub api: Option<String>,
    /// The node's PeerId.
    pub peer_id: String,
    /// When the node started, Unix seconds.
    #[serde(default)]
    pub started_at: u64,
    /// The process's start time in clock ticks after boot (Linux), which tells the node apart
    /// from a later process that got the same pid.
    #[serde(default)]
    pub process_start: Option<u64>,
    /// The profile that runs (`auto` resolved).
    #[serde(default)]
    pub profile: String,
    /// The compute device models were loaded on, e.g. `cpu` or `cuda:0`.
    #[serde(default)]
    pub device: String,
    /// pod's version.
    #[serde(default)]
    pub version: String,
}

/// Whether the process a `daemon.json` names still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// It runs.
    Running,
    /// It exited (or is a zombie waiting for its parent); the file is stale.
    Exited,
    /// A different process has the pid now; the file is stale.
    Replaced,
}

impl DaemonFile {
    /// What a node started by this process records: its API's base URL (`None` without an
    /// API), PeerId, profile and compute device, with the process's id and start time.
    pub fn for_this_process(
        api: Option<String>,
        peer_id: String,
        profile: String,
        device: String,
    ) -> DaemonFile {
        let pid = std::process::id();
        DaemonFile {
            pid,
            api,
            peer_id,
            started_at: unix_now(),
            process_start: process_state(pid).and_then(|p| p.start_ticks),
            profile,
            device,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// Where the file lives.
    pub fn path(home: &Path) -> PathBuf {
        home.join("daemon.json")
    }

    /// Reads it, if a daemon wrote one.
    pub fn read(home: &Path) -> Option<DaemonFile> {
        let text = std::fs::read_to_string(Self::path(home)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes it atomically, so readers never see half a file.
    pub(crate) fn write(&self, home: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(home)?;
        let tmp = tempfile::NamedTempFile::new_in(home)?;
        serde_json::to_writer_pretty(tmp.as_file(), self)?;
        tmp.persist(Self::path(home)).map_err(|e| e.error)?;
        Ok(())
    }

    /// Whether the process still runs.
    pub fn liveness(&self) -> Liveness {
        match process_state(self.pid) {
            None => Liveness::Exited,
            Some(p) if p.zombie => Liveness::Exited,
            Some(p) => match (self.process_start, p.start_ticks) {
                (Some(recorded), Some(now)) if recorded != now => Liveness::Replaced,
                _ => Liveness::Running,
            },
        }
    }

    /// Asks the node to stop, as systemd would: SIGTERM.
    pub fn terminate(&self) -> std::io::Result<()> {
        let pid = i32::try_from(self.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| std::io::Error::other(format!("bad pid {}", self.pid)))?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .map_err(std::io::Error::from)
    }

    /// Removes the file when it is stale.
    pub fn remove_stale(home: &Path) {
        if DaemonFile::read(home).is_some_and(|d| d.liveness() != Liveness::Running) {
            let _ = std::fs::remove_file(Self::path(home));
        }
    }

    /// Removes the file when this process wrote it; a later node with the same state directory
    /// may have replaced it.
    pub(crate) fn remove_if_ours(home: &Path) {
        if DaemonFile::read(home).is_some_and(|d| d.pid == std::process::id()) {
            let _ = std::fs::remove_file(Self::path(home));
        }
    }
}

/// What the system says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcessState {
    zombie: bool,
    /// Start time in clock ticks after boot; `None` off Linux.
    start_ticks: Option<u64>,
}

/// `None` when no process has the pid.
fn process_state(pid: u32) -> Option<ProcessState> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // After the command name in parentheses (which may hold spaces): the state is the
        // first field, the start time the twentieth (field 22 of proc(5)).
        Ok(stat) => {
            let rest = &stat[stat.rfind(')')? + 1..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(ProcessState {
                zombie: matches!(fields.first(), Some(&"Z") | Some(&"X")),
                start_ticks: fields.get(19).and_then(|s| s.parse().ok()),
            })
        }
        Err(_) if Path::new("/proc/self/stat").exists() => None,
        // No procfs: signal 0 tests for existence.
        Err(_) => {
            let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
            match rustix::process::test_kill_process(pid) {
                Ok(()) | Err(rustix::io::Errno::PERM) => Some(ProcessState {
                    zombie: false,
                    start_ticks: None,
                }),
                Err(_) => None,
            }
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn file(pid: u32, process_start: Option<u64>) -> DaemonFile {
        DaemonFile {
            pid,
            api: None,
            peer_id: String::new(),
            started_at: 0,
            process_start,
            profile: String::new(),
            device: String::new(),
            version: String::new(),
        }
    }

    #[test]
    fn tells_running_exited_and_reused_pids_apart() {
        let me = std::process::id();
        let start = process_state(me).and_then(|p| p.start_ticks);
        assert_eq!(file(me, start).liveness(), Liveness::Running);
        // Above the kernel's pid_max (at most 2^22).
        assert_eq!(file(1 << 23, None).liveness(), Liveness::Exited);
        if let Some(start) = start {
            assert_eq!(file(me, Some(start + 1)).liveness(), Liveness::Replaced);
        }
    }

    #[test]
    fn a_zombie_has_exited() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie until `wait`.
        let deadline = Instant::now() + Duration::from_secs(10);
        while file(pid, None).liveness() == Liveness::Running {
            assert!(Instant::now() < deadline, "`true` did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(file(pid, None).liveness(), Liveness::Exited);
        child.wait().unwrap();
    }

    #[test]
    fn old_daemon_files_still_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            DaemonFile::path(dir.path()),
            r#"{"pid": 7, "api": "http://127.0.0.1:8080", "peer_id": "12D3KooW"}"#,
        )
        .unwrap();
        let d = DaemonFile::read(dir.path()).unwrap();
        assert_eq!(d.api.as_deref(), Some("http://127.0.0.1:8080"));
        assert_eq!(d.process_start, None);
    }
}
