#!/usr/bin/env bash
# Remakes the README's pictures (docs/images/) from a real run: `make demo`'s commands,
# then `vitray explain` on a few images and a screenshot of the scoring report.
# Needs the project's .venv (make setup) and a headless Chromium for the screenshot
# (Debian: apt-get install chromium). Takes about as long as `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-figures-run}
IMAGES=docs/images
VITRAY=.venv/bin/vitray
CHROMIUM=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$CHROMIUM" ]; then
    echo "docs/make_figures.sh: needs a headless Chromium for the report's screenshot (apt-get install chromium)" >&2
    exit 2
fi

make setup
rm -rf "$OUT"
make demo DEMO="$OUT"
"$VITRAY" synth "$OUT/few" --n 20 --seed 3 --format imagefolder
"$VITRAY" explain --model "$OUT/run/model" --out "$OUT/explain" "$OUT"/few/Xplus/*.png

mkdir -p "$IMAGES"
cp "$OUT/run/curves.png" "$IMAGES/curves.png"
cp "$OUT/eval/confusion_matrix.png" "$IMAGES/confusion_matrix.png"
first=$(ls "$OUT"/explain/*.png | grep -v '_input.png$' | head -1)
cp "$first" "$IMAGES/overlay.png"
"$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,1500 \
    --screenshot="$PWD/$IMAGES/report.png" "file://$PWD/$OUT/scores/report.html" 2>/dev/null
echo "pictures in $IMAGES/ (from the run in $OUT/)"
