"""``launch slurm`` writes only validated, quoted values: the generated script, run by bash with
stand-in ``srun``/``scontrol``/``torchrun``, runs nothing a hostile value smuggles in."""
import os
import shlex
import subprocess

import pytest

from mixedae_fast.cli import main

STUBS = {
    "srun": '#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > "$STUB_LOG/srun.args"\n',
    "scontrol": '#!/bin/sh\necho "$*" >> "$STUB_LOG/scontrol.calls"\necho node-a\n',
    "torchrun": '#!/bin/sh\ntouch "$STUB_LOG/torchrun.ran"\n',
}


def _launch(tmp_path, *extra):
    return main(["launch", "slurm", "--nodes", "1", "--gpus-per-node", "2", "--script", str(tmp_path / "job.sbatch"),
                 *extra])


def _sbatch_options(script: str) -> list[str]:
    """The options sbatch reads from the #SBATCH lines: it splits on whitespace, groups with quotes, takes a
    backslash as an escape and an unquoted # as a comment (as shlex in POSIX mode with comments)."""
    out = []
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            out += shlex.split(line[len("#SBATCH "):], comments=True)
    return out


def test_hostile_values_run_nothing(tmp_path, capsys):
    out_dir = tmp_path / "my runs 'q' \"dq\" #c $(touch PWNED_out)"
    hostile_name = "x$(touch PWNED_name);`touch PWNED_tick`"
    hostile_path = "a'b\"c $(touch PWNED_data)"
    assert _launch(tmp_path, f"--run.out_dir={out_dir}", f"--run.name={hostile_name}",
                   f"--data.path={hostile_path}", "--job-name=j;touch PWNED_job", "--partition=p$(touch PWNED_part)",
                   "--time=1:00:00 `touch PWNED_time`", "--sbatch=--comment=$(touch PWNED_sbatch)") == 0
    capsys.readouterr()
    script = (tmp_path / "job.sbatch").read_text()
    log_dir = (out_dir / hostile_name / "slurm").resolve()
    options = _sbatch_options(script)
    assert f"--output={log_dir}/%x-%j.out" in options  # one argument for sbatch, spaces and quotes kept
    assert "--job-name=j;touch PWNED_job" in options and "--partition=p$(touch PWNED_part)" in options

    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", STUB_LOG=str(tmp_path), SLURM_JOB_ID="7",
               SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node-a")
    done = subprocess.run(["bash", str(tmp_path / "job.sbatch")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.rglob("PWNED*")), "a value was executed"
    assert not (tmp_path / "torchrun.ran").exists()
    args = (tmp_path / "srun.args").read_text().split("\0")[:-1]
    # the ranks get every value verbatim, and resume from the newest checkpoint after a requeue
    assert f"--run.name={hostile_name}" in args and f"--data.path={hostile_path}" in args
    assert f"--run.out_dir={out_dir}" in args and args[-1] == "--run.resume=auto"
    assert (tmp_path / "scontrol.calls").read_text().split() == ["show", "hostnames", "node-a"]


@pytest.mark.parametrize("value", [
    "--job-name=a\ntouch PWNED", "--partition=gpu\n#SBATCH --x", "--time=1:00:00\r", "--sbatch=--x=1\ntouch PWNED",
    "--setup=module load cuda\ntouch PWNED", "--account=a\tb", "--run.name=a\ntouch PWNED",
    "--run.out_dir=runs\ntouch PWNED", "--data.path=a\nb",
], ids=["job-name", "partition", "time", "sbatch", "setup", "account", "run.name", "out_dir", "pretrain-arg"])
def test_a_control_character_in_any_value_is_refused(tmp_path, capsys, value):
    assert _launch(tmp_path, f"--run.out_dir={tmp_path}/runs", value) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("control character" in errors[0] or "control characters" in errors[0]), errors
    assert not (tmp_path / "job.sbatch").exists()


def test_a_percent_in_the_log_folder_is_refused(tmp_path, capsys):
    assert _launch(tmp_path, f"--run.out_dir={tmp_path}/100%") == 2
    assert "filename pattern" in capsys.readouterr().err
    assert not (tmp_path / "job.sbatch").exists()


def test_script_never_replaces_a_file_it_did_not_write(tmp_path, monkeypatch, capsys):
    """``--script FILE`` over the user's own file is refused naming --force; a script it wrote before is
    rewritten (a second launch after a change); --force replaces anything."""
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "job.sbatch"
    mine.write_text("#!/bin/bash\n# my hand-tuned job\n")
    assert _launch(tmp_path, f"--run.out_dir={tmp_path}/runs") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "was not written by" in err[0] and "--force" in err[0]
    assert mine.read_text() == "#!/bin/bash\n# my hand-tuned job\n"
    assert _launch(tmp_path, f"--run.out_dir={tmp_path}/runs", "--force") == 0
    assert "written by `mixedae-fast launch slurm`" in mine.read_text()
    assert _launch(tmp_path, f"--run.out_dir={tmp_path}/runs", "--nodes=2") == 0
    assert "2 nodes" in mine.read_text()


def test_the_sbatch_writer_and_submitter_work_without_the_command_line(tmp_path, monkeypatch, capsys):
    """write_sbatch writes the script (default <run dir>/slurm/pretrain.sbatch, executable) and refuses a file
    it did not write unless forced; submit_sbatch gives back sbatch's status and words, and a machine without
    sbatch gets one line naming where to run it (also through ``launch slurm --submit``: exit 2)."""
    from mixedae_fast.config import load_config
    from mixedae_fast.train.launch import SlurmJob, launch_slurm, submit_sbatch, write_sbatch

    monkeypatch.chdir(tmp_path)
    cfg = load_config("cpu_tiny", [f"--run.out_dir={tmp_path}/runs", "--run.name=r"])
    script = write_sbatch(cfg, SlurmJob(nodes=2, gpus_per_node=2), ["--config", "cpu_tiny"])
    assert script == (tmp_path / "runs" / "r" / "slurm" / "pretrain.sbatch").resolve() and os.access(script, os.X_OK)
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text.splitlines() and "Global batch 128 = data.batch_size 32 x 4 ranks" in text
    mine = tmp_path / "mine.sh"
    mine.write_text("#!/bin/bash\n")
    with pytest.raises(ValueError, match="was not written by .* --force"):
        write_sbatch(cfg, SlurmJob(), [], script=mine)
    assert mine.read_text() == "#!/bin/bash\n"
    assert write_sbatch(cfg, SlurmJob(), [], script=mine, force=True) == mine and "#SBATCH" in mine.read_text()

    stubs = tmp_path / "stubs"
    stubs.mkdir()
    monkeypatch.setenv("PATH", str(stubs))
    with pytest.raises(FileNotFoundError, match="sbatch not found: run this on a SLURM login node"):
        submit_sbatch(script)
    assert _launch(tmp_path, f"--run.out_dir={tmp_path}/runs", "--submit") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: sbatch not found: run this on a SLURM login node, or submit the script there"]
    (stubs / "sbatch").write_text('#!/bin/sh\necho "Submitted batch job 42 ($1)"\nexit 3\n')
    (stubs / "sbatch").chmod(0o755)
    assert submit_sbatch(script) == (3, f"Submitted batch job 42 ({script})")
    assert launch_slurm(cfg, SlurmJob(), [], submit=True) == 3
    assert capsys.readouterr().out.splitlines()[-2:] == [f"wrote {script}", f"Submitted batch job 42 ({script})"]
