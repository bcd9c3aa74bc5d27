"""`hf_msvit.hub.push_demo_space`: what a Space receives (intercepted at the huggingface_hub boundary), that the
uploaded folder runs on its own, bad ids refused before anything is sent, and a failed step named."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import huggingface_hub
import pytest
from huggingface_hub import SpaceCard

from hf_msvit import hub
from hf_msvit.cli import main as cli_main

from _demo_helpers import REPO_ROOT


class FakeSpaceHub:
    """Records the HfApi calls of a Space upload and keeps a copy of the uploaded folder."""

    def __init__(self, store: Path, fail_at: str | None = None):
        self.store, self.fail_at, self.calls, self.variables = store, fail_at, [], {}

    def _record(self, name: str, *args, **kwargs):
        self.calls.append((name, args, kwargs))
        if self.fail_at == name:
            raise ConnectionError(f"403 Forbidden during {name}")

    def patch(self):
        def create_repo(api, repo_id, **kwargs):
            self._record("create_repo", repo_id, **kwargs)
            return SimpleNamespace(repo_id=repo_id)

        def add_space_variable(api, repo_id, key, value, **kwargs):
            self._record("add_space_variable", repo_id, key, value)
            self.variables[key] = value

        def upload_folder(api, *, repo_id, folder_path, **kwargs):
            self._record("upload_folder", repo_id=repo_id, **kwargs)
            shutil.copytree(folder_path, self.store / repo_id.replace("/", "--"))
            return SimpleNamespace(commit_url=f"https://huggingface.co/spaces/{repo_id}/commit/abc")

        return mock.patch.multiple(
            huggingface_hub.HfApi,
            create_repo=create_repo,
            add_space_variable=add_space_variable,
            upload_folder=upload_folder,
        )


def test_push_demo_space_uploads_app_requirements_card_and_package_in_one_commit(tmp_path):
    fake = FakeSpaceHub(tmp_path / "hub")
    with fake.patch():
        url = hub.push_demo_space("someone/msvit-demo", "someone/msvit-digits")
    assert url == "https://huggingface.co/spaces/someone/msvit-demo/commit/abc"
    assert [call[0] for call in fake.calls] == ["create_repo", "add_space_variable", "upload_folder"]
    create_kwargs, upload_kwargs = fake.calls[0][2], fake.calls[2][2]
    assert create_kwargs["repo_type"] == "space" and create_kwargs["space_sdk"] == "gradio"
    assert create_kwargs["exist_ok"] is True and upload_kwargs["repo_type"] == "space"
    assert fake.variables == {"HF_MSVIT_MODEL": "someone/msvit-digits"}

    space = tmp_path / "hub" / "someone--msvit-demo"
    assert sorted(os.listdir(space)) == ["README.md", "app.py", "hf_msvit", "requirements.txt"]
    assert (space / "app.py").read_text() == (REPO_ROOT / "demo" / "app.py").read_text()
    requirements = (space / "requirements.txt").read_text().split()
    assert any(r.startswith("transformers>=") for r in requirements) and "scikit-learn" in requirements
    card = SpaceCard.load(space / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert card.data.models == ["someone/msvit-digits"] and card.data.sdk_version
    assert "someone/msvit-digits" in card.text
    package = space / "hf_msvit"
    assert (package / "demo.py").is_file() and (package / "models" / "msvit" / "modeling_msvit.py").is_file()
    assert not list(package.rglob("__pycache__"))

    # The Space runs its own copy of the package: its entry point starts from the uploaded folder alone.
    probe = (
        "import runpy, sys, hf_msvit; print(hf_msvit.__file__); sys.argv = ['app.py', '--help']; "
        "runpy.run_path('app.py', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=space, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=""),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(package)) and "HF_MSVIT_MODEL" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("repo_id", "model_id", "message"),
    [
        ("not/a/valid/space", "someone/model", "repo_id"),
        ("someone/space", "", "model_id"),
        ("someone/space", "--bad--id", "model_id"),
    ],
)
def test_bad_ids_are_refused_before_any_call(tmp_path, repo_id, model_id, message):
    fake = FakeSpaceHub(tmp_path / "hub")
    with fake.patch(), pytest.raises(ValueError, match=message):
        hub.push_demo_space(repo_id, model_id)
    assert fake.calls == []


def test_local_model_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "runs" / "msvit-digits").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    fake = FakeSpaceHub(tmp_path / "hub")
    with fake.patch(), pytest.raises(ValueError, match="local folder.*push_to_hub"):
        hub.push_demo_space("someone/space", "runs/msvit-digits")
    assert fake.calls == []


@pytest.mark.parametrize("step", ["create_repo", "add_space_variable", "upload_folder"])
def test_failed_step_is_named(tmp_path, step):
    fake = FakeSpaceHub(tmp_path / "hub", fail_at=step)
    with fake.patch(), pytest.raises(hub.HubPushError) as info:
        hub.push_demo_space("someone/space", "someone/model")
    expected = {"create_repo": "create_repo", "add_space_variable": "set_variable", "upload_folder": "upload"}[step]
    assert info.value.step == expected and "someone/space" in str(info.value) and "403" in str(info.value)
    assert not (tmp_path / "hub").exists()  # nothing half-uploaded


def test_cli_push_demo(tmp_path, capsys):
    fake = FakeSpaceHub(tmp_path / "hub")
    with fake.patch():
        assert cli_main(["push-demo", "someone/space", "someone/model", "--private"]) == 0
    assert "https://huggingface.co/spaces/someone/space/commit/abc" in capsys.readouterr().out
    assert fake.calls[0][2]["private"] is True
    with fake.patch():
        assert cli_main(["push-demo", "someone/space", str(tmp_path)]) == 2
    assert "local folder" in capsys.readouterr().err
