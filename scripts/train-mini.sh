#!/usr/bin/env bash
# Reproduces the shipped models from scratch: pretrains models/mini-base, runs GRPO from it with
# three seeds (and the accuracy-reward-only ablation with three seeds), evaluates every model on
# the held-out problems, writes runs/results.md, and exports models/mini-base and models/mini-r1
# (the seed-1 GRPO model). Resumes where it stopped when run again.
#
# Usage: scripts/train-mini.sh            (about an hour on 2 cores)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release -p tiefsee
bin=target/release/tiefsee
seeds=(1 2 3)

$bin train pretrain --config configs/mini-pretrain.json --out runs/mini-base
for seed in "${seeds[@]}"; do
    $bin train grpo --model runs/mini-base/checkpoint --config configs/mini-grpo.json \
        --seed "$seed" --out "runs/mini-r1-seed$seed"
    $bin train grpo --model runs/mini-base/checkpoint --config configs/mini-grpo-accuracy-only.json \
        --seed "$seed" --out "runs/accuracy-only-seed$seed"
done

eval_json() { $bin eval --model "$1" --problems 500 -k 8 --json; }
eval_json runs/mini-base/checkpoint > runs/eval-mini-base.json
for seed in "${seeds[@]}"; do
    eval_json "runs/mini-r1-seed$seed/checkpoint" > "runs/eval-mini-r1-seed$seed.json"
    eval_json "runs/accuracy-only-seed$seed/checkpoint" > "runs/eval-accuracy-only-seed$seed.json"
done
python3 scripts/results_table.py runs > runs/results.md
cat runs/results.md

export_model() {
    rm -rf "$2"
    mkdir -p "$(dirname "$2")"
    cp -r "$1" "$2"
    rm -f "$2/optimizer.safetensors"
}
export_model runs/mini-base/checkpoint models/mini-base
export_model runs/mini-r1-seed1/checkpoint models/mini-r1
cp runs/mini-base/metrics.png models/mini-base/pretraining.png
cp runs/mini-r1-seed1/metrics.png models/mini-r1/grpo.png
cp runs/mini-r1-seed1/metrics.csv models/mini-r1/grpo.csv
