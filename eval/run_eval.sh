#!/usr/bin/env bash
# Evaluate a base model and LoRA adapters with wlora-trl eval, from the repository root so that a local data
# folder (shared/data in or above it) is found. Arguments go to `wlora-trl eval` unchanged; with none, it evaluates
# SmolLM2-135M-Instruct on all four tasks. When shared/data exists the hub is not needed, so it is switched off:
# a silent download would mean a task is not reading the local files.
#
#   eval/run_eval.sh --adapter outputs/sft/adapter --limit 100
#   eval/run_eval.sh --model path/to/base --adapter a1 --adapter a2 --tasks boolq,arc_challenge --dtype bfloat16
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$PWD
while [[ -z "${WLORA_TRL_DATA_DIR:-}" && ! -d "$dir/shared/data" && "$dir" != / ]]; do dir=$(dirname "$dir"); done
if [[ -n "${WLORA_TRL_DATA_DIR:-}" || -d "$dir/shared/data" ]]; then
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
fi
exec python -m wlora_trl.cli eval "$@"
