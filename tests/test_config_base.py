"""A YAML config may build on a preset or another file (``base:``), section by section; cycles and bad
bases are one error each; ``config`` prints loadable YAML with the derived values as comments."""
import pytest
import yaml

from mixedae_fast.cli import main
from mixedae_fast.config import ConfigError, config_to_dict, load_config


def test_a_file_builds_on_a_preset_key_by_key(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: cpu_tiny\noptim:\n  epochs: 3\nrun:\n  name: mine\n")
    cfg = load_config(tmp_path / "mine.yaml")
    tiny = load_config("cpu_tiny")
    assert cfg.optim.epochs == 3 and cfg.run.name == "mine"
    assert cfg.optim.base_lr == tiny.optim.base_lr and cfg.model == tiny.model      # the rest from the preset
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.yaml").write_text("base: ../mine.yaml\nmixing:\n  ha: oracle\n  hc_weight: 0\n")
    more = load_config(str(tmp_path / "sub" / "more.yaml"), ["--optim.epochs=5"])
    assert (more.mixing.ha, more.optim.epochs, more.run.name, more.model.img_size) == ("oracle", 5, "mine", 32)


def test_bad_bases(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="comes back to itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: cpu_tinyy\n")
    with pytest.raises(ConfigError, match="cpu_tiny"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [cpu_tiny]\n")
    with pytest.raises(ConfigError, match="must name a preset"):
        load_config(tmp_path / "d.yaml")


def test_config_prints_yaml_that_loads_back(tmp_path, capsys):
    assert main(["config", "--config", "cpu_tiny", "--mixing.topk=8"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(text)
    assert config_to_dict(load_config(tmp_path / "printed.yaml")) == config_to_dict(
        load_config("cpu_tiny", ["--mixing.topk=8"]))
    derived = yaml.safe_load("\n".join(line[2:] for line in text.splitlines() if line.startswith("# ")))
    assert derived["derived"]["n_visible"] == 16 and derived["derived"]["lr"] == pytest.approx(1.5e-3)


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "mixing.hc_weight" in out and "data.labels" in out and "run.loggers" in out
    assert "the lr schedule keeps" in out                                   # what --max-steps does
