//! The chat page served at `/`: one self-contained HTML document (styles and script inlined, no
//! network access beyond this server's own `/v1/chat/completions`). The sources live in
//! `static/` as ordinary files so they can be edited and linted as HTML, CSS and JavaScript; they
//! are compiled into the binary, so the server needs no files beside it.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{Html, IntoResponse};

const HTML: &str = include_str!("../static/index.html");
const STYLE: &str = include_str!("../static/style.css");
const SCRIPT: &str = include_str!("../static/app.js");

/// The page with its stylesheet and script put in place of the `/*STYLE*/` and `/*SCRIPT*/` markers.
static PAGE: LazyLock<String> = LazyLock::new(|| {
    HTML.replacen("/*STYLE*/", STYLE, 1)
        .replacen("/*SCRIPT*/", SCRIPT, 1)
});

/// `GET /`
pub async fn index() -> impl IntoResponse {
    // The page is part of the binary: a new build may change it, so browsers revalidate each time.
    ([(header::CACHE_CONTROL, "no-cache")], Html(PAGE.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_inlines_its_style_and_script() {
        assert!(!PAGE.contains("/*STYLE*/") && !PAGE.contains("/*SCRIPT*/"));
        assert!(PAGE.contains("<title>tiefsee chat</title>"));
        // The inlined script must not be able to end its own <script> element early.
        assert!(!SCRIPT.contains("</script"));
    }
}
