"""Pseudo-label target images with a generator checkpoint into a Parquet label store.

    python jobs/pseudo_label.py --config configs/benchmark/pseudo_label.yaml \
        checkpoint=outputs/benchmark/source_only.pt store=outputs/benchmark/labels

Settings are a YAML file of pipeline.pseudo_label.PseudoLabelConfig plus key=value
overrides (selector.alpha=0.25). Under `ray job submit` it joins the cluster; alone it
starts a local Ray instance. Re-running a finished store does nothing; re-running a
crashed one resumes.
"""

from __future__ import annotations

import sys

from common import init_ray, parse_config

from pipeline.pseudo_label import PseudoLabelConfig, run


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(PseudoLabelConfig, __doc__, argv)
    init_ray()
    manifest = run(cfg)
    stats = manifest["statistics"]
    precision = stats["precision_all"]
    print(f"label store: {cfg.store} ({manifest['num_images']} images, {manifest['num_parts']} parts)")
    print(f"kept {100 * stats['coverage_all']:.1f}% of pixels"
          + (f", precision {100 * precision:.1f}%" if precision is not None else ""))
    if manifest["skipped_unreadable"]:
        print(f"skipped {len(manifest['skipped_unreadable'])} unreadable images (listed in the manifest)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
