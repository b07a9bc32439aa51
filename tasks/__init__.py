"""The pipeline's stages: ``tasks/<stage>.py`` exposes ``run(params, paths) -> dict`` for each stage that
:mod:`tlcm.core.stages` declares (the one list of stages, in pipeline order); DVC (``tlcm stage``), ``tlcm run``
and the Prefect tasks all call it through :func:`tasks.registry.run_stage`.

Besides the stage modules, the package holds what stages share (``tlcm`` never imports ``tasks``;
``tools`` and ``flows`` do):
``registry`` (running a stage: lock, identity, records), ``distill`` (the loop of ``lcm_baseline``,
``mlcd`` and ``ilcd``, and the student set-up of every LoRA stage), ``teacher_buffer`` (MLCD's teacher
trajectories made ahead), ``finetune`` (what ``mps`` and ``dmgan`` share: the Eq. 9 batch, pass-through, save),
``student_eval`` (the LoRA stages' quick and final evaluations), and the parts of
``evaluate``: ``benchmark_sampling`` (the reference, baseline and student rows, sampled), ``benchmark_scores``
(the judge's columns), ``generate`` (sampling; also ``tlcm generate``), ``suite`` (the Table 1 metrics) and
``applications`` (img2img, inpainting and ControlNet rows).
"""
