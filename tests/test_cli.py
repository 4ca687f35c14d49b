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


@pytest.fixture
def small_model_path(tmp_path):
    """A small untrained multigrid classifier for the digits' 8x8x1 images, saved."""
    import keras_mgconv
    from keras_mgconv._keras import keras

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same")(inputs)
    x = keras_mgconv.MultigridConv2D(32, 3, padding="same", group_size=8)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    path = tmp_path / "model.keras"
    model.save(path)
    return path


def test_export_int8_on_dataset_prints_report(capsys, small_model_path):
    assert cli.main(["export", str(small_model_path), "--quantization", "int8",
                     "--dataset", "digits", "--samples", "100"]) == 0
    out = capsys.readouterr().out
    output = small_model_path.parent / "model.int8.tflite"
    assert f"{output}: {output.stat().st_size:,} bytes, int8 (input float32, " in out
    assert "all TFLite builtins" in out
    assert "on 100 examples (verification_data)" in out


def test_export_split_lowering_to_output(capsys, small_model_path, tmp_path):
    output = tmp_path / "split.tflite"
    cli.main(["export", str(small_model_path), "--lowering", "split", "--output", str(output)])
    out = capsys.readouterr().out
    assert output.exists()
    assert "float32 (input float32, output float32), split lowering" in out
    assert "SPLIT" in out and "(random)" in out


def test_benchmark_prints_latency_table(capsys, small_model_path, tmp_path):
    output = tmp_path / "model.tflite"
    cli.main(["export", str(small_model_path), "--output", str(output)])
    capsys.readouterr()
    assert cli.main(["benchmark", str(output), "--threads", "1", "2", "--repeats", "3",
                     "--warmup", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["threads", "XNNPACK", "median", "ms", "p90", "ms"]
    assert [line.split()[:2] for line in lines[2:]] == [
        ["1", "on"], ["1", "off"], ["2", "on"], ["2", "off"]]


@pytest.mark.parametrize("arguments,message", [
    (["export", "missing.keras"], "MODEL must be an existing .keras file. "
                                  "Received: model='missing.keras'."),
    (["export", "{model}", "--quantization", "int8"], "Received: representative_data=None."),
    (["export", "{model}", "--output", "missing/model.tflite"], "Received: path="),
    (["benchmark", "missing.tflite"], "Received: path='missing.tflite'."),
])
def test_export_and_benchmark_errors_exit_2(capsys, small_model_path, arguments, message):
    arguments = [argument.format(model=small_model_path) for argument in arguments]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(arguments)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"keras-mgconv {arguments[0]}: error:")
    assert message in error[0]
