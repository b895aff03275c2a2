"""A round's update blob (aftermath.optim.update): applying the coordinator's universal update gives every
replica the bits it gets by aggregating the payloads itself, for every update rule and tier; the wire is strict."""

from __future__ import annotations

import struct

import pytest
import torch

from aftermath.errors import PayloadError
from aftermath.model import build_model, preset_config, tier_spec
from aftermath.model.slicing import sliced_model
from aftermath.optim.update import (MAGIC, RoundUpdate, accepted_digest, decode_update, encode_update,
                                    expected_update_bytes)
from aftermath.round.replica import Replica
from aftermath.runconfig import RunConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = preset_config("tiny")
RULES = {
    "distro": {"name": "distro"},
    "distro-raw": {"name": "distro", "distro": {"apply_mode": "raw", "one_bit": False}},
    "adamw": {"name": "adamw"},
    "muon": {"name": "muon"},
}


def replica(run: RunConfig, tier: int | None) -> Replica:
    """tier None: the coordinator's universal replica; else a client's sliced one."""
    model = build_model(CFG, seed=0)
    if tier:
        model = sliced_model(model, tier_spec(CFG, tier))
    return Replica.build(model, CFG, tier_spec(CFG, tier or 0), run)


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_published_update_gives_every_replica_the_bits_of_its_own_aggregation(rule):
    run = RunConfig.model_validate({"optimizer": RULES[rule]})
    coordinator = replica(run, None)
    # two clients of every tier: one aggregates the payloads itself, the other applies the update blob
    own = {t: replica(run, t) for t in (0, 1, 2)}
    blob_fed = {t: replica(run, t) for t in (0, 1, 2)}
    for step in range(3):
        blobs = [(f"c{t}", t, own[t].encode(own[t].train(batch(10 * step + t), 2, step=step, client_id=f"c{t}").grads, step, f"c{t}"))
                 for t in (0, 1, 2)]
        payloads = [coordinator.decode(data, step, cid, tier_spec(CFG, t)) for cid, t, data in blobs]
        update = coordinator.round_update(payloads, step, accepted_digest([(c, "0" * 64) for c, _, _ in blobs]))
        data = encode_update(update, coordinator.rule.codec.plan)
        coordinator.apply_update(coordinator.decode_update(data, step), step)
        for t in (0, 1, 2):
            mine = [own[t].decode(d, step, cid, tier_spec(CFG, tt)) for cid, tt, d in blobs]
            own[t].apply(mine, step)
            blob_fed[t].apply_update(blob_fed[t].decode_update(data, step), step)
        # the coordinator's own replica followed the same trajectory as everyone
        for t in (0, 1, 2):
            assert own[t].weights_sha256() == blob_fed[t].weights_sha256() == \
                coordinator.weights_sha256(tier_spec(CFG, t)), (rule, step, t)
        if rule.startswith("distro") and rule != "distro-raw":
            # ~1 bit per parameter: the size the data plane 'auto' weighs
            assert abs(len(data) - expected_update_bytes(coordinator.rule.codec.plan, "sign")) < 256


def test_a_region_update_computed_by_a_witness_matches_the_universal_one_on_its_region():
    run = RunConfig()
    coordinator, witness = replica(run, None), replica(run, 1)
    senders = {t: replica(run, t) for t in (0, 1)}
    blobs = [(f"c{t}", t, s.encode(s.train(batch(t), 2, step=0, client_id=f"c{t}").grads, 0, f"c{t}")) for t, s in senders.items()]
    universal = coordinator.round_update([coordinator.decode(d, 0, c, tier_spec(CFG, t)) for c, t, d in blobs],
                                         0, "a" * 64)
    region = witness.round_update([witness.decode(d, 0, c, tier_spec(CFG, t)) for c, t, d in blobs], 0, "a" * 64)
    for name, t in region.params.items():
        assert t.dtype == torch.int8
        assert torch.equal(t, universal.params[name][tuple(slice(0, n) for n in t.shape)]), name
    assert any(tuple(t.shape) != tuple(universal.params[n].shape) for n, t in region.params.items())


def test_accepted_digest_depends_on_the_set_not_its_order():
    pairs = [("b", "1" * 64), ("a", "2" * 64)]
    assert accepted_digest(pairs) == accepted_digest(pairs[::-1])
    assert accepted_digest(pairs) != accepted_digest(pairs[:1])
    assert accepted_digest(pairs) != accepted_digest([("b", "1" * 64), ("a", "3" * 64)])


# ------------------------------------------------------------------------------------------ the wire
def _update(kind: str, fill: str) -> tuple[bytes, object]:
    run = RunConfig()
    plan = replica(run, None).rule.codec.plan
    gen = torch.Generator().manual_seed(0)
    params = {}
    for name, pc in plan.params.items():
        if kind == "float":
            params[name] = torch.randn(pc.universal_shape, generator=gen)
        elif fill == "zeros":
            params[name] = torch.zeros(pc.universal_shape, dtype=torch.int8)
        else:
            low = -1 if fill == "ternary" else 0
            t = torch.randint(low, 2, pc.universal_shape, generator=gen).to(torch.int8)
            params[name] = t if fill == "ternary" else t * 2 - 1
    update = RoundUpdate(kind=kind, run_id="aftermath-run", step=3, accepted="f" * 64, params=params)
    return encode_update(update, plan), (plan, update)


@pytest.mark.parametrize("kind,fill", [("sign", "signs"), ("sign", "ternary"), ("sign", "zeros"), ("float", "")])
def test_round_trip_is_exact(kind, fill):
    data, (plan, update) = _update(kind, fill)
    back = decode_update(data, plan, run_id="aftermath-run", step=3, kind=kind)
    assert back.accepted == "f" * 64 and back.kind == kind
    for name, t in update.params.items():
        assert torch.equal(back.params[name], t), name
    tag = data[len(MAGIC) + 5 + struct.unpack_from("<I", data, len(MAGIC) + 1)[0]]
    if kind == "sign":  # the section tag says how the directions are stored
        assert tag == {"signs": 1, "ternary": 2, "zeros": 0}[fill]


def _header_end(data: bytes) -> int:
    return len(MAGIC) + 5 + struct.unpack_from("<I", data, len(MAGIC) + 1)[0]


def _with_header(data: bytes, header: bytes) -> bytes:
    return data[:len(MAGIC) + 1] + struct.pack("<I", len(header)) + header + data[_header_end(data):]


@pytest.mark.parametrize("case,match", [
    ("magic", "magic"), ("version", "version"), ("truncated", "truncated"), ("extra", "after its last section"),
    ("step", "step"), ("run", "run_id"), ("kind", "kind"), ("keys", "exactly the keys"), ("tag", "section tag"),
    ("code3", "invalid code"), ("json", "not JSON"), ("cap", "exceeds the cap"),
])
def test_malformed_update_blobs_are_refused_by_name(case, match):
    data, (plan, _) = _update("sign", "ternary")
    start = _header_end(data)
    header = data[len(MAGIC) + 5:start]
    kwargs = dict(run_id="aftermath-run", step=3, kind="sign")
    if case == "magic":
        data = b"AFTMUPD" + data[len(MAGIC):]
    elif case == "version":
        data = data[:len(MAGIC)] + bytes([9]) + data[len(MAGIC) + 1:]
    elif case == "truncated":
        data = data[:-1]
    elif case == "extra":
        data = data + b"\0"
    elif case == "step":
        kwargs["step"] = 4
    elif case == "run":
        kwargs["run_id"] = "other"
    elif case == "kind":
        kwargs["kind"] = "float"
    elif case == "keys":
        data = _with_header(data, header[:-1] + b',"more":1}')
    elif case == "tag":
        data = data[:start] + bytes([7]) + data[start + 1:]
    elif case == "code3":
        data = data[:start + 1] + bytes([0xFF]) + data[start + 2:]
    elif case == "json":
        data = _with_header(data, b"{not json")
    elif case == "cap":
        kwargs["max_bytes"] = len(data) - 1
    with pytest.raises(PayloadError, match=match):
        decode_update(data, plan, **kwargs)


@pytest.mark.parametrize("fill,tag", [("signs", 1), ("ternary", 2)])
def test_non_zero_padding_bits_are_refused(fill, tag):
    # tensors of 3 and 5 elements leave padding in both encodings (the plan is geometry only: names and shapes)
    from types import SimpleNamespace

    plan = SimpleNamespace(params={"a": SimpleNamespace(universal_shape=(3,)),
                                   "b": SimpleNamespace(universal_shape=(5,))})
    values = {"a": torch.tensor([1, -1, 1], dtype=torch.int8),
              "b": torch.tensor([1, 0 if fill == "ternary" else 1, -1, 1, -1], dtype=torch.int8)}
    data = encode_update(RoundUpdate("sign", "r", 0, "0" * 64, values), plan)
    assert decode_update(data, plan, run_id="r", step=0, kind="sign").params["b"].tolist() == values["b"].tolist()
    with pytest.raises(PayloadError, match="padding"):
        decode_update(data[:-1] + bytes([data[-1] | 1]), plan, run_id="r", step=0, kind="sign")
