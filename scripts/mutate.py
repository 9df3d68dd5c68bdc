"""Mutation testing of the counting core: each module against its own unit tests only.

`make mutate` runs this. For every module named below (or those given on the command line) it
lays out a working copy under `.mutation/<module>/` holding the whole `exporter` package and only
`tests/unit/test_<module>*.py` (with the shared `tests/conftest.py` and `tests/helpers.py`), runs
mutmut there with one worker process, and prints the score:

    killed / (all mutants - surviving mutants listed as equivalent)

A mutant counts as killed when a test failed or timed out under it. Surviving mutants judged
equivalent (they cannot change anything a user sees) are listed in `tests/mutation/equivalent.toml`
by module, function and the changed code, so that the list survives unrelated edits. Every other
survivor is printed with its diff.

The working copies are kept between runs: mutmut tries again only the mutants of functions that
changed, and this script the survivors of the last run (tests may have been added since).
`--fresh` starts a module over; so does mutmut itself when the pytest arguments change (`--slow`).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
EQUIVALENT_FILE = ROOT / "tests" / "mutation" / "equivalent.toml"
MODULES = ("records", "store", "ledger", "pending", "catchup", "schedule")
TARGET = 90.0

# mutmut's exit-code verdicts that count as a mutant caught by the tests.
CAUGHT = {"killed", "timeout", "caught by type check"}

# The working copy holds only the module's own tests, so the selection is their directory: it stays
# the same when a test file is added (mutmut would otherwise forget every verdict).
SETUP_CFG = """\
[mutmut]
source_paths = exporter
only_mutate = exporter/{module}.py
pytest_add_cli_args_test_selection = tests/unit
pytest_add_cli_args =
    -p no:cacheprovider
    --hypothesis-seed=0
    --timeout={timeout}
{deselect}"""
# A test running longer than this fails (the mutant is killed): some mutants make a thread wait
# for ever. Ten times the slowest test of the module, at least.
TIMEOUT_SECONDS = {"ledger": 90}
DEFAULT_TIMEOUT_SECONDS = 10
# Tests left out unless --slow: a surviving mutant costs the full time of the tests that reach
# its function, and this one alone (150 Hypothesis examples, about 10 s) would make the ledger's
# run last over an hour. It still runs in `make test`; the score without it is a lower bound.
SLOW_TESTS = {
    "ledger": (
        "tests/unit/test_ledger_properties.py::test_totals_equal_ground_truth_for_any_interleaving",
    ),
}


@dataclass
class Score:
    module: str
    total: int = 0
    caught: int = 0
    equivalent: list[str] = field(default_factory=list)
    survivors: list[tuple[str, str, str]] = field(default_factory=list)  # name, status, diff
    matched: set[tuple[str, str, str, str]] = field(default_factory=set)  # equivalent-list keys
    seconds: float = 0.0

    @property
    def counted(self) -> int:
        return self.total - len(self.equivalent)

    @property
    def percent(self) -> float:
        return 100.0 * self.caught / self.counted if self.counted else 100.0


def copy_if_changed(source: Path, target: Path) -> None:
    """Copy keeping the time stamp, and only when the content differs, so mutmut's cache holds."""
    if target.exists() and filecmp.cmp(source, target, shallow=False):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def lay_out(module: str, fresh: bool, slow: bool = False) -> tuple[Path, list[str]]:
    """The working copy for `module`: the package, its own unit tests, and mutmut's settings."""
    work = WORK / module
    if fresh and work.exists():
        shutil.rmtree(work)
    tests = sorted(
        p.relative_to(ROOT).as_posix() for p in ROOT.glob(f"tests/unit/test_{module}*.py")
    )
    if not tests:
        raise SystemExit(f"no unit tests match tests/unit/test_{module}*.py")
    wanted = [p.relative_to(ROOT) for p in (ROOT / "exporter").glob("*.py")]
    wanted += [Path(t) for t in tests]
    wanted += [Path(p) for p in ("tests/__init__.py", "tests/conftest.py", "tests/helpers.py")]
    wanted += [Path("tests/unit/__init__.py"), Path("pyproject.toml")]
    for relative in wanted:
        copy_if_changed(ROOT / relative, work / relative)
    # Files that are gone from the repository (or are another module's tests) go from the copy.
    keep = {work / r for r in wanted}
    for directory in (work / "exporter", work / "tests"):
        for path in directory.rglob("*.py"):
            if path not in keep:
                path.unlink()
    timeout = TIMEOUT_SECONDS.get(module, DEFAULT_TIMEOUT_SECONDS)
    left_out = () if slow else SLOW_TESTS.get(module, ())
    deselect = "".join(f"    --deselect={test}\n" for test in left_out)
    settings = SETUP_CFG.format(module=module, timeout=timeout, deselect=deselect)
    cfg = work / "setup.cfg"
    if not cfg.exists() or cfg.read_text() != settings:
        cfg.write_text(settings)
    return work, tests


def load_equivalent() -> dict[tuple[str, str, str, str], str]:
    """(module, function, original, mutated) -> reason."""
    if not EQUIVALENT_FILE.exists():
        return {}
    data = tomllib.loads(EQUIVALENT_FILE.read_text())
    listed: dict[tuple[str, str, str, str], str] = {}
    for entry in data.get("equivalent", []):
        key = (entry["module"], entry["function"], entry["original"], entry["mutated"])
        listed[key] = entry["reason"]
    return listed


def describe(diff: str) -> tuple[str, str]:
    """The removed and the added lines of a mutant's diff, each stripped and joined by ' / '."""
    removed, added = [], []
    for line in diff.splitlines():
        if line.startswith(("---", "+++", "@@")):
            continue
        if line.startswith("-"):
            removed.append(line[1:].strip())
        elif line.startswith("+"):
            added.append(line[1:].strip())
    return " / ".join(removed), " / ".join(added)


def toml_entry(module: str, function: str, original: str, mutated: str) -> str:
    """An entry of the equivalent list, its reason left to fill in."""

    def quoted(text: str) -> str:
        return json.dumps(text, ensure_ascii=False)  # a TOML basic string too

    return "\n".join(
        [
            "",
            "[[equivalent]]",
            f"module = {quoted(module)}",
            f"function = {quoted(function)}",
            f"original = {quoted(original)}",
            f"mutated = {quoted(mutated)}",
            'reason = ""',
        ]
    )


def function_of(module: str, mutant: str) -> str:
    """`exporter.ledger.xǁBatchǁclose__mutmut_3` -> `Batch.close`; `x_parse__mutmut_1` -> `parse`"""
    name = mutant.removeprefix(f"exporter.{module}.").rsplit("__mutmut_", 1)[0]
    if name.startswith("xǁ"):
        return ".".join(name.removeprefix("xǁ").split("ǁ"))
    return name.removeprefix("x_")


def summarize(module: str, work: Path) -> Score:
    """mutmut's verdicts for `module` in its working copy, read by mutmut's own code (in a child
    process, from the working copy's directory as mutmut expects)."""
    code = (
        "import json, sys\n"
        "from mutmut.mutation.data import SourceFileMutationData\n"
        "from mutmut.mutation.diff_apply import get_diff_for_mutant\n"
        "from mutmut.stats import status_by_exit_code\n"
        "from pathlib import Path\n"
        f"path = Path('exporter/{module}.py')\n"
        "m = SourceFileMutationData(path=path)\n"
        "m.load()\n"
        "out = []\n"
        "for name, exit_code in m.exit_code_by_key.items():\n"
        "    status = status_by_exit_code[exit_code]\n"
        "    diff = '' if status == 'killed' else get_diff_for_mutant(name, path=path)\n"
        "    out.append((name, status, diff))\n"
        "json.dump(out, sys.stdout)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=work, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"could not read mutmut's results for {module}:\n{result.stderr}")
    score = Score(module)
    listed = load_equivalent()
    for name, status, diff in json.loads(result.stdout):
        score.total += 1
        if status in CAUGHT:
            score.caught += 1
            continue
        original, mutated = describe(diff)
        key = (module, function_of(module, name), original, mutated)
        if key in listed:
            score.equivalent.append(name)
            score.matched.add(key)
        else:
            score.survivors.append((name, status, diff))
    return score


def run_module(module: str, fresh: bool, quiet: bool, slow: bool = False) -> Score:
    work, tests = lay_out(module, fresh, slow)
    print(f"== {module}: exporter/{module}.py against {' '.join(tests)}", flush=True)
    for test in () if slow else SLOW_TESTS.get(module, ()):
        print(f"   left out (--slow to run it): {test}", flush=True)
    started = time.monotonic()
    # mutmut keeps a verdict until the mutated function changes: the survivors of an earlier run
    # are tried again, as tests may have been added since.
    results = work / "mutants" / "exporter" / f"{module}.py.meta"
    again = [name for name, _, _ in summarize(module, work).survivors] if results.exists() else []
    mutmut = [str(Path(sys.executable).parent / "mutmut"), "run", "--max-children", "1"]
    output = subprocess.DEVNULL if quiet else None
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")

    def run(names: list[str]) -> None:
        done = subprocess.run([*mutmut, *names], cwd=work, env=env, stdout=output, check=False)
        if done.returncode != 0:
            raise SystemExit(f"mutmut failed on {module} (exit {done.returncode}); see above")

    run([])  # the mutants not tried yet (new, or of changed functions)
    left = {name for name, _, _ in summarize(module, work).survivors}
    again = sorted(left.intersection(again))  # gone: mutants of a function that changed
    if again:
        run(again)
    score = summarize(module, work)
    score.seconds = time.monotonic() - started
    return score


def stale_entries(scores: list[Score]) -> list[tuple[str, str, str, str]]:
    """Entries of the equivalent list, for the modules run, that match no surviving mutant."""
    run = {s.module for s in scores}
    matched = {key for s in scores for key in s.matched}
    return [key for key in load_equivalent() if key[0] in run and key not in matched]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", default=list(MODULES), help="modules of exporter/")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results")
    parser.add_argument(
        "--report", action="store_true", help="only print the results of the last run"
    )
    parser.add_argument(
        "--slow", action="store_true", help="run the slow tests left out by default too"
    )
    parser.add_argument("--quiet", action="store_true", help="hide mutmut's progress")
    parser.add_argument(
        "--toml",
        action="store_true",
        help=f"print the survivors as entries for {EQUIVALENT_FILE.relative_to(ROOT)}",
    )
    parser.add_argument(
        "--check", action="store_true", help=f"exit 1 if a module scores under {TARGET:.0f} %%"
    )
    args = parser.parse_args()
    unknown = [m for m in args.modules if not (ROOT / "exporter" / f"{m}.py").exists()]
    if unknown:
        parser.error(f"no such module: {', '.join(unknown)}")

    if args.report:
        missing = [m for m in args.modules if not (WORK / m / "mutants").exists()]
        if missing:
            parser.error(f"not run yet: {', '.join(missing)}")
        scores = [summarize(m, WORK / m) for m in args.modules]
    else:
        scores = [run_module(m, args.fresh, args.quiet, args.slow) for m in args.modules]

    for score in scores:
        if score.survivors:
            print(f"\n== surviving mutants of exporter/{score.module}.py")
            for name, status, diff in score.survivors:
                print(f"\n# {name}: {status} ({function_of(score.module, name)})")
                print("\n".join(diff.splitlines()[2:]))

    if args.toml:
        print(f"\n# entries for {EQUIVALENT_FILE.relative_to(ROOT)}: keep the equivalent ones")
        for score in scores:
            for name, _, diff in score.survivors:
                original, mutated = describe(diff)
                print(toml_entry(score.module, function_of(score.module, name), original, mutated))

    for module, function, original, mutated in stale_entries(scores):
        print(f"\nstale entry in {EQUIVALENT_FILE.relative_to(ROOT)} (no such survivor):")
        print(f"  {module}.{function}: {original!r} -> {mutated!r}")

    print("\nmodule      killed / counted   score  (equivalent, total, time)")
    failed = False
    for s in scores:
        print(
            f"{s.module:<10} {s.caught:>7} / {s.counted:<7} {s.percent:6.1f} %"
            f"  ({len(s.equivalent)} equivalent of {s.total}, {s.seconds:.0f} s)"
        )
        failed |= s.percent < TARGET
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
