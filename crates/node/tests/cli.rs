//! The `pod` binary driven as a user would: success paths and one-line errors.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::process::{pod_command, PodProcess};

fn pod(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pod"))
        .arg("--home")
        .arg(common::test_home())
        .args(["--log", "warn"])
        .args(args)
        .output()
        .expect("run pod")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed command prints exactly one line, starting with `error:`, and exits non-zero.
fn assert_one_line_error(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected failure");
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "{needle:?} not in: {err}");
}

#[test]
fn models_list_json_shows_the_catalogue() {
    common::model_path("smollm2-135m-instruct");
    let o = pod(&["models", "list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let smol = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "smollm2-135m-instruct")
        .expect("default model listed");
    assert_eq!(smol["downloaded"], true);
    assert_eq!(smol["kind"], "chat");
}

#[test]
fn infer_streams_a_deterministic_answer() {
    let args = [
        "infer",
        "--prompt",
        "What is 2 + 2?",
        "--max-tokens",
        "12",
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--device",
        "cpu",
    ];
    let a = pod(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    let b = pod(&args);
    assert!(!a.stdout.is_empty());
    assert_eq!(a.stdout, b.stdout, "same seed, same output");
    assert!(stderr(&a).contains("completion tokens"), "{}", stderr(&a));
}

#[test]
fn unknown_model_is_one_clear_line() {
    let o = pod(&["infer", "--model", "no-such-model", "--prompt", "hi"]);
    assert_one_line_error(&o, "unknown model `no-such-model`");
    let o = pod(&["models", "pull", "no-such-model"]);
    assert_one_line_error(&o, "unknown model `no-such-model`");
}

#[test]
fn corrupted_gguf_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let o = pod(&["infer", "--model", path.to_str().unwrap(), "--prompt", "hi"]);
    assert_one_line_error(&o, "not a valid GGUF model");
    let path = dir.path().join("text.gguf");
    std::fs::write(&path, b"hello, I am not a model").unwrap();
    let o = pod(&["infer", "--model", path.to_str().unwrap(), "--prompt", "hi"]);
    assert_one_line_error(&o, "not a valid GGUF model");
}

#[test]
fn missing_file_is_one_clear_line() {
    let o = pod(&[
        "infer",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "hi",
    ]);
    assert_one_line_error(&o, "unknown model `/nonexistent/model.gguf`");
}

#[test]
fn prompt_over_the_context_is_one_clear_line() {
    let long = "word ".repeat(10000);
    let o = pod(&["infer", "--prompt", &long]);
    assert_one_line_error(&o, "over the model's context length of 8192 tokens");
}

#[test]
fn bad_flags_are_rejected() {
    let o = pod(&["infer", "--prompt", "hi", "--device", "tpu"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown device `tpu`"),
        "{}",
        stderr(&o)
    );
    let o = pod(&["infer", "--prompt", "hi", "--temperature", "5"]);
    assert_one_line_error(&o, "temperature");
}

fn pod_in(home: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pod"))
        .arg("--home")
        .arg(home)
        .args(["--log", "warn"])
        .args(args)
        .output()
        .expect("run pod")
}

#[test]
fn identity_is_stable_exportable_and_importable() {
    let a = tempfile::tempdir().unwrap();
    let show = |home: &std::path::Path| -> serde_json::Value {
        let o = pod_in(home, &["identity", "show", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let first = show(a.path());
    assert!(first["peer_id"].as_str().unwrap().starts_with("12D3KooW"));
    assert_eq!(show(a.path()), first, "the PeerId survives restarts");

    let export = a.path().join("backup.json");
    let o = pod_in(
        a.path(),
        &["identity", "export", "--output", export.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let b = tempfile::tempdir().unwrap();
    let o = pod_in(b.path(), &["identity", "import", export.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(show(b.path())["peer_id"], first["peer_id"]);

    let c = tempfile::tempdir().unwrap();
    show(c.path());
    let o = pod_in(c.path(), &["identity", "import", export.to_str().unwrap()]);
    assert_one_line_error(&o, "pass --force");

    std::fs::write(c.path().join("identity"), b"not a key").unwrap();
    let o = pod_in(c.path(), &["identity", "show"]);
    assert_one_line_error(&o, "is corrupted");
    assert_eq!(
        std::fs::read(c.path().join("identity")).unwrap(),
        b"not a key"
    );
}

#[test]
fn identity_export_is_private_over_an_existing_file_and_refuses_symlinks() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    let export = home.path().join("backup.json");
    std::fs::write(&export, b"old").unwrap();
    std::fs::set_permissions(&export, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = export.to_str().unwrap();
    let o = pod_in(home.path(), &["identity", "export", "--output", out]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mode = std::fs::metadata(&export).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    assert!(std::fs::read_to_string(&export)
        .unwrap()
        .contains("12D3KooW"));

    let target = home.path().join("elsewhere");
    std::fs::write(&target, b"not yours").unwrap();
    let link = home.path().join("link.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let o = pod_in(
        home.path(),
        &["identity", "export", "--output", link.to_str().unwrap()],
    );
    assert_one_line_error(&o, "symbolic link");
    assert_eq!(std::fs::read(&target).unwrap(), b"not yours");
}

#[test]
fn a_listing_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    // `pod models list | head -0`: the reading end is gone before pod writes a line.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = Command::new(env!("CARGO_BIN_EXE_pod"))
        .arg("--home")
        .arg(common::test_home())
        .args(["--log", "warn", "models", "list"])
        .stdout(writer)
        .output()
        .expect("run pod");
    let err = stderr(&o);
    assert!(err.is_empty(), "nothing on stderr, got: {err}");
    // Ended by SIGPIPE (13 on Linux), as `ls | head` ends `ls`.
    assert_eq!(o.status.signal(), Some(13), "{:?}", o.status);
}

#[test]
fn a_model_modified_after_its_download_is_reported_and_refused() {
    use std::io::{Seek, SeekFrom};
    let name = pod_node::catalogue::DEFAULT_CHAT_MODEL;
    let pulled = common::model_path(name);
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("models").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let source = pulled.parent().unwrap();
    for file in ["model.gguf", ".verified.json"] {
        std::fs::copy(source.join(file), dir.join(file)).unwrap();
    }
    // A copy has another inode and time than those recorded: hashed again, found intact.
    let o = pod_at(home.path(), &["models", "verify", name]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.lines()
            .any(|l| l.contains("model.gguf") && l.ends_with("OK")),
        "{out}"
    );

    // One byte in the middle of the weights changes.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("model.gguf"))
        .unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut byte = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut byte).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[byte[0] ^ 0x01]).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let o = pod_at(home.path(), &["models", "verify"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.lines()
            .any(|l| l.contains("model.gguf") && l.ends_with("MODIFIED")),
        "{out}"
    );
    assert_one_line_error(&o, "1 model file(s) modified");

    let o = pod_at(
        home.path(),
        &[
            "start",
            "--profile",
            "inference",
            "--model",
            name,
            "--no-pull",
            "--no-mdns",
            "--p2p-port",
            "0",
            "--api-port",
            "0",
        ],
    );
    assert!(!o.status.success(), "a modified model was served");
    let err = stderr(&o);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{err}");
    assert!(last.contains("was modified after its download"), "{err}");
    assert!(
        !err.contains("model ready") && !err.contains("listening"),
        "{err}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let o = Command::new(env!("CARGO_BIN_EXE_pod"))
        .arg("--home")
        .arg(common::test_home())
        .args([
            "--log-format",
            "json",
            "infer",
            "--prompt",
            "hi",
            "--max-tokens",
            "2",
        ])
        .output()
        .expect("run pod");
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let logs: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let loaded = logs
        .iter()
        .find(|l| l["message"] == "model loaded")
        .unwrap_or_else(|| panic!("no model-loaded line in {err}"));
    assert_eq!(loaded["level"], "INFO");
    assert_eq!(loaded["architecture"], "llama");
}

/// The help block of one flag in `pod start --help`.
fn help_block<'a>(help: &'a str, flag: &str) -> Option<&'a str> {
    let start = help
        .find(&format!("      {flag} "))
        .or_else(|| help.find(&format!("      {flag}\n")))?;
    let rest = &help[start..];
    let end = rest[6..]
        .find("\n  -")
        .or_else(|| rest[6..].find("\n      -"))
        .map_or(rest.len(), |i| i + 6);
    Some(&rest[..end])
}

#[test]
fn the_nixos_module_passes_only_flags_the_binary_has_with_its_defaults() {
    let flags_file = tempfile::NamedTempFile::new().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let check = Command::new(root.join("scripts/nix-check"))
        .arg("--emit-flags")
        .arg(flags_file.path())
        .output()
        .expect("run scripts/nix-check");
    assert!(
        check.status.success(),
        "nix-check failed: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let flags: serde_json::Value =
        serde_json::from_slice(&std::fs::read(flags_file.path()).unwrap()).unwrap();
    let global = pod(&["--help"]);
    let start = pod(&["start", "--help"]);
    let global = String::from_utf8_lossy(&global.stdout).into_owned();
    let start = String::from_utf8_lossy(&start.stdout).into_owned();
    for flag in flags["global_flags"].as_array().unwrap() {
        let flag = flag.as_str().unwrap();
        assert!(
            help_block(&global, flag).is_some(),
            "`pod --help` lacks {flag}"
        );
    }
    for flag in flags["start_flags"].as_array().unwrap() {
        let flag = flag.as_str().unwrap();
        let block =
            help_block(&start, flag).unwrap_or_else(|| panic!("`pod start --help` lacks {flag}"));
        let takes_value = flags["takes_value"][flag].as_bool().unwrap();
        assert_eq!(
            block.lines().next().unwrap().contains('<'),
            takes_value,
            "{flag}: module and binary disagree on whether it takes a value:\n{block}"
        );
    }
    for (flag, value) in flags["start_defaults"].as_object().unwrap() {
        let block = help_block(&start, flag).unwrap();
        let want = format!("[default: {}]", value.as_str().unwrap());
        assert!(
            block.contains(&want),
            "{flag}: module default {want} vs binary:\n{block}"
        );
    }
}

// ---------------------------------------------------------------- start, status, stop, chat

/// Runs `cmd` with `input` on stdin; kills it and fails the test after `timeout`.
fn run_bounded(cmd: &mut Command, input: &str, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pod");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_owned();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {timeout:?}:\n{}",
                String::from_utf8_lossy(&err.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = writer.join();
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// `pod --home HOME --log warn ARGS`, bounded to 60 s.
fn pod_at(home: &Path, args: &[&str]) -> Output {
    run_bounded(
        Command::new(env!("CARGO_BIN_EXE_pod"))
            .arg("--home")
            .arg(home)
            .args(["--log", "warn"])
            .args(args),
        "",
        Duration::from_secs(60),
    )
}

fn json_of(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

/// A port nothing listens on now (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn version_json_names_the_build() {
    let home = tempfile::tempdir().unwrap();
    let v = json_of(&pod_at(home.path(), &["version", "--json"]));
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["features"]["candle_cuda"], cfg!(feature = "cuda"));
    assert_eq!(v["features"]["rocm"], true);
    assert_eq!(v["features"]["cuda"], true);
    let backends: Vec<&str> = v["gpu_backends"]
        .as_array()
        .expect("gpu_backends")
        .iter()
        .map(|b| b["backend"].as_str().expect("backend"))
        .collect();
    assert_eq!(backends, ["hip", "cuda"]);
    assert!(v["target"]
        .as_str()
        .unwrap()
        .contains(std::env::consts::ARCH));
    assert_eq!(v["protocols"]["infer"], "/pod/infer/1.0.0");
    let archs = |path: &str| -> Vec<String> {
        v["decoders"][path]
            .as_array()
            .expect("decoders")
            .iter()
            .map(|a| a.as_str().expect("architecture").to_owned())
            .collect()
    };
    assert!(archs("cpu").contains(&"qwen3moe".to_owned()), "{v}");
    assert!(archs("gpu").contains(&"qwen3moe".to_owned()), "{v}");
    assert!(archs("gpu").contains(&"qwen3".to_owned()), "{v}");
    let text = pod_at(home.path(), &["version"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.starts_with("pod "));
    let decoders = text
        .lines()
        .find(|l| l.starts_with("decoders  cpu: "))
        .unwrap_or_else(|| panic!("{text}"));
    let gpu = decoders.split("gpu: ").nth(1).unwrap_or_default();
    assert!(decoders.contains("qwen3moe"), "{text}");
    assert!(gpu.contains("qwen3moe"), "{text}");
}

#[test]
fn dry_run_shows_a_pipeline_stage_and_refuses_layers_of_several_models() {
    let home = tempfile::tempdir().unwrap();
    let two = pod_at(
        home.path(),
        &[
            "start",
            "--dry-run",
            "--layers",
            "0-14",
            "--model",
            "smollm2-135m-instruct",
            "--model",
            "gemma3-270m",
        ],
    );
    assert_one_line_error(&two, "exactly one --model");
    let bad = pod_at(home.path(), &["start", "--dry-run", "--layers", "9-3"]);
    assert_one_line_error(&bad, "ends before it starts");
    for (layers, role) in [("0-14", "as its head"), ("15-29", "as a stage")] {
        let args = [
            "start",
            "--dry-run",
            "--layers",
            layers,
            "--model",
            "smollm2-135m-instruct",
        ];
        let out = pod_at(home.path(), &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            text.contains(&format!(
                "stage     blocks {layers} of the model, on the CPU, {role}"
            )),
            "{text}"
        );
        let mut json_args = args.to_vec();
        json_args.push("--json");
        assert_eq!(json_of(&pod_at(home.path(), &json_args))["layers"], layers);
    }
    // auto cannot hear the mesh in a dry run: it says so, and what it would take alone.
    common::model_path("smollm2-135m-instruct");
    let models = common::test_home()
        .join("models")
        .to_string_lossy()
        .into_owned();
    for (memory, shown, outcome) in [
        (
            "100MB",
            "95.4 MiB",
            "alone in the mesh it would take blocks 0-",
        ),
        (
            "1GiB",
            "1.0 GiB",
            "alone in the mesh it would take blocks 0-29 of 30",
        ),
        (
            "1MB",
            "976.6 KiB",
            "--max-memory 1000000 bytes holds no block this pod could serve",
        ),
    ] {
        let args = [
            "--models-dir",
            &models,
            "start",
            "--dry-run",
            "--layers",
            "auto",
            "--max-memory",
            memory,
            "--model",
            "smollm2-135m-instruct",
        ];
        let out = pod_at(home.path(), &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            text.contains(&format!(
                "stage     blocks decided at start (--layers auto): those the mesh's pods cover \
                 least, as many as fit in {shown} (--max-memory), on the CPU; {outcome}"
            )),
            "{text}"
        );
    }
    let bad = pod_at(home.path(), &["start", "--dry-run", "--layers", "most"]);
    assert_one_line_error(&bad, "(or auto)");
}

#[test]
fn dry_run_lists_each_profiles_models_and_services_and_binds_nothing() {
    let home = tempfile::tempdir().unwrap();
    // The API port is taken: a dry run must not notice, because it binds nothing.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let plan = |profile: &str, extra: &[&str]| {
        let mut args = vec![
            "start",
            "--dry-run",
            "--json",
            "--profile",
            profile,
            "--api-port",
            &port,
        ];
        args.extend_from_slice(extra);
        json_of(&pod_at(home.path(), &args))
    };
    let names = |p: &serde_json::Value| -> Vec<String> {
        p["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let full = plan("full", &[]);
    assert_eq!(
        names(&full),
        ["smollm2-135m-instruct", "all-minilm-l6-v2"],
        "{full}"
    );
    assert_eq!(full["mesh"]["relay_server"], true);
    assert_eq!(full["mesh"]["serve_mesh"], true);
    assert_eq!(full["storage"], true);
    assert_eq!(full["api"]["enabled"], true);
    assert_eq!(full["api"]["url"], format!("http://127.0.0.1:{port}"));
    assert_eq!(full["mesh"]["mdns"], true);
    assert_eq!(full["reason"], serde_json::Value::Null);

    let inference = plan("inference", &[]);
    assert_eq!(names(&inference), ["smollm2-135m-instruct"]);
    assert_eq!(inference["mesh"]["relay_server"], false);
    assert_eq!(inference["storage"], false);
    let embedding = plan("embedding", &[]);
    assert_eq!(names(&embedding), ["all-minilm-l6-v2"]);
    let relay = plan("relay", &["--no-mdns"]);
    assert!(names(&relay).is_empty());
    assert_eq!(relay["mesh"]["relay_server"], true);
    assert_eq!(relay["mesh"]["serve_mesh"], false, "no models to serve");
    assert_eq!(relay["mesh"]["mdns"], false);
    assert_eq!(relay["device"]["resolved"], "none");
    let storage = plan("storage", &["--no-api"]);
    assert!(names(&storage).is_empty());
    assert_eq!(storage["storage"], true);
    assert_eq!(storage["api"]["enabled"], false);
    assert_eq!(storage["api"]["url"], serde_json::Value::Null);
    // Pods that serve files listen for bulk connections on the mesh port plus one, or where
    // told; others, or with --no-bulk, do not.
    assert_eq!(
        storage["bulk_listen"],
        serde_json::json!(["0.0.0.0:4002", "[::]:4002"])
    );
    assert_eq!(
        full["bulk_listen"],
        serde_json::json!(["0.0.0.0:4002", "[::]:4002"])
    );
    assert_eq!(inference["bulk_listen"], serde_json::json!([]));
    let bulk =
        |extra: &[&str]| plan("storage", &[&["--no-api"], extra].concat())["bulk_listen"].clone();
    assert_eq!(bulk(&["--no-bulk"]), serde_json::json!([]));
    assert_eq!(
        bulk(&["--p2p-port", "5000"]),
        serde_json::json!(["0.0.0.0:5001", "[::]:5001"])
    );
    assert_eq!(
        bulk(&["--listen", "/ip4/127.0.0.1/tcp/0", "--bulk-port", "6000"]),
        serde_json::json!(["127.0.0.1:6000"])
    );
    assert_eq!(
        bulk(&["--listen", "/ip4/127.0.0.1/tcp/0"]),
        serde_json::json!(["127.0.0.1:0"])
    );

    // auto says what it picked and why, in the plan and in a log line.
    let auto = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_pod"))
            .arg("--home")
            .arg(home.path())
            .args(["start", "--dry-run", "--api-port", &port]),
        "",
        Duration::from_secs(60),
    );
    assert!(auto.status.success(), "{}", stderr(&auto));
    let text = String::from_utf8_lossy(&auto.stdout);
    let first = text.lines().next().unwrap();
    assert!(first.starts_with("profile   "), "{text}");
    assert!(first.contains("(auto: "), "{text}");
    assert!(first.contains("memory"), "{text}");
    assert!(
        stderr(&auto).contains("profile auto picked"),
        "{}",
        stderr(&auto)
    );
    let auto = plan("auto", &[]);
    assert_eq!(auto["requested_profile"], "auto");
    assert!(["full", "inference", "relay"].contains(&auto["profile"].as_str().unwrap()));
    assert!(!auto["reason"].as_str().unwrap().is_empty());

    // Nothing was started: no identity, no daemon.json.
    assert!(!home.path().join("identity").exists());
    assert!(!home.path().join("daemon.json").exists());
}

#[test]
fn flags_beat_environment_beats_config_file_beats_defaults() {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("config.toml"),
        "profile = \"relay\"\napi_port = 9001\nmdns = false\nannounce_interval = 30\n",
    )
    .unwrap();
    let plan = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pod"));
        cmd.arg("--home")
            .arg(home.path())
            .args(["--log", "warn", "start", "--dry-run", "--json"])
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        json_of(&run_bounded(&mut cmd, "", Duration::from_secs(60)))
    };
    let file = plan(&[], &[]);
    assert_eq!(file["profile"], "relay");
    assert_eq!(file["api"]["port"], 9001);
    assert_eq!(file["mesh"]["mdns"], false);
    assert_eq!(file["mesh"]["announce_interval_seconds"], 30);
    assert_eq!(file["sources"]["api_port"], "config");
    assert_eq!(file["sources"]["max_batch"], "default");
    assert_eq!(file["engine"]["max_batch"], 8);
    assert_eq!(file["config_file"]["found"], true);

    let env = plan(&[("POD_API_PORT", "9002"), ("POD_NO_MDNS", "false")], &[]);
    assert_eq!(env["api"]["port"], 9002);
    assert_eq!(env["sources"]["api_port"], "env");
    assert_eq!(
        env["mesh"]["mdns"], true,
        "POD_NO_MDNS=false beats mdns = false"
    );
    assert_eq!(env["profile"], "relay");

    let flag = plan(&[("POD_API_PORT", "9002")], &["--api-port", "9003"]);
    assert_eq!(flag["api"]["port"], 9003);
    assert_eq!(flag["sources"]["api_port"], "flag");

    // --config names another file, which then must exist.
    let other = home.path().join("other.toml");
    std::fs::write(&other, "api_port = 9004\n").unwrap();
    let o = plan(&[], &["--config", other.to_str().unwrap()]);
    assert_eq!(o["api"]["port"], 9004);
    assert_eq!(o["profile"], "full", "the default file is not read then");
    let o = pod_at(
        home.path(),
        &["--config", "/nonexistent/pod.toml", "start", "--dry-run"],
    );
    assert_one_line_error(&o, "cannot read config file /nonexistent/pod.toml");
}

#[test]
fn kv_memory_comes_from_flag_environment_or_file_and_defaults_to_a_quarter_of_memory() {
    let home = tempfile::tempdir().unwrap();
    let plan = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pod"));
        cmd.arg("--home")
            .arg(home.path())
            .args(["--log", "warn", "start", "--dry-run", "--json"])
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        json_of(&run_bounded(&mut cmd, "", Duration::from_secs(60)))
    };
    let quarter = pod_node::profile::memory_bytes().map_or(4096, |b| (b / 4) >> 20);
    let default = plan(&[], &[]);
    assert_eq!(default["engine"]["kv_memory_mib"], quarter);
    assert_eq!(default["sources"]["kv_memory"], "default");
    std::fs::write(home.path().join("config.toml"), "kv_memory = 512\n").unwrap();
    let file = plan(&[], &[]);
    assert_eq!(file["engine"]["kv_memory_mib"], 512);
    assert_eq!(file["sources"]["kv_memory"], "config");
    let env = plan(&[("POD_KV_MEMORY", "768")], &[]);
    assert_eq!(env["engine"]["kv_memory_mib"], 768);
    let flag = plan(&[("POD_KV_MEMORY", "768")], &["--kv-memory", "1024"]);
    assert_eq!(flag["engine"]["kv_memory_mib"], 1024);
    assert_eq!(flag["sources"]["kv_memory"], "flag");
    let zero = pod_at(home.path(), &["start", "--dry-run", "--kv-memory", "0"]);
    assert!(!zero.status.success());
}

#[test]
fn the_example_config_parses() {
    let home = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config.example.toml");
    let plan = json_of(&pod_at(
        home.path(),
        &[
            "--config",
            example.to_str().unwrap(),
            "start",
            "--dry-run",
            "--json",
        ],
    ));
    assert_eq!(plan["config_file"]["found"], true);
    assert_eq!(plan["sources"]["api_port"], "config");
    assert_eq!(plan["api"]["port"], 8080);
    assert_eq!(plan["requested_profile"], "auto");
}

#[test]
fn bad_config_keys_and_values_name_the_key_and_the_file() {
    let home = tempfile::tempdir().unwrap();
    let path = home.path().join("config.toml");
    let file = path.display().to_string();
    let cases = [
        ("api_prot = 9000\n", "unknown key `api_prot`"),
        ("[mesh]\nport = 1\n", "unknown key `mesh`"),
        ("api_port = \"eighty\"\n", "bad value for `api_port`"),
        ("api_port = 99999\n", "bad value for `api_port`"),
        (
            "profile = \"gpu\"\n",
            "bad value for `profile`: unknown profile `gpu`",
        ),
        (
            "bootstrap = [\"not-an-address\"]\n",
            "bad value for `bootstrap`",
        ),
        ("max_batch = 0\n", "bad value for `max_batch`"),
        ("api_port = \n", "line 1"),
    ];
    for (text, needle) in cases {
        std::fs::write(&path, text).unwrap();
        let o = pod_at(home.path(), &["start", "--dry-run"]);
        assert_one_line_error(&o, needle);
        assert_one_line_error(&o, &file);
        // A real start fails the same way, before binding anything.
        let o = pod_at(home.path(), &["start", "--api-port", "0"]);
        assert_one_line_error(&o, needle);
    }
    assert!(!home.path().join("identity").exists());
}

#[test]
fn unknown_profile_is_one_clear_line() {
    let home = tempfile::tempdir().unwrap();
    let o = pod_at(home.path(), &["start", "--profile", "gpu"]);
    assert_one_line_error(&o, "unknown profile `gpu`");
    assert!(stderr(&o).contains("relay"), "lists the profiles");
    let o = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_pod"))
            .arg("--home")
            .arg(home.path())
            .args(["start", "--dry-run"])
            .env("POD_PROFILE", "gpu"),
        "",
        Duration::from_secs(60),
    );
    assert_one_line_error(&o, "unknown profile `gpu`");
    // A usage error is one line too, and --json belongs to --dry-run.
    let o = pod_at(home.path(), &["start", "--json"]);
    assert_one_line_error(&o, "--dry-run");
}

#[test]
fn a_missing_gpu_is_one_clear_line() {
    // Ordinal 7: no machine these tests run on has eight GPUs of one kind.
    let home = tempfile::tempdir().unwrap();
    for device in ["rocm:7", "cuda:7"] {
        let o = pod_at(
            home.path(),
            &[
                "start",
                "--profile",
                "inference",
                "--device",
                device,
                "--dry-run",
            ],
        );
        assert_one_line_error(&o, &format!("--device {device}: no such device: "));
    }
    // HSA_OVERRIDE_GFX_VERSION is passed through and logged.
    let model = synthetic_model(home.path(), "q8_0");
    let o = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_pod"))
            .arg("--home")
            .arg(home.path())
            .args(["start", "--device", "rocm:7", "--model"])
            .arg(&model)
            .env("HSA_OVERRIDE_GFX_VERSION", "9.0.6"),
        "",
        Duration::from_secs(60),
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("hsa_override_gfx_version=9.0.6"), "{err}");
    assert!(
        err.contains("error: --device rocm:7: cannot open rocm:7"),
        "{err}"
    );
}

#[test]
fn a_taken_api_port_is_one_clear_line() {
    let home = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let o = pod_at(
        home.path(),
        &[
            "start",
            "--profile",
            "relay",
            "--api-port",
            &port,
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ],
    );
    assert_one_line_error(&o, &format!("cannot listen on 127.0.0.1:{port}"));
    assert_one_line_error(&o, "choose another with --api-port");
}

#[test]
fn status_and_stop_without_a_pod_say_so() {
    let home = tempfile::tempdir().unwrap();
    for cmd in [
        &["status"][..],
        &["status", "--json"],
        &["stop"],
        &["peers"],
    ] {
        let o = pod_at(home.path(), cmd);
        assert_one_line_error(&o, "no pod is running");
    }
    // A daemon.json left by a pod that died: no process has this pid (above any pid_max).
    let pid = 1 << 23;
    std::fs::write(
        home.path().join("daemon.json"),
        format!(r#"{{"pid": {pid}, "api": "http://127.0.0.1:9", "peer_id": "12D3KooW"}}"#),
    )
    .unwrap();
    let o = pod_at(home.path(), &["status"]);
    assert_one_line_error(&o, &format!("no pod is running (process {pid}"));
    let o = pod_at(home.path(), &["stop"]);
    assert_one_line_error(&o, "no pod is running");
    assert!(
        !home.path().join("daemon.json").exists(),
        "stop removes a stale daemon.json"
    );
}

#[test]
fn status_chat_and_stop_drive_a_running_pod() {
    let mut p = PodProcess::start(&["--profile", "inference", "--listen", "/ip4/127.0.0.1/tcp/0"]);
    let cli = |args: &[&str], input: &str| {
        run_bounded(
            pod_command(&p.home).args(["--log", "warn"]).args(args),
            input,
            Duration::from_secs(120),
        )
    };

    let status = json_of(&cli(&["status", "--json"], ""));
    assert_eq!(status["running"], true);
    assert_eq!(status["ready"], true);
    assert_eq!(status["api"], p.api.as_str());
    assert_eq!(status["peer_id"], p.peer_id.as_str());
    assert_eq!(status["pid"], p.child.id());
    assert_eq!(status["profile"], "inference");
    assert!(status["uptime_seconds"].is_u64());
    assert!(!status["device"].as_str().unwrap().is_empty());
    assert_eq!(status["models"][0]["name"], "smollm2-135m-instruct");
    assert_eq!(status["models"][0]["local"], true);
    assert_eq!(status["peers"]["connected"], 0);
    assert_eq!(status["requests"]["queued"], 0);
    assert_eq!(status["requests"]["served"], 0);
    let text = cli(&["status"], "");
    assert!(text.status.success(), "{}", stderr(&text));
    assert!(String::from_utf8_lossy(&text.stdout).contains("ready"));

    // A second pod on the same state directory (same identity) is refused.
    let o = cli(
        &[
            "start",
            "--api-port",
            "0",
            "--no-mdns",
            "--profile",
            "relay",
        ],
        "",
    );
    assert_one_line_error(&o, "a pod is already running with the state directory");

    let prompt_tokens = || -> u64 {
        let status = json_of(&cli(&["status", "--json"], ""));
        status["tokens"]["prompt"].as_u64().unwrap()
    };
    let chat_args = ["chat", "--max-tokens", "12", "--temperature", "0"];
    // A question, /reset, the same question: the same greedy answer twice, from the same
    // prompt (whatever the model says, and even if it spans lines).
    let before = prompt_tokens();
    let chat = cli(&chat_args, "What is 2 + 2?\n/reset\nWhat is 2 + 2?\n");
    assert!(chat.status.success(), "{}", stderr(&chat));
    let out = String::from_utf8_lossy(&chat.stdout).into_owned();
    let (first, second) = chat.stdout.split_at(chat.stdout.len() / 2);
    assert!(first.len() > 1, "{out}");
    assert_eq!(first, second, "{out}");
    let fresh = prompt_tokens() - before;
    // Without /reset the second question carries the first and its answer.
    let before = prompt_tokens();
    let chat = cli(&chat_args, "What is 2 + 2?\nWhat is 2 + 2?\n");
    assert!(chat.status.success(), "{}", stderr(&chat));
    let with_history = prompt_tokens() - before;
    assert!(
        with_history > fresh,
        "{with_history} vs {fresh} prompt tokens"
    );
    // /exit ends the conversation before the next line.
    let chat = cli(&["chat", "--max-tokens", "4"], "/exit\nnever asked\n");
    assert!(chat.status.success(), "{}", stderr(&chat));
    assert!(chat.stdout.is_empty());
    let o = cli(&["chat", "--model", "no-such-model"], "hi\n");
    assert_one_line_error(&o, "no chat model `no-such-model`");

    let status = json_of(&cli(&["status", "--json"], ""));
    assert_eq!(status["requests"]["served"], 4, "{status}");
    assert!(status["tokens"]["completion"].as_u64().unwrap() > 0);

    let stopped = json_of(&cli(&["stop", "--json", "--timeout", "30"], ""));
    assert_eq!(stopped["stopped"], true);
    assert_eq!(stopped["pid"], p.child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "pod did not exit:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "SIGTERM is a clean stop: {exit}");
    assert!(!p.home.join("daemon.json").exists());
    let o = cli(&["status"], "");
    assert_one_line_error(&o, "no pod is running");
    let o = cli(&["stop"], "");
    assert_one_line_error(&o, "no pod is running");
}

#[test]
fn a_pod_without_an_api_serves_the_mesh_and_stops() {
    let home = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let log = std::fs::File::create(home.path().join("pod.log")).unwrap();
    let mut child = pod_command(home.path())
        .args(["start", "--profile", "inference", "--no-api", "--no-mdns"])
        .args(["--listen", &listen])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(home.path().join("pod.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !read_log().contains(" ready ") {
        assert!(
            child.try_wait().unwrap().is_none(),
            "pod exited:\n{}",
            read_log()
        );
        assert!(Instant::now() < deadline, "pod not ready:\n{}", read_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let daemon: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.path().join("daemon.json")).unwrap())
            .unwrap();
    assert_eq!(daemon["api"], serde_json::Value::Null);

    let status = json_of(&pod_at(home.path(), &["status", "--json"]));
    assert_eq!(status["api"], serde_json::Value::Null);
    assert_eq!(status["pid"], child.id());
    assert_eq!(status["profile"], "inference");
    let o = pod_at(home.path(), &["peers"]);
    assert_one_line_error(&o, "has no HTTP API");

    // Its model still serves peers: chat with it over the mesh.
    let peer = format!("{listen}/p2p/{}", daemon["peer_id"].as_str().unwrap());
    let other = tempfile::tempdir().unwrap();
    let chat = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_pod"))
            .arg("--home")
            .arg(other.path())
            .args(["chat", "--p2p", "--bootstrap", &peer, "--max-tokens", "8"])
            .args(["--temperature", "0", "--wait", "30"]),
        "What is 2 + 2?\n",
        Duration::from_secs(120),
    );
    assert!(chat.status.success(), "{}", stderr(&chat));
    assert!(!chat.stdout.is_empty());

    let o = pod_at(home.path(), &["stop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("stopped pod 12D3KooW"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "pod did not exit:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// `pod device list` and `pod device compile` on a machine that may have no GPU: discovery must
// say why there is none, and the kernels must compile offline where the runtime compilers are
// installed (`scripts/gpu-toolchains`; CI sets `POD_GPU_TOOLCHAINS=required`, so there a
// missing compiler fails instead of skipping).

fn toolchains_required() -> bool {
    std::env::var("POD_GPU_TOOLCHAINS").as_deref() == Ok("required")
}

#[test]
fn device_list_reports_each_backend_with_devices_or_the_reason_for_none() {
    let o = pod(&["device", "list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let found: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let backends = found["backends"].as_array().expect("backends");
    let names: Vec<&str> = backends
        .iter()
        .map(|b| b["backend"].as_str().expect("backend name"))
        .collect();
    assert_eq!(names, ["hip", "cuda"]);
    for b in backends {
        let devices = b["devices"].as_array().expect("devices");
        if devices.is_empty() {
            let why = &b["unavailable"];
            assert!(why["kind"].is_string(), "no devices and no reason: {b}");
        } else {
            for d in devices {
                assert!(d["memory_total"].as_u64().unwrap_or(0) > 0, "{d}");
                assert!(d["arch"].as_str().is_some_and(|a| !a.is_empty()), "{d}");
            }
        }
    }

    let text = pod(&["device", "list"]);
    assert!(text.status.success(), "{}", stderr(&text));
    let out = String::from_utf8_lossy(&text.stdout);
    assert!(out.lines().any(|l| l.starts_with("HIP")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("CUDA")), "{out}");
}

#[test]
fn an_unknown_gpu_target_is_one_line_naming_the_known_ones() {
    let o = pod(&["device", "compile", "--target", "gfx9999"]);
    assert_one_line_error(&o, "unknown GPU target \"gfx9999\" (known: gfx900, gfx906");
}

/// Compiles every kernel for `target` and checks that the code object holds each with the
/// compiler's register count; skips (saying why) when the compiler is missing and not required.
fn compiles_every_kernel_for(target: &str) {
    let o = pod(&["device", "compile", "--target", target, "--json"]);
    if !o.status.success() {
        let err = stderr(&o);
        assert!(
            !toolchains_required(),
            "compiling for {target} failed: {err}"
        );
        assert!(err.contains("cannot compile for"), "{err}");
        eprintln!("skipped: no runtime compiler for {target}: {err}");
        return;
    }
    let module: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(module["target"], target);
    let kernels = module["kernels"].as_array().expect("kernels");
    let names: Vec<&str> = kernels
        .iter()
        .map(|k| k["name"].as_str().expect("name"))
        .collect();
    let expected: Vec<&str> = pod_inference::gpu::kernels::KERNELS
        .iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(names, expected);
    for k in kernels {
        assert!(k["registers"].as_u64().is_some_and(|r| r > 0), "{k}");
    }
}

#[test]
fn the_kernels_compile_for_gfx906_without_a_gpu() {
    compiles_every_kernel_for("gfx906");
}

#[test]
fn the_kernels_compile_for_sm_90_without_a_gpu() {
    compiles_every_kernel_for("sm_90");
}

#[test]
fn device_check_on_the_emulator_passes_every_format_against_the_cpu() {
    let o = pod(&["device", "check", "--device", "emulator", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let checks = report["checks"].as_array().expect("checks");
    let formats: Vec<&str> = checks
        .iter()
        .map(|c| c["format"].as_str().expect("format"))
        .collect();
    assert_eq!(
        formats,
        [
            "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16",
            "BF16"
        ]
    );
    for c in checks {
        assert_eq!(c["passed"], true, "{c}");
        assert_eq!(c["greedy_equal"], true, "{c}");
        let (err, bound) = (c["max_abs_error"].as_f64(), c["bound"].as_f64());
        assert!(err.zip(bound).is_some_and(|(e, b)| e <= b), "{c}");
        assert!(
            c["tokens_per_second"].as_f64().is_some_and(|t| t > 0.0),
            "{c}"
        );
    }
}

#[test]
fn device_check_on_a_missing_gpu_is_one_line() {
    let o = pod(&["device", "check", "--device", "cuda:99"]);
    assert_one_line_error(&o, "cannot open cuda:99");
}

/// A tiny random-weight chat model in `format`, written by `pod models synthesize` into
/// `dir`.
fn synthetic_model(dir: &Path, format: &str) -> std::path::PathBuf {
    synthetic_shape(dir, "tiny", format)
}

/// A random-weight chat model of `shape` in `format`, written into `dir`.
fn synthetic_shape(dir: &Path, shape: &str, format: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{shape}-{format}.gguf"));
    let o = pod_at(
        dir,
        &[
            "models",
            "synthesize",
            "--shape",
            shape,
            "--format",
            format,
            "--out",
            path.to_str().expect("utf-8 path"),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(path.is_file());
    path
}

/// `pod infer`'s greedy answer on `device`.
fn greedy_answer(home: &Path, model: &Path, device: &str) -> String {
    let o = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_pod"))
            .arg("--home")
            .arg(home)
            .args(["--log", "warn", "infer", "--no-pull", "--device", device])
            .args([
                "--temperature",
                "0",
                "--max-tokens",
                "5",
                "--prompt",
                "hello",
            ])
            .arg("--model")
            .arg(model),
        "",
        Duration::from_secs(300),
    );
    assert!(o.status.success(), "{device}: {}", stderr(&o));
    assert!(stderr(&o).contains("5 completion tokens"), "{}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// With the kernels capped to the portable ones, as on a CPU without AVX2, `pod version` says
/// so, and every architecture that used to fall back to candle there (or not load at all:
/// qwen3moe) loads on pod's CPU decoder, as the load log says, and answers.
#[test]
fn the_portable_kernels_serve_every_architecture_and_say_so() {
    let home = tempfile::tempdir().unwrap();
    let version = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_pod"))
            .arg("--home")
            .arg(home.path())
            .args(["version", "--json"])
            .env("POD_CPU_KERNELS", "portable"),
        "",
        Duration::from_secs(60),
    );
    assert_eq!(json_of(&version)["cpu_kernels"], "portable");
    for shape in ["tiny-llama3", "tiny-qwen3", "tiny-phi3", "tiny-qwen3moe"] {
        let model = synthetic_shape(home.path(), shape, "q8_0");
        let o = run_bounded(
            Command::new(env!("CARGO_BIN_EXE_pod"))
                .arg("--home")
                .arg(home.path())
                .args(["--log", "info", "infer", "--no-pull", "--device", "cpu"])
                .args([
                    "--temperature",
                    "0",
                    "--max-tokens",
                    "5",
                    "--prompt",
                    "hello",
                ])
                .arg("--model")
                .arg(&model)
                .env("POD_CPU_KERNELS", "portable"),
            "",
            Duration::from_secs(300),
        );
        let log = stderr(&o);
        assert!(o.status.success(), "{shape}: {log}");
        assert!(
            log.lines()
                .any(|l| l.contains("on pod's CPU decoder") && l.contains("kernels=portable")),
            "{shape}: {log}"
        );
        assert!(log.contains("5 completion tokens"), "{shape}: {log}");
    }
}

#[test]
fn a_model_on_the_gpu_kernels_answers_as_on_the_cpu() {
    // The emulator runs the GPU kernel source itself, wave64, through the whole serving
    // path: device placement, upload, the engine, sampling.
    let home = tempfile::tempdir().unwrap();
    let model = synthetic_model(home.path(), "q4_k_m");
    let cpu = greedy_answer(home.path(), &model, "cpu");
    let gpu = greedy_answer(home.path(), &model, "emulator");
    assert!(!cpu.trim().is_empty(), "no answer");
    assert_eq!(gpu, cpu);
}

#[test]
fn qwen_models_answer_on_the_gpu_kernels_as_on_the_cpu() {
    let home = tempfile::tempdir().unwrap();
    for shape in ["tiny-qwen2", "tiny-qwen3"] {
        let model = synthetic_shape(home.path(), shape, "q4_0");
        let cpu = greedy_answer(home.path(), &model, "cpu");
        let gpu = greedy_answer(home.path(), &model, "emulator");
        assert!(!cpu.trim().is_empty(), "{shape}: no answer");
        assert_eq!(gpu, cpu, "{shape}");
    }
}

#[test]
fn auto_device_falling_back_to_the_cpu_says_what_it_tried_and_why() {
    // Every GPU runtime library pointed at a file that is not there: `--device auto` finds
    // no GPU, serves the model on the CPU, and says so in its log, `/pod/v1/node` and
    // `pod status`.
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_model(dir.path(), "q4_0");
    let missing = dir.path().join("no-such-dir");
    let libs = [
        ("POD_HIP_PATH", missing.join("libamdhip64.so")),
        ("POD_HIPRTC_PATH", missing.join("libhiprtc.so")),
        ("POD_CUDA_PATH", missing.join("libcuda.so")),
        ("POD_NVRTC_PATH", missing.join("libnvrtc.so")),
    ];
    let env: Vec<(&str, &Path)> = libs.iter().map(|(k, v)| (*k, v.as_path())).collect();
    let model_arg = model.to_str().unwrap();
    let mut p = PodProcess::start_with_env(
        &[
            "--profile",
            "inference",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--device",
            "auto",
            "--model",
            model_arg,
        ],
        &env,
    );
    let node = p.get("/pod/v1/node");
    assert_eq!(node["device"], "cpu", "{node}");
    let why = node["device_fallback"].as_str().expect("a fallback reason");
    assert!(why.starts_with("--device auto opened no GPU: "), "{why}");
    for lib in ["libamdhip64.so", "libcuda.so"] {
        assert!(why.contains(lib), "{lib} not named in: {why}");
    }
    assert!(!why.contains('\n'), "{why}");
    assert!(
        p.log().contains("no GPU for pod's GPU decoder"),
        "{}",
        p.log()
    );

    let status = run_bounded(
        pod_command(&p.home).args(["--log", "warn", "status", "--json"]),
        "",
        Duration::from_secs(60),
    );
    let status = json_of(&status);
    assert_eq!(status["device"], "cpu");
    assert_eq!(status["device_fallback"], why);
    let text = run_bounded(
        pod_command(&p.home).args(["--log", "warn", "status"]),
        "",
        Duration::from_secs(60),
    );
    assert!(
        String::from_utf8_lossy(&text.stdout).contains(why),
        "{}",
        stderr(&text)
    );

    // A named device is not a fallback: nothing of the kind is reported.
    p.stop();
    let p = PodProcess::start(&[
        "--profile",
        "inference",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--device",
        "cpu",
        "--model",
        model_arg,
    ]);
    let node = p.get("/pod/v1/node");
    assert_eq!(node["device"], "cpu");
    assert!(node.get("device_fallback").is_none(), "{node}");
}

#[test]
fn a_model_too_big_for_the_device_is_one_line_saying_what_to_lower() {
    let home = tempfile::tempdir().unwrap();
    let model = synthetic_model(home.path(), "q8_0");
    let model = model.to_str().expect("utf-8 path");
    let o = pod_at(
        home.path(),
        &[
            "start",
            "--device",
            "emulator",
            "--model",
            model,
            "--max-batch",
            "1000000",
            // A KV budget large enough not to cap what the batch asks for (MiB).
            "--kv-memory",
            "100000000",
            "--no-mdns",
            "--p2p-port",
            "0",
            "--api-port",
            "0",
        ],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{err}");
    for needle in [
        "emulator (warp 64): the model needs",
        "for 1000000 sequence(s) of 1024 tokens",
        "lower --ctx-size or --max-batch",
    ] {
        assert!(last.contains(needle), "{needle:?} not in {last}");
    }
}

#[test]
fn bench_measures_a_synthetic_shape_on_the_gpu_kernels() {
    let home = tempfile::tempdir().unwrap();
    let home_s = home.path().to_str().expect("utf-8 path");
    // The emulator runs each GPU thread as a fiber: slow, the more so on a loaded machine.
    let o = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_pod"))
            .arg("--home")
            .arg(home.path())
            .args([
                "--log", "warn", "bench", "--shape", "tiny", "--format", "q8_0",
            ])
            .args([
                "--device", "emulator", "-p", "4", "-n", "1", "-r", "1", "--json",
            ]),
        "",
        Duration::from_secs(300),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let report = json_of(&o);
    assert_eq!(report["device"], "emulator", "{report}");
    assert_eq!(
        report["model"],
        format!("{home_s}/synthetic/tiny-q8_0.gguf"),
        "{report}"
    );
    for key in ["pp_tps", "tg_tps"] {
        let v = report[key][0].as_f64().unwrap_or(0.0);
        assert!(v > 0.0, "{key}: {report}");
    }
    let o = pod_at(
        home.path(),
        &["bench", "--shape", "huge", "--device", "cpu"],
    );
    // Every named shape is listed, in the table's order.
    let known: Vec<&str> = pod_inference::gpu::synthetic::shapes::SHAPES
        .iter()
        .map(|s| s.name)
        .collect();
    assert!(
        known.starts_with(&["tiny", "llama-1b", "llama-8b"]),
        "{known:?}"
    );
    assert_one_line_error(
        &o,
        &format!("unknown shape `huge` (known: {})", known.join(", ")),
    );
}

#[test]
fn device_check_runs_a_named_shape_or_a_model_file() {
    let home = tempfile::tempdir().unwrap();
    let model = synthetic_shape(home.path(), "tiny-qwen3", "q4_0");
    for args in [
        vec!["--shape", "tiny-qwen2", "--format", "q8_0"],
        vec!["--shape", "tiny-qwen3moe", "--format", "q4_0"],
        vec!["--model", model.to_str().expect("utf-8 path")],
    ] {
        let o = run_bounded(
            Command::new(env!("CARGO_BIN_EXE_pod"))
                .arg("--home")
                .arg(home.path())
                .args(["--log", "warn", "device", "check", "--device", "emulator"])
                .args(&args)
                .arg("--json"),
            "",
            Duration::from_secs(300),
        );
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let report = json_of(&o);
        let checks = report["checks"].as_array().expect("checks");
        assert_eq!(checks.len(), 1, "{report}");
        let want = match args[1] {
            "tiny-qwen2" => "qwen2 Q8_0",
            "tiny-qwen3moe" => "qwen3moe Q4_0",
            _ => "qwen3 Q4_0",
        };
        assert_eq!(checks[0]["format"], want, "{report}");
        assert_eq!(checks[0]["passed"], true, "{report}");
    }
}

#[test]
fn receipts_come_a_page_of_peers_at_a_time() {
    use pod_node::receipts::{Ledger, Receipt, Role, SignedReceipt};
    let home = tempfile::tempdir().unwrap();
    let server = libp2p::identity::Keypair::generate_ed25519();
    let mut requesters: Vec<String> = (0..5)
        .map(|_| {
            let key = libp2p::identity::Keypair::generate_ed25519();
            key.public().to_peer_id().to_string()
        })
        .collect();
    {
        let ledger = Ledger::open(home.path()).unwrap();
        for (i, requester) in requesters.iter().enumerate() {
            let receipt = Receipt {
                request_id: format!("req-{i}"),
                model: "m".into(),
                prompt_tokens: 3,
                completion_tokens: 4,
                requester: requester.clone(),
                server: server.public().to_peer_id().to_string(),
                started_at_ms: 1,
                finished_at_ms: 2,
                partial: false,
                stage: None,
            };
            let signed = SignedReceipt::sign(receipt, &server).unwrap();
            ledger.append(Role::Served, &signed).unwrap();
        }
    }
    requesters.sort();
    let pod = PodProcess::start_in(home.path(), &["--profile", "relay", "--p2p-port", "0"]);
    let peers = |v: &serde_json::Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["peer"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = pod.get("/pod/v1/receipts");
    assert_eq!(peers(&all), requesters);
    assert_eq!(all["has_more"], false);
    assert_eq!(all["receipts"], 5);
    let mut seen = Vec::new();
    let mut path = "/pod/v1/receipts?limit=2".to_owned();
    loop {
        let page = pod.get(&path);
        let rows = peers(&page);
        assert!(rows.len() <= 2, "{page}");
        assert_eq!(page["receipts"], 5, "the counts stay whole on every page");
        seen.extend(rows.iter().cloned());
        if page["has_more"] == false {
            break;
        }
        path = format!("/pod/v1/receipts?limit=2&after={}", rows.last().unwrap());
    }
    assert_eq!(seen, requesters);
    for bad in ["limit=0", "limit=1001", "limit=ten"] {
        let (status, body) =
            common::process::http_get(&format!("{}/pod/v1/receipts?{bad}", pod.api)).unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["param"], "limit", "{body}");
    }
    // A malformed query string is an OpenAI-shaped error too.
    let (status, body) =
        common::process::http_get(&format!("{}/pod/v1/receipts?limit=1&limit=2", pod.api)).unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
}

#[test]
fn api_host_takes_host_names() {
    let home = tempfile::tempdir().unwrap();
    // `localhost` is loopback: no key needed, and the plan names the address.
    for (flag, config) in [(Some("localhost"), None), (None, Some("LOCALHOST."))] {
        if let Some(host) = config {
            std::fs::write(
                home.path().join("config.toml"),
                format!("api_host = \"{host}\"\n"),
            )
            .unwrap();
        }
        let mut args = vec!["start", "--dry-run", "--json"];
        if let Some(host) = flag {
            args.extend(["--api-host", host]);
        }
        let plan = json_of(&pod_at(home.path(), &args));
        assert_eq!(plan["api"]["host"], "127.0.0.1", "{flag:?} {config:?}");
        assert_eq!(plan["api"]["auth"], "none");
    }
    std::fs::remove_file(home.path().join("config.toml")).unwrap();
    // Bad values and names that do not resolve are one line naming them, before anything binds.
    let o = pod_at(home.path(), &["start", "--api-host", "0.0.0.0:8080"]);
    assert_one_line_error(
        &o,
        "`0.0.0.0:8080` is neither an IP address nor a host name",
    );
    let o = pod_at(
        home.path(),
        &[
            "start",
            "--api-host",
            "no-such-host.invalid",
            "--api-port",
            "0",
        ],
    );
    assert_one_line_error(&o, "cannot resolve host name `no-such-host.invalid`");
    assert!(!home.path().join("daemon.json").exists());
    // Without an API the name is not looked up.
    let plan = json_of(&pod_at(
        home.path(),
        &[
            "start",
            "--dry-run",
            "--json",
            "--no-api",
            "--api-host",
            "no-such-host.invalid",
        ],
    ));
    assert_eq!(plan["api"]["enabled"], false);

    // A real start on `localhost` listens on loopback and serves.
    let pod = PodProcess::start(&[
        "--profile",
        "relay",
        "--api-host",
        "localhost",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ]);
    assert!(pod.api.starts_with("http://127.0.0.1:"), "{}", pod.api);
    assert_eq!(pod.get("/pod/v1/node")["peer_id"], pod.peer_id);
}

/// Serves `routes` (path → JSON or text body) over HTTP/1.1 on 127.0.0.1 until the test ends:
/// a node API whose answers carry what hostile peers announced.
fn serve_canned(routes: Vec<(&'static str, String)>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let path = path.split('?').next().unwrap_or(path);
            let (status, body) = routes
                .iter()
                .find(|(p, _)| *p == path)
                .map_or(("404 Not Found", "{}"), |(_, b)| ("200 OK", b.as_str()));
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}")
}

#[test]
fn peer_strings_reach_the_terminal_without_control_characters() {
    let evil = "m\u{1b}]0;pwned\u{7}\u{1b}[2J\r\u{9b}1m\u{202e}";
    let peers = serde_json::json!({"data": [{
        "peer_id": "12D3KooWEvil",
        "agent": format!("pod/{evil}"),
        "path": format!("direct{evil}"),
        "models": [{"name": evil}],
        "last_seen_ms": 5,
    }]});
    let node = serde_json::json!({
        "peer_id": "12D3KooWEvil",
        "agent": format!("pod/{evil}"),
        "profile": evil,
        "uptime_seconds": 3,
        "connected_peers": 1,
        "known_peers": 1,
        "nat_status": "private",
        "relays": [format!("/ip4/1.2.3.4/tcp/1/p2p/{evil}")],
        "listen_addrs": [],
    });
    let models = serde_json::json!({"data": [
        {"id": evil, "kind": evil, "owned_by": "12D3KooWOther", "providers": 1}
    ]});
    let api = serve_canned(vec![
        ("/pod/v1/peers", peers.to_string()),
        ("/pod/v1/node", node.to_string()),
        ("/v1/models", models.to_string()),
        ("/health", "{}".to_owned()),
        ("/metrics", String::new()),
    ]);
    let home = tempfile::tempdir().unwrap();
    for command in ["peers", "status"] {
        let o = pod_at(home.path(), &[command, "--api", &api]);
        let out = String::from_utf8(o.stdout.clone()).unwrap();
        assert!(o.status.success(), "{command}: {out}{}", stderr(&o));
        assert!(
            !out.chars()
                .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
            "{command} printed control characters: {out:?}"
        );
        // What was escaped is still there to read.
        assert!(out.contains("m\\u{1b}]0;pwned\\u{7}"), "{command}: {out}");
        // --json stays exact, escaped by JSON itself.
        let o = pod_at(home.path(), &[command, "--api", &api, "--json"]);
        let json = String::from_utf8(o.stdout.clone()).unwrap();
        assert!(!json.contains('\u{1b}'), "{command} --json: {json:?}");
        assert!(json.contains("\\u001b"), "{command} --json: {json}");
    }
}
