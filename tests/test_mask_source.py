"""masks.source: a run that trains under another run's masks (the lottery-ticket controls:
reinitialisation, shuffled masks, masks moved to other settings), and swamp.shuffled_masks."""
import functools
import shutil
from pathlib import Path

import pytest
import torch

import swamp
from swamp import cli, distributed, pipeline
from swamp import config as C
from test_distributed import _on_ranks
from test_pipeline import tiny


def level_files(out: Path, level: int, name: str) -> dict:
    return torch.load(out / f"level_{level:02d}" / name)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished IMP run of two levels."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("source") / "imp"
    pipeline.run(tiny("imp"), out, quiet=True)
    return out


def test_the_source_config_again_reproduces_the_source_run_without_pruning(source, tmp_path):
    """Same seed and settings: the same masks and weights, bitwise, although this run's own
    prune_fraction would prune otherwise; another seed (the reinitialisation control): the same
    masks, other weights."""
    copy = pipeline.run(tiny("imp", prune_fraction=0.6, masks={"source": str(source)}), tmp_path / "copy", quiet=True)
    reinit = pipeline.run(tiny("imp", seed=7, masks={"source": str(source)}), tmp_path / "reinit", quiet=True)
    assert [m["density"] for m in copy["levels"]] == [m["density"] for m in reinit["levels"]]
    for level in range(3):
        masks = level_files(source, level, "mask.pt")
        assert same(level_files(tmp_path / "copy", level, "mask.pt"), masks)
        assert same(level_files(tmp_path / "reinit", level, "mask.pt"), masks)
        assert same(level_files(tmp_path / "copy", level, "model.pt"), level_files(source, level, "model.pt"))
    assert not torch.equal(level_files(tmp_path / "reinit", 0, "model.pt")["1.weight"],
                           level_files(source, 0, "model.pt")["1.weight"])


def test_swamp_trains_shuffled_source_masks_of_the_source_layer_densities(source, tmp_path):
    out = tmp_path / "shuffled"
    summary = pipeline.run(tiny("swamp", masks={"source": str(source), "shuffle": "layerwise"}), out, quiet=True)
    assert len(summary["levels"][2]["particle_test_accuracy"]) == 2
    for level in (1, 2):
        theirs, ours = level_files(source, level, "mask.pt"), level_files(out, level, "mask.pt")
        assert {n: int(m.sum()) for n, m in ours.items()} == {n: int(m.sum()) for n, m in theirs.items()}
        assert not same(ours, theirs)
        assert not (level_files(out, level, "model.pt")["1.weight"][~ours["1.weight"]]).any()


def test_a_source_that_has_not_reached_a_level_stops_the_run_until_it_has(tmp_path):
    source, out = tmp_path / "source", tmp_path / "run"
    pipeline.run(tiny("imp", levels=1), source, quiet=True)
    with pytest.raises(C.ConfigError, match=rf"'masks.source': the run in {source} trains levels 0 to 1, not up "
                                            rf"to level 2: .*`swamp resume {source} --set levels=2`"):
        pipeline.run(tiny("imp", masks={"source": str(source)}), out, quiet=True)
    assert not out.exists()
    assert cli.main(["resume", str(source), "--quiet", "--set", "levels=2"]) == 0
    (source / "level_02" / "metrics.json").unlink()   # as while that level trains
    with pytest.raises(C.ConfigError, match="has not completed level 2 yet: resume this run once it has"):
        pipeline.run(tiny("imp", masks={"source": str(source)}), out, quiet=True)
    assert (out / "level_01" / "metrics.json").is_file() and not (out / "level_02").exists()
    assert cli.main(["resume", str(source), "--quiet"]) == 0
    pipeline.resume(out, quiet=True)
    assert same(level_files(out, 2, "mask.pt"), level_files(source, 2, "mask.pt"))


def test_a_source_without_pruned_masks_is_refused_before_anything_is_written(source, tmp_path):
    dense, dry, started = tmp_path / "dense", tmp_path / "dry", tmp_path / "started"
    pipeline.run(tiny("dense"), dense, quiet=True)
    pipeline.run(pipeline.dry_run(tiny("imp")), dry, quiet=True)
    shutil.copytree(source, started)
    shutil.rmtree(started / "level_00")   # as while its level 0 trains
    for source, message in ((tmp_path / "nowhere", f"{tmp_path / 'nowhere'} does not exist"),
                            (dense, "is a dense run: it prunes nothing"),
                            (dry, "is a dry run: its masks come from a few steps on synthetic data"),
                            (started, "has not completed level 0 yet: try again once it has")):
        out = tmp_path / "run"
        with pytest.raises(C.ConfigError, match=f"config key 'masks.source': .*{message}"):
            pipeline.run(tiny("imp", masks={"source": str(source)}), out, quiet=True)
        assert not out.exists()


@pytest.mark.parametrize("changes, message", [
    ({"model": {"hidden": [16]}}, r"level_00/mask.pt: 1.weight is no bool mask of shape \(16, 64\)"),
    ({"prune": {"exclude": ["3"]}}, r"level_00/mask.pt masks other weights than this run prunes \(only there: "
                                    r"3.weight; only here: none\): the source must prune the same model"),
])
def test_a_source_of_another_model_is_refused_before_anything_trains(source, tmp_path, changes, message):
    out = tmp_path / "run"
    with pytest.raises(C.ConfigError, match=rf"config key 'masks.source': .*{message}"):
        pipeline.run(tiny("imp", masks={"source": str(source)}, **changes), out, quiet=True)
    assert not out.exists()


def test_a_moved_source_is_named_anew_on_resume(source, tmp_path):
    here = tmp_path / "a" / "imp"
    shutil.copytree(source, here)
    out = tmp_path / "run"
    pipeline.run(tiny("imp", masks={"source": str(here)}), out, quiet=True)
    shutil.rmtree(out / "level_02")
    moved = tmp_path / "b" / "imp"
    here.parent.rename(moved.parent)
    with pytest.raises(C.ConfigError, match=rf"masks.source.*; if the source run moved: `swamp resume {out} "
                                            r"--set masks.source=NEW`"):
        pipeline.resume(out, quiet=True)
    shutil.copytree(moved, tmp_path / "other")
    with pytest.raises(C.ConfigError, match=r"only a source run that moved may be named anew \(a folder of the same "
                                            rf"name; the old, {here}, gone\)"):
        pipeline.resume(out, quiet=True, overrides=[f"masks.source={tmp_path / 'other'}"])
    pipeline.resume(out, quiet=True, overrides=[f"masks.source={moved}"])
    assert C.load(out / "config.yaml").masks.source == str(moved)
    assert same(level_files(out, 2, "mask.pt"), level_files(source, 2, "mask.pt"))
    shutil.rmtree(moved)   # a finished run needs its source no more: resume, report and analyses go on
    assert pipeline.resume(out, quiet=True)["levels"][2]["level"] == 2
    assert cli.main(["analyze", "levels", str(out), "--points", "2", "--out", str(tmp_path / "analysis")]) == 0


def test_runs_of_two_sources_are_two_experiments_unless_one_moved(tmp_path):
    """What resume counts as a change: the same folder name in two places is another run while
    the first still holds one. report --merge-seeds, comparing two runs, counts any other place."""
    first, second = tmp_path / "a" / "imp", tmp_path / "b" / "imp"
    for folder in (first, second):
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text("method: imp\n")
    a, b = (tiny("imp", masks={"source": str(folder)}) for folder in (first, second))
    assert [key for key, *_ in pipeline.result_changes(a, b)] == ["masks.source"]
    shutil.rmtree(first)
    assert pipeline.result_changes(a, b) == []
    assert [key for key, *_ in pipeline.result_changes(a, b, across_runs=True)] == ["masks.source"]


def test_merging_seeds_keeps_runs_of_two_sources_apart_in_any_order(source, tmp_path):
    from swamp import report
    first, second = tmp_path / "a" / "imp", tmp_path / "b" / "imp"
    for folder in (first, second):
        shutil.copytree(source, folder)
    runs = [tmp_path / "reinit_s1", tmp_path / "reinit_s2"]
    for run, folder, seed in zip(runs, (first, second), (1, 2)):
        pipeline.run(tiny("imp", seed=seed, masks={"source": str(folder)}), run, quiet=True)
    shutil.rmtree(first)   # a finished run needs its source no more
    for order in (runs, runs[::-1]):
        assert len(report.over_seeds(report.load_runs(order), order)) == 2


@pytest.mark.parametrize("values, message", [
    ({"masks": {"shuffle": "layerwise"}}, "'masks.shuffle': layerwise shuffles the masks of masks.source, which is not set"),
    ({"masks": {"source": "x", "shuffle": "rows"}}, "'masks.shuffle': must be one of none, layerwise, global, got 'rows'"),
    ({"method": "random", "masks": {"source": "x"}}, "'masks.source': method random cannot train another run's masks"),
    ({"method": "dense", "masks": {"source": "x"}}, "'masks.source': method dense cannot train another run's masks"),
])
def test_bad_mask_settings_are_named(values, message):
    with pytest.raises(C.ConfigError, match=message):
        C.validate(C.from_dict(values))


def test_the_source_is_absolute_and_dry_runs_leave_it_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = C.from_dict({"masks": {"source": "runs/imp", "shuffle": "global"}})
    assert config.masks.source == str(tmp_path / "runs" / "imp")
    assert pipeline.dry_run(config).masks == C.MasksConfig()


def test_shuffled_masks_keep_each_layers_density_or_the_overall_one():
    gen = torch.Generator().manual_seed(0)
    masks = {"full": torch.ones(30, 20, dtype=torch.bool), "empty": torch.zeros(7, dtype=torch.bool),
             "half": torch.rand(4, 5, 6, generator=gen) < 0.5}
    layerwise = swamp.shuffled_masks(masks, "layerwise", seed=1)
    assert {n: (m.shape, m.dtype, int(m.sum())) for n, m in layerwise.items()} == \
        {n: (m.shape, m.dtype, int(m.sum())) for n, m in masks.items()}
    assert same(layerwise, swamp.shuffled_masks(masks, "layerwise", seed=1))
    assert not torch.equal(layerwise["half"], masks["half"])
    assert not torch.equal(layerwise["half"], swamp.shuffled_masks(masks, "layerwise", seed=2)["half"])
    spread = swamp.shuffled_masks(masks, "global", seed=1)
    assert sum(int(m.sum()) for m in spread.values()) == sum(int(m.sum()) for m in masks.values())
    assert spread["empty"].any() and not spread["full"].all()
    assert {n: m.shape for n, m in spread.items()} == {n: m.shape for n, m in masks.items()}
    assert swamp.shuffled_masks({}, "global") == {}


def test_shuffled_masks_refuse_what_is_no_mask():
    with pytest.raises(ValueError, match="scope must be one of global, layerwise; got 'rows'"):
        swamp.shuffled_masks({"a": torch.ones(3, dtype=torch.bool)}, "rows")
    with pytest.raises(TypeError, match=r"masks\['a'\] must be a bool tensor, got torch.float32"):
        swamp.shuffled_masks({"a": torch.ones(3)})
    with pytest.raises(TypeError, match=r"masks\['a'\] must be a bool tensor, got list"):
        swamp.shuffled_masks({"a": [True]})


def _two_groups(topology: distributed.Topology, source: Path, out: Path, hidden: int) -> str:
    config = tiny("swamp", model={"hidden": [hidden]}, masks={"source": str(source)},
                  distributed={"particle_groups": 2})
    try:
        pipeline._execute(config, out, True, topology, new=True)
    except C.ConfigError as error:
        return str(error)
    return "trained"


def test_every_rank_trains_the_source_masks_or_stops_with_rank_zeros_error(source, tmp_path):
    out = tmp_path / "run"
    wrong = _on_ranks(functools.partial(_two_groups, source=source, out=tmp_path / "wrong", hidden=16), world=2)
    assert len(set(wrong.values())) == 1 and "1.weight is no bool mask of shape (16, 64)" in wrong[0]
    assert _on_ranks(functools.partial(_two_groups, source=source, out=out, hidden=24), world=2) == \
        {0: "trained", 1: "trained"}
    for level in range(3):
        assert same(level_files(out, level, "mask.pt"), level_files(source, level, "mask.pt"))


TIED = """
from torch import nn

def tied(input_shape, num_classes):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24),
                        nn.ReLU(), nn.Linear(24, num_classes))
    net[5].weight = net[3].weight
    return net
"""


def test_a_weight_two_layers_share_gets_one_mask_and_the_analyses_read_it(tmp_path):
    (tmp_path / "tied.py").write_text(TIED)
    model = {"name": f"{tmp_path / 'tied.py'}:tied"}
    imp, shuffled = tmp_path / "imp", tmp_path / "shuffled"
    summary = pipeline.run(tiny("imp", model=model), imp, quiet=True)
    pipeline.run(tiny("imp", model=model, masks={"source": str(imp), "shuffle": "global"}), shuffled, quiet=True)
    distinct = 64 * 24 + 24 * 24 + 24 * 10   # the shared weight counts once
    assert summary["levels"][1]["density"] == (distinct - round(0.3 * distinct)) / distinct
    for out in (imp, shuffled):
        for level in range(3):
            masks = level_files(out, level, "mask.pt")
            assert torch.equal(masks["3.weight"], masks["5.weight"]), (out.name, level)
    assert not same(level_files(imp, 2, "mask.pt"), level_files(shuffled, 2, "mask.pt"))
    from swamp.analysis import level_hessians, load_run, successive_barriers
    net = load_run(imp).network(2)   # the analyses build networks holding the weight under both names
    assert net[3].weight is net[5].weight and torch.equal(net[3].weight, level_files(imp, 2, "model.pt")["5.weight"])
    assert len(successive_barriers(imp, num_points=2)["levels"]) == 2
    masks = level_files(imp, 2, "mask.pt")
    hessians = level_hessians(imp, k=1, batches=1, iters=5, tol=1.0, trace_samples=2, levels=[2])
    unpruned = sum(p.numel() for p in net.parameters()) - int((~masks["1.weight"]).sum() + (~masks["3.weight"]).sum()
                                                               + (~masks["7.weight"]).sum())
    assert hessians["levels"][0]["trace"] / hessians["levels"][0]["trace_per_weight"] == pytest.approx(unpruned)
