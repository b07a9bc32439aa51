"""The library under the stages, by role: core, loaders, shapes, tracking, report (math and networks: ``models``)."""
