"""The ``error:`` lines users read: each on one line, naming the thing, the reason and the fix.

Two halves: bad inputs (to the CLI, or to the function that reads them) whose line must carry the
value and what to do; and a scan of the package's ``raise`` statements for messages too short to say
what, why and the fix."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mixedae_fast.cli import main
from mixedae_fast.errors import error_line

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("MIXEDAE_DEBUG", raising=False)


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


# (argv from tmp_path, exit code, fragments the one error line holds: the thing, then the fix)
CLI_CASES = {
    "yaml-syntax": (lambda t: ["pretrain", "--config", _yaml(t, "model:\n  depth: [1\n")], 2,
                    ["c.yaml: invalid YAML at line", "flow sequence that starts at line 2", "fix that line"]),
    "yaml-indent": (lambda t: ["pretrain", "--config", _yaml(t, "model:\n  depth: 3\n   x: 2\n")], 2,
                    ["line 3, column 5", "mapping values are not allowed here"]),
    "section-not-mapping": (lambda t: ["pretrain", "--config", _yaml(t, "model: 3\n")], 2,
                            ["section 'model' = 3", "indented under 'model:'"]),
    "top-level-list": (lambda t: ["pretrain", "--config", _yaml(t, "- 1\n")], 2,
                       ["top level is a list", "'section:' lines"]),
    "config-missing": (lambda t: ["pretrain", "--config", str(t / "gone.yaml")], 2,
                       ["gone.yaml: no such file", "cpu_tiny"]),
    "wrong-type": (lambda t: ["pretrain", "--model.depth=6.5"], 2,
                   ["model.depth = 6.5: expected int, got float", "--model.depth=VALUE"]),
    "two-problems": (lambda t: ["pretrain", "--mixing.hc_tau=0", "--optim.epochs=0"], 2,
                     ["2 config errors: (1) mixing.hc_tau = 0.0: must be > 0; (2) optim.epochs = 0"]),
    "make-data-seed": (lambda t: ["make-data", "--out", str(t / "d"), "--seed", "-1"], 2,
                       ["make-data --seed -1: must be >= 0", "leave it out"]),
    "make-data-size": (lambda t: ["make-data", "--out", str(t / "d"), "--size", "2"], 2,
                       ["make-data --size 2: must be >= 8"]),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_error_is_one_line_with_the_thing_and_the_fix(tmp_path, capsys, case):
    make, code, fragments = CLI_CASES[case]
    assert main(make(tmp_path)) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err  # one line, nothing before or after it
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    assert not (tmp_path / "d").exists()  # make-data refused before writing


def _dist_env_bad_rank():
    from mixedae_fast.train.distributed import dist_env

    dist_env({"RANK": "3", "WORLD_SIZE": "2"})


def _nodelist_unbalanced():
    from mixedae_fast.train.launch import expand_nodelist

    expand_nodelist("node[01-04")


def _negative_label(tmp_path):
    from mixedae_fast.pipelines.files import read_file_list

    (tmp_path / "list.txt").write_text("a.jpg 0\nb.jpg -2\n")
    read_file_list(tmp_path / "list.txt")


def _images_in_a_file(tmp_path):
    from mixedae_fast.pipelines.files import scan_images

    (tmp_path / "f.txt").write_text("x")
    scan_images(tmp_path / "f.txt")


def _unreadable_init(tmp_path):
    from mixedae_fast.train.checkpoint import load_checkpoint

    (tmp_path / "w.pt").write_text("not a checkpoint")
    load_checkpoint(tmp_path / "w.pt", fix="point init.from at another file")


# (raiser of tmp_path, exit code, fragments of its error line)
CALL_CASES = {
    "rank-outside-world": (lambda t: _dist_env_bad_rank(), 2, ["rank 3 is not in [0, world size 2)",
                                                               "RANK, WORLD_SIZE", "torchrun or srun"]),
    "slurm-host-list": (lambda t: _nodelist_unbalanced(), 2, ["'node[01-04'", "set MASTER_ADDR"]),
    "file-list-label": (_negative_label, 2, ["list.txt:2: labels must be >= 0", "got -2; fix that line"]),
    "folder-is-a-file": (_images_in_a_file, 2, ["f.txt' is a file", "data.format=filelist"]),
    "checkpoint-unreadable": (_unreadable_init, 2, ["cannot read checkpoint", "point init.from at another file"]),
}


@pytest.mark.parametrize("case", CALL_CASES)
def test_error_line_names_the_thing_and_the_fix(tmp_path, case):
    make, code, fragments = CALL_CASES[case]
    with pytest.raises(Exception) as info:
        make(tmp_path)
    got, line = error_line(info.value)
    assert got == code and "\n" not in line and "(unexpected" not in line, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_environment_failures_are_not_reported_as_unexpected(monkeypatch):
    """A missing package or tool is no bug: its line names the fix, without the 'unexpected ... --debug'
    of an unknown error (they were RuntimeErrors)."""
    import mixedae_fast.kernels._triton as triton_mod
    from mixedae_fast.train import distributed

    def no_scontrol(*args, **kwargs):
        raise FileNotFoundError("scontrol")

    monkeypatch.setattr(distributed.subprocess, "run", no_scontrol)
    monkeypatch.setattr(triton_mod, "tl", None)  # as without the triton package
    for raise_it, fix in ((lambda: distributed.requeue_slurm_job("7"), "resubmit it yourself"),
                          (lambda: triton_mod.require_triton("kernels='triton'", ["cpu"], "runtime.kernels=auto"),
                           "pip install 'mixedae_fast[triton]'")):
        with pytest.raises(RuntimeError) as info:
            raise_it()
        code, line = error_line(info.value)
        assert code == 1 and "(unexpected" not in line and fix in line, line


# ---------------------------------------------------------------- every raise, read as text

CHECKED = {"ValueError", "ConfigError", "CheckpointError", "FileNotFoundError", "RunFailure", "InitError",
           "RunFolderError", "StudyError"}
MIN_CHARS = 30  # of the message's own words, values left out: "x = 3: bad value" is too short to name a fix
# a short message is still whole when it lists the valid values: they are the fix
CHOICE_WORDS = ("one of", "choose from", "valid variants")
# (file, the message's own words): why each may stay short
SHORT_ON_PURPOSE = {
    ("mixedae_fast/config.py", ": "): "prefixes the file's name to a ConfigError that names its own fix",
    ("mixedae_fast/train/init_weights.py", "init.from = : "): "prefixes the setting to a CheckpointError that "
                                                             "names its fix",
    ("mixedae_fast/downstream/finetune.py", "fine-tune settings: "): "joins per-setting messages, each with its "
                                                                     "allowed range and MAE's value",
    ("pipelines/synthetic.py", "unknown class "): "internal: the scene generator's own table",
    ("pipelines/synthetic.py", "seed must be >= 0, got "): "API argument; make-data checks --seed first",
    ("pipelines/dali.py", "fmt must be one of , got "): "API argument; data.format is validated with the config",
    ("pipelines/torch_loader.py", "shard_id must be in [0, ), got "): "internal: the rank, set by the launcher",
    ("pipelines/dali.py", "start_step must be in [0, ], got "): "internal: the trainer's resume position",
    ("mixedae_fast/model/attention.py", "topk= must lie in [1, r*n = ]"): "internal: config.validate refuses "
                                                                          "mixing.topk out of range first",
    ("mixedae_fast/model/mixedae.py", "topk= must lie in [1, r*n = ]"): "internal: as above",
    ("mixedae_fast/config.py", "world_size = : must be an int >= 1"): "internal: the launcher's world size",
    ("mixedae_fast/model/attention.py", "group_size  and n_visible  must be >= 1"): "internal: validated config",
    ("mixedae_fast/model/attention.py", "dim  is not a multiple of num_heads "): "internal: config.validate "
                                                                                  "checks embed_dim % num_heads",
    ("mixedae_fast/model/attention.py", "a topk mask needs the scores [..., , ]"): "internal: a shape contract",
}


def _module_strings(tree: ast.Module) -> dict[str, str]:
    """Module-level NAME = "text" constants (a shared hint such as _MAKE_DATA_HINT counts as words)."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node.value.value
    return found


def _words(node, names: dict[str, str]) -> str | None:
    """The literal text of a message (values left out), or None when it is built some other way."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else
                       names.get(v.value.id, "") if isinstance(v.value, ast.Name) else "" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _words(node.left, names), _words(node.right, names)
        return None if left is None and right is None else (left or "") + (right or "")
    return None


def _messages():
    for folder in ("mixedae_fast", "kernels", "pipelines", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names = _module_strings(tree)
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args):
                    continue
                func = node.exc.func
                kind = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                words = _words(node.exc.args[0], names)
                if kind in CHECKED and words is not None:
                    yield path.relative_to(ROOT).as_posix(), node.lineno, words


def test_no_message_too_short_to_name_a_fix():
    messages = list(_messages())
    assert len(messages) > 150  # the scan sees the package's raise statements
    short = [f"{path}:{line}: {words!r}" for path, line, words in messages
             if len(words.strip()) < MIN_CHARS and not any(w in words for w in CHOICE_WORDS)
             and (path, words) not in SHORT_ON_PURPOSE]
    assert not short, "messages without room for the thing, the reason and the fix:\n" + "\n".join(short)
    stale = set(SHORT_ON_PURPOSE) - {(path, words) for path, _, words in messages}
    assert not stale, f"exceptions that no longer match a raise: {sorted(stale)}"


def test_no_message_spans_lines():
    """A message is one line: the CLI prints it after ``error:``, and a second line would lose that prefix."""
    spanning = [f"{path}:{line}" for path, line, words in _messages() if "\n" in words]
    assert not spanning, spanning
