"""bench/scale_model.py: the sizes it models are those of real payloads, its crossover closed form agrees with the
grid, the coordinator's bytes grow as the data planes say, and the script writes its JSON and PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import scale_model  # noqa: E402

from aftermath.model import param_shapes, preset_config, tier_spec  # noqa: E402
from aftermath.optim import DistroOptimizer, Payload, decode_payload, encode_payload  # noqa: E402
from aftermath.optim.payload import PayloadExpectation  # noqa: E402

STEP, CLIENT = 1234, "sim-7"


@pytest.fixture(scope="module")
def wire():
    return scale_model.run_wire()


def real_payload(preset: str, opt, run_id: str, gen: torch.Generator | None) -> bytes:
    """A payload as a client builds it: DistroOptimizer.compress of a gradient, then encode_payload."""
    cfg = preset_config(preset)
    spec = tier_spec(cfg, 0)
    shapes = param_shapes(cfg, spec)
    optimizer = DistroOptimizer(opt, cfg, spec, {n: torch.zeros(s) for n, s in shapes.items()})
    # random gradients for small; gpt2-124m's 124M values are zero (cheap; the size depends on the shapes only)
    grads = {n: torch.randn(s, generator=gen) if gen is not None else torch.zeros(s) for n, s in shapes.items()}
    coeffs = optimizer.compress(grads, 0)
    payload = Payload(kind="distro", run_id=run_id, step=STEP, client_id=CLIENT, spec=spec, params=dict(coeffs))
    return encode_payload(payload, optimizer.plan, optimizer.config.wire())


@pytest.mark.parametrize("preset", ["small", "gpt2-124m"])
def test_payload_size_is_a_real_payload(preset: str, wire) -> None:
    opt, run_id = wire
    gen = torch.Generator().manual_seed(0) if preset == "small" else None
    data = real_payload(preset, opt, run_id, gen)
    cfg = preset_config(preset)
    assert scale_model.payload_bytes(cfg, opt, run_id, step=STEP, client_id=CLIENT) == len(data)
    # the synthetic payload of the model is a real one too: same length, and the strict decoder accepts it
    synthetic, plan = scale_model.synthetic_payload(cfg, opt, run_id, step=STEP, client_id=CLIENT)
    assert len(synthetic) == len(data)
    decoded = decode_payload(synthetic, PayloadExpectation(run_id=run_id, step=STEP, plan=plan, wire=opt.wire()))
    assert decoded.spec.tier == 0 and len(decoded.params) == len(param_shapes(cfg, tier_spec(cfg, 0)))
    # what the script uses (the representative header) differs only in the header's step and client id
    sizes = scale_model.model_sizes(preset, opt, run_id)
    header_delta = len(str(scale_model.HEADER_STEP)) - len(str(STEP)) + len(scale_model.HEADER_CLIENT_ID) - len(CLIENT)
    assert sizes.payload_bytes == len(data) + header_delta
    assert sizes.dense_bf16_bytes == 2 * sizes.params
    assert sizes.update_bytes == -(-sizes.params // 8) + scale_model.UPDATE_HEADER_BYTES + sizes.tensors
    # DisTrO top-4 of 64 x 64 chunks: the payload is far below the 1-bit update and the dense model
    assert 50 * sizes.payload_bytes < sizes.update_bytes < sizes.dense_bf16_bytes // 10


def test_update_size_matches_the_update_blob_when_present(wire) -> None:
    """U as modelled against the coordinator's real update blob (aftermath.optim.update, if this tree has it):
    equal up to the header's size (the model counts 64 bytes) and the per-tensor byte rounding."""
    update = pytest.importorskip("aftermath.optim.update")
    from aftermath.optim import ChunkPlan

    opt, run_id = wire
    cfg = preset_config("small")
    plan = ChunkPlan(cfg, opt.chunk, opt.min_chunk)
    params = {n: torch.ones(pc.universal_shape, dtype=torch.int8) for n, pc in plan.params.items()}
    blob = update.encode_update(update.RoundUpdate(kind="sign", run_id=run_id, step=STEP, accepted="0" * 64,
                                                   params=params), plan)
    modelled = scale_model.update_bytes(cfg)
    assert abs(len(blob) - modelled) <= 128 + len(plan.params)


@pytest.mark.parametrize("p,u", [(25_417, 1_856_232), (197_326, 15_448_590), (1000, 5000), (1000, 5500),
                                 (7, 10**6 + 3)])
def test_crossover_closed_form_agrees_with_the_grid(p: int, u: int) -> None:
    x = scale_model.crossover(p, u)
    links, cpu = scale_model.Links(), scale_model.Cpu()

    def download(plane: str, n: int) -> int:
        return scale_model.plane_round(plane, n, p, u, links, cpu)["max_client_download_bytes"]

    assert (x - 1) * p > u >= (x - 2) * p  # the smallest such N
    grid = sorted({2, 3, 16, 32, 64, 128, 256, 512, 1024, 4096, x - 1, x, x + 1} - {1})
    above = [n for n in grid if n >= x]
    below = [n for n in grid if n < x]
    assert above and below
    for plane in ("aggregate", "aggregate + object storage"):
        assert download(plane, above[0]) < download("payloads", above[0])
        assert not download(plane, below[-1]) < download("payloads", below[-1])
        for n in grid:  # on the whole grid, the aggregate planes win exactly from the crossover on
            assert (download(plane, n) < download("payloads", n)) == (n >= x)


def test_coordinator_bytes_grow_as_the_planes_say() -> None:
    p, u, w = 25_417, 1_856_232, 2
    links, cpu = scale_model.Links(), scale_model.Cpu()

    def out(plane: str, n: int) -> dict:
        return scale_model.plane_round(plane, n, p, u, links, cpu, witnesses=w)

    ns = [16, 32, 64, 128, 1024, 4096]
    for n in ns:
        assert out("payloads", n)["coordinator_out_bytes"] == n * (n - 1) * p
        assert out("payloads", n)["coordinator_in_bytes"] == n * p
        assert out("aggregate", n)["coordinator_out_bytes"] == n * u + w * (n - 1) * p
        assert out("aggregate + object storage", n)["coordinator_out_bytes"] == n * p + u
        assert out("aggregate + object storage", n)["bucket_out_bytes"] == n * u + w * (n - 1) * p
        assert out("aggregate", n)["witness_download_bytes"] == u + (n - 1) * p
    # payloads: quadratic (doubling N about quadruples it); object storage: linear (equal second differences)
    quad = [out("payloads", n)["coordinator_out_bytes"] for n in ns]
    assert all(4 < b / a < 4.2 for a, b, n0, n1 in zip(quad, quad[1:], ns, ns[1:]) if n1 == 2 * n0)
    lin = [out("aggregate + object storage", n)["coordinator_out_bytes"] for n in range(10, 15)]
    assert len({b - a for a, b in zip(lin, lin[1:])}) == 1 and lin[1] - lin[0] == p
    sq = [out("payloads", n)["coordinator_out_bytes"] for n in range(10, 15)]
    assert len({(c - b) - (b - a) for a, b, c in zip(sq, sq[1:], sq[2:])}) == 1 and sq[2] - 2 * sq[1] + sq[0] == 2 * p


def test_time_model() -> None:
    links = scale_model.Links(coordinator_up_mbit=800, coordinator_down_mbit=400, client_down_mbit=80,
                              client_up_mbit=8, rtt_ms=40)
    cpu = scale_model.Cpu(fixed_s=0.1, per_client_s=0.01)
    p, u, n = 10**6, 5 * 10**7, 100
    r = scale_model.plane_round("payloads", n, p, u, links, cpu)
    assert r["coordinator_egress_s"] == pytest.approx(8 * n * (n - 1) * p / 800e6)
    assert r["coordinator_ingress_s"] == pytest.approx(8 * n * p / 400e6)
    assert r["client_s"] == pytest.approx(8 * (n - 1) * p / 80e6 + 8 * p / 8e6)
    assert r["communication_s"] == pytest.approx(r["coordinator_egress_s"] + 0.08)
    assert r["cpu_s"] == pytest.approx(1.1) and r["protocol_s"] == r["communication_s"]
    # object storage: the client link binds; the bucket is unlimited unless given a speed
    r = scale_model.plane_round("aggregate + object storage", n, p, u, links, cpu)
    assert r["bucket_egress_s"] == 0 and r["bottleneck"] == "client link"
    assert r["communication_s"] == pytest.approx(8 * u / 80e6 + 8 * p / 8e6 + 0.08)
    slow_bucket = scale_model.Links(**{**links.__dict__, "bucket_egress_mbit": 1000})
    r = scale_model.plane_round("aggregate + object storage", n, p, u, slow_bucket, cpu)
    assert r["bottleneck"] == "bucket egress"
    assert r["communication_s"] == pytest.approx(8 * (n * u + 2 * (n - 1) * p) / 1000e6 + 0.08)
    # a witness on the critical path slows the round; the CPU term can bind
    on = scale_model.plane_round("aggregate + object storage", 4, p, u, links, cpu, witnesses_on_critical_path=True)
    off = scale_model.plane_round("aggregate + object storage", 4, p, u, links, cpu)
    assert on["communication_s"] > off["communication_s"]
    busy = scale_model.plane_round("aggregate", 4, p, 10, links, scale_model.Cpu(fixed_s=100.0, per_client_s=0.0))
    assert busy["protocol_s"] == 100.0 and busy["bottleneck"] == "coordinator CPU"


def test_main_writes_json_and_png(tmp_path: Path) -> None:
    out, png = tmp_path / "model.json", tmp_path / "img" / "model.png"
    constants = tmp_path / "constants.json"
    constants.write_text(json.dumps({"cpu_fixed_s": 0.2, "cpu_per_client_s": 0.01,
                                     "models": {"gpt2-124m": {"update_bytes": 20_000_000}}}))
    assert scale_model.main(["--clients", "16,64,128,512", "--models", "small,gpt2-124m", "--constants",
                             str(constants), "--cpu-fixed-s", "0.3", "--out", str(out), "--png", str(png)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "scale-model" and data["complete"] is True
    assert data["parameters"]["cpu_fixed_s"] == 0.3 and data["parameters"]["cpu_per_client_s"] == 0.01
    assert len(data["rows"]) == 2 * 3 * 4
    small, gpt2 = data["sizes"]["small"], data["sizes"]["gpt2-124m"]
    assert gpt2["update_bytes"] == 20_000_000 and gpt2["update_source"] == "constants"
    for name, s in data["sizes"].items():
        assert data["crossovers"][name]["download"] == s["update_bytes"] // s["payload_bytes"] + 2
    row = next(r for r in data["rows"] if r["model"] == "small" and r["plane"] == "payloads" and r["clients"] == 64)
    assert row["coordinator_out_bytes"] == 64 * 63 * small["payload_bytes"]
    assert row["cpu_s"] == pytest.approx(0.3 + 0.01 * 64)
    assert "| model |" in data["markdown"]["crossovers"] and "| small |" in data["markdown"]["sizes"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
