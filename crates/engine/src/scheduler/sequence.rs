//! One request's life inside the scheduler: its tokens, how many of them the cache holds, its limits,
//! and the events it produces (tokens, then one `Finished`).
//!
//! Finish rules follow [`crate::generate::Session`]: a stop token ends generation and is not passed
//! on; `max_tokens` ends it with `Length`; filling the context ends it with `ContextFull`.

use std::fmt;

use crate::generate::StopReason;
use crate::logprobs::TokenLogprobs;

/// The scheduler's handle on one request, unique for the scheduler's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// What a client asks for, in token ids: the scheduler never sees text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// Most tokens to generate; `None` generates until a stop token or the context is full.
    pub max_tokens: Option<usize>,
    /// Token ids that end generation (end of text, end of turn); they are not passed on.
    pub stop_ids: Vec<u32>,
    /// `Some(k)`: report each token's log-probability and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
}

/// Token counts of one request, reported when it finishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens found in the prefix cache on first admission (not computed).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// Times the request lost its cache to a busier pool and was recomputed.
    pub preemptions: usize,
}

/// What the engine reports to whoever waits on a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token, in order, with its log-probabilities if the request asked for them
    /// (boxed: requests that do not ask pay one null pointer).
    Token {
        id: SeqId,
        token: u32,
        logprobs: Option<Box<TokenLogprobs>>,
    },
    /// The request is done and holds no cache any more; nothing follows for `id`.
    Finished {
        id: SeqId,
        reason: StopReason,
        usage: Usage,
    },
}

/// A request in flight: prompt plus generated tokens, and how many of them are in the cache.
#[derive(Debug, Clone)]
pub(crate) struct Sequence {
    pub id: SeqId,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose KV entries are in the cache: the position of the next token to feed.
    pub computed: usize,
    pub max_tokens: Option<usize>,
    pub stop_ids: Vec<u32>,
    /// Most tokens (prompt plus generated) this sequence may hold.
    pub context: usize,
    pub cached_tokens: usize,
    pub preemptions: usize,
    /// A sibling of the same prompt (another of the request's `n` choices) whose prefill this one
    /// waits for before admission, so that it finds the prompt in the prefix cache.
    pub after: Option<SeqId>,
}

impl Sequence {
    /// A sequence that has computed nothing yet.
    pub fn new(id: SeqId, request: Request, context: usize) -> Self {
        Self {
            id,
            prompt_len: request.prompt.len(),
            tokens: request.prompt,
            computed: 0,
            max_tokens: request.max_tokens,
            stop_ids: request.stop_ids,
            context,
            cached_tokens: 0,
            preemptions: 0,
            after: None,
        }
    }

    /// Tokens known but not yet in the cache: the whole (rest of the) prompt while prefilling, one
    /// token while decoding.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Token counts so far.
    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            cached_tokens: self.cached_tokens,
            completion_tokens: self.generated(),
            preemptions: self.preemptions,
        }
    }

    /// Takes a sampled token: appends it unless it stops generation, and says whether the
    /// sequence is finished.
    pub fn accept(&mut self, token: u32) -> (Option<Event>, Option<StopReason>) {
        if self.stop_ids.contains(&token) {
            return (None, Some(StopReason::StopToken));
        }
        self.tokens.push(token);
        let event = Some(Event::Token {
            id: self.id,
            token,
            logprobs: None,
        });
        let stop = if self.max_tokens == Some(self.generated()) {
            Some(StopReason::Length)
        } else if self.tokens.len() >= self.context {
            Some(StopReason::ContextFull)
        } else {
            None
        };
        (event, stop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequence(max_tokens: Option<usize>, context: usize) -> Sequence {
        let request = Request {
            prompt: vec![1, 2, 3],
            max_tokens,
            stop_ids: vec![0],
            logprobs: None,
        };
        Sequence::new(SeqId(7), request, context)
    }

    #[test]
    fn stop_token_is_not_passed_on() {
        let mut s = sequence(Some(5), 100);
        assert_eq!(s.accept(0), (None, Some(StopReason::StopToken)));
        assert_eq!(s.generated(), 0);
    }

    #[test]
    fn max_tokens_wins_over_context_when_both_end() {
        let mut s = sequence(Some(2), 5);
        assert_eq!(s.accept(9).1, None);
        assert_eq!(s.accept(9).1, Some(StopReason::Length));
        let mut s = sequence(None, 5);
        assert_eq!(s.accept(9).1, None);
        assert_eq!(s.accept(9).1, Some(StopReason::ContextFull));
        assert_eq!(s.usage().completion_tokens, 2);
    }
}
