"""The afdkit command line: the demo runs, info prints JSON, bad arguments are usage errors."""

import json

import pytest

from afdkit import cli


def test_demo_decodes_and_prints_the_table(capsys):
    assert cli.main(["demo", "--batch", "2", "--steps", "3", "--prompt-len", "4"]) == 0
    out = capsys.readouterr().out
    assert "colocated" in out and "tokens/s" in out
    assert out.count("seq ") == 2


def test_demo_is_deterministic_for_a_seed(capsys):
    cli.main(["demo", "--batch", "1", "--steps", "4", "--seed", "3"])
    first = [l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("seq")]
    cli.main(["demo", "--batch", "1", "--steps", "4", "--seed", "3"])
    second = [l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("seq")]
    assert first == second and first


def test_info_prints_build_json(capsys):
    assert cli.main(["info"]) == 0
    assert json.loads(capsys.readouterr().out)["cuda_arch"] == "90a"


@pytest.mark.parametrize("argv", [[], ["demo", "--steps", "0"], ["demo", "--batch", "x"], ["bench", "gpt"],
                                  ["demo", "--kv-dtype", "int4"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage: afdkit" in capsys.readouterr().err
