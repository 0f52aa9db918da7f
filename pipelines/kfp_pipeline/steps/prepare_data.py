"""prepare-data's work: the train and eval datasets a run reads, from a data source (DataSource: the
mini-language `synthetic`, `vqa-synthetic`, `vqav2:DIR`, `gqa:DIR` or an image folder, parsed once).

Scene sources write trainer.data's directory format (images, queries, answers, relevance; the trainer computes the
textures on its device); the VQA sources write trainer.vqa's JSONL for a Qwen-VL base. What each source holds
and how it is converted: docs/pipeline.md (prepare-data) and docs/vlm.md.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class PrepareError(UserError):
    """A data source prepare-data cannot read: one line, exit code 2."""


SYNTHETIC, VQA_SYNTHETIC, FOLDER = "synthetic", "vqa-synthetic", "folder"
VQA_FORMATS = ("vqav2", "gqa")  # KIND:DIR, DIR holding train/ and eval/ in that format
SOURCES = f"{SYNTHETIC}, {VQA_SYNTHETIC}, " + ", ".join(f"{f}:DIR" for f in VQA_FORMATS) + " or an image folder"


@dataclass(frozen=True)
class DataSource:
    """A parsed data source: its kind (synthetic, vqa-synthetic, vqav2, gqa, folder) and its folder, if any."""

    kind: str
    folder: Path | None = None

    @property
    def vqa(self) -> bool:
        """Whether it makes JSONL for a Qwen-VL base (else scenes for the tiny LM's task)."""
        return self.kind == VQA_SYNTHETIC or self.kind in VQA_FORMATS

    def __str__(self) -> str:
        return {SYNTHETIC: SYNTHETIC, VQA_SYNTHETIC: VQA_SYNTHETIC, FOLDER: str(self.folder)}.get(
            self.kind, f"{self.kind}:{self.folder}")

    @classmethod
    def parse(cls, text: str, label: str = "source") -> DataSource:
        """The one reading of the mini-language; a bad source is one line naming `label` and what it accepts."""
        if text in (SYNTHETIC, VQA_SYNTHETIC):
            return cls(text)
        kind, colon, rest = text.partition(":")
        if colon and kind in VQA_FORMATS:
            folder = Path(rest)
            if not folder.is_dir():
                raise PrepareError(f"{label} {text}: {rest!r} is not a folder{_data_mount_hint(rest)}")
            return cls(kind, folder)
        if Path(text).is_dir():
            return cls(FOLDER, Path(text))
        raise PrepareError(f"{label} {text!r} is neither a source name nor an existing folder{_data_mount_hint(text)};"
                           f" allowed: {SOURCES}")


def _data_mount_hint(path: str) -> str:
    from pipelines.jobs.team_config import DATA_MOUNT

    return (f" ({DATA_MOUNT} holds the team's dataBucket only when team-config sets it and the team's overlay adds "
            f"kustomize/components/data-bucket)") if path.startswith(DATA_MOUNT + "/") else ""


def read_folder(folder: str | Path, size: int = 64) -> tuple[np.ndarray, list[str], list[str]]:
    """Images of a folder as [N,size,size,3] RGB uint8, their file names, and the names that could not be read."""
    import cv2

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PrepareError(f"source {folder}: no image files (allowed: {', '.join(IMAGE_SUFFIXES)})")
    images, names, unreadable = [], [], []
    for path in files:
        # imdecode of the bytes, not imread: imread cannot tell "missing" from "corrupt" and prints nothing useful.
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError:
            data = np.zeros(0, np.uint8)
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if bgr is None or bgr.size == 0:
            unreadable.append(path.name)
            continue
        h, w = bgr.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = bgr[top:top + side, left:left + side]
        interpolation = cv2.INTER_AREA if side >= size else cv2.INTER_LINEAR
        images.append(cv2.cvtColor(cv2.resize(square, (size, size), interpolation=interpolation), cv2.COLOR_BGR2RGB))
        names.append(path.name)
    if unreadable:
        print(f"prepare-data: skipped {len(unreadable)} unreadable image file(s) in {folder}: {', '.join(unreadable)}",
              file=sys.stderr)
    if not images:
        raise PrepareError(f"source {folder}: none of its {len(files)} image files could be read "
                           f"({', '.join(unreadable)})")
    return np.stack(images), names, unreadable


# --- image-question-answer sources for a Qwen-VL base: JSONL in trainer.vqa's format ----------------------
# source "vqa-synthetic": the synthetic scenes as PNG + JSONL (the tiny-VLM rehearsal).
# source "vqav2:DIR" / "gqa:DIR": DIR holds train/ and eval/, each with the format's files and an images/ folder:
#   VQAv2: questions.json ({"questions": [{question_id, image_id, question}], "data_subtype": "train2014"}) and
#          annotations.json ({"annotations": [{question_id, answers: [{answer}]}]}); images named as COCO's
#          (COCO_<data_subtype>_<image_id:012d>.jpg).
#   GQA:   questions.json ({qid: {imageId, question, answer, annotations}}) and optional scene_graphs.json
#          ({imageId: {objects: {id: {x, y, w, h}}}}): the objects the question and answer refer to are the boxes.
# The JSONL's image paths point back into DIR (relative to the JSONL file), so images are not copied: the
# trainer must see DIR at the same path (the bucket mount) as this step.
VQA_FILE = "data.jsonl"


def _load_json(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PrepareError(f"{path}: cannot read as JSON ({exc.__class__.__name__})") from None


def vqav2_records(split_dir: Path) -> list[dict]:
    questions = _load_json(split_dir / "questions.json")
    annotations = _load_json(split_dir / "annotations.json")
    try:
        subtype = questions.get("data_subtype", "")
        answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations["annotations"]}
        return [{"image": f"images/COCO_{subtype}_{q['image_id']:012d}.jpg", "question": q["question"],
                 "answers": answers.get(q["question_id"], [])} for q in questions["questions"]]
    except (KeyError, TypeError, AttributeError) as exc:
        raise PrepareError(f"{split_dir}: not VQAv2 questions/annotations files (missing {exc})") from None


def gqa_records(split_dir: Path) -> list[dict]:
    questions = _load_json(split_dir / "questions.json")
    graphs_path = split_dir / "scene_graphs.json"
    graphs = _load_json(graphs_path) if graphs_path.is_file() else {}
    records = []
    try:
        for q in questions.values():
            objects = graphs.get(q["imageId"], {}).get("objects", {})
            refs = set()
            for part in (q.get("annotations") or {}).values():
                refs.update(str(v) for v in part.values())
            boxes = [[o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"]]
                     for ref in sorted(refs) if (o := objects.get(ref))]
            record = {"image": f"images/{q['imageId']}.jpg", "question": q["question"], "answers": [q["answer"]]}
            if boxes:
                record["boxes"] = boxes
            records.append(record)
    except (KeyError, TypeError, AttributeError) as exc:
        raise PrepareError(f"{split_dir}: not a GQA questions file (missing {exc})") from None
    return records


def _write_vqa_jsonl(records: list[dict], split_dir: Path, out_dir: Path) -> Path:
    import json
    import os

    from trainer.files import write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    # Absolute: KFP copies the dataset (object store, then the train step's staging) to directories of other
    # depths, where a path relative to where it was written points elsewhere; the source folder itself (the
    # team's bucket) is mounted at the same path in every step and replica. abspath, not resolve: keep /data.
    prefix = Path(os.path.abspath(split_dir))
    lines = [json.dumps({**r, "image": str(prefix / r["image"])}) for r in records]
    return write_text_atomic(out_dir / VQA_FILE, "".join(line + "\n" for line in lines))


def prepare_vqa(source: DataSource, seed: int, train_size: int, eval_size: int, train_dir: str | Path,
                eval_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSONL sources: synthetic scenes as PNG files, or a VQAv2 / GQA folder converted (at most
    train_size / eval_size examples each)."""
    from trainer.files import write_json_atomic
    from trainer.vqa import write_scene_jsonl

    train_dir, eval_dir = Path(train_dir), Path(eval_dir)
    common = {"source": str(source), "seed": seed, "format": f"trainer.vqa JSONL ({VQA_FILE})"}
    if source.kind == VQA_SYNTHETIC:
        write_scene_jsonl(train_dir, train_size, seed)
        write_scene_jsonl(eval_dir, eval_size, seed, offset=1_000_000_000)
        metas = ({**common, "split": "train", "count": train_size}, {**common, "split": "eval", "count": eval_size})
    else:
        reader = {"vqav2": vqav2_records, "gqa": gqa_records}[source.kind]
        # convert both splits before writing either: a bad source leaves nothing behind
        splits = [(source.folder / name, reader(source.folder / name)[:size])
                  for name, size in (("train", train_size), ("eval", eval_size))]
        for split_dir, records in splits:
            if not records:
                raise PrepareError(f"source {source}: {split_dir} has no questions")
        metas = []
        for (split_dir, records), out, split in zip(splits, (train_dir, eval_dir), ("train", "eval")):
            _write_vqa_jsonl(records, split_dir, out)
            metas.append({**common, "split": split, "count": len(records), "images": str(split_dir / "images")})
    for meta, out in zip(metas, (train_dir, eval_dir)):
        write_json_atomic(out / "metadata.json", meta)
    return metas[0], metas[1]


def prepare(source: str, seed: int, train_size: int, eval_size: int, train_dir: str | Path,
            eval_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the two dataset directories; returns their metadata (also in each directory's metadata.json)."""
    from trainer.data import EVAL_OFFSET, generate, save_dataset

    for name, value in (("train_size", train_size), ("eval_size", eval_size)):
        if int(value) <= 0:
            raise PrepareError(f"{name}={value} must be a positive integer")
    train_size, eval_size, seed = int(train_size), int(eval_size), int(seed)
    source = DataSource.parse(source)
    if source.vqa:
        return prepare_vqa(source, seed, train_size, eval_size, train_dir, eval_dir)
    # Read (and fail on) the folder before anything is written: a failed step leaves no half dataset behind.
    folder = read_folder(source.folder) if source.kind == FOLDER else None

    common = {"source": str(source), "seed": seed, "image_shape": [64, 64, 3], "relevance_shape": [8, 8],
              "format": "trainer.data (scenes.npz + metadata.json)"}
    train = generate(seed, 0, train_size)
    train_meta = {**common, "split": "train", "count": train_size, "stream_offset": 0,
                  "training_images": SYNTHETIC}
    evaluation = generate(seed, 0, eval_size, EVAL_OFFSET)
    eval_meta = {**common, "split": "eval", "count": eval_size, "stream_offset": EVAL_OFFSET,
                 "folder_images": 0, "unreadable_files": []}
    if folder is not None:
        images, names, unreadable = folder
        evaluation["folder_images"] = images
        evaluation["folder_names"] = np.array(names)
        eval_meta.update(folder_images=len(names), unreadable_files=unreadable)
    save_dataset(train_dir, train, train_meta)
    save_dataset(eval_dir, evaluation, eval_meta)
    return train_meta, eval_meta
