"""The shape of the code: the engine never imports a UI library, the UI enters the engine by one door, the
CLI starts without torch, and the engine's modules import each other without a cycle."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"
# what tui/ may import from the engine: the door, the configs, and the types that cross it
DOOR = {"engine", "engine.api", "engine.config", "engine.events", "engine.control", "engine.errors"}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def engine_imports() -> dict[str, set[str]]:
    """Module -> the engine modules it imports anywhere (inside functions too: a lazy import still ties)."""
    mods = {_module(p): p for p in ENGINE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "engine":
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in mods and t != m and t != "engine"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_engine_imports_no_ui_library():
    modules = sorted(m.name for m in pkgutil.walk_packages([str(ENGINE)], "engine."))
    assert {"engine.api", "engine.search.driver", "engine.recover.train", "engine.prune.gradsums"} <= set(modules)
    # peft too: the recovery imports it when it runs
    code = (f"import sys, peft, peft.utils, {', '.join(modules)}\n"
            "bad = [m for m in ('textual', 'rich', 'typer') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_engine_has_no_import_cycle():
    graph = engine_imports()
    assert "engine.search.driver" in graph["engine.api"]  # the graph sees imports inside functions
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_features_do_not_use_the_door():
    """api sits on top: a feature importing it would make the door part of the house."""
    graph = engine_imports()
    assert [m for m, deps in graph.items() if "engine.api" in deps] == []


def test_tui_enters_the_engine_only_by_the_door():
    bad = []
    for path in (ROOT / "tui").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if isinstance(node, ast.ImportFrom) and node.module == "engine":
                names = [f"engine.{a.name}" for a in node.names]
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                    if n.split(".")[0] == "engine" and n not in DOOR]
    assert bad == []


def test_the_cli_and_the_door_load_no_torch():
    """`adaprune --help` and `adaprune sessions` start at once: no torch, transformers or Optuna on import."""
    code = ("import sys, tui.cli, engine.api\n"
            "heavy = [m for m in ('torch', 'transformers', 'optuna', 'peft') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_new_session_forms_checks_load_no_torch(tmp_path):
    """The form checks every field as the user types: loading torch there froze the screen for seconds (keys
    typed meanwhile landed out of order over SSH)."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 64, '
                                        '"intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 320}')
    code = ("import sys\nfrom pathlib import Path\nfrom tui.backend import Backend, NewSession\n"
            f"b = Backend(Path({str(tmp_path / 's')!r}))\n"
            f"form = NewSession(model={str(folder)!r}, layers='1-2')\n"
            "assert b.check_new(form) == {}, b.check_new(form)\n"
            "assert b.memory_line(form).startswith('memory, about')\n"
            "heavy = [m for m in ('torch', 'transformers', 'optuna') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
