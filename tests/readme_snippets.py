"""Run the README's quickstart: every ```python block of README.md, in order, in one namespace, in the current
directory (the snippets write files there: run it from a temporary directory).

    python tests/readme_snippets.py [README.md] [--installed]

``--installed`` first checks that ``lora_ops`` is imported from an installed package (site-packages), not from
a checkout, and that its run-time data came with it: CI uses it to prove that a wheel works outside the
repository. Exits non-zero, naming the block and
its first line in the README, when a block raises.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> List[Tuple[int, str]]:
    """(first line number in the file, code) of every ```python block of ``text``."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def run_blocks(blocks: List[Tuple[int, str]], name: str = "README.md") -> Dict[str, object]:
    """Execute ``blocks`` in order in one namespace; return the namespace. A failing block raises RuntimeError
    naming it (the original exception is its __cause__)."""
    namespace: Dict[str, object] = {"__name__": "__readme__"}
    for i, (line, code) in enumerate(blocks, 1):
        try:
            exec(compile(code, f"{name}:block{i}(line {line})", "exec"), namespace)
        except Exception as e:
            raise RuntimeError(f"{name}: python block {i} (line {line}) failed: {type(e).__name__}: {e}") from e
    return namespace


def _check_installed() -> str:
    import lora_ops

    where = Path(lora_ops.__file__).resolve()
    if "site-packages" not in where.parts and "dist-packages" not in where.parts:
        raise SystemExit(f"lora_ops was imported from {where}, not from an installed package")
    if (where.parent.parent / "setup.py").exists():
        raise SystemExit(f"lora_ops at {where} sits in a checkout, not an installed package")
    from lora_ops import decode

    # The data lora_ops reads at run time came with the package: the measured decode threshold, not the
    # "file missing" default that silently turns the decode path off.
    data = Path(decode.RESULTS_FILE).resolve()
    if where.parent not in data.parents or not data.exists() or decode.decode_threshold() == 0:
        raise SystemExit(f"the installed lora_ops lacks its decode threshold file ({data})")
    return str(where.parent)


def main(argv: List[str]) -> int:
    installed = "--installed" in argv
    paths = [a for a in argv if a != "--installed"]
    readme = Path(paths[0]) if paths else README
    blocks = python_blocks(readme.read_text(encoding="utf-8"))
    if not blocks:
        print(f"{readme}: no ```python blocks", file=sys.stderr)
        return 1
    if installed:
        print(f"lora_ops from {_check_installed()}")
    t0 = time.time()
    try:
        run_blocks(blocks, readme.name)
    except RuntimeError as e:
        import traceback

        traceback.print_exception(e.__cause__)
        print(e, file=sys.stderr)
        return 1
    print(f"ran {len(blocks)} python blocks of {readme} in {os.getcwd()} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
