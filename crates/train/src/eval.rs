//! Held-out evaluation: greedy accuracy, pass@1 over k samples, pass@k and maj@k, and accuracy by
//! difficulty, on problems that no training step can have drawn (the split is a fixed hash of the
//! problem; see [`crate::task`]).

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;
use tiefsee_engine::SamplingParams;
use tiefsee_model::Model;
use tiefsee_tokenizer::Tokenizer;

use crate::config::TaskSpec;
use crate::error::Result;
use crate::pretrain::prompt_ids;
use crate::rewards::{Rewards, extract_answer};
use crate::rollout::{Completion, generate};
use crate::task::{DIRECT_THOUGHT, Generator, Problem, Split};

/// Seed of the held-out problem list: fixed, so every evaluation of a task sees the same problems.
const EVAL_SEED: u64 = 0x00E7_A15E_7000_0001;

/// How to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Held-out problems.
    pub problems: usize,
    /// Samples per problem for pass@1, pass@k and maj@k (0: greedy only).
    pub samples: usize,
    /// Sampling temperature of those samples.
    pub temperature: f32,
    /// Seed of the samples.
    pub seed: u64,
    /// Generation budget per completion.
    pub max_tokens: usize,
}

/// Accuracy on the problems of one difficulty level.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    /// Digits of the larger operand.
    pub digits: usize,
    pub problems: usize,
    /// Greedy accuracy.
    pub accuracy: f64,
}

/// What `tiefsee eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub task: String,
    pub problems: usize,
    /// Greedy accuracy on the held-out problems, as a fraction.
    pub accuracy: f64,
    /// Share of greedy completions with the well-formed `<think>…</think><answer>…</answer>` layout.
    pub format: f64,
    /// Share of greedy completions that reason (a thought other than the direct-answer one).
    pub thinking: f64,
    /// Mean greedy completion length in tokens.
    pub mean_completion_tokens: f64,
    /// Samples per problem (k); the sampled metrics are absent when 0.
    pub k: usize,
    /// Mean accuracy of the k samples.
    pub pass_at_1: Option<f64>,
    /// Share of problems with at least one correct sample among k.
    pub pass_at_k: Option<f64>,
    /// Share of problems whose most frequent sampled answer is correct (ties: the first seen).
    pub maj_at_k: Option<f64>,
    pub by_difficulty: Vec<Level>,
}

/// `n` distinct held-out problems of the task, always the same ones for the same task.
pub fn held_out_problems(task: &TaskSpec, n: usize) -> Result<Vec<Problem>> {
    let mut generator = Generator::new(task.task_config()?, EVAL_SEED)?;
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    // Small tasks may hold fewer than n held-out problems: stop after many repeats.
    let mut repeats = 0;
    while out.len() < n && repeats < 20 * n + 1000 {
        let p = generator.sample(Split::HeldOut)?;
        if seen.insert(p) {
            out.push(p);
        } else {
            repeats += 1;
        }
    }
    Ok(out)
}

/// The text the rewards judge: the opened `<think>` (written by the chat template) plus the
/// completion.
pub fn completion_text(tokenizer: &Tokenizer, tokens: &[u32]) -> Result<String> {
    Ok(format!("<think>{}", tokenizer.decode(tokens, false)?))
}

/// Whether a completion reasons: its thought is neither empty nor the direct-answer one.
pub fn thinks(text: &str) -> bool {
    let inner = text
        .strip_prefix("<think>")
        .and_then(|rest| rest.split("</think>").next())
        .map(str::trim)
        .unwrap_or("");
    !inner.is_empty() && inner != DIRECT_THOUGHT
}

/// Evaluates `model` on the held-out problems of `task`.
pub fn evaluate(
    model: &Model,
    tokenizer: &Tokenizer,
    task: &TaskSpec,
    options: &EvalOptions,
) -> Result<EvalReport> {
    let problems = held_out_problems(task, options.problems)?;
    let prompts: Vec<Vec<u32>> = problems
        .iter()
        .map(|p| prompt_ids(tokenizer, &p.prompt()))
        .collect::<Result<_>>()?;
    let stop = tokenizer.eos_ids().to_vec();
    let greedy_params = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        ..SamplingParams::default()
    };
    let greedy = generate(
        model,
        &prompts,
        &vec![greedy_params; prompts.len()],
        options.max_tokens,
        &stop,
    )?;
    let mut correct = Vec::with_capacity(problems.len());
    let (mut format, mut thinking, mut tokens) = (0.0, 0.0, 0usize);
    for (p, c) in problems.iter().zip(&greedy) {
        let text = completion_text(tokenizer, &c.tokens)?;
        let r = Rewards::score(&text, &p.answer().to_string());
        correct.push(r.accuracy == 1.0);
        format += f64::from(r.format);
        thinking += f64::from(u8::from(thinks(&text)));
        tokens += c.tokens.len();
    }
    let n = problems.len().max(1) as f64;
    let mut levels: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for (p, &ok) in problems.iter().zip(&correct) {
        let e = levels.entry(p.digits()).or_default();
        e.0 += 1;
        e.1 += usize::from(ok);
    }
    let (pass_at_1, pass_at_k, maj_at_k) = if options.samples > 0 {
        let (a, b, c) = sampled_metrics(model, tokenizer, &problems, &prompts, options)?;
        (Some(a), Some(b), Some(c))
    } else {
        (None, None, None)
    };
    Ok(EvalReport {
        task: task.name.clone(),
        problems: problems.len(),
        accuracy: correct.iter().filter(|&&c| c).count() as f64 / n,
        format: format / n,
        thinking: thinking / n,
        mean_completion_tokens: tokens as f64 / n,
        k: options.samples,
        pass_at_1,
        pass_at_k,
        maj_at_k,
        by_difficulty: levels
            .into_iter()
            .map(|(digits, (problems, ok))| Level {
                digits,
                problems,
                accuracy: ok as f64 / problems as f64,
            })
            .collect(),
    })
}

/// pass@1 (mean sample accuracy), pass@k and maj@k over `options.samples` samples per problem.
fn sampled_metrics(
    model: &Model,
    tokenizer: &Tokenizer,
    problems: &[Problem],
    prompts: &[Vec<u32>],
    options: &EvalOptions,
) -> Result<(f64, f64, f64)> {
    let k = options.samples;
    let mut all_prompts = Vec::with_capacity(prompts.len() * k);
    let mut params = Vec::with_capacity(prompts.len() * k);
    for (i, prompt) in prompts.iter().enumerate() {
        for j in 0..k {
            all_prompts.push(prompt.clone());
            params.push(SamplingParams {
                temperature: options.temperature,
                top_p: 1.0,
                seed: options.seed ^ ((i * k + j) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ..SamplingParams::default()
            });
        }
    }
    let samples: Vec<Completion> = generate(
        model,
        &all_prompts,
        &params,
        options.max_tokens,
        tokenizer.eos_ids(),
    )?;
    let (mut pass1, mut passk, mut majk) = (0.0, 0.0, 0.0);
    for (p, group) in problems.iter().zip(samples.chunks(k)) {
        let answer = p.answer().to_string();
        let mut answers: Vec<Option<String>> = Vec::with_capacity(k);
        let mut right = 0;
        for c in group {
            let text = completion_text(tokenizer, &c.tokens)?;
            right += usize::from(Rewards::score(&text, &answer).accuracy == 1.0);
            answers.push(extract_answer(&text).map(str::to_string));
        }
        pass1 += right as f64 / k as f64;
        passk += f64::from(u8::from(right > 0));
        majk += f64::from(u8::from(
            majority(&answers).is_some_and(|a| a.trim() == answer),
        ));
    }
    let n = problems.len().max(1) as f64;
    Ok((pass1 / n, passk / n, majk / n))
}

/// The most frequent extracted answer (ties: the one seen first); `None` when no sample answered.
pub fn majority(answers: &[Option<String>]) -> Option<&str> {
    let mut best: Option<(&str, usize)> = None;
    for a in answers.iter().flatten() {
        let count = answers.iter().flatten().filter(|b| *b == a).count();
        if best.is_none_or(|(_, c)| count > c) {
            best = Some((a.as_str(), count));
        }
    }
    best.map(|(a, _)| a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_prefers_the_most_frequent_then_the_first() {
        let s = |x: &str| Some(x.to_string());
        assert_eq!(majority(&[s("1"), s("2"), s("2"), None]), Some("2"));
        assert_eq!(majority(&[s("3"), s("1"), s("1"), s("3")]), Some("3"));
        assert_eq!(majority(&[None, None]), None);
    }

    #[test]
    fn thinking_is_any_thought_but_the_direct_one() {
        assert!(thinks(
            "<think>1+2+0=3 write 3 carry 0\n= 3</think><answer>3</answer>"
        ));
        assert!(!thinks("<think>Answer directly.</think><answer>3</answer>"));
        assert!(!thinks("<think> </think><answer>3</answer>"));
        assert!(!thinks("<answer>3</answer>"));
    }

    #[test]
    fn held_out_problems_are_distinct_fixed_and_never_training_problems() {
        let task = TaskSpec::named("arithmetic").unwrap();
        let a = held_out_problems(&task, 300).unwrap();
        assert_eq!(a, held_out_problems(&task, 300).unwrap());
        let distinct: HashSet<_> = a.iter().collect();
        assert_eq!(distinct.len(), 300);
        assert!(a.iter().all(|p| p.split(10) == Split::HeldOut));
    }
}
