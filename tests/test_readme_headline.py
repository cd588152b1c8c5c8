"""The benchmark numbers users read are generated from the committed results CSVs (``python -m benchmarks.readme``):
each preset from the CSV holding its newest run, never mixing two GPUs in one preset. README.md's small headline
table and docs/BENCHMARKS.md's full tables must match what the merged CSVs give, ``--check`` must fail with a diff
when either does not, and the generator must say "not yet measured" for presets without rows, leave the rest of
each file alone, keep the headline small (with a GPU column only when its rows come from several GPUs), point each
table's links at its own CSV's directory, and link only files that exist."""
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


def _committed():
    """The rows the committed CSVs give and the CSV each preset came from."""
    return readme.merged_rows(readme.DEFAULT_CSVS)


def test_readme_and_doc_match_the_committed_csv():
    ok, diff = readme.check()
    assert ok, ("README.md's headline or docs/BENCHMARKS.md's tables differ from the committed results CSVs;"
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
    rows, source = _committed()
    assert fixed == text[:b] + readme.generate(rows, source, doc.parent) + text[e + len(readme.END):] \
        + "\ntrailing text outside the block\n"
    assert readme.main(["--check", "--readme", str(path), "--doc", str(doc)]) == 0


def test_headline_is_small_and_says_what_it_compares():
    rows, _ = _committed()
    block = readme.headline(rows)
    table = [l for l in block.splitlines() if l.startswith("| ") and not l.startswith("| case |")]
    assert 1 <= len(table) <= readme.HEADLINE_MAX_ROWS <= 8
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1].startswith(("PEFT:", "PEFT+bitsandbytes:")), line
        assert re.fullmatch(r"\*\*\d+\.\d\d× (the tokens/s|faster|the memory)\*\*", cells[3]), line
        assert re.fullmatch(r"[0-9a-f]{7}(-dirty)?", cells[-1]), line  # the commit the row was measured at
    # Rows whose two providers did not run in one run are left out, not mixed.
    split = [dict(r, run_id=r["run_id"] + "-other") if r["provider"] == "peft_bnb" else r for r in rows]
    assert "PEFT+bitsandbytes:" not in readme.headline(split)
    assert "not yet measured" in readme.headline([])


def test_headline_names_the_host_time_of_its_runs():
    """Host-bound rows move with the lent machine's host, so the headline gives each run's frozen-layer host time
    where that run timed it, and says nothing when no headline run did."""
    rows, _ = _committed()
    preset, case, provider, metric = readme._HOST_PROBE
    probe = [r for r in rows
             if (r["preset"], r["case"], r["provider"], r["metric"]) == (preset, case, provider, metric)]
    assert probe, "the committed CSVs have no host preset row"
    block = readme.headline(rows)
    assert re.search(r"cost the host [\d,.]+ µs in the (\S+ )?run at [0-9a-f]{7}", block), block
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
    rows, _ = _committed()
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
    rows, source = _committed()
    block = readme.generate(rows, source)
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


# ------------------------------------------------------------------ several GPUs: per-preset sources and links

H200, H100 = "NVIDIA H200", "NVIDIA H100 80GB HBM3"


def _run_of(rows, preset, case, provider="fused"):
    """Every row of ``preset`` from the run that measured ``provider`` at ``case`` (the committed H200 CSV's)."""
    rid = next(r["run_id"] for r in reversed(rows)
               if (r["preset"], r["case"], r["provider"], r["status"]) == (preset, case, provider, "ok"))
    return [r for r in rows if r["preset"] == preset and r["run_id"] == rid]


def _retag(rows, run_id, gpu):
    """``rows`` as if run ``run_id`` on ``gpu`` (run ids start with their UTC start time)."""
    out = []
    for r in rows:
        env = dict(report._env(r), gpu=gpu)
        env.pop("date_utc", None)
        out.append(dict(r, run_id=run_id, env=json.dumps(env)))
    return out


@pytest.fixture
def base_rows():
    """The headline's layer and decode runs of the committed H200 CSV."""
    rows = report.read_csv(readme.DEFAULT_CSV)
    return {"layer": _run_of(rows, "layer", "8192x4096->4096 r16 nf4"),
            "decode": _run_of(rows, "decode", "1x4096->14336 r16 nf4")}


def _write(tmp_path, name, rows):
    path = tmp_path / "results" / name / "results.csv"
    report.write_csv(path, rows)
    return path


def _gpus(rows, preset):
    return {report._env(r)["gpu"] for r in rows if r["preset"] == preset}


def test_each_preset_comes_whole_from_the_csv_with_its_newest_run(tmp_path, base_rows):
    layer, decode = base_rows["layer"], base_rows["decode"]
    # a: layer at 06:00 and decode at 09:00 on the H200; b: layer at 05:00 and 07:00 (newer than a's) and decode at
    # 08:00 (older than a's) on the H100.
    a = _write(tmp_path, "a", _retag(layer, "20261201T060000Z-0001", H200)
               + _retag(decode, "20261201T090000Z-0002", H200))
    b = _write(tmp_path, "b", _retag(layer, "20261201T050000Z-0003", H100)
               + _retag(layer, "20261201T070000Z-0004", H100) + _retag(decode, "20261201T080000Z-0005", H100))
    for order in ([a, b], [b, a]):
        rows, source = readme.merged_rows(order)
        assert source == {"layer": b, "decode": a}, order
        assert _gpus(rows, "layer") == {H100} and _gpus(rows, "decode") == {H200}
        # every run of the preset in the chosen CSV, none of the other CSV's
        assert {r["run_id"] for r in rows if r["preset"] == "layer"} == {"20261201T050000Z-0003",
                                                                         "20261201T070000Z-0004"}
        assert {r["run_id"] for r in rows if r["preset"] == "decode"} == {"20261201T090000Z-0002"}
        assert len(rows) == 2 * len(layer) + len(decode)
    # A tie goes to the first CSV given.
    c = _write(tmp_path, "c", _retag(decode, "20261201T090000Z-0002", H100))
    assert readme.merged_rows([a, c])[1]["decode"] == a and readme.merged_rows([c, a])[1]["decode"] == c
    # A run id without a timestamp falls back to the env's date_utc; one with neither never wins over a dated run.
    dated = [dict(r, env=json.dumps(dict(report._env(r), date_utc="2026-12-02T00:00:00+00:00")))
             for r in _retag(decode, "manual-run", H100)]
    d = _write(tmp_path, "d", dated)
    assert readme.merged_rows([a, d])[1]["decode"] == d
    e = _write(tmp_path, "e", _retag(decode, "manual-run", H100))
    assert readme.merged_rows([e, a])[1]["decode"] == a
    with pytest.raises(FileNotFoundError, match="no benchmark rows"):
        readme.merged_rows([a, tmp_path / "missing.csv"])


def test_links_point_at_each_presets_own_csv_directory(tmp_path, base_rows):
    a = _write(tmp_path, "gpu-a", _retag(base_rows["decode"], "20261201T090000Z-0002", H200))
    b = _write(tmp_path, "gpu-b", _retag(base_rows["layer"], "20261201T070000Z-0004", H100))
    rows, source = readme.merged_rows([a, b])
    block = readme.generate(rows, source, tmp_path / "docs")
    layer = block[block.index("### Layer forward + backward: time"):block.index("### Layer forward + backward: peak")]
    decode = block[block.index("### Decode"):block.index("### NF4")]
    assert "[`layer_ratio.png`](../results/gpu-b/layer_ratio.png)" in layer and "gpu-a" not in layer
    assert "[`decode_ratio.png`](../results/gpu-a/decode_ratio.png)" in decode and "gpu-b" not in decode
    assert f"on {H100}," in layer and f"on {H200}," in decode
    intro = block.splitlines()[3]
    assert "(../results/gpu-a/results.csv) (decode)" in intro and "(../results/gpu-b/results.csv) (layer)" in intro
    assert "[`results.md`](../results/gpu-a/results.md)" not in intro  # several sources: each named
    assert "(../results/gpu-a/results.md) (decode)" in intro and "(../results/gpu-b/results.md) (layer)" in intro
    # One source: the single-CSV wording, no per-section source lines.
    one = readme.generate(*readme.merged_rows([b]), tmp_path / "docs")
    assert "Full tables: [`results.md`](../results/gpu-b/results.md)." in one and "\nFrom [" not in one
    # The command line writes and checks the same.
    readme_path, doc = _copies(tmp_path)
    args = ["--csv", str(a), str(b), "--readme", str(readme_path), "--doc", str(doc)]
    assert readme.main(args) == 0
    assert readme.main(["--check"] + args) == 0
    assert "(../results/gpu-b/layer_ratio.png)" in doc.read_text()
    assert readme.main(["--check", "--csv", str(a), "--readme", str(readme_path), "--doc", str(doc)]) == 1


def test_headline_gets_a_gpu_column_only_when_its_rows_come_from_several_gpus(base_rows):
    layer, decode = base_rows["layer"], base_rows["decode"]
    one = readme.headline(_retag(layer, "20261201T070000Z-0001", H200)
                          + _retag(decode, "20261201T080000Z-0002", H200))
    assert one.splitlines()[1].startswith(f"On one {H200}, bf16,")
    assert "| case | baseline | lora_ops | lora_ops vs baseline | commit |" in one and "| GPU |" not in one
    two = readme.headline(_retag(layer, "20261201T070000Z-0001", H100)
                          + _retag(decode, "20261201T080000Z-0002", H200))
    assert two.splitlines()[1].startswith("On one NVIDIA GPU per run (the GPU column; H100: NVIDIA H100 80GB HBM3, "
                                          "H200: NVIDIA H200)")
    assert "| case | baseline | lora_ops | lora_ops vs baseline | GPU | commit |" in two
    table = [l for l in two.splitlines() if l.startswith("| QLoRA")]
    gpus = {l.split(" | ")[0]: [c.strip() for c in l.strip("|").split("|")][4] for l in table}
    assert gpus == {"| QLoRA layer forward + backward, 8192 × 4096→4096": "H100",
                    "| QLoRA layer forward + backward, 8192 × 4096→14336: peak extra memory": "H100",
                    "| QLoRA decode, 1 token, 4096→14336, no grad": "H200"}


def test_gpu_short_names():
    assert readme.gpu_short("NVIDIA H100 80GB HBM3") == "H100"
    assert readme.gpu_short("NVIDIA H200") == "H200"
    assert readme.gpu_short("NVIDIA A100-SXM4-80GB") == "A100"
    assert readme.gpu_short("NVIDIA GeForce RTX 4090") == "RTX 4090"
    # Two GPUs of one short name keep their full names in the column.
    assert readme._gpu_names(["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"]) == {
        "NVIDIA H100 80GB HBM3": "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe": "NVIDIA H100 PCIe"}


def test_default_csvs_are_the_single_gpu_result_directories(tmp_path):
    for name in ("h200", "h100-80gb-hbm3", "multigpu_h200x2", "cpu", "a100-sxm4-80gb"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.csv").write_text("")
    (tmp_path / "no-csv").mkdir()
    assert [p.parent.name for p in readme.default_csvs(tmp_path)] == ["a100-sxm4-80gb", "h100-80gb-hbm3", "h200"]
    assert readme.DEFAULT_CSV in readme.DEFAULT_CSVS
    assert all(not p.parent.name.startswith("multigpu") for p in readme.DEFAULT_CSVS)
