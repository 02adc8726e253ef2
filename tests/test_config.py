"""Config: presets, derived values, overrides, error messages, round trips."""
import warnings

import pytest

from mixedae_fast.config import (
    Config,
    ConfigError,
    ConfigWarning,
    DataConfig,
    available_presets,
    config_from_dict,
    config_to_dict,
    derive,
    load_config,
    save_config,
    validate,
)


@pytest.mark.parametrize("preset", ["cpu_tiny", "vit_base", "vit_large"])
def test_presets_load_and_validate(preset):
    assert preset in available_presets()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # presets must not trigger config warnings
        cfg = load_config(preset)
    assert cfg.run.name == preset
    d = derive(cfg)
    assert d.topk == d.n_visible and d.hc_attention and d.hc_active
    assert cfg.mixing.group_size * d.n_visible <= d.num_patches


def test_default_config_is_valid():
    d = load_config(None).derive()
    assert (d.num_patches, d.n_visible) == (196, 49)


def test_cpu_tiny_shapes():
    cfg = load_config("cpu_tiny")
    d = derive(cfg)
    assert (d.grid, d.num_patches, d.n_visible, d.encoder_len, d.patch_dim) == (8, 64, 16, 65, 48)
    assert d.ha_layers == tuple(range(cfg.model.depth))


def test_vit_base_derived():
    cfg = load_config("vit_base")
    d = derive(cfg)
    assert (d.grid, d.num_patches, d.n_visible, d.topk, d.patch_dim) == (14, 196, 49, 49, 768)
    assert d.num_groups_per_rank == 64 and d.encoder_len == 197
    assert d.global_batch == 256 and d.lr == pytest.approx(1.5e-4)
    assert d.ha_layers == tuple(range(12)) and d.hc_attention and not d.hc_features
    cfg.optim.accum_steps = 2
    d = derive(cfg, world_size=8)
    assert d.global_batch == 256 * 8 * 2 and d.lr == pytest.approx(1.5e-4 * 16)
    cfg.optim.lr = 1e-3
    assert derive(cfg, world_size=8).lr == 1e-3
    with pytest.raises(ConfigError, match="world_size"):
        derive(cfg, world_size=0)


def test_n_visible_is_int_not_round():
    # 64 * 0.31 = 19.84: int gives 19, round would give 20
    cfg = load_config("cpu_tiny", ["mixing.mask_ratio=0.69", "mixing.group_size=3", "data.batch_size=60"])
    assert derive(cfg).n_visible == 19
    cfg = load_config("vit_base", ["mixing.mask_ratio=0.6", "mixing.group_size=2", "data.batch_size=256"])
    assert derive(cfg).n_visible == 78  # int(196 * 0.4) = int(78.4)


def test_overrides_yaml_parsing():
    cfg = load_config("cpu_tiny", [
        "--mixing.ha_layers=[0,-1]",
        "mixing.topk=8",
        "--optim.clip_grad=null",
        "--optim.lr=1e-3",  # PyYAML reads 1e-3 as a string; float fields accept it
        "--data.crop_scale=[0.3,1]",
        "runtime.compile=true",
        "--mixing.norm_pix_loss=false",
        "--optim.warmup_epochs=1",  # int accepted for a float
        "--run.name=2024",  # str field: kept as the string
        "--runtime.device=cuda:1",
        "--data.path=/data/imagenet/train",
    ])
    assert cfg.mixing.ha_layers == [0, -1] and derive(cfg).ha_layers == (0, cfg.model.depth - 1)
    assert cfg.mixing.topk == 8 and derive(cfg).topk == 8
    assert cfg.optim.clip_grad is None and cfg.optim.lr == 1e-3
    assert cfg.data.crop_scale == (0.3, 1.0) and isinstance(cfg.data.crop_scale, tuple)
    assert cfg.runtime.compile is True and cfg.mixing.norm_pix_loss is False
    assert cfg.optim.warmup_epochs == 1.0 and isinstance(cfg.optim.warmup_epochs, float)
    assert cfg.run.name == "2024" and cfg.runtime.device == "cuda:1"
    assert cfg.data.path == "/data/imagenet/train"
    assert load_config("cpu_tiny", ["--optim.clip_grad=1.0"]).optim.clip_grad == 1.0


def test_ha_none_has_no_layers():
    cfg = load_config("cpu_tiny", ["mixing.ha=none", "mixing.hc_weight=0"])
    d = derive(cfg)
    assert d.ha_layers == () and not d.hc_active


def test_hc_flags():
    d = derive(load_config("cpu_tiny", ["mixing.hc_on=both"]))
    assert d.hc_attention and d.hc_features
    with pytest.warns(ConfigWarning, match="attention part"):
        d = derive(load_config("cpu_tiny", ["mixing.hc_on=both", "mixing.ha=oracle"]))
    assert not d.hc_attention and d.hc_features
    d = derive(load_config("cpu_tiny", ["mixing.hc_on=head", "mixing.ha=none"]))
    assert d.hc_features and not d.hc_attention
    d = derive(load_config("cpu_tiny", ["mixing.hc_weight=0"]))
    assert not d.hc_active


def test_hc_warning_with_oracle():
    with pytest.warns(ConfigWarning, match=r"mixing.hc_weight = 1.0 .*ignored.*ha=topk"):
        cfg = load_config("cpu_tiny", ["mixing.ha=oracle"])
    assert not derive(cfg).hc_active


def test_mae_special_case_has_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config("cpu_tiny", ["mixing.group_size=1", "mixing.ha=none", "mixing.hc_weight=0"])
    assert derive(cfg).num_groups_per_rank == cfg.data.batch_size


def test_unknown_key_suggests():
    pattern = r"unknown key 'mixing.grop_size'; did you mean 'mixing.group_size'\?"
    with pytest.raises(ConfigError, match=pattern):
        load_config("cpu_tiny", ["--mixing.grop_size=2"])
    with pytest.raises(ConfigError, match=r"valid: .*mixing.mask_ratio"):
        config_from_dict({"mixing": {"nonsense_key": 1}})


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown section 'optimizer'; did you mean 'optim'"):
        load_config("cpu_tiny", ["optimizer.lr=1.0"])
    with pytest.raises(ConfigError, match=r"unknown section 'trainer'.*valid: model, mixing"):
        config_from_dict({"trainer": {}})


def test_unknown_preset_and_bad_override():
    with pytest.raises(ConfigError, match=r"unknown preset 'cpu_tiy'; did you mean 'cpu_tiny'"):
        load_config("cpu_tiy")
    with pytest.raises(ConfigError, match="not of the form"):
        load_config("cpu_tiny", ["mixing.group_size"])
    with pytest.raises(ConfigError, match=r"no/such/file.yaml: no such file; pass the path of an existing YAML file"):
        load_config("no/such/file.yaml")


@pytest.mark.parametrize("override, pattern", [
    ("model.depth=6.5", r"model.depth = 6.5: expected int"),
    ("model.depth=true", r"model.depth = True: expected int"),
    ("mixing.norm_pix_loss=1", r"mixing.norm_pix_loss = 1: expected bool"),
    ("mixing.mask_ratio=[1]", r"mixing.mask_ratio = \[1\]: expected float"),
    ("data.crop_scale=[0.2,0.5,1.0]", r"data.crop_scale = .*: expected tuple\[float, float\]"),
    ("mixing.ha_layers=[0.5]", r"mixing.ha_layers = \[0.5\]: expected list\[int\] \| None"),
])
def test_wrong_type(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("cpu_tiny", [override])


def test_batch_size_multiple_of_group_size():
    with pytest.raises(ConfigError, match=r"data.batch_size = 66: must be a multiple of "
                                          r"mixing.group_size = 4; nearest valid: 64 or 68"):
        load_config("cpu_tiny", ["data.batch_size=66"])
    with pytest.raises(ConfigError, match=r"nearest valid: 4$"):
        load_config("cpu_tiny", ["data.batch_size=3"])


def test_group_size_times_n_visible():
    pattern = (r"mixing.group_size \* n_visible = 4 \* 98 = 392 > num_patches = 196: "
               r"raise mixing.mask_ratio to >= 0.75 or lower mixing.group_size to <= 2")
    with pytest.raises(ConfigError, match=pattern):
        load_config("vit_base", ["mixing.mask_ratio=0.5"])


def test_bad_ha_lists_allowed():
    with pytest.raises(ConfigError, match=r"mixing.ha = 'top_k': must be one of topk, oracle, none"):
        load_config("cpu_tiny", ["mixing.ha=top_k"])


def test_ha_layers_out_of_range():
    pattern = r"mixing.ha_layers = \[0, 6\]: indices \[6\] out of range .*\[-6, 6\)"
    with pytest.raises(ConfigError, match=pattern):
        load_config("cpu_tiny", ["model.depth=6", "mixing.ha_layers=[0,6]"])
    with pytest.raises(ConfigError, match=r"indices \[-7\]"):
        load_config("cpu_tiny", ["model.depth=6", "mixing.ha_layers=[-7]"])
    cfg = load_config("cpu_tiny", ["model.depth=6", "mixing.ha_layers=[-6, 0, 5]"])
    assert derive(cfg).ha_layers == (0, 5)


@pytest.mark.parametrize("k", [0, 65])
def test_topk_out_of_range(k):
    with pytest.raises(ConfigError, match=rf"mixing.topk = {k}: must be in \[1, group_size \* n_visible\] = "
                                          r"\[1, 64\]"):
        load_config("cpu_tiny", [f"mixing.topk={k}"])


def test_mask_ratio_one():
    with pytest.raises(ConfigError, match=r"mixing.mask_ratio = 1.0: must be in \[0, 1\)"):
        load_config("cpu_tiny", ["mixing.mask_ratio=1.0"])


def test_hc_needs_two_visible():
    # N = 64, m = 0.98: n = int(1.28) = 1
    with pytest.raises(ConfigError, match="n_visible >= 2"):
        load_config("cpu_tiny", ["mixing.mask_ratio=0.98", "mixing.group_size=2"])
    with pytest.raises(ConfigError, match="n_visible >= 2"):
        load_config("cpu_tiny", ["mixing.mask_ratio=0.98", "mixing.group_size=2", "mixing.hc_on=tokens"])
    # without the loss, one visible patch per source is allowed
    assert derive(load_config("cpu_tiny", ["mixing.mask_ratio=0.98", "mixing.hc_weight=0"])).n_visible == 1


@pytest.mark.parametrize("override, pattern", [
    ("model.patch_size=5", r"model.img_size % patch_size = 32 % 5 = 2"),
    ("model.num_heads=5", r"model.embed_dim % num_heads"),
    ("model.decoder_num_heads=3", r"model.decoder_embed_dim % decoder_num_heads"),
    ("mixing.hc_tau=0", r"mixing.hc_tau = 0.0: must be > 0"),
    ("data.crop_scale=[0.5,0.2]", r"data.crop_scale = \(0.5, 0.2\): must be"),
    ("optim.betas=[0.9,1.0]", r"optim.betas .*each must be in \[0, 1\)"),
    ("optim.base_lr=0", r"optim.base_lr = 0.0: must be > 0"),
    ("optim.epochs=0", r"optim.epochs = 0: must be >= 1"),
    ("run.keep_last=0", r"run.keep_last = 0: must be >= 1"),
    ("runtime.precision=fp64", r"runtime.precision = 'fp64': must be one of auto, fp32, bf16, fp16"),
    ("runtime.attention_backend=magic", r"must be one of auto, triton, xformers, sdpa, flex, eager"),
    ("runtime.device=gpu", r"runtime.device = 'gpu'"),
    ("data.num_workers=-1", r"data.num_workers = -1: must be >= 0"),
])
def test_range_errors(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("cpu_tiny", [override])


def test_all_errors_reported_together():
    with pytest.raises(ConfigError, match=r"2 config errors:(.|\n)*mixing.hc_tau(.|\n)*optim.epochs"):
        load_config("cpu_tiny", ["mixing.hc_tau=-1", "optim.epochs=0"])


def test_validate_normalises_direct_construction():
    cfg = Config(data=DataConfig(crop_scale=[0.3, 1], batch_size=8))
    validate(cfg)
    assert cfg.data.crop_scale == (0.3, 1.0)


def test_dict_round_trip():
    cfg = load_config("cpu_tiny", ["mixing.ha_layers=[1,2]", "optim.clip_grad=3.0"])
    d = config_to_dict(cfg)
    assert d["optim"]["betas"] == [0.9, 0.95] and d["data"]["crop_scale"] == [0.2, 1.0]
    assert config_from_dict(d) == cfg


def test_save_load_round_trip(tmp_path):
    cfg = load_config("vit_large", ["--optim.lr=2.0e-4", "run.resume=auto"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert load_config(str(path)) == cfg
    assert load_config(str(path), ["data.batch_size=64"]).data.batch_size == 64


def test_yaml_unknown_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  img_size: 32\n  patch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"did you mean 'model.patch_size'"):
        load_config(path)


# -- what can only fail later is refused at load ---------------------------------------------------

@pytest.mark.parametrize("overrides, pattern", [
    (["--optim.base_lr=.inf"], r"optim\.base_lr = inf: must be finite"),
    (["--optim.lr=-.inf"], r"optim\.lr = -inf: must be finite"),
    (["--optim.clip_grad=.nan"], r"optim\.clip_grad = nan: must be finite"),
    (["--mixing.group_size=1", "--mixing.mask_ratio=0"], r"mixing\.mask_ratio = 0\.0: keeps all 64 patches"),
    (["--run.name=../.."], r"run\.name = '\.\./\.\.': must be one folder name"),
    (["--run.name=.."], r"run\.name = '\.\.'"),
    (["--run.name=a/b"], r"run\.name = 'a/b'"),
    (["--run.name=ok\n#SBATCH --x"], r"run\.name = 'ok\\n#SBATCH --x'"),
    (["--run.out_dir=runs\nrm -rf x"], r"run\.out_dir = .*control characters"),
])
def test_settings_that_fail_later_are_refused(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("cpu_tiny", overrides)


def test_mae_mode_with_masking_still_loads():
    cfg = load_config("cpu_tiny", ["--mixing.group_size=1", "--mixing.mask_ratio=0.75", "--mixing.hc_weight=0"])
    assert cfg.mixing.group_size == 1


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("optim:\n  base_lr: 1.0e-3\n  epochs: 3\n  base_lr: 1.0e-2\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: key 'base_lr' appears twice .*line 4"):
        load_config(path)
    path.write_text("optim:\n  base_lr: 1.0e-3\nrun:\n  base_lr: 1\n")  # the same key in two sections is fine
    with pytest.raises(ConfigError, match="unknown key 'run.base_lr'"):
        load_config(path)


def test_resume_target_must_exist(tmp_path):
    from mixedae_fast.config import check_resume_target

    for value in ("none", "auto"):
        check_resume_target(load_config("cpu_tiny", [f"--run.resume={value}"]))
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    check_resume_target(load_config("cpu_tiny", [f"--run.resume={tmp_path}/ckpt.pt"]))
    with pytest.raises(ConfigError, match=r"run\.resume = .*: no such file; use none, auto"):
        check_resume_target(load_config("cpu_tiny", [f"--run.resume={tmp_path}/gone.pt"]))
    with pytest.raises(ConfigError, match=r"run\.resume = .*: a folder"):
        check_resume_target(load_config("cpu_tiny", [f"--run.resume={tmp_path}"]))


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """Nine levels of nine aliases: a few hundred bytes that stand for 9**9 values; building it (or the
    error message's repr of it) hung every command. Refused before it is built; a cycle too; a config
    that uses a few aliases still loads."""
    import time

    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert len(path.read_bytes()) < 1000
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb\.yaml: .*expands to more than 100000 values .*fewer nested aliases"):
        load_config(path)
    assert time.perf_counter() - start < 5
    path.write_text("optim: &a\n  x: [*a]\n")
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(path)
    path.write_text("optim: &o\n  epochs: 3\n")
    assert load_config(path).optim.epochs == 3
