//! Counters and gauges the engine thread updates and `GET /metrics` prints in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Server-wide counters (totals) and gauges (current values).
#[derive(Debug, Default)]
pub struct Metrics {
    pub requests: AtomicUsize,
    pub rejected: AtomicUsize,
    pub cancelled: AtomicUsize,
    pub prompt_tokens: AtomicUsize,
    pub cache_hit_tokens: AtomicUsize,
    pub generated_tokens: AtomicUsize,
    pub steps: AtomicUsize,
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    /// Sequences that produced a token in the last step.
    pub last_batch: AtomicUsize,
    pub blocks_in_use: AtomicUsize,
    pub blocks_total: AtomicUsize,
}

impl Metrics {
    /// The Prometheus exposition text.
    pub fn render(&self) -> String {
        let get = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        let prompt = get(&self.prompt_tokens);
        let hit_rate = if prompt == 0 {
            0.0
        } else {
            get(&self.cache_hit_tokens) as f64 / prompt as f64
        };
        let rows: [(&str, &str, &str, String); 12] = [
            (
                "tiefsee_requests_total",
                "counter",
                "Requests received.",
                get(&self.requests).to_string(),
            ),
            (
                "tiefsee_requests_rejected_total",
                "counter",
                "Requests rejected (queue full, too long).",
                get(&self.rejected).to_string(),
            ),
            (
                "tiefsee_requests_cancelled_total",
                "counter",
                "Requests cancelled (client gone, stop string).",
                get(&self.cancelled).to_string(),
            ),
            (
                "tiefsee_prompt_tokens_total",
                "counter",
                "Prompt tokens of finished requests.",
                prompt.to_string(),
            ),
            (
                "tiefsee_prefix_cache_hit_tokens_total",
                "counter",
                "Prompt tokens served from the prefix cache.",
                get(&self.cache_hit_tokens).to_string(),
            ),
            (
                "tiefsee_prefix_cache_hit_rate",
                "gauge",
                "Share of prompt tokens served from the prefix cache.",
                format!("{hit_rate:.6}"),
            ),
            (
                "tiefsee_generation_tokens_total",
                "counter",
                "Tokens generated.",
                get(&self.generated_tokens).to_string(),
            ),
            (
                "tiefsee_engine_steps_total",
                "counter",
                "Batched forward steps.",
                get(&self.steps).to_string(),
            ),
            (
                "tiefsee_queue_depth",
                "gauge",
                "Requests waiting for admission.",
                get(&self.waiting).to_string(),
            ),
            (
                "tiefsee_running_sequences",
                "gauge",
                "Sequences in the running batch.",
                get(&self.running).to_string(),
            ),
            (
                "tiefsee_batch_size",
                "gauge",
                "Sequences that produced a token in the last step.",
                get(&self.last_batch).to_string(),
            ),
            (
                "tiefsee_kv_blocks_in_use",
                "gauge",
                "KV cache blocks in use.",
                format!("{}", get(&self.blocks_in_use)),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP tiefsee_kv_blocks_total KV cache blocks in the pool.\n# TYPE tiefsee_kv_blocks_total gauge\ntiefsee_kv_blocks_total {}",
            get(&self.blocks_total)
        );
        out
    }
}
