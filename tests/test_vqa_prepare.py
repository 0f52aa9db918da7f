"""prepare-data's conversions of VQAv2-style and GQA-style files into the trainer's JSONL, and the PNG scenes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.kfp_pipeline.steps.prepare_data import PrepareError, prepare
from trainer.vqa import load_jsonl


def _image(path, size=(30, 40)):
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((*size, 3), 90, np.uint8))


def _vqav2(root, split, subtype):
    d = root / split
    d.mkdir(parents=True)
    (d / "questions.json").write_text(json.dumps({"data_subtype": subtype, "questions": [
        {"question_id": 11, "image_id": 7, "question": "How many dogs?"},
        {"question_id": 12, "image_id": 8, "question": "Is it red?"}]}))
    (d / "annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 11, "image_id": 7, "answers": [{"answer": "2"}] * 7 + [{"answer": "two"}] * 3},
        {"question_id": 12, "image_id": 8, "answers": [{"answer": "yes"}] * 10}]}))
    for image_id in (7, 8):
        _image(d / "images" / f"COCO_{subtype}_{image_id:012d}.jpg")


def test_vqav2_folder_becomes_jsonl_the_trainer_reads(tmp_path):
    _vqav2(tmp_path / "vqa", "train", "train2014")
    _vqav2(tmp_path / "vqa", "eval", "val2014")
    train_meta, eval_meta = prepare(f"vqav2:{tmp_path / 'vqa'}", 0, 5, 1, tmp_path / "t", tmp_path / "e")
    assert (train_meta["count"], eval_meta["count"]) == (2, 1)
    good, bad = load_jsonl(tmp_path / "t", 0.0)  # the directory prepare-data wrote
    assert not bad and [g["question"] for g in good] == ["How many dogs?", "Is it red?"]
    assert good[0]["answers"].count("2") == 7 and len(good[0]["answers"]) == 10
    assert good[0]["image"].endswith("COCO_train2014_000000000007.jpg")
    assert load_jsonl(tmp_path / "e", 0.0)[0][0]["image"].endswith("COCO_val2014_000000000007.jpg")


def test_prepared_jsonl_still_finds_its_images_after_kfp_moves_it(tmp_path):
    """KFP uploads an output dataset and downloads it elsewhere (another depth) for the next step."""
    import shutil

    _vqav2(tmp_path / "vqa", "train", "train2014")
    _vqav2(tmp_path / "vqa", "eval", "val2014")
    prepare(f"vqav2:{tmp_path / 'vqa'}", 0, 5, 5, tmp_path / "t", tmp_path / "e")
    moved = shutil.copytree(tmp_path / "t", tmp_path / "minio" / "artifacts" / "run" / "prepare-data" / "train_data")
    shutil.rmtree(tmp_path / "t")
    good, bad = load_jsonl(moved, 0.0)
    assert not bad and len(good) == 2
    assert all(Path(g["image"]).is_file() for g in good)


def test_gqa_folder_with_scene_graph_boxes(tmp_path):
    for split in ("train", "eval"):
        d = tmp_path / "gqa" / split
        d.mkdir(parents=True)
        (d / "questions.json").write_text(json.dumps({"q1": {
            "imageId": "n1", "question": "What color is the cup?", "answer": "blue",
            "annotations": {"question": {"4": "100"}, "answer": {}, "fullAnswer": {"1": "100"}}}}))
        graph = {"n1": {"objects": {"100": {"x": 2, "y": 3, "w": 10, "h": 5}}}}
        (d / "scene_graphs.json").write_text(json.dumps(graph))
        _image(d / "images" / "n1.jpg")
    prepare(f"gqa:{tmp_path / 'gqa'}", 0, 5, 5, tmp_path / "t", tmp_path / "e")
    good, bad = load_jsonl(tmp_path / "t", 0.0)
    assert not bad and good[0]["answers"] == ["blue"] and good[0]["boxes"] == [[2, 3, 12, 8]]


def test_not_a_vqa_folder_fails_and_writes_nothing(tmp_path):
    (tmp_path / "vqa" / "train").mkdir(parents=True)
    (tmp_path / "vqa" / "train" / "questions.json").write_text("{}")
    with pytest.raises(PrepareError, match="questions.json|annotations.json"):
        prepare(f"vqav2:{tmp_path / 'vqa'}", 0, 5, 1, tmp_path / "t", tmp_path / "e")
    assert not (tmp_path / "t").exists() and not (tmp_path / "e").exists()


def test_synthetic_scenes_as_png_and_jsonl(tmp_path):
    train_meta, _ = prepare("vqa-synthetic", 0, 6, 3, tmp_path / "t", tmp_path / "e")
    good, _ = load_jsonl(tmp_path / "t", 0.0)
    evals, _ = load_jsonl(tmp_path / "e", 0.0)
    assert (len(good), len(evals), train_meta["count"]) == (6, 3, 6)
    assert all(g["boxes"] for g in good) and {g["image"] for g in good}.isdisjoint({e["image"] for e in evals})


def test_missing_bucket_folder_names_what_mounts_it(tmp_path):
    with pytest.raises(PrepareError, match=r"is not a folder \(/data holds the team's dataBucket only when"):
        prepare("vqav2:/data/arrcoc-no-such-dataset", 0, 5, 1, tmp_path / "t", tmp_path / "e")
    with pytest.raises(PrepareError, match=r"is not a folder$"):
        prepare(f"gqa:{tmp_path / 'nope'}", 0, 5, 1, tmp_path / "t", tmp_path / "e")
    assert not (tmp_path / "t").exists() and not (tmp_path / "e").exists()
