#!/usr/bin/env bash
# Several data sets of benchmarks/correct.py at once on one GPU: one process per seed, each
# stopped at TIMEOUT_S seconds, its records in OUT/correct_<case>_<TAG>_s<SEED>.jsonl and its
# log in /tmp/correct_seeds/ (the tails printed at the end: the device tool returns few files).
#
#   bash benchmarks/correct_seeds.sh TIMEOUT_S OUT TAG "ARGS" SEED...
#   bash benchmarks/correct_seeds.sh 560 $OUT psf "--n 20 --errors psf1.5 --epochs 12" 105 106 107 108
#
# On the GPU machines (no zuko there): carry bench_data and a pure-Python copy of zuko in a
# folder named by PYLIB (default .device/pylib), e.g. cp -r .venv/lib/python3*/site-packages/zuko .device/pylib/.
set -uo pipefail
if [ $# -lt 5 ]; then echo "Sorry: usage: $0 TIMEOUT_S OUT TAG \"ARGS\" SEED..." >&2; exit 2; fi
timeout_s=$1 out=$2 tag=$3 args=$4
shift 4
logs=/tmp/correct_seeds
mkdir -p "$out" "$logs"
export PYTHONPATH="$PWD:$PWD/${PYLIB:-.device/pylib}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python=${PYTHON:-python3}
for seed in "$@"; do
  # shellcheck disable=SC2086  # ARGS is a list of options
  timeout "$timeout_s" "$python" benchmarks/correct.py --out "$out" --tag "_${tag}_s$seed" --seed "$seed" $args \
    > "$logs/${tag}_s$seed.txt" 2>&1 &
done
wait
for seed in "$@"; do
  echo "== ${tag} seed $seed"
  grep -v -i -e warning -e index_reduce "$logs/${tag}_s$seed.txt" | tail -n 4
done
