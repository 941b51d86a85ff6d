"""Measure fl-pqsu's security and fault tolerance against real processes and a real Mosquitto.

Every figure is measured in this run on this machine; reliability.json and reliability.md under
runs/reliability-<date>/ are generated from those measurements, never edited by hand.

sections:
  security   identity and access: TLS, per-device passwords and the fleet ACL; updates forged as another
             device; a device removed from the fleet while it runs
  faults     the broker and the coordinator SIGKILLed mid-round and restarted, an agent killed mid-training,
             a damaged checkpoint, a checkpoint write that fails
  fuzz       10,000 malformed updates and broken chunk sequences published at a real coordinator (1,000 quick)
  poisoning  one device of ten sends scaled or sign-flipped updates: final accuracy per attack and defence
             (12 federated runs, the longest section)

Sections run into the same --out are merged into one reliability.json (written after each section, so a
later failure keeps the others). With --docs, docs/reliability.md is regenerated from the merged results.
The exit code is 1 if any measured check failed.
"""
from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

from pqsu.tools.lab import results as results_runner

log = logging.getLogger(__name__)
SECTIONS = {"security": "pqsu.tools.reliability.security", "faults": "pqsu.tools.reliability.faults",
            "fuzz": "pqsu.tools.reliability.fuzz", "poisoning": "pqsu.tools.reliability.poisoning"}
DOCS = Path("docs/reliability.md")
REFUSED_CONNECTIONS = ("plain TCP, no TLS", "TLS without a client certificate", "certificate from another CA",
                       "wrong password")
FUZZ_TARGET = 10_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sections", nargs="*", default=list(SECTIONS), metavar="SECTION",
                   help=f"sections to run: {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="small smoke version (used by the tests)")
    p.add_argument("--out", help="output folder (default: runs/reliability-<date>); sections run into the same "
                   "folder are merged into one reliability.json")
    p.add_argument("--docs", action="store_true", help="also regenerate docs/reliability.md from the merged results")
    p.add_argument("--render", action="store_true", help="run nothing: re-render reliability.md (and --docs) from "
                   "the reliability.json in --out")


def run(args: argparse.Namespace) -> int:
    names = results_runner.choose(args.sections, SECTIONS, "section")
    out = results_runner.out_folder(args.out, "reliability")
    merged = out / "reliability.json"
    results = results_runner.load(merged, required=args.render)
    out.mkdir(parents=True, exist_ok=True)
    if not args.render:
        results["machine"] = results_runner.machine()

    def measured(name: str) -> None:
        checks = section_checks(name, results[name])
        log.info("section %s: %d of %d checks passed in %.0f s", name, sum(checks.values()), len(checks),
                 results[name]["seconds"])
    results_runner.run_sections(merged, results, [] if args.render else names,
                                lambda name: importlib.import_module(SECTIONS[name]).measure(args.quick),
                                record_errors=True, stamps={"quick": args.quick}, after=measured)
    text = to_markdown(results)
    (out / "reliability.md").write_text(text)
    if args.docs:
        results_runner.write_docs(DOCS, text)
    print("\n".join(summary_lines(results)))
    print(f"written: {merged}, {out / 'reliability.md'}" + (f", {DOCS}" if args.docs else ""))
    failed = [f"{name}: {check}" for name in SECTIONS if name in results
              for check, ok in section_checks(name, results[name]).items() if not ok]
    for f in failed:
        log.error("check failed: %s", f)
    return 1 if failed else 0


# -- checks: from what each section measured -----------------------------------------------------------------
def section_checks(name: str, r: dict) -> dict[str, bool]:
    """name -> passed, for one section's results (sections without their own `checks` are judged here)."""
    if "error" in r:
        return {"ran": False}
    if name == "faults":
        return {f"{scenario}: {check}": ok for scenario, s in r.items() if isinstance(s, dict)
                for check, ok in s.get("checks", {}).items()}
    if name == "security":
        return _security_checks(r)
    if name == "poisoning":
        return _poisoning_checks(r)
    return dict(r.get("checks", {}))


def _security_figures(r: dict) -> dict:
    """What the checks and the summary need from the security section's rows."""
    from pqsu.tools.reliability.security_scenarios import REMOVED

    rows = {row["check"]: row for row in r["connections"] + r["acl"]}
    unauthorised = [rows[n] for n in REFUSED_CONNECTIONS if n in rows] \
        + [row for row in r["acl"] if "(control)" not in row["check"]] \
        + [row for row in r["attacks"] if row["layer"] == "broker"]
    forged = [row for row in r["attacks"] if row["layer"] == "coordinator"]
    fleet = r["fleet"]
    return {"controls": [row for name, row in rows.items() if "(control)" in name],
            "unauthorised_attempts": sum(row["attempts"] for row in unauthorised),
            "unauthorised_through": sum(row["through"] for row in unauthorised),
            "forged_through": sum(row["through"] for row in forged),
            "forged_refused": sum(row.get("refused", 0) for row in forged),
            "removed_asked_again": REMOVED in fleet["selected"][1], "removed_kicked": fleet["removed_kicked"],
            "removed_reconnected": fleet["removed_reconnected"]}


def _security_checks(r: dict) -> dict[str, bool]:
    f = _security_figures(r)
    return {
        "controls get through": bool(f["controls"]) and all(row["through"] == row["attempts"] for row in f["controls"]),
        "the broker lets no unauthorised connection or publication through": f["unauthorised_through"] == 0,
        "the coordinator refuses every forged update that reaches it, under its reason":
            f["forged_refused"] == f["forged_through"],
        "no forged update accepted": r["forged_accepted"] == 0,
        "a removed device is not asked again, is disconnected and cannot reconnect":
            not f["removed_asked_again"] and f["removed_kicked"] and f["removed_reconnected"] == 0,
    }


def _poisoning_checks(r: dict) -> dict[str, bool]:
    attacked = [c for c in r["cells"] if c["attack"] != "none"]
    robust = [c for c in attacked if c["defence"] != "none"]
    return {
        "every attack reached the server": all(c["poisoned_uploads"] > 0 for c in attacked),
        f"robust final accuracy within {r['target_pt']:g} points of clean": all(
            c["delta_pt_vs_clean"] >= -r["target_pt"] for c in robust),
    }


# -- the report ----------------------------------------------------------------------------------------------
def requirements(results: dict) -> list[tuple[str, str, bool | None, str]]:
    """(requirement, section, met (None: not measured), evidence) for the summary table."""
    def checks(name: str, *prefixes: str) -> bool | None:
        if name not in results:
            return None
        c = section_checks(name, results[name])
        groups = [[v for k, v in c.items() if k.startswith(p)] for p in prefixes] or [list(c.values())]
        return all(g and all(g) for g in groups)  # a group without checks (not run, renamed): not met

    def figures(name: str, make) -> str:
        r = results.get(name)
        if r is None:
            return "not measured"
        if "error" in r:
            return f"failed to run: {r['error'].splitlines()[0][:120]}"
        return make(r) + ("; quick run" if r.get("quick") else "")

    fuzz = results.get("fuzz", {})
    fuzz_ok = checks("fuzz")
    if fuzz_ok and fuzz.get("cases", 0) < FUZZ_TARGET:
        fuzz_ok = False
    return [
        ("Only fleet identities connect (TLS, client certificate, password); a device publishes and reads only its "
         "own topics", "security", checks("security", "controls", "the broker"),
         figures("security", lambda r: "{unauthorised_through} of {unauthorised_attempts} unauthorised connections "
                 "or messages through".format(**_security_figures(r)))),
        ("A forged update is never accepted; each one that reaches the coordinator is refused and counted by reason",
         "security", checks("security", "the coordinator", "no forged"),
         figures("security", lambda r: "{forged_refused} of {forged_through} refused, ".format(**_security_figures(r))
                 + f"{r['forged_accepted']} accepted")),
        ("A device removed from the fleet is no longer asked, refused and disconnected, without a restart",
         "security", checks("security", "a removed device"),
         figures("security", lambda r: "asked again: {}, disconnected: {}, reconnections: {}".format(
             *(_yes(v) for v in map(_security_figures(r).get, ("removed_asked_again", "removed_kicked"))),
             r["fleet"]["removed_reconnected"]))),
        ("Broker killed mid-round: no accepted update lost, none counted twice", "faults",
         checks("faults", "broker_restart"), figures("faults", lambda r: _scenario(
             r, "broker_restart", "{updates_accepted} of {updates_made_by_agents} updates made accepted, "
             "rounds {rounds}"))),
        ("Coordinator killed mid-round: resumes from its checkpoint with exactly the planned rounds", "faults",
         checks("faults", "coordinator_restart"), figures("faults", lambda r: _scenario(
             r, "coordinator_restart", "killed in round {killed_in_round}, resumed after round "
             "{resumed_after_round}, rounds {rounds}, uploads {uploads_per_round}"))),
        ("Agent killed mid-training: the round completes without it; restarted, it resumes its residual", "faults",
         checks("faults", "agent_restart"), figures("faults", lambda r: _scenario(
             r, "agent_restart", "round 2 closed with {round2[uploads]} uploads in {round2[seconds]:.1f} s; "
             "next update equals the one recomputed from its residual: {update_equals_recomputed_with_residual}"))),
        ("A damaged checkpoint or a failed checkpoint write never loses the previous checkpoint", "faults",
         checks("faults", "damaged_checkpoint", "failed_checkpoint_write"), figures("faults", lambda r: _scenario(
             r, "failed_checkpoint_write", "truncated and garbage newest: previous used; write refused ({error}): "
             "round {loaded_round} still loads"))),
        (f"At least {FUZZ_TARGET:,} malformed inputs through the broker: no crash, global model unchanged, every "
         "refusal counted by reason", "fuzz", fuzz_ok,
         figures("fuzz", lambda r: f"{r['cases']:,} sent, {r['counted_total']:,} counted + {r['held_at_round_end']} "
                 f"held, {r['round1']['uploads']} accepted, coordinator exit {r['cloud_exit']}")),
        ("After the storm the coordinator still accepts an honest update", "fuzz",
         checks("fuzz", "honest"), figures("fuzz", lambda r: f"{r['round2']['uploads']} accepted in round 2")),
        ("Poisoning by one device of ten: robust aggregation keeps final accuracy within 2 points of clean",
         "poisoning", checks("poisoning"), figures("poisoning", _poisoning_figures)),
    ]


def _scenario(r: dict, name: str, template: str) -> str:
    s = r.get(name)
    if not isinstance(s, dict) or s.get("checks", {}).get("ran") is False:  # how measure() records a crash
        return f"{name} failed to run: " + (s or {}).get("error", "not run").splitlines()[0][:120]
    return template.format(**{k: _yes(v) if isinstance(v, bool) else v for k, v in s.items()}) \
        + f", {s.get('seconds', '?')} s"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _poisoning_figures(r: dict) -> str:
    robust = [c for c in r["cells"] if c["attack"] != "none" and c["defence"] != "none"]
    if not robust:
        return "no defended cell"
    worst = min(robust, key=lambda c: c["delta_pt_vs_clean"])
    return f"worst robust cell {worst['attack']} / {worst['defence']}: {worst['delta_pt_vs_clean']:+.2f} pt"


def summary_lines(results: dict) -> list[str]:
    verdict = {True: "met", False: "**missed**", None: "not measured"}
    lines = ["| requirement | section | result | measured |", "|---|---|---|---|"]
    lines += [f"| {text} | {section} | {verdict[met]} | {evidence} |"
              for text, section, met, evidence in requirements(results)]
    return lines


TITLES = {"security": "Identity and access", "faults": "Faults", "fuzz": "Bad input through the broker",
          "poisoning": "Poisoning"}


def to_markdown(results: dict) -> str:
    m = results.get("machine", {})
    lines = ["<!-- Generated by `pqsu reliability --docs`; do not edit: rerun `pqsu reliability SECTION --out DIR "
             "--docs`. -->", "# fl-pqsu reliability", "",
             f"Generated by `pqsu reliability --docs` from measurements on this machine ({m.get('cores', '?')} cores, "
             f"Python {m.get('python', '?')}); each section says when it was measured. Do not edit by hand: rerun "
             "`pqsu reliability SECTION --out DIR --docs`.", "", "## Summary", "", *summary_lines(results), ""]
    for name in SECTIONS:
        r = results.get(name)
        if r is None:
            continue
        stamp = f"*Measured {r.get('measured_at', '?')}{', quick mode' if r.get('quick') else ''}, " \
                f"{r.get('seconds', 0):.0f} s.*"
        if "error" in r:
            lines += [f"## {TITLES.get(name, name)}", "", stamp, "", "**The section failed to run:**", "", "```",
                      r["error"], "```", ""]
            continue
        section = importlib.import_module(SECTIONS[name]).markdown(r)
        lines += [section[0], "", stamp, *section[1:]]
    return "\n".join(lines).rstrip() + "\n"
