"""Compare two JUnit XML reports of Lightning's tests: without and with trainctl's plugins.

Run by ``scripts/lightning_suite.sh``::

    python scripts/lightning_suite_compare.py WITHOUT.xml WITH.xml --ref 2.6.5 --installed 2.6.6

Prints the totals of each run, the excluded tests with their reasons, the tests whose outcome
changed (and the tests that exist only in the run with our plugins: MetricsReporter's rows of
the logger matrix), then one JSON line. Exit code 1 when an outcome changed for the worse or a
test added with our plugins did not pass, 2 when a report is missing or unreadable.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_suite_plugin import EXCLUDED

__all__ = ["OUTCOMES", "Result", "compare", "main", "read_report"]

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed")
# Outcomes that are fine wherever they appear (a skip or an expected failure in both runs is
# the same verdict; a pass that became a skip is still reported as a change).
_GOOD = {"passed", "skipped", "xfailed"}

Result = tuple[str, str]  # (outcome, first line of the failure or skip message)


def _test_id(classname: str, name: str, root: Path | None) -> str:
    """``tests_pytorch/<file>.py::[Class::]name`` from JUnit's dotted classname."""
    parts = classname.split(".")
    if parts and parts[0] == "tests":
        parts = parts[1:]
    # The dotted name is the module path, possibly followed by test classes: take the longest
    # prefix that is a file in the extracted tree (without one, assume no class).
    split = len(parts)
    if root is not None:
        for n in range(len(parts), 0, -1):
            if (root / Path(*parts[:n])).with_suffix(".py").is_file():
                split = n
                break
    module = "/".join(parts[:split]) + ".py"
    return "::".join([module, *parts[split:], name])


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def read_report(path: Path, root: Path | None = None) -> dict[str, Result]:
    """Test id -> (outcome, message) for every test case in one JUnit XML report."""
    results: dict[str, Result] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = _test_id(case.get("classname", ""), case.get("name", ""), root)
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if failure is not None:
            outcome, node = "failed", failure
        elif error is not None:
            outcome, node = "error", error
        elif skipped is not None:
            outcome, node = ("xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"), skipped
        else:
            outcome, node = "passed", None
        message = ""
        if node is not None:
            message = _first_line(node.get("message")) or _first_line(node.text)
        if test_id in results and results[test_id][0] != "passed" and outcome == "passed":
            continue  # a test reported twice (a teardown error after a pass): keep the bad one
        results[test_id] = (outcome, message)
    return results


def totals(results: dict[str, Result]) -> dict[str, int]:
    counts = dict.fromkeys(OUTCOMES, 0)
    for outcome, _ in results.values():
        counts[outcome] += 1
    counts["total"] = len(results)
    return counts


def compare(without: dict[str, Result], with_: dict[str, Result]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(changed, added): tests in both runs whose outcome differs; tests only in the run with our plugins."""
    changed = [
        {"test": t, "without": without[t][0], "with": with_[t][0], "message": with_[t][1] or without[t][1]}
        for t in sorted(without.keys() & with_.keys())
        if without[t][0] != with_[t][0]
    ]
    added = [{"test": t, "with": with_[t][0], "message": with_[t][1]} for t in sorted(with_.keys() - without.keys())]
    missing = [
        {"test": t, "without": without[t][0], "with": "missing", "message": ""} for t in sorted(without.keys() - with_.keys())
    ]
    return changed + missing, added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("without", type=Path)
    parser.add_argument("with_", metavar="with", type=Path)
    parser.add_argument("--ref", required=True, help="the Lightning ref the tests come from")
    parser.add_argument("--installed", required=True, help="the installed Lightning version")
    parser.add_argument("--tests-root", type=Path, help="the extracted tests/ folder, to tell modules from test classes")
    parser.add_argument("--deselected", type=Path, help="the test ids the plugin deselected (JSON list)")
    args = parser.parse_args(argv)

    reports = {}
    for label, path in (("without", args.without), ("with", args.with_)):
        try:
            reports[label] = read_report(path, args.tests_root)
        except (OSError, ET.ParseError) as e:
            print(f"lightning_suite: cannot read the {label} run's report {path}: {e}", file=sys.stderr)
            return 2
    changed, added = compare(reports["without"], reports["with"])

    deselected: list[str] = []
    if args.deselected is not None and args.deselected.is_file():
        deselected = json.loads(args.deselected.read_text())
    print(f"\nexcluded from both runs ({len(deselected)} tests):")
    for test, reason in EXCLUDED.items():
        n = sum(1 for d in deselected if d.split("[")[0].endswith(test))
        print(f"  {test} ({n}): {reason}")
    for label in ("without", "with"):
        counts = totals(reports[label])
        print(f"{label + ':':9} " + ", ".join(f"{counts[k]} {k}" for k in (*OUTCOMES, "total")))
    print(f"\noutcome changed ({len(changed)}):")
    for row in changed:
        print(f"  {row['test']}: {row['without']} -> {row['with']}" + (f"  | {row['message']}" if row["message"] else ""))
    both_bad = [
        t
        for t in sorted(reports["without"].keys() & reports["with"].keys())
        if reports["without"][t][0] not in _GOOD and reports["with"][t][0] not in _GOOD
    ]
    print(f"\nfailed in both runs, so not a change (the harness or the ref/installed mismatch; {len(both_bad)}):")
    for t in both_bad:
        print(f"  {t}: {reports['without'][t][0]}  | {reports['without'][t][1]}")
    print(f"\nonly with our plugins ({len(added)}):")
    for row in added:
        print(
            f"  {row['test']}: {row['with']}" + (f"  | {row['message']}" if row["with"] not in _GOOD and row["message"] else "")
        )

    summary = {
        "lightning_ref": args.ref,
        "installed": args.installed,
        "without": totals(reports["without"]),
        "with": totals(reports["with"]),
        "changed": changed,
        "added": added,
        "failed_in_both": both_bad,
        "excluded": len(deselected),
    }
    print(json.dumps(summary))
    worse = [r for r in changed if r["with"] not in _GOOD] + [r for r in added if r["with"] not in _GOOD]
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
