"""The layout the README's tour promises: the architecture files know nothing of the fast paths and file formats, no
module reaches for another's private names, the imports form no cycle (at module level or inside functions), and
train.py and sample.py know nothing of the shapes world but train.py's one-line hand-over."""
import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(REPO) if f.endswith(".py"))
READING_PATH = ["model", "unet", "controlnet", "probe", "labels", "train", "sample", "data"]
ARCHITECTURE = ["model", "unet", "controlnet", "probe", "reward", "metrics"]


def source(name):
    with open(os.path.join(REPO, name + ".py"), encoding="utf-8") as f:
        return f.read()


def imports(name):
    """[(imported project module, names taken from it, at module level?)] of one top-level module."""
    tree = ast.parse(source(name))
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
    tree = ast.parse(source(name))
    mods = {m for m, _, _ in imports(name)}
    return [f"{n.value.id}.{n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id in mods and n.attr.startswith("_")]


def find_cycle(graph):
    """One import cycle of `graph` (module -> imported modules) as a path, or None."""
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            return path[path.index(m):] + [m]
        if state.get(m) is None:
            state[m] = "open"
            for other in sorted(graph[m]):
                cycle = visit(other, path + [m])
                if cycle:
                    return cycle
            state[m] = "done"
        return None
    for m in MODULES:
        cycle = visit(m, [])
        if cycle:
            return cycle
    return None


def test_no_private_names_across_modules():
    bad = [(m, other, n) for m in MODULES for other, names, _ in imports(m) for n in names if n.startswith("_")]
    bad += [(m, a) for m in MODULES for a in private_attributes(m)]
    assert not bad


def test_imports_form_no_cycle_at_module_or_function_level():
    graph = {m: {o for o, _, _ in imports(m)} for m in MODULES}  # function-level imports count too
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({**{m: set() for m in MODULES}, "train": {"shapes"}, "shapes": {"train"}}) is not None


def test_imports_are_at_the_top():
    assert [(m, o) for m in MODULES for o, _, top in imports(m) if not top] == []


def test_architecture_files_know_no_fast_paths_or_formats():
    for m in ARCHITECTURE:
        assert not {o for o, _, _ in imports(m)} & {"fused", "formats", "train", "sample", "shapes"}, m


def test_train_and_sample_know_nothing_of_the_shapes_world():
    """train.py hands a run without --weights to shapes.py in one line (with its comment); sample.py finds a
    finished run's model folder as it would any other."""
    for m in ("train", "sample"):
        lines = [line for line in source(m).splitlines() if re.search("shapes", line, re.IGNORECASE)]
        expected = 0 if m == "sample" else 1  # train.py: the hand-over line, with its comment
        assert len(lines) == expected and all("os.execv" in line for line in lines), lines


def test_reading_path_lines_fit_in_120_characters():
    long = [(m, i + 1) for m in READING_PATH for i, line in enumerate(source(m).splitlines()) if len(line) > 120]
    assert long == []
