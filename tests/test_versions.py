"""The lock the suite passed on, and the note that names a library installed at another release."""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from vitray import versions
from vitray.errors import VitrayError

REPO = Path(__file__).resolve().parents[1]


def test_the_lock_pins_every_dependency_and_extra_except_torch():
    locked = versions.locked_versions(str(REPO / "requirements.lock"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    direct = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    names = {versions.canonical(re.match(r"[A-Za-z0-9_.-]+", d).group(0)) for d in direct} - {"vitray", "torch"}
    assert names <= set(locked), sorted(names - set(locked))
    assert "torch" not in locked and not [n for n in locked if n.startswith("nvidia-")]  # TORCH_SPEC decides


def test_the_installed_releases_are_the_locked_ones_in_the_project_venv():
    """`make setup` installs the lock; a lane of newer releases (`make test-latest`) is not the project venv."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("not the project's own venv (make setup's)")
    locked = versions.locked_versions(str(REPO / "requirements.lock"))
    assert versions.differing(sorted(locked), locked) == []


def test_a_library_at_another_release_is_named(monkeypatch):
    installed = versions.installed_version("transformers")
    monkeypatch.setattr(versions, "locked_versions", lambda path=versions.LOCK_FILE: {"transformers": "0.0.1"})
    note = versions.version_note("transformers", "no-such-package")
    assert note == (f" (transformers {installed} is installed, vitray was tested on 0.0.1: "
                    "`make setup` installs the tested releases)")
    monkeypatch.setattr(versions, "locked_versions", lambda path=versions.LOCK_FILE: {"transformers": installed})
    assert versions.version_note("transformers") == ""


def test_a_local_build_label_is_the_same_release(monkeypatch):
    monkeypatch.setattr(versions, "installed_version", lambda name: "2.13.0+cpu")
    assert versions.differing(["torch"], {"torch": "2.13.0"}) == []


def test_a_failing_model_load_names_the_library_release(tmp_path, monkeypatch):
    import transformers

    from vitray.models import load_trained

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "vit", "architectures": ["ViTForImageClassification"]}')
    from safetensors.torch import save_file
    import torch

    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))

    def broken(*args, **kwargs):
        raise ValueError("Unsupported device type 'meta'")

    monkeypatch.setattr(transformers.ViTForImageClassification, "from_pretrained", broken)
    monkeypatch.setattr(versions, "locked_versions", lambda path=versions.LOCK_FILE: {"transformers": "5.24.0"})
    with pytest.raises(VitrayError, match=r"Unsupported device type 'meta' \(transformers .* is installed, vitray "
                                          r"was tested on 5\.24\.0"):
        load_trained(str(folder))


def test_an_unexpected_failure_inside_a_library_names_its_release(monkeypatch):
    import yaml

    from vitray.faults import describe

    monkeypatch.setattr(versions, "locked_versions", lambda path=versions.LOCK_FILE: {"pyyaml": "0.0.1"})
    try:
        yaml.safe_load("[unclosed")
    except yaml.YAMLError as exc:
        line = describe(exc, "out")
    assert line.startswith("out: ") and f"(PyYAML {yaml.__version__} is installed, vitray was tested on 0.0.1" in line


def test_no_model_is_described_or_loaded_through_a_device_map():
    """Describing a model builds it on the meta device from its config: no loading path of transformers
    that moves between releases (5.25 refused `device_map="meta"`)."""
    sources = [p for p in (REPO / "vitray").rglob("*.py")]
    assert [str(p) for p in sources if "device_map" in p.read_text()] == []
