import os

import pytest
import torch
from safetensors.torch import save_file

from nmcli.errors import NMSparseError
from nmcli.io.opener import open_path
from nmcli.io.sources import load_state_dict_file, open_folder


def test_safetensors_header_is_read_without_data(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x.weight": torch.zeros(4, 8, dtype=torch.bfloat16), "b": torch.ones(3)}, str(path), {"k": "v"})
    ckpt = open_path(path)
    assert ckpt.infos["x.weight"].shape == (4, 8) and ckpt.infos["x.weight"].dtype == torch.bfloat16
    assert ckpt.metadata == {"k": "v"}
    assert torch.equal(ckpt.read("b"), torch.ones(3))


def test_streaming_writer_replaces_a_longer_file_and_fills_an_empty_one(tmp_path):
    """It opens without O_TRUNC (so that ext4 does not flush on close), yet a longer old file is cut to the new data."""
    from safetensors.torch import load_file

    from nmcli.io.safetensors_stream import encode_header, write_streaming

    path = tmp_path / "x.safetensors"
    write_streaming(path, [("old", (1000,), torch.float32)], [torch.ones(1000)])
    write_streaming(path, [("new", (3,), torch.float32)], [torch.arange(3.0)])
    assert path.stat().st_size == len(encode_header([("new", (3,), torch.float32)])) + 12
    assert torch.equal(load_file(str(path))["new"], torch.arange(3.0))
    empty = tmp_path / "empty.safetensors"
    empty.touch()  # what atomic_output hands over
    write_streaming(empty, [("a", (2,), torch.float16)], [torch.ones(2).half()])
    assert torch.equal(load_file(str(empty))["a"], torch.ones(2).half())


def test_streaming_writer_copies_source_bytes_from_the_file(tmp_path, monkeypatch):
    """SourceBytes: a source tensor's bytes copied from the file in chunks that end anywhere (not on element
    boundaries), or changed whole rows at a time (`unit` rows at least, even where one row is larger than a
    chunk), next to tensors from memory, under a header of another length; the real reader reads the result."""
    from safetensors.torch import load_file

    import nmcli.io.safetensors_stream as stream

    monkeypatch.setattr(stream, "CHUNK_BYTES", 1000)
    g = torch.Generator().manual_seed(0)
    source = {"a": torch.randn(3, 700, generator=g), "b": torch.randn(1234, generator=g), "c": torch.randn(5),
              "m": torch.randn(6, 50, generator=g)}
    src = tmp_path / "src.safetensors"
    save_file(source, str(src))
    ckpt = open_path(src)

    def bytes_of(name, change=None):
        path, offset = ckpt.stored_at(name)
        return stream.SourceBytes(path, offset, ckpt.infos[name].nbytes, change)

    seen = {"a": [], "m": []}

    def doubled(name):
        def apply(rows, which):
            seen[name].append((which.start, which.stop, tuple(rows.shape)))
            rows.mul_(2)
        return stream.RowChange(apply, unit=2)

    layout = [("b", (1234,), torch.float32), ("new", (2,), torch.float16), ("a", (3, 700), torch.float32),
              ("m", (6, 50), torch.float32)]
    out = tmp_path / "out.safetensors"
    tensors = [bytes_of("b"), torch.ones(2).half(), bytes_of("a", doubled("a")), bytes_of("m", doubled("m"))]
    stream.write_streaming(out, layout, tensors, {"longer": "x" * 77})
    back = load_file(str(out))
    assert torch.equal(back["b"], source["b"]) and torch.equal(back["new"], torch.ones(2).half())
    assert torch.equal(back["a"], source["a"] * 2) and torch.equal(back["m"], source["m"] * 2)
    assert seen["a"] == [(0, 2, (2, 700)), (2, 3, (1, 700))]  # 2 rows of 2800 bytes: over a chunk, but one unit
    assert seen["m"] == [(0, 4, (4, 50)), (4, 6, (2, 50))]  # 1000 bytes hold 2 units of 2 rows of 200 bytes
    with pytest.raises(NMSparseError, match="tensor c: 20 bytes in the source, declared 16"):
        stream.write_streaming(out, [("c", (4,), torch.float32)], [bytes_of("c")])
    beyond = stream.SourceBytes(src, src.stat().st_size - 8, 16)  # a file shorter than its header says
    with pytest.raises(NMSparseError, match="cannot read tensor d .the file ends before it.; the file may be truncated"):
        stream.write_streaming(out, [("d", (4,), torch.float32)], [beyond])


def test_reader_and_streaming_writer_agree_with_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file

    from nmcli.io.safetensors_stream import write_streaming

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2, generator=g).half(),
        "i64": torch.arange(5),
        "u8": torch.arange(9, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }
    ours = tmp_path / "ours.safetensors"
    layout = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    write_streaming(ours, layout, iter(tensors.values()), {"who": "nmsparse"})
    theirs = load_file(str(ours))  # the real reader reads what we wrote
    assert theirs.keys() == tensors.keys()
    assert all(torch.equal(theirs[k], v) and theirs[k].dtype == v.dtype for k, v in tensors.items())
    reference = tmp_path / "ref.safetensors"
    save_file(tensors, str(reference))  # and we read what the real writer wrote
    ckpt = open_path(reference)
    assert all(torch.equal(ckpt.read(k), v) and ckpt.read(k).dtype == v.dtype for k, v in tensors.items())


def test_sharded_folder(hf_bert_folder):
    ckpt = open_folder(hf_bert_folder)
    assert len(ckpt.shards) == 3
    assert ckpt.hf_config["model_type"] == "bert"
    assert sum(len(v) for v in ckpt.shards.values()) == len(ckpt.infos)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_pth_unwraps_usual_nesting(tmp_path, wrap):
    state = {"fc.weight": torch.randn(2, 4), "fc.bias": torch.zeros(2)}
    obj = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {}},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    torch.save(obj, tmp_path / "c.pth")
    loaded = load_state_dict_file(tmp_path / "c.pth")
    assert loaded.keys() == state.keys()
    assert torch.equal(loaded["fc.weight"], state["fc.weight"])


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/nmsparse-pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1)}, "evil": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(NMSparseError, match="never unpickles"):
        load_state_dict_file(tmp_path / "evil.pth")
    assert not os.path.exists("/tmp/nmsparse-pwned")


def test_truncated_and_corrupt_files(tmp_path):
    good = tmp_path / "g.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(good))
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(NMSparseError, match="t.safetensors"):
        open_path(truncated)
    corrupt = tmp_path / "c.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"0" * 64)
    with pytest.raises(NMSparseError, match="not a readable safetensors file"):
        open_path(corrupt)
    with pytest.raises(NMSparseError, match="no such file"):
        open_path(tmp_path / "missing.safetensors")
