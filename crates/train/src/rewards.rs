//! Rule-based rewards for R1-Zero-style RL (DeepSeek-R1 paper, section 2.2.2): an accuracy reward that
//! checks the final answer and a format reward that checks the `<think>…</think><answer>…</answer>` layout.
//! Both return 0 or 1 and are meant to be logged separately; no learned reward model is involved, so the
//! policy cannot hack a neural judge.
//!
//! Departures: "well formed" is decided by plain string matching on the four tags, not by an XML parser;
//! any other `<` in the text (for example `3<5`) is ordinary content.

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const ANSWER_OPEN: &str = "<answer>";
const ANSWER_CLOSE: &str = "</answer>";
const TAGS: [&str; 4] = [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE];

/// The trimmed text inside the first well-formed `<answer>…</answer>` pair (one that holds no other tag).
pub fn extract_answer(completion: &str) -> Option<&str> {
    let mut rest = completion;
    while let Some(open) = rest.find(ANSWER_OPEN) {
        let after = &rest[open + ANSWER_OPEN.len()..];
        let close = after.find(ANSWER_CLOSE)?;
        let inner = &after[..close];
        if !contains_tag(inner) {
            return Some(inner.trim());
        }
        // `<answer> <answer>x</answer>`: the outer open is not well formed; retry from the inner one.
        rest = after;
    }
    None
}

/// 1.0 when the first well-formed `<answer>` holds exactly `answer` (both trimmed), else 0.0.
pub fn accuracy_reward(completion: &str, answer: &str) -> f32 {
    match extract_answer(completion) {
        Some(found) if !found.is_empty() && found == answer.trim() => 1.0,
        _ => 0.0,
    }
}

/// 1.0 when the completion is exactly `<think>A</think><answer>B</answer>`, with optional whitespace around
/// and between the two blocks, A and B non-empty after trimming and holding no tag; else 0.0.
pub fn format_reward(completion: &str) -> f32 {
    if is_well_formatted(completion) {
        1.0
    } else {
        0.0
    }
}

/// Both rule-based rewards of one completion, kept apart so each can be logged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rewards {
    /// [`accuracy_reward`].
    pub accuracy: f32,
    /// [`format_reward`].
    pub format: f32,
}

impl Rewards {
    /// Scores `completion` against the reference `answer`.
    pub fn score(completion: &str, answer: &str) -> Self {
        Self {
            accuracy: accuracy_reward(completion, answer),
            format: format_reward(completion),
        }
    }

    /// The scalar the advantage is computed from: accuracy plus `format_weight` times format.
    pub fn total(&self, format_weight: f32) -> f32 {
        self.accuracy + format_weight * self.format
    }
}

fn is_well_formatted(completion: &str) -> bool {
    let Some(rest) = completion.trim().strip_prefix(THINK_OPEN) else {
        return false;
    };
    let Some((think, rest)) = rest.split_once(THINK_CLOSE) else {
        return false;
    };
    let Some(rest) = rest.trim_start().strip_prefix(ANSWER_OPEN) else {
        return false;
    };
    let Some(answer) = rest.strip_suffix(ANSWER_CLOSE) else {
        return false;
    };
    [think, answer]
        .iter()
        .all(|part| !part.trim().is_empty() && !contains_tag(part))
}

fn contains_tag(text: &str) -> bool {
    TAGS.iter().any(|tag| text.contains(tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_cases() {
        let cases: &[(&str, &str, f32)] = &[
            ("<think>x</think><answer>1134</answer>", "1134", 1.0),
            ("<think>x</think><answer> 1134 \n</answer>", "1134", 1.0),
            ("<answer>1134</answer>", " 1134 ", 1.0),
            ("no tags at all 1134", "1134", 0.0),
            ("<think>x</think><answer>1135</answer>", "1134", 0.0),
            ("<think>x</think><answer>1134", "1134", 0.0),
            ("<think>x</think>1134</answer>", "1134", 0.0),
            ("</answer>1134<answer>", "1134", 0.0),
            ("<answer></answer>", "", 0.0),
            ("<answer>   </answer>", "", 0.0),
            // The first well-formed answer counts, not the last or the best.
            ("<answer>7</answer><answer>1134</answer>", "1134", 0.0),
            ("<answer>1134</answer><answer>7</answer>", "1134", 1.0),
            // An unclosed outer open: the inner well-formed pair is the first well-formed one.
            ("<answer>junk <answer>1134</answer>", "1134", 1.0),
            ("<answer><think>1134</think></answer>", "1134", 0.0),
            ("<ANSWER>1134</ANSWER>", "1134", 0.0),
            ("<answer>1 134</answer>", "1134", 0.0),
            ("<answer>-42</answer>", "-42", 1.0),
            ("<answer>１１３４</answer>", "1134", 0.0),
            ("<answer>π≈3</answer>", "π≈3", 1.0),
            ("préambule <answer>ü</answer> fin", "ü", 1.0),
        ];
        for (completion, answer, want) in cases {
            assert_eq!(
                accuracy_reward(completion, answer),
                *want,
                "{completion:?} vs {answer:?}"
            );
        }
    }

    #[test]
    fn format_cases() {
        let cases: &[(&str, f32)] = &[
            ("<think>5+9=14</think><answer>14</answer>", 1.0),
            ("  <think>a</think>\n\n<answer>b</answer>\n", 1.0),
            ("<think>\nmulti\nline\n</think> <answer> 7 </answer>", 1.0),
            ("<think>3<5 and 5>3</think><answer>ok</answer>", 1.0),
            ("<think>思考 🤔</think><answer>答え</answer>", 1.0),
            // Missing pieces.
            ("<answer>7</answer>", 0.0),
            ("<think>a</think>", 0.0),
            ("<think>a<answer>7</answer>", 0.0),
            ("<think>a</think><answer>7", 0.0),
            ("", 0.0),
            // Empty parts.
            ("<think></think><answer>7</answer>", 0.0),
            ("<think> \n </think><answer>7</answer>", 0.0),
            ("<think>a</think><answer></answer>", 0.0),
            ("<think>a</think><answer>  </answer>", 0.0),
            // Wrong order.
            ("<answer>7</answer><think>a</think>", 0.0),
            ("</think>a<think><answer>7</answer>", 0.0),
            // Extra text outside the blocks.
            ("Sure! <think>a</think><answer>7</answer>", 0.0),
            ("<think>a</think><answer>7</answer> done", 0.0),
            ("<think>a</think> so <answer>7</answer>", 0.0),
            // Nesting and repeated or extra tags.
            ("<think>a<think>b</think></think><answer>7</answer>", 0.0),
            ("<think>a</think><answer><answer>7</answer></answer>", 0.0),
            ("<think>a</think><answer>7</answer><answer>8</answer>", 0.0),
            ("<think>a</think><think>b</think><answer>7</answer>", 0.0),
            ("<think>a <answer>7</answer></think><answer>7</answer>", 0.0),
            ("<think>a</think><answer>7</think></answer>", 0.0),
            // Case matters; the tags are literal.
            ("<THINK>a</THINK><ANSWER>7</ANSWER>", 0.0),
        ];
        for (completion, want) in cases {
            assert_eq!(format_reward(completion), *want, "{completion:?}");
        }
    }

    #[test]
    fn rewards_are_independent() {
        // Right answer, bad format; and good format, wrong answer: each reward sees only its own concern.
        let sloppy = "I think <answer>12</answer>";
        assert_eq!(
            (accuracy_reward(sloppy, "12"), format_reward(sloppy)),
            (1.0, 0.0)
        );
        let tidy = "<think>7+5=13</think><answer>13</answer>";
        assert_eq!(
            (accuracy_reward(tidy, "12"), format_reward(tidy)),
            (0.0, 1.0)
        );
        assert_eq!(
            Rewards::score(tidy, "13"),
            Rewards {
                accuracy: 1.0,
                format: 1.0
            }
        );
        assert_eq!(Rewards::score(tidy, "13").total(0.5), 1.5);
        assert_eq!(Rewards::score(sloppy, "12").total(0.5), 1.0);
    }
}
