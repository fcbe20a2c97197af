#!/usr/bin/env bash
# The GPU kit's one command, from anywhere: bash benchmarks/gpu/run.sh OUT_DIR [--dry-run] [--steps tests,memory,speed]
# Installs the carried wheels (.whl/, from fetch_wheels.sh) into a private folder first, when there are any.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: bash benchmarks/gpu/run.sh OUT_DIR [--dry-run]}
shift
mkdir -p "$OUT"
SITE=${WLORA_GPU_KIT_SITE:-/tmp/wlora_gpu_kit_site}
IMPORTS="import transformers, trl, peft, datasets, bitsandbytes, accelerate"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || exit 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    if ! python3 -c "$IMPORTS"; then
        # transformers checks its dependencies' versions at import; if the machine's are older than the carried
        # transformers wants, fall back to the machine's own transformers rather than stop.
        echo "run.sh: the carried transformers does not import here; using the machine's own"
        rm -rf "$SITE"/transformers "$SITE"/transformers-*.dist-info
        python3 -c "$IMPORTS" || exit 1
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 benchmarks/gpu/run.py "$OUT" "$@" 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
