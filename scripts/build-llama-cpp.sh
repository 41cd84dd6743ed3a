#!/usr/bin/env bash
# Build llama.cpp's own C++ tools (llama-server, llama-quantize) once per machine, from the
# llama.cpp source that llama-cpp-python vendors in its source distribution (PyPI is reachable, GitHub
# is not). The build is cached outside the checkout, keyed by the source version and this CPU's flags
# (a -march=native binary dies with SIGILL on another CPU), so fresh clones and CI reuse it.
# Prints the bin directory on its last line. Nothing is downloaded at build time: no prebuilt web UI,
# no curl/openssl.
set -euo pipefail
VERSION="${LLAMA_CPP_PY_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python3}"
CACHE_ROOT="${IDP_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/idp_pipelines}"
cpu_key=$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | sha256sum | cut -c1-12)
PREFIX="$CACHE_ROOT/llama.cpp-$VERSION-$(uname -m)-$cpu_key"
TARGETS=(llama-server llama-quantize)
# --dir: print where the tools are (or will be) without building (idp_pipelines/llama_tools.py agrees).
if [ "${1:-}" = "--dir" ]; then echo "$PREFIX/bin"; exit 0; fi

if [ -x "$PREFIX/bin/llama-server" ] && [ -x "$PREFIX/bin/llama-quantize" ]; then
  echo "$PREFIX/bin"; exit 0
fi
for tool in cmake g++ make; do
  command -v "$tool" >/dev/null || { echo "build-llama-cpp: '$tool' is missing (make system-deps installs it)" >&2; exit 1; }
done
mkdir -p "$CACHE_ROOT"
# One build at a time per cache (two clones running make test at once wait for each other).
exec 9>"$CACHE_ROOT/.llama.cpp.lock"
flock 9
if [ -x "$PREFIX/bin/llama-server" ] && [ -x "$PREFIX/bin/llama-quantize" ]; then
  echo "$PREFIX/bin"; exit 0
fi
work=$(mktemp -d "$CACHE_ROOT/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "building llama.cpp (llama-server, llama-quantize) from llama-cpp-python $VERSION's source into $PREFIX;" >&2
echo "this happens once per machine and takes about 10 min on 2 cores (up to 20 when they are busy)" >&2
start=$(date +%s)
"$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF >"$work/cmake.log" 2>&1 \
  || { tail -30 "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" -j "$(nproc)" --target "${TARGETS[@]}" >"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log" >&2; exit 1; }
staging="$PREFIX.partial"
rm -rf "$staging"; mkdir -p "$staging/bin"
for t in "${TARGETS[@]}"; do cp "$work/build/bin/$t" "$staging/bin/"; done
cp "$src/LICENSE" "$staging/LICENSE.llama.cpp"
"$staging/bin/llama-server" --version >"$staging/VERSION" 2>&1 || true
rm -rf "$PREFIX"; mv "$staging" "$PREFIX"
echo "llama.cpp built in $(( $(date +%s) - start )) s" >&2
echo "$PREFIX/bin"
