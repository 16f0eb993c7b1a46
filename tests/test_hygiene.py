"""The engine never imports a UI library (it reports through events; UIs render them)."""

import subprocess
import sys


def test_engine_imports_no_ui_library():
    code = ("import sys, engine.api, engine.export, engine.evaluate, engine.memprobe, engine.search, "
            "engine.benchmark, engine.review, engine.zeroshot, engine.trial_rows, engine.session\n"
            "bad = [m for m in ('textual', 'rich', 'typer') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
