"""COCO-30k evaluation for goca-scfg: caption sets, resumable sharded sweeps, registered metrics (FID, KID, CLIP
score, CMMD), significance, reports.

Modules follow the data: `captions`, `io`, `manifest` and `guidance_log` (stdlib) → `images` → `sweep` (generation)
and `fid` / `clip_score` (functional cores over clean-fid and open_clip) → `metric_base` and the entries
`metric_fid`, `metric_clip`, `metric_cmmd`, listed by `registry` → `distributed` → `stats` → `report` and `metrics`
(CLIs; `cli_common` holds what the CLIs share). Nothing in `goca_scfg/` imports this package.
"""
