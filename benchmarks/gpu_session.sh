#!/bin/bash
# Full-size checks and timings on a lent GPU box, in one go (a few minutes of device time).
#
#   bash benchmarks/gpu_session.sh OUTDIR
#
# Expects a CUDA jax/torch in `python3` and, in .whl/, the wheels it lacks (diffusers, our
# pinned flax/optax/orbax, grain, tfrecord, ml_collections...). Each part is time-boxed and
# writes its table to OUTDIR as soon as it ends, most important first.
set -u
OUT=${1:?output folder}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 JAX_DEFAULT_PRNG_IMPL=rbg
nvidia-smi -L | tee "$OUT/env.txt"
python3 -c "import jax, flax, torch, diffusers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__, jax.devices())" 2>&1 | tee -a "$OUT/env.txt"
part() {  # part NAME SECONDS command...
  local name=$1 seconds=$2; shift 2
  echo "=== $name (limit ${seconds}s)"
  local start=$SECONDS
  timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  echo "exit $? after $((SECONDS - start))s" >> "$OUT/$name.txt"
  grep -v -E "^(W|I)[0-9]{4}|^There are modules|Casting directly" "$OUT/$name.txt" | tail -40
}
part attention 40 python3 benchmarks/attention_kernels.py --dtype bfloat16 --repeats 20
# JAX and torch share the GPU in one process: no preallocation by XLA.
XLA_PYTHON_CLIENT_PREALLOCATE=false part saa_bf16 200 \
  python3 benchmarks/saa_step.py --dtype bfloat16 --torch_device cuda --repeats 30 --loop_steps 2,3,30
part train_bf16 170 python3 benchmarks/train_step.py --only sd15-1 --global_batch 8 --dtype bfloat16 --steps 10
XLA_PYTHON_CLIENT_PREALLOCATE=false part saa_f32 120 \
  python3 benchmarks/saa_step.py --dtype float32 --torch_device cuda --repeats 20 --skip-loop
# Whole-step cost of each sampler against DDIM (tiny model; diffusers stays on the CPU there, so
# read only the "vs DDIM" columns) and the sampler update alone at SD1.5's 512 px latent.
XLA_PYTHON_CLIENT_PREALLOCATE=false part schedulers 120 \
  python3 benchmarks/schedulers.py --steps 40 --repeats 5 --skip_lora
# SDXL's UNet at real shapes (random weights), ours against diffusers eager then torch.compile,
# one framework per child process; and the SDXL sampling loop's compile time.
part sdxl_unet 300 python3 benchmarks/sdxl_unet.py --torch_device cuda --repeats 10 --loop 1024:bfloat16
part sdxl_unet_compiled 200 python3 benchmarks/sdxl_unet.py --torch_device cuda --torch_compile --frameworks torch \
  --rows 1024:bfloat16 --repeats 10 --loop ""
