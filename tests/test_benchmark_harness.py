"""The benchmark harness on the CPU: smoke run, results schema, merging, tables, README render.

No timing is asserted: the smoke run's numbers are meaningless, only its plumbing is checked.
"""
from __future__ import annotations

import copy
import json
import math
import time

import numpy as np
import pytest
import torch

import swamp_kernels
from torch import nn
from torch.nn.utils import prune as torch_prune

from benchmarks import cases, collect, memory, projection, render, results, run, shapes, timing, workload
from benchmarks.cases import prune, train_particles, train_resnet50
from benchmarks.case import Case
from benchmarks.workload import Workload
from swamp.config import Config
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
    op_cases = {c.op for c in cases.CASES}
    by_key = {results.result_key(r): r for r in doc["results"] if r["op"] in op_cases}
    assert set(by_key) == {(c.op, c.name, "torch") for c in cases.CASES}
    for case in cases.CASES:
        row = by_key[(case.op, case.name, "torch")]
        assert set(row["baselines"]) == set(case.baseline_names), row["extra"].get("baseline_errors")
        assert math.isclose(row["floor_ms"], row["extra"]["bytes"] / (doc["copy_bandwidth_gbs"] * 1e6))
        assert row["extra"]["host_ms"] > 0
    table = (smoke_dir / "cpu-smoke.md").read_text()
    for case in cases.CASES:
        assert f"| `{case.op}` | `{case.name}` | `torch` |" in table


def _smoke_rows(smoke_dir, op: str) -> list[dict]:
    doc = results.load(smoke_dir / "cpu-smoke.json")
    return [r for r in doc["results"] if r["op"] == op]


def _expected_workload_rows(op: str) -> set[tuple[str, str, str]]:
    cpu = torch.device("cpu")
    return {(w.op, w.name, v) for w in cases.WORKLOADS if w.op == op for v in w.variants
            if w.runs_on(v, cpu)}


@pytest.mark.parametrize("op", ["masked_conv2d", "masked_linear", "particles_train_step",
                                "resnet50_train_step"])
def test_smoke_run_has_every_workload_with_its_baselines(smoke_dir, op):
    rows = _smoke_rows(smoke_dir, op)
    assert {results.result_key(r) for r in rows} == _expected_workload_rows(op) != set()
    works = {w.name: w for w in cases.WORKLOADS if w.op == op}
    for r in rows:
        work = works[r["case"]]
        assert r["floor_ms"] is None and "baseline_errors" not in r["extra"], r["extra"].get("baseline_errors")
        assert set(r["baselines"]) == set(work.baselines) - work.compiled
    table = (smoke_dir / "cpu-smoke.md").read_text()
    assert all(f"| `{op}` | `{r['case']}` | `{r['backend']}` |" in table for r in rows)


def test_smoke_layer_rows_measure_bytes_per_weight_and_ratio_to_dense(smoke_dir):
    """bf16 weights: swamp keeps a bool mask (1 byte per weight); torch prune keeps weight_orig,
    a bf16 mask and the recomputed weight (2 more bf16 values per weight)."""
    rows = _smoke_rows(smoke_dir, "masked_conv2d") + _smoke_rows(smoke_dir, "masked_linear")
    assert len(rows) == len(dict.fromkeys(shapes.resnet50_convs())) + 1
    for r in rows:
        per_weight = r["extra"]["extra_bytes_per_weight"]
        assert per_weight.pop("torch_prune") == 4.0
        assert per_weight == dict.fromkeys(per_weight, 1.0) and r["backend"] in per_weight
        assert math.isclose(r["extra"]["time_ratio_to_dense"], r["time_ms"] / r["baselines"]["dense"])


def test_smoke_training_rows_count_images_per_second(smoke_dir):
    (particles,) = _smoke_rows(smoke_dir, "particles_train_step")
    ips = particles["extra"]["images_per_second"]
    per_step = {"concurrent_P4": 4, "one_particle_P1": 1, "sequential_4xP1": 4}
    times = {**particles["baselines"], particles["backend"]: particles["time_ms"]}
    batch = particles["extra"]["batch_per_particle"]
    assert ips == pytest.approx({n: per_step[n] * batch / (times[n] / 1e3) for n in per_step})
    assert particles["extra"]["speedup_concurrent_over_sequential"] == pytest.approx(
        ips["concurrent_P4"] / ips["sequential_4xP1"])
    assert particles["extra"]["speedup_compiled_concurrent_over_sequential"] is None   # GPU only
    # compiled (GPU only) is compared with sequential training compiled alike
    step_ms = {"concurrent_P4": 2.0, "concurrent_P4_compiled": 1.0, "sequential_4xP1_compiled": 3.0,
               "sequential_4xP1": 5.0}
    x = {"images": dict.fromkeys(step_ms, 40), "steps": 2, "config": Config()}
    extra = train_particles._extra(x, "concurrent_P4", step_ms)
    assert extra["speedup_concurrent_over_sequential"] == pytest.approx(2.5)
    assert extra["speedup_compiled_concurrent_over_sequential"] == pytest.approx(3.0)
    (resnet,) = _smoke_rows(smoke_dir, "resnet50_train_step")
    assert resnet["backend"] == "masked" and set(resnet["baselines"]) == {"dense"}
    assert resnet["extra"]["images_per_second"] == pytest.approx(
        {"masked": 2e3 / resnet["time_ms"], "dense": 2e3 / resnet["baselines"]["dense"]})
    assert resnet["extra"]["throughput_ratio_to_dense"] == pytest.approx(
        resnet["baselines"]["dense"] / resnet["time_ms"])


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
    assert {r["extra"].get("commit") for r in merged["results"]} == {"new", None}   # old rows: unstamped
    alone = results.merge(None, new)
    assert {**alone, "results": []} == {**new, "results": []}
    assert all(r["extra"] == {"copy_bandwidth_gbs": 3000.0, "commit": "new", "date": new["date"]}
               for r in alone["results"])


def test_merging_in_either_order_keeps_each_cases_later_run():
    earlier = _doc(rows=[_row(case="a", time_ms=5.0), _row(case="b", time_ms=5.0)], commit="one")
    later = {**_doc(rows=[_row(case="b", time_ms=3.0), _row(case="c")], commit="two"),
             "date": "2026-01-02T00:00:00+00:00"}
    for first, second in ((earlier, later), (later, earlier)):   # collect given the files in any order
        merged = results.merge(results.merge(None, first), second)
        assert merged["commit"] == "two" and merged["date"] == later["date"]
        assert sorted((r["case"], r["time_ms"], r["extra"]["commit"]) for r in merged["results"]) == [
            ("a", 5.0, "one"), ("b", 3.0, "two"), ("c", 2.0, "two")]


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


def test_markdown_shows_the_host_time_of_op_cases_that_have_it():
    doc = _doc(rows=[_row(time_ms=0.5, floor_ms=0.25, baselines={"topk": 1.0}, extra={"host_ms": 0.4}),
                     _row(backend="cuda", time_ms=0.25, floor_ms=0.25, baselines={"topk": 1.0})])
    text = results.markdown(doc)
    assert "| op | case | backend | time | time/floor | vs topk | host |" in text
    assert "| `swa_update_` | `c` | `triton` | 0.500 ms | 2.00× | 2.00× | 0.400 ms |" in text
    assert "| `swa_update_` | `c` | `cuda` | 0.250 ms | 1.00× | 4.00× | – |" in text


def test_host_ms_times_the_call_alone():
    calls = []
    ms = timing.host_ms(lambda: calls.append(time.sleep(0.002)), torch.device("cpu"), runs=3)
    assert len(calls) == 3 and 2.0 <= ms < 50.0


def test_markdown_has_one_table_per_op():
    doc = _doc(rows=[_row(op="swa_update_", baselines={"AveragedModel": 4.0}),
                     _row(op="masked_sgd_step_", baselines={"SGD_fused": 4.0})])
    tables = [block for block in results.markdown(doc).split("\n\n") if block.startswith("| op")]
    assert len(tables) == 2
    assert "vs AveragedModel" in tables[0] and "SGD_fused" not in tables[0]
    assert "vs SGD_fused" in tables[1] and "AveragedModel" not in tables[1]


# ------------------------------------------------------------------- README render
README = ("# swamp\n\nintro\n\n## Performance\n\n{begin}\nold text\n{end}\n\n## Next\nrest\n"
          "{pbegin}\nold projection\n{pend}\nend\n")


def _readme(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(README.format(begin=render.BEGIN, end=render.END, pbegin=render.PROJECTION_BEGIN,
                                  pend=render.PROJECTION_END))
    return path


def test_render_puts_one_section_per_gpu_between_the_markers(tmp_path):
    readme, res = _readme(tmp_path), tmp_path / "results"
    results.save(_doc("NVIDIA H100", rows=[_row()]), res)
    results.save(_doc("NVIDIA H200", rows=[_row(time_ms=1.0)]), res)
    render.render(readme, res)
    text = readme.read_text()
    head, rest = text.split(render.BEGIN)
    body, tail = rest.split(render.END)
    assert head == "# swamp\n\nintro\n\n## Performance\n\n"
    projection_section = f"{render.PROJECTION_BEGIN}\n{projection.NOT_MEASURED}\n{render.PROJECTION_END}"
    assert tail == f"\n\n## Next\nrest\n{projection_section}\nend\n"
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
    assert f"{render.PROJECTION_BEGIN}\n{projection.NOT_MEASURED}\n{render.PROJECTION_END}" in readme.read_text()


def test_render_projects_from_a_measured_resnet50_step(tmp_path):
    readme, res = _readme(tmp_path), tmp_path / "results"
    results.save(_doc("NVIDIA H100", rows=[_resnet_row()]), res)
    results.save(_doc("NVIDIA A100", rows=[_row()]), res)
    render.render(readme, res)
    body = readme.read_text().split(render.PROJECTION_BEGIN)[1].split(render.PROJECTION_END)[0]
    assert body.count("| IMP |") == 1 and "#### NVIDIA H100: 2,560 images/s" in body
    assert "A100" not in body and "not counted" in body and "old projection" not in body
    assert "| `resnet50_train_step` | `resnet50_b256_224px_bf16_channels_last` | `masked` | 100 ms | – | " \
           "2,560 | 0.98× |" in readme.read_text()


def test_render_without_projection_markers_fails_and_leaves_readme_alone(tmp_path):
    readme = tmp_path / "README.md"
    text = f"# only bench\n{render.BEGIN}\nx\n{render.END}\n"
    readme.write_text(text)
    with pytest.raises(ValueError, match="projection:begin"):
        render.render(readme, tmp_path)
    assert readme.read_text() == text


def test_render_without_markers_fails_and_leaves_readme_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="markers"):
        render.render(readme, tmp_path)
    assert readme.read_text() == "# no markers\n"


# ---------------------------------------------------------------- workload harness
def _workload(**changes) -> Workload:
    calls = []

    def counting(name):
        return lambda x: (lambda: calls.append(name))

    def failing(x):
        raise RuntimeError("out of memory")

    fields = dict(op="masked_linear", name="w", setup=lambda device, smoke: {"smoke": smoke},
                  variants={"mine": counting("mine"), "cuda": counting("cuda")},
                  baselines={"ok": counting("ok"), "broken": failing, "compiled": counting("compiled")},
                  steps=lambda x: 4, extra=lambda x, row, ms: {"row": row, "seen": sorted(ms)},
                  compiled=frozenset({"compiled"}))
    return Workload(**{**fields, **changes}), calls


def test_workload_rows_share_baselines_and_skip_what_cannot_run(capsys):
    work, calls = _workload()
    rows, failed = workload.measure(work, torch.device("cpu"), run.SMOKE_TIMING, smoke=True)
    out = capsys.readouterr().out
    assert "skip compiled: needs CUDA" in out and "skip cuda" in out and failed == {}
    assert not work.runs_on("compiled", torch.device("cuda"), compile=False)
    assert "torch.compile variants run with --compile" in capsys.readouterr().out
    assert [r["backend"] for r in rows] == ["mine"] and set(calls) == {"mine", "ok"}
    (row,) = rows
    results.validate(_doc(rows=rows))
    assert set(row["baselines"]) == {"ok"} and row["floor_ms"] is None
    assert row["extra"] == {"row": "mine", "seen": ["mine", "ok"],
                            "baseline_errors": {"broken": "RuntimeError: out of memory"}}


def test_workload_times_are_per_step(monkeypatch):
    monkeypatch.setattr(timing, "time_ms", lambda call, device, **kw: 10.0)
    work, _ = _workload(baselines={})
    (row,), _ = workload.measure(work, torch.device("cpu"), run.SMOKE_TIMING, smoke=True)
    assert row["time_ms"] == 2.5


def test_a_failing_variant_or_backend_loses_only_its_own_row(tmp_path, monkeypatch, capsys):
    """The run fails (exit 1, the errors listed), but every other row of the case is recorded."""
    def broken(x):
        raise RuntimeError("kernel crashed")
    work, _ = _workload(variants={"mine": broken, "theirs": lambda x: (lambda: None)})
    monkeypatch.setattr(cases, "WORKLOADS", (work,))
    real_swamp = Case.swamp

    def swamp(case, x, backend):
        if backend == "triton":
            raise RuntimeError("illegal address")
        return real_swamp(case, x, backend)
    monkeypatch.setattr(Case, "swamp", swamp)
    assert run.main(["--smoke", "--backends", "torch,triton", "--ops", "masked_linear,masks",
                     "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "masked_linear w mine: RuntimeError: kernel crashed" in err
    assert "apply_masks_ resnet50_convfc_fp32_pruned80 triton: RuntimeError: illegal address" in err
    recorded = results.load(tmp_path / "cpu-smoke.json")["results"]
    assert {(r["op"], r["backend"]) for r in recorded} == {("apply_masks_", "torch"), ("masked_linear", "theirs")}


def test_collect_merges_the_files_of_several_calls(tmp_path):
    first, second, merged = tmp_path / "1", tmp_path / "2", tmp_path / "merged"
    results.save(_doc(rows=[_row(case="a"), _row(case="b", time_ms=5.0)]), first)
    results.save(_doc(rows=[_row(case="b", time_ms=3.0), _row(case="c")], commit="new"), second)
    files = [next(d.glob("*.json")) for d in (first, second)]
    assert collect.main([*map(str, files), "--out", str(merged)]) == 0
    doc = results.load(next(merged.glob("*.json")))
    assert [(r["case"], r["time_ms"]) for r in doc["results"]] == [("a", 2.0), ("b", 3.0), ("c", 2.0)]
    assert doc["commit"] == "new" and next(merged.glob("*.md")).is_file()
    assert [r["extra"]["commit"] for r in doc["results"]] == ["abc", "new", "new"]   # each row's own run
    smoke = results.save(_doc("cpu-smoke", rows=[_row(case="d")]), tmp_path / "smoke")
    with pytest.raises(SystemExit, match="holds the numbers of a --smoke run"):
        collect.main([str(files[0]), str(smoke), "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()   # nothing merged before the refusal


def test_the_table_header_shows_every_run_of_a_merged_file(tmp_path):
    first = _doc(rows=[_row(case="a")], commit="one")
    second = {**_doc(rows=[_row(case="b")], commit="two"), "copy_bandwidth_gbs": 2900.0}
    path = results.save(first, tmp_path)
    results.save(second, tmp_path)
    doc = results.load(path)
    rows = {r["case"]: r["extra"] for r in doc["results"]}
    date = first["date"]
    assert rows == {"a": {"copy_bandwidth_gbs": 3000.0, "commit": "one", "date": date},
                    "b": {"copy_bandwidth_gbs": 2900.0, "commit": "two", "date": date}}
    header = results.markdown(doc).splitlines()[2]
    assert "Copy bandwidth 2900–3000 GB/s over 2 runs" in header and "commit `one`, `two`" in header
    assert "Copy bandwidth 3000 GB/s (read + write)" in results.markdown(first).splitlines()[2]


def test_sizing_the_timed_runs_ignores_the_compiling_first_call():
    calls = []

    def op():
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.05)   # JIT compilation
    timing.time_ms(op, torch.device("cpu"), budget_ms=20.0, warmup=2, min_runs=3, max_runs=50)
    assert len(calls) == 1 + 2 + 50


def test_owned_bytes_counts_parameters_buffers_and_tensor_attributes_once():
    conv = nn.Conv2d(4, 8, 3, bias=False)
    assert memory.owned_bytes(conv) == 4 * conv.weight.numel()
    torch_prune.custom_from_mask(conv, "weight", torch.rand(conv.weight.shape) < 0.2)
    assert memory.owned_bytes(conv) == 3 * 4 * conv.weight.numel()  # weight_orig, mask, weight
    shared = nn.Sequential(conv, conv)
    assert memory.owned_bytes(shared) == memory.owned_bytes(conv)
    module, nbytes = memory.built_bytes(lambda: nn.Linear(3, 5), torch.device("cpu"))
    assert isinstance(module, nn.Linear) and nbytes == 4 * (15 + 5)


class _FakeEvent:
    """torch.cuda.Event on the host clock, to run the CUDA timing path on the CPU."""

    def __init__(self, enable_timing: bool):
        assert enable_timing

    def record(self):
        self.at = time.perf_counter()

    def elapsed_time(self, end) -> float:
        return (end.at - self.at) * 1e3


def test_the_cuda_timing_path_times_every_run_after_reading_the_flush_buffer(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(timing, "L2_FLUSH_BYTES", 4096)
    monkeypatch.setattr(timing, "_FLUSH_BUFFERS", {})
    timing._flush_buffer(cpu).fill_(7)
    calls = []
    times = timing._cuda_runs_ms(lambda: calls.append(time.sleep(0.002)), cpu, 3)
    assert len(calls) == 3 and len(times) == 3 and all(t >= 2.0 for t in times)
    assert (timing._flush_buffer(cpu) == 7).all()   # read, not written: no dirty lines left in L2


def test_the_commit_comes_from_swamp_commit_where_there_is_no_git(monkeypatch):
    monkeypatch.setenv("SWAMP_COMMIT", "0123456789ab")
    assert results.new_document("g", 1.0)["commit"] == "0123456789ab"
    monkeypatch.delenv("SWAMP_COMMIT")
    assert results.new_document("g", 1.0)["commit"] != "0123456789ab"


def test_built_bytes_on_cuda_counts_requested_bytes(monkeypatch):
    requested = {"requested_bytes.all.current": 1000}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: dict(requested))

    def build():
        requested["requested_bytes.all.current"] += 9408   # ResNet-50's stem mask: not a multiple of 512
        return nn.Identity()
    module, nbytes = memory.built_bytes(build, torch.device("cuda"))
    assert isinstance(module, nn.Identity) and nbytes == 9408


@pytest.mark.parametrize("op", ["masked_conv2d", "masked_linear"])
def test_layer_variants_compute_the_dense_layer_on_masked_weights(op):
    """Every approach gives the dense layer's output and input gradient, and a weight gradient
    that is the dense one masked (the dense baseline's is not masked)."""
    work = next(w for w in cases.WORKLOADS if w.op == op)
    x = work.setup(torch.device("cpu"), True)
    layer_grads = {}
    for name, factory in {**work.variants, **work.baselines}.items():
        if not work.runs_on(name, torch.device("cpu")):
            continue
        factory(x)()
        layer = x["layers"][name]
        weight = layer.weight_orig if name == "torch_prune" else layer.weight
        layer_grads[name] = (layer(x["input"]).detach(), x["input"].grad.clone(), weight.grad.clone())
    out, grad_in, grad_w = layer_grads.pop("dense")
    assert torch.equal(x["layers"]["dense"].weight, x["weight"]) and not (grad_w[~x["mask"]] == 0).all()
    for name, (o, gi, gw) in layer_grads.items():
        torch.testing.assert_close(o, out, msg=name)
        torch.testing.assert_close(gi, grad_in, msg=name)
        torch.testing.assert_close(gw, grad_w * x["mask"], msg=name)


def test_workload_names_and_geometry():
    convs = [w for w in cases.WORKLOADS if w.op == "masked_conv2d"]
    assert len(convs) == len({w.name for w in convs}) == 23
    assert len({(w.op, w.name) for w in cases.WORKLOADS}) == len(cases.WORKLOADS)
    assert {c.op for c in cases.select(["conv", "linear", "particles", "resnet50"])} == {
        "masked_conv2d", "masked_linear", "particles_train_step", "resnet50_train_step"}


# --------------------------------------------------------------------- projection
def _resnet_row(time_ms=100.0, images=256) -> dict:
    return _row(op="resnet50_train_step", case=train_resnet50.CASE, backend="masked", time_ms=time_ms,
                floor_ms=None, baselines={"dense": 98.0},
                extra={"images_per_step": images, "images_per_second": {"masked": 2560.0},
                       "throughput_ratio_to_dense": 0.98})


def test_projection_of_imagenet_runs_from_the_measured_step():
    """2560 images/s per GPU. IMP: 7500 * 1024 rewind images + 11 levels * (90 * 1,281,167 -
    7,680,000) = 1,191,555,330 images; SWAMP: 4 particles per level, 4,743,181,320 images."""
    assert projection.images_trained(1) == 1_191_555_330
    assert projection.images_trained(4) == 4_743_181_320
    table = projection.markdown(_doc(rows=[_resnet_row()]))
    assert "2,560 images/s per GPU" in table
    imp_8 = 1_191_555_330 / (2560 * 8 * 0.90) / 3600
    swamp_128 = 4_743_181_320 / (2560 * 128 * 0.80) / 3600
    assert f"| IMP | 1.19e9 | {imp_8:.1f} h ({imp_8 / 24:.2f} days) |" in table
    assert table.splitlines()[-1].startswith("| SWAMP | 4.74e9 |")
    assert table.endswith(f"| {swamp_128:.1f} h ({swamp_128 / 24:.2f} days) |")
    assert projection.markdown(_doc(rows=[_row()])) is None
    assert projection.markdown(_doc(rows=[{**_resnet_row(), "backend": "dense"}])) is None


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
    assert len(calls) == 1 + 1 + 4 and ms > 0   # the first call, a warm-up, the timed runs


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


def test_resnet50_conv_geometry_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    model, seen = torchvision.models.resnet50(), []
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        assert (conv.padding[0], conv.bias) == (conv.kernel_size[0] // 2, None)
        conv.register_forward_pre_hook(lambda m, args: seen.append(shapes.Conv(
            m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], args[0].shape[-1])))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert shapes.resnet50_convs() == seen and len(seen) == 53


def test_select_by_alias_and_quick():
    assert {c.op for c in cases.select(["prune", "masked_sgd_step_"])} == {
        "global_magnitude_prune", "masked_sgd_step_"}
    ordered = [c.op for c in cases.select(["resnet50", "sgd", "prune"])]   # in the order asked
    assert list(dict.fromkeys(ordered)) == ["resnet50_train_step", "masked_sgd_step_", "global_magnitude_prune"]
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


def test_auto_order_ranks_backends_by_geometric_mean_over_common_cases(tmp_path, capsys):
    from benchmarks import auto_order
    rows = [_row(op="swa_update_", case="a", backend="triton", time_ms=1.0),
            _row(op="swa_update_", case="a", backend="cuda", time_ms=2.0),
            _row(op="swa_update_", case="b", backend="triton", time_ms=4.0),
            _row(op="swa_update_", case="b", backend="cuda", time_ms=1.0),
            _row(op="swa_update_", case="c", backend="cuda", time_ms=9.0),        # triton lacks it: left out
            _row(op="swa_update_", case="b", backend="torch", time_ms=0.1),       # torch is never ranked
            _row(op="masked_sgd_step_", case="a", backend="triton", time_ms=3.0),
            _row(op="masked_sgd_step_", case="a", backend="cuda", time_ms=1.0),
            _row(op="masked_linear", case="a", backend="triton", time_ms=1.0)]    # one backend: no ranking
    ranking = auto_order.rank(_doc(rows=rows))
    assert list(ranking) == ["swa_update_", "masked_sgd_step_"]
    # relative times: triton 1x and 4x (geometric mean 2), cuda 2x and 1x (sqrt 2)
    assert [b for b, _ in ranking["swa_update_"]] == ["cuda", "triton"]
    assert ranking["swa_update_"][0][1] == pytest.approx(2 ** 0.5) and ranking["swa_update_"][1][1] == pytest.approx(2.0)
    assert ranking["masked_sgd_step_"] == [("cuda", pytest.approx(1.0)), ("triton", pytest.approx(3.0))]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_doc(rows=rows)))
    assert auto_order.main([str(path)]) == 0
    assert "'masked_sgd_step_': ('cuda', 'triton', 'torch')," in capsys.readouterr().out
    stamped = lambda row, commit: {**row, "extra": {"commit": commit}}
    other_commits = [stamped(rows[6], "one"), stamped(rows[7], "two")]   # a merged file: no common run
    assert auto_order.rank(_doc(rows=other_commits)) == {}


def test_auto_follows_the_measured_order(monkeypatch):
    from swamp_kernels import _dispatch
    monkeypatch.setattr(_dispatch, "_is_available", lambda backend: True)
    monkeypatch.setattr(_dispatch, "AUTO_ORDER", {"swa_update_": ("triton", "cuda", "torch")})
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    assert _dispatch._chosen("swa_update_", "auto", cuda) == "triton"
    assert _dispatch._chosen("masked_sgd_step_", "auto", cuda) == "cuda"
    assert _dispatch._chosen("swa_update_", "auto", torch.device("cpu")) == "torch"
