//! Streamed decoding: ids arrive one at a time, text leaves in whole UTF-8 characters.
//!
//! Byte-level BPE (DeepSeek, Qwen2, Llama 3) and byte-fallback tokenizers can split one character over
//! several tokens, so decoding token by token would emit broken characters. As text-generation-inference
//! does, we decode a small window of recent ids twice, with and without the ids not yet shown
//! (`prefix_offset..read_offset` is context already shown, `read_offset..` is new), and emit the
//! difference only once it does not end in U+FFFD, the decoder's mark for an unfinished character. The
//! context window also keeps decoders that treat the first token specially (a leading space stripped)
//! correct. Every window starts where an emitted piece ended, so for these decoders the pieces
//! concatenate to exactly `decode(all_ids)`; `finish` flushes whatever is left, broken or not.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Incremental decoder created by [`Tokenizer::stream`].
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    skip_special_tokens: bool,
    /// Recent ids: `..prefix_offset` are no longer needed and get dropped.
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<'t> StreamDecoder<'t> {
    pub(crate) fn new(tokenizer: &'t Tokenizer, skip_special_tokens: bool) -> Self {
        StreamDecoder {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Add one id; returns the text it completes (often empty while a character is unfinished).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let (prefix, text) = self.decode_window()?;
        if text.len() <= prefix.len() || text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(piece) = text.strip_prefix(prefix.as_str()) else {
            // The decoder rewrote the shown context: wait, `finish` will flush.
            return Ok(String::new());
        };
        let piece = piece.to_string();
        self.ids.drain(..self.prefix_offset);
        self.prefix_offset = self.read_offset - self.prefix_offset;
        self.read_offset = self.ids.len();
        Ok(piece)
    }

    /// Text of the ids not emitted yet (a final unfinished character comes out as U+FFFD); resets.
    pub fn finish(&mut self) -> Result<String> {
        let (prefix, text) = self.decode_window()?;
        let rest = text
            .strip_prefix(prefix.as_str())
            .unwrap_or(&text)
            .to_string();
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
        Ok(rest)
    }

    /// (text of the context ids, text of context + new ids).
    fn decode_window(&self) -> Result<(String, String)> {
        let skip = self.skip_special_tokens;
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let text = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], skip)?;
        Ok((prefix, text))
    }
}
