//! Helpers shared by the integration tests (each test crate uses a subset, hence the allow).
//! Fixtures live in `tests/fixtures/gguf/`, written by `tests/fixtures/make_gguf.py`.
#![allow(dead_code)]

use std::path::PathBuf;

/// The folder holding the GGUF fixtures.
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf")
}

/// A fixture file's path.
pub fn fixture(name: &str) -> PathBuf {
    fixture_dir().join(name)
}

/// Debug text of a value: equal texts mean bit-equal floats (Debug prints -0.0, inf, and enough
/// digits to round-trip), unlike `==`, for which 0.0 == -0.0.
pub fn exact<T: std::fmt::Debug>(v: &T) -> String {
    format!("{v:?}")
}
