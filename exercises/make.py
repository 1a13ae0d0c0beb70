"""
make.py: cut a classroom handout from the model files.

    python exercises/make.py handout/                       # every exercise blanked
    python exercises/make.py handout/ --only wkv7_step      # one exercise blanked, the rest as in the repo

An exercise is a whole function body in a reference file, marked by one comment line above its `def` (or
above its decorators):

    # Exercise rope: exercises/README.md#rope

One id may mark several functions (rope: rope_angles and apply_rope). make.py keeps each marked function's
signature and docstring and replaces the rest of its body with a stub that raises NotImplementedError,
naming the exercise, where its statement is, and about how many lines the reference takes. A copy of a
marked function in another file (the line `# Copied from gpt.py` above it, see tests/test_copies.py) is
blanked with it, so the answer is not two screens away; the student solves it in the original and copies
the body, as the marker says. Everything else is the reference, so a blanked file imports and works.

DIR gets what a teacher can publish on its own: the five model files, the exercise sheet (README.md, without
its teachers' section), the tests that grade (grading/conftest.py, grading/test_exercises.py) and grade.py.
make.py refuses a folder that is not empty (--force writes over the files it makes, only those).
"""

import argparse
import ast
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "exercises")
MODELS = ("gpt", "mamba", "rwkv", "retnet", "moe")
SHEET = os.path.join(HERE, "README.md")
MARKER = re.compile(r"\s*# Exercise (\w+): exercises/README\.md#(\w+)$")
COPIED = re.compile(r"\s*# Copied from (\w+)\.py(?:, with (\w+) -> (\w+))?$")
TEACHERS = "<!-- teachers -->"  # the sheet's lines from this one on stay with the teacher


class MakeError(Exception):
    """A problem with the markers, the sheet or the folder: one line, exit status 2."""


def definitions(source):
    """Every function in a file, methods as Class.method and kernels inside `if triton is not None:` by
    their own names: (qualified name, node, the comment line above its decorators or def)."""
    lines = source.splitlines()
    found = []

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                above = lines[first - 2] if first >= 2 else ""
                if isinstance(node, ast.FunctionDef):
                    found.append((prefix + node.name, node, above))
                else:
                    visit(node.body, f"{node.name}.")
            elif isinstance(node, ast.If):
                visit(node.body, prefix)

    visit(ast.parse(source).body, "")
    return found


def exercises(models_dir=ROOT):
    """{id: [(file, qualified name)]}: what each marker marks, in file order."""
    found = {}
    for name in MODELS:
        source = open(os.path.join(models_dir, f"{name}.py")).read()
        for line in source.splitlines():
            m = MARKER.match(line)
            if line.strip().startswith("# Exercise") and (m is None or m.group(1) != m.group(2)):
                raise MakeError(f"{name}.py: a malformed marker {line.strip()!r}; write "
                                f"'# Exercise ID: exercises/README.md#ID' above a def")
        marked = [(q, MARKER.match(above).group(1)) for q, _, above in definitions(source)
                  if MARKER.match(above)]
        if len(marked) != sum(bool(MARKER.match(line)) for line in source.splitlines()):
            raise MakeError(f"{name}.py: a marker that is not the line above a def (or its decorators)")
        for qualname, ex in marked:
            found.setdefault(ex, []).append((name, qualname))
    return found


def sheet_points(path=SHEET):
    """{id: points} from the sheet's headings, `### <a id="rope"></a>rope: ... (2 points)`."""
    heading = re.compile(r'### <a id="(\w+)"></a>.*\((\d+) points?\)\s*$')
    return {m.group(1): int(m.group(2)) for m in map(heading.match, open(path)) if m}


def stub_line(indent, ex, n_lines):
    first = f'raise NotImplementedError("exercise {ex}: write this body, about {n_lines} lines in the "'
    return f'{indent}{first}\n{indent}                          "reference; README.md#{ex} says what")'


def blank(source, targets):
    """source with the bodies of `targets` {qualified name: id} replaced by stubs; the docstrings stay."""
    lines = source.splitlines()
    cuts = []
    for qualname, node, _ in definitions(source):
        if qualname not in targets:
            continue
        body = node.body
        has_doc = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                   and isinstance(body[0].value.value, str))
        if has_doc and len(body) == 1:
            raise MakeError(f"{qualname} has a docstring and no body to blank")
        start = body[1].lineno if has_doc else body[0].lineno
        code = [ln for ln in lines[start - 1:node.end_lineno]
                if ln.strip() and not ln.strip().startswith("#")]  # the lines it takes, not its comments
        indent = re.match(r"\s*", lines[body[0].lineno - 1]).group(0)
        cuts.append((start, node.end_lineno, stub_line(indent, targets[qualname], len(code))))
    for start, end, stub in sorted(cuts, reverse=True):
        lines[start - 1:end] = [stub]
    out = "\n".join(lines) + "\n"
    return out.replace(": exercises/README.md#", ": README.md#")  # the sheet sits beside the files


def handout_sources(only=None, models_dir=ROOT):
    """{file: blanked source} for the five files: every exercise, or `only` (an id)."""
    marked = exercises(models_dir)
    if only is not None and only not in marked:
        raise MakeError(f"no exercise {only!r}; the ids are: {', '.join(marked)}")
    chosen = {ex: where for ex, where in marked.items() if only in (None, ex)}
    targets = {name: {} for name in MODELS}
    for ex, where in chosen.items():
        for name, qualname in where:
            targets[name][qualname] = ex
    sources = {name: open(os.path.join(models_dir, f"{name}.py")).read() for name in MODELS}
    # a marked copy of a blanked function is blanked with it
    for name, source in sources.items():
        lines = source.splitlines()
        class_marks = {}  # a marked class marks its methods
        for node in ast.parse(source).body:
            if isinstance(node, ast.ClassDef):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if first >= 2 and COPIED.match(lines[first - 2]):
                    class_marks[node.name] = COPIED.match(lines[first - 2])
        for qualname, node, above in definitions(source):
            m = COPIED.match(above) or class_marks.get(qualname.split(".")[0] if "." in qualname else None)
            if m and qualname in targets.get(m.group(1), {}):
                targets[name][qualname] = targets[m.group(1)][qualname]
    return {name: blank(source, targets[name]) for name, source in sources.items()}


def student_sheet(path=SHEET):
    """The sheet up to its teachers' section."""
    text = open(path).read()
    return text.split(TEACHERS)[0].rstrip() + "\n"


def make(folder, only=None, force=False):
    if os.path.isfile(folder):
        raise MakeError(f"{folder} is a file; give a folder for the handout")
    if os.path.isdir(folder) and os.listdir(folder) and not force:
        raise MakeError(f"{folder} is not empty; give a new folder, or --force to write over the files "
                        f"make.py writes (a student's edits there would be lost)")
    points = sheet_points()
    marked = exercises()
    missing = sorted(set(marked) - set(points))
    if missing:
        raise MakeError(f"exercise {missing[0]} has no entry in exercises/README.md "
                        f"('### <a id=\"{missing[0]}\"></a>...(N points)')")
    sources = handout_sources(only)
    os.makedirs(os.path.join(folder, "grading"), exist_ok=True)
    for name, source in sources.items():
        compile(source, f"{name}.py", "exec")  # a blanked file must still parse
        with open(os.path.join(folder, f"{name}.py"), "w") as f:
            f.write(source)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(student_sheet())
    # The tests go in grading/, and no pytest.ini: run from the repository, `pytest --models-dir DIR` would
    # load a DIR/tests/conftest.py as well (pytest looks into test* folders beside its arguments), and a
    # DIR/pytest.ini would make DIR the root, away from the repository's conftest.py.
    for src, dst in [("tests/conftest.py", "grading/conftest.py"),
                     ("tests/test_exercises.py", "grading/test_exercises.py"),
                     ("exercises/grade.py", "grade.py")]:
        shutil.copyfile(os.path.join(ROOT, src), os.path.join(folder, dst))
    return sources


def main(argv):
    p = argparse.ArgumentParser(prog="make.py", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="where the handout goes (new or empty)")
    p.add_argument("--only", default=None, help="blank this exercise alone")
    p.add_argument("--force", action="store_true",
                   help="write over the files make.py writes, in a folder already used")
    args = p.parse_args(argv)
    try:
        make(args.folder, args.only, args.force)
    except MakeError as e:
        print(f"make.py: error: {e}", file=sys.stderr)
        return 2
    what = f"exercise {args.only}" if args.only else f"{len(exercises())} exercises"
    print(f"wrote {args.folder}: the five model files with {what} blanked, README.md (the sheet), grading/, "
          f"grade.py")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
