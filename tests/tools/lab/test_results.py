"""The results runner shared by `pqsu bench` and `pqsu reliability`: what a user relies on when running
sections into one folder (earlier sections kept, each saved as soon as it is measured, a clear error
for a bad name or an unreadable file) and --docs touching only the README's generated block."""
from __future__ import annotations

import json

import pytest

from pqsu.protocol.errors import PqsuError
from pqsu.tools.lab import results


def test_names_are_checked_and_kept_once_in_order():
    assert results.choose(["b", "a", "b"], ["a", "b", "c"], "suite") == ["b", "a"]
    with pytest.raises(PqsuError, match=r"^unknown suite\(s\) x, y; choose from a, b$"):
        results.choose(["a", "x", "y"], ["a", "b"], "suite")


def test_sections_merge_into_earlier_results_and_each_is_saved_at_once(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"old": {"figure": 1}}))
    merged = results.load(path)

    def section(name: str) -> dict:
        if name == "broken":
            assert json.loads(path.read_text())["fine"]["figure"] == 2  # saved before the next one started
            raise RuntimeError("no broker")
        return {"figure": 2}
    with pytest.raises(RuntimeError):
        results.run_sections(path, merged, ["fine", "broken"], section)
    saved = json.loads(path.read_text())
    assert saved["old"] == {"figure": 1} and saved["fine"]["figure"] == 2 and "broken" not in saved
    assert saved["fine"]["seconds"] >= 0 and saved["fine"]["measured_at"]

    results.run_sections(path, merged, ["broken"], section, record_errors=True, stamps={"quick": True})
    assert json.loads(path.read_text())["broken"]["error"] == "RuntimeError: no broker"
    assert merged["broken"]["quick"] is True


def test_missing_or_unreadable_results_are_one_line_errors(tmp_path):
    assert results.load(tmp_path / "none.json") == {}
    with pytest.raises(PqsuError, match="none.json does not exist"):
        results.load(tmp_path / "none.json", required=True)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PqsuError, match="bad.json is not readable JSON"):
        results.load(tmp_path / "bad.json")


def test_docs_rewrite_the_doc_and_only_the_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- b -->\nold\n<!-- e -->\nrest\n")
    results.write_docs(tmp_path / "docs" / "x.md", "# x\n", readme, "new\n", ("<!-- b -->", "<!-- e -->"))
    assert (tmp_path / "docs" / "x.md").read_text() == "# x\n"
    assert readme.read_text() == "intro\n<!-- b -->\nnew\n<!-- e -->\nrest\n"
    with pytest.raises(PqsuError, match="README.md has no <!-- b --> ... <!-- e --> block"):
        results.replace_block("no markers", "x", "<!-- b -->", "<!-- e -->")
