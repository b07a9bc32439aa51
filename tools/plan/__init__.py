"""Computed memory and throughput plan for the TLCM stages: SDXL on 80 GB A100s, and the `mini` teacher.

Nothing here allocates real weights or reads files. Every network is built on the ``meta`` device
from its config (the SDXL configs are written out below, as in
``stabilityai/stable-diffusion-xl-base-1.0``), and every number is counted on that meta graph:

* parameters: ``numel`` of the meta modules; LoRA parameters by attaching our adapter
  (:data:`models.lora.LORA_TARGETS`) with peft to the meta UNet;
* FLOPs: :class:`torch.utils.flop_counter.FlopCounterMode` over one call at batch 1 (forward, and
  the backward our training runs: grads only to the LoRA or to the input, the base frozen);
* activation memory: the bytes of the distinct storages autograd saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``, weights excluded), with attention routed to the
  fused kernels an A100 runs (flash / memory-efficient: they save q, k, v, out and the
  log-sum-exp, never the attention matrix); with gradient checkpointing, diffusers'
  ``enable_gradient_checkpointing`` is given a *measuring* checkpoint function that runs each
  segment once and books memory as torch's non-reentrant checkpoint holds it (segment inputs
  kept, segment-internal saves dropped and recomputed in backward);
* peak live activation bytes of a no-grad forward (the teacher's solver steps): a dispatch
  mode that follows every storage an op creates until it is freed.

The per-stage evaluation counts are counted, not typed: each stage's own step function (``make_step`` in
``tasks/distill.py``, ``tasks/mps.py``, ``tasks/dmgan.py``) runs on a tiny in-memory teacher with a counting UNet
(:func:`tools.rig.count_evals`), so they follow OUR code paths, not the paper's prose. Throughput uses the
convention forward + backward = 3 forwards (the measured backward of a frozen-base LoRA is shown
next to it); memory and A100-hours are estimates from these counts, labelled as such in the tables.

The package, by role (each module imports only those above it):

* :mod:`~tools.plan.configs`: the SDXL and MPS architectures written out; building a network on the meta device;
* :mod:`~tools.plan.meters`: FLOPs, saved-for-backward bytes and no-grad peaks of one call;
* :mod:`~tools.plan.networks`: every network of one teacher measured (:class:`NetCosts`), SDXL and `mini`;
* :mod:`~tools.plan.counts`: the network calls each stage makes per sample, counted, and the recipe of a preset;
* :mod:`~tools.plan.estimates`: throughput (FLOPs, A100-hours) and memory per GPU from the two above;
* :mod:`~tools.plan.report`: :class:`Plan`, the `sdxl` and `mini` plans and their markdown (`tlcm plan`).
"""
from tools.plan.report import Plan, markdown_tables, mini_plan, sdxl_plan

__all__ = ["Plan", "markdown_tables", "mini_plan", "sdxl_plan"]
