"""The dataset fingerprint of a project with partial labels, computed with nnU-Net's own functions.

nnU-Net's ``DatasetFingerprintExtractor`` collects the "foreground" intensities
as ``segmentation > 0``. In a partial label map the ignore value (C + 1) fills
everything outside the annotated boxes, so nnActive's fingerprint takes almost
the whole image as foreground. For z-score normalisation (MRI) nothing depends
on it, but for CT normalisation the clipping window and the mean / std come
from these statistics: with ignore as foreground they describe the whole body
and air instead of the structures to segment.

What we do instead (:func:`analyze_case`): nnU-Net's ``collect_foreground_intensities``
runs on a *label view* where the ignore value is mapped to background, so the
"foreground" is exactly the annotated foreground voxels (0 < label < ignore).
These are a sample of the true foreground (the boxes of the starting budget are
placed on every class), which is what the statistics are meant to describe;
the unannotated rest of the image is unknown and must not count. Shapes after
cropping and spacings depend on the images only; they are taken from every pool
image, so that the plans do not depend on how many images happen to be
annotated yet.

If no foreground is annotated at all, the statistics fall back to all annotated
voxels (background included) and, failing that, to all voxels inside the
nonzero crop; ``al3d_intensity_source`` in the fingerprint says which was used.
Per case at most 100,000 intensities are sampled (nnU-Net: 1e8 / number of
cases, with replacement) to bound memory on a laptop.

Nothing here reads nnU-Net's environment variables: the folders are explicit.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..fileio import atomic_write_json

MAX_SAMPLES_PER_CASE = 100_000
INTENSITY_SOURCES = ("annotated foreground", "annotated voxels", "all voxels")


def analyze_case(image_files: Sequence[str], label_file: str, reader_writer_class, ignore_value: int, num_samples: int) -> dict:
    """Shape after nonzero crop, spacing and intensity samples of one case (three kinds, see module docstring)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    rw = reader_writer_class()
    images, properties = rw.read_images(list(image_files))
    seg, _ = rw.read_seg(label_file)
    data_cropped, seg_cropped, _ = crop_to_nonzero(images, seg)
    # crop_to_nonzero marks background outside the nonzero mask as -1; ignore voxels stay ignore.
    annotated_view = np.where(seg_cropped == ignore_value, 0, seg_cropped)  # ignore -> background
    fg, _ = DatasetFingerprintExtractor.collect_foreground_intensities(annotated_view, data_cropped, num_samples=num_samples)
    any_annotated = ((seg_cropped != ignore_value) & (seg_cropped >= 0)).astype(np.int8)
    annotated, _ = DatasetFingerprintExtractor.collect_foreground_intensities(
        any_annotated, data_cropped, num_samples=num_samples
    )
    everything, _ = DatasetFingerprintExtractor.collect_foreground_intensities(
        np.ones_like(seg_cropped, dtype=np.int8), data_cropped, num_samples=min(num_samples, 10_000)
    )
    shape_before = images.shape[1:]
    shape_after = data_cropped.shape[1:]
    return {
        "shape_after_crop": [int(s) for s in shape_after],
        "spacing": [float(s) for s in properties["spacing"]],
        "relative_size_after_cropping": float(np.prod(shape_after) / np.prod(shape_before)),
        "samples": {
            INTENSITY_SOURCES[0]: [np.asarray(c, dtype=np.float32) for c in fg],
            INTENSITY_SOURCES[1]: [np.asarray(c, dtype=np.float32) for c in annotated],
            INTENSITY_SOURCES[2]: [np.asarray(c, dtype=np.float32) for c in everything],
        },
        "annotated_foreground_voxels": int(np.count_nonzero(annotated_view > 0)),
    }


def _analyze_star(args):  # multiprocessing helper (spawn pickles a module-level function)
    return analyze_case(*args)


def intensity_statistics(samples: np.ndarray) -> dict:
    """nnU-Net's per-channel statistics (the keys its normalisation schemes read)."""
    p005, median, p995 = np.percentile(samples, (0.5, 50.0, 99.5))
    return {
        "mean": float(np.mean(samples)),
        "median": float(median),
        "std": float(np.std(samples)),
        "min": float(np.min(samples)),
        "max": float(np.max(samples)),
        "percentile_99_5": float(p995),
        "percentile_00_5": float(p005),
    }


def extract_fingerprint(
    cases: Mapping[str, tuple[Sequence[Path], Path]],
    dataset_json: Mapping,
    ignore_value: int,
    output_file: Path | None = None,
    num_processes: int = 1,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """nnU-Net's dataset fingerprint of ``cases`` (case -> (image files, partial label file)), ignore not foreground.

    Returns the fingerprint dict (nnU-Net's keys plus ``al3d_*`` bookkeeping) and
    writes it to ``output_file`` (atomically) when given.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    if not cases:
        raise ValueError("no cases to fingerprint")
    names = sorted(cases)
    first_images = [str(p) for p in cases[names[0]][0]]
    rw_class = determine_reader_writer_from_dataset_json(dict(dataset_json), first_images[0])
    per_case = int(min(MAX_SAMPLES_PER_CASE, 1e8 // len(names)))
    jobs = [([str(p) for p in cases[c][0]], str(cases[c][1]), rw_class, int(ignore_value), per_case) for c in names]
    results: list[dict] = []
    if num_processes > 1 and len(jobs) > 2 * num_processes:
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            for i, r in enumerate(pool.imap(_analyze_star, jobs, chunksize=4)):
                results.append(r)
                if progress:
                    progress({"stage": "fingerprint", "done": i + 1, "total": len(jobs)})
    else:
        for i, job in enumerate(jobs):
            results.append(analyze_case(*job))
            if progress:
                progress({"stage": "fingerprint", "done": i + 1, "total": len(jobs), "case": names[i]})

    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    source = None
    for candidate in INTENSITY_SOURCES:
        if all(sum(len(r["samples"][candidate][ch]) for r in results) > 0 for ch in range(n_channels)):
            source = candidate
            break
    assert source is not None  # "all voxels" is never empty
    statistics = {
        ch: intensity_statistics(np.concatenate([r["samples"][source][ch] for r in results if len(r["samples"][source][ch])]))
        for ch in range(n_channels)
    }
    fingerprint = {
        "spacings": [r["spacing"] for r in results],
        "shapes_after_crop": [r["shape_after_crop"] for r in results],
        "foreground_intensity_properties_per_channel": statistics,
        "median_relative_size_after_cropping": float(np.median([r["relative_size_after_cropping"] for r in results])),
        "al3d_intensity_source": source,
        "al3d_cases": names,
        "al3d_annotated_foreground_voxels": int(sum(r["annotated_foreground_voxels"] for r in results)),
        "al3d_ignore_value": int(ignore_value),
    }
    if output_file is not None:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_file, fingerprint)
    return fingerprint
