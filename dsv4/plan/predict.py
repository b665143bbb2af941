"""Roofline predictions for a deployment: does it fit, and the best latency, throughput and
cost it can reach. Every number is a bound (peak FLOP/s, peak bandwidth, no overheads), so
a measurement must land below the throughput bounds and above the latency bounds."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dsv4.plan.hardware import Hardware
from dsv4.plan.models import ModelSpec

USABLE_MEMORY_FRACTION = 0.9  # activations, runtime and fragmentation take the rest


@dataclass
class Deployment:
    model: ModelSpec
    hardware: Hardware
    devices: int = 8
    tp: int = 1
    ep: int | None = None
    context: int = 1_048_576
    input_len: int = 4096
    output_len: int = 1024
    concurrency: int | None = None  # None: as many sequences as fit
    kv_dtype: str = "bf16"
    indexer_dtype: str = "bf16"
    storage: str | None = None  # None: the hardware's native plan
    price_per_hour_usd: float | None = None
    utilization: float = 0.5

    def __post_init__(self) -> None:
        for name in ("devices", "tp", "context", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.devices % self.tp:
            raise ValueError(f"devices ({self.devices}) must be a multiple of --tp ({self.tp})")
        if self.ep is None:
            self.ep = self.devices
        if self.ep < 1 or self.devices % self.ep:
            raise ValueError(f"devices ({self.devices}) must be a multiple of --ep ({self.ep})")
        if not 0 < self.utilization <= 1:
            raise ValueError(f"utilization must be in (0, 1], got {self.utilization}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.input_len + self.output_len > self.context:
            raise ValueError(f"input_len + output_len ({self.input_len} + {self.output_len}) "
                             f"must fit the context ({self.context} tokens per sequence)")
        price = self.price_per_hour_usd
        if price is not None and not 0 <= price < math.inf:
            raise ValueError(f"price per hour must be a number >= 0, got {price}")


def _comm_s(d: Deployment, tokens: int) -> float:
    """Scale-up traffic time of one forward over `tokens` tokens spread over all devices:
    per layer, a ring all-reduce of the TP group's activations after attention and after the
    MoE (bf16), and each token's k expert copies dispatched (fp8) and combined (bf16)."""
    m = d.model
    link = d.hardware.interconnect_gbps * 1e9
    D, layers = m.hidden_size, m.num_hidden_layers
    group_tokens = tokens * d.tp / d.devices  # attention is data-parallel across TP groups
    tp = layers * 2 * (2 * (d.tp - 1) / d.tp) * group_tokens * D * 2
    ep = layers * (tokens / d.devices) * m.num_experts_per_tok * D * 3 * (d.ep - 1) / d.ep
    return (tp + ep) / link


def predict(d: Deployment) -> dict:
    m, hw = d.model, d.hardware
    plan = d.storage or hw.storage_plan
    price = d.price_per_hour_usd if d.price_per_hour_usd is not None else hw.price_per_hour_usd
    memory = d.devices * hw.memory_gb * 1e9 * USABLE_MEMORY_FRACTION
    weights = m.weight_bytes(plan)
    kv_seq = m.kv_bytes_per_sequence(d.context, d.kv_dtype, d.indexer_dtype)
    free = memory - weights
    max_seqs = max(0, math.floor(free / kv_seq)) if free > 0 else 0
    reasons = []
    if free <= 0:
        reasons.append(f"weights ({weights / 1e9:.0f} GB, {plan}) exceed usable memory "
                       f"({memory / 1e9:.0f} GB on {d.devices} x {hw.id})")
    elif max_seqs == 0:
        reasons.append(f"one {d.context}-token sequence needs {kv_seq / 1e9:.1f} GB of KV cache; "
                       f"{free / 1e9:.1f} GB are left after the weights")
    fits = not reasons
    concurrency = min(d.concurrency or max_seqs, max_seqs) if fits else 0
    peak = hw.peak_flops(plan) * d.devices
    bandwidth = hw.memory_bandwidth_tbps * 1e12 * d.devices

    result = {
        "model": m.name, "hardware": hw.id, "devices": d.devices, "tp": d.tp, "ep": d.ep,
        "context": d.context, "input_len": d.input_len, "output_len": d.output_len,
        "requested_concurrency": d.concurrency, "kv_dtype": d.kv_dtype,
        "indexer_dtype": d.indexer_dtype, "storage_plan": plan, "price_per_hour_usd": price,
        "utilization": d.utilization,
        "total_params": m.total_params, "active_params": m.active_params,
        "mtp_params": m.mtp_params, "weight_bytes": weights,
        "kv_cache_bytes_per_token": m.kv_bytes_per_token(d.kv_dtype, d.indexer_dtype),
        "kv_cache_bytes_per_token_by_layer_type":
            m.kv_bytes_per_token_by_layer_type(d.kv_dtype, d.indexer_dtype),
        "kv_cache_bytes_per_sequence": kv_seq, "usable_memory_bytes": memory,
        "fits": fits, "why_not": reasons, "max_concurrent_sequences": max_seqs,
        "concurrency": concurrency, "hardware_figures": asdict(hw),
    }
    if not fits:
        return result

    # Decode: one step advances `concurrency` sequences by a token at context `context`.
    step_flops = concurrency * m.flops_per_token(d.context)
    step_bytes = m.decode_weight_bytes(concurrency, plan) + \
        concurrency * m.kv_read_bytes_per_token(d.context, d.kv_dtype, d.indexer_dtype)
    compute_s, memory_s = step_flops / peak, step_bytes / bandwidth
    step_s = max(compute_s, memory_s) + _comm_s(d, concurrency)
    decode_tps_device = concurrency / step_s / d.devices
    # Prefill: compute-bound over all devices; a single request also streams the weights once.
    prefill_flops = m.prefill_flops(d.input_len)
    ttft_s = max(prefill_flops / peak, m.decode_weight_bytes(d.input_len, plan) / bandwidth) + \
        _comm_s(d, d.input_len)
    prefill_tps_device = d.input_len / (prefill_flops / hw.peak_flops(plan))
    usd_per_s = price * d.devices / 3600
    result.update({
        "decode_step_compute_s": compute_s, "decode_step_memory_s": memory_s,
        "decode_bound": "compute" if compute_s > memory_s else "memory",
        "tpot_ms_lower_bound": step_s * 1e3,
        "decode_tokens_per_s_per_device": decode_tps_device,
        "decode_tokens_per_s_per_sequence": 1 / step_s,
        "ttft_ms_lower_bound": ttft_s * 1e3,
        "prefill_tokens_per_s_per_device": prefill_tps_device,
        "cost_per_million_output_tokens":
            usd_per_s / (decode_tps_device * d.devices * d.utilization) * 1e6,
        "cost_per_million_input_tokens":
            usd_per_s / (prefill_tps_device * d.devices * d.utilization) * 1e6,
    })
    return result
