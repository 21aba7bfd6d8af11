#!/usr/bin/env bash
# Controllability of the demo adapters on N held-out scenes, split over P processes sharing one GPU.
#   scripts/eval_parallel.sh 200 8 OUTDIR     (the table in README.md / docs/demo-model.md)
set -euo pipefail
n=${1:-200}; p=${2:-8}; out=${3:-eval-out}
mkdir -p "$out"
per=$(( (n + p - 1) / p ))
pids=(); parts=()
for i in $(seq 0 $((p - 1))); do
  first=$((10000000 + i * per)); count=$(( n - i * per < per ? n - i * per : per ))
  [ "$count" -gt 0 ] || continue
  python3 -m t2iadapter.cli eval --scenes "$count" --first-seed "$first" --json "$out/part$i.json" > "$out/part$i.log" 2>&1 &
  pids+=($!); parts+=("$out/part$i.json")
done
failed=0
for k in "${!pids[@]}"; do  # each worker's own status: a bare `wait` is 0 whatever they returned
  if ! wait "${pids[$k]}"; then
    failed=1; echo "eval worker $k failed: $(tail -n 1 "${parts[$k]%.json}.log")" >&2
  fi
done
[ "$failed" = 0 ] || { echo "no table: a worker failed (an earlier run's parts in $out are not merged)" >&2; exit 1; }
python3 - "$out" "${parts[@]}" <<'PY'
import json, sys
from pathlib import Path
from t2iadapter.evaluation.controllability import format_table, merge_summaries
out = Path(sys.argv[1])
parts = [json.loads(Path(p).read_text()) for p in sys.argv[2:]]  # this run's parts only
merged = merge_summaries(parts)
(out / "eval.json").write_text(json.dumps(merged, indent=2))
table = format_table(merged)
(out / "eval.md").write_text(table + "\n")
print(f"{merged[0]['scenes']} held-out scenes")
print(table)
PY
