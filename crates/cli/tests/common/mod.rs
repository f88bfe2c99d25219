//! What the CLI test files share: running the binary and reading its output. Each test binary
//! uses its own subset, so unused items are expected here.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// A fixture checkpoint folder under tests/fixtures/models.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// Runs `tiefsee` with `args` and no stdin.
pub fn tiefsee(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tiefsee"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("tiefsee runs")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts exit code 1 and a message containing every one of `needles`, without a panic.
pub fn assert_fails_with(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "expected exit 1: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    }
}
