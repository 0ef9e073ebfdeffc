"""The layout the README's tour promises: the reading path stays short, the architecture files know nothing of the
fast paths and file formats, module-level imports form no cycle, no module reaches for another's private names, and
the only import against the flow is train.py's call into the shapes world."""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(REPO) if f.endswith(".py"))
READING_PATH = ["model", "unet", "controlnet", "probe", "train", "sample", "data"]
ARCHITECTURE = ["model", "unet", "controlnet", "probe", "reward", "metrics"]


def imports(name):
    """[(imported project module, names taken from it, at module level?)] of one top-level module."""
    tree = ast.parse(open(os.path.join(REPO, name + ".py"), encoding="utf-8").read())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], id(node) in top) for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES:
            out.append((node.module, [a.name for a in node.names], id(node) in top))
    return out


def private_attributes(name):
    """module._name uses of an imported project module."""
    tree = ast.parse(open(os.path.join(REPO, name + ".py"), encoding="utf-8").read())
    mods = {m for m, _, _ in imports(name)}
    return [f"{n.value.id}.{n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id in mods and n.attr.startswith("_")]


def test_reading_path_length():
    lines = {m: sum(1 for _ in open(os.path.join(REPO, m + ".py"), encoding="utf-8")) for m in READING_PATH}
    print(lines, sum(lines.values()))
    assert sum(lines.values()) <= 2200


def test_no_private_names_across_modules():
    bad = [(m, other, n) for m in MODULES for other, names, _ in imports(m) for n in names if n.startswith("_")]
    bad += [(m, a) for m in MODULES for a in private_attributes(m)]
    assert not bad


def test_module_level_imports_form_no_cycle():
    graph = {m: {o for o, _, top in imports(m) if top} for m in MODULES}
    state = {}

    def visit(m, path):
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        if state.get(m) is None:
            state[m] = "open"
            for o in graph[m]:
                visit(o, path + [m])
            state[m] = "done"
    for m in MODULES:
        visit(m, [])


def test_imports_are_at_the_top_but_one():
    late = [(m, o) for m in MODULES for o, _, top in imports(m) if not top]
    assert late == [("train", "shapes")]  # no weights given: train.py runs the shapes world


def test_architecture_files_know_no_fast_paths_or_formats():
    for m in ARCHITECTURE:
        assert not {o for o, _, _ in imports(m)} & {"fused", "formats", "train", "sample", "shapes"}, m
