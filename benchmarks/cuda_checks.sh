#!/bin/bash
# Everything that needs a GPU, in one go, each part in its own process under its own time limit, so that a short
# session on a GPU machine still brings back what finished:
#
#     bash benchmarks/cuda_checks.sh OUT_DIR [SECONDS [PART...]]   # SECONDS: the whole budget (default 570)
#
# The parts, in this order (all of them when none is named):
# - tests: tests/test_cuda.py and tests/test_cuda_quantized.py (with the quantized CPU-backend tests beside them);
# - overhead: what each adapted layer adds on a GPU, fused with its base or not, eager and compiled (overhead.py at
#   MiniLM's shape, 32 x 128 tokens, width 384), written to OUT_DIR/overhead-cuda.json;
# - trainer: a Hugging Face Trainer step with LoramixTrainer against PEFT under the plain Trainer (trainer_step.py
#   at MiniLM's shape, float32), written to OUT_DIR/trainer-step-cuda.json (not yet run on a GPU);
# - speed: the speed benchmark's CUDA sections, one process each, in this order: generate, layer (the
#   Llama-shaped d = 4096 points first), model, inference, memory, elrea; each writes
#   OUT_DIR/speed-cuda-SECTION.json and .md after every point or model, so a section stopped at its limit keeps
#   what it measured;
# - continual: the continual benchmark's selector against task ids on a mixed batch (benchmarks/continual.py
#   --speed: the default selector, the example configs' with experts in every block or from block 3 on, routed
#   acceptance; batches of 64 and 256), written to OUT_DIR/continual-speed-cuda.json after every case;
# - suite: the whole test suite on the GPU, with what time is left (pytest-xdist's -n when it is installed).
#
# Each part's log is OUT_DIR/PART.log; the console shows its last lines. Run from the repository root. The
# interpreter is $PYTHON when set, else `python`, else `python3`.
set -u
OUT_DIR=${1:?usage: bash benchmarks/cuda_checks.sh OUT_DIR [SECONDS [PART...]]}
BUDGET=${2:-570}
PARTS=("${@:3}")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(tests overhead trainer speed continual suite)
wanted() { [[ " ${PARTS[*]} " == *" $1 "* ]]; }
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-$(command -v python || command -v python3)}  # the interpreter with torch: $PYTHON, else python(3)

part() {  # part NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds, and never past the budget
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, $left s of the budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most $limit s), started at ${SECONDS} s"
  timeout -k 5 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  echo "== $name: exit $? at ${SECONDS} s"
  tail -n 25 "$OUT_DIR/$name.log"
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" ||
  exit 1
if wanted tests; then
  part cuda-tests 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_cuda_quantized.py \
    tests/test_quantize.py tests/experts/test_quantized.py
fi
if wanted overhead; then
  part overhead 180 "$PY" benchmarks/overhead.py --device cuda --hidden 384 --tokens 128 --batch 32 --rounds 10 --compile \
    --out "$OUT_DIR/overhead-cuda.json"
fi
if wanted trainer; then
  part trainer-step 90 "$PY" benchmarks/trainer_step.py --device cuda --hidden 384 --tokens 128 --batch 32 --rounds 10 \
    --out "$OUT_DIR/trainer-step-cuda.json"
fi
if wanted speed; then
  for section in generate layer model inference memory elrea; do
    part "speed-$section" 120 "$PY" benchmarks/speed.py --device cuda --sections "$section" \
      --out "$OUT_DIR/speed-cuda-$section.json"
  done
fi
if wanted continual; then
  part continual-speed 150 "$PY" benchmarks/continual.py --speed --device cuda --cases 0 8 9 10 --batches 64 256 \
    --out "$OUT_DIR/continual.json"
fi
if wanted suite; then
  workers=()
  "$PY" -c "import xdist" 2>/dev/null && workers=(-n 8)
  part suite 600 "$PY" -m pytest -q -p no:cacheprovider "${workers[@]}"
fi
echo "== done at ${SECONDS} s"
