#!/usr/bin/env python3
"""Write the example's synthetic slides and their ASAP XML annotations into OUT/slides
and OUT/xml: tumour and normal slides for training and validation, and two held-out test
slides (one with a tumour, one without)."""
import sys
from pathlib import Path

from crfcore import synthetic

SLIDES = {  # name: (tumours, seed)
    "tumor_001": (2, 1), "tumor_002": (2, 2), "normal_001": (0, 3),   # training
    "tumor_003": (2, 4), "normal_002": (0, 5),                        # validation
    "test_001": (1, 7), "test_002": (0, 8),                           # held out
}

if __name__ == "__main__":
    out = Path(sys.argv[1])
    for name, (tumours, seed) in SLIDES.items():
        folder = "test" if name.startswith("test") else "slides"
        path = out / folder / f"{name}.tif"
        if not path.exists():
            # mpp 1.0: the planted tumours (about 400 um) are macro-metastases by Camelyon16's
            # rules, not isolated tumour cells; noise plants small misleading spots
            synthetic.write_slide(path, 2048, 1536, tumours=tumours, seed=seed, tumour_radius=0.13,
                                  mpp=1.0, noise=0.1, xml=out / "xml" / f"{name}.xml")
        print(f"{path}: {tumours} planted tumour(s)")
