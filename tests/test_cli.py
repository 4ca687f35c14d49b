import subprocess
import sys

import pytest

from keras_mgconv import cli


def test_summary_reports_levels_and_parameters(capsys):
    assert cli.main(["summary", "--filters", "256", "--group-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "levels (channels, finest first): 256, 128, 64, 32, 16" in out
    assert "parameters: 79,360 (Conv2D: 590,080, ratio 0.134)" in out


def test_summary_shows_connector_for_width_change(capsys):
    cli.main(["summary", "--filters", "64", "--input-channels", "32", "--group-size", "8"])
    assert "connector: 4 group(s)" in capsys.readouterr().out


def test_bad_arguments_exit_2_with_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "keras_mgconv.cli", "summary", "--filters", "40"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("keras-mgconv summary: error:")
    assert "filters=40, group_size=16" in last_line


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fly"])
    assert exit_info.value.code == 2


def test_summary_connector_groups_divide_both_widths(capsys):
    # 576 -> 96 with group size 8: 72 groups of 8 cannot split 96 outputs; 48 of 12 can.
    cli.main(["summary", "--filters", "96", "--input-channels", "576", "--group-size", "8",
              "--coarsest-channels", "12", "--kernel-size", "1"])
    assert "connector: 48 group(s)" in capsys.readouterr().out
