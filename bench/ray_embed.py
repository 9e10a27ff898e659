"""`fewshot embed --engine ray` against `--engine local` on the same JPEGs, and the driver's memory
at 1x and 10x the images, in one run.

    python bench/ray_embed.py [--images 2400] [--scale 10]

Prints, for 2,400 640x480 JPEGs: the local engine (the baseline, npy) and the ray engine (local Ray
instance on this machine's cores, parquet): images/s end to end and once decoding flows (start-up
excluded: Ray's start, the actor's model load); the ratio. Then the ray engine on 10x the images
(the same photos under other names): the driver's peak RSS at both sizes and their ratio. Each ray
run is its own process (a fresh Ray instance; its peak RSS is the driver's alone). Finally the
per-actor rate that the README's cost model for 100 million images is built on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_own_process, peak_rss_mib, photo_jpegs, write_folder  # noqa: E402


def driver(src: str, out: str, cache_dir: str) -> None:
    """One ray run in this process; prints its figures as JSON on the last line."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from fewshot.ray_engine import embed_dataset_ray

    started = time.perf_counter()
    report = embed_dataset_ray(src, out, "efficientnet_lite0", cache_dir=cache_dir, progress=False)
    import ray

    ray.shutdown()
    print(json.dumps({"seconds": time.perf_counter() - started, "count": report.count, "errors": report.errors,
                      "steady": report.steady_images_per_second, "startup": report.startup_seconds,
                      "rss_mib": peak_rss_mib()}))


def ray_run(src: Path, out: Path, cache_dir: Path) -> dict:
    return in_own_process(__file__, "--driver", src, out, cache_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--scale", type=int, default=10, help="the large run has this many times the images")
    parser.add_argument("--driver", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        driver(*args.driver)
        return
    from fewshot import create_encoder, embed_dataset
    from fewshot.runtimes import owned_cores

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache_dir = tmp / "cache"
        jpegs = photo_jpegs(args.images)
        small = write_folder(tmp / "small", jpegs)
        large = tmp / "large"
        for copy in range(args.scale):  # the same photos under other names: same decode and embed work
            write_folder(large / f"copy{copy:02d}", jpegs)
        print(f"{args.images} JPEGs 640x480 (scikit-image photos, random crops); {owned_cores()} cores", flush=True)

        encoder = create_encoder("efficientnet_lite0", device="cpu", runtime="onnx", cache_dir=cache_dir)
        local = embed_dataset(small, tmp / "local", encoder, progress=False)
        ray_small = ray_run(small, tmp / "ray-small", cache_dir)
        assert (ray_small["count"], ray_small["errors"]) == (local.count, local.errors)
        end_to_end = args.images / ray_small["seconds"]
        print(f"local engine (baseline): {local.images_per_second:7.1f} images/s end to end, "
              f"{local.steady_images_per_second:7.1f} once decoding flows (start-up {local.startup_seconds:.1f} s)")
        print(f"ray engine:              {end_to_end:7.1f} images/s end to end, {ray_small['steady']:7.1f} once "
              f"decoding flows (start-up {ray_small['startup']:.1f} s: Ray instance, workers, model load)")
        print(f"ray / local: {end_to_end / local.images_per_second:.2f} end to end, "
              f"{ray_small['steady'] / local.steady_images_per_second:.2f} once flowing", flush=True)

        ray_large = ray_run(large, tmp / "ray-large", cache_dir)
        assert ray_large["count"] == args.scale * local.count
        print(f"driver peak RSS: {ray_small['rss_mib']:.0f} MiB at {args.images} images, {ray_large['rss_mib']:.0f} "
              f"MiB at {args.scale * args.images}: ratio {ray_large['rss_mib'] / ray_small['rss_mib']:.3f} "
              f"({args.scale * args.images / ray_large['seconds']:.1f} images/s on the large run)")
        per_actor = ray_large["steady"]
        print(f"per CPU actor here ({owned_cores()} cores: 1 actor using them all, decoding beside it): "
              f"{per_actor:.1f} images/s -> 100 million images = {1e8 / per_actor / 3600:.0f} actor-hours")


if __name__ == "__main__":
    main()
