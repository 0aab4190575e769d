"""The benchmark harness on the CPU: smoke run, results schema, merging, tables, README render.

No timing is asserted: the smoke run's numbers are meaningless, only its plumbing is checked.
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

import swamp_kernels
from benchmarks import cases, render, results, run, shapes, timing
from benchmarks.cases import prune
from swamp_kernels._dispatch import triton_interpreting


# ------------------------------------------------------------------------ fixtures
def _row(op="swa_update_", case="c", backend="triton", time_ms=2.0, floor_ms=1.0,
         baselines=None, extra=None) -> dict:
    return {"op": op, "case": case, "backend": backend, "time_ms": time_ms, "floor_ms": floor_ms,
            "baselines": {"b": 6.0} if baselines is None else baselines, "extra": extra or {}}


def _doc(gpu="NVIDIA Test GPU", rows=(), commit="abc") -> dict:
    return {"gpu": gpu, "torch": "2.11.0", "triton": "3.6.0", "commit": commit,
            "date": "2026-01-01T00:00:00+00:00", "copy_bandwidth_gbs": 3000.0, "results": list(rows)}


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    assert run.main(["--smoke", "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------- smoke run
def test_smoke_run_writes_a_valid_file_with_every_case(smoke_dir):
    assert sorted(p.name for p in smoke_dir.iterdir()) == ["cpu-smoke.json", "cpu-smoke.md"]
    doc = json.loads((smoke_dir / "cpu-smoke.json").read_text())
    results.validate(doc)
    by_key = {results.result_key(r): r for r in doc["results"]}
    assert set(by_key) == {(c.op, c.name, "torch") for c in cases.CASES}
    for case in cases.CASES:
        row = by_key[(case.op, case.name, "torch")]
        assert set(row["baselines"]) == set(case.baseline_names), row["extra"].get("baseline_errors")
        assert math.isclose(row["floor_ms"], row["extra"]["bytes"] / (doc["copy_bandwidth_gbs"] * 1e6))
    table = (smoke_dir / "cpu-smoke.md").read_text()
    for case in cases.CASES:
        assert f"| `{case.op}` | `{case.name}` | `torch` |" in table


def test_smoke_run_merges_into_an_existing_file(smoke_dir, tmp_path):
    other = _row(op="global_magnitude_prune", case="kept", backend="torch")
    stale = _row(op="apply_masks_", case="resnet50_convfc_fp32_pruned80", backend="torch", time_ms=1e6)
    results.atomic_write_text(tmp_path / "cpu-smoke.json", json.dumps(_doc("cpu-smoke", [stale, other])))
    assert run.main(["--smoke", "--ops", "masks", "--out", str(tmp_path)]) == 0
    doc = results.load(tmp_path / "cpu-smoke.json")
    assert [results.result_key(r) for r in doc["results"]] == [results.result_key(stale),
                                                               results.result_key(other)]
    assert doc["results"][0]["time_ms"] != 1e6 and doc["results"][1] == other


@pytest.mark.skipif(not triton_interpreting(), reason="Triton runs on CPU tensors only when interpreted")
def test_smoke_run_times_every_runnable_backend_against_shared_baselines(tmp_path):
    assert run.main(["--smoke", "--ops", "masks", "--backends", "torch,triton,cuda",
                     "--out", str(tmp_path)]) == 0
    rows = results.load(tmp_path / "cpu-smoke.json")["results"]
    assert [r["backend"] for r in rows] == ["torch", "triton"]
    assert rows[0]["baselines"] == rows[1]["baselines"]


def test_smoke_needs_an_out_dir_outside_results():
    with pytest.raises(SystemExit, match="--out"):
        run.main(["--smoke"])
    with pytest.raises(SystemExit, match="--out"):
        run.main(["--smoke", "--out", str(results.RESULTS_DIR)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_run_without_cuda_exits_with_a_clear_message():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        run.main(["--ops", "prune"])


def test_backends_that_cannot_run_are_skipped(capsys):
    assert run._runnable("global_magnitude_prune", ["torch", "cuda"], torch.device("cpu")) == ["torch"]
    assert "skip cuda" in capsys.readouterr().out


# ------------------------------------------------------------------------- schema
def test_valid_document_passes():
    results.validate(_doc(rows=[_row(), _row(backend="cuda", floor_ms=None, baselines={})]))


@pytest.mark.parametrize("breaks", [
    lambda d: d.pop("commit"),
    lambda d: d.update(extra_field=1),
    lambda d: d.update(copy_bandwidth_gbs="3000"),
    lambda d: d.update(copy_bandwidth_gbs=0.0),
    lambda d: d["results"][0].pop("extra"),
    lambda d: d["results"][0].update(time_ms=True),
    lambda d: d["results"][0].update(time_ms=-1.0),
    lambda d: d["results"][0].update(time_ms=float("nan")),
    lambda d: d["results"][0].update(floor_ms="1"),
    lambda d: d["results"][0].update(baselines={"b": "fast"}),
    lambda d: d["results"][0].update(baselines={"b": 0.0}),
    lambda d: d["results"][0].update(extra=[]),
    lambda d: d["results"].append(copy.deepcopy(d["results"][0])),
    lambda d: d.update(results={}),
])
def test_invalid_documents_are_rejected(breaks):
    doc = _doc(rows=[_row()])
    breaks(doc)
    with pytest.raises(ValueError):
        results.validate(doc)


# ------------------------------------------------------------------------ merging
def test_merge_replaces_same_key_and_keeps_others():
    old = _doc(rows=[_row(case="a"), _row(case="b", time_ms=5.0), _row(case="b", backend="cuda")],
               commit="old")
    new = _doc(rows=[_row(case="c"), _row(case="b", time_ms=3.0)], commit="new")
    merged = results.merge(old, new)
    assert merged["commit"] == "new"
    assert [(r["case"], r["backend"], r["time_ms"]) for r in merged["results"]] == [
        ("a", "triton", 2.0), ("b", "triton", 3.0), ("b", "cuda", 2.0), ("c", "triton", 2.0)]
    assert results.merge(None, new) == new


def test_save_merges_and_writes_json_and_markdown(tmp_path):
    results.save(_doc(rows=[_row(case="a"), _row(case="b")]), tmp_path)
    path = results.save(_doc(rows=[_row(case="b", time_ms=4.0)]), tmp_path)
    assert path == tmp_path / "nvidia-test-gpu.json"
    assert [(r["case"], r["time_ms"]) for r in results.load(path)["results"]] == [("a", 2.0), ("b", 4.0)]
    assert "| `swa_update_` | `b` | `triton` | 4.00 ms |" in path.with_suffix(".md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nvidia-test-gpu.json", "nvidia-test-gpu.md"]


def test_gpu_slug():
    assert results.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert results.gpu_slug("  /// ") == "unknown-device"


# ----------------------------------------------------------------------- markdown
def test_markdown_table_shows_time_floor_ratio_and_speedups():
    doc = _doc(rows=[_row(time_ms=2.0, floor_ms=0.5, baselines={"topk": 6.0, "sort": 1.0}),
                     _row(backend="cuda", time_ms=0.25, floor_ms=None, baselines={"topk": 1.0})])
    text = results.markdown(doc)
    assert text.startswith("## NVIDIA Test GPU")
    assert "| op | case | backend | time | time/floor | vs topk | vs sort |" in text
    assert "| `swa_update_` | `c` | `triton` | 2.00 ms | 4.00× | 3.00× | 0.50× |" in text
    assert "| `swa_update_` | `c` | `cuda` | 0.250 ms | – | 4.00× | – |" in text


def test_markdown_has_one_table_per_op():
    doc = _doc(rows=[_row(op="swa_update_", baselines={"AveragedModel": 4.0}),
                     _row(op="masked_sgd_step_", baselines={"SGD_fused": 4.0})])
    tables = [block for block in results.markdown(doc).split("\n\n") if block.startswith("| op")]
    assert len(tables) == 2
    assert "vs AveragedModel" in tables[0] and "SGD_fused" not in tables[0]
    assert "vs SGD_fused" in tables[1] and "AveragedModel" not in tables[1]


# ------------------------------------------------------------------- README render
README = "# swamp\n\nintro\n\n## Performance\n\n{begin}\nold text\n{end}\n\n## Next\nrest\n"


def _readme(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(README.format(begin=render.BEGIN, end=render.END))
    return path


def test_render_puts_one_section_per_gpu_between_the_markers(tmp_path):
    readme, res = _readme(tmp_path), tmp_path / "results"
    results.save(_doc("NVIDIA H100", rows=[_row()]), res)
    results.save(_doc("NVIDIA H200", rows=[_row(time_ms=1.0)]), res)
    render.render(readme, res)
    text = readme.read_text()
    head, rest = text.split(render.BEGIN)
    body, tail = rest.split(render.END)
    assert head == "# swamp\n\nintro\n\n## Performance\n\n" and tail == "\n\n## Next\nrest\n"
    assert "old text" not in body
    assert body.index("### NVIDIA H100") < body.index("### NVIDIA H200")
    assert "| `swa_update_` | `c` | `triton` | 1.00 ms | 1.00× | 6.00× |" in body
    render.render(readme, res)
    assert readme.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "results"]


def test_render_without_results_says_so(tmp_path):
    readme = _readme(tmp_path)
    render.render(readme, tmp_path / "no-results")
    assert f"{render.BEGIN}\n{render.NO_RESULTS}\n{render.END}" in readme.read_text()


def test_render_without_markers_fails_and_leaves_readme_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="markers"):
        render.render(readme, tmp_path)
    assert readme.read_text() == "# no markers\n"


# ------------------------------------------------------------------- atomic write
def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "f.json"
    results.atomic_write_text(path, "one")
    results.atomic_write_text(path, "two")
    with pytest.raises(TypeError):
        results.atomic_write_text(path, b"bytes are not text")
    assert path.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


# ------------------------------------------------------------------ timing, shapes
def test_time_ms_runs_warmup_then_the_clamped_number_of_runs():
    calls = []
    ms = timing.time_ms(lambda: calls.append(1), torch.device("cpu"), budget_ms=0.0, warmup=1,
                        min_runs=4, max_runs=10)
    assert len(calls) == 1 + 4 and ms > 0


def test_floor_ms_is_bytes_over_bandwidth():
    assert timing.floor_ms(3 * 10**9, 1500.0) == pytest.approx(2.0)


def test_shape_lists_match_the_models():
    assert (len(shapes.resnet50_params()), shapes.numel(shapes.resnet50_params())) == (161, 25_557_032)
    assert (len(shapes.resnet50_conv_fc()), shapes.numel(shapes.resnet50_conv_fc())) == (54, 25_502_912)
    assert shapes.numel(shapes.cifar_resnet20_params()) == 272_474
    assert shapes.numel(shapes.MIXED_1E8) == 10**8
    tiny = shapes.shrink(shapes.resnet50_params())
    assert [len(s) for s in tiny] == [len(s) for s in shapes.resnet50_params()[:len(tiny)]]
    assert max(shapes.numel([s]) for s in tiny) <= 512


def test_select_by_alias_and_quick():
    assert {c.op for c in cases.select(["prune", "masked_sgd_step_"])} == {
        "global_magnitude_prune", "masked_sgd_step_"}
    assert any(c.large for c in cases.select(None)) and not any(c.large for c in cases.select(None, quick=True))
    with pytest.raises(ValueError, match="unknown ops"):
        cases.select(["prunee"])


# ------------------------------------------------------- baselines do the real work
def test_prune_baselines_select_what_the_reference_selects():
    """On tie-free weights the torch baselines prune exactly like the op; OpenLTH's numpy
    threshold ``sort(|w|)[ceil(0.2 n)]`` with ``>`` prunes one entry more."""
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(s, generator=gen) for s in [(7, 3), (50,), (4, 4, 3, 3)]]
    masks = [torch.rand(w.shape, generator=gen) < 0.6 for w in weights]
    n = sum(int(m.sum()) for m in masks)
    expected = swamp_kernels.global_magnitude_prune(weights, masks, 0.2, backend="torch")
    for baseline in (prune.prune_topk, prune.prune_kthvalue, prune.prune_sort):
        assert all(torch.equal(a, b) for a, b in zip(baseline(weights, masks, 0.2), expected))
    openlth = swamp_kernels.global_magnitude_prune(weights, masks, math.ceil(0.2 * n) + 1, backend="torch")
    for a, b in zip(prune.prune_numpy_cpu(weights, masks, 0.2), openlth):
        np.testing.assert_array_equal(a, b.numpy())
