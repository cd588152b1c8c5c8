"""The README's quickstart runs: every ```python block of README.md, in order, in a fresh interpreter started in
a temporary directory (tests/readme_snippets.py), so the README cannot drift from the code."""
import os
import subprocess
import sys

import pytest

import readme_snippets

HERE = os.path.dirname(os.path.abspath(__file__))

# What a new user must find in the quickstart; a README edit that drops one fails here.
REQUIRED = ("apply_lora(", 'quantize="nf4"', "QLoRALinear.from_bnb(", "LoRALinear.from_linear(", "loss.backward()",
            "opt.step()", "save_adapter(", "PeftModel.from_pretrained(", "merge_and_unload(",
            "BitsAndBytesConfig(", "lora_linear(")


def test_quickstart_covers_the_user_path():
    code = "\n".join(c for _, c in readme_snippets.python_blocks(readme_snippets.README.read_text()))
    missing = [name for name in REQUIRED if name not in code]
    assert not missing, f"README quickstart lost {missing}"
    assert "from_pretrained(\"" not in code.replace('from_pretrained("tiny-llama"', ""), \
        "quickstart snippets must not download from a hub: build models from a config"


def test_readme_quickstart_runs(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "readme_snippets.py"), str(readme_snippets.README)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    n = len(readme_snippets.python_blocks(readme_snippets.README.read_text()))
    assert f"ran {n} python blocks" in proc.stdout
    # The adapter saved by lora_ops and loaded by PEFT computes the same logits.
    assert "PEFT computes the same logits: True" in proc.stdout, proc.stdout
    assert (tmp_path / "my-adapter" / "adapter_config.json").exists()


def test_a_failing_block_is_named(tmp_path):
    blocks = readme_snippets.python_blocks("intro\n```python\nx = 1\n```\n\ntext\n\n```python\ny = x + z\n```\n")
    assert [line for line, _ in blocks] == [3, 9]  # the first line of each block's code
    with pytest.raises(RuntimeError, match=r"python block 2 \(line 9\) failed: NameError"):
        readme_snippets.run_blocks(blocks)
    assert readme_snippets.run_blocks(blocks[:1])["x"] == 1
