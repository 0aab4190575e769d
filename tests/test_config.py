"""swamp.config: defaults, YAML, --set overrides, and bad configs failing before training, naming the key."""
from pathlib import Path

import pytest
import yaml

from swamp import cli
from swamp import config as C

PRESETS = sorted(Path(__file__).resolve().parent.parent.glob("configs/*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_empty_file_gives_defaults(tmp_path):
    config = C.load(write(tmp_path, ""))
    assert config == C.Config()
    assert config.model.hidden == [300, 100] and config.swa.start == 0.75 and config.train.schedule == "step"


def test_overrides_set_nested_keys_with_types(tmp_path):
    config = C.load(write(tmp_path, "method: imp\ntrain: {epochs: 3}\n"),
                    ["train.lr=0.5", "model.hidden=[8, 4]", "train.weight_decay=0", "particles=2"])
    assert config.method == "imp" and config.train.epochs == 3 and config.train.lr == 0.5
    assert config.model.hidden == [8, 4] and config.particles == 2
    assert isinstance(config.train.weight_decay, float)
    whole = C.load(write(tmp_path, "train: {epochs: 3.0, batch_size: 1.28e+2}\n"))   # whole numbers: ints
    assert (whole.train.epochs, whole.train.batch_size) == (3, 128) and isinstance(whole.train.epochs, int)


def test_exponents_without_a_dot_and_empty_sections(tmp_path):
    """YAML 1.1 (PyYAML) reads 5e-4 as a string: a float key takes it as the number; a section
    left empty (``prune:``) keeps its defaults."""
    config = C.load(write(tmp_path, "train: {weight_decay: 5e-4}\nprune:\nswa:\n"), ["train.lr=1e-3", "swa.lr=0.1"])
    assert config.train.weight_decay == 5e-4 and config.train.lr == 1e-3 and config.prune == C.PruneConfig()
    assert config.swa.lr == 0.1
    with pytest.raises(C.ConfigError, match="'train.lr' must be of type float, got str '1e-3x'"):
        C.load(write(tmp_path, ""), ["train.lr=1e-3x"])


def test_broken_yaml_names_the_file(tmp_path):
    with pytest.raises(C.ConfigError, match="c.yaml' is not valid YAML"):
        C.load(write(tmp_path, "train: {epochs: 3\n"))
    with pytest.raises(C.ConfigError, match="override 'train.lr=\\[1': the value is not valid YAML"):
        C.load(write(tmp_path, ""), ["train.lr=[1"])


def test_dump_round_trips(tmp_path):
    config = C.load(write(tmp_path, "seed: 3\nprune: {exclude: [fc]}\n"))
    assert C.load(write(tmp_path, C.dump(config))) == config


@pytest.mark.parametrize("text, overrides, key", [
    ("trian: {epochs: 3}\n", [], "trian"),
    ("train: {epoch: 3}\n", [], "train.epoch"),
    ("", ["swa.begin=0.5"], "swa.begin"),
    ("train: {epochs: three}\n", [], "train.epochs"),
    ("train: {epochs: 2.5}\n", [], "train.epochs"),
    ("train: {epochs: .inf}\n", [], "train.epochs"),
    ("", ["train.nesterov=3"], "train.nesterov"),
    ("", ["model.hidden=[8, x]"], "model.hidden[1]"),
    ("", ["levels=true"], "levels"),
    ("train: 5\n", [], "train"),
    ("particles: 0\n", [], "particles"),
    ("particles: -2\n", [], "particles"),
    ("prune_fraction: 0\n", [], "prune_fraction"),
    ("prune_fraction: 1.0\n", [], "prune_fraction"),
    ("prune_fraction: 1.5\n", [], "prune_fraction"),
    ("method: lottery\n", [], "method"),
    ("data: {name: cifar10, path: /no/such/dir}\n", [], "data.path"),
    ("data: {name: npz}\n", [], "data.path"),
    ("train: {schedule: linear}\n", [], "train.schedule"),
    ("swa: {start: 1.0}\n", [], "swa.start"),
    ("swa: {anneal_epochs: -1}\n", [], "swa.anneal_epochs"),
    ("train: {epochs: 8}\nswa: {start: 0.75, anneal_epochs: 3}\n", [], "swa.anneal_epochs"),  # 2 SWA epochs
    ("", ["prune.scope=per_layer"], "prune.scope"),
    ("rewind: {mode: learning_rate}\n", [], "rewind.mode"),
    ("rewind: {mode: finetune}\ntrain: {schedule: cosine}\n", [], "rewind.mode"),
    ("", ["data.layout=nhwc"], "data.layout"),
    ("", ["device=cuda:x"], "device"),
    ("", ["model.hidden=[8, -3]"], "model.hidden"),
    ("", ["train.gamma=-1"], "train.gamma"),
    ("", ["train.milestones=[-5]"], "train.milestones"),
    ("", ["data.classes=0"], "data.classes"),
    ("", ["data.train_size=0"], "data.train_size"),
    ("", ["data.test_size=0"], "data.test_size"),
    ("", ["data.image_size=0"], "data.image_size"),
    ("", ["data.workers=-1"], "data.workers"),
    ("", ["data.shape=[]"], "data.shape"),
    ("", ["data.shape=[3, 0, 8]"], "data.shape"),
    ("", ["train.lr=.inf"], "train.lr"),
    ("", ["distributed.timeout_s=.inf"], "distributed.timeout_s"),
    ("", ["swa.lr=.nan"], "swa.lr"),
])
def test_bad_configs_name_the_key(tmp_path, text, overrides, key):
    with pytest.raises(C.ConfigError, match=f"'{key.replace('[', '.').replace(']', '.')}'"):
        C.load(write(tmp_path, text), overrides)


def test_a_data_path_under_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data.npz").write_bytes(b"")
    config = C.load(write(tmp_path, "data: {name: npz, path: ~/data.npz}\n"))
    assert config.data.path == str(tmp_path / "data.npz")


def test_a_relative_data_path_is_kept_as_the_absolute_path_it_names(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.npz").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    config = C.load(write(tmp_path, "data: {name: npz}\n"), ["data.path=data/d.npz"])
    monkeypatch.chdir("/")   # a resume from elsewhere reads the config.yaml it was dumped to
    assert C.from_dict(yaml.safe_load(C.dump(config))).data.path == str(tmp_path / "data" / "d.npz")
    assert C.from_dict({}).data.path == ""   # no path: none made up


def test_cli_rejects_a_bad_config_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", str(write(tmp_path, "particles: 0\n")), "--out", str(out)]) == 2
    assert "'particles'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_are_valid(tmp_path, preset):
    config = C.load(preset, [f"data.path={tmp_path}"])
    assert config.method in ("imp", "swamp")
    if config.method == "swamp":
        assert config.particles == 4 and config.swa == C.SWAConfig(start=0.75, lr=config.swa.lr)


def test_errors_found_while_setting_up_leave_no_run_behind(tmp_path, capsys):
    """Checks that need the data or the model fail before the run directory is written, so the
    same command with the value fixed starts the run (and resuming it says it is complete)."""
    out = tmp_path / "run"
    config = write(tmp_path, "method: dense\nmodel: {hidden: [8]}\ntrain: {epochs: 1}\nrewind: {iterations: 0}\n"
                             "device: cpu\n")
    assert cli.main(["run", str(config), "--out", str(out), "--quiet", "--set", "rewind.iterations=500"]) == 2
    assert "'rewind.iterations': 500 is not below" in capsys.readouterr().err and not out.exists()
    assert cli.main(["run", str(config), "--out", str(out), "--quiet", "--set", "model.name=cifar_vgg_16"]) == 2
    assert ("'model.name': cifar_vgg_16 does not take the data's inputs of shape [1, 8, 8]"
            in capsys.readouterr().err and not out.exists())
    bad = tmp_path / "x.npz"
    bad.write_text("not an npz")
    assert cli.main(["run", str(config), "--out", str(out), "--set", "data.name=npz",
                     "--set", f"data.path={bad}"]) == 2
    assert "is not a readable .npz file" in capsys.readouterr().err and not out.exists()
    (tmp_path / "afile").write_text("")
    assert cli.main(["run", str(config), "--out", str(tmp_path / "afile" / "sub"), "--quiet"]) == 2
    assert "afile/sub" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SWAMP_KERNELS_BACKEND", "fastest")
        assert cli.main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    assert "SWAMP_KERNELS_BACKEND='fastest' is not one of" in capsys.readouterr().err and not out.exists()
    assert cli.main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    assert "already complete" not in capsys.readouterr().out
    assert cli.main(["resume", str(out), "--quiet"]) == 0
    assert f"{out} was already complete; nothing to train" in capsys.readouterr().out


def test_resume_may_move_the_data_set_but_not_change_the_results(tmp_path, capsys):
    import numpy as np
    data = tmp_path / "a.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x_train=rng.random((40, 6), dtype=np.float32), y_train=np.arange(40) % 3,
             x_test=rng.random((9, 6), dtype=np.float32), y_test=np.arange(9) % 3)
    config = write(tmp_path, f"method: dense\ndata: {{name: npz, path: {data}}}\nmodel: {{hidden: [8]}}\n"
                             "train: {epochs: 1, batch_size: 8}\nrewind: {iterations: 0}\ndevice: cpu\n")
    out = tmp_path / "run"
    assert cli.main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    moved = data.rename(tmp_path / "b.npz")
    summary = (out / "summary.json").read_text()
    (out / "summary.json").unlink()   # as if killed after the last level's metrics.json
    capsys.readouterr()
    assert cli.main(["resume", str(out), "--quiet"]) == 0   # finished: its table, without the data set
    assert "already complete" in capsys.readouterr().out and (out / "summary.json").read_text() == summary
    assert cli.main(["resume", str(out), "--quiet", "--set", "train.epochs=5"]) == 2
    assert ("resume --set 'train.epochs=5': 'train.epochs' would change the run's results; resume can change "
            "only data.path, data.workers, device" in capsys.readouterr().err)
    (out / "level_00" / "metrics.json").unlink()   # unfinished again: resuming needs the data set
    assert cli.main(["resume", str(out), "--quiet"]) == 2
    assert "'data.path'" in (error := capsys.readouterr().err)
    assert f"; if the data set moved: `swamp resume {out} --set data.path=NEW`" in error
    assert cli.main(["resume", str(out), "--quiet", "--set", f"data.path={moved}"]) == 0
    assert C.load(out / "config.yaml").data.path == str(moved)   # later resumes find it too
    assert cli.main(["resume", str(out), "--quiet"]) == 0
    capsys.readouterr()
    again = moved.rename(tmp_path / "c.npz")   # a finished run records a new place too (for the analyses)
    assert cli.main(["resume", str(out), "--quiet", "--set", f"data.path={tmp_path / 'nowhere.npz'}"]) == 2
    assert cli.main(["resume", str(out), "--quiet", "--set", f"data.path={again}"]) == 0
    assert "already complete; nothing to train (config.yaml records data.path)" in capsys.readouterr().out
    assert C.load(out / "config.yaml").data.path == str(again)


@pytest.mark.parametrize("argv", [["run", "c.yaml", "--out", "runs/a"], ["resume", "runs/a"]])
def test_an_interrupted_run_names_the_command_that_continues_it(monkeypatch, capsys, tmp_path, argv):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(C, "load", lambda *args, **kwargs: None)
    monkeypatch.setattr(C, "validate_new_run", lambda config: None)
    monkeypatch.setattr(cli.pipeline, argv[0], interrupted)
    monkeypatch.setattr(cli.pipeline, "finished", lambda out, overrides: False)
    assert cli.main(argv) == 130   # before the run directory holds a run: nothing to resume
    assert capsys.readouterr().err.strip() == (f"swamp {argv[0]}: interrupted; nothing was saved in runs/a: "
                                               "start again with `swamp run`")
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "config.yaml").write_text("method: imp\n")
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip() == f"swamp {argv[0]}: interrupted; continue with `swamp resume runs/a`"


def test_under_torchrun_errors_name_the_rank_and_rank_0_alone_prints_the_resume_hint(monkeypatch, capsys,
                                                                                     tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "config.yaml").write_text("method: imp\n")
    monkeypatch.setattr(cli.pipeline, "resume", interrupted)
    monkeypatch.setattr(cli.pipeline, "finished", lambda out, overrides: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, expected in (("0", "swamp resume: interrupted; continue with the same torchrun line with "
                                 "`swamp resume runs/a`"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        assert cli.main(["resume", "runs/a"]) == 130
        assert capsys.readouterr().err.strip() == expected
    monkeypatch.undo()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["resume", "no/such/run"]) == 2
    assert capsys.readouterr().err.strip() == "swamp resume: error (rank 1 of 2): no/such/run does not exist"
