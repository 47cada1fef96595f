"""Sampling images and latents from a pipeline: what training anchors, evaluation, attacks and the demo share.

* `generate`: seeded, batched, cached text-to-image sampling with manifests, and the sampler table's use
  (`set_scheduler`; the names are `ablation.config.SAMPLERS`);
* `inpaint`, `upscale`: the inpainting and x4-upscaling pipelines with the same seeding and cache;
* `anchors`: the model's own anchor latents for training (`SamplerSettings`, the sampler loop, decoding).

Each image has its own seed and CPU generator, so base and ablated models get the same noise for the same prompt
and sample whatever the batch size or device.
"""
