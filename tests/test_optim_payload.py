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


# ----------------------------------------------------------------------------------------------- pinned bytes
def synthetic_payload(cfg, spec, plan, wire, step=5, client_id="pin"):
    """A payload whose every number follows from its position (no random generator): k distinct, increasing
    indices per chunk (one in each of k equal blocks of the chunk, so the last block reaches the chunk's end) and
    values that include 0.0 and negatives."""
    params = {}
    for name, shape in param_shapes(cfg, spec).items():
        shape = tuple(shape)
        if wire.kind == "dense":
            n = math.prod(shape)
            grad = (torch.arange(n, dtype=torch.float64) * 37 % 101 - 50) / 16
            params[name] = grad.to(torch.float32).reshape(shape)
            continue
        pc = plan.params[name]
        n, k = pc.n_chunks(shape), pc.topk(wire.topk)
        block = pc.chunk_numel // k
        idx = [[j * block + (c * 31 + j * 7 + (block - 1) * (c % 3 == 2)) % block for j in range(k)] for c in range(n)]
        vals = [[((c * 13 + j * 5) % 17 - 8) / 8.0 * 1.5 for j in range(k)] for c in range(n)]
        params[name] = SparseCoefficients(shape, torch.tensor(idx, dtype=torch.int64).reshape(n, k),
                                          torch.tensor(vals, dtype=torch.float32).reshape(n, k))
    return Payload(wire.kind, "run-pin", step, client_id, spec, params)


PINNED = {
    # (preset, spec, chunk, wire kwargs): sha256 of the encoded bytes, computed with the wire-v2 encoder as first
    # written; the bytes of a payload must never change under an optimisation of the encoder
    ("tiny", 1, 64, ()):
        "1992acf6be6957f1ccca8916e223282a0d7de7c2073dbcc4ff7fc86888438391",
    ("tiny", 3, 64, ()):
        "f915beec48f6a085c9aa7caa4e3be572a037cf97c1067999409e90e2d99a5e4c",
    ("tiny", 1, 64, (("topk", 3),)):
        "6ba309ffc5638b57aa14ab484357c9dbcd41b04a91a004d755753cb5f6af3fd8",
    ("tiny", 0, 64, (("topk", 20),)):
        "526f6879c3d37396296fadec62f514ecba1be81782b06c5e614bf4965c2d1c04",
    ("tiny", 2, 64, (("one_bit", False),)):
        "ef4b81cca495e86a9b6c5f47c5780c9723c4aaa083eb87d0bb41a1615e6781a8",
    ("tiny", 1, 64, (("one_bit", False), ("value_dtype", "bfloat16"))):
        "7cd7173f862841c98b986bcbadd83e38a79008ea1ac0f6f591446a727bf0f70a",
    ("tiny", 1, 64, (("one_bit", False), ("value_dtype", "float16"), ("topk", 5))):
        "08609d4aaf4dcb836a233e37ed5bbbc32579c277d7e77bc12c21119a71553294",
    ("tiny", "mix", 64, ()):
        "ca7a7dcd3ae57f779e91458c8fe265606a15fea5e41a32b2f77caf33d6b89d56",
    ("tiny", 1, 32, ()):
        "392bc4072cbf9e11186b84c078c67ecf4002be8fd1f9a50d8c24455b78bfabaa",
    ("small", 1, 64, ()):
        "58e6051b1df43193faefcf2ad41faf2847533353cf1914457a0dddfec6af6ae2",
    ("tiny", 2, 32, (("topk", 40),)):  # 1-D chunks of 32 keep all 32, the others 40
        "dd74f78fdeab081ce412fcbcd873ab9ec49a79d8a20c25a3b3faf24388e59871",
    ("tiny", 1, 64, (("one_bit", False), ("topk", 100))):
        "03f3b55dfaa69f513ce9f0b302e07ccb7ddea6bcced78616c14ec220346f8a8f",
    ("tiny", 2, 64, (("kind", "dense"),)):
        "0c790e0477ece74df3b5e17dfc725300857c8cdaed0fdd05e565e66befb5afdf",
}


def _pinned_case(preset, tier, chunk, wire_kw):
    cfg = preset_config(preset)
    spec = mix_spec(cfg, "mix", [256, 128, 512, 64], q_heads=[4, 2, 4, 2]) if tier == "mix" else tier_spec(cfg, tier)
    plan = ChunkPlan(cfg, chunk)
    wire = WireFormat(**dict(wire_kw))
    return cfg, spec, plan, wire, synthetic_payload(cfg, spec, plan, wire)


@pytest.mark.parametrize("case", list(PINNED), ids=str)
def test_encoded_bytes_are_pinned(case):
    import hashlib
    cfg, spec, plan, wire, payload = _pinned_case(*case)
    data = encode_payload(payload, plan, wire)
    assert hashlib.sha256(data).hexdigest() == PINNED[case]
    got = decode_payload(data, PayloadExpectation("run-pin", 5, plan, wire, client_id="pin", spec=spec))
    assert got.spec == spec and list(got.params) == list(payload.params)
    for name, sent in payload.params.items():
        if wire.kind == "dense":
            assert got.params[name].dtype == torch.float32
            assert torch.equal(got.params[name], sent)
            continue
        item = got.params[name]
        assert item.shape == sent.shape
        assert item.indices.dtype == torch.int64 and item.values.dtype == torch.float32
        assert torch.equal(item.indices, sent.indices)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[wire.value_dtype]
        want = torch.where(sent.values >= 0, 1.0, -1.0) if wire.one_bit else sent.values.to(dtype).to(torch.float32)
        assert torch.equal(item.values, want)


# ---------------------------------------------------------------------------- vectorised codec == per parameter
import aftermath.optim.payload as payload_module  # noqa: E402


def per_parameter(monkeypatch):
    """Make encode/decode take the per-parameter paths (the reference the vectorised ones must match)."""
    monkeypatch.setattr(payload_module, "_encode_distro", lambda *a, **k: None)
    monkeypatch.setattr(payload_module, "_decode_distro", lambda *a, **k: None)


def random_payload(cfg, spec, plan, wire, seed, step=5, client_id="fz"):
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in param_shapes(cfg, spec).items():
        shape = tuple(shape)
        pc = plan.params[name]
        n, k = pc.n_chunks(shape), pc.topk(wire.topk)
        idx = torch.rand(n, pc.chunk_numel, generator=gen).topk(k, dim=1).indices.sort(dim=1).values
        values = torch.randn(n, k, generator=gen)
        values[torch.rand(n, k, generator=gen) < 0.1] = 0.0
        params[name] = SparseCoefficients(shape, idx, values)
    return Payload("distro", "run-fz", step, client_id, spec, params)


FUZZ_CASES = [("tiny", 1, 64, ()), ("tiny", 3, 64, (("topk", 3),)), ("tiny", 0, 64, (("topk", 20),)),
              ("tiny", 2, 64, (("one_bit", False),)),
              ("tiny", 1, 64, (("one_bit", False), ("value_dtype", "bfloat16"))),
              ("tiny", 1, 32, (("one_bit", False), ("value_dtype", "float16"), ("topk", 5))), ("tiny", "mix", 64, ()),
              ("small", 1, 64, ()), ("small", 0, 64, (("topk", 1),)), ("tiny", 2, 32, (("topk", 40),)),
              ("tiny", 3, 64, (("one_bit", False), ("topk", 70)))]


@pytest.mark.parametrize("case", FUZZ_CASES, ids=str)
def test_vectorised_encoder_matches_per_parameter(monkeypatch, case):
    cfg, spec, plan, wire, _ = _pinned_case(*case)
    payloads = [random_payload(cfg, spec, plan, wire, seed) for seed in range(3)]
    # inputs no real client sends, of one dtype (the vectorised encoder takes them): still the same bytes
    odd = random_payload(cfg, spec, plan, wire, 9)
    for i, item in enumerate(odd.params.values()):
        if i % 4 == 1:
            item.indices = item.indices.reshape(-1)  # 1-D
        if i % 7 == 2:  # too many, one too wide for its field, one negative: their low bits, as pack_bits takes
            item.indices = torch.cat([item.indices.reshape(-1), torch.tensor([5, (1 << 40) + 3, -3])])
        if i % 6 == 4:
            item.values = item.values.reshape(-1)[:-1]  # one value short
    wide = random_payload(cfg, spec, plan, wire, 10)
    for item in wide.params.values():
        item.indices = item.indices.to(torch.int32)
        item.indices[0, 0] = -1
        item.values = item.values.to(torch.float64).requires_grad_()
    mixed = random_payload(cfg, spec, plan, wire, 11)  # mixed dtypes: the per-parameter encoder
    for i, item in enumerate(mixed.params.values()):
        if i % 5 == 0:
            item.indices = item.indices.to(torch.int32)
        if i % 3 == 0:
            item.values = item.values.to(torch.float64)
    vectorised = []
    encode_distro = payload_module._encode_distro
    monkeypatch.setattr(payload_module, "_encode_distro",
                        lambda *a: vectorised.append(r := encode_distro(*a)) or r)
    fast = [encode_payload(p, plan, wire) for p in payloads + [odd, wide, mixed]]
    assert [r is not None for r in vectorised] == [True] * 5 + [False]
    per_parameter(monkeypatch)
    slow = [encode_payload(p, plan, wire) for p in payloads + [odd, wide, mixed]]
    assert fast == slow


def _outcome(data, expected):
    try:
        got = decode_payload(data, expected)
    except PayloadError as exc:
        return "error", str(exc), None
    for item in got.params.values():
        assert item.indices.dtype == torch.int64 and item.values.dtype == torch.float32
        assert item.indices.shape == item.values.shape and item.indices.is_contiguous()
    return "ok", (got.spec, got.client_id, got.step, [(n, p.shape) for n, p in got.params.items()]), got.params


def _same(a, b):
    return a[:2] == b[:2] and (a[2] is None) == (b[2] is None) and (a[2] is None or all(
        torch.equal(a[2][n].indices, b[2][n].indices) and torch.equal(a[2][n].values, b[2][n].values)
        for n in a[2]))


@pytest.mark.parametrize("case", FUZZ_CASES, ids=str)
def test_vectorised_decoder_matches_per_parameter(monkeypatch, case):
    """Valid payloads and many corrupted bodies (random bits flipped, in one place or in several): the vectorised
    decoder accepts exactly what the per-parameter one accepts, with the same result, and otherwise raises the
    same message (the first problem, in parameter order)."""
    cfg, spec, plan, wire, _ = _pinned_case(*case)
    expected = PayloadExpectation("run-fz", 5, plan, wire, client_id="fz", spec=spec)
    data = encode_payload(random_payload(cfg, spec, plan, wire, 1), plan, wire)
    body = 12 + struct.unpack("<I", data[8:12])[0]
    gen = torch.Generator().manual_seed(len(data))
    blobs = [data]
    for trial in range(150):
        bad = bytearray(data)
        for _ in range(1 + trial % 3):
            at = body + int(torch.randint(len(data) - body, (1,), generator=gen))
            bad[at] ^= 1 << int(torch.randint(8, (1,), generator=gen))
        blobs.append(bytes(bad))
    blobs.append(data[:-1] + bytes([data[-1] | 1]))  # the last byte: padding in most layouts
    fast = [_outcome(b, expected) for b in blobs]
    assert fast[0][0] == "ok"
    kinds = {kind for kind, _, _ in fast}
    per_parameter(monkeypatch)
    slow = [_outcome(b, expected) for b in blobs]
    differ = [(a[:2], b[:2]) for a, b in zip(fast, slow) if not _same(a, b)]
    assert not differ, differ[:3]
    assert kinds == {"ok", "error"}  # the corruptions hit both accepted and refused bodies


def test_vectorised_decoder_takes_valid_payloads_without_fallback(monkeypatch):
    calls = []
    strict = payload_module._decode_sections
    monkeypatch.setattr(payload_module, "_decode_sections", lambda *a: calls.append(1) or strict(*a))
    for case in FUZZ_CASES:
        cfg, spec, plan, wire, payload = _pinned_case(*case)
        decode_payload(encode_payload(payload, plan, wire), PayloadExpectation("run-pin", 5, plan, wire))
    assert not calls


def test_layout_cache_is_bounded_and_does_not_keep_plans():
    import gc
    import weakref
    cfg = preset_config("tiny")
    plan, wire = ChunkPlan(cfg), WireFormat()
    expected = PayloadExpectation("run-pin", 5, plan, wire)
    widths = [64, 128, 256, 512]
    for i in range(payload_module._LAYOUTS.per_plan + 10):
        spec = mix_spec(cfg, f"m{i}", [widths[i % 4], widths[i // 4 % 4], widths[i // 16 % 4], 64])
        decode_payload(encode_payload(synthetic_payload(cfg, spec, plan, wire), plan, wire), expected)
    assert len(payload_module._LAYOUTS._plans[plan]) <= payload_module._LAYOUTS.per_plan
    ref = weakref.ref(plan)
    del plan, expected
    gc.collect()
    assert ref() is None


def test_cached_spec_is_still_checked(model):
    """A spec the cache knows passes its checks again; one it does not know is checked in full."""
    opt, spec, data = make(model, tier=1)
    expected = opt.expectation("run-a", 3, client_id="c1")
    decode_payload(data, expected)
    decode_payload(data, expected)  # from the cache
    header, body = split(data)
    for raw, words in [({"tier": 9}, "tier 9"), ({"tier": True}, "integer"), ({"tier": 1.0}, "integer"),
                       ({"tier": 2}, "describes"), ({"name": "odd", "ffn_widths": [200] * 4, "q_heads": [4] * 4,
                                                     "kv_heads": [2] * 4}, "chunks")]:
        for _ in range(2):
            with pytest.raises(PayloadError, match=words):
                decode_payload(join(dict(header, spec=raw), body), expected)
    with pytest.raises(PayloadError, match="assigned"):
        decode_payload(data, opt.expectation("run-a", 3, spec=tier_spec(CFG, 2)))


@pytest.mark.parametrize("case", [FUZZ_CASES[0], FUZZ_CASES[2], FUZZ_CASES[-2]], ids=str)
def test_vectorised_codec_in_small_blocks(monkeypatch, case):
    """Big payloads go through the vectorised codec a block of fields at a time: blocks that cut parameters and
    chunks anywhere give the same bytes and the same decoding."""
    cfg, spec, plan, wire, _ = _pinned_case(*case)
    payload = random_payload(cfg, spec, plan, wire, 4)
    expected = PayloadExpectation("run-fz", 5, plan, wire)
    data = encode_payload(payload, plan, wire)
    whole = _outcome(data, expected)
    bad = bytearray(data)
    bad[-len(data) // 3] ^= 0x10
    bad_whole = _outcome(bytes(bad), expected)
    monkeypatch.setattr(payload_module, "PACK_BLOCK", 37)
    assert encode_payload(payload, plan, wire) == data
    assert _same(_outcome(data, expected), whole) and whole[0] == "ok"
    assert _same(_outcome(bytes(bad), expected), bad_whole)
