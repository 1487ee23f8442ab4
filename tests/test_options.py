"""One typed source per option: flags, defaults, --config and the docs tables all come from the config fields."""
from __future__ import annotations

import dataclasses

import pytest

from vitray.options import add_options, config_from, docs_rows, option, options_of


def _parsed(argv: list[str]):
    from vitray.cli.main import parse

    return parse(argv)


def test_the_docs_option_tables_are_the_commands_options():
    from vitray.cli.docs import main

    assert main(["--check"]) == 0


def test_score_flags_and_defaults_are_the_configs():
    from vitray.score import ScoreConfig

    args = _parsed(["score", "--model", "m", "--input", "i", "--output", "o"])
    config = config_from(ScoreConfig, args, ray_address=args.ray_address, shared_fs=bool(args.shared_fs),
                         verbose=args.verbose)
    assert config == ScoreConfig(model="m", input="i", output="o")
    assert all(hasattr(args, f.name) for f, _ in options_of(ScoreConfig))


def test_a_new_option_is_one_field_and_reaches_flags_help_config_and_docs():
    import argparse

    from vitray.score import ScoreConfig

    @dataclasses.dataclass(frozen=True)
    class Wider(ScoreConfig):
        thumbnails: int = option(48, "overlays in the report's gallery", metavar="N")

    parser = argparse.ArgumentParser()
    add_options(parser, Wider)
    args = parser.parse_args(["--model", "m", "--input", "i", "--output", "o", "--thumbnails", "12"])
    assert config_from(Wider, args).thumbnails == 12 and config_from(Wider, args).model == "m"
    assert "overlays in the report's gallery (default 48)" in " ".join(parser.format_help().split())
    assert "| `--thumbnails N` | 48 | overlays in the report's gallery |" in docs_rows(Wider)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--input", "i", "--output", "o", "--thumbnails", "many"])


def test_a_yaml_config_is_typed_by_the_fields_flags(tmp_path):
    from vitray.errors import VitrayError

    path = tmp_path / "score.yaml"
    path.write_text("model: m\ninput: i\noutput: o\nbatch-size: 64\nfail_on_drift: yes\nanomaly: bank\n")
    args = _parsed(["score", "--config", str(path), "--batch-size", "32"])
    assert (args.batch_size, args.fail_on_drift, args.anomaly, args.model) == (32, True, "bank", "m")
    path.write_text("model: m\ninput: i\noutput: o\nworkers: 0\n")
    with pytest.raises(VitrayError, match="workers: must be at least 1"):
        _parsed(["score", "--config", str(path)])
