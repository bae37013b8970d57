//! Where the GPU runtimes' shared libraries are looked for, and the errors of loading them.
//!
//! Every library is searched the same way, first match wins:
//! 1. the path in the library's own environment variable (`POD_HIP_PATH`, `POD_HIPRTC_PATH`,
//!    `POD_CUDA_PATH`, `POD_NVRTC_PATH`): a file, or a directory holding one of the names.
//!    A path named there is the only one tried, so that a wrong one is an error saying why
//!    rather than a silent fall-back to another installation;
//! 2. the vendor directories (`$ROCM_PATH/lib` and `/opt/rocm/lib` for AMD, `$CUDA_PATH/lib64`
//!    and `/usr/local/cuda/lib64` for NVIDIA), each name in turn;
//! 3. the bare names, which the dynamic loader resolves through `LD_LIBRARY_PATH`, the
//!    `ld.so` cache and the system directories.
//!
//! Versioned names come before unversioned ones because the unversioned `.so` link usually
//! exists only where the vendor's development package is installed.

use std::path::{Path, PathBuf};

/// How one shared library is found: where to look and under which names.
#[derive(Debug, Clone)]
pub struct LibrarySearch {
    /// What is being looked for, for messages ("HIP runtime", "NVRTC").
    pub what: &'static str,
    /// The environment variable that names a file or a directory to use first.
    pub env_var: &'static str,
    /// Environment variables naming an installation root whose `lib_subdir` is searched.
    pub root_vars: &'static [&'static str],
    /// Installation roots searched when no root variable is set or found.
    pub default_roots: &'static [&'static str],
    /// The library directory under each root (`lib`, `lib64`).
    pub lib_subdir: &'static str,
    /// File names, preferred first.
    pub names: &'static [&'static str],
}

impl LibrarySearch {
    /// Every path the library is tried at, in order, as this process's environment says now.
    pub fn candidates(&self) -> Vec<PathBuf> {
        self.candidates_with(|var| std::env::var_os(var).map(PathBuf::from))
    }

    /// [`Self::candidates`] with the environment given as a function, so tests need not set
    /// process-wide variables.
    pub fn candidates_with(&self, env: impl Fn(&str) -> Option<PathBuf>) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Some(path) = env(self.env_var).filter(|p| !p.as_os_str().is_empty()) {
            if path.is_dir() {
                out.extend(self.names.iter().map(|name| path.join(name)));
            } else {
                out.push(path);
            }
            return out;
        }
        let mut roots: Vec<PathBuf> = self.root_vars.iter().filter_map(|var| env(var)).collect();
        roots.extend(self.default_roots.iter().map(PathBuf::from));
        for root in roots {
            let dir = root.join(self.lib_subdir);
            for name in self.names {
                let path = dir.join(name);
                if !out.contains(&path) {
                    out.push(path);
                }
            }
        }
        out.extend(self.names.iter().map(PathBuf::from));
        out
    }
}

/// Opens the first candidate that `open` accepts, or says what was tried and why the last
/// one failed. A candidate that is a path and does not exist is skipped without calling `open`
/// (the loader would only say "no such file"), but still listed as tried.
pub(crate) fn open_first<T>(
    search: &LibrarySearch,
    candidates: &[PathBuf],
    mut open: impl FnMut(&Path) -> Result<T, String>,
) -> Result<(T, PathBuf), LoadError> {
    let mut last_error = String::from("no candidate exists");
    for candidate in candidates {
        let is_bare_name = candidate.parent().is_none_or(|p| p.as_os_str().is_empty());
        if !is_bare_name && !candidate.exists() {
            continue;
        }
        match open(candidate) {
            Ok(lib) => return Ok((lib, candidate.clone())),
            Err(e) => last_error = e,
        }
    }
    Err(LoadError::NotFound {
        what: search.what,
        env_var: search.env_var,
        tried: candidates.iter().map(|p| p.display().to_string()).collect(),
        last_error,
    })
}

/// Why a GPU runtime or runtime compiler could not be loaded.
#[derive(Debug, Clone, thiserror::Error, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LoadError {
    /// No candidate path or name could be opened.
    #[error("{what} not found (set {env_var} to its file or directory; tried {}): {last_error}", tried.join(", "))]
    NotFound {
        /// What was looked for.
        what: &'static str,
        /// The environment variable that would point at it.
        env_var: &'static str,
        /// Every path and name tried, in order.
        tried: Vec<String>,
        /// The loader's message for the last candidate that existed.
        last_error: String,
    },
    /// The library opened but lacks a function pod needs: too old, or not the library it
    /// was named after.
    #[error("{what} at {path} lacks {symbol}: {reason}")]
    MissingSymbol {
        /// What was loaded.
        what: &'static str,
        /// The file that was opened.
        path: String,
        /// The function that is missing.
        symbol: &'static str,
        /// The loader's message.
        reason: String,
    },
}

/// The line of a compiler log that says what went wrong: the first that mentions an error,
/// else the first that is not blank; so a failure fits on one line and the full log stays
/// in the error's `log` field.
pub(crate) fn first_error_line(log: &str) -> &str {
    let mut lines = log.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.clone().next().unwrap_or("no compiler log");
    lines
        .find(|l| l.to_ascii_lowercase().contains("error"))
        .unwrap_or(first)
}

/// The loader's message for a failed `dlopen` or `dlsym`: libloading's own text ("dlopen
/// failed") followed by the system's, which says why (no such file, wrong ELF class, ...).
pub(crate) fn loader_message(error: &libloading::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

/// Reads a NUL-terminated string from a fixed-size C character buffer.
pub(crate) fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Declares a table of function pointers and its loader; each field is named after the C
/// function it is looked up as. The expansion holds `unsafe` code: it is used only in the FFI
/// modules (`hip`, `cuda`), whose invariants cover it.
macro_rules! api_table {
    ($(#[$meta:meta])* struct $name:ident { $($field:ident: fn($($arg:ty),*) -> $ret:ty,)* }) => {
        $(#[$meta])*
        #[allow(non_snake_case)]
        #[derive(Debug)]
        struct $name { $($field: unsafe extern "C" fn($($arg),*) -> $ret,)* }

        impl $name {
            /// # Safety
            /// `lib` must be the library this table describes, exporting each field's
            /// function with the declared signature.
            unsafe fn load(lib: &Library, what: &'static str, path: &Path) -> Result<Self, LoadError> {
                Ok(Self { $($field: {
                    let name = concat!(stringify!($field), "\0").as_bytes();
                    // SAFETY: the caller guarantees the symbol has this signature.
                    let symbol = unsafe { lib.get::<unsafe extern "C" fn($($arg),*) -> $ret>(name) };
                    *symbol.map_err(|e| LoadError::MissingSymbol {
                        what,
                        path: path.display().to_string(),
                        symbol: stringify!($field),
                        reason: loader_message(&e),
                    })?
                },)* })
            }
        }
    };
}

pub(crate) use api_table;

#[cfg(test)]
mod tests {
    use super::*;

    const SEARCH: LibrarySearch = LibrarySearch {
        what: "test library",
        env_var: "POD_TEST_PATH",
        root_vars: &["TEST_ROOT"],
        default_roots: &["/opt/test"],
        lib_subdir: "lib",
        names: &["libtest.so.2", "libtest.so"],
    };

    #[test]
    fn a_path_in_the_variable_is_the_only_candidate() {
        let got = SEARCH.candidates_with(|var| match var {
            "POD_TEST_PATH" => Some(PathBuf::from("/x/libtest.so.2")),
            "TEST_ROOT" => Some(PathBuf::from("/r")),
            _ => None,
        });
        assert_eq!(got, [PathBuf::from("/x/libtest.so.2")]);
    }

    #[test]
    fn candidates_come_from_the_roots_then_the_loader() {
        let got = SEARCH.candidates_with(|var| match var {
            "TEST_ROOT" => Some(PathBuf::from("/r")),
            _ => None,
        });
        let want: Vec<PathBuf> = [
            "/r/lib/libtest.so.2",
            "/r/lib/libtest.so",
            "/opt/test/lib/libtest.so.2",
            "/opt/test/lib/libtest.so",
            "libtest.so.2",
            "libtest.so",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_directory_in_the_variable_is_searched_for_every_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let got = SEARCH.candidates_with(|var| (var == "POD_TEST_PATH").then(|| path.clone()));
        assert_eq!(
            got,
            [
                dir.path().join("libtest.so.2"),
                dir.path().join("libtest.so")
            ]
        );
    }

    #[test]
    fn nothing_found_is_one_line_naming_every_candidate() {
        let candidates = vec![
            PathBuf::from("/nonexistent/libtest.so"),
            PathBuf::from("libtest.so"),
        ];
        let err =
            open_first(&SEARCH, &candidates, |_| Err::<(), _>("cannot open".into())).unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains("/nonexistent/libtest.so, libtest.so"), "{msg}");
        assert!(msg.contains("POD_TEST_PATH"), "{msg}");
        assert!(msg.ends_with("cannot open"), "{msg}");
    }

    #[test]
    fn the_error_line_of_a_log_is_the_first_naming_an_error() {
        let log = "k.cu:3:5: warning: unused\nk.cu:4:9: error: use of undeclared identifier 'x'\n  x = 1;\n";
        assert_eq!(
            first_error_line(log),
            "k.cu:4:9: error: use of undeclared identifier 'x'"
        );
        assert_eq!(first_error_line("\n  only line \n"), "only line");
        assert_eq!(first_error_line(""), "no compiler log");
    }

    #[test]
    fn missing_paths_are_not_opened() {
        let candidates = vec![PathBuf::from("/nonexistent/libtest.so")];
        let mut opened = false;
        let err = open_first(&SEARCH, &candidates, |_| {
            opened = true;
            Ok(())
        });
        assert!(!opened);
        assert!(matches!(err, Err(LoadError::NotFound { .. })));
    }
}
