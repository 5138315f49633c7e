"""Benchmark: uncertainty + aggregation + selection, as seconds and peak memory (docs/METHODS.md section 3).

Two settings from the foundation issue:
- the Hippocampus pool: 195 cases (the real case shapes when the shared data is
  present, else 35 x 51 x 35), 5 members, 3 classes (background included),
  20 x 20 x 20 boxes, stride 1, a query of 20 boxes; target under 10 s;
- one CT-sized case: 160 x 512 x 512, 16 classes (background included), 5 members,
  box 32 x 74 x 74, stride 8, a query of 20 boxes; target under 60 s, peak memory under 8 GB.

Probabilities are synthetic (smooth random logits, softmax), written once as
float16 ``.npy`` files per member in a work folder outside the repository, and
read from disk by the timed run, as a scoring job's output would be. Each timed
run is a fresh child process, so its peak resident memory (ru_maxrss, which
counts the memory-mapped probability pages it touched) is its own.

    .venv/bin/python benchmarks/bench_query.py [--part hippocampus|ct|all] [--methods clasp_pe,bald]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ActiveLearning3DLib.default_data import find_shared_dataset  # noqa: E402
from ActiveLearning3DLib.query_methods import QueryContext, get_method  # noqa: E402
from ActiveLearning3DLib.uncertainty import FolderProbabilities  # noqa: E402

MEMBERS = 5
HIPPO = {"cases": 195, "classes": 3, "patch": (20, 20, 20), "stride": (1, 1, 1), "count": 20}
CT = {"shape": (160, 512, 512), "classes": 16, "patch": (32, 74, 74), "stride": (8, 8, 8), "count": 20}


def hippocampus_shapes(n: int) -> tuple[dict[str, tuple[int, int, int]], str]:
    """Real case shapes from the shared data's headers when present, else a typical shape."""
    shared = find_shared_dataset(REPO)
    if shared is None:
        return {f"case_{i:03d}": (35, 51, 35) for i in range(n)}, "synthetic shapes 35 x 51 x 35"
    import SimpleITK as sitk

    shapes = {}
    for path in sorted((shared / "imagesTr").glob("*.nii.gz"))[:n]:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        shapes[path.name[: -len(".nii.gz")]] = tuple(reversed(reader.GetSize()))
    return shapes, f"shapes of the first {len(shapes)} shared Hippocampus cases"


def write_member(path: Path, shape: tuple[int, ...], classes: int, rng: np.random.Generator, slab: int = 8) -> None:
    """Smooth random probabilities (C, Z, Y, X) as float16, written slab by slab to bound memory."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(classes, *shape))
    coarse = [max(2, d // 16) for d in shape]
    logits = rng.normal(0, 2.5, size=(classes, *coarse)).astype(np.float32)
    reps = [int(np.ceil(d / c)) for d, c in zip(shape, coarse)]
    for z0 in range(0, shape[0], slab):
        z1 = min(shape[0], z0 + slab)
        zi = np.arange(z0, z1) // reps[0]
        block = logits[:, zi]
        block = np.repeat(np.repeat(block, reps[1], axis=2)[:, :, : shape[1]], reps[2], axis=3)[:, :, :, : shape[2]]
        block = block + rng.normal(0, 0.5, size=block.shape).astype(np.float32)
        block = np.exp(block - block.max(axis=0, keepdims=True))
        out[:, z0:z1] = (block / block.sum(axis=0, keepdims=True)).astype(np.float16)
    out.flush()
    del out


def prepare(work: Path, part: str) -> dict:
    """Write the probability folders once (reused on later runs) and describe them."""
    rng = np.random.default_rng(0)
    if part == "hippocampus":
        shapes, note = hippocampus_shapes(HIPPO["cases"])
        classes = HIPPO["classes"]
    else:
        shapes, note = {"ct_case": CT["shape"]}, "one synthetic CT-sized case"
        classes = CT["classes"]
    root = work / part
    marker = root / "ready.json"
    if not marker.is_file():
        for m in range(MEMBERS):
            (root / f"fold_{m}").mkdir(parents=True, exist_ok=True)
            for case, shape in shapes.items():
                write_member(root / f"fold_{m}" / f"{case}.npy", shape, classes, rng)
        marker.write_text(json.dumps({"shapes": {c: list(s) for c, s in shapes.items()}}))
    return {"root": str(root), "note": note, "shapes": {c: list(s) for c, s in shapes.items()}, "classes": classes}


def run_one(root: str, part: str, method: str) -> dict:
    """The timed work, in this (child) process: stream members, score, aggregate, select."""
    spec = HIPPO if part == "hippocampus" else CT
    shapes = json.loads((Path(root) / "ready.json").read_text())["shapes"]
    classes = HIPPO["classes"] if part == "hippocampus" else CT["classes"]
    context = QueryContext(
        cases={c: tuple(s) for c, s in shapes.items()},
        patch_size=spec["patch"],
        foreground_classes=list(range(1, classes)),
        seed=0,
        loop=1,
        total_loops=5,
        probabilities=FolderProbabilities(root),
        stride=spec["stride"],
    )
    started = time.perf_counter()
    picks = get_method(method)(context, spec["count"])
    seconds = time.perf_counter() - started
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seconds": seconds, "peak_gib": peak_gib, "boxes": len(picks)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["hippocampus", "ct", "all"], default="all")
    parser.add_argument("--methods", default="clasp_pe,pe,bald,softrank_bald")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "al3d-bench-query",
        help="where the synthetic probabilities are written (outside the repository)",
    )
    parser.add_argument("--run-one", nargs=3, metavar=("ROOT", "PART", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(*args.run_one)))
        return 0
    parts = ["hippocampus", "ct"] if args.part == "all" else [args.part]
    targets = {"hippocampus": (10.0, None), "ct": (60.0, 8.0)}
    print(f"{'part':12s} {'method':14s} {'seconds':>8s} {'peak GiB':>9s}  target")
    failed = False
    for part in parts:
        started = time.perf_counter()
        info = prepare(args.work, part)
        print(
            f"# {part}: {info['note']}, {len(info['shapes'])} cases, {MEMBERS} members, {info['classes']} classes "
            f"(background included); data ready in {time.perf_counter() - started:.0f} s at {info['root']}"
        )
        for method in args.methods.split(","):
            child = subprocess.run(
                [sys.executable, __file__, "--run-one", info["root"], part, method], capture_output=True, text=True
            )
            if child.returncode:
                print(child.stderr, file=sys.stderr)
                return child.returncode
            r = json.loads(child.stdout.strip().splitlines()[-1])
            max_s, max_gib = targets[part]
            ok = r["seconds"] < max_s and (max_gib is None or r["peak_gib"] < max_gib)
            failed |= not ok
            target = f"< {max_s:.0f} s" + (f", < {max_gib:.0f} GiB" if max_gib else "")
            print(f"{part:12s} {method:14s} {r['seconds']:8.2f} {r['peak_gib']:9.2f}  {target} {'ok' if ok else 'MISSED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
