"""COCO-30k evaluation for goca-scfg: caption sets, resumable sharded sweeps, FID, CLIP score, significance, reports.

Modules follow the data: `captions` and `io` (stdlib) → `images` → `sweep` (generation) and
`fid` / `clip_score` (functional cores over clean-fid and open_clip) → `stats` → `report` and `metrics` (CLIs).
Nothing in `goca_scfg/` imports this package.
"""
