"""JSONL VQA data: every bad-example case counted per file, the max-bad-fraction stop, VQA scoring."""
from __future__ import annotations

import json

import numpy as np
import pytest
from trainer_helpers import run_trainer

from trainer.tiny_vlm import build_tiny_vlm
from trainer.vqa import (
    BAD_REASONS,
    VqaDataError,
    VqaDataset,
    load_jsonl,
    normalize_answer,
    soft_accuracy,
    write_scene_jsonl,
)


def _png(path, size=(40, 60)):
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((*size, 3), 128, np.uint8))


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD = {"image": "img/ok.png", "question": "what?", "answers": ["yes"], "boxes": [[0, 0, 60, 40]]}
BAD = {
    "not_json": "{not json",
    "missing_image": {**GOOD, "image": "img/nope.png"},
    "corrupt_image": {**GOOD, "image": "img/corrupt.png"},
    "empty_question": {**GOOD, "question": "  "},
    "no_answers": {**GOOD, "answers": []},
    "box_outside_image": {**GOOD, "boxes": [[0, 0, 61, 40]]},  # the image is 60 wide, 40 high
}


@pytest.fixture
def folder(tmp_path):
    _png(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return tmp_path


def test_each_bad_case_is_counted_and_skipped(folder):
    assert set(BAD) == set(BAD_REASONS)
    path = _write(folder / "data.jsonl", [GOOD] * 94 + list(BAD.values()))
    good, bad = load_jsonl(path, max_bad_fraction=0.1)
    assert len(good) == 94 and dict(bad) == dict.fromkeys(BAD_REASONS, 1)
    assert good[0]["image"] == str(folder / "img" / "ok.png")  # relative to the JSONL file
    dataset = VqaDataset(path, 0.1)
    assert dataset[0]["pixels"].shape == (40, 60, 3)
    assert "94 good, 6 skipped" in dataset.bad_summary() and "box_outside_image=1" in dataset.bad_summary()


@pytest.mark.parametrize("reason", BAD_REASONS)
def test_more_bad_than_allowed_stops_with_one_line(folder, reason):
    path = _write(folder / "data.jsonl", [GOOD] * 9 + [BAD[reason]])
    with pytest.raises(VqaDataError) as err:
        load_jsonl(path, max_bad_fraction=0.01)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and f"{reason}=1" in message
    assert "1 of 10" in message and "max_bad_fraction=0.01" in message
    assert len(load_jsonl(path, max_bad_fraction=0.1)[0]) == 9  # 10% allowed: skipped, not fatal


def test_unreadable_or_empty_file(tmp_path):
    with pytest.raises(VqaDataError, match="cannot read"):
        load_jsonl(tmp_path / "absent.jsonl", 0.01)
    with pytest.raises(VqaDataError, match="no examples"):
        load_jsonl(_write(tmp_path / "empty.jsonl", []), 0.01)


def test_trainer_exits_2_with_one_line_on_bad_data(tmp_path):
    base = build_tiny_vlm(tmp_path / "vlm")
    train = write_scene_jsonl(tmp_path / "train", 8, seed=0)
    with open(train, "a") as fh:
        fh.write(json.dumps({"image": "images/missing.png", "question": "q", "answers": ["a"]}) + "\n")
    out = tmp_path / "run"
    result = run_trainer("--base-model", str(base), "--train-data", str(train), "--eval-data", str(train),
                         "--steps", "2", "--out", str(out))
    assert result.returncode == 2, result.stderr[-2000:]
    line = [ln for ln in result.stderr.splitlines() if "error:" in ln]
    assert len(line) == 1 and "missing_image=1" in line[0] and "max_bad_fraction=0.01" in line[0]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


@pytest.mark.parametrize("given,normal", [
    ("Two", "2"), ("the dog.", "dog"), ("Yes!", "yes"), ("dont", "don't"), ("3.5", "3.5"),
    ("red, white", "red white"), ("1,000", "1000"), ("  A  Cat ", "cat"),
])
def test_vqa_answer_normalization(given, normal):
    assert normalize_answer(given) == normal


def test_soft_accuracy_counts_annotators():
    assert soft_accuracy("Two", ["2"] * 3 + ["3"] * 7) == 1.0
    assert soft_accuracy("2", ["2", "2"] + ["3"] * 8) == pytest.approx(2 / 3)
    assert soft_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(1 / 3)
    assert soft_accuracy("4", ["2"] * 10) == 0.0


def test_scene_jsonl_boxes_cover_the_answered_object(tmp_path):
    from trainer.data import make_scene

    path = write_scene_jsonl(tmp_path, 5, seed=3)
    good, bad = load_jsonl(path, 0.0)
    assert len(good) == 5 and not bad
    for i, example in enumerate(good):
        relevance = make_scene(np.random.default_rng(3 + i))["relevance"]
        x0, y0, x1, y1 = example["boxes"][0]
        ys, xs = np.nonzero(relevance)
        assert (x0, y0, x1, y1) == (xs.min() * 8, ys.min() * 8, (xs.max() + 1) * 8, (ys.max() + 1) * 8)
