#!/usr/bin/env bash
# Everything gfdit measures on one GPU, in one run of under 8 minutes, as JSON.
#
#     bash benchmarks/gpu_check.sh OUT_DIR             # on a machine with one CUDA GPU (an H200)
#     bash benchmarks/gpu_check.sh OUT_DIR --dry-run   # lists the plan, runs it on the CPU at tiny sizes
#
# The GPU machine reaches no package index and no hub. Before the run, download the
# wheels it lacks with `bash benchmarks/gpu_wheels.sh` (into .whl/, git-ignored) and send
# that folder along (GFDIT_WHEELS names another); they are installed into /tmp/gfdit-site.
# Models are random-weight pipelines built on the machine (benchmarks/scaled_models.py).
#
# Steps, in order of priority; each runs under the time left of the budget
# (GPU_CHECK_BUDGET_S, 450 s), and one that would start too late is skipped, so the whole
# run ends inside 8 minutes:
#   env         the machine, driver and package versions
#   model       a FLUX-width transformer (24 heads x 128), 4 double- and 8 single-stream
#               blocks of FLUX.1's 19 + 38, saved as a diffusers folder
#   tests       pytest -m gpu over every test file that carries the marker
#   throughput  engine vs diffusers one at a time: 16 requests at 512x512 on that model
#   overhead    an engine step through a worker process vs the bare step and the bare
#               transformer call, 512x512
#   tflops      the transformer's achieved TFLOP/s at 1024x1024, batch 4, bf16
#   cache       the step cache's speed-up: 8 requests at 512x512, 20 steps on that model,
#               uncached against two thresholds (rows saved, wall speed-up, PSNR)
#   compile     eager vs regionally compiled steps, small-pixart 512x512, 50 steps of 1-4 requests
#
# Exit status 0 when every step ran to its end (a failed gpu test fails the tests step).
# Output (two files, since a lent machine returns at most eight): OUT_DIR/gpu_check.json
# (benchmarks/gpu_report.py describes it: every step's status, time and figures, every
# test's outcome) and OUT_DIR/gpu_check.log (every step's whole log).
set -uo pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
out="$1"
dry_run=0
if [[ $# -eq 2 ]]; then
    [[ "$2" == "--dry-run" ]] || usage
    dry_run=1
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
py="${PYTHON:-python3}"
budget="${GPU_CHECK_BUDGET_S:-450}"
work="$(mktemp -d "${TMPDIR:-/tmp}/gfdit-gpu-check.XXXXXX")"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

model="$work/flux-sized"
gpu_tests="$(grep -rlE --include='test_*.py' 'pytest\.mark\.gpu' tests | sort | tr '\n' ' ')"
steps=(env model tests throughput overhead tflops cache compile)
declare -A limit=([env]=60 [model]=120 [tests]=270 [throughput]=150 [overhead]=120 [tflops]=90 [compile]=150 [cache]=120)

# The command of each step, on the GPU or (cpu) at tiny sizes for the dry run.
commands() {
    local m w
    m="$(printf %q "$model")" w="$(printf %q "$work")"
    declare -gA cmd
    cmd[env]="\"\$py\" benchmarks/gpu_report.py env $w/env.json"
    cmd[tests]="env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \"\$py\" -m pytest -p pytest_asyncio.plugin -p pytest_timeout -p no:cacheprovider -m gpu -q -rs --junitxml=$w/tests.xml $gpu_tests"
    if [[ $1 == gpu ]]; then
        cmd[model]="\"\$py\" benchmarks/scaled_models.py --family flux --layers 4 --single-layers 8 --device cuda --out $m"
        cmd[throughput]="\"\$py\" benchmarks/benchmark_throughput.py --model $m --device cuda --size 512 --num-requests 16 --steps 20 --repeats 2 --json $w/throughput.json"
        cmd[overhead]="\"\$py\" benchmarks/benchmark_executor.py --only overhead --model $m --device cuda --size 512 --overhead-rounds 4 --overhead-steps 8 --json $w/overhead.json"
        cmd[tflops]="\"\$py\" benchmarks/benchmark_tflops.py --model $m --device cuda --size 1024 --batch 4 --warmup 3 --iters 10 --json $w/tflops.json"
        cmd[compile]="\"\$py\" benchmarks/benchmark_compile.py --model small-pixart --device cuda --size 512 --steps 50 --json $w/compile.json"
        cmd[cache]="\"\$py\" benchmarks/benchmark_cache.py --model $m --device cuda --size 512 --steps 20 --prompts 8 --thresholds 0.1,0.2 --repeats 1 --batch 4 --json $w/cache.json"
    else
        cmd[model]="\"\$py\" benchmarks/scaled_models.py --family flux --layers 1 --single-layers 1 --tiny --device cpu --out $m"
        cmd[throughput]="\"\$py\" benchmarks/benchmark_throughput.py --model $m --device cpu --size 64 --num-requests 2 --steps 2 --repeats 1 --json $w/throughput.json"
        cmd[overhead]="\"\$py\" benchmarks/benchmark_executor.py --only overhead --model $m --device cpu --size 64 --overhead-rounds 1 --overhead-steps 3 --json $w/overhead.json"
        cmd[tflops]="\"\$py\" benchmarks/benchmark_tflops.py --model $m --device cpu --size 64 --batch 2 --warmup 1 --iters 2 --json $w/tflops.json"
        cmd[compile]="\"\$py\" benchmarks/benchmark_compile.py --model tiny-pixart --device cpu --size 64 --steps 3 --backend eager --json $w/compile.json"
        cmd[cache]="\"\$py\" benchmarks/benchmark_cache.py --model $m --device cpu --size 64 --steps 4 --prompts 2 --thresholds 0.5 --repeats 1 --batch 2 --json $w/cache.json"
    fi
}

# NAME: run one step under min(its limit, what the budget has left) (the dry run: the
# budget alone), its output in $work/NAME.log, and a line in $work/steps.jsonl.
step() {
    local name="$1" left=$((budget - SECONDS)) status rc=0 started=$SECONDS why="" run_for
    run_for=${limit[$name]}
    echo "== $name: ${cmd[$name]}"
    if [[ $left -lt 20 ]]; then
        status=skipped
        why="the time budget (${budget} s) is spent"
        echo "   skipped: $why"
    else
        [[ $dry_run -eq 1 || $left -lt $run_for ]] && run_for=$left
        timeout --kill-after=10 "$run_for" bash -c "py=$(printf %q "$py"); ${cmd[$name]}" >"$work/$name.log" 2>&1 || rc=$?
        case $rc in
            0) status=ok ;;
            124 | 137) status=timeout; why="stopped after ${run_for} s" ;;
            *) status=failed ;;
        esac
        echo "   $status (exit $rc, $((SECONDS - started)) s)"
        [[ $status == ok ]] || tail -n 5 "$work/$name.log" | sed 's/^/   | /'
    fi
    "$py" -c 'import json, sys; print(json.dumps(dict(zip(["name", "status", "rc", "seconds", "why", "command"], [sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6]]))))' \
        "$name" "$status" "$rc" "$((SECONDS - started))" "$why" "${cmd[$name]}" >>"$work/steps.jsonl"
}

if [[ $dry_run -eq 1 ]]; then
    touch "$work/dry_run"
    export OMP_NUM_THREADS=1  # a shared CPU: one thread per process runs fastest
    commands gpu
    echo "on a GPU this runs:"
    for name in "${steps[@]}"; do echo "  $name (at most ${limit[$name]} s): ${cmd[$name]}"; done
    commands cpu
else
    commands gpu
fi

echo "gpu_check: $([[ $dry_run -eq 1 ]] && echo 'dry run on the CPU' || echo 'on the GPU'), budget ${budget} s, work in $work"
if [[ $dry_run -eq 0 ]]; then
    wheels="${GFDIT_WHEELS:-$repo/.whl}"
    site=/tmp/gfdit-site
    if compgen -G "$wheels/*.whl" >/dev/null; then
        cmd[install]="\"\$py\" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site $(printf '%q ' "$wheels"/*.whl)"
        limit[install]=120
        step install
    else
        echo "no wheels in $wheels: run bash benchmarks/gpu_wheels.sh first; going on with what is installed"
    fi
    export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi

for name in "${steps[@]}"; do step "$name"; done

"$py" benchmarks/gpu_report.py summary "$work" "$out"
rc=$?
rm -rf "$work"
exit $rc  # 0 only when every step ran to its end
