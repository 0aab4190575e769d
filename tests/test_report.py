"""swamp.report on hand-written summaries: densities that differ between runs, unfinished runs."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from swamp import cli, pipeline, report
from swamp import config as C


def level(n: int, density: float, accuracy: float) -> dict:
    return {"level": n, "density": density, "test_accuracy": accuracy}


def write_run(directory, method: str, levels: list[dict] | None, **config) -> str:
    """A run directory of ``config`` whose complete levels hold ``levels`` (their metrics), and summary.json."""
    directory.mkdir()
    (directory / "config.yaml").write_text(C.dump(C.Config(method=method, **config)))
    for metrics in levels or []:
        (directory / f"level_{metrics['level']:02d}").mkdir()
        (directory / f"level_{metrics['level']:02d}" / "metrics.json").write_text(json.dumps(metrics))
    if levels is not None:
        (directory / "summary.json").write_text(json.dumps({"method": method, "levels": levels}))
    return str(directory)


def test_each_cell_shows_its_density_where_runs_differ(tmp_path):
    runs = report.load_runs([
        write_run(tmp_path / "a", "imp", [level(0, 1.0, 0.9), level(1, 0.8, 0.85)]),
        write_run(tmp_path / "b", "imp", [level(0, 1.0, 0.91), level(1, 0.5, 0.8)]),
        write_run(tmp_path / "c", "swamp", None)])   # no level finished yet
    lines = report.markdown_table(runs).splitlines()
    assert lines[0] == "| level | density | a (imp) | b (imp) | c (swamp) |"
    assert lines[2] == "| 0 | 100.00% | 90.00% | 91.00% |  |"
    assert lines[3] == "| 1 | differs | 85.00% at 80.00% | 80.00% at 50.00% |  |"


def swamp_level(n: int, density: float, accuracy: float, particles: list[float], ensemble: float) -> dict:
    return {**level(n, density, accuracy), "particle_test_accuracy": particles, "ensemble_test_accuracy": ensemble}


def test_runs_of_several_particles_get_a_table_of_their_particles_and_ensemble(tmp_path):
    runs = report.load_runs([
        write_run(tmp_path / "imp", "imp", [swamp_level(0, 1.0, 0.9, [0.9], 0.9), level(1, 0.8, 0.85)]),
        write_run(tmp_path / "swamp", "swamp", [swamp_level(0, 1.0, 0.92, [0.9, 0.875, 0.925, 0.9], 0.93),
                                                swamp_level(1, 0.5, 0.91, [0.8, 0.85], 0.88)])])
    lines = report.markdown_table(runs).splitlines()
    assert lines[:4] == ["| level | density | imp | swamp |", "|---|---|---|---|",
                         "| 0 | 100.00% | 90.00% | 92.00% |", "| 1 | differs | 85.00% at 80.00% | 91.00% at 50.00% |"]
    assert lines[5].startswith("Particles (")
    assert lines[7:] == [
        "| level | density | swamp: averaged | swamp: particles, mean (range) | swamp: ensemble |",
        "|---|---|---|---|---|",
        "| 0 | 100.00% | 92.00% | 90.00% (87.50–92.50%) | 93.00% |",
        "| 1 | 50.00% | 91.00% | 82.50% (80.00–85.00%) | 88.00% |"]
    drawn = report.plot(runs, tmp_path / "p.svg").read_text()   # the SVG keeps each text as a comment
    assert "<!-- swamp: particles (range) -->" in drawn and "imp: particles" not in drawn
    assert report.particle_table({"imp": runs["imp"]}) == ""   # one particle: nothing more to show
    assert report.markdown_table({"imp": runs["imp"]}) == "\n".join(
        ["| level | density | imp |", "|---|---|---|", "| 0 | 100.00% | 90.00% |", "| 1 | 80.00% | 85.00% |"])


def test_seeds_of_one_experiment_merge_into_mean_and_standard_deviation(tmp_path, capsys):
    imp = [write_run(tmp_path / f"imp_s{seed}", "imp", [level(0, 1.0, 0.90 + seed / 100), level(1, 0.8, 0.80 + seed / 50)]
                     [:2 if seed < 2 else 1], seed=seed, device="cpu" if seed else "auto") for seed in range(3)]
    swamp = [write_run(tmp_path / f"swamp_{seed}", "swamp", [swamp_level(0, 1.0, 0.9 + seed / 100, [0.8, 0.9], 0.95)],
                       seed=seed) for seed in range(2)]
    other = write_run(tmp_path / "imp_lr", "imp", [level(0, 1.0, 0.5)], train=C.TrainConfig(lr=0.5))
    dirs = [*imp, *swamp, other]
    runs = report.over_seeds(report.load_runs(dirs), dirs)
    assert list(runs) == ["imp_s*", "swamp*", "imp_lr"]   # seeds and devices differ; a learning rate does not
    merged = runs["imp_s*"]
    assert merged["seeds"] == [0, 1, 2] and len(merged["levels"]) == 1   # imp_s2 finished level 0 only
    assert merged["levels"][0]["test_accuracy"] == pytest.approx(0.91)
    assert merged["levels"][0]["test_accuracy_std"] == pytest.approx(0.01)   # sample standard deviation
    assert runs["swamp*"]["levels"][0]["particle_test_accuracy"] == [0.8, 0.9, 0.8, 0.9]
    lines = report.markdown_table(runs).splitlines()
    assert lines[0] == "| level | density | imp_s* (imp, seeds 0, 1, 2) | swamp* (swamp, seeds 0, 1) | imp_lr (imp) |"
    assert lines[2] == "| 0 | 100.00% | 91.00 ± 1.00% | 90.50 ± 0.71% | 50.00% |"
    assert lines[6].startswith("| level | density | swamp* (swamp, seeds 0, 1): averaged |")   # not imp's one each
    drawn = report.plot(runs, tmp_path / "p.svg").read_text()
    assert "<!-- imp_s* (imp, seeds 0, 1, 2): ± 1 std -->" in drawn and "particles (range)" not in drawn
    assert cli.main(["report", *dirs, "--merge-seeds", "--plot", str(tmp_path / "p.png")]) == 0
    shown = capsys.readouterr().out
    assert "| 0 | 100.00% | 91.00 ± 1.00% |" in shown and "imp_s2 (1 of 11 levels)" in shown
    assert "| 0 | 100.00% | 90.50 ± 0.71% | 85.00% (80.00–90.00%) | 95.00 ± 0.00% |" in shown   # particles pooled
    alike = [imp[0], imp[1], swamp[0], swamp[1]]   # two groups of one prefix, run*: named by their first runs
    renamed = [str(Path(d).rename(tmp_path / f"run{i}")) for i, d in enumerate(alike)]
    assert list(report.over_seeds(report.load_runs(renamed), renamed)) == ["run0 + 1", "run2 + 1"]


def test_merging_seeds_refuses_one_seed_twice_and_keeps_the_dense_spread(tmp_path):
    dense = [write_run(tmp_path / f"dense_{seed}", "dense", [level(0, 1.0, 0.93 + seed / 50)], seed=seed)
             for seed in range(2)]
    moved = [write_run(tmp_path / f"net_{seed}", "imp", [level(0, 1.0, 0.9)], seed=seed,
                       model=C.ModelConfig(name=f"/data/{where}/net.py:make")) for seed, where in enumerate(("a", "b"))]
    dirs = [*dense, *moved]
    runs = report.over_seeds(report.load_runs(dirs), dirs)
    assert list(runs) == ["dense*", "net*"]   # a factory file that moved is the same model
    drawn = report.plot(runs, tmp_path / "p.svg").read_text()
    assert "<!-- dense: range (merged seeds: ± 1 std) -->" in drawn   # 94 ± 1.41%, not a line at the mean
    copy = write_run(tmp_path / "dense_0_again", "dense", [level(0, 1.0, 0.93)], seed=0)
    with pytest.raises(ValueError, match=r"dense_0 and dense_0_again are runs of one config with one seed \(0\)"):
        report.over_seeds(report.load_runs([*dense, copy]), [*dense, copy])


def test_report_cli_plots_atomically_and_shows_what_unfinished_runs_have(tmp_path, capsys):
    dirs = [write_run(tmp_path / "a", "imp", [level(0, 1.0, 0.9), level(1, 0.8, 0.85)]),
            write_run(tmp_path / "b", "swamp", None)]
    plot = tmp_path / "p.png"
    assert cli.main(["report", *dirs, "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*tmp*"))
    assert "unfinished (still training, or stopped: `swamp resume`): a (2 of 11 levels), b (0 of 11 levels)" \
        in capsys.readouterr().out
    assert cli.main(["report", dirs[0], "--plot", str(tmp_path / "new" / "dir" / "p.png")]) == 0   # folders made
    assert (tmp_path / "new" / "dir" / "p.png").is_file()
    capsys.readouterr()
    assert cli.main(["report", dirs[1], "--plot", str(tmp_path / "q.png")]) == 0   # the table, no plot
    shown = capsys.readouterr().out
    assert "| level | density | b (swamp) |" in shown and "no plot: no run has finished a level yet" in shown
    assert not (tmp_path / "q.png").exists()
    with pytest.raises(ValueError, match="no run has finished a level yet"):
        report.plot(report.load_runs([dirs[1]]), tmp_path / "q.png")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        report.load_runs([tmp_path / "typo"])


def test_the_report_reads_the_level_folders_whatever_summary_json_holds(tmp_path):
    directory = tmp_path / "a"
    write_run(directory, "imp", [level(0, 1.0, 0.9), level(1, 0.8, 0.85)])
    expected = report.load_runs([directory])
    assert expected["a"] == {"method": "imp", "levels": [level(0, 1.0, 0.9), level(1, 0.8, 0.85)]}
    (directory / "summary.json").write_text(json.dumps({"method": "imp", "levels": [level(0, 1.0, 0.9)]}))
    assert report.load_runs([directory]) == expected   # killed between level 1's metrics.json and summary.json
    (directory / "summary.json").write_text('{"method": "imp", "lev')   # truncated by a failed copy
    assert report.load_runs([directory]) == expected
    (directory / "summary.json").write_bytes(b"PK\x03\x04\x80\xff")   # not even text
    assert report.load_runs([directory]) == expected
    (directory / "summary.json").unlink()
    assert report.load_runs([directory]) == expected
    (directory / "level_01" / "metrics.json").write_text("{")
    with pytest.raises(ValueError, match=r"level_01/metrics.json is damaged: not valid JSON"):
        report.load_runs([directory])


def test_the_plot_takes_its_format_from_the_suffix_and_refuses_a_folder(tmp_path, capsys):
    runs = report.load_runs([write_run(tmp_path / "a", "imp", [level(0, 1.0, 0.9), level(1, 0.8, 0.85)])])
    assert report.plot(runs, tmp_path / "p.pdf").read_bytes()[:5] == b"%PDF-"
    assert report.plot(runs, tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(ValueError, match=r"swamp report writes .png, .pdf, .svg, .eps, .ps files, not .docx"):
        report.plot(runs, tmp_path / "p.docx")
    assert cli.main(["report", str(tmp_path / "a"), "--plot", str(tmp_path)]) == 2
    assert f"--plot {tmp_path} is a folder; name the image file" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*tmp*"))


def test_runs_of_one_name_are_told_apart_by_their_folders_and_dry_runs_are_left_out(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dirs = [write_run(tmp_path / d / "imp", "imp", [level(0, 1.0, 0.9)]) for d in ("a", "b")]
    runs = report.load_runs([*dirs, write_run(tmp_path / "swamp", "swamp", [level(0, 1.0, 0.92)])])
    assert list(runs) == ["a/imp", "b/imp", "swamp"]
    assert report.markdown_table(runs).splitlines()[0] == "| level | density | a/imp (imp) | b/imp (imp) | swamp |"
    with pytest.raises(ValueError, match="a run directory is named twice"):
        report.load_runs([dirs[0], dirs[0] + "/"])
    dry = tmp_path / "dry"
    dry.mkdir()
    (dry / "config.yaml").write_text(C.dump(pipeline.dry_run(C.Config(method="imp"))))
    with pytest.raises(ValueError, match=r"dry holds a dry run \(synthetic data, to measure speed\)"):
        report.load_runs([dirs[0], dry])


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "level_01" / "metrics.json").write_text("{}"), r"level_01/metrics.json is damaged: no density"),
    (lambda d: (d / "level_01" / "metrics.json").write_text("[1, 2]"), r"metrics.json is damaged: no density"),
    (lambda d: (d / "config.yaml").write_text(""), r"config.yaml is damaged: empty"),
    (lambda d: (d / "level_01" / "metrics.json").write_text(json.dumps({**level(1, 0.8, 0.85),
                                                                        "particle_test_accuracy": 0.9})),
     r"level_01/metrics.json is damaged: particle_test_accuracy is no list of numbers"),
    (lambda d: (d / "level_01" / "metrics.json").write_text(json.dumps({**level(1, 0.8, 0.85),
                                                                        "ensemble_test_accuracy": None})),
     r"level_01/metrics.json is damaged: .* or ensemble_test_accuracy no number"),
])
def test_a_damaged_run_file_is_named(tmp_path, capsys, damage, message):
    directory = tmp_path / "a"
    write_run(directory, "imp", [level(0, 1.0, 0.9), level(1, 0.8, 0.85)])
    damage(directory)
    assert cli.main(["report", str(directory), "--plot", str(tmp_path / "p.png")]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_plot_replaces_only_an_earlier_plot(tmp_path, capsys):
    runs = report.load_runs([write_run(tmp_path / "a", "imp", [level(0, 1.0, 0.9), level(1, 0.8, 0.85)])])
    for suffix in ("png", "pdf", "svg", "eps"):
        path = report.plot(runs, tmp_path / f"p.{suffix}")
        assert report.plot(runs, path) == path   # its own: replaced
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"\x89PNG my figure")
    with pytest.raises(FileExistsError, match=r"mine.png exists and is not a plot of swamp report"):
        report.plot(runs, mine)
    assert mine.read_bytes() == b"\x89PNG my figure"
    assert cli.main(["report", str(tmp_path / "a"), "--plot", str(mine)]) == 2   # the table still comes
    shown = capsys.readouterr()
    assert "| level | density | a (imp) |" in shown.out and "mine.png exists and is not a plot" in shown.err
    assert mine.read_bytes() == b"\x89PNG my figure"
    with pytest.raises(NotADirectoryError, match=r"mine.png is a file, not a folder"):
        report.plot(runs, mine / "p.png")
    with pytest.raises(ValueError, match=r"swamp report writes .png, .pdf, .svg, .eps, .ps files, not .jpg"):
        report.plot(runs, tmp_path / "p.jpg")


def test_a_reader_that_leaves_early_costs_neither_the_plot_nor_an_error(tmp_path):
    directory = write_run(tmp_path / "a", "imp", [level(0, 1.0, 0.9), level(1, 0.8, 0.85)])
    plot = tmp_path / "p.png"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    process = subprocess.Popen([sys.executable, "-m", "swamp", "report", directory, "--plot", str(plot)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    process.stdout.close()   # `swamp report ... | head -0`
    assert process.wait(timeout=120) == 0
    assert b"Broken pipe" not in process.stderr.read() and plot.read_bytes()[:4] == b"\x89PNG"


def test_labels_never_name_the_root():
    paths = [Path("/tmp/a/imp"), Path("/x/tmp/a/imp")]
    assert [report._label(p, paths) for p in paths] == ["/tmp/a/imp", "x/tmp/a/imp"]
