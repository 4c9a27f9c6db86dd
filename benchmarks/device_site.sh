#!/usr/bin/env bash
# Build .whl/devsite.tar.xz (not CI): the Python packages pancseg needs that the lent GPU machines'
# image lacks (nnU-Net v2 and its dependencies; the image has torch, numpy, scipy, pandas, rich, typer,
# matplotlib, scikit-image, ...: /work/.library/device/KINDS.md), for Python 3.12 there. Nothing can be
# downloaded on those machines, and a call carries at most 64 MiB, so the packages travel unpacked
# and xz-compressed (SimpleITK alone is a 53 MB wheel, 264 MB unpacked).
# Pure-Python packages are copied from the environment pancseg is installed in (their versions are
# then the tested ones), compiled ones are downloaded as cp312 wheels of the same versions.
# Usage: PYTHON=/path/to/venv/bin/python bash benchmarks/device_site.sh
# Then: run(carry=[".whl"], command="tar -xJf .whl/devsite.tar.xz -C /tmp &&
#       export PYTHONPATH=/tmp/devsite:$PWD && ... bash benchmarks/gpu_check.sh $OUT cuda")
set -euo pipefail
py=${PYTHON:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dest=$tmp/devsite
mkdir -p "$dest" "$repo/.whl"
grep -qx '/.whl/' "$repo/.git/info/exclude" 2>/dev/null || echo '/.whl/' >>"$repo/.git/info/exclude"

site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
version() { "$py" -c "from importlib.metadata import version; print(version('$1'))" 2>/dev/null; }
installed() { for name in "$@"; do [[ -n $(version "$name") ]] && echo "$name"; done; }

# numexpr: only where the installed blosc2 still needs it (blosc2 >= 4 does not); absent ones are left out
compiled=($(installed blosc2 connected-components-3d ndindex numexpr pydantic-core simpleitk))
pure=(acvl_utils annotated_types batchgenerators batchgeneratorsv2 dynamic_network_architectures graphviz nibabel
      nnunetv2 pydantic typing_inspection yacs)

platforms=()
for p in manylinux_2_{17,24,27,28,31,34,35}_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$tmp/wheels" $(for name in "${compiled[@]}"; do echo "$name==$(version "$name")"; done)
for wheel in "$tmp"/wheels/*.whl; do "$py" -m zipfile -e "$wheel" "$dest"; done

for name in "${pure[@]}"; do
    cp -r "$site/$name" "$site/$name-$(version "$name")".dist-info "$dest/"
done
cp "$site/typing_extensions.py" "$dest/"  # pydantic needs a recent one; the image's may be older
find "$dest" -name __pycache__ -prune -exec rm -rf {} +

tar -cJf "$repo/.whl/devsite.tar.xz" -C "$tmp" devsite
ls -l "$repo/.whl/devsite.tar.xz"
