"""The "Identity and access" section of the reliability report: the security scenarios
(`pqsu.tools.reliability.security_scenarios`) run against a real Mosquitto and a real coordinator, and
what they measured as a table. `measure(quick)` runs each attack once (quick) or 5 times.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from pqsu.protocol.errors import PqsuError
from pqsu.tools.reliability.security_scenarios import REMOVED, acl_checks, connection_checks, fleet_run, row


def fleet_rows(fleet: dict) -> list[dict]:
    """The fleet run's attacks as rows: `through` = delivered by the broker, `refused` = counted by
    the coordinator under the reason that attack must get."""
    r, through = fleet["repeats"], fleet["through"]
    rejected = [m.get("rejected", {}) for m in fleet["rounds"]] + [{}, {}]
    return [
        row("update forged as another device, on that device's topic (strict ACL)", "broker", r,
             len(through["strict_other_topic"])),
        row("update naming another device, on the forger's own topic", "coordinator", r,
             len(through["own_topic_naming_other"]), reason="topic-mismatch",
             refused=rejected[0].get("topic-mismatch", 0)),
        row("update forged as another device on its topic, signed with the forger's key or unsigned "
             "(permissive ACL)", "coordinator", 2 * r, len(through["permissive_other_topic"]), reason="bad-signature",
             refused=rejected[0].get("bad-signature", 0)),
        row("correctly signed update of a device removed from the keys file", "coordinator", r,
             len(through["removed_signed"]), reason="unknown-device", refused=rejected[1].get("unknown-device", 0)),
        row("removed device reconnects after its user left the password file", "broker", r,
             fleet["removed_reconnected"]),
    ]


def forged_accepted(fleet: dict) -> int:
    """Updates the coordinator counted beyond the real agent's own (it reports each one it uploaded)."""
    return sum(m["uploads"] for m in fleet["rounds"]) - len(fleet["agent_uploaded_rounds"])


def measure(quick: bool) -> dict:
    repeats = 1 if quick else 5
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pqsu-security-") as tmp:
        folder = Path(tmp)
        connections, acl = connection_checks(folder, repeats), acl_checks(folder, repeats)
        fleet = fleet_run(folder, repeats)
    if fleet["cloud_exit"] != 0 or len(fleet["rounds"]) != 2:
        raise PqsuError(f"the security fleet run did not finish (coordinator exit {fleet['cloud_exit']}):\n"
                        + fleet["logs"])
    fleet.pop("logs")
    return {"repeats": repeats, "connections": connections, "acl": acl, "fleet": fleet,
            "attacks": fleet_rows(fleet), "forged_accepted": forged_accepted(fleet),
            "seconds": time.monotonic() - started}


def markdown(result: dict) -> list[str]:
    fleet, yes = result["fleet"], {True: "yes", False: "no"}
    removed_asked = REMOVED in fleet["selected"][1]
    lines = ["## Identity and access", "",
             "A fleet behind a private Mosquitto with TLS only (client certificates from the fleet's CA), a "
             "password per identity and the fleet ACL; a real `pqsu cloud --keys` coordinator and a `pqsu edge "
             f"run` agent, both over TLS with their own identities; {result['repeats']} attempt(s) of each attack "
             f"({result['seconds']:.0f} s, `pqsu.tools.reliability.security`). \"Through\" counts connections "
             "accepted or messages the broker delivered to the reader.", "",
             "| attempt | layer | attempts | through | refused by the coordinator |",
             "|---|---|---:|---:|---|"]
    for item in result["connections"] + result["acl"] + result["attacks"]:
        refused = f"{item['refused']} ({item['reason']})" if "refused" in item else ""
        lines.append(f"| {item['check']} | {item['layer']} | {item['attempts']} | {item['through']} | {refused} |")
    uploads = sum(m["uploads"] for m in fleet["rounds"])
    lines += ["",
              f"Forged updates accepted by the coordinator: {result['forged_accepted']} (updates it counted: "
              f"{uploads}; uploads the real agent reported: {len(fleet['agent_uploaded_rounds'])}).",
              f"Device removed from the keys file between rounds: asked in the next round: {yes[removed_asked]}. "
              f"Removed from the password file (Mosquitto reloaded): open connection closed: "
              f"{yes[fleet['removed_kicked']]}; last will published: {yes[fleet['removed_will_seen']]}.", ""]
    return lines
