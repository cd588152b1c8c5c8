"""Every helper script under scripts/ is valid Python for this interpreter: most of them run only on the GPU
machine, so a syntax error there would otherwise first show up in a device call."""
import pathlib

import pytest

SCRIPTS = sorted((pathlib.Path(__file__).resolve().parent.parent / "scripts").glob("*.py"))


def test_scripts_are_found():
    assert len(SCRIPTS) >= 10 and any(p.name == "profile_block.py" for p in SCRIPTS)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_compiles(path):
    compile(path.read_text(), str(path), "exec")
