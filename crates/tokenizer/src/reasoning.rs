//! Splitting generated text into reasoning and answer, as DeepSeek's API does: what the model writes
//! inside `<think>…</think>` is `reasoning_content`, the rest is `content`.
//!
//! Works on streamed pieces (a tag may arrive split over several tokens) and in both starts: R1's
//! chat template already writes `<think>\n` into the prompt, so generation begins inside the
//! reasoning; other templates leave it to the model to open the tag.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Text released by one step: the part that is reasoning and the part that is answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReasoningDelta {
    pub reasoning: String,
    pub content: String,
}

/// Where the parser is in the generated text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing but whitespace yet: an opening tag may still come.
    Start,
    Reasoning,
    /// Just after `</think>`: the newlines the template puts there belong to neither part.
    AfterReasoning,
    Answer,
}

/// Streaming splitter of `<think>` reasoning from the answer.
#[derive(Debug, Clone)]
pub struct ReasoningParser {
    phase: Phase,
    /// Text held back because it may be the beginning of a tag.
    pending: String,
}

impl ReasoningParser {
    /// A parser for a generation whose prompt did (`true`) or did not open `<think>` already.
    pub fn new(prompt_opened_think: bool) -> Self {
        Self {
            phase: if prompt_opened_think {
                Phase::Reasoning
            } else {
                Phase::Start
            },
            pending: String::new(),
        }
    }

    /// Whether the prompt text ends inside an open `<think>` block (R1's generation prompt).
    pub fn prompt_opens_think(prompt: &str) -> bool {
        prompt
            .rfind(OPEN)
            .is_some_and(|open| !prompt[open..].contains(CLOSE))
    }

    /// Whether the text so far ends inside the reasoning block.
    pub fn in_reasoning(&self) -> bool {
        self.phase == Phase::Reasoning
    }

    /// Feeds the next piece of generated text.
    pub fn push(&mut self, piece: &str) -> ReasoningDelta {
        self.pending.push_str(piece);
        let mut delta = ReasoningDelta::default();
        loop {
            match self.phase {
                Phase::Start => {
                    let trimmed = self.pending.trim_start();
                    if trimmed.starts_with(OPEN) {
                        let skip = self.pending.len() - trimmed.len() + OPEN.len();
                        self.pending.drain(..skip);
                        self.phase = Phase::Reasoning;
                    } else if OPEN.starts_with(trimmed) {
                        // Only whitespace or a partial "<think" so far: wait for more.
                        return delta;
                    } else {
                        self.phase = Phase::Answer;
                    }
                }
                Phase::Reasoning => match self.pending.find(CLOSE) {
                    Some(at) => {
                        delta.reasoning.push_str(&self.pending[..at]);
                        self.pending.drain(..at + CLOSE.len());
                        self.phase = Phase::AfterReasoning;
                    }
                    None => {
                        let keep = partial_tag_suffix(&self.pending, CLOSE);
                        let cut = self.pending.len() - keep;
                        delta.reasoning.push_str(&self.pending[..cut]);
                        self.pending.drain(..cut);
                        return delta;
                    }
                },
                Phase::AfterReasoning => {
                    let rest = self.pending.trim_start_matches('\n').len();
                    self.pending.drain(..self.pending.len() - rest);
                    if self.pending.is_empty() {
                        return delta;
                    }
                    self.phase = Phase::Answer;
                }
                Phase::Answer => {
                    delta.content.push_str(&self.pending);
                    self.pending.clear();
                    return delta;
                }
            }
        }
    }

    /// Releases held-back text at the end of generation.
    pub fn finish(&mut self) -> ReasoningDelta {
        let rest = std::mem::take(&mut self.pending);
        match self.phase {
            Phase::Reasoning => ReasoningDelta {
                reasoning: rest,
                content: String::new(),
            },
            Phase::Start | Phase::AfterReasoning | Phase::Answer => ReasoningDelta {
                reasoning: String::new(),
                content: rest,
            },
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_tag_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&n| text.ends_with(&tag[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(prompt_opened: bool, pieces: &[&str]) -> (String, String) {
        let mut p = ReasoningParser::new(prompt_opened);
        let (mut reasoning, mut content) = (String::new(), String::new());
        for piece in pieces {
            let d = p.push(piece);
            reasoning += &d.reasoning;
            content += &d.content;
        }
        let d = p.finish();
        (reasoning + &d.reasoning, content + &d.content)
    }

    #[test]
    fn r1_prompt_opened_think() {
        let got = run(
            true,
            &[
                "Let me",
                " add: 2+2=4.",
                "</th",
                "ink>\n",
                "\nThe answer",
                " is 4.",
            ],
        );
        assert_eq!(
            got,
            ("Let me add: 2+2=4.".into(), "The answer is 4.".into())
        );
    }

    #[test]
    fn model_opens_think_itself() {
        let got = run(false, &["\n<thi", "nk>", "hmm", "</think>", "Ja, schön!"]);
        assert_eq!(got, ("hmm".into(), "Ja, schön!".into()));
    }

    #[test]
    fn no_think_at_all_is_all_content() {
        assert_eq!(
            run(false, &["<b>bold</b> answer"]),
            (String::new(), "<b>bold</b> answer".into())
        );
        assert_eq!(run(false, &["<thin"]), (String::new(), "<thin".into()));
    }

    #[test]
    fn unfinished_reasoning_stays_reasoning() {
        assert_eq!(
            run(true, &["still thinking </thi"]),
            ("still thinking </thi".into(), String::new())
        );
    }

    #[test]
    fn detects_an_open_think_in_the_prompt() {
        assert!(ReasoningParser::prompt_opens_think(
            "<｜User｜>hi<｜Assistant｜><think>\n"
        ));
        assert!(!ReasoningParser::prompt_opens_think(
            "<think>a</think>b<｜Assistant｜>"
        ));
        assert!(!ReasoningParser::prompt_opens_think("plain"));
    }
}
