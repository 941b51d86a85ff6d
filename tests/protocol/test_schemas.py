"""docs/schemas/*.schema.json against the reference code: what protocol/messages.py builds validates,
what it refuses the schema refuses too (where a schema can say so), and real reports from a run validate."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from pathlib import Path

import pytest

from pqsu.protocol.messages import STATES, Lease, MessageError, RoundTask, Status, done_message, new_job_id
from pqsu.protocol.process import CLI, pqsu_env

jsonschema = pytest.importorskip("jsonschema")

DOCS = Path(__file__).resolve().parents[2] / "docs"
KIT = DOCS / "conformance"
KINDS = ("round", "done", "status", "lease", "metrics")


def validator(kind: str):
    schema = json.loads((DOCS / "schemas" / f"{kind}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


VALIDATORS = {k: validator(k) for k in KINDS}


def errors(kind: str, data: bytes | dict) -> list[str]:
    body = json.loads(data) if isinstance(data, bytes) else data
    return [e.message for e in VALIDATORS[kind].iter_errors(body)]


def test_every_schema_is_draft_2020_12_and_requires_what_the_decoder_requires():
    for kind in KINDS:
        schema = json.loads((DOCS / "schemas" / f"{kind}.schema.json").read_text())
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema.get("additionalProperties", True) is True  # unknown keys allowed: receivers ignore them
    # Exactly the fields without a default are required (plus v and type).
    for kind, cls in (("round", RoundTask), ("status", Status), ("lease", Lease)):
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        schema = json.loads((DOCS / "schemas" / f"{kind}.schema.json").read_text())
        assert set(schema["required"]) == {"v", "type"} | required, kind
        assert set(schema["properties"]) == {"v", "type"} | set(cls.__dataclass_fields__), kind


BUILT = {
    "round": [RoundTask(1, "m"),
              RoundTask(2**32 - 1, "a" * 64, epochs=0.5, batch_size=65536, lr=1e-5, momentum=0.9, time_budget_s=1.5,
                        seed=-3, devices=("pi-1", "pi.2"), deadline=1.7e9, model_bytes=10**9, job=new_job_id(),
                        remaining_s=0.0),
              RoundTask(7, "m", remaining_s=12.25, job="j" * 64)],
    "status": [Status("d", s) for s in STATES] + [Status("d" * 64, "uploaded", 5, "x" * 500, False, 3.25, "j" * 64)],
    "lease": [Lease("j", "pqsu-coordinator-lab-0a1b2c"), Lease(new_job_id(), "c" * 128, "h" * 255, 99, 1.7e9)],
}


@pytest.mark.parametrize("kind", ["round", "status", "lease"])
def test_messages_built_by_the_reference_code_validate(kind):
    for msg in BUILT[kind]:
        assert errors(kind, msg.to_json()) == [], msg


def test_done_messages_validate():
    assert errors("done", done_message(0, "m")) == []
    assert errors("done", done_message(12, "f" * 32, new_job_id())) == []


@pytest.mark.parametrize("name", json.loads((KIT / "index.json").read_text())["messages"])
def test_golden_control_messages_validate(name):
    kind = json.loads((KIT / f"messages/{name}.expected.json").read_text())["type"]
    assert errors(kind, (KIT / f"messages/{name}.json").read_bytes()) == []


def test_golden_metrics_validate():
    assert errors("metrics", (KIT / "messages/metrics.json").read_bytes()) == []


@pytest.mark.parametrize("case", json.loads((KIT / "index.json").read_text())["bad_messages"], ids=lambda c: c["name"])
def test_what_the_reference_decoder_refuses_the_schema_refuses(case):
    data = (KIT / f"messages/bad/{case['name']}.json").read_bytes()
    with pytest.raises(MessageError):
        {"round": RoundTask.from_json, "status": Status.from_json, "lease": Lease.from_json}[case["type"]](data)
    if case["refused_by_schema"]:
        assert errors(case["type"], data) != [], case
    else:  # not JSON at all: nothing for a schema to look at
        with pytest.raises(ValueError):
            json.loads(data)


MORE_REFUSED = [  # (kind, body): refused by messages.py, and the schema must say no too
    ("round", {"v": 1, "type": "round", "round": 2**32, "model_id": "m"}),
    ("round", {"v": 1, "type": "round", "round": 1, "model_id": ""}),
    ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m" * 65}),
    ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m", "batch_size": 0}),
    ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m", "batch_size": 65537}),
    ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m", "epochs": 0}),
    ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m", "time_budget_s": 0}),
    ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m", "devices": [""]}),
    ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m", "devices": ["d" * 65]}),
    ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m", "model_bytes": -1}),
    ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m", "seed": "0"}),
    ("round", {"v": 1, "type": "round", "round": 1, "model_id": "m", "deadline": "soon"}),
    ("round", {"round": 1, "model_id": "m"}),
    ("status", {"v": 1, "type": "status", "device": "", "state": "online"}),
    ("status", {"v": 1, "type": "status", "device": "d", "state": "online", "round": "1"}),
    ("status", {"v": 1, "type": "status", "device": "d", "state": "online", "detail": 5}),
    ("status", {"v": 1, "type": "status", "device": "d", "state": "online", "job": "j" * 65}),
    ("lease", {"v": 1, "type": "lease", "job": "j", "coordinator": "c" * 129}),
    ("lease", {"v": 1, "type": "lease", "job": "j", "coordinator": "c", "host": "h" * 256}),
    ("lease", {"v": 1, "type": "lease", "job": "j", "coordinator": "c", "pid": 1.5}),
]


@pytest.mark.parametrize("kind,body", MORE_REFUSED)
def test_more_refusals_agree(kind, body):
    with pytest.raises(MessageError):
        {"round": RoundTask.from_json, "status": Status.from_json, "lease": Lease.from_json}[kind](
            json.dumps(body).encode())
    assert errors(kind, body) != []


def test_a_schema_accepts_unknown_keys_as_the_decoder_does():
    body = {"v": 1, "type": "round", "round": 1, "model_id": "m", "future": [1, 2], "x-vendor": {"a": None}}
    assert RoundTask.from_json(json.dumps(body).encode()) == RoundTask(1, "m")
    assert errors("round", body) == []


def test_the_metrics_schema_refuses_a_report_without_its_counts():
    rep = json.loads((KIT / "messages/metrics.json").read_bytes())
    for key in ("round", "uploads", "rejected", "bytes_up"):
        assert errors("metrics", {k: v for k, v in rep.items() if k != key}) != [], key
    assert errors("metrics", {**rep, "rejected": {"duplicate": -1}}) != []


@pytest.mark.slow
@pytest.mark.long  # tests/e2e/test_schemas_live.py validates a real run's metrics in the default suite
def test_metrics_of_a_real_simulated_run_validate(tmp_path):
    """`pqsu simulate --out DIR`: every line of metrics.jsonl is a valid report (~15 s)."""
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    args = ["simulate", "--rounds", "2", "--clients", "2", "--samples-per-client", "100", "--proxy-samples", "200",
            "--eval-samples", "200", "--pretrain-epochs", "0.2", "--finetune-epochs", "0", "--out", str(tmp_path)]
    done = subprocess.run(CLI + args, env=pqsu_env(threads=1), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        report = json.loads(line)
        assert errors("metrics", report) == [], report
        assert math.isfinite(report["accuracy"])


def test_what_a_schema_cannot_say_is_documented_and_still_refused_by_the_decoder():
    """JSON Schema counts 1.0 as an integer and cannot bound a message's size: the schema lets these
    through, the reference decoder does not (docs/schemas/round.schema.json says so in its description)."""
    schema = json.loads((DOCS / "schemas" / "round.schema.json").read_text())
    assert "1.0" in schema["description"]
    float_round = {"v": 1, "type": "round", "round": 1.0, "model_id": "m"}
    assert errors("round", float_round) == []
    with pytest.raises(MessageError):
        RoundTask.from_json(json.dumps(float_round).encode())
    huge = {"v": 1, "type": "round", "round": 1, "model_id": "m", "pad": "x" * (64 * 1024)}
    assert errors("round", huge) == []
    with pytest.raises(MessageError):
        RoundTask.from_json(json.dumps(huge).encode())
