"""The payload wire format: round trips, 1-bit packing, sizes, and rejection of every kind of malformed payload."""

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from aftermath.errors import PayloadError
from aftermath.model import build_model, mix_spec, preset_config, tier_spec
from aftermath.optim import (DenseConfig, DenseOptimizer, DistroConfig, DistroOptimizer, Payload, decode_payload, encode_payload, pack_signs,
                             size_report, unpack_signs)

CFG = preset_config("tiny")

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def grads_for(model, spec, seed):
    """Random gradients in the universal shapes (the optimizer takes its region)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0)


_MADE = {}


def make(model, tier=1, **kw):
    key = (tier, tuple(sorted(kw.items())))
    if key not in _MADE:
        _MADE[key] = _make(model, tier, **kw)
    return _MADE[key]


def _make(model, tier=1, **kw):
    spec = tier_spec(CFG, tier)
    opt = DistroOptimizer(DistroConfig(**kw), CFG, spec, dict(model.named_parameters()))
    data = opt.encode(grads_for(model, spec, tier), step=3, run_id="run-a", client_id=f"c{tier}")
    return opt, spec, data


@pytest.mark.parametrize("kw", [{}, {"value_dtype": "bfloat16"}, {"one_bit": True}])
def test_round_trip(model, kw):
    spec = tier_spec(CFG, 1)
    opt = DistroOptimizer(DistroConfig(**kw), CFG, spec, dict(model.named_parameters()))
    sent = opt.compress(grads_for(model, spec, 1), step=3)
    data = encode_payload(Payload("distro", "run-a", 3, "c1", spec, dict(sent)), opt.plan, opt.config.wire())
    payload = decode_payload(data, opt.expectation("run-a", 3, client_id="c1", spec=spec))
    assert payload.client_id == "c1" and payload.step == 3 and payload.spec == spec
    for name, coeffs in sent.items():
        got = payload.params[name]
        assert got.shape == coeffs.shape
        assert torch.equal(got.indices, coeffs.indices)
        want = torch.where(coeffs.values >= 0, 1.0, -1.0) if kw.get("one_bit") else coeffs.values
        assert torch.equal(got.values, want)


def test_dense_round_trip_and_sizes(model):
    spec = tier_spec(CFG, 2)
    opt = DenseOptimizer(DenseConfig(), CFG, spec, dict(model.named_parameters()))
    grads = grads_for(model, spec, 5)
    data = opt.encode(grads, 0, "run-a", "d")
    payload = decode_payload(data, opt.expectation("run-a", 0))
    for name, shape in opt.shapes.items():
        assert torch.equal(payload.params[name], grads[name][tuple(slice(0, s) for s in shape)])
    report = size_report(data, opt.plan, spec)
    assert report.dense_fp32_bytes == 4 * report.region_params
    assert 0 < report.payload_bytes - report.dense_fp32_bytes < 20_000  # only the header on top


def test_sizes_are_exact(model):
    _, spec, data = make(model, tier=1)
    report = size_report(data, DistroOptimizer(DistroConfig(), CFG, spec, dict(model.named_parameters())).plan, spec)
    assert report.payload_bytes == len(data)
    with safe_open_bytes(data) as tensors:
        body = sum(t.numel() * t.element_size() for t in tensors.values())
    header = struct.unpack("<Q", data[:8])[0]
    assert len(data) == 8 + header + body
    assert report.ratio_fp32 > 20 and report.ratio_bf16 == report.ratio_fp32 / 2


class safe_open_bytes:
    def __init__(self, data):
        from safetensors.torch import load
        self.t = load(data)

    def __enter__(self):
        return self.t

    def __exit__(self, *a):
        return False


def test_pack_unpack_signs():
    for n in (1, 7, 8, 9, 64, 1001):
        values = torch.randn(n)
        values[0] = 0.0  # zero counts as positive
        packed = pack_signs(values)
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
        assert torch.equal(unpack_signs(packed, n), torch.where(values >= 0, 1.0, -1.0))
    assert pack_signs(torch.tensor([1.0, -1, -1, -1, -1, -1, -1, 1])).tolist() == [0b10000001]


# ----------------------------------------------------------------------------------------------- malformed
def rebuild(data: bytes, tensors_fn=None, meta_fn=None) -> bytes:
    from safetensors.torch import load
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    meta = dict(header["__metadata__"])
    tensors = load(data)
    if tensors_fn:
        tensors = tensors_fn(tensors) or tensors
    if meta_fn:
        meta = meta_fn(meta) or meta
    return st_save(tensors, metadata=meta)


NAME = "model.layers.0.mlp.gate_proj.weight"


def set_meta(key, value):
    def fn(meta):
        meta[key] = value
    return fn


def set_tensor(key, fn):
    def inner(tensors):
        tensors[key] = fn(tensors[key])
    return inner


def drop(key):
    def inner(tensors):
        del tensors[key]
    return inner


def add(key, value):
    def inner(tensors):
        tensors[key] = value
    return inner


def forged_tier_spec(meta):
    spec = json.loads(meta["spec"])
    spec["ffn_widths"] = [128] * 4  # claims tier 1 but with tier-2 widths
    meta["spec"] = json.dumps(spec)


def oversized_spec(meta):
    spec = json.loads(meta["spec"])
    spec.update(tier=None, name="big", ffn_widths=[1024] * 4)
    meta["spec"] = json.dumps(spec)


def misaligned_spec(meta):
    spec = json.loads(meta["spec"])
    spec.update(tier=None, name="odd", ffn_widths=[200] * 4)
    meta["spec"] = json.dumps(spec)


def wrong_shapes(meta):
    shapes = json.loads(meta["shapes"])
    shapes[NAME] = [64, 128]
    meta["shapes"] = json.dumps(shapes)


def out_of_range(t):
    t = t.clone()
    t[0, 0] = 4096
    return t


def duplicate(t):
    t = t.clone()
    t[0, 1] = t[0, 0]
    return t


def poison(value):
    def fn(t):
        t = t.clone()
        t[3, 2] = value
        return t
    return fn


MALFORMED = {
    "format": (None, set_meta("format", "something-else"), "format"),
    "version": (None, set_meta("version", "99"), "version"),
    "run_id": (None, set_meta("run_id", "other-run"), "run_id"),
    "step": (None, set_meta("step", "4"), "step"),
    "client": (None, set_meta("client_id", "someone"), "client_id"),
    "kind": (None, set_meta("kind", "dense"), "kind"),
    "topk": (None, set_meta("topk", "16"), "topk"),
    "one_bit": (None, set_meta("one_bit", "1"), "one_bit"),
    "value_dtype": (None, set_meta("value_dtype", "bfloat16"), "value_dtype"),
    "chunk": (None, set_meta("chunk", "32"), "chunk"),
    "missing_meta": (None, lambda m: m.pop("spec") and None, "spec"),
    "bad_spec_json": (None, set_meta("spec", "{nope"), "spec"),
    "forged_tier": (None, forged_tier_spec, "tier 1"),
    "spec_too_big": (None, oversized_spec, "fit"),
    "spec_misaligned": (None, misaligned_spec, "chunks"),
    "shapes": (None, wrong_shapes, "shapes"),
    "missing_tensor": (drop(f"{NAME}/values"), None, "missing"),
    "extra_tensor": (add("model.layers.9.mlp.up_proj.weight/values", torch.zeros(2)), None, "unexpected"),
    "index_dtype": (set_tensor(f"{NAME}/indices", lambda t: t.to(torch.int32)), None, "dtype"),
    "value_dtype_tensor": (set_tensor(f"{NAME}/values", lambda t: t.to(torch.float16)), None, "dtype"),
    "value_shape": (set_tensor(f"{NAME}/values", lambda t: t[:-1].clone()), None, "shape"),
    "index_range": (set_tensor(f"{NAME}/indices", out_of_range), None, "outside"),
    "index_duplicate": (set_tensor(f"{NAME}/indices", duplicate), None, "twice"),
    "nan": (set_tensor(f"{NAME}/values", poison(float("nan"))), None, "NaN"),
    "inf": (set_tensor(f"{NAME}/values", poison(float("inf"))), None, "Inf"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_decode_rejects_malformed(model, case):
    opt, spec, data = make(model, tier=1)
    expected = opt.expectation("run-a", 3, client_id="c1")
    decode_payload(data, expected)  # the untouched payload is fine
    tensors_fn, meta_fn, words = MALFORMED[case]
    bad = rebuild(data, tensors_fn, meta_fn)
    with pytest.raises(PayloadError, match=words):
        decode_payload(bad, expected)


def test_decode_rejects_wrong_assigned_spec(model):
    opt, spec, data = make(model, tier=1)
    with pytest.raises(PayloadError, match="assigned"):
        decode_payload(data, opt.expectation("run-a", 3, spec=tier_spec(CFG, 2)))
    other = mix_spec(CFG, "mix", [256] * 4, q_heads=[4] * 4)  # same widths as tier 1, but not tier 1
    with pytest.raises(PayloadError, match="assigned"):
        decode_payload(data, opt.expectation("run-a", 3, spec=other))


@pytest.mark.parametrize("cut", ["empty", "short", "truncated", "garbage_header", "no_metadata", "too_big"])
def test_decode_rejects_broken_bytes(model, cut):
    opt, _, data = make(model, tier=1)
    expected = opt.expectation("run-a", 3, max_bytes=len(data) if cut != "too_big" else len(data) - 1)
    bad = {
        "empty": b"",
        "short": data[:5],
        "truncated": data[: len(data) // 2],
        "garbage_header": struct.pack("<Q", 10) + b"not json!!" + b"\0" * 10,
        "no_metadata": st_save({"x": torch.zeros(2)}),
        "too_big": data,
    }[cut]
    with pytest.raises(PayloadError):
        decode_payload(bad, expected)


def test_decode_rejects_nonzero_sign_padding(model):
    # top-3 of 1-D chunks of 64: model.norm.weight (128) sends 2 * 3 = 6 signs -> one byte with 2 padding bits
    opt, _, data = make(model, tier=1, one_bit=True, topk=3)
    expected = opt.expectation("run-a", 3)
    decode_payload(data, expected)
    bad = rebuild(data, set_tensor("model.norm.weight/signs", lambda t: t | 0b01))
    with pytest.raises(PayloadError, match="padding"):
        decode_payload(bad, expected)


def test_decode_rejects_dense_nan(model):
    spec = tier_spec(CFG, 2)
    opt = DenseOptimizer(DenseConfig(), CFG, spec, dict(model.named_parameters()))
    data = opt.encode(grads_for(model, spec, 5), 0, "run-a", "d")
    bad = rebuild(data, set_tensor(f"{NAME}/grad", poison(float("nan"))))
    with pytest.raises(PayloadError, match="NaN"):
        decode_payload(bad, opt.expectation("run-a", 0))
