"""Projected wall-clock of full ImageNet ResNet-50 IMP and SWAMP runs, from the measured step.

The only measured input is the masked ResNet-50 training throughput of one GPU (the
``resnet50_train_step`` result, ``masked`` row: images per step over the step time). The
rest are the assumptions below:

- ImageNet train set of ``IMAGENET_TRAIN`` images, ``EPOCHS`` epochs per level;
- the rewind point, ``REWIND_ITERATIONS`` iterations at batch ``REWIND_BATCH`` (~6 epochs),
  is trained once, by one network;
- level 0 and each of the ``LEVELS`` pruning levels train from the rewind point to epoch
  ``EPOCHS`` (11 trainings of ~84 epochs); IMP trains one network per level, SWAMP
  ``SWAMP_PARTICLES`` particles (that many times the images);
- every image is trained at the measured masked throughput per GPU times the scaling
  efficiency of the GPU count (``SCALING_EFFICIENCY``, relative to one GPU's throughput);
- evaluation, BatchNorm statistics recomputation, checkpointing and data loading stalls are
  not counted.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks import results
from benchmarks.cases.train_resnet50 import CASE

IMAGENET_TRAIN = 1_281_167
EPOCHS = 90
REWIND_ITERATIONS, REWIND_BATCH = 7500, 1024
LEVELS = 10
SWAMP_PARTICLES = 4
SCALING_EFFICIENCY = {8: 0.90, 32: 0.85, 128: 0.80}
METHODS = {"IMP": 1, "SWAMP": SWAMP_PARTICLES}  # networks trained per level
OP, ROW = "resnet50_train_step", "masked"
NOT_MEASURED = ("Not measured yet: the projection appears here once `make bench` has recorded "
                f"`{OP}` on a GPU.")


def images_trained(networks_per_level: int) -> int:
    """Images of a whole run: the rewind point once, then levels 0..LEVELS from it to the end."""
    rewind = REWIND_ITERATIONS * REWIND_BATCH
    per_level = EPOCHS * IMAGENET_TRAIN - rewind
    return rewind + (LEVELS + 1) * networks_per_level * per_level


def hours(images_per_second_per_gpu: float, gpus: int, networks_per_level: int) -> float:
    """Projected wall-clock hours on ``gpus`` GPUs (a key of ``SCALING_EFFICIENCY``)."""
    throughput = images_per_second_per_gpu * gpus * SCALING_EFFICIENCY[gpus]
    return images_trained(networks_per_level) / throughput / 3600


def _duration(h: float) -> str:
    return f"{h:,.1f} h ({h / 24:,.2f} days)"


def measured_images_per_second(doc: dict) -> float | None:
    """Masked ResNet-50 images/s of one GPU in ``doc``, or None if it was not measured."""
    for row in doc["results"]:
        if (row["op"], row["case"], row["backend"]) == (OP, CASE, ROW):
            return row["extra"]["images_per_step"] / (row["time_ms"] / 1e3)
    return None


def markdown(doc: dict) -> str | None:
    """The projection table of ``doc``'s GPU, or None without a measured ResNet-50 step."""
    rate = measured_images_per_second(doc)
    if rate is None:
        return None
    head = ["method", "images trained", *(f"{g} GPUs" for g in SCALING_EFFICIENCY)]
    lines = [f"#### {doc['gpu']}: {rate:,.0f} images/s per GPU (masked ResNet-50, commit `{doc['commit']}`)",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, networks in METHODS.items():
        cells = [method, f"{images_trained(networks) / 1e9:.2f}e9",
                 *(_duration(hours(rate, g, networks)) for g in SCALING_EFFICIENCY)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def assumptions() -> str:
    efficiency = ", ".join(f"{e:.2f} at {g}" for g, e in SCALING_EFFICIENCY.items())
    return (f"Assumptions: {IMAGENET_TRAIN:,} training images, {EPOCHS} epochs per level; the rewind "
            f"point ({REWIND_ITERATIONS} iterations at batch {REWIND_BATCH}) trained once; levels "
            f"0..{LEVELS} each trained from the rewind point to epoch {EPOCHS}; SWAMP trains "
            f"{SWAMP_PARTICLES} particles per level; scaling efficiency {efficiency} GPUs, relative "
            "to one GPU's measured throughput. Evaluation, BatchNorm recomputation, checkpointing "
            "and data-loading stalls are not counted.")


def section(results_dir: Path) -> str:
    """Projection tables of every results file with a measured ResNet-50 step, else NOT_MEASURED."""
    docs = [results.load(p) for p in sorted(Path(results_dir).glob("*.json"))]
    tables = [t for t in (markdown(d) for d in docs) if t is not None]
    return "\n\n".join([*tables, assumptions()]) if tables else NOT_MEASURED
