"""`ream-hf demo`, the README's first command: a model that has learned something, and what compression costs it."""

import math
import re

import pytest

from ream_hf.cli import main


def _row(out: str, label: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(label))
    return line[len(label):].split()


@pytest.mark.slow
def test_demo_compresses_a_trained_model_and_prints_what_it_kept(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out

    vocab = int(re.search(r"scores ln\((\d+)\)", out)[1])
    before, after = map(float, _row(out, "held-out loss")[-2:])
    # the model learned the demo text: far below a uniform guess over the vocabulary
    assert before < 0.4 * math.log(vocab), out
    # compression costs something, and not much: 16 -> 8 experts with REAM and the default refit
    assert before < after < before + 0.1, out
    accuracy = _row(out, "next-token accuracy")
    kept = float(accuracy[-1].rstrip("%"))
    assert 90.0 < kept <= 100.0, out
    assert f"keeps {kept:.1f}% of the original's next-token accuracy" in out
    for domain in ("prose", "arithmetic", "code"):
        assert _row(out, f"  on {domain}"), out
    assert _row(out, "experts per MoE layer")[:2] == ["16", "8"]
    assert (tmp_path / "compressed" / "config.json").is_file()
    assert (tmp_path / "compressed" / "layer_report.png").is_file()
