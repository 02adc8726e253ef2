"""Provenance: one set of fields, one date format, versions from metadata, a SHA that says when the
tree was dirty."""
import re
import subprocess

from mixedae_fast import provenance as pv


def test_fields_and_formats(monkeypatch):
    monkeypatch.delenv("MIXEDAE_GIT_SHA", raising=False)
    p = pv.provenance(command=["/x/bin/mixedae-fast", "pretrain", "--run.name=a b"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", p["date"])
    assert p["command"] == "mixedae-fast pretrain '--run.name=a b'"
    assert p["device"].startswith("cpu (") and p["versions"]["torch"] and p["versions"]["python"]
    assert "torch" in pv.package_versions() and "no-such-package" not in pv.package_versions(["no-such-package"])
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=pv.__file__.rsplit("/", 2)[0]).stdout.strip()
    if head:                                                            # a git checkout (CI clones one)
        assert p["git_sha"].split("+")[0] == head


def test_env_sha_wins(monkeypatch):
    monkeypatch.setenv("MIXEDAE_GIT_SHA", "abc1234")
    assert pv.git_sha() == "abc1234"
