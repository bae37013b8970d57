//! The `pod` binary driven as a user would: success paths and one-line errors.

mod common;

use std::process::{Command, Output};

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
