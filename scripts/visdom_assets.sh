#!/usr/bin/env bash
# Fill visdom's static/ folder with the JS/CSS/fonts that visdom/server/build.py
# would download from CDNs at first start, taken instead from npm packages pinned
# to the same versions. Afterwards static/version.built matches the installed
# visdom version and every file build.py checks exists, so the server never
# tries to download anything.
#
# Usage: scripts/visdom_assets.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail

PY=${1:-.venv/bin/python}
{ read -r STATIC; read -r VERSION; } < <("$PY" -c 'import os, visdom
print(os.path.join(os.path.dirname(visdom.__file__), "static")); print(visdom.__version__)')
[ -d "$STATIC" ] || { echo "visdom assets: no static dir found via $PY" >&2; exit 1; }
MATHJAX=js/mathjax/2.7.5   # build.py: static/js/ + last parts of the cdnjs URL

# target under static/ | npm package@version | file inside the package
ASSETS="
js/jquery.min.js                 jquery@3.1.1              dist/jquery.min.js
js/bootstrap.min.js              bootstrap@3.3.7           dist/js/bootstrap.min.js
js/react-react.min.js            react@16.2.0              umd/react.production.min.js
js/react-dom.min.js              react-dom@16.2.0          umd/react-dom.production.min.js
js/react-modal.min.js            react-modal@3.1.10        dist/react-modal.min.js
js/plotly-plotly.min.js          plotly.js-dist-min@2.11.1 plotly.min.js
js/sjcl.js                       sjcl@1.0.7                sjcl.js
js/layout-bin-packer.js.map      layout-bin-packer@1.4.0   dist/layout-bin-packer.js.map
js/layout_bin_packer.js          layout-bin-packer@1.4.0   dist/layout-bin-packer.js
js/d3.v3.min.js                  d3@3.5.17                 d3.min.js
js/d3-selection-multi.v1.js      d3-selection-multi@1.0.1  build/d3-selection-multi.js
js/saveSvgAsPng.js               save-svg-as-png@1.4.17    lib/saveSvgAsPng.js
css/react-resizable-styles.css   react-resizable@1.4.6     css/styles.css
css/react-grid-layout-styles.css react-grid-layout@0.16.3  css/styles.css
css/bootstrap.min.css            bootstrap@3.3.7           dist/css/bootstrap.min.css
fonts/classnames                 classnames@2.2.5          index.js
fonts/glyphicons-halflings-regular.eot   bootstrap@3.3.7   dist/fonts/glyphicons-halflings-regular.eot
fonts/glyphicons-halflings-regular.woff2 bootstrap@3.3.7   dist/fonts/glyphicons-halflings-regular.woff2
fonts/glyphicons-halflings-regular.woff  bootstrap@3.3.7   dist/fonts/glyphicons-halflings-regular.woff
fonts/glyphicons-halflings-regular.ttf   bootstrap@3.3.7   dist/fonts/glyphicons-halflings-regular.ttf
fonts/glyphicons-halflings-regular.svg   bootstrap@3.3.7   dist/fonts/glyphicons-halflings-regular.svg
fonts/glyphicons-halflings-regular.svg#glyphicons_halflingsregular bootstrap@3.3.7 dist/fonts/glyphicons-halflings-regular.svg
"
# MathJax files build.py checks; the rest of the runtime tree is copied too so
# MathJax's lazy loads are served locally as well.
MATHJAX_FILES="MathJax.js config/Safe.js config/TeX-AMS-MML_HTMLorMML.js extensions/Safe.js
jax/output/SVG/fonts/TeX/fontdata.js jax/output/SVG/jax.js
jax/output/SVG/fonts/TeX/Size1/Regular/Main.js jax/output/SVG/config.js"
MATHJAX_DIRS="MathJax.js config extensions jax localization fonts/HTML-CSS/TeX"

missing() {  # print every expected file that is absent or empty
    local dest _
    while read -r dest _; do
        [ -n "$dest" ] && [ ! -s "$STATIC/$dest" ] && echo "$STATIC/$dest"
    done <<< "$ASSETS"
    for f in $MATHJAX_FILES; do [ -s "$STATIC/$MATHJAX/$f" ] || echo "$STATIC/$MATHJAX/$f"; done
    [ "$(cat "$STATIC/version.built" 2>/dev/null)" = "$VERSION" ] || echo "$STATIC/version.built"
}

if [ -z "$(missing)" ]; then
    echo "visdom $VERSION assets already complete in $STATIC"
    exit 0
fi

command -v npm > /dev/null || { echo "visdom assets: npm is required (apt-get install npm)" >&2; exit 1; }
start=$SECONDS
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

fetch() {  # fetch NAME@VERSION -> prints the unpacked package dir
    local dir="$TMP/${1//\//_}"
    if [ ! -d "$dir" ]; then
        mkdir -p "$dir"
        (cd "$dir" && npm pack "$1" --silent > pack.txt)
        tar --warning=no-unknown-keyword --no-same-owner -xzf "$dir/$(tail -n1 "$dir/pack.txt")" -C "$dir"
    fi
    echo "$dir/package"
}

mkdir -p "$STATIC/js" "$STATIC/css" "$STATIC/fonts"
while read -r dest pkg src; do
    [ -n "$dest" ] || continue
    pkgdir=$(fetch "$pkg")
    cp "$pkgdir/$src" "$STATIC/$dest"
done <<< "$ASSETS"

pkgdir=$(fetch mathjax@2.7.5)
mkdir -p "$STATIC/$MATHJAX"
for d in $MATHJAX_DIRS; do
    mkdir -p "$(dirname "$STATIC/$MATHJAX/$d")"
    cp -r "$pkgdir/$d" "$(dirname "$STATIC/$MATHJAX/$d")/"
done

echo "$VERSION" > "$STATIC/version.built"

gone=$(missing)
if [ -n "$gone" ]; then
    echo "visdom assets: missing files:" >&2
    echo "$gone" >&2
    exit 1
fi
echo "visdom $VERSION assets installed in $STATIC ($(du -sh "$STATIC" | cut -f1), $((SECONDS - start)) s)"
