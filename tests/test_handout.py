"""
The exercises are checked, not only the reference (exercises/README.md is the sheet, exercises/make.py cuts
the handout):

- the mutation check: for every exercise, the copy that blanks it alone (make.py --only ID) fails every test
  marked with its id, and there is at least one, each failing on the stub itself; every other exercise's
  test still passes on that copy. The files the copy does not blank are byte for byte the reference, so the
  tests that read only those run once, on the reference (test_exercises.py in this suite); the rest run on
  the copy, one pytest process per exercise;
- the full handout: its files import, its copies still match (tests/test_copies.py), grade.py gives 0 of N
  there and N of N on a copy of the reference files, and make.py refuses a folder in use.
"""
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import MODELS, ROOT

sys.path.insert(0, os.path.join(ROOT, "exercises"))
import make  # noqa: E402
import test_exercises  # noqa: E402


@pytest.fixture(autouse=True)
def reference_only(models_dir):
    if os.path.abspath(models_dir) != os.path.abspath(ROOT):
        pytest.skip("checks the repository's exercises, not another copy of the files")


def marked_tests():
    """{test function name: exercise id} from test_exercises.py's markers."""
    found = {}
    for name, f in vars(test_exercises).items():
        if name.startswith("test_"):
            ids = [m.name[3:] for m in getattr(f, "pytestmark", []) if m.name.startswith("ex_")]
            assert len(ids) == 1, f"{name} needs exactly one ex_ marker, has {ids}"
            found[name] = ids[0]
    return found


def run_tests(folder, marks, junit):
    """Run the exercise tests marked with `marks` on folder's model files: {test name: failure or None}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", os.path.join(ROOT, "tests", "test_exercises.py"), "--models-dir",
           folder, "-m", " or ".join(f"ex_{m}" for m in marks), "-q", "-p", "no:cacheprovider",
           "--junitxml", junit, "--rootdir", ROOT]
    subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    results = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        results[case.get("name")] = None if bad is None else (bad.get("message") or "failed")
    return results


def test_every_exercise_has_a_sheet_entry_a_marker_and_tests():
    marked = make.exercises()
    points = make.sheet_points()
    assert set(marked) == set(points), f"markers and sheet entries differ: {set(marked) ^ set(points)}"
    assert set(marked) == set(marked_tests().values()), "an exercise without tests, or the reverse"
    assert len(marked) >= 12 and {f for where in marked.values() for f, _ in where} == set(MODELS)


def test_mutation_check(tmp_path):
    tests = marked_tests()
    marked = make.exercises()
    file_of = {ex: where[0][0] for ex, where in marked.items()}
    reference = {m: open(os.path.join(ROOT, f"{m}.py")).read() for m in MODELS}
    problems = []
    for ex in marked:
        folder = tmp_path / ex
        make.make(str(folder), only=ex)
        changed = {m for m in MODELS if (folder / f"{m}.py").read_text() != make.blank(reference[m], {})}
        assert file_of[ex] in changed
        # the exercises of the files this copy blanks: the tests that could reach the blanked code
        marks = [e for e in marked if file_of[e] in changed]
        results = run_tests(str(folder), marks, str(tmp_path / f"{ex}.xml"))
        mine = [t for t, e in tests.items() if e == ex]
        assert mine, f"exercise {ex} has no test"
        for t in mine:
            why = results.get(t, "did not run")
            if why is None:
                problems.append(f"{ex}: {t} passes on the copy that blanks {ex} (its inputs never reach it?)")
            elif f"exercise {ex}" not in why:
                problems.append(f"{ex}: {t} fails on the blanked copy, but not on its stub: {why[:200]}")
        for t, e in tests.items():
            if e != ex and file_of[e] in changed and results.get(t, "did not run") is not None:
                problems.append(f"{ex}: {t} (exercise {e}) fails on the copy that blanks {ex}: "
                                f"{str(results.get(t))[:200]}")
    assert not problems, "\n".join(problems)


def test_full_handout(tmp_path):
    folder = tmp_path / "handout"
    make.make(str(folder))
    assert sorted(os.listdir(folder)) == sorted([f"{m}.py" for m in MODELS] +
                                                ["README.md", "grade.py", "grading"])
    sheet = (folder / "README.md").read_text()
    assert make.TEACHERS not in sheet and "good answers contain" not in sheet, "the teachers' part leaked"

    # 1. make.py refuses a folder in use, with one line.
    with pytest.raises(make.MakeError, match="not empty"):
        make.make(str(folder))
    with pytest.raises(make.MakeError, match="no exercise"):
        make.make(str(tmp_path / "other"), only="no_such_exercise")

    # 2. Each stub keeps its signature and docstring and says which exercise, where, how long.
    for ex, where in make.exercises().items():
        for name, qualname in where:
            text = (folder / f"{name}.py").read_text()
            assert re.search(rf'NotImplementedError\("exercise {ex}: write this body, about \d+ lines', text)
            assert f"# Exercise {ex}: README.md#{ex}" in text

    # 3. The files import and what is not blanked works; the blanked copies still match their originals;
    # grade.py scores the handout 0 and the reference in full, with a JUnit report.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = ("import importlib.util, sys\n"
            "mods = {}\n"
            "for m in sys.argv[1:]:\n"
            "    spec = importlib.util.spec_from_file_location(m, m + '.py')\n"
            "    mods[m] = importlib.util.module_from_spec(spec)\n"
            "    spec.loader.exec_module(mods[m])\n"
            "assert mods['gpt'].causal_mask(2, 3, 'cpu').sum() == 5\n"
            "mods['rwkv'].Model(mods['rwkv'].Config(n_layer=1, d_model=64))\n")
    subprocess.run([sys.executable, "-c", code, *MODELS], cwd=folder, check=True, env=env, timeout=300)
    p = subprocess.run([sys.executable, "-m", "pytest", os.path.join(ROOT, "tests", "test_copies.py"), "-q",
                        "-p", "no:cacheprovider", "--models-dir", str(folder)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:]
    n, total = len(make.exercises()), sum(make.sheet_points().values())
    grade = [sys.executable, str(folder / "grade.py"), str(folder), "--junit", str(tmp_path / "j.xml")]
    p = subprocess.run(grade, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    last = p.stdout.splitlines()[-1] if p.stdout else ""
    assert p.returncode == 0 and last == f"0 of {n} exercises pass (0 of {total} points)", p.stdout + p.stderr
    rows = {line.split()[0]: line for line in p.stdout.splitlines()[1:-2]}
    for ex in make.exercises():  # each fails on its stub (not on a collection error: nothing would run)
        assert f"exercise {ex}" in rows.get(ex, ""), p.stdout
    suite = ET.parse(tmp_path / "j.xml").getroot()
    assert suite.get("tests") == str(n) and suite.get("failures") == str(n)
    copy = tmp_path / "reference"
    copy.mkdir()
    for m in MODELS:
        shutil.copyfile(os.path.join(ROOT, f"{m}.py"), copy / f"{m}.py")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "exercises", "grade.py"), str(copy)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    last = p.stdout.splitlines()[-1] if p.stdout else ""
    assert p.returncode == 0 and last == f"{n} of {n} exercises pass ({total} of {total} points)", \
        p.stdout + p.stderr
