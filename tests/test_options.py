"""Option objects: each group checks itself once; flat keywords reach the group that owns them; the CLI
reports a value that can never work as a usage error naming the flag."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from attnflow.errors import OptionError
from attnflow.options import ExtractOptions, InputOptions, MetricsOptions, RolloutOptions, RunOptions, StoreOptions


def test_flat_keywords_reach_their_group_and_leave_the_rest():
    base = ExtractOptions()
    options = base.replace(store="rows", dtype="float32", fusion="max", crop_pct=0.9, batch_size=7, resume=True)
    assert options.store == StoreOptions(store="rows", dtype="float32")
    assert options.rollout == RolloutOptions(fusion="max")
    assert options.inputs == InputOptions(crop_pct=0.9)
    assert options.run == RunOptions(batch_size=7, resume=True)
    assert base == ExtractOptions()  # frozen: replace makes a copy
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.run.batch_size = 3
    with pytest.raises(TypeError, match="no option 'bach_size'"):
        base.replace(bach_size=3)
    assert MetricsOptions().run.batch_size == 16 and MetricsOptions().replace(batch_size=4).run.batch_size == 4
    with pytest.raises(TypeError, match="no option 'store'"):
        MetricsOptions().replace(store="rows")  # a metrics run has no store options


@pytest.mark.parametrize("values,flag", [
    (dict(store="some"), "store"), (dict(dtype="int8"), "dtype"), (dict(compression="zip"), "compression"),
    (dict(fusion="median"), "fusion"), (dict(discard_ratio=1.0), "discard_ratio"),
    (dict(discard_ratio=-0.1), "discard_ratio"), (dict(crop_pct=0.0), "crop_pct"),
    (dict(crop_pct=float("nan")), "crop_pct"), (dict(interpolation="cubic"), "interpolation"),
    (dict(batch_size=0), "batch_size"), (dict(workers=-1), "workers"), (dict(device="gpu"), "device"),
    (dict(read_timeout=-1.0), "read_timeout"), (dict(read_timeout=float("inf")), "read_timeout"),
    (dict(resume=True, overwrite=True), "resume"),
])
def test_a_value_that_cannot_work_names_its_parameter(values, flag):
    with pytest.raises(OptionError, match=f"^{flag}: ") as caught:
        ExtractOptions().replace(**values)
    assert caught.value.parameter == flag
    assert "--" not in str(caught.value)  # Python's names, not the CLI's


def test_the_cli_names_its_flags_where_the_library_names_parameters(run_cli, tmp_path):
    with pytest.raises(OptionError) as caught:
        ExtractOptions().replace(resume=True, overwrite=True)
    assert str(caught.value) == "resume: continues a run and overwrite starts one afresh: give one of them"
    with pytest.raises(OptionError) as caught:
        ExtractOptions().replace(preprocess="beyond-cls", crop_pct=0.9)
    assert str(caught.value).startswith("crop_pct: preprocess=beyond-cls fixes the crop")
    result = run_cli("extract", "vit_tiny_patch16_224", str(tmp_path), "-o", str(tmp_path / "c.h5"), "--random-init",
                     "--resume", "--overwrite")
    assert result.exit_code == 2
    assert result.stderr.strip() == "attnflow: error: --resume: continues a run and --overwrite starts one afresh: give one of them"
    result = run_cli("extract", "vit_tiny_patch16_224", str(tmp_path), "-o", str(tmp_path / "c.h5"), "--random-init",
                     "--preprocess", "beyond-cls", "--crop-pct", "0.9")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("attnflow: error: --crop-pct: --preprocess beyond-cls fixes the crop")


def test_the_cli_reports_option_errors_as_usage_errors(run_cli, tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    result = run_cli("extract", "vit_tiny_patch16_224", tmp_path / "img.png", "-o", tmp_path / "c.h5", "--random-init",
                     "--resume", "--overwrite")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("attnflow: error: --resume: continues a run and --overwrite starts one afresh: "
                                     "give one of them")
    assert not Path(str(tmp_path / "c.h5") + ".partial").exists()


def test_the_command_has_the_bounds_of_the_option_objects(run_cli, tmp_path):
    """--discard-ratio is bounded once, by RolloutOptions: [0, 1), as in Python (the CLI once stopped at 0.999)."""
    refused = run_cli("metrics", tmp_path / "missing.h5", "-o", tmp_path / "m.h5", "--discard-ratio", "1")
    assert refused.exit_code == 2 and "--discard-ratio: must be in [0, 1), not 1.0" in refused.stderr, refused.stderr
    with pytest.raises(OptionError, match=r"^discard_ratio: must be in \[0, 1\), not 1.0"):
        MetricsOptions().replace(discard_ratio=1.0)
    allowed = run_cli("metrics", tmp_path / "missing.h5", "-o", tmp_path / "m.h5", "--discard-ratio", "0.9995")
    assert allowed.exit_code == 1 and "missing.h5" in allowed.stderr  # past the options: the cache is what is wrong


def test_every_command_default_is_its_option_objects_default():
    """A default is written in the option objects; the commands' own defaults must give the same run (the
    three that are text or empty on the command line are parsed as the commands parse them)."""
    import typer

    from attnflow.cli import app
    from attnflow.perturb import DEFAULT_RELEVANCE, PerturbationOptions, PerturbOptions

    command = typer.main.get_command(app)
    as_parsed = {"token_layers": lambda v: (-1,) if v is None else StoreOptions.parse_token_layers(v),
                 "relevance": lambda v: tuple(v) or DEFAULT_RELEVANCE,
                 "fractions": PerturbationOptions.parse_fractions}
    checked = 0
    for name, options in (("extract", ExtractOptions()), ("metrics", MetricsOptions()), ("perturb", PerturbOptions())):
        for parameter in command.commands[name].params:
            try:
                group = options.owner(parameter.name)
            except TypeError:
                continue  # a command-only flag (--threads, --quiet, ...)
            default = getattr(parameter.default, "value", parameter.default)
            default = as_parsed.get(parameter.name, lambda v: v)(default)
            assert default == getattr(getattr(options, group), parameter.name), (name, parameter.name)
            checked += 1
    assert checked >= 50  # the loop saw the options (55 when written)
