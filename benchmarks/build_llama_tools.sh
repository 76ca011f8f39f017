#!/bin/bash
# Build llama.cpp's own llama-bench and llama-batched-bench from the SAME sources llama-cpp-python
# vendors (.gpu/llama-src-<version>.tgz, the version installed here: identical kernels), for the
# side-by-side comparisons of issue 7 (benchmarks/compare_llama.py, benchmarks/compare_batched.py).
#
#   bash benchmarks/build_llama_tools.sh [--cuda] [--jobs N] [--src TGZ] [DEST]
#
# CPU build by default (OpenMP, and $CMAKE_ARGS as pip passes them to the Python package's build,
# e.g. CMAKE_ARGS=-DGGML_NATIVE=OFF as README's install uses: the same kernels either side);
# --cuda builds for sm_90 (H200). DEST defaults to .llama-tools/ (CPU) or .llama-tools-cuda/ (--cuda),
# ignored through .git/info/exclude. Static libraries, so DEST/bin/llama-bench and
# DEST/bin/llama-batched-bench run standalone. Idempotent: does nothing when both binaries exist
# (delete DEST to rebuild). Prints the two binary paths last.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA=0 JOBS="" SRC="" DEST=""
while [ $# -gt 0 ]; do case $1 in
  --cuda) CUDA=1 ;;
  --jobs|-j) JOBS=$2; shift ;;
  --src) SRC=$2; shift ;;
  -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
  -*) echo "unknown option $1" >&2; exit 2 ;;
  *) DEST=$1 ;;
esac; shift; done
V=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
SRC=${SRC:-.gpu/llama-src-$V.tgz}
if [ -z "$DEST" ]; then if [ $CUDA = 1 ]; then DEST=.llama-tools-cuda; else DEST=.llama-tools; fi; fi
JOBS=${JOBS:-$(nproc)}
BIN=$DEST/bin
if [ -x "$BIN/llama-bench" ] && [ -x "$BIN/llama-batched-bench" ]; then
  echo "already built:"; echo "$BIN/llama-bench"; echo "$BIN/llama-batched-bench"; exit 0
fi
[ -f "$SRC" ] || { echo "no llama.cpp source tarball at $SRC" >&2; exit 1; }
if [ -d .git ] && ! grep -qx '/.llama-tools*/' .git/info/exclude 2>/dev/null; then
  echo '/.llama-tools*/' >> .git/info/exclude
fi
mkdir -p "$DEST"
S=$DEST/src B=$DEST/build
rm -rf "$S"; mkdir -p "$S"
tar xzf "$SRC" -C "$S" --strip-components=1
LL=$S/vendor/llama.cpp
[ -f "$LL/tools/llama-bench/llama-bench.cpp" ] || { echo "no tools/llama-bench in $SRC" >&2; exit 1; }
FLAGS=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON
       -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF)
if [ $CUDA = 1 ]; then FLAGS+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90); fi
read -r -a EXTRA <<< "${CMAKE_ARGS:-}"
FLAGS+=("${EXTRA[@]}")
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
echo "configuring llama.cpp ($SRC, cuda=$CUDA) in $B"
cmake -S "$LL" -B "$B" "${GEN[@]}" "${FLAGS[@]}"
echo "building with -j$JOBS"
cmake --build "$B" -j"$JOBS" --target llama-bench llama-batched-bench
mkdir -p "$BIN"
for t in llama-bench llama-batched-bench; do
  f=$(find "$B" -type f -name "$t" -perm -u+x | head -1)
  [ -n "$f" ] || { echo "build produced no $t" >&2; exit 1; }
  cp "$f" "$BIN/$t"
done
"$BIN/llama-bench" --help > /dev/null 2>&1 || { echo "$BIN/llama-bench does not run" >&2; exit 1; }
echo "built:"; echo "$BIN/llama-bench"; echo "$BIN/llama-batched-bench"
