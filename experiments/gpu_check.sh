#!/usr/bin/env bash
# GPU check of the efficient-training features (issue 5) and of one real-size MLLM (issue 22), sized to finish in
# under 10 minutes on one GPU.
#
#   bash experiments/gpu_check.sh [RESULTS_DIR]        # on a machine with CUDA, from the repository root
#   bash experiments/gpu_check.sh --fetch-wheels       # here (with PyPI): download what the GPU machine lacks
#
# It runs, each step with its own time limit, writing flat files into RESULTS_DIR (default: $OUT when set,
# else runs/gpu_check/<timestamp>):
#   1. the ViT config (experiments/configs/vit_shapes.yaml) for 2 epochs in bf16-mixed with the throughput
#      monitor (perf/mfu on a known GPU)                                          -> bf16_summary.json
#   2. the same with presets/fsdp.yaml (FSDP2 with bf16 mixed precision through mm_lightning.parallel.ModelParallel;
#      one GPU = a mesh of one, the code path of a multi-GPU run)                -> fsdp_summary.json
#   3. DeepSpeed ZeRO-2 and ZeRO-3 for 1 epoch, if deepspeed is installed       -> deepspeed_zero{2,3}_summary.json
#   4. the pytest tests marked `gpu` (DeepSpeed, MFU)                            -> pytest_gpu.txt
#   5. python -m experiments.benchmark: overhead ratio, data path, presets with MFU -> benchmark.{json,md}
#   6. experiments/configs/real/mllm_siglip_smollm2.yaml (SigLIP-B/16 + pixel shuffle + SmolLM2-135M, 230 M
#      parameters, every part trained) in bf16-mixed for 40 optimizer steps of 8 x 32 samples with the throughput
#      monitor: perf/tokens_per_s, perf/mfu, perf/max_memory_gb, perf/step_time -> mllm_real_summary.json. From the
#      HF cache when it holds both models; else (no network here) their published architectures written by
#      tests/test_real_configs.py with random_init: true (no weights: the same speed and memory), and
#      the shapes conversations as data in both cases (their tokens/s, not LLaVA-length sequences).
# and the whole log -> gpu_check.log. A failing step is logged and the next one runs; the exit status is the
# number of failed steps.
#
# Python packages: the GPU machine of this workplace has torch, lightning, timm, transformers but not
# webdataset, braceexpand, jsonargparse, torchao or deepspeed. `--fetch-wheels` downloads them (and builds
# deepspeed's pure-Python wheel) into .whl/ for CPython 3.12; this script installs .whl/*.whl into
# /tmp/site when .whl/ exists. Elsewhere: pip install -e '.[dev,deepspeed,quant]' first.
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  PY=${PYTHON:-python3}
  plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl \
    webdataset braceexpand 'jsonargparse[signatures]' docstring-parser typeshed-client hjson \
    pydantic pydantic-core annotated-types typing-inspection torchao || exit 1
  $PY -m pip wheel --no-deps -w .whl deepspeed || echo "deepspeed wheel not built: step 3 will be skipped"
  ls -la .whl
  exit 0
fi

RES=${1:-${OUT:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}}
mkdir -p "$RES"
LOG="$RES/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
failed=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  return $rc
}
copy_summary() { [ -f "$1/summary.json" ] && cp "$1/summary.json" "$RES/$2_summary.json"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || { echo "no CUDA: nothing to check"; exit 1; }

VIT=experiments/configs/vit_shapes.yaml
P=experiments/configs/presets
COMMON=(--config $P/throughput.yaml --logger=csv --trainer.enable_progress_bar=false --data.num_workers=4)
WORK=$(mktemp -d)

step data 120 $PY -m data.prepare shapes --out data/shards/shapes
step bf16 150 $PY -m experiments.run fit --config $VIT --config $P/bf16_mixed.yaml "${COMMON[@]}" \
  --trainer.max_epochs=2 --trainer.default_root_dir="$WORK/bf16"
copy_summary "$WORK/bf16" bf16
step fsdp 150 $PY -m experiments.run fit --config $VIT --config $P/fsdp.yaml --config $P/bf16_mixed.yaml "${COMMON[@]}" \
  --trainer.devices=1 --trainer.strategy.init_args.mixed_precision=bf16 --trainer.max_epochs=2 \
  --trainer.default_root_dir="$WORK/fsdp"
copy_summary "$WORK/fsdp" fsdp
if $PY -c "import deepspeed" 2>/dev/null; then
  for stage in 2 3; do
    step "deepspeed_zero$stage" 150 $PY -m experiments.run fit --config $VIT --config $P/deepspeed_zero$stage.yaml \
      --config $P/bf16_mixed.yaml "${COMMON[@]}" --trainer.devices=1 --trainer.max_epochs=1 \
      --trainer.default_root_dir="$WORK/ds$stage"
    copy_summary "$WORK/ds$stage" "deepspeed_zero$stage"
  done
else
  echo "=== deepspeed: not installed, skipped (bash experiments/gpu_check.sh --fetch-wheels brings it)"
fi
step pytest_gpu 150 $PY -m pytest -q -m gpu tests/test_efficiency.py -p no:cacheprovider > "$RES/pytest_gpu.txt" 2>&1
tail -5 "$RES/pytest_gpu.txt"
step benchmark 200 $PY -m experiments.benchmark --rounds 4 --steps 40 --warmup 5 --logger csv --data-batches 40 \
  --workers 0 2 4 --presets "32-true" bf16_mixed bf16_true compile fsdp --preset-steps 60 --out "$WORK/bench"
cp "$WORK/bench/benchmark.json" "$WORK/bench/benchmark.md" "$RES/" 2>/dev/null

REAL=experiments/configs/real
MLLM_ARGS=()
if $PY -c "
from huggingface_hub import try_to_load_from_cache as cached
files = [('google/siglip-base-patch16-224', 'model.safetensors'), ('HuggingFaceTB/SmolLM2-135M-Instruct', 'model.safetensors'),
         ('HuggingFaceTB/SmolLM2-135M-Instruct', 'tokenizer.json')]
raise SystemExit(0 if all(isinstance(cached(repo, name), str) for repo, name in files) else 1)" 2>/dev/null; then
  echo "=== mllm_real: SigLIP and SmolLM2 from the HF cache (their weights)"
else
  echo "=== mllm_real: the HF cache lacks SigLIP / SmolLM2: their architectures at random initialisation"
  $PY -c "from tests.test_real_configs import write_mllm_architectures; write_mllm_architectures('$WORK/hub')" \
    && MLLM_ARGS=(--model.init_args.vision="$WORK/hub/siglip" --model.init_args.lm="$WORK/hub/smollm2"
                  --tokenizer.init_args.path="$WORK/hub/smollm2" --model.init_args.random_init=true)
fi
HF_HUB_OFFLINE=1 step mllm_real 300 $PY -m experiments.run fit --config $REAL/mllm_siglip_smollm2.yaml "${COMMON[@]}" \
  ${MLLM_ARGS[@]+"${MLLM_ARGS[@]}"} --data.train='data/shards/shapes/shapes-train-*.tar' \
  --data.val='data/shards/shapes/shapes-val-*.tar' --trainer.max_steps=40 --trainer.log_every_n_steps=10 \
  --trainer.limit_val_batches=5 --test_after_fit=false --trainer.default_root_dir="$WORK/mllm_real"
copy_summary "$WORK/mllm_real" mllm_real
echo "=== gpu_check done: $failed failed step(s); results in $RES"
ls -la "$RES"
exit $failed
