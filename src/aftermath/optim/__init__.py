"""Optimisers and the update exchange: DisTrO (DCT + top-k + error feedback), heterogeneous aggregation onto the
universal parameter space, the payload wire format and its codec, dense AdamW and Muon (Newton-Schulz or Polar
Express orthogonalisation) behind one interface (UpdateRule), learning-rate schedules.

A pure library: tensors in, tensors and bytes out. See docs/distro.md and docs/optimizers.md.
"""

from aftermath.optim.aggregate import UpdateTile, aggregate, aggregate_dense, aggregate_distro, iter_distro_tiles
from aftermath.optim.chunks import ChunkPlan, ParamChunking
from aftermath.optim.codec import PayloadCodec
from aftermath.optim.dct import dct_basis, dct_chunks, idct_chunks
from aftermath.optim.dense import DenseConfig, DenseOptimizer
from aftermath.optim.distro import DistroConfig, DistroOptimizer, apply_distro_update
from aftermath.optim.orthogonal import Orthogonalizer, polar_express_coefficients
from aftermath.optim.payload import (Payload, PayloadExpectation, SizeReport, SparseCoefficients, WireFormat,
                                     decode_payload, encode_payload, pack_signs, size_report, unpack_signs)
from aftermath.optim.rule import UpdateRule
from aftermath.optim.schedule import LRSchedule

__all__ = [
    "aggregate", "aggregate_dense", "aggregate_distro", "iter_distro_tiles", "UpdateTile", "ChunkPlan", "ParamChunking", "dct_basis", "dct_chunks",
    "idct_chunks", "DenseConfig", "DenseOptimizer", "Orthogonalizer", "polar_express_coefficients", "DistroConfig", "DistroOptimizer",
    "apply_distro_update", "Payload", "PayloadExpectation", "SizeReport", "SparseCoefficients", "WireFormat",
    "decode_payload", "encode_payload", "pack_signs", "size_report", "unpack_signs", "LRSchedule", "PayloadCodec", "UpdateRule",
]
