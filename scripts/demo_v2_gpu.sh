#!/usr/bin/env bash
# One device call of the demo v2 training (docs/demo-model.md, "How v2 was trained"): installs the carried
# diffusers wheel, runs the given train_demo_base.py phases against a state folder kept on the machine
# between calls, and packs what the next call or session needs into $OUT as files of at most 15 MiB (logs, the
# VAE diagnosis and the step profile in one logs.tar; compile-cache.bin; the export as export.tar.part-NN).
#   bash scripts/demo_v2_gpu.sh vae MINUTES [--init-base DIR]   # train the VAE, diagnose it on held-out scenes
#   bash scripts/demo_v2_gpu.sh unet MINUTES PLAN [--compile] [--init-base DIR]
#   bash scripts/demo_v2_gpu.sh export                 # fp16 pipeline folder, tarred and split into $OUT
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src
STATE=${STATE:-/root/demo-v2-state}
# every GPU of the machine: one training process each under torchrun (the batch is split between them)
gpus=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
if [ "$gpus" -gt 1 ]; then TRAIN="python3 -m torch.distributed.run --standalone --nproc-per-node=$gpus"; else TRAIN=python3; fi
OUT=${OUT:-/tmp/out}
mkdir -p "$STATE" "$OUT"
phase=$1; shift
case $phase in
    vae)
        minutes=$1; shift
        $TRAIN scripts/train_demo_base.py --state "$STATE" --phase vae --minutes-vae "$minutes" "$@" 2>&1 | tee "$OUT/vae.log" | grep -E "step=|scaling|pool filled|Error|Traceback" | awk 'NR%5==0' | tail -10
        python3 scripts/diagnose_vae.py "$STATE" --scenes 64 --grid "$OUT/vae-v2.png" --json "$OUT/vae-v2.json" ;;
    unet)
        # torch's compile artefacts travel between machines: a carried $COMPILE_CACHE seeds the state's copy,
        # which comes back in $OUT (the cold compile of the training graph costs ~160 s on an H100 machine)
        minutes=$1; plan=$2; shift 2
        if [ -n "${COMPILE_CACHE:-}" ] && [ -f "$COMPILE_CACHE" ] && [ ! -f "$STATE/compile-cache.bin" ]; then
            cp "$COMPILE_CACHE" "$STATE/compile-cache.bin"
        fi
        $TRAIN scripts/train_demo_base.py --state "$STATE" --phase unet --minutes-unet "$minutes" --plan-unet-minutes "$plan" --compile-cache "$STATE/compile-cache.bin" --profile "$STATE/profile-unet.txt" "$@" 2>&1 | tee "$OUT/unet.log" | grep -E "step=|pool filled|Error|Traceback|compile" | awk 'NR%5==0' | tail -10
        if [ -f "$STATE/compile-cache.bin" ]; then cp "$STATE/compile-cache.bin" "$OUT/"; fi
        if [ -f "$STATE/profile-unet.txt" ]; then cp "$STATE/profile-unet.txt" "$OUT/"; fi ;;
    export)
        rm -rf /tmp/export && python3 scripts/train_demo_base.py --state "$STATE" --phase export --out /tmp/export 2>&1 | tail -3
        tar -C /tmp -cf /tmp/export.tar export && split -b 15M -d /tmp/export.tar "$OUT/export.tar.part-" ;;
esac
if [ -f "$STATE/calls.jsonl" ]; then cp "$STATE/calls.jsonl" "$OUT/"; fi  # every call's record, whatever the phase
# at most 8 files come back from a call: the small ones travel as one logs.tar (added to by each phase)
cd "$OUT"
small=$(ls -- *.log *.json *.jsonl *.txt 2>/dev/null || true)
if [ -n "$small" ]; then
    # shellcheck disable=SC2086
    if [ -f logs.tar ]; then tar -rf logs.tar $small; else tar -cf logs.tar $small; fi && rm -f $small
fi
cd - > /dev/null
ls -la "$OUT"
