"""diffusers' common scheduler checks, re-created for this project's schedulers.

diffusers keeps ``SchedulerCommonTest`` in ``tests/schedulers/test_schedulers.py`` of its source
repository (not in the wheel). This module re-creates every check of that class, as of diffusers
commit 58eb52c (2026), with the same names, inputs and assertions, so that a scheduler subclass here
meets the same standard as a scheduler inside diffusers: ``test_from_save_pretrained``,
``test_compatibles``, ``test_from_pretrained``, ``test_step_shape``,
``test_scheduler_outputs_equivalence``, ``test_scheduler_public_api``, ``test_add_noise_device``,
``test_deprecated_kwargs``, ``test_trained_betas``, ``test_getattr_is_correct``. (The branches
diffusers has for its own special schedulers — VQ-diffusion, consistency-model, EDM, IPNDM — are
left out: they never apply to a DDPM-family scheduler.) A subclass sets ``scheduler_classes``,
``forward_default_kwargs`` and ``get_scheduler_config``, and overrides a check only where
diffusers' own test of the comparable scheduler does. ``test_scheduler_diffusers.py`` runs the
checks on diffusers' ``LCMScheduler`` too, with the overrides of diffusers' ``LCMSchedulerTest``, to
show that the re-creation passes what diffusers' suite passes.

Import this module (``import scheduler_common``), not the class, so that pytest does not collect
the base class itself.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import tempfile
import unittest

import numpy as np
import torch


@contextlib.contextmanager
def captured(logger_name: str, level: int = logging.WARNING):
    """Text logged to ``logger_name`` at ``level`` or above inside the block."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logger = logging.getLogger(logger_name)
    old = logger.level
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield buf
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


class SchedulerCommonTest(unittest.TestCase):
    scheduler_classes: tuple = ()
    forward_default_kwargs: tuple = ()

    def get_scheduler_config(self, **kwargs) -> dict:
        raise NotImplementedError

    def setUp(self):
        if not self.scheduler_classes:
            self.fail(f"{type(self).__name__} names no scheduler_classes")

    # ---- fixtures ----------------------------------------------------------------------------

    @property
    def default_num_inference_steps(self) -> int:
        return 50

    def _steps(self) -> int:
        return dict(self.forward_default_kwargs).get("num_inference_steps", self.default_num_inference_steps)

    def _scheduler(self, cls=None, **config):
        return (cls or self.scheduler_classes[0])(**self.get_scheduler_config(**config))

    @property
    def default_timestep(self):
        """The first timestep of the default schedule."""
        s = self._scheduler()
        s.set_timesteps(self._steps())
        return s.timesteps[0]

    @property
    def default_timestep_2(self):
        """The second timestep of the default schedule (0 if it has one step)."""
        s = self._scheduler()
        s.set_timesteps(self._steps())
        return s.timesteps[1] if len(s.timesteps) >= 2 else 0

    @property
    def dummy_sample(self) -> torch.Tensor:
        return torch.rand((4, 3, 8, 8))

    def _forward_kwargs(self) -> tuple[dict, int]:
        kwargs = dict(self.forward_default_kwargs)
        return kwargs, kwargs.pop("num_inference_steps", self.default_num_inference_steps)

    def _seeded(self, scheduler, kwargs: dict) -> dict:
        if "generator" in inspect.signature(scheduler.step).parameters:
            kwargs["generator"] = torch.manual_seed(0)
        return kwargs

    # ---- the checks --------------------------------------------------------------------------

    def test_from_save_pretrained(self):
        """A scheduler saved with ``save_config`` and reloaded steps exactly like the original."""
        kwargs, n = self._forward_kwargs()
        for cls in self.scheduler_classes:
            timestep = self.default_timestep
            scheduler = self._scheduler(cls)
            sample = self.dummy_sample
            residual = 0.1 * sample
            with tempfile.TemporaryDirectory() as tmp:
                scheduler.save_config(tmp)
                new = cls.from_pretrained(tmp)
            scheduler.set_timesteps(n)
            new.set_timesteps(n)
            out = scheduler.step(residual, timestep, sample, **self._seeded(scheduler, kwargs)).prev_sample
            new_out = new.step(residual, timestep, sample, **self._seeded(new, kwargs)).prev_sample
            assert torch.sum(torch.abs(out - new_out)) < 1e-5, "Scheduler outputs are not identical"

    def test_compatibles(self):
        """Every scheduler in ``compatibles`` is built from this config, and the config survives the round trip."""
        for cls in self.scheduler_classes:
            scheduler = self._scheduler(cls)
            assert all(c is not None for c in scheduler.compatibles)
            comp = None
            for comp_cls in scheduler.compatibles:
                comp = comp_cls.from_config(scheduler.config)
                assert comp is not None
            new = cls.from_config(comp.config)
            same_keys = {k: v for k, v in new.config.items() if k in scheduler.config}
            extra = {k: v for k, v in new.config.items() if k not in scheduler.config}
            assert same_keys == dict(scheduler.config)
            assert set(extra) & set(inspect.signature(cls.__init__).parameters) == set()

    def test_from_pretrained(self):
        """``save_pretrained`` then ``from_pretrained`` gives the same config."""
        for cls in self.scheduler_classes:
            scheduler = self._scheduler(cls)
            with tempfile.TemporaryDirectory() as tmp:
                scheduler.save_pretrained(tmp)
                new = cls.from_pretrained(tmp)
            config = dict(scheduler.config)
            del config["_use_default_values"]
            assert config == new.config

    def test_step_shape(self):
        """A step at the first and at the second timestep keeps the sample's shape."""
        kwargs, n = self._forward_kwargs()
        t0, t1 = self.default_timestep, self.default_timestep_2
        for cls in self.scheduler_classes:
            scheduler = self._scheduler(cls)
            sample = self.dummy_sample
            residual = 0.1 * sample
            scheduler.set_timesteps(n)
            out0 = scheduler.step(residual, t0, sample, **kwargs).prev_sample
            out1 = scheduler.step(residual, t1, sample, **kwargs).prev_sample
            self.assertEqual(out0.shape, sample.shape)
            self.assertEqual(out0.shape, out1.shape)

    def test_scheduler_outputs_equivalence(self):
        """``step(..., return_dict=False)`` returns the same tensors as the output dataclass."""
        def nan_to_zero(t):
            t[t != t] = 0
            return t

        def check(tup, dic):
            if isinstance(tup, (list, tuple)):
                for a, b in zip(tup, dic.values()):
                    check(a, b)
            elif isinstance(tup, dict):
                for a, b in zip(tup.values(), dic.values()):
                    check(a, b)
            elif tup is not None:
                self.assertTrue(torch.allclose(nan_to_zero(tup), nan_to_zero(dic), atol=1e-5),
                                msg=f"tuple and dict outputs differ by {torch.max(torch.abs(tup - dic))}")

        kwargs, n = self._forward_kwargs()
        timestep = self.default_timestep
        for cls in self.scheduler_classes:
            scheduler = self._scheduler(cls)
            sample = self.dummy_sample
            residual = 0.1 * sample
            scheduler.set_timesteps(n)
            as_dict = scheduler.step(residual, timestep, sample, **self._seeded(scheduler, kwargs))
            scheduler.set_timesteps(n)
            as_tuple = scheduler.step(residual, timestep, sample, return_dict=False, **self._seeded(scheduler, kwargs))
            check(as_tuple, as_dict)

    def test_scheduler_public_api(self):
        """``init_noise_sigma``, ``scale_model_input`` and ``step`` exist; scaling keeps the shape."""
        for cls in self.scheduler_classes:
            scheduler = self._scheduler(cls)
            self.assertTrue(hasattr(scheduler, "init_noise_sigma"), f"{cls} has no init_noise_sigma")
            self.assertTrue(hasattr(scheduler, "scale_model_input"), f"{cls} has no scale_model_input")
            self.assertTrue(hasattr(scheduler, "step"), f"{cls} has no step")
            sample = self.dummy_sample
            self.assertEqual(sample.shape, scheduler.scale_model_input(sample, 0.0).shape)

    def test_add_noise_device(self):
        """``add_noise`` at a timestep of the schedule keeps the shape (on the test device)."""
        for cls in self.scheduler_classes:
            scheduler = self._scheduler(cls)
            scheduler.set_timesteps(self.default_num_inference_steps)
            sample = self.dummy_sample
            scaled = scheduler.scale_model_input(sample, 0.0)
            self.assertEqual(sample.shape, scaled.shape)
            noised = scheduler.add_noise(scaled, torch.randn(scaled.shape), scheduler.timesteps[5][None])
            self.assertEqual(noised.shape, scaled.shape)

    def test_deprecated_kwargs(self):
        """``**kwargs`` in ``__init__`` if and only if ``_deprecated_kwargs`` names deprecated arguments."""
        for cls in self.scheduler_classes:
            has_kwargs = "kwargs" in inspect.signature(cls.__init__).parameters
            has_deprecated = len(cls._deprecated_kwargs) > 0
            if has_kwargs and not has_deprecated:
                raise ValueError(f"{cls} has `**kwargs` in its __init__ but no `_deprecated_kwargs`")
            if not has_kwargs and has_deprecated:
                raise ValueError(f"{cls} has `_deprecated_kwargs` but no `**kwargs` in its __init__")

    def test_trained_betas(self):
        """``trained_betas`` are taken as given and survive ``save_pretrained``/``from_pretrained``."""
        for cls in self.scheduler_classes:
            scheduler = cls(**self.get_scheduler_config(), trained_betas=np.array([0.1, 0.3]))
            with tempfile.TemporaryDirectory() as tmp:
                scheduler.save_pretrained(tmp)
                new = cls.from_pretrained(tmp)
            assert scheduler.betas.tolist() == new.betas.tolist()

    def test_getattr_is_correct(self):
        """Instance attributes read silently, config keys read as attributes warn, unknown names raise."""
        for cls in self.scheduler_classes:
            scheduler = self._scheduler(cls)
            scheduler.dummy_attribute = 5
            scheduler.register_to_config(test_attribute=5)
            with captured("diffusers.configuration_utils") as log:
                assert hasattr(scheduler, "dummy_attribute")
                assert getattr(scheduler, "dummy_attribute") == 5
                assert scheduler.dummy_attribute == 5
            assert log.getvalue() == ""
            with captured("diffusers.schedulers.scheduling_utils") as log:
                assert hasattr(scheduler, "save_pretrained")
                assert scheduler.save_pretrained == getattr(scheduler, "save_pretrained")
            assert log.getvalue() == ""
            with self.assertWarns(FutureWarning):
                assert scheduler.test_attribute == 5
            with self.assertWarns(FutureWarning):
                assert getattr(scheduler, "test_attribute") == 5
            with self.assertRaises(AttributeError) as error:
                scheduler.does_not_exist
            assert str(error.exception) == f"'{type(scheduler).__name__}' object has no attribute 'does_not_exist'"
