//! Prints a few pretraining documents of each kind, to see the task format:
//! `cargo run -p tiefsee-train --release --example corpus`.

use tiefsee_train::task::{CorpusMix, ItemKind, TaskConfig, corpus};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let docs = corpus(
        &TaskConfig::default(),
        &CorpusMix {
            direct: 1,
            scratchpad: 1,
            flawed: 1,
        },
        60,
        0,
    )?;
    for kind in [ItemKind::Direct, ItemKind::Scratchpad, ItemKind::Flawed] {
        for d in docs.iter().filter(|d| d.kind == kind).take(2) {
            println!(
                "--- {kind:?} (true answer {})\nuser: {}\nassistant: {}\n",
                d.problem.answer(),
                d.prompt,
                d.completion
            );
        }
    }
    Ok(())
}
