"""`make demo` (swamp.demo): four runs and their report in one folder, which it replaces only
when that folder holds nothing but an earlier demo's output; bad input changes nothing."""
import subprocess
import sys

import pytest

from swamp import demo

QUICK = ["--set", "levels=1", "--set", "train.epochs=1", "--set", "rewind.iterations=0"]


@pytest.mark.parametrize("argv, message", [
    (["--set", "no_such_key=1"], "unknown config key 'no_such_key'"),
    (["--set", "method=imp"], "the demo runs every method in turn: drop --set method=..."),
    (["--set", "train.epochs=1"], "'rewind.iterations': 22 is not below the 22 training iterations"),  # from the data
])
def test_bad_overrides_fail_before_the_folder_is_touched(tmp_path, capsys, argv, message):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "imp").mkdir()   # an earlier demo's, which a valid call would replace
    assert demo.main(["--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert (out / "imp").is_dir()


def test_a_folder_with_other_files_is_refused(tmp_path, capsys):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "my_run").mkdir()
    assert demo.main(["--out", str(out), *QUICK]) == 2
    assert "holds files the demo did not write (my_run)" in capsys.readouterr().err
    assert (out / "my_run").is_dir()


@pytest.mark.parametrize("own, named", [("imp/notes.txt", "imp/notes.txt"), ("swamp/analysis/levels_swamp.json", "swamp/analysis"),
                                        ("swamp/level_01/mine.pt", "swamp/level_01/mine.pt"),
                                        ("dense/level_02", "dense/level_02")])
def test_files_of_the_users_inside_the_run_folders_are_refused(tmp_path, capsys, own, named):
    out = tmp_path / "runs"
    (out / own).parent.mkdir(parents=True)
    (out / own).write_text("mine")
    assert demo.main(["--out", str(out), *QUICK]) == 2
    assert f"holds files the demo did not write ({named})" in capsys.readouterr().err
    assert (out / own).read_text() == "mine"


def test_the_demo_writes_its_runs_table_and_plot_and_replaces_its_own_output(tmp_path, capsys):
    out = tmp_path / "demo"
    for _ in range(2):   # the second call replaces the first one's output
        assert demo.main(["--out", str(out), *QUICK]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(demo.OUTPUTS)
    table = (out / "results.md").read_text()
    assert table.startswith("| level | density | dense | imp | swamp | random |\n")
    assert table in capsys.readouterr().out


def test_python_m_swamp_runs_beside_a_run_folder_named_swamp(tmp_path):
    """The demo's SWAMP run is a folder named swamp; with its analyses inside, it must not shadow
    the package's modules (pyproject.toml's package-dir makes the editable install a path entry)."""
    (tmp_path / "swamp" / "analysis").mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "swamp", "report", "swamp"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("swamp report: error:"), result.stderr
