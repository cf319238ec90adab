"""`finetune --gradient-checkpointing`: blocks recompute their activations in the backward pass. The gradients are
those of the plain run, far fewer bytes are kept for backward, and runs end with the same model."""

import json

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from nmcli.errors import NMSparseError
from nmcli.methods.plan import StepPlan
from nmcli.methods.sparsifier import Sparsifier
from nmcli.models.targets import LayerInfo
from nmcli.nm import LINEAR, NMPattern
from nmcli.methods.recipes import LoraSpec
from nmcli.methods.schedules import Phase
from nmcli.train.recompute import recompute_activations
from tests.conftest import save_tiny_hf

FIXED = StepPlan(Phase.FINETUNE, (NMPattern(2, 4),), 0, backward="scaled", freeze=True)


def _saved_bytes_and_grads(model, loss_of):
    """Bytes the forward pass keeps for backward (outside checkpointed regions, whose own saving is replaced by
    recomputation) and every trainable parameter's gradient."""
    kept = []

    def pack(tensor):
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model)
    loss.backward()
    return sum(kept), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _sparse_llama(folder, lora):
    torch.manual_seed(0)  # the same adapter initialisation each time
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()  # eval: how the student learns
    targets = {f"{n}.weight": LayerInfo(f"{n}.weight", n, LINEAR) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.startswith("model.layers")}
    sparsifier = Sparsifier(model, targets).attach(lora)
    sparsifier.set_plan(FIXED)
    return model


@pytest.mark.parametrize("lora", [None, LoraSpec(rank=2, alpha=4.0)], ids=["full", "lora"])
def test_checkpointed_blocks_give_the_same_gradients_and_keep_far_less(tmp_path, lora):
    folder = save_tiny_hf(tmp_path / "llama", "llama", initializer_range=0.3)
    ids = torch.randint(0, 128, (2, 48))

    def loss_of(model):
        return model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean()

    plain = _saved_bytes_and_grads(_sparse_llama(folder, lora), loss_of)
    model = _sparse_llama(folder, lora)
    recompute_activations(model, "tiny llama")
    recomputed = _saved_bytes_and_grads(model, loss_of)
    assert plain[1].keys() == recomputed[1].keys() and plain[1]
    for name, grad in plain[1].items():
        assert torch.allclose(grad, recomputed[1][name], atol=1e-5, rtol=1e-4), name
    assert recomputed[0] < 0.5 * plain[0], (recomputed[0], plain[0])  # 2 blocks' MLP and attention activations


def test_timm_models_use_their_own_checkpointing_and_a_model_without_blocks_is_refused():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3)
    images = torch.randn(2, 3, 32, 32)
    plain = _saved_bytes_and_grads(vit, lambda m: m(images).sum())
    vit.zero_grad()
    recompute_activations(vit, "vit_tiny_patch16_224")
    recomputed = _saved_bytes_and_grads(vit, lambda m: m(images).sum())
    assert recomputed[0] < 0.7 * plain[0]
    assert all(torch.allclose(g, recomputed[1][n], atol=1e-5) for n, g in plain[1].items())
    with pytest.raises(NMSparseError, match=r"--gradient-checkpointing: mlp names no transformer blocks"):
        recompute_activations(nn.Sequential(nn.Linear(4, 4)), "mlp")


@pytest.mark.parametrize("recipe", ["fixed-mask", "lora"])
def test_finetune_with_gradient_checkpointing_ends_with_the_same_model(cli, tmp_path, tiny_llama, recipe):
    common = ("finetune", "--model", tiny_llama, "--recipe", recipe, "--pattern", "2:4", "--batch-size", "4",
              "--seq-len", "32", "--limit", "8", "--lr", "3e-3", "--data", "python-help", "--epochs", "1", "--json")
    plain = cli(*common, "--out", tmp_path / "plain")
    recomputed = cli(*common, "--out", tmp_path / "recomputed", "--gradient-checkpointing")
    assert plain.exit_code == 0 and recomputed.exit_code == 0, recomputed.output
    assert json.loads(recomputed.stdout)["all_layers_compliant"]
    a, b = load_file(str(tmp_path / "plain/model.safetensors")), load_file(str(tmp_path / "recomputed/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    changed = load_file(str(tiny_llama / "model.safetensors"))
    assert any(not torch.equal(changed[k], a[k]) for k in a if k in changed)  # the run trained something
