//! Training checkpoints: a complete model folder (`config.json`, `model.safetensors`, tokenizer
//! files, `task.json`) that `tiefsee run` loads as it is, plus what resuming needs
//! (`trainer_state.json`, `optimizer.safetensors`).
//!
//! Saving is atomic: everything is written into `<dir>.tmp`, then swapped in by renames, so a
//! failure (a full disk, Ctrl-C at the wrong moment) leaves the previous checkpoint intact.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{OptimSpec, TaskSpec};
use crate::error::{Result, TrainError};
use crate::optim::AdamW;
use crate::params::Params;

/// Where a run stands, written beside its checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// `pretrain` or `grpo`.
    pub phase: String,
    /// Steps completed.
    pub step: usize,
    /// The run's config file contents, so a resume can check it is the same run.
    pub config: serde_json::Value,
    /// The checkpoint a GRPO run started from.
    pub started_from: Option<String>,
}

/// The files of a checkpoint folder.
pub const TASK_FILE: &str = "task.json";
const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Writes a checkpoint into `dir` atomically. `optimizer: None` writes a model-only folder.
pub fn save(
    dir: &Path,
    params: &Params,
    task: &TaskSpec,
    state: &TrainerState,
    optimizer: Option<&AdamW>,
) -> Result<()> {
    let tmp = sibling(dir, "tmp");
    let fail = |source: std::io::Error| TrainError::Save {
        path: dir.to_path_buf(),
        source,
    };
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(fail)?;
    }
    std::fs::create_dir_all(&tmp).map_err(fail)?;
    let written = write_all(&tmp, params, task, state, optimizer);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(match e {
            TrainError::Io { source, .. } => fail(source),
            other => other,
        });
    }
    let old = sibling(dir, "old");
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(fail)?;
    }
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(fail)?;
    }
    std::fs::rename(&tmp, dir).map_err(fail)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(fail)?;
    }
    Ok(())
}

fn write_all(
    dir: &Path,
    params: &Params,
    task: &TaskSpec,
    state: &TrainerState,
    optimizer: Option<&AdamW>,
) -> Result<()> {
    params.save(dir)?;
    crate::vocab::write(dir)?;
    write_json(&dir.join(TASK_FILE), task)?;
    write_json(&dir.join(STATE_FILE), state)?;
    if let Some(opt) = optimizer {
        opt.save(&dir.join(OPTIMIZER_FILE))?;
    }
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON serializes") + "\n";
    std::fs::write(path, text).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// `dir` with `.suffix` appended to its last component.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}

/// The checkpoint folder to read: `dir`, or `<dir>.old` when a save was cut off between its two
/// renames.
pub fn resolve(dir: &Path) -> Option<PathBuf> {
    if dir.join("model.safetensors").is_file() {
        return Some(dir.to_path_buf());
    }
    let old = sibling(dir, "old");
    old.join("model.safetensors").is_file().then_some(old)
}

/// The parameters, optimizer and step to resume from, when `dir` holds a checkpoint of the same
/// run (phase, config and starting checkpoint); `None` when there is none yet; an error naming the
/// folder when it holds another run.
pub fn resume(
    dir: &Path,
    phase: &str,
    config: &serde_json::Value,
    started_from: Option<&str>,
    spec: OptimSpec,
) -> Result<Option<(Params, AdamW, usize)>> {
    let Some(dir) = resolve(dir) else {
        return Ok(None);
    };
    let state = read_state(&dir)?;
    if state.phase != phase
        || &state.config != config
        || state.started_from.as_deref() != started_from
    {
        return Err(TrainError::Config {
            field: "config".into(),
            reason: format!(
                "{} holds a different run ({} of another config or start); use another --out, or the same config and --model",
                dir.display(),
                state.phase
            ),
        });
    }
    let params = Params::load(&dir)?;
    let optimizer = AdamW::load(spec, &dir.join(OPTIMIZER_FILE), state.step as u64)?;
    Ok(Some((params, optimizer, state.step)))
}

/// The trainer state of a checkpoint.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    crate::config::read_json(&dir.join(STATE_FILE))
}

/// The task a model was trained on, from its `task.json`.
pub fn read_task(dir: &Path) -> Result<TaskSpec> {
    let path = dir.join(TASK_FILE);
    if !path.is_file() {
        return Err(TrainError::NotACheckpoint {
            path: dir.to_path_buf(),
            reason: format!("{TASK_FILE} is missing; pass --task NAME"),
        });
    }
    crate::config::read_json(&path)
}
