"""The hardware catalogue: per-device memory, bandwidth, peak throughput by number format,
scale-up interconnect, power and a default price. Extendable with a JSON file of the same
shape (`--hardware-file`); every entry records its source and whether the figures are the
vendor's own (official) or reported by others."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

CATALOGUE = Path(__file__).with_name("hardware.json")
FORMATS = ("bf16", "fp8", "fp4", "int8")
REQUIRED = ("name", "memory_gb", "memory_bandwidth_tbps", "tflops", "interconnect_gbps",
            "price_per_hour_usd", "source", "figure_kind")


@dataclass
class Hardware:
    id: str
    name: str
    memory_gb: float
    memory_bandwidth_tbps: float
    tflops: dict[str, float]  # dense peak per format; an absent format is unsupported
    interconnect_gbps: float  # scale-up bandwidth per device, one direction
    price_per_hour_usd: float
    source: str
    figure_kind: str
    power_w: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def storage_plan(self) -> str:
        """How V4's FP4+FP8 release runs here: FP4 experts where FP4 is native, converted to
        FP8 where only FP8 is (Hopper, as the reference converter does), W8A8 INT8 where
        neither is (Ascend 910B/910C), else bf16."""
        for fmt, plan in (("fp4", "fp4-fp8"), ("fp8", "fp8"), ("int8", "int8")):
            if fmt in self.tflops:
                return plan
        return "bf16"

    def peak_flops(self, plan: str) -> float:
        """Peak FLOP/s for a storage plan: the format its matmuls run in (an upper bound)."""
        fmt = {"fp4-fp8": "fp4", "fp8": "fp8", "int8": "int8", "bf16": "bf16"}[plan]
        if fmt not in self.tflops:
            raise ValueError(f"{self.id} has no {fmt} support, so it cannot run the {plan!r} "
                             f"storage plan; it supports {sorted(self.tflops)}")
        return self.tflops[fmt] * 1e12


def _validate(hw_id: str, entry: dict, origin: str) -> Hardware:
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        raise ValueError(f"hardware {hw_id!r} in {origin} is missing {missing}")
    if entry["figure_kind"] not in ("official", "reported"):
        raise ValueError(f"hardware {hw_id!r}: figure_kind must be 'official' or 'reported'")
    unknown = set(entry["tflops"]) - set(FORMATS)
    if unknown:
        raise ValueError(f"hardware {hw_id!r}: unknown formats {sorted(unknown)}; use {FORMATS}")
    known = {f for f in Hardware.__dataclass_fields__ if f not in ("id", "extra")}
    fields = {k: v for k, v in entry.items() if k in known}
    return Hardware(id=hw_id, extra={k: v for k, v in entry.items() if k not in known}, **fields)


def load_catalogue(extra_file: str | Path | None = None) -> dict[str, Hardware]:
    entries = {k: _validate(k, v, CATALOGUE.name)
               for k, v in json.loads(CATALOGUE.read_text()).items()}
    if extra_file:
        path = Path(extra_file)
        if not path.is_file():
            raise ValueError(f"--hardware-file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"--hardware-file {path} is not valid JSON: {exc}") from exc
        entries.update({k: _validate(k, v, str(path)) for k, v in data.items()})
    return entries


def get_hardware(hw_id: str, extra_file: str | Path | None = None) -> Hardware:
    catalogue = load_catalogue(extra_file)
    if hw_id not in catalogue:
        raise ValueError(f"unknown hardware {hw_id!r}; known: {', '.join(catalogue)} "
                         "(add more with --hardware-file)")
    return catalogue[hw_id]
