"""The benchmark numbers users read are generated from the committed H200 CSV (``python -m benchmarks.readme``):
README.md's small headline table and docs/BENCHMARKS.md's full tables must match the CSV, ``--check`` must fail
with a diff when either does not, and the generator must say "not yet measured" for presets without rows, leave
the rest of each file alone, keep the headline small, and link only files that exist."""
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import readme, report  # noqa: E402


def test_readme_and_doc_match_the_committed_csv():
    ok, diff = readme.check()
    assert ok, ("README.md's headline or docs/BENCHMARKS.md's tables differ from benchmarks/results/h200/results.csv;"
                " run `python -m benchmarks.readme` and commit both:\n" + diff[-4000:])


def _copies(tmp_path):
    """README.md and docs/BENCHMARKS.md copied into tmp_path (same layout), with the committed text of each."""
    (tmp_path / "docs").mkdir()
    path, doc = tmp_path / "README.md", tmp_path / "docs" / "BENCHMARKS.md"
    shutil.copy(readme.DEFAULT_README, path)
    shutil.copy(readme.DEFAULT_DOC, doc)
    return path, doc


def test_check_fails_on_a_stale_headline_and_the_writer_fixes_only_its_block(tmp_path, capsys):
    path, doc = _copies(tmp_path)
    assert readme.main(["--readme", str(path), "--doc", str(doc)]) == 0  # the doc's links, as seen from tmp_path
    capsys.readouterr()
    text = path.read_text()
    b, e = text.index(readme.HEAD_BEGIN), text.index(readme.HEAD_END)
    row = next(l for l in text[b:e].splitlines() if l.startswith("| ") and not l.startswith("| case |"))
    edited = text[b:e].replace(row, row + " edited |", 1)
    path.write_text(text[:b] + edited + text[e:] + "\ntrailing text outside the block\n")
    assert readme.main(["--check", "--readme", str(path), "--doc", str(doc)]) == 1
    out = capsys.readouterr()
    assert f"-{row} edited |" in out.out and f"+{row}\n" in out.out
    assert "run `python -m benchmarks.readme`" in out.err
    assert readme.main(["--readme", str(path), "--doc", str(doc)]) == 0
    assert path.read_text() == text + "\ntrailing text outside the block\n"
    assert readme.main(["--check", "--readme", str(path), "--doc", str(doc)]) == 0


def test_check_fails_on_stale_doc_tables_and_the_writer_fixes_only_their_block(tmp_path, capsys):
    path, doc = _copies(tmp_path)
    text = doc.read_text()
    b, e = text.index(readme.BEGIN), text.index(readme.END)
    edited = text[b:e].replace("| 8192 × 4096→14336 nf4 |", "| 8192 × 4096→14336 NF4 (edited) |", 1)
    assert edited != text[b:e]
    doc.write_text(text[:b] + edited + text[e:] + "\ntrailing text outside the block\n")
    assert readme.main(["--check", "--readme", str(path), "--doc", str(doc)]) == 1
    out = capsys.readouterr()
    assert "-| 8192 × 4096→14336 NF4 (edited) |" in out.out and "+| 8192 × 4096→14336 nf4 |" in out.out
    assert readme.main(["--readme", str(path), "--doc", str(doc)]) == 0
    fixed = doc.read_text()
    rows = report.read_csv(readme.DEFAULT_CSV)
    assert fixed == text[:b] + readme.generate(rows, readme.DEFAULT_CSV, doc.parent) + text[e + len(readme.END):] \
        + "\ntrailing text outside the block\n"
    assert readme.main(["--check", "--readme", str(path), "--doc", str(doc)]) == 0


def test_headline_is_small_and_says_what_it_compares():
    rows = report.read_csv(readme.DEFAULT_CSV)
    block = readme.headline(rows)
    table = [l for l in block.splitlines() if l.startswith("| ") and not l.startswith("| case |")]
    assert 1 <= len(table) <= readme.HEADLINE_MAX_ROWS <= 8
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1].startswith(("PEFT:", "PEFT+bitsandbytes:")), line
        assert re.fullmatch(r"\*\*\d+\.\d\d× (the tokens/s|faster|the memory)\*\*", cells[3]), line
        assert re.fullmatch(r"[0-9a-f]{7}(-dirty)?", cells[4]), line  # the commit the row was measured at
    # Rows whose two providers did not run in one run are left out, not mixed.
    split = [dict(r, run_id=r["run_id"] + "-other") if r["provider"] == "peft_bnb" else r for r in rows]
    assert "PEFT+bitsandbytes:" not in readme.headline(split)
    assert "not yet measured" in readme.headline([])


def test_headline_names_the_host_time_of_its_runs():
    """Host-bound rows move with the lent machine's host, so the headline gives each run's frozen-layer host time
    where that run timed it, and says nothing when no headline run did."""
    rows = report.read_csv(readme.DEFAULT_CSV)
    preset, case, provider, metric = readme._HOST_PROBE
    probe = [r for r in rows
             if (r["preset"], r["case"], r["provider"], r["metric"]) == (preset, case, provider, metric)]
    assert probe, "the committed CSV has no host preset row"
    block = readme.headline(rows)
    assert re.search(r"cost the host [\d,.]+ µs in the run at [0-9a-f]{7}", block), block
    without = [r for r in rows if r["preset"] != preset]
    assert "cost the host" not in readme.headline(without)


def test_markers_inserted_before_the_first_section_and_idempotent():
    block = readme.BEGIN + "\nX\n" + readme.END
    doc = "# T\n\nintro\n\n## First\nbody\n"
    once = readme.splice(doc, block)
    assert once == "# T\n\nintro\n\n" + block + "\n\n## First\nbody\n"
    assert readme.splice(once, block) == once
    assert readme.splice("# T\n", block) == "# T\n\n" + block + "\n"
    with pytest.raises(ValueError, match="unmatched"):
        readme.splice("a " + readme.BEGIN + " b", block)


def test_check_without_markers_says_how_to_add_them(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# T\n\n## A\n")
    ok, msg = readme.check(path, doc_path=None)
    assert not ok and "python -m benchmarks.readme" in msg and readme.HEAD_BEGIN in msg
    ok, msg = readme.check(readme.DEFAULT_README, doc_path=path)
    assert not ok and readme.BEGIN in msg


def test_presets_without_rows_say_not_yet_measured():
    rows = report.read_csv(readme.DEFAULT_CSV)
    layer_only = [r for r in rows if r["preset"] == "layer"]
    block = readme.generate(layer_only)
    sections = ("### Rank sweep", "### Tokens sweep", "### Block", "### Host cost", "### Decode",
                "### NF4 dequantize", "### Model training step")
    for section in sections:
        part = block[block.index(section):]
        part = part[:part.index("\n###", 1)] if "\n###" in part[1:] else part
        assert "Not yet measured. On the GPU: `python -m benchmarks --preset" in part, section
    assert block.count("Not yet measured") == len(sections)
    assert "8192 × 4096→14336 nf4" in block and block.startswith(readme.BEGIN) and block.endswith(readme.END)


def test_every_number_names_its_run_and_command():
    rows = report.read_csv(readme.DEFAULT_CSV)
    block = readme.generate(rows)
    runs = {r["run_id"] for r in rows}
    for rid in runs:  # every run that contributed is described with its command, GPU and date
        line = next(l for l in block.splitlines() if f"(run `{rid}`" in l)
        env = report._env(next(r for r in rows if r["run_id"] == rid))
        assert f"`{env['command']}` on {env['gpu']}" in line
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", line)
    # A cell from another run than its row's floor carries a mark, explained once below the table.
    layer = block[block.index("### Layer forward + backward: time"):block.index("### Layer forward + backward: peak")]
    if "†" in layer:
        assert "† measured by" in layer


def test_referenced_files_exist():
    for path, begin, end in ((readme.DEFAULT_DOC, readme.BEGIN, readme.END),
                             (readme.DEFAULT_README, readme.HEAD_BEGIN, readme.HEAD_END)):
        text = path.read_text()
        block = text[text.index(begin):text.index(end)]
        links = re.findall(r"\]\(([^)]+)\)", block)
        assert links, path
        for link in links:
            assert (path.parent / link).exists(), (path, link)


def test_model_section_from_rows():
    cfg = json.dumps(dict(layers=4, seq=2048, batch=4, dtype="bfloat16", r=16))
    env = json.dumps(dict(gpu="NVIDIA H200", command="python -m benchmarks --preset model --layers 4",
                          date_utc="2026-12-01T10:00:00+00:00", git_commit="HEAD\n0123abc"))
    rows = []
    for p, tok, gib in (("peft_bnb", 10000.0, 20.0), ("fused_qlora", 13600.0, 18.0), ("full_ft", 9000.0, 40.0)):
        for metric, v in (("tokens_per_s", tok), ("time_ms", 8192e3 / tok), ("peak_extra_mib", gib * 1024)):
            rows.append(dict(run_id="20261201T100000Z-0001", preset="model", case="llama3-8b-shape L4 4x2048",
                             shape="s", provider=p, mode="step", metric=metric, value=v, p20=v, p80=v, unit="",
                             ratio_to_floor=math.nan, status="ok", note="", config=cfg, env=env))
    rows.append(dict(rows[-1], provider="peft", metric="skipped", value=math.nan, status="skipped",
                     note="build failed: OutOfMemoryError: CUDA out of memory"))
    report.add_ratios(rows, "peft_bnb")
    block = readme.generate(rows)
    model = block[block.index("### Model training step"):]
    assert "| 4 layers, 4 × 2048 | 10,000 (1.00×) | 13,600 (1.36×) | skipped (1) | 9,000 (0.90×) |" in model
    assert "| 4 layers, 4 × 2048 | 20.0 (1.00×) | 18.0 (0.90×) | – | 40.0 (2.00×) |" in model
    assert "1.360× tokens/s, 0.900× peak memory: met." in model
    assert "(1) skipped: build failed: OutOfMemoryError" in model
    assert "2026-12-01 10:00 UTC (run `20261201T100000Z-0001`, commit 0123abc)" in model
    assert "Not yet measured" in block.split("### Model training step")[0]  # no layer/decode/nf4 rows here
