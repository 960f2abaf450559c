"""What each layer lost: the manifest's numbers as a table (`ream-hf report`) and as the PNG every save writes."""

import json

import pytest
from PIL import Image

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.cli import main
from ream_hf.io.names import MANIFEST_NAME
from ream_hf.release.report import LAYER_PLOT_NAME, format_table, layer_losses


def manifest(**layer_overrides) -> dict:
    """Two layers of 4 -> 2 experts: routing weights 4, 3, 2, 1 with centroids 0 and 2 (kept mass 6 / 10), and
    3, 3, 2, 2 with centroids 1 and 3 (5 / 10); the first refit, the second not."""
    first = {"layer": "model.layers.0", "index": 0, "experts_before": 4, "experts_after": 2,
             "groups": [{"output_expert": 0, "centroid": 0, "members": [0, 1, 3]},
                        {"output_expert": 1, "centroid": 2, "members": [2]}],
             "frequency": [10, 10, 10, 10], "routing_weight": [4.0, 3.0, 2.0, 1.0],
             "refit": {"mode": "down", "kept": True, "experts_refit": 2, "heldout_error_before": 0.25,
                       "heldout_error_after": 0.125, "ridge": 0.01, "train_tokens": 90, "heldout_tokens": 10}}
    second = {"layer": "model.layers.1", "index": 1, "experts_before": 4, "experts_after": 2,
              "groups": [{"output_expert": 0, "centroid": 1, "members": [1, 0]},
                         {"output_expert": 1, "centroid": 3, "members": [3, 2]}],
              "frequency": [1, 1, 1, 1], "routing_weight": [3.0, 3.0, 2.0, 2.0], "refit": None, **layer_overrides}
    return {"method": "ream", "experts_before": 4, "experts_after": 2, "layers": [first, second]}


def test_rows_and_table_from_a_hand_made_manifest():
    rows = layer_losses(manifest())
    assert [r.kept_mass for r in rows] == [pytest.approx(0.6), pytest.approx(0.5)]
    assert [r.size_counts for r in rows] == [[(1, 1), (3, 1)], [(2, 2)]]
    assert (rows[0].heldout_error_before, rows[0].heldout_error_after) == (0.25, 0.125)
    assert rows[1].heldout_error_before is None and rows[0].mass_basis == "routing weight"
    lines = format_table(rows).splitlines()
    assert lines[1].split() == ["model.layers.0", "4", "->", "2", "60.0%", "0.2500", "0.1250", "1:1", "3:1"]
    assert lines[2].split() == ["model.layers.1", "4", "->", "2", "50.0%", "-", "-", "2:2"]


def test_a_manifest_without_routing_weights_uses_frequency():
    """Outputs written before routing weights were recorded: the share of top-k selections instead, and said so."""
    rows = layer_losses(manifest(routing_weight=None, frequency=[5, 1, 1, 3]))
    assert rows[1].kept_mass == pytest.approx(0.4) and rows[1].mass_basis == "frequency"
    lines = format_table(rows).splitlines()
    assert lines[1].split()[4] == "60.0%" and lines[2].split()[4] == "40.0%*"
    assert lines[-1].startswith("*: share of the top-k selections")


@pytest.fixture(scope="module")
def output(qwen3_source, calibration_txt, tmp_path_factory):
    config = ReamConfig(target_experts=8, method="ream", calibration=[str(calibration_txt)], calibration_ratios=None,
                        num_calibration_sequences=8, sequence_length=48, batch_size=4, group_size=4)
    compressor = ReamCompressor(config)
    compressor.compress(str(qwen3_source))
    return compressor.save_pretrained(tmp_path_factory.mktemp("report") / "output")


def test_every_save_writes_the_plot_and_the_card_embeds_it(output, qwen3_source):
    """`save_pretrained` writes the model card too: method, sizes, calibration by name, the plot; no scores yet."""
    card = (output / "README.md").read_text()
    assert f"![What each MoE layer lost: routing mass kept, held-out error before and after the refit, merge-group " \
           f"sizes]({LAYER_PLOT_NAME})" in card
    assert "reduced from **16 to 8**" in card and "with **REAM**" in card
    assert "| Parameters |" in card and "| Size on disk (safetensors) |" in card
    assert "calibration.txt" in card and "8 sequences x 48 tokens" in card
    assert "No benchmark results were recorded" in card and "model-index" not in card
    # named by what it is, not by a folder (neither the temporary one nor the output's): push puts the repo id there
    assert f"model_id = \"{qwen3_source.name}-REAM-8E\"" in card and f"\"{output.name}\"" not in card
    path = output / LAYER_PLOT_NAME
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        # 2 layers: the narrowest figure, 7 x 8 inches at 100 dpi
        assert image.size == (700, 800)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 50  # drawn: bars, text and antialiasing, not a blank canvas
    assert path.stat().st_size > 20_000


def test_report_command_prints_the_manifest_as_a_table(output, tmp_path, capsys):
    assert main(["report", str(output), "--plot", str(tmp_path / "again.png")]) == 0
    out = capsys.readouterr().out
    rows = layer_losses(json.loads((output / MANIFEST_NAME).read_text()))
    assert format_table(rows) in out
    assert [line.split()[0] for line in out.splitlines()[1:3]] == ["model.layers.0", "model.layers.1"]
    assert all(r.mass_basis == "routing weight" and 0 < r.kept_mass < 1 for r in rows)
    assert all(len(r.group_sizes) == 8 and sum(r.group_sizes) <= 16 for r in rows)  # the floor may prune a group
    planned = [[len(g["floor"]["group"] if "floor" in g else g["members"]) for g in entry["groups"]]
               for entry in json.loads((output / MANIFEST_NAME).read_text())["layers"]]
    assert all(sum(sizes) == 16 for sizes in planned)
    assert (tmp_path / "again.png").read_bytes() == (output / LAYER_PLOT_NAME).read_bytes()


def test_report_of_a_folder_without_a_manifest_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and MANIFEST_NAME in err and "\n" not in err
