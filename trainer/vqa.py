"""Image-question-answer data for the Qwen-VL path: the JSONL format and its checks, the standard VQA scoring, the
evaluation and the accuracy vs visual-token budget curve. The format and what counts as a bad example:
docs/vlm.md ("The data format")."""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .distributed import World, shard
from .errors import UserError


class VqaDataError(UserError):
    """A dataset file that cannot be used (unreadable, or too many bad examples)."""


BAD_REASONS = ("not_json", "missing_image", "corrupt_image", "empty_question", "no_answers", "box_outside_image")


def _decode_rgb(path: Path) -> np.ndarray | None:
    import cv2

    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None or bgr.size == 0:
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _check(record, root: Path, sizes: dict[Path, tuple[int, int] | None]) -> str | None:
    """The reason this record is bad, or None. Each image file is decoded once per file load."""
    if not isinstance(record, dict):
        return "not_json"
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        return "empty_question"
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return "no_answers"
    if not isinstance(record.get("image"), str):
        return "missing_image"
    path = root / record["image"]
    if path not in sizes:
        if not path.is_file():
            sizes[path] = None
        else:
            image = _decode_rgb(path)
            sizes[path] = image.shape[:2] if image is not None else (0, 0)
    size = sizes[path]
    if size is None:
        return "missing_image"
    if size == (0, 0):
        return "corrupt_image"
    height, width = size
    for box in record.get("boxes") or []:
        if (not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box)
                or not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height)):
            return "box_outside_image"
    return None


def load_jsonl(path: str | Path, max_bad_fraction: float) -> tuple[list[dict], Counter]:
    """The good examples of a JSONL file (image paths made absolute) and the count of bad ones per reason.
    A directory means its data.jsonl (what prepare-data writes)."""
    path = Path(path)
    if path.is_dir():
        path = path / "data.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VqaDataError(f"dataset {path}: cannot read ({exc})") from None
    good, bad, sizes = [], Counter(), {}
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        reason = _check(record, path.parent, sizes)
        if reason:
            bad[reason] += 1
            continue
        good.append({"image": str(path.parent / record["image"]), "question": record["question"].strip(),
                     "answers": list(record["answers"]), "boxes": record.get("boxes") or []})
    total = len(good) + sum(bad.values())
    if total == 0:
        raise VqaDataError(f"dataset {path}: no examples (one JSON object per line with image, question, answers)")
    detail = ", ".join(f"{reason}={bad[reason]}" for reason in BAD_REASONS if bad[reason])
    if sum(bad.values()) > max_bad_fraction * total:
        raise VqaDataError(f"dataset {path}: {sum(bad.values())} of {total} examples are bad ({detail}), more than "
                           f"max_bad_fraction={max_bad_fraction}")
    return good, bad


class VqaDataset(torch.utils.data.Dataset):
    """Map-style dataset of dict samples: image (RGB uint8 [H,W,3]), question, answers, boxes."""

    def __init__(self, path: str | Path, max_bad_fraction: float = 0.01):
        self.path = Path(path)
        self.examples, self.bad = load_jsonl(path, max_bad_fraction)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        return {**example, "pixels": _decode_rgb(Path(example["image"]))}

    def bad_summary(self) -> str:
        counts = " ".join(f"{reason}={self.bad[reason]}" for reason in BAD_REASONS)
        return f"dataset {self.path}: {len(self.examples)} good, {sum(self.bad.values())} skipped ({counts})"


# --- the standard VQA answer normalization -------------------------------------------------------------
# Tables as in the VQA challenge's evaluation script (vqaEval.py): contractions restored, number words to
# digits, articles dropped, punctuation removed except inside numbers.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "im": "i'm", "ive": "i've", "isnt": "isn't",
    "itd": "it'd", "itll": "it'll", "lets": "let's", "mightnt": "mightn't", "mustnt": "mustn't",
    "shant": "shan't", "shed": "she'd", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "thats": "that's", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't",
    "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
          "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_DIGIT.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def soft_accuracy(prediction: str, answers: list[str]) -> float:
    """min(#annotators who gave the prediction / 3, 1), after normalizing both sides."""
    predicted = normalize_answer(prediction)
    return min(sum(normalize_answer(a) == predicted for a in answers) / 3.0, 1.0)


# --- a synthetic dataset in this format: the scenes of trainer.data as PNG files + JSONL -------------------
def write_scene_jsonl(directory: str | Path, count: int, seed: int, offset: int = 0, size: int = 64) -> Path:
    """`count` synthetic scenes (trainer.data.make_scene) as PNGs and a data.jsonl whose answers depend on the
    boxed target object; returns the JSONL path. The demo's and the tests' VQA source."""
    import cv2

    from .data import VOCAB, make_scene
    from .files import write_bytes_atomic, write_text_atomic

    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        scene = make_scene(np.random.default_rng(seed + offset + i))
        image = scene["images"]
        if size != image.shape[0]:
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_NEAREST)
        name = f"images/{offset + i:08d}.png"
        ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        write_bytes_atomic(directory / name, png.tobytes())
        qtype, colour = (VOCAB[t] for t in scene["queries"])
        question = f"what shape is the {colour} object?" if qtype == "SHAPE?" else f"where is the {colour} object?"
        ys, xs = np.nonzero(scene["relevance"])
        cell = size // scene["relevance"].shape[0]
        box = [int(xs.min() * cell), int(ys.min() * cell), int((xs.max() + 1) * cell), int((ys.max() + 1) * cell)]
        lines.append(json.dumps({"image": name, "question": question, "answers": [VOCAB[int(scene["answers"])]] * 3,
                                 "boxes": [box]}))
    return write_text_atomic(directory / "data.jsonl", "\n".join(lines) + "\n")



# The colours of write_colour_jsonl: four well-separated ones, each a single word in the tiny VLM's tokenizer.
PATCH_COLOURS = ("red", "green", "blue", "yellow")


def write_colour_jsonl(directory: str | Path, count: int, seed: int, offset: int = 0, size: int = 64,
                       grid: int = 8) -> Path:
    """`count` images of gray noise with one solid-colour patch on one cell of a grid x grid layout, asked
    "what is the object?"; the answer is the patch's colour, the box its cell. The answer is a function of one
    small region that even a random frozen vision tower keeps apart, so a short run shows whether the adapter
    learns to keep that region's tokens (a random selection of a quarter of the tokens misses it 3 times in 4).
    Returns the JSONL path."""
    import cv2

    from .data import PALETTE
    from .files import write_bytes_atomic, write_text_atomic

    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    cell = size // grid
    lines = []
    for i in range(count):
        rng = np.random.default_rng([seed, offset + i])
        image = rng.integers(90, 166, (size, size, 1), dtype=np.uint8).repeat(3, axis=2)
        colour = PATCH_COLOURS[rng.integers(len(PATCH_COLOURS))]
        y, x = (int(v) * cell for v in rng.integers(grid, size=2))
        image[y:y + cell, x:x + cell] = PALETTE[colour]
        name = f"images/{offset + i:08d}.png"
        ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        write_bytes_atomic(directory / name, png.tobytes())
        lines.append(json.dumps({"image": name, "question": "what is the object?", "answers": [colour] * 3,
                                 "boxes": [[x, y, x + cell, y + cell]]}))
    return write_text_atomic(directory / "data.jsonl", "\n".join(lines) + "\n")


# --- evaluation: VQA accuracy, relevance, and the accuracy vs visual-token budget curve -------------------
class VqaSource:
    """A JSONL dataset with the model's collate: batch(indices) -> one collated batch (indices wrap around).
    Evaluation, the budget curve and the benchmarks read through it; training reads the VqaDataset through the
    trainer's DataLoader."""

    def __init__(self, path: str, collate, max_bad_fraction: float):
        self.dataset = VqaDataset(path, max_bad_fraction)
        self.collate = collate

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices) -> dict:
        return self.collate([self.dataset[int(i) % len(self.dataset)] for i in indices])


# Sums evaluate_vqa all-reduces: soft accuracy, relevance share, examples with boxes, visual tokens, answer loss,
# regions read at full detail and coarse (ARR-COC's level-of-detail allocation only).
_SUMS = ("accuracy", "relevance", "boxed", "tokens", "loss", "full", "coarse")


@torch.no_grad()
def evaluate_vqa(model, cfg, source: VqaSource, selection: str = "relevance", fraction: float | None = None,
                 world: World = World()) -> dict[str, float]:
    """vqa_accuracy (greedy answers, soft accuracy), relevance_score (sum_i min(a_i, ghat_i) of the allocation
    distribution a and the boxed share of each merged cell, where boxes exist), visual_tokens (mean tokens the LM
    read), for ARR-COC's selection lod_full and lod_coarse (mean regions read at full detail and coarse), and
    eval_loss over the first eval_size examples. Each rank scores its shard with the same number of batches (a
    sharded model's forward is a collective; a rank out of examples scores a stand-in batch with weight 0) and
    the sums are all-reduced: one host sync per evaluation besides each batch's generated tokens (read to score the
    answers). Random selection draws from a generator seeded by (cfg.seed, the batch's first example)."""
    was_training = model.training
    model.eval()
    count = min(cfg.eval_size, len(source))
    mine = shard(count, world)
    batches = math.ceil(math.ceil(count / world.world_size) / cfg.batch_size)
    # Host-side sums (answers are strings, token counts are shapes) and device-side sums (loss, regions, relevance),
    # so that the device is read once per evaluation, not once per image.
    host = torch.zeros(len(_SUMS), dtype=torch.float64)
    device = torch.zeros(len(_SUMS), dtype=torch.float64, device=model.device)
    for chunk in np.array_split(mine, batches):
        weight = 1.0 if len(chunk) else 0.0
        chunk = chunk if len(chunk) else np.zeros(1, dtype=np.int64)
        batch = source.batch(chunk)
        seed = int(np.random.SeedSequence([cfg.seed, int(chunk[0])]).generate_state(1)[0])
        answers, seq, lm_loss = model.score(batch, selection, fraction, seed)
        device[4] += weight * len(answers) * lm_loss.double()
        for i, predicted in enumerate(answers):
            host[0] += weight * soft_accuracy(predicted, batch["answers"][i])
            reading = seq["readings"][i]
            host[3] += weight * reading.count
            if reading.full is not None:
                device[5] += weight * reading.full
                device[6] += weight * reading.coarse
            if batch["boxed"][i]:
                truth = batch["truth"][i, :batch["visual_counts"][i]].to(model.device, non_blocking=True)
                truth = truth / truth.sum().clamp_min(1e-8)
                device[1] += weight * torch.minimum(reading.share(len(truth)), truth).sum()
                host[2] += weight
    totals = host.to(model.device) + device
    if world.distributed:
        dist.all_reduce(totals)
    totals = totals.cpu()
    model.train(was_training)
    accuracy, relevance, boxed, tokens, loss, full, coarse = totals.tolist()
    metrics = {"vqa_accuracy": accuracy / count}
    if boxed:
        metrics["relevance_score"] = relevance / boxed
    metrics["visual_tokens"] = tokens / count
    if selection == "relevance":
        metrics.update(lod_full=full / count, lod_coarse=coarse / count)
    metrics["eval_loss"] = loss / count
    return metrics


CURVE_BASELINES = ("random", "uniform")


def budget_curve(model, cfg, source: VqaSource, world: World = World()) -> dict:
    """vqa_accuracy at each token fraction of cfg.budget_curve for ARR-COC and the random and uniform
    (strided) selections, and the all-tokens upper bound. Every rank takes part (see evaluate_vqa)."""
    rows = []
    for fraction in sorted(float(v) for v in cfg.budget_curve.split(",") if v.strip()):
        row = {"fraction": fraction}
        for selection in ("relevance", *CURVE_BASELINES):
            metrics = evaluate_vqa(model, cfg, source, selection, fraction, world)
            row[selection] = metrics["vqa_accuracy"]
            row["visual_tokens"] = metrics["visual_tokens"]
        rows.append(row)
    everything = evaluate_vqa(model, cfg, source, "all", world=world)
    return {"rows": rows, "all_tokens": everything["vqa_accuracy"], "all_visual_tokens": everything["visual_tokens"]}


def curve_table(curve: dict) -> str:
    """The curve as a Markdown table."""
    lines = ["| token fraction | visual tokens | ARR-COC | random | uniform | all tokens |",
             "|---|---|---|---|---|---|"]
    for row in curve["rows"]:
        lines.append(f"| {row['fraction']:.4g} | {row['visual_tokens']:.1f} | {row['relevance']:.3f} | "
                     f"{row['random']:.3f} | {row['uniform']:.3f} | {curve['all_tokens']:.3f} |")
    return "\n".join(lines) + "\n"


def curve_png(curve: dict, dpi: int = 80) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [row["visual_tokens"] for row in curve["rows"]]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for key, label, style in (("relevance", "ARR-COC", "o-"), ("uniform", "uniform (strided)", "s--"),
                              ("random", "random", "^:")):
        ax.plot(tokens, [row[key] for row in curve["rows"]], style, label=label)
    ax.axhline(curve["all_tokens"], color="gray", lw=1, label=f"all {curve['all_visual_tokens']:.0f} tokens")
    ax.set_xlabel("visual tokens the LM reads (mean per image)")
    ax.set_ylabel("VQA accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def write_budget_curve(curve: dict, out: str | Path) -> None:
    """OUT/budget_curve.json, .md and .png, each written atomically."""
    from .files import write_bytes_atomic, write_json_atomic, write_text_atomic

    out = Path(out)
    write_json_atomic(out / "budget_curve.json", curve)
    write_text_atomic(out / "budget_curve.md", curve_table(curve))
    write_bytes_atomic(out / "budget_curve.png", curve_png(curve))
