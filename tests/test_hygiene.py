"""The engine never imports a UI library (it reports through events; UIs render them)."""

import pkgutil
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"


def test_engine_imports_no_ui_library():
    modules = sorted(f"engine.{m.name}" for m in pkgutil.iter_modules([str(ENGINE)]))
    assert {"engine.api", "engine.search", "engine.recover", "engine.gradsums"} <= set(modules)
    # peft too: the recovery imports it when it runs
    code = (f"import sys, peft, peft.utils, {', '.join(modules)}\n"
            "bad = [m for m in ('textual', 'rich', 'typer') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
