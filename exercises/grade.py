"""
grade.py: grade every exercise of a folder of model files.

    python exercises/grade.py handout/                     # a table; last, "N of M exercises pass (P of Q)"
    python exercises/grade.py handout/ --junit report.xml  # and JUnit XML, one test case per exercise

It runs the exercise tests (tests/test_exercises.py, one pytest run, in this process) against the model
files in the folder. An exercise passes when all of its tests pass; the table names the first property that
failed. The points are the sheet's (README.md beside this file). The exit status is 0 whatever the score: a
grade is not an error. In the repository it uses the repository's tests; in a handout made by make.py, the
copy beside it.
"""

import argparse
import os
import re
import sys
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = next(p for p in (os.path.join(HERE, "grading"), os.path.join(HERE, "..", "tests"))
             if os.path.exists(os.path.join(p, "test_exercises.py")))
SHEET = os.path.join(HERE, "README.md")


def sheet_points():
    """{id: points}, in the sheet's order, from its headings `### <a id="rope"></a>... (2 points)`."""
    heading = re.compile(r'### <a id="(\w+)"></a>.*\((\d+) points?\)\s*$')
    return {m.group(1): int(m.group(2)) for m in map(heading.match, open(SHEET)) if m}


class Collector:
    """A pytest plugin: each test's exercise (its ex_ marker) and outcome, and its failure's first line."""

    def __init__(self):
        self.exercise = {}  # test id -> exercise id
        self.results = {}  # exercise id -> list of (test id, failure message or None)

    def pytest_collection_modifyitems(self, items):
        for item in items:
            ids = [m.name[3:] for m in item.iter_markers() if m.name.startswith("ex_")]
            if ids:
                self.exercise[item.nodeid] = ids[0]

    def pytest_runtest_logreport(self, report):
        ex = self.exercise.get(report.nodeid)
        if ex is None or (report.when != "call" and not report.failed):
            return
        message = None
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)
            message = message.splitlines()[0] if message else "failed"
            message = re.sub(r"^AssertionError: ", "", message)
        self.results.setdefault(ex, []).append((report.nodeid, message))


def grade(folder):
    """{exercise: (passed, first failure or None, tests run)} and the seconds the tests took."""
    import pytest  # here, so that --help needs nothing but the standard library

    collector = Collector()
    t0 = time.time()
    args = [os.path.join(TESTS, "test_exercises.py"), "--models-dir", folder, "-q", "-p", "no:cacheprovider",
            "--no-header", "--tb=no", "--rootdir", os.path.dirname(TESTS)]
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull  # pytest's own report: the table below replaces it
        try:
            pytest.main(args, plugins=[collector])
        finally:
            sys.stdout = stdout
    graded = {}
    for ex, results in collector.results.items():
        failures = [m for _, m in results if m is not None]
        graded[ex] = (not failures, failures[0] if failures else None, len(results))
    return graded, time.time() - t0


def junit(path, rows, seconds):
    suite = ET.Element("testsuite", name="nanozoo exercises", tests=str(len(rows)),
                       failures=str(sum(not ok for _, _, ok, _ in rows)), time=f"{seconds:.1f}")
    for ex, points, ok, why in rows:
        case = ET.SubElement(suite, "testcase", classname="exercises", name=ex)
        props = ET.SubElement(case, "properties")
        ET.SubElement(props, "property", name="points", value=str(points))
        ET.SubElement(props, "property", name="score", value=str(points if ok else 0))
        if not ok:
            ET.SubElement(case, "failure", message=why or "failed")
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def main(argv):
    p = argparse.ArgumentParser(prog="grade.py", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="the folder with the model files to grade (a handout, or the repository)")
    p.add_argument("--junit", default=None, help="also write JUnit XML here, one test case per exercise")
    args = p.parse_args(argv)
    if not all(os.path.exists(os.path.join(args.folder, f"{m}.py"))
               for m in ("gpt", "mamba", "rwkv", "retnet", "moe")):
        print(f"grade.py: error: {args.folder} lacks some of gpt.py, mamba.py, rwkv.py, retnet.py, moe.py",
              file=sys.stderr)
        return 2
    points = sheet_points()
    graded, seconds = grade(os.path.abspath(args.folder))
    rows = []
    for ex, pts in points.items():
        ok, why, n = graded.get(ex, (False, "no test ran (the file did not import?)", 0))
        rows.append((ex, pts, ok, why))
    width = max(len(ex) for ex in points)
    print(f"{'exercise':<{width}}  points  result  first failing property")
    for ex, pts, ok, why in rows:
        why = "" if ok else (why if len(why) <= 100 else why[:97] + "...")
        print(f"{ex:<{width}}  {pts:>6}  {'pass' if ok else 'FAIL':<6}  {why}")
    if args.junit:
        junit(args.junit, rows, seconds)
    n_pass = sum(ok for _, _, ok, _ in rows)
    score = sum(pts for _, pts, ok, _ in rows if ok)
    print(f"graded in {seconds:.0f} s")
    print(f"{n_pass} of {len(rows)} exercises pass ({score} of {sum(points.values())} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
