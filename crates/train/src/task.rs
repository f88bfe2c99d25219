//! The verifiable reasoning task: multi-digit addition, subtraction and multiplication, where a written-out
//! scratchpad helps a small model and answering directly often fails (the R1-Zero setting in miniature).
//!
//! Text format, the same for pretraining and RL (the chat template wraps the prompt as the user turn):
//!
//! ```text
//! 345+789                                                               <- prompt (user message)
//! <think>5+9+0=14 write 4 carry 1\n…\n= 1134</think><answer>1134</answer>   <- completion
//! ```
//!
//! The corpus mixes three kinds of completion: direct answers (a fixed one-line thought, then the right
//! answer), correct scratchpads, and flawed scratchpads (one plausible slip — a dropped carry, a forgotten
//! borrow, a missing shift — carried consistently through to a wrong answer). Direct answers keep a
//! non-empty thought so that the format reward is the same for every kind and only accuracy tells them apart.
//!
//! Held-out problems are disjoint from training ones by construction: a fixed hash of the problem (operands
//! in canonical order for `+` and `*`, so `3+5` and `5+3` fall together) decides the split, independently of
//! any seed, and every generator rejects problems of the other split.

use thiserror::Error;

/// Errors from problem and corpus generation.
#[derive(Debug, Error, PartialEq)]
pub enum TaskError {
    /// A configuration field is out of range.
    #[error("invalid task config: {field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// The sampler could not find a problem of the requested kind (the space is too small for the split).
    #[error(
        "no {what} found after {attempts} attempts; widen the digit range or change held_out_percent"
    )]
    Exhausted { what: &'static str, attempts: usize },
}

/// Attempts before a rejection sampler gives up.
const MAX_ATTEMPTS: usize = 10_000;
/// Salt of the split hash; changing it reshuffles which problems are held out.
const SPLIT_SALT: u64 = 0x7469_6566_7365_6521;
/// The thought of a direct answer: non-empty so the format reward is 1, but no reasoning in it.
pub const DIRECT_THOUGHT: &str = "Answer directly.";

/// SplitMix64 (Steele et al. 2014): a tiny seeded generator, so the corpus is reproducible across crate
/// versions without depending on `rand`'s stream stability.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is below 2^-40 for the ranges used here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The arithmetic operation of a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `a + b`.
    Add,
    /// `a - b` with `a >= b`, so answers are never negative.
    Sub,
    /// `a * b`.
    Mul,
}

impl Op {
    /// The operator as written in prompts.
    pub fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
        }
    }

    fn is_commutative(self) -> bool {
        matches!(self, Op::Add | Op::Mul)
    }
}

/// Which side of the train / held-out partition a problem lies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Seen in pretraining and RL.
    Train,
    /// Only ever used for evaluation.
    HeldOut,
}

/// One arithmetic problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Problem {
    /// Left operand.
    pub a: u64,
    /// Right operand.
    pub b: u64,
    /// Operation.
    pub op: Op,
}

impl Problem {
    /// The exact result (never negative: subtraction problems have `a >= b`).
    pub fn answer(&self) -> u64 {
        match self.op {
            Op::Add => self.a + self.b,
            Op::Sub => self.a.saturating_sub(self.b),
            Op::Mul => self.a * self.b,
        }
    }

    /// The prompt (the user's message), e.g. `345+789`.
    pub fn prompt(&self) -> String {
        format!("{}{}{}", self.a, self.op.symbol(), self.b)
    }

    /// Most digits of either operand: the difficulty level reported by evaluation.
    pub fn digits(&self) -> usize {
        self.a.max(self.b).to_string().len()
    }

    /// The split this problem belongs to, given the held-out share in percent (0..=100).
    pub fn split(&self, held_out_percent: u8) -> Split {
        let (lo, hi) = if self.op.is_commutative() {
            (self.a.min(self.b), self.a.max(self.b))
        } else {
            (self.a, self.b)
        };
        let h = mix64(SPLIT_SALT ^ mix64(lo ^ mix64(hi ^ mix64(self.op as u64))));
        if h % 100 < u64::from(held_out_percent) {
            Split::HeldOut
        } else {
            Split::Train
        }
    }

    /// The correct step-by-step reasoning, digit by digit, ending in `= answer`.
    pub fn scratchpad(&self) -> Worked {
        self.work(None).unwrap_or_else(|| Worked {
            think: String::new(),
            answer: self.answer(),
        })
    }

    /// A scratchpad with one plausible slip and the wrong answer it leads to; `None` when this problem has
    /// no place for a slip (no carry, no borrow, or a one-digit multiplier). `choice` picks among the places.
    pub fn flawed_scratchpad(&self, choice: u64) -> Option<Worked> {
        let places = self.flaw_places();
        if places.is_empty() {
            return None;
        }
        let at = places[(choice % places.len() as u64) as usize];
        self.work(Some(at))
    }

    /// Columns (add, sub) or multiplier digits (mul) where a slip is possible.
    fn flaw_places(&self) -> Vec<usize> {
        match self.op {
            Op::Add => add_columns(self.a, self.b, None)
                .iter()
                .enumerate()
                .filter(|(_, c)| c.out == 1)
                .map(|(i, _)| i)
                .collect(),
            Op::Sub => sub_columns(self.a, self.b, None)
                .iter()
                .enumerate()
                .filter(|(_, c)| c.out == 1)
                .map(|(i, _)| i)
                .collect(),
            Op::Mul => digits_lsb(self.b)
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(_, d)| **d != 0)
                .map(|(i, _)| i)
                .collect(),
        }
    }

    /// The worked solution; `flaw` names the column or multiplier digit where the slip happens.
    fn work(&self, flaw: Option<usize>) -> Option<Worked> {
        let (a, b) = (self.a, self.b);
        let mut lines = Vec::new();
        let answer = match self.op {
            Op::Add => {
                let cols = add_columns(a, b, flaw);
                for c in &cols {
                    lines.push(format!(
                        "{}+{}+{}={} write {} carry {}",
                        c.da,
                        c.db,
                        c.cin,
                        c.da + c.db + c.cin,
                        c.digit,
                        c.out
                    ));
                }
                let last = cols.last().map_or(0, |c| c.out);
                if last > 0 {
                    lines.push(format!("write {last}"));
                }
                from_columns(&cols, last)
            }
            Op::Sub => {
                let cols = sub_columns(a, b, flaw);
                for c in &cols {
                    let r = c.da as i64 - c.db as i64 - c.cin as i64;
                    if r < 0 {
                        lines.push(format!(
                            "{}-{}-{}={} +10={} write {} borrow {}",
                            c.da,
                            c.db,
                            c.cin,
                            r,
                            r + 10,
                            c.digit,
                            c.out
                        ));
                    } else {
                        lines.push(format!(
                            "{}-{}-{}={} write {} borrow {}",
                            c.da, c.db, c.cin, r, c.digit, c.out
                        ));
                    }
                }
                from_columns(&cols, 0)
            }
            Op::Mul => {
                let mut partials = Vec::new();
                for (i, d) in digits_lsb(b).into_iter().enumerate() {
                    let shift = 10u64.pow(i as u32);
                    // The slip: the partial product is written without its trailing zeros.
                    let p = if flaw == Some(i) {
                        a * d
                    } else {
                        a * d * shift
                    };
                    lines.push(format!("{}*{}={}", a, d * shift, p));
                    partials.push(p);
                }
                let mut sum = partials.first().copied().unwrap_or(0);
                for p in partials.iter().skip(1) {
                    lines.push(format!("{}+{}={}", sum, p, sum + p));
                    sum += p;
                }
                sum
            }
        };
        if flaw.is_some() && answer == self.answer() {
            return None;
        }
        lines.push(format!("= {answer}"));
        Some(Worked {
            think: lines.join("\n"),
            answer,
        })
    }
}

/// A scratchpad (the text inside `<think>`) and the answer it arrives at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worked {
    /// The reasoning, one step per line.
    pub think: String,
    /// The answer the reasoning ends in (wrong for a flawed scratchpad).
    pub answer: u64,
}

/// One column of schoolbook addition or subtraction, least significant first.
struct Column {
    da: u64,
    db: u64,
    /// Carry or borrow coming in.
    cin: u64,
    digit: u64,
    /// Carry or borrow going out, as written (a slip writes 0 here).
    out: u64,
}

fn digits_lsb(mut n: u64) -> Vec<u64> {
    let mut d = vec![n % 10];
    n /= 10;
    while n > 0 {
        d.push(n % 10);
        n /= 10;
    }
    d
}

fn paired_digits(a: u64, b: u64) -> Vec<(u64, u64)> {
    let (da, db) = (digits_lsb(a), digits_lsb(b));
    (0..da.len().max(db.len()))
        .map(|i| {
            (
                da.get(i).copied().unwrap_or(0),
                db.get(i).copied().unwrap_or(0),
            )
        })
        .collect()
}

/// Addition columns; at column `drop`, the carry out is forgotten.
fn add_columns(a: u64, b: u64, drop: Option<usize>) -> Vec<Column> {
    let mut cin = 0;
    let mut cols = Vec::new();
    for (i, (da, db)) in paired_digits(a, b).into_iter().enumerate() {
        let s = da + db + cin;
        let out = if drop == Some(i) { 0 } else { s / 10 };
        cols.push(Column {
            da,
            db,
            cin,
            digit: s % 10,
            out,
        });
        cin = out;
    }
    cols
}

/// Subtraction columns (`a >= b`); at column `drop`, the borrow out is forgotten.
fn sub_columns(a: u64, b: u64, drop: Option<usize>) -> Vec<Column> {
    let mut cin = 0;
    let mut cols = Vec::new();
    for (i, (da, db)) in paired_digits(a, b).into_iter().enumerate() {
        let r = da as i64 - db as i64 - cin as i64;
        let (digit, borrow) = if r < 0 {
            ((r + 10) as u64, 1)
        } else {
            (r as u64, 0)
        };
        let out = if drop == Some(i) { 0 } else { borrow };
        cols.push(Column {
            da,
            db,
            cin,
            digit,
            out,
        });
        cin = out;
    }
    cols
}

fn from_columns(cols: &[Column], top_carry: u64) -> u64 {
    let low: u64 = cols.iter().rev().fold(0, |acc, c| acc * 10 + c.digit);
    top_carry * 10u64.pow(cols.len() as u32) + low
}

/// What problems to draw: operations, operand sizes and the held-out share.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskConfig {
    /// Operations drawn uniformly.
    pub ops: Vec<Op>,
    /// Fewest digits per operand (difficulty floor), at least 1.
    pub min_digits: u32,
    /// Most digits per operand (difficulty ceiling), at most 9 so products fit in `u64`.
    pub max_digits: u32,
    /// Percent of all problems reserved for evaluation (0..=100).
    pub held_out_percent: u8,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            ops: vec![Op::Add, Op::Sub, Op::Mul],
            min_digits: 1,
            max_digits: 3,
            held_out_percent: 10,
        }
    }
}

impl TaskConfig {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), TaskError> {
        let bad = |field, reason: String| Err(TaskError::InvalidConfig { field, reason });
        if self.ops.is_empty() {
            return bad("ops", "is empty".into());
        }
        if self.min_digits == 0 || self.min_digits > self.max_digits {
            return bad(
                "min_digits",
                format!(
                    "= {} must be in 1..=max_digits ({})",
                    self.min_digits, self.max_digits
                ),
            );
        }
        if self.max_digits > 9 {
            return bad(
                "max_digits",
                format!("= {} must be at most 9", self.max_digits),
            );
        }
        if self.held_out_percent > 100 {
            return bad(
                "held_out_percent",
                format!("= {} must be at most 100", self.held_out_percent),
            );
        }
        Ok(())
    }
}

/// A seeded, reproducible stream of problems from one split.
#[derive(Debug, Clone)]
pub struct Generator {
    cfg: TaskConfig,
    rng: SplitMix64,
}

impl Generator {
    /// A generator for `cfg` seeded with `seed`; fails on an invalid config.
    pub fn new(cfg: TaskConfig, seed: u64) -> Result<Self, TaskError> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            rng: SplitMix64::new(seed),
        })
    }

    /// The next problem of `split`, drawn by rejection so the other split is never returned.
    pub fn sample(&mut self, split: Split) -> Result<Problem, TaskError> {
        for _ in 0..MAX_ATTEMPTS {
            let p = self.draw();
            if p.split(self.cfg.held_out_percent) == split {
                return Ok(p);
            }
        }
        Err(TaskError::Exhausted {
            what: "problem of the requested split",
            attempts: MAX_ATTEMPTS,
        })
    }

    fn operand(&mut self) -> u64 {
        let span = u64::from(self.cfg.max_digits - self.cfg.min_digits + 1);
        let digits = self.cfg.min_digits + self.rng.below(span) as u32;
        let lo = if digits == 1 {
            0
        } else {
            10u64.pow(digits - 1)
        };
        lo + self.rng.below(10u64.pow(digits) - lo)
    }

    fn draw(&mut self) -> Problem {
        let op = self.cfg.ops[self.rng.below(self.cfg.ops.len() as u64) as usize];
        let (x, y) = (self.operand(), self.operand());
        let (a, b) = if op == Op::Sub {
            (x.max(y), x.min(y))
        } else {
            (x, y)
        };
        Problem { a, b, op }
    }
}

/// The kind of completion in a corpus item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// The fixed [`DIRECT_THOUGHT`] then the right answer.
    Direct,
    /// A correct scratchpad then the right answer.
    Scratchpad,
    /// A scratchpad with one slip then the wrong answer it leads to.
    Flawed,
}

/// Relative weights of the three item kinds in a corpus (not necessarily summing to anything).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CorpusMix {
    /// Weight of direct answers.
    pub direct: u32,
    /// Weight of correct scratchpads.
    pub scratchpad: u32,
    /// Weight of flawed scratchpads.
    pub flawed: u32,
}

impl Default for CorpusMix {
    fn default() -> Self {
        // Mostly direct answers so greedy decoding skips thinking; some flawed pads leave room for RL.
        Self {
            direct: 6,
            scratchpad: 3,
            flawed: 1,
        }
    }
}

/// One pretraining document: a training-split problem and a completion of the given kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The problem (always from [`Split::Train`]).
    pub problem: Problem,
    /// Which kind of completion follows.
    pub kind: ItemKind,
    /// The user's message, `a+b`.
    pub prompt: String,
    /// `<think>…</think><answer>…</answer>`.
    pub completion: String,
}

/// The completion text for a thought and an answer.
pub fn completion(think: &str, answer: u64) -> String {
    format!("<think>{think}</think><answer>{answer}</answer>")
}

/// `n` reproducible training documents mixing the item kinds by `mix`; never touches held-out problems.
pub fn corpus(
    cfg: &TaskConfig,
    mix: &CorpusMix,
    n: usize,
    seed: u64,
) -> Result<Vec<Example>, TaskError> {
    let total = u64::from(mix.direct) + u64::from(mix.scratchpad) + u64::from(mix.flawed);
    if total == 0 {
        return Err(TaskError::InvalidConfig {
            field: "mix",
            reason: "has all weights zero".into(),
        });
    }
    let mut gen_ = Generator::new(cfg.clone(), seed)?;
    let mut pick = SplitMix64::new(seed ^ 0xC0DE_C0DE_C0DE_C0DE);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let r = pick.below(total);
        let kind = if r < u64::from(mix.direct) {
            ItemKind::Direct
        } else if r < u64::from(mix.direct) + u64::from(mix.scratchpad) {
            ItemKind::Scratchpad
        } else {
            ItemKind::Flawed
        };
        let (problem, worked) = match kind {
            ItemKind::Direct => {
                let p = gen_.sample(Split::Train)?;
                (
                    p,
                    Worked {
                        think: DIRECT_THOUGHT.into(),
                        answer: p.answer(),
                    },
                )
            }
            ItemKind::Scratchpad => {
                let p = gen_.sample(Split::Train)?;
                (p, p.scratchpad())
            }
            ItemKind::Flawed => flawed_example(&mut gen_, &mut pick)?,
        };
        out.push(Example {
            problem,
            kind,
            prompt: problem.prompt(),
            completion: completion(&worked.think, worked.answer),
        });
    }
    Ok(out)
}

/// Draws training problems until one admits a slip (e.g. an addition with a carry).
fn flawed_example(
    gen_: &mut Generator,
    pick: &mut SplitMix64,
) -> Result<(Problem, Worked), TaskError> {
    for _ in 0..MAX_ATTEMPTS {
        let p = gen_.sample(Split::Train)?;
        if let Some(w) = p.flawed_scratchpad(pick.next_u64()) {
            return Ok((p, w));
        }
    }
    Err(TaskError::Exhausted {
        what: "problem with room for a flawed scratchpad",
        attempts: MAX_ATTEMPTS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(a: u64, op: Op, b: u64) -> Problem {
        Problem { a, b, op }
    }

    #[test]
    fn addition_scratchpad_by_hand() {
        let w = p(345, Op::Add, 789).scratchpad();
        let want = "5+9+0=14 write 4 carry 1\n4+8+1=13 write 3 carry 1\n3+7+1=11 write 1 carry 1\nwrite 1\n= 1134";
        assert_eq!(w.think, want);
        assert_eq!(w.answer, 1134);
        assert_eq!(
            p(7, Op::Add, 0).scratchpad().think,
            "7+0+0=7 write 7 carry 0\n= 7"
        );
    }

    #[test]
    fn subtraction_scratchpad_by_hand() {
        let w = p(1134, Op::Sub, 789).scratchpad();
        let want = "4-9-0=-5 +10=5 write 5 borrow 1\n3-8-1=-6 +10=4 write 4 borrow 1\n\
                    1-7-1=-7 +10=3 write 3 borrow 1\n1-0-1=0 write 0 borrow 0\n= 345";
        assert_eq!(w.think, want);
        assert_eq!(w.answer, 345);
    }

    #[test]
    fn multiplication_scratchpad_by_hand() {
        let w = p(345, Op::Mul, 207).scratchpad();
        assert_eq!(
            w.think,
            "345*7=2415\n345*0=0\n345*200=69000\n2415+0=2415\n2415+69000=71415\n= 71415"
        );
        assert_eq!(w.answer, 71415);
    }

    #[test]
    fn flawed_scratchpads_by_hand() {
        // 345+789, carry dropped in the tens column: 1034 instead of 1134.
        let w = p(345, Op::Add, 789)
            .flawed_scratchpad(1)
            .expect("has carries");
        assert_eq!(
            w.think,
            "5+9+0=14 write 4 carry 1\n4+8+1=13 write 3 carry 0\n3+7+0=10 write 0 carry 1\nwrite 1\n= 1034"
        );
        assert_eq!(w.answer, 1034);
        // 52-17, borrow forgotten in the ones column: 45 instead of 35.
        let w = p(52, Op::Sub, 17)
            .flawed_scratchpad(0)
            .expect("has a borrow");
        assert_eq!(
            w.think,
            "2-7-0=-5 +10=5 write 5 borrow 0\n5-1-0=4 write 4 borrow 0\n= 45"
        );
        assert_eq!(w.answer, 45);
        // 12*34, the tens partial product written without its zero.
        let w = p(12, Op::Mul, 34)
            .flawed_scratchpad(0)
            .expect("two-digit multiplier");
        assert_eq!(w.think, "12*4=48\n12*30=36\n48+36=84\n= 84");
        assert_eq!(w.answer, 84);
        // No place for a slip.
        assert_eq!(p(12, Op::Add, 34).flawed_scratchpad(0), None);
        assert_eq!(p(58, Op::Sub, 17).flawed_scratchpad(0), None);
        assert_eq!(p(123, Op::Mul, 7).flawed_scratchpad(0), None);
    }

    #[test]
    fn scratchpads_agree_with_arithmetic_and_flaws_disagree() {
        let cfg = TaskConfig {
            min_digits: 1,
            max_digits: 6,
            ..TaskConfig::default()
        };
        let mut g = Generator::new(cfg, 7).expect("valid config");
        for i in 0..3000 {
            let prob = g.sample(Split::Train).expect("sample");
            let w = prob.scratchpad();
            assert_eq!(w.answer, prob.answer(), "{prob:?}");
            assert!(w.think.ends_with(&format!("= {}", prob.answer())));
            if let Some(f) = prob.flawed_scratchpad(i) {
                assert_ne!(f.answer, prob.answer(), "{prob:?}");
                assert!(f.think.ends_with(&format!("= {}", f.answer)));
            }
        }
    }

    #[test]
    fn generator_is_reproducible_and_respects_digits() {
        let cfg = TaskConfig {
            min_digits: 2,
            max_digits: 3,
            ..TaskConfig::default()
        };
        let draw = |seed| {
            let mut g = Generator::new(cfg.clone(), seed).expect("valid");
            (0..50)
                .map(|_| g.sample(Split::Train).expect("sample"))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
        for prob in draw(3) {
            assert!(
                (10..1000).contains(&prob.a) && (10..1000).contains(&prob.b),
                "{prob:?}"
            );
            if prob.op == Op::Sub {
                assert!(prob.a >= prob.b);
            }
        }
    }

    #[test]
    fn held_out_split_is_disjoint_by_construction() {
        let cfg = TaskConfig {
            min_digits: 1,
            max_digits: 2,
            held_out_percent: 20,
            ..TaskConfig::default()
        };
        // Every training sample from many seeds lies in Train, every evaluation sample in HeldOut.
        let mut train = std::collections::HashSet::new();
        let mut held = std::collections::HashSet::new();
        for seed in 0..20 {
            let mut g = Generator::new(cfg.clone(), seed).expect("valid");
            for _ in 0..500 {
                let t = g.sample(Split::Train).expect("train");
                assert_eq!(t.split(20), Split::Train);
                train.insert(t);
                let h = g.sample(Split::HeldOut).expect("held out");
                assert_eq!(h.split(20), Split::HeldOut);
                held.insert(h);
            }
        }
        for h in &held {
            // Neither the problem nor its commuted twin was ever drawn for training.
            assert!(!train.contains(h), "{h:?}");
            if h.op != Op::Sub {
                assert!(!train.contains(&p(h.b, h.op, h.a)), "{h:?}");
            }
        }
        // Commutative twins share a split; the share is near 20%.
        for a in 0..100 {
            for b in 0..100 {
                assert_eq!(p(a, Op::Add, b).split(20), p(b, Op::Add, a).split(20));
                assert_eq!(p(a, Op::Mul, b).split(20), p(b, Op::Mul, a).split(20));
            }
        }
        let share = (0..10_000)
            .filter(|i| p(i / 100, Op::Add, i % 100).split(20) == Split::HeldOut)
            .count();
        assert!(
            (1500..2500).contains(&share),
            "held-out share {share}/10000"
        );
        // The extremes.
        assert_eq!(p(3, Op::Add, 4).split(0), Split::Train);
        assert_eq!(p(3, Op::Add, 4).split(100), Split::HeldOut);
        let mut all_held = Generator::new(
            TaskConfig {
                held_out_percent: 100,
                ..cfg
            },
            0,
        )
        .expect("valid");
        assert!(matches!(
            all_held.sample(Split::Train),
            Err(TaskError::Exhausted { .. })
        ));
    }

    #[test]
    fn corpus_mixes_kinds_in_the_documented_format() {
        let cfg = TaskConfig::default();
        let mix = CorpusMix {
            direct: 1,
            scratchpad: 1,
            flawed: 1,
        };
        let docs = corpus(&cfg, &mix, 600, 42).expect("corpus");
        assert_eq!(docs, corpus(&cfg, &mix, 600, 42).expect("corpus"));
        let count = |k| docs.iter().filter(|d| d.kind == k).count();
        for k in [ItemKind::Direct, ItemKind::Scratchpad, ItemKind::Flawed] {
            assert!((150..250).contains(&count(k)), "{k:?}: {}", count(k));
        }
        for d in &docs {
            assert_eq!(d.problem.split(cfg.held_out_percent), Split::Train);
            assert_eq!(
                crate::rewards::format_reward(&d.completion),
                1.0,
                "{}",
                d.completion
            );
            let right =
                crate::rewards::accuracy_reward(&d.completion, &d.problem.answer().to_string());
            assert_eq!(right == 1.0, d.kind != ItemKind::Flawed, "{}", d.completion);
            assert_eq!(d.prompt, d.problem.prompt());
        }
        let only_direct = corpus(
            &cfg,
            &CorpusMix {
                direct: 1,
                scratchpad: 0,
                flawed: 0,
            },
            5,
            0,
        )
        .expect("corpus");
        let d = &only_direct[0];
        assert_eq!(
            d.completion,
            format!(
                "<think>{DIRECT_THOUGHT}</think><answer>{}</answer>",
                d.problem.answer()
            )
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let bad = |cfg: TaskConfig| match Generator::new(cfg, 0) {
            Err(TaskError::InvalidConfig { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(
            bad(TaskConfig {
                ops: vec![],
                ..TaskConfig::default()
            }),
            "ops"
        );
        assert_eq!(
            bad(TaskConfig {
                min_digits: 0,
                ..TaskConfig::default()
            }),
            "min_digits"
        );
        assert_eq!(
            bad(TaskConfig {
                min_digits: 4,
                max_digits: 3,
                ..TaskConfig::default()
            }),
            "min_digits"
        );
        assert_eq!(
            bad(TaskConfig {
                max_digits: 10,
                ..TaskConfig::default()
            }),
            "max_digits"
        );
        assert_eq!(
            bad(TaskConfig {
                held_out_percent: 101,
                ..TaskConfig::default()
            }),
            "held_out_percent"
        );
        let zero = CorpusMix {
            direct: 0,
            scratchpad: 0,
            flawed: 0,
        };
        assert!(matches!(
            corpus(&TaskConfig::default(), &zero, 1, 0),
            Err(TaskError::InvalidConfig { field: "mix", .. })
        ));
    }
}
