#!/usr/bin/env bash
# Device calls of the adapter-vs-ControlNet comparison (issue 16; docs/demo-model.md, "Adapter vs ControlNet").
# Each fits one call of under ten minutes; RUN (kept on the warm machine between calls) holds the runs.
#   bash scripts/compare_gpu.sh train MINUTES             # the compare phase: the sketch adapter, then the sketch
#                                                         # ControlNet, each alone on the GPU for MINUTES
#   bash scripts/compare_gpu.sh measure SCENES            # quality on SCENES held-out scenes (or from an earlier
#                                                         # `eval` call's RUN/eval-demo.json), fast-mode ms/image
#   bash scripts/compare_gpu.sh rest MINUTES FUSER_MINUTES    # seg, depth, pose, colour at once, then the fuser
#   bash scripts/compare_gpu.sh eval SCENES               # issue 11's table: `t2iadapter eval` of every setting with
#                                                         # RUN's adapters, fuser and ControlNet (eval-demo.json/.md)
# Environment: BASE (default: demo, the shipped base: v2), INIT (a folder of {name}.safetensors the runs continue
# from, e.g. src/t2iadapter/assets/demo/adapters; the compare phase continues only where INIT also holds the ControlNet), RUN (/root/demo-adapters), BATCH (48), WORKERS (6 DataLoader
# workers per run: the compare phase runs one process at a time; `rest` runs four, so give it WORKERS=3), DEVICE (cuda;
# cpu rehearses `measure` and `eval` on a CPU).
# What comes back in $OUT (each file under 15 MiB): the fp16 sketch adapter and ControlNet, the script's log with
# both runs' samples/s and peak memory, compare_gpu.json/.md (merge it on the CPU: docs/demo-model.md).
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src
BASE=${BASE:-demo}
RUN=${RUN:-/root/demo-adapters}
OUT=${OUT:-/tmp/out}
BATCH=${BATCH:-48}
WORKERS=${WORKERS:-6}
DEVICE=${DEVICE:-cuda}
init=(); [ -n "${INIT:-}" ] && init=(--init "$INIT")
mkdir -p "$RUN" "$OUT"
phase=$1; shift
case $phase in
    train)
        python3 scripts/train_demo_adapters.py --base "$BASE" --out "$RUN" --controlnet-sketch --phases compare \
            "${init[@]}" --compare-minutes "$1" --batch "$BATCH" --workers "$WORKERS" 2>&1 | tee "$OUT/compare_train.log" | tail -8
        mkdir -p "$OUT/adapters" "$OUT/controlnets" "$OUT/runs"
        cp "$RUN/adapters/sketch.safetensors" "$OUT/adapters/"
        cp "$RUN/controlnets/controlnet-sketch.safetensors" "$OUT/controlnets/"
        for r in sketch controlnet-sketch; do
            cp "$RUN/runs/$r/config.json" "$OUT/runs/$r-config.json"
            cp "$RUN/runs/$r/train_summary.json" "$OUT/runs/$r-train_summary.json"
        done
        cp "$RUN/adapters_log.json" "$OUT/" ;;
    measure)
        # quality from an earlier `eval` call's table on the same scenes when there is one (no second generation)
        if [ -f "$RUN/eval-demo.json" ]; then quality=(--scenes 0 --eval-json "$RUN/eval-demo.json"); else quality=(--scenes "$1"); fi
        python3 benchmarks/compare_adapter_controlnet.py --base "$BASE" --adapter "$RUN/adapters/sketch.safetensors" \
            --controlnet "$RUN/controlnets/controlnet-sketch.safetensors" --train-log "$RUN/adapters_log.json" \
            "${quality[@]}" --device "$DEVICE" --json "$OUT/compare_gpu.json" --out "$OUT/compare_gpu.md" 2>&1 | tail -20 ;;
    eval)
        adapters=()
        for c in sketch seg depth pose color; do adapters+=(--adapter "$c=$RUN/adapters/$c.safetensors"); done
        python3 -m t2iadapter.cli eval --base "$BASE" "${adapters[@]}" --fuser "$RUN/adapters/fuser.safetensors" \
            --controlnet "controlnet-sketch=$RUN/controlnets/controlnet-sketch.safetensors" --scenes "$1" \
            --device "$DEVICE" --batch "${EVAL_BATCH:-25}" --json "$OUT/eval-demo.json" --out "$OUT/eval-demo.md" --force 2>&1 | tail -16
        cp "$OUT/eval-demo.json" "$RUN/" ;;
    rest)
        python3 scripts/train_demo_adapters.py --base "$BASE" --out "$RUN" --controlnet-sketch --phases adapters,fuser \
            "${init[@]}" --minutes "$1" --fuser-minutes "$2" --batch "$BATCH" --workers "$WORKERS" 2>&1 | tee "$OUT/rest_train.log" | tail -8
        mkdir -p "$OUT/adapters" && cp "$RUN"/adapters/*.safetensors "$OUT/adapters/" && cp "$RUN/adapters_log.json" "$OUT/" ;;
    *)
        echo "usage: $0 train MINUTES | measure SCENES | rest MINUTES FUSER_MINUTES | eval SCENES" >&2; exit 2 ;;
esac
ls -la "$OUT"
