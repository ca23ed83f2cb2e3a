#!/usr/bin/env bash
# Portability job: the tests that compare two runs (marker `rounding`), again under MKL's reproducible modes, and
# the pipeline tests with 2 torch threads instead of 1. The suite passes with the machine's defaults; a test that
# fails only here compared two code paths, instances or batch shapes bit for bit (README, "Tests that hold on any
# CPU"). MKL_CBWR is set for these runs only, never for the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
for mode in AVX2,STRICT COMPATIBLE; do
  echo "== MKL_CBWR=$mode"
  MKL_CBWR=$mode $PY -m pytest -q -n 2 -m "rounding and not slow" -p no:cacheprovider
done
echo "== GOCA_TEST_THREADS=2 (one process: 2 threads each on 2 cores would oversubscribe)"
GOCA_TEST_THREADS=2 $PY -m pytest -q -m "rounding and not slow" -p no:cacheprovider \
  tests/test_pipeline.py tests/test_pipeline_sdxl.py tests/test_pipeline_pixart.py tests/test_segment_goca_pixart.py
GOCA_TEST_THREADS=2 $PY -m pytest -q -m "rounding and not slow" -p no:cacheprovider tests/test_pipeline_mmdit.py \
  -k "off_is_stock or partner or in_forward"
