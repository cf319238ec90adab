"""Device placement (issue 10 §2): one helper decides the device and moves every batch, metric and collective.

No GPU runs here, so CUDA's availability is faked where a test needs it, and routing is checked by spying on the
one helper: every tensor that reaches a model (training, evaluation, calibration, the teacher) and every tensor a
collective receives must have come out of `place`, asked for the model's or the rank's device.
"""

import pytest
import torch
import torch.distributed as dist

import nmcli.data.teacher
import nmcli.quality.measures
import nmcli.oneshot.calibrate
import nmcli.train.distributed
import nmcli.train.engine
from nmcli.runtime.device import model_device, place, run_device
from nmcli.errors import NMSparseError
from nmcli.train.checkpointing import restore_rng, rng_states
from nmcli.train.distributed import DistEnv, all_equal, mean_over_ranks, sum_over_ranks
from tests.conftest import save_tiny_hf


@pytest.fixture
def two_gpus(monkeypatch):
    """CUDA reported available with two devices; the device made current is recorded."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    return current


def test_cpu_and_bad_devices():
    assert run_device("cpu") == torch.device("cpu")
    for bad, words in [("gpu7", "not a device"), ("mps", "cpu or cuda"), ("cuda", "no CUDA device")]:
        if bad == "cuda" and torch.cuda.is_available():
            continue
        with pytest.raises(NMSparseError, match=words):
            run_device(bad)


def test_each_torchrun_rank_takes_the_gpu_of_its_local_rank(two_gpus):
    assert run_device("cuda", local_rank=1, world=2) == torch.device("cuda", 1)
    assert run_device("cuda") == torch.device("cuda", 0)
    assert run_device("cuda:1") == torch.device("cuda", 1)
    assert two_gpus == [1, 0, 1]
    with pytest.raises(NMSparseError, match="share one GPU"):
        run_device("cuda:0", local_rank=1, world=2)
    with pytest.raises(NMSparseError, match="needs cuda:2 but 2 GPU"):
        run_device("cuda", local_rank=2, world=3)


def test_place_moves_every_tensor_of_a_nested_batch():
    batch = {"ids": torch.ones(2, 3), "pair": (torch.zeros(1), [torch.ones(1)]), "name": "x", "n": 3}
    moved = place(batch, torch.device("meta"))
    assert moved["ids"].is_meta and moved["pair"][0].is_meta and moved["pair"][1][0].is_meta
    assert isinstance(moved["pair"], tuple) and isinstance(moved["pair"][1], list)
    assert moved["name"] == "x" and moved["n"] == 3
    assert model_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")


class PlaceSpy:
    """Wraps `place`: remembers (tensor, device) of everything it returned."""

    def __init__(self, monkeypatch, *modules):
        self.placed: list[tuple[torch.Tensor, torch.device]] = []
        for module in modules:
            monkeypatch.setattr(module, "place", self)

    def __call__(self, batch, device):
        out = place(batch, device)
        stack = [out]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                self.placed.append((item, device))
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
        return out

    def device_of(self, tensor: torch.Tensor) -> torch.device | None:
        return next((device for placed, device in self.placed if placed is tensor), None)


def test_collectives_get_tensors_placed_on_the_ranks_device(monkeypatch):
    spy = PlaceSpy(monkeypatch, nmcli.train.distributed)
    rank_device = torch.device("cpu", 0)  # a device object distinct from the tensors' own `cpu`
    env = DistEnv(rank=0, world=2, device=rank_device)
    reduced = []

    def all_reduce(tensor):
        assert spy.device_of(tensor) == rank_device, "a collective got a tensor that was not placed"
        reduced.append(tensor)
        tensor.mul_(2)  # as if the other rank held the same values

    def all_gather(out, tensor):
        assert spy.device_of(tensor) == rank_device
        for slot in out:
            slot.copy_(tensor)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    assert torch.equal(sum_over_ranks(torch.tensor([1.0, 2.0]), env), torch.tensor([2.0, 4.0]))
    assert mean_over_ranks(3.0, env) == 3.0
    assert all_equal(torch.arange(3), env)
    assert len(reduced) == 2


def _inputs_of(model):
    """Every tensor the model's forward receives, positional or keyword."""
    seen = []
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.extend(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)),
        with_kwargs=True,
    )
    return seen


def _all_placed_on_model_device(spy, seen, model):
    assert seen, "the model was never called"
    return all(spy.device_of(t) == model_device(model) for t in seen)


def test_training_and_evaluation_batches_reach_the_model_through_place(cli, tmp_path, monkeypatch):
    """An HF distillation run: the student's training batches, its held-out evaluation and the teacher's views."""
    folder = save_tiny_hf(tmp_path / "bert", "bert", tokenizer=True)
    spy = PlaceSpy(monkeypatch, nmcli.train.engine, nmcli.quality.measures)
    models = []
    real_prepare = nmcli.train.engine._prepare

    def prepare(config, env):
        run = real_prepare(config, env)
        teacher = run.task.quality.parts[0].teacher
        models.extend([(run.model, _inputs_of(run.model)), (teacher, _inputs_of(teacher))])
        return run

    monkeypatch.setattr(nmcli.train.engine, "_prepare", prepare)
    r = cli("finetune", "--model", folder, "--recipe", "fixed-mask", "--pattern", "2:4", "--epochs", "1",
            "--batch-size", "4", "--seq-len", "32", "--limit", "8", "--out", tmp_path / "out", "--quiet")
    assert r.exit_code == 0, r.output
    for model, seen in models:
        assert _all_placed_on_model_device(spy, seen, model)


def test_calibration_and_teacher_generation_inputs_go_through_place(tmp_path, monkeypatch):
    from nmcli.data.teacher import teacher_samples
    from nmcli.data.tokens import load_tokenizer

    folder = save_tiny_hf(tmp_path / "llama", "llama", tokenizer=True)
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(folder)
    spy = PlaceSpy(monkeypatch, nmcli.oneshot.calibrate, nmcli.data.teacher)
    seen = _inputs_of(model)
    blocks = nmcli.oneshot.calibrate.find_blocks(model)[1]
    batch = {"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    nmcli.oneshot.calibrate.capture_inputs(model, blocks[0], [batch])
    assert _all_placed_on_model_device(spy, seen, model)
    prompts = []
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: prompts.append(kw["input_ids"]) or real_generate(**kw))
    teacher_samples(model, load_tokenizer(folder), "id", 2, 12, 0, ("Hello",), tmp_path / "cache")
    assert prompts and all(spy.device_of(ids) == model_device(model) for ids in prompts)


def test_checkpoints_keep_cuda_rng_when_cuda_is_in_use(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([7], dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    states = rng_states()
    assert states["cuda_rng"][0].tolist() == [7]
    restore_rng(states)
    assert restored == [states["cuda_rng"]]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert "cuda_rng" not in rng_states()


def test_prune_and_eval_take_device_and_refuse_it_where_it_means_nothing(cli, tmp_path, hf_bert_folder):
    """--device is where calibration and evaluation compute; a magnitude prune runs no model, so it is refused."""
    r = cli("prune", hf_bert_folder, "--device", "cuda", "--out", tmp_path / "a")
    assert r.exit_code == 2 and "magnitude pruning streams the file on the CPU" in r.output
    r = cli("prune", hf_bert_folder, "--method", "wanda", "--device", "mps", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "--device mps: nmsparse computes on cpu or cuda" in r.output
    r = cli("eval", hf_bert_folder, "--teacher", hf_bert_folder, "--device", "gpu7")
    assert r.exit_code == 2 and "not a device" in r.output
    if not torch.cuda.is_available():
        r = cli("eval", hf_bert_folder, "--teacher", hf_bert_folder, "--device", "cuda")
        assert r.exit_code == 2 and "no CUDA device is visible" in r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bf16_counts_as_native_only_with_hardware_for_it():
    """oneDNN's bf16 path needs AVX512 at least: an AVX2 CPU emulates bf16 products (bench/bf16_speed.py on one,
    2026-12-05: 16-92x slower than fp32), so it must not count as native."""
    from nmcli.runtime.device import bf16_is_native

    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        pytest.skip(f"this CPU ({capability}) may have a bf16 path")
    assert not bf16_is_native(torch.device("cpu")), capability
