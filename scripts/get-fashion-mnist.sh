#!/usr/bin/env bash
# Make sure Fashion-MNIST's IDX files are on this machine (Debian package dataset-fashion-mnist).
# kdistill also downloads them itself when online; this is the offline route.
set -u
dir="${1:-/usr/share/datasets/fashion-mnist}"
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
echo "Fashion-MNIST not found in $dir: installing the Debian package dataset-fashion-mnist" >&2
sudo=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo="sudo"
if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
  $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null && exit 0
fi
echo "Could not install dataset-fashion-mnist (needs apt-get and root). Either install it by hand," >&2
echo "or let kdistill download Fashion-MNIST (needs internet), or put the four IDX files in" >&2
echo "data/fashion_mnist/ and set data.root=data. Tests that need it will be skipped." >&2
exit 0
