"""A radio model for federated rounds: simulated round time = compute + bytes / link rate.

Pure functions over measured figures (each device's training wall time and the bytes it
really sent and received), so the benchmark can say how long training would take to
reach an accuracy over NB-IoT, LTE-M or Wi-Fi.

Link profiles are nominal peak rates (bit/s) of one device's link:

  nbiot  3GPP Rel-13 Cat-NB1: uplink 62.5 kbit/s (multi-tone), downlink 26.2 kbit/s
         (half-duplex, one HARQ process; GSMA "NB-IoT Deployment Guide", 2019, table 2; 3GPP TR 45.820)
  ltem   3GPP Rel-13 Cat-M1: 1 Mbit/s uplink and downlink (GSMA "LTE-M Deployment Guide", 2019)
  wifi   a 2.4 GHz 802.11n link to a board at range: 20 Mbit/s both ways (an assumption, not a standard's peak)
  nbiot-up  NB-IoT's uplink alone, the model download not charged: the design brief states its time target
         "over a simulated 60 kbit/s uplink" (a cell can broadcast one model to every device, or boards may
         fetch it on another link). Shown beside the full up+down figure, never instead of it.

Heterogeneity: every device gets two seeded multipliers, drawn once per (seed, device):
its link rate is the profile's times exp(N(0, rate_sigma^2)) (log-normal, median 1: some
devices sit at the cell edge, some near the tower), and its compute time is the measured
one times exp(N(0, compute_sigma^2)) (boards of the same model differ in clock and load).

A round is synchronous: it lasts as long as its slowest selected device's
compute + download + upload. Server time (aggregation, export) is not counted.

Two views of the downlink, for every scheme alike (VIEWS): "radio", the first model over the
radio (`bytes_down` of a round record: what the devices really downloaded), and "flashed", every
device flashed with the round-0 model over a cable or an SD card (`bytes_down_flashed`: a device's
first download is then the patch from that model, or nothing). Records from before patches carry
only `bytes_down`: their flashed view falls back to it (the same bytes, a full file every round).
A record's per-device `devices[d]["bytes_down"]` / `["bytes_down_flashed"]` are used where present;
else the round's total is shared evenly among its selected devices.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class LinkProfile:
    name: str
    up_bps: float
    down_bps: float
    source: str
    charges_download: bool = True  # False: only the uplink counts (the model reaches the device another way)


PROFILES: dict[str, LinkProfile] = {
    "nbiot": LinkProfile("NB-IoT", 62_500.0, 26_200.0, "3GPP Rel-13 Cat-NB1 peak rates (GSMA NB-IoT Deployment Guide)"),
    "ltem": LinkProfile("LTE-M", 1_000_000.0, 1_000_000.0, "3GPP Rel-13 Cat-M1 peak rates (GSMA LTE-M Deployment Guide)"),
    "wifi": LinkProfile("Wi-Fi", 20_000_000.0, 20_000_000.0, "assumed 802.11n 2.4 GHz link at range"),
    "nbiot-up": LinkProfile("NB-IoT uplink only", 62_500.0, 26_200.0, "the NB-IoT uplink; model download not charged",
                            charges_download=False),
}


@dataclass(frozen=True)
class DeviceFactors:
    rate: float      # multiplies the profile's up and down rates
    compute: float   # multiplies the measured compute time


@dataclass(frozen=True)
class DeviceRound:
    """One selected device's measured part of a round."""

    compute_s: float
    bytes_down: int
    bytes_up: int    # 0 when the device skipped its upload


def device_factors(devices: Sequence[str], seed: int = 0, rate_sigma: float = 0.5,
                   compute_sigma: float = 0.3) -> dict[str, DeviceFactors]:
    """Seeded log-normal (median 1) rate and compute multipliers, one pair per device id.

    A device's pair depends only on (seed, its id), not on which other devices exist."""
    out = {}
    for d in devices:
        digest = hashlib.sha256(f"{seed}/{d}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        z_rate, z_compute = rng.standard_normal(2)
        out[d] = DeviceFactors(float(np.exp(rate_sigma * z_rate)), float(np.exp(compute_sigma * z_compute)))
    return out


def transfer_seconds(nbytes: int, bps: float) -> float:
    return 8.0 * nbytes / bps


def device_seconds(part: DeviceRound, link: LinkProfile, factors: DeviceFactors = DeviceFactors(1.0, 1.0)) -> float:
    """One device's round: its compute, then the model down and its update up, at its own rates."""
    down = transfer_seconds(part.bytes_down, link.down_bps * factors.rate) if link.charges_download else 0.0
    return part.compute_s * factors.compute + down + transfer_seconds(part.bytes_up, link.up_bps * factors.rate)


def round_seconds(parts: Mapping[str, DeviceRound], link: LinkProfile,
                  factors: Mapping[str, DeviceFactors] | None = None) -> float:
    """A synchronous round waits for its slowest selected device."""
    if not parts:
        return 0.0
    return max(device_seconds(p, link, factors[d] if factors else DeviceFactors(1.0, 1.0)) for d, p in parts.items())


def rounds_to_target(accuracies: Sequence[float], target: float) -> int | None:
    """The first round (1-based) whose accuracy reaches `target`; None if none does."""
    return next((i + 1 for i, a in enumerate(accuracies) if a >= target), None)


def time_to_target(round_times: Sequence[float], accuracies: Sequence[float], target: float) -> float | None:
    """Cumulative simulated time until the end of the first round that reaches `target`."""
    k = rounds_to_target(accuracies, target)
    return None if k is None else float(sum(round_times[:k]))


def cumulative(values: Sequence[float]) -> list[float]:
    return [float(v) for v in np.cumsum(values)] if len(values) else []


# -- the two downlink views over round records (metrics.jsonl / the simulator's rounds) ---------------
VIEWS = {"radio": "bytes_down", "flashed": "bytes_down_flashed"}
VIEW_NAMES = {"radio": "first model over the radio", "flashed": "first model flashed"}


def _view_key(view: str) -> str:
    try:
        return VIEWS[view]
    except KeyError:
        raise ValueError(f"unknown downlink view {view!r}: one of {', '.join(VIEWS)}") from None


def bytes_down(record: Mapping, view: str) -> int:
    """A round's downlink bytes, all devices, in `view` ("flashed" falls back to `bytes_down`)."""
    return int(record.get(_view_key(view), record["bytes_down"]))


def device_parts(record: Mapping, view: str) -> dict[str, DeviceRound]:
    """Each selected device's compute, download (in `view`) and upload in one round record."""
    devices: Mapping[str, Mapping] = record.get("devices", {})
    key = _view_key(view)
    shared = bytes_down(record, view) // max(1, record.get("selected") or len(devices))
    out = {}
    for d, v in devices.items():
        if key in v:
            down = v[key]
        elif key in record or "bytes_down" not in v:
            down = shared
        else:                        # a record from before the flashed view: the same bytes as over the radio
            down = v["bytes_down"]
        out[d] = DeviceRound(float(v["seconds"]), int(down), int(v.get("bytes_up", 0)))
    return out


def view_round_times(records: Iterable[Mapping], link: LinkProfile, view: str,
                     factors: Mapping[str, DeviceFactors] | None = None) -> list[float]:
    """Simulated seconds of each round in `view`."""
    return [round_seconds(device_parts(r, view), link, factors) for r in records]


def down_per_device_round(records: Sequence[Mapping], view: str) -> float | None:
    """Downlink bytes per selected device per round in `view` (None: no device was ever selected)."""
    selected = sum(r["selected"] for r in records)
    return sum(bytes_down(r, view) for r in records) / selected if selected else None


def downloads(records: Sequence[Mapping]) -> dict[str, int] | None:
    """How many downloads were patches and how many full files; None when no record counts them."""
    if not any("downloads" in r for r in records):
        return None
    return {k: sum(int(r.get("downloads", {}).get(k, 0)) for r in records) for k in ("patch", "full")}
