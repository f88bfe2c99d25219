//! Stop strings over streamed text: text is released as soon as it cannot be the start of a stop
//! string, and generation ends at the first complete one (which is not shown).

/// Incremental matcher of user-given stop strings.
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received but held back because it may begin a stop string.
    pending: String,
    stopped: bool,
}

impl StopStrings {
    /// A matcher for these stop strings (empty ones are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            stopped: false,
        }
    }

    /// Feeds text; returns what may be shown now, and whether a stop string was reached.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.pending.push_str(piece);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            self.stopped = true;
            let ready = self.pending[..at].to_owned();
            self.pending.clear();
            return (ready, true);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let held = self
            .stops
            .iter()
            .flat_map(|s| {
                s.char_indices()
                    .skip(1)
                    .map(|(i, _)| &s[..i])
                    .filter(|prefix| self.pending.ends_with(prefix))
                    .map(str::len)
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - held;
        let ready = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        (ready, false)
    }

    /// Releases held-back text at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Whether a stop string ended generation.
    pub fn stopped(&self) -> bool {
        self.stopped
    }
}

#[cfg(test)]
mod tests {
    use super::StopStrings;

    #[test]
    fn stops_at_a_string_split_across_pieces() {
        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("hello E"), ("hello ".to_owned(), false));
        assert_eq!(s.push("N"), (String::new(), false));
        assert_eq!(s.push("D and more"), (String::new(), true));
        assert!(s.stopped());
    }

    #[test]
    fn releases_a_false_start() {
        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("EN"), (String::new(), false));
        assert_eq!(s.push("x"), ("ENx".to_owned(), false));
        assert_eq!(s.push("E"), (String::new(), false));
        assert_eq!(s.flush(), "E");
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_text_is_safe() {
        let mut s = StopStrings::new(vec!["ü!".into(), "Grü".into()]);
        assert_eq!(s.push("Schöne Grüße ü!"), ("Schöne ".to_owned(), true));
    }
}
