"""The architecture as the imports show it: every import of cryosvi's own modules (at the
top of a module or inside a function) points down the layers or stays in its layer,
training and inference never import each other, no two modules import each other (no
cycle of any length), and no module is over 600 lines."""

import ast
from pathlib import Path

import cryosvi

PACKAGE = Path(cryosvi.__file__).parent

LAYERS = (
    ("cryosvi", "cryosvi.errors", "cryosvi.config", "cryosvi.randomness"),
    ("cryosvi.physics", "cryosvi.distributions"),
    ("cryosvi.io",),
    ("cryosvi.latents", "cryosvi.model", "cryosvi.guide", "cryosvi.reference",
     "cryosvi.posterior", "cryosvi.rundir"),
    ("cryosvi.dataset", "cryosvi.noise_data"),
    ("cryosvi.inference", "cryosvi.training", "cryosvi.simulate", "cryosvi.evaluate",
     "cryosvi.bench", "cryosvi.analysis"),
    ("cryosvi.cli", "cryosvi.__main__"),
)
"""Bottom to top: base settings; pure tensor physics and distributions; file formats;
the model (latents, Pyro model and guide, reference, run directory); data preparation;
training, inference and the other jobs; the command line."""
APART = (("cryosvi.inference", "cryosvi.training"),)
"""Groups of one layer that never import each other."""
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The cryosvi modules that ``path`` (module ``name``) imports anywhere in its code."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("cryosvi")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative imports
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if not base.startswith("cryosvi"):
                continue
            for alias in node.names:  # "from cryosvi.x import y": y may be a module
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return out - {name}


def layer_of(name: str) -> tuple[int, str]:
    """(layer index, the layer's entry that holds ``name``)."""
    for index, layer in enumerate(LAYERS):
        for entry in layer:
            if name == entry or (entry != "cryosvi" and name.startswith(entry + ".")):
                return index, entry
    raise AssertionError(f"{name} is in no layer of LAYERS")


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(path, name, set(found)) for name, path in found.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_imports_point_down_the_layers():
    upward = []
    for name, targets in graph().items():
        here, group = layer_of(name)
        for target in targets:
            there, other = layer_of(target)
            if there > here:
                upward.append(f"{name} -> {target}")
            for apart in APART:
                if group != other and {group, other} <= set(apart):
                    upward.append(f"{name} -> {target} (kept apart)")
    assert not upward, "imports that run up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_is_too_long():
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {k: v for k, v in long.items() if v > MAX_LINES} == {}


def test_the_checker_sees_an_upward_import(tmp_path):
    # The checker itself: a physics module importing the model layer is caught.
    path = PACKAGE / "physics" / "forward.py"
    name = module_name(path)
    assert name == "cryosvi.physics.forward"
    fake = tmp_path / "forward.py"
    fake.write_text("from cryosvi.latents import REGISTRY\n")
    targets = imported(fake, name, set(modules()))
    assert targets == {"cryosvi.latents"}
    assert layer_of("cryosvi.latents")[0] > layer_of(name)[0]
