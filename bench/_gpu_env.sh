# Sourced by bench/gpu_*.sh on the device machine (repo root): the GPU image has torch, triton and
# transformers but not pytest, and an older grpcio. Wheels carried in $WHEELS (default .whl/kv; the
# older .kwhl still works) go into /tmp/site, first on PYTHONPATH. NVLink multicast stays off.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WHEELS=${WHEELS:-$( [ -d .whl/kv ] && echo .whl/kv || echo .kwhl )}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || { echo "installing the wheels in $WHEELS failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
