import json

import pytest
import torch
from safetensors.torch import save_file

from shpeft.delta import Delta, DeltaError, apply_delta, content_hash, revert_delta
from shpeft.methods.shpeft import Shpeft
from tests.helpers import tiny_vit
from tests.test_sparse import sparse_model, train_steps


def trained_delta():
    model, base, masks, params = sparse_model()
    train_steps(model, params, steps=3)
    delta = Shpeft().delta(model)
    delta.meta.update({"base_model": "tiny", "base_hash": "abc123"})
    return model, delta


def test_save_load_round_trip_bit_exact(tmp_path):
    _, delta = trained_delta()
    path = delta.save(tmp_path / "delta.safetensors")
    loaded = Delta.load(path)
    assert loaded.meta == delta.meta
    assert set(loaded.sparse) == set(delta.sparse) and set(loaded.dense) == {
        "head.weight",
        "head.bias",
    }
    for n, (i, v) in delta.sparse.items():
        li, lv = loaded.sparse[n]
        assert li.dtype == torch.int32 and torch.equal(li, i.to(torch.int32)) and torch.equal(lv, v)
    for n, t in delta.dense.items():
        assert torch.equal(loaded.dense[n], t)
    # size: 8 bytes per sparse scalar + head + metadata
    k = delta.num_sparse
    assert path.stat().st_size <= 8 * k + 4 * delta.num_dense + 16 * 1024


def test_apply_equals_merged_model_and_revert_restores(tmp_path):
    model, delta = trained_delta()
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        want = model(x)
    plain = tiny_vit()
    plain.eval()
    before = {n: t.clone() for n, t in plain.state_dict().items()}
    handle = apply_delta(
        plain, Delta.load(delta.save(tmp_path / "d.safetensors")), base_hash="abc123"
    )
    with torch.no_grad():
        assert torch.equal(plain(x), want)
    revert_delta(plain, delta, handle)
    for n, t in plain.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_wrong_base_refused_and_model_untouched():
    _, delta = trained_delta()
    plain = tiny_vit()
    before = {n: t.clone() for n, t in plain.state_dict().items()}
    with pytest.raises(DeltaError, match="different base"):
        apply_delta(plain, delta, base_hash="fff000")
    bad = Delta(
        sparse=dict(delta.sparse), dense={"head.weight": torch.zeros(5, 16)}, meta=delta.meta
    )
    with pytest.raises(DeltaError, match="shape"):
        apply_delta(plain, bad)
    for n, t in plain.state_dict().items():
        assert torch.equal(t, before[n])


@pytest.mark.parametrize(
    "tensors, meta, match",
    [
        (
            {
                "sparse/a/indices": torch.tensor([2, 1], dtype=torch.int32),
                "sparse/a/values": torch.ones(2),
            },
            None,
            "sorted",
        ),
        (
            {
                "sparse/a/indices": torch.tensor([1, 2], dtype=torch.int64),
                "sparse/a/values": torch.ones(2),
            },
            None,
            "int32",
        ),
        (
            {
                "sparse/a/indices": torch.tensor([1, 2], dtype=torch.int32),
                "sparse/a/values": torch.ones(3),
            },
            None,
            "values",
        ),
        (
            {
                "sparse/a/indices": torch.tensor([1], dtype=torch.int32),
                "sparse/a/values": torch.tensor([float("nan")]),
            },
            None,
            "finite",
        ),
        ({"sparse/a/indices": torch.tensor([1], dtype=torch.int32)}, None, "lacks"),
        ({"weird": torch.ones(1)}, None, "unexpected"),
        ({"dense/a": torch.ones(1)}, {"format": "other"}, "not a shpeft delta"),
        ({"dense/a": torch.ones(1)}, {"format": "shpeft-delta", "format_version": "99"}, "version"),
    ],
)
def test_malformed_files_rejected(tmp_path, tensors, meta, match):
    path = tmp_path / "bad.safetensors"
    # a well-formed checksum, so that the structural checks behind it are reached
    meta = dict(meta or {"format": "shpeft-delta", "format_version": "1"}, shpeft="{}")
    meta["sha256"] = content_hash(tensors, meta["shpeft"])
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(DeltaError, match=match):
        Delta.load(path)


def test_garbage_file_rejected(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(DeltaError, match="not a readable"):
        Delta.load(path)
    with pytest.raises(FileNotFoundError):
        Delta.load(tmp_path / "missing.safetensors")


def test_any_modified_byte_of_the_data_is_detected(tmp_path):
    _, delta = trained_delta()
    path = delta.save(tmp_path / "d.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # a bit of the last tensor's data: structurally valid, silently different
    path.write_bytes(bytes(raw))
    with pytest.raises(DeltaError, match="checksum"):
        Delta.load(path)


def _v2(tmp_path, tensors, layout, shpeft="{}"):
    meta = {
        "format": "shpeft-delta",
        "format_version": "2",
        "sparse_layout": layout,
        "shpeft": shpeft,
    }
    meta["sha256"] = content_hash(tensors, shpeft + layout)
    path = tmp_path / "v2.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "layout, match",
    [
        ('[["a", 2], ["b", 2]]', "counts 4 scalars"),
        ('[["a", 2], ["a", 1]]', "twice"),
        ('[["a", -1], ["b", 4]]', "count >= 0"),
        ('{"a": 3}', "list of"),
        ("[[", "not valid JSON"),
        ("[]", "without a layout"),
    ],
)
def test_packed_layout_errors(tmp_path, layout, match):
    tensors = {
        "sparse/indices": torch.tensor([0, 1, 2], dtype=torch.int32),
        "sparse/values": torch.ones(3),
    }
    with pytest.raises(DeltaError, match=match):
        Delta.load(_v2(tmp_path, tensors, layout))


def test_packed_file_is_8_bytes_per_scalar_plus_a_small_header(tmp_path):
    _, delta = trained_delta()
    path = delta.save(tmp_path / "d.safetensors")
    payload = 8 * delta.num_sparse + 4 * delta.num_dense
    assert path.stat().st_size - payload <= 1024 + 45 * len(delta.sparse)
    loaded = Delta.load(path)
    assert list(loaded.sparse) == list(delta.sparse)  # order kept: it is the optimizer's order


def test_version_1_files_still_load(tmp_path):
    _, delta = trained_delta()
    tensors = delta.tensors()  # the per-tensor (v1) mapping
    shpeft = json.dumps(delta.meta, sort_keys=True)
    meta = {
        "format": "shpeft-delta",
        "format_version": "1",
        "shpeft": shpeft,
        "sha256": content_hash(tensors, shpeft),
    }
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=meta)
    loaded = Delta.load(tmp_path / "v1.safetensors")
    for k, t in delta.tensors().items():
        assert torch.equal(loaded.tensors()[k], t)


def test_a_tensor_in_both_parts_is_refused_before_any_write():
    """Regression: apply writes sparse then dense; the same tensor in both parts would make the
    revert (which used to replay the same order) leave the sparse values in place."""
    _, delta = trained_delta()
    name = next(iter(delta.sparse))
    plain = tiny_vit()
    both = Delta(
        sparse=dict(delta.sparse),
        dense={**delta.dense, name: dict(plain.named_parameters())[name].detach() + 1},
        meta=delta.meta,
    )
    before = {n: t.clone() for n, t in plain.state_dict().items()}
    with pytest.raises(DeltaError, match="both sparse and dense"):
        apply_delta(plain, both)
    for n, t in plain.state_dict().items():
        assert torch.equal(t, before[n])


def test_revert_undoes_the_writes_in_reverse_order():
    _, delta = trained_delta()
    plain = tiny_vit()
    before = {n: t.clone() for n, t in plain.state_dict().items()}
    handles = [apply_delta(plain, delta) for _ in range(2)]  # applied twice, reverted twice
    for h in reversed(handles):
        revert_delta(plain, delta, h)
    for n, t in plain.state_dict().items():
        assert torch.equal(t, before[n]), n
