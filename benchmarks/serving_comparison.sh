#!/usr/bin/env bash
# The real-run comparison of scheduling policies on this machine, end to end:
#
#     bash benchmarks/serving_comparison.sh OUT_DIR [DURATION_S] [LOAD]
#
# 1. profiles small-pixart on 2 CPU workers (1 torch thread each, degrees 1 and 2),
# 2. draws one mixed 256/512 workload (Poisson, DURATION_S seconds, default 300, at LOAD,
#    default 0.7, of the 2 workers' capacity),
# 3. serves it through `gfdit serve` + benchmarks/benchmark_serving.py (real HTTP) once per
#    policy: static degree 1, static degree 2, elastic,
# 4. asks `gfdit simulate` to predict the same workload on the same profile,
# 5. prints real and simulated figures side by side (the table is the last thing printed).
#
# GFDIT_BENCH_MODEL and GFDIT_BENCH_PROFILE replace the model and the measured profile.
# OUT_DIR receives profile.json, workload.jsonl, real-<label>.json, sim.json, server logs
# and report.txt. Run it on a quiet machine: every policy sees the same arrivals, but not
# the same load from elsewhere.
set -euo pipefail

OUT=${1:?usage: serving_comparison.sh OUT_DIR [DURATION_S] [LOAD]}
DURATION=${2:-300}
LOAD=${3:-0.7}
PORT=${GFDIT_BENCH_PORT:-8765}
MODEL=${GFDIT_BENCH_MODEL:-small-pixart}
CLASSES=S:256x256:0.5:2,L:512x512:0.5:3
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"

if [[ -n ${GFDIT_BENCH_PROFILE:-} ]]; then  # a profile measured before, e.g. for a quick rehearsal
    cp "$GFDIT_BENCH_PROFILE" "$OUT/profile.json"
else
    gfdit profile "$MODEL" --num-workers 2 --worker-threads 1 --sizes 256,512 --batch-sizes 1,2 \
        --degrees 1,2 --cycles 2 -o "$OUT/profile.json"
fi
python "$HERE/workloads.py" --profile "$OUT/profile.json" --num-gpus 2 --steps 10 --classes "$CLASSES" \
    --load "$LOAD" --duration "$DURATION" --seed 0 -o "$OUT/workload.jsonl"

serve_and_replay() {  # label, then the policy flags
    local label=$1
    shift
    gfdit serve "$MODEL" --num-workers 2 --worker-threads 1 --port "$PORT" --profile "$OUT/profile.json" \
        "$@" > "$OUT/server-$label.log" 2>&1 &
    local server=$!
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
        kill -0 "$server" 2> /dev/null || { cat "$OUT/server-$label.log"; exit 1; }
        sleep 0.5
    done
    python "$HERE/benchmark_serving.py" --base-url "http://127.0.0.1:$PORT" --workload "$OUT/workload.jsonl" \
        --label "$label" --json "$OUT/real-$label.json"
    kill -TERM "$server"
    wait "$server" || true
}

serve_and_replay static-1 --policy static --static-degree 1
serve_and_replay static-2 --policy static --static-degree 2
serve_and_replay elastic --policy elastic

gfdit simulate --profile "$OUT/profile.json" --num-gpus 2 --workload "$OUT/workload.jsonl" --saturate 0 \
    --policies static-1,static-2,elastic --json "$OUT/sim.json" > "$OUT/sim.txt"
python "$HERE/benchmark_serving.py" --report "$OUT/real-static-1.json" "$OUT/real-static-2.json" \
    "$OUT/real-elastic.json" --simulated "$OUT/sim.json" | tee "$OUT/report.txt"
