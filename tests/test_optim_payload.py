"""The payload wire format: round trips, 1-bit packing, sizes, and rejection of every kind of malformed payload."""

import json
import math
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from aftermath.errors import PayloadError
from aftermath.model import build_model, mix_spec, preset_config, tier_spec
from aftermath.model.geometry import param_shapes
from aftermath.optim import (ChunkPlan, DenseConfig, DenseOptimizer, DistroConfig, DistroOptimizer, Payload,
                             PayloadExpectation, SparseCoefficients, WireFormat, decode_payload, encode_payload,
                             pack_signs, size_report, unpack_signs)
from aftermath.optim.payload import pack_bits, unpack_bits

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


@pytest.mark.parametrize("kw", [{}, {"one_bit": False}, {"one_bit": False, "value_dtype": "bfloat16"}])
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
        want = torch.where(coeffs.values >= 0, 1.0, -1.0) if opt.config.one_bit else coeffs.values
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
    """12 + header + per parameter: ceil(n*k*12/8) index bytes + ceil(n*k/8) sign bytes (top-4, 1-bit)."""
    opt, spec, data = make(model, tier=1)
    report = size_report(data, opt.plan, spec)
    assert report.payload_bytes == len(data)
    header_len = struct.unpack("<I", data[8:12])[0]
    body = 0
    for name, shape in param_shapes(CFG, spec).items():
        chunk = opt.plan.params[name].chunk
        count = math.prod(s // c for s, c in zip(shape, chunk)) * 4
        bits = 12 if math.prod(chunk) == 4096 else (math.prod(chunk) - 1).bit_length()
        body += -(-count * bits // 8) + -(-count // 8)
    assert len(data) == 12 + header_len + body
    assert header_len < 300  # the per-payload header is a few hundred bytes, not kilobytes
    assert report.ratio_bf16 > 900 and report.ratio_fp32 == 2 * report.ratio_bf16


def test_pack_unpack_signs():
    for n in (1, 7, 8, 9, 64, 1001):
        values = torch.randn(n)
        values[0] = 0.0  # zero counts as positive
        packed = pack_signs(values)
        assert isinstance(packed, bytes) and len(packed) == (n + 7) // 8
        assert torch.equal(unpack_signs(packed, n), torch.where(values >= 0, 1.0, -1.0))
    assert pack_signs(torch.tensor([1.0, -1, -1, -1, -1, -1, -1, 1])) == bytes([0b10000001])


def test_pack_unpack_bits():
    # 12-bit fields, most significant bit first: 0xABC, 0x123 -> AB C1 23
    assert pack_bits(torch.tensor([0xABC, 0x123]), 12) == bytes([0xAB, 0xC1, 0x23])
    assert pack_bits(torch.tensor([0xABC]), 12) == bytes([0xAB, 0xC0])  # zero-padded to a byte
    gen = torch.Generator().manual_seed(0)
    for bits in (1, 6, 10, 12, 13):
        for n in (1, 3, 8, 1000):
            values = torch.randint(0, 2**bits, (n,), generator=gen)
            packed = pack_bits(values, bits)
            assert len(packed) == -(-n * bits // 8)
            assert torch.equal(unpack_bits(packed, n, bits), values)


# ----------------------------------------------------------------------------------------------- malformed
def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<I", data[8:12])[0]
    return json.loads(data[12:12 + n]), data[12 + n:]


def join(header: dict, body: bytes, version: int = 2) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return b"AFTMUPD" + bytes([version]) + struct.pack("<I", len(text)) + text + body


def sections(plan, spec, one_bit=True, topk=4) -> dict:
    """(offset, length, count, bits) of every body section, computed here from the documented layout."""
    out, offset = {}, 0
    for name, shape in param_shapes(CFG if plan is None else plan.model_config, spec).items():
        chunk = plan.params[name].chunk
        count = math.prod(s // c for s, c in zip(shape, chunk)) * min(topk, math.prod(chunk))
        bits = (math.prod(chunk) - 1).bit_length()
        out[name, "indices"] = (offset, -(-count * bits // 8), count, bits)
        offset += -(-count * bits // 8)
        size = -(-count // 8) if one_bit else 4 * count
        out[name, "signs" if one_bit else "values"] = (offset, size, count, 1)
        offset += size
    return out


def edit_header(key, value):
    def fn(header, body, layout):
        if value is KeyError:
            del header[key]
        else:
            header[key] = value
        return header, body
    return fn


def edit_indices(name, change):
    """Unpack the indices of `name`, let `change` edit the (n_chunks, k) table, pack them back."""
    def fn(header, body, layout):
        offset, size, count, bits = layout[name, "indices"]
        idx = unpack_bits(body[offset:offset + size], count, bits).reshape(-1, header["topk"])
        change(idx)
        return header, body[:offset] + pack_bits(idx, bits) + body[offset + size:]
    return fn


def set_last_byte_bits(name, part, mask):
    def fn(header, body, layout):
        offset, size, _, _ = layout[name, part]
        end = offset + size - 1
        return header, body[:end] + bytes([body[end] | mask]) + body[end + 1:]
    return fn


NAME = "model.layers.0.mlp.gate_proj.weight"


def swap_first(idx):
    idx[0, 0], idx[0, 1] = int(idx[0, 1]), int(idx[0, 0])


def repeat_first(idx):
    idx[0, 1] = idx[0, 0]


MALFORMED = {
    "kind": edit_header("kind", "dense"),
    "run_id": edit_header("run_id", "other-run"),
    "step": edit_header("step", 4),
    "step_as_text": edit_header("step", "3"),
    "client": edit_header("client_id", "someone"),
    "topk": edit_header("topk", 16),
    "one_bit": edit_header("one_bit", False),
    "one_bit_as_number": edit_header("one_bit", 1),
    "value_dtype": edit_header("value_dtype", "bfloat16"),
    "chunk": edit_header("chunk", 32),
    "missing_key": edit_header("spec", KeyError),
    "extra_key": edit_header("shapes", {}),
    "spec_not_object": edit_header("spec", "tier1"),
    "spec_tier_text": edit_header("spec", {"tier": "1"}),
    "spec_no_such_tier": edit_header("spec", {"tier": 9}),
    "spec_too_big": edit_header("spec", {"name": "big", "ffn_widths": [1024] * 4, "q_heads": [4] * 4,
                                         "kv_heads": [2] * 4}),
    "spec_misaligned": edit_header("spec", {"name": "odd", "ffn_widths": [200] * 4, "q_heads": [4] * 4,
                                            "kv_heads": [2] * 4}),
    "spec_reserved_name": edit_header("spec", {"name": "tier1", "ffn_widths": [256] * 4, "q_heads": [4] * 4,
                                               "kv_heads": [2] * 4}),
    "indices_not_sorted": edit_indices(NAME, swap_first),
    "index_repeated": edit_indices(NAME, repeat_first),
}
WORDS = {
    "kind": "kind", "run_id": "run_id", "step": "step", "step_as_text": "step", "client": "client_id",
    "topk": "topk", "one_bit": "one_bit", "one_bit_as_number": "one_bit", "value_dtype": "value_dtype",
    "chunk": "chunk", "missing_key": "lacks", "extra_key": "unexpected", "spec_not_object": "malformed",
    "spec_tier_text": "integer", "spec_no_such_tier": "tier 9", "spec_too_big": "fit", "spec_misaligned": "chunks",
    "spec_reserved_name": "malformed", "indices_not_sorted": "increasing", "index_repeated": "increasing",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_decode_rejects_malformed(model, case):
    opt, spec, data = make(model, tier=1)
    expected = opt.expectation("run-a", 3, client_id="c1")
    decode_payload(data, expected)  # the untouched payload is fine
    header, body = split(data)
    header, body = MALFORMED[case](header, body, sections(opt.plan, spec))
    with pytest.raises(PayloadError, match=WORDS[case]):
        decode_payload(join(header, body), expected)


def test_decode_rejects_index_outside_a_chunk():
    """The small preset's q_proj chunks are 48 x 64 = 3072 coefficients: 12-bit fields can say 3072..4095."""
    cfg = preset_config("small")
    spec = tier_spec(cfg, 1)
    plan = ChunkPlan(cfg)
    wire = WireFormat()
    gen = torch.Generator().manual_seed(0)
    params = {}
    for name, shape in param_shapes(cfg, spec).items():
        pc = plan.params[name]
        n, k = pc.n_chunks(shape), pc.topk(wire.topk)
        idx = torch.stack([torch.randperm(pc.chunk_numel, generator=gen)[:k].sort().values for _ in range(n)])
        params[name] = SparseCoefficients(shape, idx, torch.randn(n, k, generator=gen))
    data = encode_payload(Payload("distro", "run-a", 0, "c", spec, params), plan, wire)
    expected = PayloadExpectation("run-a", 0, plan, wire)
    decode_payload(data, expected)
    header, body = split(data)
    layout = sections(plan, spec)
    q = "model.layers.2.self_attn.q_proj.weight"

    def last_is_4095(idx):
        idx[0, -1] = 4095
    _, bad = edit_indices(q, last_is_4095)(header, body, layout)
    with pytest.raises(PayloadError, match="outside"):
        decode_payload(join(header, bad), expected)


def test_decode_rejects_wrong_assigned_spec(model):
    opt, spec, data = make(model, tier=1)
    with pytest.raises(PayloadError, match="assigned"):
        decode_payload(data, opt.expectation("run-a", 3, spec=tier_spec(CFG, 2)))
    other = mix_spec(CFG, "mix", [256] * 4, q_heads=[4] * 4)  # same widths as tier 1, but not tier 1
    with pytest.raises(PayloadError, match="assigned"):
        decode_payload(data, opt.expectation("run-a", 3, spec=other))


def test_mix_spec_round_trip(model):
    spec = mix_spec(CFG, "mix", [256, 128, 512, 64], q_heads=[4, 2, 4, 2])
    opt = DistroOptimizer(DistroConfig(), CFG, spec, dict(model.named_parameters()))
    data = opt.encode(grads_for(model, spec, 7), 3, "run-a", "m")
    assert decode_payload(data, opt.expectation("run-a", 3, spec=spec)).spec == spec


@pytest.mark.parametrize("part", ["signs", "indices"])
def test_decode_rejects_nonzero_padding(model, part):
    # top-3 of 1-D chunks of 64: model.norm.weight (128 in tier 1) sends 2 * 3 = 6 signs (2 padding bits) and six
    # 6-bit indices (36 bits: 4 padding bits)
    opt, spec, data = make(model, tier=1, topk=3)
    expected = opt.expectation("run-a", 3)
    decode_payload(data, expected)
    header, body = split(data)
    _, bad = set_last_byte_bits("model.norm.weight", part, 0b1)(header, body, sections(opt.plan, spec, topk=3))
    with pytest.raises(PayloadError, match="padding"):
        decode_payload(join(header, bad), expected)


@pytest.mark.parametrize("cut", ["empty", "short", "truncated", "one_more_byte", "bad_magic", "version_1",
                                 "version_99", "header_too_long", "garbage_header", "too_big"])
def test_decode_rejects_broken_bytes(model, cut):
    opt, _, data = make(model, tier=1)
    expected = opt.expectation("run-a", 3, max_bytes=len(data) - 1 if cut == "too_big" else None)
    header, body = split(data)
    bad, words = {
        "empty": (b"", "short"),
        "short": (data[:5], "short"),
        "truncated": (data[: len(data) - 3], "describes"),
        "one_more_byte": (data + b"\0", "describes"),
        "bad_magic": (b"NOTMINE!" + data[8:], "not an Aftermath"),
        "version_1": (st_save({"x": torch.zeros(2)}, metadata={"format": "aftermath-update"}), "version-1"),
        "version_99": (join(header, body, version=99), "version 99"),
        "header_too_long": (data[:8] + struct.pack("<I", 2**30) + data[12:], "truncated or corrupt"),
        "garbage_header": (data[:8] + struct.pack("<I", 10) + b"not json!!" + body, "JSON"),
        "too_big": (data, "over the limit"),
    }[cut]
    with pytest.raises(PayloadError, match=words):
        decode_payload(bad, expected)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_decode_rejects_non_finite_values(model, poison):
    opt, spec, data = make(model, tier=1, one_bit=False)
    expected = opt.expectation("run-a", 3)
    header, body = split(data)
    offset, _, _, _ = sections(opt.plan, spec, one_bit=False)[NAME, "values"]
    bad = body[:offset + 8] + struct.pack("<f", poison) + body[offset + 12:]
    with pytest.raises(PayloadError, match="NaN or Inf"):
        decode_payload(join(header, bad), expected)


def test_decode_rejects_dense_nan(model):
    spec = tier_spec(CFG, 2)
    opt = DenseOptimizer(DenseConfig(), CFG, spec, dict(model.named_parameters()))
    data = opt.encode(grads_for(model, spec, 5), 0, "run-a", "d")
    decode_payload(data, opt.expectation("run-a", 0))
    header, body = split(data)
    bad = body[:100] + struct.pack("<f", float("nan")) + body[104:]
    with pytest.raises(PayloadError, match="NaN"):
        decode_payload(join(header, bad), opt.expectation("run-a", 0))
