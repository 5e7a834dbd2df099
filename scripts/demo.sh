#!/usr/bin/env bash
# The end-to-end demo behind `make demo` (README: "The demo"): simulate a small rubredoxin
# dataset, process it with the unchanged DIALS stills pipeline, validate against the truth,
# draw pictures, refine the Fe site's edge shift (SPREAD).  Usage: scripts/demo.sh [output_directory]   (default demo_output)
# Needs the dials.spread_* commands on PATH (make demo puts .venv/bin first).
set -euo pipefail
OUT=${1:-demo_output}
NIMAGES=${NIMAGES:-10}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"

# MPI with 2 ranks when mpirun works, else one process with 2 threads
MPI=()
if command -v mpirun >/dev/null 2>&1 && python3 -c "import mpi4py" 2>/dev/null \
   && mpirun --allow-run-as-root --oversubscribe -n 2 true >/dev/null 2>&1; then
  MPI=(mpirun --allow-run-as-root --oversubscribe -n 2)
fi
if [ ${#MPI[@]} -gt 0 ]; then SIM_MP=(mp.method=mpi); SP_MP=(mp.method=mpi); MODE="MPI, 2 ranks"
else SIM_MP=(mp.nproc=2); SP_MP=(mp.method=multiprocessing mp.nproc=2); MODE="serial (no usable mpirun)"; fi

step() {  # step "title" command...: print, run, time
  local title=$1; shift
  echo; echo "=== $title"; echo "+ $*"
  local t0=$SECONDS
  "$@"
  echo "--- $title: $((SECONDS - t0)) s" | tee -a "$SUMMARY.tmp"
}

T0=$SECONDS
: > "$SUMMARY.tmp"
echo "Demo in $OUT ($MODE)"

# 1. Simulate: rubredoxin (built-in model, one Fe) at the Fe K edge, SASE pulses of 40 channels,
#    random orientations, water background, Poisson noise, on the Jungfrau 16M (256 panels).
#    ncells_abc=30,30,30 spot_scale=100: 100 domains of 30^3 cells in the beam, the crystal the
#    demo's processing numbers were measured with (the preset derives 4000 A domains from the
#    seed's crystal: 94 x 92 x 74 cells, spots smaller than a pixel, ~24x the photons; see
#    docs/brightness.md).  A rerun with the same parameters resumes.
#    domain_set=quadrature: the same 20 domains, a quadrature of the mosaic distribution, on every
#    still (a crystal of very many domains; with 10 random domains per still each still's spots
#    differ by the luck of its draw, which no model can know: benchmarks/RESULTS.md).
step "1. simulate $NIMAGES stills (dials.spread_simulate)" \
  ${MPI[@]+"${MPI[@]}"} dials.spread_simulate rubredoxin.phil nimages="$NIMAGES" output.images_per_container=5 \
  crystal.ncells_abc=30,30,30 crystal.spot_scale=100 crystal.domain_set=quadrature crystal.mosaic_domains=20 \
  output.directory="$OUT/simulated" "${SIM_MP[@]}"

# 2. Process with the real dials.stills_process (spot finding, full stills indexer with the
#    known cell, refinement, integration with shoeboxes kept).
rm -rf "$OUT/processed"; mkdir -p "$OUT/processed"
step "2. index and integrate (dials.spread_stills_process)" \
  bash -c 'cd "$1" && shift && "$@" > stills_process.out 2>&1' _ "$OUT/processed" \
  ${MPI[@]+"${MPI[@]}"} dials.spread_stills_process "$OUT"/simulated/images_0*.h5 rubredoxin_stills_process.phil \
  "${SP_MP[@]}"
echo "integrated: $(ls "$OUT"/processed/idx-*_integrated.refl 2>/dev/null | wc -l) of $NIMAGES stills" \
  "(log: $OUT/processed/stills_process.out)"

# 3. Validate against the truth: indexing rate, misorientation, cell, reflections on true spots.
step "3. validate against the truth (dials.spread_validate)" \
  dials.spread_validate truth="$OUT/simulated/images.expt" processed="$OUT/processed" output.directory="$OUT"

# 4. Pictures: the still, its spots and shoeboxes, single shoeboxes, spectra, f'/f''.
STILL=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['stills']; print(next((i for i,s in enumerate(r) if s['indexed']), 0))" "$OUT/validation.json")
step "4. pictures of still $STILL (dials.spread_pictures)" \
  dials.spread_pictures truth="$OUT/simulated/images.expt" processed="$OUT/processed" still="$STILL" \
  output.directory="$OUT/pictures"

# 5. SPREAD: refine the Fe site's edge shift against the packaged Fe(II) curve from the shoebox
#    pixels, with its uncertainty and the oxidation-state call; the truth is only for the report.
#    Sized for 2 CPU cores: 10 model domains, shoeboxes cut to 11 x 11 px, one relinearisation
#    of the orientation per macrocycle, 8 macrocycles (refine_rubredoxin.phil has the defaults).
step "5. refine the Fe edge shift (dials.spread_refine)" \
  ${MPI[@]+"${MPI[@]}"} dials.spread_refine "$OUT"/processed/idx-*_integrated.expt "$OUT"/processed/idx-*_integrated.refl \
  refine_rubredoxin.phil crystal.mosaic_domains=10 refinement.max_shoebox_px=11 refinement.relinearisations=1 \
  refinement.macrocycles=8 truth="$OUT/simulated/images_run.json" output.directory="$OUT/refined" "${SIM_MP[@]}"

{
  echo "spread_dials demo ($MODE), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  sed -n '/^Summary:/,/^Wrote/p' "$OUT/dials.spread_validate.log" | sed '$d'
  echo
  sed -n '/^Summary (edge shifts/,/^$/p' "$OUT/refined/dials.spread_refine.log"
  echo
  cat "$SUMMARY.tmp"
  echo "total: $((SECONDS - T0)) s"
  echo
  echo "Files: $OUT/simulated (images_*.h5, truth images.expt/.refl, images_run.json),"
  echo "       $OUT/processed (idx-*_integrated.expt/.refl ...), $OUT/validation.json, $OUT/validation_*.png,"
  echo "       $OUT/pictures/*.png, $OUT/refined (spread_refine_sites.json/.csv, spread_refine.h5/.expt/.refl, *.png)"
  echo "Look at the images: dials.image_viewer $OUT/simulated/images_00000.h5"
} > "$SUMMARY"
rm -f "$SUMMARY.tmp"
echo; cat "$SUMMARY"
