import json

import pytest
import torch

from ream_hf.pipeline.calibration import load_calibration, make_batches, rows_per_source
from ream_hf.config import ReamConfig
from ream_hf.fixtures import build_tiny_tokenizer, demo_corpus


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def config(sources, **kw):
    base = dict(target_experts=4, calibration=sources, calibration_ratios=None, num_calibration_sequences=8,
                sequence_length=32)
    base.update(kw)
    return ReamConfig(**base)


def test_rows_follow_the_papers_int_rounding():
    assert rows_per_source(3072, [0.0, 0.3, 0.7], 3) == [0, 921, 2150]  # 3071 rows, as the published checkpoints
    assert rows_per_source(10, None, 2) == [5, 5]


def test_txt_is_packed_into_full_length_pieces(tmp_path, tokenizer):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(demo_corpus(200)))
    sequences = load_calibration(config([str(path)]), tokenizer)
    assert len(sequences) == 8 and all(len(s) == 32 for s in sequences)


def test_jsonl_text_rows_skip_short_ones_and_truncate(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    long_text = " ".join(demo_corpus(20))
    rows = [{"text": "short"}] * 3 + [{"text": long_text}] * 4
    path.write_text("\n".join(json.dumps(r) for r in rows))
    sequences = load_calibration(config([str(path)]), tokenizer)
    assert len(sequences) == 4 and all(len(s) == 32 for s in sequences)


def test_pretokenised_rows_are_used_as_is(tmp_path, tokenizer):
    path = tmp_path / "ids.jsonl"
    path.write_text("\n".join(json.dumps({"input_ids": list(range(n, n + 10 + n))}) for n in range(3)))
    sequences = load_calibration(config([str(path)], seed=0), tokenizer)
    assert sorted(s.tolist() for s in sequences) == sorted(list(range(n, n + 10 + n)) for n in range(3))


def test_mix_by_ratio(tmp_path, tokenizer):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(demo_corpus(300, seed=1)))
    b.write_text("\n".join(demo_corpus(300, seed=2)))
    sequences = load_calibration(config([str(a), str(b)], calibration_ratios=[0.25, 0.75]), tokenizer)
    assert len(sequences) == 2 + 6


def test_local_dataset_folder_goes_through_datasets(tmp_path, tokenizer):
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"content": " ".join(demo_corpus(15, seed=i)), "lang": "py" if i % 2 else "c"} for i in range(10)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = config([{"path": str(folder), "text_field": "content", "filter": {"lang": ["py"]}}])
    sequences = load_calibration(cfg, tokenizer)
    assert len(sequences) == 5


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("", "is empty"), ("hi", "calibration data is empty")])
def test_missing_empty_or_too_short_calibration_is_refused(tmp_path, tokenizer, content, message):
    path = tmp_path / "c.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_calibration(config([str(path)]), tokenizer)


def test_batches_pad_right_and_mask_padding():
    seqs = [torch.arange(5), torch.arange(3), torch.arange(4)]
    batches = make_batches(seqs, batch_size=2, pad_token_id=99)
    assert batches[0].input_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 99]]
    assert batches[0].attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert int(sum(b.attention_mask.sum() for b in batches)) == 12
