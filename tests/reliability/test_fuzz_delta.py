"""Property-based fuzzing of delta files: a mutated file is rejected with a clean DeltaError or
loads correctly; it never crashes, hangs or yields a silently wrong model."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from shpeft.delta import Delta, DeltaError, apply_delta, content_hash
from tests.helpers import tiny_vit
from tests.test_delta import trained_delta

FUZZ = settings(
    max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    _, delta = trained_delta()
    path = delta.save(tmp_path_factory.mktemp("fuzz") / "valid.safetensors")
    raw = path.read_bytes()
    model = tiny_vit()
    apply_delta(model, Delta.load(path), base_hash="abc123")
    return raw, {k: v.clone() for k, v in model.state_dict().items()}


def load_and_apply(path):
    """Returns the applied state dict, or None after a clean rejection; anything else fails."""
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        delta = Delta.load(path)
        apply_delta(model, delta, base_hash="abc123")
    except DeltaError:
        after = model.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before), (
            "a rejected delta changed the model"
        )
        return None
    return model.state_dict()


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@FUZZ
@given(data=st.data())
def test_byte_level_mutations(valid, tmp_path, data):
    raw, good = valid
    kind = data.draw(st.sampled_from(["truncate", "flip", "overwrite", "insert"]))
    buf = bytearray(raw)
    if kind == "truncate":
        buf = buf[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, len(raw) - 1))
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "overwrite":
        pos = data.draw(st.integers(0, len(raw) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=16))
        buf[pos : pos + len(chunk)] = chunk
    else:
        pos = data.draw(st.integers(0, len(raw)))
        buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(buf))
    result = load_and_apply(path)
    # Without a matching checksum nothing but the exact original content may load.
    assert result is None or same(result, good)


def _rewrite(tensors: dict, meta_json: str, path, checksum: bool = True):
    meta = {"format": "shpeft-delta", "format_version": "1", "shpeft": meta_json}
    if checksum:  # a forger can recompute it: the structural validation must still hold
        meta["sha256"] = content_hash(tensors, meta_json)
    save_file(tensors, str(path), metadata=meta)


@FUZZ
@given(data=st.data())
def test_tensor_level_mutations_with_valid_checksums(valid, tmp_path, data):
    raw, good = valid
    src = tmp_path / "src.safetensors"
    src.write_bytes(raw)
    delta = Delta.load(src)
    tensors = delta.tensors()
    meta = dict(delta.meta)
    key = data.draw(st.sampled_from(sorted(tensors)))
    t = tensors[key].clone()
    kind = data.draw(
        st.sampled_from(
            [
                "index_out_of_range",
                "negative_index",
                "unsorted",
                "nan",
                "inf",
                "shape",
                "dtype",
                "drop",
                "rename",
                "base_hash",
                "value",
            ]
        )
    )
    expect_reject = True
    if (
        kind in ("index_out_of_range", "negative_index", "unsorted")
        and key.endswith("/indices")
        and t.numel() > 1
    ):
        if kind == "index_out_of_range":
            t[-1] = 2**31 - 1
        elif kind == "negative_index":
            t[0] = -1
        else:
            t[0], t[1] = t[1].clone(), t[0].clone()
    elif kind in ("nan", "inf") and t.is_floating_point():
        t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = (
            float("nan") if kind == "nan" else float("inf")
        )
    elif kind == "shape":
        t = torch.cat([t.reshape(-1), t.reshape(-1)[:1]])
    elif kind == "dtype":
        t = t.double() if t.is_floating_point() else t.long()
    elif kind == "drop":
        tensors.pop(key)
        t = None
        expect_reject = key.startswith("sparse/")  # a dense tensor dropped: a smaller valid delta
    elif kind == "rename":
        tensors.pop(key)
        key = key.replace("/", "/x_", 1)  # a tensor the model does not have
    elif kind == "base_hash":
        meta["base_hash"] = "0" * 64
    elif kind == "value" and t.is_floating_point():
        t.view(-1)[0] += 1.0
        expect_reject = False  # a different but well-formed delta: must load exactly as written
    else:
        return
    if t is not None:
        tensors[key] = t
    path = tmp_path / "m.safetensors"
    _rewrite(tensors, json.dumps(meta, sort_keys=True), path)
    result = load_and_apply(path)
    if expect_reject:
        assert result is None, f"{kind} on {key} was accepted"
    elif kind == "value":
        model = tiny_vit()
        apply_delta(model, Delta.load(path), base_hash="abc123")
        assert same(result, model.state_dict()) and not same(result, good)


def test_header_claiming_huge_tensor_is_rejected(tmp_path):
    header = json.dumps(
        {"dense/head.weight": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 16]}}
    ).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    assert load_and_apply(path) is None
