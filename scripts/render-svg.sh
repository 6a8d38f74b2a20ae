#!/bin/sh
# Renders an SVG (e.g. from `mpshard inspect ... --svg chart.svg`) to a PNG with headless Chromium,
# at the size the SVG declares, to check that a browser draws the chart.
#   usage: scripts/render-svg.sh chart.svg [out.png]
# Needs Debian's chromium (apt-get install -y chromium). --no-sandbox is needed when run as root;
# the remaining flags keep Chromium off the network and out of the user's profile.
set -eu
svg=${1:?usage: render-svg.sh FILE.svg [OUT.png]}
png=${2:-${svg%.svg}.png}
[ -r "$svg" ] || { echo "render-svg.sh: $svg: cannot read" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "render-svg.sh: chromium not found (apt-get install -y chromium)" >&2; exit 2; }
# the window size: the width and height attributes of the <svg> element
width=$(grep -o '<svg[^>]*' "$svg" | head -1 | sed -n 's/.* width="\([0-9.]*\)".*/\1/p' | cut -d. -f1)
height=$(grep -o '<svg[^>]*' "$svg" | head -1 | sed -n 's/.* height="\([0-9.]*\)".*/\1/p' | cut -d. -f1)
: "${width:=1200}" "${height:=600}"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
case $svg in /*) url="file://$svg" ;; *) url="file://$(pwd)/$svg" ;; esac
case $png in /*) out=$png ;; *) out=$(pwd)/$png ;; esac
"$browser" --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --window-size="$width,$height" --screenshot="$out" "$url" >/dev/null 2>&1
[ -s "$out" ] || { echo "render-svg.sh: chromium wrote no $out" >&2; exit 1; }
echo "$out (${width}x${height})"
