#!/usr/bin/env bash
# Create .venv in the repository and install crfcore (editable) with its dev extras.
# Idempotent: when .venv exists and pyproject.toml has not changed since the last
# successful install, it only says so and exits.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
stamp="$venv/.crfcore-installed"
want="$(sha256sum pyproject.toml Install/install.sh package.json 2>/dev/null | sha256sum | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    touch "$stamp"
    echo "install: .venv is up to date (pyproject.toml unchanged), nothing to do"
    exit 0
fi

python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "install: creating virtual environment $venv with $($python --version)"
    "$python" -m venv "$venv"
fi
echo "install: upgrading pip"
"$venv/bin/python" -m pip install --quiet --upgrade pip
echo "install: installing crfcore (editable) with dev and viewer extras; first run downloads torch (several GB)"
"$venv/bin/python" -m pip install --quiet -e ".[dev,viewer]"

# histolab 0.7.0 pins numpy<=1.24, scikit-image<0.19.4 and scipy<1.10.1, which cannot be
# installed alongside today's stack, yet it works with current versions. It is only an
# optional alternative tissue detector (Mask_gen.py --method histolab), so install it
# without its pins; the core pipeline never needs it.
echo "install: installing optional histolab 0.7.0 with --no-deps (its pins conflict; see comment)"
"$venv/bin/python" -m pip install --quiet --no-deps "histolab==0.7.0" \
    || echo "install: histolab not installed (optional; --method histolab unavailable)"

# The viewer's OpenSeadragon comes from npm, pinned in package.json; optional.
if [ -f package.json ]; then
    if command -v npm >/dev/null 2>&1; then
        echo "install: fetching OpenSeadragon for the viewer with npm"
        npm install --silent --no-audit --no-fund || echo "install: npm install failed (viewer only)"
    else
        echo "install: npm not found; the viewer needs OpenSeadragon (see Install/README.md)"
    fi
fi

echo "$want" > "$stamp"
echo "install: done. Activate with: source .venv/bin/activate"
