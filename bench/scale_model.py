"""A model of one training round at internet scale: communication time and bytes for N clients, two data planes.

No network is used: this is arithmetic on exact sizes and assumed link speeds. Every client is of tier 0 (the
universal model), so every client sends the largest payload and, in the aggregate planes, downloads the whole
update (a smaller tier would download only its region of it; the model ignores that).

Sizes, computed from the project's own code (nothing is guessed):
  P  payload of one tier-0 client per round, in the run's DisTrO wire (the embedded default run, or --run-config):
     the v2 layout of aftermath.optim.payload (packed indices of ceil(log2(chunk numel)) bits, 1-bit signs, a
     JSON header). The length is computed from the section sizes; the script checks it against a real
     `encode_payload` of valid coefficients for every model, and the test against payloads that a real
     DistroOptimizer compressed.
  U  the round's update, one blob the coordinator publishes (aftermath/optim/update.py): the sign of every
     parameter's update, 1 bit per element (2 bits for a tensor holding a zero: this model assumes none, so U is
     a lower bound), modelled as ceil(universal parameters / 8) + 64 header bytes + 1 byte per tensor.
  dense bf16 = 2 bytes per parameter, for reference.

The data planes (per round; W witnesses, default 2):
  payloads             every client uploads P to the coordinator and downloads the N - 1 other payloads from it
                       (the protocol today). Coordinator in N*P, out N*(N-1)*P; a client downloads (N-1)*P.
  aggregate            every client uploads P; the coordinator aggregates the accepted set once and every client
                       downloads U. W witnesses also download the N - 1 payloads and recompute U.
                       Coordinator in N*P, out N*U + W*(N-1)*P; a client downloads U, a witness U + (N-1)*P.
  aggregate + object storage
                       as aggregate, but an S3-compatible bucket serves the blobs: the coordinator uploads each
                       payload once and U once (out N*P + U); the bucket serves N*U + W*(N-1)*P (its egress speed is
                       --bucket-egress-mbit, default unlimited).
"max client download" is the download of an ordinary (non-witness) client; witnesses are listed apart. Witnesses
check the update after the fact, so by default their download is not on the round's critical path
(--witnesses-on-critical-path puts it there).

Time (a simple bandwidth model: it ignores TCP slow start, per-request overheads and congestion, and assumes the
coordinator's and bucket's links are shared fairly and fully used, with transfers overlapped):
  communication_s = max(coordinator egress s, coordinator ingress s, bucket egress s,
                        slowest client's download s + upload s) + 2 * rtt
  cpu_s           = cpu_fixed_s + cpu_per_client_s * N    (coordinator CPU per round, measured constants)
  protocol_s      = max(communication_s, cpu_s)
The crossover of a model is the smallest N from which the aggregate plane's client download U is below the
payloads plane's (N - 1) * P: (N - 1) * P > U, i.e. N = floor(U / P) + 2 (exact, integers).

Run:   .venv/bin/python bench/scale_model.py             (writes bench/results/scale-model.json, docs/img/scale-model.png)
       .venv/bin/python bench/scale_model.py --client-down-mbit 1000 --client-up-mbit 100 --rtt-ms 20
       .venv/bin/python bench/scale_model.py --constants measured.json   (measured CPU constants / sizes)
The --constants JSON: {"cpu_fixed_s": 0.05, "cpu_per_client_s": 0.0008, and optionally
  "payload_bytes": {"small": 25403}, "update_bytes": {"small": 1856187}, or the same per model as
  "models": {"small": {"payload_bytes": ..., "update_bytes": ...}}}. Flags given on the command line win over it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CLIENTS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
PLANES = ("payloads", "aggregate", "aggregate + object storage")
MODELS = ("small", "gpt2-124m", "matformer-1b")
# The 1B-class MatFormer: LLaMA-style (TinyLlama-like width 2048, 22 layers, GQA 16 query / 8 KV heads, head
# dim 128, tied 50k vocabulary). FFN 5632 (TinyLlama's) rather than 5504: its tier widths 5632/2816/1408/704 share
# the divisor 64, so every chunk is 64 x 64 (5504's share only 688 = 16 * 43, which forces 43-wide chunks).
MATFORMER_1B = dict(vocab_size=50304, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                    matformer_nest_heads=True)
UPDATE_HEADER_BYTES = 64  # the update blob's magic, version, length and JSON header, as modelled
# The payload header carries run_id, step and client_id: a representative step and client id
HEADER_STEP = 10_000
HEADER_CLIENT_ID = "client-0000"


# ------------------------------------------------------------------------------------------------- sizes
def model_config(name: str) -> Any:
    """The MatFormerConfig of a model of this script: a project preset, or the 1B-class MatFormer."""
    from aftermath.model import MatFormerConfig, preset_config

    if name == "matformer-1b":
        return MatFormerConfig(**MATFORMER_1B)
    return preset_config(name)


def run_wire(run_config: str | None = None) -> tuple[Any, str]:
    """The DistroConfig (wire, chunk) of a run (the embedded default run when None) and its run_id."""
    from aftermath.errors import ConfigError
    from aftermath.optim import DistroConfig
    from aftermath.round.replica import optimizer_config
    from aftermath.runconfig import load_run_config

    run = load_run_config(run_config)
    opt = optimizer_config(run)
    if not isinstance(opt, DistroConfig):
        raise ConfigError(f"the run's optimizer is {run.optimizer.name}; this model is for DisTrO payloads")
    return opt, run.run_id


def payload_header(opt: Any, plan: Any, run_id: str, step: int, client_id: str, tier: int = 0) -> bytes:
    """The JSON header of a v2 payload, byte for byte as `encode_payload` writes it."""
    wire = opt.wire()
    return json.dumps({
        "kind": wire.kind, "run_id": run_id, "step": step, "client_id": client_id, "spec": {"tier": tier},
        "chunk": plan.chunk, "min_chunk": plan.min_chunk, "topk": wire.topk, "one_bit": wire.one_bit,
        "value_dtype": wire.value_dtype}, separators=(",", ":")).encode()


def payload_bytes(cfg: Any, opt: Any, run_id: str, *, step: int = HEADER_STEP, client_id: str = HEADER_CLIENT_ID,
                  tier: int = 0) -> int:
    """Exact length of a tier-`tier` payload: prefix + header + the body sections (which depend on shapes only)."""
    from aftermath.model import tier_spec
    from aftermath.optim import ChunkPlan
    from aftermath.optim.payload import PREFIX, _section_sizes

    plan = ChunkPlan(cfg, opt.chunk, opt.min_chunk)
    shapes = plan.region_shapes(tier_spec(plan.model_config, tier))
    body = sum(size for _, _, size in _section_sizes(plan, opt.wire(), shapes))
    return PREFIX + len(payload_header(opt, plan, run_id, step, client_id, tier)) + body


def synthetic_payload(cfg: Any, opt: Any, run_id: str, *, step: int = HEADER_STEP,
                      client_id: str = HEADER_CLIENT_ID, tier: int = 0) -> tuple[bytes, Any]:
    """A real encoded payload of valid coefficients (indices 0..k-1 of every chunk, signs +1), no gradients: cheap
    at any model size. Returns the bytes and the chunk plan (to decode them)."""
    import torch

    from aftermath.model import tier_spec
    from aftermath.optim import ChunkPlan, Payload, SparseCoefficients, encode_payload

    plan = ChunkPlan(cfg, opt.chunk, opt.min_chunk)
    spec = tier_spec(plan.model_config, tier)
    coeffs = {}
    for name, shape in plan.region_shapes(spec).items():
        pc = plan.params[name]
        n, k = pc.n_chunks(tuple(shape)), pc.topk(opt.topk)
        coeffs[name] = SparseCoefficients(shape=tuple(shape), indices=torch.arange(k).expand(n, k),
                                          values=torch.ones(n, k))
    payload = Payload(kind="distro", run_id=run_id, step=step, client_id=client_id, spec=spec, params=coeffs)
    return encode_payload(payload, plan, opt.wire()), plan


def update_bytes(cfg: Any) -> int:
    """The modelled update blob U: 1 bit per universal parameter + header + 1 tag byte per tensor."""
    from aftermath.model import own_spec, param_shapes, parameter_count

    base = cfg.base()
    return -(-parameter_count(base) // 8) + UPDATE_HEADER_BYTES + len(param_shapes(base, own_spec(base)))


@dataclass(frozen=True)
class ModelSizes:
    name: str
    params: int
    tensors: int
    payload_bytes: int  # P
    update_bytes: int  # U
    dense_bf16_bytes: int
    payload_source: str = "computed"
    update_source: str = "computed"

    def as_dict(self) -> dict[str, Any]:
        return {"params": self.params, "tensors": self.tensors, "payload_bytes": self.payload_bytes,
                "update_bytes": self.update_bytes, "dense_bf16_bytes": self.dense_bf16_bytes,
                "update_over_payload": self.update_bytes / self.payload_bytes,
                "dense_bf16_over_payload": self.dense_bf16_bytes / self.payload_bytes,
                "payload_source": self.payload_source, "update_source": self.update_source}


def model_sizes(name: str, opt: Any, run_id: str, *, verify: bool = True) -> ModelSizes:
    """P, U and the dense bf16 size of a model; `verify` checks P against a real (synthetic) encode."""
    from aftermath.model import own_spec, param_shapes, parameter_count

    cfg = model_config(name)
    p = payload_bytes(cfg, opt, run_id)
    if verify:
        data, _ = synthetic_payload(cfg, opt, run_id)
        if len(data) != p:
            raise AssertionError(f"{name}: the modelled payload is {p} bytes, a real encode {len(data)}")
    n = parameter_count(cfg.base())
    return ModelSizes(name=name, params=n, tensors=len(param_shapes(cfg.base(), own_spec(cfg.base()))),
                      payload_bytes=p, update_bytes=update_bytes(cfg), dense_bf16_bytes=2 * n)


# ------------------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Links:
    """Link speeds in Mbit/s (1 Mbit = 1e6 bits); bucket_egress_mbit 0 = unlimited."""

    coordinator_up_mbit: float = 1000.0
    coordinator_down_mbit: float = 1000.0
    client_down_mbit: float = 100.0
    client_up_mbit: float = 20.0
    rtt_ms: float = 50.0
    bucket_egress_mbit: float = 0.0

    def describe(self) -> str:
        bucket = "unlimited" if not self.bucket_egress_mbit else f"{self.bucket_egress_mbit:g} Mbit/s"
        return (f"coordinator {self.coordinator_up_mbit:g} up / {self.coordinator_down_mbit:g} down Mbit/s, "
                f"clients {self.client_down_mbit:g} down / {self.client_up_mbit:g} up Mbit/s, "
                f"RTT {self.rtt_ms:g} ms, bucket egress {bucket}")


@dataclass(frozen=True)
class Cpu:
    fixed_s: float = 0.05
    per_client_s: float = 0.0008

    def seconds(self, n: int) -> float:
        return self.fixed_s + self.per_client_s * n


def _seconds(nbytes: float, mbit: float) -> float:
    return 0.0 if not mbit else 8.0 * nbytes / (mbit * 1e6)


def plane_round(plane: str, n: int, p: int, u: int, links: Links, cpu: Cpu, *, witnesses: int = 2,
                witnesses_on_critical_path: bool = False) -> dict[str, Any]:
    """Bytes and seconds of one round of `plane` with `n` tier-0 clients (payload `p`, update `u` bytes)."""
    if plane not in PLANES:
        raise ValueError(f"plane {plane!r} is not one of {PLANES}")
    if n < 1:
        raise ValueError(f"need at least one client, got {n}")
    w = min(witnesses, n)
    peers = (n - 1) * p
    coordinator_in = n * p  # every plane: each client uploads its payload to the coordinator
    bucket_out = 0
    if plane == "payloads":
        coordinator_out = n * peers
        client_down = witness_down = peers
    elif plane == "aggregate":
        coordinator_out = n * u + w * peers
        client_down, witness_down = u, u + peers
    else:
        coordinator_out = n * p + u
        bucket_out = n * u + w * peers
        client_down, witness_down = u, u + peers
    up_s = _seconds(p, links.client_up_mbit)
    client_s = _seconds(client_down, links.client_down_mbit) + up_s
    witness_s = _seconds(witness_down, links.client_down_mbit) + up_s
    terms = {
        "coordinator egress": _seconds(coordinator_out, links.coordinator_up_mbit),
        "coordinator ingress": _seconds(coordinator_in, links.coordinator_down_mbit),
        "bucket egress": _seconds(bucket_out, links.bucket_egress_mbit),
        "client link": max(client_s, witness_s) if witnesses_on_critical_path and w else client_s,
    }
    bottleneck = max(terms, key=lambda k: terms[k])
    communication_s = terms[bottleneck] + 2 * links.rtt_ms / 1e3
    cpu_s = cpu.seconds(n)
    return {
        "plane": plane, "clients": n, "witnesses": w if plane != "payloads" else 0,
        "payload_bytes": p, "update_bytes": u if plane != "payloads" else None,
        "coordinator_in_bytes": coordinator_in, "coordinator_out_bytes": coordinator_out,
        "bucket_out_bytes": bucket_out if plane == "aggregate + object storage" else None,
        "max_client_download_bytes": client_down,
        "witness_download_bytes": witness_down if plane != "payloads" else None,
        "client_upload_bytes": p,
        "coordinator_egress_s": terms["coordinator egress"], "coordinator_ingress_s": terms["coordinator ingress"],
        "bucket_egress_s": terms["bucket egress"], "client_s": client_s, "witness_s": witness_s,
        "communication_s": communication_s, "cpu_s": cpu_s, "protocol_s": max(communication_s, cpu_s),
        "bottleneck": bottleneck if communication_s >= cpu_s else "coordinator CPU",
    }


def crossover(p: int, u: int) -> int:
    """The smallest N with (N - 1) * P > U: from there on a client downloads less in the aggregate planes."""
    if p <= 0:
        raise ValueError(f"payload bytes must be positive, got {p}")
    return u // p + 2


def time_crossover(p: int, u: int, links: Links, cpu: Cpu, plane: str, *, witnesses: int = 2,
                   witnesses_on_critical_path: bool = False, n_max: int = 1 << 14,
                   key: str = "communication_s") -> int | None:
    """The smallest N (2..n_max, scanned) from which `plane`'s `key` seconds stay below the payloads plane's (up to
    n_max), or None. `communication_s` leaves out the coordinator CPU term (the same in every plane)."""
    kw = dict(witnesses=witnesses, witnesses_on_critical_path=witnesses_on_critical_path)
    first = None
    for n in range(2, n_max + 1):
        better = plane_round(plane, n, p, u, links, cpu, **kw)[key] < \
            plane_round("payloads", n, p, u, links, cpu, **kw)[key]
        if better and first is None:
            first = n
        elif not better:
            first = None
    return first


def model_rows(sizes: ModelSizes, clients: Sequence[int], links: Links, cpu: Cpu, *, witnesses: int = 2,
               witnesses_on_critical_path: bool = False) -> list[dict[str, Any]]:
    rows = []
    for plane in PLANES:
        for n in clients:
            row = plane_round(plane, n, sizes.payload_bytes, sizes.update_bytes, links, cpu, witnesses=witnesses,
                              witnesses_on_critical_path=witnesses_on_critical_path)
            rows.append({"model": sizes.name, **row})
    return rows


# ------------------------------------------------------------------------------------------------- constants
def load_constants(path: str | Path) -> dict[str, Any]:
    """The measured constants of a --constants JSON: cpu_fixed_s, cpu_per_client_s and per-model size overrides
    ({"payload_bytes": {model: n}, "update_bytes": {model: n}} or {"models": {model: {...}}})."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the constants file must hold a JSON object")
    out: dict[str, Any] = {"payload_bytes": {}, "update_bytes": {}}
    for key in ("cpu_fixed_s", "cpu_per_client_s"):
        if key in data:
            value = data[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{path}: {key} must be a number >= 0, got {value!r}")
            out[key] = float(value)
    for key in ("payload_bytes", "update_bytes"):
        per_model = dict(data.get(key) or {})
        for model, entry in (data.get("models") or {}).items():
            if key in entry:
                per_model[model] = entry[key]
        for model, value in per_model.items():
            if model not in MODELS:
                raise ValueError(f"{path}: {key} names model {model!r}; the models are {list(MODELS)}")
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{path}: {key} of {model} must be a positive integer, got {value!r}")
            out[key][model] = value
    return out


# ------------------------------------------------------------------------------------------------- output
def human_bytes(n: float | None) -> str | None:
    if n is None:
        return None
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n / scale < 100 else f"{n / scale:.0f} {unit}"
    return f"{int(n)} B"


def human_seconds(s: float) -> str:
    return f"{s:.3g}" if s < 100 else f"{s:.0f}"


def plot(path: str | Path, sizes: list[ModelSizes], rows: list[dict[str, Any]], crossovers: dict[str, int],
         links: Links, clients: Sequence[int]) -> Path:
    """Two rows of panels, one column per model: protocol seconds per round, and a client's download per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    styles = {"payloads": dict(color="tab:red", marker="o"),
              "aggregate": dict(color="tab:blue", marker="s"),
              "aggregate + object storage": dict(color="tab:green", marker="^", linestyle="--")}
    fig, axes = plt.subplots(2, len(sizes), figsize=(14, 8), dpi=100, squeeze=False)
    xs = sorted(clients)
    for col, sz in enumerate(sizes):
        mine = [r for r in rows if r["model"] == sz.name]
        top, bottom = axes[0][col], axes[1][col]
        for plane in PLANES:
            pts = sorted((r["clients"], r) for r in mine if r["plane"] == plane)
            top.plot([n for n, _ in pts], [r["protocol_s"] for _, r in pts], label=plane, **styles[plane])
            bottom.plot([n for n, _ in pts], [r["max_client_download_bytes"] for _, r in pts], label=plane,
                        **styles[plane])
        cpu = sorted((r["clients"], r["cpu_s"]) for r in mine if r["plane"] == "payloads")
        top.plot([n for n, _ in cpu], [c for _, c in cpu], color="gray", linestyle=":", label="coordinator CPU")
        wit = sorted((r["clients"], r["witness_download_bytes"]) for r in mine if r["plane"] == "aggregate")
        bottom.plot([n for n, _ in wit], [w for _, w in wit], color="tab:purple", linestyle=":",
                    label="a witness (aggregate planes)")
        bottom.axhline(sz.dense_bf16_bytes, color="gray", linestyle="-.", linewidth=1,
                       label=f"dense bf16 model ({human_bytes(sz.dense_bf16_bytes)})")
        x = crossovers[sz.name]
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(xs)
            ax.set_xticklabels([str(n) for n in xs], fontsize=8)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlim(xs[0] / 1.15, xs[-1] * 1.15)
            ax.grid(True, which="major", alpha=0.3)
            if xs[0] <= x <= xs[-1]:
                ax.axvline(x, color="black", linestyle="--", linewidth=1, label=f"download crossover N = {x}")
            ax.set_xlabel("clients N (all tier 0)")
        top.set_title(f"{sz.name} ({sz.params / 1e6:,.0f}M params)\npayload P = {human_bytes(sz.payload_bytes)}, "
                      f"update U = {human_bytes(sz.update_bytes)}", fontsize=10)
        top.set_ylabel("protocol seconds per round")
        bottom.set_ylabel("a client's download per round")
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v) or ""))
        top.legend(fontsize=7, loc="upper left")
        bottom.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"One round, modelled: {links.describe()}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", metavar="N,N,...", default=",".join(map(str, DEFAULT_CLIENTS)),
                    help="comma-separated client counts N (default %(default)s)")
    ap.add_argument("--models", metavar="M,M,...", default=",".join(MODELS), help="comma-separated models (default %(default)s)")
    ap.add_argument("--coordinator-up-mbit", metavar="MBIT", type=float, default=1000.0, help="coordinator upload Mbit/s (%(default)s)")
    ap.add_argument("--coordinator-down-mbit", metavar="MBIT", type=float, default=1000.0,
                    help="coordinator download Mbit/s (%(default)s)")
    ap.add_argument("--client-down-mbit", metavar="MBIT", type=float, default=100.0, help="client download Mbit/s (%(default)s)")
    ap.add_argument("--client-up-mbit", metavar="MBIT", type=float, default=20.0, help="client upload Mbit/s (%(default)s)")
    ap.add_argument("--rtt-ms", metavar="MS", type=float, default=50.0, help="round-trip time, counted twice a round (%(default)s)")
    ap.add_argument("--bucket-egress-mbit", metavar="MBIT", type=float, default=0.0,
                    help="object storage egress Mbit/s, 0 = unlimited (%(default)s)")
    ap.add_argument("--witnesses", metavar="W", type=int, default=2, help="witnesses W in the aggregate planes (%(default)s)")
    ap.add_argument("--witnesses-on-critical-path", action="store_true",
                    help="the round waits for the witnesses' downloads too (default: they check after the fact)")
    ap.add_argument("--cpu-fixed-s", metavar="S", type=float, default=None, help="coordinator CPU s per round (default 0.05)")
    ap.add_argument("--cpu-per-client-s", metavar="S", type=float, default=None,
                    help="coordinator CPU s per client per round (default 0.0008; replace with the measured value)")
    ap.add_argument("--constants", metavar="PATH", default=None, help="JSON of measured constants (see below); flags win over it")
    ap.add_argument("--run-config", metavar="PATH", default=None, help="run TOML whose DisTrO wire to use (default: the embedded run)")
    ap.add_argument("--out", metavar="PATH", default="bench/results/scale-model.json", help="JSON output (%(default)s)")
    ap.add_argument("--png", metavar="PATH", default="docs/img/scale-model.png", help="plot output (%(default)s)")
    args = ap.parse_args(argv)

    from rich.console import Console

    console = Console(width=200)
    t0 = time.perf_counter()
    try:
        clients = sorted({int(x) for x in args.clients.split(",") if x.strip()})
    except ValueError:
        ap.error(f"--clients must be comma-separated integers, got {args.clients!r}")
    if not clients or clients[0] < 2:
        ap.error("--clients needs values >= 2")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        ap.error(f"--models must name some of {list(MODELS)}, got {args.models!r}")
    if args.witnesses < 0:
        ap.error("--witnesses must be >= 0")
    constants: dict[str, Any] = {"payload_bytes": {}, "update_bytes": {}}
    if args.constants:
        try:
            constants = load_constants(args.constants)
        except (OSError, ValueError) as exc:
            ap.error(f"--constants: {exc}")
    cpu = Cpu(fixed_s=args.cpu_fixed_s if args.cpu_fixed_s is not None else constants.get("cpu_fixed_s", 0.05),
              per_client_s=args.cpu_per_client_s if args.cpu_per_client_s is not None
              else constants.get("cpu_per_client_s", 0.0008))
    links = Links(args.coordinator_up_mbit, args.coordinator_down_mbit, args.client_down_mbit, args.client_up_mbit,
                  args.rtt_ms, args.bucket_egress_mbit)
    opt, run_id = run_wire(args.run_config)

    sizes = []
    for name in models:
        s = model_sizes(name, opt, run_id, verify=True)
        if name in constants["payload_bytes"]:
            s = ModelSizes(**{**s.__dict__, "payload_bytes": constants["payload_bytes"][name],
                              "payload_source": "constants"})
        if name in constants["update_bytes"]:
            s = ModelSizes(**{**s.__dict__, "update_bytes": constants["update_bytes"][name],
                              "update_source": "constants"})
        sizes.append(s)
    kw = dict(witnesses=args.witnesses, witnesses_on_critical_path=args.witnesses_on_critical_path)
    rows = [r for s in sizes for r in model_rows(s, clients, links, cpu, **kw)]
    crossovers = {s.name: crossover(s.payload_bytes, s.update_bytes) for s in sizes}
    time_cross = {s.name: {plane: time_crossover(s.payload_bytes, s.update_bytes, links, cpu, plane, **kw)
                           for plane in PLANES[1:]} for s in sizes}

    size_cols = ["model", "params", "tensors", "P (payload, tier 0)", "U (update)", "dense bf16", "U / P",
                 "bf16 / P"]
    size_rows = [[s.name, f"{s.params:,}", s.tensors, f"{s.payload_bytes:,} B ({human_bytes(s.payload_bytes)})",
                  f"{s.update_bytes:,} B ({human_bytes(s.update_bytes)})",
                  f"{s.dense_bf16_bytes:,} B ({human_bytes(s.dense_bf16_bytes)})",
                  f"{s.update_bytes / s.payload_bytes:.1f}", f"{s.dense_bf16_bytes / s.payload_bytes:.0f}"]
                 for s in sizes]
    cross_cols = ["model", "crossover N (download): (N-1) P > U", "comm-time crossover, aggregate",
                  "comm-time crossover, object storage"]
    cross_rows = [[s.name, crossovers[s.name], time_cross[s.name]["aggregate"],
                   time_cross[s.name]["aggregate + object storage"]] for s in sizes]
    row_cols = ["model", "plane", "N", "coordinator out", "bucket out", "max client download", "witness download",
                "comm s", "cpu s", "protocol s", "bottleneck"]
    table_rows = [[r["model"], r["plane"], r["clients"], human_bytes(r["coordinator_out_bytes"]),
                   human_bytes(r["bucket_out_bytes"]), human_bytes(r["max_client_download_bytes"]),
                   human_bytes(r["witness_download_bytes"]), human_seconds(r["communication_s"]),
                   human_seconds(r["cpu_s"]), human_seconds(r["protocol_s"]), r["bottleneck"]] for r in rows]

    wire = opt.wire()
    console.print(f"wire: top-{wire.topk}, {'1-bit signs' if wire.one_bit else wire.value_dtype + ' values'}, chunk "
                  f"{opt.chunk} (run {run_id!r}); every client tier 0; {links.describe()}; "
                  f"CPU {cpu.fixed_s:g} s + {cpu.per_client_s:g} s x N; W = {args.witnesses}")
    _common.print_table("Sizes per round (P: one client's payload, checked against a real encode)", size_cols,
                        size_rows, console)
    for s in sizes:
        _common.print_table(f"{s.name}: one round", row_cols[1:],
                            [r[1:] for r in table_rows if r[0] == s.name], console)
    _common.print_table("Crossovers (smallest N from which the aggregate planes win; comm time leaves out the "
                        "shared CPU term)", cross_cols, cross_rows, console)

    png = plot(args.png, sizes, rows, crossovers, links, clients)
    params = {"clients": clients, "models": models, "links": links.__dict__, "witnesses": args.witnesses,
              "witnesses_on_critical_path": args.witnesses_on_critical_path,
              "cpu_fixed_s": cpu.fixed_s, "cpu_per_client_s": cpu.per_client_s, "constants": args.constants,
              "tiers": "all clients tier 0", "update_header_bytes": UPDATE_HEADER_BYTES,
              "wire": {"kind": wire.kind, "topk": wire.topk, "one_bit": wire.one_bit, "value_dtype": wire.value_dtype,
                       "chunk": opt.chunk, "min_chunk": opt.min_chunk, "run_id": run_id,
                       "header_step": HEADER_STEP, "header_client_id": HEADER_CLIENT_ID},
              "matformer_1b_config": MATFORMER_1B}
    path = _common.write_json(args.out, {
        "benchmark": "scale-model", "complete": True, "parameters": params,
        "sizes": {s.name: s.as_dict() for s in sizes},
        "crossovers": {s.name: {"download": crossovers[s.name],
                                "closed_form": "floor(U / P) + 2",
                                "communication_time": time_cross[s.name]} for s in sizes},
        "rows": rows, "png": str(png), "wall_seconds": round(time.perf_counter() - t0, 2),
        "markdown": {"sizes": _common.markdown_table(size_cols, size_rows),
                     "crossovers": _common.markdown_table(cross_cols, cross_rows),
                     "rounds": _common.markdown_table(row_cols, table_rows)},
    })
    console.print(f"wrote {path} and {png} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
