"""Evaluation of ablated models: CLIP-based metrics and reports (the images come from `ablation.sampling`).

Modules, one concern each:

* `metrics`: pure metric functions (CLIP score/accuracy, family accuracy, KID, memorization, PSNR);
* `clip_judge`: the CLIP model that embeds images and texts;
* `prompts`: evaluation tasks (target, anchor, surrounding concepts and their prompts) and prompt files;
* `swap`: applying a run's ablation to a loaded base pipeline and restoring it;
* `selection`: which concepts a run is evaluated on;
* `collateral`: control concepts outside the evaluated tasks, base vs ablated, judged by CLIP and (toy
  world) the toy concept classifier; `collateral.measure` for tests and benchmarks;
* `evaluate`: the evaluation loop; `report`: report.json / report.md / grids / chart;
* `cli`: `ablate generate | inpaint | upscale | eval`.
"""
